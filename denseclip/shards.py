"""WebDataset tar shards: the one on-disk format every stage reads images from.

A shard is a plain POSIX tar whose members are named ``{key}.{ext}`` (``jpg``, ``png``,
``seg.png``, ``json``, ``txt`` ...); consecutive members with the same key form one sample.
Paths may be local or any fsspec URL (``s3://bucket/prefix/shard-000000.tar``).
"""

from __future__ import annotations

import io
import logging
import posixpath
import re
import tarfile
import time
from collections.abc import Iterable, Iterator

import fsspec

from denseclip.damage import READ_ATTEMPTS, RETRY_DELAY_S, SHARD_DAMAGE, DamagedShardError, is_transient
from denseclip.storage import write_bytes

log = logging.getLogger(__name__)

_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+(/[A-Za-z0-9_\-]+)*$")


def sanitize_key(raw: str) -> str:
    """Turn an arbitrary relative name into a safe sample key.

    Keeps ASCII letters, digits, ``_`` and ``-`` within path parts (anything else, dots included, becomes ``_``:
    a member's extension starts at its first dot) and drops ``.``, ``..`` and empty parts, so a key can never
    address anything outside the folder it is written under. Raises ValueError when nothing usable is left.
    """
    parts = []
    for part in re.split(r"[\\/]+", raw):
        if part in ("", ".", ".."):
            continue
        parts.append(re.sub(r"[^A-Za-z0-9_\-]", "_", part))
    key = "/".join(parts)
    if not key:
        raise ValueError(f"sample key {raw!r} has no usable characters")
    return key


def split_member_name(name: str) -> tuple[str, str]:
    """``'a/b/0001.seg.png' -> ('a/b/0001', 'seg.png')`` (the extension starts at the first dot of the basename)."""
    dirname, base = posixpath.split(name)
    stem, dot, ext = base.partition(".")
    return posixpath.join(dirname, stem) if dirname else stem, ext if dot else ""


def iter_tar_samples(fileobj, shard: str = "") -> Iterator[dict]:
    """Yield samples ``{"__key__": str, "__shard__": shard, ext: bytes, ...}`` from an open tar stream; each as
    soon as the header of the next sample's first member is read (a sample cut short is never yielded)."""
    current: dict | None = None
    with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, ext = split_member_name(member.name)
            if current is not None and current["__key__"] != key:
                yield current
                current = None
            data = tar.extractfile(member).read()
            if current is None:
                current = {"__key__": key, "__shard__": shard}
            current[ext] = data
    if current is not None:
        yield current


def read_shard(url: str, **storage_options) -> Iterator[dict]:
    """Yield the samples of one shard at a local path or fsspec URL.

    A transient storage error (:func:`denseclip.damage.is_transient`) re-opens the shard and goes on after the
    samples already yielded, up to ``READ_ATTEMPTS`` reads in all; then it is raised. A shard that is not a
    readable tar raises :class:`DamagedShardError` after the samples before the damage.
    """
    done = 0
    for attempt in range(READ_ATTEMPTS):
        try:
            with fsspec.open(url, "rb", **storage_options) as f:
                for index, sample in enumerate(iter_tar_samples(f, shard=url)):
                    if index >= done:
                        done += 1
                        yield sample
            return
        except SHARD_DAMAGE as exc:
            raise DamagedShardError(url, f"corrupt shard after {done} samples: {type(exc).__name__}: {exc}") from exc
        except OSError as exc:
            if not is_transient(exc) or attempt == READ_ATTEMPTS - 1:
                raise
            delay = RETRY_DELAY_S * 2**attempt
            log.warning("reading %s failed after %d samples (%s: %s); retrying in %g s", url, done,
                        type(exc).__name__, exc, delay)
            time.sleep(delay)


def expand_shards(pattern: str | Iterable[str], **storage_options) -> list[str]:
    """Expand a path, glob, directory or list of them into a sorted list of ``.tar`` shard URLs.

    Raises FileNotFoundError naming the pattern when nothing matches.
    """
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    out: list[str] = []
    for pat in patterns:
        fs, _, paths = fsspec.get_fs_token_paths(pat, storage_options=storage_options)
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        found = []
        for p in paths:
            if fs.isdir(p):
                found += [q for q in fs.find(p) if q.endswith(".tar")]
            elif fs.exists(p):
                found.append(p)
        if not found:
            raise FileNotFoundError(f"no shards match {pat!r}")
        prefix = "" if protocol in ("file", "local") else f"{protocol}://"
        out += [prefix + p for p in sorted(found)]
    return out


def _tar_bytes(samples: Iterable[dict]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            key = sample["__key__"]
            if not _KEY_RE.match(key):
                raise ValueError(f"unsafe sample key {key!r}: use sanitize_key()")
            for ext, data in sample.items():
                if ext.startswith("__"):
                    continue
                if isinstance(data, str):
                    data = data.encode("utf-8")
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                info.mode = 0o644
                info.mtime = 0  # deterministic shards: same samples, same bytes
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_shard(url: str, samples: Iterable[dict], **storage_options) -> int:
    """Write ``samples`` as one tar shard at ``url`` and return the byte size.

    The shard appears atomically: local files are written under a temporary name and renamed;
    object stores publish an object only when its upload completes.
    """
    data = _tar_bytes(samples)
    write_bytes(url, data, **storage_options)
    return len(data)

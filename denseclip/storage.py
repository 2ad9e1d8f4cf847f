"""Whole-object reads and atomic writes on local paths and fsspec URLs (``s3://...``), used by every writer."""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import uuid
from collections.abc import Iterator
from typing import BinaryIO

import fsspec

_CHUNK = 1 << 20


def is_local(url: str) -> bool:
    """True for plain paths and ``file://`` URLs."""
    protocol = fsspec.utils.get_protocol(url)
    return protocol in ("file", "local")


def join(url: str, *parts: str) -> str:
    """``join("s3://b/root", "masks", "part-1.parquet") -> "s3://b/root/masks/part-1.parquet"``."""
    if is_local(url):
        return os.path.join(url, *parts)
    return posixpath.join(url.rstrip("/"), *parts)


def write_bytes(url: str, data: bytes, **storage_options) -> None:
    """Publish ``data`` at ``url`` atomically: readers see the old object, or the whole new one, never a part.

    Local files are written under a temporary name in the same folder and renamed (see :func:`open_atomic`);
    object stores publish an object only when its single upload completes.
    """
    if is_local(url):
        with open_atomic(url) as f:
            f.write(data)
    else:
        fs, path = fsspec.core.url_to_fs(url, **storage_options)
        fs.pipe_file(path, data)


def _fsync_folder(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def open_atomic(url: str, **storage_options) -> Iterator[BinaryIO]:
    """A binary file to stream a large object into; published at ``url`` as a whole when the block ends without
    an exception, never in part (as :func:`write_bytes`, without holding the object in memory).

    On local disk the temporary file is flushed to the device before the rename and the folder after it: without
    that, a power loss can leave an empty or partial file behind the new name (ext4, XFS), or lose the rename.
    """
    if is_local(url):
        path = fsspec.core.url_to_fs(url)[1]
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            _fsync_folder(folder)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return
    fs, path = fsspec.core.url_to_fs(url, **storage_options)
    f = fs.open(path, "wb")
    try:
        yield f
    except BaseException:
        f.discard()  # object stores publish on close; an aborted upload publishes nothing
        raise
    f.close()


def read_bytes(url: str, **storage_options) -> bytes:
    """The whole object at ``url``; FileNotFoundError naming it when absent."""
    fs, path = fsspec.core.url_to_fs(url, **storage_options)
    try:
        return fs.cat_file(path)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{url} does not exist") from exc


def sha256(url: str, **storage_options) -> str:
    """The SHA-256 (hex) of the object at ``url``, read in chunks of 1 MiB."""
    digest = hashlib.sha256()
    with fsspec.open(url, "rb", **storage_options) as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def exists(url: str, **storage_options) -> bool:
    fs, path = fsspec.core.url_to_fs(url, **storage_options)
    return fs.exists(path)


def list_names(url: str, **storage_options) -> list[str]:
    """Sorted base names of the files directly inside the folder ``url`` (empty when it does not exist)."""
    fs, path = fsspec.core.url_to_fs(url, **storage_options)
    fs.invalidate_cache(path)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    return sorted(posixpath.basename(e["name"].rstrip("/")) for e in entries if e["type"] == "file")

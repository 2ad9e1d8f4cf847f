"""Resumable conversion of source records into deterministic tar shards, a manifest and an errors file.

Shard ``i`` always holds records ``[i * shard_size, (i + 1) * shard_size)`` minus the bad ones, so a shard's
bytes depend only on its own inputs. A shard is finished once its status file ``_parts/<shard>.json`` exists
(written after the shard itself); a re-run skips finished shards and rewrites the rest, so a run killed
midway and re-run ends with the same files as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor

from tqdm import tqdm

from denseclip import storage
from denseclip.shards import write_shard
from denseclip.sources.convert import SampleError
from denseclip.sources.layouts import SourceRecord

MANIFEST = "manifest.json"
ERRORS = "errors.jsonl"
STATUS_DIR = "_parts"


def _digest(records: list[SourceRecord]) -> str:
    return hashlib.sha1("\n".join(f"{r.key}\t{r.name}" for r in records).encode("utf-8")).hexdigest()


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, sort_keys=True, indent=1) + "\n").encode("utf-8")


def _write_one_shard(out: str, name: str, records: list[SourceRecord],
                     convert: Callable[[SourceRecord], dict]) -> dict:
    """Convert ``records`` into shard ``out/name``, then record its status; returns the status."""
    samples, errors = [], []
    for record in records:
        try:
            samples.append(convert(record))
        except SampleError as exc:
            errors.append(exc.as_dict())
    nbytes = write_shard(storage.join(out, name), samples)
    status = {"name": name, "samples": len(samples), "nbytes": nbytes, "inputs": _digest(records),
              "errors": errors}
    storage.write_bytes(storage.join(out, STATUS_DIR, f"{name}.json"), _json_bytes(status))
    return status


def _finished_status(out: str, name: str, records: list[SourceRecord]) -> dict | None:
    """The status of shard ``name`` if it was finished from these same ``records``, else None."""
    url = storage.join(out, STATUS_DIR, f"{name}.json")
    if not (storage.exists(url) and storage.exists(storage.join(out, name))):
        return None
    status = json.loads(storage.read_bytes(url))
    if status["inputs"] != _digest(records):
        raise ValueError(f"{out} already holds shard {name} made from other inputs (another split file, "
                         f"root or --shard-size); write to a new --out")
    return status


def _statuses(out: str, jobs: list[tuple[str, list[SourceRecord]]], convert: Callable[[SourceRecord], dict],
              workers: int) -> Iterator[dict]:
    """Statuses of all shards in order: finished ones read back, the rest written (in ``workers`` processes)."""
    finished = {name: _finished_status(out, name, records) for name, records in jobs}
    pending = [(name, records) for name, records in jobs if finished[name] is None]
    if workers > 1 and len(pending) > 1:
        with ProcessPoolExecutor(min(workers, len(pending))) as pool:
            futures = {name: pool.submit(_write_one_shard, out, name, records, convert) for name, records in pending}
            for name, _ in jobs:
                yield finished[name] or futures[name].result()
        return
    for name, records in jobs:
        yield finished[name] or _write_one_shard(out, name, records, convert)


def prepare_shards(records: list[SourceRecord], out: str, prefix: str, shard_size: int,
                   convert: Callable[[SourceRecord], dict], workers: int = 1, progress: bool = True,
                   summary: dict | None = None) -> dict:
    """Write ``out/{prefix}-{index:06d}.tar`` shards of ``shard_size`` records, ``out/manifest.json``
    and ``out/errors.jsonl`` (one ``{"key", "source", "reason"}`` per bad record); returns the manifest.

    ``convert`` turns a record into a sample or raises SampleError (and must be picklable when ``workers > 1``).
    ``summary`` entries (dataset, split, ...) are copied into the manifest.
    """
    if shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
    jobs = [(f"{prefix}-{i // shard_size:06d}.tar", records[i:i + shard_size])
            for i in range(0, len(records), shard_size)]
    shards, errors = [], []
    with tqdm(total=len(records), unit="img", desc=prefix, disable=not progress) as bar:
        for (_, chunk), status in zip(jobs, _statuses(out, jobs, convert, workers)):
            shards.append({"name": status["name"], "samples": status["samples"], "nbytes": status["nbytes"]})
            errors += status["errors"]
            bar.update(len(chunk))
    manifest = dict(summary or {}, shard_size=shard_size, num_records=len(records),
                    num_samples=sum(s["samples"] for s in shards), num_errors=len(errors), shards=shards)
    storage.write_bytes(storage.join(out, ERRORS), "".join(json.dumps(e, sort_keys=True) + "\n" for e in errors).encode())
    storage.write_bytes(storage.join(out, MANIFEST), _json_bytes(manifest))
    return manifest

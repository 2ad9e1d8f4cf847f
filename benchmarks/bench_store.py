"""The mask store at bulk scale: key lookups and COCO export memory on a store of a million rows.

    python benchmarks/bench_store.py [--rows 1000000] [--part-rows 1000] [--lookups 2000] [--root DIR]

Writes the rows directly (not labelled): 48x64 label maps of 3 to 5 classes (16 distinct maps, reused), in parts
of ``--part-rows`` rows, then measures in this one process (ratios against the previous implementation, run
here too):
- the key index: the time to build it, and the latency of ``MaskStore.get(key)`` on random keys, against the
  previous lookup (a key -> part map from every part's key column, then a filtered read of the part);
- the COCO export: peak memory (RSS) and CPU time, in a child process each, of the streaming ``export_coco`` on a
  tenth of the rows and on all of them, against the previous in-memory export (``coco_dataset`` +
  ``json.dumps``) on the tenth.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from denseclip import storage
from denseclip.export import coco_dataset, export_coco
from denseclip.mask_store import (
    MASK_SCHEMA,
    MASKS_DIR,
    MaskStore,
    MaskStoreWriter,
    encode_mask,
    write_key_index,
)

CLASSES = [f"class {i}" for i in range(8)]


def sample_maps(count: int = 16, seed: int = 0) -> list[bytes]:
    """PNG bytes of ``count`` 48x64 label maps of a few blobs each (what small predictions look like)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:48, :64]
    maps = []
    for _ in range(count):
        labels = np.zeros((48, 64), np.uint8)
        for c in rng.choice(np.arange(1, len(CLASSES)), size=rng.integers(2, 5), replace=False):
            cy, cx, r = rng.integers(0, 48), rng.integers(0, 64), rng.integers(6, 20)
            labels[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = c
        maps.append(encode_mask(labels))
    return maps


def write_store(root: str, rows: int, part_rows: int) -> float:
    """Write ``rows`` rows in parts of ``part_rows``; returns seconds."""
    maps = sample_maps()
    writer = MaskStoreWriter(root, {"model": "bench", "vocabulary": [[c] for c in CLASSES]})
    start = time.perf_counter()
    for part, first in enumerate(range(0, rows, part_rows)):
        ids = range(first, min(rows, first + part_rows))
        keys = [f"bench/{i:08d}" for i in ids]
        table = pa.table({"key": keys, "shard": [f"shard-{part:06d}.tar"] * len(keys),
                          "height": np.full(len(keys), 48, np.int32), "width": np.full(len(keys), 64, np.int32),
                          "mask": [maps[i * 7919 % len(maps)] for i in ids], "confidence": [None] * len(keys)},
                         schema=MASK_SCHEMA)
        writer.write_part(f"{part:06d}", table, record={"shard": f"shard-{part:06d}.tar"})
    return time.perf_counter() - start


def previous_lookups(root: str, keys: list[str]) -> tuple[float, list[float]]:
    """The lookup this project had before the key index: a key -> part map read from every part's key column,
    then one filtered read of the part per key. Returns (seconds to build the map, seconds per lookup)."""
    store = MaskStore(root)
    start = time.perf_counter()
    index = {}
    for part in sorted(store.committed_parts()):
        for key in pq.read_table(storage.join(root, MASKS_DIR, f"part-{part}.parquet"), columns=["key"]).column(0):
            index[key.as_py()] = part
    build = time.perf_counter() - start
    times = []
    for key in keys:
        start = time.perf_counter()
        fs, path = fsspec.core.url_to_fs(storage.join(root, MASKS_DIR, f"part-{index[key]}.parquet"))
        pq.read_table(path, filesystem=fs, columns=["mask"], filters=[("key", "==", key)]).column(0)[0].as_py()
        times.append(time.perf_counter() - start)
    return build, times


def index_lookups(root: str, keys: list[str]) -> tuple[float, list[float]]:
    """``MaskStore.get`` through the key index: (seconds to build the index, seconds per lookup, the first one
    included, which opens the index)."""
    shutil.rmtree(os.path.join(root, "index"), ignore_errors=True)
    start = time.perf_counter()
    write_key_index(root)
    build = time.perf_counter() - start
    store = MaskStore(root)
    times = []
    for key in keys:
        start = time.perf_counter()
        store.get(key)
        times.append(time.perf_counter() - start)
    return build, times


def child_export(root: str, out: str, in_memory: bool) -> None:
    """Run in a child process: one export, then print the process's peak RSS in MiB and the CPU seconds it took
    (CPU time: other jobs on the machine stretch the wall clock, not the work)."""
    store = MaskStore(root)
    start = time.process_time()
    if in_memory:
        storage.write_bytes(storage.join(out, "annotations.json"), json.dumps(coco_dataset(store, CLASSES)).encode())
    else:
        export_coco(store, out, CLASSES)
    print(f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} {time.process_time() - start:.1f}")


def export_peak(root: str, in_memory: bool) -> tuple[float, float]:
    """(peak RSS in MiB, CPU seconds) of exporting the store at ``root`` to COCO in a fresh process."""
    with tempfile.TemporaryDirectory() as out:
        done = subprocess.run([sys.executable, __file__, "--child-export", root, out, str(int(in_memory))],
                              capture_output=True, text=True, check=True)
    peak, seconds = done.stdout.split()
    return float(peak), float(seconds)


def ms(values: list[float], q: float) -> float:
    return 1e3 * statistics.quantiles(values, n=100)[int(q) - 1] if q < 100 else 1e3 * max(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--part-rows", type=int, default=1000)
    parser.add_argument("--lookups", type=int, default=2000)
    parser.add_argument("--root", help="where to write the store (default: a temporary folder, removed after)")
    parser.add_argument("--child-export", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_export:
        root, out, in_memory = args.child_export
        child_export(root, out, in_memory == "1")
        return
    workdir = args.root or tempfile.mkdtemp(prefix="bench-store-")
    root, tenth = os.path.join(workdir, "all"), os.path.join(workdir, "tenth")
    try:
        write_store(tenth, args.rows // 10, args.part_rows)
        seconds = write_store(root, args.rows, args.part_rows)
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)
        print(f"store: {args.rows} rows in {args.rows // args.part_rows} parts, {size / 2**20:.0f} MiB, "
              f"written in {seconds:.0f} s")
        keys = random.Random(0).sample([f"bench/{i:08d}" for i in range(args.rows)], args.lookups)
        build, new = index_lookups(root, keys)
        print(f"key index: built in {build:.1f} s, {os.path.getsize(os.path.join(root, 'index', 'keys.parquet')) / 2**20:.1f} MiB; "
              f"get(): first {1e3 * new[0]:.0f} ms, median {ms(new[1:], 50):.2f} ms, p95 {ms(new[1:], 95):.2f} ms")
        old_build, old = previous_lookups(root, keys[:200])
        print(f"previous (key map from every part + filtered part read): map in {old_build:.1f} s, "
              f"median {ms(old, 50):.2f} ms, p95 {ms(old, 95):.2f} ms per lookup")
        print(f"ratio (previous / index): opening the store (first lookup) {old_build / new[0]:.1f}x, "
              f"median lookup {ms(old, 50) / ms(new[1:], 50):.1f}x")
        small, small_s = export_peak(tenth, False)
        full, full_s = export_peak(root, False)
        memory, memory_s = export_peak(tenth, True)
        print(f"COCO export peak RSS (CPU time): streaming {small:.0f} MiB at {args.rows // 10} rows ({small_s:.0f} s), "
              f"{full:.0f} MiB at {args.rows} rows ({full_s:.0f} s); in memory (previous) {memory:.0f} MiB at "
              f"{args.rows // 10} rows ({memory_s:.0f} s)")
    finally:
        if not args.root:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()

"""How to store a 640x480 label map and its confidence: the candidate cell encodings, bytes and CPU time.

    OMP_NUM_THREADS=1 python benchmarks/mask_encoding.py [--input 'runs/world/*.tar'] [--images 16] [--repeats 10]

Maps: DenseCLIP's own predictions on the synthetic world and the capacity plan's upper-bound maps, as in
benchmarks/bench_host.py. Candidates, for the label map and the (uint8-quantised) confidence: PNG at zlib levels 1
and 6 (Pillow's default, the store's format 1), zstd levels 1 and 3 of the raw values, zstd of the 2-D difference
(the store's format 2 for the confidence), and raw values compressed by Parquet itself (zstd pages, 64 rows a row
group: no per-cell codec, but every lookup then decompresses its whole row group). Prints the mean bytes per map
and the median milliseconds of CPU time to encode and to decode one.
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from bench_host import realistic_maps, upper_bound_maps, world_jpegs  # benchmarks/bench_host.py
from PIL import Image

ZSTD = {level: pa.Codec("zstd", compression_level=level) for level in (1, 3)}


def png(array: np.ndarray, level: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG", compress_level=level)
    return out.getvalue()


def unpng(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def difference(array: np.ndarray) -> np.ndarray:
    """The 2-D difference modulo 256 of a uint8 (H, W) map (zero outside it)."""
    vertical = array.copy()
    vertical[1:] -= array[:-1]
    out = vertical.copy()
    out[:, 1:] -= vertical[:, :-1]
    return out


def undifference(array: np.ndarray) -> np.ndarray:
    return np.cumsum(np.cumsum(array, axis=0, dtype=np.uint8), axis=1, dtype=np.uint8)


def codecs(shape: tuple[int, int]) -> dict[str, tuple[Callable, Callable]]:
    """name -> (encode uint8 (H, W) -> bytes, decode bytes -> uint8 (H, W))."""
    size = shape[0] * shape[1]

    def unzstd(level: int, data: bytes) -> np.ndarray:
        return np.frombuffer(ZSTD[level].decompress(data, decompressed_size=size), np.uint8).reshape(shape)

    out = {f"png{level}": (lambda a, level=level: png(a, level), unpng) for level in (1, 6)}
    for level in (1, 3):
        out[f"zstd{level}"] = (lambda a, level=level: ZSTD[level].compress(a, asbytes=True),
                               lambda d, level=level: unzstd(level, d))
        out[f"diff+zstd{level}"] = (lambda a, level=level: ZSTD[level].compress(difference(a), asbytes=True),
                                    lambda d, level=level: undifference(unzstd(level, d)))
    return out


def cpu_ms(fn: Callable, items: list, repeats: int) -> float:
    """Median milliseconds of CPU time per item of ``fn`` over ``items`` (other jobs on the machine stretch the
    wall clock, not the work)."""
    times = []
    for _ in range(repeats):
        start = time.process_time()
        for item in items:
            fn(item)
        times.append(time.process_time() - start)
    return 1e3 * statistics.median(times) / len(items)


def parquet_bytes(arrays: list[np.ndarray]) -> float:
    """Bytes per map of raw maps in a Parquet column compressed with zstd (pyarrow's default level)."""
    buf = io.BytesIO()
    pq.write_table(pa.table({"cell": pa.array([a.tobytes() for a in arrays], pa.binary())}), buf,
                   compression="zstd", row_group_size=64)
    return len(buf.getvalue()) / len(arrays)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", help="shards of the scenes (default: the synthetic world rendered at 640 px)")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        jpegs = world_jpegs(args.input, args.images, Path(tmp))
    cases = {"realistic": realistic_maps(jpegs, "denseclip-tiny-shapes", "synthetic"),
             "upper bound": upper_bound_maps(args.images)}
    for case, maps in cases.items():
        for kind, index in (("label map", 0), ("confidence", 1)):
            arrays = [m[index] for m in maps]
            print(f"\n{case} {kind} (640x480 uint8): kB per map, encode ms, decode ms")
            for name, (encode, decode) in codecs(arrays[0].shape).items():
                cells = [encode(a) for a in arrays]
                assert all(np.array_equal(decode(c), a) for c, a in zip(cells, arrays))
                print(f"  {name:12s} {np.mean([len(c) for c in cells]) / 1e3:7.1f} kB "
                      f"{cpu_ms(encode, arrays, args.repeats):7.2f} ms {cpu_ms(decode, cells, args.repeats):7.2f} ms")
            print(f"  {'Parquet zstd':12s} {parquet_bytes(arrays) / 1e3:7.1f} kB (raw cells, compressed pages)")


if __name__ == "__main__":
    main()

"""Labeling: the Ray Data pipeline against a bare single-process loop, its memory, and upsample_topk.

    python benchmarks/bench_label.py [--images 1000] [--small 200] [--size 512] [--memory 200 2000] [--topk-images 12]
                                     [--repeats 3] [--only throughput|memory|topk]

1. Throughput. Synthetic scenes (``--size`` px, 512 by default: the size of the photos users label; shards of 100)
   are labelled with the shipped tiny CLIP in this process
   by a bare loop (read, decode, DenseCLIP, encode, commit one part per shard), with one torch thread and with
   one per core (the faster is the baseline), and by the pipeline on a local Ray started beforehand (actor
   start and model loading are timed). Each runs on ``--small`` and ``--images`` scenes: images/s of the
   large run, and the marginal rate (extra images / extra seconds), which leaves out fixed start-up costs.
2. Memory. ``pipelines/label.py`` runs as a subprocess (its own local Ray) on each ``--memory`` size; the peak
   of the proportional set size (PSS) summed over its whole process tree (driver, Ray, workers) is reported.
3. upsample_topk. DenseCLIP with ``upsample_topk=3`` against exact upsampling (None) on the 171 COCO-Stuff
   classes, on 512 px scenes: pixel agreement of the label maps and milliseconds per image.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from denseclip.config import LabelerConfig, resolve_vocabulary
from denseclip.images import decode_image
from denseclip.mask_store import MaskStoreWriter
from denseclip.predictor import DenseCLIP
from denseclip.ray.labeling import label_shards, part_id, prepare_labeling, ray_cluster, run_provenance
from denseclip.shards import read_shard
from denseclip.synthetic import render_scene, write_shards

ROOT = Path(__file__).resolve().parents[1]
SHARD_SIZE = 100


def bare_loop(shards: list[str], output: str, config: LabelerConfig, classes: list[list[str]]) -> float:
    """Label ``shards`` in this process, one part per shard as the pipeline does; returns seconds."""
    start = time.perf_counter()
    dense_clip = DenseCLIP.from_config(config, classes)
    writer = MaskStoreWriter(output, {**run_provenance(config, classes), "fingerprint": dense_clip.clip.fingerprint})
    for shard in shards:
        samples = list(read_shard(shard))
        images = [decode_image(s["jpg"], s["__key__"]) for s in samples]
        rows = []
        for i in range(0, len(images), config.batch_size):
            for sample, (labels, confidence) in zip(samples[i:i + config.batch_size],
                                                    dense_clip.label_maps(images[i:i + config.batch_size])):
                rows.append({"key": sample["__key__"], "shard": shard, "mask": labels, "confidence": confidence})
        writer.write_part(part_id(shard), rows)
    return time.perf_counter() - start


def pipeline(shards: list[str], output: str, config: LabelerConfig, classes: list[list[str]]) -> float:
    plan = prepare_labeling(shards, output, config, classes)
    return label_shards(plan, config, classes)["wall_time_s"]


def throughput(work: Path, sizes: tuple[int, int], config: LabelerConfig, classes: list[list[str]],
               repeats: int, image_size: int) -> None:
    shards = write_shards(11, max(sizes), str(work / "shards"), shard_size=SHARD_SIZE, size=image_size)
    with ray_cluster():  # a private local Ray, started before the clock runs
        # The bare loop runs with one torch thread and with one per core; the faster one is the baseline (on a
        # busy machine, threads of one process that wait for each other can be far slower than one thread).
        ways = {f"bare, {n} thread{'s' * (n > 1)}": n for n in sorted({1, os.cpu_count()})} | {"pipeline": None}
        seconds: dict[tuple[str, int], list[float]] = {}
        # Round 0 warms up (text-embedding cache, page cache) and is not counted; the ways take turns.
        for round_ in range(repeats + 1):
            for n in (SHARD_SIZE,) if round_ == 0 else sizes:
                subset = shards[: n // SHARD_SIZE]
                for how, threads in ways.items():
                    out = str(work / f"{round_}-{how.replace(' ', '').replace(',', '-')}-{n}")
                    if threads is None:
                        elapsed = pipeline(subset, out, config, classes)
                    else:
                        torch.set_num_threads(threads)
                        elapsed = bare_loop(subset, out, config, classes)
                    if round_:
                        seconds.setdefault((how, n), []).append(elapsed)
    small, large = sizes
    rates = {}
    for how in ways:
        t_small, t_large = (statistics.median(seconds[how, n]) for n in sizes)
        rates[how] = (large / t_large, (large - small) / (t_large - t_small))
        print(f"{how:18s} {small} images {t_small:6.2f} s, {large} images {t_large:6.2f} s (median of {repeats}):"
              f" {rates[how][0]:6.1f} images/s, marginal {rates[how][1]:6.1f} images/s")
    best = max((how for how in ways if how != "pipeline"), key=lambda how: rates[how][0])
    print(f"pipeline / best bare loop ({best}) at {large} images: {rates['pipeline'][0] / rates[best][0]:.2f}x, "
          f"marginal {rates['pipeline'][1] / rates[best][1]:.2f}x")


def _tree_pss_kib(root: int) -> int:
    """PSS of ``root`` and all its descendants (from /proc), in KiB."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def peak_memory(work: Path, n: int, image_size: int) -> tuple[float, float]:
    """Run pipelines/label.py on ``n`` scenes; returns (peak PSS of its process tree in MiB, seconds)."""
    inputs = work / f"memory-{n}"
    write_shards(12, n, str(inputs), shard_size=SHARD_SIZE, size=image_size)
    command = [sys.executable, str(ROOT / "pipelines" / "label.py"), "--input", str(inputs), "--output",
               str(work / f"memory-masks-{n}"), "--vocabulary", "synthetic"]
    start = time.perf_counter()
    job = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.wait(0.5):
            peak = max(peak, _tree_pss_kib(job.pid))

    sampler = threading.Thread(target=sample)
    sampler.start()
    code = job.wait()
    stop.set()
    sampler.join()
    if code != 0:
        raise RuntimeError(f"pipelines/label.py exited with {code}")
    return peak / 1024, time.perf_counter() - start


def upsample_topk(images: int, size: int = 512) -> None:
    classes = resolve_vocabulary("coco_stuff")
    torch.set_num_threads(1)  # the comparison is exact vs top-k, not threading
    scenes = [render_scene(13, i, size=size).image for i in range(images)]
    results, times = {}, {}
    for topk in (None, 3):
        dense_clip = DenseCLIP.from_config(LabelerConfig(model="denseclip-tiny-shapes", upsample_topk=topk, batch_size=1), classes)
        dense_clip.label_images(scenes[:1])  # warm-up
        per_image = []
        for scene in scenes:
            start = time.perf_counter()
            results.setdefault(topk, []).append(dense_clip.label_images([scene])[0][0])
            per_image.append(time.perf_counter() - start)
        times[topk] = statistics.median(per_image) * 1000
    agreement = np.mean([np.mean(a == b) for a, b in zip(results[None], results[3])])
    identical = sum(bool(np.array_equal(a, b)) for a, b in zip(results[None], results[3]))
    print(f"upsample_topk on {len(classes)} classes, {images} scenes of {size} px: exact {times[None]:.1f} ms/image,"
          f" top-3 {times[3]:.1f} ms/image ({times[None] / times[3]:.2f}x faster); pixel agreement "
          f"{100 * agreement:.4f}%, {identical}/{images} maps identical")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--small", type=int, default=200)
    parser.add_argument("--memory", type=int, nargs="+", default=[200, 2000])
    parser.add_argument("--topk-images", type=int, default=12)
    parser.add_argument("--size", type=int, default=512, help="side of the synthetic scenes, in pixels")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds of the throughput comparison")
    parser.add_argument("--only", choices=("throughput", "memory", "topk"))
    args = parser.parse_args()
    config = LabelerConfig(model="denseclip-tiny-shapes")  # the library's defaults, batch size included
    classes = resolve_vocabulary("synthetic")
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; {args.size} px scenes, "
          f"batch size {config.batch_size}")
    with tempfile.TemporaryDirectory(prefix="bench-label-") as tmp:
        work = Path(tmp)
        if args.only in (None, "throughput"):
            throughput(work, (args.small, args.images), config, classes, args.repeats, args.size)
        if args.only in (None, "memory"):
            for n in args.memory:
                peak, seconds = peak_memory(work, n, args.size)
                print(f"memory    {n} images: peak PSS {peak:7.1f} MiB over the job's processes ({seconds:.1f} s)")
        if args.only in (None, "topk"):
            upsample_topk(args.topk_images)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

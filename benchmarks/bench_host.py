"""The host side of labelling: what each CPU stage of pipelines/label.py costs per 640x480 image, against decoding
its JPEG, in each mask-store format, and the pipeline's host ceiling.

    python benchmarks/bench_host.py [--input 'runs/world/*.tar'] [--classes synthetic]
        [--model denseclip-tiny-shapes] [--images 16] [--shard-size 100] [--repeats 7] [--ceiling 100 400]
        [--output benchmarks/host_costs.json]

Maps, at 640x480:
- realistic: DenseCLIP's own predictions (``--model`` over ``--classes``; default the shipped tiny CLIP) for the
  first ``--images`` scenes of ``--input`` (shards; default the synthetic world of pipelines/render_world.py
  rendered at 640 px), each scene resized to 640x480 and saved as a quality-90 JPEG, labelled at the model's
  protocol, which upsamples the prediction to the image's 640x480;
- upper bound: the capacity plan's maps, where every feature cell of RN50's stride on the paper protocol's input
  (30 output pixels) draws its own logits over 171 classes (the most fragmented a prediction at this stride can
  be), on the same JPEGs.

Stages, per image, as the pipeline runs them: read (a shard of the JPEGs, ``read_shard_rows``), decode
(``decode_batch``), encode the label map and the confidence (``encode_mask``, ``encode_confidence``), Parquet
write (the part's bytes), commit (``ShardCommitter.add``: rows to a table, checks, the errors and masks files
published; the Parquet write left out); and the read path of DenseCLIP+ training (``MaskStore.get`` and
``get_confidence`` key by key in a new store object, as training reads a shard; ``get`` alone, as training without a
confidence threshold reads it) and the cells' decoding alone. Each is the median of ``--repeats`` rounds, in
milliseconds of CPU time of this process ("one core"), and of wall time per image while one process per core
runs the same rounds at once ("all cores"; on a machine shared with other work, wall time counts their share
too); every one is also given as a ratio to PIL's decoding of the same JPEGs in the same mode, the floor of a
pipeline that reads JPEGs. Store bytes are the masks part's bytes per image.

Host ceiling: ``label_shards`` (pipelines/label.py's pipeline: Ray Data read, decode, the labelling stage, encode,
commit) on a private local Ray, with the model replaced by REPLAYED PREDICTIONS (``ReplayLabeler``: the
realistic maps of the images, no model), on ``--ceiling`` images (two sizes: the difference leaves out the fixed
start-up costs), in the store's current format: images/s, images/s per core, and CPU-ms per image against the JPEG
decode. The measurements are written to ``--output`` (default benchmarks/host_costs.json, which
benchmarks/capacity.py reads).
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from denseclip.images import decode_image, decode_sample_image
from denseclip.mask_store import (
    FORMAT_VERSION,
    MASK_SCHEMA,
    PNG_FORMAT,
    MaskStore,
    _parquet_bytes,
    decode_confidence,
    decode_mask,
    encode_confidence,
    encode_mask,
)
from denseclip.predictor import DenseCLIP
from denseclip.ray.labeling import (
    Labeler,
    LabelingPlan,
    ShardCommitter,
    _columns,
    _objects,
    decode_batch,
    encode_batch,
    label_shards,
    prepare_labeling,
    ray_cluster,
    read_shard_rows,
)
from denseclip.shards import expand_shards, read_shard, write_shard

ROOT = Path(__file__).resolve().parent
SIZE = (480, 640)  # (H, W): COCO's typical image
JPEG_QUALITY = 90
WORLD_SEED = 31  # a synthetic world the tiny CLIP never saw
UPPER_BOUND = {"classes": 171, "stride": 30}  # COCO-Stuff's classes; RN50's stride on 683x512 seen at 640x480
FORMAT_NAMES = {1: "format 1 (PNG)", 2: "format 2 (zstd)"}
STAGES = ("read", "decode", "encode label", "encode confidence", "Parquet write", "commit")


# ----------------------------------------------------------------------------------------------- maps
def world_jpegs(world: str | None, count: int, workdir: Path) -> list[bytes]:
    """The first ``count`` images of the shards ``world`` (default: the synthetic world rendered at 640 px),
    resized to 640x480 and saved as quality-90 JPEGs."""
    if world is None:
        from denseclip.synthetic import write_shards

        world = str(workdir / "world")
        write_shards(WORLD_SEED, count, world, shard_size=count, size=SIZE[1])
    jpegs = []
    for shard in expand_shards(world):
        for sample in read_shard(shard):
            image = Image.fromarray(decode_sample_image(sample))
            out = io.BytesIO()
            image.resize(SIZE[::-1], Image.BICUBIC).save(out, format="JPEG", quality=JPEG_QUALITY)
            jpegs.append(out.getvalue())
            if len(jpegs) == count:
                return jpegs
    raise ValueError(f"{world} holds {len(jpegs)} images, fewer than --images {count}")


def realistic_maps(jpegs: list[bytes], model: str, vocabulary: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """DenseCLIP's (labels uint8 (H, W), confidence uint8 (H, W)) of each JPEG, at the model's protocol."""
    import torch

    from denseclip.config import LabelerConfig, resolve_vocabulary

    torch.set_num_threads(os.cpu_count() or 1)
    dense_clip = DenseCLIP.from_config(LabelerConfig(model=model, batch_size=1), resolve_vocabulary(vocabulary))
    return [dense_clip.label_maps([decode_image(jpeg)])[0] for jpeg in jpegs]


def upper_bound_maps(count: int, size: tuple[int, int] = SIZE, classes: int = UPPER_BOUND["classes"],
                     stride: int = UPPER_BOUND["stride"], seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Maps whose every ``stride``-pixel cell draws independent logits over ``classes``, bilinearly upsampled to
    ``size``: (labels uint8 (H, W), winning probability x 255 uint8 (H, W)) each."""
    import torch
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(seed)
    maps = []
    for _ in range(count):
        logits = torch.randn(1, classes, size[0] // stride + 1, size[1] // stride + 1, generator=generator)
        confidence, labels = F.interpolate(logits, size=size, mode="bilinear", align_corners=False).softmax(1).max(1)
        maps.append((labels[0].numpy().astype(np.uint8), (confidence[0].numpy() * 255).round().astype(np.uint8)))
    return maps


# --------------------------------------------------------------------------------------------- stages
def labelled_batch(batch: dict[str, np.ndarray], maps: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    """What the labelling stage makes of a decoded ``batch`` whose predictions are ``maps``."""
    return {**{k: batch[k] for k in ("key", "shard", "shard_total", "error")},
            "labels": _objects([m for m, _ in maps]), "confidence": _objects([c for _, c in maps]),
            "fingerprint": np.full(len(maps), "replayed-predictions", dtype=object)}


def stage_costs(shard: str, maps: list[tuple[np.ndarray, np.ndarray]], version: int, workdir: str,
                repeats: int, clock: Callable[[], float]) -> dict[str, float]:
    """Milliseconds per image of each host stage (and of the read path and of PIL's JPEG decode) over the images
    of ``shard``, whose ``i``-th image has the predictions ``maps[i % len(maps)]``, cells in format ``version``
    (the median of ``repeats`` rounds, the stages taking turns within a round, so that the machine's other work
    weighs on each alike); ``bytes``: the masks part's bytes per image."""
    rows = list(read_shard_rows(shard))
    maps = [maps[i % len(maps)] for i in range(len(rows))]
    decoded = decode_batch(_columns(rows))
    encoded = pa.Table.from_pydict({k: list(v) for k, v in encode_batch(labelled_batch(decoded, maps), version).items()})
    table = encoded.select(MASK_SCHEMA.names).cast(MASK_SCHEMA)
    cells = list(zip(table["mask"].to_pylist(), table["confidence"].to_pylist()))
    output = os.path.join(workdir, f"store-{version}-{os.getpid()}")
    plan = LabelingPlan([shard], [shard], output, {"model": "replayed-predictions", "format_version": version},
                        mask_format=version)
    committer = ShardCommitter(plan)
    committer.add(encoded)  # opens the store's writer, once per run

    def store_get(confidence: bool) -> None:  # as DenseCLIP+ training reads a shard's pseudo labels
        store = MaskStore(output)
        for key in table["key"].to_pylist():
            store.get(key)
            if confidence:
                store.get_confidence(key)

    stages = {
        "read": lambda: list(read_shard_rows(shard)),
        "JPEG decode": lambda: [np.asarray(Image.open(io.BytesIO(r["data"])).convert("RGB")) for r in rows],
        "decode": lambda: decode_batch(_columns(rows)),
        "encode label": lambda: [encode_mask(labels, version) for labels, _ in maps],
        "encode confidence": lambda: [encode_confidence(confidence, version) for _, confidence in maps],
        "Parquet write": lambda: _parquet_bytes(table),
        "commit": lambda: committer.add(encoded),  # the Parquet write included, taken off below
        "decode cells": lambda: [(decode_mask(m, SIZE, version), decode_confidence(c, SIZE, version))
                                 for m, c in cells],
        "store get": lambda: store_get(True),
        "store get labels": lambda: store_get(False),
    }
    seconds: dict[str, list[float]] = {name: [] for name in stages}
    for _ in range(repeats):
        for name, stage in stages.items():
            start = clock()
            stage()
            seconds[name].append(clock() - start)
    cost = {name: 1e3 * statistics.median(values) / len(rows) for name, values in seconds.items()}
    cost["commit"] = max(0.0, cost["commit"] - cost["Parquet write"])
    cost["bytes"] = len(_parquet_bytes(table)) / len(rows)
    return cost


def _all_cores_worker(args: tuple) -> dict[str, float]:
    shard, maps_file, version, workdir, repeats = args
    with np.load(maps_file) as saved:
        maps = [(saved[f"labels_{i}"], saved[f"confidence_{i}"]) for i in range(len(saved.files) // 2)]
    return stage_costs(shard, maps, version, workdir, repeats, time.perf_counter)


def all_cores_costs(shard: str, maps_file: str, version: int, workdir: str, repeats: int) -> dict[str, float]:
    """:func:`stage_costs` by wall time in one process per core at once, averaged over the processes."""
    cores = os.cpu_count() or 1
    with multiprocessing.get_context("spawn").Pool(cores) as pool:
        results = pool.map(_all_cores_worker, [(shard, maps_file, version, workdir, repeats)] * cores)
    return {name: statistics.mean(r[name] for r in results) for name in results[0]}


# ---------------------------------------------------------------------------------------------- ceiling
class ReplayLabeler(Labeler):
    """A STAND-IN for the labelling stage that replays stored predictions (no model): image ``bench/<i>`` gets the
    ``i``-th of the maps in ``PREDICTIONS`` (an .npz of ``labels_<i>``, ``confidence_<i>``), cyclically."""

    PREDICTIONS = ""

    def __init__(self, config, classes, torch_threads: int = 1, encode: bool = False):
        with np.load(self.PREDICTIONS) as saved:
            self.maps = [(saved[f"labels_{i}"], saved[f"confidence_{i}"]) for i in range(len(saved.files) // 2)]
        self.fingerprint, self.encode, self.node = "replayed-predictions", encode, ""

    def label_batch(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return labelled_batch(batch, [self.maps[int(key.rsplit("/", 1)[1]) % len(self.maps)] for key in batch["key"]])


def host_ceiling(jpegs: list[bytes], maps_file: str, sizes: tuple[int, int], shard_size: int,
                 workdir: Path) -> dict[str, float]:
    """``label_shards`` with :class:`ReplayLabeler` on ``sizes`` images (shards of ``shard_size``): images/s of
    the larger run; between the two runs (which leaves out the fixed costs: Ray Data's start, the actors'), the
    marginal images/s and CPU-ms per image of this process and its children (the local Ray)."""
    from denseclip.config import LabelerConfig

    ReplayLabeler.PREDICTIONS = maps_file
    config = LabelerConfig(model="denseclip-tiny-shapes", batch_size=8)
    classes = [[f"class {i}"] for i in range(UPPER_BOUND["classes"])]
    seconds = {}
    with ray_cluster():
        for round_, n in enumerate((min(sizes), *sizes)):  # the first run warms Ray's workers up, not counted
            shards = []
            for first in range(0, n, shard_size):
                url = str(workdir / f"ceiling-{round_}" / f"shard-{first // shard_size:06d}.tar")
                write_images(url, jpegs, range(first, min(n, first + shard_size)))
                shards.append(url)
            plan = prepare_labeling(shards, str(workdir / f"ceiling-out-{round_}"), config, classes)
            cpu = _tree_cpu_s()
            start = time.perf_counter()
            label_shards(plan, config, classes, labeler=ReplayLabeler)
            if round_:
                seconds[n] = (time.perf_counter() - start, _tree_cpu_s() - cpu)
    small, large = sorted(sizes)
    (wall_small, cpu_small), (wall_large, cpu_large) = seconds[small], seconds[large]
    return {"images": large, "images_per_s": large / wall_large,
            "marginal_images_per_s": (large - small) / (wall_large - wall_small),
            "marginal_cpu_ms_per_image": 1e3 * (cpu_large - cpu_small) / (large - small)}


def write_images(url: str, jpegs: list[bytes], ids: range) -> None:
    """A shard of images ``bench/<i>`` for ``i`` in ``ids``, image ``i`` being ``jpegs[i % len(jpegs)]``."""
    write_shard(url, ({"__key__": f"bench/{i:06d}", "jpg": jpegs[i % len(jpegs)]} for i in ids))


def _tree_cpu_s() -> float:
    """CPU seconds (user + system) of this process and of its descendants alive now (the local Ray's processes),
    from /proc."""
    stats = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        stats[int(entry)] = (int(fields[1]), int(fields[11]) + int(fields[12]))  # ppid, utime + stime (ticks)
    ticks, todo = 0, [os.getpid()]
    while todo:
        pid = todo.pop()
        ticks += stats.get(pid, (0, 0))[1]
        todo += [child for child, (parent, _) in stats.items() if parent == pid]
    return ticks / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------------- report
def table(case: dict) -> str:
    """A markdown table of one case: each stage in each format and mode, ms per image (x JPEG decode)."""
    columns = [(mode, version) for mode in ("one core", "all cores") for version in sorted(case[mode])]
    lines = ["| stage | " + " | ".join(f"{FORMAT_NAMES[v]}, {m}" for m, v in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]

    def cell(mode: str, version: int, names: tuple[str, ...]) -> str:
        costs = case[mode][version]
        ms = sum(costs[n] for n in names)
        return f"{ms:.2f} ms ({ms / costs['JPEG decode']:.2f}x)"

    rows = [(s, (s,)) for s in ("JPEG decode", *STAGES)] + [("all host stages", STAGES),
                                                           ("read path: decode cells", ("decode cells",)),
                                                           ("read path: MaskStore.get + get_confidence", ("store get",)),
                                                           ("read path: MaskStore.get", ("store get labels",))]
    for label, names in rows:
        lines.append(f"| {label} | " + " | ".join(cell(m, v, names) for m, v in columns) + " |")
    lines.append("| store bytes per image | " + " | ".join(
        f"{case[m][v]['bytes'] / 1e3:.1f} kB" for m, v in columns) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", help="shards of the scenes (path, glob or folder; default: the synthetic world "
                        "rendered at 640 px)")
    parser.add_argument("--classes", default="synthetic", help="the vocabulary (as pipelines/label.py's)")
    parser.add_argument("--model", default="denseclip-tiny-shapes")
    parser.add_argument("--images", type=int, default=16, help="distinct images (and maps) of each case")
    parser.add_argument("--shard-size", type=int, default=100,
                        help="images per shard (and mask-store part), the distinct ones repeated")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--formats", type=int, nargs="+", default=[PNG_FORMAT, FORMAT_VERSION])
    parser.add_argument("--ceiling", type=int, nargs=2, default=[100, 400], metavar=("SMALL", "LARGE"),
                        help="images of the two host-ceiling runs (0 0: skip it)")
    parser.add_argument("--output", default=str(ROOT / "host_costs.json"), help="where to write the measurements")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    command = "python benchmarks/bench_host.py " + " ".join(sys.argv[1:])
    load = os.getloadavg()[0]
    print(f"machine: {os.cpu_count()} CPUs, load average {load:.1f}")
    report: dict = {"command": command.strip(), "cpus": os.cpu_count(), "load_average": {"start": round(load, 1)},
                    "image": f"{SIZE[1]}x{SIZE[0]} JPEG, quality {JPEG_QUALITY}", "world": args.input or "synthetic",
                    "model": args.model, "classes": args.classes, "current_format": FORMAT_VERSION}
    with tempfile.TemporaryDirectory(prefix="bench-host-") as tmp:
        workdir = Path(tmp)
        jpegs = world_jpegs(args.input, args.images, workdir)
        shard = str(workdir / "images.tar")
        write_images(shard, jpegs, range(args.shard_size))
        cases = {"realistic": realistic_maps(jpegs, args.model, args.classes),
                 "upper_bound": upper_bound_maps(args.images)}
        for name, maps in cases.items():
            maps_file = str(workdir / f"{name}.npz")
            np.savez(maps_file, **{f"{kind}_{i}": m[j] for i, m in enumerate(maps)
                                   for j, kind in enumerate(("labels", "confidence"))})
            case = {"one core": {}, "all cores": {}}
            for version in args.formats:
                case["one core"][version] = stage_costs(shard, maps, version, tmp, args.repeats, time.process_time)
                case["all cores"][version] = all_cores_costs(shard, maps_file, version, tmp, args.repeats)
            report[name] = {mode: {str(v): {k: round(x, 4) for k, x in costs.items()} for v, costs in c.items()}
                            for mode, c in case.items()}
            print(f"\n{name} maps ({args.images} images, ms per image and ratio to PIL's JPEG decode):\n{table(case)}")
        if min(args.ceiling) > 0:
            ceiling = host_ceiling(jpegs, str(workdir / "realistic.npz"), tuple(args.ceiling), args.shard_size,
                                   workdir)
            decode = report["realistic"]["one core"][str(FORMAT_VERSION)]["JPEG decode"]
            ceiling["images_per_s_per_core"] = 1e3 / ceiling["marginal_cpu_ms_per_image"]
            ceiling["marginal_cpu_ms_per_image_x_jpeg"] = ceiling["marginal_cpu_ms_per_image"] / decode
            report["ceiling"] = {k: round(v, 3) for k, v in ceiling.items()}
            print(f"\nhost ceiling: label_shards with the model replaced by REPLAYED PREDICTIONS (format "
                  f"{FORMAT_VERSION}, shards of {args.shard_size}): {ceiling['images_per_s']:.1f} images/s on "
                  f"{ceiling['images']} images, marginal {ceiling['marginal_images_per_s']:.1f} images/s and "
                  f"{ceiling['marginal_cpu_ms_per_image']:.1f} CPU-ms per image over the job's processes "
                  f"({ceiling['marginal_cpu_ms_per_image_x_jpeg']:.1f}x the JPEG decode): "
                  f"{ceiling['images_per_s_per_core']:.0f} images/s per core")
    report["load_average"]["end"] = round(os.getloadavg()[0], 1)
    Path(args.output).write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    print(f"\nload average at the end {report['load_average']['end']:.1f}; written {args.output}")


if __name__ == "__main__":
    main()

"""The model stage on CPU: the labeller's FLOP rate against the machine's own matmul rate, bf16 against fp32, and
sliding windows batched across images against one at a time.

    python benchmarks/bench_model.py [--repeats 5] [--threads 2] [--only rate|bf16|windows]

1. rate. ``DenseCLIP.from_config(LabelerConfig(model="RN50", pretrained="random", precision=P), 20 VOC classes).label_images``
   on 16 random 512x512 images (the paper's short side: no resize), library defaults otherwise, for P = auto
   (the default: what this machine resolves it to), fp32 and bf16. FLOPs are counted by ``FlopCounterMode`` on
   ``denseclip.dense.dense_features`` at 512x512; the reference is a 2048x2048 matmul in the labeller's dtype,
   timed right before and after in the same process. Also the dense forward alone (the labeller's own tower on
   the same batches) and the post-processing share (1 - forward time / label_images time: preprocessing,
   scoring, upsampling, labels). Each round times everything once (the matmul before and after); the table
   takes each timing's fastest round: on a machine shared with other jobs, the one least disturbed (a median
   mixes in whatever else ran).
2. bf16. The shipped tiny CLIP on the synthetic world (200 held-out scenes of world 2022, as README's robustness
   table): mIoU in fp32 and bf16 and the share of pixels whose label changes; then label_images speed bf16 vs
   fp32 for the tiny CLIP (128 px scenes) and RN50 (16 random 512 px images).
3. windows. Slide mode (RN50, fp32, crop 448, stride 224) on 4 random 512x512 images (4 windows each): all
   windows batched across images (batch 8), image by image, and window by window (batch 1): time and the largest
   difference in log-probabilities.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from denseclip.config import LabelerConfig, cpu_has_native_bf16, resolve_vocabulary
from denseclip.datasets import get_dataset
from denseclip.dense import dense_features
from denseclip.engine import input_memory_format
from denseclip.metrics import ConfusionMatrix, summarize
from denseclip.models import PRECISIONS
from denseclip.predictor import DenseCLIP
from denseclip.synthetic import render_dataset

ROOT = Path(__file__).resolve().parents[1]
VOC20 = str(ROOT / "denseclip" / "data" / "classnames" / "cls_voc20.txt")
EVAL_WORLD_SEED = 2022


def matmul_gflops(dtype: torch.dtype, size: int = 2048, seconds: float = 1.0) -> float:
    """GFLOP/s of ``size x size`` products in ``dtype``: products run back to back for ``seconds``."""
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    torch.mm(a, b)
    products, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        products += 1
    return 2 * size**3 * products / (time.perf_counter() - start) / 1e9


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def random_images(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def dense_gflop(model: torch.nn.Module, size: int) -> float:
    """GFLOP of ``dense_features`` for one ``size x size`` image, as FlopCounterMode counts them."""
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        dense_features(model, torch.zeros(1, 3, size, size))
    return counter.get_total_flops() / 1e9


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def rate(repeats: int, images: int = 16, size: int = 512) -> None:
    classes = resolve_vocabulary(VOC20)
    pictures = random_images(images, size)
    print(f"\n## FLOP rate: RN50 (random weights), {images} random {size}x{size} images, {len(classes)} VOC classes, "
          f"{torch.get_num_threads()} threads; best of {repeats} rounds (each timing's fastest run: on a shared "
          "machine, the one least disturbed)")
    print("| precision | matmul GFLOP/s | label_images GFLOP/s | label_images / matmul | dense forward / matmul "
          "| post-processing share |")
    print("|---|---|---|---|---|---|")
    default = LabelerConfig(model="RN50", pretrained="random").effective_precision
    for precision in ["auto"] + [p for p in ("fp32", "bf16") if p != default]:
        config = LabelerConfig(model="RN50", pretrained="random", precision=precision)
        rows = rate_rounds(config, classes, pictures, repeats)
        name = f"auto = {config.effective_precision}" if precision == "auto" else precision
        mm, label, forward = max(rows["mm"]), max(rows["label"]), max(rows["forward"])
        print(f"| {name} | {mm:.0f} | {label:.0f} | {label / mm:.2f} | {forward / mm:.2f} | {1 - label / forward:.2f} |")


def rate_rounds(config: LabelerConfig, classes: list[list[str]], pictures: list[np.ndarray],
                repeats: int) -> dict[str, list[float]]:
    """Per round, GFLOP/s of: the matmul (before and after the others), label_images and the dense forward alone
    (the labeller's tower on the same batches, already preprocessed)."""
    labeler = DenseCLIP.from_config(config, classes)
    dtype = PRECISIONS[config.effective_precision]
    size = pictures[0].shape[0]
    gflop = len(pictures) * dense_gflop(labeler.clip.model, size)
    layout = input_memory_format(labeler.tower)
    batches = [torch.stack([labeler.preprocess(p) for p in pictures[i:i + config.batch_size]])
               .to(dtype).contiguous(memory_format=layout) for i in range(0, len(pictures), config.batch_size)]

    def forward() -> None:
        with torch.inference_mode():
            for batch in batches:
                dense_features(labeler.tower, batch)

    labeler.label_images(pictures[:2])  # warm-up (oneDNN primitive caches)
    forward()
    rows = {k: [] for k in ("mm", "label", "forward")}
    for _ in range(repeats):
        rows["mm"].append(matmul_gflops(dtype))
        rows["label"].append(gflop / timed(lambda: labeler.label_images(pictures)))
        rows["forward"].append(gflop / timed(forward))
        rows["mm"].append(matmul_gflops(dtype))
    return rows


def synthetic_agreement(scenes: int = 200) -> None:
    info = get_dataset("synthetic")
    world = list(render_dataset(EVAL_WORLD_SEED, scenes))
    print(f"\n## bf16 vs fp32, tiny CLIP, synthetic world {EVAL_WORLD_SEED} ({scenes} scenes of 128 px)")
    print("| settings | mIoU fp32 | mIoU bf16 | change (points) | pixels whose label changes |")
    print("|---|---|---|---|---|")
    for name, values in (("library defaults", {}), ("paper preset (exact upsampling)", {"protocol": "paper"})):
        labels, miou = {}, {}
        for precision in ("fp32", "bf16"):
            config = LabelerConfig.from_dict({**values, "precision": precision}, dataset="synthetic")
            labeler = DenseCLIP.from_config(config, info.classes)
            matrix = ConfusionMatrix(info.num_classes)
            labels[precision] = []
            for start in range(0, scenes, 8):
                batch = world[start:start + 8]
                for scene, (pred, _) in zip(batch, labeler.label_maps([s.image for s in batch])):
                    matrix.update(pred, scene.labels)
                    labels[precision].append(pred)
            miou[precision] = summarize(matrix, info.class_names)["miou"]
        changed = np.mean(np.concatenate([(a != b).ravel() for a, b in zip(labels["fp32"], labels["bf16"])]))
        print(f"| {name} | {miou['fp32']:.2f} | {miou['bf16']:.2f} | {miou['bf16'] - miou['fp32']:+.2f} | "
              f"{100 * changed:.3f}% |")


def precision_speed(repeats: int) -> None:
    info = get_dataset("synthetic")
    cases = {
        "tiny CLIP, 64 scenes of 128 px": (LabelerConfig(model="denseclip-tiny-shapes"), info.classes,
                                           [s.image for s in render_dataset(EVAL_WORLD_SEED, 64)]),
        "RN50, 16 random images of 512 px": (LabelerConfig(model="RN50", pretrained="random"),
                                             resolve_vocabulary(VOC20), random_images(16, 512)),
    }
    print(f"\n## bf16 vs fp32 speed, label_images; {repeats} rounds")
    for name, (config, classes, pictures) in cases.items():
        labelers = {p: DenseCLIP.from_config(dataclasses.replace(config, precision=p), classes) for p in ("fp32", "bf16")}
        for labeler in labelers.values():
            labeler.label_images(pictures[:2])
        seconds = {p: [] for p in labelers}
        for _ in range(repeats):
            for p, lab in labelers.items():
                seconds[p].append(timed(functools.partial(lab.label_images, pictures)))
        speedup = [f / b for f, b in zip(seconds["fp32"], seconds["bf16"])]
        print(f"{name}: bf16 is {min(seconds['fp32']) / min(seconds['bf16']):.2f}x as fast as fp32 (fastest rounds; "
              f"per round {spread(speedup)})")


def windows(repeats: int, images: int = 4, size: int = 512) -> None:
    classes = resolve_vocabulary(VOC20)
    base = LabelerConfig(model="RN50", pretrained="random", precision="fp32", mode="slide")
    clip = None
    labelers = {}
    for name, batch_size in (("across images (batch 8)", 8), ("image by image", 8), ("window by window", 1)):
        labelers[name] = DenseCLIP.from_config(dataclasses.replace(base, batch_size=batch_size), classes, clip=clip)
        clip = labelers[name].clip
    tensors = [labelers["image by image"].preprocess(p) for p in random_images(images, size)]
    runs = {
        "across images (batch 8)": lambda: labelers["across images (batch 8)"].logits(tensors),
        "image by image": lambda: [labelers["image by image"].logits([t])[0] for t in tensors],
        "window by window": lambda: labelers["window by window"].logits(tensors),
    }
    outputs = {name: run() for name, run in runs.items()}
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            times[name].append(timed(run))
    reference = outputs["window by window"]
    print(f"\n## Sliding windows, RN50 fp32, {images} random {size}x{size} images (crop 448, stride 224: 4 windows "
          f"each); median of {repeats} rounds")
    print("| windows | seconds | speed vs window by window | max abs difference in log-probabilities |")
    print("|---|---|---|---|")
    for name in runs:
        diff = max(float((a - b).abs().max()) for a, b in zip(outputs[name], reference))
        print(f"| {name} | {statistics.median(times[name]):.2f} | "
              f"{statistics.median(times['window by window']) / statistics.median(times[name]):.2f}x | {diff:.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the issue's setting: 2)")
    parser.add_argument("--only", choices=("rate", "bf16", "windows"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {os.cpu_count()} CPUs, native bf16: {cpu_has_native_bf16()}, torch CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, load average {os.getloadavg()[0]:.1f}")
    if args.only in (None, "rate"):
        rate(args.repeats)
    if args.only in (None, "bf16"):
        synthetic_agreement()
        precision_speed(args.repeats)
    if args.only in (None, "windows"):
        windows(args.repeats)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

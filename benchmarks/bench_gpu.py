"""The labeller on one GPU, in one table: model throughput against the device's GEMM rate, JPEG decoding on the
device against the CPU, and the whole labelling pipeline against a bare loop. Self-contained (synthetic inputs,
random weights); about 3-4 minutes on one GPU.

    python benchmarks/bench_gpu.py [--device cuda] [--images 1000]
    python benchmarks/bench_gpu.py --device cpu --quick      # smoke test (CI): every row runs, on tiny inputs

Rows:
- ``gemm``: the device's matmul rate, square products (8192 on a GPU, 2048 on a CPU) in each precision: the
  reference for the "of GEMM" column.
- ``model``: ``label_images`` for RN50 and RN50x16 at the paper's protocol (keep-ratio resize to fit (2048, 512),
  whole image: 500x375 photos are labelled at 683x512), fp16 and bf16, over a sweep of batch sizes: images/s and
  the achieved TFLOP/s (``FlopCounterMode`` on ``dense_features`` at the padded size the tower runs at).
- ``decode``: 500x375 JPEGs, ``torchvision.io.decode_jpeg(..., device=DEVICE)`` in batches of 64 against Pillow
  (``denseclip.images.decode_image``) on one CPU core.
- ``pipeline``: ``pipelines/label.py --device DEVICE`` (its own local Ray; start-up included) against the bare
  loop of ``benchmarks/bench_label.py`` (read, decode, label, write, in this process) on the same shards of
  512 px scenes, RN50, the library's default precision.
``--quick`` swaps RN50/RN50x16 for the shipped tiny CLIP and uses a handful of images: a smoke test, not a benchmark.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from denseclip.config import LabelerConfig, resolve_vocabulary
from denseclip.dense import dense_features
from denseclip.gpu import cuda_problem
from denseclip.images import decode_image
from denseclip.models import PRECISIONS
from denseclip.names import TINY_MODEL
from denseclip.predictor import DenseCLIP
from denseclip.ray.labeling import is_out_of_memory
from denseclip.synthetic import render_scene, write_shards

ROOT = Path(__file__).resolve().parents[1]
VOC20 = str(ROOT / "denseclip" / "data" / "classnames" / "cls_voc20.txt")
PHOTO = (375, 500)  # a typical VOC photo, height x width
PAPER_RESIZE = (2048, 512)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_tflops(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 10) -> float:
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    torch.mm(a, b)
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12


def photos(n: int) -> list[np.ndarray]:
    """``n`` synthetic photos of 500x375 (scenes of coloured shapes, cropped to VOC's usual shape)."""
    return [render_scene(23, i, size=PHOTO[1]).image[:PHOTO[0]].copy() for i in range(n)]


def jpeg(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="JPEG", quality=90)
    return out.getvalue()


def model_rows(model: str, precisions: list[str], batch_sizes: list[int], images: int, device: torch.device,
               gemm: dict[str, float], classes: list[list[str]]) -> list[tuple]:
    rows = []
    pictures = photos(images)
    for precision in precisions:
        config = LabelerConfig(model=model, pretrained=None if model == TINY_MODEL else "random", device=str(device),
                               precision=precision, resize_to=None if model == TINY_MODEL else PAPER_RESIZE)
        labeler = DenseCLIP.from_config(config, classes)
        height, width = labeler.inference_size(*PHOTO)
        padded = [-(-d // labeler.pad_multiple) * labeler.pad_multiple for d in (height, width)]
        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            dense_features(labeler.clip.model, torch.zeros(1, 3, *padded, device=device))
        flops = counter.get_total_flops()
        for batch_size in batch_sizes:
            labeler.batch_size = batch_size
            setting = f"{model} {precision}, batch {batch_size}, {width}x{height} (padded {padded[1]}x{padded[0]})"
            try:
                labeler.label_images(pictures[:batch_size])  # warm-up: kernels, caches, allocator
                start = time.perf_counter()
                labeler.label_images(pictures)
                rate = len(pictures) / (time.perf_counter() - start)
            except (RuntimeError, MemoryError) as exc:  # cuBLAS and cuDNN name a failed allocation in their own words
                if not is_out_of_memory(exc):
                    raise
                rows.append(("model", setting, "out of memory", "", ""))
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            tflops = rate * flops / 1e12
            rows.append(("model", setting, f"{rate:.1f}", f"{tflops:.3g}", f"{tflops / gemm[precision]:.0%}"))
        del labeler
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def decode_rows(images: int, device: torch.device) -> list[tuple]:
    data = [jpeg(p) for p in photos(images)]
    torch.set_num_threads(1)
    start = time.perf_counter()
    for i, blob in enumerate(data):
        decode_image(blob, str(i))
    cpu_rate = len(data) / (time.perf_counter() - start)
    torch.set_num_threads(os.cpu_count() or 1)
    tensors = [torch.frombuffer(bytearray(blob), dtype=torch.uint8) for blob in data]
    torchvision.io.decode_jpeg(tensors[:2], device=device)  # warm-up (nvjpeg handles)
    sync(device)
    start = time.perf_counter()
    for i in range(0, len(tensors), 64):
        torchvision.io.decode_jpeg(tensors[i:i + 64], device=device)
    sync(device)
    device_rate = len(data) / (time.perf_counter() - start)
    return [("decode", f"Pillow, 1 CPU core, {PHOTO[1]}x{PHOTO[0]} JPEG", f"{cpu_rate:.0f}", "", ""),
            ("decode", f"torchvision decode_jpeg on {device.type}, batches of 64", f"{device_rate:.0f}", "", "")]


def pipeline_rows(images: int, model: str, device: torch.device, work: Path) -> list[tuple]:
    from bench_label import bare_loop  # benchmarks/ is on sys.path when this script runs

    shard_size = max(1, min(100, images // 4))
    shards = write_shards(31, images, str(work / "shards"), shard_size=shard_size, size=512)
    pretrained = [] if model == TINY_MODEL else ["--pretrained", "random"]
    vocabulary = "synthetic" if model == TINY_MODEL else VOC20
    command = [sys.executable, str(ROOT / "pipelines" / "label.py"), "--input", str(work / "shards"), "--output",
               str(work / "masks"), "--vocabulary", vocabulary, "--model", model, "--device", str(device), *pretrained]
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    pipeline = json.loads((work / "masks" / "summary.json").read_text())["images_per_s"]
    config = LabelerConfig(model=model, pretrained=None if model == TINY_MODEL else "random", device=str(device))
    bare = images / bare_loop(shards, str(work / "bare"), config, resolve_vocabulary(vocabulary))
    setting = f"{images} scenes of 512 px, {model} {config.effective_precision}"
    return [("pipeline", f"pipelines/label.py, {setting}", f"{pipeline:.1f}", "", f"{pipeline / bare:.2f}x bare"),
            ("pipeline", f"bare loop, {setting}", f"{bare:.1f}", "", "")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny model and inputs: a smoke test")
    parser.add_argument("--images", type=int, default=1000, help="scenes for the pipeline rows")
    args = parser.parse_args()
    device = torch.device(args.device)
    problem = cuda_problem() if device.type == "cuda" else None
    if problem is not None:
        parser.error(f"--device {args.device}: {problem[0]} (use --device cpu --quick for the smoke test)")
    # Half precision on a GPU (bf16 where it has it); a CPU computes fp16 convolutions slowly or not at all.
    precisions = ["bf16"]
    if device.type == "cuda":
        precisions = ["fp16", "bf16"] if torch.cuda.is_bf16_supported() else ["fp16"]
    if args.quick:
        models, batch_sizes, images, pipeline_images, size = [TINY_MODEL], [1, 2], 4, 8, 512
    else:
        models, batch_sizes, images, pipeline_images = ["RN50", "RN50x16"], [1, 4, 16, 32], 64, args.images
        size = 8192 if device.type == "cuda" else 2048
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x {os.cpu_count()}"
    gemm = {p: gemm_tflops(device, PRECISIONS[p], size) for p in precisions}
    rows = [("gemm", f"{size}x{size} matmul, {p}", "", f"{gemm[p]:.3g}", "100%") for p in precisions]
    classes = resolve_vocabulary(VOC20)
    for model in models:
        rows += model_rows(model, precisions, batch_sizes, images, device, gemm,
                           resolve_vocabulary("synthetic") if model == TINY_MODEL else classes)
    rows += decode_rows(8 if args.quick else 256, device)
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        rows += pipeline_rows(pipeline_images, models[0], device, Path(tmp))
    print(f"\n{name}, torch {torch.__version__}{' (--quick: smoke test)' if args.quick else ''}\n")
    print("| stage | setting | images/s | TFLOP/s | of GEMM / note |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()

"""Capacity plan: per-image costs measured here, GPU throughput assumed, and what they add up to for COCO-Stuff
164k (labelled and trained at the paper's protocol) and for a 10-million-image bulk annotation.

    python benchmarks/capacity.py [--gpu-tflops 312 --inference-utilization 0.35 --training-utilization 0.25]
                                  [--input benchmarks/host_costs.json]

Measured here (no GPU needed):
- FLOPs with ``torch.utils.flop_counter`` (matrix multiplies and convolutions; elementwise ops, softmax and
  resampling are not counted), on the meta device (shapes only: the count is the same as with random weights,
  which is checked once for RN50 on the CPU):
  - labelling one image at the paper's protocol: a 640x480 COCO image resized to fit (2048, 512) -> 683x512,
    padded to the tower's stride -> 704x512, DenseCLIP's dense features and keys, then the 171-class classifier;
  - the on-the-fly teacher on one 512x512 training crop; DeepLabv2-ResNet-101 (output stride 8) forward and
    backward on one 512x512 crop (DenseCLIP+ training); its forward on one 683x512 validation image;
  - encoding the prompts of a vocabulary (171 classes x 85 templates, once per run).
- The rate at which one core hashes local shards (SHA-256, the content fingerprint of re-runs).
Read from ``--input`` (written by benchmarks/bench_host.py; the committed file holds the measured defaults): the
host side of labelling per 640x480 image, CPU time of one core for read, JPEG decode, mask encode, Parquet write
and commit, and the bytes stored, on DenseCLIP's own predictions (the plan's figures) and on upper-bound maps, in
each mask-store format.
Assumed (flags): the GPU's peak dense fp16/bf16 rate and the fraction of it reached, the CPU cores beside each
GPU, the mean JPEG size.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
from bench_host import STAGES  # benchmarks/bench_host.py
from torch.utils.flop_counter import FlopCounterMode

from denseclip.dense import dense_features_and_keys
from denseclip.mask_store import FORMAT_VERSION, PNG_FORMAT
from denseclip.plus.target import TargetConfig, build_target

HOST_COSTS = Path(__file__).resolve().parent / "host_costs.json"
COCO_STUFF_CLASSES = 171
TEMPLATES = 85
PROTOCOL_SIZE = (512, 683)  # a 640x480 image scaled by min(2048 / 640, 512 / 480)
CROP = 512
# COCO-Stuff 164k and the DenseCLIP+ schedule (jobs/train_coco_stuff_zero_shot.yaml).
COCO_TRAIN, COCO_VAL = 118_287, 5_000
ITERATIONS, BATCH = 80_000, 16
BULK_IMAGES = 10_000_000


def flops(fn, *args) -> float:
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return float(counter.get_total_flops())


def meta_clip(name: str) -> torch.nn.Module:
    return open_clip.create_model(name, pretrained=None, device="meta")


def labelling_flops(model: torch.nn.Module, size: tuple[int, int], num_classes: int) -> float:
    """Dense features (and keys) of one image padded to the stride, then the per-pixel classifier."""
    device = next(model.parameters()).device
    h, w = (math.ceil(s / 32) * 32 for s in size)
    x = torch.zeros(1, 3, h, w, device=device)
    embed_dim = model.visual.output_dim

    def label(x: torch.Tensor) -> None:
        features, _ = dense_features_and_keys(model, x)
        torch.einsum("bdhw,nd->bnhw", features, torch.zeros(num_classes, embed_dim, device=device))

    return flops(label, x)


def text_flops(model: torch.nn.Module) -> float:
    """Encoding one prompt (the full 77-token context: an upper bound, the project trims padding)."""
    return flops(model.encode_text, torch.zeros(1, 77, dtype=torch.long, device="meta"))


def target_flops(embed_dim: int) -> tuple[float, float]:
    """DeepLabv2-ResNet-101 (stride 8): (forward + backward on one 512x512 crop, forward on one 683x512 image)."""
    target = build_target(TargetConfig(backbone="resnet101", head="deeplabv2", output_stride=8),
                          torch.randn(COCO_STUFF_CLASSES, embed_dim)).to("meta")

    def step(x: torch.Tensor) -> None:
        target(x).sum().backward()

    train = flops(step, torch.zeros(1, 3, CROP, CROP, device="meta"))
    with torch.no_grad():
        infer = flops(target, torch.zeros(1, 3, *PROTOCOL_SIZE, device="meta"))
    return train, infer


def host_costs(path: str) -> dict:
    """Per image at 640x480, from bench_host.py's measurements at ``path``: ``cpu_ms`` (one core, all host
    stages) and ``bytes`` stored, by case (``realistic``, ``upper_bound``) and format; ``jpeg_decode_ms``;
    ``ceiling_cpu_ms``: the whole pipeline's CPU time per image with replayed predictions (None if not measured);
    ``command`` and ``load_average`` of the measurement."""
    report = json.loads(Path(path).read_text())
    costs: dict = {"command": report["command"], "load_average": report["load_average"], "cpu_ms": {}, "bytes": {}}
    for case in ("realistic", "upper_bound"):
        for version, stages in report[case]["one core"].items():
            costs["cpu_ms"][case, int(version)] = sum(stages[s] for s in STAGES)
            costs["bytes"][case, int(version)] = stages["bytes"]
    costs["jpeg_decode_ms"] = report["realistic"]["one core"][str(FORMAT_VERSION)]["JPEG decode"]
    costs["ceiling_cpu_ms"] = report.get("ceiling", {}).get("marginal_cpu_ms_per_image")
    return costs


def sha256_mb_s() -> float:
    """MB/s one core hashes (CPU time: other jobs on the machine slow the wall clock down, not the work)."""
    block = np.random.default_rng(0).bytes(64 << 20)
    start = time.process_time()
    hashlib.sha256(block).digest()
    return len(block) / 1e6 / (time.process_time() - start)


def check_meta_count() -> None:
    """The meta-device count equals the count with real random weights (RN50, CPU)."""
    real = open_clip.create_model("RN50", pretrained=None).eval()
    with torch.no_grad():
        assert labelling_flops(real, (64, 96), 5) == labelling_flops(meta_clip("RN50"), (64, 96), 5)


def _hours(value: float) -> str:
    return f"{value:.2g}" if value < 10 else f"{value:.0f}"


def plan(args: argparse.Namespace, measured: dict) -> None:
    """The two cases from the measured per-image numbers and the assumptions in ``args``."""
    infer_rate = args.gpu_tflops * 1e12 * args.inference_utilization
    train_rate = args.gpu_tflops * 1e12 * args.training_utilization
    host = measured["host"]
    stored = host["bytes"]["realistic", FORMAT_VERSION]  # the part's bytes per image: cells, key, shard, sizes
    jpeg = args.jpeg_kb * 1e3
    cpu_s = host["cpu_ms"]["realistic", FORMAT_VERSION] / 1e3  # host stages per image labelled
    epochs = ITERATIONS * BATCH / COCO_TRAIN
    print(f"\nassumed: {args.gpu_tflops:g} TFLOP/s peak per GPU, {args.inference_utilization:.0%} of it reached "
          f"when labelling ({infer_rate / 1e12:.0f} TFLOP/s), {args.training_utilization:.0%} when training "
          f"({train_rate / 1e12:.0f} TFLOP/s); {args.jpeg_kb:g} kB per JPEG; {args.cpus_per_gpu} CPU cores per GPU; "
          f"{args.gpus} GPUs")
    print(f"\n| case | GPU-hours | object store read / written | Parquet | wall time on {args.gpus} GPUs |")
    print("|---|---|---|---|---|")
    for model in ("RN50", "RN50x16"):
        label_h = COCO_TRAIN * measured["label"][model] / infer_rate / 3600
        train_h = ITERATIONS * BATCH * measured["train"][model] / train_rate / 3600
        teacher_h = ITERATIONS * BATCH * measured["teacher"][model] / infer_rate / 3600
        eval_h = COCO_VAL * measured["target_eval"][model] / infer_rate / 3600
        # Labelling waits for the host stages (decoding, encoding, writing) when the GPU's CPUs cannot keep up.
        label_wall = max(label_h / args.gpus, COCO_TRAIN * cpu_s / 3600 / (args.gpus * args.cpus_per_gpu))
        read = (COCO_TRAIN * jpeg * (1 + epochs) + COCO_TRAIN * stored * epochs + COCO_VAL * jpeg) / 1e9
        written = ((COCO_TRAIN + COCO_VAL) * jpeg + COCO_TRAIN * stored) / 1e9
        print(f"| COCO-Stuff 164k, {model} teacher, DeepLabv2-R101 80k x 16 | {_hours(label_h)} label + "
              f"{_hours(train_h)} train + {_hours(eval_h)} eval = {_hours(label_h + train_h + eval_h)} "
              f"(teacher on the fly instead of precomputed: +{_hours(teacher_h)}) | {read:.0f} GB / "
              f"{written:.0f} GB | {COCO_TRAIN * stored / 1e9:.2f} GB | "
              f"{_hours(label_wall + (train_h + eval_h) / args.gpus)} h |")
        bulk_h = BULK_IMAGES * measured["label"][model] / infer_rate / 3600
        cpu_h = BULK_IMAGES * cpu_s / 3600
        wall = max(bulk_h, cpu_h / args.cpus_per_gpu) / args.gpus
        bound = "CPU-bound" if cpu_h / args.cpus_per_gpu > bulk_h else "GPU-bound"
        print(f"| 10M-image bulk annotation, {model} | {_hours(bulk_h)} (+ {cpu_h:.0f} CPU core-hours of host "
              f"stages) | {BULK_IMAGES * jpeg / 1e12:.2f} TB / {BULK_IMAGES * stored / 1e9:.0f} GB | "
              f"{BULK_IMAGES * stored / 1e9:.0f} GB | {_hours(wall)} h ({bound}; GPU-bound from "
              f"{cpu_h / bulk_h:.1f} cores per GPU) |")


def cores_per_gpu(args: argparse.Namespace, measured: dict) -> None:
    """CPU cores one GPU needs beside it so that labelling is GPU-bound: its images/s x host CPU per image (of
    the host stages, by maps and format; and of the whole pipeline with replayed predictions, where measured)."""
    rate = args.gpu_tflops * 1e12 * args.inference_utilization
    host = measured["host"]
    cases = [(case, version) for version in (FORMAT_VERSION, PNG_FORMAT) for case in ("realistic", "upper_bound")]
    names = {"realistic": "DenseCLIP's predictions", "upper_bound": "upper-bound maps"}
    columns = [f"host stages, {names[case]}, format {version}" for case, version in cases]
    costs = [host["cpu_ms"][case] for case in cases]
    if host["ceiling_cpu_ms"] is not None:
        columns.append(f"the whole pipeline (host ceiling), format {FORMAT_VERSION}")
        costs.append(host["ceiling_cpu_ms"])
    print("\ncores per GPU to keep labelling GPU-bound:\n\n| model | images/s one GPU labels | "
          + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 2) + "|")
    for model in ("RN50", "RN50x16"):
        images_per_s = rate / measured["label"][model]
        print(f"| {model} | {images_per_s:.0f} | " + " | ".join(f"{images_per_s * ms / 1e3:.1f}" for ms in costs) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu-tflops", type=float, default=312.0,
                        help="peak dense fp16/bf16 TFLOP/s of one GPU (A100 SXM: 312)")
    parser.add_argument("--inference-utilization", type=float, default=0.35)
    parser.add_argument("--training-utilization", type=float, default=0.25)
    parser.add_argument("--jpeg-kb", type=float, default=153.0,
                        help="mean JPEG size (COCO train2017: about 18 GB for 118,287 images)")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--cpus-per-gpu", type=int, default=8, help="CPU cores beside each GPU (g5.2xlarge: 8)")
    parser.add_argument("--input", default=str(HOST_COSTS),
                        help="bench_host.py's measurements of the host side (default: the committed ones)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    check_meta_count()
    measured: dict = {"label": {}, "teacher": {}, "train": {}, "target_eval": {}}
    print("measured per image (GFLOPs, torch.utils.flop_counter):")
    for model in ("RN50", "RN50x16"):
        clip = meta_clip(model)
        embed_dim = clip.visual.output_dim
        measured["label"][model] = labelling_flops(clip, PROTOCOL_SIZE, COCO_STUFF_CLASSES)
        measured["teacher"][model] = labelling_flops(clip, (CROP, CROP), COCO_STUFF_CLASSES)
        measured["train"][model], measured["target_eval"][model] = target_flops(embed_dim)
        prompts = COCO_STUFF_CLASSES * TEMPLATES * text_flops(clip)
        print(f"  {model}: label 683x512 {measured['label'][model] / 1e9:.0f}, teacher on a 512 crop "
              f"{measured['teacher'][model] / 1e9:.0f}, DeepLabv2-R101 train step per 512 crop "
              f"{measured['train'][model] / 1e9:.0f} (fwd+bwd), its eval 683x512 "
              f"{measured['target_eval'][model] / 1e9:.0f}; 171 x 85 prompts once {prompts / 1e12:.1f} TFLOPs")
    measured["host"] = host = host_costs(args.input)
    print(f"  host stages per 640x480 image, one core (CPU time; {host['command']}, load average "
          f"{host['load_average']['start']}): JPEG decode {host['jpeg_decode_ms']:.1f} ms; read, decode, encode, "
          f"write and commit of DenseCLIP's predictions {host['cpu_ms']['realistic', FORMAT_VERSION]:.1f} ms "
          f"(format {FORMAT_VERSION}; PNG, format {PNG_FORMAT}: {host['cpu_ms']['realistic', PNG_FORMAT]:.1f} ms), "
          f"of upper-bound maps {host['cpu_ms']['upper_bound', FORMAT_VERSION]:.1f} ms (PNG: "
          f"{host['cpu_ms']['upper_bound', PNG_FORMAT]:.1f} ms); stored "
          f"{host['bytes']['realistic', FORMAT_VERSION] / 1e3:.1f} kB (PNG: "
          f"{host['bytes']['realistic', PNG_FORMAT] / 1e3:.1f} kB), upper bound "
          f"{host['bytes']['upper_bound', FORMAT_VERSION] / 1e3:.1f} kB (PNG: "
          f"{host['bytes']['upper_bound', PNG_FORMAT] / 1e3:.1f} kB)")
    print(f"  SHA-256 of local shards (their content fingerprint), one core: {sha256_mb_s():.0f} MB/s")
    plan(args, measured)
    cores_per_gpu(args, measured)


if __name__ == "__main__":
    main()

"""Capacity plan: per-image costs measured here, GPU throughput assumed, and what they add up to for COCO-Stuff
164k (labelled and trained at the paper's protocol) and for a 10-million-image bulk annotation.

    python benchmarks/capacity.py [--gpu-tflops 312 --inference-utilization 0.35 --training-utilization 0.25]

Measured here (no GPU needed):
- FLOPs with ``torch.utils.flop_counter`` (matrix multiplies and convolutions; elementwise ops, softmax and
  resampling are not counted), on the meta device (shapes only: the count is the same as with random weights,
  which is checked once for RN50 on the CPU):
  - labelling one image at the paper's protocol: a 640x480 COCO image resized to fit (2048, 512) -> 683x512,
    padded to the tower's stride -> 704x512, DenseCLIP's dense features and keys, then the 171-class classifier;
  - the on-the-fly teacher on one 512x512 training crop; DeepLabv2-ResNet-101 (output stride 8) forward and
    backward on one 512x512 crop (DenseCLIP+ training); its forward on one 683x512 validation image;
  - encoding the prompts of a vocabulary (171 classes x 85 templates, once per run).
- Bytes per stored mask at 640x480 (label map and confidence PNGs): a prediction whose every feature cell of
  RN50's stride draws its own logits over the 171 classes (the most fragmented a prediction at this stride can
  be: an upper bound, used in the plan) and a real VOC annotation (a lower bound).
- Per image, CPU time of one core: decoding a 640x480 JPEG (quality 90), encoding its two PNGs; and the rate at
  which one core hashes local shards (SHA-256, the content fingerprint of re-runs).
Assumed (flags): the GPU's peak dense fp16/bf16 rate and the fraction of it reached, the CPU cores beside each
GPU, the mean JPEG size.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import math
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
from mask_encoding import ms, predicted_maps  # benchmarks/mask_encoding.py
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from denseclip.dense import dense_features_and_keys
from denseclip.images import decode_image, encode_png
from denseclip.mask_store import encode_mask
from denseclip.plus.target import TargetConfig, build_target

SAMPLES = Path(__file__).resolve().parents[1] / "tests" / "data" / "samples"
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


def photo(path: Path) -> np.ndarray:
    """A sample photo resized to COCO's typical 640x480."""
    return np.asarray(Image.open(path).convert("RGB").resize((640, 480), Image.BICUBIC))


def mask_bytes() -> dict[str, np.ndarray | float]:
    """PNG bytes at 640x480 of: a prediction whose every feature cell (22x16 cells of stride 32 on the 683x512
    input, 30 output pixels each) draws its own logits over the 171 classes, bilinearly upsampled (the most
    fragmented map a prediction at this stride can be: an upper bound), its confidence; and a real VOC
    annotation (smooth regions: a lower bound)."""
    labels, confidence = predicted_maps(noise=0.0, size=(480, 640), k=COCO_STUFF_CLASSES, stride=30)
    annotation = np.asarray(Image.open(next((SAMPLES / "voc" / "SegmentationClass").glob("*.png"))))
    annotation = np.asarray(Image.fromarray(annotation).resize((640, 480), Image.NEAREST))
    return {"label": float(len(encode_mask(labels))), "confidence": float(len(encode_png(confidence))),
            "annotation": float(len(encode_mask(annotation))), "maps": (labels, confidence)}


def cpu_ms(fn, *args, repeats: int = 20) -> float:
    # CPU time, not wall time: other jobs on the machine slow the wall clock down, not the work.
    return ms(fn, *args, repeats=repeats, clock=time.process_time)


def cpu_costs(labels: np.ndarray, confidence: np.ndarray) -> dict[str, float]:
    image = photo(min(SAMPLES.glob("*.jpg")))
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=90)
    jpeg = buf.getvalue()
    block = np.random.default_rng(0).bytes(64 << 20)
    hash_s = cpu_ms(lambda: hashlib.sha256(block).digest(), repeats=5) / 1e3
    return {"jpeg_bytes": float(len(jpeg)), "decode_ms": cpu_ms(decode_image, jpeg),
            "encode_ms": cpu_ms(lambda: (encode_mask(labels), encode_png(confidence))),
            "sha256_mb_s": len(block) / 1e6 / hash_s}


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
    stored = measured["mask"]["label"] + measured["mask"]["confidence"] + 64  # + key, shard, sizes, Parquet
    jpeg = args.jpeg_kb * 1e3
    cpu_s = (measured["cpu"]["decode_ms"] + measured["cpu"]["encode_ms"]) / 1e3  # per image labelled
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
        # Labelling waits for decoding and PNG encoding when the GPU's CPUs cannot keep up.
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
        print(f"| 10M-image bulk annotation, {model} | {_hours(bulk_h)} (+ {cpu_h:.0f} CPU core-hours decoding "
              f"and encoding) | {BULK_IMAGES * jpeg / 1e12:.2f} TB / {BULK_IMAGES * stored / 1e9:.0f} GB | "
              f"{BULK_IMAGES * stored / 1e9:.0f} GB | {_hours(wall)} h ({bound}; GPU-bound from "
              f"{cpu_h / bulk_h:.0f} cores per GPU) |")


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
    measured["mask"] = mask_bytes()
    measured["cpu"] = cpu_costs(*measured["mask"].pop("maps"))
    mask, cpu = measured["mask"], measured["cpu"]
    print(f"  stored mask 640x480: label PNG {mask['label'] / 1e3:.1f} kB + confidence PNG "
          f"{mask['confidence'] / 1e3:.1f} kB (independent logits per RN50 feature cell: upper bound); "
          f"a VOC annotation at 640x480 {mask['annotation'] / 1e3:.1f} kB (lower bound)")
    print(f"  one CPU core (CPU time): decode a 640x480 JPEG ({cpu['jpeg_bytes'] / 1e3:.0f} kB, q90) "
          f"{cpu['decode_ms']:.1f} ms, encode its label + confidence PNGs {cpu['encode_ms']:.1f} ms; SHA-256 of "
          f"local shards (their content fingerprint) {cpu['sha256_mb_s']:.0f} MB/s")
    plan(args, measured)


if __name__ == "__main__":
    main()

"""Inference protocols on COCO-Stuff-sized photos: the paper's (whole image after a keep-ratio resize to fit
(2048, 512), every class's logits upsampled) against sliding windows and top-k upsampling, the options
``jobs/label_coco_stuff.yaml`` offers; one model, the same images, one process.

    python benchmarks/bench_protocol.py --model RN50 --pretrained random --images 12

COCO-Stuff sizes (640x480, 480x640, 640x427) cut from the shipped sample photos; the 171 COCO-Stuff classes.
Prints ms per image of each setting, its time relative to the paper's protocol, the share of pixels whose label
agrees with the paper protocol's labels, and how many classes the paper protocol's label maps hold (with random
weights, one class tends to win every pixel, and agreement then says nothing about the labels).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from denseclip.config import LabelerConfig, resolve_vocabulary
from denseclip.models import load_clip
from denseclip.predictor import DenseCLIP

SAMPLES = Path(__file__).resolve().parents[1] / "tests" / "data" / "samples"
COCO_SIZES = ((480, 640), (640, 480), (427, 640))  # (height, width)
SLIDE = {"mode": "slide", "short_side": 512, "resize_to": None, "crop_size": 448, "crop_stride": 224}
SETTINGS = {
    "paper: whole, fit (2048, 512), exact upsampling": {},
    "whole, fit (2048, 512), top-3 upsampling": {"upsample_topk": 3},
    "slide 448/224 on short side 512, exact upsampling": {**SLIDE, "upsample_topk": None},
    "slide 448/224 on short side 512, top-3 upsampling": {**SLIDE, "upsample_topk": 3},
}


def coco_sized_photos(count: int) -> list[np.ndarray]:
    photos = [Image.open(p).convert("RGB") for p in sorted(SAMPLES.glob("*.jpg"))]
    out = []
    for i in range(count):
        h, w = COCO_SIZES[i % len(COCO_SIZES)]
        out.append(np.asarray(photos[i % len(photos)].resize((w, h), Image.BICUBIC)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="RN50")
    parser.add_argument("--pretrained", default="random")
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--templates", default="denseclip85")
    args = parser.parse_args()

    torch.manual_seed(0)
    clip = load_clip(args.model, args.pretrained)
    classes = resolve_vocabulary("coco_stuff")
    images = coco_sized_photos(args.images)
    results = {}
    for name, options in SETTINGS.items():
        config = LabelerConfig.from_dict({"model": args.model, "pretrained": args.pretrained, "protocol": "paper",
                                          "templates": args.templates, **options}, dataset="coco_stuff")
        labeler = DenseCLIP.from_config(config, classes, clip=clip)
        labeler.label_images(images[:1])  # warm-up
        start = time.perf_counter()
        labels = [labeler.label_images([image])[0][0] for image in images]
        results[name] = (1000 * (time.perf_counter() - start) / len(images), labels)

    base_ms, base_labels = next(iter(results.values()))
    print(f"{args.model}/{args.pretrained}, {len(images)} COCO-sized photos, 171 classes, "
          f"{torch.get_num_threads()} torch threads")
    print("| setting | ms / image | time vs paper | pixels agreeing with paper |")
    print("|---|---|---|---|")
    for name, (ms, labels) in results.items():
        agree = np.mean([np.mean(a == b) for a, b in zip(labels, base_labels)])
        print(f"| {name} | {ms:.0f} | {ms / base_ms:.2f}x | {100 * agree:.2f}% |")
    present = [len(np.unique(labels)) for labels in base_labels]
    print(f"classes present per label map (paper protocol): {min(present)} to {max(present)}")


if __name__ == "__main__":
    main()

"""The dense heads against maskclip: cost per image on a real-sized ViT, quality and cost on the tiny ViT CLIP.

    python benchmarks/bench_heads.py [--model ViT-B-16] [--size 224 224] [--batch 8] [--repeats 5]
                                     [--precision fp32|bf16] [--device cpu|cuda]
    python benchmarks/bench_heads.py --world runs/world-s1 [--model denseclip-tiny-shapes-vit]

Without ``--world``: ``dense_features`` of every head on one batch of random images (a batch of windows, as the
sliding-window labeller forwards them), random weights by default (a head's cost does not depend on them); each
round runs every head once, and the table gives each head's median milliseconds per image and its ratio to
maskclip's. With ``--world`` (shards of ``pipelines/render_world.py``): the model (default the shipped tiny ViT)
labels every scene with each head in fp32 and bf16, as ``pipelines/evaluate.py --dataset synthetic`` does; the
table gives mIoU (all / seen / unseen) and milliseconds per image (median over the rounds), heads interleaved
in one process.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from denseclip.config import LabelerConfig
from denseclip.datasets import get_dataset
from denseclip.dense import dense_features
from denseclip.evaluation import build_dense_clip, iter_ground_truth, load_image
from denseclip.metrics import ConfusionMatrix, summarize
from denseclip.models import load_clip
from denseclip.names import HEADS, TINY_VIT_MODEL


def _seconds(call: Callable[[], object], cuda: bool = False) -> float:
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        call()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _interleaved(calls: dict, repeats: int, cuda: bool = False) -> dict:
    """Median seconds of each call over ``repeats`` rounds that run every call once (after a warm-up round)."""
    for call in calls.values():
        call()
    seconds = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            seconds[name].append(_seconds(call, cuda))
    return {name: statistics.median(s) for name, s in seconds.items()}


def cost(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    clip = load_clip(args.model, args.pretrained, device=args.device, precision=args.precision)
    images = torch.randn(args.batch, 3, *args.size, device=args.device)
    calls = {head: lambda head=head: dense_features(clip.model, images, head=head) for head in HEADS}
    per_image = {h: 1000 * s / args.batch for h, s in _interleaved(calls, args.repeats, images.is_cuda).items()}
    print(f"{args.model} ({args.pretrained}), {args.precision}, {args.device}, {torch.get_num_threads()} threads, "
          f"batch {args.batch} x {args.size[0]}x{args.size[1]}, median of {args.repeats} rounds")
    print("| head | ms / image | x maskclip |")
    print("|---|---|---|")
    for head in HEADS:
        print(f"| {head} | {per_image[head]:.1f} | {per_image[head] / per_image['maskclip']:.3f} |")


def world(args: argparse.Namespace) -> None:
    info = get_dataset("synthetic")
    truths = list(iter_ground_truth(args.world))
    images = [load_image(t, None) for t in truths]
    labelers = {}
    for precision in ("fp32", "bf16"):
        clip = load_clip(args.model, args.pretrained, device=args.device, precision=precision)
        for head in HEADS:
            config = LabelerConfig.from_dict({"model": args.model, "pretrained": args.pretrained, "head": head,
                                              "precision": precision, "device": args.device,
                                              "protocol": "paper"}, dataset="synthetic")
            labelers[head, precision] = build_dense_clip(config, [list(c) for c in info.classes],
                                                         background_index=info.background_index, clip=clip)
    scores = {}
    for key, labeler in labelers.items():
        conf = ConfusionMatrix(info.num_classes, info.ignore_index)
        for truth, (labels, _) in zip(truths, labeler.label_images(images)):
            conf.update(labels, truth.labels, truth.key)
        scores[key] = summarize(conf, info.class_names, unseen=info.unseen)
    calls = {key: lambda labeler=labeler: labeler.label_images(images) for key, labeler in labelers.items()}
    ms = {key: 1000 * s / len(images) for key, s in _interleaved(calls, args.repeats).items()}

    print(f"{args.model}, {len(images)} scenes of {args.world}, {torch.get_num_threads()} threads, "
          f"ms/image: median of {args.repeats} rounds")
    print("| head | mIoU | seen | unseen | pixel acc. | mIoU bf16 | ms / image | x maskclip | ms / image bf16 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for head in HEADS:
        fp32, bf16 = scores[head, "fp32"], scores[head, "bf16"]
        print(f"| {head} | {fp32['miou']:.2f} | {fp32['miou_seen']:.2f} | {fp32['miou_unseen']:.2f} | "
              f"{fp32['pixel_accuracy']:.2f} | {bf16['miou']:.2f} | {ms[head, 'fp32']:.2f} | "
              f"{ms[head, 'fp32'] / ms['maskclip', 'fp32']:.2f} | {ms[head, 'bf16']:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", help="shards of a rendered world: quality and cost on the tiny ViT CLIP")
    parser.add_argument("--model", help="default: ViT-B-16, or with --world the shipped tiny ViT CLIP")
    parser.add_argument("--pretrained", help="default: random weights, or with --world the shipped ones")
    parser.add_argument("--size", type=int, nargs=2, default=(224, 224), metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=8, help="images (windows) per forward")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds over all heads after a warm-up round")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.world:
        args.model = args.model or TINY_VIT_MODEL
        world(args)
    else:
        args.model, args.pretrained = args.model or "ViT-B-16", args.pretrained or "random"
        cost(args)


if __name__ == "__main__":
    main()

"""Train a shipped tiny CLIP on captions of a synthetic world, on CPU.

    denseclip train-tiny-clip [--model denseclip-tiny-shapes-vit] [--steps 600 --seed 0]
    denseclip train-tiny-clip --model denseclip-tiny-cocostuff --steps 1200

``--model`` is ``denseclip-tiny-shapes`` (ResNet, the default) or ``denseclip-tiny-shapes-vit`` (ViT, patch 8),
trained on the shapes world's 128-pixel scenes, or ``denseclip-tiny-cocostuff`` (ResNet), trained on 128-pixel
crops of the COCO-Stuff world's 640x480 scenes (``denseclip/synthetic_coco_stuff.py``) captioned with the COCO-Stuff
names they show; ``--world`` picks another world than the model's own. Their open_clip configs live in
``denseclip/assets/``. Writes ``model.safetensors`` (fp16 state dict of the
open_clip ``CLIP``, its token embedding packed: ``denseclip/packed_weights.py``), the model config and
``training.json`` (command, seeds, steps, wall time, final loss) into ``--output`` (default
``runs/tiny_clip/<model>``). Replacing the shipped weights in ``denseclip/assets/`` takes ``--overwrite-shipped``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from denseclip import synthetic, synthetic_coco_stuff
from denseclip.commands.options import Parser, renamed
from denseclip.models import TINY_ASSETS
from denseclip.names import TINY_COCO_STUFF_MODEL, TINY_MODEL, TINY_MODELS
from denseclip.packed_weights import pack_token_embedding

SHIPPED_ASSETS = Path(TINY_ASSETS[TINY_MODEL]).parent
WORLDS = ("shapes", "coco_stuff")
WORLD_SEEDS = {"shapes": synthetic.TINY_CLIP_WORLD_SEED, "coco_stuff": synthetic_coco_stuff.TINY_CLIP_WORLD_SEED}
CROPS_PER_SCENE = 16  # COCO-Stuff world: crops taken from each rendered scene (a scene takes 80 ms to render)
CLIP_STATS = (open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# The (mean, std) each world's batches are normalised with, in equal shares. The COCO-Stuff world's CLIP labels
# under the paper's protocol, whose official code feeds CLIP ImageNet's statistics: it learns to read either.
NORMALISATIONS = {"shapes": (CLIP_STATS,), "coco_stuff": (CLIP_STATS, IMAGENET_STATS)}


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = Parser(prog=prog or "denseclip train-tiny-clip", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=TINY_MODEL, choices=TINY_MODELS, help="which tiny CLIP to train")
    parser.add_argument("--world", choices=WORLDS, default=None,
                        help="the captioned world (default: the model's own: coco_stuff for "
                        f"{TINY_COCO_STUFF_MODEL}, shapes otherwise)")
    parser.add_argument("--output", default=None, help="output folder for model.safetensors, config and training.json "
                        "(default: runs/tiny_clip/<model>)")
    renamed(parser, "--out", "--output")
    parser.add_argument("--overwrite-shipped", action="store_true",
                        help=f"allow --output inside {SHIPPED_ASSETS} (replaces the weights the package ships)")
    parser.add_argument("--steps", type=int, default=600, help="optimisation steps")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (linear warm-up, cosine decay)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weight initialisation")
    parser.add_argument("--world-seed", type=int, default=None,
                        help=f"seed of the rendered scenes (default: the world's own, {WORLD_SEEDS})")
    parser.add_argument("--log-every", type=int, default=20)
    return parser


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "log_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.lr <= 0:
        parser.error(f"--lr must be > 0, got {args.lr}")
    args.world = args.world or ("coco_stuff" if args.model == TINY_COCO_STUFF_MODEL else "shapes")
    args.world_seed = WORLD_SEEDS[args.world] if args.world_seed is None else args.world_seed
    args.output = Path(args.output or Path("runs") / "tiny_clip" / args.model)
    if args.output.resolve().is_relative_to(SHIPPED_ASSETS.resolve()) and not args.overwrite_shipped:
        parser.error(f"--output {args.output} would replace the shipped weights in {SHIPPED_ASSETS}; "
                     "add --overwrite-shipped to mean it")
    return args


def world_batch(world: str, world_seed: int, start: int, batch_size: int
                ) -> tuple[list[np.ndarray], list[str], list[tuple[int, ...]]]:
    """``batch_size`` training pairs from scenes ``start, start + 1, ...``: ``(S, S, 3)`` uint8 images, captions
    and the label set each caption names. Shapes: whole scenes; COCO-Stuff: :data:`CROPS_PER_SCENE` crops of
    each scene."""
    if world == "shapes":
        scenes = [synthetic.render_scene(world_seed, start + i) for i in range(batch_size)]
        return ([s.image for s in scenes], [s.caption for s in scenes],
                [tuple(sorted(o["label"] for o in s.objects)) for s in scenes])
    rng = np.random.default_rng([world_seed, start])
    crops: list[tuple[np.ndarray, str, tuple[int, ...]]] = []
    index = start
    while len(crops) < batch_size:
        scene = synthetic_coco_stuff.render_scene(world_seed, index)
        crops += synthetic_coco_stuff.caption_crops(scene, rng, CROPS_PER_SCENE, out=128)
        index += 1
    images, captions, label_sets = zip(*crops[:batch_size])
    return list(images), list(captions), list(label_sets)


def render_batch(world: str, world_seed: int, start: int, batch_size: int):
    """Images ``(B, 3, H, W)`` normalised (in equal shares with each of the world's :data:`NORMALISATIONS`),
    captions, and a ``(B,)`` id of each caption's label set."""
    pixels, captions, label_sets = world_batch(world, world_seed, start, batch_size)
    images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 255
    shares = np.array_split(np.arange(batch_size), len(NORMALISATIONS[world]))
    mean, std = (torch.tensor([stats[k] for stats, share in zip(NORMALISATIONS[world], shares) for _ in share])
                 .view(-1, 3, 1, 1) for k in (0, 1))
    set_ids = {key: i for i, key in enumerate(dict.fromkeys(label_sets))}
    return (images - mean) / std, captions, torch.tensor([set_ids[k] for k in label_sets])


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, scale: torch.Tensor,
                     set_ids: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE with soft targets: every caption of the same object set is a positive.

    Args:
        image_features, text_features: ``(B, D)`` L2-normalised.
        scale: scalar, the inverse temperature (``logit_scale.exp()``).
        set_ids: ``(B,)`` int, equal for pairs that describe the same objects (e.g. all empty scenes).
    """
    logits = scale * image_features @ text_features.T
    same = (set_ids[:, None] == set_ids[None, :]).float()
    targets = same / same.sum(dim=1, keepdim=True)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def learning_rate(step: int, steps: int, peak: float) -> float:
    warmup = max(1, steps // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = parse_args(argv, prog)
    torch.manual_seed(args.seed)
    config_path = TINY_ASSETS[args.model] / f"{args.model}.json"
    open_clip.add_model_config(config_path)
    model = open_clip.create_model(args.model)
    initial_embedding = model.token_embedding.weight.detach().clone()  # the rows no caption moves stay so
    tokenizer = open_clip.get_tokenizer(args.model)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.98), eps=1e-6)

    model.train()
    start_time = time.time()
    recent: list[float] = []
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr)
        start = step * args.batch_size
        images, captions, set_ids = render_batch(args.world, args.world_seed, start, args.batch_size)
        image_features, text_features, scale = model(images, tokenizer(captions))
        loss = contrastive_loss(image_features, text_features, scale, set_ids)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        recent = (recent + [loss.item()])[-args.log_every:]
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            elapsed = time.time() - start_time
            print(f"step {step + 1}/{args.steps} loss {np.mean(recent):.4f} scale {scale.item():.1f} "
                  f"{(step + 1) / elapsed:.3f} steps/s", flush=True)
    wall = time.time() - start_time

    out = args.output
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
    state = pack_token_embedding(state, initial_embedding, args.seed)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt", "model": args.model})
    if (out / config_path.name).resolve() != config_path.resolve():
        shutil.copyfile(config_path, out / config_path.name)
    record = {
        "model": args.model, "command": "python " + " ".join([sys.argv[0]] + (argv or sys.argv[1:])),
        "seed": args.seed, "world": args.world, "world_seed": args.world_seed, "steps": args.steps,
        "batch_size": args.batch_size, "lr": args.lr, "wall_seconds": round(wall, 1),
        "steps_per_second": round(args.steps / wall, 4),
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "final_loss": round(float(np.mean(recent)), 4), "torch": torch.__version__,
        "open_clip": open_clip.__version__,
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())

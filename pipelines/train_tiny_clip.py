"""Train a shipped tiny CLIP on captions of the synthetic world, on CPU.

    python pipelines/train_tiny_clip.py [--model denseclip-tiny-shapes-vit] [--steps 600 --seed 0]

``--model`` is ``denseclip-tiny-shapes`` (ResNet, the default) or ``denseclip-tiny-shapes-vit`` (ViT, patch 8);
their open_clip configs live in ``denseclip/assets/``. Writes ``model.safetensors`` (fp16 state dict of the
open_clip ``CLIP``, its token embedding packed: ``denseclip/packed_weights.py``), the model config and
``training.json`` (command, seeds, steps, wall time, final loss) into ``--out`` (default
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

from denseclip.config import TINY_MODEL, TINY_MODELS
from denseclip.models import TINY_ASSETS
from denseclip.packed_weights import pack_token_embedding
from denseclip.synthetic import TINY_CLIP_WORLD_SEED, render_scene

SHIPPED_ASSETS = Path(TINY_ASSETS[TINY_MODEL]).parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=TINY_MODEL, choices=TINY_MODELS, help="which tiny CLIP to train")
    parser.add_argument("--out", default=None, help="output folder for model.safetensors, config and training.json "
                        "(default: runs/tiny_clip/<model>)")
    parser.add_argument("--overwrite-shipped", action="store_true",
                        help=f"allow --out inside {SHIPPED_ASSETS} (replaces the weights the package ships)")
    parser.add_argument("--steps", type=int, default=600, help="optimisation steps")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (linear warm-up, cosine decay)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weight initialisation")
    parser.add_argument("--world-seed", type=int, default=TINY_CLIP_WORLD_SEED, help="seed of the rendered scenes")
    parser.add_argument("--log-every", type=int, default=20)
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "log_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.lr <= 0:
        parser.error(f"--lr must be > 0, got {args.lr}")
    args.out = Path(args.out or Path("runs") / "tiny_clip" / args.model)
    if args.out.resolve().is_relative_to(SHIPPED_ASSETS.resolve()) and not args.overwrite_shipped:
        parser.error(f"--out {args.out} would replace the shipped weights in {SHIPPED_ASSETS}; "
                     "add --overwrite-shipped to mean it")
    return args


def render_batch(world_seed: int, start: int, batch_size: int, mean: torch.Tensor, std: torch.Tensor):
    """Images ``(B, 3, H, W)`` normalised, captions, and a ``(B,)`` id of each scene's object set."""
    scenes = [render_scene(world_seed, start + i) for i in range(batch_size)]
    images = torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2).float() / 255
    object_sets = [tuple(sorted(o["label"] for o in s.objects)) for s in scenes]
    set_ids = {key: i for i, key in enumerate(dict.fromkeys(object_sets))}
    return (images - mean) / std, [s.caption for s in scenes], torch.tensor([set_ids[k] for k in object_sets])


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


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    config_path = TINY_ASSETS[args.model] / f"{args.model}.json"
    open_clip.add_model_config(config_path)
    model = open_clip.create_model(args.model)
    initial_embedding = model.token_embedding.weight.detach().clone()  # the rows no caption moves stay so
    tokenizer = open_clip.get_tokenizer(args.model)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
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
        images, captions, set_ids = render_batch(args.world_seed, step * args.batch_size, args.batch_size, mean, std)
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

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
    state = pack_token_embedding(state, initial_embedding, args.seed)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt", "model": args.model})
    if (out / config_path.name).resolve() != config_path.resolve():
        shutil.copyfile(config_path, out / config_path.name)
    record = {
        "model": args.model, "command": "python " + " ".join([sys.argv[0]] + (argv or sys.argv[1:])),
        "seed": args.seed, "world_seed": args.world_seed, "steps": args.steps, "batch_size": args.batch_size,
        "lr": args.lr, "wall_seconds": round(wall, 1), "steps_per_second": round(args.steps / wall, 4),
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "final_loss": round(float(np.mean(recent)), 4), "torch": torch.__version__,
        "open_clip": open_clip.__version__,
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    main()

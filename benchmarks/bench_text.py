"""Prompt-ensemble encoding: padding-trimmed vs full-context text tower, same model, same prompts, same process.

    python benchmarks/bench_text.py --model RN50 --classes 20 --templates denseclip85

Prints prompts/s for both and their ratio, plus the largest difference between the embeddings.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from denseclip.config import resolve_vocabulary
from denseclip.models import load_clip
from denseclip.text import encode_prompts
from denseclip.vocabulary import load_templates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="RN50")
    parser.add_argument("--pretrained", default="random")
    parser.add_argument("--vocabulary", default="coco_stuff")
    parser.add_argument("--classes", type=int, default=20, help="first N classes of the vocabulary")
    parser.add_argument("--templates", default="denseclip85")
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()

    clip = load_clip(args.model, args.pretrained)
    names = [c[0] for c in resolve_vocabulary(args.vocabulary)[: args.classes]]
    prompts = [t.replace("{}", n) for n in names for t in load_templates(args.templates)]

    start = time.perf_counter()
    trimmed = encode_prompts(clip, prompts, batch_size=args.batch_size)
    t_trimmed = time.perf_counter() - start

    start = time.perf_counter()
    with torch.no_grad():
        full = torch.cat([
            F.normalize(clip.model.encode_text(clip.tokenizer(prompts[i:i + args.batch_size])).float(), dim=-1)
            for i in range(0, len(prompts), args.batch_size)
        ])
    t_full = time.perf_counter() - start

    print(f"{len(prompts)} prompts, {args.model}, {torch.get_num_threads()} threads")
    print(f"full context: {len(prompts) / t_full:8.1f} prompts/s ({t_full:.1f} s)")
    print(f"trimmed:      {len(prompts) / t_trimmed:8.1f} prompts/s ({t_trimmed:.1f} s)")
    print(f"speed-up: {t_full / t_trimmed:.2f}x; max |difference| {float((trimmed - full).abs().max()):.2e}")


if __name__ == "__main__":
    main()

"""Render the synthetic captioned world into WebDataset shards (``jpg``, ``seg.png``, ``txt``, ``json``).

    python pipelines/render_world.py --seed 1 --num-images 200 --out runs/world-s1 [--shard-size 100 --size 128]
"""

from __future__ import annotations

import argparse

from denseclip.synthetic import write_shards


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, required=True, help="world seed (use one the tiny CLIP never saw)")
    parser.add_argument("--num-images", type=int, required=True)
    parser.add_argument("--out", required=True, help="output folder: local path or fsspec URL")
    parser.add_argument("--shard-size", type=int, default=1000, help="scenes per shard")
    parser.add_argument("--size", type=int, default=128, help="scene side in pixels")
    args = parser.parse_args(argv)
    for name in ("num_images", "shard_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.size < 32:
        parser.error(f"--size must be >= 32, got {args.size}")
    return args


def main(argv: list[str] | None = None) -> list[str]:
    args = parse_args(argv)
    urls = write_shards(args.seed, args.num_images, args.out, shard_size=args.shard_size, size=args.size)
    print(f"wrote {args.num_images} scenes in {len(urls)} shards under {args.out}")
    return urls


if __name__ == "__main__":
    main()

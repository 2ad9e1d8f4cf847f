"""Render the synthetic captioned world into WebDataset shards (``jpg``, ``seg.png``, ``txt``, ``json``), or, with
``--images-only``, into a folder of plain JPEG files (a stand-in for a folder of unlabelled photos).

    python pipelines/render_world.py --seed 1 --num-images 200 --out runs/world-s1 [--shard-size 100 --size 128]
    python pipelines/render_world.py --seed 7 --num-images 1000 --out runs/photos-s7 --images-only
"""

from __future__ import annotations

import argparse

from denseclip.synthetic import write_images, write_shards


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, required=True, help="world seed (use one the tiny CLIP never saw)")
    parser.add_argument("--num-images", type=int, required=True)
    parser.add_argument("--out", required=True, help="output folder: local path or fsspec URL")
    parser.add_argument("--shard-size", type=int, default=1000, help="scenes per shard")
    parser.add_argument("--size", type=int, default=128, help="scene side in pixels")
    parser.add_argument("--images-only", action="store_true",
                        help="write scene-NNNNNN.jpg files into --out (a local folder), no shards, no labels")
    args = parser.parse_args(argv)
    for name in ("num_images", "shard_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.size < 32:
        parser.error(f"--size must be >= 32, got {args.size}")
    return args


def main(argv: list[str] | None = None) -> list[str]:
    args = parse_args(argv)
    if args.images_only:
        paths = write_images(args.seed, args.num_images, args.out, size=args.size)
        print(f"wrote {len(paths)} scenes as JPEG files under {args.out}")
        return [str(p) for p in paths]
    urls = write_shards(args.seed, args.num_images, args.out, shard_size=args.shard_size, size=args.size)
    print(f"wrote {args.num_images} scenes in {len(urls)} shards under {args.out}")
    return urls


if __name__ == "__main__":
    main()

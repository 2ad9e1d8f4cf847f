"""Render a synthetic captioned world: the shapes world into WebDataset shards (``jpg``, ``seg.png``, ``txt``,
``json``) or, with ``--images-only``, into a folder of plain JPEG files (a stand-in for a folder of unlabelled
photos); or, with ``--layout coco_stuff``, the COCO-Stuff world in COCO-Stuff 164k's own layout
(``images/{split}2017/*.jpg``, ``annotations/{split}2017/*.png`` in raw COCO-Stuff ids), which
``denseclip prepare --dataset coco_stuff --input DIR`` reads like the real dataset.

    denseclip render-world --seed 1 --num-images 200 --output runs/world-s1 [--shard-size 100 --size 128]
    denseclip render-world --seed 7 --num-images 1000 --output runs/photos-s7 --images-only
    denseclip render-world --layout coco_stuff --split train --seed 3 --num-images 200 --output runs/coco-s3
"""

from __future__ import annotations

import argparse
import sys

from denseclip import synthetic_coco_stuff
from denseclip.commands.options import Parser, renamed
from denseclip.synthetic import write_images, write_shards

LAYOUTS = ("shards", "coco_stuff")
SHAPES_DEFAULTS = {"shard_size": 1000, "size": 128}  # flags of the shapes world only


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = Parser(prog=prog or "denseclip render-world", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layout", choices=LAYOUTS, default="shards",
                        help="shards: the shapes world as WebDataset shards (or JPEG files with --images-only); "
                        "coco_stuff: the COCO-Stuff world as COCO-Stuff 164k lays it out on disk")
    parser.add_argument("--seed", type=int, required=True, help="world seed (use one the tiny CLIP never saw)")
    parser.add_argument("--num-images", type=int, required=True)
    parser.add_argument("--output", required=True, help="output folder: local path or fsspec URL (shards), local "
                        "folder (--images-only, --layout coco_stuff)")
    renamed(parser, "--out", "--output")
    parser.add_argument("--split", choices=synthetic_coco_stuff.SPLITS, default=None,
                        help="--layout coco_stuff: which split to write (the worlds of two splits differ)")
    parser.add_argument("--shard-size", type=int, default=None,
                        help=f"scenes per shard (default {SHAPES_DEFAULTS['shard_size']})")
    parser.add_argument("--size", type=int, default=None,
                        help=f"scene side in pixels (default {SHAPES_DEFAULTS['size']})")
    parser.add_argument("--images-only", action="store_true",
                        help="write scene-NNNNNN.jpg files into --output (a local folder), no shards, no labels")
    return parser


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.layout == "coco_stuff":
        given = [flag for flag, value in (("--shard-size", args.shard_size), ("--size", args.size),
                                          ("--images-only", args.images_only)) if value]
        if given:
            parser.error(f"{given[0]} is for the shapes world; --layout coco_stuff writes 640x480 files")
        if args.split is None:
            parser.error("--layout coco_stuff needs --split train or val")
    elif args.split is not None:
        parser.error("--split is for --layout coco_stuff")
    for name, default in SHAPES_DEFAULTS.items():
        setattr(args, name, default if getattr(args, name) is None else getattr(args, name))
    for name in ("num_images", "shard_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.size < 32:
        parser.error(f"--size must be >= 32, got {args.size}")
    return args


def render(args: argparse.Namespace) -> list[str]:
    """Write the world ``args`` describe; the paths (or shard URLs) written."""
    if args.layout == "coco_stuff":
        paths = synthetic_coco_stuff.write_dataset(args.seed, args.num_images, args.output, args.split)
        print(f"wrote {len(paths)} {args.split} scenes in COCO-Stuff's layout under {args.output}")
        return [str(p) for p in paths]
    if args.images_only:
        paths = write_images(args.seed, args.num_images, args.output, size=args.size)
        print(f"wrote {len(paths)} scenes as JPEG files under {args.output}")
        return [str(p) for p in paths]
    urls = write_shards(args.seed, args.num_images, args.output, shard_size=args.shard_size, size=args.size)
    print(f"wrote {args.num_images} scenes in {len(urls)} shards under {args.output}")
    return urls


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    render(parse_args(argv, prog))
    return 0


if __name__ == "__main__":
    sys.exit(main())

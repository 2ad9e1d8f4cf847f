"""Convert a dataset on disk into WebDataset tar shards (local folder or s3:// URL).

    denseclip prepare --dataset voc --input VOCdevkit/VOC2012 --split val --output shards/voc-val

Writes ``{dataset}-{split}-{index:06d}.tar`` shards of ``{key}.jpg`` (or ``.png`` for non-JPEG sources),
``{key}.seg.png`` (train ids, 255 = ignore) and ``{key}.json``, plus ``manifest.json`` and ``errors.jsonl``.
Re-running skips finished shards. Bad samples are listed in ``errors.jsonl``; they never stop the run.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

from denseclip import storage
from denseclip.commands.options import Parser, add_verbose, renamed
from denseclip.datasets import train_id_lut
from denseclip.images import MAX_PIXELS
from denseclip.runlog import library_output
from denseclip.sources import ERRORS, LAYOUTS, convert_record, list_records, prepare_shards


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = Parser(prog=prog or "denseclip prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, choices=LAYOUTS, help="the layout of the dataset on disk")
    parser.add_argument("--input", required=True, type=Path, help="dataset root in the MMSegmentation layout")
    renamed(parser, "--root", "--input")
    parser.add_argument("--split", required=True, choices=("val", "train", "aug"),
                        help="'aug': VOC's SBD-augmented training set (SegmentationClassAug)")
    parser.add_argument("--output", required=True, help="output folder or URL (s3://bucket/prefix)")
    renamed(parser, "--out", "--output")
    parser.add_argument("--shard-size", type=int, default=1000, help="records per shard")
    parser.add_argument("--workers", type=int, default=1, help="processes converting shards in parallel")
    parser.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                        help="refuse larger images (decompression bombs)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_verbose(parser)
    return parser


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.shard_size < 1 or args.workers < 1 or args.max_pixels < 1:
        parser.error("--shard-size, --workers and --max-pixels must be >= 1")
    if args.split == "aug" and args.dataset != "voc":
        parser.error("--split aug exists only for --dataset voc")
    if not args.input.is_dir():
        parser.error(f"--input {args.input} is not a folder")
    return args


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = parse_args(argv, prog)
    try:
        records = list_records(args.dataset, args.input, args.split)
    except (FileNotFoundError, ValueError) as exc:
        print(f"prepare: {exc}", file=sys.stderr)
        return 2
    train_ids = None if args.dataset == "folder" else train_id_lut(args.dataset)
    convert = functools.partial(convert_record, dataset=args.dataset, split=args.split, train_ids=train_ids,
                                max_pixels=args.max_pixels)
    with library_output(args.verbose):
        manifest = prepare_shards(records, args.output, f"{args.dataset}-{args.split}", args.shard_size, convert,
                                  workers=args.workers, progress=not args.no_progress,
                                  summary={"dataset": args.dataset, "split": args.split})
    print(f"{manifest['num_samples']} samples in {len(manifest['shards'])} shards at {args.output}; "
          f"{manifest['num_errors']} bad records listed in {storage.join(args.output, ERRORS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

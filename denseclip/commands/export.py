"""Export masks from a mask store to annotation-tool formats.

    python pipelines/export.py --store runs/voc-val/masks --format png --out exported/png
    python pipelines/export.py --store s3://bucket/run --format coco --out exported/coco --dataset voc

``png``: ``<key>.png`` palette label maps (16-bit grey past 255 classes), ``files.jsonl`` (key -> file: keys
that sanitise to the same name get distinct files) and ``classes.json``; ``coco``: one COCO file per committed
part (input shard), ``annotations/<part>.json`` with one RLE mask per class and image (FiftyOne, CVAT and Label
Studio import it), the same as JSON Lines in ``annotations/<part>.jsonl``, and ``categories.json``; streaming.

A damaged part of the store (docs/mask-store.md) stops the export with exit code 2 and a line naming the file;
``--skip-damaged`` exports the rest and lists the parts it skipped.
"""

from __future__ import annotations

import argparse
import sys

from denseclip.damage import DamagedPartError
from denseclip.datasets import DATASET_NAMES, get_dataset
from denseclip.export import class_names_from_provenance, export_coco, export_png
from denseclip.mask_store import MaskStore


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", required=True, help="mask store root (path or s3:// URL)")
    parser.add_argument("--format", required=True, choices=("png", "coco"))
    parser.add_argument("--out", required=True, help="output folder (path or URL)")
    parser.add_argument("--dataset", choices=DATASET_NAMES,
                        help="name classes from this dataset (default: the store's provenance vocabulary)")
    parser.add_argument("--image-ext", default="jpg", help="extension of the images in COCO file_name")
    parser.add_argument("--skip-background", action="store_true", help="coco: no annotations for background")
    parser.add_argument("--skip-damaged", action="store_true",
                        help="export the rest of a store with damaged parts (listed) instead of stopping")
    return parser.parse_args(argv)


def export(args: argparse.Namespace, store: MaskStore) -> int:
    names = get_dataset(args.dataset).class_names if args.dataset else class_names_from_provenance(store.provenance)
    if args.format == "png":
        count = export_png(store, args.out, names)
        print(f"{count} label maps written to {args.out}")
        return 0
    if not names:
        print("export: the store's provenance has no vocabulary; name the classes with --dataset", file=sys.stderr)
        return 2
    skip = [i for i, n in enumerate(names) if n.lower() == "background"] if args.skip_background else []
    files = export_coco(store, args.out, names, args.image_ext, skip)
    print(f"{len(files)} COCO files (one per part) written to {args.out}/annotations/")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    store = MaskStore(args.store, skip_damaged=args.skip_damaged)
    if not store.committed_parts():
        print(f"export: no committed mask parts under {args.store}", file=sys.stderr)
        return 2
    try:
        code = export(args, store)
    except DamagedPartError as exc:
        print(f"export: error: {exc} (--skip-damaged exports the rest)", file=sys.stderr)
        return 2
    for damage in store.skipped.values():
        print(f"export: skipped the damaged part {damage}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())

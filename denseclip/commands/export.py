"""Export masks from a mask store to annotation-tool formats.

    denseclip export --input runs/voc-val/masks --format png --output exported/png
    denseclip export --input s3://bucket/run --format coco --output exported/coco --classes voc

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

from denseclip import storage
from denseclip.commands.options import Parser, add_classes, add_verbose, renamed
from denseclip.config import resolve_vocabulary
from denseclip.damage import DamagedPartError
from denseclip.export import COCO_DIR, class_names_from_provenance, export_coco, export_png
from denseclip.mask_store import MaskStore
from denseclip.runlog import library_output


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = Parser(prog=prog or "denseclip export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="mask store root (path or s3:// URL)")
    renamed(parser, "--store", "--input")
    parser.add_argument("--format", required=True, choices=("png", "coco"))
    parser.add_argument("--output", required=True, help="output folder (path or URL)")
    renamed(parser, "--out", "--output")
    add_classes(parser, extra=" naming the classes (default: the store's own vocabulary)")
    renamed(parser, "--dataset", "--classes")
    parser.add_argument("--image-ext", default="jpg", help="extension of the images in COCO file_name")
    parser.add_argument("--skip-background", action="store_true", help="coco: no annotations for background")
    parser.add_argument("--skip-damaged", action="store_true",
                        help="export the rest of a store with damaged parts (listed) instead of stopping")
    add_verbose(parser)
    return parser


def class_names(classes: str | None, store: MaskStore) -> list[str] | None:
    """The names of the exported classes: those ``--classes`` gives, else the store's own vocabulary."""
    if classes is None:
        return class_names_from_provenance(store.provenance)
    return [names[0] for names in resolve_vocabulary(classes)]


def export(args: argparse.Namespace, store: MaskStore, prog: str) -> int:
    names = class_names(args.classes, store)
    if args.format == "png":
        count = export_png(store, args.output, names, bar=True)
        print(f"{count} label maps written to {args.output}")
        return 0
    if not names:
        print(f"{prog}: the store's provenance has no vocabulary; name the classes with --classes", file=sys.stderr)
        return 2
    skip = [i for i, n in enumerate(names) if n.lower() == "background"] if args.skip_background else []
    files = export_coco(store, args.output, names, args.image_ext, skip, bar=True)
    print(f"{len(files)} COCO files (one per part) written to {storage.join(args.output, COCO_DIR)}")
    return 0


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    prog = parser.prog
    store = MaskStore(args.input, skip_damaged=args.skip_damaged)
    if not store.committed_parts():
        print(f"{prog}: no committed mask parts under {args.input}", file=sys.stderr)
        return 2
    try:
        with library_output(args.verbose):
            code = export(args, store, prog)
    except DamagedPartError as exc:
        print(f"{prog}: error: {exc} (--skip-damaged exports the rest)", file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    for damage in store.skipped.values():
        print(f"{prog}: skipped the damaged part {damage}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())

"""Label image files with any vocabulary.

    denseclip predict photo.jpg --classes "red car, yellow car, road, tree" --output out/
    denseclip predict *.jpg --classes my_classes.txt --mode slide --output out/

Writes ``<stem>.png`` (palette label map at the image's size, value = class index), ``<stem>_overlay.jpg`` (with a
legend) and ``<stem>.json`` (the vocabulary, the model and the classes present); prints one line per image with the
files it wrote (errors on stderr), then a summary. Without ``--model``: the paper's RN50 with OpenAI's weights.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from denseclip.commands.options import Parser, add_classes, add_verbose, renamed
from denseclip.config import ConfigError, add_labeler_arguments, labeler_config_from_args, resolve_vocabulary
from denseclip.images import ImageDecodeError, decode_image, encode_png
from denseclip.models import warn_unknown_names
from denseclip.predictor import DenseCLIP
from denseclip.runlog import library_output
from denseclip.visualize import class_palette, overlay

# Bad input of any kind (ConfigError, VocabularyError, ImageDecodeError and the models' ModelLoadError are
# ValueErrors), and files or a storage that cannot be read: one line, no traceback.
USER_ERRORS = (ValueError, OSError)


def _unique_stems(paths: list[Path]) -> list[str]:
    """Output names: the file stem, suffixed with a counter when two inputs share a stem."""
    seen: dict[str, int] = {}
    stems = []
    for p in paths:
        n = seen.get(p.stem, 0)
        seen[p.stem] = n + 1
        stems.append(p.stem if n == 0 else f"{p.stem}-{n}")
    return stems


def _palette(vocabulary: str | None, class_names: list[str]) -> np.ndarray:
    """A dataset's own colours for its vocabulary, else colours from the class names."""
    from denseclip.datasets import DATASET_NAMES, get_dataset

    if vocabulary in DATASET_NAMES and get_dataset(vocabulary).class_names == list(class_names):
        return get_dataset(vocabulary).palette
    return class_palette(class_names)


def predict(args: argparse.Namespace, prog: str) -> int:
    config = labeler_config_from_args(args)
    classes = resolve_vocabulary(args.classes, synonyms=config.synonyms)
    if len(classes) + (config.background_threshold is not None) > 255:
        raise ConfigError(f"classes: {len(classes)} classes do not fit an 8-bit PNG label map (max 255)")
    warn_unknown_names(config, classes, prog)
    labeler = DenseCLIP.from_config(config, classes)
    palette = _palette(args.classes, labeler.class_names)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    paths = [Path(p) for p in args.images]
    failures = 0
    for path, stem in zip(paths, _unique_stems(paths)):
        try:
            image = decode_image(path.read_bytes(), key=str(path))
        except (OSError, ImageDecodeError) as exc:
            reason = exc.reason if isinstance(exc, ImageDecodeError) else (exc.strerror or str(exc))
            print(f"{prog}: error: {path}: {reason}", file=sys.stderr, flush=True)
            failures += 1
            continue
        labels, _ = labeler.label_images([image])[0]
        files = [out / f"{stem}.png", out / f"{stem}_overlay.jpg", out / f"{stem}.json"]
        files[0].write_bytes(encode_png(labels, palette))
        overlay(image, labels, labeler.class_names, palette).convert("RGB").save(files[1], quality=90)
        present = [labeler.class_names[i] for i in np.unique(labels)]
        meta = {
            "image": str(path), "height": int(image.shape[0]), "width": int(image.shape[1]),
            "class_names": labeler.class_names, "classes": classes, "model": config.model,
            "pretrained": labeler.clip.pretrained, "fingerprint": labeler.clip.fingerprint,
            "activation": labeler.clip.activation, "protocol": config.protocol, "head": config.head,
            "templates": config.template_set, "mode": config.mode,
            "present": present,
        }
        files[2].write_text(json.dumps(meta, indent=2))
        print(f"{path} -> {', '.join(f.name for f in files)} ({', '.join(present)})", flush=True)
    print(f"{prog}: {len(paths) - failures} of {len(paths)} images labelled into {out}/"
          + (f", {failures} failed" if failures else ""))
    return 1 if failures else 0


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = Parser(prog=prog or "denseclip predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="*", help="image files (JPEG, PNG, WebP, BMP, TIFF)")
    parser.add_argument("--input", action="append", default=[], help="an image file (repeatable; or give them "
                        "as arguments)")
    add_classes(parser, required=True)
    renamed(parser, "--classes-file", "--classes")
    renamed(parser, "--vocabulary", "--classes")
    parser.add_argument("--output", required=True, help="output folder")
    renamed(parser, "--out", "--output")
    add_verbose(parser)
    add_labeler_arguments(parser)
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    args.images = [*args.images, *args.input]
    if not args.images:
        parser.error("give the image files (as arguments or with --input)")
    try:
        with library_output(args.verbose):
            return predict(args, parser.prog)
    except USER_ERRORS as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2

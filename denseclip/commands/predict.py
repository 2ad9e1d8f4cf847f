"""The ``denseclip`` command: ``denseclip predict`` labels image files with any vocabulary; ``denseclip verify``
checks a mask store.

``predict`` prints one line per image with the files it wrote (errors on stderr), then a summary. ``verify``
prints one line per damaged part and per disagreement of the key index, then a total; it exits 1 when any.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from denseclip.config import ConfigError, add_labeler_arguments, labeler_config_from_args, resolve_vocabulary
from denseclip.images import ImageDecodeError, decode_image, encode_png
from denseclip.visualize import class_palette, overlay
from denseclip.vocabulary import parse_class_list, read_classes_file

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


def predict(args: argparse.Namespace) -> int:
    config = labeler_config_from_args(args)
    if args.classes is not None:
        classes = parse_class_list(args.classes)
    elif args.classes_file is not None:
        classes = read_classes_file(args.classes_file)
    else:
        classes = resolve_vocabulary(args.vocabulary, synonyms=config.synonyms)
    if len(classes) + (config.background_threshold is not None) > 255:
        raise ConfigError(f"vocabulary: {len(classes)} classes do not fit an 8-bit PNG label map (max 255)")
    labeler = config.build(classes)
    palette = _palette(args.vocabulary, labeler.class_names)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [Path(p) for p in args.images]
    failures = 0
    for path, stem in zip(paths, _unique_stems(paths)):
        try:
            image = decode_image(path.read_bytes(), key=str(path))
        except (OSError, ImageDecodeError) as exc:
            reason = exc.reason if isinstance(exc, ImageDecodeError) else (exc.strerror or str(exc))
            print(f"denseclip: error: {path}: {reason}", file=sys.stderr, flush=True)
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
    print(f"denseclip: {len(paths) - failures} of {len(paths)} images labelled into {out}/"
          + (f", {failures} failed" if failures else ""))
    return 1 if failures else 0


def verify(args: argparse.Namespace) -> int:
    from denseclip.mask_store import verify_store

    report = verify_store(args.store, deep=args.deep)
    if not report.parts:
        raise FileNotFoundError(f"no committed mask parts under {args.store}")
    for line in report.lines():
        print(line, flush=True)
    return 0 if report.ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="denseclip", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="label images with an open vocabulary")
    p.add_argument("images", nargs="+", help="image files (JPEG, PNG, ...)")
    vocab = p.add_mutually_exclusive_group(required=True)
    vocab.add_argument("--classes", help='comma-separated class names, e.g. "cat, dog, sofa"')
    vocab.add_argument("--classes-file", help="one class per line, synonyms after commas")
    vocab.add_argument("--vocabulary", help="a dataset name (voc, context, coco_stuff, synthetic)")
    p.add_argument("--out", required=True, help="output folder")
    add_labeler_arguments(p)
    p.set_defaults(func=predict)
    v = sub.add_parser("verify", help="check every part of a mask store against its record and manifest")
    v.add_argument("--store", required=True, help="mask store root (a folder or URL)")
    v.add_argument("--deep", action="store_true", help="also compare every part's SHA-256 with its manifest "
                   "(reads the whole store)")
    v.set_defaults(func=verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as exc:
        print(f"denseclip: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

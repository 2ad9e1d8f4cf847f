"""Where the images and label maps of each benchmark live on disk (the layouts MMSegmentation documents).

``list_records(dataset, root, split)`` returns one :class:`SourceRecord` per sample, in a deterministic order,
with a key that is safe to use as a WebDataset member prefix and as a relative output path.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from denseclip.shards import sanitize_key

LAYOUTS = ("voc", "context", "coco_stuff", "folder")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
# Tar (USTAR) member names hold 100 characters; a key leaves room for the longest extension (".seg.png").
MAX_KEY_LENGTH = 90
_HASH_LENGTH = 12


@dataclass(frozen=True)
class SourceRecord:
    """One sample on disk: ``key`` (safe, no dots), the image file, and its label map file or None.

    ``name`` and ``label_name`` are the paths relative to ``--root``, recorded in metadata and errors.
    """

    key: str
    image: Path
    name: str
    label: Path | None = None
    label_name: str | None = None


def make_key(relative_stem: str) -> str:
    """A sample key from a relative path without extension.

    ``shards.sanitize_key`` makes it safe; over-long keys keep a prefix plus a hash of the whole name; names with
    no usable character become a hash.
    """
    digest = hashlib.sha1(relative_stem.encode("utf-8")).hexdigest()[:_HASH_LENGTH]
    try:
        key = sanitize_key(relative_stem)
    except ValueError:
        return f"file-{digest}"
    if len(key) > MAX_KEY_LENGTH:
        key = f"{key[: MAX_KEY_LENGTH - _HASH_LENGTH - 1]}-{digest}"
    return key


def _split_ids(root: Path, split_file: str, hint: str) -> list[str]:
    path = root / split_file
    if not path.is_file():
        raise FileNotFoundError(f"split file {path} not found: --root must point at {hint}")
    return [line.split()[0] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _paired(root: Path, ids: list[str], image_dir: str, label_dir: str) -> list[SourceRecord]:
    records = []
    for sample_id in ids:
        name, label_name = f"{image_dir}/{sample_id}.jpg", f"{label_dir}/{sample_id}.png"
        records.append(SourceRecord(make_key(sample_id), root / name, name, root / label_name, label_name))
    return records


def _voc(root: Path, split: str) -> list[SourceRecord]:
    # "aug" is the SBD-augmented training set as MMSegmentation lays it out.
    label_dir = "SegmentationClassAug" if split == "aug" else "SegmentationClass"
    ids = _split_ids(root, f"ImageSets/Segmentation/{split}.txt", "VOCdevkit/VOC2012")
    return _paired(root, ids, "JPEGImages", label_dir)


def _context(root: Path, split: str) -> list[SourceRecord]:
    ids = _split_ids(root, f"ImageSets/SegmentationContext/{split}.txt", "VOCdevkit/VOC2010")
    return _paired(root, ids, "JPEGImages", "SegmentationClassContext")


def _coco_stuff(root: Path, split: str) -> list[SourceRecord]:
    image_dir = root / "images" / f"{split}2017"
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image folder {image_dir} not found: --root must point at coco_stuff164k")
    records = []
    for image in sorted(p for p in image_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg")):
        label_name = f"annotations/{split}2017/{image.stem}.png"
        records.append(SourceRecord(make_key(image.stem), image, f"images/{split}2017/{image.name}",
                                    root / label_name, label_name))
    return records


def _folder(root: Path, split: str) -> list[SourceRecord]:
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} not found")
    names = sorted(
        os.path.relpath(os.path.join(folder, f), root).replace(os.sep, "/")
        for folder, _, files in os.walk(root)
        for f in files
        if f.lower().endswith(IMAGE_SUFFIXES)
    )
    records, taken = [], set()
    for name in names:
        key = make_key(os.path.splitext(name)[0])
        if key in taken:  # "a.jpg" next to "a.png", or names equal after sanitising
            key = make_key(f"{key}-{hashlib.sha1(name.encode('utf-8')).hexdigest()[:8]}")
        taken.add(key)
        records.append(SourceRecord(key, root / name, name))
    return records


_READERS = {"voc": _voc, "context": _context, "coco_stuff": _coco_stuff, "folder": _folder}


def list_records(layout: str, root: str | os.PathLike, split: str) -> list[SourceRecord]:
    """The samples of ``split`` under ``root`` in ``layout`` (one of :data:`LAYOUTS`), in a fixed order.

    Raises FileNotFoundError naming the missing split file or folder, ValueError when nothing is found.
    """
    if layout not in _READERS:
        raise ValueError(f"unknown dataset layout {layout!r}; known: {', '.join(LAYOUTS)}")
    records = _READERS[layout](Path(root), split)
    if not records:
        raise ValueError(f"no {layout} images found for split {split!r} under {root}")
    return records

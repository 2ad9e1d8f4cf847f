"""Masks from the store to the formats annotation tools import: PNG label maps and COCO RLE JSON.

Class ids in the PNGs are the train ids (palette PNGs for up to 255 classes, 16-bit grey PNGs beyond); COCO
category ids are train id + 1 (COCO reserves 0). Both exports stream: one mask is in memory at a time, so a store
of millions of images exports in constant memory, and the COCO export is sharded like the store: one COCO file
(and one JSON Lines file) per committed part, i.e. per input shard. Every output path is derived from a sanitised
key or a part id, so nothing can write outside the output folder, and two keys never share a file (see
:func:`file_stem`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterable, Iterator

import numpy as np
from pycocotools import mask as coco_mask

from denseclip import storage
from denseclip.images import encode_png
from denseclip.mask_store import MaskStore, ignore_label, label_png
from denseclip.runlog import progress
from denseclip.shards import sanitize_key
from denseclip.visualize import default_palette

COCO_DIR = "annotations"  # annotations/<part>.json (a COCO dataset) and annotations/<part>.jsonl, per part
CATEGORIES_FILE = "categories.json"
CLASSES_FILE = "classes.json"
FILES_FILE = "files.jsonl"  # one {"key", "file"} per exported mask


def class_names_from_provenance(provenance: dict | None) -> list[str] | None:
    """Display names from the provenance ``vocabulary`` (``[[name, synonym, ...], ...]`` or ``[name, ...]``)."""
    vocabulary = (provenance or {}).get("vocabulary")
    if not isinstance(vocabulary, list) or not vocabulary:
        return None
    return [names[0] if isinstance(names, list) else str(names) for names in vocabulary]


def file_stem(key: str) -> str:
    """The name (without extension) ``key`` is exported under: the key itself when it is already a safe
    relative name (letters, digits, ``_ -`` and ``/``), else its sanitised form plus ``.`` and 8 hex digits of a
    hash of the key (``"a.b" -> "a_b.5c6f0e81"``, ``"a_b" -> "a_b"``). A safe name never holds a dot, so the
    names of different keys never collide."""
    try:
        safe = sanitize_key(key)
    except ValueError:
        safe = "key"
    return safe if safe == key else f"{safe}.{hashlib.sha1(key.encode()).hexdigest()[:8]}"


def export_png(store: MaskStore, out: str, class_names: list[str] | None = None, bar: bool = False) -> int:
    """Write ``out/<file_stem(key)>.png`` label maps (palette PNGs, index = train id, 255 = ignore in VOC's void
    colour; 16-bit grey PNGs for vocabularies of more than 255 classes, 65535 = ignore), ``out/files.jsonl``
    (which key went to which file) and, when ``class_names`` are known, ``out/classes.json`` (id, name, colour).
    Returns the number of masks. ``bar``: a progress bar on a terminal."""
    palette = default_palette(256)
    count = 0
    masks = store.iter_masks()
    with storage.open_atomic(storage.join(out, FILES_FILE)) as files:
        for key, mask in progress(masks, "export", unit="mask") if bar else masks:
            name = file_stem(key) + ".png"
            data = encode_png(mask, palette) if mask.dtype == np.uint8 else label_png(mask)
            storage.write_bytes(storage.join(out, name), data)
            files.write(json.dumps({"key": key, "file": name}).encode() + b"\n")
            count += 1
    if class_names:
        colours = default_palette(len(class_names))
        classes = [{"id": i, "name": n, "color": colours[i].tolist()} for i, n in enumerate(class_names)]
        storage.write_bytes(storage.join(out, CLASSES_FILE), json.dumps(classes, indent=1).encode())
    return count


def mask_annotations(mask: np.ndarray, image_id: int, first_id: int, num_classes: int,
                     skip_ids: Iterable[int] = ()) -> list[dict]:
    """COCO annotations, one RLE per class present in ``mask`` (uint8 or uint16 (H, W)); ids count up from
    ``first_id``.

    Pixels equal to the map's ignore value (255, or 65535 in 16-bit maps) are unlabelled; any other value >=
    ``num_classes`` raises ValueError.
    """
    skip = set(skip_ids) | {ignore_label(mask)}
    present = [int(c) for c in np.unique(mask) if c not in skip]
    if present and present[-1] >= num_classes:
        raise ValueError(f"image {image_id}: label {present[-1]} but only {num_classes} classes are named")
    annotations = []
    for offset, c in enumerate(present):
        rle = coco_mask.encode(np.asfortranarray(mask == c, dtype=np.uint8))
        annotations.append({
            "id": first_id + offset, "image_id": image_id, "category_id": c + 1, "iscrowd": 0,
            "area": int(coco_mask.area(rle)), "bbox": [float(v) for v in coco_mask.toBbox(rle)],
            "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
        })
    return annotations


def _categories(class_names: list[str], skip: set[int]) -> list[dict]:
    return [{"id": i + 1, "name": n, "supercategory": ""} for i, n in enumerate(class_names) if i not in skip]


def _coco_images(store: MaskStore, class_names: list[str], image_ext: str, skip: set[int],
                 parts: Iterable[str] | None = None) -> Iterator[tuple[str, dict, list[dict]]]:
    """``(key, image, its annotations)`` for every mask of the store (or of ``parts``), ids counting up from 1."""
    next_annotation = 1
    for image_id, (key, mask) in enumerate(store.iter_masks(parts), start=1):
        image = {"id": image_id, "file_name": f"{file_stem(key)}.{image_ext}", "height": int(mask.shape[0]),
                 "width": int(mask.shape[1])}
        try:
            annotations = mask_annotations(mask, image_id, next_annotation, len(class_names), skip)
        except ValueError as exc:
            raise ValueError(f"mask {key!r}: {exc}") from exc
        next_annotation += len(annotations)
        yield key, image, annotations


def coco_dataset(store: MaskStore, class_names: list[str], image_ext: str = "jpg",
                 skip_ids: Iterable[int] = (), parts: Iterable[str] | None = None) -> dict:
    """The store (or its ``parts``) as one COCO dict (images, categories, annotations with RLE masks per class
    and image), in memory: for small stores; :func:`export_coco` writes the same, a part at a time, streaming.

    ``file_name`` is ``<file_stem(key)>.<image_ext>``, the image's name in the shards.
    """
    skip = set(skip_ids)
    images, annotations = [], []
    for _, image, found in _coco_images(store, class_names, image_ext, skip, parts):
        images.append(image)
        annotations += found
    return {"images": images, "annotations": annotations, "categories": _categories(class_names, skip)}


def export_coco(store: MaskStore, out: str, class_names: list[str], image_ext: str = "jpg",
                skip_ids: Iterable[int] = (), bar: bool = False) -> list[str]:
    """Write the store as COCO, one file per committed part, streaming: ``out/annotations/<part>.json`` (what
    :func:`coco_dataset` gives for that part: ids count from 1 within each file, ``file_name`` names the image),
    ``out/annotations/<part>.jsonl`` (the same images, one per line, each ``{..., "key", "annotations": [...]}``)
    and ``out/categories.json``. Returns the URLs of the ``.json`` files. ``bar``: a progress bar on a terminal."""
    skip = set(skip_ids)
    categories = _categories(class_names, skip)
    storage.write_bytes(storage.join(out, CATEGORIES_FILE), json.dumps(categories, indent=1).encode())
    parts = store.readable_parts()
    return [_export_coco_part(store, part, storage.join(out, COCO_DIR, part), categories, class_names,
                              image_ext, skip)
            for part in (progress(parts, "export", unit="part") if bar else parts)]


def _export_coco_part(store: MaskStore, part: str, stem: str, categories: list[dict], class_names: list[str],
                      image_ext: str, skip: set[int]) -> str:
    """``<stem>.json`` and ``<stem>.jsonl`` of one part: annotations written as they are made, the image entries
    spooled to a temporary file and appended after them. Returns the ``.json`` URL."""
    url = stem + ".json"
    with (storage.open_atomic(url) as f, storage.open_atomic(stem + ".jsonl") as lines,
          tempfile.TemporaryFile() as images):
        f.write(b'{"categories": ' + json.dumps(categories).encode() + b', "annotations": [')
        separator = b""
        for count, (key, image, annotations) in enumerate(_coco_images(store, class_names, image_ext, skip, [part])):
            images.write((b"," if count else b"") + json.dumps(image).encode())
            lines.write(json.dumps({**image, "key": key, "annotations": annotations}).encode() + b"\n")
            for annotation in annotations:
                f.write(separator + json.dumps(annotation).encode())
                separator = b","
        f.write(b'], "images": [')
        images.seek(0)
        shutil.copyfileobj(images, f)
        f.write(b"]}")
    return url

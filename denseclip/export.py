"""Masks from the store to the formats annotation tools import: palette PNG label maps and COCO RLE JSON.

Class ids in the PNGs are the train ids; COCO category ids are train id + 1 (COCO reserves 0).
Every output path is derived from a sanitised key, so no key can write outside the output folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

import numpy as np
from pycocotools import mask as coco_mask

from denseclip import storage
from denseclip.datasets import IGNORE_INDEX
from denseclip.images import encode_png
from denseclip.mask_store import MaskStore
from denseclip.shards import sanitize_key
from denseclip.visualize import default_palette

COCO_FILE = "annotations.json"
CLASSES_FILE = "classes.json"


def class_names_from_provenance(provenance: dict | None) -> list[str] | None:
    """Display names from the provenance ``vocabulary`` (``[[name, synonym, ...], ...]`` or ``[name, ...]``)."""
    vocabulary = (provenance or {}).get("vocabulary")
    if not isinstance(vocabulary, list) or not vocabulary:
        return None
    return [names[0] if isinstance(names, list) else str(names) for names in vocabulary]


def output_url(out: str, key: str, suffix: str) -> str:
    """``out/<sanitised key><suffix>``; raises ValueError if the result would leave ``out``."""
    url = storage.join(out, sanitize_key(key) + suffix)
    if storage.is_local(out):
        root = os.path.realpath(out)
        if os.path.commonpath([root, os.path.realpath(url)]) != root:
            raise ValueError(f"key {key!r} would be written outside {out}")
    return url


def export_png(store: MaskStore, out: str, class_names: list[str] | None = None) -> int:
    """Write ``out/<key>.png`` palette PNGs (index = train id, 255 = ignore in VOC's void colour) and, when
    ``class_names`` are known, ``out/classes.json`` (id, name, colour). Returns the number of masks."""
    palette = default_palette(256)
    count = 0
    for key, mask in store.iter_masks():
        storage.write_bytes(output_url(out, key, ".png"), encode_png(mask, palette))
        count += 1
    if class_names:
        classes = [{"id": i, "name": n, "color": palette[i].tolist()} for i, n in enumerate(class_names)]
        storage.write_bytes(storage.join(out, CLASSES_FILE), json.dumps(classes, indent=1).encode())
    return count


def mask_annotations(mask: np.ndarray, image_id: int, first_id: int, num_classes: int,
                     skip_ids: Iterable[int] = ()) -> list[dict]:
    """COCO annotations, one RLE per class present in ``mask`` (uint8 (H, W)); ids count up from ``first_id``.

    Pixels equal to 255 are unlabelled; any other value >= ``num_classes`` raises ValueError.
    """
    skip = set(skip_ids) | {IGNORE_INDEX}
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


def coco_dataset(store: MaskStore, class_names: list[str], image_ext: str = "jpg",
                 skip_ids: Iterable[int] = ()) -> dict:
    """The store as a COCO dict (images, categories, annotations with RLE masks per class and image).

    ``file_name`` is ``<sanitised key>.<image_ext>``, the image's name in the shards.
    """
    skip = set(skip_ids)
    images, annotations = [], []
    for image_id, (key, mask) in enumerate(store.iter_masks(), start=1):
        images.append({"id": image_id, "file_name": f"{sanitize_key(key)}.{image_ext}",
                       "height": int(mask.shape[0]), "width": int(mask.shape[1])})
        try:
            annotations += mask_annotations(mask, image_id, len(annotations) + 1, len(class_names), skip)
        except ValueError as exc:
            raise ValueError(f"mask {key!r}: {exc}") from exc
    categories = [{"id": i + 1, "name": n, "supercategory": ""} for i, n in enumerate(class_names) if i not in skip]
    return {"images": images, "annotations": annotations, "categories": categories}


def export_coco(store: MaskStore, out: str, class_names: list[str], image_ext: str = "jpg",
                skip_ids: Iterable[int] = ()) -> str:
    """Write :func:`coco_dataset` to ``out/annotations.json``; returns its URL."""
    url = storage.join(out, COCO_FILE)
    storage.write_bytes(url, json.dumps(coco_dataset(store, class_names, image_ext, skip_ids)).encode())
    return url

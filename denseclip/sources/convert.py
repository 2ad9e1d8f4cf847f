"""One source record -> one WebDataset sample: image bytes, train-id label map and metadata.

JPEG files are passed through byte for byte; other formats are decoded once and stored as lossless RGB PNG.
Label maps are translated to contiguous train ids (255 = ignore) with the dataset's lookup table.
"""

from __future__ import annotations

import json

import numpy as np

from denseclip.images import (
    JPEG_FORMATS,
    SOURCE_FORMATS,
    ImageDecodeError,
    decode_label_map,
    encode_png,
    encode_rgb,
    read_image,
)
from denseclip.sources.layouts import SourceRecord


class SampleError(ValueError):
    """A sample that cannot be converted: ``key``, ``source`` (file relative to the root) and ``reason``."""

    def __init__(self, key: str, source: str, reason: str):
        super().__init__(f"{key} ({source}): {reason}")
        self.key, self.source, self.reason = key, source, reason

    def as_dict(self) -> dict:
        return {"key": self.key, "source": self.source, "reason": self.reason}


def _read(path, key: str, name: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError as exc:
        raise SampleError(key, name, f"missing {what} file") from exc
    except OSError as exc:
        raise SampleError(key, name, f"cannot read {what} file: {exc.strerror or exc}") from exc


def convert_record(record: SourceRecord, dataset: str, split: str, train_ids: np.ndarray | None,
                   max_pixels: int) -> dict:
    """The sample ``{"__key__", "jpg" | "png", ["seg.png"], "json"}`` of ``record``; raises SampleError.

    ``train_ids``: uint8 (256,) raw label value -> train id, or None for unlabelled data.
    """
    data = _read(record.image, record.key, record.name, "image")
    try:
        image = read_image(data, record.key, max_pixels, SOURCE_FORMATS)
    except ImageDecodeError as exc:
        raise SampleError(record.key, record.name, exc.reason) from exc
    height, width = image.pixels.shape[:2]
    if image.format in JPEG_FORMATS:
        sample = {"__key__": record.key, "jpg": data}
    else:
        sample = {"__key__": record.key, "png": encode_rgb(image.pixels)}
    meta = {"file": record.name, "dataset": dataset, "split": split, "width": width, "height": height,
            "format": image.format, "mode": image.mode}
    if record.label is not None:
        label_data = _read(record.label, record.key, record.label_name, "label map")
        try:
            raw = decode_label_map(label_data, record.key, max_pixels)
        except ImageDecodeError as exc:
            raise SampleError(record.key, record.label_name, exc.reason) from exc
        if raw.shape != (height, width):
            raise SampleError(record.key, record.label_name,
                              f"label map is {raw.shape[1]}x{raw.shape[0]} but the image is {width}x{height}")
        sample["seg.png"] = encode_png(train_ids[raw])
        meta["label_file"] = record.label_name
    sample["json"] = json.dumps(meta, sort_keys=True).encode("utf-8")
    return sample

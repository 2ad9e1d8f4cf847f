"""The read and decode stages: the samples of each input shard as rows (one that cannot be labelled says why in
its ``error``), their images decoded in batches."""

from __future__ import annotations

from collections.abc import Collection, Iterator

import numpy as np

from denseclip.damage import DamagedShardError
from denseclip.images import ImageDecodeError, decode_image, is_plain_jpeg
from denseclip.shards import read_shard, sanitize_key

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")
_NO_IMAGE = np.zeros((0, 0, 3), dtype=np.uint8)


def _sample_row(sample: dict, seen: set[str]) -> dict:
    """One tar sample -> ``{"key", "shard", "data", "error"}``; a sample that cannot be labelled keeps its
    raw key and says why in ``error``."""
    raw_key, shard = sample["__key__"], sample["__shard__"]
    row = {"key": raw_key, "shard": shard, "data": b"", "error": ""}
    try:
        key = sanitize_key(raw_key)
    except ValueError:
        key = ""
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if key != raw_key:
        row["error"] = f"unsafe sample key (would address {key!r} outside its folder or with other characters)"
    elif key in seen:
        row["error"] = "duplicate key within the shard (the first sample was labelled)"
    elif ext is None:
        members = ", ".join(sorted(k for k in sample if not k.startswith("__"))) or "none"
        row["error"] = f"no image member (members: {members})"
    else:
        seen.add(key)
        row["data"] = sample[ext]
    return row


def _shard_rows(shard: str, storage_options: dict | None) -> Iterator[dict]:
    seen: set[str] = set()
    try:
        for sample in read_shard(shard, **(storage_options or {})):
            yield _sample_row(sample, seen)
    except DamagedShardError as exc:
        yield {"key": "", "shard": shard, "data": b"", "error": exc.reason}


def read_shard_rows(shard: str, storage_options: dict | None = None,
                    keys: Collection[str] | None = None) -> Iterator[dict]:
    """The rows of one shard: ``{"key", "shard", "data" (image bytes), "error" (str, "" when usable),
    "shard_total"}``; with ``keys``, only the rows of those (raw) keys. The last row carries ``shard_total`` =
    the number of rows yielded (0 on the others), which tells the committer when a shard is complete, whatever
    order rows arrive in.

    A shard whose tar is corrupt yields the samples before the damage plus one error row with an empty key;
    transient storage errors are retried (see :func:`denseclip.shards.read_shard`), then raised.
    """
    previous, count = None, 0
    for row in _shard_rows(shard, storage_options):
        if keys is not None and row["key"] not in keys:
            continue
        if previous is not None:
            yield previous
        previous, count = {**row, "shard_total": 0}, count + 1
    if previous is not None:
        yield {**previous, "shard_total": count}


def _objects(values: list) -> np.ndarray:
    """A 1-D object array holding ``values`` as they are (np.array would stack equal-shaped arrays)."""
    out = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        out[i] = value
    return out


def _columns(rows: list[dict]) -> dict[str, np.ndarray]:
    return {name: np.array([r[name] for r in rows], dtype=np.int64) if name == "shard_total"
            else _objects([r[name] for r in rows]) for name in rows[0]}


def read_shards(batch: dict[str, np.ndarray], storage_options: dict | None = None,
                batch_size: int = 32) -> Iterator[dict[str, np.ndarray]]:
    """The read stage: the rows (:func:`read_shard_rows`) of each shard URL in ``batch["shard"]`` (only those of
    ``batch["keys"]`` where that list is not empty), in batches of ``batch_size`` rows."""
    for shard, keys in zip(batch["shard"], batch["keys"]):
        rows = []
        for row in read_shard_rows(shard, storage_options, set(keys) if len(keys) else None):
            rows.append(row)
            if len(rows) == batch_size:
                yield _columns(rows)
                rows = []
        if rows:
            yield _columns(rows)


def decode_batch(batch: dict[str, np.ndarray], defer_jpeg: bool = False) -> dict[str, np.ndarray]:
    """Decode the image bytes of a batch to uint8 ``(H, W, 3)`` RGB; undecodable images become errors.

    With ``defer_jpeg``, plain JPEGs (:func:`denseclip.images.is_plain_jpeg`) are left for the GPU actors to
    decode: their bytes go on in a ``jpeg`` column (empty for the other rows) and their ``image`` stays empty.
    """
    images, errors, jpegs = [], [], []
    for key, data, error in zip(batch["key"], batch["data"], batch["error"]):
        image, jpeg = _NO_IMAGE, b""
        if not error:
            try:
                if defer_jpeg and is_plain_jpeg(data, key):
                    jpeg = data
                else:
                    image = decode_image(data, key)
            except ImageDecodeError as exc:
                error = exc.reason
        images.append(image)
        errors.append(error)
        jpegs.append(jpeg)
    out = {"key": batch["key"], "shard": batch["shard"], "shard_total": batch["shard_total"],
           "error": _objects(errors), "image": _objects(images)}
    if defer_jpeg:
        out["jpeg"] = _objects(jpegs)
    return out

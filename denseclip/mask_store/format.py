"""The mask store's format: its layout (folders, schemas, metadata keys), the run provenance its parts carry, and
the encodings of its cells (described in the package's docstring)."""

from __future__ import annotations

import functools
import io
import json
import os
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from denseclip import __version__, storage
from denseclip.images import decode_label_map, encode_png

MASKS_DIR = "masks"
ERRORS_DIR = "errors"
MANIFESTS_DIR = "manifests"
INDEX_DIR = "index"
INDEX_FILE = "keys.parquet"
PROVENANCE_KEY = b"denseclip.provenance"
PART_RECORD_KEY = b"denseclip.part"
INDEX_PARTS_KEY = b"denseclip.index.parts"
MASK_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("shard", pa.string()),
    ("height", pa.int32()),
    ("width", pa.int32()),
    ("mask", pa.binary()),
    ("confidence", pa.binary()),
])
ERROR_SCHEMA = pa.schema([("key", pa.string()), ("shard", pa.string()), ("reason", pa.string())])
INDEX_SCHEMA = pa.schema([("key", pa.string()), ("part", pa.string()), ("row", pa.int32())])
ROW_GROUP_SIZE = 64  # a lookup by key reads one group of ~64 masks
# A lookup reads one index group: 2048 keys (about 40 kB) read and scanned in well under a millisecond; groups
# of 16384 took 4x longer per lookup on a million keys (benchmarks/bench_store.py), smaller ones grow the footer.
INDEX_ROW_GROUP_SIZE = 2048
# The cell encodings (see the module docstring), recorded as FORMAT_FIELD in the provenance of format 2 and later.
PNG_FORMAT, ZSTD_FORMAT = 1, 2
FORMAT_VERSION = ZSTD_FORMAT  # what new stores are written in
FORMAT_FIELD = "format_version"
MAP_COLUMNS = ("mask", "confidence")
# Provenance fields that record who wrote a part rather than what its labels mean: parts of one store may differ
# in them (a run resumed after an upgrade of this package). A store's format is decided by the store itself.
WRITER_FIELDS = ("code_version", FORMAT_FIELD)
IGNORE_8BIT, IGNORE_16BIT = 255, 65535
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# zstd level 1: level 3 stores 4% fewer bytes of the upper-bound 640x480 maps, none fewer of DenseCLIP's own
# predictions, and encodes those 30-45% slower (benchmarks/mask_encoding.py).
_ZSTD = pa.Codec("zstd", compression_level=1)


@functools.cache
def code_version() -> str:
    """This package's version, plus the git commit of its checkout when it runs from one
    (``0.1.0+g1a2b3c4d5e6f``, ``.dirty`` with uncommitted changes to tracked files)."""
    version = __version__  # the package's own: a checkout run without installing it has no metadata
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "-C", here, "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):  # no git, or not a checkout (an installed package)
        return version
    return f"{version}+g{commit}{'.dirty' if dirty else ''}" if commit else version


def provenance_differences(existing: dict, expected: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    """Fields in which two provenances differ, leaving out :data:`WRITER_FIELDS` and ``ignore``."""
    skip = set(WRITER_FIELDS) | set(ignore)
    return sorted(k for k in (existing.keys() | expected.keys()) - skip if existing.get(k) != expected.get(k))


def ignore_label(mask: np.ndarray) -> int:
    """The "no label" value of a label map: 255 in 8-bit maps, 65535 in 16-bit maps."""
    return IGNORE_8BIT if mask.dtype == np.uint8 else IGNORE_16BIT


def mask_format(provenance: dict | None) -> int:
    """The cell format of a part or store with this provenance: its ``format_version``, 1 for parts written
    before formats were recorded, :data:`FORMAT_VERSION` for a store without parts (``None``)."""
    if provenance is None:
        return FORMAT_VERSION
    version = provenance.get(FORMAT_FIELD, PNG_FORMAT)
    if version not in (PNG_FORMAT, ZSTD_FORMAT):
        raise ValueError(f"mask-store format {version!r} is not one this version of denseclip reads "
                         f"({PNG_FORMAT}, {ZSTD_FORMAT}): upgrade denseclip")
    return version


def label_png(mask: np.ndarray) -> bytes:
    """Integer (H, W) label map -> single-channel PNG bytes: 8-bit for uint8 maps, 16-bit for any wider integer
    type (format 1's mask cells; the export's 16-bit maps)."""
    if mask.dtype == np.uint8:
        return encode_png(mask)
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint16)).save(out, format="PNG")
    return out.getvalue()


def _shape(shape: tuple[int, int] | None, format_version: int) -> tuple[int, int]:
    if shape is None:
        raise ValueError(f"format {format_version} cells need the map's (height, width) (the row's columns)")
    return int(shape[0]), int(shape[1])


def encode_mask(mask: np.ndarray, format_version: int = FORMAT_VERSION) -> bytes:
    """Integer (H, W) label map -> its ``mask`` cell: uint8 maps as uint8, any wider integer type (the labeler
    returns int32 maps for vocabularies of more than 255 classes) as uint16; values must fit 16 bits. Format 2:
    a zstd frame of the values, row-major (uint16 little-endian); format 1: a single-channel PNG."""
    mask = np.asarray(mask)
    if mask.dtype != np.uint8 and mask.size and (mask.min() < 0 or mask.max() > IGNORE_16BIT):
        raise ValueError(f"label map values must lie in 0..{IGNORE_16BIT}, got {mask.min()}..{mask.max()}")
    if format_version == PNG_FORMAT:
        return label_png(mask)
    return _ZSTD.compress(np.ascontiguousarray(mask, dtype=np.uint8 if mask.dtype == np.uint8 else "<u2"),
                          asbytes=True)


def _zstd_content_size(frame: bytes) -> int:
    """The decompressed size a zstd frame records in its header (RFC 8878, 3.1.1.1), -1 where it records none."""
    if frame[:4] != _ZSTD_MAGIC or len(frame) < 6:
        raise ValueError(f"a cell of {len(frame)} bytes is no zstd frame")
    descriptor = frame[4]
    single_segment = descriptor >> 5 & 1
    size_bytes = (single_segment, 2, 4, 8)[descriptor >> 6]
    start = 5 + (1 - single_segment) + (0, 1, 2, 4)[descriptor & 3]  # after the window and dictionary fields
    if not size_bytes:
        return -1
    return int.from_bytes(frame[start:start + size_bytes], "little") + (256 if size_bytes == 2 else 0)


def _unpacked(data: bytes, sizes: tuple[int, ...], what: str, shape: tuple[int, int]) -> pa.Buffer:
    """The bytes of the zstd frame ``data``, whose decompressed size must be one of ``sizes``."""
    size = _zstd_content_size(data)
    if size not in sizes:
        raise ValueError(f"a {what} cell of {size} bytes (decompressed) holds no {shape} map")
    return _ZSTD.decompress(data, decompressed_size=size)


def decode_mask(data: bytes, shape: tuple[int, int] | None = None, format_version: int = FORMAT_VERSION) -> np.ndarray:
    """A ``mask`` cell -> uint8 (H, W) label map, or uint16 (H, W) for a 16-bit map. ``shape``: the row's
    (height, width), needed by format 2 (whose cells hold only the values)."""
    if format_version == PNG_FORMAT:
        return decode_label_map(data, "mask", wide=True)
    height, width = _shape(shape, format_version)
    values = _unpacked(data, (height * width, 2 * height * width), "mask", (height, width))
    wide = values.size == 2 * height * width and values.size > 0
    # A copy in native byte order, writable like any array.
    return np.frombuffer(values, "<u2" if wide else np.uint8).reshape(height, width).astype(
        np.uint16 if wide else np.uint8)


def quantise_confidence(confidence: np.ndarray) -> np.ndarray:
    """float (H, W) in [0, 1] -> uint8 (H, W), x 255 and rounded (step 1/255); uint8 is taken as already
    quantised (as ``DenseCLIP.label_maps`` gives it)."""
    if confidence.dtype == np.uint8:
        return confidence
    return np.round(np.clip(confidence, 0.0, 1.0) * 255).astype(np.uint8)


def encode_confidence(confidence: np.ndarray, format_version: int = FORMAT_VERSION) -> bytes:
    """float (H, W) in [0, 1] or uint8 (H, W) (see :func:`quantise_confidence`) -> its ``confidence`` cell.
    Format 2: a zstd frame of the 2-D difference of the quantised map (uint8, modulo 256: smooth maps become runs
    of small values, which zstd packs as tightly as PNG's filters); format 1: a PNG of the quantised map."""
    quantised = quantise_confidence(np.asarray(confidence))
    if format_version == PNG_FORMAT:
        return encode_png(quantised)
    vertical = quantised.copy()
    vertical[1:] -= quantised[:-1]
    difference = vertical.copy()
    difference[:, 1:] -= vertical[:, :-1]
    return _ZSTD.compress(difference, asbytes=True)


def decode_confidence(data: bytes, shape: tuple[int, int] | None = None,
                      format_version: int = FORMAT_VERSION) -> np.ndarray:
    """A ``confidence`` cell -> float32 (H, W) in [0, 1] (multiples of 1/255). ``shape``: as for
    :func:`decode_mask`."""
    if format_version == PNG_FORMAT:
        return decode_label_map(data, "confidence").astype(np.float32) / 255
    height, width = _shape(shape, format_version)
    difference = np.frombuffer(_unpacked(data, (height * width,), "confidence", (height, width)),
                               np.uint8).reshape(height, width)
    quantised = np.cumsum(np.cumsum(difference, axis=0, dtype=np.uint8), axis=1, dtype=np.uint8)
    return quantised.astype(np.float32) / 255


def _row(row: dict, format_version: int) -> dict:
    mask = np.asarray(row["mask"])
    if mask.ndim != 2 or mask.size == 0 or not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f"mask of {row['key']!r} must be a non-empty integer (H, W) label map, "
                         f"got shape {mask.shape} {mask.dtype}")
    confidence = row.get("confidence")
    if confidence is not None and np.shape(confidence) != mask.shape:
        raise ValueError(f"confidence of {row['key']!r} has shape {np.shape(confidence)}, mask {mask.shape}")
    try:
        encoded = encode_mask(mask, format_version)
    except ValueError as exc:
        raise ValueError(f"mask of {row['key']!r}: {exc}") from exc
    return {"key": row["key"], "shard": row.get("shard", ""), "height": mask.shape[0], "width": mask.shape[1],
            "mask": encoded,
            "confidence": None if confidence is None else encode_confidence(np.asarray(confidence), format_version)}


def rows_to_table(rows: list[dict], format_version: int = FORMAT_VERSION) -> pa.Table:
    """``[{"key", "shard", "mask": integer (H, W), "confidence": float (H, W) in [0, 1] | None}]`` -> a table
    in :data:`MASK_SCHEMA` with cells of ``format_version`` (also usable to encode in a parallel stage and write
    elsewhere)."""
    return pa.Table.from_pylist([_row(r, format_version) for r in rows], schema=MASK_SCHEMA)


def _check_cells(table: pa.Table, format_version: int, what: str) -> None:
    """Raise ValueError unless every ``mask`` and ``confidence`` cell of ``table`` (a masks table) is a cell of
    ``format_version`` (a missing confidence is one)."""
    signature = _PNG_SIGNATURE if format_version == PNG_FORMAT else _ZSTD_MAGIC
    for column in MAP_COLUMNS:
        fit = pc.equal(pc.binary_slice(table[column], 0, len(signature)), pa.scalar(signature))
        if pc.any(pc.invert(pc.fill_null(fit, column == "confidence"))).as_py():
            raise ValueError(f"{what}: {column} cells are not cells of format {format_version}, the store's (encode "
                             f"them with rows_to_table(rows, {format_version}))")


def _parquet_bytes(table: pa.Table, row_group_size: int = ROW_GROUP_SIZE) -> bytes:
    """``table`` as Parquet, its small columns zstd-compressed. The map cells are compressed already, and unique:
    they get neither compression, nor a dictionary, nor min/max statistics (each would cost time for nothing)."""
    buf = io.BytesIO()
    small = [c for c in table.column_names if c not in MAP_COLUMNS]
    pq.write_table(table, buf, row_group_size=row_group_size, use_dictionary=small, write_statistics=small,
                   compression={c: "zstd" if c in small else "none" for c in table.column_names})
    return buf.getvalue()


def part_url(root: str, folder: str, part_id: str) -> str:
    """The file of part ``part_id`` in ``folder`` of the store at ``root``: ``masks/part-<id>.parquet``,
    ``errors/part-<id>.parquet`` or ``manifests/part-<id>.json``."""
    return storage.join(root, folder, f"part-{part_id}{'.json' if folder == MANIFESTS_DIR else '.parquet'}")


def part_record(metadata: dict | None) -> dict | None:
    """The part record in a part's schema ``metadata`` (see :meth:`MaskStoreWriter.write_part`), or None."""
    data = (metadata or {}).get(PART_RECORD_KEY)
    return json.loads(data) if data else None


def part_format(metadata: dict | None) -> int:
    """The cell format of a part from its schema ``metadata`` (see :func:`mask_format`)."""
    data = (metadata or {}).get(PROVENANCE_KEY)
    return mask_format(json.loads(data) if data else {})

"""The mask store: dense labels as a Parquet dataset, one row per image, on a local path or an object store.

Layout under ``ROOT``: ``masks/part-<id>.parquet`` (key, shard, height, width, mask, confidence),
``errors/part-<id>.parquet`` (key, shard, reason), ``manifests/part-<id>.json`` (byte size, SHA-256 and row count
of both) and ``index/keys.parquet`` (the key index). A part is committed when its masks file exists: it is
published in one atomic step (rename, or a single object upload) after its errors file and its manifest, so
readers never see half a part. Each part carries in its schema metadata the run provenance (model, pretrained,
fingerprint, vocabulary, templates, code version) and its part record (the input shard, the shard's content
fingerprint when it was labelled, row and error counts, the Ray nodes that labelled it).

A part that disagrees with its manifest or record, or does not parse, is damaged (:class:`PartDamage`):
:func:`verify_store` finds every one (``denseclip verify``), readers name it or skip it, and a labelling run
relabels its shard. docs/mask-store.md describes the checks.

Cells (format 2, ``format_version`` 2 in the provenance) are zstd frames: ``mask`` of the label map's values in
row-major order, one byte a pixel (uint8: vocabularies of up to 255 classes, 255 = ignore) or two (little-endian
uint16: larger vocabularies, 65535 = ignore); ``confidence`` of the winning probability quantised to uint8 (x 255,
rounded) as its 2-D difference (``c[i, j] - c[i-1, j] - c[i, j-1] + c[i-1, j-1]`` modulo 256, zero outside the
map; two cumulative sums restore it). Format 1 (parts without ``format_version``) stored single-channel PNGs
(8-bit, 16-bit beyond 255 classes); it stays readable, and a store keeps the format it was started in. The
measurements behind the choice are in docs/capacity.md (``python benchmarks/bench_host.py``).

The key index maps every key to its part and row, sorted by key in small row groups whose min/max statistics lead
a lookup to one group: ``get(key)`` reads one index row group and one row group of one part, however large the
store. The index is rebuilt by :func:`write_key_index` at the end of each labeling run; parts committed or
replaced after it (a run that was killed) are found by listing ``masks/`` and read directly, so lookups are
always exact. The index also keeps each part's record and manifest, so that checking the parts it covers takes
only the listings of ``masks/`` and ``errors/``.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import hashlib
import io
import json
import logging
import os
import re
import subprocess
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from denseclip import __version__, storage
from denseclip.damage import DamagedPartError
from denseclip.images import decode_label_map, encode_png

log = logging.getLogger(__name__)

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
_PART_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_PART_FILE = re.compile(r"^part-(.+)\.parquet$")
_OPEN_PARTS = 16  # parts a store keeps open for lookups (each holds its parsed footer)
_CACHED_GROUPS = 8  # row groups (of parts and of the index) a store keeps decoded for lookups


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


class MaskStoreWriter:
    """Commits parts of the store at ``root`` (a path or fsspec URL), each tagged with ``provenance``.

    ``provenance``: a JSON-serialisable dict, by convention with ``model``, ``pretrained``, ``fingerprint``,
    ``vocabulary``, ``templates``; ``code_version`` is added (:func:`code_version`) unless given. A store holds
    one run: writing parts with a provenance that differs from the parts already committed (in anything but
    :data:`WRITER_FIELDS`) raises ValueError.

    ``format_version``: the cell format parts are written in, that of the parts already committed (a store keeps
    its format: a re-run into a format-1 store writes format-1 parts), or for a new store ``provenance``'s
    ``format_version`` (default :data:`FORMAT_VERSION`); a ``format_version`` in ``provenance`` that differs from
    the store's raises ValueError.
    """

    def __init__(self, root: str, provenance: dict, **storage_options):
        provenance = {**provenance}
        provenance.setdefault("code_version", code_version())
        existing = MaskStore(root, skip_damaged=True, **storage_options).provenance
        self.format_version = _writer_format(root, existing, provenance.pop(FORMAT_FIELD, None))
        if self.format_version != PNG_FORMAT:  # format-1 parts carry no format field, as they always did
            provenance[FORMAT_FIELD] = self.format_version
        try:
            self._provenance_json = json.dumps(provenance, sort_keys=True)
        except TypeError as exc:
            raise ValueError(f"provenance must be JSON-serialisable: {exc}") from exc
        self.root = root
        self.provenance = json.loads(self._provenance_json)
        self.storage_options = storage_options
        changed = provenance_differences(existing, self.provenance) if existing is not None else []
        if changed:
            raise ValueError(f"mask store {root} holds another run (provenance differs in {', '.join(changed)}); "
                             f"write to a new root")

    def write_part(self, part_id: str, rows: list[dict] | pa.Table, errors: list[dict] = (),
                   record: dict | None = None) -> str:
        """Commit part ``part_id`` (letters, digits, ``_ . -``): its rows and ``errors``
        (``[{"key", "shard", "reason"}]``) replace any earlier part of that id. Returns the masks part URL.

        ``rows``: dicts as for :func:`rows_to_table`, or a table already in :data:`MASK_SCHEMA`. ``record``: what
        the part was made from (JSON-serialisable, e.g. ``{"shard": url, "fingerprint": {...}}``), stored with
        the part's ``rows`` and ``errors`` counts and read back by :meth:`MaskStore.part_records`.
        """
        if not _PART_ID.match(part_id):
            raise ValueError(f"part id {part_id!r} may hold only letters, digits and _ . - (not first)")
        table = rows if isinstance(rows, pa.Table) else rows_to_table(rows, self.format_version)
        try:
            table = table.select(MASK_SCHEMA.names).cast(MASK_SCHEMA)
        except (KeyError, ValueError, pa.ArrowInvalid) as exc:
            raise ValueError(f"part {part_id}: rows do not fit the mask schema {MASK_SCHEMA.names}: {exc}") from exc
        _check_cells(table, self.format_version, f"part {part_id}")
        keys = table.column("key").to_pylist()
        if len(set(keys)) != len(keys):
            raise ValueError(f"part {part_id}: duplicate keys")
        errors = list(errors)
        part = json.dumps({**(record or {}), "rows": table.num_rows, "errors": len(errors), "manifest": True},
                          sort_keys=True)
        table = table.sort_by("key").replace_schema_metadata(
            {PROVENANCE_KEY: self._provenance_json.encode(), PART_RECORD_KEY: part.encode()})
        error_table = pa.Table.from_pylist(
            [{"key": e["key"], "shard": e.get("shard", ""), "reason": e["reason"]} for e in errors],
            schema=ERROR_SCHEMA)
        files = {ERRORS_DIR: _parquet_bytes(error_table), MASKS_DIR: _parquet_bytes(table)}
        manifest = {"part": part_id, "shard": (record or {}).get("shard"),
                    MASKS_DIR: _file_manifest(files[MASKS_DIR], table.num_rows),
                    ERRORS_DIR: _file_manifest(files[ERRORS_DIR], len(errors))}
        # The manifest before the masks: a commit cut short between them leaves a part that disagrees with its
        # manifest, which the next run relabels, never a part that looks whole but is not.
        for folder in (ERRORS_DIR, MANIFESTS_DIR, MASKS_DIR):  # the masks file last: the commit point
            data = json.dumps(manifest, sort_keys=True).encode() if folder == MANIFESTS_DIR else files[folder]
            storage.write_bytes(part_url(self.root, folder, part_id), data, **self.storage_options)
        return part_url(self.root, MASKS_DIR, part_id)


def part_url(root: str, folder: str, part_id: str) -> str:
    """The file of part ``part_id`` in ``folder`` of the store at ``root``: ``masks/part-<id>.parquet``,
    ``errors/part-<id>.parquet`` or ``manifests/part-<id>.json``."""
    return storage.join(root, folder, f"part-{part_id}{'.json' if folder == MANIFESTS_DIR else '.parquet'}")


def _file_manifest(data: bytes, rows: int) -> dict:
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "rows": rows}


def _writer_format(root: str, existing: dict | None, asked: int | None) -> int:
    """The format of the parts a writer adds to the store at ``root`` whose committed parts carry the provenance
    ``existing`` (None: no part yet), ``asked`` for by its provenance (None: no preference); see
    :class:`MaskStoreWriter`."""
    version = mask_format(existing if existing is not None or asked is None else {FORMAT_FIELD: asked})
    if asked is not None and asked != version:
        raise ValueError(f"mask store {root} holds format-{version} parts, not format {asked}: a store keeps "
                         f"its format; write to a new root (or replace the store)")
    return version


def _file_id(info: dict) -> str:
    """What identifies one version of a committed file in a listing: the object's ETag, or on local disk its
    size, inode and modification time (a part is always replaced by renaming a new file over it)."""
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return str(etag).strip('"')
    return f"{info.get('size')}-{info.get('ino', '')}-{info.get('mtime', info.get('LastModified', ''))}"


@dataclass(frozen=True)
class PartDamage:
    """A committed part found damaged: its ``part`` id, the ``url`` of the file at fault, the input ``shard`` it
    holds (None when nothing readable names it) and the ``reason``."""

    part: str
    url: str
    shard: str | None
    reason: str

    def __str__(self) -> str:
        return f"{self.url} (shard {self.shard or 'unknown'}): {self.reason}"


class _StorageFailure(Exception):
    """The storage failed under a Parquet read; its exception is the cause. pyarrow passes on what a Python file
    raises unchanged, so this tells the storage's failures from what pyarrow raises about the bytes."""


class _StorageFile:
    """A file of the store as pyarrow reads it: the storage's failures come out as :class:`_StorageFailure`."""

    def __init__(self, file):
        self._file = file

    def __getattr__(self, name):
        return getattr(self._file, name)

    def read(self, *args):
        try:
            return self._file.read(*args)
        except Exception as exc:
            raise _StorageFailure() from exc

    def seek(self, *args):
        try:
            return self._file.seek(*args)
        except Exception as exc:
            raise _StorageFailure() from exc


@contextlib.contextmanager
def _reading(url: str) -> Iterator[None]:
    """Within the block, what pyarrow raises about the bytes of the Parquet file ``url`` (opened through a
    :class:`_StorageFile`) becomes a DamagedPartError naming it; the storage's own failures pass unchanged."""
    try:
        yield
    except _StorageFailure as exc:
        raise exc.__cause__ from None
    except DamagedPartError:
        raise
    except (pa.ArrowException, OSError, ValueError) as exc:  # ValueError: also a part record that is not JSON
        raise DamagedPartError(url, f"unreadable: {type(exc).__name__}: {exc}") from exc


class _LRU(OrderedDict):
    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def put(self, key, value):
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)
        return value

    def hit(self, key):
        if key in self:
            self.move_to_end(key)
            return self[key]
        return None


@dataclass
class _PartState:
    """What one committed part holds, as far as it was read: its ``record`` and ``manifest``, the ``rows`` of its
    masks footer and its ``keys``."""

    record: dict | None = None
    manifest: dict | None = None
    rows: int | None = None
    keys: pa.ChunkedArray | None = None


class _KeyIndex:
    """Where each committed key lives: ``index/keys.parquet`` for the parts it covers that are still committed
    and unchanged, plus an in-memory map of the parts committed or replaced since it was written.

    Building it checks every committed part (:meth:`MaskStore._check_part`): the parts the index covers by the
    sizes of their files against their manifests (which the index holds), the others by their footers too, and
    by their SHA-256 digests where ``digests`` is "changed" ("all": every part's). ``full`` reads every part's
    footers, its errors part's too. Damaged parts (``damaged``) are raised or skipped by the store, and left out.
    """

    def __init__(self, store: MaskStore, digests: str = "none", full: bool = False):
        self.store = store
        self.listing = store._listing()
        errors = store._listing(ERRORS_DIR)
        self.file, self.indexed = store._read_index() if self.listing else (None, {})
        covered = {p for p, entry in self.indexed.items()
                   if "manifest" in entry and self.listing.get(p, {}).get("file") == entry["file"]}
        self.records: dict[str, dict | None] = {}
        self.manifests: dict[str, dict | None] = {}
        self.rows: dict[str, int | None] = {}
        self.damaged: dict[str, PartDamage] = {}
        recent = []  # index rows of the parts committed or replaced after the index was written
        for part in sorted(self.listing):
            known = self.indexed[part] if part in covered else None
            digest = digests == "all" or (digests == "changed" and known is None)
            state, damage = store._check_part(part, self.listing[part], errors.get(part), known, full, digest)
            if damage is not None:
                self.damaged[part] = damage
                store._met(damage)
                continue
            self.records[part], self.manifests[part], self.rows[part] = state.record, state.manifest, state.rows
            if known is None:
                recent.append(pa.table([state.keys, pa.array([part] * len(state.keys), pa.string()),
                                        pa.array(range(len(state.keys)), pa.int32())], schema=INDEX_SCHEMA))
        self.covered = covered - set(self.damaged)
        self.recent = pa.concat_tables(recent) if recent else INDEX_SCHEMA.empty_table()
        self._recent_map: dict[str, list[tuple[str, int]]] | None = None
        self.stale = self.recent.num_rows > 0 or set(self.indexed) != set(self.listing) - set(self.damaged)
        # (min key, max key, row group) of the index's row groups, in key order.
        self._ranges: list[tuple[str, str, int]] = []
        if self.file is not None and self.covered:
            for g in range(self.file.num_row_groups):
                stats = self.file.metadata.row_group(g).column(0).statistics
                if stats is not None and stats.has_min_max:
                    self._ranges.append((stats.min, stats.max, g))
        self._maxs = [r[1] for r in self._ranges]
        self._groups = _LRU(_CACHED_GROUPS)

    @property
    def url(self) -> str:
        return storage.join(self.store.root, INDEX_DIR, INDEX_FILE)

    def _group(self, g: int) -> pa.Table:
        table = self._groups.hit(g)
        if table is None:
            with _reading(self.url):
                table = self._groups.put(g, self.file.read_row_group(g))
        return table

    def locate(self, key: str) -> tuple[str, int] | None:
        """(part, row) of ``key``; a key in several parts (two shards holding it) is taken from the last part
        in sorted order."""
        if self._recent_map is None:
            self._recent_map = {}
            for k, part, row in zip(*(self.recent.column(n).to_pylist() for n in INDEX_SCHEMA.names)):
                self._recent_map.setdefault(k, []).append((part, row))
        found = list(self._recent_map.get(key, ()))
        i = bisect.bisect_left(self._maxs, key)  # the first group that may hold the key; duplicates may go on
        while i < len(self._ranges) and self._ranges[i][0] <= key:
            table = self._group(self._ranges[i][2])
            rows = pc.indices_nonzero(pc.equal(table.column("key"), key))
            found += [(p, r) for p, r in zip(table.column("part").take(rows).to_pylist(),
                                             table.column("row").take(rows).to_pylist()) if p in self.covered]
            i += 1
        return max(found) if found else None

    def indexed_rows(self) -> Iterator[pa.RecordBatch]:
        """The index's rows of the parts it still covers."""
        if self.file is None or not self.covered:
            return
        covered = pa.array(sorted(self.covered))
        with _reading(self.url):
            for batch in self.file.iter_batches(batch_size=INDEX_ROW_GROUP_SIZE):
                yield batch.filter(pc.is_in(batch.column("part"), value_set=covered))

    def keys(self) -> set[str]:
        keys = set(self.recent.column("key").to_pylist())
        for batch in self.indexed_rows():
            keys.update(batch.column("key").to_pylist())
        return keys

    def problems(self) -> list[str]:
        """How the index disagrees with the undamaged committed parts, one line each: parts it lacks or lists in
        vain, manifests and key counts that differ from the parts' (counts where their footers were read:
        ``full``). A part whose file was only copied (a new file identity, the same bytes) agrees."""
        good = set(self.listing) - set(self.damaged)
        if self.file is None:
            return [f"missing or unreadable: {len(good)} committed parts are not indexed"] if good else []
        problems = []
        for parts, what in ((good - set(self.indexed), "committed parts are not in it"),
                            (set(self.indexed) - set(self.listing), "parts in it are no longer committed")):
            if parts:
                names = sorted(parts)
                problems.append(f"{len(names)} {what} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})")
        try:
            with _reading(self.url):
                counts = Counter(self.file.read(columns=["part"], use_threads=False).column("part").to_pylist())
        except DamagedPartError as exc:
            return [*problems, exc.reason]
        for part in sorted(good & set(self.indexed)):
            if self.indexed[part].get("manifest", self.manifests[part]) != self.manifests[part]:
                problems.append(f"its manifest of part {part} differs from the part's")
            elif self.rows.get(part) is not None and counts[part] != self.rows[part]:
                problems.append(f"holds {counts[part]} keys of part {part}, which has {self.rows[part]} rows")
        return problems


def part_record(metadata: dict | None) -> dict | None:
    """The part record in a part's schema ``metadata`` (see :meth:`MaskStoreWriter.write_part`), or None."""
    data = (metadata or {}).get(PART_RECORD_KEY)
    return json.loads(data) if data else None


def part_format(metadata: dict | None) -> int:
    """The cell format of a part from its schema ``metadata`` (see :func:`mask_format`)."""
    data = (metadata or {}).get(PROVENANCE_KEY)
    return mask_format(json.loads(data) if data else {})


class MaskStore:
    """Reads the committed parts of the store at ``root`` (a path or fsspec URL).

    Lookups (:meth:`get`, :meth:`get_confidence`) go through the key index, loaded on first use and kept, with a
    few open parts and decoded row groups, for the life of the object; create a new one to see later commits.

    A damaged part (one that does not parse, or whose sizes or row counts disagree with its manifest and record,
    or whose errors part is missing: see :mod:`denseclip.damage`) raises DamagedPartError naming the file when a
    read meets it; with ``skip_damaged`` it is left out instead and listed in ``skipped`` (part id ->
    :class:`PartDamage`).
    """

    def __init__(self, root: str, skip_damaged: bool = False, **storage_options):
        self.root = root
        self.skip_damaged = skip_damaged
        self.skipped: dict[str, PartDamage] = {}
        self.storage_options = storage_options
        self._index: _KeyIndex | None = None
        self._parts = _LRU(_OPEN_PARTS)
        self._cells = _LRU(_CACHED_GROUPS)

    def _url(self, folder: str, part_id: str) -> str:
        return part_url(self.root, folder, part_id)

    def _open(self, url: str) -> pq.ParquetFile:
        """The Parquet file at ``url``, its footer read; what reads it later goes in a ``_reading(url)`` block."""
        fs, path = fsspec.core.url_to_fs(url, **self.storage_options)
        # Lookups read a few hundred kB at a time: no read-ahead of whole object-store blocks.
        file = fs.open(path, "rb", **({} if storage.is_local(url) else {"cache_type": "none"}))
        with _reading(url):
            return pq.ParquetFile(_StorageFile(file))

    def _read(self, folder: str, part_id: str, **kwargs) -> pa.Table:
        url = self._url(folder, part_id)
        parquet = self._open(url)
        with _reading(url):
            return parquet.read(**kwargs)

    def _listing(self, folder: str = MASKS_DIR) -> dict[str, dict]:
        """Part id -> ``{"file": the identity of its current file (see :func:`_file_id`), "size": bytes}`` of the
        parts in ``folder`` (``masks/``: the committed parts)."""
        fs, path = fsspec.core.url_to_fs(storage.join(self.root, folder), **self.storage_options)
        fs.invalidate_cache(path)
        try:
            entries = fs.ls(path, detail=True)
        except FileNotFoundError:
            return {}
        parts = {}
        for entry in entries:
            match = _PART_FILE.match(os.path.basename(entry["name"].rstrip("/")))
            if match and entry["type"] == "file":
                parts[match.group(1)] = {"file": _file_id(entry), "size": entry["size"]}
        return parts

    def _read_index(self) -> tuple[pq.ParquetFile | None, dict[str, dict]]:
        """The key index file and its parts (part id -> ``{"file", "record", "manifest"}``); none when it is
        missing or damaged (it is rebuilt from the parts)."""
        url = storage.join(self.root, INDEX_DIR, INDEX_FILE)
        try:
            file = self._open(url)
            with _reading(url):
                parts = json.loads((file.schema_arrow.metadata or {}).get(INDEX_PARTS_KEY, b"{}"))
            if not (isinstance(parts, dict) and all(isinstance(e, dict) and "file" in e for e in parts.values())):
                raise DamagedPartError(url, "its parts are not a mapping of part records")
        except FileNotFoundError:
            return None, {}
        except DamagedPartError as exc:
            log.warning("the key index %s is damaged, so it is ignored (a labelling run rebuilds it): %s", url,
                        exc.reason)
            return None, {}
        return file, parts

    def _read_manifest(self, part_id: str) -> dict | None:
        """The manifest of a part, None when it has none; DamagedPartError when it is not one."""
        url = self._url(MANIFESTS_DIR, part_id)
        try:
            manifest = json.loads(storage.read_bytes(url, **self.storage_options))
            if all(isinstance(manifest[f][n], int) for f in (MASKS_DIR, ERRORS_DIR) for n in ("size", "rows")):
                return manifest
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            pass
        raise DamagedPartError(url, "not a part manifest")

    def _check_part(self, part: str, masks: dict, errors: dict | None, known: dict | None, full: bool = False,
                    digest: bool = False) -> tuple[_PartState, PartDamage | None]:
        """What part ``part`` holds and whether it is damaged (``masks``, ``errors``: the listing entries of its
        files). ``known``: its entry in the key index, which vouches for its footer when its file is unchanged;
        else its footer is read (``full``: always, the errors part's too) and its keys. ``digest``: compare the
        SHA-256 of its files with its manifest. A storage failure raises (transient, see denseclip.damage)."""
        state = _PartState(known["record"], known["manifest"]) if known else _PartState()
        try:
            state.manifest = state.manifest if known else self._read_manifest(part)
            problem = self._size_problem(state.manifest, masks, errors)
            footers = (MASKS_DIR, ERRORS_DIR) if full else () if known else (MASKS_DIR,)
            for folder in footers:
                problem = problem or self._footer_problem(part, folder, state)
            for folder in (MASKS_DIR, ERRORS_DIR) if digest and state.manifest and not problem else ():
                if storage.sha256(self._url(folder, part), **self.storage_options) != state.manifest[folder]["sha256"]:
                    problem = folder, "its SHA-256 differs from its manifest's"
                    break
        except DamagedPartError as exc:  # an unreadable manifest
            problem = MANIFESTS_DIR, exc.reason
        if problem is None:
            return state, None
        shard = (state.manifest or {}).get("shard") or (state.record or {}).get("shard")
        return state, PartDamage(part, self._url(problem[0], part), shard, problem[1])

    @staticmethod
    def _size_problem(manifest: dict | None, masks: dict, errors: dict | None) -> tuple[str, str] | None:
        """(folder, reason) where a part's files are missing or disagree with the sizes in its ``manifest``."""
        if errors is None:
            return ERRORS_DIR, "missing beside its masks part"
        for folder, entry in ((MASKS_DIR, masks), (ERRORS_DIR, errors)):
            if manifest and entry["size"] != manifest[folder]["size"]:
                return folder, f"{entry['size']} bytes, its manifest records {manifest[folder]['size']}"
        return None

    def _footer_problem(self, part: str, folder: str, state: _PartState) -> tuple[str, str] | None:
        """Read the footer of ``part``'s file in ``folder`` (the masks part's: also its record and keys into
        ``state``); (folder, reason) where it is unreadable or its row count disagrees with the part's record or
        manifest."""
        url = self._url(folder, part)
        try:
            parquet = self._open(url)
            with _reading(url):
                rows = parquet.metadata.num_rows
                if folder == MASKS_DIR:
                    state.record, state.rows = part_record(parquet.schema_arrow.metadata), rows
                    # One small column, without a thread pool: its threads can abort a short command's exit
                    # (apache/arrow#34314).
                    state.keys = parquet.read(["key"], use_threads=False).column("key")
        except DamagedPartError as exc:
            return folder, exc.reason
        if folder == MASKS_DIR and (state.record or {}).get("manifest") and state.manifest is None:
            return MANIFESTS_DIR, "missing (its part record says it has one)"
        counts = ((state.record or {}).get("rows" if folder == MASKS_DIR else "errors"),
                  (state.manifest or {}).get(folder, {}).get("rows"))
        for what, count in zip(("its part record", "its manifest"), counts):
            if count is not None and count != rows:
                return folder, f"{rows} rows, {what} says {count}"
        return None

    def _met(self, damage: PartDamage) -> None:
        """A read met a damaged part: raise DamagedPartError naming it, or with ``skip_damaged`` list it."""
        if not self.skip_damaged:
            raise DamagedPartError(damage.url, f"damaged part of shard {damage.shard or 'unknown'}: {damage.reason}")
        if damage.part not in self.skipped:
            log.warning("skipping a damaged part: %s", damage)
        self.skipped[damage.part] = damage

    @contextlib.contextmanager
    def _damage_of(self, part: str) -> Iterator[None]:
        """Within the block, damage met in ``part`` raises naming the part's shard, or is skipped with the rest of
        the block (``skip_damaged``)."""
        try:
            yield
        except DamagedPartError as exc:
            shard = ((self._index.records.get(part) if self._index else None) or {}).get("shard")
            self._met(PartDamage(part, exc.url, shard, exc.reason))

    def committed_parts(self) -> set[str]:
        return set(self._listing())

    def _key_index(self) -> _KeyIndex:
        if self._index is None:
            self._index = _KeyIndex(self)
        return self._index

    def readable_parts(self) -> list[str]:
        """The committed parts found undamaged, sorted (re-reads the store)."""
        self._index = None
        index = self._key_index()
        return sorted(set(index.listing) - set(index.damaged))

    def part_records(self, digests: str = "none") -> dict[str, dict | None]:
        """Committed part id -> its part record (see :meth:`MaskStoreWriter.write_part`; None for parts written
        without one), from the key index and the footers of the parts committed after it (re-reads the store).
        ``digests``: also compare the SHA-256 of the parts committed or replaced since the index was written
        ("changed"), or of every part ("all"), with their manifests."""
        self._index = _KeyIndex(self, digests)
        return dict(self._index.records)

    def keys(self) -> set[str]:
        """Keys of all committed masks (re-reads the store)."""
        self._index = None
        return self._key_index().keys()

    def locate(self, key: str) -> tuple[str, int]:
        """(part id, row) of ``key`` in the committed parts; KeyError naming it when absent."""
        found = self._key_index().locate(key)
        if found is None:
            skipped = f" (damaged parts skipped: {', '.join(sorted(self.skipped))})" if self.skipped else ""
            raise KeyError(f"no mask for key {key!r} in {self.root}{skipped}")
        return found

    def _cell(self, key: str, column: str) -> tuple[bytes | None, tuple[int, int], int]:
        """The ``column`` cell of ``key``, its map's (height, width) and its part's format."""
        part, row = self.locate(key)
        url = self._url(MASKS_DIR, part)
        with self._damage_of(part):
            opened = self._parts.hit(part)
            if opened is None:
                parquet = self._open(url)
                sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
                opened = self._parts.put(part, (parquet, np.cumsum([0] + sizes).tolist(),
                                                part_format(parquet.schema_arrow.metadata)))
            parquet, starts, version = opened
            group = bisect.bisect_right(starts, row) - 1
            cells = self._cells.hit((part, group, column))
            if cells is None:
                with _reading(url):
                    cells = self._cells.put((part, group, column),
                                            parquet.read_row_group(group, columns=[column, "height", "width"]))
            data, height, width = (cells.column(c)[row - starts[group]].as_py() for c in range(3))
            return data, (height, width), version
        raise KeyError(f"no mask for key {key!r}: its part {url} is damaged (skipped)")

    def get(self, key: str) -> np.ndarray:
        """The label map of ``key``: uint8 (H, W), or uint16 (H, W) for vocabularies of more than 255 classes;
        KeyError naming the key when absent."""
        return decode_mask(*self._cell(key, "mask"))

    def get_confidence(self, key: str) -> np.ndarray | None:
        """The float32 (H, W) confidence in [0, 1] of ``key`` (quantised to 1/255), or None if not stored."""
        data, shape, version = self._cell(key, "confidence")
        return None if data is None else decode_confidence(data, shape, version)

    def read_part(self, part_id: str) -> pa.Table:
        """One committed part as an encoded table in :data:`MASK_SCHEMA`, rows sorted by key."""
        return self._read(MASKS_DIR, part_id)

    def read_errors(self, part_id: str) -> list[dict]:
        """``[{"key", "shard", "reason"}]`` of one committed part."""
        return self._read(ERRORS_DIR, part_id).to_pylist()

    def _iter_batches(self, columns: list[str], parts: Iterable[str] | None = None
                      ) -> Iterator[tuple[int, pa.RecordBatch]]:
        """``(part format, batch of columns)`` of the committed parts (or of ``parts``), part by part, a row group
        at a time."""
        for part in self.readable_parts() if parts is None else parts:
            url = self._url(MASKS_DIR, part)
            with self._damage_of(part):
                parquet = self._open(url)
                version = part_format(parquet.schema_arrow.metadata)
                with _reading(url):
                    for batch in parquet.iter_batches(batch_size=ROW_GROUP_SIZE, columns=columns):
                        yield version, batch

    def iter_rows(self, columns: list[str]) -> Iterator[dict]:
        """The committed rows, part by part (by key within a part), one row group in memory at a time:
        ``{column: value}`` with the encoded cells of :data:`MASK_SCHEMA`."""
        for _, batch in self._iter_batches(columns):
            yield from batch.to_pylist()

    def iter_masks(self, parts: Iterable[str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
        """``(key, label map (H, W))`` for every committed row (or those of ``parts``), part by part, by key
        within a part."""
        for version, batch in self._iter_batches(["key", "mask", "height", "width"], parts):
            for row in batch.to_pylist():
                yield row["key"], decode_mask(row["mask"], (row["height"], row["width"]), version)

    def errors(self) -> list[dict]:
        """``[{"key", "shard", "reason"}]`` of the committed parts."""
        rows: list[dict] = []
        for part in self.readable_parts():
            with self._damage_of(part):
                rows += self.read_errors(part)
        return rows

    @property
    def provenance(self) -> dict | None:
        """The run provenance stored with the parts (read from the first part that is readable), or None for an
        empty store."""
        for part in sorted(self.committed_parts() - set(self.skipped)):
            url = self._url(MASKS_DIR, part)
            with self._damage_of(part):
                metadata = self._open(url).schema_arrow.metadata or {}
                with _reading(url):
                    return json.loads(metadata[PROVENANCE_KEY]) if PROVENANCE_KEY in metadata else None
        return None


def write_key_index(root: str, **storage_options) -> bool:
    """Bring ``index/keys.parquet`` of the store at ``root`` up to date with its committed parts: the rows of
    the parts it still covers are kept, the keys of new or replaced parts added, those of removed or damaged
    parts dropped; each part's record and manifest are kept with it. A missing or damaged index is rebuilt.
    Published atomically; returns False when it was already current. Run by one writer at a time (the labeling
    run holding the output's lease)."""
    index = _KeyIndex(MaskStore(root, skip_damaged=True, **storage_options))
    if not index.stale:
        return False
    tables = [pa.Table.from_batches(list(index.indexed_rows()), INDEX_SCHEMA)] if index.covered else []
    table = pa.concat_tables([*tables, index.recent]).sort_by([("key", "ascending"), ("part", "ascending")])
    parts = {p: {"file": entry["file"], "record": index.records[p], "manifest": index.manifests[p]}
             for p, entry in index.listing.items() if p not in index.damaged}
    table = table.replace_schema_metadata({INDEX_PARTS_KEY: json.dumps(parts, sort_keys=True).encode()})
    storage.write_bytes(storage.join(root, INDEX_DIR, INDEX_FILE), _parquet_bytes(table, INDEX_ROW_GROUP_SIZE),
                        **storage_options)
    return True


@dataclass
class StoreReport:
    """What :func:`verify_store` found in the store at ``root``: how many ``parts`` are committed, the
    ``damaged`` ones, and how the key index disagrees with the rest (``index``: one line each)."""

    root: str
    parts: int
    damaged: list[PartDamage]
    index: list[str]

    @property
    def ok(self) -> bool:
        return not self.damaged and not self.index

    def lines(self) -> list[str]:
        """The report as printed: one line per damaged part, one per disagreement of the key index, a total."""
        index = "agrees" if not self.index else f"disagrees ({len(self.index)})"
        return ([f"damaged: {damage}" for damage in self.damaged] + [f"key index: {line}" for line in self.index]
                + [f"verify: {self.root}: {self.parts} parts, {len(self.damaged)} damaged, key index {index}"])


def verify_store(root: str, deep: bool = False, **storage_options) -> StoreReport:
    """Check every committed part of the store at ``root`` against its record and manifest: both footers (masks
    and errors) readable, their row counts and file sizes as recorded, and with ``deep`` the SHA-256 of both
    files (this reads the whole store); then that the key index covers exactly the undamaged parts, with their
    row counts. Reads only the files' bytes and footers, whatever the cells hold."""
    index = _KeyIndex(MaskStore(root, skip_damaged=True, **storage_options), "all" if deep else "none", full=True)
    return StoreReport(root, len(index.listing), list(index.damaged.values()), index.problems())

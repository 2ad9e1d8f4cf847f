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

One module a job: ``format`` (the layout, the provenance, the cells), ``files`` (reading the files, naming the
damaged ones), ``reader`` (:class:`MaskStore` and its key index), ``writer`` (:class:`MaskStoreWriter`) and
``verify`` (:func:`write_key_index`, :func:`verify_store`).
"""

from __future__ import annotations

from denseclip.mask_store.files import PartDamage
from denseclip.mask_store.format import (
    ERROR_SCHEMA,
    ERRORS_DIR,
    FORMAT_FIELD,
    FORMAT_VERSION,
    IGNORE_8BIT,
    IGNORE_16BIT,
    INDEX_DIR,
    INDEX_FILE,
    INDEX_PARTS_KEY,
    INDEX_ROW_GROUP_SIZE,
    INDEX_SCHEMA,
    MANIFESTS_DIR,
    MAP_COLUMNS,
    MASK_SCHEMA,
    MASKS_DIR,
    PART_RECORD_KEY,
    PNG_FORMAT,
    PROVENANCE_KEY,
    ROW_GROUP_SIZE,
    WRITER_FIELDS,
    ZSTD_FORMAT,
    _parquet_bytes,
    code_version,
    decode_confidence,
    decode_mask,
    encode_confidence,
    encode_mask,
    ignore_label,
    label_png,
    mask_format,
    part_format,
    part_record,
    part_url,
    provenance_differences,
    quantise_confidence,
    rows_to_table,
)
from denseclip.mask_store.reader import MaskStore
from denseclip.mask_store.verify import StoreReport, verify_store, write_key_index
from denseclip.mask_store.writer import MaskStoreWriter

# The names the library, pipelines, tests and benchmarks use; each lives in the module of its job.
__all__ = [
    "ERRORS_DIR", "ERROR_SCHEMA", "FORMAT_FIELD", "FORMAT_VERSION", "IGNORE_8BIT", "IGNORE_16BIT",
    "INDEX_DIR", "INDEX_FILE", "INDEX_PARTS_KEY", "INDEX_ROW_GROUP_SIZE", "INDEX_SCHEMA", "MANIFESTS_DIR",
    "MAP_COLUMNS", "MASKS_DIR", "MASK_SCHEMA", "PART_RECORD_KEY", "PNG_FORMAT", "PROVENANCE_KEY",
    "ROW_GROUP_SIZE", "WRITER_FIELDS", "ZSTD_FORMAT", "MaskStore", "MaskStoreWriter", "PartDamage",
    "StoreReport", "_parquet_bytes", "code_version", "decode_confidence", "decode_mask", "encode_confidence",
    "encode_mask", "ignore_label", "label_png", "mask_format", "part_format", "part_record", "part_url",
    "provenance_differences", "quantise_confidence", "rows_to_table", "verify_store", "write_key_index",
]

"""Writing a store: :class:`MaskStoreWriter` commits each part (masks, errors and manifest) in one atomic step,
in the store's format."""

from __future__ import annotations

import hashlib
import json
import re

import pyarrow as pa

from denseclip import storage
from denseclip.mask_store.format import (
    ERROR_SCHEMA,
    ERRORS_DIR,
    FORMAT_FIELD,
    MANIFESTS_DIR,
    MASK_SCHEMA,
    MASKS_DIR,
    PART_RECORD_KEY,
    PNG_FORMAT,
    PROVENANCE_KEY,
    _check_cells,
    _parquet_bytes,
    code_version,
    mask_format,
    part_url,
    provenance_differences,
    rows_to_table,
)
from denseclip.mask_store.reader import MaskStore

_PART_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


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

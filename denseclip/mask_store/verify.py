"""Keeping a store whole: the key index brought up to date after a labelling run (:func:`write_key_index`), and
every part and the index checked against what they record (:func:`verify_store`, ``denseclip verify``)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pyarrow as pa

from denseclip import storage
from denseclip.mask_store.files import PartDamage
from denseclip.mask_store.format import (
    INDEX_DIR,
    INDEX_FILE,
    INDEX_PARTS_KEY,
    INDEX_ROW_GROUP_SIZE,
    INDEX_SCHEMA,
    _parquet_bytes,
)
from denseclip.mask_store.reader import MaskStore, _KeyIndex


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

"""The encode and commit stages: label maps encoded into mask-store cells, and each input shard committed as one
mask-store part once all of its rows have arrived."""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from denseclip.mask_store import (
    FORMAT_VERSION,
    MASK_SCHEMA,
    MaskStore,
    MaskStoreWriter,
    encode_confidence,
    encode_mask,
    part_record,
)
from denseclip.ray.labeling.plan import LabelingPlan, part_id
from denseclip.ray.labeling.read import _objects

log = logging.getLogger(__name__)


def encode_batch(batch: dict[str, np.ndarray], format_version: int = FORMAT_VERSION) -> dict[str, np.ndarray]:
    """Label and confidence maps -> mask-store cells of ``format_version`` (``mask``, ``confidence``; see
    :func:`denseclip.mask_store.encode_mask`) with ``height``/``width``."""
    masks, confidences, heights, widths = [], [], [], []
    for labels, confidence, error in zip(batch["labels"], batch["confidence"], batch["error"]):
        masks.append(b"" if error else encode_mask(labels, format_version))
        confidences.append(b"" if error else encode_confidence(confidence, format_version))
        heights.append(labels.shape[0])
        widths.append(labels.shape[1])
    return {"key": batch["key"], "shard": batch["shard"], "shard_total": batch["shard_total"],
            "error": batch["error"], "fingerprint": batch["fingerprint"],
            "node": batch["node"] if "node" in batch else np.full(len(masks), "", dtype=object),
            "mask": _objects(masks), "confidence": _objects(confidences),
            "height": np.array(heights, dtype=np.int32), "width": np.array(widths, dtype=np.int32)}


@dataclass
class _PendingShard:
    rows: list[dict] = field(default_factory=list)
    total: int | None = None


CommitCallback = Callable[[str, int, int], None]  # (shard, masks, errors) of each committed part


class ShardCommitter:
    """Collects encoded rows by input shard and commits each shard as one mask-store part (masks + errors,
    atomically) as soon as all of its rows have arrived. Rows may arrive in any order. A shard of
    ``plan.retry`` brings only the rows of its error keys: they are merged into its committed part.
    ``on_commit`` hears of every part committed; ``repaired`` counts those that replaced a damaged part."""

    def __init__(self, plan: LabelingPlan, on_commit: CommitCallback | None = None):
        self.plan = plan
        self.on_commit = on_commit
        self._pending: dict[str, _PendingShard] = {}
        self._writer: MaskStoreWriter | None = None
        self._done: set[str] = set()
        self.images = self.errors = self.parts = self.errors_fixed = self.repaired = 0
        self.images_by_node: Counter[str] = Counter()

    def add(self, batch: pa.Table) -> None:
        for row in batch.to_pylist():
            pending = self._pending.setdefault(row["shard"], _PendingShard())
            pending.rows.append(row)
            if row["shard_total"]:
                pending.total = row["shard_total"]
            if len(pending.rows) == pending.total:
                self._commit(row["shard"], self._pending.pop(row["shard"]).rows)

    def _writer_for(self, fingerprint: str) -> MaskStoreWriter:
        if self._writer is None:
            provenance = {**self.plan.provenance, "fingerprint": fingerprint}
            self._writer = MaskStoreWriter(self.plan.output, provenance, **self.plan.storage_options)
        elif self._writer.provenance["fingerprint"] != fingerprint:
            raise RuntimeError(f"actors loaded different weights ({self._writer.provenance['fingerprint']} and "
                               f"{fingerprint}): was the checkpoint replaced during the run?")
        return self._writer

    def _write(self, shard: str, table: pa.Table, errors: list[dict], nodes: set[str], fingerprint: str) -> None:
        if self.plan.lease is not None:
            self.plan.lease.check()  # a run that lost its lease must not write over the run that took it
        record = {"shard": shard, "fingerprint": self.plan.fingerprints.get(shard), "nodes": sorted(nodes)}
        self._writer_for(fingerprint).write_part(part_id(shard), table, errors, record)
        self._done.add(shard)
        self.parts += 1
        self.repaired += shard in self.plan.repaired

    def _commit(self, shard: str, rows: list[dict]) -> None:
        good = [r for r in rows if not r["error"]]
        errors = [{"key": r["key"], "shard": shard, "reason": r["error"]} for r in rows if r["error"]]
        table = pa.Table.from_pylist([{name: r[name] for name in MASK_SCHEMA.names} for r in good], MASK_SCHEMA)
        nodes = {r["node"] for r in good if r.get("node")}
        self.images_by_node.update(r["node"] for r in good if r.get("node"))
        self.images += len(good)
        self.errors += len(errors)
        if shard in self.plan.retry:
            table, errors, nodes = self._merged(shard, table, errors, nodes)
        self._write(shard, table, errors, nodes, rows[0]["fingerprint"])
        log.info("committed %s: %d masks, %d errors", shard, len(good), len(errors))
        if self.on_commit is not None:
            self.on_commit(shard, len(good), len(errors))

    def _merged(self, shard: str, table: pa.Table, errors: list[dict],
                nodes: set[str]) -> tuple[pa.Table, list[dict], set[str]]:
        """The committed part of ``shard`` with its retried error rows replaced by the new ``table`` and
        ``errors``."""
        store = MaskStore(self.plan.output, **self.plan.storage_options)
        retried = set(self.plan.retry[shard])
        old = store.read_part(part_id(shard))
        kept = old.filter(pc.invert(pc.is_in(old.column("key"), value_set=table.column("key"))))
        merged = pa.concat_tables([kept.replace_schema_metadata(None), table])
        old_errors = [e for e in store.read_errors(part_id(shard)) if e["key"] not in retried]
        self.errors_fixed += len(retried & set(table.column("key").to_pylist()))
        old_nodes = (part_record(old.schema.metadata) or {}).get("nodes", [])
        return merged, old_errors + errors, nodes | set(old_nodes)

    def remaining(self) -> LabelingPlan:
        """The plan's work that is not committed yet (all of it before the first commit)."""
        return dataclasses.replace(self.plan, todo=[s for s in self.plan.todo if s not in self._done],
                                   retry={s: k for s, k in self.plan.retry.items() if s not in self._done})

    def drop_incomplete(self) -> None:
        """Forget the rows of shards not committed yet: a resumed run labels those shards again, whole."""
        self._pending.clear()

    def finish(self) -> None:
        """After the last batch: commit the shards that held no sample at all (once the fingerprint is known)."""
        if self._pending:
            raise RuntimeError(f"shards ended incomplete: {sorted(self._pending)[:3]}")
        if self._writer is not None:
            empty = pa.Table.from_pylist([], MASK_SCHEMA)
            for shard in self.plan.todo:
                if shard not in self._done:  # also replaces the part of a shard rewritten without samples
                    self._write(shard, empty, [], set(), self._writer.provenance["fingerprint"])

"""Labelling runs without Ray, for tests: what ``label_shards`` does, in this process, and what a store holds."""

from __future__ import annotations

import collections

import pyarrow as pa
from batches import ray_batch

from denseclip.config import LabelerConfig, resolve_vocabulary
from denseclip.mask_store import MaskStore, write_key_index
from denseclip.ray.labeling import Labeler, LabelingPlan, ShardCommitter, decode_batch, read_shard_rows

CONFIG = LabelerConfig(model="denseclip-tiny-shapes", pretrained="random", batch_size=4)
CLASSES = resolve_vocabulary("synthetic")


def label_plan(plan: LabelingPlan, labeler: Labeler) -> ShardCommitter:
    """What label_shards does, without Ray: every shard (or the retried keys of one) through decode, the
    labeler (which encodes its own masks, as on CPU clusters) and the committer; then the key index. Returns
    the committer (its counts)."""
    committer = ShardCommitter(plan)
    work = [(s, None) for s in plan.todo] + [(s, set(keys)) for s, keys in plan.retry.items()]
    for shard, keys in work:
        rows = list(read_shard_rows(shard, plan.storage_options, keys=keys))
        if rows:
            encoded = labeler(decode_batch(ray_batch(rows)))
            committer.add(pa.Table.from_pydict({k: list(v) for k, v in encoded.items()}))
    committer.finish()
    write_key_index(plan.output, **plan.storage_options)
    return committer


def store_contents(output: str) -> dict[str, tuple[bytes, bytes]]:
    """key -> (mask cell, confidence cell) over every committed part; asserts that no key is stored twice."""
    store = MaskStore(output)
    rows = [r for part in sorted(store.committed_parts()) for r in store.read_part(part).to_pylist()]
    assert collections.Counter(r["key"] for r in rows).most_common(1)[0][1] == 1
    return {r["key"]: (r["mask"], r["confidence"]) for r in rows}


def store_errors(output: str) -> list[tuple[str, str, str]]:
    """(key, shard, reason) of every error row of the store, sorted."""
    return sorted((e["key"], e["shard"], e["reason"]) for e in MaskStore(output).errors())

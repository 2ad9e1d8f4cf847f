"""DenseCLIP labeling on Ray Data: WebDataset shards in, a Parquet mask store out, resumable and exactly-once.

The unit of work and of commit is the input shard: each shard becomes one mask-store part (its masks and its
errors), published atomically once every one of its samples has come through the pipeline. A re-run skips the
shards whose part is committed, so after ``kill -9`` at any moment every image ends up in the store exactly once.

    read shards (tasks) -> decode (tasks) -> Labeler (actor pool) -> encode masks -> commit parts (driver)

Masks are encoded by CPU tasks behind GPU actors, and by the actors themselves on CPU-only clusters.

One module a stage, in the order data flows: ``plan`` (fingerprints, the incremental plan, actor sizing, node
health), ``read`` (reading and decoding), ``actor`` (``Labeler`` and its error policy), ``commit`` (encoding,
committing parts), and ``run``, which connects to the cluster and runs them (node-loss resumes, the summary).
"""

from __future__ import annotations

from denseclip.ray.labeling.actor import Labeler, is_out_of_memory, measure_throughput, probe_throughput
from denseclip.ray.labeling.commit import CommitCallback, ShardCommitter, encode_batch
from denseclip.ray.labeling.plan import (
    ActorPlan,
    LabelingError,
    LabelingPlan,
    Throughput,
    alive_node_cpus,
    alive_nodes,
    device_settings,
    lost_a_node,
    node_died,
    part_id,
    plan_actors,
    prepare_labeling,
    run_provenance,
    shard_fingerprints,
    validate_labeling,
    write_summary,
)
from denseclip.ray.labeling.read import _columns, _objects, decode_batch, read_shard_rows, read_shards
from denseclip.ray.labeling.run import build_dataset, cluster_device, label_shards, ray_cluster

# The names the pipelines, commands, tests and benchmarks use; each lives in the module of its stage.
__all__ = [
    "ActorPlan", "CommitCallback", "Labeler", "LabelingError", "LabelingPlan", "ShardCommitter", "Throughput",
    "_columns", "_objects", "alive_node_cpus", "alive_nodes", "build_dataset", "cluster_device",
    "decode_batch", "device_settings", "encode_batch", "is_out_of_memory", "label_shards", "lost_a_node",
    "measure_throughput", "node_died", "part_id", "plan_actors", "prepare_labeling", "probe_throughput",
    "ray_cluster", "read_shard_rows", "read_shards", "run_provenance", "shard_fingerprints",
    "validate_labeling", "write_summary",
]

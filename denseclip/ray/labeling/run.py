"""A labeling run on Ray: the cluster it connects to, the pipeline of stages, and the run that commits parts,
resumes after a lost node and writes the summary."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterator

import ray
from ray.data import ActorPoolStrategy

from denseclip.config import LabelerConfig
from denseclip.mask_store import FORMAT_VERSION, write_key_index
from denseclip.names import AUTO
from denseclip.ray.auth import connected, local_ray
from denseclip.ray.labeling.actor import MAX_TASK_RETRIES, Labeler, probe_throughput
from denseclip.ray.labeling.commit import CommitCallback, ShardCommitter, encode_batch
from denseclip.ray.labeling.plan import (
    ActorPlan,
    LabelingPlan,
    alive_node_cpus,
    alive_nodes,
    lost_a_node,
    plan_actors,
    resolve_device,
    write_summary,
)
from denseclip.ray.labeling.read import decode_batch, read_shards
from denseclip.runlog import environment

log = logging.getLogger(__name__)

# A run whose actor's node is lost (the actor unreachable, or its node drained by the autoscaler) while Ray's
# retries cannot save the batch in flight keeps what it committed and labels the rest on the nodes left, at most
# this often; model faults are not resumed (see MAX_TASK_RETRIES).
NODE_LOSS_RESUMES = 2
# Blocks of about a batch of decoded images (8 MiB: eight 640x480 images), which the actor pool bundles back
# into batches. Shard-sized blocks would leave an actor idle while another works through a whole shard (above
# all at the end of a run); one-image blocks cost more in object-store traffic and scheduling than they save
# (measured: 400 images of 512 px on 2 cores labelled in 47 s with 1 MiB blocks, 38 s with 8 MiB).
BLOCK_BYTES = 8 << 20
# Object-store memory the labeling pipeline may hold at once (decoded images waiting for an actor, masks
# waiting to be committed), per actor: a few batches of large images each, enough to keep every actor fed
# without letting reading run ahead of labeling (memory stays flat however many images the job holds).
OBJECT_STORE_BYTES_PER_ACTOR = 128 << 20
# Missing shards and damaged parts listed by name in summary.json (all of them are counted).
LISTED_MISSING = 100
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def cluster_device(config: LabelerConfig, address: str | None = None) -> LabelerConfig:
    """``config`` with device "auto" resolved for the cluster the run will use (``address``, ``$RAY_ADDRESS``, or a
    private local Ray on this machine): ``cuda`` when it has GPUs now, else ``cpu`` (an autoscaling cluster that
    starts without GPU nodes needs ``device: cuda`` to ask for them)."""
    if config.device != AUTO or not (address or os.environ.get("RAY_ADDRESS")):
        return resolve_device(config)
    with ray_cluster(address):
        return resolve_device(config)


def build_dataset(plan: LabelingPlan, config: LabelerConfig, classes: list[list[str]], actors: ActorPlan,
                  labeler: type[Labeler] = Labeler):
    """The Ray Data pipeline over ``plan.todo`` (whole shards) and ``plan.retry`` (the error keys of committed
    shards), lazily: encoded rows ready to commit. ``labeler``: the labelling stage's class (a subclass injects
    faults in tests)."""
    # Actors compute what the provenance records, whatever their own machine would pick for "auto" settings.
    config = config.resolved()
    work = [{"shard": s, "keys": []} for s in plan.todo] + [{"shard": s, "keys": k} for s, k in plan.retry.items()]
    shards = ray.data.from_items(work, override_num_blocks=len(work))
    # Batch-sized blocks (see BLOCK_BYTES): an actor task takes whole blocks.
    shards.context.target_max_block_size = BLOCK_BYTES
    # Bound what is buffered between the stages (see OBJECT_STORE_BYTES_PER_ACTOR).
    limits = shards.context.execution_options.resource_limits
    budget = max(2, actors.num_actors) * OBJECT_STORE_BYTES_PER_ACTOR
    shards.context.execution_options.resource_limits = limits.copy(object_store_memory=budget)
    # Reading is a map_batches (not a flat_map) so that Ray fuses reading and decoding into one task per shard;
    # decode takes the read batches as they come (a batch_size here would bundle several shards into a task).
    reading = ray.data.TaskPoolStrategy(size=actors.read_tasks)
    samples = shards.map_batches(read_shards, batch_size=1, num_cpus=actors.task_cpus, compute=reading,
                                 fn_kwargs={"storage_options": plan.storage_options, "batch_size": config.batch_size})
    images = samples.map_batches(decode_batch, batch_size=None, num_cpus=actors.task_cpus, compute=reading,
                                 fn_kwargs={"defer_jpeg": actors.decode_on_device})
    # CPU actors encode their own masks (in the current format): shipping each image's maps through the object
    # store to another CPU process costs more than the encoding. GPU actors leave it to CPU tasks, so the GPU
    # never waits for encoding, and so does a store of an older format (the tasks encode in the store's format).
    separate_encode = actors.gpus_per_actor > 0 or plan.mask_format != FORMAT_VERSION
    labelled = images.map_batches(
        labeler,
        fn_constructor_kwargs={"config": config, "classes": classes, "torch_threads": actors.torch_threads,
                               "encode": not separate_encode},
        batch_size=config.batch_size,
        compute=ActorPoolStrategy(min_size=actors.min_actors, max_size=actors.num_actors),
        num_cpus=actors.cpus_per_actor,
        num_gpus=actors.gpus_per_actor,
        # Ray Data hands each pool actor its context and this stage as object-store references, with or without
        # constructor arguments, so with restarts on Ray core logs "constructor arguments in the object store and
        # max_restarts > 0" once per driver at error level (ray-project/ray#53727). Ray Data holds those
        # references for the whole run, so a restart finds them (tests/test_labeling.py kills an actor).
        max_restarts=-1,
        max_task_retries=MAX_TASK_RETRIES,
    )
    if not separate_encode:
        return labelled
    return labelled.map_batches(encode_batch, batch_size=config.batch_size, num_cpus=actors.task_cpus,
                                fn_kwargs={"format_version": plan.mask_format})


def label_shards(
    plan: LabelingPlan,
    config: LabelerConfig,
    classes: list[list[str]],
    *,
    address: str | None = None,
    num_actors: int | None = None,
    cpus_per_actor: float | None = None,
    on_commit: CommitCallback | None = None,
    labeler: type[Labeler] = Labeler,
    on_resume: Callable[[str], None] | None = None,
) -> dict:
    """Label and commit the new, changed and retried shards of ``plan`` on Ray (see :func:`ray_cluster` for
    ``address``; :func:`plan_actors` for the pool; ``on_commit(shard, masks, errors)`` after each part;
    ``labeler`` as for :func:`build_dataset`), bring the store's key index up to date (rebuilt when missing or
    stale), and return the summary, also written as ``summary.json``: images labelled, errors, images/s and wall
    time of this run (Ray's start included), shards new / changed / unchanged / missing, damaged parts found and
    ``parts_repaired`` (relabelled), images labelled per Ray node, and how often the run resumed after losing a
    node (``NODE_LOSS_RESUMES``; ``on_resume(message)`` hears of each resume)."""
    start = time.perf_counter()
    committer = ShardCommitter(plan, on_commit)
    actors, resumes = None, 0
    if plan.todo or plan.retry:
        with ray_cluster(address):
            config = resolve_device(config)  # as the plan's provenance resolved it
            throughput = None
            if config.on_cuda:
                throughput = probe_throughput(plan, config.resolved(), classes, ray.cluster_resources().get("GPU", 0))
            while True:
                # Sized anew after a lost node, from the nodes alive now.
                nodes = alive_nodes()
                actors = plan_actors(ray.cluster_resources(), config.device, num_actors, cpus_per_actor, throughput,
                                     node_cpus=alive_node_cpus(nodes))
                try:
                    for batch in build_dataset(committer.remaining(), config, classes, actors, labeler).iter_batches(
                            batch_size=None, batch_format="pyarrow"):
                        committer.add(batch)
                    break
                except ray.exceptions.RayActorError as exc:
                    if resumes == NODE_LOSS_RESUMES or not lost_a_node(exc, {n["NodeID"] for n in nodes}):
                        raise
                    resumes += 1
                    message = (f"a labelling actor's node was lost ({type(exc).__name__}); the {committer.parts} "
                               f"parts committed are kept, labelling the rest (resume {resumes} of "
                               f"{NODE_LOSS_RESUMES})")
                    log.warning("%s: %s", message, exc)
                    if on_resume is not None:
                        on_resume(message)
                    committer.drop_incomplete()
            committer.finish()
    if plan.lease is not None:
        plan.lease.check()
    index_written = write_key_index(plan.output, **plan.storage_options)
    wall = time.perf_counter() - start
    summary = {
        "status": "succeeded", "output": plan.output, "images_labelled": committer.images,
        "errors": committer.errors, "images_per_s": round(committer.images / wall, 2),
        "wall_time_s": round(wall, 2), "shards": len(plan.shards),
        "shards_new": len(plan.new), "shards_changed": len(plan.changed), "shards_unchanged": len(plan.unchanged),
        "shards_missing": len(plan.missing), "missing_shards": plan.missing[:LISTED_MISSING],
        "shards_already_committed": len(plan.unchanged), "shards_committed": committer.parts,
        "errors_retried": sum(map(len, plan.retry.values())), "errors_fixed": committer.errors_fixed,
        "images_by_node": dict(committer.images_by_node),
        "actors": dataclasses.asdict(actors) if actors else None, "resumed_after_node_loss": resumes,
        "parts_repaired": committer.repaired, "parts_damaged": len(plan.damaged),
        "damaged_parts": [dataclasses.asdict(d) for d in list(plan.damaged.values())[:LISTED_MISSING]],
        "key_index_written": index_written,
    }
    write_summary(plan.output, summary, plan.storage_options)
    return summary


@contextlib.contextmanager
def ray_cluster(address: str | None = None) -> Iterator[None]:
    """Connect to the Ray cluster at ``address`` (or ``$RAY_ADDRESS``, as under ``ray job submit``), with its token
    when it requires one (``auth.connected``); with neither, start a private local Ray on this machine's CPUs
    (``auth.local_ray``: 127.0.0.1 only, a token of its own, no dashboard) and shut it down after. An already
    connected driver is used as it is."""
    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS")
    with contextlib.ExitStack() as settings:
        if address:
            settings.enter_context(connected(address))
        else:
            # A private one-node Ray has no autoscaler that could drain (preempt) its node, so Ray Train's
            # preemption watcher has nothing to watch there; it is also an actor created with actor handles as
            # arguments and restarts on, which Ray core reports as an error-level line (ray-project/ray#53727).
            if PREEMPTION_WATCHER_ENV not in os.environ:
                settings.enter_context(environment(PREEMPTION_WATCHER_ENV, "0"))
            settings.enter_context(local_ray())
        yield

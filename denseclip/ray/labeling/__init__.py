"""DenseCLIP labeling on Ray Data: WebDataset shards in, a Parquet mask store out, resumable and exactly-once.

The unit of work and of commit is the input shard: each shard becomes one mask-store part (its masks and its
errors), published atomically once every one of its samples has come through the pipeline. A re-run skips the
shards whose part is committed, so after ``kill -9`` at any moment every image ends up in the store exactly once.

    read shards (tasks) -> decode (tasks) -> Labeler (actor pool) -> encode masks -> commit parts (driver)

Masks are encoded by CPU tasks behind GPU actors, and by the actors themselves on CPU-only clusters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import posixpath
import re
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data import ActorPoolStrategy

from denseclip import storage
from denseclip.config import LabelerConfig
from denseclip.damage import DamagedShardError
from denseclip.images import ImageDecodeError, check_rgb_image, decode_image, is_plain_jpeg
from denseclip.lease import Lease
from denseclip.mask_store import (
    ERRORS_DIR,
    FORMAT_VERSION,
    INDEX_DIR,
    MANIFESTS_DIR,
    MASK_SCHEMA,
    MASKS_DIR,
    MaskStore,
    MaskStoreWriter,
    PartDamage,
    encode_confidence,
    encode_mask,
    mask_format,
    part_record,
    provenance_differences,
    write_key_index,
)
from denseclip.names import AUTO
from denseclip.predictor import DenseCLIP
from denseclip.ray.auth import connected, local_ray
from denseclip.ray.devices import actor_device
from denseclip.runlog import environment
from denseclip.shards import expand_shards, read_shard, sanitize_key
from denseclip.vocabulary import load_templates

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")
SUMMARY_FILE = "summary.json"
# Options that change the labels, hence part of the provenance (batch size and device do not).
RESULT_OPTIONS = ("protocol", "head", "synonyms", "name_softmax", "normalisation", "mode", "resize_to", "short_side",
                  "temperature", "background_threshold", "key_smoothing", "prompt_denoising", "upsample_topk",
                  "precision", "size_bucket")
SLIDE_OPTIONS = ("crop_size", "crop_stride")
# A batch whose actor dies is retried on a restarted actor this often; a batch that kills every actor it
# meets fails the job instead of looping forever. Actors themselves restart without limit (lost nodes).
# A model failure that is not the image's fault (see Labeler) ends the actor on purpose, to the same effect.
MAX_TASK_RETRIES = 3
# A run whose actor's node is lost (the actor unreachable, or its node drained by the autoscaler) while Ray's
# retries cannot save the batch in flight keeps what it committed and labels the rest on the nodes left, at most
# this often; model faults are not resumed (see MAX_TASK_RETRIES).
NODE_LOSS_RESUMES = 2
# An unreachable actor is a lost node only if a node of the run dies: Ray's health checks take 15-30 s to mark a
# killed node dead, so the run waits this long for that before it takes the error for the actor's own (a model
# fault ends the actor on purpose, and its caller sees the same ActorUnavailableError).
NODE_DEATH_WAIT_S = 60.0
# Blocks of about a batch of decoded images (8 MiB: eight 640x480 images), which the actor pool bundles back
# into batches. Shard-sized blocks would leave an actor idle while another works through a whole shard (above
# all at the end of a run); one-image blocks cost more in object-store traffic and scheduling than they save
# (measured: 400 images of 512 px on 2 cores labelled in 47 s with 1 MiB blocks, 38 s with 8 MiB).
BLOCK_BYTES = 8 << 20
# Object-store memory the labeling pipeline may hold at once (decoded images waiting for an actor, masks
# waiting to be committed), per actor: a few batches of large images each, enough to keep every actor fed
# without letting reading run ahead of labeling (memory stays flat however many images the job holds).
OBJECT_STORE_BYTES_PER_ACTOR = 128 << 20
# Shards whose content is hashed at once when planning a local run (hashlib releases the GIL on large reads).
FINGERPRINT_THREADS = 8
# Missing shards and damaged parts listed by name in summary.json (all of them are counted).
LISTED_MISSING = 100
# GPU actors: decode tasks are planned for this much more than the measured labelling rate (rates vary with the
# images' sizes and the node's other work).
DECODE_HEADROOM = 1.25
# Images taken from the first shard to measure decoding and labelling rates before a GPU run is planned.
PROBE_IMAGES = 16
_NO_IMAGE = np.zeros((0, 0, 3), dtype=np.uint8)
_NO_MAP = np.zeros((0, 0), dtype=np.uint8)
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


class LabelingError(ValueError):
    """A labeling job that cannot start (input, output or provenance problem); the message names it."""


# ------------------------------------------------------------------------------------------- planning
@dataclass
class LabelingPlan:
    """What a run will do.

    ``shards``: every input shard; ``todo``: the shards to label whole (``new`` ones, those ``changed`` since
    their part was committed and those ``repaired``, whose part is damaged); ``retry``: shard -> keys of its error
    rows to relabel (``--retry-errors``); ``unchanged``: committed shards left alone; ``missing``: shards of
    committed parts that are no longer in the input (their rows are kept); ``damaged``: part id -> the
    :class:`~denseclip.mask_store.PartDamage` of every damaged part found (those of shards no longer in the input
    stay as they are); ``fingerprints``: each input shard's content fingerprint now (:func:`shard_fingerprints`);
    ``provenance``: what every part of ``output`` must carry (without the weights' fingerprint, which the actors
    report); ``lease``: the output's lease this run holds, checked before every commit; ``mask_format``: the cell
    format of ``output`` (a store keeps the format it was started in).
    """

    shards: list[str]
    todo: list[str]
    output: str
    provenance: dict
    storage_options: dict = field(default_factory=dict)
    fingerprints: dict[str, dict] = field(default_factory=dict)
    new: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    retry: dict[str, list[str]] = field(default_factory=dict)
    lease: Lease | None = None
    repaired: list[str] = field(default_factory=list)
    damaged: dict[str, PartDamage] = field(default_factory=dict)
    mask_format: int = FORMAT_VERSION


@dataclass(frozen=True)
class ActorPlan:
    """Resources of the labeling stage: between ``min_actors`` and ``num_actors`` DenseCLIP actors with
    ``cpus_per_actor`` / ``gpus_per_actor`` each and ``torch_threads`` per actor, ``task_cpus`` per
    read/decode/encode task and ``read_tasks`` shards read and decoded at once; with ``decode_on_device`` the
    actors decode JPEGs on their GPU (the CPUs could not decode as fast as the GPUs label)."""

    num_actors: int
    min_actors: int
    cpus_per_actor: float
    gpus_per_actor: float
    task_cpus: float
    torch_threads: int
    read_tasks: int
    decode_on_device: bool = False


@dataclass(frozen=True)
class Throughput:
    """What one labelling actor sustains, measured where it runs on the job's own images: ``labels_per_s``
    images/s through the labeller, ``decodes_per_cpu_s`` images/s one CPU decodes."""

    labels_per_s: float
    decodes_per_cpu_s: float


def part_id(shard: str) -> str:
    """The mask-store part of an input shard: its file stem plus a hash of its full URL, so two folders that
    both hold ``shard-000000.tar`` never share a part (``.../shard-000000.tar -> shard-000000-1a2b3c4d5e``)."""
    stem = posixpath.basename(shard.rstrip("/")).removesuffix(".tar")
    stem = re.sub(r"[^A-Za-z0-9_.\-]", "_", stem).lstrip("._-") or "shard"
    return f"{stem}-{hashlib.sha1(shard.encode()).hexdigest()[:10]}"


def device_settings(config: LabelerConfig) -> dict:
    """How the actors run the model: device ``type`` (the ordinal does not matter), ``precision`` and ``tf32``
    (``denseclip.predictor.ALLOW_TF32`` on CUDA, which every labeller built there applies). Labels made under
    other settings are close but not bit-identical, so one store never mixes them."""
    from denseclip.predictor import ALLOW_TF32  # torch: the driver only

    cuda = config.device.startswith("cuda")
    return {"type": "cuda" if cuda else "cpu", "precision": config.effective_precision, "tf32": cuda and ALLOW_TF32}


def run_provenance(config: LabelerConfig, classes: list[list[str]]) -> dict:
    """Everything that determines the labels, except the weights' fingerprint (added by the actors)."""
    from denseclip.models import weights_activation  # torch: the driver only, never the read/encode tasks

    names = RESULT_OPTIONS + (SLIDE_OPTIONS if config.mode == "slide" else ())
    config = config.resolved()
    return {"model": config.model, "pretrained": config.pretrained,
            "activation": weights_activation(config.model, config.pretrained),
            "vocabulary": [list(c) for c in classes], "templates": load_templates(config.template_set),
            "options": {n: getattr(config, n) for n in names}, "device": device_settings(config)}


def _clear_store(output: str, storage_options: dict) -> None:
    fs, root = fsspec.core.url_to_fs(output, **storage_options)
    for name in (MASKS_DIR, ERRORS_DIR, MANIFESTS_DIR, INDEX_DIR, SUMMARY_FILE):
        path = posixpath.join(root.rstrip("/"), name)
        if fs.exists(path):
            fs.rm(path, recursive=True)
    fs.invalidate_cache()


def write_summary(output: str, summary: dict, storage_options: dict | None = None) -> None:
    """Publish ``summary`` as ``summary.json`` next to the masks."""
    data = json.dumps(summary, indent=2, sort_keys=True).encode()
    storage.write_bytes(storage.join(output, SUMMARY_FILE), data, **(storage_options or {}))


def shard_fingerprints(shards: list[str], storage_options: dict | None = None) -> dict[str, dict]:
    """What each shard's content is now: ``{"size", "etag"}`` where the store keeps an ETag (S3 and other object
    stores: read from one listing per folder, no object is read), else ``{"size", "sha256"}`` of its bytes (local
    disk: every shard is read once, by a few threads). Neither depends on modification times, so copying a
    folder of shards does not make them look changed."""
    storage_options = storage_options or {}
    folders: dict[str, list[str]] = defaultdict(list)
    for shard in shards:
        folders[posixpath.dirname(shard)].append(shard)
    listed: dict[str, dict] = {}
    for folder, members in folders.items():
        fs, path = fsspec.core.url_to_fs(folder, **storage_options)
        fs.invalidate_cache(path)
        entries = {posixpath.basename(e["name"].rstrip("/")): e for e in fs.ls(path, detail=True)}
        for shard in members:
            listed[shard] = entries.get(posixpath.basename(shard)) or fs.info(
                fsspec.core.url_to_fs(shard, **storage_options)[1])
    fingerprints = {}
    for shard, info in listed.items():
        etag = info.get("ETag") or info.get("etag")
        if etag:
            fingerprints[shard] = {"size": info["size"], "etag": str(etag).strip('"')}
    hashed = [s for s in shards if s not in fingerprints]
    with ThreadPoolExecutor(min(FINGERPRINT_THREADS, max(1, len(hashed)))) as pool:
        for shard, digest in zip(hashed, pool.map(lambda s: storage.sha256(s, **storage_options), hashed)):
            fingerprints[shard] = {"size": listed[shard]["size"], "sha256": digest}
    return fingerprints


def _error_keys(store: MaskStore, shards: list[str], records: dict[str, dict | None]) -> dict[str, list[str]]:
    """Shard -> keys of the error rows of its committed part (for the shards whose part has any)."""
    keys = {}
    for shard in shards:
        record = records.get(part_id(shard))
        if record is not None and not record.get("errors"):
            continue  # the part says it has none: its errors file is not read
        found = sorted({e["key"] for e in store.read_errors(part_id(shard))})
        if found:
            keys[shard] = found
    return keys


def cluster_device(config: LabelerConfig, address: str | None = None) -> LabelerConfig:
    """``config`` with device "auto" resolved for the cluster the run will use (``address``, ``$RAY_ADDRESS``, or a
    private local Ray on this machine): ``cuda`` when it has GPUs now, else ``cpu`` (an autoscaling cluster that
    starts without GPU nodes needs ``device: cuda`` to ask for them)."""
    if config.device != AUTO:
        return config
    if address or os.environ.get("RAY_ADDRESS"):
        with ray_cluster(address):
            gpus = ray.cluster_resources().get("GPU", 0)
    else:
        import torch

        gpus = torch.cuda.device_count()  # what a private local Ray finds on this machine
    return config.with_gpus(gpus > 0)


def validate_labeling(input: str | list[str], output: str, config: LabelerConfig, classes: list[list[str]], *,
                      overwrite: bool = False, storage_options: dict | None = None) -> tuple[list[str], dict]:
    """The input shards and the run's provenance (:func:`run_provenance`), once the input lists (a missing shard
    or an unreadable bucket fails here) and the output holds no masks of another model / vocabulary / options
    (unless ``overwrite``). Writes nothing, so a refused run leaves the output as it was. Raises LabelingError."""
    storage_options = storage_options or {}
    try:
        shards = expand_shards(input, **storage_options)
    except (OSError, ValueError) as exc:
        raise LabelingError(f"input {input!r}: {exc}") from exc
    provenance = run_provenance(config, classes)
    if not overwrite:
        try:
            existing = MaskStore(output, skip_damaged=True, **storage_options).provenance
        except OSError as exc:
            raise LabelingError(f"output {output}: {exc}") from exc
        changed = provenance_differences(existing or provenance, provenance, ignore=("fingerprint",))
        if changed:
            raise LabelingError(f"output {output} holds masks of another run (differs in {', '.join(changed)}); "
                                "pass --overwrite to replace them or choose another --output")
    return shards, provenance


def prepare_labeling(
    input: str | list[str],
    output: str,
    config: LabelerConfig,
    classes: list[list[str]],
    *,
    overwrite: bool = False,
    retry_errors: bool = False,
    deep: bool = False,
    lease: Lease | None = None,
    storage_options: dict | None = None,
) -> LabelingPlan:
    """Check the input and output before any cluster work and decide what to label.

    Validates the input and output (:func:`validate_labeling`; ``overwrite`` first deletes a store of another
    run) and marks the output as running in ``summary.json`` (an unwritable output fails here). Then checks the
    committed parts (:meth:`MaskStore.part_records`: sizes and row counts against their manifests and records,
    and the SHA-256 of the parts written since the key index, or with ``deep`` of every part): the shard of a
    damaged part is relabelled as if its part was never committed. Compares each other input shard's content
    fingerprint with the one its part recorded when it was committed: new shards and changed ones are
    labelled, unchanged ones left alone, and committed shards no longer in the input reported as missing. With
    ``retry_errors``, the error rows of unchanged shards are relabelled too. The caller holds ``lease`` on
    ``output`` (see :mod:`denseclip.lease`). Raises LabelingError.
    """
    storage_options = dict(storage_options or {})
    shards, provenance = validate_labeling(input, output, config, classes, overwrite=overwrite,
                                           storage_options=storage_options)
    try:
        fingerprints = shard_fingerprints(shards, storage_options)
    except (OSError, ValueError) as exc:
        raise LabelingError(f"input {input!r}: {exc}") from exc
    try:
        if overwrite:
            _clear_store(output, storage_options)
        store = MaskStore(output, skip_damaged=True, **storage_options)
        records = store.part_records(digests="all" if deep else "changed")
        write_summary(output, {"status": "running", "input": input, "shards": len(shards)}, storage_options)
        plan = LabelingPlan(shards, [], output, provenance, storage_options, fingerprints, lease=lease,
                            mask_format=mask_format(store.provenance))
        by_part = {part_id(shard): shard for shard in shards}
        plan.damaged = {p: dataclasses.replace(d, shard=d.shard or by_part.get(p)) for p, d in store.skipped.items()}
        for shard in shards:
            pid = part_id(shard)
            if pid in plan.damaged:
                plan.repaired.append(shard)
            elif pid not in records:
                plan.new.append(shard)
            elif (records[pid] or {}).get("fingerprint", fingerprints[shard]) != fingerprints[shard]:
                plan.changed.append(shard)
            else:
                plan.unchanged.append(shard)
        plan.todo = [s for s in shards if s in set(plan.new) | set(plan.changed) | set(plan.repaired)]
        plan.missing = sorted((records[p] or {}).get("shard", p) for p in records if p not in by_part)
        unverified = sum(records[part_id(s)] is None for s in plan.unchanged)
        if unverified:
            log.warning("%d committed parts of %s carry no content fingerprint (written by an older version): "
                        "they are taken as unchanged", unverified, output)
        if retry_errors:
            plan.retry = _error_keys(store, plan.unchanged, records)
    except OSError as exc:
        raise LabelingError(f"output {output}: {exc}") from exc
    return plan


def plan_actors(
    cluster: dict[str, float], device: str, num_actors: int | None = None, cpus_per_actor: float | None = None,
    throughput: Throughput | None = None, node_cpus: Sequence[float] = (),
) -> ActorPlan:
    """Size the labeling stage from the cluster's resources now (``ray.cluster_resources()``) and the CPUs of each
    of its nodes (``node_cpus``, :func:`alive_node_cpus`; unknown when empty).

    Defaults: one actor per GPU when ``device`` is cuda, else one per CPU; actors reserve at most half the CPUs
    (fractional reservations are fine) so read, decode and encode tasks always find room: an actor pool that
    reserves every CPU starves the tasks feeding it and Ray waits forever. A GPU pool larger than the GPUs
    present starts small and grows as an autoscaling cluster adds GPU nodes.

    Ray Data spreads the actors over the nodes, so a read/decode task is made small enough to fit beside them on
    the fullest node: on nodes of one CPU each holding an actor of 0.6, tasks of 0.4 still run, where tasks sized
    from the cluster's total alone would wait forever for a node with room.

    Read/decode tasks: one per actor (at least two) on CPU clusters, where decoding an image costs a fraction of
    labelling it and every task holds its shard's buffers. GPU actors label far faster than a CPU decodes: with
    the ``throughput`` of one actor (:func:`measure_throughput`), enough tasks are planned to decode N images/s
    for N images/s labelled, and where the free CPUs cannot, the actors decode JPEGs on their GPUs instead.
    """
    cpus, gpus = float(cluster.get("CPU", 0)), float(cluster.get("GPU", 0))
    if device.startswith("cuda"):
        if not num_actors and gpus < 1:
            raise LabelingError(f"labeler.device: {device} asked for, but the Ray cluster has no GPU now: "
                                "give num_actors to let an autoscaling cluster add GPU nodes")
        num_actors = num_actors or int(gpus)
        min_actors = max(1, min(num_actors, int(gpus)))
        gpus_per_actor = 1.0
    else:
        num_actors = num_actors or max(1, int(cpus))
        min_actors = num_actors
        gpus_per_actor = 0.0
    if cpus_per_actor is None:
        cpus_per_actor = min(1.0, cpus / (2 * num_actors))
    reserved = num_actors * cpus_per_actor
    if gpus_per_actor == 0 and reserved >= cpus:
        raise LabelingError(
            f"num_actors x cpus_per_actor = {num_actors} x {cpus_per_actor:g} CPUs leaves none of the cluster's "
            f"{cpus:g} CPUs for reading and decoding (Ray would wait forever): use fewer or smaller actors")
    task_cpus = min(1.0, max(cpus - reserved, cpus / 2) / 4)
    room = _room_beside_actors(node_cpus, num_actors, cpus_per_actor)
    if room is not None:
        task_cpus = min(task_cpus, room)
    read_tasks, decode_on_device = max(2, num_actors), False
    if gpus_per_actor and throughput is not None:
        needed = num_actors * throughput.labels_per_s / throughput.decodes_per_cpu_s * DECODE_HEADROOM  # CPUs
        available = max(1, int((cpus - reserved) / task_cpus))  # tasks the free CPUs can run
        decode_on_device = needed / task_cpus > available
        read_tasks = max(read_tasks, min(available, math.ceil(needed / task_cpus)))
        log.info("one actor labels %.0f images/s, one CPU decodes %.0f: %d read/decode tasks of %g CPUs%s",
                 throughput.labels_per_s, throughput.decodes_per_cpu_s, read_tasks, task_cpus,
                 ", JPEGs decoded on the GPUs" if decode_on_device else "")
    return ActorPlan(num_actors, min_actors, cpus_per_actor, gpus_per_actor, task_cpus, max(1, int(cpus_per_actor)),
                     read_tasks, decode_on_device)


def _room_beside_actors(node_cpus: Sequence[float], num_actors: int, cpus_per_actor: float) -> float | None:
    """The CPUs left on the fullest node once ``num_actors`` actors of ``cpus_per_actor`` are spread evenly over
    the nodes that can hold one (in hundredths of a CPU, rounded down); None when no node has room left or the
    nodes are unknown."""
    hosts = [n for n in node_cpus if n >= cpus_per_actor > 0]
    if not hosts:
        return None
    per_node = math.ceil(num_actors / len(hosts))
    rooms = [n - min(per_node, int(n // cpus_per_actor)) * cpus_per_actor for n in hosts]
    room = math.floor(min(rooms) * 100 + 1e-6) / 100
    return room if room > 0 else None


def alive_nodes() -> list[dict]:
    """``ray.nodes()`` records (``NodeID``, ``Resources`` ...) of the connected cluster's nodes that the GCS counts
    alive (a node lost moments ago may still count)."""
    return [node for node in ray.nodes() if node["Alive"]]


def alive_node_cpus(nodes: list[dict] | None = None) -> list[float]:
    """The logical CPUs of each of ``nodes`` (default: :func:`alive_nodes` now)."""
    return [float(node["Resources"].get("CPU", 0)) for node in (alive_nodes() if nodes is None else nodes)]


def node_died(nodes: set[str], wait_s: float | None = None) -> bool:
    """Whether one of the node ids ``nodes`` is dead, or dies within ``wait_s`` seconds (default
    ``NODE_DEATH_WAIT_S``)."""
    deadline = time.monotonic() + (NODE_DEATH_WAIT_S if wait_s is None else wait_s)
    while nodes <= {node["NodeID"] for node in alive_nodes()}:
        if time.monotonic() >= deadline:
            return False
        time.sleep(1.0)
    return True


def lost_a_node(exc: ray.exceptions.RayActorError, nodes: set[str]) -> bool:
    """Whether an actor error of a run on the node ids ``nodes`` comes from a lost node: one an autoscaler drained
    (``preempted``), or an unreachable actor while one of ``nodes`` dies. An actor that ends itself on a model
    fault is just as unreachable, but no node dies."""
    return exc.preempted or (isinstance(exc, ray.exceptions.ActorUnavailableError) and node_died(nodes))


def measure_throughput(config: LabelerConfig, classes: list[list[str]], samples: list[bytes],
                       rounds: int = 3) -> Throughput | None:
    """Decode ``samples`` (image bytes) on one CPU and label them ``rounds`` times after a warm-up, with the
    labeller of ``config``: run where an actor would run (a Ray task with its resources). None if no sample
    decodes."""
    images = []
    start = time.perf_counter()
    for data in samples:
        with contextlib.suppress(ImageDecodeError):
            images.append(decode_image(data))
    decode_rate = len(samples) / (time.perf_counter() - start)
    if not images:
        return None
    # A one-GPU Ray task sees its GPU as cuda:0 (or by its node-wide ordinal), whatever ordinal the job named.
    labeler = DenseCLIP.from_config(dataclasses.replace(config, device=actor_device(config.device)), classes)
    labeler.label_maps(images[:config.batch_size])
    start = time.perf_counter()
    for _ in range(rounds):
        for i in range(0, len(images), config.batch_size):
            labeler.label_maps(images[i:i + config.batch_size])
    return Throughput(rounds * len(images) / (time.perf_counter() - start), decode_rate)


def probe_throughput(plan: LabelingPlan, config: LabelerConfig, classes: list[list[str]],
                     gpus: float) -> Throughput | None:
    """:func:`measure_throughput` on a GPU node of the connected cluster, on the first images of the first shard
    to label; None where there is no GPU now or no decodable image to measure with."""
    if gpus < 1 or not plan.todo:
        return None
    samples = []
    for row in read_shard_rows(plan.todo[0], plan.storage_options):
        if not row["error"]:
            samples.append(row["data"])
        if len(samples) == PROBE_IMAGES:
            break
    if not samples:
        return None
    probe = ray.remote(measure_throughput).options(num_gpus=1, num_cpus=1)
    return ray.get(probe.remote(config, classes, samples))


# --------------------------------------------------------------------------------------------- stages
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


# How running out of memory reads in an error's message, lower-cased: torch's allocators and CUDA's own words,
# and the allocation failures of the CUDA libraries a labeller calls, which take their workspace when called
# (cuBLAS, cuDNN, nvJPEG). cuDNN 9 names them "internal error ... allocation failed", cuDNN 8 often said
# "internal error" alone: an internal error that is no memory shortage fails again on one image and is re-raised.
OUT_OF_MEMORY_MESSAGES = (
    "out of memory", "can't allocate memory", "not enough memory", "cudaerrormemoryallocation",
    "cublas_status_alloc_failed", "cudnn_status_alloc_failed", "cudnn_status_internal_error",
    "cusolver_status_alloc_failed", "cufft_alloc_failed", "cusparse_status_alloc_failed",
    "nvjpeg_status_allocator_failure",
)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says memory ran out: a CUDA out-of-memory error, a CPU allocation failure (torch raises
    a plain RuntimeError naming its allocator), Python's MemoryError, or a CUDA library that could not allocate
    its workspace (:data:`OUT_OF_MEMORY_MESSAGES`)."""
    import torch

    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    message = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(words in message for words in OUT_OF_MEMORY_MESSAGES)


class Labeler:
    """The DenseCLIP stage, a Ray Data callable class: the model and the text embeddings are loaded once per
    actor; each call labels a batch of images (rows whose ``error`` is set pass through unlabelled).

    Adds ``labels`` uint8 ``(H, W)`` and ``confidence`` uint8 ``(H, W)`` (probability x 255; each image's own size)
    and ``fingerprint`` (the weights' identity); drops ``image``. With ``encode``, the actor also encodes the
    maps (:func:`encode_batch`): its rows are ready to commit.

    Errors by cause: only a problem of the image itself becomes an error row (here: not a non-empty uint8
    RGB array, or a JPEG no decoder reads; decoding, size limits and keys are checked by the stages before).
    Running out of memory (decoding JPEGs on the device or labelling) frees the cache and retries the batch in
    halves, down to one image at a time at the same settings. Anything else the model raises (or memory that
    runs out for a single image) is no input error: the actor ends, so Ray starts a fresh one (a CUDA error can
    leave the device unusable for the process) and retries the batch, at most ``MAX_TASK_RETRIES`` times before
    the job fails; the batch's shard is never committed.
    """

    def __init__(self, config: LabelerConfig, classes: list[list[str]], torch_threads: int = 1,
                 encode: bool = False):
        import torch  # here, not at the top: the read/decode/encode task workers never need torch

        torch.set_num_threads(torch_threads)
        config = dataclasses.replace(config, device=actor_device(config.device))
        if config.pretrained == "random":
            torch.manual_seed(0)  # random-weight baselines: every actor, and a resumed run, draws the same weights
        self.dense_clip = DenseCLIP.from_config(config, classes)
        self.fingerprint = self.dense_clip.clip.fingerprint
        self.encode = encode
        # The Ray node this actor runs on, recorded with each part (which machines labelled what).
        self.node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""

    def _free_memory(self) -> None:
        import gc

        import torch

        gc.collect()
        if self.dense_clip.clip.device.type == "cuda":
            torch.cuda.empty_cache()

    def _label(self, images: list, keys: list[str]) -> list[tuple[np.ndarray, np.ndarray] | str]:
        """Label ``images`` (checked arrays, or JPEG bytes decoded on the device first; ``keys`` name them), in
        smaller calls after running out of memory; a JPEG no decoder reads comes back as the reason (a str).
        Re-raises the model's other exceptions, and running out of memory on a single image."""
        results: list[tuple[np.ndarray, np.ndarray] | str] = []
        start, size = 0, len(images)
        while start < len(images):
            chunk = images[start:start + size]
            try:
                results += self._decode_and_label(chunk, keys[start:start + size])
                start += len(chunk)
                continue
            except (RuntimeError, MemoryError) as exc:  # what running out of memory raises (CUDA's is a RuntimeError)
                if size == 1 or not is_out_of_memory(exc):
                    raise
                log.warning("out of memory labelling %d images (%s); retrying %d at a time", size, exc,
                            max(1, size // 2))
            # Outside the except block: its traceback, which holds the failed call's tensors, is gone by now.
            size = max(1, size // 2)
            self._free_memory()
        return results

    def _decode_and_label(self, images: list, keys: list[str]) -> list[tuple[np.ndarray, np.ndarray] | str]:
        """:meth:`_label` of one call: the JPEG bytes among ``images`` decoded on the device, then everything that
        decoded labelled in one batch."""
        jpegs = [i for i, image in enumerate(images) if isinstance(image, bytes)]
        images = list(images)
        for i, image in zip(jpegs, self._decode_jpegs([images[i] for i in jpegs], [keys[i] for i in jpegs])):
            images[i] = image
        decoded = [i for i, image in enumerate(images) if not isinstance(image, str)]
        results: list = list(images)
        for i, maps in zip(decoded, self.dense_clip.label_maps([images[i] for i in decoded])):
            results[i] = maps
        return results

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            labelled = self.label_batch(batch)
        except Exception:  # no input error (see the class): a fresh actor retries the batch
            log.exception("the model failed on a batch of shard(s) %s; this actor exits so that Ray restarts it "
                          "and retries the batch (at most %d times)", sorted(set(batch["shard"])), MAX_TASK_RETRIES)
            sys.stderr.flush()
            os._exit(1)  # not an exception: Ray Data would fail the job on it without a retry
        labelled["node"] = np.full(len(labelled["key"]), self.node, dtype=object)
        return encode_batch(labelled) if self.encode else labelled

    def _decode_jpegs(self, blobs: list[bytes], keys: list[str]) -> list:
        """JPEG bytes -> ``(3, H, W)`` uint8 tensors decoded on the labeller's device, in one batched call; where
        that fails, image by image, with Pillow for what the device decoder refuses (an ``(H, W, 3)`` array)
        and the reason (a str) for what no decoder can read. Running out of memory is raised, not worked
        around: :meth:`_label` retries with fewer images."""
        import torch
        import torchvision

        if not blobs:
            return []
        rgb = torchvision.io.ImageReadMode.RGB
        device = self.dense_clip.device
        tensors = [torch.frombuffer(bytearray(blob), dtype=torch.uint8) for blob in blobs]
        try:
            return torchvision.io.decode_jpeg(tensors, mode=rgb, device=device)
        except RuntimeError as exc:
            if is_out_of_memory(exc):
                raise
            log.warning("decoding %d JPEGs on %s failed; decoding them one by one", len(blobs), device)
        decoded = []
        for tensor, blob, key in zip(tensors, blobs, keys):
            try:
                decoded.append(torchvision.io.decode_jpeg(tensor, mode=rgb, device=device))
            except RuntimeError as exc:
                if is_out_of_memory(exc):
                    raise
                try:
                    decoded.append(decode_image(blob, key))
                except ImageDecodeError as error:
                    decoded.append(error.reason)
        return decoded

    def label_batch(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Decoded rows -> rows with ``labels``, ``confidence`` and ``fingerprint`` (see the class); rows with
        ``jpeg`` bytes (:func:`decode_batch` with ``defer_jpeg``) are decoded on the labeller's device, in the
        calls that label them. Raises what the model raises, except out-of-memory errors that smaller calls
        avoid."""
        errors = list(batch["error"])
        images = list(batch["image"])
        for i, error in enumerate(errors):
            if error:
                continue
            if "jpeg" in batch and batch["jpeg"][i]:
                images[i] = bytes(batch["jpeg"][i])
                continue
            try:
                check_rgb_image(images[i])
            except ValueError as exc:
                errors[i] = f"unusable image: {exc}"
        todo = [i for i, error in enumerate(errors) if not error]
        labels, confidence = [_NO_MAP] * len(errors), [_NO_MAP] * len(errors)
        for i, result in zip(todo, self._label([images[i] for i in todo], [str(batch["key"][i]) for i in todo])):
            if isinstance(result, str):
                errors[i] = result
            else:
                labels[i], confidence[i] = result
        return {"key": batch["key"], "shard": batch["shard"], "shard_total": batch["shard_total"],
                "error": _objects(errors), "labels": _objects(labels), "confidence": _objects(confidence),
                "fingerprint": np.full(len(errors), self.fingerprint, dtype=object)}


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


# ------------------------------------------------------------------------------------------- commits
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


# ------------------------------------------------------------------------------------------ pipeline
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

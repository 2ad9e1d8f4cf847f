"""Planning a labeling run: what to label (each input shard's content fingerprint against the committed parts:
the incremental plan), under which provenance, and how many actors of which size on the nodes alive now."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import posixpath
import re
import time
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import fsspec
import ray

from denseclip import storage
from denseclip.config import LabelerConfig
from denseclip.lease import Lease
from denseclip.mask_store import (
    ERRORS_DIR,
    FORMAT_VERSION,
    INDEX_DIR,
    MANIFESTS_DIR,
    MASKS_DIR,
    MaskStore,
    PartDamage,
    mask_format,
    provenance_differences,
)
from denseclip.names import AUTO
from denseclip.shards import expand_shards
from denseclip.vocabulary import load_templates

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
# Options that change the labels, hence part of the provenance (batch size and device do not).
RESULT_OPTIONS = ("protocol", "head", "synonyms", "name_softmax", "normalisation", "mode", "resize_to", "short_side",
                  "temperature", "background_threshold", "key_smoothing", "prompt_denoising", "upsample_topk",
                  "precision", "size_bucket")
SLIDE_OPTIONS = ("crop_size", "crop_stride")
# An unreachable actor is a lost node only if a node of the run dies: Ray's health checks take 15-30 s to mark a
# killed node dead, so the run waits this long for that before it takes the error for the actor's own (a model
# fault ends the actor on purpose, and its caller sees the same ActorUnavailableError).
NODE_DEATH_WAIT_S = 60.0
# Shards whose content is hashed at once when planning a local run (hashlib releases the GIL on large reads).
FINGERPRINT_THREADS = 8
# GPU actors: decode tasks are planned for this much more than the measured labelling rate (rates vary with the
# images' sizes and the node's other work).
DECODE_HEADROOM = 1.25


class LabelingError(ValueError):
    """A labeling job that cannot start (input, output or provenance problem); the message names it."""


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


def resolve_device(config: LabelerConfig) -> LabelerConfig:
    """``config`` with device "auto" resolved: ``cuda`` when the Ray cluster this process is connected to has
    GPUs, or, before any Ray is started, when this machine has one (what a private local Ray would find); else
    ``cpu``. The plan's provenance and the actors use the same answer."""
    if config.device != AUTO:
        return config
    if ray.is_initialized():
        return config.with_gpus(ray.cluster_resources().get("GPU", 0) > 0)
    import torch  # the driver only

    return config.with_gpus(torch.cuda.device_count() > 0)


def run_provenance(config: LabelerConfig, classes: list[list[str]]) -> dict:
    """Everything that determines the labels, except the weights' fingerprint (added by the actors)."""
    from denseclip.models import weights_activation  # torch: the driver only, never the read/encode tasks

    names = RESULT_OPTIONS + (SLIDE_OPTIONS if config.mode == "slide" else ())
    config = resolve_device(config).resolved()
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

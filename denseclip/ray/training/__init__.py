"""DenseCLIP+ on Ray Train: the paper's Algorithm 1 (guided learning on DenseCLIP pseudo labels for N_g steps,
then optional self-training) as a ``TorchTrainer`` job over WebDataset shards, with periodic checkpoints,
recovery from worker failures, and an evaluation on validation shards written next to the final checkpoint.

    shards -> read + decode (Ray Data tasks) -> get_dataset_shard -> augment on the worker's device
        -> make_targets -> DDP train_step (autocast)
    every N steps: report metrics (+ a checkpoint); at the end: evaluate -> report.json + the final checkpoint

The validation set is split over the workers by Ray Data (every image scored by exactly one worker); their
confusion matrices and overlay samples are merged on every worker.

A run is one validated :class:`TrainJob` (the YAML specs in ``jobs/train_*.yaml``); the method's pieces
(target network, pseudo labels, losses, schedule) come from ``denseclip.plus``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import re
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import ray
import ray.train.torch
import ray.util.queue
import safetensors.torch
import torch
import torch.distributed as dist
from ray.train.torch import TorchTrainer
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from torch import nn

from denseclip import storage
from denseclip.config import ConfigError, LabelerConfig, resolve_vocabulary
from denseclip.damage import DamagedPartError
from denseclip.datasets import CUSTOM, DATASET_NAMES, DatasetInfo, custom_dataset, get_dataset
from denseclip.evaluation import Evaluation, ImageLabeler
from denseclip.gpu import to_device
from denseclip.mask_store import MaskStore
from denseclip.metrics import ConfusionMatrix, summarize
from denseclip.models import ModelLoadError, check_weights, load_clip, weights_activation
from denseclip.names import DEFAULT_HEAD, RESIZE_AUTO, RESIZE_NATIVE
from denseclip.plus.amp import FP32, MixedPrecision
from denseclip.plus.pseudo_labels import DenseCLIPTeacher, build_teacher
from denseclip.plus.target import SegmentationTarget, TargetConfig, build_target
from denseclip.plus.training import (
    COVERAGE_COUNTS,
    PHASES,
    Batch,
    TrainingConfig,
    augment,
    build_optimizer,
    collate,
    make_targets,
    phase,
    set_learning_rate,
    target_counts,
    target_coverage,
    train_step,
)
from denseclip.predictor import DenseCLIP
from denseclip.ray.training.data import read_samples
from denseclip.report import write_report
from denseclip.robustness import CLEAN
from denseclip.shards import expand_shards
from denseclip.vocabulary import VocabularyError

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
STATE_FILE = "training_state.pt"
META_FILE = "checkpoint.json"
REPORT_FILE = "report.json"
# What the evaluation writes next to the final checkpoint (denseclip.report.write_report).
REPORT_FILES = (REPORT_FILE, "index.html", "tables.md", "confusion.png", "overlays/")
TrainingFailedError = ray.train.TrainingFailedError
EVAL_BATCH = 16
REFERENCE_TEACHER = "denseclip_teacher"  # report.json's "reference" when there is no ground truth
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


# ---------------------------------------------------------------------------------------------- job spec
@dataclass
class DataSpec:
    """Where the images come from.

    Attributes:
        train, val: WebDataset shards (folder, glob, ``.tar`` or a list; local or fsspec URLs) with ``jpg``
            (or ``png``) images and ``seg.png`` ground truth (needed for val and the zero-shot and seen-only
            settings; never read with ``dataset: custom``, where ``val`` defaults to ``train``).
        classes: with ``dataset: custom`` (only), the vocabulary, as ``pipelines/label.py``'s ``vocabulary``:
            a class file (one class per line, synonyms after commas), a list of names, a list of name lists
            (synonyms after the first), or a dataset name; replaced by the name lists when validated.
        mask_store: the Parquet mask store of ``pipelines/label.py``, for
            ``training.pseudo_labels: precomputed``.
        skip_damaged: train on the rest of a mask store with damaged parts (their samples are skipped, the parts
            named in the read tasks' log) instead of failing on the first one met.
        materialize: decode both sets once into Ray's object store instead of on every pass (small sets only).
        shuffle_buffer: rows in each worker's local shuffle buffer (0: no shuffling).
    """

    train: str | list[str] = ""
    val: str | list[str] = ""
    classes: str | list | None = None
    mask_store: str | None = None
    skip_damaged: bool = False
    materialize: bool = False
    shuffle_buffer: int = 256


@dataclass
class WorkerSpec:
    """The ``ScalingConfig``: ``num_workers`` training workers with ``cpus_per_worker`` each (fractional on
    small machines, so Ray Data's read tasks of ``data_cpus`` CPUs still find room), one GPU each with
    ``use_gpu``."""

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    data_cpus: float = 1.0


@dataclass
class RunSpec:
    """The ``RunConfig``: run ``name`` under ``storage_path`` (local or ``s3://``; re-running the same name
    resumes from its latest checkpoint), ``max_failures`` worker-group restarts, a checkpoint every
    ``checkpoint_every`` steps (the newest ``keep_checkpoints`` kept), metrics every ``log_every`` steps, and
    ``resume_from``: a checkpoint folder (of any run) to continue from when this run has none of its own."""

    name: str = ""
    storage_path: str = "runs/train"
    max_failures: int = 2
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    log_every: int = 50
    resume_from: str | None = None


@dataclass
class EvaluationSpec:
    """Validation: every ``every`` steps (0: only at the end; with self-training also at N_g, where the drift
    starts), the DenseCLIP teacher scored on the same images when ``teacher``, ``num_overlays`` pictures."""

    every: int = 0
    teacher: bool = True
    num_overlays: int = 6


@dataclass
class TrainJob:
    """One DenseCLIP+ training job: dataset (vocabulary and zero-shot split), data, the DenseCLIP teacher
    (``labeler``), the method and schedule (``training``), workers, run and evaluation."""

    dataset: str
    data: DataSpec
    labeler: LabelerConfig
    training: TrainingConfig
    workers: WorkerSpec = field(default_factory=WorkerSpec)
    run: RunSpec = field(default_factory=RunSpec)
    evaluation: EvaluationSpec = field(default_factory=EvaluationSpec)

    @classmethod
    def from_dict(cls, spec: dict) -> TrainJob:
        """Build and validate from a parsed YAML spec; raises ``ConfigError`` naming the first bad field."""
        if not isinstance(spec, dict):
            raise ConfigError(f"job spec: must be a mapping of sections, got {type(spec).__name__}")
        sections = {"dataset", "data", "labeler", "training", "workers", "run", "evaluation"}
        unknown = sorted(set(spec) - sections)
        if unknown:
            raise ConfigError(f"{unknown[0]}: unknown section (known: {', '.join(sorted(sections))})")
        for name in sections - {"dataset"}:
            if not isinstance(spec.get(name, {}), dict):
                raise ConfigError(f"{name}: must be a mapping, got {spec[name]!r}")
        job = cls(dataset=spec.get("dataset", ""),
                  data=_section(DataSpec, spec.get("data", {}), "data"),
                  labeler=LabelerConfig.from_dict(spec.get("labeler", {}), "labeler", dataset=spec.get("dataset")),
                  training=TrainingConfig.from_dict(spec.get("training", {}), "training"),
                  workers=_section(WorkerSpec, spec.get("workers", {}), "workers"),
                  run=_section(RunSpec, spec.get("run", {}), "run"),
                  evaluation=_section(EvaluationSpec, spec.get("evaluation", {}), "evaluation"))
        job.validate()
        return job

    def validate(self) -> None:
        if self.dataset not in (*DATASET_NAMES, CUSTOM):
            raise ConfigError(f"dataset: must be one of {', '.join((*DATASET_NAMES, CUSTOM))} "
                              f"(got {self.dataset!r})")
        data, workers, run, evaluation = self.data, self.workers, self.run, self.evaluation
        if self.dataset == CUSTOM:
            data.classes = _custom_classes(data.classes)
            data.val = data.val or data.train
            if self.training.setting != "annotation_free":
                _fail("training", "setting", self.training.setting, "must be annotation_free with dataset: "
                      "custom (a free vocabulary has no ground truth)")
        elif data.classes is not None:
            _fail("data", "classes", data.classes, f"is only for dataset: {CUSTOM} (the {self.dataset} classes "
                  "are fixed)")
        for name in ("train", "val"):
            value = getattr(data, name)
            values = [value] if isinstance(value, str) else value
            if not (values and isinstance(values, list) and all(isinstance(v, str) and v for v in values)):
                _fail("data", name, value, "must be a shard path, glob or folder, or a list of them")
        if self.training.uses_pseudo_labels and self.training.pseudo_labels == "precomputed" \
                and not data.mask_store:
            _fail("data", "mask_store", data.mask_store, "is needed with training.pseudo_labels: precomputed")
        _require(data.mask_store is None or isinstance(data.mask_store, str), "data", "mask_store",
                 data.mask_store, "must be the mask store's folder or URL")
        for section, name in (("data", "materialize"), ("data", "skip_damaged"), ("workers", "use_gpu"),
                              ("evaluation", "teacher")):
            value = getattr(getattr(self, section), name)
            _require(isinstance(value, bool), section, name, value, "must be true or false")
        _require(_natural(data.shuffle_buffer, zero=True), "data", "shuffle_buffer", data.shuffle_buffer,
                 "must be an integer >= 0")
        _require(_natural(workers.num_workers), "workers", "num_workers", workers.num_workers,
                 "must be a positive integer")
        for name in ("cpus_per_worker", "data_cpus"):
            value = getattr(workers, name)
            _require(_number(value) and value > 0, "workers", name, value, "must be a number > 0")
        if self.labeler.device not in ("cpu", "auto") and not workers.use_gpu:
            _fail("labeler", "device", self.labeler.device, "the teacher runs on its worker's device: set "
                  "workers.use_gpu: true to train on GPUs")
        if self.training.batch_size % workers.num_workers:
            _fail("training", "batch_size", self.training.batch_size,
                  f"must be a multiple of workers.num_workers={workers.num_workers} (images per worker)")
        _require(isinstance(run.name, str) and bool(_RUN_NAME.match(run.name)), "run", "name", run.name,
                 "must be letters, digits and _ . - (it names the run's folder)")
        _require(isinstance(run.storage_path, str) and bool(run.storage_path), "run", "storage_path",
                 run.storage_path, "must be a local folder or a URL like s3://bucket/prefix")
        for name in ("checkpoint_every", "keep_checkpoints", "log_every"):
            value = getattr(run, name)
            _require(_natural(value), "run", name, value, "must be a positive integer")
        _require(isinstance(run.max_failures, int) and run.max_failures >= -1, "run", "max_failures",
                 run.max_failures, "must be an integer >= -1 (-1: retry forever)")
        _require(run.resume_from is None or (isinstance(run.resume_from, str) and bool(run.resume_from)),
                 "run", "resume_from", run.resume_from, "must be a checkpoint folder or null")
        for name in ("every", "num_overlays"):
            value = getattr(evaluation, name)
            _require(_natural(value, zero=True), "evaluation", name, value, "must be an integer >= 0")

    def to_dict(self) -> dict:
        """The spec as plain data (what ``from_dict`` reads back)."""
        out = dataclasses.asdict(self)
        out["labeler"].pop("extra")
        return out

    @property
    def info(self) -> DatasetInfo:
        return custom_dataset(self.data.classes) if self.dataset == CUSTOM else get_dataset(self.dataset)

    @property
    def teacher_class_ids(self) -> list[int] | None:
        """The dataset classes the teacher labels among, as its vocabulary: the unseen ones in the zero-shot
        setting (the official teacher scores only those), every class otherwise (None). A mask store for
        ``training.pseudo_labels: precomputed`` is labelled with the same vocabulary."""
        return self.info.unseen_ids if self.training.setting == "zero_shot" else None

    @property
    def teacher_classes(self) -> list[list[str]]:
        """The teacher's vocabulary: one name list per class of :attr:`teacher_class_ids`."""
        ids = self.teacher_class_ids
        classes = [list(c) for c in self.info.classes]
        return classes if ids is None else [classes[i] for i in ids]

    @property
    def has_ground_truth(self) -> bool:
        """Whether the validation shards are scored against their annotation (else: against the teacher)."""
        return self.dataset != CUSTOM

    def validation_steps(self) -> list[int]:
        """Steps (counted from 1) after which the target is scored on the validation set; the last is the
        end."""
        total, every = self.training.iterations, self.evaluation.every
        steps = set(range(every, total, every)) if every else set()
        if self.training.self_training and 0 < self.training.num_guided < total:
            steps.add(self.training.num_guided)
        return sorted(steps | {total})


def _custom_classes(value) -> list[list[str]]:
    """``data.classes`` of a custom job -> one name list per class (read as ``label.py``'s ``vocabulary``)."""
    if not isinstance(value, (str, list)) or not value:
        _fail("data", "classes", value, "must be a class file (one class per line, synonyms after commas) or a "
              "list of classes")
    try:
        return resolve_vocabulary(value)
    except (ConfigError, VocabularyError) as exc:
        raise ConfigError(f"data.classes: {exc}") from exc


def _section(cls, values: dict, where: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown field (known: {', '.join(sorted(names))})")
    return cls(**values)


def _fail(section: str, name: str, value, problem: str) -> None:
    raise ConfigError(f"{section}.{name}: {problem} (got {value!r})")


def _require(ok: bool, section: str, name: str, value, problem: str) -> None:
    if not ok:
        _fail(section, name, value, problem)


def _natural(value, zero: bool = False) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if zero else value > 0)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_inputs(job: TrainJob) -> None:
    """Check what the job reads before any cluster work: the shards exist, the mask store holds masks of this
    dataset's vocabulary, ``run.resume_from`` is a checkpoint of the same target, the teacher's weights can be
    had (offline: one line, not a traceback from every worker). Raises ``ConfigError``."""
    try:
        check_weights(job.labeler.model, job.labeler.pretrained)
    except ModelLoadError as exc:
        raise ConfigError(f"labeler: {exc}") from exc
    for name in ("train", "val"):
        try:
            expand_shards(getattr(job.data, name))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"data.{name}: {exc}") from exc
    if job.training.uses_pseudo_labels and job.training.pseudo_labels == "precomputed":
        try:
            provenance = MaskStore(job.data.mask_store, skip_damaged=job.data.skip_damaged).provenance
        except DamagedPartError as exc:
            _fail("data", "mask_store", job.data.mask_store, f"has a damaged part: {exc} (data.skip_damaged: true "
                  "trains on the rest)")
        if provenance is None:
            _fail("data", "mask_store", job.data.mask_store, "holds no committed masks")
        vocabulary = provenance.get("vocabulary")
        if vocabulary is not None and vocabulary != job.teacher_classes:
            if job.teacher_class_ids is not None and vocabulary == [list(c) for c in job.info.classes]:
                _fail("data", "mask_store", job.data.mask_store, f"holds each pixel's argmax over all the "
                      f"{job.dataset} classes; zero-shot targets take the teacher's argmax among the unseen classes "
                      "(a pixel annotated unseen whose argmax is a seen class would go unsupervised): label with the "
                      "unseen classes' vocabulary, as pipelines/reproduce.py does")
            _fail("data", "mask_store", job.data.mask_store, f"was labelled with another vocabulary than the "
                  f"{'unseen ' if job.teacher_class_ids is not None else ''}{job.dataset} classes (its label ids "
                  "would mean other classes)")
    if job.run.resume_from:
        try:
            meta = read_checkpoint_meta(job.run.resume_from)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"run.resume_from: not a DenseCLIP+ checkpoint ({exc})") from exc
        ours = _target_dict(job.training.target)
        changed = sorted(k for k in ours if k != "backbone_weights" and meta["target"].get(k) != ours[k])
        if changed or meta["class_names"] != job.info.class_names:
            _fail("run", "resume_from", job.run.resume_from, "holds another target network (differs in "
                  f"{', '.join(changed) or 'classes'}) than training.target")


# ---------------------------------------------------------------------------------------------- data
def build_datasets(job: TrainJob) -> dict[str, ray.data.Dataset]:
    """The ``train`` and ``val`` Ray datasets of decoded rows (see ``train_data.decode_training_sample``)."""

    def read(shards: str | list[str], with_label: bool, mask_store: str | None) -> ray.data.Dataset:
        urls = expand_shards(shards)
        items = ray.data.from_items([{"shard": url} for url in urls], override_num_blocks=len(urls))
        return items.flat_map(read_samples, num_cpus=job.workers.data_cpus,
                              fn_kwargs={"num_classes": job.info.num_classes, "with_label": with_label,
                                         "mask_store": mask_store, "label_lut": job.info.label_lut,
                                         "skip_damaged": job.data.skip_damaged,
                                         "with_confidence": job.training.confidence_threshold is not None,
                                         "pseudo_label_ids": job.teacher_class_ids})

    training = job.training
    precomputed = training.uses_pseudo_labels and training.pseudo_labels == "precomputed"
    datasets = {"train": read(job.data.train, training.setting in ("zero_shot", "seen_only"),
                              job.data.mask_store if precomputed else None),
                "val": read(job.data.val, job.has_ground_truth, None)}
    return {name: ds.materialize() for name, ds in datasets.items()} if job.data.materialize else datasets


def training_batch(rows: dict[str, np.ndarray], rng: np.random.Generator, config: TrainingConfig,
                   device: torch.device | str = "cpu") -> Batch:
    """Rows of one worker's step -> the augmented batch ``denseclip.plus.training`` expects, on ``device``.

    The images travel to the device as they were decoded (uint8, a quarter of float's bytes; one copy for all of
    them, :func:`denseclip.gpu.to_device`) and are augmented there; the random parameters come from ``rng`` on
    the host, so the batch depends only on the rows and the seed of ``rng`` (and on the device's arithmetic)."""
    images = to_device(list(rows["image"]), device)  # (H, W, 3) uint8 each
    maps = {name: to_device(list(rows[name]), device)
            for name in ("label", "pseudo_label", "pseudo_confidence") if name in rows}
    samples = []
    for i, pixels in enumerate(images):
        image = pixels.permute(2, 0, 1).float() / 255
        own = {name: values[i] if values[i].is_floating_point() else values[i].long() for name, values in maps.items()}
        samples.append(augment(image, own, rng, config))
    return collate(samples)


# ---------------------------------------------------------------------------------------------- checkpoints
def _target_dict(target: TargetConfig) -> dict:
    out = dataclasses.asdict(target)
    out["aspp_rates"] = None if target.aspp_rates is None else list(target.aspp_rates)
    return out


def save_checkpoint(directory: str, model: SegmentationTarget, optimizer: torch.optim.Optimizer, step: int,
                    job: TrainJob, history: dict, precision: MixedPrecision = FP32) -> None:
    """Write a checkpoint folder: ``model.safetensors`` (the target's weights), ``training_state.pt``
    (optimizer, fp16 loss scaler and step, read back with ``weights_only=True``) and ``checkpoint.json`` (what
    the network is, the job, ``history`` = the training log and validation records so far)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    safetensors.torch.save_file(state, os.path.join(directory, MODEL_FILE))
    torch.save({"optimizer": optimizer.state_dict(), "scaler": precision.state_dict(), "step": step},
               os.path.join(directory, STATE_FILE))
    meta = {"step": step, "dataset": job.dataset, "class_names": list(job.info.class_names),
            "clip_model": job.labeler.model, "clip_head": job.labeler.head, "target": _target_dict(job.training.target),
            "job": job.to_dict(), **history}
    with open(os.path.join(directory, META_FILE), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)


def read_checkpoint_meta(path: str) -> dict:
    """``checkpoint.json`` of the checkpoint folder ``path`` (local or fsspec URL)."""
    return json.loads(storage.read_bytes(storage.join(path, META_FILE)))


def load_target_checkpoint(path: str, device: str | torch.device = "cpu",
                           resize_to: tuple[int, int] | str | None = RESIZE_AUTO) -> SegmentationTarget:
    """The trained target network of the checkpoint folder ``path`` (local or fsspec URL), in eval mode, ready
    for ``predict`` / ``label_images``. Its architecture comes from ``checkpoint.json``; no CLIP weights are
    read. ``label_images`` scores at ``resize_to`` (``(long, short)``, None or "native": as the images are),
    by default ("auto") at the job's ``training.resize_to``, as the official test pipeline does."""
    meta = read_checkpoint_meta(path)
    # Checkpoints from before the classifier was a choice used the cosine one.
    target = {"classifier": "cosine", **meta["target"], "backbone_weights": None}
    target["aspp_rates"] = None if target["aspp_rates"] is None else tuple(target["aspp_rates"])
    state = safetensors.torch.load(storage.read_bytes(storage.join(path, MODEL_FILE)))
    config = TargetConfig(**target)
    clip = load_clip(meta["clip_model"], "random") if config.backbone == "clip" else None
    model = build_target(config, state["classifier.embeddings"], state["classifier.class_of_name"], clip=clip,
                         clip_head=meta.get("clip_head", DEFAULT_HEAD))
    model.load_state_dict(state, strict=True)
    model.resize_to = scoring_resize(meta, resize_to)
    return model.to(device).eval()


def scoring_resize(meta: dict, resize_to: tuple[int, int] | str | None = RESIZE_AUTO) -> tuple[int, int] | None:
    """The keep-ratio resize the target of a checkpoint (``meta``: its ``checkpoint.json``) scores images at:
    ``resize_to``, "auto" meaning the job's ``training.resize_to``; None for "native" or None."""
    if resize_to == RESIZE_AUTO:
        resize_to = meta.get("job", {}).get("training", {}).get("resize_to")
    return None if resize_to in (None, RESIZE_NATIVE) else tuple(resize_to)


def restore_checkpoint(path: str, model: SegmentationTarget, optimizer: torch.optim.Optimizer,
                       precision: MixedPrecision = FP32) -> tuple[int, dict]:
    """Load weights, optimizer and loss-scaler state from the checkpoint folder ``path`` (local or fsspec
    URL); returns ``(step, history)``."""
    device = model.mean.device
    state = safetensors.torch.load(storage.read_bytes(storage.join(path, MODEL_FILE)))
    model.load_state_dict(state, strict=True)
    training = torch.load(io.BytesIO(storage.read_bytes(storage.join(path, STATE_FILE))), map_location=device,
                          weights_only=True)
    optimizer.load_state_dict(training["optimizer"])
    precision.load_state_dict(training.get("scaler", {}))
    meta = read_checkpoint_meta(path)
    return training["step"], {"log": meta.get("log", []), "validation": meta.get("validation", []),
                              "target_coverage": meta.get("target_coverage", {})}


# ---------------------------------------------------------------------------------------------- worker
@dataclass
class StepContext:
    """What a step callback sees on each worker, after the targets are made and before the optimizer step.

    ``batch``: the augmented batch (``image (B, 3, c, c)`` ...); ``targets``: ``(B, c, c)`` int64,
    255 = ignored, exactly what the loss is given; ``step`` counts from 0."""

    step: int
    rank: int
    world_size: int
    phase: str
    batch: Batch
    targets: torch.Tensor


StepCallback = Callable[[StepContext], None]


@dataclass
class _Worker:
    """Everything one training worker holds."""

    job: TrainJob
    rank: int
    world_size: int
    device: torch.device
    labeler: DenseCLIP  # the job's labeler, under its protocol: DenseCLIP scored beside the target
    teacher: DenseCLIPTeacher  # the same model on each training crop as it is (see build_teacher)
    model: SegmentationTarget  # the network itself (saved, used for pseudo labels and evaluation)
    trained: nn.Module  # the same network under DistributedDataParallel when there are several workers
    optimizer: torch.optim.Optimizer
    precision: MixedPrecision
    # Where this worker's targets came from since the last checkpoint: target_counts per phase of PHASES, summed
    # on the device (no step waits for it) and over the workers at each checkpoint (_gather_coverage).
    coverage: torch.Tensor | None = None


def build_worker(job: TrainJob, rank: int, world_size: int, device: torch.device) -> _Worker:
    """The labeler (the job's, in its precision), its teacher on training crops, the target network (scored at
    the training's ``resize_to``, as the official test pipeline resizes) and its optimizer on ``device``, for
    worker ``rank`` of ``world_size``."""
    labeler_config = dataclasses.replace(job.labeler, device=str(device))
    labeler = DenseCLIP.from_config(labeler_config, job.info.classes)
    teacher = build_teacher(labeler_config, job.teacher_classes, job.teacher_class_ids,
                            job.training.pseudo_label_refinement, clip=labeler.clip)
    torch.manual_seed(job.training.seed)
    model = build_target(job.training.target, labeler.name_embeddings, labeler.class_of_name,
                         clip=labeler.clip, clip_head=labeler.head)
    model.resize_to = job.training.resize_to
    if device.type == "cuda" and world_size > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    optimizer = build_optimizer(model, job.training)
    return _Worker(job, rank, world_size, device, labeler, teacher, model, model, optimizer,
                   MixedPrecision.for_device(job.training.precision, device),
                   torch.zeros(len(PHASES), len(COVERAGE_COUNTS), dtype=torch.long, device=device))


def _setup_worker(job: TrainJob) -> _Worker:
    context = ray.train.get_context()
    torch.set_num_threads(max(1, round(job.workers.cpus_per_worker)))
    # The device Ray Train gave this worker (its GPU with use_gpu), whatever ordinal job.labeler.device names.
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL collectives (all_gather_object) work on the current device
    return build_worker(job, context.get_world_rank(), context.get_world_size(), device)


def train_on(worker: _Worker, rows: dict[str, np.ndarray], step: int,
             callbacks: Sequence[StepCallback] = ()) -> tuple[torch.Tensor, str, float]:
    """One step of Algorithm 1 on this worker's ``rows``: augment (on the device, seeded by seed, rank and
    step), make the targets (counted in ``worker.coverage``), call ``callbacks``, and take the optimizer step.
    Returns ``(loss, phase, lr)``; the loss stays on the device (reading it would wait for the step to finish)."""
    training = worker.job.training
    rng = np.random.default_rng([training.seed, worker.rank, step])
    batch = training_batch(rows, rng, training, worker.device)
    lr = set_learning_rate(worker.optimizer, step, training)
    unseen_ids = worker.job.info.unseen_ids
    targets = make_targets(batch, step, training, worker.model, worker.teacher, unseen_ids, worker.precision)
    step_phase = phase(step, training)
    worker.coverage[PHASES.index(step_phase)] += target_counts(batch, targets, training, unseen_ids)
    for callback in callbacks:
        callback(StepContext(step, worker.rank, worker.world_size, step_phase, batch, targets))
    loss = train_step(worker.trained, worker.optimizer, batch, targets, worker.precision, training.loss_average)
    return loss, step_phase, lr


def _batches(shard, batch_size: int, shuffle_buffer: int) -> Iterator[dict[str, np.ndarray]]:
    """Endless ``batch_size``-row batches of a worker's split, epoch after epoch. Splits are equal and partial
    batches dropped, so all workers start each epoch at the same step (Ray Data waits for all of them)."""
    while True:
        empty = True
        for rows in shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=True,
                                       local_shuffle_buffer_size=shuffle_buffer or None):
            empty = False
            yield rows
        if empty:
            raise ValueError(f"a worker's share of data.train holds fewer than {batch_size} usable images "
                             "(training.batch_size / workers.num_workers)")


def evaluate_split(labeler: ImageLabeler, worker: _Worker, num_overlays: int,
                   reference: ImageLabeler | None = None) -> Evaluation:
    """Score ``labeler`` on this worker's split of the validation set against the ground truth, or against
    ``reference``'s labels of the same images when given, and merge the scores of all workers.

    Ray Data splits the set (``TrainingData``), so every image is scored by exactly one worker; the result,
    the same on every worker, holds the confusion matrix of the whole set and ``num_overlays`` overlay samples
    chosen by key (the same whatever the split)."""
    info = worker.job.info
    evaluation = Evaluation(info.num_classes, info.ignore_index, num_overlays)
    for rows in ray.train.get_dataset_shard("val").iter_batches(batch_size=EVAL_BATCH, batch_format="numpy"):
        items = [(str(key), np.asarray(image)) for key, image in zip(rows["key"], rows["image"])]
        if reference is None:
            truths = list(rows["label"])
        else:
            truths = [labels for labels, _ in reference.label_images([image for _, image in items])]
        evaluation.add_labelled(labeler, CLEAN, [(key, image, truth) for (key, image), truth in zip(items, truths)])
    if worker.world_size == 1:
        return evaluation
    parts: list[Evaluation | None] = [None] * worker.world_size
    dist.all_gather_object(parts, evaluation)
    merged = evaluation.empty()
    for part in parts:
        merged.merge(part)
    if len(merged.keys) != sum(part.num_images for part in parts):
        raise RuntimeError("a validation image was scored by more than one worker")
    return merged


def _evaluate_target(worker: _Worker, num_overlays: int) -> Evaluation:
    """The target on the validation set: against the annotation, or, with a free vocabulary (no ground
    truth), against the DenseCLIP teacher's labels of the same images."""
    reference = None if worker.job.has_ground_truth else worker.labeler
    return evaluate_split(worker.model, worker, num_overlays, reference)


def _summary(conf: ConfusionMatrix, job: TrainJob) -> dict:
    """The report numbers; without ground truth, the agreement with the teacher (``pixel_agreement``: the share
    of pixels labelled alike, ``per_class_agreement``: per class, the IoU of the two labellings' masks,
    ``miou_agreement`` their mean), which the usual keys then also measure."""
    info = job.info
    if not job.has_ground_truth:
        summary = summarize(conf, info.class_names)
        return {**summary, "reference": REFERENCE_TEACHER, "pixel_agreement": summary["pixel_accuracy"],
                "miou_agreement": summary["miou"], "per_class_agreement": summary["per_class_iou"]}
    # The zero-shot evaluation (the seen-only baseline's too) drops VOC's background, as the paper does.
    ignore = ([info.class_names[info.background_index]]
              if job.training.setting != "annotation_free" and info.ignore_background_in_zero_shot else [])
    return summarize(conf, info.class_names, unseen=info.unseen, ignore_classes=ignore)


def _report(worker: _Worker, metrics: dict, step: int, history: dict, final: dict | None = None,
            with_checkpoint: bool = True) -> None:
    """``ray.train.report`` on every worker (it is a barrier); with a checkpoint, rank 0 attaches it, and with
    ``final`` = ``{"summary", "conf", "samples"}`` the evaluation report next to it."""
    if not with_checkpoint:
        ray.train.report(metrics)
        return
    _gather_coverage(worker, history)
    with tempfile.TemporaryDirectory() as directory:
        if worker.rank == 0:
            save_checkpoint(directory, worker.model, worker.optimizer, step, worker.job, history, worker.precision)
            if final is not None:
                info = worker.job.info
                reference = "ground truth" if worker.job.has_ground_truth else "DenseCLIP (teacher)"
                write_report(directory, final["summary"], final["conf"], info.class_names, info.palette,
                             final["samples"], reference=reference)
        checkpoint = ray.train.Checkpoint.from_directory(directory) if worker.rank == 0 else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint-{step:06d}")


def _gather_coverage(worker: _Worker, history: dict) -> None:
    """Add every worker's target counts since the last checkpoint to ``history["target_coverage"]`` (pixel
    counts per phase, saved with the checkpoint, so a resumed run counts each step once); on every worker."""
    counts = worker.coverage
    if worker.world_size > 1:
        dist.all_reduce(counts)
    totals = history.setdefault("target_coverage", {})
    for name, row in zip(PHASES, counts.tolist()):
        if any(row):
            totals[name] = [a + b for a, b in zip(totals.get(name, [0] * len(row)), row)]
    counts.zero_()


def _coverage_report(history: dict, setting: str) -> dict:
    """``target_coverage`` over the whole run and ``target_coverage_by_phase`` (see ``target_coverage``)."""
    by_phase = history.get("target_coverage", {})
    total = [sum(column) for column in zip(*by_phase.values())] or [0] * len(COVERAGE_COUNTS)
    return {"target_coverage": target_coverage(total, setting),
            "target_coverage_by_phase": {name: target_coverage(row, setting) for name, row in by_phase.items()}}


def _resume(worker: _Worker) -> tuple[int, dict, bool]:
    """Continue from this run's latest checkpoint (after a failure or a re-run), else from
    ``run.resume_from``. Returns ``(first step, history, finished)``; ``finished``: this run's final
    checkpoint already exists."""
    own = ray.train.get_checkpoint()
    if own is not None:
        with own.as_directory() as directory:
            step, history = restore_checkpoint(directory, worker.model, worker.optimizer, worker.precision)
            finished = os.path.exists(os.path.join(directory, REPORT_FILE))
    elif worker.job.run.resume_from:
        step, history = restore_checkpoint(worker.job.run.resume_from, worker.model, worker.optimizer,
                                           worker.precision)
        finished = False
    else:
        return 0, {"log": [], "validation": [], "target_coverage": {}}, False
    log.info("rank %d resumes at step %d", worker.rank, step)
    return step, history, finished


def train_loop_per_worker(config: dict) -> None:
    """The ``TorchTrainer`` loop: ``config = {"job": TrainJob, "callbacks": [StepCallback, ...]}``."""
    job: TrainJob = config["job"]
    callbacks: Sequence[StepCallback] = config.get("callbacks", ())
    training = job.training
    worker = _setup_worker(job)
    start, history, finished = _resume(worker)
    if finished:
        return
    if worker.world_size > 1:
        worker.trained = ray.train.torch.prepare_model(worker.model, move_to_device=False)
    batches = _batches(ray.train.get_dataset_shard("train"), training.batch_size // worker.world_size,
                       job.data.shuffle_buffer)
    validation_steps = job.validation_steps()
    losses: list[torch.Tensor] = []
    for step in range(start, training.iterations):
        loss, step_phase, lr = train_on(worker, next(batches), step, callbacks)
        losses.append(loss)
        done = step + 1
        metrics = {}
        if done % job.run.log_every == 0 or done == training.iterations:
            metrics = {"step": done, "phase": step_phase, "lr": lr, "loss": _mean_over_workers(losses, worker)}
            history["log"].append(metrics)
            losses = []
        if done == training.iterations:
            break
        if done in validation_steps:
            evaluation = _evaluate_target(worker, 0)
            record = {"step": done, "phase": step_phase, **_headline(_summary(evaluation.matrix(), job))}
            history["validation"].append(record)
            metrics = {**metrics, "step": done, **{f"val_{k}": v for k, v in record.items() if k != "step"}}
        with_checkpoint = done % job.run.checkpoint_every == 0
        if metrics or with_checkpoint:
            _report(worker, metrics or {"step": done}, done, history, with_checkpoint=with_checkpoint)
    batches.close()
    _finish(worker, history, max(start, training.iterations))


def _mean_over_workers(losses: list[torch.Tensor], worker: _Worker) -> float:
    value = torch.stack(losses).double().mean()
    if worker.world_size > 1:
        dist.all_reduce(value)
    return float(value) / worker.world_size


def _headline(summary: dict) -> dict:
    return {k: summary[k] for k in ("miou", "miou_seen", "miou_unseen", "hiou", "pixel_accuracy")}


def _finish(worker: _Worker, history: dict, step: int) -> None:
    """Evaluate the final target (and the teacher); report the final checkpoint, ``report.json`` beside it."""
    job = worker.job
    evaluation = _evaluate_target(worker, job.evaluation.num_overlays)
    conf, samples = evaluation.matrix(), evaluation.overlays.items
    summary = _summary(conf, job)
    history["validation"].append({"step": step, "phase": "final", **_headline(summary)})
    _gather_coverage(worker, history)
    report = {**summary, **_coverage_report(history, job.training.setting),
              "dataset": job.dataset, "protocol": job.labeler.protocol,
              "method": _method_name(job.training), "inputs": _inputs(job),
              "validation": history["validation"], "training_log": history["log"]}
    if job.evaluation.teacher and job.has_ground_truth:  # else the teacher is the reference itself
        report["denseclip"] = _summary(evaluate_split(worker.labeler, worker, 0).matrix(), job)
    metrics = {"step": step, "phase": "final", **{f"val_{k}": v for k, v in _headline(summary).items()}}
    _report(worker, metrics, step, history, final={"summary": report, "conf": conf, "samples": samples})


def _method_name(training: TrainingConfig) -> str:
    if not training.uses_pseudo_labels:
        return "seen_only"  # the baseline: no DenseCLIP in it
    return f"denseclip_plus_{training.setting}" + ("_self_training" if training.self_training else "")


def _inputs(job: TrainJob) -> dict:
    return {"train": job.data.train, "val": job.data.val, "setting": job.training.setting,
            "pseudo_labels": job.training.pseudo_labels, "self_training": job.training.self_training,
            "iterations": job.training.iterations, "guided_iterations": job.training.num_guided,
            "teacher": f"{job.labeler.model}/{job.labeler.pretrained or 'default'}",
            "teacher_head": job.labeler.head, "teacher_protocol": job.labeler.protocol,
            "teacher_activation": weights_activation(job.labeler.model, job.labeler.pretrained),
            "teacher_normalisation": job.labeler.normalisation, "teacher_precision": job.labeler.effective_precision,
            "target": f"{job.training.target.head}-{job.training.target.backbone}",
            "classifier": job.training.target.classifier, "training_precision": job.training.precision,
            "scored_at": job.training.resize_to, "workers": job.workers.num_workers}


# ---------------------------------------------------------------------------------------------- driver
class TrainingData(ray.train.DataConfig):
    """How the workers share the data: ``train`` in equal splits (every worker takes the same number of steps
    per epoch, Ray's default), ``val`` in splits that together hold every row exactly once (``equal=False``:
    an equal split would drop the remainder), so each validation image is decoded and scored by one worker."""

    def __init__(self) -> None:
        super().__init__(datasets_to_split=["train", "val"])

    def configure(self, datasets: dict, world_size: int, worker_handles, worker_node_ids, **kwargs) -> list[dict]:
        others = {name: ds for name, ds in datasets.items() if name != "val"}
        output = super().configure(others, world_size, worker_handles, worker_node_ids, **kwargs)
        if "val" in datasets:
            if datasets["val"].name is None:
                datasets["val"].set_name("val")
            val = datasets["val"].copy(datasets["val"])
            val.context.execution_options = self.default_ingest_options()
            for rank, split in enumerate(val.streaming_split(world_size, equal=False,
                                                             locality_hints=worker_node_ids)):
                output[rank]["val"] = split
        return output


@dataclass
class TrainResult:
    """A finished run: the final checkpoint folder (local path or URL), its ``report.json``, the last
    metrics."""

    checkpoint: str
    report: dict
    metrics: dict


def _storage_path(job: TrainJob) -> str:
    path = job.run.storage_path
    return os.path.abspath(path) if storage.is_local(path) else path


def run_folder(job: TrainJob) -> str:
    """Where Ray Train keeps the run: ``<storage_path>/<name>`` (local paths made absolute)."""
    return storage.join(_storage_path(job), job.run.name)


def build_trainer(job: TrainJob, callbacks: Sequence[StepCallback] = (),
                  run_callbacks: Sequence[ray.train.UserCallback] = ()) -> TorchTrainer:
    """The ``TorchTrainer`` of ``job`` on the connected Ray cluster (checking that the workers leave CPUs for
    Ray Data); ``callbacks`` run on every worker at every step, ``run_callbacks`` in Ray Train's controller."""
    cpus = float(ray.cluster_resources().get("CPU", 0))
    reserved = job.workers.num_workers * job.workers.cpus_per_worker
    if reserved + job.workers.data_cpus > cpus:
        raise ConfigError(
            f"workers: {job.workers.num_workers} x {job.workers.cpus_per_worker:g} CPUs for training plus "
            f"{job.workers.data_cpus:g} for reading leave nothing of the cluster's {cpus:g} CPUs (Ray would "
            "wait forever): lower workers.cpus_per_worker or workers.data_cpus")
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job, "callbacks": list(callbacks)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=job.workers.num_workers, use_gpu=job.workers.use_gpu,
            resources_per_worker={"CPU": job.workers.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=job.run.name, storage_path=_storage_path(job),
            failure_config=ray.train.FailureConfig(max_failures=job.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=job.run.keep_checkpoints),
            callbacks=list(run_callbacks)),
        datasets=build_datasets(job),
        dataset_config=TrainingData(),
    )


ReportCallback = Callable[[dict], None]


class _ForwardReports(ray.train.UserCallback):
    """In Ray Train's controller: hands rank 0's metrics of every report (with ``checkpoint``: the folder of
    the checkpoint it carried) to the driver through ``queue``."""

    def __init__(self, queue: ray.util.queue.Queue):
        self.queue = queue

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        if not metrics:
            return
        try:
            self.queue.put({**metrics[0], **({"checkpoint": checkpoint.path} if checkpoint is not None else {})})
        except ray.exceptions.RayError as exc:  # progress lines are not worth failing the run (Ray Train would)
            log.warning("a progress record could not reach the driver: %s", exc)


@contextlib.contextmanager
def _reports_to(on_report: ReportCallback | None) -> Iterator[list[ray.train.UserCallback]]:
    """The controller callbacks that make ``on_report(record)`` run on this driver, in a thread, for every
    report of the run (none when ``on_report`` is None); every record is delivered when the block ends."""
    if on_report is None:
        yield []
        return
    # No CPU: it must never wait for the workers'. On the driver's node: a worker node may be lost mid-run, and
    # with it any actor placed there (tests/test_multinode.py kills one).
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    queue = ray.util.queue.Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
    finished = threading.Event()

    def deliver() -> None:
        while True:
            try:
                record = queue.get(timeout=0.5)
            except ray.util.queue.Empty:
                if finished.is_set():
                    return
                continue
            on_report(record)

    thread = threading.Thread(target=deliver, name="train-reports", daemon=True)
    thread.start()
    try:
        yield [_ForwardReports(queue)]
    finally:
        finished.set()
        thread.join()
        queue.shutdown()


def run_training(job: TrainJob, callbacks: Sequence[StepCallback] = (),
                 on_report: ReportCallback | None = None) -> TrainResult:
    """Train on the connected Ray cluster and return the final checkpoint and its report. ``on_report(record)``
    sees, on this driver, every metrics record the workers report (``step``, ``phase``, ``loss``, ``lr``,
    ``val_*``; ``checkpoint``: its folder when one was saved)."""
    # Every worker's pass over its data would draw a progress bar; the metrics already show progress.
    ray.data.DataContext.get_current().enable_progress_bars = False
    with _reports_to(on_report) as run_callbacks:
        result = build_trainer(job, callbacks, run_callbacks).fit()
    if result.checkpoint is None:
        raise RuntimeError(f"run {job.run.name} ended without a checkpoint")
    path = result.checkpoint.path
    if not storage.is_local(job.run.storage_path):
        path = f"{job.run.storage_path.split('://')[0]}://{path}"
    report = json.loads(storage.read_bytes(storage.join(path, REPORT_FILE)))
    return TrainResult(path, report, dict(result.metrics or {}))

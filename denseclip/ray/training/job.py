"""A DenseCLIP+ training job: the validated job spec (the YAML specs in ``jobs/train_*.yaml``)."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from denseclip.config import ConfigError, LabelerConfig, resolve_vocabulary
from denseclip.datasets import CUSTOM, DATASET_NAMES, DatasetInfo, custom_dataset, get_dataset
from denseclip.plus.training import TrainingConfig
from denseclip.vocabulary import VocabularyError

_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


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

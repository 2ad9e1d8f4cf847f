"""The offline demo: DenseCLIP and a short DenseCLIP+ in both of the paper's settings on the synthetic world,
with the shipped tiny CLIP, on CPU, evaluated against baselines on a held-out set.

Methods (:data:`METHODS`, the keys of ``report.json`` and the folders of their reports): ``all_background``;
``random_weights`` (DenseCLIP with the tiny architecture, randomly initialised); ``denseclip``;
``denseclip_plus`` (annotation-free, guided learning only); ``denseclip_plus_self_training`` (annotation-free,
self-training after N_g: shows the drift); ``denseclip_plus_zero_shot`` (transductive zero-shot, guided
learning then self-training); ``seen_only`` (the paper's Table 2a baseline: the same target on the seen
classes' ground truth alone). ``index.html`` compares them all side by side.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from denseclip.config import ConfigError, LabelerConfig
from denseclip.datasets import DatasetInfo, get_dataset
from denseclip.metrics import ConfusionMatrix, summarize
from denseclip.models import TINY_MODEL, LoadedCLIP, load_clip
from denseclip.plus.augmentation import InMemoryBatches
from denseclip.plus.pseudo_labels import DenseCLIPTeacher, label_training_set
from denseclip.plus.target import SegmentationTarget, TargetConfig, build_target
from denseclip.plus.training import TrainingConfig, build_optimizer, train
from denseclip.predictor import DenseCLIP
from denseclip.report import write_comparison, write_report
from denseclip.synthetic import TINY_CLIP_WORLD_SEED, Scene, render_dataset

DATASET = "synthetic"
# Scenes the DenseCLIP+ targets train on; the tiny CLIP trained on captions of world 20220. The held-out
# evaluation seed must be neither.
TRAIN_SEED = 7
RESERVED_SEEDS = (TRAIN_SEED, TINY_CLIP_WORLD_SEED)

LabelFn = Callable[[list[np.ndarray]], list[np.ndarray]]


@dataclass(frozen=True)
class Method:
    """A row of the demo's tables: ``key`` in report.json (and the folder of its report), ``label`` to show."""

    key: str
    label: str


# The demo's methods, in the order every table shows them.
METHODS: tuple[Method, ...] = (
    Method("all_background", "all background"),
    Method("random_weights", "DenseCLIP, random weights"),
    Method("denseclip", "DenseCLIP (shipped tiny CLIP, no training)"),
    Method("denseclip_plus", "DenseCLIP+ annotation-free (guided learning only)"),
    Method("denseclip_plus_self_training", "DenseCLIP+ annotation-free + self-training"),
    Method("denseclip_plus_zero_shot", "DenseCLIP+ transductive zero-shot"),
    Method("seen_only", "seen-only baseline (seen ground truth alone, Table 2a)"),
)
PAGE = "index.html"  # the page of every report folder, the comparison included


def default_training() -> TrainingConfig:
    """The demo's DenseCLIP+ schedule: the tiny CLIP's own tower, frozen and dilated to stride 8 (so only the
    head learns, at 10 x 0.01), with its dense head plus a stride-4 refinement (so training starts from
    DenseCLIP's predictions), trained on precomputed pseudo labels refined along image edges."""
    # The temperature-scaled cosine classifier: on the synthetic world it beats the official dot product by about
    # 4 mIoU points in both settings (README, "Training DenseCLIP+ on Ray Train").
    return TrainingConfig(
        iterations=300, batch_size=8, crop_size=128, scale_range=(0.75, 1.5), lr=0.01, head_lr_multiplier=10.0,
        pseudo_labels="precomputed", pseudo_label_refinement=10,
        target=TargetConfig(backbone="clip", head="clip_dense", backbone_weights="clip", output_stride=8,
                            head_channels=64, classifier="cosine", temperature=10.0, freeze_backbone=True))


@dataclass
class DemoConfig:
    """What the demo renders and trains.

    Attributes:
        seed: world seed of the held-out evaluation set (not one of ``RESERVED_SEEDS``).
        num_images: held-out scenes.
        train_images: scenes of the DenseCLIP+ training set (world ``TRAIN_SEED``).
        training: the DenseCLIP+ schedule; the demo derives its three runs from it (setting, self-training).
        num_overlays: image | ground truth | prediction grids written per method.
        monitor_images: held-out images scored at every training log record (0: none).
        clip_weights: tiny CLIP checkpoint (None: the shipped one).
    """

    seed: int = 0
    num_images: int = 200
    train_images: int = 1000
    training: TrainingConfig = field(default_factory=default_training)
    num_overlays: int = 6
    monitor_images: int = 50
    clip_weights: str | None = None

    def validate(self) -> None:
        if self.seed in RESERVED_SEEDS:
            raise ConfigError(f"--seed: {self.seed} is a training world seed {RESERVED_SEEDS}; pick another")
        for name in ("num_images", "train_images"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')}: must be >= 1 (got {getattr(self, name)})")
        for name in ("num_overlays", "monitor_images"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')}: must be >= 0 (got {getattr(self, name)})")
        self.training.validate("training")


def _stack(scenes: list[Scene]) -> tuple[np.ndarray, np.ndarray]:
    return np.stack([s.image for s in scenes]), np.stack([s.labels for s in scenes])


def evaluate(label_fn: LabelFn, images: np.ndarray, labels: np.ndarray, info: DatasetInfo,
             batch_size: int = 50) -> tuple[dict, ConfusionMatrix, list[np.ndarray]]:
    """Score ``label_fn`` (list of uint8 (H, W, 3) -> list of (H, W) label maps) on the held-out set.
    Returns ``(summary, confusion matrix, predictions)``."""
    conf = ConfusionMatrix(info.num_classes, info.ignore_index)
    predictions: list[np.ndarray] = []
    for start in range(0, len(images), batch_size):
        predictions += label_fn(list(images[start:start + batch_size]))
    for i, (pred, gt) in enumerate(zip(predictions, labels)):
        conf.update(pred, gt, key=f"scene {i}")
    return summarize(conf, info.class_names, unseen=info.unseen), conf, predictions


def _labels_only(labeler) -> LabelFn:
    return lambda images: [labels for labels, _ in labeler.label_images(images)]


def _all_background(info: DatasetInfo) -> LabelFn:
    return lambda images: [np.full(im.shape[:2], info.background_index, dtype=np.uint8) for im in images]


@dataclass
class PlusRuns:
    """The three trained DenseCLIP+ targets and the seen-only baseline, their training logs and the quality of
    the precomputed annotation-free pseudo labels on the training set (None when they are made on the fly)."""

    guided: SegmentationTarget
    self_training: SegmentationTarget
    zero_shot: SegmentationTarget
    seen_only: SegmentationTarget
    history: dict[str, list[dict]]
    pseudo_label_quality: dict | None


Monitor = Callable[[str, SegmentationTarget, dict], None]


def _training_maps(teacher: DenseCLIPTeacher, images: np.ndarray, labels: np.ndarray, info: DatasetInfo,
                   base: TrainingConfig) -> tuple[dict, dict, dict | None]:
    """Per-image maps the annotation-free and the zero-shot batches carry, and the pseudo labels' quality."""
    free: dict[str, np.ndarray] = {}  # annotation-free batches carry no ground truth at all
    zero_shot: dict[str, np.ndarray] = {"label": labels}
    if base.pseudo_labels != "precomputed":
        return free, zero_shot, None
    free["pseudo_label"], free["pseudo_confidence"] = label_training_set(teacher, images)
    zero_shot["pseudo_label"], zero_shot["pseudo_confidence"] = label_training_set(teacher, images,
                                                                                   info.unseen_ids)
    conf = ConfusionMatrix(info.num_classes, info.ignore_index)
    for i, (pseudo, truth) in enumerate(zip(free["pseudo_label"], labels)):
        conf.update(pseudo, truth, key=f"training scene {i}")
    return free, zero_shot, summarize(conf, info.class_names, unseen=info.unseen)


def train_plus(clip: LoadedCLIP, teacher: DenseCLIPTeacher, train_scenes: list[Scene], info: DatasetInfo,
               base: TrainingConfig, monitor: Monitor | None = None) -> PlusRuns:
    """Train DenseCLIP+ annotation-free (guided only, and with self-training) and transductive zero-shot, and
    the seen-only baseline.

    The two annotation-free runs share their first N_g guided steps (one run, branched), so the only
    difference between them is what self-training changes. ``monitor(run, model, record)`` sees every log
    record.
    """
    images, labels = _stack(train_scenes)
    predictor = teacher.predictor
    unseen = info.unseen_ids
    free_maps, zero_shot_maps, quality = _training_maps(teacher, images, labels, info, base)

    def new_target(config: TrainingConfig) -> SegmentationTarget:
        torch.manual_seed(config.seed)
        return build_target(config.target, predictor.name_embeddings, predictor.class_of_name, clip=clip)

    def run(name: str, model: SegmentationTarget, optimizer, batches, config: TrainingConfig, steps: range):
        on_log = None if monitor is None else (lambda record: monitor(name, model, record))
        return train(model, optimizer, batches, config, steps, teacher, unseen, log_every=50, on_log=on_log)

    free = dataclasses.replace(base, setting="annotation_free", self_training=False)
    free_self = dataclasses.replace(free, self_training=True)
    zero_shot = dataclasses.replace(base, setting="zero_shot", self_training=True)
    free_batches = InMemoryBatches(images, free_maps, free).batch

    guided = new_target(free)
    optimizer = build_optimizer(guided, free)
    prefix = run("denseclip_plus", guided, optimizer, free_batches, free, range(free.num_guided))
    branch = copy.deepcopy(guided)
    branch_optimizer = build_optimizer(branch, free_self)
    branch_optimizer.load_state_dict(optimizer.state_dict())
    rest = range(free.num_guided, free.iterations)
    history = {
        "denseclip_plus": prefix + run("denseclip_plus", guided, optimizer, free_batches, free, rest),
        "denseclip_plus_self_training": prefix + run("denseclip_plus_self_training", branch, branch_optimizer,
                                                     free_batches, free_self, rest),
    }
    zs_target = new_target(zero_shot)
    history["denseclip_plus_zero_shot"] = run(
        "denseclip_plus_zero_shot", zs_target, build_optimizer(zs_target, zero_shot),
        InMemoryBatches(images, zero_shot_maps, zero_shot).batch, zero_shot, range(zero_shot.iterations))
    seen_only = dataclasses.replace(base, setting="seen_only", self_training=False)
    seen_target = new_target(seen_only)
    history["seen_only"] = run(
        "seen_only", seen_target, build_optimizer(seen_target, seen_only),
        InMemoryBatches(images, {"label": labels}, seen_only).batch, seen_only, range(seen_only.iterations))
    return PlusRuns(guided, branch, zs_target, seen_target, history, quality)


def run_demo(config: DemoConfig, out: str | Path, on_log: Callable[[str, dict], None] | None = None) -> dict:
    """Render, label, train, evaluate; write ``out/report.json`` (every method) and ``out/<method>/`` (each
    method's report, confusion matrix and overlays). Returns the report dict."""
    config.validate()
    out = Path(out)
    info = get_dataset(DATASET)
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 2)
        clock = now

    held_images, held_labels = _stack(list(render_dataset(config.seed, config.num_images)))
    train_scenes = list(render_dataset(TRAIN_SEED, config.train_images))
    lap("render")
    # fp32 on every machine (not the labeller's "auto"), so the demo's numbers reproduce on any CPU; the same
    # weights initialise the DenseCLIP+ targets' towers.
    clip = load_clip(TINY_MODEL, config.clip_weights)
    predictor = DenseCLIP.from_config(LabelerConfig(model="denseclip-tiny-shapes"), info.classes, clip=clip)
    torch.manual_seed(config.training.seed)  # the random-weights baseline is reproducible too
    random_predictor = DenseCLIP.from_config(LabelerConfig(model="denseclip-tiny-shapes", pretrained="random"), info.classes)
    lap("load")

    results: dict[str, tuple[dict, ConfusionMatrix, list[np.ndarray]]] = {}
    for name, label_fn in (("denseclip", _labels_only(predictor)), ("all_background", _all_background(info)),
                           ("random_weights", _labels_only(random_predictor))):
        results[name] = evaluate(label_fn, held_images, held_labels, info)
    lap("evaluate_baselines")

    monitored = slice(0, min(config.monitor_images, config.num_images))

    def monitor(run: str, model: SegmentationTarget, record: dict) -> None:
        # The held-out mIoU along training (a subset, for the log only) is what shows self-training's drift.
        if config.monitor_images:
            record["held_out_miou"] = evaluate(_labels_only(model), held_images[monitored],
                                               held_labels[monitored], info)[0]["miou"]
            record["held_out_images"] = monitored.stop
        if on_log is not None:
            on_log(run, record)

    teacher = DenseCLIPTeacher(predictor, config.training.pseudo_label_refinement)
    runs = train_plus(clip, teacher, train_scenes, info, config.training, monitor)
    lap("train_denseclip_plus")
    targets = {"denseclip_plus": runs.guided, "denseclip_plus_self_training": runs.self_training,
               "denseclip_plus_zero_shot": runs.zero_shot, "seen_only": runs.seen_only}
    for name, target in targets.items():
        results[name] = evaluate(_labels_only(target), held_images, held_labels, info)
    lap("evaluate_denseclip_plus")

    inputs = {"held_out_seed": config.seed, "num_images": config.num_images, "train_seed": TRAIN_SEED,
              "train_images": config.train_images, "clip": clip.fingerprint}
    report: dict = {"unseen_classes": list(info.unseen)}
    methods = [m for m in METHODS if m.key in results]
    scenes = range(min(config.num_overlays, config.num_images))
    for method in methods:
        summary, conf, predictions = results[method.key]
        summary = {**summary, "dataset": DATASET, "method": method.key, "inputs": inputs}
        samples = [(f"{method.key}/scene-{i:04d}", held_images[i], held_labels[i], predictions[i]) for i in scenes]
        write_report(out / method.key, summary, conf, info.class_names, info.palette, samples)
        report[method.key] = summary
    lap("write")
    write_comparison(
        out, {m.key: report[m.key] for m in methods}, info.class_names, info.palette,
        [(f"scene-{i:04d}", held_images[i], held_labels[i], {m.key: results[m.key][2][i] for m in methods})
         for i in scenes],
        title="DenseCLIP demo: every method on the same held-out scenes",
        labels={m.key: m.label for m in methods}, pages={m.key: f"{m.key}/{PAGE}" for m in methods},
        notes=(f"{config.num_images} held-out scenes of world {config.seed}; DenseCLIP+ trained on "
               f"{config.train_images} scenes of world {TRAIN_SEED}; tiny CLIP {clip.fingerprint}. Unseen classes "
               f"(zero-shot split): {', '.join(info.unseen)}."),
        tables=[("Timings", ["stage", "seconds"], [[stage, f"{t:.1f}"] for stage, t in timings.items()])])
    report["training"] = {"config": dataclasses.asdict(config.training), "history": runs.history,
                          "pseudo_label_quality": runs.pseudo_label_quality}
    report["inputs"] = inputs
    report["timings_s"] = timings
    report["pages"] = {"comparison": PAGE, **{m.key: f"{m.key}/{PAGE}" for m in methods}}
    (out / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return report

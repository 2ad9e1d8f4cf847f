"""DenseCLIP+ training (the paper's Algorithm 1) from small pieces a single process or a distributed worker
loop can call: a validated ``TrainingConfig``, ``make_targets`` (guided learning on DenseCLIP pseudo labels
for the first N_g iterations, then optional self-training on the target's own predictions, with the zero-shot
merge), where the targets came from (``target_counts``, ``target_coverage``), a poly learning-rate schedule, and
``train_step``; the joint augmentation of images and label maps is ``denseclip.plus.augmentation``.

A batch is a dict of tensors: ``image (B, 3, H, W)`` float RGB in [0, 1], ``valid (B, H, W)`` bool (False
on padding), and as the setting needs ``label (B, H, W)`` int64 ground truth, ``pseudo_label (B, H, W)``
int64 and ``pseudo_confidence (B, H, W)`` float (precomputed pseudo labels).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from denseclip.config import ConfigError
from denseclip.plus.amp import FP32, TRAINING_PRECISIONS, MixedPrecision
from denseclip.plus.losses import LOSS_AVERAGES, segmentation_loss
from denseclip.plus.pseudo_labels import DenseCLIPTeacher, hide_unseen, pseudo_labels, zero_shot_merge
from denseclip.plus.target import BACKBONES, CLASSIFIERS, HEADS, SegmentationTarget, TargetConfig

SETTINGS = ("annotation_free", "zero_shot", "seen_only")
PSEUDO_LABEL_SOURCES = ("on_the_fly", "precomputed")
IGNORE_INDEX = 255
PAD_VALUE = 0.5  # image value of padding (mid grey); padded pixels are never supervised

Batch = dict[str, torch.Tensor]


@dataclass
class TrainingConfig:
    """One DenseCLIP+ run: setting, pseudo labels, schedule and augmentation.

    Attributes:
        setting: ``annotation_free`` (pseudo labels only), ``zero_shot`` (transductive: seen-class ground
            truth + pseudo labels among the unseen classes on the pixels annotated unseen) or ``seen_only``
            (the paper's Table 2a baseline: seen-class ground truth alone, unseen pixels ignored, no pseudo
            labels; the fixed text classifier still scores every class).
        iterations: optimisation steps in total.
        guided_iterations: N_g, steps of guided learning on DenseCLIP pseudo labels (None: iterations // 10).
        self_training: after N_g, train on the target's own predictions (else keep the DenseCLIP guidance).
        pseudo_labels: ``on_the_fly`` (a frozen DenseCLIP labels each augmented batch) or ``precomputed``
            (the batch carries ``pseudo_label`` / ``pseudo_confidence``, augmented with the image).
        pseudo_label_refinement: iterations of pixel-adaptive refinement of DenseCLIP's pseudo labels along
            image edges (0: off; see ``pseudo_labels.refine_with_image``).
        confidence_threshold: pseudo-labelled pixels below this confidence are ignored (None: keep all).
        batch_size, crop_size: images per step and the square training crop in pixels.
        scale_range: range of the random resize ratio r ~ U(low, high); flip: random horizontal flip.
        resize_to: ``(long, short)``: MMSegmentation's ``Resize(img_scale=(long, short), ratio_range=scale_range,
            keep_ratio=True)``, i.e. an ``h x w`` image is resized by ``r * min(long / max(h, w),
            short / min(h, w))`` (None: by ``r``, a factor of the image's own size).
        photometric_distortion: MMSegmentation's ``PhotoMetricDistortion`` (default strengths) on the image
            after crop and flip, never on the label maps: brightness, contrast, saturation and hue, each with
            probability 0.5 (see ``photometric_distortion``).
        lr, head_lr_multiplier: base learning rate of the backbone and the factor for the new layers (1: one
            rate for all, as the official configs train).
        momentum, weight_decay: SGD's.
        poly_power, min_lr: the poly schedule ``(lr - min_lr) * (1 - step / iterations) ** power + min_lr``
            (mmcv's, which the official configs use with ``min_lr=1e-4``).
        loss_average: ``all_pixels`` (MMSegmentation 0.x, the official code: the summed cross-entropy over
            every pixel of the batch, ignored and padded ones included) or ``labelled_pixels`` (over the
            pixels that carry a label); see ``losses.segmentation_loss``.
        seed: seed of initialisation and augmentation.
        precision: the training step's autocast: ``bf16``, ``fp16`` (with loss scaling), ``fp32``, or ``auto``
            (bf16 on GPUs that have it, else fp16; fp32 on CPUs). See ``denseclip.plus.amp``.
        target: the target network (see ``TargetConfig``).
    """

    setting: str = "annotation_free"
    iterations: int = 2000
    guided_iterations: int | None = None
    self_training: bool = False
    pseudo_labels: str = "on_the_fly"
    pseudo_label_refinement: int = 0
    confidence_threshold: float | None = None
    batch_size: int = 16
    crop_size: int = 512
    scale_range: tuple[float, float] = (0.5, 2.0)
    flip: bool = True
    resize_to: tuple[int, int] | None = None
    photometric_distortion: bool = False
    lr: float = 0.01
    head_lr_multiplier: float = 1.0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    poly_power: float = 0.9
    min_lr: float = 1e-4
    loss_average: str = "all_pixels"
    seed: int = 0
    precision: str = "auto"
    target: TargetConfig = field(default_factory=TargetConfig)

    @classmethod
    def from_dict(cls, values: dict, where: str = "training") -> TrainingConfig:
        """Build and validate from plain data (a YAML job spec); ``target`` is a nested dict."""
        values = dict(values)
        target = values.pop("target", {})
        if not isinstance(target, dict):
            raise ConfigError(f"{where}.target: must be a mapping of target fields (got {target!r})")
        _reject_unknown(cls, values, where, skip=frozenset({"target"}))
        _reject_unknown(TargetConfig, target, f"{where}.target")
        if "aspp_rates" in target and target["aspp_rates"] is not None:
            target["aspp_rates"] = tuple(target["aspp_rates"])
        if "scale_range" in values:
            values["scale_range"] = tuple(values["scale_range"])
        if isinstance(values.get("resize_to"), list):
            values["resize_to"] = tuple(values["resize_to"])
        config = cls(**values, target=TargetConfig(**target))
        config.validate(where)
        return config

    @property
    def uses_pseudo_labels(self) -> bool:
        """Whether DenseCLIP's pseudo labels train the target (all but the seen-only baseline)."""
        return self.setting != "seen_only"

    @property
    def num_guided(self) -> int:
        """N_g: the number of guided-learning steps."""
        return self.iterations // 10 if self.guided_iterations is None else self.guided_iterations

    def validate(self, where: str = "training") -> None:
        """Raise ``ConfigError`` naming the first invalid field."""
        target = self.target

        def fail(name: str, problem: str, owner: object = self, prefix: str = where) -> None:
            raise ConfigError(f"{prefix}.{name}: {problem} (got {getattr(owner, name)!r})")

        def fail_target(name: str, problem: str) -> None:
            fail(name, problem, target, f"{where}.target")

        def integer(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def number(value) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool)

        if self.setting not in SETTINGS:
            fail("setting", f"must be one of {', '.join(SETTINGS)}")
        if self.setting == "seen_only" and self.self_training is not False:
            fail("self_training", "must be false with setting seen_only (it trains on ground truth alone)")
        if self.pseudo_labels not in PSEUDO_LABEL_SOURCES:
            fail("pseudo_labels", f"must be one of {', '.join(PSEUDO_LABEL_SOURCES)}")
        if self.loss_average not in LOSS_AVERAGES:
            fail("loss_average", f"must be one of {', '.join(LOSS_AVERAGES)}")
        for name in ("iterations", "batch_size", "crop_size"):
            if not (integer(getattr(self, name)) and getattr(self, name) > 0):
                fail(name, "must be a positive integer")
        if not (integer(self.pseudo_label_refinement) and self.pseudo_label_refinement >= 0):
            fail("pseudo_label_refinement", "must be a non-negative integer")
        if self.guided_iterations is not None and not (
                integer(self.guided_iterations) and 0 <= self.guided_iterations <= self.iterations):
            fail("guided_iterations", f"must be an integer in [0, iterations={self.iterations}] or null")
        if self.confidence_threshold is not None and not (
                number(self.confidence_threshold) and 0 <= self.confidence_threshold < 1):
            fail("confidence_threshold", "must be in [0, 1) or null")
        if not (len(self.scale_range) == 2 and all(number(v) for v in self.scale_range)
                and 0 < self.scale_range[0] <= self.scale_range[1]):
            fail("scale_range", "must be two numbers 0 < low <= high")
        if self.resize_to is not None and not (
                isinstance(self.resize_to, (tuple, list)) and len(self.resize_to) == 2
                and all(integer(v) and v > 0 for v in self.resize_to)):
            fail("resize_to", "must be two positive integers [long, short] or null")
        if not isinstance(self.photometric_distortion, bool):
            fail("photometric_distortion", "must be true or false")
        if self.precision not in TRAINING_PRECISIONS:
            fail("precision", f"must be one of {', '.join(TRAINING_PRECISIONS)}")
        for name in ("lr", "head_lr_multiplier", "poly_power"):
            if not (number(getattr(self, name)) and getattr(self, name) > 0):
                fail(name, "must be a number > 0")
        for name in ("momentum", "weight_decay"):
            if not (number(getattr(self, name)) and getattr(self, name) >= 0):
                fail(name, "must be a number >= 0")
        if not (number(self.min_lr) and 0 <= self.min_lr <= self.lr):
            fail("min_lr", f"must be a number in [0, lr={self.lr}]")
        if target.backbone not in BACKBONES:
            fail_target("backbone", f"must be one of {', '.join(BACKBONES)}")
        if target.head not in HEADS:
            fail_target("head", f"must be one of {', '.join(HEADS)}")
        if target.classifier not in CLASSIFIERS:
            fail_target("classifier", f"must be one of {', '.join(CLASSIFIERS)}")
        if target.output_stride not in (8, 16, 32):
            fail_target("output_stride", "must be 8, 16 or 32")
        if target.head == "clip_dense" and target.backbone != "clip":
            fail_target("head", "'clip_dense' needs backbone 'clip'")
        if target.backbone_weights == "clip" and target.backbone != "clip":
            fail_target("backbone_weights", "'clip' needs backbone 'clip'")
        if target.dense_norm is not None and not (number(target.dense_norm) and target.dense_norm > 0):
            fail_target("dense_norm", "must be a number > 0 or null")
        if target.dense_norm is not None and target.head != "clip_dense":
            fail_target("dense_norm", "applies to head 'clip_dense' only")
        if not (number(target.temperature) and target.temperature > 0):
            fail_target("temperature", "must be a number > 0")
        if target.learn_background and target.background_index is None:
            fail_target("learn_background", "needs a background_index")


def _reject_unknown(cls, values: dict, where: str, skip: frozenset[str] = frozenset()) -> None:
    names = {f.name for f in dataclasses.fields(cls)} - skip
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown field (known: {', '.join(sorted(names))})")


# --------------------------------------------------------------------------------------------- Algorithm 1
def in_self_training(step: int, config: TrainingConfig) -> bool:
    """Whether ``step`` (0-based) trains on the target's own predictions rather than DenseCLIP's."""
    return config.self_training and step >= config.num_guided


PHASES = ("guided", "self_training", "seen_only")


def phase(step: int, config: TrainingConfig) -> str:
    """What trains the target at ``step``: ``guided`` (DenseCLIP's pseudo labels), ``self_training`` (its own)
    or ``seen_only`` (ground truth of the seen classes alone)."""
    if not config.uses_pseudo_labels:
        return "seen_only"
    return "self_training" if in_self_training(step, config) else "guided"


@torch.no_grad()
def _own_scores(model: SegmentationTarget, images: torch.Tensor, precision: MixedPrecision) -> torch.Tensor:
    was_training = model.training
    model.eval()
    with precision.autocast():
        logits = model(images)
    model.train(was_training)
    return logits


def make_targets(batch: Batch, step: int, config: TrainingConfig, model: SegmentationTarget,
                 teacher: DenseCLIPTeacher | None = None, unseen_ids: Sequence[int] = (),
                 precision: MixedPrecision = FP32) -> torch.Tensor:
    """The label map the loss sees at ``step``: ``(B, H, W)`` int64, 255 = ignored.

    Pseudo labels come from ``teacher`` (on the fly) or the batch's ``pseudo_label`` (precomputed) during
    guided learning, from ``model`` itself (its forward pass in ``precision``) during self-training.
    Annotation-free: the pseudo labels (pixels under the confidence threshold ignored). Zero-shot: seen-class
    ground truth, and pseudo labels restricted to ``unseen_ids`` on the pixels annotated with an unseen class
    (``zero_shot_merge``). Seen-only: the seen-class ground truth, nothing else.
    """
    if not config.uses_pseudo_labels:
        return hide_unseen(batch["label"], unseen_ids, IGNORE_INDEX).masked_fill(~batch["valid"], IGNORE_INDEX)
    zero_shot = config.setting == "zero_shot"
    class_ids = list(unseen_ids) if zero_shot else None
    threshold = config.confidence_threshold
    if in_self_training(step, config):
        labels, _ = pseudo_labels(_own_scores(model, batch["image"], precision), class_ids, threshold)
    elif config.pseudo_labels == "on_the_fly":
        if teacher is None:
            raise ValueError("on-the-fly pseudo labels need a DenseCLIP teacher")
        labels, _ = teacher.pseudo_labels(batch["image"], class_ids, threshold)
    else:
        labels = batch["pseudo_label"]
        if threshold is not None and "pseudo_confidence" in batch:
            labels = labels.masked_fill(batch["pseudo_confidence"] < threshold, IGNORE_INDEX)
    if zero_shot:
        labels = zero_shot_merge(batch["label"], labels, unseen_ids, IGNORE_INDEX)
    return labels.masked_fill(~batch["valid"], IGNORE_INDEX)


# ------------------------------------------------------------------------------------------ target coverage
COVERAGE_COUNTS = ("pixels", "ground_truth", "pseudo_label", "ignored", "unseen_pixels", "unseen_supervised")


def target_counts(batch: Batch, targets: torch.Tensor, config: TrainingConfig,
                  unseen_ids: Sequence[int] = ()) -> torch.Tensor:
    """Where the targets ``(B, H, W)`` of ``batch`` came from, as pixel counts: ``(6,)`` int64 on their device
    (summed over steps without waiting for it), in the order of :data:`COVERAGE_COUNTS`: the valid pixels (not
    padding), of which the target is the ground truth, a pseudo label (DenseCLIP's or, in self-training, the
    target's own) or ignored; the valid pixels annotated with an unseen class, of which the target is an unseen
    class."""
    valid = batch["valid"]
    ignored = valid & (targets == IGNORE_INDEX)
    from_truth = annotated_unseen = torch.zeros_like(valid)
    unseen = torch.as_tensor(list(unseen_ids), dtype=targets.dtype, device=targets.device)
    if config.setting != "annotation_free":  # the annotation-free setting reads no annotation
        label = batch["label"]
        is_unseen = torch.isin(label, unseen)
        from_truth = valid & ~is_unseen & (label != IGNORE_INDEX) & (targets == label)
        annotated_unseen = valid & is_unseen
    pseudo = valid & ~ignored & ~from_truth
    supervised = annotated_unseen & torch.isin(targets, unseen)
    return torch.stack([m.sum() for m in (valid, from_truth, pseudo, ignored, annotated_unseen, supervised)])


def target_coverage(counts: Sequence[int], setting: str) -> dict:
    """Shares of summed :func:`target_counts`: ``ground_truth``, ``pseudo_label`` and ``ignored`` (of the valid
    pixels; they sum to 1) and, in the zero-shot setting, ``unseen_supervised`` (of the pixels annotated with an
    unseen class, the share that got an unseen-class target: 1.0 in the official recipe, where every one takes
    the teacher's argmax among the unseen classes); ``pixels`` and ``unseen_pixels``: the counts. A share of no
    pixels is None."""
    total = dict(zip(COVERAGE_COUNTS, (int(c) for c in counts)))

    def share(part: str, whole: str) -> float | None:
        return total[part] / total[whole] if total[whole] else None

    coverage = {name: share(name, "pixels") for name in ("ground_truth", "pseudo_label", "ignored")}
    if setting == "zero_shot":
        coverage["unseen_supervised"] = share("unseen_supervised", "unseen_pixels")
    return {**coverage, "pixels": total["pixels"], "unseen_pixels": total["unseen_pixels"]}


# ----------------------------------------------------------------------------------------- optimisation
def poly_lr(base_lr: float, step: int, iterations: int, power: float = 0.9, min_lr: float = 0.0) -> float:
    """DeepLab's poly schedule as mmcv runs it: ``(base_lr - min_lr) * (1 - step / iterations) ** power +
    min_lr``."""
    return (base_lr - min_lr) * (1 - min(step, iterations) / iterations) ** power + min_lr


def build_optimizer(model: SegmentationTarget, config: TrainingConfig) -> torch.optim.SGD:
    """SGD with momentum and weight decay on every parameter (batch norm and the learnable background
    included, as the official configs have no per-parameter settings); the new layers (head, learnable
    background) at ``head_lr_multiplier`` times the backbone's rate (a frozen backbone has no group)."""
    backbone, new = model.parameter_groups()
    groups = [{"params": backbone, "lr_scale": 1.0}, {"params": new, "lr_scale": config.head_lr_multiplier}]
    return torch.optim.SGD([g for g in groups if g["params"]], lr=config.lr, momentum=config.momentum,
                           weight_decay=config.weight_decay)


def set_learning_rate(optimizer: torch.optim.Optimizer, step: int, config: TrainingConfig) -> float:
    """Apply the poly schedule for ``step`` to every parameter group (each decays from its own initial rate
    to ``min_lr``, as mmcv's hook does); returns the backbone's rate."""
    for group in optimizer.param_groups:
        group["lr"] = poly_lr(config.lr * group.get("lr_scale", 1.0), step, config.iterations,
                              config.poly_power, config.min_lr)
    return poly_lr(config.lr, step, config.iterations, config.poly_power, config.min_lr)


def train_step(model: SegmentationTarget, optimizer: torch.optim.Optimizer, batch: Batch,
               targets: torch.Tensor, precision: MixedPrecision = FP32,
               loss_average: str = "all_pixels") -> torch.Tensor:
    """One SGD step of cross-entropy between ``model(batch["image"])`` (its forward pass in ``precision``) and
    ``targets (B, H, W)`` (averaged as ``loss_average`` says). Returns the loss, a detached scalar tensor on the
    model's device: reading its value waits for the device, so callers read losses only when they log them."""
    model.train()
    with precision.autocast():
        logits = model(batch["image"])
    loss = segmentation_loss(logits.float(), targets, IGNORE_INDEX, loss_average)
    optimizer.zero_grad(set_to_none=True)
    precision.step(loss, optimizer)
    return loss.detach()


def _to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device) for k, v in batch.items()}


def train(model: SegmentationTarget, optimizer: torch.optim.Optimizer, batch_at: Callable[[int], Batch],
          config: TrainingConfig, steps: range, teacher: DenseCLIPTeacher | None = None,
          unseen_ids: Sequence[int] = (), log_every: int = 50,
          on_log: Callable[[dict], None] | None = None, precision: MixedPrecision = FP32) -> list[dict]:
    """Run Algorithm 1 over ``steps`` (a sub-range lets a run stop at N_g and branch); ``batch_at(step)``
    gives each step's batch; ``on_log`` may add keys to each record (an evaluation, say); forward passes in
    ``precision``. Returns the log records ``{step, phase, lr, loss, target_coverage}`` (the mean loss and the
    :func:`target_coverage` since the previous record)."""
    device = next(model.parameters()).device
    history, losses, counts = [], [], []
    for step in steps:
        batch = _to_device(batch_at(step), device)
        lr = set_learning_rate(optimizer, step, config)
        targets = make_targets(batch, step, config, model, teacher, unseen_ids, precision)
        counts.append(target_counts(batch, targets, config, unseen_ids))
        losses.append(train_step(model, optimizer, batch, targets, precision, config.loss_average))
        if (step + 1) % log_every == 0 or step + 1 == steps.stop:
            record = {"step": step + 1, "phase": phase(step, config), "lr": lr,
                      "loss": float(torch.stack(losses).mean()),
                      "target_coverage": target_coverage(torch.stack(counts).sum(0).tolist(), config.setting)}
            history.append(record)
            losses, counts = [], []
            if on_log is not None:
                on_log(record)
    return history

"""Segmentation metrics with mmsegmentation's definitions, from a streaming, mergeable confusion matrix.

Per class c over the evaluated pixels: IoU = TP / (TP + FP + FN) and Acc = TP / (TP + FN); a class absent from
both prediction and ground truth has IoU NaN, a class absent from the ground truth has Acc NaN, and NaN classes
are left out of every mean. aAcc (``pixel_accuracy``) = sum TP / labelled pixels. The zero-shot summary adds the
means over the seen and unseen classes and their harmonic mean hIoU = 2 S U / (S + U).

Conventions (as mmsegmentation's ``intersect_and_union``, which bins with ``histc`` over [0, K)):
- ground-truth pixels equal to ``ignore_index`` are dropped; any other ground-truth value outside [0, K) is an
  input error;
- a prediction outside [0, K) (e.g. 255 written for "unsure") is a wrong answer: a false negative of the
  ground-truth class and a false positive of no class.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

from denseclip.datasets import normalize_class_name


class EvaluationInputError(ValueError):
    """A prediction or ground truth that cannot be scored; the message names the sample key."""


class ConfusionMatrix:
    """Pixel counts accumulated over any number of (prediction, ground truth) label maps.

    ``matrix`` is int64 (K, K + 1): ``matrix[g, p]`` counts pixels of ground-truth class g predicted as p;
    the last column counts predictions outside [0, K). Two matrices built over disjoint images ``merge`` into
    the matrix of their union, so workers can each fill one and a driver adds them up (the object pickles).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, num_classes + 1), dtype=np.int64)
        self.num_images = 0

    def update(self, pred: np.ndarray, gt: np.ndarray, key: str = "") -> None:
        """Add one image. ``pred``, ``gt``: integer (H, W) label maps of the same size; ``key`` names the
        image in errors."""
        pred, gt = np.asarray(pred), np.asarray(gt)
        name = key or "label map"
        for what, arr in (("prediction", pred), ("ground truth", gt)):
            if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
                raise EvaluationInputError(
                    f"{name}: {what} must be an integer (H, W) label map, got {arr.dtype} {arr.shape}")
        if pred.shape != gt.shape:
            raise EvaluationInputError(
                f"{name}: prediction is {_size(pred)} but ground truth is {_size(gt)} (height x width)")
        k = self.num_classes
        gt = gt.astype(np.int64).ravel()
        pred = pred.astype(np.int64).ravel()
        keep = gt != self.ignore_index
        gt, pred = gt[keep], pred[keep]
        bad = (gt < 0) | (gt >= k)
        if bad.any():
            values = np.unique(gt[bad])[:5].tolist()
            raise EvaluationInputError(
                f"{name}: ground truth has labels {values} outside [0, {k}) that are not the ignore index "
                f"{self.ignore_index}")
        pred = np.where((pred < 0) | (pred >= k), k, pred)
        self.matrix += np.bincount(gt * (k + 1) + pred, minlength=k * (k + 1)).reshape(k, k + 1)
        self.num_images += 1

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add ``other``'s counts into this matrix (in place) and return it."""
        if (other.num_classes, other.ignore_index) != (self.num_classes, self.ignore_index):
            raise ValueError(
                f"cannot merge a {other.num_classes}-class matrix (ignore {other.ignore_index}) into a "
                f"{self.num_classes}-class one (ignore {self.ignore_index})")
        self.matrix += other.matrix
        self.num_images += other.num_images
        return self


def accumulate(pairs: Iterable[tuple[str, np.ndarray, np.ndarray]], num_classes: int,
               ignore_index: int = 255) -> ConfusionMatrix:
    """The confusion matrix of ``(key, pred (H, W), gt (H, W))`` triples; one worker's share of an evaluation."""
    conf = ConfusionMatrix(num_classes, ignore_index)
    for key, pred, gt in pairs:
        conf.update(pred, gt, key)
    return conf


def summarize(conf: ConfusionMatrix, class_names: Sequence[str], unseen: Iterable[str] = (),
              ignore_classes: Iterable[str] = ()) -> dict:
    """The report numbers of ``conf``, in percent (0-100), ``None`` where undefined.

    ``unseen``: class names of the zero-shot unseen split (the rest are seen). ``ignore_classes``: classes left
    out of the evaluation entirely (VOC zero-shot drops background): their ground-truth pixels are dropped and a
    prediction of them counts as wrong. Names match case-, space- and underscore-insensitively.
    Keys: miou, miou_seen, miou_unseen, hiou, pixel_accuracy(_seen/_unseen), mean_accuracy(_seen/_unseen),
    per_class_iou / per_class_accuracy {name: value|None} over the evaluated classes, per_class_pixels,
    seen_classes, unseen_classes, ignored_classes, num_images, num_pixels.
    """
    k = conf.num_classes
    if len(class_names) != k:
        raise ValueError(f"{len(class_names)} class names for a {k}-class confusion matrix")
    unseen_ids = set(resolve_class_ids(unseen, class_names))
    ignored_ids = set(resolve_class_ids(ignore_classes, class_names))
    kept = np.array([c for c in range(k) if c not in ignored_ids], dtype=np.int64)
    seen = np.array([c for c in kept if c not in unseen_ids], dtype=np.int64)
    unseen_kept = np.array([c for c in kept if c in unseen_ids], dtype=np.int64)

    counts = conf.matrix.astype(np.float64)
    tp = np.diag(counts[:, :k])
    gt_pixels = counts.sum(axis=1)
    pred_pixels = np.zeros(k)
    pred_pixels[kept] = counts[kept, :k][:, kept].sum(axis=0)
    iou = _ratio(tp, gt_pixels + pred_pixels - tp)
    acc = _ratio(tp, gt_pixels)

    miou_seen, miou_unseen = _nanmean(iou[seen]), _nanmean(iou[unseen_kept])
    summary = {
        "miou": _nanmean(iou[kept]),
        "miou_seen": miou_seen,
        "miou_unseen": miou_unseen,
        "hiou": hiou(miou_seen, miou_unseen),
        "pixel_accuracy": _pooled(tp, gt_pixels, kept),
        "pixel_accuracy_seen": _pooled(tp, gt_pixels, seen),
        "pixel_accuracy_unseen": _pooled(tp, gt_pixels, unseen_kept),
        "mean_accuracy": _nanmean(acc[kept]),
        "mean_accuracy_seen": _nanmean(acc[seen]),
        "mean_accuracy_unseen": _nanmean(acc[unseen_kept]),
    }
    summary = {name: _percent(value) for name, value in summary.items()}
    summary.update(
        per_class_iou={class_names[c]: _percent(iou[c]) for c in kept},
        per_class_accuracy={class_names[c]: _percent(acc[c]) for c in kept},
        per_class_pixels={class_names[c]: int(conf.matrix[c].sum()) for c in kept},
        seen_classes=[class_names[c] for c in seen],
        unseen_classes=[class_names[c] for c in unseen_kept],
        ignored_classes=[class_names[c] for c in sorted(ignored_ids)],
        num_images=conf.num_images,
        num_pixels=int(conf.matrix[kept].sum()),
    )
    return summary


def hiou(miou_seen: float, miou_unseen: float) -> float:
    """Harmonic mean of seen and unseen mIoU (any scale); NaN if either is NaN, 0 if both are 0."""
    if math.isnan(miou_seen) or math.isnan(miou_unseen):
        return math.nan
    total = miou_seen + miou_unseen
    return 2 * miou_seen * miou_unseen / total if total else 0.0


def resolve_class_ids(names: Iterable[str], class_names: Sequence[str]) -> list[int]:
    """Class ids of ``names``, matched case-, space- and underscore-insensitively ("tvmonitor" = "tv monitor")."""
    index = {normalize_class_name(n): i for i, n in enumerate(class_names)}
    ids = []
    for name in names:
        if normalize_class_name(name) not in index:
            raise ValueError(f"class {name!r} is not in the vocabulary ({', '.join(class_names[:8])}, ...)")
        ids.append(index[normalize_class_name(name)])
    return ids


def _size(arr: np.ndarray) -> str:
    return "x".join(map(str, arr.shape))


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _nanmean(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else math.nan


def _pooled(tp: np.ndarray, gt_pixels: np.ndarray, classes: np.ndarray) -> float:
    total = gt_pixels[classes].sum()
    return float(tp[classes].sum() / total) if total else math.nan


def _percent(value: float) -> float | None:
    return None if math.isnan(value) else float(value) * 100.0

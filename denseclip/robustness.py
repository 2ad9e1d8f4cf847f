"""The robustness sweep of the paper's Tables 4-5: images corrupted on the fly by the ImageNet-C corruptions at
severities 1-5 before labelling, each condition scored into its own confusion matrix, next to the clean baseline.

Each image's corruption draws its randomness from a seed derived from (sweep seed, image key, condition), so a
sweep gives the same numbers however its images are batched, ordered or spread over workers.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from denseclip.corruptions import CORRUPTIONS, SEVERITIES, corrupt
from denseclip.metrics import ConfusionMatrix, summarize

CLEAN_NAME = "clean"
# The numbers of each condition kept in robustness.json (all from metrics.summarize, in percent).
CONDITION_METRICS = ("miou", "miou_seen", "miou_unseen", "hiou", "pixel_accuracy", "mean_accuracy")


@dataclass(frozen=True, order=True)
class Condition:
    """What is done to an image before labelling: ``corruption`` (one of ``CORRUPTIONS``) at ``severity``
    (1-5), or nothing (``clean``, severity 0)."""

    corruption: str
    severity: int

    @property
    def name(self) -> str:
        """``clean`` or ``<corruption>/<severity>`` (e.g. ``gaussian_noise/3``)."""
        return CLEAN_NAME if self.is_clean else f"{self.corruption}/{self.severity}"

    @property
    def is_clean(self) -> bool:
        return self.corruption == CLEAN_NAME


CLEAN = Condition(CLEAN_NAME, 0)


def sweep_conditions(corruptions: Iterable[str] = CORRUPTIONS, severities: Iterable[int] = SEVERITIES
                     ) -> list[Condition]:
    """The clean baseline followed by every corruption at every severity, corruption-major."""
    corruptions, severities = list(corruptions), list(severities)
    unknown = [c for c in corruptions if c not in CORRUPTIONS]
    if unknown:
        raise ValueError(f"unknown corruption {unknown[0]!r}; choose from {', '.join(CORRUPTIONS)}")
    bad = [s for s in severities if s not in SEVERITIES]
    if bad:
        raise ValueError(f"severity must be one of 1-5, got {bad[0]!r}")
    if not corruptions or not severities:
        raise ValueError("a robustness sweep needs at least one corruption and one severity")
    return [CLEAN] + [Condition(c, s) for c in dict.fromkeys(corruptions) for s in sorted(set(severities))]


def condition_seed(seed: int, key: str, condition: Condition) -> int:
    """The seed of ``condition`` applied to the image ``key`` in a sweep seeded ``seed`` (in [0, 2**32))."""
    digest = hashlib.sha256(f"{seed}\0{key}\0{condition.name}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def apply_condition(image: np.ndarray, condition: Condition, key: str, seed: int) -> np.ndarray:
    """``image`` uint8 (H, W, 3) RGB as labelled under ``condition`` (the same array when clean); errors name
    ``key``."""
    if condition.is_clean:
        return image
    try:
        return corrupt(image, condition.corruption, condition.severity, seed=condition_seed(seed, key, condition))
    except ValueError as exc:
        raise ValueError(f"{key}: {condition.name}: {exc}") from exc


def robustness_summary(matrices: Mapping[Condition, ConfusionMatrix], class_names: Sequence[str],
                       unseen: Iterable[str] = (), ignore_classes: Iterable[str] = ()) -> dict:
    """The sweep's numbers in percent (``None`` where undefined), from one confusion matrix per condition.

    Keys: ``clean`` (mIoU without corruption), ``miou`` {corruption: {"1".."5": mIoU}}, ``mean``
    {corruption: mean mIoU over its severities}, ``mean_corrupted`` (mean over every corrupted condition),
    ``conditions`` {condition name: {metric: value} for ``CONDITION_METRICS``}, ``num_images``.
    """
    if CLEAN not in matrices:
        raise ValueError("a robustness summary needs the clean condition")
    unseen, ignore_classes = list(unseen), list(ignore_classes)
    conditions, miou = {}, {}
    for condition in sorted(matrices, key=_sweep_order):
        summary = summarize(matrices[condition], class_names, unseen, ignore_classes)
        conditions[condition.name] = {m: summary[m] for m in CONDITION_METRICS}
        if not condition.is_clean:
            miou.setdefault(condition.corruption, {})[str(condition.severity)] = conditions[condition.name]["miou"]
    return {
        "metric": "miou",
        "clean": conditions[CLEAN_NAME]["miou"],
        "miou": miou,
        "mean": {corruption: _mean(values.values()) for corruption, values in miou.items()},
        "mean_corrupted": _mean(v for values in miou.values() for v in values.values()),
        "conditions": conditions,
        "num_images": matrices[CLEAN].num_images,
    }


def _sweep_order(condition: Condition) -> tuple[int, int]:
    """Clean first, then the corruptions in the paper's order, by severity."""
    return (-1 if condition.is_clean else CORRUPTIONS.index(condition.corruption), condition.severity)


def _mean(values: Iterable[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return math.fsum(values) / len(values) if values else None

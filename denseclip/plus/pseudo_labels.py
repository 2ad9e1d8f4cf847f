"""Pseudo labels for DenseCLIP+: from a frozen DenseCLIP (the guidance) or the target itself (self-training),
and the transductive zero-shot merge with the seen classes' ground truth.

Every function takes and returns batched tensors: label maps ``(B, H, W)`` int64 with ``ignore_index`` for
pixels the loss must skip, class scores ``(B, K, H, W)`` log-probabilities (or logits).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from denseclip.predictor import DenseCLIP


class DenseCLIPTeacher:
    """A frozen DenseCLIP giving pseudo-label scores for training batches, computed on the fly so they stay
    aligned with whatever augmentation the batch went through.

    ``log_probs(images)``: ``(B, 3, H, W)`` float RGB in [0, 1] -> ``(B, K, H, W)`` log-probabilities.
    """

    def __init__(self, predictor: DenseCLIP) -> None:
        self.predictor = predictor
        self.num_classes = predictor.num_classes

    @torch.no_grad()
    def log_probs(self, images: torch.Tensor) -> torch.Tensor:
        p = self.predictor
        normalised = (images.to(p.mean.device) - p.mean) / p.std
        return p.logits(normalised).to(images.device)


def hide_unseen(labels: torch.Tensor, unseen_ids: Sequence[int], ignore_index: int = 255) -> torch.Tensor:
    """The annotation the zero-shot setting may use: ground truth ``(B, H, W)`` with unseen-class pixels set to
    ``ignore_index`` (a copy)."""
    unseen = torch.as_tensor(list(unseen_ids), dtype=labels.dtype, device=labels.device)
    return labels.masked_fill(torch.isin(labels, unseen), ignore_index)


def pseudo_labels(scores: torch.Tensor, class_ids: Sequence[int] | None = None,
                  threshold: float | None = None, ignore_index: int = 255) -> tuple[torch.Tensor, torch.Tensor]:
    """Argmax pseudo labels of ``scores (B, K, H, W)``, optionally among ``class_ids`` only.

    The confidence is the softmax probability of the winning class among the allowed ones; pixels whose
    confidence is below ``threshold`` become ``ignore_index``.
    Returns ``(labels (B, H, W) int64, confidence (B, H, W) float in [0, 1])``.
    """
    if class_ids is not None:
        allowed = torch.as_tensor(list(class_ids), dtype=torch.long, device=scores.device)
        confidence, index = scores.index_select(1, allowed).float().softmax(dim=1).max(dim=1)
        labels = allowed[index]
    else:
        confidence, labels = scores.float().softmax(dim=1).max(dim=1)
    if threshold is not None:
        labels = labels.masked_fill(confidence < threshold, ignore_index)
    return labels, confidence


def keep_classes(labels: torch.Tensor, class_ids: Sequence[int], ignore_index: int = 255) -> torch.Tensor:
    """``labels (B, H, W)`` with every class outside ``class_ids`` set to ``ignore_index`` (a copy)."""
    allowed = torch.as_tensor(list(class_ids), dtype=labels.dtype, device=labels.device)
    return labels.masked_fill(~torch.isin(labels, allowed), ignore_index)


def zero_shot_merge(ground_truth: torch.Tensor, unseen_labels: torch.Tensor, unseen_ids: Sequence[int],
                    ignore_index: int = 255) -> torch.Tensor:
    """Transductive zero-shot targets: seen-class pixels keep their ground truth; every other pixel (unseen
    class or unannotated) takes its pseudo label if that is an unseen class, else ``ignore_index``.

    Args:
        ground_truth: ``(B, H, W)`` int64 full annotation; its unseen classes are hidden here, so no unseen
            ground truth can reach the loss.
        unseen_labels: ``(B, H, W)`` int64 pseudo labels, normally ``pseudo_labels(scores, unseen_ids)``.
    """
    seen_truth = hide_unseen(ground_truth, unseen_ids, ignore_index)
    fill = keep_classes(unseen_labels, unseen_ids, ignore_index)
    return torch.where(seen_truth != ignore_index, seen_truth, fill)

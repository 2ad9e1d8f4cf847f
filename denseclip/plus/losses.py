"""The DenseCLIP+ loss: pixel-wise cross-entropy against (pseudo) label maps, skipping ignored pixels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# How the summed cross-entropy is averaged: over every pixel of the batch, ignored and padded ones included
# (MMSegmentation 0.x, which the official code runs on: its CrossEntropyLoss takes the mean of a per-pixel
# loss that is 0 on ignored pixels), or over the pixels that carry a label.
LOSS_AVERAGES = ("all_pixels", "labelled_pixels")


def segmentation_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = 255,
                      average: str = "all_pixels") -> torch.Tensor:
    """Cross-entropy over the pixels whose target is not ``ignore_index``, averaged as ``average`` says.

    Args:
        logits: ``(B, K, H, W)`` class logits.
        targets: ``(B, H, W)`` int64 labels in [0, K) or ``ignore_index``.
        average: one of :data:`LOSS_AVERAGES`.
    Returns:
        A scalar; 0 (still differentiable) when every pixel is ignored (plain ``cross_entropy`` gives NaN).
    """
    if average not in LOSS_AVERAGES:
        raise ValueError(f"average must be one of {', '.join(LOSS_AVERAGES)}, got {average!r}")
    total = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")
    if average == "all_pixels":
        return total / targets.numel()
    return total / (targets != ignore_index).sum().clamp_min(1)

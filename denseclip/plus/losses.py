"""The DenseCLIP+ loss: pixel-wise cross-entropy against (pseudo) label maps, skipping ignored pixels."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def segmentation_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Mean cross-entropy over the pixels whose target is not ``ignore_index``.

    Args:
        logits: ``(B, K, H, W)`` class logits.
        targets: ``(B, H, W)`` int64 labels in [0, K) or ``ignore_index``.
    Returns:
        A scalar; 0 (still differentiable) when every pixel is ignored (plain ``cross_entropy`` gives NaN).
    """
    total = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")
    count = (targets != ignore_index).sum().clamp_min(1)
    return total / count

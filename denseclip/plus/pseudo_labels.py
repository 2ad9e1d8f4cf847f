"""Pseudo labels for DenseCLIP+: from a frozen DenseCLIP (the guidance) or the target itself (self-training),
and the transductive zero-shot merge with the seen classes' ground truth.

Every function takes and returns batched tensors: label maps ``(B, H, W)`` int64 with ``ignore_index`` for
pixels the loss must skip, class scores ``(B, K, H, W)`` log-probabilities (or logits).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from denseclip.config import LabelerConfig
from denseclip.models import LoadedCLIP
from denseclip.names import RESIZE_NATIVE
from denseclip.predictor import DenseCLIP

# Pixel-adaptive mask refinement runs at half resolution (a quarter of the cost; labels stay within 2 pixels
# of the edges) with neighbours at these dilations of that resolution.
REFINE_SCALE = 0.5
REFINE_DILATIONS = (1, 2, 4, 6, 12)


class DenseCLIPTeacher:
    """A frozen DenseCLIP giving pseudo labels for training batches (on the fly, so they stay aligned with
    whatever augmentation the batch went through, or once for a whole training set), refined along image
    edges by :func:`refine_with_image` when ``refine_iterations`` > 0.

    ``class_ids``: the dataset class of each of the predictor's classes (None: the same ids); the zero-shot
    teacher's vocabulary is the unseen classes alone, as the official teacher scores only those (see
    :func:`build_teacher`). Unrefined labels over the whole vocabulary are the labeller's own
    (``DenseCLIP.predict``, image by image): a mask store labelled with the same vocabulary and options holds the
    same labels for the same image. Refined or restricted labels are computed at feature resolution for the
    batch, and only the classes that rank in the top ``predictor.upsample_topk`` somewhere in the batch (all with
    None) are upsampled to the image and refined: a crop labelled with a 171-class vocabulary never holds 171
    full-size score maps.
    """

    def __init__(self, predictor: DenseCLIP, refine_iterations: int = 0,
                 class_ids: Sequence[int] | None = None) -> None:
        self.predictor = predictor
        self.num_classes = predictor.num_classes
        self.refine_iterations = refine_iterations
        self.class_ids = list(range(self.num_classes)) if class_ids is None else [int(c) for c in class_ids]
        if len(self.class_ids) != self.num_classes:
            raise ValueError(f"class_ids names {len(self.class_ids)} classes, the predictor has {self.num_classes}")
        self._dataset_ids = torch.as_tensor(self.class_ids, device=predictor.device)  # copied once, not per batch

    @torch.no_grad()
    def pseudo_labels(self, images: torch.Tensor, class_ids: Sequence[int] | None = None,
                      threshold: float | None = None,
                      ignore_index: int = 255) -> tuple[torch.Tensor, torch.Tensor]:
        """DenseCLIP's argmax labels of ``images``, optionally among ``class_ids`` only.

        Args:
            images: ``(B, 3, H, W)`` float RGB in [0, 1], all of one size (a training batch).
            class_ids: the dataset classes the argmax may choose (the unseen ones in the zero-shot setting);
                each must be one of the teacher's.
            threshold: pixels whose confidence is below it become ``ignore_index``.
        Returns:
            ``(labels (B, H, W) int64 dataset ids, confidence (B, H, W) float in [0, 1])`` on the device of
            ``images``; the confidence is the winner's probability: the labeller's (its log-probability resampled
            to the pixel, what a mask store holds) for unrefined labels over the whole vocabulary, else
            renormalised among the classes upsampled.
        """
        local = self._local_ids(class_ids)
        if local is None and not self.refine_iterations:
            index, confidence = self._labeller_labels(images)
        else:
            index, confidence = self._batch_labels(images, local)
        labels = self._dataset_ids[index]
        if threshold is not None:
            labels = labels.masked_fill(confidence < threshold, ignore_index)
        return labels.to(images.device), confidence.to(images.device)

    def _local_ids(self, class_ids: Sequence[int] | None) -> list[int] | None:
        """The predictor's indices of the dataset classes ``class_ids`` (None: every class of the teacher)."""
        if class_ids is None or sorted(set(class_ids)) == sorted(self.class_ids):
            return None
        missing = sorted(set(class_ids) - set(self.class_ids))
        if missing:
            raise ValueError(f"classes {missing[:5]} are not in the teacher's vocabulary")
        return [self.class_ids.index(c) for c in class_ids]

    def _labeller_labels(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The labeller's labels and confidences of each image, ``(B, H, W)`` on the predictor's device."""
        p = self.predictor
        # In 0-255 and normalised by the labeller's own multiply-add: float32(k / 255) * 255 is k exactly, so an
        # unaugmented crop gives the labeller bit for bit the input its uint8 image gives it.
        pixels = p.normalise(images.to(p.mean.device) * 255)
        labels, confidence = zip(*p.predict(pixels))
        return torch.stack(labels).long(), torch.stack(confidence)

    def _batch_labels(self, images: torch.Tensor, local: list[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Labels among the predictor's classes ``local`` (None: all), refined as asked: ``(B, H, W)`` indices
        of the predictor's classes and the winner's (refined) probability renormalised among the classes
        upsampled."""
        p = self.predictor
        size = tuple(images.shape[-2:])
        pixels = images.to(p.mean.device)
        per_image = p.feature_log_probs(p.normalise(pixels * 255))
        extent = per_image[0][1]
        log_probs = torch.stack([lp for lp, _ in per_image])  # (B, K, hc, wc)
        classes = torch.arange(log_probs.shape[1], device=log_probs.device)
        if local is not None:
            classes = torch.as_tensor(local, dtype=torch.long, device=log_probs.device)
            log_probs = log_probs.index_select(1, classes)
        topk = p.upsample_topk
        if topk is not None and topk < len(classes):
            rows, cols = math.ceil(extent[0]), math.ceil(extent[1])
            # One host sync per batch: the number of candidate classes decides the upsampled tensor's size.
            candidates = log_probs[:, :, :rows, :cols].topk(topk, dim=1).indices.unique()
            log_probs, classes = log_probs.index_select(1, candidates), classes[candidates]
        b, c = log_probs.shape[:2]
        log_probs = p.upsample(log_probs.flatten(0, 1), extent, size).view(b, c, *size)
        if self.refine_iterations:
            log_probs = refine_with_image(log_probs.exp(), pixels, self.refine_iterations).clamp_min(1e-8).log()
        index, confidence = pseudo_labels(log_probs)  # among the upsampled classes
        return classes[index], confidence


def build_teacher(labeler: LabelerConfig, classes: list[list[str]], class_ids: Sequence[int] | None = None,
                  refine_iterations: int = 0, clip: LoadedCLIP | None = None) -> DenseCLIPTeacher:
    """The training teacher of ``labeler`` over ``classes`` (the dataset ids ``class_ids``; the zero-shot teacher
    takes the unseen classes alone): the labeller run on each training crop as it is, without the protocol's
    resize and padded to the tower's stride only, as the official teacher sees its crop (``clip``: the loaded
    model to share)."""
    config = dataclasses.replace(labeler, resize_to=RESIZE_NATIVE, short_side=None, size_bucket=None)
    return DenseCLIPTeacher(DenseCLIP.from_config(config, classes, clip=clip), refine_iterations, class_ids)


def _shifted(padded: torch.Tensor, pad: int, dy: int, dx: int, height: int, width: int) -> torch.Tensor:
    return padded[..., pad + dy:pad + dy + height, pad + dx:pad + dx + width]


def refine_with_image(probs: torch.Tensor, images: torch.Tensor, iterations: int = 10,
                      dilations: Sequence[int] = REFINE_DILATIONS,
                      scale: float = REFINE_SCALE) -> torch.Tensor:
    """Pixel-adaptive mask refinement (PAMR, Araslanov & Roth, CVPR 2020): each pixel's class probabilities
    become, ``iterations`` times over, the average of its neighbours' (8 per dilation), weighted by how alike
    their colours are. Coarse, blob-like labels (DenseCLIP's come from a stride-32 grid) snap to image edges.

    Args:
        probs: ``(B, K, H, W)`` class probabilities.
        images: ``(B, 3, H, W)`` float RGB in [0, 1].
        scale: resolution factor the refinement runs at (the result is resized back).
    Returns:
        ``(B, K, H, W)`` refined probabilities (each pixel still sums to 1).
    """
    size = probs.shape[-2:]
    if scale != 1:
        images = F.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=False,
                               antialias=True)
        probs = F.interpolate(probs, size=images.shape[-2:], mode="bilinear", align_corners=False,
                              antialias=True)
    height, width = images.shape[-2:]
    pad = max(dilations)
    offsets = [(dy * d, dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
    padded = F.pad(images, (pad,) * 4, mode="replicate")
    neighbours = torch.stack([_shifted(padded, pad, dy, dx, height, width) for dy, dx in offsets], dim=2)
    # Colour distance in units of the local spread, averaged over channels; a softmax over the neighbours.
    spread = neighbours.std(dim=2, keepdim=True) + 1e-3
    distance = ((neighbours - images[:, :, None]).abs() / spread).mean(dim=1)
    affinity = (-distance).softmax(dim=1)  # (B, N, h, w)
    for _ in range(iterations):
        padded = F.pad(probs, (pad,) * 4, mode="replicate")
        out = torch.zeros_like(probs)
        for n, (dy, dx) in enumerate(offsets):
            out += _shifted(padded, pad, dy, dx, height, width) * affinity[:, n:n + 1]
        probs = out
    if scale != 1:
        probs = F.interpolate(probs, size=size, mode="bilinear", align_corners=False)
    return probs


def hide_unseen(labels: torch.Tensor, unseen_ids: Sequence[int], ignore_index: int = 255) -> torch.Tensor:
    """The annotation the zero-shot setting may use: ground truth ``(B, H, W)`` with unseen-class pixels set
    to ``ignore_index`` (a copy)."""
    unseen = torch.as_tensor(list(unseen_ids), dtype=labels.dtype, device=labels.device)
    return labels.masked_fill(torch.isin(labels, unseen), ignore_index)


def pseudo_labels(scores: torch.Tensor, class_ids: Sequence[int] | None = None,
                  threshold: float | None = None,
                  ignore_index: int = 255) -> tuple[torch.Tensor, torch.Tensor]:
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
    """Transductive zero-shot targets, as the official code builds them: seen-class pixels keep their ground
    truth; pixels annotated with an unseen class take their pseudo label if that is an unseen class, else
    ``ignore_index``; unannotated pixels (``ignore_index``: VOC's object boundaries, COCO-Stuff's
    "unlabelled") stay ignored.

    The annotation says only *that* a pixel is unseen (the official data pipeline turns every unseen class
    into one "unlabelled" value before the head sees it), never *which* unseen class: the result is the same
    whichever unseen class the ground truth names.

    Args:
        ground_truth: ``(B, H, W)`` int64 full annotation.
        unseen_labels: ``(B, H, W)`` int64 pseudo labels, normally ``pseudo_labels(scores, unseen_ids)``.
    Returns:
        ``(B, H, W)`` int64 targets; ``ignore_index`` wherever ``ground_truth`` is ``ignore_index``.
    """
    unseen = torch.isin(ground_truth, torch.as_tensor(list(unseen_ids), dtype=ground_truth.dtype,
                                                      device=ground_truth.device))
    fill = keep_classes(unseen_labels, unseen_ids, ignore_index)
    return torch.where(unseen, fill, ground_truth)


def label_training_set(teacher: DenseCLIPTeacher, images: np.ndarray, class_ids: Sequence[int] | None = None,
                       batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Precompute pseudo labels for a training set held in memory (once, instead of every step).

    Args:
        images: ``(N, H, W, 3)`` uint8 RGB.
        class_ids: restrict the argmax to these classes (the unseen ones, for the zero-shot setting).
    Returns:
        ``(labels (N, H, W) uint8 (int32 beyond 255 classes), confidence (N, H, W) float32)``, to be
        augmented together with the images.
    """
    label_dtype = np.uint8 if teacher.num_classes <= 255 else np.int32
    labels, confidence = [], []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(images[start:start + batch_size]).permute(0, 3, 1, 2).float() / 255
        lab, conf = teacher.pseudo_labels(batch, class_ids)
        labels.append(lab.cpu().numpy().astype(label_dtype))
        confidence.append(conf.cpu().numpy().astype(np.float32))
    return np.concatenate(labels), np.concatenate(confidence)

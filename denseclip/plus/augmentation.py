"""Joint augmentation of DenseCLIP+ training images and their per-pixel maps (random resize, crop and flip;
MMSegmentation's photometric distortion of the image alone), and the batches made of them (``collate``,
``InMemoryBatches``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

from denseclip.plus.training import IGNORE_INDEX, PAD_VALUE, Batch, TrainingConfig


def _pad_value(tensor: torch.Tensor) -> float | int | bool:
    if tensor.dtype == torch.bool:
        return False
    return 0.0 if tensor.is_floating_point() else IGNORE_INDEX


def resize_factor(height: int, width: int, rng: np.random.Generator, config: TrainingConfig) -> float:
    """The random resize factor of a ``height x width`` image: ``r ~ U(scale_range)``, times
    ``min(long / max(h, w), short / min(h, w))`` when ``config.resize_to = (long, short)`` (MMSegmentation's
    ``Resize`` with ``keep_ratio=True`` and a ``ratio_range``)."""
    ratio = rng.uniform(*config.scale_range)
    if config.resize_to is None:
        return ratio
    long, short = config.resize_to
    return ratio * min(long / max(height, width), short / min(height, width))


def scale_saturation(image: torch.Tensor, factor: float) -> torch.Tensor:
    """Multiply the HSV saturation of ``image (3, H, W)`` (RGB in [0, 1]) by ``factor``, clipped at 1, keeping
    hue and value: each channel becomes ``V - (V - c) * min(factor, 1 / S)``, ``V`` the max channel and
    ``S = (V - min) / V`` (grey pixels, black included, are unchanged)."""
    value = image.amax(0, keepdim=True)
    chroma = value - image.amin(0, keepdim=True)
    grey = chroma <= 0
    # min(factor, 1 / S) = min(factor, V / chroma); any finite gain leaves a grey pixel (V - c = 0) unchanged.
    gain = torch.where(grey, 1.0, torch.clamp(value / torch.where(grey, 1.0, chroma), max=factor))
    return (value - (value - image) * gain).clamp(0, 1)


def photometric_distortion(image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """MMSegmentation's ``PhotoMetricDistortion`` with its default strengths on ``image (3, H, W)`` (RGB in
    [0, 1]); returns a new ``(3, H, W)`` tensor in [0, 1].

    In 0-255 units, each step with probability 0.5 and clipped to the valid range after it: brightness
    ``+ U(-32, 32)``; contrast ``x U(0.5, 1.5)``, before or after the HSV steps (a random mode decides);
    saturation ``x U(0.5, 1.5)`` (at fixed hue and value); hue shifted by ``randint(-18, 18)`` in OpenCV's
    0-180 hue units (numpy's ``randint``: -18 to 17), i.e. a shift of delta / 180 of the hue circle.
    """
    def contrast(x: torch.Tensor) -> torch.Tensor:
        return (x * rng.uniform(0.5, 1.5)).clamp(0, 1) if rng.random() < 0.5 else x

    if rng.random() < 0.5:
        image = (image + rng.uniform(-32, 32) / 255).clamp(0, 1)
    contrast_first = rng.random() < 0.5
    if contrast_first:
        image = contrast(image)
    if rng.random() < 0.5:
        image = scale_saturation(image, rng.uniform(0.5, 1.5))
    if rng.random() < 0.5:
        image = TF.adjust_hue(image, int(rng.integers(-18, 18)) / 180).clamp(0, 1)
    if not contrast_first:
        image = contrast(image)
    return image


def augment(image: torch.Tensor, maps: dict[str, torch.Tensor], rng: np.random.Generator,
            config: TrainingConfig) -> Batch:
    """Random resize (``resize_factor``), crop and flip applied jointly to an image and its per-pixel maps,
    then, if ``config.photometric_distortion``, ``photometric_distortion`` of the image alone.

    Everything happens on the device of ``image`` and ``maps`` (a training worker's GPU); only the random
    parameters come from ``rng`` on the host, so no step waits for the device.

    Args:
        image: ``(3, H, W)`` float in [0, 1].
        maps: ``(H, W)`` label maps (integer: padded with 255), confidences (float: padded with 0) or masks, on
            the image's device.
        rng: the source of randomness (seed it per sample for reproducible runs).
    Returns:
        ``image (3, c, c)`` float in [0, 1] (padding ``PAD_VALUE`` before any photometric distortion),
        ``valid (c, c)`` bool (False on padding) and every map ``(c, c)`` cropped alike, c = ``config.crop_size``.
    """
    height, width = image.shape[-2:]
    scale = resize_factor(height, width, rng, config)
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    maps = {**maps, "valid": torch.ones((height, width), dtype=torch.bool, device=image.device)}
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False,
                          antialias=scale < 1)[0]
    maps = {k: F.interpolate(v[None, None].float(), size=size, mode="nearest-exact")[0, 0].to(v.dtype)
            for k, v in maps.items()}
    crop = config.crop_size
    pad_h, pad_w = max(crop - size[0], 0), max(crop - size[1], 0)
    if pad_h or pad_w:
        image = F.pad(image, (0, pad_w, 0, pad_h), value=PAD_VALUE)
        maps = {k: F.pad(v, (0, pad_w, 0, pad_h), value=_pad_value(v)) for k, v in maps.items()}
    top = int(rng.integers(0, image.shape[1] - crop + 1))
    left = int(rng.integers(0, image.shape[2] - crop + 1))
    out = {"image": image[:, top:top + crop, left:left + crop],
           **{k: v[top:top + crop, left:left + crop] for k, v in maps.items()}}
    if config.flip and rng.random() < 0.5:
        out = {k: v.flip(-1) for k, v in out.items()}
    if config.photometric_distortion:
        out["image"] = photometric_distortion(out["image"], rng)
    return out


def collate(samples: Sequence[Batch]) -> Batch:
    """Stack per-sample dicts (same keys, same crop size) into a batch."""
    return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}


class InMemoryBatches:
    """Augmented batches drawn from images and label maps held in memory; ``batch(step)`` depends only on
    ``(seed, step)``, so two runs (or two branches of one run) see the same data.

    Args:
        images: ``(N, H, W, 3)`` uint8 RGB.
        maps: name -> ``(N, H, W)`` arrays (e.g. ``label`` uint8 ground truth, ``pseudo_label``).
    """

    def __init__(self, images: np.ndarray, maps: dict[str, np.ndarray], config: TrainingConfig) -> None:
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"images must be (N, H, W, 3) uint8, got {images.shape} {images.dtype}")
        for name, values in maps.items():
            if values.shape != images.shape[:3]:
                raise ValueError(f"map {name!r} has shape {values.shape}, images are {images.shape[:3]}")
        self.images, self.maps, self.config = images, maps, config

    def __len__(self) -> int:
        return len(self.images)

    def _map_tensor(self, values: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(values))
        return tensor if tensor.is_floating_point() else tensor.long()

    def batch(self, step: int) -> Batch:
        rng = np.random.default_rng([self.config.seed, step])
        size = self.config.batch_size
        indices = rng.choice(len(self.images), size=size, replace=len(self) < size)
        samples = []
        for i in indices:
            image = torch.from_numpy(self.images[i]).permute(2, 0, 1).float() / 255
            maps = {k: self._map_tensor(v[i]) for k, v in self.maps.items()}
            samples.append(augment(image, maps, rng, self.config))
        return collate(samples)

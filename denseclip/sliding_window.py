"""How DenseCLIP runs its image tower over images of any sizes: ``whole`` (one forward per batch of images padded
to a common size) or ``slide`` (crop windows of any images batched together, averaged per feature cell), into one
canvas of name logits per image at feature resolution."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class _Canvas:
    """Name logits of one image at feature resolution: ``logits (N, hc, wc)``, one channel per class name;
    ``extent`` = the image's size in feature cells (the rest of the canvas is padding); ``count`` = windows
    that covered each cell; ``keys (Dk, hc, wc)``: the final attention's keys (only kept for key smoothing)."""

    logits: torch.Tensor
    count: torch.Tensor
    extent: tuple[float, float]
    keys: torch.Tensor | None = None


class SlidingWindow:
    """The canvases of :class:`denseclip.predictor.DenseCLIP`, which this is mixed into: it reads the predictor's
    ``mode``, ``batch_size``, ``crop_size``, ``crop_stride``, ``pad_multiple``, ``stride``, ``class_of_name``,
    ``device``, ``dtype``, ``_memory_format``, ``_scale`` and ``_shift``, and calls its ``_resize`` and
    ``_name_logits``."""

    def _canvases(self, images, normalised: bool = True) -> list[_Canvas]:
        """Canvases of ``images``: ``(3, H_i, W_i)``, normalised or (``normalised=False``) pixels in 0-255."""
        resized = [self._resize(img) for img in images]
        if self.mode == "whole":
            return self._whole(resized, normalised)
        return self._slide(resized, normalised)

    def _batch(self, crops: list[torch.Tensor], height: int, width: int, normalised: bool) -> torch.Tensor:
        """``(n, 3, height, width)`` in the tower's dtype and memory format: ``crops[i]`` (``(3, h_i, w_i)``, at
        most that size; normalised here unless it is already) in the top-left corner of row i, zeros (the mean
        colour, in normalised space) around it. Each crop is written once, normalised and cast on the way."""
        batch = torch.empty((len(crops), 3, height, width), dtype=self.dtype, device=self.device,
                            memory_format=self._memory_format)
        if any(c.shape[-2:] != (height, width) for c in crops):
            batch.zero_()
        for row, crop in zip(batch, crops):
            target = row[:, :crop.shape[1], :crop.shape[2]]
            if normalised:
                target.copy_(crop)
            else:
                torch.addcmul(self._shift, crop, self._scale, out=target)
        return batch

    def _whole(self, images: list[torch.Tensor], normalised: bool) -> list[_Canvas]:
        """One forward per ``batch_size`` images of the same padded size (each padded to ``size_bucket``)."""
        m, s = self.pad_multiple, self.stride
        canvases: list[_Canvas | None] = [None] * len(images)
        by_shape: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(images):
            by_shape.setdefault((math.ceil(im.shape[1] / m) * m, math.ceil(im.shape[2] / m) * m), []).append(i)
        for (height, width), indices in by_shape.items():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                logits, keys = self._name_logits(self._batch([images[i] for i in chunk], height, width, normalised))
                for j, (i, lg) in enumerate(zip(chunk, logits)):
                    extent = (images[i].shape[1] / s, images[i].shape[2] / s)
                    canvases[i] = _Canvas(lg, torch.ones_like(lg[:1]), extent, None if keys is None else keys[j])
        return canvases

    def _window_starts(self, size: int) -> list[int]:
        return list(range(0, size - self.crop_size + 1, self.crop_stride))

    def _slide(self, images: list[torch.Tensor], normalised: bool) -> list[_Canvas]:
        """Windows of every image, ``batch_size`` at a time whatever image they come from, averaged per cell."""
        s, crop, step = self.stride, self.crop_size, self.crop_stride
        windows, canvases = [], []
        for i, im in enumerate(images):
            # Pad so windows tile the image exactly on the stride grid: every window lands on whole feature cells.
            # The padding is implicit: a window reaching past the image is zero-filled by _batch.
            h, w = (crop + math.ceil(max(d - crop, 0) / step) * step for d in im.shape[-2:])
            windows += [(i, y, x) for y in self._window_starts(h) for x in self._window_starts(w)]
            hc, wc = h // s, w // s
            canvases.append(_Canvas(torch.zeros(len(self.class_of_name), hc, wc, device=self.device),
                                    torch.zeros(1, hc, wc, device=self.device), (im.shape[1] / s, im.shape[2] / s)))
        for start in range(0, len(windows), self.batch_size):
            chunk = windows[start:start + self.batch_size]
            batch = self._batch([images[i][:, y:y + crop, x:x + crop] for i, y, x in chunk], crop, crop, normalised)
            logits, keys = self._name_logits(batch)
            for j, (i, y, x) in enumerate(chunk):
                c, cells = canvases[i], (slice(None), slice(y // s, (y + crop) // s), slice(x // s, (x + crop) // s))
                c.logits[cells] += logits[j]
                c.count[cells] += 1
                if keys is not None:
                    # Key smoothing runs once over the whole image (the official code smooths within each
                    # window): overlapping windows' keys are averaged like their logits.
                    if c.keys is None:
                        c.keys = keys.new_zeros(keys.shape[1], *c.count.shape[1:])
                    c.keys[cells] += keys[j]
        for c in canvases:
            c.logits /= c.count
            if c.keys is not None:
                c.keys /= c.count
        return canvases

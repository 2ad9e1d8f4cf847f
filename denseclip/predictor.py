"""DenseCLIP prediction: per-pixel open-vocabulary class scores and label maps from a frozen CLIP.

Scores are the cosine similarity between L2-normalised dense features (see ``dense.py``) and prompt-ensemble
class embeddings (see ``text.py``), scaled by a temperature. Everything is computed at feature resolution and
upsampled once, straight to each image's own size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from denseclip.dense import dense_features_and_keys, output_stride
from denseclip.models import LoadedCLIP
from denseclip.text import class_embeddings
from denseclip.vocabulary import load_templates

_MASKED = -1e4  # logit of a class removed by prompt denoising (finite, so interpolation stays finite)


@dataclass
class _Canvas:
    """Class logits of one image at feature resolution: ``logits (C, hc, wc)``; ``extent`` = the image's size
    in feature cells (the rest of the canvas is padding); ``count`` = windows that covered each cell."""

    logits: torch.Tensor
    count: torch.Tensor
    extent: tuple[float, float]


class DenseCLIP:
    """A frozen CLIP and a vocabulary, giving per-pixel class log-probabilities and label maps.

    Args:
        clip: the loaded model (``denseclip.models.load_clip``).
        classes: one list of names per class; a class scores the max over its names.
        templates: a template set name / file, or a list of templates with ``{}``.
        mode: ``"whole"`` (one forward per image, padded to the stride) or ``"slide"`` (crop windows).
        crop_size, crop_stride: sliding-window size and step in pixels (multiples of the tower's stride).
        short_side: resize each image so its short side has this length before inference (None: as is).
        resize_to: ``(long, short)``: instead, resize each image keeping its aspect ratio to fit both, by
            ``min(long / max(h, w), short / min(h, w))`` (MMSegmentation's keep-ratio ``Resize``: a 500x375
            image becomes 683x512 for (2048, 512)). Labels are returned at each input's own size either way.
        temperature: logit scale applied to cosine similarities before the softmax.
        background_threshold: prepend a ``background`` class that wins where no class has probability >= it.
        background_embedding: ``(D,)`` embedding (e.g. a learned one) for a prepended ``background`` class.
        key_smoothing: affinity threshold in [-1, 1) for the paper's key smoothing (None: off).
        prompt_denoising: probability threshold; classes whose max probability over an image stays below it
            are removed for that image (None: off).
        upsample_topk: upsample only the classes that rank in the top-k at some location of the image
            (near-exact labels, far cheaper for large vocabularies); None upsamples every class.
        batch_size: images (whole) or windows (slide) per forward pass.
    """

    def __init__(
        self,
        clip: LoadedCLIP,
        classes: list[list[str]],
        templates: str | list[str] = "denseclip85",
        *,
        mode: str = "whole",
        crop_size: int = 448,
        crop_stride: int = 224,
        short_side: int | None = None,
        resize_to: tuple[int, int] | None = None,
        temperature: float = 100.0,
        background_threshold: float | None = None,
        background_embedding: torch.Tensor | None = None,
        key_smoothing: float | None = None,
        prompt_denoising: float | None = None,
        upsample_topk: int | None = 3,
        batch_size: int = 8,
    ) -> None:
        self.clip = clip
        self.stride = output_stride(clip.model)
        if mode not in ("whole", "slide"):
            raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")
        if mode == "slide" and (crop_size % self.stride or crop_stride % self.stride or crop_stride <= 0):
            raise ValueError(f"crop_size {crop_size} and crop_stride {crop_stride} must be positive multiples "
                             f"of the tower's stride {self.stride}")
        if short_side is not None and resize_to is not None:
            raise ValueError("give either short_side or resize_to, not both")
        if background_threshold is not None and background_embedding is not None:
            raise ValueError("use either background_threshold or background_embedding, not both")
        if background_threshold is not None and not 0 < background_threshold < 1:
            raise ValueError(f"background_threshold must be in (0, 1), got {background_threshold}")
        self.mode, self.crop_size, self.crop_stride = mode, crop_size, crop_stride
        self.short_side, self.temperature, self.batch_size = short_side, temperature, batch_size
        self.resize_to = None if resize_to is None else tuple(resize_to)
        self.background_threshold = background_threshold
        self.key_smoothing, self.prompt_denoising, self.upsample_topk = key_smoothing, prompt_denoising, upsample_topk

        self.templates = load_templates(templates) if isinstance(templates, str) else list(templates)
        self.classes = [list(c) for c in classes]
        embeddings, class_of_name = class_embeddings(clip, self.classes, self.templates)
        self.has_background_slot = background_threshold is not None or background_embedding is not None
        if self.has_background_slot:
            class_of_name = class_of_name + 1
            if background_embedding is not None:
                bg = F.normalize(background_embedding.detach().float().reshape(1, -1), dim=-1).to(embeddings.device)
                embeddings = torch.cat([bg, embeddings])
                class_of_name = torch.cat([torch.zeros(1, dtype=torch.long), class_of_name])
        self.name_embeddings = embeddings.float().to(clip.device)  # (N, D)
        self.class_of_name = class_of_name.to(clip.device)  # (N,)
        self.class_names = (["background"] if self.has_background_slot else []) + [c[0] for c in self.classes]
        self.mean = torch.tensor(clip.mean, device=clip.device).view(3, 1, 1)
        self.std = torch.tensor(clip.std, device=clip.device).view(3, 1, 1)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    # ----------------------------------------------------------------------------------------- public API
    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """``(H, W, 3)`` uint8 RGB -> ``(3, H, W)`` float normalised with the model's mean/std, on its device."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {image.shape} {image.dtype}")
        x = torch.from_numpy(np.array(image, copy=True)).to(self.clip.device).permute(2, 0, 1).float() / 255.0
        return (x - self.mean) / self.std

    @torch.no_grad()
    def logits(self, images: torch.Tensor | list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        """Per-pixel class log-probabilities at each input's full resolution.

        Args:
            images: ``(B, 3, H, W)`` normalised, or a list of ``(3, H_i, W_i)``.
        Returns:
            ``(B, K, H, W)`` (a list of ``(K, H_i, W_i)`` for list input); softmax over K gives probabilities.
        """
        canvases = self._canvases(images)
        out = [self._upsample(self._finalize(c), c.extent, tuple(img.shape[-2:])) for c, img in zip(canvases, images)]
        return torch.stack(out) if isinstance(images, torch.Tensor) else out

    @torch.no_grad()
    def predict(self, images: torch.Tensor | list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Label maps and confidences: a list of ``(labels (H, W) int64, confidence (H, W) float in [0, 1])``."""
        results = []
        for canvas, image in zip(self._canvases(images), images):
            log_probs = self._finalize(canvas)
            results.append(self._labels(log_probs, canvas.extent, tuple(image.shape[-2:])))
        return results

    def label_images(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """``(H, W, 3)`` uint8 RGB images -> ``(labels (H, W) uint8|int32, confidence (H, W) float32)`` each."""
        label_dtype = np.uint8 if self.num_classes <= 255 else np.int32
        results = self.predict([self.preprocess(image) for image in images])
        return [(lab.cpu().numpy().astype(label_dtype), conf.cpu().float().numpy()) for lab, conf in results]

    # ------------------------------------------------------------------------------------------ internals
    def inference_size(self, height: int, width: int) -> tuple[int, int]:
        """The size ``(h, w)`` an ``height x width`` image is resized to before inference (``short_side`` or
        ``resize_to``; rounded as MMSegmentation rounds: ``int(x * scale + 0.5)``)."""
        if self.resize_to is not None:
            long, short = self.resize_to
            scale = min(long / max(height, width), short / min(height, width))
        elif self.short_side is not None:
            scale = self.short_side / min(height, width)
        else:
            return height, width
        return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))

    def _resize(self, image: torch.Tensor) -> torch.Tensor:
        h, w = image.shape[-2:]
        size = self.inference_size(h, w)
        if size == (h, w):
            return image
        return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False,
                             antialias=size[0] < h)[0]

    def _name_logits(self, batch: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> class logits ``(B, C, H/s, W/s)`` (temperature * max-over-names cosine)."""
        features, keys = dense_features_and_keys(self.clip.model, batch)
        features = F.normalize(features.float(), dim=1)
        cosine = torch.einsum("bdhw,nd->bnhw", features, self.name_embeddings)
        if self.key_smoothing is not None:
            cosine = self._smooth_by_keys(cosine, keys.float())
        b, _, h, w = cosine.shape
        num = int(self.class_of_name.max()) + 1
        index = self.class_of_name.view(1, -1, 1, 1).expand_as(cosine)
        per_class = torch.full((b, num, h, w), -2.0, device=cosine.device).scatter_reduce(
            1, index, cosine, reduce="amax"
        )
        return self.temperature * per_class

    def _smooth_by_keys(self, cosine: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Key smoothing: each location's scores become the affinity-weighted mean over locations whose key
        features have cosine affinity >= the threshold (always including itself)."""
        b, n, h, w = cosine.shape
        k = F.normalize(keys.flatten(2), dim=1)  # (B, C, hw)
        affinity = k.transpose(1, 2) @ k  # (B, hw, hw)
        weights = affinity.clamp_min(0) * (affinity >= self.key_smoothing)
        weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(1e-6)
        return (cosine.flatten(2) @ weights).view(b, n, h, w)

    def _canvases(self, images) -> list[_Canvas]:
        resized = [self._resize(img) for img in images]
        if self.mode == "whole":
            return self._whole(resized)
        return self._slide(resized)

    def _pad(self, image: torch.Tensor, height: int, width: int) -> torch.Tensor:
        # Zero in normalised space is the mean colour.
        return F.pad(image, (0, width - image.shape[-1], 0, height - image.shape[-2]))

    def _whole(self, images: list[torch.Tensor]) -> list[_Canvas]:
        s = self.stride
        padded = [self._pad(im, math.ceil(im.shape[1] / s) * s, math.ceil(im.shape[2] / s) * s) for im in images]
        canvases: list[_Canvas | None] = [None] * len(images)
        by_shape: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(padded):
            by_shape.setdefault(tuple(im.shape[-2:]), []).append(i)
        for indices in by_shape.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                logits = self._name_logits(torch.stack([padded[i] for i in chunk]))
                for i, lg in zip(chunk, logits):
                    extent = (images[i].shape[1] / s, images[i].shape[2] / s)
                    canvases[i] = _Canvas(lg, torch.ones_like(lg[:1]), extent)
        return canvases

    def _window_starts(self, size: int) -> list[int]:
        return list(range(0, size - self.crop_size + 1, self.crop_stride))

    def _slide(self, images: list[torch.Tensor]) -> list[_Canvas]:
        s, crop, step = self.stride, self.crop_size, self.crop_stride
        padded, windows = [], []
        for i, im in enumerate(images):
            # Pad so windows tile the image exactly on the stride grid: every window lands on whole feature cells.
            h, w = (crop + math.ceil(max(d - crop, 0) / step) * step for d in im.shape[-2:])
            padded.append(self._pad(im, h, w))
            windows += [(i, y, x) for y in self._window_starts(h) for x in self._window_starts(w)]
        canvases: list[_Canvas] = []
        for im, pim in zip(images, padded):
            hc, wc = pim.shape[1] // s, pim.shape[2] // s
            num = int(self.class_of_name.max()) + 1
            canvases.append(_Canvas(pim.new_zeros(num, hc, wc), pim.new_zeros(1, hc, wc),
                                    (im.shape[1] / s, im.shape[2] / s)))
        for start in range(0, len(windows), self.batch_size):
            chunk = windows[start:start + self.batch_size]
            batch = torch.stack([padded[i][:, y:y + crop, x:x + crop] for i, y, x in chunk])
            for (i, y, x), lg in zip(chunk, self._name_logits(batch)):
                c = canvases[i]
                c.logits[:, y // s:(y + crop) // s, x // s:(x + crop) // s] += lg
                c.count[:, y // s:(y + crop) // s, x // s:(x + crop) // s] += 1
        for c in canvases:
            c.logits /= c.count
        return canvases

    def _finalize(self, canvas: _Canvas) -> torch.Tensor:
        """Canvas class logits -> ``(K, hc, wc)`` log-probabilities (prompt denoising, background slot)."""
        logits = canvas.logits
        if self.background_threshold is not None:
            logits = logits[1:]  # the background slot has no embedding; it is added below as a fixed score
        if self.prompt_denoising is not None:
            hv, wv = math.ceil(canvas.extent[0]), math.ceil(canvas.extent[1])
            peak = logits[:, :hv, :wv].softmax(dim=0).flatten(1).max(dim=1).values
            drop = peak < self.prompt_denoising
            if not bool(drop.all()):
                logits = logits.masked_fill(drop[:, None, None], _MASKED)
        log_probs = logits.log_softmax(dim=0)
        if self.background_threshold is not None:
            bg = torch.full_like(log_probs[:1], math.log(self.background_threshold))
            log_probs = torch.cat([bg, log_probs])
        return log_probs

    @staticmethod
    def _sampling_grid(grid_hw: tuple[int, int], extent: tuple[float, float], size: tuple[int, int], device):
        """Grid for ``grid_sample`` (align_corners=False) mapping output pixel centres of an image of ``size``
        onto a feature canvas ``grid_hw`` of which the image covers ``extent`` cells."""
        axes = []
        for cells, covered, n in zip(grid_hw, extent, size):
            centres = (torch.arange(n, device=device, dtype=torch.float32) + 0.5) * (covered / n)
            axes.append(2 * centres / cells - 1)
        gy, gx = torch.meshgrid(axes[0], axes[1], indexing="ij")
        return torch.stack([gx, gy], dim=-1)[None]  # (1, H, W, 2)

    def _upsample(self, log_probs: torch.Tensor, extent, size) -> torch.Tensor:
        """Bilinear resampling ``(K, hc, wc) -> (K, H, W)``; equals ``F.interpolate`` when there is no padding."""
        grid = self._sampling_grid(log_probs.shape[-2:], extent, size, log_probs.device)
        return F.grid_sample(log_probs[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]

    def _labels(self, log_probs: torch.Tensor, extent, size) -> tuple[torch.Tensor, torch.Tensor]:
        candidates = None
        if self.upsample_topk is not None and self.upsample_topk < log_probs.shape[0]:
            hv, wv = math.ceil(extent[0]), math.ceil(extent[1])
            top = log_probs[:, :hv, :wv].topk(self.upsample_topk, dim=0).indices
            candidates = torch.unique(top)
            log_probs = log_probs[candidates]
        best, labels = self._upsample(log_probs, extent, size).max(dim=0)
        if candidates is not None:
            labels = candidates[labels]
        return labels, best.exp()

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

from denseclip.dense import DEFAULT_HEAD, check_head, dense_features_and_keys, output_stride
from denseclip.models import LoadedCLIP
from denseclip.text import class_embeddings
from denseclip.vocabulary import load_templates

_MASKED = -1e4  # logit of a class removed by prompt denoising (finite, so interpolation stays finite)


@dataclass
class _Canvas:
    """Name logits of one image at feature resolution: ``logits (N, hc, wc)``, one channel per class name;
    ``extent`` = the image's size in feature cells (the rest of the canvas is padding); ``count`` = windows
    that covered each cell; ``keys (Dk, hc, wc)``: the final attention's keys (only kept for key smoothing)."""

    logits: torch.Tensor
    count: torch.Tensor
    extent: tuple[float, float]
    keys: torch.Tensor | None = None


class DenseCLIP:
    """A frozen CLIP and a vocabulary, giving per-pixel class log-probabilities and label maps.

    Args:
        clip: the loaded model (``denseclip.models.load_clip``).
        classes: one list of names per class; a class scores the max over its names (windows average the
            names' logits first).
        templates: a template set name / file, or a list of templates with ``{}``.
        mode: ``"whole"`` (one forward per image, padded to the stride) or ``"slide"`` (crop windows).
        crop_size, crop_stride: sliding-window size and step in pixels (multiples of the tower's stride).
        short_side: resize each image so its short side has this length before inference (None: as is).
        resize_to: ``(long, short)``: instead, resize each image keeping its aspect ratio to fit both, by
            ``min(long / max(h, w), short / min(h, w))`` (MMSegmentation's keep-ratio ``Resize``: a 500x375
            image becomes 683x512 for (2048, 512)). Labels are returned at each input's own size either way.
        temperature: logit scale applied to cosine similarities before the softmax.
        background_threshold: prepend a ``background`` class that wins where no class has probability >= it.
        background_class: with ``background_threshold``, instead of prepending one: the index of the vocabulary
            class that stands for background (scored by its own names, e.g. "sky, wall, ..."); it wins wherever
            no class reaches the threshold (the successors' protocol).
        background_embedding: ``(D,)`` embedding (e.g. a learned one) for a prepended ``background`` class.
        key_smoothing: probability threshold of the paper's key smoothing (None: off): after prompt denoising,
            at every location whose top class probability is below it, the probabilities become the average of
            all locations' probabilities weighted by key similarity (keys L2-normalised over positions, as the
            official code does; 1.0 as in its configs smooths everywhere).
        prompt_denoising: probability threshold; classes whose max probability over an image stays below it
            are removed for that image (None: off).
        upsample_topk: upsample only the classes that rank in the top-k at some location of the image
            (near-exact labels, far cheaper for large vocabularies); None upsamples every class.
        batch_size: images (whole) or windows (slide) per forward pass.
        head: the dense head (``denseclip.dense.HEADS``; ViT towers only for all but ``maskclip``).
        name_softmax: class probabilities as the successors of DenseCLIP compute them: a softmax over every name,
            each class the max of its names' probabilities (a class's synonyms share its probability mass, so
            probabilities of classes with synonyms sum to less than 1). False: a softmax over the classes' scores.
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
        background_class: int | None = None,
        background_embedding: torch.Tensor | None = None,
        key_smoothing: float | None = None,
        prompt_denoising: float | None = None,
        upsample_topk: int | None = 3,
        batch_size: int = 8,
        head: str = DEFAULT_HEAD,
        name_softmax: bool = False,
    ) -> None:
        self.clip = clip
        check_head(clip.model, head)
        self.head, self.name_softmax = head, name_softmax
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
        if background_class is not None and (background_threshold is None
                                             or not 0 <= background_class < len(classes)):
            raise ValueError(f"background_class {background_class} needs a background_threshold and must index "
                             f"one of the {len(classes)} classes")
        self.mode, self.crop_size, self.crop_stride = mode, crop_size, crop_stride
        self.short_side, self.temperature, self.batch_size = short_side, temperature, batch_size
        self.resize_to = None if resize_to is None else tuple(resize_to)
        self.background_threshold, self.background_class = background_threshold, background_class
        self.key_smoothing, self.prompt_denoising, self.upsample_topk = key_smoothing, prompt_denoising, upsample_topk

        self.templates = load_templates(templates) if isinstance(templates, str) else list(templates)
        self.classes = [list(c) for c in classes]
        embeddings, class_of_name = class_embeddings(clip, self.classes, self.templates)
        self.has_background_slot = (background_threshold is not None and background_class is None
                                    or background_embedding is not None)
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
        out = [self.upsample(log_probs, extent, tuple(img.shape[-2:]))
               for (log_probs, extent), img in zip(self.feature_log_probs(images), images)]
        return torch.stack(out) if isinstance(images, torch.Tensor) else out

    @torch.no_grad()
    def feature_log_probs(self, images: torch.Tensor | list[torch.Tensor]
                          ) -> list[tuple[torch.Tensor, tuple[float, float]]]:
        """Per-location class log-probabilities at feature resolution, before any upsampling.

        Args:
            images: ``(B, 3, H, W)`` normalised, or a list of ``(3, H_i, W_i)``.
        Returns:
            per image ``(log_probs (K, hc, wc), extent)``: the canvas may extend past the image (padding to the
            stride); ``extent`` = the image's size (as resized for inference) in feature cells, as
            :meth:`upsample` takes it.
        """
        return [(self._finalize(canvas), canvas.extent) for canvas in self._canvases(images)]

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

    def _name_logits(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(B, 3, H, W)`` -> name logits ``(B, N, H/s, W/s)`` (temperature * cosine) and, for key smoothing,
        the keys ``(B, Dk, H/s, W/s)`` (else None)."""
        features, keys = dense_features_and_keys(self.clip.model, batch, self.head)
        features = F.normalize(features.float(), dim=1)
        cosine = torch.einsum("bdhw,nd->bnhw", features, self.name_embeddings)
        return self.temperature * cosine, (keys.float() if self.key_smoothing is not None else None)

    def _class_log_probs(self, name_logits: torch.Tensor) -> torch.Tensor:
        """``(N, h, w)`` name logits -> ``(K, h, w)`` class log-probabilities: the max over each class's names,
        then a softmax over the classes (``name_softmax``: a softmax over the names, then the max); -inf for the
        background slot, which has no names."""
        if self.name_softmax:
            name_logits = name_logits.log_softmax(dim=0)
        index = self.class_of_name.view(-1, 1, 1).expand_as(name_logits)
        shape = (self.num_classes,) + tuple(name_logits.shape[1:])
        best = name_logits.new_full(shape, -math.inf).scatter_reduce(0, index, name_logits, reduce="amax")
        return best if self.name_softmax else best.log_softmax(dim=0)

    def _smooth_by_keys(self, probs: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """The paper's key smoothing, as the official code does it: ``probs (K, h, w)`` class probabilities and
        ``keys (Dk, h, w)`` -> ``(K, h, w)`` where every location whose top probability is below the threshold
        takes ``sum_j w_ij p_j / sum_j w_ij``, with ``w_ij = k_i . k_j`` for keys L2-normalised over positions
        (each key channel a unit vector over the image).

        The official code keeps the unnormalised ``sum_j w_ij p_j``; dividing by ``sum_j w_ij`` (one positive
        number per location) leaves each location's ranking of the classes as it is and keeps its scores
        probabilities (a location whose weights do not sum to a positive number keeps its own). Computed as
        ``(P K^T) K``, never forming the (hw, hw) weights.
        """
        k, h, w = probs.shape
        p = probs.flatten(1)  # (K, hw)
        key = F.normalize(keys.flatten(1), dim=1)  # (Dk, hw)
        smoothed = (p @ key.t()) @ key  # (K, hw)
        total = key.sum(dim=1) @ key  # (hw,) = sum_j w_ij = the column sums of `smoothed`
        smooth = (p.max(dim=0).values < self.key_smoothing) & (total > 0)
        smoothed = (smoothed / total.clamp_min(1e-12)).clamp_min(0)
        return torch.where(smooth, smoothed, p).view(k, h, w)

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
                logits, keys = self._name_logits(torch.stack([padded[i] for i in chunk]))
                for j, (i, lg) in enumerate(zip(chunk, logits)):
                    extent = (images[i].shape[1] / s, images[i].shape[2] / s)
                    canvases[i] = _Canvas(lg, torch.ones_like(lg[:1]), extent, None if keys is None else keys[j])
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
            canvases.append(_Canvas(pim.new_zeros(len(self.class_of_name), hc, wc), pim.new_zeros(1, hc, wc),
                                    (im.shape[1] / s, im.shape[2] / s)))
        for start in range(0, len(windows), self.batch_size):
            chunk = windows[start:start + self.batch_size]
            batch = torch.stack([padded[i][:, y:y + crop, x:x + crop] for i, y, x in chunk])
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

    def _finalize(self, canvas: _Canvas) -> torch.Tensor:
        """Canvas name logits -> ``(K, hc, wc)`` class log-probabilities (prompt denoising, background)."""
        logits = canvas.logits
        hv, wv = math.ceil(canvas.extent[0]), math.ceil(canvas.extent[1])
        if self.prompt_denoising is not None:
            peak = self._class_log_probs(logits[:, :hv, :wv]).exp().flatten(1).max(dim=1).values
            drop = (peak < self.prompt_denoising)[self.class_of_name]  # per name: its class is dropped
            if not bool(drop.all()):
                logits = logits.masked_fill(drop[:, None, None], _MASKED)
        log_probs = self._class_log_probs(logits)
        if self.key_smoothing is not None:
            # After prompt denoising, on probabilities, over the image's own cells (not the padding).
            probs = log_probs.exp()
            probs[:, :hv, :wv] = self._smooth_by_keys(probs[:, :hv, :wv], canvas.keys[:, :hv, :wv])
            log_probs = probs.clamp_min(1e-30).log()
        if self.background_threshold is not None:
            # Background wins exactly where no class reaches the threshold: the background slot (no names)
            # scores the threshold itself; a background class of the vocabulary scores at least that much.
            bg = 0 if self.background_class is None else self.background_class
            log_probs[bg] = log_probs[bg].clamp_min(math.log(self.background_threshold))
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

    def upsample(self, log_probs: torch.Tensor, extent: tuple[float, float], size: tuple[int, int]) -> torch.Tensor:
        """Bilinear resampling of a feature canvas ``(K, hc, wc)`` of which the image covers ``extent`` cells to
        the image's ``size`` ``(K, H, W)``; equals ``F.interpolate`` when there is no padding."""
        grid = self._sampling_grid(log_probs.shape[-2:], extent, size, log_probs.device)
        return F.grid_sample(log_probs[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]

    def _labels(self, log_probs: torch.Tensor, extent, size) -> tuple[torch.Tensor, torch.Tensor]:
        candidates = None
        if self.upsample_topk is not None and self.upsample_topk < log_probs.shape[0]:
            hv, wv = math.ceil(extent[0]), math.ceil(extent[1])
            top = log_probs[:, :hv, :wv].topk(self.upsample_topk, dim=0).indices
            candidates = torch.unique(top)
            log_probs = log_probs[candidates]
        best, labels = self.upsample(log_probs, extent, size).max(dim=0)
        if candidates is not None:
            labels = candidates[labels]
        return labels, best.exp()

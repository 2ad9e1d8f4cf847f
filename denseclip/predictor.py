"""DenseCLIP prediction: per-pixel open-vocabulary class scores and label maps from a frozen CLIP.

Scores are the cosine similarity between L2-normalised dense features (see ``dense.py``) and prompt-ensemble
class embeddings (see ``text.py``), scaled by a temperature. Everything is computed at feature resolution and
upsampled once, straight to each image's own size. The image tower runs as :mod:`denseclip.engine` prepares it;
a batch goes to the host once, after its last image (no per-image host synchronisation on a GPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from denseclip.dense import dense_features, dense_features_and_keys, output_stride
from denseclip.engine import inference_tower, input_memory_format
from denseclip.models import LoadedCLIP
from denseclip.text import class_embeddings
from denseclip.vocabulary import load_templates

_MASKED = -1e4  # logit of a class removed by prompt denoising (finite, so interpolation stays finite)


@dataclass
class _Canvas:
    """Class logits of one image at feature resolution: ``logits (C, hc, wc)``; ``extent`` = the image's size
    in feature cells (the rest of the canvas is padding)."""

    logits: torch.Tensor
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
        size_bucket: whole mode pads each image (bottom and right, with the mean colour) to a multiple of this
            many pixels (rounded up to the tower's stride), so that images of nearly the same size share a
            forward pass; None pads to the stride only. An image's labels depend on its own size only, never on
            the other images of its batch.
        batch_size: images (whole) or windows, of any images (slide), per forward pass.
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
        size_bucket: int | None = None,
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
        if size_bucket is not None and size_bucket <= 0:
            raise ValueError(f"size_bucket must be a positive number of pixels or None, got {size_bucket}")
        self.mode, self.crop_size, self.crop_stride = mode, crop_size, crop_stride
        self.short_side, self.temperature, self.batch_size = short_side, temperature, batch_size
        self.resize_to = None if resize_to is None else tuple(resize_to)
        self.background_threshold = background_threshold
        self.key_smoothing, self.prompt_denoising, self.upsample_topk = key_smoothing, prompt_denoising, upsample_topk
        self.pad_multiple = self.stride * math.ceil((size_bucket or self.stride) / self.stride)

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
        # Score slots: one per class with embeddings, plus an empty slot 0 for a threshold background.
        self.num_slots = int(class_of_name.max()) + 1
        self._one_name_per_slot = torch.equal(class_of_name, torch.arange(self.num_slots))
        self.name_embeddings = embeddings.float().to(clip.device)  # (N, D)
        self.class_of_name = class_of_name.to(clip.device)  # (N,)
        self.class_names = (["background"] if self.has_background_slot else []) + [c[0] for c in self.classes]
        self.mean = torch.tensor(clip.mean, device=clip.device).view(3, 1, 1)
        self.std = torch.tensor(clip.std, device=clip.device).view(3, 1, 1)
        # Normalisation of 0-255 pixels as one multiply-add: x * scale + shift = (x / 255 - mean) / std.
        self._scale, self._shift = 1 / (255 * self.std), -self.mean / self.std
        self.tower = inference_tower(clip.model)
        self.device, self.dtype = clip.device, clip.dtype
        self._memory_format = input_memory_format(self.tower)
        # upsample_topk: a CPU upsamples only the candidate classes; selecting them on a GPU would need their
        # number on the host (a sync per image), so a GPU upsamples every class, the others out of the running.
        self._gather_candidates = self.device.type == "cpu"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    # ----------------------------------------------------------------------------------------- public API
    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """``(H, W, 3)`` uint8 RGB -> ``(3, H, W)`` float32 normalised with the model's mean/std, on its device."""
        return torch.addcmul(self._shift, self._pixels(image), self._scale)

    @torch.inference_mode()
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

    @torch.inference_mode()
    def predict(self, images: torch.Tensor | list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Label maps and confidences on the model's device, one pair per image of ``images`` (normalised
        ``(B, 3, H, W)`` or a list of ``(3, H_i, W_i)``): ``labels (H, W)`` uint8 (int32 beyond 255 classes)
        and ``confidence (H, W)`` uint8, the winning probability x 255, rounded."""
        return self._predict(images, normalised=True)

    def _predict(self, images, normalised: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [self._labels(self._finalize(canvas), canvas.extent, tuple(image.shape[-2:]))
                for canvas, image in zip(self._canvases(images, normalised), images)]

    @torch.inference_mode()
    def label_maps(self, images: list[np.ndarray | torch.Tensor]) -> list[tuple[np.ndarray, np.ndarray]]:
        """``(H, W, 3)`` uint8 RGB images (or ``(3, H, W)`` uint8 tensors on any device) -> ``(labels (H, W)
        uint8|int32, confidence (H, W) uint8)`` each, with confidence as :meth:`predict` (and the mask store)
        keeps it. The batch reaches the host in one sync."""
        on_device = self._predict([self._pixels(image) for image in images], normalised=False)
        on_host = [(labels.to("cpu", non_blocking=True), confidence.to("cpu", non_blocking=True))
                   for labels, confidence in on_device]
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        return [(labels.numpy(), confidence.numpy()) for labels, confidence in on_host]

    def label_images(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """``(H, W, 3)`` uint8 RGB images -> ``(labels (H, W) uint8|int32, confidence (H, W) float32)`` each;
        confidence in [0, 1] in steps of 1/255 (see :meth:`label_maps`)."""
        return [(labels, confidence.astype(np.float32) / 255) for labels, confidence in self.label_maps(images)]

    # ------------------------------------------------------------------------------------------ internals
    def _pixels(self, image: np.ndarray | torch.Tensor) -> torch.Tensor:
        """``(H, W, 3)`` uint8 RGB array (or a ``(3, H, W)`` uint8 tensor, as torchvision decodes) -> ``(3, H, W)``
        uint8 on the model's device; an array becomes a view in its own pixel-interleaved layout (the layout of
        a channels_last batch: filling one is a plain copy)."""
        if isinstance(image, torch.Tensor):
            if image.ndim != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
                raise ValueError(f"expected a (3, H, W) uint8 RGB tensor, got {tuple(image.shape)} {image.dtype}")
            return image.to(self.device, non_blocking=True)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {image.shape} {image.dtype}")
        # torch refuses to wrap read-only arrays (as Ray hands them out) without a warning; those are copied.
        pixels = torch.from_numpy(image if image.flags.writeable else image.copy())
        if self.device.type == "cuda":
            pixels = pixels.pin_memory().to(self.device, non_blocking=True)
        return pixels.permute(2, 0, 1)

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
        return F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False,
                             antialias=size[0] < h)[0]

    def _name_logits(self, batch: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> class logits ``(B, C, H/s, W/s)`` float32 (temperature * max-over-names cosine)."""
        if self.key_smoothing is None:
            features, keys = dense_features(self.tower, batch), None
        else:
            features, keys = dense_features_and_keys(self.tower, batch)
        features = F.normalize(features.float(), dim=1)
        cosine = torch.einsum("bdhw,nd->bnhw", features, self.name_embeddings)
        if keys is not None:
            cosine = self._smooth_by_keys(cosine, keys.float())
        if self._one_name_per_slot:
            return self.temperature * cosine
        b, _, h, w = cosine.shape
        index = self.class_of_name.view(1, -1, 1, 1).expand_as(cosine)
        per_class = torch.full((b, self.num_slots, h, w), -2.0, device=cosine.device).scatter_reduce(
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

    def _canvases(self, images, normalised: bool = True) -> list[_Canvas]:
        """Canvases of ``images``: ``(3, H_i, W_i)``, normalised or (``normalised=False``) pixels in 0-255."""
        resized = [self._resize(img) for img in images]
        if self.mode == "whole":
            return self._whole(resized, normalised)
        return self._slide(resized, normalised)

    def _batch(self, crops: list[torch.Tensor], height: int, width: int, normalised: bool) -> torch.Tensor:
        """``(n, 3, height, width)`` in the tower's dtype and layout, ``crops[i]`` (``(3, h_i, w_i)``, at most that
        size; normalised here unless it is already) in the top-left corner of row i and zeros (the mean colour, in
        normalised space) around it. Each crop is written once, normalised and cast on the way."""
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
        m, s = self.pad_multiple, self.stride
        canvases: list[_Canvas | None] = [None] * len(images)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(images):
            by_size.setdefault((math.ceil(im.shape[1] / m) * m, math.ceil(im.shape[2] / m) * m), []).append(i)
        for (height, width), indices in by_size.items():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                logits = self._name_logits(self._batch([images[i] for i in chunk], height, width, normalised))
                for i, lg in zip(chunk, logits):
                    canvases[i] = _Canvas(lg, (images[i].shape[1] / s, images[i].shape[2] / s))
        return canvases

    def _window_starts(self, size: int) -> list[int]:
        return list(range(0, size - self.crop_size + 1, self.crop_stride))

    def _slide(self, images: list[torch.Tensor], normalised: bool) -> list[_Canvas]:
        """Windows of every image, ``batch_size`` at a time whatever image they come from, averaged per cell."""
        s, crop = self.stride, self.crop_size
        windows, sums, counts = [], [], []
        for i, im in enumerate(images):
            # Pad so windows tile the image exactly on the stride grid: every window lands on whole feature cells.
            h, w = (crop + math.ceil(max(d - crop, 0) / self.crop_stride) * self.crop_stride for d in im.shape[-2:])
            windows += [(i, y, x) for y in self._window_starts(h) for x in self._window_starts(w)]
            sums.append(torch.zeros(self.num_slots, h // s, w // s, device=self.device))
            counts.append(torch.zeros(1, h // s, w // s, device=self.device))
        for start in range(0, len(windows), self.batch_size):
            chunk = windows[start:start + self.batch_size]
            crops = [images[i][:, y:y + crop, x:x + crop] for i, y, x in chunk]
            batch = self._batch(crops, crop, crop, normalised)
            for (i, y, x), lg in zip(chunk, self._name_logits(batch)):
                sums[i][:, y // s:(y + crop) // s, x // s:(x + crop) // s] += lg
                counts[i][:, y // s:(y + crop) // s, x // s:(x + crop) // s] += 1
        return [_Canvas(total / count, (im.shape[1] / s, im.shape[2] / s))
                for total, count, im in zip(sums, counts, images)]

    def _finalize(self, canvas: _Canvas) -> torch.Tensor:
        """Canvas class logits -> ``(K, hc, wc)`` log-probabilities (prompt denoising, background slot)."""
        logits = canvas.logits
        if self.background_threshold is not None:
            logits = logits[1:]  # the background slot has no embedding; it is added below as a fixed score
        if self.prompt_denoising is not None:
            hv, wv = math.ceil(canvas.extent[0]), math.ceil(canvas.extent[1])
            peak = logits[:, :hv, :wv].softmax(dim=0).flatten(1).max(dim=1).values
            drop = peak < self.prompt_denoising
            drop &= ~drop.all()  # a vocabulary is never emptied (decided on the device: no host sync)
            logits = logits.masked_fill(drop[:, None, None], _MASKED)
        log_probs = logits.log_softmax(dim=0)
        if self.background_threshold is not None:
            bg = torch.full_like(log_probs[:1], math.log(self.background_threshold))
            log_probs = torch.cat([bg, log_probs])
        return log_probs

    @staticmethod
    def _reach(scores: torch.Tensor, extent: tuple[float, float]) -> torch.Tensor:
        """The part ``(K, n, m)`` of a canvas ``(K, hc, wc)`` that bilinear upsampling reads for an image covering
        ``extent`` cells of it: the covered cells and one beyond."""
        n, m = (min(cells, math.ceil(e) + 1) for cells, e in zip(scores.shape[-2:], extent))
        return scores[:, :n, :m]

    @classmethod
    def _upsample(cls, scores: torch.Tensor, extent: tuple[float, float], size: tuple[int, int]) -> torch.Tensor:
        """Bilinear resampling ``(K, hc, wc) -> (K, H, W)`` (align_corners=False, border values beyond the canvas)
        of a canvas of which the image covers ``extent`` cells, to the image's own ``size``.

        Only what :meth:`_reach` keeps is read, with the scale given explicitly, so that a partly covered canvas
        maps exactly as a full one would.
        """
        scales = [n / e for n, e in zip(size, extent)]
        return torch.ops.aten.upsample_bilinear2d(cls._reach(scores, extent)[None], list(size), False, *scales)[0]

    @staticmethod
    def _possible_winners(scores: torch.Tensor) -> torch.Tensor:
        """``(K, n, m)`` -> ``(K,)`` bool: the classes that can have the highest upsampled score somewhere.

        A bilinear value lies between the smallest and the largest of its quad's four corners (2x2 neighbouring
        cells; the last row and column pair with themselves, as the border does). A class whose largest corner
        is below the smallest corner of another class, in every quad, never wins: dropping it changes no label.
        """
        padded = F.pad(scores, (0, 1, 0, 1), mode="replicate")[None]
        high = F.max_pool2d(padded, 2, stride=1)[0]  # (K, n, m): each class's largest corner per quad
        low = -F.max_pool2d(-padded, 2, stride=1)[0]
        return (high >= low.max(dim=0).values).flatten(1).any(dim=1)

    def _labels(self, log_probs: torch.Tensor, extent, size) -> tuple[torch.Tensor, torch.Tensor]:
        """``(K, hc, wc)`` log-probabilities -> ``(labels (H, W) uint8|int32, confidence (H, W) uint8)``.

        Only the candidate classes (``upsample_topk``) compete. A CPU upsamples only those of them that can win
        somewhere (:meth:`_possible_winners`: often one, on a smooth map); a GPU upsamples every class with the
        others out of the running, as picking the classes would need their number on the host (a sync).
        """
        label_dtype = torch.uint8 if self.num_classes <= 255 else torch.int32
        is_candidate = torch.ones(log_probs.shape[0], dtype=torch.bool, device=log_probs.device)
        if self.upsample_topk is not None and self.upsample_topk < log_probs.shape[0]:
            hv, wv = math.ceil(extent[0]), math.ceil(extent[1])
            top = log_probs[:, :hv, :wv].topk(self.upsample_topk, dim=0).indices
            is_candidate = torch.zeros_like(is_candidate)
            is_candidate[top.flatten()] = True
        if self._gather_candidates:
            scores = self._reach(log_probs, extent)
            candidates = is_candidate.nonzero()[:, 0]
            ids = candidates[self._possible_winners(scores[candidates])]
            upsampled = self._upsample(scores[ids], extent, size)
            if len(ids) == 1:
                best, labels = upsampled[0], torch.full(size, int(ids[0]), dtype=label_dtype)
            else:
                best, index = upsampled.max(dim=0)
                labels = ids.to(label_dtype)[index]
        else:
            masked = log_probs.masked_fill(~is_candidate[:, None, None], _MASKED)
            best, labels = self._upsample(masked, extent, size).max(dim=0)
            labels = labels.to(label_dtype)
        return labels, best.exp_().mul_(255).round_().to(torch.uint8)

"""DenseCLIP prediction: per-pixel open-vocabulary class scores and label maps from a frozen CLIP.

Scores are the cosine similarity between L2-normalised dense features (see ``dense.py``) and prompt-ensemble
class embeddings (see ``text.py``), scaled by a temperature. Everything is computed at feature resolution and
upsampled once, straight to each image's own size. The image tower runs as :mod:`denseclip.engine` prepares it
(BatchNorm folded, channels_last, fused oneDNN kernels on CPU); everything after it stays on the model's device,
and a batch of label maps reaches the host in one synchronisation.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from denseclip.config import LabelerConfig
from denseclip.dense import DEFAULT_HEAD, check_head, dense_features, dense_features_and_keys, output_stride
from denseclip.engine import inference_tower, input_memory_format
from denseclip.gpu import to_device, to_host
from denseclip.images import as_rgb_array, check_rgb_image
from denseclip.models import LoadedCLIP, check_device, load_clip
from denseclip.names import (
    AUTO,
    CUDA_SIZE_BUCKET,
    DEFAULT_RESIZE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    NORMALISATIONS,
    RESIZE_AUTO,
    TINY_MODELS,
)
from denseclip.protocols import keep_ratio_size
from denseclip.sliding_window import SlidingWindow, _Canvas
from denseclip.text import class_embeddings
from denseclip.vocabulary import load_templates

_MASKED = -1e4  # logit of a class removed by prompt denoising (finite, so interpolation stays finite)
# TF32 for what runs in fp32 on Ampere and newer GPUs (matmuls and convolutions, with a 10-bit mantissa):
# several times faster, but labels are then not bit-identical to a CPU's or an older GPU's, so the setting is
# part of a mask store's provenance; every labeller built on CUDA applies it (rather than inherit torch's
# defaults), so labels made anywhere (Ray actors, a bare loop, an evaluation, a DenseCLIP+ teacher) are made so.
ALLOW_TF32 = True


class DenseCLIP(SlidingWindow):
    """A frozen CLIP and a vocabulary, giving per-pixel class log-probabilities and label maps.

        labeler = DenseCLIP(load_clip(), ["cat", "dog", "sofa"])          # RN50 with OpenAI's weights
        labels, confidence = labeler.label_images(["photo.jpg"])[0]        # (H, W) each, at the photo's size

    The defaults are those of the command line (``LabelerConfig``): real CLIP models see images resized to fit
    (2048, 512) and the paper's 85 prompt templates; the shipped tiny CLIPs see them as they are, with their
    world's templates. ``DenseCLIP.from_config(config, classes)`` builds one from a ``LabelerConfig``.

    Args:
        clip: the loaded model (``denseclip.models.load_clip``).
        classes: one entry per class: a name (``"cat"``), or a list of names, synonyms after the first
            (``["person", "man", "woman"]``); a class scores the max over its names (windows average the names'
            logits first).
        templates: a template set name / file, or a list of templates with ``{}``; None: ``denseclip85`` (the
            paper's), ``synthetic`` for the shipped tiny CLIPs.
        mode: ``"whole"`` (one forward per image, padded to the stride) or ``"slide"`` (crop windows).
        crop_size, crop_stride: sliding-window size and step in pixels (multiples of the tower's stride).
        short_side: resize each image so its short side has this length before inference (None: as is).
        resize_to: ``(long, short)``: instead, resize each image keeping its aspect ratio to fit both, by
            ``min(long / max(h, w), short / min(h, w))`` (MMSegmentation's keep-ratio ``Resize``: a 500x375
            image becomes 683x512 for (2048, 512)); ``"auto"``: (2048, 512) for real CLIP models, None for the
            tiny ones (and with ``short_side``); None: as they are. Labels are returned at each input's own size.
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
        size_bucket: whole mode pads each image (bottom and right, with the mean colour) to a multiple of this
            many pixels (rounded up to the tower's stride), so that images of nearly the same size share a forward
            pass; None pads to the stride only; ``"auto"``: 128 on CUDA, None elsewhere. An image's labels depend on
            its own size only, never on the other images of its batch.
        batch_size: images (whole) or windows, of any images (slide), per forward pass.
        head: the dense head (``denseclip.dense.HEADS``; ViT towers only for all but ``maskclip``).
        name_softmax: class probabilities as the successors of DenseCLIP compute them: a softmax over every name,
            each class the max of its names' probabilities (a class's synonyms share its probability mass, so
            probabilities of classes with synonyms sum to less than 1). False: a softmax over the classes' scores.
        normalisation: the mean/std images are normalised with (``denseclip.config.NORMALISATIONS``): ``clip``
            (the model's own) or ``imagenet`` (what the official DenseCLIP configs feed CLIP).
    """

    def __init__(
        self,
        clip: LoadedCLIP,
        classes: list[list[str]] | list[str],
        templates: str | list[str] | None = None,
        *,
        mode: str = "whole",
        crop_size: int = 448,
        crop_stride: int = 224,
        short_side: int | None = None,
        resize_to: tuple[int, int] | str | None = RESIZE_AUTO,
        temperature: float = 100.0,
        background_threshold: float | None = None,
        background_class: int | None = None,
        background_embedding: torch.Tensor | None = None,
        key_smoothing: float | None = None,
        prompt_denoising: float | None = None,
        upsample_topk: int | None = 3,
        size_bucket: int | str | None = AUTO,
        batch_size: int = 8,
        head: str = DEFAULT_HEAD,
        name_softmax: bool = False,
        normalisation: str = "clip",
    ) -> None:
        self.clip = clip
        classes = [[c] if isinstance(c, str) else list(c) for c in classes]  # a bare name is a class of one name
        if resize_to == RESIZE_AUTO:  # as LabelerConfig: the paper's resize for real CLIP, native for tiny ones
            resize_to = None if short_side is not None or clip.name in TINY_MODELS else DEFAULT_RESIZE
        if size_bucket == AUTO:
            size_bucket = CUDA_SIZE_BUCKET if clip.device.type == "cuda" else None
        if templates is None:
            templates = "synthetic" if clip.name in TINY_MODELS else "denseclip85"
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
        if normalisation not in NORMALISATIONS:
            raise ValueError(f"normalisation must be one of {', '.join(NORMALISATIONS)}, got {normalisation!r}")
        if size_bucket is not None and size_bucket <= 0:
            raise ValueError(f"size_bucket must be a positive number of pixels or None, got {size_bucket}")
        self.mode, self.crop_size, self.crop_stride = mode, crop_size, crop_stride
        self.short_side, self.temperature, self.batch_size = short_side, temperature, batch_size
        self.resize_to = None if resize_to is None else tuple(resize_to)
        self.background_threshold, self.background_class = background_threshold, background_class
        self.key_smoothing, self.prompt_denoising, self.upsample_topk = key_smoothing, prompt_denoising, upsample_topk
        self.pad_multiple = self.stride * math.ceil((size_bucket or self.stride) / self.stride)

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
        mean, std = (clip.mean, clip.std) if normalisation == "clip" else (IMAGENET_MEAN, IMAGENET_STD)
        self.normalisation = normalisation
        self.mean = torch.tensor(mean, device=clip.device).view(3, 1, 1)
        self.std = torch.tensor(std, device=clip.device).view(3, 1, 1)
        # Normalisation of 0-255 pixels as one multiply-add: x * scale + shift = (x / 255 - mean) / std.
        self._scale, self._shift = 1 / (255 * self.std), -self.mean / self.std
        self.tower = inference_tower(clip.model)
        self.device, self.dtype = clip.device, clip.dtype
        self._memory_format = input_memory_format(self.tower)
        # upsample_topk: a CPU upsamples only the candidate classes; selecting them on a GPU would need their
        # number on the host (a sync per image), so a GPU upsamples every class, the others out of the running.
        self._gather_candidates = self.device.type == "cpu"
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = ALLOW_TF32
            # Windows and size buckets give the tower a few input shapes: cuDNN times its kernels once per shape
            # and keeps the fastest (with unbucketed sizes every image would be timed anew).
            torch.backends.cudnn.benchmark |= mode == "slide" or size_bucket is not None

    @classmethod
    def from_config(cls, config: LabelerConfig, classes: list[list[str]] | list[str], clip: LoadedCLIP | None = None,
                    background_class: int | None = None) -> DenseCLIP:
        """The labeller a :class:`~denseclip.config.LabelerConfig` describes, for ``classes``; the model is loaded
        (on the config's device, in its precision) unless ``clip`` is given. ``background_class``: the class of
        ``classes`` the background threshold falls to (None: the labeller prepends a background class of its
        own)."""
        # Device "auto": the given model's device, else a GPU where this process has one.
        config = config.with_gpus(clip.device.type == "cuda" if clip is not None else torch.cuda.is_available())
        if clip is None:
            check_device(config.device)
            clip = load_clip(config.model, config.pretrained, device=config.device,
                             precision=config.effective_precision)
        return cls(
            clip, classes, config.template_set, mode=config.mode, crop_size=config.crop_size,
            crop_stride=config.crop_stride, short_side=config.short_side, resize_to=config.effective_resize_to,
            temperature=config.temperature, background_threshold=config.background_threshold,
            background_class=background_class, key_smoothing=config.key_smoothing,
            prompt_denoising=config.prompt_denoising, upsample_topk=config.upsample_topk,
            size_bucket=config.effective_size_bucket, batch_size=config.batch_size, head=config.head,
            name_softmax=config.name_softmax, normalisation=config.normalisation)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    # ----------------------------------------------------------------------------------------- public API
    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """``(H, W, 3)`` uint8 RGB -> ``(3, H, W)`` float32 normalised with the model's mean/std, on its device."""
        return self.normalise(self._pixels([image])[0])

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixel values in 0-255, ``(..., 3, H, W)`` of any dtype on the model's device -> float32, normalised as
        every labelling path here normalises them (one multiply-add, so the same pixels give the same inputs)."""
        return torch.addcmul(self._shift, pixels, self._scale)

    @torch.inference_mode()
    def logits(self, images: torch.Tensor | list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        """Per-pixel class log-probabilities at each input's full resolution.

        Args:
            images: ``(B, 3, H, W)`` normalised, or a list of ``(3, H_i, W_i)``.
        Returns:
            ``(B, K, H, W)`` (a list of ``(K, H_i, W_i)`` for list input); softmax over K gives probabilities.
        """
        out = [self.upsample(self._finalize(c), c.extent, tuple(img.shape[-2:]))
               for c, img in zip(self._canvases(images), images)]
        return torch.stack(out) if isinstance(images, torch.Tensor) else out

    @torch.inference_mode()
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

    @torch.inference_mode()
    def predict(self, images: torch.Tensor | list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Label maps and confidences on the model's device, one pair per image of ``images`` (normalised
        ``(B, 3, H, W)`` or a list of ``(3, H_i, W_i)``): ``labels (H, W)`` uint8 (int32 beyond 255 classes)
        and ``confidence (H, W)`` float32 in [0, 1], the winning class's probability."""
        return [(labels, confidence.exp()) for labels, confidence in self._predict(images, normalised=True)]

    def _predict(self, images, normalised: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`predict`'s work, with the winning log-probability as the confidence."""
        return [self._labels(self._finalize(canvas), canvas.extent, tuple(image.shape[-2:]))
                for canvas, image in zip(self._canvases(images, normalised), images)]

    @torch.inference_mode()
    def label_maps(self, images: list[np.ndarray | torch.Tensor | Image.Image | str | os.PathLike]
                   ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Images as for :meth:`label_images` (or ``(3, H, W)`` uint8 tensors on any device, as torchvision decodes)
        -> ``(labels (H, W) uint8|int32, confidence (H, W) uint8)`` each, confidence = the winning probability
        x 255, rounded (as the mask store keeps it). Computed on the device; the batch reaches the host in one
        synchronisation."""
        on_device = [(labels, log_conf.exp_().mul_(255).round_().to(torch.uint8))
                     for labels, log_conf in self._predict(self._pixels(images), False)]
        return to_host(on_device)

    @torch.inference_mode()
    def label_images(self, images: list[np.ndarray | Image.Image | str | os.PathLike]
                     ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Images (``(H, W, 3)`` uint8 RGB arrays, PIL images or image file paths) -> ``(labels (H, W)
        uint8|int32, confidence (H, W) float32)`` each, confidence the winning class's probability; the batch
        reaches the host in one synchronisation."""
        on_device = [(labels, log_conf.exp_()) for labels, log_conf in self._predict(self._pixels(images), False)]
        return to_host(on_device)

    # ------------------------------------------------------------------------------------------ internals
    def _pixels(self, images: list[np.ndarray | torch.Tensor]) -> list[torch.Tensor]:
        """``(H, W, 3)`` uint8 RGB arrays (or ``(3, H, W)`` uint8 tensors) -> ``(3, H, W)`` uint8 tensors on the
        model's device; an array becomes a view in its own pixel-interleaved layout (the layout of a channels_last
        batch: filling one is a plain copy). The arrays travel to a GPU together, in one copy from one pinned
        buffer (:func:`denseclip.gpu.to_device`)."""
        arrays = []
        images = [image if isinstance(image, torch.Tensor) else as_rgb_array(image) for image in images]
        for image in images:
            if isinstance(image, torch.Tensor):
                if image.ndim != 3 or image.shape[0] != 3 or image.dtype != torch.uint8 or not image.numel():
                    raise ValueError(f"expected a (3, H, W) uint8 RGB tensor, got {tuple(image.shape)} {image.dtype}")
            else:
                check_rgb_image(image)
                arrays.append(image)
        moved = iter(to_device(arrays, self.device))
        # A tensor already on the device stays as it is; one on the host is copied (blocking: it is not pinned).
        return [image.to(self.device) if isinstance(image, torch.Tensor) else next(moved).permute(2, 0, 1)
                for image in images]

    def inference_size(self, height: int, width: int) -> tuple[int, int]:
        """The size ``(h, w)`` an ``height x width`` image is resized to before inference (``short_side`` or
        ``resize_to``; rounded as MMSegmentation rounds: ``int(x * scale + 0.5)``)."""
        if self.short_side is None:
            return keep_ratio_size(height, width, self.resize_to)
        scale = self.short_side / min(height, width)
        return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))

    def _resize(self, image: torch.Tensor) -> torch.Tensor:
        h, w = image.shape[-2:]
        size = self.inference_size(h, w)
        if size == (h, w):
            return image
        return F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False,
                             antialias=size[0] < h)[0]

    def _name_logits(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(B, 3, H, W)`` -> name logits ``(B, N, H/s, W/s)`` (temperature * cosine) and, for key smoothing,
        the keys ``(B, Dk, H/s, W/s)`` (else None)."""
        if self.key_smoothing is None:
            features, keys = dense_features(self.tower, batch, self.head), None
        else:
            features, keys = dense_features_and_keys(self.tower, batch, self.head)
            keys = keys.float()
        features = F.normalize(features.float(), dim=1)
        cosine = torch.einsum("bdhw,nd->bnhw", features, self.name_embeddings)
        return self.temperature * cosine, keys

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

    def _finalize(self, canvas: _Canvas) -> torch.Tensor:
        """Canvas name logits -> ``(K, hc, wc)`` class log-probabilities (prompt denoising, background)."""
        logits = canvas.logits
        hv, wv = math.ceil(canvas.extent[0]), math.ceil(canvas.extent[1])
        if self.prompt_denoising is not None:
            peak = self._class_log_probs(logits[:, :hv, :wv]).exp().flatten(1).max(dim=1).values
            drop = (peak < self.prompt_denoising)[self.class_of_name]  # per name: its class is dropped
            drop &= ~drop.all()  # a vocabulary is never emptied (decided on the device: no host sync)
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
    def _reach(scores: torch.Tensor, extent: tuple[float, float]) -> torch.Tensor:
        """The part ``(K, n, m)`` of a canvas ``(K, hc, wc)`` that bilinear upsampling reads for an image covering
        ``extent`` cells of it: the covered cells and one beyond."""
        n, m = (min(cells, math.ceil(e) + 1) for cells, e in zip(scores.shape[-2:], extent))
        return scores[:, :n, :m]

    def upsample(self, log_probs: torch.Tensor, extent: tuple[float, float], size: tuple[int, int]) -> torch.Tensor:
        """Bilinear resampling (align_corners=False, border values beyond the canvas) of a feature canvas
        ``(K, hc, wc)`` of which the image covers ``extent`` cells to the image's ``size`` ``(K, H, W)``; equals
        ``F.interpolate`` when there is no padding.

        Only what :meth:`_reach` keeps is read, with the scale given explicitly, so that a partly covered canvas
        maps exactly as a full one would.
        """
        scales = [n / e for n, e in zip(size, extent)]
        return torch.ops.aten.upsample_bilinear2d(self._reach(log_probs, extent)[None], list(size), False, *scales)[0]

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
        """``(K, hc, wc)`` log-probabilities -> ``(labels (H, W) uint8|int32, best log-probability (H, W))``.

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
        if not self._gather_candidates:
            masked = log_probs.masked_fill(~is_candidate[:, None, None], _MASKED)
            best, labels = self.upsample(masked, extent, size).max(dim=0)
            return labels.to(label_dtype), best
        scores = self._reach(log_probs, extent)
        candidates = is_candidate.nonzero()[:, 0]
        ids = candidates[self._possible_winners(scores[candidates])]
        upsampled = self.upsample(scores[ids], extent, size)
        if len(ids) == 1:
            return torch.full(size, int(ids[0]), dtype=label_dtype, device=upsampled.device), upsampled[0]
        best, index = upsampled.max(dim=0)
        return ids.to(label_dtype)[index], best

"""Model loading: an open_clip model named by ``(name, pretrained)``, where pretrained is a tag, a path or a URL.

``denseclip-tiny-shapes`` (ResNet) and ``denseclip-tiny-shapes-vit`` (ViT) are the tiny CLIPs this project trains on
its synthetic world and ships in ``denseclip/assets/``; they load through exactly the same code as real open_clip
weights.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import fsspec
import open_clip
import torch
from safetensors.torch import load as load_safetensors_bytes
from torch import nn

from denseclip.config import TINY_MODEL, TINY_VIT_MODEL

# The shipped models' folders: ``<name>.json`` (open_clip config), ``model.safetensors``, ``training.json``.
TINY_ASSETS = {
    TINY_MODEL: Path(__file__).parent / "assets" / "tiny_clip",
    TINY_VIT_MODEL: Path(__file__).parent / "assets" / "tiny_clip_vit",
}
DEFAULT_MODEL = TINY_MODEL
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

log = logging.getLogger(__name__)


class ModelLoadError(ValueError):
    """A model name, pretrained tag or checkpoint that cannot be loaded; the message names it."""


@dataclass
class LoadedCLIP:
    """An open_clip CLIP in eval mode plus what is needed to feed it.

    ``mean``/``std`` are per-channel RGB values for images in [0, 1]; ``fingerprint`` identifies the weights
    (checkpoint sha256, or ``name/tag``) and keys every cache and provenance record.
    """

    model: nn.Module
    tokenizer: object
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int
    name: str
    pretrained: str | None
    fingerprint: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


class _QuietRandomInit(logging.Filter):
    """open_clip warns "no pretrained weights" for every model built before its weights are loaded here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


logging.getLogger().addFilter(_QuietRandomInit())


def _register_tiny() -> None:
    for name, folder in TINY_ASSETS.items():
        if name not in open_clip.list_models():
            open_clip.add_model_config(folder / f"{name}.json")


def _is_checkpoint_reference(pretrained: str) -> bool:
    return "://" in pretrained or os.path.sep in pretrained or Path(pretrained).suffix != "" or Path(
        pretrained
    ).exists()


def read_state_dict(url: str) -> tuple[dict[str, torch.Tensor], str]:
    """Read a checkpoint from a local path or fsspec URL; return ``(state_dict, sha256)``.

    ``.safetensors`` files are read with safetensors; anything else with ``torch.load(weights_only=True)``,
    so no checkpoint can run code. Training checkpoints nesting the weights under ``state_dict`` and
    DDP ``module.`` prefixes are unwrapped.
    """
    try:
        with fsspec.open(url, "rb") as f:
            data = f.read()
    except (FileNotFoundError, OSError) as exc:
        raise ModelLoadError(f"cannot read checkpoint {url!r}: {exc}") from exc
    digest = hashlib.sha256(data).hexdigest()
    try:
        if url.endswith(".safetensors"):
            state = load_safetensors_bytes(data)
        else:
            import io

            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(f"checkpoint {url!r} is not a safetensors or weights-only torch file: {exc}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"checkpoint {url!r} does not hold a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state, digest


def load_clip(
    model: str = DEFAULT_MODEL,
    pretrained: str | None = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
) -> LoadedCLIP:
    """Build an open_clip CLIP and load its weights.

    Args:
        model: an open_clip model name (``RN50``, ``RN50x16``, ``ViT-B-16`` ...) or ``denseclip-tiny-shapes``.
        pretrained: an open_clip pretrained tag (``openai``; downloads through open_clip's cache), a local
            checkpoint path or an fsspec URL (``s3://...``), or ``"random"``; ``None`` loads the shipped weights
            for the tiny model and leaves any other model randomly initialised (for tests and baselines).
        precision: ``fp32``, ``bf16`` or ``fp16``.
    """
    _register_tiny()
    if model not in open_clip.list_models():
        raise ModelLoadError(f"unknown model {model!r}; open_clip knows e.g. RN50, RN50x16, ViT-B-16, {TINY_MODEL}")
    if precision not in PRECISIONS:
        raise ModelLoadError(f"unknown precision {precision!r}; choose one of {sorted(PRECISIONS)}")
    if pretrained is None and model in TINY_ASSETS:
        pretrained = str(TINY_ASSETS[model] / "model.safetensors")

    if pretrained in (None, "random"):
        pretrained = None
        clip = open_clip.create_model(model, pretrained=None)
        fingerprint = f"{model}/random-init"
    elif _is_checkpoint_reference(pretrained):
        clip = open_clip.create_model(model, pretrained=None)
        state, digest = read_state_dict(pretrained)
        reference = clip.state_dict()
        state = {k: v.to(reference[k].dtype) if k in reference else v for k, v in state.items()}
        try:
            clip.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ModelLoadError(f"checkpoint {pretrained!r} does not fit model {model!r}: {exc}") from exc
        fingerprint = f"{model}/sha256:{digest[:16]}"
    else:
        tags = open_clip.list_pretrained_tags_by_model(model)
        if pretrained not in tags:
            raise ModelLoadError(
                f"unknown pretrained tag {pretrained!r} for {model!r}; known tags: {', '.join(tags) or 'none'}"
                " (or give a checkpoint path / URL)"
            )
        try:
            clip = open_clip.create_model(model, pretrained=pretrained)
        except Exception as exc:
            raise ModelLoadError(f"could not fetch weights {model}/{pretrained}: {exc}") from exc
        fingerprint = f"{model}/{pretrained}"

    clip = clip.to(device=device, dtype=PRECISIONS[precision]).eval()
    for p in clip.parameters():
        p.requires_grad_(False)
    cfg = open_clip.get_model_preprocess_cfg(clip)
    size = cfg.get("size", clip.visual.image_size)
    size = size[0] if isinstance(size, (tuple, list)) else size
    return LoadedCLIP(
        model=clip,
        tokenizer=open_clip.get_tokenizer(model),
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        image_size=int(size),
        name=model,
        pretrained=pretrained,
        fingerprint=fingerprint,
    )

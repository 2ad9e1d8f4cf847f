"""Model loading: an open_clip model named by ``(name, pretrained)``, where pretrained is a tag, a path or a URL.

``denseclip-tiny-shapes`` (ResNet) and ``denseclip-tiny-shapes-vit`` (ViT) are the tiny CLIPs this project trains on
its synthetic world and ships in ``denseclip/assets/``; they load through exactly the same code as real open_clip
weights.

Real weights are built as they were trained: a pretrained tag gets the activation its open_clip pretrained config
declares (OpenAI's CLIP was trained with QuickGELU, which open_clip's plain ``RN50`` config does not use), and no
model silently runs on random weights: without a tag a model gets the paper's ``openai`` weights, and random
weights are used only when asked for by name (``random``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import fsspec
import open_clip
import torch
from open_clip.transformer import LayerNormFp32, QuickGELU
from safetensors.torch import load as load_safetensors_bytes
from torch import nn

from denseclip.config import ConfigError
from denseclip.names import DEFAULT_MODEL, TINY_COCO_STUFF_MODEL, TINY_MODEL, TINY_MODELS, TINY_VIT_MODEL
from denseclip.packed_weights import (
    PackedWeightsError,
    initialised_under,
    packed_seed,
    trained_token_rows,
    unpack_token_embedding,
)

# The shipped models' folders: ``<name>.json`` (open_clip config), ``model.safetensors``, ``training.json``.
TINY_ASSETS = {
    TINY_MODEL: Path(__file__).parent / "assets" / "tiny_clip",
    TINY_VIT_MODEL: Path(__file__).parent / "assets" / "tiny_clip_vit",
    TINY_COCO_STUFF_MODEL: Path(__file__).parent / "assets" / "tiny_clip_cocostuff",
}
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
RANDOM = "random"  # the pretrained value that asks for randomly initialised weights
PAPER_TAG = "openai"  # the weights the paper used, and the default of every model open_clip has them for
GELU, QUICK_GELU = "gelu", "quick_gelu"
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")

log = logging.getLogger(__name__)


class ModelLoadError(ValueError):
    """A model name, pretrained tag or checkpoint that cannot be loaded; the message names it."""


@dataclass
class LoadedCLIP:
    """An open_clip CLIP in eval mode plus what is needed to feed it.

    ``mean``/``std`` are per-channel RGB values for images in [0, 1]; ``fingerprint`` identifies the weights
    (checkpoint sha256, ``name/tag``, or a digest of randomly drawn weights) and keys every cache and provenance
    record; ``activation`` is the towers' GELU variant (``gelu`` or ``quick_gelu``).
    """

    model: nn.Module
    tokenizer: object
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int
    name: str
    pretrained: str | None
    fingerprint: str
    activation: str = GELU

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the towers compute in (their embeddings and norm layers stay fp32 in bf16/fp16)."""
        return getattr(self.model, "visual", self.model).conv1.weight.dtype


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


def _check_model(model: str) -> None:
    _register_tiny()
    if model not in open_clip.list_models():
        raise ModelLoadError(f"unknown model {model!r}; open_clip knows e.g. RN50, RN50x16, ViT-B-16, "
                             f"RN50-quickgelu, {TINY_MODEL}")


def resolve_pretrained(model: str, pretrained: str | None) -> str:
    """The weights ``pretrained`` stands for: None means the shipped weights for the tiny model and the paper's
    ``openai`` weights for any model open_clip has them for; any other model must name its weights (raises
    ModelLoadError listing the choices). Unknown tags raise ModelLoadError too."""
    _check_model(model)
    tags = open_clip.list_pretrained_tags_by_model(model)
    if pretrained is None:
        if model in TINY_ASSETS:
            return str(TINY_ASSETS[model] / "model.safetensors")
        if PAPER_TAG in tags:
            return PAPER_TAG
        raise ModelLoadError(
            f"model {model!r} has no {PAPER_TAG} weights: choose --pretrained from its open_clip tags "
            f"({', '.join(tags) or 'none'}), a checkpoint path or URL, or {RANDOM!r} for random weights")
    if pretrained == RANDOM or _is_checkpoint_reference(pretrained):
        return pretrained
    if pretrained not in tags:
        raise ModelLoadError(f"unknown pretrained tag {pretrained!r} for {model!r}; known tags: "
                             f"{', '.join(tags) or 'none'} (or give a checkpoint path / URL, or {RANDOM!r})")
    return pretrained


def weights_activation(model: str, pretrained: str | None) -> str:
    """``quick_gelu`` or ``gelu``: the activation ``load_clip(model, pretrained)`` builds the towers with (a tag's
    own declaration, else the model config's: ``RN50-quickgelu`` for a checkpoint of OpenAI's weights)."""
    pretrained = resolve_pretrained(model, pretrained)
    is_tag = pretrained != RANDOM and not _is_checkpoint_reference(pretrained)
    declared = open_clip.get_pretrained_cfg(model, pretrained) if is_tag else open_clip.get_model_config(model)
    return QUICK_GELU if declared.get("quick_gelu", False) else GELU


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


# ------------------------------------------------------------------------------------- downloads
def _hub_files(hf_hub: str) -> tuple[str, list[str]]:
    """``(repo id, file names open_clip tries in order)`` of a pretrained config's ``hf_hub`` entry."""
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    repo, filename = os.path.split(hf_hub)  # "org/repo/" names the repo's default file
    if not filename:
        return repo, [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]
    if filename.endswith((".bin", ".pth")):
        return repo, [filename[:-4] + ".safetensors", filename]
    return repo, [filename]


def _cached_weights(cfg: dict) -> str | None:
    """The local file of a pretrained config's weights when a previous download left it in the Hugging Face
    cache (``HF_HUB_CACHE``) or open_clip's URL cache, else None; never touches the network."""
    if cfg.get("hf_hub") and open_clip.pretrained.has_hf_hub():
        from huggingface_hub import try_to_load_from_cache

        repo, filenames = _hub_files(cfg["hf_hub"])
        for filename in filenames:
            path = try_to_load_from_cache(repo, filename)
            if isinstance(path, str):
                return path
        return None
    url_cache = Path("~/.cache/clip").expanduser() / os.path.basename(cfg.get("url", ""))
    return str(url_cache) if cfg.get("url") and url_cache.is_file() else None


def _weights_host(cfg: dict) -> str:
    if cfg.get("hf_hub") and open_clip.pretrained.has_hf_hub():
        from huggingface_hub import constants

        return urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    return urlparse(cfg.get("url", "")).hostname or ""


def _unreachable(host: str) -> str | None:
    """Why ``host`` surely cannot be reached (its name does not resolve), or None. Behind a proxy the proxy
    resolves names, so nothing is concluded there. Without this, an offline download retries for a minute."""
    if not host or any(os.environ.get(v) for v in _PROXY_VARIABLES):
        return None
    try:
        socket.getaddrinfo(host, 443)
    except OSError as exc:
        return f"{host} cannot be reached: {exc.strerror or exc}"
    return None


@contextlib.contextmanager
def _quiet_hub_logging() -> Iterator[None]:
    """Hugging Face's client logs every retry of a failing download; the one error raised here says it all."""
    hub = logging.getLogger("huggingface_hub")
    level = hub.level
    hub.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub.setLevel(level)


def _no_weights(model: str, tag: str, reason: str) -> ModelLoadError:
    # A checkpoint is built with its model name's activation: QuickGELU weights need the -quickgelu name.
    named = f"{model}-quickgelu"
    quick = open_clip.get_pretrained_cfg(model, tag).get("quick_gelu", False)
    named = named if quick and named in open_clip.list_models() else model
    return ModelLoadError(
        f"cannot download the weights {model}/{tag} ({reason}); give a local copy instead: --model {named} "
        f"--pretrained PATH_OR_URL (open_clip's {model}/{tag} weights as .safetensors or a torch state dict, "
        f"downloaded on a connected machine); to try things out offline, the shipped tiny CLIPs: --model "
        f"{' / '.join(TINY_MODELS)} (they know only their synthetic worlds)")


def weights_file(model: str, tag: str) -> str:
    """The local file of open_clip's pretrained weights ``model``/``tag``: from the cache, else downloaded.
    Raises ModelLoadError in one line (model, tag, why, and how to give a local checkpoint) when it cannot be had.
    """
    cfg = open_clip.get_pretrained_cfg(model, tag)
    cached = _cached_weights(cfg)
    if cached:
        return cached
    problem = _unreachable(_weights_host(cfg))
    if problem:
        raise _no_weights(model, tag, problem)
    try:
        with _quiet_hub_logging():
            return open_clip.download_pretrained(cfg)
    except Exception as exc:  # any download failure becomes the one line above
        raise _no_weights(model, tag, f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from exc


def unknown_names(model: str, pretrained: str | None, classes: list[list[str]]) -> list[str]:
    """The class names a shipped tiny CLIP (with its shipped weights) never saw in training: those with a token
    whose embedding training never moved. Empty for every other model, which knows any name."""
    if model not in TINY_ASSETS or pretrained not in (None, str(TINY_ASSETS[model] / "model.safetensors")):
        return []
    _register_tiny()
    known = trained_token_rows(TINY_ASSETS[model] / "model.safetensors")
    names = [name for names in classes for name in names]
    tokens = open_clip.get_tokenizer(model)(names)  # (N, context), zero-padded
    return [name for name, row in zip(names, tokens.tolist()) if any(t and t not in known for t in row)]


def warn_unknown_names(config, classes: list[list[str]], prog: str) -> None:
    """One line on stderr when the labeller of ``config`` (a LabelerConfig) is a tiny CLIP that never saw some of
    the names of ``classes``: its labels for them mean nothing."""
    unknown = unknown_names(config.model, config.pretrained, classes)
    if unknown:
        shown = ", ".join(repr(n) for n in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        print(f"{prog}: warning: {config.model} never saw {shown} in training (it knows only its synthetic world's "
              f"names), so it cannot label them; a real CLIP knows any name: --model RN50 (the default)",
              file=sys.stderr, flush=True)


def check_weights(model: str, pretrained: str | None) -> None:
    """Fail early, before any cluster work, when ``load_clip(model, pretrained)`` surely cannot find its weights:
    an unknown model or tag, a missing checkpoint, or a tag neither cached nor downloadable from here (offline).
    Raises ModelLoadError."""
    pretrained = resolve_pretrained(model, pretrained)
    if pretrained == RANDOM:
        return
    if _is_checkpoint_reference(pretrained):
        try:
            fs, path = fsspec.core.url_to_fs(pretrained)
            exists = fs.exists(path)
        except (OSError, ValueError, ImportError) as exc:
            raise ModelLoadError(f"cannot read checkpoint {pretrained!r}: {exc}") from exc
        if not exists:
            raise ModelLoadError(f"cannot read checkpoint {pretrained!r}: no such file")
        return
    cfg = open_clip.get_pretrained_cfg(model, pretrained)
    if not _cached_weights(cfg):
        problem = _unreachable(_weights_host(cfg))
        if problem:
            raise _no_weights(model, pretrained, problem)


# ------------------------------------------------------------------------------------- loading
def _weights_digest(module: nn.Module) -> str:
    """A short digest of a module's weights (names, shapes and the first values of every tensor): randomly
    drawn weights get an identity of their own, so two random models never share a cache entry."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        h.update(f"{name}{tuple(tensor.shape)}".encode())
        h.update(tensor.detach().flatten()[:64].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _activation(model: nn.Module) -> str:
    return QUICK_GELU if any(isinstance(m, QuickGELU) for m in model.modules()) else GELU


def norms_in_fp32(model: nn.Module) -> nn.Module:
    """Make every LayerNorm of ``model`` compute in fp32 on its fp32 weight and bias, its input cast up and its
    output cast back to the input's dtype (open_clip's ``LayerNormFp32``, what open_clip builds for its own
    fp16/bf16 precisions); returns ``model``.

    ``convert_weights_to_lp`` leaves the norms' parameters in fp32, and a plain LayerNorm then gets fp16/bf16
    input: a CPU's kernel accepts the mix, CUDA's reads weight and bias in the input's dtype and raises
    ("expected scalar type Half but found Float"). The modules keep their parameters; only their forward changes.
    """
    for module in model.modules():
        if isinstance(module, nn.LayerNorm) and not isinstance(module, LayerNormFp32):
            module.__class__ = LayerNormFp32
    return model


def check_device(device: str, where: str = "device") -> None:
    """Refuse a CUDA device this process cannot see (no GPU, or ``cuda:N`` beyond the GPUs present) with a
    ConfigError naming it, before any model is loaded. Inside Ray actors the device is first mapped to the GPU
    Ray assigned (``denseclip.ray.devices``), so a job spec's ``cuda:1`` never reaches this check there."""
    if not device.startswith("cuda"):
        return
    count = torch.cuda.device_count()
    index = int(device.partition(":")[2] or 0)
    if index >= count:
        present = "GPUs: " + ", ".join(f"cuda:{i}" for i in range(count)) if count else "it has no CUDA GPU"
        raise ConfigError(f"{where}: {device} does not exist on this machine ({present})")


def load_clip(
    model: str = DEFAULT_MODEL,
    pretrained: str | None = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
) -> LoadedCLIP:
    """Build an open_clip CLIP and load its weights.

    Args:
        model: an open_clip model name (``RN50``, ``RN50x16``, ``ViT-B-16``, ``RN50-quickgelu`` ...) or
            ``denseclip-tiny-shapes``.
        pretrained: an open_clip pretrained tag (``openai``; from open_clip's cache or downloaded, built with
            the activation the tag declares: QuickGELU for OpenAI's weights), a local checkpoint path or an
            fsspec URL (``s3://...``; built with the model config's activation, so a checkpoint of OpenAI's
            weights is loaded as ``RN50-quickgelu``), or ``"random"`` (random weights drawn from torch's RNG).
            None: the shipped weights for the tiny model, ``openai`` for any other model that has them.
        precision: ``fp32``, ``bf16`` or ``fp16``. In bf16 and fp16 the model is converted as open_clip's own
            precision options convert it: convolutions, linear layers and attention in that dtype, normalisation
            layers (BatchNorm, LayerNorm), embeddings and the logit scale in fp32; every LayerNorm computes in
            fp32 (:func:`norms_in_fp32`).
    """
    if precision not in PRECISIONS:
        raise ModelLoadError(f"unknown precision {precision!r}; choose one of {sorted(PRECISIONS)}")
    pretrained = resolve_pretrained(model, pretrained)
    preprocess: dict = {}
    if pretrained == RANDOM:
        clip = open_clip.create_model(model, pretrained=None)
        fingerprint = f"{model}/random-init/{_weights_digest(clip)}"
    elif _is_checkpoint_reference(pretrained):
        state, digest = read_state_dict(pretrained)
        seed = packed_seed(state)  # a packed checkpoint (the shipped tiny CLIPs) rebuilds from the model's init
        with initialised_under(seed):
            clip = open_clip.create_model(model, pretrained=None)
        if seed is not None:
            try:
                state = unpack_token_embedding(state, clip.token_embedding.weight, source=pretrained)
            except PackedWeightsError as exc:
                raise ModelLoadError(str(exc)) from exc
        reference = clip.state_dict()
        state = {k: v.to(reference[k].dtype) if k in reference else v for k, v in state.items()}
        try:
            clip.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ModelLoadError(f"checkpoint {pretrained!r} does not fit model {model!r}: {exc}") from exc
        fingerprint = f"{model}/sha256:{digest[:16]}"
    else:
        cfg = open_clip.get_pretrained_cfg(model, pretrained)
        path = weights_file(model, pretrained)
        clip = open_clip.create_model(model, pretrained=None, force_quick_gelu=bool(cfg.get("quick_gelu")))
        try:
            open_clip.load_checkpoint(clip, path, strict=True, weights_only=True)
        except Exception as exc:
            raise ModelLoadError(f"weights {model}/{pretrained} at {path} could not be loaded: {exc}") from exc
        preprocess = {k: cfg[k] for k in ("mean", "std") if k in cfg}
        fingerprint = f"{model}/{pretrained}"

    clip = clip.to(device=device).eval()
    if precision != "fp32":
        open_clip.model.convert_weights_to_lp(clip, PRECISIONS[precision])
        norms_in_fp32(clip)
    for p in clip.parameters():
        p.requires_grad_(False)
    cfg = {**open_clip.get_model_preprocess_cfg(clip), **preprocess}
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
        activation=_activation(clip),
    )

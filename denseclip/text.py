"""Text side: prompt-ensemble class embeddings from CLIP's text tower, trimmed and cached on disk."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from denseclip.models import LoadedCLIP


def _eot_lengths(tokens: torch.Tensor) -> torch.Tensor:
    """Index of the end-of-text token (the largest id, as CLIP pools) + 1, per row."""
    return tokens.argmax(dim=-1) + 1


def encode_prompts(clip: LoadedCLIP, prompts: list[str], batch_size: int = 256) -> torch.Tensor:
    """``(N, D)`` L2-normalised text embeddings of ``prompts``.

    CLIP's text attention is causal and pools at the end-of-text token, so the padding after the longest prompt
    of a batch cannot change any embedding: each batch is trimmed to that length, which is several times faster
    than running the full context.
    """
    model = clip.model
    out = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            tokens = clip.tokenizer(prompts[start:start + batch_size]).to(clip.device)
            length = int(_eot_lengths(tokens).max())
            out.append(F.normalize(_encode_trimmed(model, tokens[:, :length]).float(), dim=-1))
    return torch.cat(out)


def _encode_trimmed(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    if getattr(model, "text_pool_type", "argmax") != "argmax" or not hasattr(model, "token_embedding"):
        # Towers that pool elsewhere or are not causal run at full length.
        full = torch.zeros(tokens.shape[0], model.context_length, dtype=tokens.dtype, device=tokens.device)
        full[:, : tokens.shape[1]] = tokens
        return model.encode_text(full)
    length = tokens.shape[1]
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast) + model.positional_embedding[:length].to(cast)
    mask = model.attn_mask[:length, :length] if model.attn_mask is not None else None
    x = model.ln_final(model.transformer(x, attn_mask=mask))
    x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
    projection = model.text_projection
    if projection is None:
        return x
    return projection(x) if isinstance(projection, torch.nn.Linear) else x @ projection


def _cache_dir() -> Path:
    root = os.environ.get("DENSECLIP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "denseclip")
    return Path(root) / "text"


def name_embeddings(
    clip: LoadedCLIP, names: list[str], templates: list[str], cache: bool = True
) -> torch.Tensor:
    """``(N, D)`` prompt-ensemble embeddings, one per name: each template filled with the name, encoded,
    L2-normalised, averaged over templates, re-normalised. Cached on disk by (model, weights, activation, dtype,
    templates, names)."""
    key = json.dumps([clip.name, clip.fingerprint, clip.activation, str(clip.dtype), templates, names])
    path = _cache_dir() / f"{hashlib.sha256(key.encode()).hexdigest()}.safetensors"
    if cache and path.exists():
        return load_file(path)["embeddings"].to(clip.device)
    prompts = [t.replace("{}", name) for name in names for t in templates]
    per_prompt = encode_prompts(clip, prompts).reshape(len(names), len(templates), -1)
    embeddings = F.normalize(per_prompt.mean(dim=1), dim=-1)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file({"embeddings": embeddings.cpu().contiguous()}, str(tmp))
        os.replace(tmp, path)
    return embeddings


def class_embeddings(
    clip: LoadedCLIP, classes: list[list[str]], templates: list[str], cache: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings of every name of every class: ``(embeddings (N, D), class_of_name (N,) int64)``.

    A class's score at a location is the max over its names' scores (see ``DenseCLIP``).
    """
    names = [name for synonyms in classes for name in synonyms]
    class_of_name = torch.tensor([i for i, synonyms in enumerate(classes) for _ in synonyms])
    return name_embeddings(clip, names, templates, cache=cache), class_of_name

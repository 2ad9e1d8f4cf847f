"""DenseCLIP's dense head: CLIP's image tower with the final attention pooling replaced by its value path.

The head is built from the weights of the open_clip module it is given (no copy of CLIP's layers): for ResNet
towers the attention pool's value and output projections are applied at every location as 1x1 convolutions; for
ViT towers the last block's attention is replaced by each token attending only to itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import nn


def output_stride(model: nn.Module) -> int:
    """Pixels per dense-feature cell: 32 for ResNet towers, the patch size for ViT towers."""
    visual = _visual(model)
    if isinstance(visual, ModifiedResNet):
        return 32
    ph, pw = visual.patch_size
    if ph != pw:
        raise ValueError(f"non-square patches {visual.patch_size} are not supported")
    return ph


def dense_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Per-location embeddings in CLIP's joint space.

    Args:
        model: an open_clip ``CLIP`` (or its ``.visual`` tower): ``ModifiedResNet`` or ``VisionTransformer``.
        images: ``(B, 3, H, W)`` float, normalised with the model's mean/std; H and W multiples of
            ``output_stride(model)``.
    Returns:
        ``(B, D, H/s, W/s)`` unnormalised embeddings, D = the text embedding width, in the tower's dtype.
    """
    return _dense(model, images, with_keys=False)[0]


def dense_features_and_keys(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`dense_features`, also returning the final attention's key features ``(B, C, H/s, W/s)``.

    The keys are what the paper's key smoothing compares between locations.
    """
    return _dense(model, images, with_keys=True)


def _dense(model: nn.Module, images: torch.Tensor, with_keys: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    # Keys cost a width x width projection per location (3% of RN50's forward): computed only when asked for.
    visual = _visual(model)
    stride = output_stride(visual)
    _, _, height, width = images.shape
    if height % stride or width % stride:
        raise ValueError(f"image size {height}x{width} is not a multiple of the tower's stride {stride}")
    # conv1 holds the compute dtype: embeddings and norm layers stay fp32 under open_clip's bf16/fp16.
    images = images.to(visual.conv1.weight.dtype)
    if isinstance(visual, ModifiedResNet):
        return _resnet_dense(visual, images, with_keys)
    return _vit_dense(visual, images, with_keys)


def _visual(model: nn.Module) -> nn.Module:
    visual = getattr(model, "visual", model)
    if isinstance(visual, ModifiedResNet):
        if visual.attnpool is None:
            raise ValueError("the ResNet tower has no attention pool to build the dense head from")
        return visual
    if isinstance(visual, VisionTransformer):
        if visual.attn_pool is not None or visual.proj is None:
            raise ValueError("ViT towers with attentional poolers or without a projection are not supported")
        return visual
    raise ValueError(
        f"unsupported image tower {type(visual).__name__}: DenseCLIP needs open_clip's ModifiedResNet "
        "(RN50, RN101, RN50x4, RN50x16, RN50x64) or VisionTransformer (ViT-B/16, ViT-B/32, ViT-L/14, ...)"
    )


def _conv1x1(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    return F.conv2d(x, linear.weight[:, :, None, None], linear.bias)


def _resnet_dense(visual: ModifiedResNet, images: torch.Tensor,
                  with_keys: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    x = visual.stem(images)
    x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))
    pool = visual.attnpool
    value = _conv1x1(x, pool.v_proj)
    keys = _conv1x1(x, pool.k_proj) if with_keys else None
    return _conv1x1(value, pool.c_proj), keys


def _resized_positional_embedding(visual: VisionTransformer, grid: tuple[int, int]) -> torch.Tensor:
    """``(1 + gh*gw, C)``: the class token's embedding, then the patch embeddings resized bicubically to ``grid``."""
    pos = visual.positional_embedding
    if tuple(visual.grid_size) == tuple(grid):
        return pos
    cls_pos, patch_pos = pos[:1], pos[1:]
    gh, gw = visual.grid_size
    patch_pos = patch_pos.reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos.float(), size=grid, mode="bicubic", align_corners=False)
    patch_pos = patch_pos.to(pos.dtype).permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)
    return torch.cat([cls_pos, patch_pos], dim=0)


def _vit_dense(visual: VisionTransformer, images: torch.Tensor,
               with_keys: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    batch = images.shape[0]
    x = visual.conv1(images)  # (B, C, gh, gw)
    grid = (x.shape[2], x.shape[3])
    x = x.flatten(2).transpose(1, 2)  # (B, gh*gw, C)
    cls = visual.class_embedding.to(x.dtype).expand(batch, 1, -1)
    x = torch.cat([cls, x], dim=1) + _resized_positional_embedding(visual, grid).to(x.dtype)
    x = visual.ln_pre(x)

    transformer = visual.transformer
    *blocks, last = transformer.resblocks
    if not isinstance(last, ResidualAttentionBlock) or hasattr(last, "ln_1_kv"):
        raise ValueError(f"unsupported final ViT block {type(last).__name__}")
    batch_first = getattr(transformer, "batch_first", True)
    if not batch_first:
        x = x.transpose(0, 1)
    for block in blocks:
        x = block(x)
    if not batch_first:
        x = x.transpose(0, 1)

    # Value path of the last block: each token attends only to itself, so attention reduces to out_proj(v_proj(.)).
    attn = last.attn
    width = x.shape[-1]
    _, w_k, w_v = attn.in_proj_weight.split(width)
    _, b_k, b_v = attn.in_proj_bias.split(width) if attn.in_proj_bias is not None else (None,) * 3
    h = last.ln_1(x)
    value = F.linear(h, w_v, b_v)
    keys = F.linear(h, w_k, b_k) if with_keys else None
    x = x + last.ls_1(attn.out_proj(value))
    x = x + last.ls_2(last.mlp(last.ln_2(x)))

    tokens = visual.ln_post(x[:, 1:]) @ visual.proj  # (B, gh*gw, D)
    features = tokens.transpose(1, 2).reshape(batch, -1, *grid)
    if keys is not None:
        keys = keys[:, 1:].transpose(1, 2).reshape(batch, width, *grid)
    return features, keys

"""Dense heads: CLIP's image tower turned into per-location embeddings in CLIP's joint space, without training.

Every head is built from the weights of the open_clip module it is given (no copy of CLIP's layers). ResNet
towers have DenseCLIP's head: the attention pool's value and output projections applied at every location as
1x1 convolutions. ViT towers take one of four heads, each replacing only the last block (blocks 1..L-1 run as
they are): ``maskclip`` (DenseCLIP's: each token attends only to itself), and three that followed it,
``sclip``, ``clearclip`` and ``naclip`` (see :data:`HEADS`).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import nn

from denseclip.names import DEFAULT_HEAD, HEADS


def output_stride(model: nn.Module) -> int:
    """Pixels per dense-feature cell: 32 for ResNet towers, the patch size for ViT towers."""
    visual = _visual(model)
    if isinstance(visual, ModifiedResNet):
        return 32
    ph, pw = visual.patch_size
    if ph != pw:
        raise ValueError(f"non-square patches {visual.patch_size} are not supported")
    return ph


def dense_features(model: nn.Module, images: torch.Tensor, head: str = DEFAULT_HEAD) -> torch.Tensor:
    """Per-location embeddings in CLIP's joint space.

    Args:
        model: an open_clip ``CLIP`` (or its ``.visual`` tower): ``ModifiedResNet`` or ``VisionTransformer``.
        images: ``(B, 3, H, W)`` float, normalised with the model's mean/std; H and W multiples of
            ``output_stride(model)``.
        head: one of :data:`HEADS`; ResNet towers have ``maskclip`` (DenseCLIP's head) only.
    Returns:
        ``(B, D, H/s, W/s)`` unnormalised embeddings, D = the text embedding width, in the tower's dtype.
        Every image of the batch is computed independently of the others.
    """
    return _dense(model, images, head, with_keys=False)[0]


def dense_features_and_keys(model: nn.Module, images: torch.Tensor,
                            head: str = DEFAULT_HEAD) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`dense_features`, also returning the final attention's key features ``(B, C, H/s, W/s)``.

    The keys are what the paper's key smoothing compares between locations (the same for every head): the
    attention pool's ``k_proj`` of a ResNet, and of a ViT the last block's keys passed through its attention's
    ``out_proj``, as the official code takes them.
    """
    return _dense(model, images, head, with_keys=True)


def _dense(model: nn.Module, images: torch.Tensor, head: str,
           with_keys: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    visual = check_head(model, head)
    stride = output_stride(visual)
    _, _, height, width = images.shape
    if height % stride or width % stride:
        raise ValueError(f"image size {height}x{width} is not a multiple of the tower's stride {stride}")
    # conv1 holds the compute dtype: under open_clip's bf16/fp16 conversion, embeddings and norm layers stay fp32.
    images = images.to(visual.conv1.weight.dtype)
    if isinstance(visual, ModifiedResNet):
        return _resnet_dense(visual, images, with_keys)
    return _vit_dense(visual, images, head, with_keys)


def check_head(model: nn.Module, head: str) -> nn.Module:
    """The model's image tower, once ``head`` is known to be one it has; ValueError naming the head if not."""
    if head not in HEADS:
        raise ValueError(f"unknown dense head {head!r}; choose one of {', '.join(HEADS)}")
    visual = _visual(model)
    if isinstance(visual, ModifiedResNet) and head != DEFAULT_HEAD:
        raise ValueError(f"dense head {head!r} needs a ViT tower; ResNet towers have DenseCLIP's head only "
                         f"(head {DEFAULT_HEAD!r})")
    return visual


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
    # The keys cost a width x width projection per location (3% of RN50's forward): only when asked for.
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


def _vit_dense(visual: VisionTransformer, images: torch.Tensor, head: str,
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

    # x: the tokens entering the last block, class token first, (B, 1 + gh*gw, C).
    attn = last.attn
    q, k, v = F.linear(last.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    x = _VIT_HEADS[head](last, x, _QKV(q, k, v, attn.num_heads), grid)

    tokens = visual.ln_post(x[:, 1:]) @ visual.proj  # (B, gh*gw, D)
    features = tokens.transpose(1, 2).reshape(batch, -1, *grid)
    if not with_keys:
        return features, None
    # The official code passes q, k and v alike through the attention's out_proj; its key smoothing compares
    # those keys.
    keys = attn.out_proj(k[:, 1:])
    return features, keys.transpose(1, 2).reshape(batch, -1, *grid)


# ----------------------------------------------------------------------------------------------- ViT heads
# Each head replaces the last block: (block, x (B, T, C) entering it, its q/k/v, patch grid) -> tokens (B, T, C)
# that ln_post and proj turn into embeddings. Attention runs over all T tokens, class token included.
class _QKV:
    """The last block's ``q, k, v`` ``(B, T, C)`` from its ``in_proj``, split into ``(B, heads, T, C/heads)``;
    ``values`` keeps ``v`` unsplit."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> None:
        self.values = v
        self.q, self.k, self.v = (self._split(t, num_heads) for t in (q, k, v))

    @staticmethod
    def _split(t: torch.Tensor, num_heads: int) -> torch.Tensor:
        b, n, c = t.shape
        return t.view(b, n, num_heads, c // num_heads).transpose(1, 2)

    def attend(self, query: torch.Tensor, key: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``softmax(s * query key^T + bias) @ v``, ``s = head_dim ** -0.5``, heads merged back: ``(B, T, C)``."""
        out = F.scaled_dot_product_attention(query, key, self.v, attn_mask=bias)
        return out.transpose(1, 2).flatten(2)


def _out(block: ResidualAttentionBlock, attended: torch.Tensor) -> torch.Tensor:
    """The block's attention branch after the attention itself: ``ls_1(out_proj(.))``."""
    return block.ls_1(block.attn.out_proj(attended))


def _mlp(block: ResidualAttentionBlock, x: torch.Tensor) -> torch.Tensor:
    """The block's second residual step: ``x + ls_2(mlp(ln_2(x)))``."""
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def _maskclip(block, x, qkv: _QKV, grid) -> torch.Tensor:
    """MaskCLIP / DenseCLIP: each token attends only to itself, so attention is ``out_proj(v)``; residual and
    MLP kept."""
    return _mlp(block, x + _out(block, qkv.values))


def _sclip(block, x, qkv: _QKV, grid) -> torch.Tensor:
    """SCLIP (Wang et al., 2024): correlative self-attention, ``softmax(s q q^T) + softmax(s k k^T)`` (summed,
    not averaged); residual and MLP kept."""
    attended = qkv.attend(qkv.q, qkv.q) + qkv.attend(qkv.k, qkv.k)
    return _mlp(block, x + _out(block, attended))


def _clearclip(block, x, qkv: _QKV, grid) -> torch.Tensor:
    """ClearCLIP (Lan et al., 2024): ``softmax(s q q^T)`` attention alone, the last block's residual and MLP
    dropped."""
    return _out(block, qkv.attend(qkv.q, qkv.q))


def _naclip(block, x, qkv: _QKV, grid) -> torch.Tensor:
    """NACLIP (Hajimiri et al., 2025): ``softmax(s k k^T + G)``, G a Gaussian over patch distances (see
    :func:`neighbourhood_bias`); the last block's residual and MLP dropped."""
    return _out(block, qkv.attend(qkv.k, qkv.k, neighbourhood_bias(grid, x.device, x.dtype)))


NACLIP_SIGMA = 5.0  # the Gaussian's standard deviation in patches (NACLIP's default)


@functools.lru_cache(maxsize=16)
def neighbourhood_bias(grid: tuple[int, int], device: torch.device | str = "cpu",
                       dtype: torch.dtype = torch.float32, sigma: float = NACLIP_SIGMA) -> torch.Tensor:
    """NACLIP's attention bias ``G (T, T)``, ``T = 1 + gh*gw``: ``G_ij = exp(-|p_i - p_j|^2 / (2 sigma^2))``
    over the patch-grid positions ``p`` (in patches), 0 in the class token's row and column. Computed once
    per grid size, device and dtype (cached)."""
    gh, gw = grid
    rows, cols = torch.meshgrid(torch.arange(gh, dtype=torch.float32), torch.arange(gw, dtype=torch.float32),
                                indexing="ij")
    positions = torch.stack([rows.flatten(), cols.flatten()], dim=1)  # (gh*gw, 2)
    gaussian = torch.exp(-torch.cdist(positions, positions).square() / (2 * sigma**2))
    return F.pad(gaussian, (1, 0, 1, 0)).to(device=device, dtype=dtype)


_VIT_HEADS = {"maskclip": _maskclip, "sclip": _sclip, "clearclip": _clearclip, "naclip": _naclip}

"""The heads of the DenseCLIP+ target: DeepLabv2's ASPP, DeepLabv3+ (ASPP with a decoder) and CLIP's own dense
head with a refinement, each projecting a backbone's features into CLIP's joint space."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.segmentation.deeplabv3 import ASPP

_LOW_LEVEL_CHANNELS = 48  # DeepLabv3+'s reduction of the stride-4 features


class DeepLabV2Head(nn.Module):
    """DeepLabv2's ASPP as the official head (MMSegmentation's ``ASPPHeadV2`` under ``MaskClipPlusHead``) builds
    it: one branch per rate, each a convolution (3x3 dilated by the rate; 1x1 for rate 1) without bias,
    batch norm and ReLU, straight into CLIP's space (its width is the text embedding's); the branches are
    summed. ``{"high": (B, C, h, w)}`` -> ``(B, D, h, w)``."""

    def __init__(self, in_channels: int, embed_dim: int, rates: tuple[int, ...]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(_aspp_branch(in_channels, embed_dim, r) for r in rates)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        high = features["high"]
        return sum(branch(high) for branch in self.branches)


def _aspp_branch(in_channels: int, out_channels: int, rate: int) -> nn.Sequential:
    kernel = 1 if rate == 1 else 3
    conv = nn.Conv2d(in_channels, out_channels, kernel, padding=0 if rate == 1 else rate, dilation=rate,
                     bias=False)
    # mmcv's ConvModule initialisation: Kaiming normal (fan out, ReLU gain); batch norm starts at 1 / 0.
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return nn.Sequential(conv, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class DeepLabV3PlusHead(nn.Module):
    """DeepLabv3+: ASPP on the last features, upsampled and fused with the reduced stride-4 features, then
    projected into CLIP's space.
    ``{"low": (B, C_l, H/4, W/4), "high": (B, C_h, h, w)}`` -> ``(B, D, H/4, W/4)``."""

    def __init__(self, low_channels: int, high_channels: int, embed_dim: int, rates: tuple[int, ...],
                 channels: int = 256) -> None:
        super().__init__()
        self.aspp = ASPP(high_channels, list(rates), channels)
        self.reduce = _low_level_reduction(low_channels)
        self.fuse = nn.Sequential(
            nn.Conv2d(channels + _LOW_LEVEL_CHANNELS, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, embed_dim, 1))

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        low = self.reduce(features["low"])
        high = F.interpolate(self.aspp(features["high"]), size=low.shape[-2:], mode="bilinear",
                             align_corners=False)
        return self.fuse(torch.cat([high, low], dim=1))


def _low_level_reduction(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(channels, _LOW_LEVEL_CHANNELS, 1, bias=False),
                         nn.BatchNorm2d(_LOW_LEVEL_CHANNELS), nn.ReLU(inplace=True))


class ClipDenseHead(nn.Module):
    """DenseCLIP's dense features (from ``ClipTrunk(dense=True)``), upsampled and refined from the stride-4
    features by layers whose last one starts at zero: the target starts out predicting what DenseCLIP predicts
    and learns detail from there.

    ``dense_norm``: each location's embedding rescaled to this length first (None: as long as the tower makes
    it). Under the dot-product classifier the logits then start as ``dense_norm`` x DenseCLIP's cosine scores,
    and the refinement, learnt from zero, changes labels at the rate the schedule's learning rate allows: CLIP's
    raw embeddings are long (about 90 for ``denseclip-tiny-cocostuff``), and a refinement trained at lr 0.01
    barely moves a label in a short schedule.
    ``{"low": (B, C_l, H/4, W/4), "dense": (B, D, h, w)}`` -> ``(B, D, H/4, W/4)``."""

    def __init__(self, low_channels: int, embed_dim: int, channels: int = 64,
                 dense_norm: float | None = None) -> None:
        super().__init__()
        self.dense_norm = dense_norm
        self.reduce = _low_level_reduction(low_channels)
        self.refine = nn.Sequential(
            nn.Conv2d(embed_dim + _LOW_LEVEL_CHANNELS, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.Conv2d(channels, embed_dim, 1))
        nn.init.zeros_(self.refine[-1].weight)
        nn.init.zeros_(self.refine[-1].bias)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        low = self.reduce(features["low"])
        dense = features["dense"]
        if self.dense_norm is not None:
            dense = F.normalize(dense, dim=1) * self.dense_norm
        dense = F.interpolate(dense, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return dense + self.refine(torch.cat([dense, low], dim=1))

"""The image tower as the labeller runs it: a frozen CLIP tower prepared once for fast dense inference.

For ResNet towers that is a copy in which
- every BatchNorm is folded into the convolution before it (eval statistics: the function is unchanged);
- convolution weights are channels_last, the layout oneDNN and cuDNN convolutions are fastest in;
- on the CPU, each convolution runs as one oneDNN primitive with the ReLU after it and, at the end of a residual
  block, with the residual sum too (``torch.ops.mkldnn._convolution_pointwise``, the kernels ``torch.compile``
  emits for the same pattern), so no activation is read and written again for a ReLU, a sum or a BatchNorm.
BatchNorm, ReLU and the residual sums are passes over every activation that do almost no arithmetic; folded and
fused, they leave the forward to the convolutions (rates in README, "The model stage's speed"). The copy shares
every tensor it does not change (one set of convolution weights is added); the loaded model itself is left
untouched (the DenseCLIP+ target may train that very tower). ViT towers (LayerNorms, no BatchNorm to fold) are
used as they are.
"""

from __future__ import annotations

import copy
import itertools

import torch
from open_clip.modified_resnet import Bottleneck, ModifiedResNet
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def inference_tower(model: nn.Module) -> nn.Module:
    """The image tower of ``model`` (an open_clip CLIP or its ``.visual``) ready for :mod:`denseclip.dense`.

    A ``ModifiedResNet`` comes back as a ``ModifiedResNet`` copy prepared as the module docstring says, in the
    model's own dtype and on its device; any other tower comes back as it is.
    """
    visual = getattr(model, "visual", model)
    if not isinstance(visual, ModifiedResNet):
        return visual
    shared = {id(t): t for t in itertools.chain(visual.parameters(), visual.buffers())}
    tower = copy.deepcopy(visual, memo=shared).eval()
    for parent in list(tower.modules()):
        for conv_name, bn_name in _conv_bn_pairs(parent):
            fused = fuse_conv_bn_eval(getattr(parent, conv_name), getattr(parent, bn_name))  # in fp32, rounded once
            fused.weight = nn.Parameter(fused.weight.contiguous(memory_format=torch.channels_last), requires_grad=False)
            setattr(parent, conv_name, fused)
            setattr(parent, bn_name, nn.Identity())
    if tower.conv1.weight.device.type == "cpu" and _onednn_fusion_available(tower.conv1.weight.dtype):
        if _relus(tower):  # the stem: conv, (folded BN), ReLU, three times
            for i in (1, 2, 3):
                setattr(tower, f"conv{i}", _ConvReLU(getattr(tower, f"conv{i}")))
                setattr(tower, f"act{i}", nn.Identity())
        for layer in (tower.layer1, tower.layer2, tower.layer3, tower.layer4):
            for i, block in enumerate(layer):
                if isinstance(block, Bottleneck) and _relus(block):
                    layer[i] = _FusedBottleneck(block)
    return tower


def input_memory_format(tower: nn.Module) -> torch.memory_format:
    """The layout to build input batches in: channels_last for a tower from :func:`inference_tower` (its first
    convolution would otherwise convert the batch), contiguous for the others."""
    return torch.channels_last if isinstance(tower, ModifiedResNet) else torch.contiguous_format


def _conv_bn_pairs(module: nn.Module) -> list[tuple[str, str]]:
    """``(convolution, batch norm)`` child names where the norm is applied to that convolution's output: open_clip's
    ResNet names them ``convN``/``bnN`` (stem and bottlenecks) and ``0``/``1`` (the ``downsample`` Sequential)."""
    children = dict(module.named_children())
    pairs = []
    for name, child in children.items():
        if not isinstance(child, nn.BatchNorm2d):
            continue
        if name.startswith("bn"):
            conv_name = "conv" + name[2:]
        elif isinstance(module, nn.Sequential) and name.isdigit():
            conv_name = str(int(name) - 1)
        else:
            continue
        if isinstance(children.get(conv_name), nn.Conv2d):
            pairs.append((conv_name, name))
    return pairs


def _relus(module: nn.Module) -> bool:
    """Whether ``act1..3`` of a stem or bottleneck are ReLUs (what the fused kernels apply)."""
    return all(isinstance(getattr(module, f"act{i}", None), nn.ReLU) for i in (1, 2, 3))


def _onednn_fusion_available(dtype: torch.dtype) -> bool:
    # As torch.compile decides: oneDNN's fused kernels, but not on Arm's ACL backend, which lacks them, nor in a
    # half precision this CPU has no oneDNN kernels for (fp16 needs avx512_fp16 or avx_ne_convert: without them
    # the fused kernel raises where aten's own convolution computes).
    mkldnn = torch.ops.mkldnn
    if not (torch.backends.mkldnn.is_available() and hasattr(mkldnn, "_convolution_pointwise")
            and not mkldnn._is_mkldnn_acl_supported()):
        return False
    supported = {torch.float16: mkldnn._is_mkldnn_fp16_supported, torch.bfloat16: mkldnn._is_mkldnn_bf16_supported}
    return dtype not in supported or supported[dtype]()


class _ConvReLU(nn.Module):
    """A convolution (BatchNorm folded in) and what follows it as one oneDNN primitive: a ReLU (``relu``), or a
    residual sum and then a ReLU (``forward(x, residual)``), or nothing (``relu=False``). Inputs and outputs are
    ``(B, C, H, W)`` channels_last, in the weights' dtype."""

    def __init__(self, conv: nn.Conv2d, relu: bool = True) -> None:
        super().__init__()
        self.weight, self.bias = conv.weight, conv.bias
        self.layout = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
        self.relu = relu

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if residual is not None:
            return torch.ops.mkldnn._convolution_pointwise.binary(
                x, residual, self.weight, self.bias, *self.layout, "add", None, "relu", [], "")
        if self.relu:
            return torch.ops.mkldnn._convolution_pointwise(x, self.weight, self.bias, *self.layout, "relu", [None], "")
        return torch.ops.mkldnn._convolution_pointwise(x, self.weight, self.bias, *self.layout, "none", [], "")


class _FusedBottleneck(nn.Module):
    """open_clip's ``Bottleneck`` (BatchNorms folded) with each convolution fused with what follows it."""

    def __init__(self, block: Bottleneck) -> None:
        super().__init__()
        self.conv1, self.conv2, self.conv3 = (_ConvReLU(c) for c in (block.conv1, block.conv2, block.conv3))
        self.avgpool = block.avgpool
        self.downsample = None
        if block.downsample is not None:  # average pool, convolution (BN folded)
            pool, conv = block.downsample[0], block.downsample[1]
            self.downsample = nn.Sequential(pool, _ConvReLU(conv, relu=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.avgpool(self.conv2(self.conv1(x)))
        identity = x if self.downsample is None else self.downsample(x)
        return self.conv3(out, identity)

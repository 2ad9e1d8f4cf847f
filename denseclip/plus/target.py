"""The DenseCLIP+ target: a segmentation network whose classifier is fixed to the DenseCLIP text embeddings.

A backbone (torchvision ResNet-50/101, the same with MMSegmentation's ResNetV1c deep stem, or the CLIP image
tower itself: a ResNet dilated, or a ViT with its dense head) feeds a head (DeepLabv2 ASPP, v3+ ASPP with a
decoder, or CLIP's own dense head with a refinement) that projects into CLIP's joint space; a 1x1 convolution
with the class embeddings scores it: a raw dot product as the official head does, or a temperature-scaled
cosine. The classifier weights are buffers (never trained), so the trained network stays open-vocabulary.
"""

from __future__ import annotations

import copy
import itertools
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import VisionTransformer
from torch import nn
from torchvision.models import resnet50, resnet101
from torchvision.models._utils import IntermediateLayerGetter

from denseclip.dense import dense_features
from denseclip.gpu import to_device, to_host
from denseclip.images import check_rgb_image
from denseclip.models import LoadedCLIP, norms_in_fp32, read_state_dict
from denseclip.names import IMAGENET_MEAN, IMAGENET_STD
from denseclip.plus.heads import ClipDenseHead, DeepLabV2Head, DeepLabV3PlusHead
from denseclip.protocols import keep_ratio_size

BACKBONES = ("clip", "resnet50", "resnet101", "resnet50_v1c", "resnet101_v1c")
HEADS = ("deeplabv2", "deeplabv3plus", "clip_dense")
CLASSIFIERS = ("dot_product", "cosine")


@dataclass
class TargetConfig:
    """Which target network to build (validated by ``denseclip.plus.training.TrainingConfig``).

    Attributes:
        backbone: ``clip`` (the CLIP image tower itself: ``ClipTrunk`` for ResNets, ``ClipViTTrunk`` for ViTs),
            ``resnet50`` / ``resnet101`` (torchvision's, 7x7 stem) or ``resnet50_v1c`` / ``resnet101_v1c`` (the
            same with MMSegmentation's ResNetV1c deep stem of three 3x3 convolutions, as the official configs
            use; its ``open-mmlab://resnet101_v1c`` checkpoint loads by path, see ``ResNetTrunk``).
        head: ``deeplabv2`` (sum of dilated 3x3 convolutions), ``deeplabv3plus`` (ASPP + stride-4 decoder) or
            ``clip_dense`` (CLIP's own dense head + a stride-4 refinement, so training starts from DenseCLIP's
            predictions; needs backbone ``clip``).
        backbone_weights: ``None`` random init; ``"clip"`` copy the given CLIP's tower (backbone ``clip``);
            otherwise a local path / URL of a state dict (safetensors or weights-only torch), e.g. ImageNet
            ResNet weights; nothing is downloaded.
        output_stride: 8, 16 or 32, stride of the backbone's last features (dilation instead of striding; 32:
            the tower undilated, as CLIP runs it; a ViT tower keeps its patch size).
        aspp_rates: dilation rates of the ASPP branches (None: DeepLab's defaults for the head and stride).
        head_channels: width of the v3+ ASPP and decoder, and of the ``clip_dense`` refinement.
        dense_norm: ``clip_dense`` only: the length DenseCLIP's embeddings are rescaled to before the refinement
            (None: as the tower makes them; see ``ClipDenseHead``).
        classifier: ``dot_product`` (the official head: features . text embeddings, no normalisation, no
            temperature) or ``cosine`` (``temperature`` x cosine similarity).
        temperature: logit scale of the ``cosine`` classifier.
        freeze_backbone: keep the backbone's weights and normalisation statistics as initialised (only the
            head learns); with the CLIP trunk this keeps what CLIP knows from being overwritten by noisy
            labels.
        learn_background: replace the background class's text embedding with a learnable one, randomly
            initialised (the official ``cls_bg``); needs ``background_index``.
        background_index: class id of background, or None.
    """

    backbone: str = "resnet101"
    head: str = "deeplabv2"
    backbone_weights: str | None = None
    output_stride: int = 8
    aspp_rates: tuple[int, ...] | None = None
    head_channels: int = 256
    dense_norm: float | None = None
    classifier: str = "dot_product"
    temperature: float = 50.0
    freeze_backbone: bool = False
    learn_background: bool = False
    background_index: int | None = 0

    def rates(self) -> tuple[int, ...]:
        """The ASPP rates: given, or DeepLabv2's (6, 12, 18, 24) / v3+'s (6, 12, 18) at stride 16 (doubled
        at 8)."""
        if self.aspp_rates is not None:
            return tuple(self.aspp_rates)
        if self.head == "deeplabv2":
            return (6, 12, 18, 24)
        return tuple(r * 16 // self.output_stride for r in (6, 12, 18))


class TextClassifier(nn.Module):
    """Fixed open-vocabulary classifier: ``(B, D, h, w)`` features -> ``(B, K, h, w)`` logits, max over each
    class's names.

    ``kind="dot_product"`` (the official head): ``logit = feature . name embedding``, the features as the head
    gives them, no temperature; ``kind="cosine"``: ``temperature * cos(feature, name embedding)``.
    The name embeddings are L2-normalised either way (as the official text embeddings are).

    Args:
        embeddings: ``(N, D)`` text embeddings, one per name.
        class_of_name: ``(N,)`` int64 class id of each name (None: one name per class).
        kind: one of :data:`CLASSIFIERS`.
        temperature: logit scale of ``cosine``.
        learn_background: the names of class ``background_index`` share one learnable embedding, randomly
            initialised (``torch.randn``, as the official ``bg_embeddings``) and L2-normalised when used.
    """

    def __init__(self, embeddings: torch.Tensor, class_of_name: torch.Tensor | None = None,
                 kind: str = "dot_product", temperature: float = 50.0, learn_background: bool = False,
                 background_index: int | None = 0) -> None:
        super().__init__()
        if kind not in CLASSIFIERS:
            raise ValueError(f"classifier kind must be one of {', '.join(CLASSIFIERS)}, got {kind!r}")
        embeddings = F.normalize(embeddings.detach().float(), dim=-1)
        if class_of_name is None:
            class_of_name = torch.arange(len(embeddings), device=embeddings.device)
        self.register_buffer("embeddings", embeddings.clone())
        self.register_buffer("class_of_name", class_of_name.detach().long().clone())
        self.num_classes = int(self.class_of_name.max()) + 1
        # The buffers may already be on a GPU (a DenseCLIP teacher's embeddings): compare on their device.
        one_per_class = torch.arange(self.num_classes, device=self.class_of_name.device)
        self.one_name_per_class = torch.equal(self.class_of_name, one_per_class)
        self.kind, self.temperature = kind, temperature
        self.background = None
        if learn_background:
            if background_index is None:
                raise ValueError("learn_background needs a background_index")
            self.register_buffer("is_background", self.class_of_name == background_index)
            self.background = nn.Parameter(torch.randn(embeddings.shape[1], device=embeddings.device))

    def weight(self) -> torch.Tensor:
        """``(N, D)`` normalised name embeddings, the learnable background substituted."""
        if self.background is None:
            return self.embeddings
        background = F.normalize(self.background, dim=-1).expand_as(self.embeddings)
        return torch.where(self.is_background[:, None], background, self.embeddings)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.kind == "cosine":
            features = F.normalize(features, dim=1)
        scores = F.conv2d(features, self.weight()[:, :, None, None])
        if not self.one_name_per_class:
            b, _, h, w = scores.shape
            index = self.class_of_name.view(1, -1, 1, 1).expand_as(scores)
            scores = scores.new_zeros((b, self.num_classes, h, w)).scatter_reduce(
                1, index, scores, reduce="amax", include_self=False)
        return self.temperature * scores if self.kind == "cosine" else scores


class ClipTrunk(nn.Module):
    """The CLIP ResNet tower (stem, layers 1-4) as a segmentation backbone, dilated to ``output_stride`` 8 or
    16 (32: as it is).

    open_clip's blocks convolve first and pool after, so dropping a block's pooling keeps its own receptive
    field; every later 3x3 convolution is dilated by the resolution kept, and the pretrained weights still
    fit.
    With ``dense``, the attention pool's value and output projections (DenseCLIP's dense head) follow as 1x1
    convolutions initialised from them.
    ``forward``: ``(B, 3, H, W)`` normalised -> ``{"low": (B, 4w, H/4, W/4), "high": (B, 32w, H/s, W/s)}``
    (w = the tower's width) and, with ``dense``, ``"dense": (B, D, H/s, W/s)`` in CLIP's joint space.
    """

    def __init__(self, visual: ModifiedResNet, output_stride: int = 8, dense: bool = False) -> None:
        super().__init__()
        visual = copy.deepcopy(visual).float()
        self.dense = None
        if dense:
            pool = visual.attnpool
            self.dense = nn.Sequential(_conv_from_linear(pool.v_proj), _conv_from_linear(pool.c_proj))
        self.stem = nn.Sequential(visual.conv1, visual.bn1, visual.act1, visual.conv2, visual.bn2,
                                  visual.act2, visual.conv3, visual.bn3, visual.act3, visual.avgpool)
        self.layer1, self.layer2 = visual.layer1, visual.layer2
        self.layer3, self.layer4 = visual.layer3, visual.layer4
        unpooled = {8: (self.layer3, self.layer4), 16: (self.layer4,), 32: ()}[output_stride]
        dilation = 1
        for layer in (self.layer3, self.layer4):
            for block in layer:
                block.conv2.dilation, block.conv2.padding = (dilation, dilation), (dilation, dilation)
                if block.stride > 1 and layer in unpooled:
                    block.avgpool = nn.Identity()
                    # open_clip names the shortcut's pooling "-1".
                    setattr(block.downsample, "-1", nn.Identity())
                    dilation *= block.stride
        self.low_channels = self.layer1[-1].conv3.out_channels
        self.high_channels = self.layer4[-1].conv3.out_channels
        for p in self.parameters():
            p.requires_grad_(True)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        low = self.layer1(self.stem(x))
        features = {"low": low, "high": self.layer4(self.layer3(self.layer2(low)))}
        if self.dense is not None:
            features["dense"] = self.dense(features["high"])
        return features


class ClipViTTrunk(nn.Module):
    """A CLIP ViT tower as a segmentation backbone: its dense features with the given dense head (the teacher's,
    so ``clip_dense`` starts from the teacher's predictions) at the patch stride, and as low-level features the
    image's 4x4 pixel blocks (space-to-depth; a ViT has no stride-4 maps, and the refinement learns edges from
    them).
    ``forward``: ``(B, 3, H, W)`` normalised, H and W multiples of the patch size and of 4 ->
    ``{"low": (B, 48, H/4, W/4), "high": (B, D, H/p, W/p), "dense": the same features}``.
    """

    def __init__(self, visual: VisionTransformer, head: str) -> None:
        super().__init__()
        # Under any autocast the LayerNorms compute in fp32 on their fp32 parameters, as CUDA's kernel needs (CUDA's
        # autocast runs layer_norm in fp32, a CPU's leaves it at its input's dtype).
        self.visual = norms_in_fp32(copy.deepcopy(visual).float())
        self.head = head
        self.low_channels, self.high_channels = 3 * 4 * 4, visual.output_dim
        for p in self.parameters():
            p.requires_grad_(True)
        self._freeze_unreached()

    def _freeze_unreached(self) -> None:
        """Freeze the parameters the head never reaches (ClearCLIP and NACLIP drop the last block's MLP):
        DistributedDataParallel waits for a gradient of every trainable parameter, and would wait forever."""
        patch = self.visual.patch_size[0]
        probe = torch.zeros(1, 3, 2 * patch, 2 * patch, device=self.visual.conv1.weight.device)
        with torch.enable_grad():
            dense_features(self.visual, probe, head=self.head).sum().backward()
        for p in self.parameters():
            if p.grad is None:
                p.requires_grad_(False)
            p.grad = None

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        dense = dense_features(self.visual, x, head=self.head)
        return {"low": F.pixel_unshuffle(x, 4), "high": dense, "dense": dense}


class ResNetTrunk(nn.Module):
    """A torchvision ResNet-50/101 dilated to ``output_stride``: same output dict as :class:`ClipTrunk`.

    torchvision's dilation keeps the first block of a dilated layer at the previous rate, which is what
    MMSegmentation's ``contract_dilation=True`` does, so ``resnet101`` at stride 8 is the official
    ``ResNetV1c`` (dilations 1, 1, 2, 4) except for the stem. The ``_v1c`` names swap torchvision's 7x7
    stem for ResNetV1c's deep one (3x3 convolutions 3->32 (stride 2) -> 32 -> 64, each with batch norm and
    ReLU), under the module names of MMSegmentation's checkpoints (``stem.0``, ``stem.1``, ..., ``stem.7``;
    the layers already share torchvision's names), so ``open-mmlab://resnet101_v1c`` loads by path as it is.
    """

    def __init__(self, name: str, output_stride: int = 8) -> None:
        super().__init__()
        depth = name.removesuffix("_v1c")
        dilation = [False, output_stride == 8, output_stride <= 16]
        net = {"resnet50": resnet50, "resnet101": resnet101}[depth](weights=None,
                                                                     replace_stride_with_dilation=dilation)
        if name.endswith("_v1c"):
            stem = [("stem", _deep_stem())]
        else:
            stem = [("conv1", net.conv1), ("bn1", net.bn1), ("relu", net.relu)]
        layers = [(n, getattr(net, n)) for n in ("maxpool", "layer1", "layer2", "layer3", "layer4")]
        self.body = IntermediateLayerGetter(nn.Sequential(OrderedDict(stem + layers)),
                                            return_layers={"layer1": "low", "layer4": "high"})
        self.low_channels, self.high_channels = 256, 2048

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(self.body(x))


def _deep_stem(channels: int = 64) -> nn.Sequential:
    widths = [3, channels // 2, channels // 2, channels]
    layers: list[nn.Module] = []
    for i, (c_in, c_out) in enumerate(itertools.pairwise(widths)):
        layers += [nn.Conv2d(c_in, c_out, 3, stride=2 if i == 0 else 1, padding=1, bias=False),
                   nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def _conv_from_linear(linear: nn.Linear) -> nn.Conv2d:
    conv = nn.Conv2d(linear.in_features, linear.out_features, 1)
    with torch.no_grad():
        conv.weight.copy_(linear.weight.float()[:, :, None, None])
        conv.bias.copy_(linear.bias.float())
    return conv


class SegmentationTarget(nn.Module):
    """Backbone + head + fixed text classifier.

    ``forward(images)``: ``(B, 3, H, W)`` float RGB in [0, 1] (normalised inside with the backbone's mean/std)
    -> ``(B, K, H, W)`` logits (softmax over K gives class probabilities).

    ``resize_to``: ``(long, short)``, the keep-ratio resize :meth:`label_images` scores images at, as the
    official test pipeline does (the training's ``resize_to``: MMSegmentation tests at the scale it trains at);
    None scores them as they are.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, classifier: TextClassifier,
                 mean: tuple[float, ...], std: tuple[float, ...], freeze_backbone: bool = False) -> None:
        super().__init__()
        self.backbone, self.head, self.classifier = backbone, head, classifier
        device = classifier.embeddings.device
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1))
        self.freeze_backbone = freeze_backbone
        self.resize_to: tuple[int, int] | None = None
        if freeze_backbone:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    def train(self, mode: bool = True) -> SegmentationTarget:
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()  # batch-norm statistics stay frozen too
        return self

    @property
    def num_classes(self) -> int:
        return self.classifier.num_classes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.head(self.backbone((images - self.mean) / self.std))
        logits = self.classifier(features)
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)

    def parameter_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """``(backbone parameters, new parameters)``: DeepLab trains the new layers at a higher rate."""
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        new = [p for name, p in self.named_parameters()
               if p.requires_grad and not name.startswith("backbone.")]
        return backbone, new

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, 3, H, W)`` in [0, 1] -> ``(labels (B, H, W) int64, confidence (B, H, W) float in [0, 1])``
        (in eval mode)."""
        was_training = self.training
        self.eval()
        confidence, labels = self(images).softmax(dim=1).max(dim=1)
        self.train(was_training)
        return labels, confidence

    def label_images(self, images: list[np.ndarray],
                     batch_size: int = 16) -> list[tuple[np.ndarray, np.ndarray]]:
        """``(H, W, 3)`` uint8 RGB images -> ``(labels (H, W) uint8|int32, confidence (H, W) float32)`` each,
        as ``DenseCLIP.label_images`` gives them. As MMSegmentation's whole-image test does: each image resized
        keeping its ratio to fit :attr:`resize_to`, the logits resized bilinearly back to the image's own size,
        softmax and argmax there (in eval mode). Each ``batch_size`` images travel to the device in one copy (as
        uint8) and their maps back in one synchronisation; images of one size share a forward pass."""
        label_dtype = torch.uint8 if self.num_classes <= 255 else torch.int32
        results = []
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            for image in chunk:
                check_rgb_image(image)
            pixels = to_device(chunk, self.mean.device)  # (H, W, 3) uint8 each
            same_size = all(p.shape == pixels[0].shape for p in pixels)
            groups = [torch.stack(pixels)] if same_size else [p[None] for p in pixels]
            maps = []
            for group in groups:
                for labels, confidence in self._score(group.permute(0, 3, 1, 2).float() / 255):
                    maps.append((labels.to(label_dtype), confidence.float()))
            results += to_host(maps)
        return results

    @torch.no_grad()
    def _score(self, images: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(B, 3, H, W)`` in [0, 1] -> per image ``(labels (H, W) int64, confidence (H, W))``, scored at
        :attr:`resize_to` (see :meth:`label_images`)."""
        size = tuple(images.shape[-2:])
        scaled = keep_ratio_size(*size, self.resize_to)
        if scaled != size:
            images = F.interpolate(images, size=scaled, mode="bilinear", align_corners=False,
                                   antialias=scaled[0] < size[0])
        was_training = self.training
        self.eval()
        logits = self(images)
        self.train(was_training)
        out = []
        for one in logits:  # one image's K full-size maps at a time: 171 classes of a photo are 200 MB
            if scaled != size:
                one = F.interpolate(one[None], size=size, mode="bilinear", align_corners=False)[0]
            confidence, labels = one.softmax(dim=0).max(dim=0)
            out.append((labels, confidence))
        return out


def _clip_visual(clip: LoadedCLIP | None) -> ModifiedResNet | VisionTransformer:
    visual = getattr(clip.model, "visual", None) if clip is not None else None
    if not isinstance(visual, (ModifiedResNet, VisionTransformer)):
        raise TypeError("backbone 'clip' needs a loaded ResNet or ViT CLIP (e.g. RN50, denseclip-tiny-shapes, "
                        "ViT-B-16 or denseclip-tiny-shapes-vit)")
    return visual


def _reinitialised(visual: nn.Module) -> nn.Module:
    """A copy of a CLIP tower with every weight drawn anew: its architecture, none of what it learnt."""
    visual = copy.deepcopy(visual)
    for module in visual.modules():
        if isinstance(module, nn.MultiheadAttention):
            module._reset_parameters()
        elif isinstance(module, (nn.Conv2d, nn.BatchNorm2d, nn.Linear, nn.LayerNorm)):
            module.reset_parameters()
    for name in ("class_embedding", "positional_embedding", "proj"):  # a ViT's parameters outside its layers
        if isinstance(getattr(visual, name, None), nn.Parameter):
            nn.init.normal_(getattr(visual, name), std=visual.transformer.width ** -0.5)
    return visual


def _load_backbone_weights(backbone: nn.Module, url: str) -> None:
    state, _ = read_state_dict(url)
    target = backbone.body if isinstance(backbone, ResNetTrunk) else backbone
    missing, _ = target.load_state_dict(state, strict=False)
    if missing:
        raise ValueError(f"backbone_weights {url!r} lack {len(missing)} backbone tensors, e.g. {missing[:3]}")


def build_target(config: TargetConfig, class_embeddings: torch.Tensor,
                 class_of_name: torch.Tensor | None = None,
                 clip: LoadedCLIP | None = None, clip_head: str = "maskclip") -> SegmentationTarget:
    """The target network for ``config`` with its classifier fixed to ``class_embeddings`` ``(N, D)``
    (one row per name; ``class_of_name (N,)`` maps names to classes, None: one name per class).

    ``clip`` supplies the trunk (backbone ``clip``) and its mean/std; unused otherwise. ``clip_head``: the dense
    head of a ViT trunk (``denseclip.dense.HEADS``).
    """
    visual = _clip_visual(clip) if config.backbone == "clip" else None
    if visual is not None and config.backbone_weights is None:
        visual = _reinitialised(visual)
    if isinstance(visual, VisionTransformer):
        backbone = ClipViTTrunk(visual, clip_head)
        mean, std = clip.mean, clip.std
    elif visual is not None:
        backbone = ClipTrunk(visual, config.output_stride, dense=config.head == "clip_dense")
        mean, std = clip.mean, clip.std
    else:
        backbone = ResNetTrunk(config.backbone, config.output_stride)
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    if config.backbone_weights not in (None, "clip"):
        _load_backbone_weights(backbone, config.backbone_weights)
    embed_dim = class_embeddings.shape[1]
    if config.head == "clip_dense":
        head = ClipDenseHead(backbone.low_channels, embed_dim, config.head_channels, config.dense_norm)
    elif config.head == "deeplabv2":
        head = DeepLabV2Head(backbone.high_channels, embed_dim, config.rates())
    else:
        head = DeepLabV3PlusHead(backbone.low_channels, backbone.high_channels, embed_dim, config.rates(),
                                 config.head_channels)
    classifier = TextClassifier(class_embeddings, class_of_name, config.classifier, config.temperature,
                                config.learn_background, config.background_index)
    return SegmentationTarget(backbone, head, classifier, mean, std, config.freeze_backbone)

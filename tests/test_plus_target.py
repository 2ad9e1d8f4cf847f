"""The DenseCLIP+ target: shapes, the fixed text classifier (official dot product, or cosine), the learnable
background, trunk initialisation, the official DeepLabv2 branches, DeepLab backbones (ResNetV1c included) and
their weights-by-path loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torchvision.models import resnet50

from denseclip.models import TINY_MODEL, ModelLoadError, load_clip
from denseclip.plus.heads import DeepLabV2Head
from denseclip.plus.target import ClipTrunk, TargetConfig, TextClassifier, build_target

torch.set_num_threads(1)
K, D = 5, 128


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return load_clip(TINY_MODEL, "random")


@pytest.fixture(scope="module")
def embeddings():
    torch.manual_seed(1)
    return F.normalize(torch.randn(K, D), dim=-1)


def tiny(**kw) -> TargetConfig:
    values = {"backbone": "clip", "head": "deeplabv3plus", "backbone_weights": "clip", "output_stride": 16,
              "aspp_rates": (1, 2), "head_channels": 32}
    return TargetConfig(**{**values, **kw})


@pytest.mark.parametrize("head", ["deeplabv2", "deeplabv3plus"])
@pytest.mark.parametrize("stride", [8, 16])
def test_logits_cover_the_input_at_any_size(clip, embeddings, head, stride):
    model = build_target(tiny(head=head, output_stride=stride), embeddings, clip=clip).eval()
    for size in [(64, 64), (72, 100)]:
        logits = model(torch.rand(2, 3, *size))
        assert logits.shape == (2, K, *size) and torch.isfinite(logits).all()


def test_clip_trunk_stride(clip):
    x = torch.rand(1, 3, 64, 96)
    for stride in (8, 16):
        out = ClipTrunk(clip.model.visual, stride).eval()(x)
        assert out["low"].shape[-2:] == (16, 24)
        assert out["high"].shape[-2:] == (64 // stride, 96 // stride)
        assert "dense" not in out


def test_clip_dense_head_starts_from_denseclips_features(clip, embeddings):
    model = build_target(tiny(head="clip_dense"), embeddings, clip=clip).eval()
    pool = clip.model.visual.attnpool
    torch.testing.assert_close(model.backbone.dense[0].weight[:, :, 0, 0], pool.v_proj.weight)
    torch.testing.assert_close(model.backbone.dense[1].bias, pool.c_proj.bias)
    features = model.backbone(torch.rand(2, 3, 64, 64))
    assert features["dense"].shape == (2, D, 4, 4)
    upsampled = F.interpolate(features["dense"], size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(model.head(features), upsampled)  # the refinement starts at zero
    backbone, _ = model.parameter_groups()
    assert any(p is model.backbone.dense[0].weight for p in backbone)  # pretrained: the backbone's rate


def test_clip_trunk_at_stride_32_gives_the_teachers_own_dense_embeddings(clip):
    from denseclip.dense import dense_features

    trunk = ClipTrunk(clip.model.visual, 32, dense=True).eval()
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        ours, teachers = trunk(x)["dense"], dense_features(clip.model.visual, x)
    assert ours.shape[-2:] == (2, 3)
    torch.testing.assert_close(ours, teachers.reshape(ours.shape), rtol=1e-4, atol=1e-4)


def test_dense_norm_rescales_denseclips_embeddings_and_keeps_their_labels(clip, embeddings):
    raw = build_target(tiny(head="clip_dense"), embeddings, clip=clip).eval()
    scaled = build_target(tiny(head="clip_dense", dense_norm=10.0), embeddings, clip=clip).eval()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        features = scaled.backbone((x - scaled.mean) / scaled.std)
        unit = F.interpolate(F.normalize(features["dense"], dim=1), size=(16, 16), mode="bilinear",
                             align_corners=False)
        torch.testing.assert_close(scaled.head(features), 10.0 * unit)  # the refinement starts at zero
        dense = features["dense"]  # both targets copy the same tower
        raw_cells, scaled_cells = raw.classifier(dense), scaled.classifier(10.0 * F.normalize(dense, dim=1))
    # A positive rescaling per location: each feature cell keeps DenseCLIP's label, its logits 10 x cosines.
    assert torch.equal(raw_cells.argmax(dim=1), scaled_cells.argmax(dim=1))
    torch.testing.assert_close(scaled_cells, 10.0 * raw_cells / dense.norm(dim=1, keepdim=True))
    assert scaled(x).abs().max() <= 10.0 + 1e-4


def test_classifier_is_a_dot_product_or_temperature_times_cosine_max_over_names():
    torch.manual_seed(2)
    names = torch.randn(4, 8)
    class_of_name = torch.tensor([0, 1, 1, 2])  # class 1 has two names
    features = 5 * torch.randn(2, 8, 3, 5)

    def per_class(scores):
        return torch.stack([scores[:, 0], scores[:, 1:3].amax(dim=1), scores[:, 3]], dim=1)

    # The official head: features as they come, unit text embeddings, no temperature.
    official = TextClassifier(names, class_of_name)
    dot = torch.einsum("bdhw,nd->bnhw", features, F.normalize(names, dim=1))
    torch.testing.assert_close(official(features), per_class(dot))
    assert official.kind == "dot_product" and TargetConfig().classifier == "dot_product"
    assert (official(features).abs().amax() > 2)  # not squeezed into [-1, 1]: nothing normalised the features
    cosine = TextClassifier(names, class_of_name, kind="cosine", temperature=30.0)
    cos = torch.einsum("bdhw,nd->bnhw", F.normalize(features, dim=1), F.normalize(names, dim=1))
    torch.testing.assert_close(cosine(features), 30.0 * per_class(cos))
    for classifier in (official, cosine):
        assert classifier.num_classes == 3 and not list(classifier.parameters())
    with pytest.raises(ValueError, match="kind"):
        TextClassifier(names, kind="softmax")


def test_training_moves_the_network_but_never_the_text_classifier_or_the_clip(clip, embeddings):
    model = build_target(tiny(), embeddings, clip=clip)
    weight_before = model.classifier.weight().clone()
    trunk_before = model.backbone.stem[0].weight.clone()
    clip_before = clip.model.visual.conv1.weight.clone()
    torch.testing.assert_close(trunk_before, clip_before)  # initialised from the CLIP tower
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = F.cross_entropy(model(torch.rand(2, 3, 64, 64)), torch.randint(0, K, (2, 64, 64)))
    loss.backward()
    optimizer.step()
    torch.testing.assert_close(model.classifier.weight(), weight_before)
    assert not torch.equal(model.backbone.stem[0].weight, trunk_before)
    torch.testing.assert_close(clip.model.visual.conv1.weight, clip_before)


def test_random_trunk_is_not_the_clip(clip, embeddings):
    model = build_target(tiny(backbone_weights=None), embeddings, clip=clip)
    assert not torch.allclose(model.backbone.stem[0].weight, clip.model.visual.conv1.weight)


def test_learnable_background_trains_only_the_background_embedding(clip, embeddings):
    torch.manual_seed(4)
    model = build_target(tiny(learn_background=True, background_index=0), embeddings, clip=clip)
    before = model.classifier.weight().detach().clone()
    # Randomly initialised as the official cls_bg (unit length when used), not the background's text embedding.
    torch.testing.assert_close(before[1:], embeddings[1:])
    assert float(before[0].norm()) == pytest.approx(1.0) and abs(float(before[0] @ embeddings[0])) < 0.5
    torch.manual_seed(4)
    again = build_target(tiny(learn_background=True, background_index=0), embeddings, clip=clip)
    torch.testing.assert_close(again.classifier.weight(), before)  # reproducible from the seed
    optimizer = torch.optim.SGD([model.classifier.background], lr=1.0)
    F.cross_entropy(model(torch.rand(2, 3, 64, 64)), torch.zeros(2, 64, 64, dtype=torch.long)).backward()
    optimizer.step()
    after = model.classifier.weight()
    assert not torch.allclose(after[0], before[0])
    torch.testing.assert_close(after[1:], before[1:])
    backbone, new = model.parameter_groups()
    assert any(p is model.classifier.background for p in new)
    assert not any(p is model.classifier.background for p in backbone)


def test_label_images_matches_predict(clip, embeddings):
    model = build_target(tiny(), embeddings, clip=clip)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size, dtype=np.uint8) for size in [(48, 64, 3), (32, 32, 3)]]
    results = model.label_images(images)
    for image, (labels, conf) in zip(images, results):
        assert labels.shape == image.shape[:2] and labels.dtype == np.uint8 and labels.max() < K
        assert conf.dtype == np.float32 and (conf >= 1 / K - 1e-6).all() and (conf <= 1).all()
        expected, _ = model.predict(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255)
        np.testing.assert_array_equal(labels, expected[0].numpy())
    with pytest.raises(ValueError, match="uint8"):
        model.label_images([np.zeros((8, 8), dtype=np.uint8)])


def test_label_images_scores_at_the_keep_ratio_resize_and_answers_at_the_image_size(clip, embeddings):
    """As MMSegmentation's whole-image test: the image resized keeping its ratio to fit ``resize_to``, the
    network's logits resized bilinearly back to the image, argmax there."""
    model = build_target(tiny(), embeddings, clip=clip).eval()
    model.resize_to = (128, 32)  # a 48x64 image is scored at 32x43
    seen = []
    hook = model.backbone.register_forward_pre_hook(lambda _, args: seen.append(tuple(args[0].shape[-2:])))
    image = np.random.default_rng(3).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    (labels, confidence), = model.label_images([image])
    hook.remove()
    assert seen == [(32, 43)] and labels.shape == confidence.shape == (48, 64)
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        logits = model(F.interpolate(pixels, size=(32, 43), mode="bilinear", align_corners=False, antialias=True))
        expected = F.interpolate(logits, size=(48, 64), mode="bilinear", align_corners=False).softmax(dim=1)
    np.testing.assert_array_equal(labels, expected.argmax(dim=1)[0].numpy())
    np.testing.assert_allclose(confidence, expected.max(dim=1).values[0].numpy(), rtol=1e-5)
    _, native = model.predict(pixels)  # scored at its own size, the scores differ
    assert np.abs(native[0].numpy() - confidence).max() > 1e-6


@pytest.mark.parametrize("head", ["deeplabv2", "deeplabv3plus"])
def test_resnet_deeplab_loads_imagenet_weights_by_path(tmp_path, embeddings, head):
    torch.manual_seed(3)
    reference = resnet50()
    path = tmp_path / "resnet50.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    config = TargetConfig(backbone="resnet50", head=head, backbone_weights=str(path), output_stride=8)
    model = build_target(config, embeddings).eval()
    torch.testing.assert_close(model.backbone.body.layer4[2].conv3.weight, reference.layer4[2].conv3.weight)
    logits = model(torch.rand(1, 3, 64, 64))
    assert logits.shape == (1, K, 64, 64)
    features = model.backbone(torch.rand(1, 3, 64, 64))
    assert features["high"].shape[-2:] == (8, 8)  # dilated: stride 8


def test_backbone_weights_errors_name_the_file(tmp_path, embeddings, clip):
    with pytest.raises(ModelLoadError, match="nothing.pt"):
        build_target(TargetConfig(backbone="resnet50", backbone_weights=str(tmp_path / "nothing.pt")),
                     embeddings)
    partial = tmp_path / "partial.safetensors"
    save_file({"conv1.weight": torch.zeros(64, 3, 7, 7)}, str(partial))
    with pytest.raises(ValueError, match="partial.safetensors"):
        build_target(TargetConfig(backbone="resnet50", backbone_weights=str(partial)), embeddings)
    with pytest.raises(TypeError, match="needs a loaded ResNet or ViT CLIP"):
        build_target(tiny(), embeddings, clip=None)


def test_frozen_backbone_keeps_weights_and_statistics(clip, embeddings):
    model = build_target(tiny(head="clip_dense", freeze_backbone=True), embeddings, clip=clip).train()
    assert not model.backbone.training and model.head.training
    backbone_state = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    head_before = model.head.refine[-1].weight.clone()
    backbone, new = model.parameter_groups()
    assert backbone == [] and new
    optimizer = torch.optim.SGD(new, lr=0.1)
    F.cross_entropy(model(torch.rand(2, 3, 64, 64)), torch.randint(0, K, (2, 64, 64))).backward()
    optimizer.step()
    for key, value in model.backbone.state_dict().items():
        torch.testing.assert_close(value, backbone_state[key])  # weights and batch-norm running statistics
    assert not torch.equal(model.head.refine[-1].weight, head_before)


def test_vit_trunk_starts_from_the_teachers_dense_head():
    from denseclip.dense import dense_features
    from denseclip.models import TINY_VIT_MODEL

    torch.manual_seed(0)
    vit = load_clip(TINY_VIT_MODEL, "random")
    model = build_target(tiny(head="clip_dense", freeze_backbone=True), F.normalize(torch.randn(K, D), dim=-1),
                         clip=vit, clip_head="naclip").eval()
    images = torch.rand(2, 3, 64, 96)
    normalised = (images - model.mean) / model.std
    features = model.backbone(normalised)
    assert features["low"].shape == (2, 48, 16, 24) and features["dense"].shape == (2, D, 8, 12)
    with torch.no_grad():
        teacher = dense_features(vit.model, normalised, head="naclip")
    torch.testing.assert_close(features["dense"], teacher)
    upsampled = F.interpolate(features["dense"], size=(16, 24), mode="bilinear", align_corners=False)
    torch.testing.assert_close(model.head(features), upsampled)  # the refinement starts at zero
    assert model(images).shape == (2, K, 64, 96)
    fresh = build_target(tiny(head="clip_dense", backbone_weights=None), torch.randn(K, D), clip=vit)
    assert not torch.equal(fresh.backbone.visual.proj, vit.model.visual.proj)
    assert not torch.equal(fresh.backbone.visual.transformer.resblocks[0].attn.in_proj_weight,
                           vit.model.visual.transformer.resblocks[0].attn.in_proj_weight)


def test_deeplabv2_branches_are_built_as_the_official_head_builds_them():
    torch.manual_seed(5)
    head = DeepLabV2Head(64, 96, (1, 6)).eval()
    one, six = head.branches
    assert one[0].kernel_size == (1, 1) and one[0].padding == (0, 0)  # rate 1: a 1x1 convolution
    assert six[0].kernel_size == (3, 3) and six[0].dilation == (6, 6) and six[0].padding == (6, 6)
    for branch in head.branches:
        conv, norm, act = branch
        assert conv.bias is None and isinstance(norm, torch.nn.BatchNorm2d) and isinstance(act, torch.nn.ReLU)
        assert conv.out_channels == 96  # straight into CLIP's space: the text embedding's width
    # mmcv's ConvModule initialisation: Kaiming normal with fan out, std = sqrt(2 / (out x k x k)).
    assert float(six[0].weight.detach().std()) == pytest.approx((2 / (96 * 9)) ** 0.5, rel=0.05)
    x = torch.randn(2, 64, 9, 11)

    def branch_by_hand(branch):
        conv, norm, _ = branch
        y = F.conv2d(x, conv.weight, None, padding=conv.padding, dilation=conv.dilation)
        return F.relu(F.batch_norm(y, norm.running_mean, norm.running_var, norm.weight, norm.bias))

    out = head({"high": x})
    torch.testing.assert_close(out, branch_by_hand(one) + branch_by_hand(six))
    assert out.shape == (2, 96, 9, 11) and (out >= 0).all()


def _mmseg_resnet50_v1c_state() -> dict[str, torch.Tensor]:
    """A state dict in the layout of MMSegmentation's ResNetV1c checkpoints (open-mmlab://resnet50_v1c): a deep
    stem ``stem.{0,3,6}`` convolutions (3->32 stride 2, 32->32, 32->64) with batch norms ``stem.{1,4,7}``, and
    layers named as torchvision names them."""
    torch.manual_seed(6)
    state = {}
    for conv, norm, (c_out, c_in) in (("0", "1", (32, 3)), ("3", "4", (32, 32)), ("6", "7", (64, 32))):
        state[f"stem.{conv}.weight"] = torch.randn(c_out, c_in, 3, 3)
        state[f"stem.{norm}.weight"], state[f"stem.{norm}.bias"] = torch.rand(c_out), torch.randn(c_out)
        state[f"stem.{norm}.running_mean"], state[f"stem.{norm}.running_var"] = torch.randn(c_out), torch.rand(c_out)
        state[f"stem.{norm}.num_batches_tracked"] = torch.tensor(7)
    layers = {k: torch.randn_like(v.float()).to(v.dtype) for k, v in resnet50().state_dict().items()
              if k.startswith("layer")}
    return {**state, **layers}


def test_resnet_v1c_has_the_deep_stem_and_loads_mmsegmentation_checkpoints(tmp_path, embeddings):
    state = _mmseg_resnet50_v1c_state()
    path = tmp_path / "resnet50_v1c.pth"
    torch.save({"meta": {"mmcv_version": "1.4.0"}, "state_dict": state}, path)  # as mmcv writes checkpoints
    config = TargetConfig(backbone="resnet50_v1c", head="deeplabv2", backbone_weights=str(path), output_stride=8)
    model = build_target(config, embeddings).eval()
    loaded = model.backbone.body.state_dict()
    assert not any(k.startswith(("conv1.", "bn1.")) for k in loaded)  # no 7x7 stem
    for key, value in state.items():
        torch.testing.assert_close(loaded[key], value, msg=key)
    assert model.backbone.body.stem[0].stride == (2, 2) and model.backbone.body.stem[0].kernel_size == (3, 3)
    features = model.backbone(torch.rand(1, 3, 64, 64))
    assert features["low"].shape == (1, 256, 16, 16) and features["high"].shape == (1, 2048, 8, 8)
    assert model(torch.rand(1, 3, 64, 64)).shape == (1, K, 64, 64)
    # A torchvision checkpoint lacks the deep stem: refused, naming the file and the missing tensors.
    plain = tmp_path / "resnet50.safetensors"
    save_file({k: v.contiguous() for k, v in resnet50().state_dict().items()}, str(plain))
    with pytest.raises(ValueError, match=r"resnet50.safetensors.*stem\.0\.weight"):
        build_target(TargetConfig(backbone="resnet50_v1c", backbone_weights=str(plain)), embeddings)

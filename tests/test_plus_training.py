"""DenseCLIP+ training pieces: config validation, poly schedule, joint augmentation, deterministic batches,
the loss, and a short real training run that learns its targets."""

from __future__ import annotations

import colorsys
import dataclasses
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from denseclip.config import ConfigError
from denseclip.models import TINY_MODEL, load_clip
from denseclip.plus.augmentation import InMemoryBatches, augment, photometric_distortion, scale_saturation
from denseclip.plus.losses import segmentation_loss
from denseclip.plus.target import TargetConfig, build_target
from denseclip.plus.training import (
    PAD_VALUE,
    TrainingConfig,
    build_optimizer,
    poly_lr,
    set_learning_rate,
    target_counts,
    target_coverage,
    train,
)

torch.set_num_threads(1)
TINY_TARGET = TargetConfig(backbone="clip", head="deeplabv3plus", backbone_weights="clip", output_stride=16,
                           aspp_rates=(1,), head_channels=16)


def test_config_from_dict_and_defaults():
    config = TrainingConfig.from_dict({"setting": "zero_shot", "iterations": 200, "scale_range": [0.5, 1.5],
                                       "target": {"backbone": "resnet50", "aspp_rates": [6, 12]}})
    assert config.num_guided == 20  # 1/10 of the schedule
    assert config.scale_range == (0.5, 1.5) and config.target.aspp_rates == (6, 12)
    assert TrainingConfig(iterations=50, guided_iterations=7).num_guided == 7
    assert config.resize_to is None and config.photometric_distortion is False  # today's augmentation
    mmseg = TrainingConfig.from_dict({"resize_to": [2048, 512], "photometric_distortion": True})
    assert mmseg.resize_to == (2048, 512) and mmseg.photometric_distortion is True
    # The official recipe by default: one learning rate, poly down to 1e-4, MMSegmentation's loss average,
    # the raw dot-product classifier.
    assert (config.head_lr_multiplier, config.min_lr, config.loss_average) == (1.0, 1e-4, "all_pixels")
    assert config.target.classifier == "dot_product" and config.uses_pseudo_labels
    baseline = TrainingConfig.from_dict({"setting": "seen_only"})
    assert not baseline.uses_pseudo_labels and not baseline.self_training


@pytest.mark.parametrize("values, field", [
    ({"setting": "fully_supervised"}, "training.setting"),
    ({"iterations": 0}, "training.iterations"),
    ({"guided_iterations": 5000}, "training.guided_iterations"),
    ({"confidence_threshold": 1.5}, "training.confidence_threshold"),
    ({"scale_range": [2.0, 1.0]}, "training.scale_range"),
    ({"pseudo_labels": "from_somewhere"}, "training.pseudo_labels"),
    ({"learning_rate": 0.1}, "training.learning_rate"),
    ({"lr": "fast"}, "training.lr"),
    ({"target": {"backbone": "vgg16"}}, "training.target.backbone"),
    ({"target": {"depth": 3}}, "training.target.depth"),
    ({"target": {"backbone": "resnet50", "backbone_weights": "clip"}}, "training.target.backbone_weights"),
    ({"target": {"backbone": "resnet50", "head": "clip_dense"}}, "training.target.head"),
    ({"target": {"output_stride": 4}}, "training.target.output_stride"),
    ({"target": {"backbone": "clip", "head": "clip_dense", "dense_norm": 0}}, "training.target.dense_norm"),
    ({"target": {"head": "deeplabv2", "dense_norm": 10.0}}, "training.target.dense_norm"),
    ({"target": ["clip"]}, "training.target"),
    ({"resize_to": [2048]}, "training.resize_to"),
    ({"resize_to": [2048, 512, 1]}, "training.resize_to"),
    ({"resize_to": [2048, 0]}, "training.resize_to"),
    ({"resize_to": [-520, 520]}, "training.resize_to"),
    ({"resize_to": [2048.0, 512]}, "training.resize_to"),
    ({"resize_to": [True, 512]}, "training.resize_to"),
    ({"resize_to": "2048x512"}, "training.resize_to"),
    ({"resize_to": 512}, "training.resize_to"),
    ({"photometric_distortion": "yes"}, "training.photometric_distortion"),
    ({"loss_average": "mean"}, "training.loss_average"),
    ({"min_lr": -1e-4}, "training.min_lr"),
    ({"lr": 1e-5, "min_lr": 1e-4}, "training.min_lr"),
    ({"setting": "seen_only", "self_training": True}, "training.self_training"),
    ({"target": {"classifier": "softmax"}}, "training.target.classifier"),
    ({"target": {"backbone": "resnet152_v1c"}}, "training.target.backbone"),
])
def test_config_errors_name_the_field(values, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        TrainingConfig.from_dict(values)


def test_poly_schedule_min_lr_and_head_multiplier():
    assert poly_lr(0.01, 0, 100) == 0.01 and poly_lr(0.01, 100, 100) == 0.0
    assert poly_lr(0.01, 50, 100, power=1.0) == pytest.approx(0.005)
    values = [poly_lr(0.01, s, 100) for s in range(101)]
    assert all(a > b for a, b in itertools.pairwise(values))
    # mmcv's poly with min_lr: (lr - min_lr) * (1 - t) ** p + min_lr, from lr down to min_lr.
    assert poly_lr(0.01, 0, 100, min_lr=1e-4) == pytest.approx(0.01)
    assert poly_lr(0.01, 100, 100, min_lr=1e-4) == pytest.approx(1e-4)
    assert poly_lr(0.004, 50, 100, 1.0, 1e-4) == pytest.approx((0.004 - 1e-4) / 2 + 1e-4)
    clip = load_clip(TINY_MODEL, "random")
    model = build_target(TINY_TARGET, torch.randn(3, 128), clip=clip)
    official = TrainingConfig(iterations=100, lr=0.02, target=TINY_TARGET)
    optimizer = build_optimizer(model, official)
    assert set_learning_rate(optimizer, 100, official) == pytest.approx(1e-4)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-4, 1e-4])  # one rate for all
    config = TrainingConfig(iterations=100, lr=0.02, head_lr_multiplier=10.0, min_lr=0.0, target=TINY_TARGET)
    optimizer = build_optimizer(model, config)
    assert set_learning_rate(optimizer, 50, config) == pytest.approx(poly_lr(0.02, 50, 100))
    backbone_lr, head_lr = (g["lr"] for g in optimizer.param_groups)
    assert head_lr == pytest.approx(10 * backbone_lr)
    assert optimizer.param_groups[0]["momentum"] == 0.9 and optimizer.param_groups[0]["weight_decay"] == 5e-4


def test_augment_keeps_image_and_maps_aligned():
    # Blocky labels, and an image whose red channel encodes the label, so alignment is checkable anywhere.
    rng = np.random.default_rng(0)
    labels = torch.from_numpy(np.kron(rng.integers(0, 5, (8, 8)), np.ones((8, 8), dtype=np.int64)))
    image = torch.stack([labels.float() / 4, torch.zeros(64, 64), torch.ones(64, 64)])
    config = TrainingConfig(crop_size=48, scale_range=(0.5, 2.0))
    for seed in range(12):
        out = augment(image, {"label": labels, "score": labels.float()}, np.random.default_rng(seed), config)
        assert out["image"].shape == (3, 48, 48) and out["label"].shape == (48, 48)
        valid = out["valid"]
        assert (out["label"][~valid] == 255).all() and (out["score"][~valid] == 0).all()
        assert torch.allclose(out["image"][:, ~valid], torch.full((3, int((~valid).sum())), PAD_VALUE))
        decoded = (out["image"][0] * 4).round().long()
        # Away from block edges (bilinear image vs nearest labels may differ there) they must agree exactly.
        lab = out["label"][None, None].float()
        interior = (F.max_pool2d(lab, 5, 1, 2) == F.max_pool2d(-lab, 5, 1, 2).neg())[0, 0] & valid
        # Nor at the crop's edge, where the image was resampled from pixels outside the crop.
        interior[:2], interior[-2:], interior[:, :2], interior[:, -2:] = False, False, False, False
        assert interior.sum() > 100
        assert torch.equal(decoded[interior], out["label"][interior])
        assert torch.equal(out["score"][valid].long(), out["label"][valid])


@pytest.mark.parametrize("resize_to, scale", [(None, 1.0), (None, 0.5), ((2048, 512), 1.0), ((2048, 512), 0.5),
                                              ((520, 520), 1.0), ((520, 520), 2.0)])
def test_resize_to_gives_mmsegmentation_size(resize_to, scale):
    # A 500 x 375 (w x h) image, fixed ratio, and a crop big enough to keep it all: the valid pixels show the
    # resized size. MMSegmentation: factor = ratio * min(long / max(h, w), short / min(h, w)).
    height, width = 375, 500
    if resize_to is None:
        factor = scale
    else:
        factor = scale * min(resize_to[0] / 500, resize_to[1] / 375)
    expected = (round(height * factor), round(width * factor))
    if resize_to == (2048, 512) and scale == 1.0:
        assert expected == (512, 683)  # the short side hits 512 before the long side hits 2048
    config = TrainingConfig(crop_size=max(expected) + 8, scale_range=(scale, scale), resize_to=resize_to,
                            flip=False)
    labels = torch.zeros(height, width, dtype=torch.int64)
    out = augment(torch.rand(3, height, width), {"label": labels}, np.random.default_rng(0), config)
    valid = out["valid"]
    rows, cols = valid.any(1).nonzero()[:, 0], valid.any(0).nonzero()[:, 0]
    assert (len(rows), len(cols)) == expected and int(valid.sum()) == expected[0] * expected[1]
    assert (out["label"][valid] == 0).all() and (out["label"][~valid] == 255).all()


def test_scale_saturation_keeps_hue_and_value():
    pixels = torch.tensor([[0.5, 0.5, 0.5], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0],  # greys: no saturation
                           [1.0, 0.5, 0.5], [0.8, 0.4, 0.2], [0.1, 0.3, 0.2]], dtype=torch.float64)
    image = pixels.T[:, :, None]  # (3, 6, 1)
    for factor in (0.5, 1.0, 1.5):
        out = scale_saturation(image, factor)[:, :, 0].T
        assert torch.equal(out[:3], pixels[:3])
        assert torch.equal(out.amax(1), pixels.amax(1))  # value kept
        for before, after in zip(pixels.tolist(), out.tolist(), strict=True):
            h0, s0, v0 = colorsys.rgb_to_hsv(*before)
            h1, s1, v1 = colorsys.rgb_to_hsv(*after)
            assert v1 == pytest.approx(v0) and s1 == pytest.approx(min(s0 * factor, 1.0))
            if s0 > 0:
                assert h1 == pytest.approx(h0)
    # By hand: V = 1, S = 0.5; halving S moves the other channels half way to V, x1.5 saturates to S = 0.75.
    red = torch.tensor([1.0, 0.5, 0.5])[:, None, None]
    torch.testing.assert_close(scale_saturation(red, 0.5).flatten(), torch.tensor([1.0, 0.75, 0.75]))
    torch.testing.assert_close(scale_saturation(red, 1.5).flatten(), torch.tensor([1.0, 0.25, 0.25]))
    # S = 0.75 x 1.5 clips at 1: the min channel reaches 0, the others keep their place between min and V.
    orange = torch.tensor([0.8, 0.4, 0.2])[:, None, None]
    torch.testing.assert_close(scale_saturation(orange, 1.5).flatten(), torch.tensor([0.8, 0.8 / 3, 0.0]))


def test_photometric_distortion_changes_the_image_only():
    rng = np.random.default_rng(0)
    labels = torch.from_numpy(np.kron(rng.integers(0, 4, (4, 4)), np.ones((8, 8), dtype=np.int64)))
    palette = torch.tensor([[0.9, 0.2, 0.1], [0.1, 0.6, 0.3], [0.4, 0.4, 0.8], [0.5, 0.5, 0.5]])
    image = palette[labels].permute(2, 0, 1)  # (3, 32, 32), one colour per label
    maps = {"label": labels, "score": labels.float() / 4}
    plain = TrainingConfig(crop_size=40, scale_range=(0.75, 1.5))  # pads: some pixels are not valid
    distorted = dataclasses.replace(plain, photometric_distortion=True)
    changed = 0
    for seed in range(40):
        a = augment(image, maps, np.random.default_rng(seed), plain)
        b = augment(image, maps, np.random.default_rng(seed), distorted)
        again = augment(image, maps, np.random.default_rng(seed), distorted)
        for key in ("label", "score", "valid"):
            assert torch.equal(a[key], b[key]), key  # same geometry, maps untouched
        for key in b:
            assert torch.equal(b[key], again[key]), key  # reproducible from the seed
        assert b["image"].shape == (3, 40, 40) and b["image"].dtype == torch.float32
        assert b["image"].min() >= 0 and b["image"].max() <= 1
        assert torch.allclose(a["image"][:, ~a["valid"]], torch.tensor(PAD_VALUE))  # off: padding as today
        changed += not torch.allclose(a["image"], b["image"], atol=1e-3)
        # Per pixel and the same for every pixel: a colour of the undistorted crop maps to one colour.
        inner = a["valid"] & (a["image"] - palette[0][:, None, None]).abs().amax(0).lt(1e-6)
        if inner.any():
            colours = b["image"][:, inner]
            assert torch.allclose(colours, colours[:, :1], atol=1e-5)
    # Each of the 4 steps has probability 0.5: all skipped (or no-ops) in about 1/16 of the draws.
    assert 30 <= changed < 40


def test_photometric_distortion_off_leaves_the_crop_and_keeps_greys_grey():
    rng = np.random.default_rng(1)
    image = torch.from_numpy(rng.random((3, 24, 24), dtype=np.float32))
    labels = torch.from_numpy(rng.integers(0, 3, (24, 24)))
    config = TrainingConfig(crop_size=24, scale_range=(1.0, 1.0), flip=False)  # the identity geometry
    out = augment(image, {"label": labels}, np.random.default_rng(0), config)
    assert torch.equal(out["image"], image) and torch.equal(out["label"], labels) and out["valid"].all()
    # Brightness, contrast, saturation and hue all keep a grey pixel grey (its three channels equal).
    grey = torch.linspace(0, 1, 24).expand(3, 24, 24).contiguous()
    shifted = 0
    for seed in range(20):
        out = photometric_distortion(grey, np.random.default_rng(seed))
        torch.testing.assert_close(out, out[:1].expand(3, -1, -1))
        shifted += not torch.allclose(out, grey)
    assert shifted > 10  # brightness or contrast (each with prob. 0.5) moved the greys
    # The hue moves by up to 18/180 of the circle (clipping of brightness and contrast moves it a little too).
    colour = torch.tensor([0.9, 0.2, 0.1])[:, None, None].expand(3, 4, 4).contiguous()
    hue = colorsys.rgb_to_hsv(0.9, 0.2, 0.1)[0]
    moves = []
    for seed in range(20):
        out = photometric_distortion(colour, np.random.default_rng(seed))[:, 0, 0].tolist()
        move = abs(colorsys.rgb_to_hsv(*out)[0] - hue)
        moves.append(min(move, 1 - move))
    assert max(moves) <= 0.12 and sum(m > 0.04 for m in moves) >= 3


def test_in_memory_batches_depend_only_on_seed_and_step():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 40, 40, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, (6, 40, 40), dtype=np.uint8)
    config = TrainingConfig(batch_size=4, crop_size=32, seed=3)
    a = InMemoryBatches(images, {"label": labels}, config)
    b = InMemoryBatches(images, {"label": labels}, config)
    first = a.batch(5)
    assert first["image"].shape == (4, 3, 32, 32) and first["label"].dtype == torch.int64
    for key in first:
        assert torch.equal(first[key], b.batch(5)[key])
    assert not torch.equal(first["image"], a.batch(6)["image"])
    with pytest.raises(ValueError, match="label"):
        InMemoryBatches(images, {"label": labels[:, :20]}, config)


def test_loss_ignores_pixels_and_survives_an_all_ignored_batch():
    logits = torch.randn(2, 4, 5, 5, requires_grad=True)
    targets = torch.randint(0, 4, (2, 5, 5))
    for average in ("all_pixels", "labelled_pixels"):
        torch.testing.assert_close(segmentation_loss(logits, targets, average=average),
                                   F.cross_entropy(logits, targets))
    masked = targets.clone()
    masked[0] = 255
    # Over the labelled pixels only, or (MMSegmentation 0.x) over every pixel, an ignored one counting 0.
    labelled = F.cross_entropy(logits[1:], targets[1:])
    torch.testing.assert_close(segmentation_loss(logits, masked, average="labelled_pixels"), labelled)
    torch.testing.assert_close(segmentation_loss(logits, masked), labelled / 2)
    per_pixel = F.cross_entropy(logits, masked, ignore_index=255, reduction="none")
    torch.testing.assert_close(segmentation_loss(logits, masked, average="all_pixels"), per_pixel.mean())
    for average in ("all_pixels", "labelled_pixels"):
        empty = segmentation_loss(logits, torch.full_like(targets, 255), average=average)
        empty.backward()
        assert empty.item() == 0 and torch.isfinite(logits.grad).all()
    with pytest.raises(ValueError, match="average"):
        segmentation_loss(logits, targets, average="sum")


def test_target_coverage_counts_where_each_valid_pixels_target_came_from():
    unseen = [2, 4]
    batch = {"label": torch.tensor([[[0, 2, 4, 255], [1, 2, 3, 4]]]),
             "valid": torch.tensor([[[True, True, True, True], [True, True, True, False]]])}
    # Seen truth kept; unseen pixels: an unseen pseudo label, or none; void and padding ignored.
    targets = torch.tensor([[[0, 2, 255, 255], [1, 4, 3, 255]]])
    zero_shot = TrainingConfig(setting="zero_shot")
    counts = target_counts(batch, targets, zero_shot, unseen)
    assert counts.tolist() == [7, 3, 2, 2, 3, 2]
    assert target_coverage(counts.tolist(), "zero_shot") == {
        "ground_truth": 3 / 7, "pseudo_label": 2 / 7, "ignored": 2 / 7, "unseen_supervised": 2 / 3,
        "pixels": 7, "unseen_pixels": 3}
    free = target_coverage(target_counts(batch, targets, TrainingConfig(), unseen).tolist(), "annotation_free")
    assert free == {"ground_truth": 0.0, "pseudo_label": 5 / 7, "ignored": 2 / 7, "pixels": 7, "unseen_pixels": 0}
    assert target_coverage([0] * 6, "zero_shot")["unseen_supervised"] is None


def test_short_training_run_learns_its_pseudo_labels():
    """Precomputed pseudo labels that follow the image colour: a few real SGD steps must fit them."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    colours = np.array([[128, 128, 128], [220, 30, 30], [30, 30, 220]], dtype=np.uint8)
    pseudo = np.kron(rng.integers(0, 3, (16, 4, 4)), np.ones((1, 12, 12), dtype=np.int64)).astype(np.uint8)
    images = colours[pseudo]
    config = TrainingConfig(iterations=40, batch_size=4, crop_size=48, scale_range=(1.0, 1.0), lr=0.01,
                            pseudo_labels="precomputed", target=TINY_TARGET, seed=0)
    clip = load_clip(TINY_MODEL, "random")
    model = build_target(config.target, F.normalize(torch.randn(3, 128), dim=-1), clip=clip)
    batches = InMemoryBatches(images, {"pseudo_label": pseudo}, config).batch
    history = train(model, build_optimizer(model, config), batches, config, range(config.iterations),
                    log_every=10)
    assert [r["step"] for r in history] == [10, 20, 30, 40]
    assert {r["phase"] for r in history} == {"guided"}
    # Annotation-free, no threshold, crops inside the images: every pixel is pseudo-labelled, 10 steps x 4 crops.
    assert all(r["target_coverage"] == {"ground_truth": 0.0, "pseudo_label": 1.0, "ignored": 0.0,
                                        "pixels": 10 * 4 * 48 * 48, "unseen_pixels": 0} for r in history)
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    predicted = np.stack([labels for labels, _ in model.label_images(list(images))])
    assert (predicted == pseudo).mean() > 0.8
    with pytest.raises(ConfigError):
        dataclasses.replace(config, iterations=-1).validate()

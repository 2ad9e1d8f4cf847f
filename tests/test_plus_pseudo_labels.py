"""Pseudo labels and the transductive zero-shot merge, checked on what the loss actually receives."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from denseclip.config import LabelerConfig
from denseclip.models import TINY_MODEL, load_clip
from denseclip.plus import training
from denseclip.plus.losses import segmentation_loss
from denseclip.plus.pseudo_labels import (
    DenseCLIPTeacher,
    build_teacher,
    hide_unseen,
    label_training_set,
    pseudo_labels,
    refine_with_image,
    zero_shot_merge,
)
from denseclip.plus.target import TargetConfig, build_target
from denseclip.plus.training import TrainingConfig, build_optimizer, make_targets, train
from denseclip.predictor import DenseCLIP

torch.set_num_threads(1)
IGNORE = 255
CLASSES = [["background"], ["red circle"], ["red square"], ["blue circle"], ["blue square"]]
UNSEEN = [2, 4]


def test_pseudo_labels_argmax_among_allowed_classes_with_threshold():
    probs = torch.tensor([0.5, 0.3, 0.2]).view(1, 3, 1, 1).expand(1, 3, 2, 2).clone()
    probs[0, :, 1, 1] = torch.tensor([0.1, 0.45, 0.45])
    scores = probs.log()
    labels, conf = pseudo_labels(scores)
    assert labels[0, 0, 0] == 0 and conf[0, 0, 0] == pytest.approx(0.5)
    labels, conf = pseudo_labels(scores, class_ids=[1, 2])
    assert labels[0, 0, 0] == 1 and conf[0, 0, 0] == pytest.approx(0.6)  # renormalised among {1, 2}
    labels, _ = pseudo_labels(scores, threshold=0.48)
    assert labels[0, 0, 0] == 0 and labels[0, 1, 1] == IGNORE


def test_zero_shot_merge_fills_only_unseen_pixels_and_keeps_void_ignored():
    # The check of the issue: void (255) stays ignored, seen truth stays, unseen pixels take the pseudo label.
    assert zero_shot_merge(torch.tensor([0, 1, 255, 2]), torch.ones(4, dtype=torch.long), [1]).tolist() == \
        [0, 1, 255, 2]
    gt = torch.tensor([[[0, 1, 2], [4, 255, 3]]])
    pseudo = torch.tensor([[[4, 4, 4], [2, 2, 1]]])
    assert zero_shot_merge(gt, pseudo, UNSEEN, IGNORE).tolist() == [[[0, 1, 4], [2, 255, 3]]]
    assert hide_unseen(gt, UNSEEN, IGNORE).tolist() == [[[0, 1, 255], [255, 255, 3]]]
    # A seen-class pseudo label never fills an unseen pixel (it would teach a seen class there).
    assert zero_shot_merge(gt, torch.tensor([[[0, 0, 1], [3, 1, 1]]]), UNSEEN).tolist() == \
        [[[0, 1, 255], [255, 255, 3]]]


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    clip = load_clip(TINY_MODEL, "random")
    predictor = DenseCLIP.from_config(LabelerConfig(model="denseclip-tiny-shapes", templates=None), CLASSES, clip=clip)
    return DenseCLIPTeacher(predictor)


def _batch(gt: torch.Tensor) -> dict:
    torch.manual_seed(1)
    b, h, w = gt.shape
    return {"image": torch.rand(b, 3, h, w), "valid": torch.ones(b, h, w, dtype=torch.bool), "label": gt}


def _ground_truth() -> torch.Tensor:
    gt = torch.zeros(2, 64, 64, dtype=torch.long)
    gt[:, 8:30, 8:30] = 1  # seen
    gt[:, 34:60, 30:60] = 2  # unseen
    gt[1, 0:6, 40:64] = 4  # unseen
    gt[1, 60:, :10] = 3  # seen
    return gt


def _recorded_targets(monkeypatch, teacher, gt: torch.Tensor, config: TrainingConfig) -> list[torch.Tensor]:
    """Run real training steps and return every target map the loss received."""
    seen: list[torch.Tensor] = []

    def spy(logits, targets, ignore_index=255, average="all_pixels"):
        seen.append(targets.clone())
        return segmentation_loss(logits, targets, ignore_index, average)

    monkeypatch.setattr(training, "segmentation_loss", spy)
    torch.manual_seed(config.seed)
    model = build_target(config.target, teacher.predictor.name_embeddings, teacher.predictor.class_of_name,
                         clip=teacher.predictor.clip)
    batch = _batch(gt)
    train(model, build_optimizer(model, config), lambda step: batch, config, range(config.iterations),
          teacher, UNSEEN)
    return seen


ZERO_SHOT = TrainingConfig(setting="zero_shot", iterations=4, guided_iterations=2, self_training=True,
                           batch_size=2, crop_size=64, lr=0.05,
                           target=TargetConfig(backbone="clip", head="deeplabv3plus", backbone_weights="clip",
                                               output_stride=16, aspp_rates=(1,), head_channels=16))


def test_unseen_ground_truth_never_reaches_the_loss(monkeypatch, teacher):
    gt = _ground_truth()
    gt[0, 0:4, :] = IGNORE  # void: a boundary band
    # The same scenes annotated differently only in which unseen class their unseen pixels carry.
    relabelled = gt.clone()
    relabelled[gt == 2] = 4
    relabelled[gt == 4] = 2
    first = _recorded_targets(monkeypatch, teacher, gt, ZERO_SHOT)
    second = _recorded_targets(monkeypatch, teacher, relabelled, ZERO_SHOT)
    assert len(first) == ZERO_SHOT.iterations
    void = gt == IGNORE
    unseen_pixels = (gt == 2) | (gt == 4)
    seen_pixels = ~unseen_pixels & ~void
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b)  # guided and self-training steps alike
        torch.testing.assert_close(a[seen_pixels], gt[seen_pixels])
        assert set(a[unseen_pixels].unique().tolist()) <= set(UNSEEN)  # filled by pseudo labels, never empty
        assert (a[void] == IGNORE).all()  # void is never pseudo-labelled


def test_seen_only_baseline_trains_on_seen_ground_truth_alone(monkeypatch, teacher):
    config = dataclasses.replace(ZERO_SHOT, setting="seen_only", self_training=False)
    gt = _ground_truth()
    expected = hide_unseen(gt, UNSEEN, IGNORE)
    for targets in _recorded_targets(monkeypatch, teacher, gt, config):
        torch.testing.assert_close(targets, expected)  # every step: no pseudo label anywhere
    assert training.phase(0, config) == "seen_only"


def test_annotation_free_targets_never_use_ground_truth(monkeypatch, teacher):
    config = dataclasses.replace(ZERO_SHOT, setting="annotation_free", self_training=False)
    gt = _ground_truth()
    with_truth = _recorded_targets(monkeypatch, teacher, gt, config)
    other_truth = _recorded_targets(monkeypatch, teacher, torch.full_like(gt, 3), config)
    for a, b in zip(with_truth, other_truth):
        torch.testing.assert_close(a, b)
    # Guided learning throughout: the loss sees DenseCLIP's argmax at every step.
    expected, _ = teacher.pseudo_labels(_batch(gt)["image"])
    for targets in with_truth:
        torch.testing.assert_close(targets, expected)


def test_self_training_targets_are_the_models_own_predictions(teacher):
    config = dataclasses.replace(ZERO_SHOT, setting="annotation_free")
    model = build_target(config.target, teacher.predictor.name_embeddings, teacher.predictor.class_of_name,
                         clip=teacher.predictor.clip)
    batch = _batch(_ground_truth())
    own, _ = model.predict(batch["image"])
    guided, _ = teacher.pseudo_labels(batch["image"])
    torch.testing.assert_close(make_targets(batch, 1, config, model, teacher), guided)
    torch.testing.assert_close(make_targets(batch, 2, config, model, teacher), own)
    off = dataclasses.replace(config, self_training=False)
    torch.testing.assert_close(make_targets(batch, 3, off, model, teacher), guided)


def test_precomputed_pseudo_labels_threshold_and_padding(teacher):
    config = dataclasses.replace(ZERO_SHOT, setting="annotation_free", self_training=False,
                                 pseudo_labels="precomputed", confidence_threshold=0.5)
    batch = _batch(_ground_truth())
    batch["pseudo_label"] = torch.full((2, 64, 64), 3)
    batch["pseudo_confidence"] = torch.full((2, 64, 64), 0.9)
    batch["pseudo_confidence"][:, :10] = 0.2
    batch["valid"][:, :, -5:] = False
    targets = make_targets(batch, 0, config, model=None)
    assert (targets[:, :10] == IGNORE).all() and (targets[:, :, -5:] == IGNORE).all()
    assert (targets[:, 10:, :-5] == 3).all()
    with pytest.raises(ValueError, match="teacher"):
        make_targets(batch, 0, dataclasses.replace(config, pseudo_labels="on_the_fly"), model=None)


def test_refinement_snaps_blobby_labels_to_image_edges():
    gen = torch.Generator().manual_seed(0)
    image = torch.full((1, 3, 64, 64), 0.5) + 0.02 * torch.randn(1, 3, 64, 64, generator=gen)
    image[0, :, :, :32] = torch.tensor([0.85, 0.15, 0.15]).view(3, 1, 1)  # a red object on the left half
    probs = torch.zeros(1, 2, 64, 64)
    probs[0, 1, :, :40] = 0.9  # the object's label spills 8 pixels into the grey background
    probs[0, 0] = 1 - probs[0, 1]
    refined = refine_with_image(probs, image, iterations=10, scale=1.0)
    torch.testing.assert_close(refined.sum(dim=1), torch.ones(1, 64, 64))
    labels = refined.argmax(dim=1)[0]
    assert (labels[:, :30] == 1).all()
    assert (labels[:, 34:] == 0).float().mean() > 0.95
    before = (probs.argmax(dim=1)[0] == (torch.arange(64) < 32).long()).float().mean()
    after = (labels == (torch.arange(64) < 32).long()).float().mean()
    assert after > before + 0.1


def _exact(teacher, images: torch.Tensor, class_ids=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference the teacher approximates: every class's log-probabilities upsampled to full size, then
    the argmax (among ``class_ids``)."""
    p = teacher.predictor
    return pseudo_labels(p.logits((images - p.mean) / p.std), class_ids)


def test_teacher_labels_at_feature_resolution_upsampling_only_the_candidates(monkeypatch, teacher):
    images = torch.rand(3, 3, 40, 56, generator=torch.Generator().manual_seed(2))  # not a multiple of the stride
    p = teacher.predictor
    upsampled: list[int] = []
    real_upsample = type(p).upsample

    def spy(self, log_probs, extent, size):
        upsampled.append(log_probs.shape[0])
        return real_upsample(self, log_probs, extent, size)

    monkeypatch.setattr(type(p), "upsample", spy)
    for topk, class_ids in ((None, None), (None, UNSEEN), (1, None), (1, UNSEEN)):
        monkeypatch.setattr(p, "upsample_topk", topk)
        reference, reference_confidence = _exact(teacher, images, class_ids)
        upsampled.clear()
        labels, confidence = teacher.pseudo_labels(images, class_ids)
        allowed = len(CLASSES) if class_ids is None else len(class_ids)
        assert labels.shape == confidence.shape == (3, 40, 56) and 0 <= float(confidence.min())
        assert float(confidence.max()) <= 1
        if class_ids is not None:
            assert set(labels.unique().tolist()) <= set(UNSEEN)
        if class_ids is None:  # the labeller's own labels, image by image
            own = p.predict(p.normalise(images * 255))
            torch.testing.assert_close(labels, torch.stack([lab for lab, _ in own]).long())
            torch.testing.assert_close(confidence, torch.stack([conf for _, conf in own]))
            if topk is None:  # the argmax of every class's upsampled log-probability
                torch.testing.assert_close(labels, reference)
                torch.testing.assert_close(confidence, reference_confidence, atol=1e-3, rtol=0)
        elif topk is None:  # every allowed class upsampled: exactly the full-resolution computation
            torch.testing.assert_close(labels, reference)
            torch.testing.assert_close(confidence, reference_confidence)
            assert upsampled == [3 * allowed]
        else:  # the top-1 classes only: near-exact, on fewer maps
            assert (labels == reference).float().mean() > 0.95
            assert upsampled[0] < 3 * allowed
    threshold = float(confidence.median())
    cut, _ = teacher.pseudo_labels(images, UNSEEN, threshold=threshold)
    torch.testing.assert_close(cut, labels.masked_fill(confidence < threshold, IGNORE))


def test_teacher_refinement_and_precomputed_training_set(monkeypatch, teacher):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 32, 48, 3), dtype=np.uint8)
    labels, confidence = label_training_set(teacher, images, batch_size=2)
    assert labels.shape == (3, 32, 48) and labels.dtype == np.uint8 and confidence.dtype == np.float32
    batch = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    expected, expected_confidence = teacher.pseudo_labels(batch)
    np.testing.assert_array_equal(labels, expected.numpy())
    np.testing.assert_allclose(confidence, expected_confidence.numpy(), atol=1e-6)
    unseen_labels, _ = label_training_set(teacher, images, UNSEEN)
    assert set(np.unique(unseen_labels)) <= set(UNSEEN)
    refiner = DenseCLIPTeacher(teacher.predictor, refine_iterations=5)
    refined, refined_confidence = refiner.pseudo_labels(batch)
    assert refined.shape == (3, 32, 48) and 0 <= float(refined_confidence.min()) <= 1
    assert not torch.allclose(refined_confidence, expected_confidence)  # the probabilities were refined
    # Refinement averages each class's probabilities on its own: refining only the candidate classes gives
    # what refining every class gives wherever a candidate wins; exactly that with every class a candidate.
    p = teacher.predictor
    full = refine_with_image(p.logits((batch - p.mean) / p.std).exp(), batch, 5).argmax(dim=1)
    assert (full == refined).float().mean() > 0.95
    monkeypatch.setattr(p, "upsample_topk", None)
    torch.testing.assert_close(refiner.pseudo_labels(batch)[0], full)


def test_the_training_teacher_sees_each_crop_as_it_is():
    """The official teacher labels the augmented crop as the batch holds it; the labeller's protocol (resize, size
    buckets) is for whole images."""
    config = LabelerConfig(pretrained="random", resize_to=(160, 80), size_bucket=96)
    labeler = DenseCLIP.from_config(config, CLASSES)
    teacher = build_teacher(config, CLASSES, clip=labeler.clip)
    seen = {}
    for name, predictor in (("labeler", labeler), ("teacher", teacher.predictor)):
        predictor.tower.conv1.register_forward_pre_hook(lambda _, args, name=name: seen.update({name: args[0].shape}))
    crops = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    labels, _ = teacher.pseudo_labels(crops)
    labeler.label_images([(crops[0].permute(1, 2, 0) * 255).to(torch.uint8).numpy()])
    assert labels.shape == (2, 64, 64)
    assert tuple(seen["teacher"]) == (2, 3, 64, 64)  # as it is: 64 pixels are two cells of the stride 32
    assert tuple(seen["labeler"][-2:]) == (96, 96)  # resized to 80, padded to the 96-pixel bucket


def test_a_teacher_of_the_unseen_classes_labels_them_by_their_dataset_ids():
    """The zero-shot teacher's vocabulary is the unseen classes (the official teacher scores only those): its
    labels are their dataset ids, the argmax the whole vocabulary's teacher finds among them."""
    clip = load_clip(TINY_MODEL)  # the shipped weights: labels that mean something
    config = LabelerConfig(model=TINY_MODEL)
    unseen = build_teacher(config, [CLASSES[i] for i in UNSEEN], UNSEEN, clip=clip)
    everything = build_teacher(config, CLASSES, clip=clip)
    images = torch.full((2, 3, 64, 96), 0.5)  # grey, a red square and a blue one (each scene flipped)
    images[:, :, 16:48, 8:40] = torch.tensor([0.9, 0.1, 0.1]).view(3, 1, 1)
    images[:, :, 16:48, 56:88] = torch.tensor([0.1, 0.1, 0.9]).view(3, 1, 1)
    images[1] = images[1].flip(-1)
    labels, confidence = unseen.pseudo_labels(images, UNSEEN)
    assert torch.equal(labels, unseen.pseudo_labels(images)[0])  # its whole vocabulary: the same request
    assert set(labels.unique().tolist()) <= set(UNSEEN) and len(labels.unique()) == 2
    restricted, _ = everything.pseudo_labels(images, UNSEEN)
    assert (labels == restricted).float().mean() > 0.99
    assert 0 <= float(confidence.min()) and float(confidence.max()) <= 1
    with pytest.raises(ValueError, match=r"classes \[1\] are not in the teacher's vocabulary"):
        unseen.pseudo_labels(images, [1, 2])

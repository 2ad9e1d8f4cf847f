"""DenseCLIP prediction: shapes, batching and sliding-window consistency, background handling, upsampling."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from denseclip.models import load_clip
from denseclip.predictor import DenseCLIP

torch.set_num_threads(2)
CLASSES = [["cat"], ["dog"], ["sofa", "couch"], ["grass"], ["sky"]]


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return load_clip("RN50")


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    # Smooth random images (blocky) so label maps have structure, at odd sizes.
    out = []
    for h, w in [(75, 100), (96, 64), (130, 97)]:
        small = rng.integers(0, 255, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        out.append(np.kron(small, np.ones((8, 8, 1), dtype=np.uint8))[:h, :w].copy())
    return out


@pytest.fixture(scope="module", autouse=True)
def cache_dir(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("DENSECLIP_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


def make(clip, **kw):
    return DenseCLIP(clip, CLASSES, templates=["a photo of a {}."], **kw)


def test_label_maps_have_each_image_size(clip, images):
    results = make(clip).label_images(images)
    for image, (labels, conf) in zip(images, results):
        assert labels.shape == image.shape[:2] and conf.shape == image.shape[:2]
        assert labels.dtype == np.uint8 and labels.max() < len(CLASSES)
        assert (conf > 0).all() and (conf <= 1).all()


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_batched_equals_per_image(clip, images, mode):
    predictor = make(clip, mode=mode, crop_size=64, crop_stride=32, batch_size=4, short_side=96)
    together = predictor.label_images(images)
    for image, (labels, conf) in zip(images, together):
        alone_labels, alone_conf = predictor.label_images([image])[0]
        np.testing.assert_array_equal(labels, alone_labels)
        np.testing.assert_allclose(conf, alone_conf, atol=1e-5)


def test_slide_with_one_window_equals_whole(clip):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)
    x = make(clip).preprocess(image)[None]
    whole = make(clip).logits(x)
    slide = make(clip, mode="slide", crop_size=96, crop_stride=32).logits(x)
    # One 96x96 window on a 64x96 image (padded); the padded rows differ from whole-image padding only there.
    assert whole.shape == slide.shape == (1, len(CLASSES), 64, 96)
    whole64 = make(clip, mode="slide", crop_size=64, crop_stride=64).logits(x[:, :, :, :64])
    assert torch.allclose(make(clip).logits(x[:, :, :, :64]), whole64, atol=1e-4)


def test_upsampling_equals_interpolate_and_topk_is_near_exact(clip, images):
    exact = make(clip, upsample_topk=None)
    cheap = make(clip, upsample_topk=2)
    x = exact.preprocess(images[1][:64, :64])[None]  # 64x64: no padding, so grid_sample == interpolate
    canvas = exact._canvases(x)[0]
    log_probs = exact._finalize(canvas)
    expected = F.interpolate(log_probs[None], size=(64, 64), mode="bilinear", align_corners=False)[0]
    assert torch.allclose(exact.logits(x)[0], expected, atol=1e-5)
    full = exact.label_images(images)
    top2 = cheap.label_images(images)
    agree = np.mean([np.mean(a[0] == b[0]) for a, b in zip(full, top2)])
    assert agree > 0.99


def test_background_threshold(clip, images):
    low = make(clip, background_threshold=0.01).label_images(images[:1])[0][0]
    high = make(clip, background_threshold=0.99).label_images(images[:1])[0][0]
    assert (high == 0).all()  # no class reaches 99% on random weights
    assert (low != 0).all()  # every location has a class above 1% (5 classes: max prob >= 20%)
    assert make(clip, background_threshold=0.5).class_names[0] == "background"


def test_background_embedding_is_a_class(clip, images):
    predictor = make(clip, background_embedding=torch.randn(clip.model.text_projection.shape[1]))
    assert predictor.num_classes == len(CLASSES) + 1
    labels = predictor.label_images(images[:1])[0][0]
    assert labels.max() <= len(CLASSES)


def test_prompt_denoising_removes_weak_classes(clip, images):
    plain = make(clip).label_images(images)
    denoised = make(clip, prompt_denoising=0.999).label_images(images)
    for (a, _), (b, _) in zip(plain, denoised):
        # With an unreachable threshold nothing is removed (a vocabulary is never emptied).
        np.testing.assert_array_equal(a, b)
    denoised = make(clip, prompt_denoising=0.3, temperature=100).label_images(images)
    assert all(len(np.unique(b)) <= len(np.unique(a)) for (a, _), (b, _) in zip(plain, denoised))


def test_key_smoothing_changes_scores_consistently(clip, images):
    x = make(clip).preprocess(images[1][:64, :64])[None]
    plain = make(clip).logits(x)
    smooth_all = make(clip, key_smoothing=-1.0).logits(x)
    # Threshold -1: every location averages over all locations -> one score vector everywhere.
    assert not torch.allclose(plain, smooth_all)
    flat = smooth_all[0].flatten(1)
    assert torch.allclose(flat, flat[:, :1].expand_as(flat), atol=1e-4)


def test_invalid_options(clip):
    with pytest.raises(ValueError, match="multiples of the tower's stride 32"):
        make(clip, mode="slide", crop_size=100)
    with pytest.raises(ValueError, match="mode must be"):
        make(clip, mode="tiles")

"""DenseCLIP prediction: shapes, batching and sliding-window consistency, background handling, upsampling."""

import math

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
    x = exact.preprocess(images[1][:64, :64])[None]  # 64x64: no padding, so the upsampling is plain interpolate
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


# ------------------------------------------------------------------ the fast path against the straightforward one
@pytest.fixture(scope="module")
def tiny():
    return load_clip()  # the shipped tiny CLIP: trained weights and BatchNorm statistics, structured label maps


@pytest.fixture(scope="module")
def scenes():
    from denseclip.synthetic import render_scene

    # Whole scenes (128 px, a multiple of the stride) and odd-sized crops (padded on the feature grid).
    full = [render_scene(5, i).image for i in range(4)]
    return full + [full[0][:100, :120].copy(), full[1][7:, 30:].copy()]


def reference_log_probs(clip, classes, templates, image):
    """The labeller written out the straightforward way, in fp32 on the loaded model: normalise, pad to the
    stride, dense features, cosine with every name, max over a class's names, temperature, log-softmax.
    Returns ``(K, hc, wc)`` and the image's extent in cells."""
    from denseclip.dense import dense_features
    from denseclip.text import class_embeddings

    mean, std = torch.tensor(clip.mean).view(3, 1, 1), torch.tensor(clip.std).view(3, 1, 1)
    x = (torch.from_numpy(image.copy()).permute(2, 0, 1).float() / 255 - mean) / std
    h, w = image.shape[:2]
    x = F.pad(x, (0, -w % 32, 0, -h % 32))[None]
    with torch.no_grad():
        features = F.normalize(dense_features(clip.model, x), dim=1)[0]  # (D, hc, wc)
    embeddings, class_of_name = class_embeddings(clip, classes, templates)
    cosine = torch.einsum("dhw,nd->nhw", features, embeddings)
    logits = torch.stack([cosine[class_of_name == c].max(dim=0).values for c in range(len(classes))])
    return (100 * logits).log_softmax(dim=0), (h / 32, w / 32)


def reference_labels(log_probs, extent, size, topk):
    """Upsampling as grid_sample does it (border values, align_corners=False) on the whole canvas, restricted to
    the classes in some location's top-k; returns ``(labels (H, W), margin (H, W))`` with the margin between the
    best and the second-best upsampled class (ties are where it is ~0)."""
    candidates = torch.arange(log_probs.shape[0])
    if topk is not None:
        valid = log_probs[:, :math.ceil(extent[0]), :math.ceil(extent[1])]
        candidates = torch.unique(valid.topk(topk, dim=0).indices)
    axes = [2 * ((torch.arange(n) + 0.5) * (e / n)) / cells - 1
            for cells, e, n in zip(log_probs.shape[-2:], extent, size)]
    gy, gx = torch.meshgrid(*axes, indexing="ij")
    grid = torch.stack([gx, gy], dim=-1)[None]
    up = F.grid_sample(log_probs[candidates][None], grid, mode="bilinear", padding_mode="border",
                       align_corners=False)[0]
    top2 = up.topk(2, dim=0).values
    return candidates[up.argmax(dim=0)], top2[0] - top2[1], up.max(dim=0).values.exp()


@pytest.mark.parametrize("topk", [3, None])
def test_labels_equal_the_straightforward_fp32_labeller_apart_from_ties(tiny, scenes, topk):
    from denseclip.datasets import get_dataset

    classes = get_dataset("synthetic").classes
    labeler = DenseCLIP(tiny, classes, templates="synthetic", upsample_topk=topk, batch_size=4)
    assert labeler.dtype == torch.float32
    results = labeler.label_maps(scenes)
    for image, (labels, confidence) in zip(scenes, results):
        log_probs, extent = reference_log_probs(tiny, classes, labeler.templates, image)
        expected, margin, best = reference_labels(log_probs, extent, image.shape[:2], topk)
        differ = (torch.from_numpy(labels.astype(np.int64)) != expected).numpy()
        assert len(np.unique(labels)) > 1  # structured maps, not one class everywhere
        assert margin.numpy()[differ].max(initial=0) < 1e-3, "labels differ where the reference has no tie"
        assert differ.mean() < 1e-3
        assert np.abs(confidence.astype(np.float32) - np.round(best.numpy() * 255)).max() <= 1


def test_gpu_path_needs_no_host_sync_and_equals_the_cpu_path(tiny, scenes):
    """On a GPU, candidates are masked rather than gathered (no sync per image); run that path here, under a
    mode that records every call which would make the host wait for the device."""
    from torch.overrides import TorchFunctionMode

    from denseclip.datasets import get_dataset

    syncing = {"__bool__", "__int__", "__float__", "__index__", "item", "tolist", "nonzero", "unique", "cpu",
               "numpy", "masked_select", "equal", "allclose"}

    class SyncRecorder(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", "")
            if name in syncing or (name == "__getitem__" and any(
                    isinstance(a, torch.Tensor) and a.dtype == torch.bool for a in args[1:])):
                self.calls.append(name)
            return func(*args, **(kwargs or {}))

    classes = get_dataset("synthetic").classes
    gather = DenseCLIP(tiny, classes, templates="synthetic", prompt_denoising=0.5, batch_size=4)
    mask = DenseCLIP(tiny, classes, templates="synthetic", prompt_denoising=0.5, batch_size=4)
    mask._gather_candidates = False
    tensors = [gather.preprocess(image) for image in scenes]
    with SyncRecorder() as recorder:
        masked = mask.predict(tensors)
    assert recorder.calls == []
    for (a, ca), (b, cb) in zip(gather.predict(tensors), masked):
        assert torch.equal(a, b) and torch.equal(ca, cb)


def test_label_maps_keep_confidence_as_uint8(tiny, scenes):
    from denseclip.datasets import get_dataset

    labeler = DenseCLIP(tiny, get_dataset("synthetic").classes, templates="synthetic")
    (labels, confidence), = labeler.label_maps(scenes[:1])
    assert labels.dtype == np.uint8 and confidence.dtype == np.uint8
    (labels_f, confidence_f), = labeler.label_images(scenes[:1])
    np.testing.assert_array_equal(labels, labels_f)
    assert confidence_f.dtype == np.float32
    np.testing.assert_array_equal(confidence_f, confidence.astype(np.float32) / 255)


def test_slide_windows_batched_across_images_equal_one_at_a_time(tiny):
    """Windows of several images share forward passes, and give what each window gives alone (fp32, 1e-5)."""
    from denseclip.synthetic import render_scene

    images = [render_scene(6, i, size=size).image for i, size in enumerate((160, 128, 192))]
    classes = [["red circle"], ["blue square"], ["green triangle"], ["background"]]
    batched = DenseCLIP(tiny, classes, templates="synthetic", mode="slide", crop_size=96, crop_stride=32,
                        batch_size=8)
    alone = DenseCLIP(tiny, classes, templates="synthetic", mode="slide", crop_size=96, crop_stride=32,
                      batch_size=1)
    tensors = [batched.preprocess(image) for image in images]
    forwards = []
    handle = batched.tower.conv1.register_forward_pre_hook(lambda _, args: forwards.append(args[0].shape[0]))
    together = batched.logits(tensors)
    handle.remove()
    windows = sum(((s - 96) // 32 + 1) ** 2 for s in (160, 128, 192))  # 9 + 4 + 16
    assert forwards == [8, 8, 8, 5] and sum(forwards) == windows  # every batch but the last mixes images
    one_by_one = alone.logits(tensors)
    for a, b in zip(together, one_by_one):
        # Probabilities (log-probabilities reach -100, where 1e-5 is below fp32's resolution).
        assert a.shape == b.shape
        assert torch.allclose(a.exp(), b.exp(), atol=1e-5, rtol=0)
        assert torch.equal(a.argmax(dim=0), b.argmax(dim=0))


def test_size_buckets_batch_different_sizes_without_changing_any_image(tiny):
    from denseclip.synthetic import render_scene

    scene = render_scene(7, 0, size=128).image
    images = [scene[:100, :120].copy(), scene[:70, :128].copy(), scene[:128, :90].copy()]
    classes = [["red circle"], ["blue square"], ["background"]]
    bucketed = DenseCLIP(tiny, classes, templates="synthetic", size_bucket=128)
    forwards = []
    handle = bucketed.tower.conv1.register_forward_pre_hook(lambda _, args: forwards.append(tuple(args[0].shape)))
    together = bucketed.label_maps(images)
    handle.remove()
    assert forwards == [(3, 3, 128, 128)]  # three sizes, one bucket, one forward
    for image, (labels, confidence) in zip(images, together):
        alone_labels, alone_confidence = bucketed.label_maps([image])[0]
        assert labels.shape == image.shape[:2]
        np.testing.assert_array_equal(labels, alone_labels)
        np.testing.assert_array_equal(confidence, alone_confidence)
    # Without buckets each size pads to the stride only: three forwards.
    forwards.clear()
    plain = DenseCLIP(tiny, classes, templates="synthetic")
    handle = plain.tower.conv1.register_forward_pre_hook(lambda _, args: forwards.append(tuple(args[0].shape)))
    plain.label_maps(images)
    handle.remove()
    assert sorted(forwards) == [(1, 3, 96, 128), (1, 3, 128, 96), (1, 3, 128, 128)]


def test_low_precision_keeps_norm_layers_in_fp32_and_agrees_with_fp32(tiny, scenes):
    from denseclip.datasets import get_dataset

    half = load_clip(precision="bf16")
    visual = half.model.visual
    assert half.dtype == torch.bfloat16 and visual.conv1.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for m in half.model.modules()
               if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.LayerNorm)) for p in m.parameters())
    classes = get_dataset("synthetic").classes
    ours = DenseCLIP(half, classes, templates="synthetic").label_maps(scenes)
    reference = DenseCLIP(tiny, classes, templates="synthetic").label_maps(scenes)
    agree = np.mean(np.concatenate([(a == b).ravel() for (a, _), (b, _) in zip(ours, reference)]))
    assert agree > 0.99


def test_only_classes_that_can_win_are_upsampled_and_labels_stay_exact(tiny):
    """The CPU upsamples only the classes that can win somewhere; on random canvases (a class second everywhere
    can still win between cells) the labels equal an upsampling of every class, apart from exact ties."""
    labeler = DenseCLIP(tiny, [["a"], ["b"], ["c"], ["d"], ["e"], ["f"]], templates=["{}"], upsample_topk=None)
    generator = torch.Generator().manual_seed(0)
    pruned = 0
    for trial in range(40):
        scale = 0.5 if trial % 2 else 5.0  # flat and peaked maps
        log_probs = (scale * torch.randn(6, 5, 7, generator=generator)).log_softmax(dim=0)
        extent, size = (4.3, 6.0), (37, 51)
        labels, confidence = labeler._labels(log_probs, extent, size)
        full = labeler._upsample(log_probs, extent, size)
        top2 = full.topk(2, dim=0).values
        tie = (top2[0] - top2[1]) < 1e-5
        assert torch.equal(labels.long()[~tie], full.argmax(dim=0)[~tie])
        assert torch.equal(confidence, full.max(dim=0).values.exp().mul(255).round().to(torch.uint8))
        pruned += 6 - int(labeler._possible_winners(labeler._reach(log_probs, extent)).sum())
    assert pruned > 0  # the test saw classes dropped, not only the full path

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
    return load_clip("RN50", "random")


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
    """A labeller at the images' own size (the mechanics under test; a real CLIP's default resizes to the paper's
    scale)."""
    return DenseCLIP(clip, CLASSES, templates=["a photo of a {}."], **{"resize_to": None, **kw})


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


def _official_refine(logits: torch.Tensor, keys: torch.Tensor, ks_thresh: float, pd_thresh: float) -> torch.Tensor:
    """The reference implementation's refinement (MaskCLIP's ``refine_output``), restated here on one image:
    ``logits (C, h, w)`` = 100 x cosine, ``keys (Dk, h, w)`` -> ``(h*w, C)`` scores."""
    output = logits[None].clone()
    n, c, h, w = output.shape
    if pd_thresh > 0:  # classes never confident anywhere are removed (-100 on the cosine: -1e4 on the logits)
        weak = output.softmax(dim=1).view(n, c, -1).max(dim=-1)[0] < pd_thresh
        output[weak[:, :, None, None].expand(n, c, h, w)] = -1e4
    output = output.softmax(dim=1).view(n, c, -1).transpose(-2, -1)  # (1, hw, C) probabilities
    k = F.normalize(keys.flatten(1).t()[None], p=2)  # (1, hw, Dk): default dim=1, i.e. over positions
    weight = k @ k.transpose(-2, -1)
    selected = (output.max(dim=-1, keepdim=True)[0] < ks_thresh).expand(-1, -1, c)
    weighted = weight @ output
    output[selected] = weighted[selected]
    return output[0]


def _class_logits(predictor, canvas) -> torch.Tensor:
    """A canvas's class logits ``(C, h, w)``: the max over each class's names (the official code has one
    embedding per class)."""
    return torch.stack([canvas.logits[predictor.class_of_name == c].max(dim=0).values
                        for c in range(predictor.num_classes)])


@pytest.mark.parametrize("denoise", [False, True])
def test_key_smoothing_is_the_official_refinement(clip, images, denoise):
    image = np.kron(images[2][:40, :40], np.ones((4, 4, 1), dtype=np.uint8))  # 160x160: 5x5 cells, no padding
    x = make(clip).preprocess(image)[None]
    prompt_denoising = None
    if denoise:  # a threshold that removes all but the two classes most confident somewhere (then smoothing)
        reference = make(clip)
        peaks = _class_logits(reference, reference._canvases(x)[0]).softmax(dim=0).flatten(1).max(dim=1).values
        peaks = peaks.sort().values
        prompt_denoising = float(peaks[-3:-1].mean())
    plain = make(clip, prompt_denoising=prompt_denoising)
    canvas = plain._canvases(x)[0]
    _, keys = plain._name_logits(x)
    assert keys is None  # keys are only kept when smoothing
    top = plain._finalize(canvas).exp().flatten(1).max(dim=0).values
    middle = top.sort().values[len(top) // 2 - 1:len(top) // 2 + 1].mean()  # between two locations' values
    for threshold in (1.0, float(middle)):  # everywhere, then about half the locations
        smooth = make(clip, key_smoothing=threshold, prompt_denoising=prompt_denoising)
        canvas = smooth._canvases(x)[0]
        ours = smooth._finalize(canvas).exp().flatten(1).t()  # (hw, C) probabilities
        official = _official_refine(_class_logits(smooth, canvas), canvas.keys, threshold, prompt_denoising or 0)
        selected = top < threshold
        assert selected.any() and (threshold == 1.0) == bool(selected.all())
        # Smoothed locations: the official scores, normalised per location (the same ranking of classes) ...
        assert torch.equal(ours[selected].argmax(dim=1), official[selected].argmax(dim=1))
        expected = official[selected] / official[selected].sum(dim=1, keepdim=True)
        assert torch.allclose(ours[selected], expected, atol=1e-5)
        # ... the others keep their probabilities.
        assert torch.allclose(ours[~selected], official[~selected], atol=1e-5)
        assert not torch.allclose(ours, plain._finalize(plain._canvases(x)[0]).exp().flatten(1).t(), atol=1e-3)


def test_invalid_options(clip):
    with pytest.raises(ValueError, match="multiples of the tower's stride 32"):
        make(clip, mode="slide", crop_size=100)
    with pytest.raises(ValueError, match="mode must be"):
        make(clip, mode="tiles")


def test_class_probabilities_from_name_logits_both_ways(clip, images):
    x = make(clip).preprocess(images[1][:64, :64])[None]
    name_logits = make(clip)._name_logits(x)[0][0]  # (N names, h, w); names: cat, dog, sofa, couch, grass, sky

    def per_class(values):
        return torch.stack([values[0], values[1], values[2:4].max(dim=0).values, values[4], values[5]])

    for name_softmax, expected in [(False, per_class(name_logits).softmax(dim=0)),
                                   (True, per_class(name_logits.softmax(dim=0)))]:
        predictor = make(clip, name_softmax=name_softmax)
        probs = predictor._finalize(predictor._canvases(x)[0]).exp()
        assert torch.allclose(probs, expected, atol=1e-6)
    assert probs.sum(dim=0).max() < 1  # the successors': "sofa" and "couch" share one class's mass


def test_background_class_takes_what_no_class_reaches(clip, images):
    """The successors' background: a vocabulary class named by its own synonyms, which also takes every location
    where no class reaches the threshold (no class is prepended)."""
    vocabulary = [["sky", "wall"], ["cat", "kitten"], ["dog", "puppy"], ["sofa", "couch"]]
    plain = DenseCLIP(clip, vocabulary, templates=["a photo of a {}."], name_softmax=True)
    x = [plain.preprocess(image) for image in images]
    probs = [plain._finalize(canvas).exp() for canvas in plain._canvases(x)]  # (K, hc, wc) each
    # A threshold half-way between two neighbouring confidences of the non-background locations, near their
    # median: it turns some of them into background, and no location sits exactly on it.
    ranked = torch.cat([p.max(dim=0).values[p.argmax(dim=0) != 0] for p in probs]).sort().values
    threshold = float(ranked[len(ranked) // 2: len(ranked) // 2 + 2].mean())
    thresholded = DenseCLIP(clip, vocabulary, templates=["a photo of a {}."], background_threshold=threshold,
                            background_class=0, name_softmax=True)
    assert thresholded.class_names == plain.class_names and thresholded.num_classes == 4
    background = []
    for p, canvas in zip(probs, thresholded._canvases(x)):
        confidence, best = p.max(dim=0)
        expected = torch.where(confidence < threshold, 0, best)
        assert torch.equal(thresholded._finalize(canvas).argmax(dim=0), expected)
        background.append((expected == 0) & (best != 0))
    assert any(b.any() for b in background), "the threshold should turn some locations into background"
    with pytest.raises(ValueError, match="background_class 4 needs a background_threshold"):
        DenseCLIP(clip, vocabulary, templates=["a {}."], background_threshold=0.3, background_class=4)


def test_resnet_towers_refuse_a_vit_head(clip):
    with pytest.raises(ValueError, match="'sclip' needs a ViT tower"):
        make(clip, head="sclip")


@pytest.fixture(scope="module")
def tiny_vit():
    from denseclip.models import TINY_VIT_MODEL

    torch.manual_seed(0)
    return load_clip(TINY_VIT_MODEL, "random")


@pytest.mark.parametrize("head", ["maskclip", "sclip", "clearclip", "naclip"])
def test_every_head_labels_windows_of_several_images_in_one_forward(tiny_vit, images, head):
    predictor = make(tiny_vit, head=head, mode="slide", crop_size=64, crop_stride=32, batch_size=5)
    calls = []
    predictor._name_logits = lambda batch, forward=predictor._name_logits: calls.append(len(batch)) or forward(batch)
    together = predictor.label_images(images)
    assert max(calls) == 5  # windows of different images share a forward
    for image, (labels, conf) in zip(images, together):
        alone_labels, alone_conf = predictor.label_images([image])[0]
        np.testing.assert_array_equal(labels, alone_labels)
        np.testing.assert_allclose(conf, alone_conf, atol=1e-5)
    x = predictor.preprocess(images[1][:64, :64])[None]
    if head != "maskclip":
        assert not torch.allclose(predictor.logits(x), make(tiny_vit, head="maskclip").logits(x))


# ------------------------------------------------------------------ the fast path against the straightforward one
@pytest.fixture(scope="module")
def tiny():
    return load_clip("denseclip-tiny-shapes")  # the shipped tiny CLIP: trained weights and BatchNorm statistics, structured label maps


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
    # label_images keeps the exact probability; label_maps rounds it to the store's 1/255 steps.
    np.testing.assert_array_equal(confidence, np.round(confidence_f * 255).astype(np.uint8))


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

    half = load_clip("denseclip-tiny-shapes", precision="bf16")
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
        scores = scale * torch.randn(6, 5, 7, generator=generator)
        scores[trial % 6] -= 4 * scale  # one class far behind the others (the others compete everywhere)
        log_probs = scores.log_softmax(dim=0)
        extent, size = (4.3, 6.0), (37, 51)
        labels, confidence = labeler._labels(log_probs, extent, size)
        full = labeler.upsample(log_probs, extent, size)
        top2 = full.topk(2, dim=0).values
        tie = (top2[0] - top2[1]) < 1e-5
        assert torch.equal(labels.long()[~tie], full.argmax(dim=0)[~tie])
        assert torch.equal(confidence, full.max(dim=0).values)
        pruned += 6 - int(labeler._possible_winners(labeler._reach(log_probs, extent)).sum())
    assert pruned > 0  # the test saw classes dropped, not only the full path

"""The front door: README.md's Python example runs as written, the Python API takes class lists as people write
them, and the README stays a guide (at most 250 lines, every link to docs/ resolves)."""

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import denseclip

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def tiny_clip():
    return denseclip.load_clip("denseclip-tiny-shapes")


def test_the_readme_python_example_runs_as_written(monkeypatch):
    [example] = re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)
    monkeypatch.chdir(ROOT)  # the example's image path is relative to the checkout
    scope: dict = {}
    exec(compile(example, "README.md", "exec"), scope)  # noqa: S102 - the README's own code
    labels, confidence = scope["labels"], scope["confidence"]
    image = np.asarray(Image.open(ROOT / "docs" / "images" / "scene.jpg"))
    assert labels.shape == confidence.shape == image.shape[:2]
    assert set(np.unique(labels)) <= set(range(len(scope["labeler"].class_names)))
    assert 0 <= confidence.min() and confidence.max() <= 1


def test_bare_names_are_classes_of_one_name_and_lists_are_synonyms(tiny_clip):
    assert denseclip.DenseCLIP(tiny_clip, ["cat", "dog"]).num_classes == 2
    labeler = denseclip.DenseCLIP(tiny_clip, [["person", "man"], ["dog"]])
    assert labeler.classes == [["person", "man"], ["dog"]] and labeler.num_classes == 2
    assert denseclip.DenseCLIP(tiny_clip, ["red circle", ["blue square", "blue box"]]).classes == [
        ["red circle"], ["blue square", "blue box"]]


def test_label_images_takes_arrays_pil_images_and_paths_alike(tiny_clip, tmp_path):
    labeler = denseclip.DenseCLIP(tiny_clip, ["red circle", "green circle", "background"])
    path = ROOT / "docs" / "images" / "scene.jpg"
    pil = Image.open(path)
    cmyk = tmp_path / "scene-cmyk.jpg"
    pil.convert("CMYK").save(cmyk)
    from_path, from_pil, from_array = labeler.label_images([str(path), pil, np.asarray(pil.convert("RGB"))])
    for labels, confidence in (from_pil, from_array):
        np.testing.assert_array_equal(labels, from_path[0])
        np.testing.assert_array_equal(confidence, from_path[1])
    assert labeler.label_images([cmyk])[0][0].shape == from_path[0].shape  # converted as a decoded file would be
    with pytest.raises(denseclip.images.ImageDecodeError, match="not-an-image"):
        (tmp_path / "not-an-image.jpg").write_bytes(b"no pixels here")
        labeler.label_images([tmp_path / "not-an-image.jpg"])


def test_the_python_defaults_are_the_command_lines(tiny_clip):
    from denseclip.config import LabelerConfig
    from denseclip.names import DEFAULT_RESIZE

    labeler = denseclip.DenseCLIP(tiny_clip, ["red circle"])
    configured = denseclip.DenseCLIP.from_config(LabelerConfig(model="denseclip-tiny-shapes"), ["red circle"],
                                                 clip=tiny_clip)
    for name in ("resize_to", "templates", "mode", "upsample_topk", "pad_multiple", "temperature"):
        assert getattr(labeler, name) == getattr(configured, name), name
    real = denseclip.load_clip("RN50", "random")
    assert denseclip.DenseCLIP(real, ["cat"]).resize_to == DEFAULT_RESIZE
    assert len(denseclip.DenseCLIP(real, ["cat"]).templates) == 85


def test_the_readme_is_a_guide_whose_links_resolve():
    lines = README.splitlines()
    assert len(lines) <= 250
    for link in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README):
        assert (ROOT / link).exists(), link
    history = re.compile(r"[Ii]ssue #?\d+|commit [0-9a-f]{7}|\([0-9a-f]{7,12}\)|earlier run")
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        assert not history.findall(doc.read_text(encoding="utf-8")), doc.name

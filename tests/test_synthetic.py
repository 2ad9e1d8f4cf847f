"""The synthetic world: determinism, label maps that match the pixels, captions that match the objects, shards."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pipeline_scripts import load_pipeline

from denseclip import synthetic_coco_stuff
from denseclip.datasets import get_dataset, train_id_lut
from denseclip.shards import expand_shards, read_shard
from denseclip.synthetic import (
    BACKGROUND_NAMES,
    CAPTION_FRAMES,
    CLASS_NAMES,
    COLOURS,
    SHAPES,
    render_dataset,
    render_scene,
    write_shards,
)

ROOT = Path(__file__).resolve().parents[1]
SCENES = list(render_dataset(seed=11, n=60, size=64))


def test_vocabulary_is_background_then_colour_major_shapes():
    assert len(CLASS_NAMES) == 1 + len(COLOURS) * len(SHAPES) == 17
    assert CLASS_NAMES[0] == "background"
    assert CLASS_NAMES[1] == "red circle" and CLASS_NAMES[4] == "red star" and CLASS_NAMES[16] == "yellow star"


def test_same_seed_same_bytes_and_different_seeds_differ():
    for index in (0, 5, 17):
        a, b = render_scene(3, index, 64), render_scene(3, index, 64)
        assert a.image.tobytes() == b.image.tobytes()
        assert a.labels.tobytes() == b.labels.tobytes()
        assert a.caption == b.caption and a.objects == b.objects
    other = [render_scene(4, i, 64) for i in range(5)]
    assert all(o.image.tobytes() != render_scene(3, i, 64).image.tobytes() for i, o in enumerate(other))


def test_object_pixels_have_the_object_colour():
    prototypes = np.array(list(COLOURS.values()), dtype=float)
    for scene in SCENES:
        assert scene.image.shape == (64, 64, 3) and scene.image.dtype == np.uint8
        assert scene.labels.shape == (64, 64) and scene.labels.dtype == np.uint8
        for obj in scene.objects:
            pixels = scene.image[scene.labels == obj["label"]].astype(float)
            nearest = np.linalg.norm(pixels[:, None] - prototypes[None], axis=2).argmin(axis=1)
            assert np.mean(nearest == list(COLOURS).index(obj["colour"])) > 0.95
        background = scene.image[scene.labels == 0].astype(float)
        saturation = background.max(axis=1) - background.min(axis=1)
        assert np.median(saturation) < 60, "background pixels should look grey, not like an object colour"


def test_label_map_matches_objects_and_captions_name_exactly_them():
    for scene in SCENES:
        present = set(np.unique(scene.labels).tolist()) - {0}
        assert present == {obj["label"] for obj in scene.objects}
        for obj in scene.objects:
            assert CLASS_NAMES[obj["label"]] == f"{obj['colour']} {obj['shape']}" == obj["class"]
            assert obj["pixels"] == int((scene.labels == obj["label"]).sum()) > 0
        named = {name for name in CLASS_NAMES[1:] if f"a {name}" in scene.caption}
        assert named == {obj["class"] for obj in scene.objects}, scene.caption


def test_empty_scenes_exist_and_are_captioned_as_background():
    empty = [s for s in SCENES if not s.objects]
    assert empty, "about 10% of scenes should be empty"
    for scene in empty:
        assert not scene.labels.any()
        assert any(f"a {name}" in scene.caption for name in BACKGROUND_NAMES)


def test_scenes_hold_up_to_three_objects_with_occlusion():
    counts = {len(s.objects) for s in SCENES}
    assert counts == {0, 1, 2, 3}
    occluded = [obj for s in SCENES for obj in s.objects if obj["pixels"] < 0.99 * _unoccluded_area(obj, 64)]
    assert occluded, "some objects should be partly hidden by later ones"


def _unoccluded_area(obj: dict, size: int) -> int:
    from denseclip.synthetic import _shape_mask

    return int(_shape_mask(obj["shape"], size, *obj["center"], obj["radius"], obj["angle"]).sum())


def test_prompt_files_match_the_world():
    lines = (ROOT / "denseclip/data/classnames/cls_synthetic.txt").read_text().splitlines()
    assert lines[0].split(", ") == list(BACKGROUND_NAMES)
    assert lines[1:] == list(CLASS_NAMES[1:])
    templates = (ROOT / "denseclip/data/templates/synthetic.txt").read_text().splitlines()
    assert templates
    for template in templates:
        # A prompt for one class reads exactly like a caption of a scene holding only that object.
        assert template.replace("a {}", "{}") in CAPTION_FRAMES


def test_shards_round_trip(tmp_path):
    urls = write_shards(seed=5, n=5, out=str(tmp_path / "world"), shard_size=2, size=64)
    assert len(urls) == 3 and expand_shards(str(tmp_path / "world")) == sorted(urls)
    samples = [sample for url in urls for sample in read_shard(url)]
    assert [s["__key__"] for s in samples] == [f"synthetic/s5/{i:06d}" for i in range(5)]
    for index, sample in enumerate(samples):
        scene = render_scene(5, index, 64)
        image = np.asarray(Image.open(io.BytesIO(sample["jpg"])))
        assert image.shape == (64, 64, 3)
        assert np.abs(image.astype(int) - scene.image).mean() < 8  # JPEG smooths the pixel noise
        seg = Image.open(io.BytesIO(sample["seg.png"]))
        assert seg.mode == "L" and np.array_equal(np.asarray(seg), scene.labels)
        assert sample["txt"].decode() == scene.caption
        meta = json.loads(sample["json"])
        assert meta["seed"] == 5 and meta["index"] == index and meta["objects"] == scene.objects
    again = write_shards(seed=5, n=5, out=str(tmp_path / "again"), shard_size=2, size=64)
    assert [Path(u).read_bytes() for u in again] == [Path(u).read_bytes() for u in urls]


def test_render_world_cli(tmp_path):
    render_world = load_pipeline("render_world")
    assert render_world.main(["--seed", "2", "--num-images", "3", "--output", str(tmp_path), "--size", "48"]) == 0
    urls = expand_shards(str(tmp_path))
    assert len(urls) == 1 and len(list(read_shard(urls[0]))) == 3
    with pytest.raises(SystemExit):
        render_world.main(["--seed", "2", "--num-images", "0", "--output", str(tmp_path)])


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="size"):
        render_scene(0, 0, size=16)
    with pytest.raises(ValueError, match="n=0"):
        write_shards(0, 0, "unused")


# ------------------------------------------------------------------------------------- the COCO-Stuff world
COCO_SCENES = [synthetic_coco_stuff.render_scene(5, i, "val") for i in range(16)]


def test_coco_stuff_world_draws_real_classes_with_the_official_unseen_split():
    info = get_dataset("coco_stuff")
    names = set(synthetic_coco_stuff.CLASSES)
    assert len(names) >= 30 and names <= set(info.class_names)
    assert set(info.unseen) <= names and len(info.unseen) == 15
    signatures = list(synthetic_coco_stuff.CLASSES.values())
    assert len(set(signatures)) == len(signatures), "every class needs its own look"
    # Raw ids: the class's position in the 182-id space, i.e. the inverse of the converter's lookup table.
    lut = train_id_lut("coco_stuff")
    for name, raw in synthetic_coco_stuff.raw_ids().items():
        assert raw not in info.raw_unused_ids and info.class_names[lut[raw]] == name


def test_coco_stuff_scenes_are_640x480_in_raw_ids_and_captioned_with_the_visible_classes():
    ids = synthetic_coco_stuff.raw_ids()
    unused = set(get_dataset("coco_stuff").raw_unused_ids)
    drawn = set()
    for scene in COCO_SCENES:
        assert scene.image.shape == (480, 640, 3) and scene.labels.shape == (480, 640)
        present = set(np.unique(scene.labels).tolist())
        drawn |= present
        assert not present & unused
        assert present - {255} == {obj["raw_id"] for obj in scene.objects}
        for obj in scene.objects:
            assert ids[obj["class"]] == obj["raw_id"]
            assert obj["pixels"] == int((scene.labels == obj["raw_id"]).sum()) > 0
            assert obj["class"] in scene.caption
        listed = {name for name in ids if re.search(rf"(^|[ ,]){name}([ ,.]|$)", scene.caption)}
        assert listed == {obj["class"] for obj in scene.objects}, scene.caption
    assert 255 in drawn, "some scenes hold an unlabelled region"
    assert len(drawn - {255}) >= 20


def test_coco_stuff_world_is_a_function_of_seed_split_and_index():
    again = synthetic_coco_stuff.render_scene(5, 3, "val")
    assert again.image.tobytes() == COCO_SCENES[3].image.tobytes() and again.caption == COCO_SCENES[3].caption
    train = synthetic_coco_stuff.render_scene(5, 3, "train")
    assert train.labels.tobytes() != COCO_SCENES[3].labels.tobytes()
    with pytest.raises(ValueError, match="split"):
        synthetic_coco_stuff.render_scene(5, 3, "test")


def test_coco_stuff_pixels_follow_the_class_signature():
    for scene in COCO_SCENES:
        for obj in scene.objects:
            sig = synthetic_coco_stuff.CLASSES[obj["class"]]
            pixels = scene.image[scene.labels == obj["raw_id"]].astype(float)
            # Each pixel lies near the segment between the class's two colours (texture mixes them).
            first, second = np.asarray(sig.colour, float), np.asarray(sig.second, float)
            t = np.clip((pixels - first) @ (second - first) / max(1.0, (second - first) @ (second - first)), 0, 1)
            distance = np.linalg.norm(pixels - (first + t[:, None] * (second - first)), axis=1)
            assert np.median(distance) < 30, obj["class"]


def test_render_world_writes_the_coco_stuff_layout_that_the_real_converter_reads(tmp_path):
    render_world = load_pipeline("render_world")
    prepare = load_pipeline("prepare")
    root = tmp_path / "coco"
    for split, n in (("train", 3), ("val", 2)):
        render_world.main(["--layout", "coco_stuff", "--split", split, "--seed", "5", "--num-images", str(n),
                           "--output", str(root)])
    assert sorted(p.name for p in (root / "images" / "val2017").iterdir()) == ["000000000000.jpg",
                                                                              "000000000001.jpg"]
    assert len(list((root / "annotations" / "train2017").glob("*.png"))) == 3
    assert prepare.main(["--dataset", "coco_stuff", "--input", str(root), "--split", "val", "--output",
                         str(tmp_path / "shards"), "--no-progress"]) == 0
    samples = [s for url in expand_shards(str(tmp_path / "shards")) for s in read_shard(url)]
    info, lut = get_dataset("coco_stuff"), train_id_lut("coco_stuff")
    for index, sample in enumerate(samples):
        scene = synthetic_coco_stuff.render_scene(5, index, "val")
        assert Image.open(io.BytesIO(sample["jpg"])).size == (640, 480)
        train_ids = np.asarray(Image.open(io.BytesIO(sample["seg.png"])))
        assert np.array_equal(train_ids, lut[scene.labels])
        assert {info.class_names[i] for i in np.unique(train_ids) if i != 255} == {o["class"] for o in scene.objects}


def test_render_world_layouts_refuse_the_other_layouts_flags(tmp_path):
    render_world = load_pipeline("render_world")
    for argv in (["--layout", "coco_stuff", "--seed", "1", "--num-images", "1"],  # no --split
                 ["--layout", "coco_stuff", "--split", "val", "--size", "64", "--seed", "1", "--num-images", "1"],
                 ["--split", "val", "--seed", "1", "--num-images", "1"]):
        with pytest.raises(SystemExit):
            render_world.main([*argv, "--output", str(tmp_path)])
    assert not any(tmp_path.iterdir())

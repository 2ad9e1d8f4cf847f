"""Exports from the mask store: palette PNG folders and COCO RLE JSON that decode back to the masks."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pipeline_scripts import load_pipeline
from pycocotools import mask as coco_mask

from denseclip.export import coco_dataset, export_coco, file_stem
from denseclip.mask_store import MaskStore, MaskStoreWriter

REPO = Path(__file__).resolve().parents[1]
export_pipeline = load_pipeline("export")
VOCABULARY = [["background"], ["cat"], ["dog", "puppy"], ["sofa"]]


@pytest.fixture
def store(tmp_path) -> tuple[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    masks = {}
    for i, key in enumerate(["val/0001", "val/0002", "../../escape", "deep/a/b"]):
        mask = rng.integers(0, 4, (6 + i, 9), dtype=np.uint8)
        mask[0, :3] = 255
        masks[key] = mask
    root = str(tmp_path / "store")
    writer = MaskStoreWriter(root, {"model": "RN50", "vocabulary": VOCABULARY})
    writer.write_part("0", [{"key": k, "shard": "s", "mask": m} for k, m in masks.items()])
    return root, masks


def test_png_export_writes_palette_label_maps_inside_the_folder(tmp_path, store):
    root, masks = store
    out = tmp_path / "nested" / "png"
    assert export_pipeline.main(["--store", root, "--format", "png", "--out", str(out)]) == 0
    files = {row["key"]: row["file"] for row in map(json.loads, (out / "files.jsonl").read_text().splitlines())}
    assert files == {"deep/a/b": "deep/a/b.png", "val/0001": "val/0001.png", "val/0002": "val/0002.png",
                     "../../escape": f"escape.{file_stem('../../escape')[-8:]}.png"}
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.png")) == sorted(files.values())
    assert not list((tmp_path / "nested").glob("*.png")) and not list(tmp_path.glob("*.png"))
    image = Image.open(out / "val" / "0002.png")
    assert image.mode == "P"
    np.testing.assert_array_equal(np.array(image), masks["val/0002"])
    rgb = np.array(image.convert("RGB"))
    assert rgb[0, 0].tolist() == [224, 224, 192]  # VOC's void colour for 255
    classes = json.loads((out / "classes.json").read_text())
    assert [c["name"] for c in classes] == ["background", "cat", "dog", "sofa"]
    assert classes[1]["color"] == [128, 0, 0]


def test_coco_export_decodes_back_to_the_masks(tmp_path, store):
    root, masks = store
    out = tmp_path / "coco"
    assert export_pipeline.main(["--store", root, "--format", "coco", "--out", str(out)]) == 0
    coco = json.loads((out / "annotations" / "0.json").read_text())
    assert coco["categories"] == json.loads((out / "categories.json").read_text())
    assert [c["name"] for c in coco["categories"]] == ["background", "cat", "dog", "sofa"]
    assert [c["id"] for c in coco["categories"]] == [1, 2, 3, 4]
    by_file = {image["file_name"]: image for image in coco["images"]}
    assert set(by_file) == {"val/0001.jpg", "val/0002.jpg", file_stem("../../escape") + ".jpg", "deep/a/b.jpg"}
    assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])
    assert coco == coco_dataset(MaskStore(root), ["background", "cat", "dog", "sofa"])  # streamed = in memory
    for key, mask in masks.items():
        image = by_file[file_stem(key) + ".jpg"]
        assert (image["height"], image["width"]) == mask.shape
        rebuilt = np.full(mask.shape, 255, np.uint8)
        for ann in (a for a in coco["annotations"] if a["image_id"] == image["id"]):
            binary = coco_mask.decode(ann["segmentation"])
            assert ann["area"] == binary.sum() and ann["iscrowd"] == 0
            assert (rebuilt[binary == 1] == 255).all()  # classes do not overlap
            rebuilt[binary == 1] = ann["category_id"] - 1
        np.testing.assert_array_equal(rebuilt, mask)


def test_coco_export_can_skip_background_and_name_classes_from_a_dataset(tmp_path, store):
    root, masks = store
    assert export_pipeline.main(["--store", root, "--format", "coco", "--out", str(tmp_path), "--dataset", "voc",
                                 "--skip-background"]) == 0
    coco = json.loads((tmp_path / "annotations" / "0.json").read_text())
    assert coco["categories"][0] == {"id": 2, "name": "airplane", "supercategory": ""}
    assert {a["category_id"] for a in coco["annotations"]} == {2, 3, 4}
    background = sum(int((m == 0).sum()) for m in masks.values())
    labelled = sum(int(((m != 255) & (m != 0)).sum()) for m in masks.values())
    assert background > 0 and sum(a["area"] for a in coco["annotations"]) == labelled


def test_coco_export_is_sharded_like_the_store_one_file_and_one_json_lines_file_per_part(tmp_path):
    rng = np.random.default_rng(2)
    parts = {f"shard-{p}": {f"s{p}/{i}": rng.integers(0, 3, (4, 5), dtype=np.uint8) for i in range(3)}
             for p in range(3)}
    root = str(tmp_path / "store")
    writer = MaskStoreWriter(root, {"model": "RN50", "vocabulary": VOCABULARY})
    for part, masks in parts.items():
        writer.write_part(part, [{"key": k, "mask": m} for k, m in masks.items()])
    out = tmp_path / "coco"
    urls = export_coco(MaskStore(root), str(out), ["background", "cat", "dog", "sofa"])
    assert sorted(Path(u).name for u in urls) == ["shard-0.json", "shard-1.json", "shard-2.json"]
    assert sorted(p.name for p in (out / "annotations").iterdir()) == sorted(
        f"{part}.{ext}" for part in parts for ext in ("json", "jsonl"))
    for part, masks in parts.items():
        coco = json.loads((out / "annotations" / f"{part}.json").read_text())
        assert coco == coco_dataset(MaskStore(root), ["background", "cat", "dog", "sofa"], parts=[part])
        assert sorted(image["file_name"] for image in coco["images"]) == sorted(f"{k}.jpg" for k in masks)
        lines = [json.loads(line) for line in (out / "annotations" / f"{part}.jsonl").read_text().splitlines()]
        assert [line["key"] for line in lines] == sorted(masks)
        for line in lines:  # each line: the image entry and its annotations, decoding back to the mask
            image = {k: line[k] for k in ("id", "file_name", "height", "width")}
            assert image in coco["images"]
            assert line["annotations"] == [a for a in coco["annotations"] if a["image_id"] == line["id"]]
            rebuilt = np.zeros((4, 5), np.uint8)
            for ann in line["annotations"]:
                rebuilt[coco_mask.decode(ann["segmentation"]) == 1] = ann["category_id"] - 1
            np.testing.assert_array_equal(rebuilt, masks[line["key"]])


def test_labels_outside_the_vocabulary_are_reported(store):
    root, _ = store
    with pytest.raises(ValueError, match=r"mask '\.\./\.\./escape': .*label 3 but only 2 classes"):
        coco_dataset(MaskStore(root), ["background", "cat"])


def test_empty_store_is_a_clear_error(tmp_path, capsys):
    assert export_pipeline.main(["--store", str(tmp_path), "--format", "png", "--out", str(tmp_path / "o")]) == 2
    assert "no committed mask parts" in capsys.readouterr().err


def test_keys_that_sanitise_alike_get_distinct_files_and_the_mapping_says_which(tmp_path):
    keys = ["a.b", "a_b", "a b", "x/../a_b", "a_b.5c6f0e81"]  # the last mimics a hashed name: still distinct
    rng = np.random.default_rng(1)
    masks = {k: rng.integers(0, 4, (5, 7), dtype=np.uint8) for k in keys}
    root = str(tmp_path / "store")
    MaskStoreWriter(root, {"model": "RN50", "vocabulary": VOCABULARY}).write_part(
        "0", [{"key": k, "mask": m} for k, m in masks.items()])
    out = tmp_path / "png"
    assert export_pipeline.main(["--store", root, "--format", "png", "--out", str(out)]) == 0
    files = {row["key"]: row["file"] for row in map(json.loads, (out / "files.jsonl").read_text().splitlines())}
    assert set(files) == set(keys) and len(set(files.values())) == len(keys) and files["a_b"] == "a_b.png"
    assert len(list(out.rglob("*.png"))) == len(keys)
    for key, name in files.items():
        np.testing.assert_array_equal(np.array(Image.open(out / name)), masks[key])
    [url] = export_coco(MaskStore(root), str(tmp_path / "coco"), ["a", "b", "c", "d"])
    coco = json.loads(Path(url).read_text())
    assert len({image["file_name"] for image in coco["images"]}) == len(keys)


def test_16_bit_maps_export_as_16_bit_pngs_and_coco_classes_past_255(tmp_path):
    names = [f"class {i}" for i in range(1203)]
    mask = np.array([[0, 300, 1202], [65535, 300, 7]], dtype=np.int32)
    root = str(tmp_path / "store")
    MaskStoreWriter(root, {"model": "RN50", "vocabulary": [[n] for n in names]}).write_part(
        "0", [{"key": "lvis/1", "mask": mask}])
    out = tmp_path / "png"
    assert export_pipeline.main(["--store", root, "--format", "png", "--out", str(out)]) == 0
    image = Image.open(out / "lvis" / "1.png")
    assert image.mode.startswith("I") and np.array_equal(np.array(image), mask)
    assert len(json.loads((out / "classes.json").read_text())) == 1203
    coco = coco_dataset(MaskStore(root), names)
    assert sorted(a["category_id"] for a in coco["annotations"]) == [1, 8, 301, 1203]  # 65535: unlabelled

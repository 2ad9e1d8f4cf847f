"""Exports from the mask store: palette PNG folders and COCO RLE JSON that decode back to the masks."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pipeline_scripts import load_pipeline
from pycocotools import mask as coco_mask

from denseclip.export import coco_dataset
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
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))
    assert written == ["deep/a/b.png", "escape.png", "val/0001.png", "val/0002.png"]
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
    coco = json.loads((out / "annotations.json").read_text())
    assert [c["name"] for c in coco["categories"]] == ["background", "cat", "dog", "sofa"]
    assert [c["id"] for c in coco["categories"]] == [1, 2, 3, 4]
    by_file = {image["file_name"]: image for image in coco["images"]}
    assert set(by_file) == {"val/0001.jpg", "val/0002.jpg", "escape.jpg", "deep/a/b.jpg"}
    assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])
    for key, mask in masks.items():
        image = by_file[key.replace("../../", "") + ".jpg"]
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
    coco = json.loads((tmp_path / "annotations.json").read_text())
    assert coco["categories"][0] == {"id": 2, "name": "airplane", "supercategory": ""}
    assert {a["category_id"] for a in coco["annotations"]} == {2, 3, 4}
    background = sum(int((m == 0).sum()) for m in masks.values())
    labelled = sum(int(((m != 255) & (m != 0)).sum()) for m in masks.values())
    assert background > 0 and sum(a["area"] for a in coco["annotations"]) == labelled


def test_labels_outside_the_vocabulary_are_reported(store):
    root, _ = store
    with pytest.raises(ValueError, match=r"mask '\.\./\.\./escape': .*label 3 but only 2 classes"):
        coco_dataset(MaskStore(root), ["background", "cat"])


def test_empty_store_is_a_clear_error(tmp_path, capsys):
    assert export_pipeline.main(["--store", str(tmp_path), "--format", "png", "--out", str(tmp_path / "o")]) == 2
    assert "no committed mask parts" in capsys.readouterr().err

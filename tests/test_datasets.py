"""The dataset registry against published facts: class counts, VOC ids and colours, COCO category ids."""

import numpy as np
import pytest

from denseclip.datasets import DATASET_NAMES, DatasetError, DatasetInfo, get_dataset, train_id_lut

# The paper's zero-shot splits, as printed (Zhou et al. 2022, Sec. 4).
PAPER_UNSEEN = {
    "voc": ["potted plant", "sheep", "sofa", "train", "tv monitor"],
    "context": ["cow", "motorbike", "sofa", "cat", "boat", "fence", "bird", "tv monitor", "keyboard", "aeroplane"],
    "coco_stuff": ["frisbee", "skateboard", "cardboard", "carrot", "scissors", "suitcase", "giraffe", "cow",
                   "road", "wall concrete", "tree", "grass", "river", "clouds", "playingfield"],
    "synthetic": ["red star", "green triangle", "blue circle", "yellow square"],
}
PAPER_UNSEEN.update(voc20=PAPER_UNSEEN["voc"], context59=PAPER_UNSEEN["context"])
# Official COCO category ids (1-based, with the 11 unused thing ids) of some things and stuff.
COCO_CATEGORY_IDS = {"person": 1, "stop sign": 13, "giraffe": 25, "suitcase": 33, "frisbee": 34,
                     "toothbrush": 90, "banner": 92, "playingfield": 145, "wall-concrete": 172, "wood": 182}
COCO_UNUSED_IDS = [12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91]


def test_registry_lists_the_datasets_with_their_class_counts():
    counts = {name: get_dataset(name).num_classes for name in DATASET_NAMES}
    assert counts == {"voc": 21, "voc20": 20, "context": 60, "context59": 59, "coco_stuff": 171, "synthetic": 17}
    for name in DATASET_NAMES:
        info = get_dataset(name)
        assert len(info.classes) == len(info.synonyms) == info.num_classes
        assert info.palette.shape == (info.num_classes, 3) and info.palette.dtype == np.uint8
        assert info.ignore_index == 255
        if info.background_index is not None:
            assert info.class_names[info.background_index] == "background"


@pytest.mark.parametrize("name", sorted(PAPER_UNSEEN))
def test_every_unseen_name_of_the_paper_resolves(name):
    info = get_dataset(name)
    ids = [info.class_index(n) for n in PAPER_UNSEEN[name]]
    assert len(set(ids)) == len(ids) == len(info.unseen)
    assert info.unseen_ids == ids
    assert sorted(info.seen_ids + info.unseen_ids) == list(range(info.num_classes))
    for raw in PAPER_UNSEEN[name]:
        assert info.class_index(raw.upper().replace(" ", "")) == info.class_index(raw)
        assert info.class_index(raw.replace(" ", "_")) == info.class_index(raw)


def test_voc_ids_colours_and_split_match_the_benchmark():
    voc = get_dataset("voc")
    # VOC ids: 1 aeroplane, 15 person, 16 pottedplant ... 20 tvmonitor; the unseen split is the last five.
    assert voc.class_index("aeroplane") == voc.class_index("airplane") == 1
    assert voc.class_index("person") == 15
    assert voc.class_index("pottedplant") == voc.class_index("Potted Plant") == 16
    assert voc.class_index("tvmonitor") == voc.class_index("tv monitor") == 20
    assert voc.unseen_ids == [16, 17, 18, 19, 20]
    assert voc.ignore_background_in_zero_shot and voc.background_index == 0
    assert voc.palette[1].tolist() == [128, 0, 0] and voc.palette[15].tolist() == [192, 128, 128]


@pytest.mark.parametrize("name, full", [("voc20", "voc"), ("context59", "context")])
def test_annotation_free_presets_drop_background_as_reduce_zero_label(name, full):
    reduced, aware = get_dataset(name), get_dataset(full)
    assert reduced.class_names == aware.class_names[1:] and reduced.background_index is None
    assert "background" not in [n for names in reduced.classes for n in names]  # never prompted
    assert reduced.unseen == aware.unseen
    assert reduced.palette.tolist() == aware.palette[1:].tolist()  # each class keeps its colour
    # MMSegmentation's reduce_zero_label on the background-aware ids: 0 -> 255, k -> k - 1, 255 stays.
    raw = np.array([[0, 1, 2], [aware.num_classes - 1, 255, 0]], dtype=np.uint8)
    assert reduced.label_lut[raw].tolist() == [[255, 0, 1], [aware.num_classes - 2, 255, 255]]
    assert aware.label_lut is None and reduced.reduced_from == full


def test_context_keeps_background_and_coco_stuff_has_none():
    context, coco = get_dataset("context"), get_dataset("coco_stuff")
    assert not context.ignore_background_in_zero_shot and context.background_index == 0
    assert "background" not in context.unseen and len(context.unseen) == 10
    assert coco.background_index is None


def test_coco_stuff_train_ids_follow_the_official_category_ids():
    coco, lut = get_dataset("coco_stuff"), train_id_lut("coco_stuff")
    for name, category_id in COCO_CATEGORY_IDS.items():
        assert lut[category_id - 1] == coco.class_index(name), name


def test_coco_stuff_lut_drops_the_unused_ids_and_keeps_order():
    lut = train_id_lut("coco_stuff")
    unused_raw = {i - 1 for i in COCO_UNUSED_IDS}
    assert all(lut[raw] == 255 for raw in unused_raw)
    used = [lut[raw] for raw in range(182) if raw not in unused_raw]
    assert used == list(range(171))
    assert lut[10] == 10 and lut[12] == 11 and lut[181] == 170
    assert (lut[182:] == 255).all()


def test_voc_and_context_luts_are_identity_with_the_rest_ignored():
    for name, k in (("voc", 21), ("context", 60)):
        lut = train_id_lut(name)
        assert lut[:k].tolist() == list(range(k))
        assert (lut[k:] == 255).all()


def test_synonym_vocabulary_keeps_ids_and_names():
    plain, rich = get_dataset("voc"), get_dataset("voc", synonyms=True)
    assert rich.class_names == plain.class_names
    assert plain.classes[0] == ["background"] and len(rich.classes[0]) > 5  # stuff words stand for background
    assert "person in shirt" in rich.classes[15]
    assert rich.class_index("ship") == plain.class_index("boat")


def test_synthetic_matches_the_renderer_vocabulary():
    info = get_dataset("synthetic")
    assert info.class_names[1:5] == ["red circle", "red square", "red triangle", "red star"]
    assert info.class_names[16] == "yellow star"
    assert info.unseen_ids == [4, 7, 9, 14]


def test_bad_names_are_reported():
    with pytest.raises(DatasetError, match="unknown dataset 'ade'"):
        get_dataset("ade")
    with pytest.raises(DatasetError, match="no class named 'unicorn'"):
        get_dataset("voc").class_index("unicorn")
    twins = DatasetInfo("twins", [["a"], ["b"]], ["a", "b"], [["a", "x"], ["b", "x"]],
                        np.zeros((2, 3), np.uint8), [], False, None)
    with pytest.raises(DatasetError, match="ambiguous"):
        twins.class_index("x")

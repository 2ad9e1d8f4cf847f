"""Metrics against hand-computed confusion matrices and an independent mmsegmentation-style computation."""

import math
import pickle

import numpy as np
import pytest

from denseclip.metrics import ConfusionMatrix, EvaluationInputError, accumulate, hiou, summarize

NAMES = ["background", "cat", "dog", "sofa", "cow"]

# Image A: one ignore pixel (predicted 0, must not count); sofa predicted but never present; cow absent from both.
GT_A = np.array([[0, 0, 1, 1], [0, 2, 2, 255]], dtype=np.uint8)
PRED_A = np.array([[0, 1, 1, 1], [0, 2, 3, 0]], dtype=np.uint8)
# Image B: a prediction outside [0, K) (255 = "unsure") on a dog pixel.
GT_B = np.array([[2, 2], [1, 0]], dtype=np.uint8)
PRED_B = np.array([[2, 255], [1, 0]], dtype=np.uint8)

# Counted by hand over A + B (ignore pixel dropped):
#   background: TP 3, GT 4, predicted 3 -> IoU 3/4, Acc 3/4
#   cat:        TP 3, GT 3, predicted 4 -> IoU 3/4, Acc 1
#   dog:        TP 2, GT 4, predicted 2 -> IoU 2/4, Acc 2/4 (the 255 prediction is a miss)
#   sofa:       TP 0, GT 0, predicted 1 -> IoU 0,   Acc NaN
#   cow:        nothing                 -> IoU NaN, Acc NaN
IOU = {"background": 75.0, "cat": 75.0, "dog": 50.0, "sofa": 0.0, "cow": None}
ACC = {"background": 75.0, "cat": 100.0, "dog": 50.0, "sofa": None, "cow": None}


def both_images() -> ConfusionMatrix:
    return accumulate([("a", PRED_A, GT_A), ("b", PRED_B, GT_B)], num_classes=5)


def test_matrix_counts_match_hand_count():
    conf = both_images()
    expected = np.zeros((5, 6), dtype=np.int64)
    for g, p in [(0, 0), (0, 1), (1, 1), (1, 1), (0, 0), (2, 2), (2, 3),  # image A
                 (2, 2), (2, 5), (1, 1), (0, 0)]:  # image B; column 5 = out-of-range prediction
        expected[g, p] += 1
    np.testing.assert_array_equal(conf.matrix, expected)
    assert conf.matrix.dtype == np.int64 and conf.num_images == 2


def test_summary_all_classes():
    s = summarize(both_images(), NAMES)
    assert s["per_class_iou"] == IOU
    assert s["per_class_accuracy"] == ACC
    assert s["miou"] == pytest.approx((75 + 75 + 50 + 0) / 4)
    assert s["mean_accuracy"] == pytest.approx((75 + 100 + 50) / 3)
    assert s["pixel_accuracy"] == pytest.approx(100 * 8 / 11)
    assert s["num_pixels"] == 11 and s["num_images"] == 2
    # no unseen split: seen = everything, unseen undefined
    assert s["miou_seen"] == pytest.approx(s["miou"])
    assert s["miou_unseen"] is None and s["hiou"] is None and s["pixel_accuracy_unseen"] is None


def test_summary_zero_shot_split():
    s = summarize(both_images(), NAMES, unseen=["Dog", "sofa"])
    assert s["seen_classes"] == ["background", "cat", "cow"]
    assert s["unseen_classes"] == ["dog", "sofa"]
    assert s["miou_seen"] == pytest.approx(75.0)  # (75 + 75) / 2, cow NaN left out
    assert s["miou_unseen"] == pytest.approx(25.0)  # (50 + 0) / 2
    assert s["hiou"] == pytest.approx(2 * 75 * 25 / (75 + 25))
    assert s["pixel_accuracy_seen"] == pytest.approx(100 * 6 / 7)
    assert s["pixel_accuracy_unseen"] == pytest.approx(50.0)
    assert s["mean_accuracy_seen"] == pytest.approx(87.5)
    assert s["mean_accuracy_unseen"] == pytest.approx(50.0)  # sofa NaN left out
    assert s["miou"] == pytest.approx(50.0)


def test_ignored_background_drops_its_pixels_and_counts_its_predictions_as_wrong():
    # VOC zero-shot convention. Without background rows, by hand:
    #   cat: TP 3, GT 3, predicted (on non-background pixels) 3 -> IoU 1 (the cat predicted on background is gone)
    #   dog: IoU 1/2, sofa: 0, cow: NaN
    s = summarize(both_images(), NAMES, unseen=["dog", "sofa"], ignore_classes=["background"])
    assert "background" not in s["per_class_iou"]
    assert s["ignored_classes"] == ["background"]
    assert s["per_class_iou"] == {"cat": 100.0, "dog": 50.0, "sofa": 0.0, "cow": None}
    assert s["miou"] == pytest.approx(50.0)
    assert s["miou_seen"] == pytest.approx(100.0)
    assert s["hiou"] == pytest.approx(2 * 100 * 25 / 125)
    assert s["pixel_accuracy"] == pytest.approx(100 * 5 / 7)
    assert s["num_pixels"] == 7

    # a cat pixel predicted as (ignored) background is a miss for cat, and a false positive of nobody
    conf = ConfusionMatrix(2)
    conf.update(np.array([[1, 0], [1, 0]]), np.array([[1, 1], [0, 0]]))
    assert summarize(conf, ["background", "cat"], ignore_classes=["background"])["per_class_iou"] == {"cat": 50.0}
    assert summarize(conf, ["background", "cat"])["per_class_iou"] == pytest.approx(
        {"background": 100 / 3, "cat": 100 / 3})


def test_merge_equals_single_pass_and_survives_pickle():
    a = accumulate([("a", PRED_A, GT_A)], 5)
    b = pickle.loads(pickle.dumps(accumulate([("b", PRED_B, GT_B)], 5)))
    merged = a.merge(b)
    np.testing.assert_array_equal(merged.matrix, both_images().matrix)
    assert merged.num_images == 2
    with pytest.raises(ValueError, match="3-class"):
        ConfusionMatrix(5).merge(ConfusionMatrix(3))


def test_bad_inputs_name_the_key():
    conf = ConfusionMatrix(5)
    with pytest.raises(EvaluationInputError, match=r"img/7: prediction is 2x3 but ground truth is 2x4"):
        conf.update(np.zeros((2, 3), np.uint8), GT_A, key="img/7")
    with pytest.raises(EvaluationInputError, match=r"img/8: ground truth has labels \[9\]"):
        conf.update(PRED_A, np.full_like(GT_A, 9), key="img/8")
    with pytest.raises(EvaluationInputError, match="img/9: prediction must be an integer"):
        conf.update(PRED_A.astype(np.float32), GT_A, key="img/9")
    assert conf.num_images == 0 and conf.matrix.sum() == 0


def test_custom_ignore_index_and_empty_matrix():
    conf = ConfusionMatrix(2, ignore_index=0)
    conf.update(np.array([[1, 1]]), np.array([[0, 1]]))
    assert conf.matrix.sum() == 1
    empty = summarize(ConfusionMatrix(2), ["a", "b"])
    assert empty["miou"] is None and empty["pixel_accuracy"] is None
    assert empty["per_class_iou"] == {"a": None, "b": None}


def test_class_names_are_resolved_loosely_and_checked():
    s = summarize(both_images(), ["background", "cat", "tv monitor", "potted plant", "cow"],
                  unseen=["tvmonitor", "Potted_Plant"])
    assert s["unseen_classes"] == ["tv monitor", "potted plant"]
    with pytest.raises(ValueError, match="'zebra' is not in the vocabulary"):
        summarize(both_images(), NAMES, unseen=["zebra"])
    with pytest.raises(ValueError, match="4 class names"):
        summarize(both_images(), NAMES[:4])


def test_hiou_edge_cases():
    assert hiou(0.0, 0.0) == 0.0
    assert math.isnan(hiou(50.0, math.nan))
    assert hiou(60.0, 40.0) == pytest.approx(48.0)


def _mmseg_style(preds, gts, k, ignore_index=255):
    """mmsegmentation's intersect_and_union + total_area_to_metrics, rewritten independently with histograms."""
    inter = pred_area = label_area = np.zeros(k)
    for pred, gt in zip(preds, gts):
        mask = gt != ignore_index
        p, g = pred[mask].astype(np.int64), gt[mask].astype(np.int64)
        hit = p[p == g]
        bins = np.arange(k + 1)
        ai = np.histogram(hit, bins=bins)[0]
        ap = np.histogram(p, bins=bins)[0]
        al = np.histogram(g, bins=bins)[0]
        inter, pred_area, label_area = inter + ai, pred_area + ap, label_area + al
    union = pred_area + label_area - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou, acc = inter / union, inter / label_area
    return np.nanmean(iou), np.nanmean(acc), inter.sum() / label_area.sum()


def test_random_maps_agree_with_mmseg_style_computation():
    rng = np.random.default_rng(0)
    k = 6
    preds = [rng.integers(0, k + 1, (17, 23)).astype(np.uint8) for _ in range(5)]  # k = out of range
    gts = [np.where(rng.random((17, 23)) < 0.1, 255, rng.integers(0, k - 1, (17, 23))).astype(np.uint8)
           for _ in range(5)]
    s = summarize(accumulate(zip(map(str, range(5)), preds, gts), k), [f"c{i}" for i in range(k)])
    miou, macc, aacc = _mmseg_style(preds, gts, k)
    assert s["miou"] == pytest.approx(100 * miou)
    assert s["mean_accuracy"] == pytest.approx(100 * macc)
    assert s["pixel_accuracy"] == pytest.approx(100 * aacc)

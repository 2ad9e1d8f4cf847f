"""pipelines/evaluate.py end to end: hand-built PNG label maps and shards with known answers, and bad inputs."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from denseclip.images import encode_png
from denseclip.shards import write_shard
from denseclip.visualize import default_palette

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "pipelines"))
import evaluate  # noqa: E402

CLASSES = "background\ncat, kitty\ndog\nbird\ncow\n"
# "set1/x": an ignore pixel, bird predicted but never present, a dog pixel predicted as background.
GT = {"set1/x": [[1, 1, 255], [0, 2, 2]], "y": [[0, 0], [1, 255]]}
PRED = {"set1/x": [[1, 3, 3], [0, 2, 0]], "y": [[0, 1], [1, 1]]}
# By hand over both images (ignore pixels dropped), (gt, pred) pixels:
#   x: (1,1) (1,3) (0,0) (2,2) (2,0)   y: (0,0) (0,1) (1,1)
#   background TP 2, GT 3, pred 3 -> IoU 2/4;  cat TP 2, GT 3, pred 3 -> 2/4;  dog TP 1, GT 2, pred 1 -> 1/2
#   bird TP 0, GT 0, pred 1 -> 0;  cow absent from both -> NaN (null, out of the means)
EXPECTED = {
    "per_class_iou": {"background": 50.0, "cat": 50.0, "dog": 50.0, "bird": 0.0, "cow": None},
    "miou": 37.5,  # (50 + 50 + 50 + 0) / 4
    "miou_seen": 50.0,  # background, cat (cow NaN)
    "miou_unseen": 25.0,  # dog 50, bird 0
    "hiou": 2 * 50 * 25 / 75,
    "pixel_accuracy": 100 * 5 / 8,
    "pixel_accuracy_seen": 100 * 4 / 6,
    "pixel_accuracy_unseen": 50.0,
    "mean_accuracy": 100 * (2 / 3 + 2 / 3 + 1 / 2) / 3,  # bird and cow have no ground truth
}


def write_maps(folder: Path, maps: dict) -> Path:
    for key, rows in maps.items():
        path = folder / f"{key}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_png(np.array(rows, dtype=np.uint8), palette=default_palette(256)))
    return folder


@pytest.fixture
def inputs(tmp_path) -> dict:
    classes = tmp_path / "pets.txt"
    classes.write_text(CLASSES)
    return {"gt": write_maps(tmp_path / "gt", GT), "pred": write_maps(tmp_path / "pred", PRED),
            "classes": classes, "out": tmp_path / "out"}


def run_cli(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / "pipelines" / "evaluate.py"), *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300)


def test_cli_gives_the_hand_computed_numbers(inputs):
    done = run_cli("--pred", inputs["pred"], "--gt", inputs["gt"], "--classes-file", inputs["classes"],
                   "--unseen", "dog, Bird", "--out", inputs["out"])
    assert done.returncode == 0, done.stderr
    report = json.loads((inputs["out"] / "report.json").read_text())
    for key, value in EXPECTED.items():
        assert report[key] == pytest.approx(value), key
    assert report["num_images"] == 2 and report["dataset"] == "pets"
    tables = (inputs["out"] / "tables.md").read_text()
    assert "| pred | 50.00 | 25.00 | 37.50 | 33.33 |" in tables  # S / U / mIoU / hIoU, method = --pred folder
    assert "| bird | unseen | 0.00 | - | 0 |" in tables
    assert sorted(p.name for p in (inputs["out"] / "overlays").iterdir()) == ["set1__x.png", "y.png"]
    assert (inputs["out"] / "index.html").stat().st_size > 0
    assert Image.open(inputs["out"] / "confusion.png").format == "PNG"


def test_cli_wrong_size_prediction_fails_naming_the_key(inputs):
    write_maps(inputs["pred"], {"y": [[0, 0, 0], [1, 1, 1]]})
    done = run_cli("--pred", inputs["pred"], "--gt", inputs["gt"], "--classes-file", inputs["classes"],
                   "--out", inputs["out"])
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["error: y: prediction is 2x3 but ground truth is 2x2 (height x width)"]
    assert not (inputs["out"] / "report.json").exists()


def test_missing_prediction_fails_naming_the_key(inputs, capsys):
    (inputs["pred"] / "set1" / "x.png").unlink()
    code = evaluate.main(["--pred", str(inputs["pred"]), "--gt", str(inputs["gt"]),
                          "--classes-file", str(inputs["classes"]), "--out", str(inputs["out"])])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: set1/x: no prediction") and "\n" not in err


def test_ignored_background_and_overrides(inputs):
    # VOC zero-shot convention via --ignore-classes. Without background rows, by hand:
    #   cat TP 2, GT 3, pred 2 -> 2/3;  dog TP 1, GT 2, pred 1 -> 1/2 (its pixel predicted background is a miss)
    evaluate.main(["--pred", str(inputs["pred"]), "--gt", str(inputs["gt"]), "--classes-file",
                   str(inputs["classes"]), "--unseen", "dog, bird", "--ignore-classes", "background",
                   "--method", "DenseCLIP", "--out", str(inputs["out"])])
    report = json.loads((inputs["out"] / "report.json").read_text())
    assert report["per_class_iou"] == pytest.approx({"cat": 200 / 3, "dog": 50.0, "bird": 0.0, "cow": None})
    assert report["miou"] == pytest.approx((200 / 3 + 50 + 0) / 3)
    assert report["ignored_classes"] == ["background"] and report["method"] == "DenseCLIP"


def test_unknown_unseen_class_is_an_error(inputs, capsys):
    code = evaluate.main(["--pred", str(inputs["pred"]), "--gt", str(inputs["gt"]), "--classes-file",
                          str(inputs["classes"]), "--unseen", "zebra", "--out", str(inputs["out"])])
    assert code == 2 and "'zebra' is not in the vocabulary" in capsys.readouterr().err


def _jpeg(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


def test_shards_ground_truth_with_images_and_an_unmatched_prediction(tmp_path, inputs, capsys):
    rng = np.random.default_rng(0)
    labels = {f"s/{i:03d}": rng.integers(0, 5, (40, 48)).astype(np.uint8) for i in range(5)}
    samples = [{"__key__": key, "jpg": _jpeg(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)),
                "seg.png": encode_png(lab)} for key, lab in labels.items()]
    write_shard(str(tmp_path / "shards" / "val-000000.tar"), samples[:3])
    write_shard(str(tmp_path / "shards" / "val-000001.tar"), samples[3:])
    pred = tmp_path / "pred_perfect"
    write_maps(pred, {**labels, "extra": [[0]]})
    code = evaluate.main(["--pred", str(pred), "--gt", str(tmp_path / "shards"), "--classes-file",
                          str(inputs["classes"]), "--num-overlays", "2", "--out", str(inputs["out"])])
    assert code == 0
    assert "1 predictions have no ground truth" in capsys.readouterr().err
    report = json.loads((inputs["out"] / "report.json").read_text())
    assert report["miou"] == 100.0 and report["pixel_accuracy"] == 100.0 and report["num_images"] == 5
    assert report["inputs"]["unmatched_predictions"] == 1
    grids = sorted((inputs["out"] / "overlays").iterdir())
    assert len(grids) == 2
    assert Image.open(grids[0]).width > 3 * 48  # image | gt | pred panels, then the legend


def test_reservoir_sample_is_uniform_and_repeatable():
    counts = np.zeros(10)
    for seed in range(2000):
        reservoir = evaluate.Reservoir(3, seed=seed)
        for i in range(10):
            reservoir.offer(i)
        counts[reservoir.items] += 1
    assert counts.sum() == 6000 and np.all(np.abs(counts / 2000 - 0.3) < 0.05)
    again = [evaluate.Reservoir(3, seed=1) for _ in range(2)]
    for r in again:
        for i in range(10):
            r.offer(i)
    assert again[0].items == again[1].items

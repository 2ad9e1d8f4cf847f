"""pipelines/evaluate.py end to end: hand-built PNG label maps and shards with known answers, and bad inputs."""

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pipeline_scripts import load_pipeline

from denseclip.evaluation import KeySample, iter_ground_truth
from denseclip.images import decode_image, encode_png
from denseclip.shards import write_shard
from denseclip.visualize import default_palette

ROOT = Path(__file__).resolve().parents[1]
evaluate = load_pipeline("evaluate")

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


def run_cli(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, str(ROOT / "pipelines" / "evaluate.py"), *map(str, args)],
                          check=False, capture_output=True, text=True, env=env, timeout=300)


def test_cli_gives_the_hand_computed_numbers(inputs):
    done = run_cli("--pred", inputs["pred"], "--input", inputs["gt"], "--classes", inputs["classes"],
                   "--unseen", "dog, Bird", "--output", inputs["out"])
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
    done = run_cli("--pred", inputs["pred"], "--input", inputs["gt"], "--classes", inputs["classes"],
                   "--output", inputs["out"])
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["error: y: prediction is 2x3 but ground truth is 2x2 (height x width)"]
    assert not (inputs["out"] / "report.json").exists()


def test_missing_prediction_fails_naming_the_key(inputs, capsys):
    (inputs["pred"] / "set1" / "x.png").unlink()
    code = evaluate.main(["--pred", str(inputs["pred"]), "--input", str(inputs["gt"]),
                          "--classes", str(inputs["classes"]), "--output", str(inputs["out"])])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: set1/x: no prediction") and "\n" not in err


def test_ignored_background_and_overrides(inputs):
    # VOC zero-shot convention via --ignore-classes. Without background rows, by hand:
    #   cat TP 2, GT 3, pred 2 -> 2/3;  dog TP 1, GT 2, pred 1 -> 1/2 (its pixel predicted background is a miss)
    evaluate.main(["--pred", str(inputs["pred"]), "--input", str(inputs["gt"]), "--classes",
                   str(inputs["classes"]), "--unseen", "dog, bird", "--ignore-classes", "background",
                   "--method", "DenseCLIP", "--output", str(inputs["out"])])
    report = json.loads((inputs["out"] / "report.json").read_text())
    assert report["per_class_iou"] == pytest.approx({"cat": 200 / 3, "dog": 50.0, "bird": 0.0, "cow": None})
    assert report["miou"] == pytest.approx((200 / 3 + 50 + 0) / 3)
    assert report["ignored_classes"] == ["background"] and report["method"] == "DenseCLIP"


def test_unknown_unseen_class_is_an_error(inputs, capsys):
    code = evaluate.main(["--pred", str(inputs["pred"]), "--input", str(inputs["gt"]), "--classes",
                          str(inputs["classes"]), "--unseen", "zebra", "--output", str(inputs["out"])])
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
    code = evaluate.main(["--pred", str(pred), "--input", str(tmp_path / "shards"), "--classes",
                          str(inputs["classes"]), "--num-overlays", "2", "--output", str(inputs["out"])])
    assert code == 0
    assert "1 predictions have no ground truth" in capsys.readouterr().err
    report = json.loads((inputs["out"] / "report.json").read_text())
    assert report["miou"] == 100.0 and report["pixel_accuracy"] == 100.0 and report["num_images"] == 5
    assert report["inputs"]["unmatched_predictions"] == 1
    grids = sorted((inputs["out"] / "overlays").iterdir())
    assert len(grids) == 2
    assert Image.open(grids[0]).width > 3 * 48  # image | gt | pred panels, then the legend


def test_overlay_sample_is_uniform_and_independent_of_order_and_partitioning():
    counts = np.zeros(10)
    for trial in range(2000):
        sample = KeySample(3)
        for i in range(10):
            sample.offer(f"{trial}/{i}", i)
        counts[sample.items] += 1
    assert counts.sum() == 6000 and np.all(np.abs(counts / 2000 - 0.3) < 0.05)
    keys = [f"img-{i}" for i in range(50)]
    whole = KeySample(5)
    for key in keys:
        whole.offer(key, key.upper())
    parts = [KeySample(5) for _ in range(3)]
    for i, key in enumerate(reversed(keys)):
        parts[i % 3].offer(key, key.upper())
    merged = parts[0].merge(parts[1]).merge(parts[2])
    assert merged.items == whole.items and len(whole.items) == 5
    assert whole.items == sorted(whole.items)  # by key


def test_synthetic_dataset_against_a_mask_store(tmp_path):
    from denseclip.datasets import get_dataset
    from denseclip.mask_store import MaskStoreWriter
    from denseclip.shards import expand_shards, read_shard
    from denseclip.synthetic import write_shards

    write_shards(seed=4242, n=6, out=str(tmp_path / "shards"), shard_size=4, size=64)
    gts = {s["__key__"]: np.asarray(Image.open(io.BytesIO(s["seg.png"])))
           for url in expand_shards(str(tmp_path / "shards")) for s in read_shard(url)}
    store = str(tmp_path / "store")
    provenance = {"model": "denseclip-tiny-shapes", "vocabulary": "synthetic"}
    MaskStoreWriter(store, provenance).write_part("0", [{"key": k, "mask": v} for k, v in gts.items()])
    out = tmp_path / "out"
    assert evaluate.main(["--pred", store, "--input", str(tmp_path / "shards"), "--classes", "synthetic",
                          "--output", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    names = get_dataset("synthetic").class_names
    present = {names[c] for gt in gts.values() for c in np.unique(gt) if c != 255}
    assert report["per_class_iou"] == {n: (100.0 if n in present else None) for n in names}
    assert report["unseen_classes"] == ["red star", "green triangle", "blue circle", "yellow square"]
    assert report["ignored_classes"] == [] and report["dataset"] == "synthetic" and report["num_images"] == 6
    stored = dict(report["inputs"]["pred_provenance"])
    assert stored.pop("code_version").startswith("0.")  # the mask store adds the version of the code that wrote it
    assert stored == {**provenance, "format_version": 2}  # ... and the format of its cells
    assert len(list((out / "overlays").iterdir())) == 6


VOC = ROOT / "tests" / "data" / "samples" / "voc"


@pytest.mark.parametrize("keep_background", [False, True])
def test_voc_zero_shot_ignores_background_on_a_real_pair(tmp_path, keep_background):
    gt = np.asarray(Image.open(VOC / "SegmentationClass" / "2007_000129.png"))
    assert set(np.unique(gt)) == {0, 2, 15, 255}  # background, bicycle, person, void
    pred = np.where(gt == 255, 0, gt).astype(np.uint8)
    rows = np.arange(gt.shape[0])[:, None] < gt.shape[0] // 2
    pred[(gt == 2) & rows] = 0  # the upper half of the bicycle is called background
    write_maps(tmp_path / "pred", {"2007_000129": pred})
    out = tmp_path / "out"
    extra = ["--ignore-classes", ""] if keep_background else []
    assert evaluate.main(["--pred", str(tmp_path / "pred"), "--input", str(VOC / "SegmentationClass"),
                          "--images", str(VOC / "JPEGImages"), "--classes", "voc", *extra,
                          "--output", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    bicycle, missed = (gt == 2).sum(), ((gt == 2) & rows).sum()
    iou = report["per_class_iou"]
    assert iou["bicycle"] == pytest.approx(100 * (bicycle - missed) / bicycle)  # misses only, no false positives
    assert iou["person"] == 100.0 and iou["sheep"] is None
    if keep_background:
        background = (gt == 0).sum()
        assert iou["background"] == pytest.approx(100 * background / (background + missed))
        assert report["ignored_classes"] == []
    else:
        assert "background" not in iou and report["ignored_classes"] == ["background"]
        assert report["num_pixels"] == bicycle + (gt == 15).sum()
    assert report["miou_unseen"] is None and report["hiou"] is None  # no unseen class in this image
    grid = Image.open(out / "overlays" / "2007_000129.png")
    assert grid.width > 3 * gt.shape[1]  # the photo was found through --images


def _voc20_report(tmp_path, pred_source: list[str]) -> dict:
    out = tmp_path / "out"
    assert evaluate.main([*pred_source, "--input", str(VOC / "SegmentationClass"), "--classes", "voc20",
                          "--output", str(out)]) == 0
    return json.loads((out / "report.json").read_text())


def test_voc20_ignores_background_pixels(tmp_path):
    # The paper's annotation-free VOC: 20 classes, background pixels of the (voc) ground truth not scored.
    gt = np.asarray(Image.open(VOC / "SegmentationClass" / "2007_000129.png"))
    bicycle, person = gt == 2, gt == 15
    upper = (np.arange(gt.shape[0])[:, None] < gt.shape[0] // 2) & bicycle
    pred = np.zeros_like(gt)  # voc20 ids: "airplane" on every background and void pixel, which must not count
    pred[bicycle], pred[person], pred[upper] = 1, 14, 14  # the bicycle's upper half called person
    write_maps(tmp_path / "pred", {"2007_000129": pred})
    report = _voc20_report(tmp_path, ["--pred", str(tmp_path / "pred")])
    iou = report["per_class_iou"]
    assert len(iou) == 20 and "background" not in iou and iou["airplane"] is None
    assert iou["bicycle"] == pytest.approx(100 * (bicycle.sum() - upper.sum()) / bicycle.sum())
    assert iou["person"] == pytest.approx(100 * person.sum() / (person.sum() + upper.sum()))
    assert report["num_pixels"] == bicycle.sum() + person.sum()
    assert (report["dataset"], report["protocol"]) == ("voc20", None)


def test_voc20_scores_a_background_aware_mask_store(tmp_path):
    # Masks labelled with the voc vocabulary (background included) scored as voc20: a pixel labelled
    # background is a miss; background pixels of the ground truth are still not scored.
    from denseclip.datasets import get_dataset
    from denseclip.mask_store import MaskStoreWriter

    gt = np.asarray(Image.open(VOC / "SegmentationClass" / "2007_000129.png"))
    bicycle, person = gt == 2, gt == 15
    upper = (np.arange(gt.shape[0])[:, None] < gt.shape[0] // 2) & bicycle
    pred = np.where(gt == 255, 0, gt).astype(np.uint8)
    pred[upper] = 0  # the bicycle's upper half called background
    store = str(tmp_path / "store")
    provenance = {"model": "RN50", "vocabulary": [list(c) for c in get_dataset("voc").classes],
                  "options": {"protocol": "paper"}}
    MaskStoreWriter(store, provenance).write_part("0", [{"key": "2007_000129", "mask": pred}])
    report = _voc20_report(tmp_path, ["--pred", store])
    iou = report["per_class_iou"]
    assert iou["bicycle"] == pytest.approx(100 * (bicycle.sum() - upper.sum()) / bicycle.sum())
    assert iou["person"] == 100.0 and report["num_pixels"] == bicycle.sum() + person.sum()
    assert report["inputs"]["pred_reduced_from"] == "voc" and report["protocol"] == "paper"


def test_offline_model_fails_in_one_line(inputs, offline_hub):
    done = run_cli("--model", "RN50", "--input", inputs["gt"], "--classes", inputs["classes"],
                   "--output", inputs["out"], env=offline_hub)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "RN50/openai" in done.stderr and "--pretrained PATH_OR_URL" in done.stderr
    assert not inputs["out"].exists()


def test_model_on_the_fly_scores_like_its_stored_predictions(tmp_path, capsys):
    from denseclip.config import LabelerConfig
    from denseclip.datasets import get_dataset
    from denseclip.evaluation import build_dense_clip
    from denseclip.synthetic import write_shards

    shards = str(tmp_path / "shards")
    write_shards(seed=2022, n=6, out=shards, shard_size=4, size=64)
    truths = list(iter_ground_truth(shards))
    images = [decode_image(t.image) for t in truths]
    # --dataset labels under the paper's protocol preset (for the tiny CLIP: its own resolution, exact upsampling).
    paper = LabelerConfig.from_dict({"model": "denseclip-tiny-shapes", "protocol": "paper"}, dataset="synthetic")
    labeler = build_dense_clip(paper, get_dataset("synthetic").classes)
    write_maps(tmp_path / "pred", {t.key: labels for t, (labels, _) in zip(truths, labeler.label_images(images))})
    for t in truths:  # the same ground truth as a folder of label maps, the images beside it
        write_maps(tmp_path / "gt", {t.key: t.labels})
        (tmp_path / "images" / f"{t.key}.jpg").parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "images" / f"{t.key}.jpg").write_bytes(t.image)
    runs = {"stored": ["--pred", str(tmp_path / "pred"), "--input", shards],
            "model": ["--model", "denseclip-tiny-shapes", "--input", shards],
            "model_folder": ["--model", "denseclip-tiny-shapes", "--input", str(tmp_path / "gt"),
                             "--images", str(tmp_path / "images")]}
    reports = {}
    for name, args in runs.items():
        assert evaluate.main([*args, "--classes", "synthetic", "--output", str(tmp_path / name)]) == 0
        reports[name] = json.loads((tmp_path / name / "report.json").read_text())
    scores = [{k: v for k, v in r.items() if k not in ("inputs", "method", "protocol")} for r in reports.values()]
    assert scores[0]["num_images"] == 6 and 0 < scores[0]["miou"] < 100
    assert scores[1] == scores[0] and scores[2] == scores[0]
    assert reports["model"]["method"] == "DenseCLIP denseclip-tiny-shapes"
    assert reports["model"]["inputs"]["labeler"]["model"] == "denseclip-tiny-shapes"
    assert reports["model"]["protocol"] == "paper" and reports["model"]["inputs"]["labeler"]["upsample_topk"] is None
    assert reports["model"]["inputs"]["labeler"]["activation"] == "gelu"

    code = evaluate.main(["--model", "denseclip-tiny-shapes", "--input", str(tmp_path / "gt"), "--classes",
                          "synthetic", "--output", str(tmp_path / "no_images")])
    assert code == 2 and "error: synthetic/s2022/000000: no image to label" in capsys.readouterr().err


def test_a_shard_key_never_reads_an_image_outside_the_images_folder(tmp_path, capsys):
    """A sample without an image member is looked up under --images by its key: ``../`` must not escape."""
    label_map = encode_png(np.zeros((4, 4), np.uint8))
    outside = tmp_path / "secret.jpg"  # what "../secret" would reach from the images folder
    Image.new("RGB", (4, 4), "red").save(outside)
    (tmp_path / "images").mkdir()
    with tarfile.open(tmp_path / "escape.tar", "w") as tar:  # write_shard refuses such names, as it should
        info = tarfile.TarInfo("../secret.seg.png")
        info.size = len(label_map)
        tar.addfile(info, io.BytesIO(label_map))
    code = evaluate.main(["--model", "denseclip-tiny-shapes", "--input", str(tmp_path / "escape.tar"), "--images",
                          str(tmp_path / "images"), "--classes", "synthetic", "--output", str(tmp_path / "out")])
    assert code == 2
    assert "error: ../secret: unsafe sample key" in capsys.readouterr().err
    assert not (tmp_path / "out" / "report.json").exists()


def test_exactly_one_prediction_source(inputs, capsys):
    for args in (["--pred", str(inputs["pred"]), "--model", "RN50"], ["--model", "RN50", "--checkpoint", "x"], []):
        with pytest.raises(SystemExit) as exit_info:
            evaluate.main([*args, "--input", str(inputs["gt"]), "--classes", str(inputs["classes"]),
                           "--output", str(inputs["out"])])
        assert exit_info.value.code == 2
        assert "give exactly one of --pred (stored predictions), --model or --checkpoint" in capsys.readouterr().err


def test_denseclip_plus_checkpoint_on_the_fly(tmp_path, capsys):
    from denseclip.models import load_clip
    from denseclip.plus.target import build_target
    from denseclip.plus.training import build_optimizer
    from denseclip.ray.training import TrainJob, load_target_checkpoint, save_checkpoint
    from denseclip.synthetic import write_shards
    from denseclip.text import class_embeddings
    from denseclip.vocabulary import load_templates

    job = TrainJob.from_dict({"dataset": "synthetic", "data": {"train": "unused", "val": "unused"},
                              "labeler": {"model": "denseclip-tiny-shapes"},
                              "run": {"name": "eval"}, "training": {"resize_to": [128, 32], "target": {
                                  "backbone": "clip", "backbone_weights": "clip", "head": "deeplabv3plus",
                                  "output_stride": 16, "aspp_rates": [1, 2], "head_channels": 16}}})
    clip = load_clip("denseclip-tiny-shapes")
    target = build_target(job.training.target, *class_embeddings(clip, job.info.classes, load_templates("synthetic")),
                          clip=clip)
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    save_checkpoint(str(checkpoint), target, build_optimizer(target, job.training), 0, job, {})
    shards = str(tmp_path / "shards")
    write_shards(seed=2022, n=4, out=shards, shard_size=4, size=64)
    truths = list(iter_ground_truth(shards))
    labels = load_target_checkpoint(str(checkpoint)).label_images([decode_image(t.image) for t in truths])
    write_maps(tmp_path / "pred", {t.key: pred for t, (pred, _) in zip(truths, labels)})
    reports = {}
    for name, source in (("stored", ["--pred", str(tmp_path / "pred")]), ("plus", ["--checkpoint", str(checkpoint)])):
        assert evaluate.main([*source, "--input", shards, "--classes", "synthetic", "--output", str(tmp_path / name)]) == 0
        reports[name] = json.loads((tmp_path / name / "report.json").read_text())
    assert reports["plus"]["per_class_iou"] == reports["stored"]["per_class_iou"]
    assert reports["plus"]["pixel_accuracy"] == reports["stored"]["pixel_accuracy"]
    assert reports["plus"]["method"] == "DenseCLIP+ checkpoint"
    # Scored at the training's keep-ratio resize (the 64-pixel scenes at 32), as the official test pipeline does.
    assert reports["plus"]["inputs"]["scored_at"] == [128, 32]
    assert evaluate.main(["--checkpoint", str(checkpoint), "--input", shards, "--classes", "synthetic",
                          "--resize-to", "native", "--output", str(tmp_path / "native")]) == 0
    assert json.loads((tmp_path / "native" / "report.json").read_text())["inputs"]["scored_at"] is None

    assert evaluate.main(["--checkpoint", str(checkpoint), "--input", shards, "--classes", "voc",
                          "--output", str(tmp_path / "voc")]) == 2
    assert "trained on 17 classes (background, red circle" in capsys.readouterr().err


def test_report_records_the_head_and_the_protocol(tmp_path):
    from denseclip.synthetic import write_shards

    shards = str(tmp_path / "shards")
    write_shards(seed=2022, n=2, out=shards, shard_size=2, size=64)
    args = ["--model", "denseclip-tiny-shapes-vit", "--pretrained", "random", "--input", shards, "--classes",
            "synthetic", "--num-overlays", "0"]
    assert evaluate.main([*args, "--head", "clearclip", "--output", str(tmp_path / "clear")]) == 0
    report = json.loads((tmp_path / "clear" / "report.json").read_text())
    assert report["inputs"]["labeler"]["head"] == "clearclip" and report["method"].endswith("clearclip")
    assert evaluate.main([*args, "--head", "naclip", "--protocol", "successors", "--output", str(tmp_path / "succ")]) == 0
    labeler = json.loads((tmp_path / "succ" / "report.json").read_text())["inputs"]["labeler"]
    assert (labeler["head"], labeler["protocol"], labeler["synonyms"], labeler["temperature"]) == (
        "naclip", "successors", True, 40)

"""The demo end to end: a small run checks the report's structure and sanity; the full default run (slow)
checks the bar of the synthetic-world issue."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pipeline_scripts import load_pipeline

from denseclip.config import ConfigError
from denseclip.datasets import get_dataset
from denseclip.demo import TRAIN_SEED, DemoConfig, default_training, run_demo
from denseclip.synthetic import render_dataset

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("denseclip", "denseclip_plus", "denseclip_plus_self_training", "denseclip_plus_zero_shot",
           "seen_only", "all_background", "random_weights")
HEADLINE = ("miou", "miou_seen", "miou_unseen", "pixel_accuracy")


def _check_structure(report: dict, out: Path, num_overlays: int) -> None:
    info = get_dataset("synthetic")
    assert report["unseen_classes"] == list(info.unseen)
    for method in METHODS:
        summary = report[method]
        for key in HEADLINE:
            assert summary[key] is not None and 0 <= summary[key] <= 100, (method, key)
        assert set(summary["per_class_iou"]) == set(info.class_names)
        assert len(list((out / method / "overlays").glob("*.png"))) == num_overlays
        assert json.loads((out / method / "report.json").read_text())["miou"] == summary["miou"]
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    # One page compares them all and links each method's own page.
    page = (out / report["pages"]["comparison"]).read_text()
    assert all(f'href="{method}/index.html"' in page and (out / report["pages"][method]).is_file()
               for method in METHODS)
    assert len(list((out / "scenes").glob("*.png"))) == num_overlays


def test_small_demo_report(tmp_path):
    torch.set_num_threads(1)
    training = dataclasses.replace(default_training(), iterations=4, guided_iterations=2, batch_size=4,
                                   crop_size=96)
    config = DemoConfig(seed=11, num_images=12, train_images=16, training=training, num_overlays=2)
    report = run_demo(config, tmp_path)
    _check_structure(report, tmp_path, 2)
    assert report["denseclip"]["miou"] > 2 * report["random_weights"]["miou"]  # the shipped weights loaded
    # The all-background baseline, recomputed from the rendered ground truth.
    gt = np.stack([s.labels for s in render_dataset(11, 12)])
    assert report["all_background"]["pixel_accuracy"] == pytest.approx(100 * (gt == 0).mean())
    assert report["all_background"]["per_class_iou"]["background"] == pytest.approx(100 * (gt == 0).mean())
    history = report["training"]["history"]
    assert [r["phase"] for r in history["denseclip_plus_self_training"]][-1] == "self_training"
    assert {r["phase"] for r in history["denseclip_plus"]} == {"guided"}
    assert {r["phase"] for r in history["seen_only"]} == {"seen_only"}
    with pytest.raises(ConfigError, match="--seed"):
        run_demo(dataclasses.replace(config, seed=TRAIN_SEED), tmp_path / "never")


def test_cli_refuses_a_training_seed(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "pipelines" / "demo.py"), "--seed", str(TRAIN_SEED),
                             "--num-images", "2", "--out", str(tmp_path)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 2 and "--seed" in result.stderr
    assert not (tmp_path / "report.json").exists()


@pytest.mark.slow
@pytest.mark.bar
def test_default_demo_meets_the_bar(tmp_path, capsys):
    cli = load_pipeline("demo")
    assert cli.main(["--seed", "1", "--num-images", "200", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "red star, green triangle, blue circle, yellow square" in printed
    report = json.loads((tmp_path / "report.json").read_text())
    _check_structure(report, tmp_path, DemoConfig().num_overlays)
    dense = report["denseclip"]
    assert dense["miou"] >= 4 * report["all_background"]["miou"]
    assert dense["miou"] >= 4 * report["random_weights"]["miou"]
    assert report["denseclip_plus_zero_shot"]["miou_unseen"] >= dense["miou_unseen"] + 20
    assert report["denseclip_plus"]["miou"] >= dense["miou"]
    # The drift of self-training in the annotation-free setting is visible.
    assert report["denseclip_plus_self_training"]["miou"] < report["denseclip_plus"]["miou"]
    # The Table 2a baseline (seen ground truth alone) is reported, below zero-shot DenseCLIP+ on unseen classes.
    assert report["denseclip_plus_zero_shot"]["miou_unseen"] > report["seen_only"]["miou_unseen"]

"""``denseclip predict`` as a user runs it: real JPEGs in, label maps and overlays out, one-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SAMPLES = Path(__file__).parent / "data" / "samples"


def run_predict(*args, cwd=None):
    """``denseclip predict`` with the shipped tiny CLIP unless ``args`` name a model (the default, RN50 with
    OpenAI's weights, cannot be downloaded here)."""
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    model = [] if "--model" in args else ["--model", "denseclip-tiny-shapes"]
    return subprocess.run([sys.executable, "-m", "denseclip.cli", "predict", *model, *args], capture_output=True,
                          text=True,
                          check=False, env=env, cwd=cwd, timeout=300)


def test_predict_odd_sized_jpeg_and_a_broken_one(tmp_path):
    photo = tmp_path / "street scene.jpg"
    Image.open(SAMPLES / "2008_004015.jpg").convert("RGB").resize((500, 375)).save(photo, quality=92)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(photo.read_bytes()[:200])
    out = tmp_path / "out"
    result = run_predict(str(broken), str(photo), "--classes", "red car, yellow car, road, tree", "--output", str(out))
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("denseclip predict: error:")]
    assert len(errors) == 1 and "broken.jpg" in errors[0]
    assert "Traceback" not in result.stderr
    # One line per image with the files written, then a summary naming the folder.
    lines = result.stdout.splitlines()
    assert len(lines) == 2, result.stdout
    assert lines[0].startswith(f"{photo} -> street scene.png, street scene_overlay.jpg, street scene.json (")
    assert lines[1] == f"denseclip predict: 1 of 2 images labelled into {out}/, 1 failed"
    labels = Image.open(out / "street scene.png")
    assert labels.mode == "P" and labels.size == (500, 375)
    values = np.unique(np.array(labels))
    assert values.min() >= 0 and values.max() < 4
    overlay = Image.open(out / "street scene_overlay.jpg")
    assert overlay.width >= 500 and overlay.height >= 375  # image plus legend
    meta = json.loads((out / "street scene.json").read_text())
    assert meta["class_names"] == ["red car", "yellow car", "road", "tree"]
    assert (meta["width"], meta["height"]) == (500, 375)
    assert not (out / "broken.png").exists()


def test_classes_file_with_synonyms_and_background_threshold(tmp_path):
    classes = tmp_path / "classes.txt"
    classes.write_text("person, person in shirt\nsky\nbuilding, house\n")
    out = tmp_path / "out"
    result = run_predict(str(SAMPLES / "2008_007006.jpg"), "--classes", str(classes),
                         "--background-threshold", "0.5", "--output", str(out))
    assert result.returncode == 0, result.stderr
    meta = json.loads((out / "2008_007006.json").read_text())
    assert meta["class_names"] == ["background", "person", "sky", "building"]
    assert meta["classes"][0] == ["person", "person in shirt"]
    assert Image.open(out / "2008_007006.png").size == Image.open(SAMPLES / "2008_007006.jpg").size


def test_user_errors_are_one_line(tmp_path):
    image = str(SAMPLES / "2008_004015.jpg")
    cases = [
        (["--classes", "cat, dog, cat"], "duplicate class name"),
        (["--classes", " , "], "empty"),
        (["--classes", "cat", "--model", "RN51"], "unknown model 'RN51'"),
        (["--classes", str(tmp_path / "nope.txt")], "nope.txt"),
        (["--classes", "cat", "--mode", "tiles"], "mode"),
    ]
    for extra, message in cases:
        result = run_predict(image, *extra, "--output", str(tmp_path / "o"))
        assert result.returncode == 2, (extra, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr, (extra, result.stderr)


@pytest.mark.parametrize("model", [[], ["--model", "RN50"]], ids=["default", "RN50"])
def test_predict_offline_without_weights_fails_in_one_line(tmp_path, offline_hub, model):
    # No --model, or --model RN50, means the paper's openai weights, never random ones; offline they cannot be had.
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "denseclip.cli", "predict", str(SAMPLES / "2008_004015.jpg"),
                             "--classes", "red car, road", *model, "--output", str(out)],
                            capture_output=True, text=True, check=False, timeout=300,
                            env={**os.environ, **offline_hub, "OMP_NUM_THREADS": "2"})
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "RN50/openai" in result.stderr and "--pretrained PATH_OR_URL" in result.stderr
    assert "--model denseclip-tiny-shapes" in result.stderr  # what to try offline
    assert not out.exists() or not list(out.iterdir())

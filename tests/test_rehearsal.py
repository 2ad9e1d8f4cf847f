"""The COCO-Stuff dress rehearsal: the shipped denseclip-tiny-cocostuff (small, documented, knows the world's class
names), jobs/rehearse_coco_stuff_zero_shot.yaml changing only what a rehearsal may change in the real spec (fast),
and the real spec end to end on a COCO-Stuff-shaped world through pipelines/reproduce.py (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from denseclip.datasets import get_dataset
from denseclip.models import TINY_ASSETS, load_clip
from denseclip.packed_weights import ROWS
from denseclip.reproduce import REPORT_FILE, Reproduction
from denseclip.synthetic_coco_stuff import (
    CLASSES,
    TINY_CLIP_WORLD_SEED,
    caption_crops,
    raw_ids,
    render_scene,
)

ROOT = Path(__file__).resolve().parents[1]
MODEL = "denseclip-tiny-cocostuff"
REAL = ROOT / "jobs" / "reproduce_coco_stuff_zero_shot.yaml"
REHEARSAL = ROOT / "jobs" / "rehearse_coco_stuff_zero_shot.yaml"
HELD_OUT_SEED = 515151  # never the tiny CLIP's world (training.json records that seed)
# What a rehearsal may change in the real reproduction: data root and workdir, the model (teacher and target),
# schedule lengths, device and precision. Everything else (dataset preset, classes, split, id map, protocol,
# recipe) must stay.
MAY_CHANGE = {"workdir", "prepare.dataset.root", "prepare.dataset.shard_size", "prepare.dataset.workers",
              "label.num_actors", "label.labeler.device", "label.labeler.precision"}
TRAIN_IMAGES, VAL_IMAGES = 160, 40
UNSEEN_MARGIN = 10.0  # mIoU points DenseCLIP+ must gain over its teacher on the unseen classes
# training.batch_size is the devices' (the official 4 per GPU x 4 GPUs).
TRAIN_MAY_CHANGE = ("labeler.model", "labeler.pretrained", "labeler.precision", "training.iterations",
                    "training.guided_iterations", "training.precision", "training.batch_size", "training.target.",
                    "workers.", "run.checkpoint_every", "run.log_every", "evaluation.every")


def _flat(mapping: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _changed(a: dict, b: dict) -> set[str]:
    a, b = _flat(a), _flat(b)
    return {key for key in a.keys() | b.keys() if a.get(key) != b.get(key)}


def test_the_rehearsal_changes_only_data_model_schedule_device_and_precision():
    real, rehearsal = Reproduction.from_file(str(REAL)), Reproduction.from_file(str(REHEARSAL))
    fields = ("name", "workdir", "prepare", "label", "evaluate")
    changed = _changed({f: getattr(real, f) for f in fields}, {f: getattr(rehearsal, f) for f in fields})
    assert changed <= MAY_CHANGE, changed - MAY_CHANGE
    assert rehearsal.train_spec_path == real.train_spec_path
    train_changed = _changed(real.train_spec, rehearsal.train_spec)
    assert {k for k in train_changed if not k.startswith(TRAIN_MAY_CHANGE)} == set()
    assert rehearsal.labeler["model"] == MODEL and rehearsal.labeler["device"] == "cpu"
    assert rehearsal.labeler["protocol"] == real.labeler["protocol"] == "paper"
    assert rehearsal.labeler["templates"] == real.labeler["templates"] == "denseclip85"
    assert rehearsal.dataset == "coco_stuff" and rehearsal.train_spec["training"]["setting"] == "zero_shot"
    assert rehearsal.stages()[0].commands[0][:6] == ["python", "-m", "denseclip", "prepare", "--dataset", "coco_stuff"]


def test_the_tiny_cocostuff_clip_is_small_documented_and_trained_on_its_world():
    folder = TINY_ASSETS[MODEL]
    assert (folder / "model.safetensors").stat().st_size <= 8 * 1024 * 1024
    record = json.loads((folder / "training.json").read_text())
    assert record["model"] == MODEL and record["world"] == "coco_stuff"
    assert record["world_seed"] == TINY_CLIP_WORLD_SEED != HELD_OUT_SEED
    assert record["command"].startswith(f"python pipelines/train_tiny_clip.py --model {MODEL}")
    # Packed: only the token rows the captions use (the class names and the prompt frames) are stored.
    rows = set(load_file(folder / "model.safetensors")[ROWS].tolist())
    tokens = {t for row in open_clip.get_tokenizer(MODEL)(list(CLASSES)).tolist() for t in row if t}
    assert tokens <= rows and len(rows) < 400


def test_the_tiny_cocostuff_clip_names_held_out_regions():
    torch.set_num_threads(1)
    clip = load_clip(MODEL)
    names = list(CLASSES)
    rng = np.random.default_rng(0)
    crops = [c for i in range(12) for c in caption_crops(render_scene(HELD_OUT_SEED, i, "val"), rng, 12, 128)]
    single = [(image, named[0]) for image, _, named in crops if len(named) == 1][:60]
    raw_to_name = {raw: name for name, raw in raw_ids().items()}
    images = torch.from_numpy(np.stack([image for image, _ in single])).permute(0, 3, 1, 2).float() / 255
    images = (images - torch.tensor(clip.mean).view(1, 3, 1, 1)) / torch.tensor(clip.std).view(1, 3, 1, 1)
    truth = torch.tensor([names.index(raw_to_name[raw]) for _, raw in single])
    prompts = [f"a photo of a {name}." for name in names]
    with torch.no_grad():
        image_features = F.normalize(clip.model.encode_image(images), dim=-1)
        text_features = F.normalize(clip.model.encode_text(clip.tokenizer(prompts)), dim=-1)
    accuracy = ((image_features @ text_features.T).argmax(dim=1) == truth).float().mean().item()
    print(f"single-class crop retrieval: {accuracy:.2f} of {len(single)}")
    assert len(single) >= 30
    assert accuracy >= 0.8, f"single-class crop retrieval {accuracy:.2f} (chance {1 / len(names):.2f})"


@pytest.mark.slow
def test_the_coco_stuff_rehearsal_runs_the_real_spec_end_to_end(tmp_path):
    world, workdir = tmp_path / "coco-world", tmp_path / "work"
    start = time.perf_counter()
    for split, n in (("train", TRAIN_IMAGES), ("val", VAL_IMAGES)):
        subprocess.run([sys.executable, "pipelines/render_world.py", "--layout", "coco_stuff", "--split", split,
                        "--seed", str(HELD_OUT_SEED), "--num-images", str(n), "--output", str(world)], cwd=ROOT,
                       check=True, capture_output=True, timeout=600)
    command = [sys.executable, "pipelines/reproduce.py", "--config", str(REHEARSAL),
               "--set", f"prepare.dataset.root={world}", "--set", f"workdir={workdir}"]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1500, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    print(f"rehearsal: {time.perf_counter() - start:.0f} s with rendering\n{run.stdout[-1500:]}")

    reproduction = Reproduction.from_file(str(REHEARSAL), [f"workdir={workdir}"])
    summary = json.loads((workdir / "pseudo-labels" / "summary.json").read_text())
    assert summary["images_labelled"] == TRAIN_IMAGES and summary["errors"] == 0
    trained = json.loads((Path(reproduction.final_checkpoint) / "checkpoint.json").read_text())
    assert trained["job"]["training"]["pseudo_labels"] == "precomputed"
    training = json.loads((Path(reproduction.final_checkpoint) / REPORT_FILE).read_text())
    plus = json.loads((workdir / "evaluation" / REPORT_FILE).read_text())
    teacher = json.loads((workdir / "baseline" / REPORT_FILE).read_text())
    unseen = get_dataset("coco_stuff").unseen
    # The official recipe supervises every pixel annotated as unseen with an unseen class.
    assert training["target_coverage"]["unseen_supervised"] >= 0.99
    assert plus.keys() == teacher.keys()
    for report in (plus, teacher):
        assert sorted(report["unseen_classes"]) == sorted(unseen) and report["num_images"] == VAL_IMAGES
    for method, report in (("DenseCLIP+", plus), ("DenseCLIP", teacher)):
        assert f"{method}: miou {report['miou']:.2f}" in run.stdout

    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert again.returncode == 0 and again.stdout.count("complete, skipped") == 5, again.stdout
    # The paper's claim, on this world: DenseCLIP+ well above its teacher on the unseen classes. Not reached yet
    # (docs/reproduction.md): reported as an expected failure with both numbers, never as a pass.
    if plus["miou_unseen"] < teacher["miou_unseen"] + UNSEEN_MARGIN:
        pytest.xfail(f"DenseCLIP+ unseen mIoU {plus['miou_unseen']:.2f} is not {UNSEEN_MARGIN} points above its "
                     f"teacher's {teacher['miou_unseen']:.2f} on the rehearsal world")

"""GPU smoke suite: every CUDA path once, on one GPU, with the shipped tiny CLIP, in under two minutes.

    python -m pytest tests/gpu

The model on cuda in each precision; ``label_images`` on cuda against the CPU's labels; a Ray Data labelling
job with ``--device cuda``; a Ray Train run with ``use_gpu: true`` (mixed precision, the teacher in fp16);
``evaluate.py --checkpoint`` on cuda, locally and on Ray (with ``cuda:1``, which means "the actor's GPU" there).
Without a CUDA device every test is skipped, and the skip says why.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from denseclip.config import LabelerConfig, resolve_vocabulary
from denseclip.dense import dense_features
from denseclip.mask_store import MaskStore
from denseclip.models import load_clip
from denseclip.synthetic import render_scene, write_shards

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device (torch.cuda.is_available() is False): the GPU smoke suite needs one GPU")

ROOT = Path(__file__).resolve().parents[2]
CLASSES = resolve_vocabulary("synthetic")
PRECISIONS = ["fp32", "fp16"] + (["bf16"] if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else [])
AGREEMENT = 0.99  # share of pixels whose label on the GPU is the CPU's (fp32)


def run(script: str, *args, timeout: int = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, str(ROOT / "pipelines" / f"{script}.py"), *map(str, args)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gpu")
    write_shards(3, 16, str(root / "train"), shard_size=8, size=128)
    write_shards(4, 6, str(root / "val"), shard_size=6, size=128)
    return root


@pytest.mark.parametrize("precision", PRECISIONS)
def test_tiny_clip_runs_on_cuda(precision):
    clip = load_clip(device="cuda", precision=precision)
    assert clip.device.type == "cuda"
    images = torch.randn(2, 3, 96, 128, device="cuda")
    features = dense_features(clip.model, images)
    assert features.device.type == "cuda" and features.shape[:1] == (2,) and features.shape[-2:] == (3, 4)
    assert torch.isfinite(features.float()).all()


@pytest.mark.parametrize("precision", PRECISIONS)
def test_label_images_on_cuda_agree_with_the_cpu(precision):
    images = [render_scene(2022, i, size=128).image for i in range(8)]
    on_cpu = LabelerConfig().build(CLASSES).label_images(images)
    on_gpu = LabelerConfig(device="cuda", precision=precision).build(CLASSES).label_images(images)
    agreement = np.mean([(a == b).mean() for (a, _), (b, _) in zip(on_cpu, on_gpu)])
    assert agreement >= AGREEMENT, f"{precision}: {agreement:.4f} of pixels agree with the CPU"
    assert all(conf.dtype == np.float32 and 0 <= conf.min() and conf.max() <= 1 for _, conf in on_gpu)


def test_ray_data_labelling_job_on_cuda(world):
    out = world / "masks"
    args = ["--input", world / "train", "--output", out, "--vocabulary", "synthetic", "--batch-size", "4"]
    done = run("label", *args, "--device", "cuda", "--precision", "fp16")
    assert done.returncode == 0, done.stderr[-4000:]
    store = MaskStore(str(out))
    assert len(store.keys()) == 16 and store.errors() == []
    assert store.provenance["device"] == {"type": "cuda", "precision": "fp16", "tf32": True}
    again = run("label", *args, "--device", "cpu", "--precision", "fp16")  # another device: refused
    assert again.returncode == 2 and "differs in device" in again.stderr, again.stderr[-2000:]


@pytest.fixture(scope="module")
def trained(world) -> Path:
    """A 4-step zero-shot run on one GPU worker: the teacher on the fly (fp16, refined), then self-training,
    the target in mixed precision; returns its final checkpoint."""
    spec = {
        "dataset": "synthetic",
        "data": {"train": str(world / "train"), "val": str(world / "val"), "materialize": True},
        "labeler": {"precision": "fp16"},
        "training": {"setting": "zero_shot", "pseudo_label_refinement": 2, "self_training": True, "iterations": 4,
                     "guided_iterations": 2, "batch_size": 4, "crop_size": 96, "precision": "auto",
                     "target": {"backbone": "clip", "backbone_weights": "clip", "head": "clip_dense",
                                "head_channels": 16, "temperature": 10.0, "freeze_backbone": True}},
        "workers": {"num_workers": 1, "use_gpu": True, "cpus_per_worker": 2, "data_cpus": 1},
        "run": {"name": "gpu-smoke", "storage_path": str(world / "runs"), "checkpoint_every": 2, "log_every": 2},
        "evaluation": {"num_overlays": 1},
    }
    path = world / "train.yaml"
    path.write_text(yaml.safe_dump(spec))
    done = run("train", "--config", path)
    assert done.returncode == 0, done.stderr[-4000:]
    return max((world / "runs" / "gpu-smoke").glob("checkpoint-*"))


def test_ray_train_step_with_use_gpu(trained):
    report = json.loads((trained / "report.json").read_text())
    assert trained.name == "checkpoint-000004" and report["num_images"] == 6  # every val image scored once
    assert [r["phase"] for r in report["training_log"]] == ["guided", "self_training"]
    assert all(np.isfinite(r["loss"]) for r in report["training_log"])
    assert "denseclip" in report


def test_evaluate_checkpoint_on_cuda(world, trained, tmp_path):
    common = ["--checkpoint", trained, "--gt", world / "val", "--dataset", "synthetic"]
    local = run("evaluate", *common, "--device", "cuda", "--out", tmp_path / "local")
    assert local.returncode == 0, local.stderr[-4000:]
    on_ray = run("evaluate", *common, "--ray", "--device", "cuda:1", "--out", tmp_path / "ray")
    assert on_ray.returncode == 0, on_ray.stderr[-4000:]
    reports = [json.loads((tmp_path / name / "report.json").read_text()) for name in ("local", "ray")]
    assert reports[0]["num_images"] == reports[1]["num_images"] == 6
    assert abs(reports[0]["miou"] - reports[1]["miou"]) < 0.5

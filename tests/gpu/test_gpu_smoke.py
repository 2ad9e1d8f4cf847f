"""GPU suite: every CUDA path once, on one GPU (two where two are visible), with the shipped tiny CLIPs, meant to
finish in under three minutes (not yet timed on a GPU).

    python -m pytest tests/gpu -q

Where torch can run a kernel on a GPU, the tests run on ``cuda``. On a machine without any GPU (a laptop, CI) every
test is skipped, and the skip says so. Where ``nvidia-smi`` lists GPUs that torch cannot use (a driver older than
the CUDA the torch wheel was built for, a CPU-only wheel), every test fails with the reason: such a machine never
reports green. ``DENSECLIP_GPU_SUITE_ON_CPU=1`` runs the suite's own code on the CPU instead: a check of the tests
themselves, which proves nothing about a GPU. Covered: both tiny CLIPs on the device in each precision (the ViT with
its four heads); labels on the device against an fp32 CPU labeller's; JPEGs decoded on the device; running out
of device memory (the batch is halved); ``label.py --device cuda:0`` (and ``cuda:1`` with a 2-worker DDP step over
NCCL where two GPUs are visible); the fp16 loss scaler; a CPU checkpoint resumed on the GPU; a Ray Train run with
``use_gpu``; ``evaluate.py --checkpoint`` locally and on Ray; ``benchmarks/bench_gpu.py --quick``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
import yaml
from batches import ray_batch
from PIL import Image

from denseclip.config import LabelerConfig, resolve_vocabulary
from denseclip.dense import dense_features
from denseclip.gpu import cuda_problem
from denseclip.images import decode_image
from denseclip.mask_store import MaskStore
from denseclip.models import load_clip
from denseclip.names import HEADS, TINY_MODEL, TINY_VIT_MODEL
from denseclip.predictor import DenseCLIP
from denseclip.ray.labeling import Labeler, decode_batch
from denseclip.ray.training import (
    TrainJob,
    build_worker,
    read_samples,
    restore_checkpoint,
    save_checkpoint,
    train_on,
)
from denseclip.shards import read_shard
from denseclip.synthetic import render_scene, write_shards

ON_CPU = "DENSECLIP_GPU_SUITE_ON_CPU"
ROOT = Path(__file__).resolve().parents[2]
CLASSES = resolve_vocabulary("synthetic")
AGREEMENT = 0.99  # share of pixels labelled alike on the device (any precision) and by an fp32 CPU labeller
TWO_GPUS = torch.cuda.device_count() >= 2


def _precisions() -> list[str]:
    bf16 = not torch.cuda.is_available() or torch.cuda.is_bf16_supported()
    return ["fp32", "fp16"] + (["bf16"] if bf16 else [])


def run(script: str, *args, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def _agreement(labels: list[np.ndarray], reference: list[np.ndarray]) -> float:
    return float(np.mean([(a == b).mean() for a, b in zip(labels, reference)]))


@pytest.fixture(scope="session", autouse=True)
def device() -> str:
    """``cuda``, or ``cpu`` for the suite's run on the CPU (:data:`ON_CPU`); skips without a GPU, fails with one
    that torch cannot use. (Here, not in a conftest.py: the suite's ``conftest`` would shadow tests/conftest.py,
    which other test modules import.)"""
    if os.environ.get(ON_CPU) == "1":
        return "cpu"
    problem = cuda_problem()
    if problem is None:
        return "cuda"
    why, gpu_present = problem
    if gpu_present:
        pytest.fail(f"the GPU suite cannot run: {why}", pytrace=False)
    pytest.skip(f"the GPU suite needs a GPU: {why}")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gpu")
    write_shards(3, 16, str(root / "train"), shard_size=8, size=128)
    write_shards(4, 6, str(root / "val"), shard_size=6, size=128)
    return root


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    return [render_scene(2022, i, size=128).image for i in range(8)]


def _fp32_on_cpu(config: LabelerConfig):
    """The reference labeller of ``config``: fp32 on the CPU, every other setting as it resolves on its device."""
    return DenseCLIP.from_config(dataclasses.replace(config.resolved(), device="cpu", precision="fp32"), CLASSES)


@pytest.fixture(scope="module")
def cpu_labels(images, device) -> dict[str, list[np.ndarray]]:
    """Each tiny CLIP's labels of ``images`` by the fp32 CPU labeller of its labeller on ``device``."""
    return {model: [labels for labels, _ in _fp32_on_cpu(LabelerConfig(model=model, device=device))
                    .label_images(images)] for model in (TINY_MODEL, TINY_VIT_MODEL)}


@pytest.fixture
def on_ray_gpu(device, monkeypatch):
    """An actor's view outside Ray: the GPU Ray would have assigned is the current one."""
    if device == "cuda":
        monkeypatch.setattr(ray, "get_gpu_ids", lambda: [torch.cuda.current_device()])


# ------------------------------------------------------------------------------------------------ models
@pytest.mark.parametrize("precision", _precisions())
@pytest.mark.parametrize("model", [TINY_MODEL, TINY_VIT_MODEL])
def test_tiny_clips_run_on_the_device(device, model, precision):
    clip = load_clip(model, device=device, precision=precision)
    images = torch.randn(2, 3, 96, 128, device=device)
    for head in HEADS if model == TINY_VIT_MODEL else ["maskclip"]:
        features = dense_features(clip.model, images, head)
        assert features.device.type == device and features.shape[0] == 2, head
        assert torch.isfinite(features.float()).all(), head


@pytest.mark.parametrize("precision", _precisions())
@pytest.mark.parametrize("model", [TINY_MODEL, TINY_VIT_MODEL])
def test_labels_on_the_device_agree_with_an_fp32_cpu_labeller(device, model, precision, images, cpu_labels):
    labeller = DenseCLIP.from_config(LabelerConfig(model=model, device=device, precision=precision), CLASSES)
    on_device = labeller.label_images(images)
    assert _agreement([labels for labels, _ in on_device], cpu_labels[model]) >= AGREEMENT, precision
    assert all(conf.dtype == np.float32 and 0 <= conf.min() and conf.max() <= 1 for _, conf in on_device)
    if device == "cuda":  # what the provenance of a store labelled here says: TF32, and cuDNN tuned per bucket
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert torch.backends.cudnn.benchmark


# ------------------------------------------------------------------------------------------------ the actor
def _jpeg_rows(images: list[np.ndarray]) -> list[dict]:
    rows = []
    for i, image in enumerate(images):
        out = io.BytesIO()
        Image.fromarray(image).save(out, format="JPEG", quality=95)
        rows.append({"key": f"k{i}", "shard": "s", "shard_total": 0, "error": "", "data": out.getvalue()})
    return rows


def test_jpegs_decoded_on_the_device_label_as_decoded_by_pillow(device, images, on_ray_gpu):
    labeler = Labeler(LabelerConfig(model="denseclip-tiny-shapes", device=device, precision="fp16"), CLASSES)
    rows = ray_batch(_jpeg_rows(images))
    deferred = decode_batch(rows, defer_jpeg=True)
    assert all(deferred["jpeg"])  # decoding forced onto the actor's device
    on_device = labeler.label_batch(deferred)
    by_pillow = labeler.label_batch(decode_batch(rows))
    assert not any(on_device["error"]) and _agreement(list(on_device["labels"]), list(by_pillow["labels"])) >= 0.98


def test_running_out_of_device_memory_halves_the_batch(device, images, on_ray_gpu):
    labeler = Labeler(LabelerConfig(model="denseclip-tiny-shapes", device=device, precision="fp16", batch_size=5), CLASSES)
    batch = ray_batch([{"key": f"k{i}", "shard": "s", "shard_total": 0, "error": "", "image": im}
                       for i, im in enumerate(images[:5])])
    expected = labeler.label_batch(batch)
    real, calls = labeler.dense_clip.label_maps, []

    def label_maps(chunk):
        calls.append(len(chunk))
        if len(chunk) > 2:  # more than any device holds: the device's own allocator raises
            torch.empty(1 << 60, dtype=torch.uint8, device=device)
        return real(chunk)

    labeler.dense_clip.label_maps = label_maps
    out = labeler.label_batch(batch)
    assert calls == [5, 2, 2, 1] and not any(out["error"])
    # Batches of other sizes may get other cuDNN kernels: labels alike up to the rare pixel at a tie.
    assert _agreement(list(out["labels"]), list(expected["labels"])) >= 0.999


# ------------------------------------------------------------------------------------------------ label.py
@pytest.mark.parametrize("ordinal", [0, pytest.param(1, marks=pytest.mark.skipif(
    not TWO_GPUS, reason="cuda:1 needs two visible GPUs"))])
def test_label_py_on_a_cuda_ordinal(device, world, ordinal, tmp_path):
    out = tmp_path / "masks"
    requested = f"{device}:{ordinal}" if device == "cuda" else device
    args = ["--input", world / "train", "--output", out, "--classes", "synthetic", "--model", "denseclip-tiny-shapes", "--batch-size", "4"]
    done = run("pipelines/label.py", *args, "--device", requested, "--precision", "fp16")
    assert done.returncode == 0, done.stderr[-4000:]
    store = MaskStore(str(out))
    assert len(store.keys()) == 16 and store.errors() == []
    assert store.provenance["device"] == {"type": device, "precision": "fp16", "tf32": device == "cuda"}
    decoded = {sample["__key__"]: decode_image(sample["jpg"]) for shard in sorted((world / "train").glob("*.tar"))
               for sample in read_shard(str(shard))}
    keys = sorted(decoded)
    reference = _fp32_on_cpu(LabelerConfig(model="denseclip-tiny-shapes", device=requested)).label_images([decoded[key] for key in keys])
    assert _agreement([store.get(key) for key in keys], [labels for labels, _ in reference]) >= AGREEMENT
    if device == "cuda":  # the same output labelled on another device: refused
        again = run("pipelines/label.py", *args, "--device", "cpu", "--precision", "fp16")
        assert again.returncode == 2 and "differs in device" in again.stderr, again.stderr[-2000:]


# ------------------------------------------------------------------------------------------------ training
def _job(world: Path, device: str, name: str, workers: int = 1, **training) -> dict:
    """A zero-shot job: the teacher on the fly (fp16, refined), then self-training, the target in mixed
    precision."""
    return {
        "dataset": "synthetic",
        "data": {"train": str(world / "train"), "val": str(world / "val"), "materialize": True},
        "labeler": {"precision": "fp16", "device": device},
        "training": {"setting": "zero_shot", "pseudo_label_refinement": 2, "self_training": True, "iterations": 4,
                     "guided_iterations": 2, "batch_size": 4, "crop_size": 96, "precision": "auto",
                     "target": {"backbone": "clip", "backbone_weights": "clip", "head": "clip_dense",
                                "head_channels": 16, "temperature": 10.0, "freeze_backbone": True}, **training},
        "workers": {"num_workers": workers, "use_gpu": device == "cuda", "cpus_per_worker": 2 if device == "cuda"
                    else 0.5, "data_cpus": 0.5},
        "run": {"name": name, "storage_path": str(world / "runs"), "checkpoint_every": 2, "log_every": 2},
        "evaluation": {"num_overlays": 1},
    }


def _rows(world: Path) -> list[dict]:
    return [row for shard in sorted((world / "train").glob("*.tar"))
            for row in read_samples({"shard": str(shard)}, len(CLASSES), True, None)]


def test_fp16_loss_scaling_and_a_cpu_checkpoint_resumed_on_the_device(device, world, tmp_path):
    job = TrainJob.from_dict(_job(world, device, "scaler", precision="fp16"))
    rows = _rows(world)
    on_cpu = build_worker(job, 0, 1, torch.device("cpu"))
    train_on(on_cpu, ray_batch(rows[:4]), 0)
    save_checkpoint(str(tmp_path), on_cpu.model, on_cpu.optimizer, 1, job, {"log": [], "validation": []},
                    on_cpu.precision)
    worker = build_worker(job, 0, 1, torch.device(device))
    assert worker.precision.name == "fp16" and isinstance(worker.precision.scaler, torch.amp.GradScaler)
    step, _ = restore_checkpoint(str(tmp_path), worker.model, worker.optimizer, worker.precision)
    assert step == 1
    momentum = [s["momentum_buffer"] for s in worker.optimizer.state.values()]
    assert momentum and all(m.device.type == device for m in momentum)
    for name, p in worker.model.state_dict().items():
        torch.testing.assert_close(p.cpu(), on_cpu.model.state_dict()[name], msg=name)
    scale = worker.precision.scaler.get_scale()
    before = [p.detach().clone() for p in worker.model.parameters() if p.requires_grad]
    losses = [train_on(worker, ray_batch(rows[4 * s:4 * s + 4]), s)[0] for s in (1, 2, 3)]
    assert all(torch.isfinite(loss) for loss in losses)
    after = [p for p in worker.model.parameters() if p.requires_grad]
    # The scaler either let a step through or, every step overflowing at its scale, lowered the scale.
    assert any(not torch.equal(a, b) for a, b in zip(before, after)) or worker.precision.scaler.get_scale() < scale


@pytest.fixture(scope="module")
def trained(world, device) -> Path:
    """A 4-step zero-shot run on one GPU worker (Ray Train, ``use_gpu``); returns its final checkpoint."""
    path = world / "train.yaml"
    path.write_text(yaml.safe_dump(_job(world, device, "gpu-smoke")))
    done = run("pipelines/train.py", "--config", path, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return max((world / "runs" / "gpu-smoke").glob("checkpoint-*"))


def test_ray_train_run_with_use_gpu(trained):
    report = json.loads((trained / "report.json").read_text())
    assert trained.name == "checkpoint-000004" and report["num_images"] == 6  # every val image scored once
    assert [r["phase"] for r in report["training_log"]] == ["guided", "self_training"]
    assert all(np.isfinite(r["loss"]) for r in report["training_log"])
    assert "denseclip" in report


def test_two_workers_train_a_vit_with_ddp_over_nccl(device, world):
    """A ViT trunk with ClearCLIP's head leaves the last block's MLP unused: DDP needs it frozen (the suite's CPU
    run takes the same steps over gloo)."""
    if device == "cuda" and not TWO_GPUS:
        pytest.skip("a 2-worker DDP step over NCCL needs two visible GPUs")
    spec = _job(world, device, "ddp", workers=2, iterations=3, guided_iterations=1,
                target={"backbone": "clip", "backbone_weights": "clip", "head": "clip_dense", "head_channels": 16})
    spec["labeler"] = {**spec["labeler"], "model": TINY_VIT_MODEL, "head": "clearclip"}
    path = world / "ddp.yaml"
    path.write_text(yaml.safe_dump(spec))
    done = run("pipelines/train.py", "--config", path, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((max((world / "runs" / "ddp").glob("checkpoint-*")) / "report.json").read_text())
    assert report["inputs"]["workers"] == 2 and all(np.isfinite(r["loss"]) for r in report["training_log"])


def test_evaluate_checkpoint_on_the_device_locally_and_on_ray(device, world, trained, tmp_path):
    common = ["--checkpoint", trained, "--input", world / "val", "--classes", "synthetic"]
    local = run("pipelines/evaluate.py", *common, "--device", device, "--output", tmp_path / "local")
    assert local.returncode == 0, local.stderr[-4000:]
    # On Ray, cuda:1 means "the actor's GPU", whatever GPUs the node has.
    on_ray = run("pipelines/evaluate.py", *common, "--ray", "--device", "cuda:1" if device == "cuda" else device,
                 "--output", tmp_path / "ray")
    assert on_ray.returncode == 0, on_ray.stderr[-4000:]
    reports = [json.loads((tmp_path / name / "report.json").read_text()) for name in ("local", "ray")]
    assert reports[0]["num_images"] == reports[1]["num_images"] == 6
    assert abs(reports[0]["miou"] - reports[1]["miou"]) < 0.5


# ------------------------------------------------------------------------------------------------ benchmark
def test_bench_gpu_quick_runs_end_to_end(device):
    done = run("benchmarks/bench_gpu.py", "--device", device, "--quick", timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith("| ")][1:]
    stages = {cells[0].strip() for cells in rows}
    assert {"gemm", "model", "decode", "pipeline"} <= stages
    rates = [cells[2].strip() for cells in rows if cells[0].strip() in ("model", "decode", "pipeline")]
    assert all(float(rate) > 0 for rate in rates), rates

"""Device bugs caught without a GPU: tensors the project creates without saying where (they would land on the
CPU and meet a GPU tensor), CUDA ordinals on Ray paths and elsewhere, the training step's mixed precision."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from batches import ray_batch
from pipeline_scripts import load_pipeline
from torch.overrides import TorchFunctionMode

import denseclip.config
from denseclip.config import ConfigError, LabelerConfig, cpu_has_native_bf16, resolve_vocabulary
from denseclip.evaluation import Evaluation
from denseclip.models import check_device
from denseclip.plus.amp import MixedPrecision, resolve_precision
from denseclip.predictor import DenseCLIP
from denseclip.ray.devices import assigned_device
from denseclip.ray.labeling import Labeler, decode_batch, device_settings, read_shard_rows
from denseclip.ray.training import TrainJob, build_worker, read_samples, train_on
from denseclip.robustness import CLEAN
from denseclip.synthetic import write_shards

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(denseclip.config.__file__).resolve().parent
CPU = torch.device("cpu")

# Factory functions that put a new tensor on the default (CPU) device unless given ``device=``.
FACTORIES = (torch.arange, torch.zeros, torch.ones, torch.full, torch.empty, torch.empty_strided, torch.tensor,
             torch.as_tensor, torch.scalar_tensor, torch.rand, torch.randn, torch.randint, torch.randperm,
             torch.linspace, torch.logspace, torch.eye)
# Calls that may do so: each one's tensor is moved to the model's device by its caller (file, function, factory).
ALLOWED = {
    # class_of_name (N,) is built on the host and moved to the model's device by DenseCLIP.__init__.
    ("text.py", "class_embeddings", "tensor"),
}


class HostTensorAudit(TorchFunctionMode):
    """Records the factory calls made directly from files under ``root`` without a ``device`` (``calls``:
    ``(path relative to root, function, factory) -> count``). ``torch.tensor(t)`` / ``torch.as_tensor(t)`` of a
    tensor ``t`` stay on ``t``'s device and are not recorded."""

    def __init__(self, root: Path):
        super().__init__()
        self.root = f"{root}{os.sep}"
        self.calls: Counter[tuple[str, str, str]] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        copies_a_tensor = func in (torch.tensor, torch.as_tensor) and args and isinstance(args[0], torch.Tensor)
        if func in FACTORIES and kwargs.get("device") is None and not copies_a_tensor:
            caller = sys._getframe(1).f_code  # the factories are builtins: frame 1 is the line that called one
            if caller.co_filename.startswith(self.root):
                self.calls[(caller.co_filename[len(self.root):], caller.co_name, func.__name__)] += 1
        return func(*args, **kwargs)


def test_the_audit_sees_a_factory_call_without_device():
    with HostTensorAudit(Path(__file__).resolve().parent) as audit:
        torch.zeros(2)
        torch.arange(3, device="cpu")
        torch.as_tensor(torch.ones(1, device="cpu"))
        torch.nn.Linear(2, 2)  # torch's own factories, called from torch's files: not ours to check
    assert audit.calls == Counter({("test_devices.py", "test_the_audit_sees_a_factory_call_without_device",
                                    "zeros"): 1})


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    return write_shards(seed=8, n=4, out=str(tmp_path_factory.mktemp("audit")), shard_size=4, size=64)


def _job(shards: list[str], precision: str) -> TrainJob:
    """A zero-shot job exercising every on-device path of a step: the teacher on the fly with refinement,
    a guided step then a self-training step, a learnt background, mixed precision."""
    return TrainJob.from_dict({
        "dataset": "synthetic", "data": {"train": shards, "val": shards}, "labeler": {"model": "denseclip-tiny-shapes"},
        "training": {"setting": "zero_shot", "pseudo_label_refinement": 2, "self_training": True, "iterations": 2,
                     "guided_iterations": 1, "batch_size": 2, "crop_size": 48, "precision": precision,
                     "target": {"backbone": "clip", "backbone_weights": "clip", "head": "deeplabv3plus",
                                "output_stride": 16, "aspp_rates": [1, 2], "head_channels": 16,
                                "learn_background": True}},
        "run": {"name": "audit"}})


def test_worker_setup_steps_and_labeller_create_no_tensor_off_the_device(shards):
    job = _job(shards, "fp16")  # fp16 on a CPU: the loss scaler's path too
    rows = [row for shard in shards for row in read_samples({"shard": shard}, job.info.num_classes, True, None)]
    labeller_rows = [row for shard in shards for row in read_shard_rows(shard)]
    with HostTensorAudit(PACKAGE) as audit:
        worker = build_worker(job, 0, 1, CPU)
        losses = [train_on(worker, ray_batch(rows[2 * step:2 * step + 2]), step)[0] for step in range(2)]
        evaluation = Evaluation(job.info.num_classes, num_overlays=1)
        for labeler in (worker.model, worker.labeler, worker.teacher.predictor):
            evaluation.add_labelled(labeler, CLEAN, [(r["key"], r["image"], r["label"]) for r in rows])
        out = Labeler(LabelerConfig(model="denseclip-tiny-shapes"), resolve_vocabulary("synthetic")).label_batch(
            decode_batch(ray_batch(labeller_rows)))
    assert worker.precision.name == "fp16" and worker.precision.scaler is not None
    assert all(torch.isfinite(loss) for loss in losses) and evaluation.num_images == 3 * len(rows)
    assert not any(out["error"])
    assert {call for call in audit.calls if call not in ALLOWED} == set(), audit.calls
    assert audit.calls  # the allowed call was met: the audit watched the project's code


# ------------------------------------------------------------------------------------------ CUDA ordinals
def test_cuda_ordinals_on_ray_paths_mean_the_gpu_ray_assigned():
    assert assigned_device("cuda:1", [3]) == "cuda:0"  # Ray made GPU 3 the actor's only visible device
    assert assigned_device("cuda", ["0"]) == "cuda:0"
    assert assigned_device("cuda:1", [3], visible_devices_set=False) == "cuda:3"  # every GPU of the node visible
    assert assigned_device("cpu", []) == "cpu"
    with pytest.raises(ValueError, match="assigned no GPU"):
        assigned_device("cuda:1", [])


@pytest.mark.skipif(torch.cuda.device_count() > 1, reason="needs a machine with at most one GPU")
def test_a_cuda_ordinal_that_does_not_exist_is_refused_elsewhere(tmp_path):
    missing = f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(ConfigError, match=f"--device: {missing} does not exist on this machine"):
        check_device(missing, "--device")
    with pytest.raises(ConfigError, match=f"device: {missing} does not exist"):
        DenseCLIP.from_config(LabelerConfig(device=missing), [["red circle"]])
    for bad in ("cuda:x", "gpu", "cuda:-1", "cuda:1:2"):
        with pytest.raises(ConfigError, match="labeler.device: must be auto, cpu, cuda or cuda:N"):
            LabelerConfig.from_dict({"device": bad})
    evaluate = load_pipeline("evaluate")
    args = ["--model", "denseclip-tiny-shapes", "--input", str(tmp_path), "--classes", "synthetic",
            "--output", str(tmp_path / "out"), "--device", missing]
    done = subprocess.run([sys.executable, evaluate.__file__, *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, check=False)
    assert done.returncode == 2 and f"--device: {missing} does not exist" in done.stderr, done.stderr[-2000:]


def test_training_refuses_a_cuda_teacher_on_cpu_workers(shards):
    spec = _job(shards, "auto").to_dict()
    spec["labeler"]["device"] = "cuda:1"
    with pytest.raises(ConfigError, match="labeler.device: .*workers.use_gpu"):
        TrainJob.from_dict(spec)
    spec["workers"]["use_gpu"] = True  # the teacher then runs on the worker's GPU, whatever ordinal is named
    TrainJob.from_dict(spec)


# ------------------------------------------------------------------------------------------ precision
def test_precision_defaults_and_provenance():
    assert resolve_precision("auto", CPU) == "fp32" and MixedPrecision.for_device("auto", CPU).dtype is None
    assert MixedPrecision.for_device("bf16", CPU).scaler is None  # bf16 needs no loss scaling
    assert device_settings(LabelerConfig(precision="fp32")) == {"type": "cpu", "precision": "fp32", "tf32": False}
    # The labeller's "auto" is recorded as what it resolves to: bf16 only on CPUs that compute in it natively.
    native = "bf16" if cpu_has_native_bf16() else "fp32"
    assert device_settings(LabelerConfig())["precision"] == native
    assert device_settings(LabelerConfig(device="cuda"))["precision"] == "fp16"
    on_gpu = device_settings(LabelerConfig(device="cuda:3", precision="fp16"))
    assert on_gpu == {"type": "cuda", "precision": "fp16", "tf32": True}

"""Checkpoints of a DenseCLIP+ run: save, read back and resume, and the progress reported with each of them."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import tempfile

import ray
import ray.train
import safetensors.torch
import torch
import torch.distributed as dist

from denseclip import storage
from denseclip.models import load_clip
from denseclip.names import DEFAULT_HEAD, RESIZE_AUTO, RESIZE_NATIVE
from denseclip.plus.amp import FP32, MixedPrecision
from denseclip.plus.target import SegmentationTarget, TargetConfig, build_target
from denseclip.plus.training import COVERAGE_COUNTS, PHASES, target_coverage
from denseclip.ray.training.job import TrainJob
from denseclip.ray.training.worker import _Worker
from denseclip.report import write_report

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
STATE_FILE = "training_state.pt"
META_FILE = "checkpoint.json"
REPORT_FILE = "report.json"
# What the evaluation writes next to the final checkpoint (denseclip.report.write_report).
REPORT_FILES = (REPORT_FILE, "index.html", "tables.md", "confusion.png", "overlays/")


def _target_dict(target: TargetConfig) -> dict:
    out = dataclasses.asdict(target)
    out["aspp_rates"] = None if target.aspp_rates is None else list(target.aspp_rates)
    return out


def save_checkpoint(directory: str, model: SegmentationTarget, optimizer: torch.optim.Optimizer, step: int,
                    job: TrainJob, history: dict, precision: MixedPrecision = FP32) -> None:
    """Write a checkpoint folder: ``model.safetensors`` (the target's weights), ``training_state.pt``
    (optimizer, fp16 loss scaler and step, read back with ``weights_only=True``) and ``checkpoint.json`` (what
    the network is, the job, ``history`` = the training log and validation records so far)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    safetensors.torch.save_file(state, os.path.join(directory, MODEL_FILE))
    torch.save({"optimizer": optimizer.state_dict(), "scaler": precision.state_dict(), "step": step},
               os.path.join(directory, STATE_FILE))
    meta = {"step": step, "dataset": job.dataset, "class_names": list(job.info.class_names),
            "clip_model": job.labeler.model, "clip_head": job.labeler.head, "target": _target_dict(job.training.target),
            "job": job.to_dict(), **history}
    with open(os.path.join(directory, META_FILE), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)


def read_checkpoint_meta(path: str) -> dict:
    """``checkpoint.json`` of the checkpoint folder ``path`` (local or fsspec URL)."""
    return json.loads(storage.read_bytes(storage.join(path, META_FILE)))


def load_target_checkpoint(path: str, device: str | torch.device = "cpu",
                           resize_to: tuple[int, int] | str | None = RESIZE_AUTO) -> SegmentationTarget:
    """The trained target network of the checkpoint folder ``path`` (local or fsspec URL), in eval mode, ready
    for ``predict`` / ``label_images``. Its architecture comes from ``checkpoint.json``; no CLIP weights are
    read. ``label_images`` scores at ``resize_to`` (``(long, short)``, None or "native": as the images are),
    by default ("auto") at the job's ``training.resize_to``, as the official test pipeline does."""
    meta = read_checkpoint_meta(path)
    # Checkpoints from before the classifier was a choice used the cosine one.
    target = {"classifier": "cosine", **meta["target"], "backbone_weights": None}
    target["aspp_rates"] = None if target["aspp_rates"] is None else tuple(target["aspp_rates"])
    state = safetensors.torch.load(storage.read_bytes(storage.join(path, MODEL_FILE)))
    config = TargetConfig(**target)
    clip = load_clip(meta["clip_model"], "random") if config.backbone == "clip" else None
    model = build_target(config, state["classifier.embeddings"], state["classifier.class_of_name"], clip=clip,
                         clip_head=meta.get("clip_head", DEFAULT_HEAD))
    model.load_state_dict(state, strict=True)
    model.resize_to = scoring_resize(meta, resize_to)
    return model.to(device).eval()


def scoring_resize(meta: dict, resize_to: tuple[int, int] | str | None = RESIZE_AUTO) -> tuple[int, int] | None:
    """The keep-ratio resize the target of a checkpoint (``meta``: its ``checkpoint.json``) scores images at:
    ``resize_to``, "auto" meaning the job's ``training.resize_to``; None for "native" or None."""
    if resize_to == RESIZE_AUTO:
        resize_to = meta.get("job", {}).get("training", {}).get("resize_to")
    return None if resize_to in (None, RESIZE_NATIVE) else tuple(resize_to)


def restore_checkpoint(path: str, model: SegmentationTarget, optimizer: torch.optim.Optimizer,
                       precision: MixedPrecision = FP32) -> tuple[int, dict]:
    """Load weights, optimizer and loss-scaler state from the checkpoint folder ``path`` (local or fsspec
    URL); returns ``(step, history)``."""
    device = model.mean.device
    state = safetensors.torch.load(storage.read_bytes(storage.join(path, MODEL_FILE)))
    model.load_state_dict(state, strict=True)
    training = torch.load(io.BytesIO(storage.read_bytes(storage.join(path, STATE_FILE))), map_location=device,
                          weights_only=True)
    optimizer.load_state_dict(training["optimizer"])
    precision.load_state_dict(training.get("scaler", {}))
    meta = read_checkpoint_meta(path)
    return training["step"], {"log": meta.get("log", []), "validation": meta.get("validation", []),
                              "target_coverage": meta.get("target_coverage", {})}


def _report(worker: _Worker, metrics: dict, step: int, history: dict, final: dict | None = None,
            with_checkpoint: bool = True) -> None:
    """``ray.train.report`` on every worker (it is a barrier); with a checkpoint, rank 0 attaches it, and with
    ``final`` = ``{"summary", "conf", "samples"}`` the evaluation report next to it."""
    if not with_checkpoint:
        ray.train.report(metrics)
        return
    _gather_coverage(worker, history)
    with tempfile.TemporaryDirectory() as directory:
        if worker.rank == 0:
            save_checkpoint(directory, worker.model, worker.optimizer, step, worker.job, history, worker.precision)
            if final is not None:
                info = worker.job.info
                reference = "ground truth" if worker.job.has_ground_truth else "DenseCLIP (teacher)"
                write_report(directory, final["summary"], final["conf"], info.class_names, info.palette,
                             final["samples"], reference=reference)
        checkpoint = ray.train.Checkpoint.from_directory(directory) if worker.rank == 0 else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint-{step:06d}")


def _gather_coverage(worker: _Worker, history: dict) -> None:
    """Add every worker's target counts since the last checkpoint to ``history["target_coverage"]`` (pixel
    counts per phase, saved with the checkpoint, so a resumed run counts each step once); on every worker."""
    counts = worker.coverage
    if worker.world_size > 1:
        dist.all_reduce(counts)
    totals = history.setdefault("target_coverage", {})
    for name, row in zip(PHASES, counts.tolist()):
        if any(row):
            totals[name] = [a + b for a, b in zip(totals.get(name, [0] * len(row)), row)]
    counts.zero_()


def _coverage_report(history: dict, setting: str) -> dict:
    """``target_coverage`` over the whole run and ``target_coverage_by_phase`` (see ``target_coverage``)."""
    by_phase = history.get("target_coverage", {})
    total = [sum(column) for column in zip(*by_phase.values())] or [0] * len(COVERAGE_COUNTS)
    return {"target_coverage": target_coverage(total, setting),
            "target_coverage_by_phase": {name: target_coverage(row, setting) for name, row in by_phase.items()}}


def _resume(worker: _Worker) -> tuple[int, dict, bool]:
    """Continue from this run's latest checkpoint (after a failure or a re-run), else from
    ``run.resume_from``. Returns ``(first step, history, finished)``; ``finished``: this run's final
    checkpoint already exists."""
    own = ray.train.get_checkpoint()
    if own is not None:
        with own.as_directory() as directory:
            step, history = restore_checkpoint(directory, worker.model, worker.optimizer, worker.precision)
            finished = os.path.exists(os.path.join(directory, REPORT_FILE))
    elif worker.job.run.resume_from:
        step, history = restore_checkpoint(worker.job.run.resume_from, worker.model, worker.optimizer,
                                           worker.precision)
        finished = False
    else:
        return 0, {"log": [], "validation": [], "target_coverage": {}}, False
    log.info("rank %d resumes at step %d", worker.rank, step)
    return step, history, finished

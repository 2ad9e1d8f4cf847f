"""The job on Ray Train: the inputs checked on the driver, the loop each worker runs, the ``TorchTrainer`` and the
driver that runs it."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import ray
import ray.train.torch
import ray.util.queue
import torch
import torch.distributed as dist
from ray.train.torch import TorchTrainer
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from denseclip import storage
from denseclip.config import ConfigError
from denseclip.damage import DamagedPartError
from denseclip.mask_store import MaskStore
from denseclip.models import ModelLoadError, check_weights
from denseclip.ray.training.checkpoints import (
    REPORT_FILE,
    _report,
    _resume,
    _target_dict,
    read_checkpoint_meta,
)
from denseclip.ray.training.data import build_datasets
from denseclip.ray.training.evaluation import _evaluate_target, _finish, _headline, _summary
from denseclip.ray.training.job import TrainJob, _fail
from denseclip.ray.training.worker import StepCallback, _batches, _setup_worker, _Worker, train_on
from denseclip.shards import expand_shards

log = logging.getLogger(__name__)
TrainingFailedError = ray.train.TrainingFailedError


def check_inputs(job: TrainJob) -> None:
    """Check what the job reads before any cluster work: the shards exist, the mask store holds masks of this
    dataset's vocabulary, ``run.resume_from`` is a checkpoint of the same target, the teacher's weights can be
    had (offline: one line, not a traceback from every worker). Raises ``ConfigError``."""
    try:
        check_weights(job.labeler.model, job.labeler.pretrained)
    except ModelLoadError as exc:
        raise ConfigError(f"labeler: {exc}") from exc
    for name in ("train", "val"):
        try:
            expand_shards(getattr(job.data, name))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"data.{name}: {exc}") from exc
    if job.training.uses_pseudo_labels and job.training.pseudo_labels == "precomputed":
        try:
            provenance = MaskStore(job.data.mask_store, skip_damaged=job.data.skip_damaged).provenance
        except DamagedPartError as exc:
            _fail("data", "mask_store", job.data.mask_store, f"has a damaged part: {exc} (data.skip_damaged: true "
                  "trains on the rest)")
        if provenance is None:
            _fail("data", "mask_store", job.data.mask_store, "holds no committed masks")
        vocabulary = provenance.get("vocabulary")
        if vocabulary is not None and vocabulary != job.teacher_classes:
            if job.teacher_class_ids is not None and vocabulary == [list(c) for c in job.info.classes]:
                _fail("data", "mask_store", job.data.mask_store, f"holds each pixel's argmax over all the "
                      f"{job.dataset} classes; zero-shot targets take the teacher's argmax among the unseen classes "
                      "(a pixel annotated unseen whose argmax is a seen class would go unsupervised): label with the "
                      "unseen classes' vocabulary, as denseclip reproduce does")
            _fail("data", "mask_store", job.data.mask_store, f"was labelled with another vocabulary than the "
                  f"{'unseen ' if job.teacher_class_ids is not None else ''}{job.dataset} classes (its label ids "
                  "would mean other classes)")
    if job.run.resume_from:
        try:
            meta = read_checkpoint_meta(job.run.resume_from)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"run.resume_from: not a DenseCLIP+ checkpoint ({exc})") from exc
        ours = _target_dict(job.training.target)
        changed = sorted(k for k in ours if k != "backbone_weights" and meta["target"].get(k) != ours[k])
        if changed or meta["class_names"] != job.info.class_names:
            _fail("run", "resume_from", job.run.resume_from, "holds another target network (differs in "
                  f"{', '.join(changed) or 'classes'}) than training.target")


def train_loop_per_worker(config: dict) -> None:
    """The ``TorchTrainer`` loop: ``config = {"job": TrainJob, "callbacks": [StepCallback, ...]}``."""
    job: TrainJob = config["job"]
    callbacks: Sequence[StepCallback] = config.get("callbacks", ())
    training = job.training
    worker = _setup_worker(job)
    start, history, finished = _resume(worker)
    if finished:
        return
    if worker.world_size > 1:
        worker.trained = ray.train.torch.prepare_model(worker.model, move_to_device=False)
    batches = _batches(ray.train.get_dataset_shard("train"), training.batch_size // worker.world_size,
                       job.data.shuffle_buffer)
    validation_steps = job.validation_steps()
    losses: list[torch.Tensor] = []
    for step in range(start, training.iterations):
        loss, step_phase, lr = train_on(worker, next(batches), step, callbacks)
        losses.append(loss)
        done = step + 1
        metrics = {}
        if done % job.run.log_every == 0 or done == training.iterations:
            metrics = {"step": done, "phase": step_phase, "lr": lr, "loss": _mean_over_workers(losses, worker)}
            history["log"].append(metrics)
            losses = []
        if done == training.iterations:
            break
        if done in validation_steps:
            evaluation = _evaluate_target(worker, 0)
            record = {"step": done, "phase": step_phase, **_headline(_summary(evaluation.matrix(), job))}
            history["validation"].append(record)
            metrics = {**metrics, "step": done, **{f"val_{k}": v for k, v in record.items() if k != "step"}}
        with_checkpoint = done % job.run.checkpoint_every == 0
        if metrics or with_checkpoint:
            _report(worker, metrics or {"step": done}, done, history, with_checkpoint=with_checkpoint)
    batches.close()
    _finish(worker, history, max(start, training.iterations))


def _mean_over_workers(losses: list[torch.Tensor], worker: _Worker) -> float:
    value = torch.stack(losses).double().mean()
    if worker.world_size > 1:
        dist.all_reduce(value)
    return float(value) / worker.world_size


class TrainingData(ray.train.DataConfig):
    """How the workers share the data: ``train`` in equal splits (every worker takes the same number of steps
    per epoch, Ray's default), ``val`` in splits that together hold every row exactly once (``equal=False``:
    an equal split would drop the remainder), so each validation image is decoded and scored by one worker."""

    def __init__(self) -> None:
        super().__init__(datasets_to_split=["train", "val"])

    def configure(self, datasets: dict, world_size: int, worker_handles, worker_node_ids, **kwargs) -> list[dict]:
        others = {name: ds for name, ds in datasets.items() if name != "val"}
        output = super().configure(others, world_size, worker_handles, worker_node_ids, **kwargs)
        if "val" in datasets:
            if datasets["val"].name is None:
                datasets["val"].set_name("val")
            val = datasets["val"].copy(datasets["val"])
            val.context.execution_options = self.default_ingest_options()
            for rank, split in enumerate(val.streaming_split(world_size, equal=False,
                                                             locality_hints=worker_node_ids)):
                output[rank]["val"] = split
        return output


@dataclass
class TrainResult:
    """A finished run: the final checkpoint folder (local path or URL), its ``report.json``, the last
    metrics."""

    checkpoint: str
    report: dict
    metrics: dict


def _storage_path(job: TrainJob) -> str:
    path = job.run.storage_path
    return os.path.abspath(path) if storage.is_local(path) else path


def run_folder(job: TrainJob) -> str:
    """Where Ray Train keeps the run: ``<storage_path>/<name>`` (local paths made absolute)."""
    return storage.join(_storage_path(job), job.run.name)


def build_trainer(job: TrainJob, callbacks: Sequence[StepCallback] = (),
                  run_callbacks: Sequence[ray.train.UserCallback] = ()) -> TorchTrainer:
    """The ``TorchTrainer`` of ``job`` on the connected Ray cluster (checking that the workers leave CPUs for
    Ray Data); ``callbacks`` run on every worker at every step, ``run_callbacks`` in Ray Train's controller."""
    cpus = float(ray.cluster_resources().get("CPU", 0))
    reserved = job.workers.num_workers * job.workers.cpus_per_worker
    if reserved + job.workers.data_cpus > cpus:
        raise ConfigError(
            f"workers: {job.workers.num_workers} x {job.workers.cpus_per_worker:g} CPUs for training plus "
            f"{job.workers.data_cpus:g} for reading leave nothing of the cluster's {cpus:g} CPUs (Ray would "
            "wait forever): lower workers.cpus_per_worker or workers.data_cpus")
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job, "callbacks": list(callbacks)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=job.workers.num_workers, use_gpu=job.workers.use_gpu,
            resources_per_worker={"CPU": job.workers.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=job.run.name, storage_path=_storage_path(job),
            failure_config=ray.train.FailureConfig(max_failures=job.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=job.run.keep_checkpoints),
            callbacks=list(run_callbacks)),
        datasets=build_datasets(job),
        dataset_config=TrainingData(),
    )


ReportCallback = Callable[[dict], None]


class _ForwardReports(ray.train.UserCallback):
    """In Ray Train's controller: hands rank 0's metrics of every report (with ``checkpoint``: the folder of
    the checkpoint it carried) to the driver through ``queue``."""

    def __init__(self, queue: ray.util.queue.Queue):
        self.queue = queue

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        if not metrics:
            return
        try:
            self.queue.put({**metrics[0], **({"checkpoint": checkpoint.path} if checkpoint is not None else {})})
        except ray.exceptions.RayError as exc:  # progress lines are not worth failing the run (Ray Train would)
            log.warning("a progress record could not reach the driver: %s", exc)


@contextlib.contextmanager
def _reports_to(on_report: ReportCallback | None) -> Iterator[list[ray.train.UserCallback]]:
    """The controller callbacks that make ``on_report(record)`` run on this driver, in a thread, for every
    report of the run (none when ``on_report`` is None); every record is delivered when the block ends."""
    if on_report is None:
        yield []
        return
    # No CPU: it must never wait for the workers'. On the driver's node: a worker node may be lost mid-run, and
    # with it any actor placed there (tests/test_multinode.py kills one).
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    queue = ray.util.queue.Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
    finished = threading.Event()

    def deliver() -> None:
        while True:
            try:
                record = queue.get(timeout=0.5)
            except ray.util.queue.Empty:
                if finished.is_set():
                    return
                continue
            on_report(record)

    thread = threading.Thread(target=deliver, name="train-reports", daemon=True)
    thread.start()
    try:
        yield [_ForwardReports(queue)]
    finally:
        finished.set()
        thread.join()
        queue.shutdown()


def run_training(job: TrainJob, callbacks: Sequence[StepCallback] = (),
                 on_report: ReportCallback | None = None) -> TrainResult:
    """Train on the connected Ray cluster and return the final checkpoint and its report. ``on_report(record)``
    sees, on this driver, every metrics record the workers report (``step``, ``phase``, ``loss``, ``lr``,
    ``val_*``; ``checkpoint``: its folder when one was saved)."""
    # Every worker's pass over its data would draw a progress bar; the metrics already show progress.
    ray.data.DataContext.get_current().enable_progress_bars = False
    with _reports_to(on_report) as run_callbacks:
        result = build_trainer(job, callbacks, run_callbacks).fit()
    if result.checkpoint is None:
        raise RuntimeError(f"run {job.run.name} ended without a checkpoint")
    path = result.checkpoint.path
    if not storage.is_local(job.run.storage_path):
        path = f"{job.run.storage_path.split('://')[0]}://{path}"
    report = json.loads(storage.read_bytes(storage.join(path, REPORT_FILE)))
    return TrainResult(path, report, dict(result.metrics or {}))

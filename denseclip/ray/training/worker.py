"""One training worker: what it holds and one step of Algorithm 1 on its share of the data."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import ray
import ray.train.torch
import torch
from torch import nn

from denseclip.gpu import to_device
from denseclip.plus.amp import MixedPrecision
from denseclip.plus.augmentation import augment, collate
from denseclip.plus.pseudo_labels import DenseCLIPTeacher, build_teacher
from denseclip.plus.target import SegmentationTarget, build_target
from denseclip.plus.training import (
    COVERAGE_COUNTS,
    PHASES,
    Batch,
    TrainingConfig,
    build_optimizer,
    make_targets,
    phase,
    set_learning_rate,
    target_counts,
    train_step,
)
from denseclip.predictor import DenseCLIP
from denseclip.ray.training.job import TrainJob


def training_batch(rows: dict[str, np.ndarray], rng: np.random.Generator, config: TrainingConfig,
                   device: torch.device | str = "cpu") -> Batch:
    """Rows of one worker's step -> the augmented batch ``denseclip.plus.training`` expects, on ``device``.

    The images travel to the device as they were decoded (uint8, a quarter of float's bytes; one copy for all of
    them, :func:`denseclip.gpu.to_device`) and are augmented there; the random parameters come from ``rng`` on
    the host, so the batch depends only on the rows and the seed of ``rng`` (and on the device's arithmetic)."""
    images = to_device(list(rows["image"]), device)  # (H, W, 3) uint8 each
    maps = {name: to_device(list(rows[name]), device)
            for name in ("label", "pseudo_label", "pseudo_confidence") if name in rows}
    samples = []
    for i, pixels in enumerate(images):
        image = pixels.permute(2, 0, 1).float() / 255
        own = {name: values[i] if values[i].is_floating_point() else values[i].long() for name, values in maps.items()}
        samples.append(augment(image, own, rng, config))
    return collate(samples)


@dataclass
class StepContext:
    """What a step callback sees on each worker, after the targets are made and before the optimizer step.

    ``batch``: the augmented batch (``image (B, 3, c, c)`` ...); ``targets``: ``(B, c, c)`` int64,
    255 = ignored, exactly what the loss is given; ``step`` counts from 0."""

    step: int
    rank: int
    world_size: int
    phase: str
    batch: Batch
    targets: torch.Tensor


StepCallback = Callable[[StepContext], None]


@dataclass
class _Worker:
    """Everything one training worker holds."""

    job: TrainJob
    rank: int
    world_size: int
    device: torch.device
    labeler: DenseCLIP  # the job's labeler, under its protocol: DenseCLIP scored beside the target
    teacher: DenseCLIPTeacher  # the same model on each training crop as it is (see build_teacher)
    model: SegmentationTarget  # the network itself (saved, used for pseudo labels and evaluation)
    trained: nn.Module  # the same network under DistributedDataParallel when there are several workers
    optimizer: torch.optim.Optimizer
    precision: MixedPrecision
    # Where this worker's targets came from since the last checkpoint: target_counts per phase of PHASES, summed
    # on the device (no step waits for it) and over the workers at each checkpoint (_gather_coverage).
    coverage: torch.Tensor | None = None


def build_worker(job: TrainJob, rank: int, world_size: int, device: torch.device) -> _Worker:
    """The labeler (the job's, in its precision), its teacher on training crops, the target network (scored at
    the training's ``resize_to``, as the official test pipeline resizes) and its optimizer on ``device``, for
    worker ``rank`` of ``world_size``."""
    labeler_config = dataclasses.replace(job.labeler, device=str(device))
    labeler = DenseCLIP.from_config(labeler_config, job.info.classes)
    teacher = build_teacher(labeler_config, job.teacher_classes, job.teacher_class_ids,
                            job.training.pseudo_label_refinement, clip=labeler.clip)
    torch.manual_seed(job.training.seed)
    model = build_target(job.training.target, labeler.name_embeddings, labeler.class_of_name,
                         clip=labeler.clip, clip_head=labeler.head)
    model.resize_to = job.training.resize_to
    if device.type == "cuda" and world_size > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    optimizer = build_optimizer(model, job.training)
    return _Worker(job, rank, world_size, device, labeler, teacher, model, model, optimizer,
                   MixedPrecision.for_device(job.training.precision, device),
                   torch.zeros(len(PHASES), len(COVERAGE_COUNTS), dtype=torch.long, device=device))


def _setup_worker(job: TrainJob) -> _Worker:
    context = ray.train.get_context()
    torch.set_num_threads(max(1, round(job.workers.cpus_per_worker)))
    # The device Ray Train gave this worker (its GPU with use_gpu), whatever ordinal job.labeler.device names.
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL collectives (all_gather_object) work on the current device
    return build_worker(job, context.get_world_rank(), context.get_world_size(), device)


def train_on(worker: _Worker, rows: dict[str, np.ndarray], step: int,
             callbacks: Sequence[StepCallback] = ()) -> tuple[torch.Tensor, str, float]:
    """One step of Algorithm 1 on this worker's ``rows``: augment (on the device, seeded by seed, rank and
    step), make the targets (counted in ``worker.coverage``), call ``callbacks``, and take the optimizer step.
    Returns ``(loss, phase, lr)``; the loss stays on the device (reading it would wait for the step to finish)."""
    training = worker.job.training
    rng = np.random.default_rng([training.seed, worker.rank, step])
    batch = training_batch(rows, rng, training, worker.device)
    lr = set_learning_rate(worker.optimizer, step, training)
    unseen_ids = worker.job.info.unseen_ids
    targets = make_targets(batch, step, training, worker.model, worker.teacher, unseen_ids, worker.precision)
    step_phase = phase(step, training)
    worker.coverage[PHASES.index(step_phase)] += target_counts(batch, targets, training, unseen_ids)
    for callback in callbacks:
        callback(StepContext(step, worker.rank, worker.world_size, step_phase, batch, targets))
    loss = train_step(worker.trained, worker.optimizer, batch, targets, worker.precision, training.loss_average)
    return loss, step_phase, lr


def _batches(shard, batch_size: int, shuffle_buffer: int) -> Iterator[dict[str, np.ndarray]]:
    """Endless ``batch_size``-row batches of a worker's split, epoch after epoch. Splits are equal and partial
    batches dropped, so all workers start each epoch at the same step (Ray Data waits for all of them)."""
    while True:
        empty = True
        for rows in shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=True,
                                       local_shuffle_buffer_size=shuffle_buffer or None):
            empty = False
            yield rows
        if empty:
            raise ValueError(f"a worker's share of data.train holds fewer than {batch_size} usable images "
                             "(training.batch_size / workers.num_workers)")

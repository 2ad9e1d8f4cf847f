"""The evaluation of a run on its validation shards, during training and at its end (``report.json``)."""

from __future__ import annotations

import numpy as np
import ray
import ray.train
import torch.distributed as dist

from denseclip.evaluation import Evaluation, ImageLabeler
from denseclip.metrics import ConfusionMatrix, summarize
from denseclip.models import weights_activation
from denseclip.plus.training import TrainingConfig
from denseclip.ray.training.checkpoints import _coverage_report, _gather_coverage, _report
from denseclip.ray.training.job import TrainJob
from denseclip.ray.training.worker import _Worker
from denseclip.robustness import CLEAN

EVAL_BATCH = 16
REFERENCE_TEACHER = "denseclip_teacher"  # report.json's "reference" when there is no ground truth


def evaluate_split(labeler: ImageLabeler, worker: _Worker, num_overlays: int,
                   reference: ImageLabeler | None = None) -> Evaluation:
    """Score ``labeler`` on this worker's split of the validation set against the ground truth, or against
    ``reference``'s labels of the same images when given, and merge the scores of all workers.

    Ray Data splits the set (``TrainingData``), so every image is scored by exactly one worker; the result,
    the same on every worker, holds the confusion matrix of the whole set and ``num_overlays`` overlay samples
    chosen by key (the same whatever the split)."""
    info = worker.job.info
    evaluation = Evaluation(info.num_classes, info.ignore_index, num_overlays)
    for rows in ray.train.get_dataset_shard("val").iter_batches(batch_size=EVAL_BATCH, batch_format="numpy"):
        items = [(str(key), np.asarray(image)) for key, image in zip(rows["key"], rows["image"])]
        if reference is None:
            truths = list(rows["label"])
        else:
            truths = [labels for labels, _ in reference.label_images([image for _, image in items])]
        evaluation.add_labelled(labeler, CLEAN, [(key, image, truth) for (key, image), truth in zip(items, truths)])
    if worker.world_size == 1:
        return evaluation
    parts: list[Evaluation | None] = [None] * worker.world_size
    dist.all_gather_object(parts, evaluation)
    merged = evaluation.empty()
    for part in parts:
        merged.merge(part)
    if len(merged.keys) != sum(part.num_images for part in parts):
        raise RuntimeError("a validation image was scored by more than one worker")
    return merged


def _evaluate_target(worker: _Worker, num_overlays: int) -> Evaluation:
    """The target on the validation set: against the annotation, or, with a free vocabulary (no ground
    truth), against the DenseCLIP teacher's labels of the same images."""
    reference = None if worker.job.has_ground_truth else worker.labeler
    return evaluate_split(worker.model, worker, num_overlays, reference)


def _summary(conf: ConfusionMatrix, job: TrainJob) -> dict:
    """The report numbers; without ground truth, the agreement with the teacher (``pixel_agreement``: the share
    of pixels labelled alike, ``per_class_agreement``: per class, the IoU of the two labellings' masks,
    ``miou_agreement`` their mean), which the usual keys then also measure."""
    info = job.info
    if not job.has_ground_truth:
        summary = summarize(conf, info.class_names)
        return {**summary, "reference": REFERENCE_TEACHER, "pixel_agreement": summary["pixel_accuracy"],
                "miou_agreement": summary["miou"], "per_class_agreement": summary["per_class_iou"]}
    # The zero-shot evaluation (the seen-only baseline's too) drops VOC's background, as the paper does.
    ignore = ([info.class_names[info.background_index]]
              if job.training.setting != "annotation_free" and info.ignore_background_in_zero_shot else [])
    return summarize(conf, info.class_names, unseen=info.unseen, ignore_classes=ignore)


def _headline(summary: dict) -> dict:
    return {k: summary[k] for k in ("miou", "miou_seen", "miou_unseen", "hiou", "pixel_accuracy")}


def _finish(worker: _Worker, history: dict, step: int) -> None:
    """Evaluate the final target (and the teacher); report the final checkpoint, ``report.json`` beside it."""
    job = worker.job
    evaluation = _evaluate_target(worker, job.evaluation.num_overlays)
    conf, samples = evaluation.matrix(), evaluation.overlays.items
    summary = _summary(conf, job)
    history["validation"].append({"step": step, "phase": "final", **_headline(summary)})
    _gather_coverage(worker, history)
    report = {**summary, **_coverage_report(history, job.training.setting),
              "dataset": job.dataset, "protocol": job.labeler.protocol,
              "method": _method_name(job.training), "inputs": _inputs(job),
              "validation": history["validation"], "training_log": history["log"]}
    if job.evaluation.teacher and job.has_ground_truth:  # else the teacher is the reference itself
        report["denseclip"] = _summary(evaluate_split(worker.labeler, worker, 0).matrix(), job)
    metrics = {"step": step, "phase": "final", **{f"val_{k}": v for k, v in _headline(summary).items()}}
    _report(worker, metrics, step, history, final={"summary": report, "conf": conf, "samples": samples})


def _method_name(training: TrainingConfig) -> str:
    if not training.uses_pseudo_labels:
        return "seen_only"  # the baseline: no DenseCLIP in it
    return f"denseclip_plus_{training.setting}" + ("_self_training" if training.self_training else "")


def _inputs(job: TrainJob) -> dict:
    return {"train": job.data.train, "val": job.data.val, "setting": job.training.setting,
            "pseudo_labels": job.training.pseudo_labels, "self_training": job.training.self_training,
            "iterations": job.training.iterations, "guided_iterations": job.training.num_guided,
            "teacher": f"{job.labeler.model}/{job.labeler.pretrained or 'default'}",
            "teacher_head": job.labeler.head, "teacher_protocol": job.labeler.protocol,
            "teacher_activation": weights_activation(job.labeler.model, job.labeler.pretrained),
            "teacher_normalisation": job.labeler.normalisation, "teacher_precision": job.labeler.effective_precision,
            "target": f"{job.training.target.head}-{job.training.target.backbone}",
            "classifier": job.training.target.classifier, "training_precision": job.training.precision,
            "scored_at": job.training.resize_to, "workers": job.workers.num_workers}

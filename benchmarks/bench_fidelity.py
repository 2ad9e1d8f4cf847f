"""The choices where we may differ from the official DenseCLIP code, measured on a world: the teacher's input
normalisation (CLIP's or ImageNet's) and precision, and for DenseCLIP+ the teacher's input (the augmented crop on
the fly, as the official code, or labels precomputed from whole images at the protocol's scale, as a
reproduction's label stage makes them) and the training step's precision (fp32 or bf16 autocast).

    python pipelines/render_world.py --seed 7 --num-images 400 --shard-size 200 --out runs/world-s7
    python pipelines/render_world.py --seed 1 --num-images 100 --shard-size 100 --out runs/world-s1
    python benchmarks/bench_fidelity.py --train runs/world-s7 --val runs/world-s1 \\
        --config jobs/train_synthetic_zero_shot.yaml --set training.iterations=150 --seeds 0,1

``--config``: a train spec (``jobs/train_*.yaml``) or a reproduction spec (``jobs/reproduce_*.yaml``, whose train
spec is used with its ``train.set`` and ``label.labeler`` overrides); ``--set`` overrides it further. Its dataset,
teacher and recipe are used as they are, with the data from ``--train`` / ``--val`` (WebDataset shards of images of
one size, ``seg.png`` ground truth), without self-training (the teacher's part of a schedule) and without
pseudo-label refinement (the official teacher has none, a label stage neither). Everything runs in this process,
on the CPU (``--device cuda``: one GPU), the variants interleaved so that they share the machine's load.

Prints three tables (and writes them as JSON with ``--out``):
1. The teacher (DenseCLIP, the spec's labeler) on the val shards, for each normalisation and precision: mIoU all /
   seen / unseen; the share of pixels labelled as the spec's own labeller labels them; ``unseen_argmax_unseen``:
   of the pixels annotated unseen, the share whose argmax over every class is an unseen class (all that a
   zero-shot merge of every class's argmax could supervise). A precision whose oneDNN kernels this CPU lacks runs
   on plain kernels, marked "(emulated)": the same rounding, another speed.
2. The targets of the training's first ``--target-steps`` augmented batches, per teacher variant: of the annotated
   pixels they pseudo-label (zero-shot: those annotated unseen), the share whose target is the annotation.
3. DenseCLIP+ trained on the train shards, per variant (mean over the seeds): mIoU all / seen / unseen / hIoU on
   the val shards, the unseen mIoU of each seed, ``unseen_supervised`` of its targets and its training time
   relative to the spec's own run (its teacher on the fly, in the spec's precisions); a variant that changes
   nothing in the spec is not run again (``same_as``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from denseclip.config import LabelerConfig, apply_override, read_job_spec
from denseclip.evaluation import ImageLabeler
from denseclip.metrics import ConfusionMatrix, summarize
from denseclip.plus.amp import MixedPrecision
from denseclip.plus.augmentation import InMemoryBatches
from denseclip.plus.training import make_targets, train
from denseclip.predictor import DenseCLIP
from denseclip.ray.training import TrainJob, build_worker, read_samples
from denseclip.reproduce import Reproduction
from denseclip.shards import expand_shards

TEACHER_VARIANTS = {
    "spec": {},
    "normalisation clip": {"normalisation": "clip"},
    "normalisation imagenet": {"normalisation": "imagenet"},
    "precision fp32": {"precision": "fp32"},
    "precision fp16": {"precision": "fp16"},
    "precision bf16": {"precision": "bf16"},
}
TRAINING_VARIANTS = {
    "spec (teacher on the fly)": {},
    "teacher precomputed": {"training": {"pseudo_labels": "precomputed"}, "data": {"mask_store": "in memory"}},
    "teacher normalisation clip": {"labeler": {"normalisation": "clip"}},
    "teacher normalisation imagenet": {"labeler": {"normalisation": "imagenet"}},
    "training fp32": {"training": {"precision": "fp32"}},
    "training bf16 autocast": {"training": {"precision": "bf16"}},
}
TARGET_VARIANTS = {
    "spec (teacher on the fly)": {},
    "teacher precomputed": TRAINING_VARIANTS["teacher precomputed"],
    "teacher normalisation imagenet": TRAINING_VARIANTS["teacher normalisation imagenet"],
    "teacher fp16": {"labeler": {"precision": "fp16"}},
}
HEADLINE = ("miou", "miou_seen", "miou_unseen", "hiou")


def load_job(config: str, overrides: list[str], train: str, val: str) -> TrainJob:
    """The train job of ``config`` (a train or reproduction spec) with ``overrides``, on these shards."""
    spec = read_job_spec(config)
    if "workdir" in spec:  # a reproduction: its train spec as it runs it, under its label stage's labeller
        reproduction = Reproduction.from_file(config)
        spec = {**reproduction.train_spec, "labeler": reproduction.labeler}
    for assignment in overrides:
        apply_override(spec, assignment)
    spec["data"] = {**spec.get("data", {}), "train": train, "val": val, "mask_store": None}
    # The teacher's part of the schedule (no self-training), unrefined as the official teacher and a label stage.
    spec["training"] = {**spec["training"], "pseudo_labels": "on_the_fly", "self_training": False,
                        "guided_iterations": None, "pseudo_label_refinement": 0}
    return TrainJob.from_dict(spec)


def variant(job: TrainJob, changes: dict) -> TrainJob:
    spec = job.to_dict()
    for section, values in changes.items():
        spec[section] = {**spec[section], **values}
    return TrainJob.from_dict(spec)


def read_rows(job: TrainJob, shards: str) -> list[dict]:
    info = job.info
    return [row for url in expand_shards(shards)
            for row in read_samples({"shard": url}, info.num_classes, True, None, info.label_lut)]


def score(labeler: ImageLabeler, job: TrainJob, rows: list[dict]) -> tuple[dict, list[np.ndarray]]:
    """``labeler`` on ``rows``: the summary (percent) and its label maps."""
    info = job.info
    conf = ConfusionMatrix(info.num_classes, info.ignore_index)
    labels = [labels for labels, _ in labeler.label_images([row["image"] for row in rows])]
    for row, pred in zip(rows, labels):
        conf.update(pred, row["label"], row["key"])
    ignore = ([info.class_names[info.background_index]]
              if info.ignore_background_in_zero_shot and job.training.setting != "annotation_free" else [])
    return summarize(conf, info.class_names, unseen=info.unseen, ignore_classes=ignore), labels


@contextlib.contextmanager
def _plain_kernels() -> Iterator[None]:
    """No oneDNN convolutions: on CPUs without native fp16 / bf16 its kernels refuse those dtypes, while the
    plain ones compute in them (slowly); the rounding, which is what is measured, is the dtype's."""
    with mock.patch("denseclip.engine._onednn_fusion_available", return_value=False), \
            torch.backends.mkldnn.flags(enabled=False):
        yield


def run(call: Callable[[], dict]) -> dict:
    """``call()``; where this CPU's oneDNN kernels refuse the precision, again on plain kernels (``emulated``)."""
    try:
        return call()
    except RuntimeError as exc:
        if "mkldnn" not in str(exc):
            raise
    with _plain_kernels():
        return {**call(), "emulated": True}


def teacher_table(job: TrainJob, rows: list[dict], device: str) -> dict:
    results, reference = {}, None
    for name, changes in TEACHER_VARIANTS.items():
        config = dataclasses.replace(job.labeler, device=device, **changes)

        def label(config: LabelerConfig = config) -> dict:
            summary, labels = score(DenseCLIP.from_config(config, job.info.classes), job, rows)
            return {"summary": summary, "labels": labels}

        result = run(label)
        reference = result["labels"] if reference is None else reference
        agreement = np.mean([np.mean(a == b) for a, b in zip(result["labels"], reference)])
        results[name] = {**{k: result["summary"][k] for k in HEADLINE}, "agreement_with_spec": 100 * float(agreement),
                         "unseen_argmax_unseen": unseen_argmax_unseen(job, rows, result["labels"]),
                         "precision": config.effective_precision, "normalisation": config.normalisation,
                         "emulated": result.get("emulated", False)}
    return results


def unseen_argmax_unseen(job: TrainJob, rows: list[dict], labels: list[np.ndarray]) -> float | None:
    """Of the pixels annotated with an unseen class, the share (percent) whose argmax over every class is an
    unseen class: all a zero-shot merge of every class's argmax could supervise (the teacher's argmax among the
    unseen classes supervises them all)."""
    unseen = job.info.unseen_ids
    annotated = [np.isin(row["label"], unseen) for row in rows]
    total = sum(int(a.sum()) for a in annotated)
    kept = sum(int((a & np.isin(pred, unseen)).sum()) for a, pred in zip(annotated, labels))
    return 100 * kept / total if total else None


def precomputed_maps(job: TrainJob, images: np.ndarray, device: str) -> dict[str, np.ndarray]:
    """What a reproduction's label stage stores for these images (the labeller under the job's protocol, with the
    teacher's vocabulary), in dataset ids, as the training reader hands it on."""
    labeler = DenseCLIP.from_config(dataclasses.replace(job.labeler, device=device), job.teacher_classes)
    ids = np.arange(len(job.info.classes)) if job.teacher_class_ids is None else np.asarray(job.teacher_class_ids)
    maps = labeler.label_images(list(images))
    return {"pseudo_label": np.stack([ids[labels] for labels, _ in maps]).astype(np.uint8),
            "pseudo_confidence": np.stack([confidence for _, confidence in maps])}


def _setup(job: TrainJob, images: np.ndarray, truth: np.ndarray, device: str) -> tuple:
    """A training worker of ``job`` and its augmented batches (with the label stage's maps when precomputed)."""
    worker = build_worker(job, 0, 1, torch.device(device))
    maps = {"label": truth}
    if job.training.pseudo_labels == "precomputed":
        maps.update(precomputed_maps(job, images, device))
    return worker, InMemoryBatches(images, maps, job.training)


def target_accuracy(job: TrainJob, images: np.ndarray, truth: np.ndarray, device: str, steps: int) -> dict:
    """Over the first ``steps`` batches of the guided phase, of the annotated pixels the targets pseudo-label
    (in the zero-shot setting: those annotated unseen), the share (percent) whose target is the annotation,
    which the loss never sees."""
    worker, batches = _setup(job, images, truth, device)
    right = judged = 0
    for step in range(steps):
        batch = batches.batch(step)
        targets = make_targets(batch, step, job.training, worker.model, worker.teacher, job.info.unseen_ids)
        label = batch["label"]
        pseudo = batch["valid"] & (label != 255) & (targets != 255)
        if job.training.setting == "zero_shot":
            pseudo &= torch.isin(label, torch.as_tensor(job.info.unseen_ids))
        right += int((pseudo & (targets == label)).sum())
        judged += int(pseudo.sum())
    return {"pseudo_label_accuracy": 100 * right / judged if judged else None, "pixels": judged}


def train_once(job: TrainJob, images: np.ndarray, truth: np.ndarray, val: list[dict], device: str) -> dict:
    worker, batches = _setup(job, images, truth, device)
    start = time.perf_counter()
    history = train(worker.model, worker.optimizer, batches.batch, job.training, range(job.training.iterations),
                    worker.teacher, job.info.unseen_ids, log_every=job.training.iterations,
                    precision=MixedPrecision.for_device(job.training.precision, torch.device(device)))
    seconds = time.perf_counter() - start
    summary, _ = score(worker.model, job, val)
    return {**{k: summary[k] for k in HEADLINE}, "seconds": seconds,
            "unseen_supervised": history[-1]["target_coverage"].get("unseen_supervised")}


def stacked(rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """``(images (N, H, W, 3), ground truth (N, H, W))`` of rows of one size (batches are drawn in memory)."""
    sizes = {row["image"].shape for row in rows}
    if len(sizes) != 1:
        raise SystemExit(f"--train: images of one size are needed (in memory, stacked), got {sorted(sizes)[:3]}")
    return np.stack([row["image"] for row in rows]), np.stack([row["label"] for row in rows])


def targets_table(job: TrainJob, train_rows: list[dict], steps: int, device: str) -> dict:
    images, truth = stacked(train_rows)
    return {name: run(functools.partial(target_accuracy, variant(job, changes), images, truth, device, steps))
            for name, changes in TARGET_VARIANTS.items()}


def training_table(job: TrainJob, train_rows: list[dict], val: list[dict], seeds: list[int], device: str) -> dict:
    images, truth = stacked(train_rows)
    runs: dict[str, list[dict]] = {name: [] for name in TRAINING_VARIANTS}
    same_as: dict[str, str] = {}  # a variant that changes nothing in this spec is the spec's run
    for seed in seeds:  # variants interleaved: each seed's runs share the machine's load of the moment
        done: dict[str, str] = {}
        for name, changes in TRAINING_VARIANTS.items():
            seeded = variant(job, {**changes, "training": {**changes.get("training", {}), "seed": seed}})
            key = json.dumps(seeded.to_dict(), sort_keys=True, default=str)
            if key in done:
                same_as[name] = done[key]
                runs[name].append(runs[done[key]][-1])
                continue
            done[key] = name
            runs[name].append(run(lambda job=seeded: train_once(job, images, truth, val, device)))
            print(f"  seed {seed}, {name}: " + ", ".join(f"{k} {_cell(v)}" for k, v in runs[name][-1].items()),
                  flush=True)
    base = statistics.mean(r["seconds"] for r in runs["spec (teacher on the fly)"])
    table = {}
    for name, done in runs.items():
        table[name] = {k: statistics.mean(r[k] for r in done) for k in HEADLINE}
        table[name]["per_seed_miou_unseen"] = [round(r["miou_unseen"], 2) for r in done]
        coverage = [r["unseen_supervised"] for r in done if r["unseen_supervised"] is not None]
        table[name]["unseen_supervised"] = statistics.mean(coverage) if coverage else None
        table[name]["time_vs_spec"] = statistics.mean(r["seconds"] for r in done) / base
        table[name]["emulated"] = any(r.get("emulated", False) for r in done)
        table[name]["same_as"] = same_as.get(name)
    return table


def _cell(value) -> str:
    return "-" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)


def print_table(title: str, table: dict, columns: list[str]) -> None:
    print(f"\n{title}\n| variant | {' | '.join(columns)} |\n|---|{'---|' * len(columns)}")
    for name, row in table.items():
        cells = " | ".join(_cell(row.get(c)) for c in columns)
        print(f"| {name}{' (emulated)' if row.get('emulated') else ''} | {cells} |")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", required=True, help="train shards (images of one size, with seg.png)")
    parser.add_argument("--val", required=True, help="val shards")
    parser.add_argument("--config", required=True, help="train spec or reproduction spec")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a spec field")
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tables", default="teacher,targets,training",
                        help="comma-separated: teacher, targets, training")
    parser.add_argument("--target-steps", type=int, default=25, help="batches the targets table judges")
    parser.add_argument("--out", help="write the tables as JSON here")
    args = parser.parse_args(argv)
    job = load_job(args.config, args.set, args.train, args.val)
    val, train_rows = read_rows(job, args.val), read_rows(job, args.train)
    print(f"{job.dataset}: {len(train_rows)} train / {len(val)} val images, teacher {job.labeler.model} "
          f"({job.labeler.protocol or 'no'} protocol), {job.training.iterations} iterations, "
          f"{torch.get_num_threads()} torch threads")
    tables, results = args.tables.split(","), {}
    if "teacher" in tables:
        results["teacher"] = teacher_table(job, val, args.device)
        print_table("Teacher (DenseCLIP) on the val shards", results["teacher"],
                    ["miou", "miou_seen", "miou_unseen", "agreement_with_spec", "unseen_argmax_unseen", "precision",
                     "normalisation"])
    if "targets" in tables:
        results["targets"] = targets_table(job, train_rows, args.target_steps, args.device)
        print_table(f"Targets of the first {args.target_steps} batches", results["targets"],
                    ["pseudo_label_accuracy", "pixels"])
    if "training" in tables:
        seeds = [int(s) for s in args.seeds.split(",")]
        results["training"] = training_table(job, train_rows, val, seeds, args.device)
        print_table(f"DenseCLIP+ (mean of seeds {args.seeds})", results["training"],
                    [*HEADLINE, "per_seed_miou_unseen", "unseen_supervised", "time_vs_spec", "same_as"])
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()

"""A reproduction's train stage in this process (one worker, no Ray), scored on its val shards as it trains: how a
target choice moves DenseCLIP+ against its teacher, in minutes instead of a whole rehearsal.

It reads what a reproduction's earlier stages left in ``--workdir`` (``shards/train``, ``shards/val`` and the
``pseudo-labels`` mask store), builds the train stage's job exactly as ``denseclip reproduce`` would (plus any
``--set`` on the train spec), and runs Algorithm 1 on the precomputed targets, crops and seeds as a worker of that
job does. At each step of ``--eval-at`` (and, with ``--teacher``, for the teacher first) it prints mIoU all /
seen / unseen and pixel accuracy on the val shards, and where the pixels annotated unseen went: their own class,
another unseen class, or a seen class.

    denseclip reproduce --config jobs/rehearse_coco_stuff_zero_shot.yaml --stages prepare,label \\
        --set prepare.dataset.root=runs/coco-world --set workdir=runs/rehearse/coco-stuff-zero-shot
    python benchmarks/bench_rehearsal_target.py --workdir runs/rehearse/coco-stuff-zero-shot --teacher \\
        --set training.target.dense_norm=null --eval-at 0,50,100
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from denseclip.commands.train import load_spec
from denseclip.metrics import ConfusionMatrix, summarize
from denseclip.plus.training import phase
from denseclip.ray.training.data import read_samples
from denseclip.ray.training.job import TrainJob
from denseclip.ray.training.worker import build_worker, train_on
from denseclip.reproduce import Reproduction
from denseclip.shards import expand_shards

ROOT = Path(__file__).resolve().parents[1]


def train_job(config: str, workdir: str, overrides: list[str]) -> TrainJob:
    """The train stage's job of the reproduction spec ``config`` on ``workdir``, with ``overrides`` after its own."""
    stage = next(s for s in Reproduction.from_file(config, [f"workdir={workdir}"]).stages() if s.name == "train")
    command = next(c for c in stage.commands if "train" in c)
    sets = [command[i + 1] for i, arg in enumerate(command) if arg == "--set"]
    return TrainJob.from_dict(load_spec(str(ROOT / command[command.index("--config") + 1]), sets + overrides))


def rows(job: TrainJob, shards: str, mask_store: str | None) -> list[dict]:
    info = job.info
    return [row for shard in expand_shards(shards)
            for row in read_samples({"shard": shard}, info.num_classes, True, mask_store, info.label_lut,
                                    with_confidence=False, pseudo_label_ids=job.teacher_class_ids)]


def score(job: TrainJob, val: list[dict], label_images) -> dict:
    """mIoU all / seen / unseen, pixel accuracy, and the shares of the pixels annotated unseen labelled with their
    class (``unseen_right``), another unseen class, or a seen class."""
    info = job.info
    conf = ConfusionMatrix(info.num_classes)
    for row, (labels, _) in zip(val, label_images([r["image"] for r in val])):
        conf.update(np.asarray(labels).astype(np.int64), row["label"].astype(np.int64))
    names = [c[0] for c in info.classes]
    summary = summarize(conf, names, [names[i] for i in info.unseen_ids])
    matrix = conf.matrix[:, :info.num_classes].astype(float)
    unseen = list(info.unseen_ids)
    seen = [i for i in range(info.num_classes) if i not in unseen]
    among = matrix[np.ix_(unseen, unseen)]
    total = matrix[unseen].sum()
    out = {k: round(summary[k], 2) for k in ("miou", "miou_seen", "miou_unseen", "pixel_accuracy")}
    out.update(unseen_right=round(float(np.trace(among) / total), 3),
               unseen_as_other_unseen=round(float((among.sum() - np.trace(among)) / total), 3),
               unseen_as_seen=round(float(matrix[np.ix_(unseen, seen)].sum() / total), 3))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="a reproduction's workdir, its prepare and label done")
    parser.add_argument("--config", default=str(ROOT / "jobs" / "rehearse_coco_stuff_zero_shot.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a train spec field")
    parser.add_argument("--eval-at", default="0,50,100", help="steps after which to score the target")
    parser.add_argument("--teacher", action="store_true", help="score the teacher (every class) first")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    job = train_job(args.config, args.workdir, args.set)
    training = job.training
    worker = build_worker(job, 0, 1, torch.device("cpu"))
    train, val = rows(job, job.data.train, job.data.mask_store), rows(job, job.data.val, None)
    print(f"{len(train)} train and {len(val)} val images; {training.iterations} steps, N_g {training.num_guided}, "
          f"batch {training.batch_size}; {' '.join(args.set)}", flush=True)
    if args.teacher:
        print("teacher", score(job, val, worker.labeler.label_images), flush=True)
    scored_at = {int(step) for step in args.eval_at.split(",")}
    order = np.random.default_rng(training.seed).permutation(len(train))
    start, losses = time.perf_counter(), []
    for step in range(training.iterations + 1):
        if step in scored_at:
            loss = f"{np.mean(losses):.3f}" if losses else "-"
            print(f"step {step} ({phase(max(step - 1, 0), training)}, loss {loss}, {time.perf_counter() - start:.0f} s)",
                  score(job, val, worker.model.label_images), flush=True)
            losses = []
        if step == training.iterations:
            break
        picked = [train[order[(step * training.batch_size + i) % len(train)]] for i in range(training.batch_size)]
        loss, _, _ = train_on(worker, {k: [row[k] for row in picked] for k in ("image", "label", "pseudo_label")},
                              step)
        losses.append(float(loss))


if __name__ == "__main__":
    main()

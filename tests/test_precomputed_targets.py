"""Zero-shot targets from a reproduction's label stage (precomputed) against the teacher on the fly: the same
image, teacher and crop give the same targets, and every pixel annotated unseen gets an unseen-class target, as
the official teacher's argmax among the unseen classes gives it. The label stage and the training reader are the
real ones (pipelines/label.py's job, the labelling actor's class, the mask store, Ray Train's row reader), driven
in this process."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import yaml
from batches import ray_batch
from pipeline_scripts import load_pipeline

from denseclip.plus.pseudo_labels import build_teacher, zero_shot_merge
from denseclip.plus.training import make_targets, target_counts, target_coverage
from denseclip.ray.labeling import Labeler, ShardCommitter, decode_batch, prepare_labeling, read_shard_rows
from denseclip.ray.training import TrainJob, build_worker, check_inputs, read_samples, training_batch
from denseclip.reproduce import Reproduction
from denseclip.synthetic import write_shards

ROOT = Path(__file__).resolve().parents[1]
label_cli = load_pipeline("label")
train_cli = load_pipeline("train")
SIZE = 96


@pytest.fixture(scope="module")
def reproduction(tmp_path_factory) -> Reproduction:
    """The synthetic zero-shot reproduction with its workdir here and its shards written (8 train scenes)."""
    root = tmp_path_factory.mktemp("reproduce")
    spec = yaml.safe_load((ROOT / "jobs" / "reproduce_synthetic_zero_shot.yaml").read_text())
    spec["workdir"] = str(root / "work")
    spec["train"]["spec"] = str(ROOT / spec["train"]["spec"])
    (root / "spec.yaml").write_text(yaml.safe_dump(spec))
    reproduction = Reproduction.from_file(str(root / "spec.yaml"))
    write_shards(7, 8, reproduction.path_of("shards/train"), shard_size=4, size=SIZE)
    write_shards(1, 2, reproduction.path_of("shards/val"), shard_size=2, size=SIZE)
    return reproduction


def _label_stage(reproduction: Reproduction) -> None:
    """The label stage's command, run by the labelling actor's code into the mask store."""
    (command,) = reproduction.stages()[1].commands
    job = label_cli.load_job(label_cli.build_parser().parse_args(command[command.index("label") + 1:]))
    plan = prepare_labeling(job.input, job.output, job.labeler, job.classes)
    labeler, committer = Labeler(job.labeler, job.classes, encode=True), ShardCommitter(plan)
    for shard in plan.todo:
        encoded = labeler(decode_batch(ray_batch(list(read_shard_rows(shard)))))
        committer.add(pa.Table.from_pydict({k: list(v) for k, v in encoded.items()}))
    committer.finish()


def _train_job(reproduction: Reproduction) -> TrainJob:
    """The train stage's job, its teacher the label stage's (the same labeller options), and the crop the whole
    image: resize by 1, no flip, no photometric distortion; refinement (on the fly only) off."""
    (command,) = reproduction.stages()[2].commands
    config = command[command.index("--config") + 1]
    overrides = [command[i + 1] for i, flag in enumerate(command) if flag == "--set"]
    spec = train_cli.load_spec(config, overrides)
    spec["labeler"] = reproduction.labeler
    spec["training"].update(scale_range=[1.0, 1.0], crop_size=SIZE, flip=False, photometric_distortion=False,
                            pseudo_label_refinement=0, resize_to=None)
    return TrainJob.from_dict(spec)


def test_precomputed_zero_shot_targets_equal_the_teachers_on_the_fly(reproduction):
    _label_stage(reproduction)
    job = _train_job(reproduction)
    check_inputs(job)  # the store holds the unseen classes' argmax, as a zero-shot job needs
    info = job.info
    rows = [row for shard in sorted(Path(reproduction.path_of("shards/train")).glob("*.tar"))
            for row in read_samples({"shard": str(shard)}, info.num_classes, True, job.data.mask_store,
                                    info.label_lut, pseudo_label_ids=job.teacher_class_ids)]
    batch = training_batch({name: [row[name] for row in rows] for name in rows[0]}, np.random.default_rng(0),
                           job.training)
    assert batch["valid"].all() and batch["image"].shape == (8, 3, SIZE, SIZE)  # the crop is the image
    worker = build_worker(job, 0, 1, torch.device("cpu"))
    precomputed = make_targets(batch, 0, job.training, worker.model, worker.teacher, info.unseen_ids)
    on_the_fly = make_targets(batch, 0, dataclasses.replace(job.training, pseudo_labels="on_the_fly"),
                              worker.model, worker.teacher, info.unseen_ids)
    assert torch.equal(precomputed, on_the_fly)

    coverage = target_coverage(target_counts(batch, precomputed, job.training, info.unseen_ids).tolist(),
                               "zero_shot")
    assert coverage["unseen_pixels"] > 0 and coverage["unseen_supervised"] == 1.0
    # Each pixel's argmax over every class, then the merge, leaves unseen pixels whose argmax is a seen class
    # without a target: what the label stage wrote before it labelled with the unseen classes alone.
    every_class, _ = build_teacher(job.labeler, [list(c) for c in info.classes]).pseudo_labels(batch["image"])
    merged = zero_shot_merge(batch["label"], every_class, info.unseen_ids)
    old = target_coverage(target_counts(batch, merged, job.training, info.unseen_ids).tolist(), "zero_shot")
    assert old["unseen_supervised"] < 0.95

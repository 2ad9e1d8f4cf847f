"""Train DenseCLIP+ on Ray Train: guided learning on DenseCLIP pseudo labels, then optional self-training.

    denseclip train --config jobs/train_synthetic_zero_shot.yaml [--set training.iterations=480 ...] [--output DIR]

The YAML job spec holds the dataset (vocabulary and zero-shot split), the train/val shards, the pseudo-label
source (a frozen DenseCLIP on the fly, or the mask store of pipelines/label.py), the DenseCLIP teacher, the
target network and schedule, the workers, and the run (name + storage path, local or s3://). ``--set``
overrides any field by its dotted path; the value is read as YAML (``--set run.resume_from=null``); ``--output``
is ``run.storage_path``. The spec
and its inputs are checked before Ray starts. Re-running the same run name and storage path resumes from its
latest checkpoint. Without ``--address`` or ``$RAY_ADDRESS`` a private local Ray is started and stopped.
A spec may ``extends: other.yaml`` and name only what it changes (jobs/train_*_rn50x16.yaml).
``dataset: custom`` with ``data.classes`` (a class file) trains annotation-free DenseCLIP+ for any vocabulary on
unlabelled shards (``denseclip prepare --dataset folder``); ``training.setting: seen_only`` is the paper's
Table 2a baseline. The run ends by evaluating on the validation shards (against the ground truth, or, for a
custom vocabulary, against the DenseCLIP teacher) and writes report.json next to the final checkpoint.
Prints one line per ``run.log_every`` steps and a summary naming the report files; what Ray and the model
libraries print goes to ``<storage_path>/<name>/logs/train-<UTC time>.log`` (``--verbose``: to the terminal).
Exit codes: 0 done, 1 training failed, 2 a bad spec or input.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback

from denseclip import storage
from denseclip.commands.options import Parser, add_address, add_config, add_verbose
from denseclip.config import ConfigError, apply_override, read_job_spec
from denseclip.ray.auth import ClusterAccessError, check_access
from denseclip.ray.labeling import ray_cluster
from denseclip.ray.training import (
    REPORT_FILES,
    TrainingFailedError,
    TrainJob,
    check_inputs,
    run_folder,
    run_training,
)
from denseclip.runlog import Console, log_url, run_log

HEADLINE = ("miou", "miou_seen", "miou_unseen", "hiou", "pixel_accuracy")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = Parser(prog=prog or "denseclip train", description=__doc__.split("\n\n")[0])
    add_config(parser, required=True, what="job spec (YAML), e.g. jobs/train_synthetic_zero_shot.yaml")
    parser.add_argument("--input", help="the training shards (data.train: a folder, glob or s3:// URL)")
    parser.add_argument("--output", help="where the run's folder goes (run.storage_path: a folder or s3:// URL)")
    add_address(parser)
    add_verbose(parser, "the run's logs/")
    return parser


def load_spec(path: str, overrides: list[str]) -> dict:
    """The job spec at ``path`` (and any spec it ``extends``) with the ``--set`` overrides applied."""
    spec = read_job_spec(path)
    for assignment in overrides:
        apply_override(spec, assignment)
    return spec


def _cells(summary: dict) -> str:
    return " | ".join(f"{k} {'-' if summary[k] is None else format(summary[k], '.2f')}" for k in HEADLINE)


def progress_line(record: dict, iterations: int) -> str:
    """One line of a metrics record reported by the workers (see ``run_training``'s ``on_report``)."""
    parts = [f"train: step {record['step']}/{iterations} {record.get('phase', record.get('val_phase', ''))}".rstrip()]
    if "loss" in record:
        parts.append(f"loss {record['loss']:.3f} lr {record['lr']:.2g}")
    if "val_miou" in record:
        parts.append(f"val mIoU {record['val_miou']:.2f} seen {record['val_miou_seen']:.2f} unseen "
                     + ("-" if record["val_miou_unseen"] is None else f"{record['val_miou_unseen']:.2f}"))
    if "checkpoint" in record:
        parts.append(f"saved {record['checkpoint'].rstrip('/').rsplit('/', 1)[-1]}")
    return ", ".join(parts)


def train(job: TrainJob, address: str | None, console: Console) -> int:
    start = time.monotonic()
    console.print(f"train: {job.run.name}, DenseCLIP+ {job.training.setting}, {job.training.iterations} steps "
                  f"on {job.workers.num_workers} workers, run folder {run_folder(job)}")
    try:
        with ray_cluster(address):
            result = run_training(job, on_report=lambda record: console.print(
                progress_line(record, job.training.iterations)))
    except ConfigError as exc:
        console.error(f"error: {exc}")
        return 2
    except TrainingFailedError as exc:
        traceback.print_exc()
        console.error(f"error: training failed: {exc}")
        return 1
    console.print(f"train: done in {time.monotonic() - start:.0f} s")
    report = result.report
    if job.has_ground_truth:
        console.print(f"{report['method']}: {_cells(report)}")
    else:
        console.print(f"DenseCLIP+ on {job.info.num_classes} classes, agreement with the DenseCLIP teacher: "
                      f"pixels {report['pixel_agreement']:.2f}, mIoU {report['miou_agreement']:.2f}")
    if "denseclip" in report:
        console.print(f"DenseCLIP teacher: {_cells(report['denseclip'])}")
    console.print(f"final checkpoint: {result.checkpoint}")
    console.print(f"reports in the final checkpoint: {', '.join(REPORT_FILES)} "
                  f"(open {storage.join(result.checkpoint, 'index.html')})")
    return 0


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    # Values as JSON, which the spec reads back as YAML: a path is never taken for a number or a mapping.
    overrides = args.set + [f"{key}={json.dumps(value)}" for key, value in
                            (("data.train", args.input), ("run.storage_path", args.output)) if value]
    try:
        job = TrainJob.from_dict(load_spec(args.config, overrides))
        check_inputs(job)
        check_access(args.address)
    except (ConfigError, ClusterAccessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    log = None if args.verbose else log_url(run_folder(job), "train")
    with run_log(log) as console:
        code = train(job, args.address, console)
        if log:
            console.print(f"log: {log}")
        return code


if __name__ == "__main__":
    sys.exit(main())

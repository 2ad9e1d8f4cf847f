"""Train DenseCLIP+ on Ray Train: guided learning on DenseCLIP pseudo labels, then optional self-training.

    python pipelines/train.py --config jobs/train_synthetic_zero_shot.yaml [--set training.iterations=480 ...]

The YAML job spec holds the dataset (vocabulary and zero-shot split), the train/val shards, the pseudo-label
source (a frozen DenseCLIP on the fly, or the mask store of pipelines/label.py), the DenseCLIP teacher, the
target network and schedule, the workers, and the run (name + storage path, local or s3://). ``--set``
overrides any field by its dotted path; the value is read as YAML (``--set run.resume_from=null``). The spec
and its inputs are checked before Ray starts. Re-running the same run name and storage path resumes from its
latest checkpoint. Without ``--address`` or ``$RAY_ADDRESS`` a private local Ray is started and stopped.
The run ends by evaluating on the validation shards and writes report.json next to the final checkpoint.
Exit codes: 0 done, 1 training failed, 2 a bad spec or input.
"""

from __future__ import annotations

import argparse
import sys

import ray

from denseclip.config import ConfigError, apply_override, read_yaml_file
from denseclip.ray.labeling import ray_cluster
from denseclip.ray.train import TrainJob, check_inputs, run_training

HEADLINE = ("miou", "miou_seen", "miou_unseen", "hiou", "pixel_accuracy")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True,
                        help="job spec (YAML), e.g. jobs/train_synthetic_zero_shot.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a spec field by its dotted path (repeatable)")
    parser.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    return parser.parse_args(argv)


def load_spec(path: str, overrides: list[str]) -> dict:
    """The job spec at ``path`` with the ``--set`` overrides applied."""
    spec = read_yaml_file(path, "job spec")
    if not isinstance(spec, dict):
        raise ConfigError(f"--config {path}: a job spec must be a mapping of sections")
    for assignment in overrides:
        apply_override(spec, assignment)
    return spec


def _cells(summary: dict) -> str:
    return " | ".join(f"{k} {'-' if summary[k] is None else format(summary[k], '.2f')}" for k in HEADLINE)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        job = TrainJob.from_dict(load_spec(args.config, args.set))
        check_inputs(job)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        with ray_cluster(args.address):
            # Every worker's pass over its data would draw a progress bar; the metrics already show progress.
            ray.data.DataContext.get_current().enable_progress_bars = False
            result = run_training(job)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ray.train.TrainingFailedError as exc:
        print(f"error: training failed: {exc}", file=sys.stderr)
        return 1
    print(f"DenseCLIP+ {job.training.setting}: {_cells(result.report)}")
    if "denseclip" in result.report:
        print(f"DenseCLIP teacher: {_cells(result.report['denseclip'])}")
    print(f"final checkpoint: {result.checkpoint} (report.json beside it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Train DenseCLIP+ on Ray Train: guided learning on DenseCLIP pseudo labels, then optional self-training.

    python pipelines/train.py --config jobs/train_synthetic_zero_shot.yaml [--set training.iterations=480 ...]

The YAML job spec holds the dataset (vocabulary and zero-shot split), the train/val shards, the pseudo-label
source (a frozen DenseCLIP on the fly, or the mask store of pipelines/label.py), the DenseCLIP teacher, the
target network and schedule, the workers, and the run (name + storage path, local or s3://). ``--set``
overrides any field by its dotted path; the value is read as YAML (``--set run.resume_from=null``). The spec
and its inputs are checked before Ray starts. Re-running the same run name and storage path resumes from its
latest checkpoint. Without ``--address`` or ``$RAY_ADDRESS`` a private local Ray is started and stopped.
A spec may ``extends: other.yaml`` and name only what it changes (jobs/train_*_rn50x16.yaml).
``dataset: custom`` with ``data.classes`` (a class file) trains annotation-free DenseCLIP+ for any vocabulary on
unlabelled shards (pipelines/prepare.py --dataset folder); ``training.setting: seen_only`` is the paper's
Table 2a baseline. The run ends by evaluating on the validation shards (against the ground truth, or, for a
custom vocabulary, against the DenseCLIP teacher) and writes report.json next to the final checkpoint.
Exit codes: 0 done, 1 training failed, 2 a bad spec or input.
"""

from __future__ import annotations

import argparse
import os
import sys

import ray
import yaml

from denseclip.config import ConfigError, read_yaml_file
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


def apply_override(spec: dict, assignment: str) -> None:
    """Set ``spec[a][b] = value`` for ``"a.b=value"`` (the value read as YAML), adding sections as needed."""
    path, sep, text = assignment.partition("=")
    keys = path.strip().split(".")
    if not sep or not all(keys):
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE with a dotted key, "
                          "e.g. training.iterations=100")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {assignment!r}: the value is not valid YAML: {exc}") from exc
    node = spec
    for depth, key in enumerate(keys[:-1]):
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {assignment!r}: {'.'.join(keys[:depth + 1])} is not a section")
    node[keys[-1]] = value


def _merge(base: dict, changes: dict) -> dict:
    """``base`` with ``changes`` applied key by key, nested mappings merged rather than replaced."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_spec(path: str, seen: tuple[str, ...] = ()) -> dict:
    """The job spec at ``path``; a spec with ``extends: other.yaml`` (relative to its own folder) is that spec
    with this one's fields merged over it (a variant names only what it changes)."""
    spec = read_yaml_file(path, "job spec")
    if not isinstance(spec, dict):
        raise ConfigError(f"--config {path}: a job spec must be a mapping of sections")
    base = spec.pop("extends", None)
    if base is None:
        return spec
    if not isinstance(base, str) or not base:
        raise ConfigError(f"--config {path}: extends: must be the path of another job spec (got {base!r})")
    base_path = os.path.normpath(os.path.join(os.path.dirname(path), base))
    if base_path in seen:
        raise ConfigError(f"--config {path}: extends: {base} extends itself through {' -> '.join(seen)}")
    return _merge(read_spec(base_path, (*seen, base_path)), spec)


def load_spec(path: str, overrides: list[str]) -> dict:
    """The job spec at ``path`` (and any spec it ``extends``) with the ``--set`` overrides applied."""
    spec = read_spec(path, (os.path.normpath(path),))
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
    report = result.report
    if not job.has_ground_truth:
        print(f"DenseCLIP+ on {job.info.num_classes} classes, agreement with the DenseCLIP teacher: pixels "
              f"{report['pixel_agreement']:.2f}, mIoU {report['miou_agreement']:.2f}")
    else:
        print(f"{report['method']}: {_cells(report)}")
    if "denseclip" in report:
        print(f"DenseCLIP teacher: {_cells(report['denseclip'])}")
    print(f"final checkpoint: {result.checkpoint} (report.json beside it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

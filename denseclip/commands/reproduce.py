"""Reproduce a result with one command: prepare -> label -> train -> evaluate -> baseline, each stage its own Ray
job step.

    denseclip reproduce --config jobs/reproduce_synthetic_zero_shot.yaml
    denseclip reproduce --config jobs/reproduce_coco_stuff_zero_shot.yaml --address http://127.0.0.1:8265
    denseclip reproduce --config jobs/rehearse_coco_stuff_zero_shot.yaml \
        --set prepare.dataset.root=runs/coco-world --set workdir=runs/rehearsal

The stages are ``denseclip`` commands: prepare (or render-world), label (pseudo labels of the train shards into a
mask store), train (DenseCLIP+ from those precomputed pseudo labels), evaluate (the final checkpoint on the
validation shards) and the baseline: label and evaluate scoring the teacher, DenseCLIP, on the same validation
shards. --set KEY=VALUE changes a field of the spec by its dotted path (repeatable; the value read as YAML).
Without --address they run one after another on this machine, each on its own local Ray. With --address (a Ray
address; the dashboard through a tunnel, http://127.0.0.1:8265) each stage is submitted as its own Ray job, with
this directory as its working directory, and awaited; the spec's workdir must then be storage both sides reach
(s3://...). A stage whose outputs are complete is skipped, so a re-run after a failure continues where it
stopped; --stages runs only some; --verbose runs the stages' commands with --verbose. Exit codes: 0 done, 1 a
stage failed, 2 a bad spec.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid

from denseclip import storage
from denseclip.commands.options import VERBOSE_ENV, Parser, add_address, add_config, add_verbose
from denseclip.config import ConfigError
from denseclip.reproduce import REPORT_FILE, STAGES, Reproduction, Stage

HEADLINE = ("miou", "miou_seen", "miou_unseen", "hiou", "pixel_accuracy")


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    parser = Parser(prog=prog or "denseclip reproduce", description=__doc__.split("\n\n")[0])
    add_config(parser, required=True, what="reproduction spec, e.g. jobs/reproduce_coco_stuff_zero_shot.yaml "
               "(--set prepare.dataset.root=/data/coco_stuff164k)")
    add_address(parser, "submit each stage as a Ray job to this cluster (default: run them here, one after "
                "another, each on its own local Ray)")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help=f"comma-separated stages to run, in order (default: {','.join(STAGES)})")
    parser.add_argument("--dry-run", action="store_true", help="print each stage's commands, run nothing")
    add_verbose(parser)
    args = parser.parse_args(argv)
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(args.stages) - set(STAGES))
    if unknown or not args.stages:
        parser.error(f"--stages: choose from {', '.join(STAGES)}, got {args.stages}")
    return args


def run_stage(stage: Stage, reproduction: Reproduction, address: str | None, verbose: bool = False) -> None:
    """Run the stage's step: a Ray job on the cluster at ``address`` (this directory its working directory),
    else its commands here, one by one. ``verbose``: the stages' commands run as with ``--verbose``."""
    env = {VERBOSE_ENV: "1"} if verbose else {}
    if address:
        from denseclip.ray.jobs import run_ray_job

        job_id = f"reproduce-{reproduction.name}-{stage.name}-{uuid.uuid4().hex[:8]}"
        run_ray_job(address, stage.entrypoint, job_id, os.getcwd(), env)
        return
    for command in stage.commands:
        done = subprocess.run([sys.executable, *command[1:]], env={**os.environ, **env}, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"exit code {done.returncode}: {' '.join(command)}")


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = parse_args(argv, prog)
    try:
        reproduction = Reproduction.from_file(args.config, args.set)
    except ConfigError as exc:
        print(f"reproduce: error: {exc}", file=sys.stderr)
        return 2
    if args.address and not args.dry_run:
        from denseclip.ray.auth import ClusterAccessError, check_access

        try:
            check_access(args.address)
        except ClusterAccessError as exc:
            print(f"reproduce: error: {exc}", file=sys.stderr)
            return 2
    for stage in reproduction.stages():
        if stage.name not in args.stages:
            continue
        if args.dry_run:  # the commands only: the workdir is not even read
            print(f"reproduce: {stage.name}: {stage.entrypoint}")
            continue
        if reproduction.is_complete(stage):
            print(f"reproduce: {stage.name}: complete, skipped ({', '.join(stage.outputs)})", flush=True)
            continue
        print(f"reproduce: {stage.name}: {stage.entrypoint}", flush=True)
        start = time.perf_counter()
        try:
            run_stage(stage, reproduction, args.address, args.verbose)
        except RuntimeError as exc:
            print(f"reproduce: {stage.name} failed: {exc}; re-run to continue from this stage", file=sys.stderr)
            return 1
        reproduction.record(stage, time.perf_counter() - start)
        print(f"reproduce: {stage.name}: done in {time.perf_counter() - start:.0f} s", flush=True)
    for stage, method in (("evaluate", "DenseCLIP+"), ("baseline", "DenseCLIP")):
        report_url = storage.join(reproduction.path_of("evaluation" if stage == "evaluate" else stage), REPORT_FILE)
        if stage in args.stages and not args.dry_run and storage.exists(report_url):
            report = json.loads(storage.read_bytes(report_url))
            cells = " | ".join(f"{k} {report[k]:.2f}" for k in HEADLINE if report.get(k) is not None)
            print(f"reproduce: {reproduction.name}: {method}: {cells} ({report_url})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Label WebDataset shards with DenseCLIP on Ray and write the Parquet mask store.

    denseclip label --input 's3://bucket/shards/*.tar' --output s3://bucket/masks/ \\
        --classes coco_stuff --model RN50x16 --pretrained openai [--config jobs/x.yaml] [--set KEY=VALUE]

Without ``--model``: the paper's RN50 with OpenAI's weights; ``--device auto`` (the default) labels on GPUs, one per
actor, where the cluster has them. ``--classes``: a dataset preset, a class file or a comma list.
On a cluster: ``ray job submit --working-dir . -- python pipelines/label.py ...`` (every node needs this
project's dependencies, e.g. the container image in infra/; object-store credentials and endpoints reach the
workers as environment variables, e.g. ``--runtime-env-json '{"env_vars": {"AWS_ENDPOINT_URL": "..."}}'``,
or as node roles). Without ``--address`` or ``$RAY_ADDRESS`` a private local Ray is started and stopped.

Flags override the job file (``jobs/*.yaml``: input, output, classes, num_actors, cpus_per_actor and a
``labeler:`` mapping of model and inference options). Re-running with the same output labels the new shards and
those whose content changed since they were committed, leaves the others alone and reports shards that left
the input (their masks are kept); ``--retry-errors`` also relabels the error rows of committed shards. An output
holding another model's or vocabulary's masks is refused unless ``--overwrite``. One run at a time writes an
output: it holds the output's lease (``lease.json``), and a second run exits (or waits ``--wait-for-lease``
seconds). Prints progress (shards committed) and a summary, also written as ``summary.json`` next to the masks;
what Ray and the model libraries print goes to ``OUTPUT/logs/label-<UTC time>.log`` (``--verbose``: to the
terminal). A run refused at validation (no shard matches the input, the output holds another run) writes
nothing into the output. Exit codes: 0 done (bad images are listed in the store's errors table), 1 the job
failed while running, 2 a bad configuration, input or output, 3 another run holds the output's lease.

A re-run heals the store: a committed part that does not parse, or whose size or row count disagrees with its
manifest and record (or whose SHA-256 does, for parts written since the last run; ``--deep``: for every part),
is taken as not committed, named in one line with its shard, and its shard relabelled. ``--verify`` only checks
the store at ``--output`` (as ``denseclip verify --store OUTPUT``): one line per damaged part, exit 1 if any.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import traceback
from dataclasses import dataclass

from denseclip.commands.options import Parser, add_address, add_classes, add_config, add_verbose, renamed
from denseclip.config import (
    ConfigError,
    LabelerConfig,
    add_labeler_arguments,
    apply_override,
    read_yaml_file,
    resolve_vocabulary,
)
from denseclip.datasets import DATASET_NAMES, DatasetError
from denseclip.runlog import Console, log_url, run_log
from denseclip.vocabulary import VocabularyError

JOB_FIELDS = ("input", "output", "classes", "num_actors", "cpus_per_actor", "labeler")
RENAMED_FIELDS = {"vocabulary": "classes"}  # job-file fields that were renamed: the old name still works
LABELER_FIELDS = tuple(f.name for f in dataclasses.fields(LabelerConfig) if f.name != "extra")
# Label maps are 8-bit PNGs up to 255 classes (255 = ignore), 16-bit beyond (65535 = ignore).
MAX_CLASSES = 65535
EXIT_LEASE_HELD = 3
PROGRESS_EVERY_S = 10.0  # at most one progress line this often (a job may hold thousands of shards)


@dataclass
class LabelJob:
    """A validated job: where from, where to, which vocabulary (``classes``: names per class), how."""

    input: str | list[str]
    output: str
    classes: list[list[str]]
    labeler: LabelerConfig
    num_actors: int | None
    cpus_per_actor: float | None
    overwrite: bool
    address: str | None
    retry_errors: bool = False
    wait_for_lease: float = 0.0
    lease_ttl: float = 60.0
    deep: bool = False


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = Parser(prog=prog or "denseclip label", description=__doc__.split("\n\n")[0])
    add_config(parser, what="job file (YAML)")
    parser.add_argument("--input", help="shards: a path, glob, folder or URL (s3://bucket/shards/*.tar)")
    parser.add_argument("--output", help="mask store root (a folder or URL)")
    add_classes(parser)
    renamed(parser, "--vocabulary", "--classes")
    parser.add_argument("--overwrite", action="store_true", help="replace an output written by another run")
    parser.add_argument("--num-actors", type=int, help="labeler actors (default: one per GPU, else per CPU)")
    parser.add_argument("--cpus-per-actor", type=float,
                        help="CPUs each actor reserves, fractional allowed (default: half the CPUs shared out)")
    add_address(parser)
    parser.add_argument("--retry-errors", action="store_true",
                        help="also relabel the error rows of committed shards (stores written before errors "
                        "were told apart by cause)")
    parser.add_argument("--wait-for-lease", type=float, default=0.0, metavar="SECONDS",
                        help="when another run holds the output's lease, wait this long for it (default: exit 3)")
    parser.add_argument("--lease-ttl", type=float, default=60.0, metavar="SECONDS",
                        help="how long the lease outlives this run if it dies (renewed every third of it)")
    add_verbose(parser, "OUTPUT/logs/")
    parser.add_argument("--verify", action="store_true",
                        help="only check the mask store at --output (footers, sizes, row counts, key index; "
                        "with --deep SHA-256 digests): one line per damaged part, exit 1 if any")
    parser.add_argument("--deep", action="store_true",
                        help="compare every committed part's SHA-256 with its manifest (reads the whole store): "
                        "with --verify, or before labelling, which then relabels the shards of damaged parts")
    add_labeler_arguments(parser)
    # Unset labeler flags stay None, so a job file's values are only overridden by flags actually given.
    parser.set_defaults(**dict.fromkeys(LABELER_FIELDS))
    return parser


def _read_job_file(path: str | None, overrides: list[str]) -> dict:
    """The job file at ``path`` (none: an empty one) with the ``--set`` overrides applied, checked."""
    spec = read_yaml_file(path, "job file") if path else {}
    where = path or "--set"
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: a job file must be a mapping of {', '.join(JOB_FIELDS)}")
    for assignment in overrides:
        apply_override(spec, assignment)
    for old, new in RENAMED_FIELDS.items():
        if old in spec:
            if new in spec:
                raise ConfigError(f"{where}: give {new} (the new name of {old}), not both")
            print(f"label: {where}: the field {old} is now {new}", file=sys.stderr)
            spec[new] = spec.pop(old)
    unknown = sorted(set(spec) - set(JOB_FIELDS))
    if unknown:
        raise ConfigError(f"{where}: {unknown[0]}: unknown field (known: {', '.join(JOB_FIELDS)})")
    if not isinstance(spec.get("labeler", {}), dict):
        raise ConfigError(f"{where}: labeler: must be a mapping of {', '.join(LABELER_FIELDS)}")
    return spec


def load_job(args: argparse.Namespace) -> LabelJob:
    """Merge the job file, the ``--set`` overrides and the flags and validate everything; raises ConfigError
    naming the field."""
    spec = _read_job_file(args.config, args.set)
    where = f"{args.config}: " if args.config else ""
    values = {name: getattr(args, name) if getattr(args, name) is not None else spec.get(name)
              for name in ("input", "output", "classes", "num_actors", "cpus_per_actor")}
    # A protocol preset (labeler.protocol) takes the values it gives a dataset named as the classes.
    dataset = values["classes"] if values["classes"] in DATASET_NAMES else None
    file_labeler = spec.get("labeler") or {}
    LabelerConfig.from_dict(file_labeler, where=f"{where}labeler", dataset=dataset)
    flags = {name: getattr(args, name) for name in LABELER_FIELDS if getattr(args, name) is not None}
    if flags.get("upsample_topk") == 0:
        flags["upsample_topk"] = None  # --upsample-topk 0: upsample every class (exact)
    labeler = LabelerConfig.from_dict({**file_labeler, **flags}, where="labeler", dataset=dataset)

    for name in ("input", "output", "classes"):
        if not values[name] or not isinstance(values[name], (str, list)):
            raise ConfigError(f"{name}: required (--{name} or '{name}:' in the job file), got {values[name]!r}")
    if not isinstance(values["output"], str):
        raise ConfigError(f"output: must be one folder or URL, got {values['output']!r}")
    for name, types in (("num_actors", int), ("cpus_per_actor", (int, float))):
        value = values[name]
        if value is not None and (isinstance(value, bool) or not isinstance(value, types) or value <= 0):
            raise ConfigError(f"{name}: must be a positive {'integer' if types is int else 'number'}, got {value!r}")
    try:
        classes = resolve_vocabulary(values["classes"], synonyms=labeler.synonyms)
    except (VocabularyError, DatasetError, OSError) as exc:
        raise ConfigError(f"classes: {exc}") from exc
    if len(classes) + (labeler.background_threshold is not None) > MAX_CLASSES:
        raise ConfigError(f"classes: {len(classes)} classes do not fit 16-bit label maps (at most {MAX_CLASSES})")
    if args.wait_for_lease < 0 or args.lease_ttl <= 0:
        raise ConfigError(f"--wait-for-lease must be >= 0 and --lease-ttl > 0, got {args.wait_for_lease} and "
                          f"{args.lease_ttl}")
    return LabelJob(values["input"], values["output"], classes, labeler, values["num_actors"],
                    values["cpus_per_actor"], args.overwrite, args.address, args.retry_errors,
                    args.wait_for_lease, args.lease_ttl, args.deep)


class Progress:
    """One line per committed shard, at most every ``PROGRESS_EVERY_S`` seconds, and always the last."""

    def __init__(self, console: Console, todo: int):
        self.console, self.todo = console, todo
        self.parts = self.masks = self.errors = 0
        self.start = self.last = time.monotonic()

    def __call__(self, shard: str, masks: int, errors: int) -> None:
        self.parts, self.masks, self.errors = self.parts + 1, self.masks + masks, self.errors + errors
        now = time.monotonic()
        if now - self.last >= PROGRESS_EVERY_S or self.parts == self.todo:
            self.last = now
            self.console.print(f"label: {self.parts}/{self.todo} shards committed, {self.masks} images, "
                               f"{self.errors} errors, {now - self.start:.0f} s")


def run(job: LabelJob, console: Console) -> int:
    # Ray is imported only once the configuration is known to be good: a bad value fails in well under a second.
    from denseclip.lease import Lease, LeaseLost
    from denseclip.ray.labeling import label_shards, part_id, prepare_labeling, write_summary

    with Lease(job.output, ttl_s=job.lease_ttl, wait_s=job.wait_for_lease) as lease:
        plan = prepare_labeling(job.input, job.output, job.labeler, job.classes, overwrite=job.overwrite,
                                retry_errors=job.retry_errors, deep=job.deep, lease=lease)
        repairing = {part_id(shard) for shard in plan.repaired}
        for damage in plan.damaged.values():
            console.print(f"label: damaged part {damage}; " + ("relabelling its shard" if damage.part in repairing
                          else "its shard is not in the input, so the part stays as it is"))
        retry = f"; relabelling {sum(map(len, plan.retry.values()))} error rows" if job.retry_errors else ""
        console.print(f"label: {len(plan.shards)} shards, {len(plan.unchanged)} already committed in {job.output} "
                      f"and unchanged, {len(plan.new)} new, {len(plan.changed)} changed since committed, "
                      f"{len(plan.repaired)} with a damaged part; {len(plan.missing)} committed shards missing from "
                      f"the input (kept){retry}")
        try:
            summary = label_shards(plan, job.labeler, job.classes, address=job.address, num_actors=job.num_actors,
                                   cpus_per_actor=job.cpus_per_actor,
                                   on_commit=Progress(console, len(plan.todo) + len(plan.retry)),
                                   on_resume=lambda message: console.print(f"label: {message}"))
        except LeaseLost:
            raise  # the output belongs to the run that took the lease over: write nothing more
        except Exception as exc:
            write_summary(job.output, {"status": "failed", "error": f"{type(exc).__name__}: {exc}"},
                          plan.storage_options)
            raise
    console.print(f"label: {summary['images_labelled']} images labelled, {summary['errors']} errors, "
                  f"{summary['images_per_s']} images/s, {summary['wall_time_s']} s; "
                  f"{summary['shards_committed']} shards committed to {job.output} "
                  f"({summary['parts_repaired']} replacing damaged parts)")
    console.print(json.dumps(summary, sort_keys=True))
    return 0


def verify(args: argparse.Namespace) -> int:
    """--verify: ``denseclip verify`` on the output of the flags or the job file (0 sound, 1 damaged)."""
    from denseclip.commands.verify import verify as verify_store

    output = args.output or _read_job_file(args.config, args.set).get("output")
    if not isinstance(output, str) or not output:
        raise ConfigError(f"output: required with --verify (--output or 'output:' in the job file), got {output!r}")
    return verify_store(output, args.deep)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        if args.verify:
            return verify(args)
        job = load_job(args)
    except (ConfigError, OSError) as exc:
        print(f"label: error: {exc}", file=sys.stderr)
        return 2
    from denseclip.lease import LeaseError, LeaseHeld
    from denseclip.models import ModelLoadError, check_weights, warn_unknown_names
    from denseclip.ray.auth import ClusterAccessError, check_access
    from denseclip.ray.labeling import LabelingError, cluster_device, validate_labeling

    try:
        check_weights(job.labeler.model, job.labeler.pretrained)  # e.g. offline: one line, before any output or actor
        check_access(job.address)  # the cluster reachable and its token found, just as early
        job.labeler = cluster_device(job.labeler, job.address)
        warn_unknown_names(job.labeler, job.classes, "label")
        # Checked before the log and the lease exist: a refused run writes nothing into the output.
        validate_labeling(job.input, job.output, job.labeler, job.classes, overwrite=job.overwrite)
    except (ModelLoadError, ClusterAccessError, LabelingError) as exc:
        print(f"label: error: {exc}", file=sys.stderr)
        return 2
    log = None if args.verbose else log_url(job.output, "label")
    try:
        with run_log(log) as console:
            try:
                code = run(job, console)
            except LeaseHeld as exc:
                console.error(f"label: not started: {exc}; re-run later or pass --wait-for-lease SECONDS")
                return EXIT_LEASE_HELD
            except (LabelingError, LeaseError, ModelLoadError) as exc:
                console.error(f"label: error: {exc}")
                return 2
            except Exception as exc:  # noqa: BLE001 - any failure of the job: its traceback, then one line and exit 1
                traceback.print_exc()
                console.error(f"label: failed: {type(exc).__name__}: {exc}" + (f" (traceback in {log})" if log else ""))
                return 1
            if log:
                console.print(f"label: log: {log}")
            return code
    except OSError as exc:  # the log file itself: the output is not writable
        print(f"label: error: output {job.output}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

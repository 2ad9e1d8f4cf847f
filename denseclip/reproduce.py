"""One command per reproduction: a spec (``jobs/reproduce_<dataset>_<setting>.yaml``) becomes five stages,
prepare -> label -> train -> evaluate -> baseline, each the command lines of ``denseclip`` commands run as one Ray
job step.

    name: coco-stuff-zero-shot
    workdir: s3://bucket/reproduce/coco-stuff-zero-shot     # every stage's outputs, under fixed names
    prepare:                                                # the shards: a dataset on disk, or the synthetic world
      dataset: {root: /data/coco_stuff164k, train_split: train, val_split: val, shard_size: 1000, workers: 8}
    label: {num_actors: 16, labeler: {...}}                 # the train spec's teacher, with these overrides
    train: {spec: jobs/train_coco_stuff_zero_shot.yaml, set: {training.iterations: 80000}}
    evaluate: {num_overlays: 8}

The train spec is the one source of the dataset, the teacher and the schedule; the reproduction only points its
data at the stages' outputs and switches it to the precomputed pseudo labels of the label stage (labelled, in the
zero-shot setting, with the unseen classes alone: the targets' argmax among them). The baseline stage labels the
validation shards with that same teacher over every class and scores it as the evaluate stage scores DenseCLIP+
(``<workdir>/baseline/report.json`` beside ``<workdir>/evaluation/report.json``: the paper's tables put DenseCLIP
beside DenseCLIP+). A spec may ``extends:`` another (``denseclip.config.read_job_spec``). A stage is
complete when its record (``<workdir>/stages/<stage>.json``, written once its step succeeded) holds the same
commands and its outputs exist; complete stages are skipped, so a re-run continues where the last one stopped
(and the stage it stopped in resumes: labeling skips committed shards, training restarts from its checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from denseclip import storage
from denseclip.config import ConfigError, LabelerConfig, apply_override, read_job_spec
from denseclip.datasets import get_dataset
from denseclip.mask_store import code_version
from denseclip.sources.sharding import MANIFEST

STAGES = ("prepare", "label", "train", "evaluate", "baseline")
PROTOCOL = "paper"  # the preset (denseclip/data/protocols.json) reproductions label under by default
SPEC_FIELDS = ("name", "workdir", "prepare", "label", "train", "evaluate")
SYNTHETIC_FIELDS = ("seed", "num_images", "shard_size", "size")
DATASET_FIELDS = ("root", "train_split", "val_split", "shard_size", "workers")
LABEL_FIELDS = ("num_actors", "cpus_per_actor", "labeler")
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.json"
BASELINE_MASKS = "masks"  # <workdir>/baseline/masks: the teacher's labels of the validation shards


# How a stage runs a command: the installed package's, as a module (no checkout needed; on a cluster, the
# image's denseclip or the job's working directory's).
DENSECLIP = ["python", "-m", "denseclip"]


@dataclass
class Stage:
    """One step: ``commands`` (argv lists, run one after another as one Ray job) and the ``outputs`` that
    exist once it has run (URLs; a folder of shards counts when it holds one)."""

    name: str
    commands: list[list[str]]
    outputs: list[str] = field(default_factory=list)

    @property
    def entrypoint(self) -> str:
        """The commands as one shell line (the Ray job's entrypoint)."""
        return " && ".join(shlex.join(command) for command in self.commands)


@dataclass
class Reproduction:
    """A validated reproduction spec and where its stages put their outputs."""

    path: str
    name: str
    workdir: str
    prepare: dict
    label: dict
    train_spec_path: str
    train_spec: dict  # the train spec with the reproduction's ``set`` overrides applied
    train_set: dict
    evaluate: dict

    @classmethod
    def from_file(cls, path: str, overrides: Sequence[str] = ()) -> Reproduction:
        """Read and check the spec at ``path`` (with the ``KEY=VALUE`` ``overrides`` applied, dotted keys into it)
        and the train spec it names; ConfigError names the field."""
        spec = read_job_spec(path, kind="reproduction spec")
        for assignment in overrides:
            apply_override(spec, assignment)
        _known(spec, SPEC_FIELDS, path)
        for name in ("name", "workdir"):
            if not isinstance(spec.get(name), str) or not spec[name]:
                raise ConfigError(f"{path}: {name}: required, a non-empty string (got {spec.get(name)!r})")
        sections = {name: spec.get(name) or {} for name in ("prepare", "label", "train", "evaluate")}
        for name, section in sections.items():
            if not isinstance(section, dict):
                raise ConfigError(f"{path}: {name}: must be a mapping, got {section!r}")
        prepare = sections["prepare"]
        if sorted(prepare) not in (["synthetic"], ["dataset"]):
            raise ConfigError(f"{path}: prepare: give exactly one of synthetic (denseclip render-world worlds) "
                              f"or dataset (denseclip prepare), got {sorted(prepare)}")
        if "synthetic" in prepare:
            for split in ("train", "val"):
                world = prepare["synthetic"].get(split) if isinstance(prepare["synthetic"], dict) else None
                if not isinstance(world, dict):
                    raise ConfigError(f"{path}: prepare.synthetic.{split}: a mapping of {', '.join(SYNTHETIC_FIELDS)}")
                _known(world, SYNTHETIC_FIELDS, f"{path}: prepare.synthetic.{split}")
                for name in ("seed", "num_images", "shard_size"):
                    if not isinstance(world.get(name), int) or isinstance(world.get(name), bool):
                        raise ConfigError(f"{path}: prepare.synthetic.{split}.{name}: required, an integer")
        else:
            dataset = prepare["dataset"]
            if not isinstance(dataset, dict) or not dataset.get("root"):
                raise ConfigError(f"{path}: prepare.dataset.root: required (the dataset folder)")
            _known(dataset, DATASET_FIELDS, f"{path}: prepare.dataset")
        _known(sections["label"], LABEL_FIELDS, f"{path}: label")
        _known(sections["train"], ("spec", "set"), f"{path}: train")
        _known(sections["evaluate"], ("num_overlays",), f"{path}: evaluate")
        train_spec_path = sections["train"].get("spec")
        if not isinstance(train_spec_path, str):
            raise ConfigError(f"{path}: train.spec: required, the DenseCLIP+ job spec (jobs/train_*.yaml)")
        train_set = sections["train"].get("set") or {}
        train_spec = read_job_spec(train_spec_path, kind="train spec")
        if not isinstance(train_spec, dict) or not isinstance(train_set, dict):
            raise ConfigError(f"{path}: train: spec must name a job spec and set must be a mapping")
        # Nested mappings (from --set train.set.training.iterations=...) set fields, never replace sections.
        train_set = _dotted(train_set)
        for key, value in train_set.items():
            apply_override(train_spec, f"{key}={json.dumps(value)}")
        reproduction = cls(path, spec["name"], spec["workdir"].rstrip("/"), prepare, sections["label"],
                           train_spec_path, train_spec, train_set, sections["evaluate"])
        LabelerConfig.from_dict(reproduction.labeler, where=f"{path}: label.labeler", dataset=reproduction.dataset)
        return reproduction

    # ------------------------------------------------------------------------------------ where things go
    @property
    def dataset(self) -> str:
        return self.train_spec["dataset"]

    def path_of(self, name: str) -> str:
        """``<workdir>/<name>``: shards/train, shards/val, pseudo-labels, train, evaluation, stages."""
        return storage.join(self.workdir, *name.split("/"))

    @property
    def labeler(self) -> dict:
        """The teacher of the train spec with the reproduction's ``label.labeler`` overrides, under the paper's
        protocol unless they name another."""
        return {"protocol": PROTOCOL, **(self.train_spec.get("labeler") or {}), **(self.label.get("labeler") or {})}

    @property
    def final_checkpoint(self) -> str:
        run = self.train_spec["run"]["name"]
        return self.path_of(f"train/{run}/checkpoint-{int(self.train_spec['training']['iterations']):06d}")

    # ---------------------------------------------------------------------------------------- the stages
    def stages(self) -> list[Stage]:
        return [self._prepare(), self._label(), self._train(), self._evaluate(), self._baseline()]

    def _prepare(self) -> Stage:
        commands, outputs = [], []
        for split in ("train", "val"):
            out = self.path_of(f"shards/{split}")
            if "synthetic" in self.prepare:
                world = self.prepare["synthetic"][split]
                commands.append([*DENSECLIP, "render-world", "--output", out,
                                 *_flags({k: world.get(k) for k in SYNTHETIC_FIELDS})])
                last = (int(world["num_images"]) - 1) // int(world["shard_size"])
                outputs.append(storage.join(out, f"shard-{last:06d}.tar"))  # written last
            else:
                dataset = self.prepare["dataset"]
                commands.append([*DENSECLIP, "prepare", "--dataset", self.dataset, "--input",
                                 str(dataset["root"]), "--split", str(dataset.get(f"{split}_split", split)),
                                 "--output", out, "--no-progress",
                                 *_flags({k: dataset.get(k) for k in ("shard_size", "workers")})])
                outputs.append(storage.join(out, MANIFEST))  # written once every shard is
        return Stage("prepare", commands, outputs)

    def _label(self) -> Stage:
        return Stage("label", [self._label_command("shards/train", "pseudo-labels", self._label_vocabulary())],
                     [self.path_of(f"pseudo-labels/{SUMMARY_FILE}")])

    def _label_command(self, shards: str, masks: str, vocabulary: list[str]) -> list[str]:
        """``denseclip label`` labelling ``<workdir>/<shards>`` into the mask store ``<workdir>/<masks>`` with the
        ``vocabulary`` and labeller flags, on the label stage's actors."""
        return [*DENSECLIP, "label", "--input", self.path_of(shards), "--output", self.path_of(masks),
                *vocabulary, *_flags({k: self.label.get(k) for k in ("num_actors", "cpus_per_actor")})]

    def _label_vocabulary(self) -> list[str]:
        """The label stage's vocabulary and labeller flags. A zero-shot reproduction labels with the unseen
        classes alone: its targets take the teacher's argmax among them (as the official teacher's, and the
        on-the-fly teacher's), which an argmax over every class cannot give back. That vocabulary names no
        dataset, so the labeller's settings go resolved, the preset's values for this dataset included."""
        if (self.train_spec.get("training") or {}).get("setting") != "zero_shot":
            return ["--classes", self.dataset, *_labeler_flags(self.labeler)]
        info = get_dataset(self.dataset)
        config = LabelerConfig.from_dict(self.labeler, dataset=self.dataset)
        resolved = {k: v for k, v in dataclasses.asdict(config).items() if k != "extra"}
        return ["--set", _set("classes", [list(info.classes[i]) for i in info.unseen_ids]),
                *_labeler_flags(resolved)]

    def _train(self) -> Stage:
        data = {"data.train": self.path_of("shards/train"), "data.val": self.path_of("shards/val"),
                "data.mask_store": self.path_of("pseudo-labels"), "training.pseudo_labels": "precomputed",
                "run.storage_path": self.path_of("train")}
        overrides = {**self.train_set, **data}
        command = [*DENSECLIP, "train", "--config", self.train_spec_path,
                   *(x for key, value in overrides.items() for x in ("--set", _set(key, value)))]
        return Stage("train", [command], [storage.join(self.final_checkpoint, REPORT_FILE)])

    def _evaluate(self) -> Stage:
        out = self.path_of("evaluation")
        command = [*DENSECLIP, "evaluate", "--checkpoint", self.final_checkpoint, "--input",
                   self.path_of("shards/val"), "--classes", self.dataset, "--output", out,
                   *_flags({"num_overlays": self.evaluate.get("num_overlays")})]
        return Stage("evaluate", [command], [storage.join(out, REPORT_FILE)])

    def _baseline(self) -> Stage:
        """The teacher (DenseCLIP) on the validation shards, over every class of the dataset, scored like
        DenseCLIP+."""
        out = self.path_of("baseline")
        vocabulary = ["--classes", self.dataset, *_labeler_flags(self.labeler)]
        score = [*DENSECLIP, "evaluate", "--pred", self.path_of(f"baseline/{BASELINE_MASKS}"), "--input",
                 self.path_of("shards/val"), "--classes", self.dataset, "--output", out,
                 "--method", f"DenseCLIP {self.labeler['model']}",
                 *_flags({"num_overlays": self.evaluate.get("num_overlays")})]
        label = self._label_command("shards/val", f"baseline/{BASELINE_MASKS}", vocabulary)
        return Stage("baseline", [label, score], [storage.join(out, REPORT_FILE)])

    # ---------------------------------------------------------------------------------- stage records
    def record_url(self, stage: Stage) -> str:
        return self.path_of(f"stages/{stage.name}.json")

    def is_complete(self, stage: Stage) -> bool:
        """The stage succeeded before with the same commands, and its outputs are there."""
        try:
            record = json.loads(storage.read_bytes(self.record_url(stage)))
        except FileNotFoundError:
            return False
        return record.get("commands") == stage.commands and all(storage.exists(url) for url in stage.outputs)

    def record(self, stage: Stage, seconds: float) -> None:
        """Mark ``stage`` complete (after its step succeeded)."""
        record = {"stage": stage.name, "commands": stage.commands, "seconds": round(seconds, 1),
                  "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "code_version": code_version()}
        storage.write_bytes(self.record_url(stage), json.dumps(record, indent=2).encode())


def _known(section: dict, fields: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(section) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: {unknown[0]}: unknown field (known: {', '.join(fields)})")


def _dotted(mapping: dict, prefix: str = "") -> dict:
    """``{"training": {"iterations": 40}, "run.name": "x"} -> {"training.iterations": 40, "run.name": "x"}``."""
    out = {}
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            out.update(_dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _flags(values: dict) -> list[str]:
    """``{"num_images": 200} -> ["--num-images", "200"]``, leaving out unset values."""
    return [x for key, value in values.items() if value is not None
            for x in (f"--{key.replace('_', '-')}", str(value))]


def _labeler_flags(labeler: dict) -> list[str]:
    return [x for key, value in sorted(labeler.items()) for x in ("--set", _set(f"labeler.{key}", value))]


def _set(key: str, value) -> str:
    """A ``--set KEY=VALUE`` argument; the value as JSON, which the scripts read back as YAML."""
    return f"{key}={json.dumps(value)}"


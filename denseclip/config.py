"""Labeler configuration: one validated description of "which model, which vocabulary, which options",
shared by the CLI, the Ray pipelines and the job specs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from denseclip.vocabulary import parse_class_list, read_classes_file

# Kept free of torch imports so a bad configuration fails in well under a second.
TINY_MODEL = "denseclip-tiny-shapes"
PRECISIONS = ("fp32", "bf16", "fp16")

MODES = ("whole", "slide")


class ConfigError(ValueError):
    """A configuration value that is invalid; the message names the field."""


def read_yaml_file(path: str, kind: str = "job file") -> object:
    """The parsed YAML at ``path``; ConfigError naming the file (as ``kind``) when it cannot be read or parsed."""
    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"--config: cannot read {kind} {path!r}: {exc}") from exc


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


def resolve_vocabulary(spec: str | list, synonyms: bool = False) -> list[list[str]]:
    """A vocabulary from a dataset name (``coco_stuff``), a class file path, or a comma-separated list / a list.

    Returns one list of names per class (synonyms after the first name).
    """
    from denseclip.datasets import DATASET_NAMES, get_dataset

    if isinstance(spec, list):
        return parse_class_list(", ".join(str(s) for s in spec), source="vocabulary")
    if spec in DATASET_NAMES:
        return [list(c) for c in get_dataset(spec, synonyms=synonyms).classes]
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"vocabulary: expected a dataset name, a classes file or class names, got {spec!r}")
    try:
        is_file = Path(spec).is_file()
    except OSError:  # a long comma-separated list is no file name
        is_file = False
    if is_file:
        return read_classes_file(spec)
    if "," not in spec and (spec.endswith(".txt") or "/" in spec):
        raise ConfigError(f"vocabulary: no such dataset or classes file {spec!r}")
    return parse_class_list(spec, source="vocabulary")


@dataclass
class LabelerConfig:
    """How DenseCLIP labels: model, weights, prompt templates and inference options (see ``DenseCLIP``)."""

    model: str = TINY_MODEL
    pretrained: str | None = None
    templates: str | None = None  # None: "synthetic" for the tiny model, "denseclip85" otherwise
    mode: str = "whole"
    crop_size: int = 448
    crop_stride: int = 224
    short_side: int | None = None
    temperature: float = 100.0
    background_threshold: float | None = None
    key_smoothing: float | None = None
    prompt_denoising: float | None = None
    upsample_topk: int | None = 3
    batch_size: int = 8
    device: str = "cpu"
    precision: str = "fp32"
    extra: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, values: dict, where: str = "labeler") -> LabelerConfig:
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"{where}.{unknown[0]}: unknown field (known: {', '.join(sorted(names))})")
        config = cls(**values)
        config.validate(where)
        return config

    def validate(self, where: str = "labeler") -> None:
        def fail(name: str, problem: str) -> None:
            raise ConfigError(f"{where}.{name}: {problem} (got {getattr(self, name)!r})")

        for name in ("model", "device"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                fail(name, "must be a non-empty string")
        for name in ("pretrained", "templates"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                fail(name, "must be a string or null")
        if self.mode not in MODES:
            fail("mode", f"must be one of {', '.join(MODES)}")
        if self.precision not in PRECISIONS:
            fail("precision", f"must be one of {', '.join(PRECISIONS)}")
        for name in ("crop_size", "crop_stride", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                fail(name, "must be a positive integer")
        if self.short_side is not None and (not isinstance(self.short_side, int) or self.short_side <= 0):
            fail("short_side", "must be a positive integer or null")
        if self.upsample_topk is not None and (not isinstance(self.upsample_topk, int) or self.upsample_topk <= 0):
            fail("upsample_topk", "must be a positive integer or null")
        if not isinstance(self.temperature, (int, float)) or self.temperature <= 0:
            fail("temperature", "must be a positive number")
        for name in ("background_threshold", "prompt_denoising"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and 0 < value < 1):
                fail(name, "must be a number in (0, 1) or null")
        if self.key_smoothing is not None and not (isinstance(self.key_smoothing, (int, float))
                                                   and -1 <= self.key_smoothing < 1):
            fail("key_smoothing", "must be a number in [-1, 1) or null")
        if not self.device.startswith(("cpu", "cuda")):
            fail("device", "must be cpu or cuda[:N]")

    @property
    def template_set(self) -> str:
        if self.templates is not None:
            return self.templates
        return "synthetic" if self.model == TINY_MODEL else "denseclip85"

    def build(self, classes: list[list[str]], clip=None):
        """Load the model (unless ``clip`` is given) and return the ``DenseCLIP`` labeler for ``classes``."""
        from denseclip.models import load_clip
        from denseclip.predictor import DenseCLIP

        clip = clip or load_clip(self.model, self.pretrained, device=self.device, precision=self.precision)
        return DenseCLIP(
            clip, classes, self.template_set, mode=self.mode, crop_size=self.crop_size,
            crop_stride=self.crop_stride, short_side=self.short_side, temperature=self.temperature,
            background_threshold=self.background_threshold, key_smoothing=self.key_smoothing,
            prompt_denoising=self.prompt_denoising, upsample_topk=self.upsample_topk, batch_size=self.batch_size,
        )


def add_labeler_arguments(parser) -> None:
    """Add every LabelerConfig field to an argparse parser as ``--field-name``."""
    group = parser.add_argument_group("model and inference")
    group.add_argument("--model", default=TINY_MODEL, help="open_clip model name, e.g. RN50, RN50x16, ViT-B-16 "
                       f"(default: the shipped {TINY_MODEL})")
    group.add_argument("--pretrained", default=None, help="open_clip tag (openai), checkpoint path or URL")
    group.add_argument("--templates", default=None, help="template set (denseclip85, imagenet80) or file")
    group.add_argument("--mode", default="whole", help="whole or slide")
    group.add_argument("--crop-size", type=int, default=448)
    group.add_argument("--crop-stride", type=int, default=224)
    group.add_argument("--short-side", type=int, default=None, help="resize the short side before inference")
    group.add_argument("--temperature", type=float, default=100.0)
    group.add_argument("--background-threshold", type=float, default=None)
    group.add_argument("--key-smoothing", type=float, default=None, help="key-smoothing affinity threshold")
    group.add_argument("--prompt-denoising", type=float, default=None, help="prompt-denoising threshold")
    group.add_argument("--upsample-topk", type=int, default=3, help="0 upsamples every class (exact)")
    group.add_argument("--batch-size", type=int, default=8)
    group.add_argument("--device", default="cpu")
    group.add_argument("--precision", default="fp32")


def labeler_config_from_args(args) -> LabelerConfig:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(LabelerConfig) if hasattr(args, f.name)}
    if values.get("upsample_topk") == 0:
        values["upsample_topk"] = None
    config = LabelerConfig(**values)
    config.validate("--")
    return config

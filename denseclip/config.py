"""Labeler configuration: one validated description of "which model, which vocabulary, which options",
shared by the CLI, the Ray pipelines and the job specs."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from denseclip.names import (
    AUTO,
    CUDA_PRECISION,
    CUDA_SIZE_BUCKET,
    DEFAULT_HEAD,
    DEFAULT_MODEL,
    DEFAULT_RESIZE,
    HEADS,
    MODES,
    NATIVE_BF16_FLAGS,
    NO_PROTOCOL,
    NORMALISATIONS,
    PRECISIONS,
    RESIZE_AUTO,
    RESIZE_NATIVE,
    TINY_MODEL,
    TINY_MODELS,
)
from denseclip.protocols import ProtocolError, protocol_defaults, protocol_names
from denseclip.vocabulary import parse_class_list, read_classes_file, validate_classes

# Kept free of torch imports so a bad configuration fails in well under a second.
_DEVICE = re.compile(r"^(auto|cpu|cuda(:[0-9]+)?)$")

_RESIZE_FIELDS = ("resize_to", "short_side")


class ConfigError(ValueError):
    """A configuration value that is invalid; the message names the field."""


def read_yaml_file(path: str, kind: str = "job file") -> object:
    """The parsed YAML at ``path``; ConfigError naming the file (as ``kind``) when it cannot be read or parsed."""
    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"--config: cannot read {kind} {path!r}: {exc}") from exc


def _merge(base: dict, changes: dict) -> dict:
    """``base`` with ``changes`` applied key by key, nested mappings merged rather than replaced."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_job_spec(path: str, seen: tuple[str, ...] = (), kind: str = "job spec") -> dict:
    """The job spec at ``path``; a spec with ``extends: other.yaml`` (relative to its own folder) is that spec
    with this one's fields merged over it (a variant names only what it changes). ``seen``: the specs already
    on the way here (a cycle is refused)."""
    seen = seen or (os.path.normpath(path),)
    spec = read_yaml_file(path, kind)
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
    return _merge(read_job_spec(base_path, (*seen, base_path), kind), spec)


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
    """A vocabulary from a dataset name (``coco_stuff``), a class file path, or a comma-separated list / a list
    of names / a list of name lists (one per class, synonyms after the first name).

    Returns one list of names per class (synonyms after the first name).
    """
    from denseclip.datasets import DATASET_NAMES, get_dataset

    if isinstance(spec, list) and spec and all(isinstance(c, list) for c in spec):
        classes = [[str(n).strip() for n in c if str(n).strip()] for c in spec]
        if not all(classes):
            raise ConfigError(f"vocabulary: class {classes.index([]) + 1} has no name")
        return validate_classes(classes, "vocabulary")
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

    model: str = DEFAULT_MODEL
    pretrained: str | None = None
    head: str = DEFAULT_HEAD  # the dense head (HEADS); ResNet towers have "maskclip" only
    templates: str | None = None  # None: "synthetic" for the tiny models, "denseclip85" otherwise
    synonyms: bool = False  # a dataset vocabulary's synonym-enriched class lists (get_dataset(..., synonyms=True))
    name_softmax: bool = False  # class probabilities as the successors compute them (see DenseCLIP)
    normalisation: str = "clip"  # the images' mean/std (NORMALISATIONS)
    protocol: str | None = None  # the preset (protocols.json) that supplied the defaults, recorded
    resize_to: tuple[int, int] | str | None = RESIZE_AUTO  # [long, short], "auto" or "native" (= null)
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
    device: str = AUTO  # cpu, cuda, cuda:N or "auto": cuda where the labeller has a GPU (see with_gpus)
    precision: str = AUTO  # fp32, bf16, fp16 or "auto" (see effective_precision)
    size_bucket: int | str | None = AUTO  # pixels, null (the stride) or "auto" (see effective_size_bucket)
    extra: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, values: dict, where: str = "labeler", dataset: str | None = None) -> LabelerConfig:
        """Build and validate from plain data. With ``protocol`` among ``values``, that preset's values for
        ``dataset`` (None: a free vocabulary) are the defaults; the fields given in ``values`` win (giving
        either ``resize_to`` or ``short_side`` replaces the preset's resize; the shipped tiny models keep the
        resolution they were trained at under any preset)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"{where}.{unknown[0]}: unknown field (known: {', '.join(sorted(names))})")
        defaults = {}
        if values.get("protocol") is not None:
            try:
                defaults = protocol_defaults(values["protocol"], dataset)
            except ProtocolError as exc:
                raise ConfigError(f"{where}.protocol: {exc}") from exc
            # The shipped tiny models see images at the size they were trained at, whatever the preset says.
            if values.get("model", DEFAULT_MODEL) in TINY_MODELS or any(
                    values.get(name) is not None for name in _RESIZE_FIELDS):
                defaults = {k: v for k, v in defaults.items() if k not in _RESIZE_FIELDS}
        values = {**defaults, **values}
        if isinstance(values.get("resize_to"), list):
            values["resize_to"] = tuple(values["resize_to"])
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
        if self.head not in HEADS:
            fail("head", f"must be one of {', '.join(HEADS)}")
        if self.head != DEFAULT_HEAD and (self.model == TINY_MODEL or self.model.startswith("RN")):
            fail("head", f"needs a ViT model; {self.model} is a ResNet, whose only head is {DEFAULT_HEAD!r}")
        for name in ("synonyms", "name_softmax"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "must be true or false")
        if self.normalisation not in NORMALISATIONS:
            fail("normalisation", f"must be one of {', '.join(NORMALISATIONS)}")
        if self.precision not in PRECISIONS + (AUTO,):
            fail("precision", f"must be one of {', '.join(PRECISIONS + (AUTO,))}")
        if self.size_bucket not in (AUTO, None) and (not isinstance(self.size_bucket, int)
                                                     or isinstance(self.size_bucket, bool) or self.size_bucket <= 0):
            fail("size_bucket", f"must be a positive number of pixels, null or {AUTO!r}")
        for name in ("crop_size", "crop_stride", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                fail(name, "must be a positive integer")
        if self.short_side is not None and (not isinstance(self.short_side, int) or self.short_side <= 0):
            fail("short_side", "must be a positive integer or null")
        if self.resize_to not in (RESIZE_AUTO, RESIZE_NATIVE, None):
            if not (isinstance(self.resize_to, (tuple, list)) and len(self.resize_to) == 2
                    and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in self.resize_to)):
                fail("resize_to", f"must be [long, short] (two positive integers), {RESIZE_AUTO!r}, "
                                  f"{RESIZE_NATIVE!r} or null")
            if self.short_side is not None:
                fail("resize_to", "give either resize_to or short_side, not both")
        if self.protocol is not None and self.protocol not in protocol_names():
            fail("protocol", f"must be one of {', '.join(protocol_names())} or null")
        if self.upsample_topk is not None and (not isinstance(self.upsample_topk, int) or self.upsample_topk <= 0):
            fail("upsample_topk", "must be a positive integer or null")
        if not isinstance(self.temperature, (int, float)) or self.temperature <= 0:
            fail("temperature", "must be a positive number")
        for name in ("background_threshold", "prompt_denoising"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and 0 < value < 1):
                fail(name, "must be a number in (0, 1) or null")
        if self.key_smoothing is not None and not (isinstance(self.key_smoothing, (int, float))
                                                   and 0 < self.key_smoothing <= 1):
            fail("key_smoothing", "must be a probability threshold in (0, 1] (1: smooth everywhere) or null")
        if not _DEVICE.match(self.device):
            fail("device", "must be auto, cpu, cuda or cuda:N")

    @property
    def effective_resize_to(self) -> tuple[int, int] | None:
        """The keep-ratio resize ``(long, short)`` applied before inference, "auto" resolved: None (images as
        they are, or ``short_side``) for the shipped tiny models, :data:`DEFAULT_RESIZE` for real CLIP."""
        if self.resize_to == RESIZE_AUTO:
            return None if self.short_side is not None or self.model in TINY_MODELS else DEFAULT_RESIZE
        if self.resize_to in (RESIZE_NATIVE, None):
            return None
        return tuple(self.resize_to)

    def with_gpus(self, available: bool) -> LabelerConfig:
        """A copy whose device "auto" is resolved: ``cuda`` when GPUs are ``available`` to the labeller, else
        ``cpu``; any other device stays as it is."""
        if self.device != AUTO:
            return self
        return dataclasses.replace(self, device="cuda" if available else "cpu")

    @property
    def on_cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def effective_precision(self) -> str:
        """The precision the labeller computes in, "auto" resolved: :data:`CUDA_PRECISION` on a GPU, bf16 on a
        CPU with native bf16 arithmetic (:func:`cpu_has_native_bf16`), fp32 otherwise."""
        if self.precision != AUTO:
            return self.precision
        if self.on_cuda:
            return CUDA_PRECISION
        return "bf16" if cpu_has_native_bf16() else "fp32"

    @property
    def effective_size_bucket(self) -> int | None:
        """Whole-mode padding multiple in pixels (None: the tower's stride), "auto" resolved by device."""
        if self.size_bucket == AUTO:
            return CUDA_SIZE_BUCKET if self.on_cuda else None
        return self.size_bucket

    def resolved(self) -> LabelerConfig:
        """A copy with every "auto" setting resolved to what it means for this model on this machine (for
        provenance, and for workers that must compute what the driver recorded). The device must be known first
        (:meth:`with_gpus`): precision and padding depend on it."""
        if self.device == AUTO:
            raise ValueError("LabelerConfig.resolved(): resolve device 'auto' first (with_gpus)")
        resize = self.effective_resize_to
        return dataclasses.replace(self, resize_to=None if resize is None else list(resize),
                                   precision=self.effective_precision, size_bucket=self.effective_size_bucket)

    @property
    def template_set(self) -> str:
        if self.templates is not None:
            return self.templates
        return "synthetic" if self.model in TINY_MODELS else "denseclip85"



def add_labeler_arguments(parser) -> None:
    """Add every LabelerConfig field to an argparse parser as ``--field-name``."""
    group = parser.add_argument_group("model and inference")
    group.add_argument("--model", default=DEFAULT_MODEL, help="open_clip model name, e.g. RN50, RN50x16, ViT-B-16, "
                       f"or a shipped tiny CLIP ({', '.join(TINY_MODELS)}; they only know their synthetic worlds) "
                       f"(default: {DEFAULT_MODEL}, the paper's, with OpenAI's weights)")
    group.add_argument("--pretrained", default=None, help="open_clip tag, checkpoint path or URL, or 'random' "
                       "(default: openai for open_clip models, the shipped weights for the tiny ones)")
    group.add_argument("--head", default=DEFAULT_HEAD, choices=HEADS, help="dense head: maskclip (DenseCLIP's, "
                       "the default) or, for ViT models, sclip, clearclip or naclip")
    group.add_argument("--templates", default=None, help="template set (denseclip85, imagenet80) or file")
    group.add_argument("--synonyms", action="store_true", default=False,
                       help="a dataset vocabulary with its synonym-enriched class lists (max over names)")
    group.add_argument("--name-softmax", action="store_true", default=False,
                       help="class probabilities as a softmax over every name, each class the max over its names")
    group.add_argument("--normalisation", default="clip", choices=NORMALISATIONS,
                       help="the images' mean/std: CLIP's own (default) or ImageNet's, as the official code feeds CLIP")
    group.add_argument("--mode", default="whole", help="whole or slide")
    group.add_argument("--crop-size", type=int, default=448)
    group.add_argument("--crop-stride", type=int, default=224)
    group.add_argument("--protocol", default=None, help="a named preset of the options below: "
                       f"{', '.join(protocol_names())} (explicit flags win), or '{NO_PROTOCOL}'")
    group.add_argument("--resize-to", type=_resize_argument, default=RESIZE_AUTO,
                       help="keep-ratio resize before inference: LONG,SHORT (fit both), 'native' (as is) or "
                       "'auto' (default: 2048,512 for real CLIP models, native for the tiny ones)")
    group.add_argument("--short-side", type=int, default=None, help="resize the short side before inference "
                       "(instead of --resize-to)")
    group.add_argument("--temperature", type=float, default=100.0)
    group.add_argument("--background-threshold", type=float, default=None)
    group.add_argument("--key-smoothing", type=float, default=None, help="key smoothing where the top class "
                       "probability is below this threshold (1: everywhere, as the paper's configs)")
    group.add_argument("--prompt-denoising", type=float, default=None, help="prompt-denoising threshold")
    group.add_argument("--upsample-topk", type=int, default=3, help="0 upsamples every class (exact)")
    group.add_argument("--batch-size", type=int, default=8)
    group.add_argument("--device", default=AUTO, help="auto (default: cuda where the labeller has a GPU, cpu "
                       "otherwise), cpu, cuda or cuda:N")
    group.add_argument("--precision", default=AUTO, help="fp32, bf16, fp16 or auto (default: fp16 on CUDA, bf16 "
                       "on CPUs with native bf16 (AVX-512 BF16 or AMX), else fp32)")
    group.add_argument("--size-bucket", type=_size_bucket_argument, default=AUTO,
                       help="whole mode: pad images to multiples of this many pixels so that similar sizes share "
                       f"a forward pass; 'none' pads to the stride (default auto: {CUDA_SIZE_BUCKET} on CUDA, none "
                       "on CPU)")


def _size_bucket_argument(text: str) -> int | str | None:
    if text.lower() in (AUTO, "none", "null"):
        return AUTO if text.lower() == AUTO else None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of pixels, 'auto' or 'none', got {text!r}") from None


def _resize_argument(text: str) -> tuple[int, int] | str:
    """``--resize-to`` values: ``auto``, ``native`` (or ``none``), or ``LONG,SHORT`` / ``LONGxSHORT``."""
    if text.lower() in (RESIZE_AUTO, RESIZE_NATIVE, "none"):
        return RESIZE_NATIVE if text.lower() == "none" else text.lower()
    parts = text.replace("x", ",").split(",")
    try:
        long, short = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LONG,SHORT, 'auto' or 'native', got {text!r}") from None
    return long, short


def labeler_config_from_args(args, dataset: str | None = None) -> LabelerConfig:
    """The LabelerConfig of parsed ``add_labeler_arguments`` flags; with ``--protocol``, that preset (for
    ``dataset``) fills in every flag left at its default."""
    fields = [f for f in dataclasses.fields(LabelerConfig) if f.name != "extra" and hasattr(args, f.name)]
    values = {f.name: getattr(args, f.name) for f in fields}
    if values.get("upsample_topk") == 0:
        values["upsample_topk"] = None
    if values.get("protocol") == NO_PROTOCOL:
        values["protocol"] = None
    if values.get("protocol") is not None:
        # Flags left at their defaults give way to the preset.
        defaults = build_defaults()
        values = {k: v for k, v in values.items() if k == "protocol" or v != defaults.get(k)}
    return LabelerConfig.from_dict(values, where="--", dataset=dataset)


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this machine's CPU computes in bf16 natively (AVX-512 BF16 or AMX; read from /proc/cpuinfo, so
    False where that file does not exist)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
    except OSError:
        return False
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)


@functools.cache
def build_defaults() -> dict:
    """The defaults of ``add_labeler_arguments``' flags, by LabelerConfig field name."""
    parser = argparse.ArgumentParser()
    add_labeler_arguments(parser)
    return vars(parser.parse_args([]))

"""The dataset registry: class names, palettes, ignore index and the paper's zero-shot splits, looked up by name.

Everything here is data (``data/datasets.json`` and the class and palette files it names); this module only
reads it. Train ids are contiguous: id ``i`` is ``classes[i]``; 255 is ignore.

A registry entry's ``palette`` is ``"voc"`` (the default: the PASCAL VOC colour map, the objects in VOC's
colours with or without a background class), ``"class_names"`` (colours from the names, as
``visualize.class_palette`` gives them) or a JSON file of ``colors`` in train-id order. Background is black
whichever it is.

``voc20`` and ``context59`` are the paper's annotation-free evaluation of VOC and Context: no background class,
and the ground truth of ``voc`` / ``context`` shards read as MMSegmentation's ``reduce_zero_label`` reads it
(background 0 -> 255, ignored; class k -> k - 1; 255 stays). Without background they keep each class's colour
of the background-aware dataset.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from denseclip.visualize import class_palette, default_palette
from denseclip.vocabulary import read_classes_file

DATA_DIR = Path(__file__).parent / "data"
IGNORE_INDEX = 255
BACKGROUND_NAME = "background"


class DatasetError(ValueError):
    """An unknown dataset or a class name that does not resolve; the message names it."""


@functools.cache
def _registry() -> dict[str, dict]:
    return json.loads((DATA_DIR / "datasets.json").read_text(encoding="utf-8"))


DATASET_NAMES: tuple[str, ...] = tuple(_registry())


def normalize_class_name(name: str) -> str:
    """The form names are matched in: lower case without spaces, ``_`` or ``-`` ("TV_monitor" -> "tvmonitor")."""
    return re.sub(r"[\s_\-]+", "", name.lower())


@dataclass(frozen=True, eq=False)
class DatasetInfo:
    """One dataset's label space.

    Attributes:
        name: registry name ("voc", "context", "coco_stuff", "synthetic").
        classes: K prompt name lists in train-id order (synonyms after the first name).
        class_names: K display names (the plain name; the background class is always "background").
        synonyms: K name lists of the synonym-enriched vocabulary (for name resolution and optional prompting).
        palette: uint8 (K, 3), the dataset's standard colours (background black).
        unseen: class names (from ``class_names``) of the paper's zero-shot unseen split.
        ignore_background_in_zero_shot: VOC drops background from the zero-shot evaluation.
        background_index: train id of background, or None (COCO-Stuff has none).
        raw_unused_ids: raw annotation ids that never occur (COCO-Stuff's 11 removed COCO things).
        reduced_from: the background-aware dataset whose shards and labels this one reads with background
            dropped (``voc`` for ``voc20``), or None.
        ignore_index: label of unannotated pixels (255).
    """

    name: str
    classes: list[list[str]]
    class_names: list[str]
    synonyms: list[list[str]]
    palette: np.ndarray
    unseen: list[str]
    ignore_background_in_zero_shot: bool
    background_index: int | None
    raw_unused_ids: tuple[int, ...] = ()
    reduced_from: str | None = None
    ignore_index: int = IGNORE_INDEX

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def label_lut(self) -> np.ndarray | None:
        """uint8 (256,) mapping the label ids of ``reduced_from`` (its shards' ground truth, or masks labelled
        with its vocabulary) to this dataset's: 0 (background) -> 255, k -> k - 1, 255 -> 255. None when
        labels are read as they are."""
        if self.reduced_from is None:
            return None
        lut = np.full(256, self.ignore_index, dtype=np.uint8)
        lut[1:self.num_classes + 1] = np.arange(self.num_classes)
        return lut

    def class_index(self, name: str) -> int:
        """Train id of ``name``, matched case/space-insensitively against ``class_names``, then the synonyms.

        Raises DatasetError when no class, or more than one, carries the name.
        """
        return _resolve(name, self.name, self.class_names, self.synonyms)

    @property
    def unseen_ids(self) -> list[int]:
        return [self.class_index(n) for n in self.unseen]

    @property
    def seen_ids(self) -> list[int]:
        unseen = set(self.unseen_ids)
        return [i for i in range(self.num_classes) if i not in unseen]


def train_id_lut(name: str) -> np.ndarray:
    """uint8 (256,): raw annotation value -> contiguous train id, 255 for ignore.

    Raw ids count up from 0; the ``raw_unused_ids`` are skipped (they and every value past the last class
    become 255). COCO-Stuff: raw 0-10 stay, raw 11 (COCO "street sign") is unused, raw 12 -> 11, ...,
    raw 181 -> 170. Reads only the registry, so converters need not load the class files.
    """
    entry = _entry(name)
    unused = set(entry["raw_unused_ids"])
    used = [raw for raw in range(entry["num_classes"] + len(unused)) if raw not in unused]
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    lut[used] = np.arange(len(used))
    return lut


def _resolve(name: str, dataset: str, class_names: list[str], synonyms: list[list[str]]) -> int:
    wanted = normalize_class_name(name)
    for vocabulary in ([[n] for n in class_names], synonyms):
        ids = sorted({i for i, names in enumerate(vocabulary) for n in names if normalize_class_name(n) == wanted})
        if len(ids) > 1:
            raise DatasetError(f"{dataset}: class name {name!r} is ambiguous (ids {ids})")
        if ids:
            return ids[0]
    raise DatasetError(f"{dataset}: no class named {name!r} (classes: {', '.join(class_names[:10])}, ...)")


def _entry(name: str) -> dict:
    if name not in _registry():
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(DATASET_NAMES)}")
    return _registry()[name]


@functools.cache
def _dataset(name: str, synonyms: bool) -> DatasetInfo:
    entry = _entry(name)
    plain = read_classes_file(DATA_DIR / entry["classes_file"])
    if entry["prepend_background"]:
        plain = [[BACKGROUND_NAME]] + plain
    enriched = read_classes_file(DATA_DIR / entry["synonyms_file"])
    k = entry["num_classes"]
    if len(plain) != k or len(enriched) != k:
        raise DatasetError(f"{name}: registry says {k} classes, class files have {len(plain)} and {len(enriched)}")
    class_names = [names[0] for names in plain]
    if entry["background_index"] is not None:
        class_names[entry["background_index"]] = BACKGROUND_NAME
    return DatasetInfo(
        name=name,
        classes=enriched if synonyms else plain,
        class_names=class_names,
        synonyms=enriched,
        palette=_palette(entry, class_names),
        # The split is written in the paper's words; it is stored in this dataset's own names.
        unseen=[class_names[_resolve(n, name, class_names, enriched)] for n in entry["unseen"]],
        ignore_background_in_zero_shot=entry["ignore_background_in_zero_shot"],
        background_index=entry["background_index"],
        raw_unused_ids=tuple(entry["raw_unused_ids"]),
        reduced_from=entry.get("reduced_from"),
    )


def _palette(entry: dict, class_names: list[str]) -> np.ndarray:
    kind = entry.get("palette", "voc")
    if kind == "class_names":
        return class_palette(class_names)
    if kind == "voc":
        # VOC's colour map starts with background: without one, the first class takes VOC's first object colour.
        first = 0 if entry["background_index"] == 0 else 1
        return class_palette(class_names, default_palette(first + len(class_names))[first:])
    colors = json.loads((DATA_DIR / kind).read_text(encoding="utf-8"))["colors"]
    return class_palette(class_names, np.asarray(colors, dtype=np.uint8))


def get_dataset(name: str, synonyms: bool = False) -> DatasetInfo:
    """The registered dataset ``name`` (one of :data:`DATASET_NAMES`).

    ``synonyms=False``: ``classes`` are the plain names of the reference implementation (MaskCLIP);
    ``synonyms=True``: the synonym-enriched lists (SCLIP-style ``cls_*.txt``; VOC's background line is a list
    of stuff words). ``class_names``, ids and palette are the same either way.
    """
    return _dataset(name, synonyms)


CUSTOM = "custom"


def custom_dataset(classes: list[list[str]]) -> DatasetInfo:
    """The label space of a free vocabulary (``classes``: one name list per class, synonyms after the first, as
    ``vocabulary.read_classes_file`` gives them): no zero-shot split, colours that follow the names
    (``visualize.class_palette``), and background at the class whose first name is "background" (if any)."""
    class_names = [names[0] for names in classes]
    background = [i for i, n in enumerate(class_names) if normalize_class_name(n) == BACKGROUND_NAME]
    return DatasetInfo(name=CUSTOM, classes=[list(c) for c in classes], class_names=class_names,
                       synonyms=[list(c) for c in classes], palette=class_palette(class_names), unseen=[],
                       ignore_background_in_zero_shot=False, background_index=background[0] if background else None)

"""Evaluation inputs and scoring: ground truth from shards or PNG folders, predictions from a mask store, a PNG
folder or a labeler run on the fly (optionally on corrupted images), accumulated into an ``Evaluation``.

An ``Evaluation`` is what one worker (or the single process) produced: confusion matrices per condition, the
overlay sample and the scored keys; evaluations of disjoint images ``merge`` into the evaluation of their union.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import heapq
import itertools
import posixpath
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import fsspec
import numpy as np

from denseclip.config import ConfigError, LabelerConfig
from denseclip.datasets import normalize_class_name
from denseclip.images import decode_image, decode_label_map
from denseclip.mask_store import MASKS_DIR, MaskStore
from denseclip.metrics import ConfusionMatrix, EvaluationInputError
from denseclip.predictor import DenseCLIP
from denseclip.robustness import CLEAN, Condition, apply_condition
from denseclip.shards import expand_shards, read_shard, sanitize_key

IMAGE_EXTS = ("jpg", "jpeg", "png")


class ImageLabeler(Protocol):
    """A prediction source run on the fly: DenseCLIP, or any segmentation model with the same method
    (``denseclip.plus.target.SegmentationTarget`` has it)."""

    def label_images(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """uint8 (H, W, 3) RGB images -> ``(labels (H, W) integer, confidence (H, W) float32)`` each."""


# ------------------------------------------------------------------------------------------------ inputs
@dataclass
class GroundTruth:
    key: str
    labels: np.ndarray  # uint8 (H, W)
    image: bytes | None  # the encoded image, when the source has one


class LabelMapFolder:
    """``<key>.png`` label maps under a local folder or fsspec URL; the same ``keys``/``get`` as a MaskStore."""

    def __init__(self, url: str):
        self.url = url
        self.fs, root = fsspec.core.url_to_fs(url)
        root = root.rstrip("/")
        self._paths = {posixpath.relpath(p, root)[: -len(".png")]: p
                       for p in self.fs.find(root) if p.endswith(".png")}

    def keys(self) -> set[str]:
        return set(self._paths)

    def get(self, key: str) -> np.ndarray:
        return decode_label_map(self.fs.cat_file(self._paths[key]), key)


def open_predictions(url: str, skip_damaged: bool = False) -> MaskStore | LabelMapFolder:
    """A MaskStore when ``url`` holds a ``masks/`` folder (``skip_damaged``: see MaskStore), else a
    LabelMapFolder."""
    fs, root = fsspec.core.url_to_fs(url)
    if not fs.isdir(root):
        raise FileNotFoundError(f"--pred {url}: no such folder")
    if fs.isdir(posixpath.join(root, MASKS_DIR)):
        return MaskStore(url, skip_damaged=skip_damaged)
    return LabelMapFolder(url)


def is_label_map_folder(url: str) -> bool:
    """True for a folder of PNG label maps, False for shards (a ``.tar``, a glob, or a folder holding tars)."""
    fs, root = fsspec.core.url_to_fs(url)
    return fs.isdir(root) and not any(p.endswith(".tar") for p in fs.find(root))


def shard_ground_truth(sample: dict) -> GroundTruth:
    """The ground truth of one shard sample (its ``seg.png`` and image member)."""
    key = sample["__key__"]
    if "seg.png" not in sample:
        raise EvaluationInputError(f"{key}: shard {sample['__shard__']} has no seg.png ground truth for this sample")
    image = next((sample[ext] for ext in IMAGE_EXTS if ext in sample), None)
    return GroundTruth(key, decode_label_map(sample["seg.png"], key), image)


def iter_ground_truth(url: str) -> Iterator[GroundTruth]:
    """Ground truth in key order from a folder of ``<key>.png`` or from shards (with the images)."""
    if is_label_map_folder(url):
        folder = LabelMapFolder(url)
        if not folder.keys():
            raise FileNotFoundError(f"--gt {url}: no .png label maps or .tar shards in this folder")
        for key in sorted(folder.keys()):
            yield GroundTruth(key, folder.get(key), None)
        return
    for shard in expand_shards(url):
        for sample in read_shard(shard):
            yield shard_ground_truth(sample)


def load_image(item: GroundTruth, images_url: str | None) -> np.ndarray | None:
    """The decoded uint8 (H, W, 3) image of ``item``: its own bytes, else ``<images_url>/<key>.jpg|jpeg|png``,
    else None. A key that would address a file outside ``images_url`` (``../``) is an EvaluationInputError."""
    encoded = item.image
    if encoded is None and images_url:
        if not _is_safe_key(item.key):
            raise EvaluationInputError(f"{item.key}: unsafe sample key (it would address a file outside "
                                       f"--images {images_url}); its image is not looked up")
        fs, root = fsspec.core.url_to_fs(images_url)
        path = next((p for ext in IMAGE_EXTS if fs.isfile(p := posixpath.join(root, f"{item.key}.{ext}"))), None)
        encoded = fs.cat_file(path) if path else None
    return None if encoded is None else decode_image(encoded, item.key)


def _is_safe_key(key: str) -> bool:
    try:
        return sanitize_key(key) == key
    except ValueError:
        return False


def build_dense_clip(config: LabelerConfig, classes: list[list[str]], device: str | None = None,
                     background_index: int | None = None, clip=None) -> ImageLabeler:
    """DenseCLIP labelling into the evaluation's label ids (``classes[i]`` = id i), on ``device`` (default:
    ``config.device``).

    With a background threshold, background is either the threshold alone (the paper: the vocabulary's first
    class, plain "background", is replaced by DenseCLIP's own background class) or, with ``config.synonyms``
    and a dataset's ``background_index``, that class scored by its synonyms (VOC's "sky, wall, ...") which also
    takes every pixel where no class reaches the threshold (the successors' protocol). ``clip``: an already
    loaded model (else ``config``'s is loaded)."""
    if device is not None:
        config = dataclasses.replace(config, device=device)
    if config.background_threshold is None:
        return DenseCLIP.from_config(config, classes, clip)
    if config.synonyms and background_index is not None:
        return DenseCLIP.from_config(config, classes, clip, background_class=background_index)
    if normalize_class_name(classes[0][0]) != "background":
        raise ConfigError("--background-threshold: the vocabulary's first class (label 0) must be background, "
                          f"got {classes[0][0]!r}")
    return DenseCLIP.from_config(config, classes[1:], clip)


# ------------------------------------------------------------------------------------------------ scoring
class KeySample:
    """At most ``size`` items chosen by a hash of their key (the ``size`` smallest): a uniform sample that is the
    same whatever order or partitioning the items arrive in, so a distributed run draws the same pictures."""

    def __init__(self, size: int):
        self.size = size
        self._items: dict[str, object] = {}
        self._heap: list[tuple[int, str]] = []  # (-rank, key) of the kept items: the largest rank on top

    @staticmethod
    def rank(key: str) -> int:
        return int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big")

    def wants(self, key: str) -> bool:
        """Whether an item of ``key`` offered now would be kept (to skip building items that would not)."""
        if self.size <= 0 or key in self._items:
            return False
        return len(self._heap) < self.size or (-self.rank(key), key) > self._heap[0]

    def offer(self, key: str, item: object) -> None:
        if not self.wants(key):
            return
        if len(self._heap) == self.size:
            _, dropped = heapq.heapreplace(self._heap, (-self.rank(key), key))
            del self._items[dropped]
        else:
            heapq.heappush(self._heap, (-self.rank(key), key))
        self._items[key] = item

    def merge(self, other: KeySample) -> KeySample:
        for key, item in other._items.items():
            self.offer(key, item)
        return self

    @property
    def items(self) -> list:
        """The kept items, by key."""
        return [self._items[key] for key in sorted(self._items)]


@dataclass
class Evaluation:
    """Confusion matrices per condition (only ``clean`` without a sweep), the overlay sample of clean
    ``(key, image | None, gt, pred)``, the keys scored and the ``unscored`` ones (ground truth whose stored
    prediction was in a damaged part, skipped when asked). Pickles, so workers can return one each.

    ``gt_lut`` / ``pred_lut``: uint8 (256,) maps applied to every ground truth / stored prediction before
    scoring (``DatasetInfo.label_lut``: ``voc`` shards and masks scored as ``voc20``), or None.
    """

    num_classes: int
    ignore_index: int = 255
    num_overlays: int = 8
    matrices: dict[Condition, ConfusionMatrix] = field(default_factory=dict)
    keys: set[str] = field(default_factory=set)
    gt_lut: np.ndarray | None = None
    pred_lut: np.ndarray | None = None
    unscored: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.overlays = KeySample(self.num_overlays)

    def empty(self) -> Evaluation:
        """A new, empty evaluation with the same classes, ignore index, overlay count and label maps."""
        return Evaluation(self.num_classes, self.ignore_index, self.num_overlays, gt_lut=self.gt_lut,
                          pred_lut=self.pred_lut)

    @staticmethod
    def _mapped(labels: np.ndarray, lut: np.ndarray | None) -> np.ndarray:
        return labels if lut is None else lut[labels]

    def matrix(self, condition: Condition = CLEAN) -> ConfusionMatrix:
        if condition not in self.matrices:
            self.matrices[condition] = ConfusionMatrix(self.num_classes, self.ignore_index)
        return self.matrices[condition]

    def add_prediction(self, item: GroundTruth, pred: np.ndarray, images_url: str | None = None) -> None:
        """Score a stored prediction (H, W) against ``item`` (clean condition)."""
        gt, pred = self._mapped(item.labels, self.gt_lut), self._mapped(pred, self.pred_lut)
        self.matrix().update(pred, gt, item.key)
        self.keys.add(item.key)
        if self.overlays.wants(item.key):
            self.overlays.offer(item.key, (item.key, load_image(item, images_url), gt, pred))

    def add_labelled(self, labeler: ImageLabeler, condition: Condition,
                     batch: Sequence[tuple[str, np.ndarray, np.ndarray]]) -> None:
        """Label the images of ``batch`` ``(key, image uint8 (H, W, 3) as seen under condition, gt (H, W))``
        and score them under ``condition``."""
        if not batch:
            return
        predictions = labeler.label_images([image for _, image, _ in batch])
        conf = self.matrix(condition)
        for (key, image, gt), (pred, _) in zip(batch, predictions):
            gt = self._mapped(gt, self.gt_lut)
            conf.update(pred, gt, key)
            if condition.is_clean:
                self.keys.add(key)
                self.overlays.offer(key, (key, image, gt, pred))

    def merge(self, other: Evaluation) -> Evaluation:
        for condition, conf in other.matrices.items():
            self.matrix(condition).merge(conf)
        self.keys |= other.keys
        self.unscored |= other.unscored
        self.overlays.merge(other.overlays)
        return self

    @property
    def num_images(self) -> int:
        return self.matrix().num_images


def stored_prediction(predictions: MaskStore | LabelMapFolder, pred_keys: set[str], key: str,
                      pred_url: str) -> np.ndarray | None:
    """The stored prediction (H, W) of ground-truth ``key``: None when a mask store opened with
    ``skip_damaged`` skipped damaged parts and ``key`` may have been in one; without a prediction otherwise, an
    EvaluationInputError naming the key."""
    if key in pred_keys:
        with contextlib.suppress(KeyError):  # its part turned out damaged when read, and was skipped
            return predictions.get(key)
    if getattr(predictions, "skipped", None):
        return None
    raise EvaluationInputError(f"{key}: no prediction for this ground-truth key in {pred_url}")


def score_predictions(ground_truth: Iterable[GroundTruth], predictions: MaskStore | LabelMapFolder, pred_url: str,
                      evaluation: Evaluation, images_url: str | None = None) -> Evaluation:
    """Score stored predictions; a ground-truth key without a prediction is an error naming it, unless damaged
    parts of the store were skipped (see :func:`stored_prediction`): then it is counted as ``unscored``."""
    pred_keys = predictions.keys()
    for item in ground_truth:
        pred = stored_prediction(predictions, pred_keys, item.key, pred_url)
        if pred is None:
            evaluation.unscored.add(item.key)
        else:
            evaluation.add_prediction(item, pred, images_url)
    return evaluation


def score_labeler(ground_truth: Iterable[GroundTruth], labeler: ImageLabeler, evaluation: Evaluation,
                  conditions: Sequence[Condition] = (CLEAN,), seed: int = 0, batch_size: int = 8,
                  images_url: str | None = None) -> Evaluation:
    """Label every ground-truth image under every condition (``apply_condition`` seeded by ``seed``) and score
    it; an item without an image is an error naming it."""
    items = iter(ground_truth)
    while chunk := list(itertools.islice(items, batch_size)):
        decoded = [(item.key, _required_image(item, images_url), item.labels) for item in chunk]
        for condition in conditions:
            evaluation.add_labelled(labeler, condition, [(key, apply_condition(image, condition, key, seed), gt)
                                                         for key, image, gt in decoded])
    return evaluation


def _required_image(item: GroundTruth, images_url: str | None) -> np.ndarray:
    image = load_image(item, images_url)
    if image is None:
        raise EvaluationInputError(f"{item.key}: no image to label (shards need a jpg/png member; with a folder of "
                                   "label maps give --images)")
    return image

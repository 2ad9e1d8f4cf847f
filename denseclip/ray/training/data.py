"""Training rows for DenseCLIP+ read from WebDataset shards (and the mask store's pseudo labels), and the Ray
datasets of them.

The read functions run inside Ray Data's read tasks; the module imports neither torch nor the training code, so a
read task's process stays small (about 70 MB instead of about 1 GB).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import ray

from denseclip.damage import DamagedShardError
from denseclip.images import ImageDecodeError, decode_label_map, decode_sample_image
from denseclip.mask_store import MaskStore
from denseclip.shards import expand_shards, read_shard

if TYPE_CHECKING:
    from denseclip.ray.training.job import TrainJob

log = logging.getLogger(__name__)


def decode_training_sample(sample: dict, num_classes: int, with_label: bool, store: MaskStore | None,
                           label_lut: np.ndarray | None = None, *, with_confidence: bool = True,
                           pseudo_label_ids: list[int] | None = None) -> dict:
    """One shard sample -> a row: ``key``, ``image`` uint8 (H, W, 3), and as asked ``label`` uint8 (H, W)
    (ground truth, mapped through ``label_lut`` (256,) when given: ``voc`` shards read as ``voc20``),
    ``pseudo_label`` uint8 (H, W) and, ``with_confidence``, ``pseudo_confidence`` float32 (H, W) in [0, 1] (from
    ``store``; training needs it only for a confidence threshold, and it costs most of a row's mask decoding). The
    store's label ``i`` is the dataset class ``pseudo_label_ids[i]`` when given: a store labelled with the unseen
    classes.
    Raises ``ImageDecodeError``, ``ValueError`` or ``KeyError`` naming the sample when it cannot be used."""
    key = sample["__key__"]
    image = decode_sample_image(sample)
    row = {"key": key, "image": image}
    if with_label:
        if "seg.png" not in sample:
            raise ValueError(f"{key}: no seg.png ground truth")
        labels = decode_label_map(sample["seg.png"], key)
        labels = labels if label_lut is None else label_lut[labels]
        row["label"] = _checked_map(labels, image, num_classes, key, "ground truth")
    if store is not None:
        if pseudo_label_ids is None:
            row["pseudo_label"] = _checked_map(store.get(key), image, num_classes, key, "pseudo label")
        else:
            labels = _checked_map(store.get(key), image, len(pseudo_label_ids), key, "pseudo label")
            row["pseudo_label"] = _id_lut(pseudo_label_ids)[labels]
    if store is not None and with_confidence:
        confidence = store.get_confidence(key)
        row["pseudo_confidence"] = np.ones(image.shape[:2], np.float32) if confidence is None else confidence
    return row


def _checked_map(labels: np.ndarray, image: np.ndarray, num_classes: int, key: str, what: str) -> np.ndarray:
    if labels.shape != image.shape[:2]:
        raise ValueError(f"{key}: {what} is {labels.shape}, the image {image.shape[:2]}")
    bad = (labels >= num_classes) & (labels != 255)
    if bad.any():
        raise ValueError(f"{key}: {what} has labels {np.unique(labels[bad])[:5].tolist()} outside the "
                         f"{num_classes} classes")
    return labels


def _id_lut(class_ids: list[int]) -> np.ndarray:
    """``(256,)`` uint8: label ``i`` -> ``class_ids[i]``, 255 (ignored) -> 255."""
    lut = np.full(256, 255, np.uint8)
    lut[:len(class_ids)] = class_ids
    return lut


def read_samples(item: dict, num_classes: int, with_label: bool, mask_store: str | None,
                 label_lut: np.ndarray | None = None, *, skip_damaged: bool = False,
                 with_confidence: bool = True, pseudo_label_ids: list[int] | None = None) -> Iterator[dict]:
    """Ray Data ``flat_map``: the rows of the shard ``item["shard"]`` (see :func:`decode_training_sample`).
    A sample that cannot be used is logged and skipped, so every worker's split holds only usable rows; a
    damaged tar ends its shard early. A damaged part of ``mask_store`` raises DamagedPartError naming it, or
    with ``skip_damaged`` is logged and its samples skipped."""
    store = MaskStore(mask_store, skip_damaged=skip_damaged) if mask_store else None
    shard = item["shard"]
    try:
        for sample in read_shard(shard):
            try:
                yield decode_training_sample(sample, num_classes, with_label, store, label_lut,
                                             with_confidence=with_confidence, pseudo_label_ids=pseudo_label_ids)
            except (ImageDecodeError, ValueError, KeyError) as exc:
                log.warning("skipping a sample of %s: %s", shard, exc)
    except DamagedShardError as exc:
        log.warning("%s is damaged; its remaining samples are skipped: %s", shard, exc.reason)


def build_datasets(job: TrainJob) -> dict[str, ray.data.Dataset]:
    """The ``train`` and ``val`` Ray datasets of decoded rows (see :func:`decode_training_sample`)."""

    def read(shards: str | list[str], with_label: bool, mask_store: str | None) -> ray.data.Dataset:
        urls = expand_shards(shards)
        items = ray.data.from_items([{"shard": url} for url in urls], override_num_blocks=len(urls))
        return items.flat_map(read_samples, num_cpus=job.workers.data_cpus,
                              fn_kwargs={"num_classes": job.info.num_classes, "with_label": with_label,
                                         "mask_store": mask_store, "label_lut": job.info.label_lut,
                                         "skip_damaged": job.data.skip_damaged,
                                         "with_confidence": job.training.confidence_threshold is not None,
                                         "pseudo_label_ids": job.teacher_class_ids})

    training = job.training
    precomputed = training.uses_pseudo_labels and training.pseudo_labels == "precomputed"
    datasets = {"train": read(job.data.train, training.setting in ("zero_shot", "seen_only"),
                              job.data.mask_store if precomputed else None),
                "val": read(job.data.val, job.has_ground_truth, None)}
    return {name: ds.materialize() for name, ds in datasets.items()} if job.data.materialize else datasets

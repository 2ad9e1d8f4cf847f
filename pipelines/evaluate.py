"""Score predicted label maps against ground truth and write the evaluation report.

    python pipelines/evaluate.py --pred DIR_OR_STORE --gt DIR_OR_SHARDS \\
        (--dataset voc|context|coco_stuff|synthetic | --classes-file FILE) [--unseen "name, name"] \\
        [--ignore-index 255] --out DIR

--pred: a folder of ``<key>.png`` label maps (keys may hold '/') or a Parquet mask store (a folder with
``masks/``). --gt: a folder of ``<key>.png`` label maps or WebDataset shards (``seg.png``, and ``jpg`` for the
overlay pictures). Every ground-truth key must have a prediction of the same size, otherwise the run stops
with exit code 2 and a one-line error naming the key: a silently skipped image would bias the numbers.
Writes DIR/report.json (percent), tables.md, confusion.png, overlays/*.png and index.html.
"""

from __future__ import annotations

import argparse
import posixpath
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
from tqdm import tqdm

from denseclip.datasets import get_dataset
from denseclip.images import decode_image, decode_label_map
from denseclip.mask_store import MASKS_DIR, MaskStore
from denseclip.metrics import EvaluationInputError, accumulate, summarize
from denseclip.report import write_report
from denseclip.shards import expand_shards, read_shard
from denseclip.visualize import default_palette

IMAGE_EXTS = ("jpg", "jpeg", "png")


@dataclass
class Vocabulary:
    """What the label ids mean and how to score them."""

    name: str
    class_names: list[str]
    palette: np.ndarray  # uint8 (K, 3)
    unseen: list[str]
    ignore_classes: list[str]


@dataclass
class GroundTruth:
    key: str
    labels: np.ndarray  # uint8 (H, W)
    image: bytes | None  # encoded image for the overlay pictures, when the source has one


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


class Reservoir:
    """A uniform sample of at most ``size`` items from a stream of unknown length (seeded: same run, same
    sample)."""

    def __init__(self, size: int, seed: int = 0):
        self.size, self.items, self.offered = size, [], 0
        self._rng = random.Random(seed)

    def offer(self, item) -> None:
        self.offered += 1
        if len(self.items) < self.size:
            self.items.append(item)
            return
        slot = self._rng.randrange(self.offered)
        if slot < self.size:
            self.items[slot] = item


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pred", required=True, help="folder of <key>.png label maps, or a mask store root")
    parser.add_argument("--gt", required=True, help="folder of <key>.png label maps, or shards (dir, glob, .tar)")
    vocab = parser.add_mutually_exclusive_group(required=True)
    vocab.add_argument("--dataset", help="registered dataset: voc, context, coco_stuff, synthetic")
    vocab.add_argument("--classes-file", help="one class per line (label id = line number), synonyms after ','")
    parser.add_argument("--unseen", help='unseen class names, "name, name" (overrides the dataset split)')
    parser.add_argument("--ignore-classes", help='classes left out of scoring, "name, name" (overrides the '
                                                 "dataset convention, e.g. VOC zero-shot drops background)")
    parser.add_argument("--ignore-index", type=int, default=255, help="ground-truth label that is not scored")
    parser.add_argument("--images", help="folder of <key>.jpg|png images for the overlays when --gt is a folder")
    parser.add_argument("--num-overlays", type=int, default=8, help="images drawn as image | gt | pred grids")
    parser.add_argument("--method", help="row name in the paper tables (default: the --pred folder name)")
    parser.add_argument("--out", required=True, help="output folder")
    return parser.parse_args(argv)


def _names(text: str | None) -> list[str] | None:
    return None if text is None else [n.strip() for n in text.split(",") if n.strip()]


def load_vocabulary(args: argparse.Namespace) -> Vocabulary:
    """Class names, palette and zero-shot split from --dataset or --classes-file, with the CLI overrides."""
    unseen, ignore = _names(args.unseen), _names(args.ignore_classes)
    if args.dataset:
        info = get_dataset(args.dataset)
        unseen = list(info.unseen) if unseen is None else unseen
        if ignore is None:
            drop = info.ignore_background_in_zero_shot and unseen and info.background_index is not None
            ignore = [info.class_names[info.background_index]] if drop else []
        return Vocabulary(args.dataset, list(info.class_names), np.asarray(info.palette, np.uint8), unseen, ignore)
    from denseclip.vocabulary import read_classes_file

    class_names = [names[0] for names in read_classes_file(args.classes_file)]
    return Vocabulary(Path(args.classes_file).stem, class_names, default_palette(len(class_names)),
                      unseen or [], ignore or [])


def open_predictions(url: str) -> MaskStore | LabelMapFolder:
    """A MaskStore when ``url`` holds a ``masks/`` folder, else a LabelMapFolder."""
    fs, root = fsspec.core.url_to_fs(url)
    if not fs.isdir(root):
        raise FileNotFoundError(f"--pred {url}: no such folder")
    if fs.isdir(posixpath.join(root, MASKS_DIR)):
        return MaskStore(url)
    return LabelMapFolder(url)


def iter_ground_truth(url: str) -> Iterator[GroundTruth]:
    """Ground truth in key order from a folder of ``<key>.png`` or from shards (with the images)."""
    fs, root = fsspec.core.url_to_fs(url)
    if fs.isdir(root) and not any(p.endswith(".tar") for p in fs.find(root)):
        folder = LabelMapFolder(url)
        if not folder.keys():
            raise FileNotFoundError(f"--gt {url}: no .png label maps or .tar shards in this folder")
        for key in sorted(folder.keys()):
            yield GroundTruth(key, folder.get(key), None)
        return
    for shard in expand_shards(url):
        for sample in read_shard(shard):
            key = sample["__key__"]
            if "seg.png" not in sample:
                raise EvaluationInputError(f"{key}: shard {shard} has no seg.png ground truth for this sample")
            image = next((sample[ext] for ext in IMAGE_EXTS if ext in sample), None)
            yield GroundTruth(key, decode_label_map(sample["seg.png"], key), image)


def matched_pairs(ground_truth: Iterator[GroundTruth], predictions, pred_url: str, overlays: Reservoir,
                  seen_keys: set[str]) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """``(key, pred, gt)`` for every ground-truth key; a key without a prediction is an error naming it."""
    pred_keys = predictions.keys()
    for item in ground_truth:
        if item.key not in pred_keys:
            raise EvaluationInputError(f"{item.key}: no prediction for this ground-truth key in {pred_url}")
        pred = predictions.get(item.key)
        seen_keys.add(item.key)
        overlays.offer((item.key, item.image, item.labels, pred))
        yield item.key, pred, item.labels


def _overlay_image(key: str, encoded: bytes | None, images_url: str | None) -> np.ndarray | None:
    if encoded is None and images_url:
        fs, root = fsspec.core.url_to_fs(images_url)
        path = next((p for ext in IMAGE_EXTS if fs.isfile(p := posixpath.join(root, f"{key}.{ext}"))), None)
        encoded = fs.cat_file(path) if path else None
    return None if encoded is None else decode_image(encoded, key)


def evaluate(args: argparse.Namespace) -> dict:
    vocab = load_vocabulary(args)
    predictions = open_predictions(args.pred)
    overlays, seen_keys = Reservoir(args.num_overlays), set()
    pairs = matched_pairs(iter_ground_truth(args.gt), predictions, args.pred, overlays, seen_keys)
    conf = accumulate(tqdm(pairs, desc="evaluate", unit="img", disable=None), len(vocab.class_names),
                      args.ignore_index)
    if conf.num_images == 0:
        raise EvaluationInputError(f"--gt {args.gt}: no ground-truth samples")
    summary = summarize(conf, vocab.class_names, unseen=vocab.unseen, ignore_classes=vocab.ignore_classes)
    unmatched = len(predictions.keys() - seen_keys)
    summary.update(
        dataset=vocab.name, method=args.method or Path(args.pred.rstrip("/")).name,
        inputs={"pred": args.pred, "gt": args.gt, "ignore_index": args.ignore_index,
                "unmatched_predictions": unmatched,
                "pred_provenance": getattr(predictions, "provenance", None)})
    if unmatched:
        print(f"warning: {unmatched} predictions have no ground truth and were not scored", file=sys.stderr)
    samples = [(key, _overlay_image(key, image, args.images), gt, pred)
               for key, image, gt, pred in sorted(overlays.items, key=lambda item: item[0])]
    write_report(args.out, summary, conf, vocab.class_names, vocab.palette, samples)
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        summary = evaluate(args)
    except (ValueError, OSError) as exc:  # bad input of any kind: one line naming it, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    headline = ("miou", "miou_seen", "miou_unseen", "hiou", "pixel_accuracy")
    print(" | ".join(f"{k} {'-' if summary[k] is None else format(summary[k], '.2f')}" for k in headline)
          + f" -> {Path(args.out) / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Score predicted label maps against ground truth and write the evaluation report.

    denseclip evaluate (--pred DIR_OR_STORE | --model NAME [--pretrained TAG_OR_PATH] [labeler options]
        | --checkpoint DENSECLIP_PLUS_DIR) \\
        --input DIR_OR_SHARDS --classes voc|voc20|context|context59|coco_stuff|synthetic|FILE|"name, name" \\
        [--unseen "name, name"] [--ignore-index 255] [--corruptions all [--severities 1,2,3,4,5]] [--ray] \\
        --output DIR

--pred: a folder of ``<key>.png`` label maps (keys may hold '/') or a Parquet mask store (a folder with
``masks/``). --model: label the ground truth's images on the fly with DenseCLIP (the model and inference options
as for ``denseclip predict``; the vocabulary is the evaluation's; with a dataset preset as --classes, the
inference protocol is the
dataset's preset of --protocol, by default ``paper``: the paper's resize and whole-image inference; ``--protocol
none`` for none). --checkpoint: label them with a trained
DenseCLIP+ target network (a checkpoint folder of ``denseclip train``, trained on the same classes).
The target scores each image as the official test pipeline does: resized keeping its ratio to fit the
training's ``resize_to`` (COCO-Stuff and VOC (2048, 512), Context (520, 520)), its logits resized back to the
image; ``--resize-to LONG,SHORT`` or ``native`` scores it otherwise.
--input: the ground truth, a folder of ``<key>.png`` label maps (the images, for labelling or the overlays, from --images) or
WebDataset shards (``seg.png`` and the image). Every ground-truth key must have a prediction of the same size,
otherwise the run stops with exit code 2 and a one-line error naming the key: a silently skipped image would
bias the numbers. Writes DIR/report.json (percent), tables.md, confusion.png, overlays/*.png and index.html.

--classes voc20 / context59: the paper's annotation-free evaluation. The ground truth of ``voc`` / ``context``
shards is read without background (MMSegmentation's reduce_zero_label: 0 -> ignored, k -> k - 1), and so are
predictions in a mask store labelled with the background-aware ``voc`` / ``context`` vocabulary (a background
prediction is then a miss).

--corruptions (with --model or --checkpoint): the robustness sweep of the paper's Tables 4-5. Every image is
also labelled after each ImageNet-C corruption (all 8, or a comma-separated list) at each --severities, seeded
by --corruption-seed; DIR/report.json stays the clean evaluation, and DIR/robustness.json, robustness.md and
robustness.png hold mIoU per corruption x severity next to the clean mIoU.

--ray: score on Ray Data (for large validation sets; --input must be shards): the cluster at --address or
$RAY_ADDRESS, else a private local Ray on this machine, stopped afterwards. Same numbers as without --ray.

A damaged part of a --pred mask store (docs/mask-store.md) stops the run with exit code 2 and a line naming the
file; --skip-damaged leaves such parts out instead: their ground-truth keys are not scored, and report.json
lists the parts skipped (``inputs.skipped_damaged_parts``) and counts the keys (``inputs.unscored_keys``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from denseclip.commands.options import Parser, add_address, add_classes, add_verbose, renamed
from denseclip.config import (
    LabelerConfig,
    add_labeler_arguments,
    labeler_config_from_args,
    resolve_vocabulary,
)
from denseclip.corruptions import CORRUPTIONS
from denseclip.damage import DamagedPartError
from denseclip.datasets import DATASET_NAMES, get_dataset, normalize_class_name
from denseclip.evaluation import (
    Evaluation,
    ImageLabeler,
    build_dense_clip,
    is_label_map_folder,
    iter_ground_truth,
    open_predictions,
    score_labeler,
    score_predictions,
)
from denseclip.metrics import EvaluationInputError, summarize
from denseclip.names import AUTO
from denseclip.report import write_report, write_robustness_report
from denseclip.robustness import CLEAN, robustness_summary, sweep_conditions
from denseclip.runlog import library_output
from denseclip.shards import expand_shards
from denseclip.visualize import class_palette


@dataclass
class Vocabulary:
    """What the label ids mean and how to score them."""

    name: str
    classes: list[list[str]]  # names per class, for labelling on the fly (label id = index)
    class_names: list[str]
    palette: np.ndarray  # uint8 (K, 3)
    unseen: list[str]
    ignore_classes: list[str]
    synonyms: list[list[str]] | None = None  # a dataset's synonym-enriched classes (labeller option synonyms)
    background_index: int | None = None
    label_lut: np.ndarray | None = None  # ground truth (and background-aware masks) -> these ids (voc20)
    reduced_from: str | None = None  # the background-aware dataset the label_lut reads (voc for voc20)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = Parser(prog=prog or "denseclip evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pred", help="folder of <key>.png label maps, or a mask store root")
    parser.add_argument("--checkpoint", help="DenseCLIP+ checkpoint folder: label the images with it on the fly")
    parser.add_argument("--input", required=True, help="the ground truth: a folder of <key>.png label maps, or "
                        "shards (dir, glob, .tar)")
    renamed(parser, "--gt", "--input")
    add_classes(parser, required=True, extra=" (label id = position). A preset also gives the zero-shot split and "
                "the paper's protocol; voc20, context59: the annotation-free evaluation without background")
    renamed(parser, "--dataset", "--classes")
    renamed(parser, "--classes-file", "--classes")
    parser.add_argument("--unseen", help='unseen class names, "name, name" (overrides the dataset split)')
    parser.add_argument("--ignore-classes", help='classes left out of scoring, "name, name" (overrides the '
                                                 "dataset convention, e.g. VOC zero-shot drops background)")
    parser.add_argument("--ignore-index", type=int, default=255, help="ground-truth label that is not scored")
    parser.add_argument("--images", help="folder of <key>.jpg|png images when --input is a folder of label maps")
    parser.add_argument("--num-overlays", type=int, default=8, help="images drawn as image | gt | pred grids")
    parser.add_argument("--method", help="row name in the paper tables (default: the --pred folder or --model)")
    parser.add_argument("--output", required=True, help="output folder")
    renamed(parser, "--out", "--output")
    parser.add_argument("--skip-damaged", action="store_true",
                        help="leave out the damaged parts of a --pred mask store (listed in the report) instead of "
                        "stopping; their ground-truth keys are not scored")
    sweep = parser.add_argument_group("robustness sweep (with --model or --checkpoint)")
    sweep.add_argument("--corruptions", help=f"'all' or a comma-separated list of {', '.join(CORRUPTIONS)}")
    sweep.add_argument("--severities", default="1,2,3,4,5", help="comma-separated severities in 1-5")
    sweep.add_argument("--corruption-seed", type=int, default=0, help="seed of the corruptions' randomness")
    distributed = parser.add_argument_group("Ray")
    distributed.add_argument("--ray", action="store_true", help="score on Ray Data (--input must be shards)")
    add_address(distributed)
    distributed.add_argument("--num-actors", type=int, help="scoring actors (default: one per GPU or CPU)")
    add_verbose(parser)
    add_labeler_arguments(parser)
    parser.set_defaults(model=None)  # no default model: --pred, --model or --checkpoint says where labels come from
    return parser


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    args.dataset = args.classes if args.classes in DATASET_NAMES else None
    if sum(source is not None for source in (args.pred, args.model, args.checkpoint)) != 1:
        parser.error("give exactly one of --pred (stored predictions), --model or --checkpoint (label on the fly)")
    if args.corruptions and args.pred is not None:
        parser.error("--corruptions needs --model or --checkpoint: corruptions are applied before labelling")
    return args


def _names(text: str | None) -> list[str] | None:
    return None if text is None else [n.strip() for n in text.split(",") if n.strip()]


def load_vocabulary(args: argparse.Namespace) -> Vocabulary:
    """Class names, palette and zero-shot split from --classes (a dataset preset, a class file or a comma list),
    with the CLI overrides."""
    unseen, ignore = _names(args.unseen), _names(args.ignore_classes)
    if args.dataset:
        info = get_dataset(args.dataset)
        unseen = list(info.unseen) if unseen is None else unseen
        if ignore is None:
            drop = info.ignore_background_in_zero_shot and unseen and info.background_index is not None
            ignore = [info.class_names[info.background_index]] if drop else []
        return Vocabulary(args.dataset, [list(c) for c in info.classes], list(info.class_names),
                          np.asarray(info.palette, np.uint8), unseen, ignore, [list(c) for c in info.synonyms],
                          info.background_index, info.label_lut, info.reduced_from)
    classes = resolve_vocabulary(args.classes)
    class_names = [names[0] for names in classes]
    name = Path(args.classes).stem if Path(args.classes).is_file() else "custom"
    return Vocabulary(name, classes, class_names, class_palette(class_names),
                      unseen or [], ignore or [])


def prediction_lut(vocab: Vocabulary, provenance: dict | None) -> np.ndarray | None:
    """How stored predictions map into the evaluation's ids: through ``vocab.label_lut`` when a mask store was
    labelled with the background-aware vocabulary of the dataset scored here without background (``voc`` masks
    scored as ``voc20``: a background prediction becomes a miss), else as they are."""
    labelled = (provenance or {}).get("vocabulary")
    if vocab.reduced_from is None or not isinstance(labelled, list):
        return None
    parent = [normalize_class_name(names[0]) for names in get_dataset(vocab.reduced_from).classes]
    return vocab.label_lut if [normalize_class_name(names[0]) for names in labelled] == parent else None


def conditions_from_args(args: argparse.Namespace) -> list:
    """[CLEAN], or the clean baseline and every --corruptions x --severities condition."""
    if not args.corruptions:
        return [CLEAN]
    corruptions = CORRUPTIONS if args.corruptions.strip() == "all" else _names(args.corruptions)
    try:
        severities = [int(s) for s in _names(args.severities)]
    except ValueError:
        raise ValueError(f"--severities: expected comma-separated integers in 1-5, got {args.severities!r}") from None
    return sweep_conditions(corruptions, severities)


def labelling_device(args: argparse.Namespace) -> str:
    """--device, "auto" resolved: CUDA where the labelling runs has a GPU (with --ray, the cluster), else cpu."""
    if args.device != AUTO:
        return args.device
    if args.ray:
        from denseclip.ray.labeling import cluster_device

        return cluster_device(LabelerConfig(device=AUTO), args.address).device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def labeler_source(args: argparse.Namespace, vocab: Vocabulary, inputs: dict
                   ) -> tuple[Callable[[str], ImageLabeler], str, str]:
    """The on-the-fly prediction source of --model or --checkpoint: a picklable factory of the labeler (called
    with the device to build it on), the device asked for and the method name; records what it is in
    ``inputs``. Without --ray a CUDA device this machine does not have is refused here (ConfigError); on Ray
    each actor uses the GPU Ray gave it."""
    args.device = labelling_device(args)
    if not args.ray:
        from denseclip.models import check_device

        check_device(args.device, "--device")
    if args.checkpoint is None:
        from denseclip.models import check_weights, weights_activation

        if args.protocol is None and args.dataset:
            args.protocol = "paper"  # a dataset is evaluated under the paper's protocol unless told otherwise
        config = labeler_config_from_args(args, dataset=args.dataset)
        check_weights(config.model, config.pretrained)  # offline: one line now, not a traceback from a worker
        inputs["labeler"] = {k: v for k, v in dataclasses.asdict(config.resolved()).items() if k != "extra"}
        inputs["labeler"]["activation"] = weights_activation(config.model, config.pretrained)
        classes = vocab.synonyms if config.synonyms and vocab.synonyms else vocab.classes
        make = functools.partial(build_dense_clip, config, classes, background_index=vocab.background_index)
        return make, config.device, f"DenseCLIP {config.model}" + (f" {config.head}" if config.head != "maskclip" else "")
    from denseclip.ray.training import load_target_checkpoint, read_checkpoint_meta, scoring_resize

    meta = read_checkpoint_meta(args.checkpoint)
    trained = meta.get("class_names", [])
    if [normalize_class_name(n) for n in trained] != [normalize_class_name(n) for n in vocab.class_names]:
        raise ValueError(f"--checkpoint {args.checkpoint}: trained on {len(trained)} classes ({', '.join(trained[:4])}"
                         f", ...), not on the {len(vocab.class_names)} classes of {vocab.name}")
    inputs["checkpoint"] = args.checkpoint
    # Scored at the training's keep-ratio resize, as the official test pipeline does, unless --resize-to says.
    inputs["scored_at"] = scoring_resize(meta, args.resize_to)
    method = f"DenseCLIP+ {Path(args.checkpoint.rstrip('/')).name}"
    return functools.partial(load_target_checkpoint, args.checkpoint, resize_to=args.resize_to), args.device, method


def run_on_ray(args: argparse.Namespace, evaluation: Evaluation, device: str = "cpu", **source) -> Evaluation:
    """Score on Ray Data, labelling on ``device`` (each actor's GPU for cuda); ``source``: ``pred_url=`` or
    ``make_labeler=``, ``conditions=``, ``seed=``."""
    from denseclip.ray.evaluation import evaluate_shards

    if is_label_map_folder(args.input):
        raise ValueError(f"--input {args.input}: --ray reads ground truth from shards, not a folder of label maps")
    return evaluate_shards(expand_shards(args.input), evaluation, address=args.address, device=device,
                           num_actors=args.num_actors, **source)


def evaluate(args: argparse.Namespace) -> tuple[dict, dict | None]:
    """Run the evaluation and write its reports; returns (report summary, robustness summary or None)."""
    vocab = load_vocabulary(args)
    conditions = conditions_from_args(args)
    evaluation = Evaluation(len(vocab.class_names), args.ignore_index, args.num_overlays, gt_lut=vocab.label_lut)
    inputs: dict = {"gt": args.input, "ignore_index": args.ignore_index}
    progress = functools.partial(tqdm, desc="evaluate", unit="img", disable=None)
    predictions = None
    if args.pred is not None:
        predictions = open_predictions(args.pred, args.skip_damaged)
        method = Path(args.pred.rstrip("/")).name
        provenance = getattr(predictions, "provenance", None)
        evaluation.pred_lut = prediction_lut(vocab, provenance)
        inputs.update(pred=args.pred, pred_provenance=provenance,
                      pred_reduced_from=vocab.reduced_from if evaluation.pred_lut is not None else None)
        if args.ray:
            run_on_ray(args, evaluation, pred_url=args.pred, skip_damaged=args.skip_damaged)
        else:
            score_predictions(progress(iter_ground_truth(args.input)), predictions, args.pred, evaluation, args.images)
    else:
        make_labeler, device, method = labeler_source(args, vocab, inputs)
        if args.ray:
            run_on_ray(args, evaluation, device, make_labeler=make_labeler, conditions=conditions,
                       seed=args.corruption_seed)
        else:
            score_labeler(progress(iter_ground_truth(args.input)), make_labeler(device), evaluation, conditions,
                          args.corruption_seed, args.batch_size, args.images)
    if evaluation.num_images == 0:
        raise EvaluationInputError(f"--input {args.input}: no ground-truth samples")
    clean = evaluation.matrix(CLEAN)
    summary = summarize(clean, vocab.class_names, unseen=vocab.unseen, ignore_classes=vocab.ignore_classes)
    labels = {"dataset": vocab.name, "method": args.method or method, "protocol": _protocol(inputs)}
    if predictions is not None:
        unmatched = len(predictions.keys() - evaluation.keys)
        inputs["unmatched_predictions"] = unmatched
        if unmatched:
            print(f"warning: {unmatched} predictions have no ground truth and were not scored", file=sys.stderr)
        skipped = [str(damage) for damage in getattr(predictions, "skipped", {}).values()]
        if args.skip_damaged:
            inputs.update(skipped_damaged_parts=skipped, unscored_keys=len(evaluation.unscored))
        for line in skipped:
            print(f"warning: skipped the damaged part {line}", file=sys.stderr)
        if evaluation.unscored:
            print(f"warning: {len(evaluation.unscored)} ground-truth keys were not scored (their predictions were in "
                  "damaged parts)", file=sys.stderr)
    summary.update(labels, inputs=inputs)
    write_report(args.output, summary, clean, vocab.class_names, vocab.palette, evaluation.overlays.items)
    if len(conditions) == 1:
        return summary, None
    robustness = robustness_summary(evaluation.matrices, vocab.class_names, vocab.unseen, vocab.ignore_classes)
    robustness.update(labels, inputs={**inputs, "corruption_seed": args.corruption_seed})
    write_robustness_report(args.output, robustness)
    return summary, robustness


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = parse_args(argv, prog)
    try:
        with library_output(args.verbose):
            summary, robustness = evaluate(args)
    except DamagedPartError as exc:
        print(f"error: {exc} (--skip-damaged scores the rest)", file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:  # bad input of any kind: one line naming it, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    headline = ("miou", "miou_seen", "miou_unseen", "hiou", "pixel_accuracy")
    print(" | ".join(f"{k} {_fmt(summary[k])}" for k in headline) + f" -> {Path(args.output) / 'report.json'}")
    if robustness is not None:
        print(f"robustness: clean {_fmt(robustness['clean'])} | mean corrupted "
              f"{_fmt(robustness['mean_corrupted'])} -> {Path(args.output) / 'robustness.json'}")
    return 0


def _protocol(inputs: dict) -> str | None:
    """The inference protocol preset the predictions were made under (None: none, or not known)."""
    if "labeler" in inputs:
        return inputs["labeler"].get("protocol")
    return ((inputs.get("pred_provenance") or {}).get("options") or {}).get("protocol")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    sys.exit(main())

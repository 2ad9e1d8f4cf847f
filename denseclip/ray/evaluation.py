"""Evaluation on Ray Data, for validation sets too large for one process (COCO-Stuff val: 5k images).

Ground-truth shards are read by tasks; predictions are looked up in a mask store or PNG folder, or made on the
fly by labeler actors (after the robustness sweep's corruptions, applied by tasks). Every scored batch becomes
one ``Evaluation`` (its confusion matrices, overlay candidates and keys); the driver merges them, so the result
is the single-process one whatever the partitioning.

    shards -> read ground truth (tasks) -> look up predictions + score (actors)                     -> merge
    shards -> read ground truth (tasks) -> decode + corrupt (tasks) -> label + score (actors)       -> merge

Bad input does not raise inside a stage (Ray would wrap it in its own traceback): a row or block carries the
error, and the driver raises ``EvaluationInputError`` with it, naming the key.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import ray
import torch
from ray.data import ActorPoolStrategy

from denseclip.damage import DamagedShardError
from denseclip.evaluation import (
    Evaluation,
    GroundTruth,
    ImageLabeler,
    open_predictions,
    shard_ground_truth,
    stored_prediction,
)
from denseclip.images import decode_image
from denseclip.metrics import EvaluationInputError
from denseclip.ray.devices import actor_device
from denseclip.ray.labeling import ActorPlan, _objects, alive_node_cpus, plan_actors, ray_cluster
from denseclip.robustness import CLEAN, Condition, apply_condition
from denseclip.shards import read_shard

_NO_MAP = np.zeros((0, 0), dtype=np.uint8)


def read_ground_truth_rows(item: dict) -> Iterator[dict]:
    """The samples of shard ``item["shard"]`` as rows ``{"key", "labels" uint8 (H, W), "image" (encoded bytes,
    b"" if none), "error" ("" when usable)}``; a corrupt shard ends with an error row naming it."""
    shard = item["shard"]
    try:
        for sample in read_shard(shard):
            try:
                truth = shard_ground_truth(sample)
            except ValueError as exc:
                yield {"key": sample["__key__"], "labels": _NO_MAP, "image": b"", "error": str(exc)}
                continue
            yield {"key": truth.key, "labels": truth.labels, "image": truth.image or b"", "error": ""}
    except DamagedShardError as exc:  # transient storage errors are retried by read_shard, then fail the run
        yield {"key": "", "labels": _NO_MAP, "image": b"", "error": f"shard {exc}"}


def expand_conditions(batch: dict[str, np.ndarray], conditions: Sequence[Condition], seed: int,
                      ) -> dict[str, np.ndarray]:
    """Decode each image and emit one row per condition (condition-major): ``key``, ``corruption``,
    ``severity``, ``image`` uint8 (H, W, 3) as seen under the condition, ``labels``, ``error``."""
    rows: list[tuple[str, Condition, np.ndarray, np.ndarray, str]] = []
    decoded = []
    for key, labels, encoded, error in zip(batch["key"], batch["labels"], batch["image"], batch["error"]):
        if not error and not encoded:
            error = f"{key}: no image to label (the shard sample has no jpg/png member)"
        if not error:
            try:
                decoded.append((key, decode_image(encoded, key), labels))
                continue
            except ValueError as exc:
                error = str(exc)
        rows.append((key, CLEAN, _NO_MAP, _NO_MAP, error))
    for condition in conditions:
        for key, image, labels in decoded:
            try:
                rows.append((key, condition, apply_condition(image, condition, key, seed), labels, ""))
            except ValueError as exc:
                rows.append((key, condition, _NO_MAP, _NO_MAP, str(exc)))
    return {"key": np.array([r[0] for r in rows], dtype=object),
            "corruption": np.array([r[1].corruption for r in rows], dtype=object),
            "severity": np.array([r[1].severity for r in rows], dtype=np.int64),
            "image": _objects([r[2] for r in rows]), "labels": _objects([r[3] for r in rows]),
            "error": np.array([r[4] for r in rows], dtype=object)}


def _result(evaluation: Evaluation, errors: list[str]) -> dict[str, np.ndarray]:
    return {"evaluation": _objects([evaluation]), "error": np.array([min(errors, default="")], dtype=object)}


class LabelScorer:
    """Ray Data callable class: labels the rows of ``expand_conditions`` with the labeler
    ``make_labeler(device)`` (built once per actor, on the device Ray assigned it for ``device``) and scores them
    into one Evaluation per call."""

    def __init__(self, make_labeler: Callable[[str], ImageLabeler], evaluation: Evaluation, torch_threads: int = 1,
                 device: str = "cpu"):
        torch.set_num_threads(torch_threads)
        self.labeler = make_labeler(actor_device(device))
        self.template = evaluation

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        evaluation = self.template.empty()
        errors = [str(e) for e in batch["error"] if e]
        groups: dict[Condition, list[tuple[str, np.ndarray, np.ndarray]]] = {}
        for key, corruption, severity, image, labels, error in zip(
                batch["key"], batch["corruption"], batch["severity"], batch["image"], batch["labels"], batch["error"]):
            if not error:
                groups.setdefault(Condition(str(corruption), int(severity)), []).append((str(key), image, labels))
        for condition, rows in groups.items():
            try:
                evaluation.add_labelled(self.labeler, condition, rows)
            except ValueError as exc:
                errors.append(str(exc))
        return _result(evaluation, errors)


class StoredScorer:
    """Ray Data callable class: looks up each ground-truth row's prediction in the mask store or PNG folder at
    ``pred_url`` (opened once per actor, ``skip_damaged`` as for ``open_predictions``) and scores it into one
    Evaluation per call."""

    def __init__(self, pred_url: str, evaluation: Evaluation, skip_damaged: bool = False):
        self.pred_url = pred_url
        self.predictions = open_predictions(pred_url, skip_damaged)
        self.pred_keys = self.predictions.keys()
        self.template = evaluation

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        evaluation = self.template.empty()
        errors = [str(e) for e in batch["error"] if e]
        for key, labels, image, error in zip(batch["key"], batch["labels"], batch["image"], batch["error"]):
            if error:
                continue
            try:
                pred = stored_prediction(self.predictions, self.pred_keys, str(key), self.pred_url)
                if pred is None:
                    evaluation.unscored.add(str(key))
                else:
                    evaluation.add_prediction(GroundTruth(str(key), labels, bytes(image) or None), pred)
            except ValueError as exc:
                errors.append(str(exc))
        return _result(evaluation, errors)


def evaluate_on_ray(shards: list[str], evaluation: Evaluation, actors: ActorPlan, *, pred_url: str | None = None,
                    make_labeler: Callable[[str], ImageLabeler] | None = None, device: str = "cpu",
                    conditions: Sequence[Condition] = (CLEAN,), seed: int = 0, rows_per_call: int = 64,
                    skip_damaged: bool = False) -> Evaluation:
    """Score the ground-truth ``shards`` on the connected Ray cluster into ``evaluation`` (empty; it fixes the
    classes, ignore index and overlay count) and return it.

    Predictions: the store / folder ``pred_url`` (``skip_damaged``: its damaged parts left out, their keys
    ``unscored``), or ``make_labeler(device)`` (a picklable factory, run once
    per actor with ``device`` mapped to the GPU Ray assigned, see ``denseclip.ray.devices``) under every
    condition of ``conditions`` seeded by ``seed``. ``actors`` sizes the scoring actors
    and the read / decode tasks (``denseclip.ray.labeling.plan_actors``). Raises EvaluationInputError naming
    the key of the first bad input met. ``rows_per_call``: rows (image x condition) per scoring call, each
    returning one Evaluation (K x (K + 1) counts per condition) to the driver.
    """
    if (pred_url is None) == (make_labeler is None):
        raise ValueError("give exactly one prediction source: pred_url or make_labeler")
    # Each scored block is one Evaluation object by design: store it pickled without Ray warning about it.
    ray.data.DataContext.get_current().enable_fallback_to_arrow_object_ext_type = True
    rows = ray.data.from_items([{"shard": s} for s in shards], override_num_blocks=len(shards)).flat_map(
        read_ground_truth_rows, num_cpus=actors.task_cpus)
    if make_labeler is None:
        scorer, kwargs = StoredScorer, {"pred_url": pred_url, "evaluation": evaluation, "skip_damaged": skip_damaged}
    else:
        rows = rows.map_batches(expand_conditions, fn_kwargs={"conditions": list(conditions), "seed": seed},
                                batch_size=max(1, rows_per_call // len(conditions)), num_cpus=actors.task_cpus)
        scorer = LabelScorer
        kwargs = {"make_labeler": make_labeler, "evaluation": evaluation, "torch_threads": actors.torch_threads,
                  "device": device}
    scored = rows.map_batches(
        scorer, fn_constructor_kwargs=kwargs, batch_size=rows_per_call,
        compute=ActorPoolStrategy(min_size=actors.min_actors, max_size=actors.num_actors),
        num_cpus=actors.cpus_per_actor, num_gpus=actors.gpus_per_actor)
    for row in scored.iter_rows():
        if row["error"]:
            raise EvaluationInputError(row["error"])
        evaluation.merge(row["evaluation"])
    return evaluation


def evaluate_shards(shards: list[str], evaluation: Evaluation, *, address: str | None = None, device: str = "cpu",
                    num_actors: int | None = None, **source) -> Evaluation:
    """:func:`evaluate_on_ray` on the cluster at ``address`` (else ``$RAY_ADDRESS``, else a private local Ray:
    ``labeling.ray_cluster``), with scoring actors sized from its resources for ``device``; ``source`` as
    there (``pred_url=`` or ``make_labeler=``, ``conditions=``, ``seed=``)."""
    with ray_cluster(address):
        actors = plan_actors(ray.cluster_resources(), device, num_actors, node_cpus=alive_node_cpus())
        return evaluate_on_ray(shards, evaluation, actors, device=device, **source)

"""Evaluation on a real local Ray: the distributed result equals the single-process one on the same inputs
(stored predictions and a labeler run on the fly under corruptions), and bad inputs name their key."""

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import ray
from pipeline_scripts import load_pipeline

from denseclip.config import LabelerConfig
from denseclip.datasets import get_dataset
from denseclip.evaluation import (
    Evaluation,
    LabelMapFolder,
    build_dense_clip,
    iter_ground_truth,
    score_labeler,
    score_predictions,
)
from denseclip.images import encode_png
from denseclip.mask_store import MaskStoreWriter
from denseclip.metrics import EvaluationInputError
from denseclip.ray.evaluation import evaluate_on_ray
from denseclip.ray.labeling import plan_actors, ray_cluster
from denseclip.robustness import CLEAN, Condition
from denseclip.shards import expand_shards, write_shard
from denseclip.synthetic import write_shards

ROOT = Path(__file__).resolve().parents[1]
evaluate = load_pipeline("evaluate")

NUM_CLASSES = get_dataset("synthetic").num_classes


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """10 synthetic scenes in 3 shards, and predictions that are the ground truth with errors: a band of each
    image called class (index % K), as a PNG folder and as a mask store."""
    root = tmp_path_factory.mktemp("world")
    shards = root / "shards"
    write_shards(seed=4243, n=10, out=str(shards), shard_size=4, size=64)
    predictions = {}
    for index, truth in enumerate(iter_ground_truth(str(shards))):
        pred = truth.labels.copy()
        pred[index * 5:index * 5 + 12] = index % NUM_CLASSES
        predictions[truth.key] = pred
        path = root / "pred" / f"{truth.key}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_png(pred))
    MaskStoreWriter(str(root / "store"), {"model": "hand-made"}).write_part(
        "0", [{"key": k, "mask": v} for k, v in predictions.items()])
    return {"root": root, "shards": str(shards), "pred": str(root / "pred"), "store": str(root / "store")}


@pytest.fixture(scope="module")
def cluster():
    """A private local Ray for this module (2 CPUs here: the scoring actors reserve at most half)."""
    with ray_cluster():
        yield plan_actors(ray.cluster_resources(), "cpu", num_actors=2)


def assert_same(single: Evaluation, distributed: Evaluation) -> None:
    assert sorted(single.matrices) == sorted(distributed.matrices)
    for condition, conf in single.matrices.items():
        np.testing.assert_array_equal(distributed.matrices[condition].matrix, conf.matrix, err_msg=condition.name)
        assert distributed.matrices[condition].num_images == conf.num_images
    assert distributed.keys == single.keys
    for mine, theirs in zip(single.overlays.items, distributed.overlays.items, strict=True):
        assert mine[0] == theirs[0]
        for a, b in zip(mine[1:], theirs[1:]):
            np.testing.assert_array_equal(a, b)


def test_stored_predictions_match_single_process(world, cluster):
    single = score_predictions(iter_ground_truth(world["shards"]), LabelMapFolder(world["pred"]), world["pred"],
                               Evaluation(NUM_CLASSES, num_overlays=3))
    distributed = evaluate_on_ray(expand_shards(world["shards"]), Evaluation(NUM_CLASSES, num_overlays=3), cluster,
                                  pred_url=world["pred"], rows_per_call=3)  # several blocks to merge
    assert single.num_images == 10 and len(single.overlays.items) == 3
    assert single.matrix().matrix.trace() < single.matrix().matrix.sum()  # the errors are there
    assert_same(single, distributed)


def test_labeler_sweep_matches_single_process(world, cluster):
    make_labeler = functools.partial(build_dense_clip, LabelerConfig(model="denseclip-tiny-shapes", batch_size=4),
                                     get_dataset("synthetic").classes)
    conditions = [CLEAN, Condition("gaussian_noise", 2), Condition("jpeg_compression", 5)]
    single = score_labeler(iter_ground_truth(world["shards"]), make_labeler("cpu"), Evaluation(NUM_CLASSES),
                           conditions, seed=3, batch_size=4)
    distributed = evaluate_on_ray(expand_shards(world["shards"]), Evaluation(NUM_CLASSES), cluster,
                                  make_labeler=make_labeler, conditions=conditions, seed=3, rows_per_call=6)
    assert all(conf.num_images == 10 for conf in single.matrices.values())
    assert not np.array_equal(single.matrices[CLEAN].matrix, single.matrices[conditions[1]].matrix)
    assert_same(single, distributed)


def test_cli_with_ray_gives_the_same_report(world, cluster, tmp_path):
    outs = {}
    for name, extra in (("local", []), ("ray", ["--ray", "--num-actors", "1"])):
        outs[name] = tmp_path / name
        assert evaluate.main(["--pred", world["store"], "--input", world["shards"], "--classes", "synthetic",
                              "--num-overlays", "4", "--output", str(outs[name]), *extra]) == 0
    reports = {name: json.loads((out / "report.json").read_text()) for name, out in outs.items()}
    assert reports["ray"] == reports["local"] and reports["ray"]["num_images"] == 10
    assert sorted(p.name for p in (outs["ray"] / "overlays").iterdir()) == \
        sorted(p.name for p in (outs["local"] / "overlays").iterdir())


def test_bad_inputs_name_the_key(world, cluster, tmp_path, capsys):
    pred = LabelMapFolder(world["pred"])
    missing = sorted(pred.keys())[6]
    partial_pred = tmp_path / "partial"
    for key in pred.keys() - {missing}:
        (partial_pred / f"{key}.png").parent.mkdir(parents=True, exist_ok=True)
        (partial_pred / f"{key}.png").write_bytes(encode_png(pred.get(key)))
    code = evaluate.main(["--pred", str(partial_pred), "--input", world["shards"], "--classes", "synthetic", "--ray",
                          "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err  # Ray's own worker logs may come first
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"error: {missing}: no prediction for this ground-truth key in {partial_pred}"

    shards = expand_shards(world["shards"]) + [str(tmp_path / "extra.tar")]
    write_shard(shards[-1], [{"__key__": "extra/no-truth", "jpg": b"not used"}])
    with pytest.raises(EvaluationInputError, match="extra/no-truth: shard .* has no seg.png"):
        evaluate_on_ray(shards, Evaluation(NUM_CLASSES), cluster, pred_url=world["pred"])


def test_ray_needs_shards(world, tmp_path, capsys):
    code = evaluate.main(["--pred", world["pred"], "--input", world["pred"], "--classes", "synthetic", "--ray",
                          "--output", str(tmp_path / "out")])
    assert code == 2 and "--ray reads ground truth from shards" in capsys.readouterr().err

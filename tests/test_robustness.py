"""The robustness sweep: conditions and their seeds, the summary from hand-built matrices, the report files, and
the shipped tiny CLIP on the synthetic world losing mIoU as noise gets stronger (through the command line)."""

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pipeline_scripts import load_pipeline

from denseclip.config import LabelerConfig
from denseclip.datasets import get_dataset
from denseclip.evaluation import Evaluation, build_dense_clip, iter_ground_truth, score_labeler
from denseclip.metrics import ConfusionMatrix
from denseclip.report import write_robustness_report
from denseclip.robustness import CLEAN, Condition, apply_condition, robustness_summary, sweep_conditions
from denseclip.synthetic import render_scene, write_shards

ROOT = Path(__file__).resolve().parents[1]
evaluate = load_pipeline("evaluate")

NOISE = ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise")
WORLD_SEED = 2022  # held out: neither the tiny CLIP's world (20220) nor the demo's training world (7)


def test_sweep_conditions_are_clean_first_then_corruption_major():
    conditions = sweep_conditions(["shot_noise", "gaussian_noise"], [3, 1, 3])
    assert [c.name for c in conditions] == ["clean", "shot_noise/1", "shot_noise/3", "gaussian_noise/1",
                                            "gaussian_noise/3"]
    assert len(sweep_conditions()) == 1 + 8 * 5
    with pytest.raises(ValueError, match="unknown corruption 'fog'"):
        sweep_conditions(["fog"])
    with pytest.raises(ValueError, match="severity must be one of 1-5, got 0"):
        sweep_conditions(["spatter"], [0])


def test_each_image_and_condition_gets_its_own_repeatable_corruption():
    image = render_scene(WORLD_SEED, 0, 64).image
    noise = Condition("gaussian_noise", 2)
    first = apply_condition(image, noise, "a", seed=0)
    np.testing.assert_array_equal(first, apply_condition(image.copy(), noise, "a", seed=0))
    assert not np.array_equal(first, apply_condition(image, noise, "b", seed=0))  # another image's key
    assert not np.array_equal(first, apply_condition(image, noise, "a", seed=1))  # another sweep seed
    assert not np.array_equal(first, apply_condition(image, Condition("gaussian_noise", 3), "a", seed=0))
    assert apply_condition(image, CLEAN, "a", seed=0) is image
    with pytest.raises(ValueError, match=r"^tiny: gaussian_noise/2: image is 20x20"):
        apply_condition(np.zeros((20, 20, 3), np.uint8), noise, "tiny", seed=0)


def _matrix(pred: list, gt: list) -> ConfusionMatrix:
    conf = ConfusionMatrix(3)
    conf.update(np.array(pred), np.array(gt))
    return conf


def test_summary_from_hand_built_matrices_and_its_report(tmp_path):
    gt = [[0, 1], [2, 2]]
    matrices = {  # inserted out of order: the summary follows the paper's order
        Condition("jpeg_compression", 1): _matrix(gt, gt),
        Condition("gaussian_noise", 2): _matrix([[0, 0], [0, 0]], gt),
        CLEAN: _matrix(gt, gt),
        Condition("gaussian_noise", 1): _matrix([[0, 1], [2, 0]], gt),
    }
    # By hand: noise/1 IoU 1/2, 1, 1/2 -> 66.67;  noise/2 IoU 1/4, 0, 0 -> 8.33;  jpeg/1 and clean 100
    summary = robustness_summary(matrices, ["a", "b", "c"], unseen=["c"])
    assert summary["clean"] == 100.0 and summary["num_images"] == 1
    assert list(summary["miou"]) == ["gaussian_noise", "jpeg_compression"]
    assert summary["miou"]["gaussian_noise"] == pytest.approx({"1": 200 / 3, "2": 25 / 3})
    assert summary["mean"] == pytest.approx({"gaussian_noise": 37.5, "jpeg_compression": 100.0})
    assert summary["mean_corrupted"] == pytest.approx((200 / 3 + 25 / 3 + 100) / 3)
    assert summary["conditions"]["gaussian_noise/1"]["miou_unseen"] == pytest.approx(50.0)
    assert summary["conditions"]["gaussian_noise/1"]["miou_seen"] == pytest.approx(75.0)

    paths = write_robustness_report(tmp_path, {**summary, "method": "DenseCLIP", "dataset": "toy"})
    assert json.loads(paths["json"].read_text())["miou"] == summary["miou"]
    table = paths["markdown"].read_text()
    assert "| gaussian noise | 66.67 | 8.33 | 37.50 |" in table
    assert "| jpeg compression | 100.00 | - | 100.00 |" in table  # no severity 2 for JPEG
    assert "| DenseCLIP | 100.00 | 37.50 | 100.00 | 58.33 |" in table
    assert Image.open(paths["plot"]).size == (750, 450)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("world") / "shards"
    write_shards(seed=WORLD_SEED, n=16, out=str(out), shard_size=8, size=128)
    return str(out)


def test_results_do_not_depend_on_batching(world):
    labeler = build_dense_clip(LabelerConfig(model="denseclip-tiny-shapes"), get_dataset("synthetic").classes)
    conditions = [CLEAN, Condition("speckle_noise", 3)]
    runs = [score_labeler(iter_ground_truth(world), labeler, Evaluation(17), conditions, seed=5, batch_size=size)
            for size in (3, 16)]
    for condition in conditions:
        np.testing.assert_array_equal(runs[0].matrices[condition].matrix, runs[1].matrices[condition].matrix)
    assert runs[0].matrix(CLEAN).num_images == 16


def run_sweep(world: str, out: Path, corruptions: str, severities: str) -> tuple[dict, dict]:
    assert evaluate.main(["--model", "denseclip-tiny-shapes", "--input", world, "--classes", "synthetic",
                          "--corruptions", corruptions, "--severities", severities, "--output", str(out)]) == 0
    return json.loads((out / "report.json").read_text()), json.loads((out / "robustness.json").read_text())


def test_noise_lowers_miou_on_the_synthetic_world(world, tmp_path):
    report, robustness = run_sweep(world, tmp_path, "gaussian_noise,shot_noise", "1,3,5")
    assert robustness["clean"] == report["miou"] and robustness["num_images"] == 16
    for name in ("gaussian_noise", "shot_noise"):
        miou = robustness["miou"][name]
        assert robustness["clean"] > miou["1"] > max(miou["3"], miou["5"]), (name, robustness["clean"], miou)
    assert (tmp_path / "robustness.md").exists() and (tmp_path / "robustness.png").exists()


def test_corruptions_need_a_model(world, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--pred", world, "--input", world, "--classes", "synthetic", "--corruptions", "all",
                       "--output", str(tmp_path)])
    assert exit_info.value.code == 2 and "--corruptions needs --model" in capsys.readouterr().err


@pytest.mark.slow
def test_full_sweep_on_200_images(tmp_path):
    """Paper Tables 4-5 on the synthetic world: all 8 corruptions x 5 severities (about 3 minutes on 1 core)."""
    shards = tmp_path / "shards"
    write_shards(seed=WORLD_SEED, n=200, out=str(shards), shard_size=100, size=128)
    _, robustness = run_sweep(str(shards), tmp_path / "out", "all", "1,2,3,4,5")
    for name in NOISE:
        miou = [robustness["miou"][name][str(s)] for s in range(1, 6)]
        assert robustness["clean"] > miou[0] > miou[4] + 3.0, (name, robustness["clean"], miou)
        assert all(later <= earlier + 1.0 for earlier, later in itertools.pairwise(miou)), (name, miou)
    assert robustness["mean_corrupted"] < robustness["clean"]

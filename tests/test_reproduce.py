"""One-command reproductions (pipelines/reproduce.py, denseclip/reproduce.py): the specs in jobs/, --set and their
stages (fast), then a stage of the synthetic spec as a Ray job on a real head and a re-run that skips it (slow;
the whole of a spec end to end on a local Ray: tests/test_rehearsal.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pipeline_scripts import load_pipeline
from ray_nodes import local_cluster

from denseclip.config import ConfigError
from denseclip.datasets import get_dataset
from denseclip.reproduce import STAGES, Reproduction

ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC = ROOT / "jobs" / "reproduce_synthetic_zero_shot.yaml"
reproduce_cli = load_pipeline("reproduce")


def _spec(tmp_path: Path, **changes) -> Path:
    """The synthetic spec with its workdir under ``tmp_path`` and ``changes`` applied to its top level."""
    spec = {**yaml.safe_load(SYNTHETIC.read_text()), "workdir": str(tmp_path / "work"), **changes}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_every_reproduction_spec_loads_and_follows_its_train_spec():
    specs = sorted((ROOT / "jobs").glob("reproduce_*.yaml"))
    assert {p.stem for p in specs} >= {"reproduce_synthetic_zero_shot", "reproduce_coco_stuff_zero_shot",
                                       "reproduce_coco_stuff_annotation_free"}
    for path in specs:
        reproduction = Reproduction.from_file(str(path))
        train = yaml.safe_load((ROOT / reproduction.train_spec_path).read_text())
        assert path.stem == f"reproduce_{train['dataset']}_{train['training']['setting']}"
        stages = reproduction.stages()
        assert [s.name for s in stages] == list(STAGES)
        label, training = stages[1].commands[0], stages[2].commands[0]
        assert label[:4] == ["python", "-m", "denseclip", "label"] and f"labeler.model={json.dumps(train['labeler']['model'])}" in label
        assert training[:6] == ["python", "-m", "denseclip", "train", "--config", reproduction.train_spec_path]
        assert 'training.pseudo_labels="precomputed"' in training
        assert f'data.mask_store="{reproduction.path_of("pseudo-labels")}"' in training
        checkpoint = stages[3].commands[0][stages[3].commands[0].index("--checkpoint") + 1]
        assert checkpoint.endswith(f"checkpoint-{reproduction.train_spec['training']['iterations']:06d}")
        # Zero-shot targets take the teacher's argmax among the unseen classes: the store is labelled with those.
        info = get_dataset(train["dataset"])
        if train["training"]["setting"] == "zero_shot":
            unseen = [list(info.classes[i]) for i in info.unseen_ids]
            assert f"classes={json.dumps(unseen)}" in label and "--classes" not in label
        else:
            assert label[label.index("--classes") + 1] == train["dataset"]
    coco = Reproduction.from_file(str(ROOT / "jobs" / "reproduce_coco_stuff_zero_shot.yaml"))
    assert coco.train_spec["training"]["iterations"] == 80000 and coco.labeler["device"] == "cuda"
    # That vocabulary names no dataset: the paper preset's values for COCO-Stuff go explicitly.
    label = coco.stages()[1].commands[0]
    for value in ("labeler.resize_to=[2048, 512]", 'labeler.normalisation="imagenet"', "labeler.size_bucket=null"):
        assert value in label
    assert coco.stages()[0].commands[0][:6] == ["python", "-m", "denseclip", "prepare", "--dataset", "coco_stuff"]


def test_set_changes_the_spec_by_dotted_keys_and_train_set_fields_merge(tmp_path):
    spec = _spec(tmp_path)
    reproduction = Reproduction.from_file(str(spec), ["workdir=" + str(tmp_path / "other"),
                                                      "prepare.synthetic.train.num_images=20",
                                                      "train.set.training.iterations=8",
                                                      "label.labeler.batch_size=2"])
    assert reproduction.workdir == str(tmp_path / "other")
    assert reproduction.prepare["synthetic"]["train"] == {"seed": 7, "num_images": 20, "shard_size": 50}
    # A nested --set into train.set sets that one field: the spec's other training fields stay.
    assert reproduction.train_spec["training"]["iterations"] == 8
    assert reproduction.train_spec["training"]["guided_iterations"] == 6
    assert reproduction.final_checkpoint.endswith("checkpoint-000008")
    assert reproduction.labeler["batch_size"] == 2
    stages = {stage.name: stage for stage in reproduction.stages()}
    assert stages["train"].commands[0].count("training.iterations=8") == 1
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        Reproduction.from_file(str(spec), ["workdir"])
    assert reproduce_cli.main(["--config", str(spec), "--set", "prepare.synthetic=3"]) == 2


def test_the_baseline_stage_labels_the_val_shards_with_the_teacher_and_scores_them_like_the_target(tmp_path):
    reproduction = Reproduction.from_file(str(_spec(tmp_path)))
    stages = {stage.name: stage for stage in reproduction.stages()}
    label_train, (label_val, score) = stages["label"].commands[0], stages["baseline"].commands
    val, masks = reproduction.path_of("shards/val"), reproduction.path_of("baseline/masks")
    # The teacher of the label stage, with the same settings, on the validation shards, over every class (the
    # zero-shot label stage labels with the unseen classes alone).
    assert label_val[:4] == label_train[:4] == ["python", "-m", "denseclip", "label"]
    assert label_val[label_val.index("--input") + 1] == val and label_val[label_val.index("--output") + 1] == masks
    assert label_val[label_val.index("--classes") + 1] == "synthetic" and "--classes" not in label_train
    assert {a for a in label_val if a.startswith("labeler.")} <= {a for a in label_train if a.startswith("labeler.")}
    evaluate = stages["evaluate"].commands[0]
    assert score[score.index("--pred") + 1] == masks and score[score.index("--input") + 1] == val
    assert score[score.index("--input"):score.index("--output") + 2] == [
        "--input", val, "--classes", "synthetic", "--output", reproduction.path_of("baseline")]
    scored = evaluate[evaluate.index("--input"):evaluate.index("--output") + 1]
    assert scored == score[score.index("--input"):score.index("--output") + 1]
    assert stages["baseline"].outputs == [reproduction.path_of("baseline/report.json")]


def test_bad_specs_name_the_field(tmp_path):
    for changes, message in [({"prepare": {}}, "prepare: give exactly one of synthetic"),
                             ({"label": {"actors": 2}}, "label: actors: unknown field"),
                             ({"label": {"labeler": {"mode": "sideways"}}}, "label.labeler.mode"),
                             ({"train": {"spec": "jobs/nope.yaml"}}, "cannot read train spec"),
                             ({"workdir": ""}, "workdir: required")]:
        with pytest.raises(ConfigError, match=message):
            Reproduction.from_file(str(_spec(tmp_path, **changes)))
    assert reproduce_cli.main(["--config", str(_spec(tmp_path, prepare={}))]) == 2


def test_a_stage_is_complete_when_it_succeeded_with_the_same_commands_and_its_outputs_exist(tmp_path):
    reproduction = Reproduction.from_file(str(_spec(tmp_path)))
    prepare = reproduction.stages()[0]
    assert not reproduction.is_complete(prepare)
    reproduction.record(prepare, 1.0)
    assert not reproduction.is_complete(prepare)  # recorded, but no shards
    for output in prepare.outputs:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_bytes(b"")
    assert reproduction.is_complete(prepare)
    changed = Reproduction.from_file(str(_spec(tmp_path, prepare={"synthetic": {
        "train": {"seed": 7, "num_images": 300, "shard_size": 50}, "val": {"seed": 1, "num_images": 50,
                                                                           "shard_size": 50}}})))
    assert not changed.is_complete(changed.stages()[0])  # another world: prepared again


@pytest.mark.slow
def test_a_stage_runs_as_a_ray_job_on_a_real_head_and_a_rerun_skips_it(tmp_path):
    # The other stages end to end, on a local Ray: tests/test_rehearsal.py (the real COCO-Stuff spec).
    spec = _spec(tmp_path)
    command = [sys.executable, "pipelines/reproduce.py", "--config", str(spec), "--stages", "prepare"]
    with local_cluster(head_cpus=2) as cluster:
        first = subprocess.run([*command, "--address", cluster.dashboard], cwd=ROOT, capture_output=True,
                               text=True, timeout=900, check=False)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "wrote 200 scenes in 4 shards" in first.stdout  # the job's log, streamed back
    assert "reproduce: prepare: done" in first.stdout
    reproduction = Reproduction.from_file(str(spec))
    assert all(Path(url).is_file() for url in reproduction.stages()[0].outputs)

    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert again.returncode == 0 and "reproduce: prepare: complete, skipped" in again.stdout, again.stdout

"""One-command reproductions (pipelines/reproduce.py, denseclip/reproduce.py): the specs in jobs/ and their stages
(fast), then the synthetic spec end to end, its first stage as a Ray job on a real head and the rest on a local
Ray after it, and a re-run that skips every stage (slow)."""

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
        assert label[:2] == ["python", "pipelines/label.py"] and f"labeler.model={json.dumps(train['labeler']['model'])}" in label
        assert training[:4] == ["python", "pipelines/train.py", "--config", reproduction.train_spec_path]
        assert 'training.pseudo_labels="precomputed"' in training
        assert f'data.mask_store="{reproduction.path_of("pseudo-labels")}"' in training
        checkpoint = stages[3].commands[0][stages[3].commands[0].index("--checkpoint") + 1]
        assert checkpoint.endswith(f"checkpoint-{reproduction.train_spec['training']['iterations']:06d}")
        # Zero-shot targets take the teacher's argmax among the unseen classes: the store is labelled with those.
        info = get_dataset(train["dataset"])
        if train["training"]["setting"] == "zero_shot":
            unseen = [list(info.classes[i]) for i in info.unseen_ids]
            assert f"vocabulary={json.dumps(unseen)}" in label and "--vocabulary" not in label
        else:
            assert label[label.index("--vocabulary") + 1] == train["dataset"]
    coco = Reproduction.from_file(str(ROOT / "jobs" / "reproduce_coco_stuff_zero_shot.yaml"))
    assert coco.train_spec["training"]["iterations"] == 80000 and coco.labeler["device"] == "cuda"
    # That vocabulary names no dataset: the paper preset's values for COCO-Stuff go explicitly.
    label = coco.stages()[1].commands[0]
    for value in ("labeler.resize_to=[2048, 512]", 'labeler.normalisation="imagenet"', "labeler.size_bucket=null"):
        assert value in label
    assert coco.stages()[0].commands[0][:4] == ["python", "pipelines/prepare.py", "--dataset", "coco_stuff"]


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
def test_the_synthetic_reproduction_runs_end_to_end_and_a_rerun_continues_where_it_stopped(tmp_path):
    spec = _spec(tmp_path)
    reproduction = Reproduction.from_file(str(spec))
    command = [sys.executable, "pipelines/reproduce.py", "--config", str(spec)]
    with local_cluster(head_cpus=2) as cluster:  # the first stage as a Ray job submitted to a real head
        first = subprocess.run([*command, "--stages", "prepare", "--address", cluster.dashboard], cwd=ROOT,
                               capture_output=True, text=True, timeout=900, check=False)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "wrote 200 scenes in 4 shards" in first.stdout  # the job's log, streamed back

    rest = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1800, check=False)
    assert rest.returncode == 0, rest.stdout[-3000:] + rest.stderr[-3000:]
    assert "reproduce: prepare: complete, skipped" in rest.stdout
    for stage in ("label", "train", "evaluate"):
        assert f"reproduce: {stage}: done" in rest.stdout
    summary = json.loads((tmp_path / "work" / "pseudo-labels" / "summary.json").read_text())
    assert summary["images_labelled"] == 200 and summary["errors"] == 0
    report = json.loads((tmp_path / "work" / "evaluation" / "report.json").read_text())
    assert report["miou"] > 10  # far above everything-is-background (5.3 on these scenes)
    assert f"reproduce: synthetic-zero-shot: miou {report['miou']:.2f}" in rest.stdout
    trained = json.loads((Path(reproduction.final_checkpoint) / "checkpoint.json").read_text())
    assert trained["job"]["training"]["pseudo_labels"] == "precomputed"

    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert again.returncode == 0 and again.stdout.count("complete, skipped") == 4, again.stdout

"""Two Ray nodes on one machine (issue 12.4): labelling and a 2-worker Ray Train run spread over both, the second
node killed midway (SIGKILL of its raylet, object store and workers) and replaced, as an autoscaler would.

Each node is a real ``ray start`` on 127.0.0.1 with one logical CPU; actors and workers reserve 0.6 CPU, so
exactly one fits on each node and the work is spread over both."""

import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from ray_nodes import is_head, local_cluster

from denseclip.mask_store import MaskStore
from denseclip.synthetic import write_shards

ROOT = Path(__file__).resolve().parents[1]
ITERATIONS = 40
IMAGES = 600
pytestmark = pytest.mark.slow


def _start(argv: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env=dict(os.environ, OMP_NUM_THREADS="1"))


def _wait(condition, job: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert job.poll() is None, f"the job ended early:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"timed out:\n{log.read_text()[-4000:]}"
        time.sleep(0.5)


def test_labelling_across_two_nodes_survives_losing_one(tmp_path):
    # 600 scenes of 512 px: about a minute of labelling for one thread, so the second actor, which may be ready
    # seconds after the first, still finds most of the work left.
    write_shards(seed=41, n=IMAGES, out=str(tmp_path / "in"), shard_size=10, size=512)
    out = tmp_path / "out"
    log = tmp_path / "label.log"
    with local_cluster(head_cpus=1) as cluster:
        cluster.add_node(num_cpus=1)
        head = next(n["NodeID"] for n in cluster.alive_nodes() if is_head(n))
        second = cluster.worker_node()
        argv = ["pipelines/label.py", "--input", str(tmp_path / "in"), "--output", str(out), "--classes",
                "synthetic", "--model", "denseclip-tiny-shapes", "--pretrained", "random", "--batch-size", "2", "--num-actors", "2",
                "--cpus-per-actor", "0.6", "--address", cluster.gcs]
        job = _start(argv, log)

        def labelled_on_both() -> bool:
            nodes = {n for r in MaskStore(str(out)).part_records().values() for n in (r or {}).get("nodes", ())}
            return {head, second} <= nodes

        _wait(labelled_on_both, job, log)  # parts record the nodes that labelled them
        committed = len(MaskStore(str(out)).committed_parts())
        assert committed < IMAGES // 10, "the job was done before the node could be lost"
        cluster.nodes[0].kill()
        cluster.add_node(num_cpus=1)  # the replacement an autoscaler starts
        # Ray retries the batches of the lost actor; a batch it cannot save (its actor unreachable) makes the run
        # resume on the nodes alive, keeping every part it committed.
        assert job.wait(timeout=900) == 0, log.read_text()[-4000:]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "succeeded" and summary["errors"] == 0
    assert summary["shards_new"] == IMAGES // 10 and summary["shards_committed"] == IMAGES // 10
    assert summary["images_labelled"] == IMAGES  # across resumes: no image labelled twice or lost
    assert summary["resumed_after_node_loss"] <= 2
    assert ("node was lost" in log.read_text()) == bool(summary["resumed_after_node_loss"])  # said on the terminal
    store = MaskStore(str(out))
    keys = [k for part in sorted(store.committed_parts()) for k in store.read_part(part).column("key").to_pylist()]
    assert collections.Counter(keys) == collections.Counter(f"synthetic/s41/{i:06d}" for i in range(IMAGES))


def _train_spec(tmp_path: Path) -> Path:
    """jobs/train_synthetic_zero_shot.yaml shrunk to 40 steps, with a checkpoint every 4 and 2 workers of
    0.6 CPU (one per node)."""
    spec = yaml.safe_load((ROOT / "jobs" / "train_synthetic_zero_shot.yaml").read_text())
    spec["data"].update(train=str(tmp_path / "train"), val=str(tmp_path / "val"), shuffle_buffer=16)
    spec["training"].update(iterations=ITERATIONS, guided_iterations=4, batch_size=4, crop_size=64)
    spec["workers"].update(num_workers=2, cpus_per_worker=0.6, data_cpus=0.2)
    spec["run"].update(name="two-nodes", storage_path=str(tmp_path / "runs"), max_failures=3,
                       checkpoint_every=4, log_every=4)
    spec["evaluation"].update(teacher=False, num_overlays=0)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_ray_train_with_one_worker_per_node_recovers_from_losing_a_node(tmp_path):
    write_shards(seed=42, n=48, out=str(tmp_path / "train"), shard_size=12, size=64)
    write_shards(seed=43, n=8, out=str(tmp_path / "val"), shard_size=8, size=64)
    spec = _train_spec(tmp_path)
    log = tmp_path / "train.log"
    run = tmp_path / "runs" / "two-nodes"
    with local_cluster(head_cpus=1) as cluster:
        cluster.add_node(num_cpus=1)
        job = _start(["pipelines/train.py", "--config", str(spec), "--address", cluster.gcs], log)

        from ray.util.state import list_actors

        def worker_nodes() -> list[str]:
            actors = list_actors(address=cluster.dashboard, raise_on_missing_output=False,
                                 filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
            return sorted(a.node_id for a in actors)

        _wait(lambda: len(set(worker_nodes())) == 2, job, log)
        assert worker_nodes() == sorted(n["NodeID"] for n in cluster.alive_nodes())  # one worker on each node
        _wait(lambda: (run / "checkpoint-000004").is_dir(), job, log)
        assert not (run / f"checkpoint-{ITERATIONS:06d}").exists()
        lost = cluster.worker_node()
        cluster.nodes[0].kill()
        cluster.add_node(num_cpus=1)
        replacement = cluster.worker_node(exclude=(lost,))
        # The worker group restarts from the last checkpoint with one worker on the head, one on the new node.
        _wait(lambda: replacement in worker_nodes(), job, log)
        assert job.wait(timeout=900) == 0, log.read_text()[-4000:]

    final = run / f"checkpoint-{ITERATIONS:06d}"
    assert json.loads((final / "checkpoint.json").read_text())["step"] == ITERATIONS
    assert 0 <= json.loads((final / "report.json").read_text())["miou"] <= 100
    assert f"final checkpoint: {final}" in log.read_text()

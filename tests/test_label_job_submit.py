"""``ray job submit`` of pipelines/label.py to a real Ray head on 127.0.0.1 (slow: starts a cluster)."""

import json
import subprocess
import uuid
from pathlib import Path

import pytest
from ray.job_submission import JobStatus, JobSubmissionClient
from ray_nodes import RAY, local_cluster

from denseclip.mask_store import MaskStore
from denseclip.synthetic import write_shards

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_ray_job_submit_labels_the_shards(tmp_path):
    write_shards(seed=8, n=12, out=str(tmp_path / "shards"), shard_size=4, size=64)
    out = tmp_path / "masks"
    job_id = f"label-test-{uuid.uuid4().hex[:8]}"
    with local_cluster(head_cpus=2) as cluster:
        address = cluster.dashboard
        submit = subprocess.run(
            [RAY, "job", "submit", "--address", address, "--submission-id", job_id, "--working-dir", ".", "--",
             "python", "pipelines/label.py", "--input", str(tmp_path / "shards"), "--output", str(out),
             "--classes", "synthetic", "--model", "denseclip-tiny-shapes", "--pretrained", "random", "--batch-size", "4"],
            cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
        status = JobSubmissionClient(address).get_job_status(job_id)
    assert status == JobStatus.SUCCEEDED, submit.stdout[-4000:] + submit.stderr[-2000:]
    assert "12 images labelled, 0 errors" in submit.stdout
    assert MaskStore(str(out)).keys() == {f"synthetic/s8/{i:06d}" for i in range(12)}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "succeeded" and summary["shards_committed"] == 3

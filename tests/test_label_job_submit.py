"""``ray job submit`` of pipelines/label.py to a real Ray head on 127.0.0.1 (slow: starts a cluster)."""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from ray.job_submission import JobStatus, JobSubmissionClient

from denseclip.mask_store import MaskStore
from denseclip.synthetic import write_shards

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def ray_head(num_cpus: int = 2):
    """A Ray head on 127.0.0.1 run by ``ray start --block``; stopping that one process (by its PID, then its
    process group) stops exactly this cluster and nobody else's. Yields the dashboard (job API) address."""
    # Every port is a free one: other clusters on this machine hold Ray's defaults, and with --block the head
    # stops as a whole when any of its processes fails to bind.
    ports = {flag: str(_free_port()) for flag in (
        "--port", "--dashboard-port", "--ray-client-server-port", "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port")}
    temp_dir = tempfile.mkdtemp(prefix="rl", dir="/tmp")  # short: Ray's socket paths have a length limit
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", *(x for item in ports.items() for x in item),
         "--node-ip-address", "127.0.0.1", "--num-cpus", str(num_cpus), "--dashboard-host", "127.0.0.1",
         "--temp-dir", temp_dir, "--disable-usage-stats"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{ports['--dashboard-port']}"
    try:
        deadline = time.monotonic() + 180
        while subprocess.run([RAY, "job", "list", "--address", address], capture_output=True,
                             check=False).returncode != 0:
            assert head.poll() is None and time.monotonic() < deadline, "the Ray head did not come up"
            time.sleep(2)
        yield address
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(head.pid, signal.SIGKILL)
            shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_ray_job_submit_labels_the_shards(tmp_path):
    write_shards(seed=8, n=12, out=str(tmp_path / "shards"), shard_size=4, size=64)
    out = tmp_path / "masks"
    job_id = f"label-test-{uuid.uuid4().hex[:8]}"
    with ray_head() as address:
        submit = subprocess.run(
            [RAY, "job", "submit", "--address", address, "--submission-id", job_id, "--working-dir", ".", "--",
             "python", "pipelines/label.py", "--input", str(tmp_path / "shards"), "--output", str(out),
             "--vocabulary", "synthetic", "--pretrained", "random", "--batch-size", "4"],
            cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
        status = JobSubmissionClient(address).get_job_status(job_id)
    assert status == JobStatus.SUCCEEDED, submit.stdout[-4000:] + submit.stderr[-2000:]
    assert "12 images labelled, 0 errors" in submit.stdout
    assert MaskStore(str(out)).keys() == {f"synthetic/s8/{i:06d}" for i in range(12)}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "succeeded" and summary["shards_committed"] == 3

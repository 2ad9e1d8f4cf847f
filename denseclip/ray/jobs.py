"""Run one step of a multi-stage workflow as a Ray job through the job submission API, and wait for it."""

from __future__ import annotations

import asyncio
import sys
import time

from ray.job_submission import JobStatus, JobSubmissionClient

from denseclip.ray.auth import job_client

_STATUS_POLL_S = 1.0


def run_ray_job(address: str, entrypoint: str, submission_id: str, working_dir: str,
                env_vars: dict[str, str] | None = None) -> None:
    """Submit ``entrypoint`` to the Ray cluster at ``address`` (its dashboard, ``http://127.0.0.1:8265`` through a
    tunnel, or a Ray address ``host:port``), with the cluster's token when it requires one, uploading
    ``working_dir`` as the job's working directory (and setting ``env_vars`` in it), print its logs as they come, and return once it succeeded;
    RuntimeError naming the job when it failed or was stopped, ``auth.ClusterAccessError`` (one line) when the
    cluster cannot be reached or refuses us."""
    client = job_client(address)
    client.submit_job(entrypoint=entrypoint, submission_id=submission_id,
                      runtime_env={"working_dir": working_dir, "env_vars": env_vars or {}})
    asyncio.run(_follow_logs(client, submission_id))
    status = client.get_job_status(submission_id)
    while not status.is_terminal():  # the log stream ended a moment before the job's status was updated
        time.sleep(_STATUS_POLL_S)
        status = client.get_job_status(submission_id)
    if status != JobStatus.SUCCEEDED:
        raise RuntimeError(f"Ray job {submission_id} {status.value.lower()}: {entrypoint}")


async def _follow_logs(client: JobSubmissionClient, submission_id: str) -> None:
    """Print the job's log as the dashboard streams it (one websocket), until the job ends."""
    async for lines in client.tail_job_logs(submission_id):
        sys.stdout.write(lines)
        sys.stdout.flush()

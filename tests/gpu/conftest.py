"""The GPU suite's gate. Where torch can run a kernel on a GPU, the tests run on ``cuda``. On a machine without any
GPU (a laptop, CI) every test is skipped, and the skip says so. Where ``nvidia-smi`` lists GPUs that torch cannot
use (a driver older than the CUDA the torch wheel was built for, a CPU-only wheel), every test fails with the
reason: such a machine must never report green.

``DENSECLIP_GPU_SUITE_ON_CPU=1`` runs the suite's own code on the CPU instead: a check of the tests themselves
(their CPU twins), which proves nothing about a GPU.
"""

from __future__ import annotations

import os

import pytest

from denseclip.gpu import cuda_problem

ON_CPU = "DENSECLIP_GPU_SUITE_ON_CPU"


@pytest.fixture(scope="session", autouse=True)
def device() -> str:
    """``cuda``, or ``cpu`` for the suite's dry run (:data:`ON_CPU`); skips without a GPU, fails with one that torch
    cannot use."""
    if os.environ.get(ON_CPU) == "1":
        return "cpu"
    problem = cuda_problem()
    if problem is None:
        return "cuda"
    why, gpu_present = problem
    if gpu_present:
        pytest.fail(f"the GPU suite cannot run: {why}", pytrace=False)
    pytest.skip(f"the GPU suite needs a GPU: {why}")

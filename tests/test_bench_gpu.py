"""benchmarks/bench_gpu.py as CI runs it: ``--device cpu --quick``, a smoke test that every row of the GPU table runs
(the tiny CLIP, a handful of images, the whole label.py pipeline on its own local Ray)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_benchmark_runs_on_cpu_in_quick_mode():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--device", "cpu", "--quick"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    table = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith("| ")]
    assert table[0][0].strip() == "stage"  # the header; the rule under it starts with "|-"
    rows = table[1:]
    stages = [cells[0].strip() for cells in rows]
    assert stages[0] == "gemm" and {"model", "decode", "pipeline"} <= set(stages)
    for cells in rows:
        stage, setting, rate = (c.strip() for c in cells[:3])
        if stage in ("model", "decode", "pipeline"):
            assert float(rate) > 0, (setting, rate)  # every measured row produced a rate

"""The public Python API: ``import denseclip`` is light, never imports Ray, and names what users need."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

import denseclip

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300,
                          cwd=ROOT).stdout


def test_import_is_light_and_every_public_name_comes_without_ray():
    printed = _run("import sys, denseclip\n"
                   "print('torch' in sys.modules, 'ray' in sys.modules)\n"
                   "[getattr(denseclip, name) for name in denseclip.__all__]\n"
                   "print('torch' in sys.modules, 'ray' in sys.modules)\n"
                   "import denseclip.config\n")
    assert printed.splitlines() == ["False False", "True False"]
    assert _run("import sys, denseclip.config\nprint('torch' in sys.modules)").strip() == "False"


def test_public_names_are_the_library_objects():
    from denseclip.config import LabelerConfig
    from denseclip.dense import dense_features
    from denseclip.mask_store import MaskStore
    from denseclip.models import load_clip
    from denseclip.predictor import DenseCLIP

    assert (denseclip.load_clip, denseclip.DenseCLIP, denseclip.dense_features, denseclip.LabelerConfig,
            denseclip.MaskStore) == (load_clip, DenseCLIP, dense_features, LabelerConfig, MaskStore)
    assert set(denseclip.__all__) <= set(dir(denseclip))
    assert set(denseclip.__all__) == {"__version__", *denseclip._EXPORTS}
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        denseclip.nothing_here  # noqa: B018


def test_version_is_the_package_version():
    version = re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.MULTILINE).group(1)
    assert denseclip.__version__ == version


def test_the_shipped_tiny_clip_labels_through_the_public_api():
    import numpy as np

    from denseclip.synthetic import render_scene

    clip = denseclip.load_clip("denseclip-tiny-shapes")
    labeler = denseclip.DenseCLIP(clip, [["red circle"], ["blue star"], ["background"]])
    labels, confidence = labeler.label_images([render_scene(3, 0, size=64).image])[0]
    assert labels.shape == confidence.shape == (64, 64) and labels.max() < 3
    assert np.isfinite(confidence).all()


def test_ray_is_imported_only_in_denseclip_ray():
    """The rule README.md states: the library, the pipelines and the benchmarks reach Ray through denseclip.ray."""
    importing = re.compile(r"^\s*(import ray\b|from ray\b)", re.MULTILINE)
    offenders = [str(path.relative_to(ROOT)) for folder in ("denseclip", "pipelines", "benchmarks")
                 for path in (ROOT / folder).rglob("*.py")
                 if importing.search(path.read_text()) and (ROOT / "denseclip" / "ray") not in path.parents]
    assert offenders == []


def test_the_lock_pins_the_whole_tree_as_pyproject_pins_the_direct_dependencies():
    lock = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)(\s*;.+)?", line).group(1, 2)
            lock[re.sub(r"[-_.]+", "-", name).lower()] = version
    pyproject = (ROOT / "pyproject.toml").read_text()
    direct = re.findall(r'"([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([^"]+)"', pyproject)
    assert len(direct) > 15
    for name, version in direct:
        assert lock.get(re.sub(r"[-_.]+", "-", name).lower()) == version, name
    assert "boto3" in lock and "numpy" in lock  # transitive dependencies are pinned too


def test_ci_installs_the_lock_into_a_cleared_venv_with_the_browser():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python3 -m venv --clear .venv" in ci  # an old .venv never leaks into CI
    assert 'pip install -q -r requirements.lock -e ".[test]"' in ci
    assert "apt-get install" in ci and "chromium chromium-driver" in ci

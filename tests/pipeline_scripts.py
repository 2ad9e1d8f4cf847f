"""Load a ``pipelines/<name>.py`` script as a module, for tests that drive a command line in-process."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"


def load_pipeline(name: str) -> ModuleType:
    """``pipelines/<name>.py`` as the module ``pipelines_<name>``, loaded once per process and registered in
    ``sys.modules`` (dataclasses and pickling look their module up there)."""
    module_name = f"pipelines_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, PIPELINES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]

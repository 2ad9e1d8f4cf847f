"""Load a ``pipelines/<name>.py`` script as a module, for tests that drive a command line in-process; find the
error-level lines in what a command printed."""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"


def load_pipeline(name: str) -> ModuleType:
    """The command behind ``pipelines/<name>.py``: its module in ``denseclip.commands``, or where the script is the
    command itself, the script as the module ``pipelines_<name>``, loaded once per process and registered in
    ``sys.modules`` (dataclasses and pickling look their module up there)."""
    if importlib.util.find_spec(f"denseclip.commands.{name}") is not None:
        return importlib.import_module(f"denseclip.commands.{name}")
    module_name = f"pipelines_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, PIPELINES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


# Python's ERROR records and tracebacks, and Ray's C++ error lines ("[2026-01-01 00:00:00,000 E 123 456] ...").
_ERROR_LINE = re.compile(r"ERROR|Traceback|\[\d{4}-\d\d-\d\d [\d:,.]+ E \d+ \d+\]")


def error_lines(printed: str) -> list[str]:
    """The lines of ``printed`` (a command's stdout and stderr) that are error-level."""
    return [line for line in printed.splitlines() if _ERROR_LINE.search(line)]

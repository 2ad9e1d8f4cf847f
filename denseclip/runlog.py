"""Quiet command lines: what the libraries print (Ray's driver and the lines it forwards from its workers,
Ray's C++ core, open_clip, warnings) goes to a log file in the run's folder (:func:`run_log`), or is kept below
warnings for the commands that run in one process (:func:`library_output`); the command's own lines go to the
terminal through a :class:`Console`, and long steps show a progress bar (:func:`progress`).

The redirection is done on the file descriptors 1 and 2, not on ``sys.stdout``: Ray's C++ core and the worker
lines Ray forwards write there directly. Every process Ray starts afterwards inherits the log file too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TextIO

from denseclip import storage

LOG_DIR = "logs"


class Console:
    """The terminal, whatever the process's stdout and stderr point to: ``print`` for progress and results,
    ``error`` for failures."""

    def __init__(self, out: TextIO, err: TextIO, log: str | None = None):
        self._out, self._err = out, err
        self.log = log  # where the libraries' output goes (None: to the terminal as usual)

    def print(self, line: str) -> None:
        print(line, file=self._out, flush=True)

    def error(self, line: str) -> None:
        print(line, file=self._err, flush=True)


def log_url(folder: str, command: str) -> str:
    """A new log file of ``command`` under ``folder/logs/`` (a local path or URL), named by the UTC start time:
    ``logs/label-20260102-030405.log``."""
    return storage.join(folder, LOG_DIR, f"{command}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.log")


@contextlib.contextmanager
def run_log(url: str | None) -> Iterator[Console]:
    """Within the block, send everything this process writes to stdout and stderr to the log file ``url`` (a
    local path, created with its folders; or an fsspec URL, uploaded when the block ends) and yield a Console
    on the terminal. ``url`` None (``--verbose``): nothing is redirected, the Console prints as usual."""
    if url is None:
        yield Console(sys.stdout, sys.stderr)
        return
    local = storage.is_local(url)
    if local:
        path = os.path.abspath(url)
        os.makedirs(os.path.dirname(path), exist_ok=True)
    else:
        handle, path = tempfile.mkstemp(suffix=".log", prefix="denseclip-")
        os.close(handle)
    try:
        with _redirected(path) as (out, err):
            yield Console(out, err, url)
    finally:
        if not local:
            try:
                storage.write_bytes(url, Path(path).read_bytes())
            except OSError as exc:  # the run's outcome matters more than its log: say where it stayed
                print(f"warning: could not upload the log to {url} ({exc}); it stays at {path}", file=sys.stderr)
            else:
                os.unlink(path)


@contextlib.contextmanager
def library_output(verbose: bool) -> Iterator[None]:
    """Within the block the libraries' log records below warnings and their warnings are dropped, unless
    ``verbose``, which shows their information records too."""
    root = logging.getLogger()
    level = root.level
    with warnings.catch_warnings():
        if verbose:
            logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
            root.setLevel(logging.INFO)
        else:
            warnings.simplefilter("ignore")
            root.setLevel(logging.WARNING)
        try:
            yield
        finally:
            root.setLevel(level)


def progress(items: Iterable, description: str, total: int | None = None, unit: str = "it") -> Iterable:
    """``items`` with a progress bar on stderr while the terminal is a TTY (none in logs and pipes)."""
    from tqdm import tqdm

    return tqdm(items, desc=description, total=total, unit=unit, disable=None, mininterval=1.0, leave=False,
                file=sys.stderr)


@contextlib.contextmanager
def _redirected(path: str) -> Iterator[tuple[TextIO, TextIO]]:
    """File descriptors 1 and 2 appended to ``path`` within the block; yields text streams on the former ones."""
    sys.stdout.flush()
    sys.stderr.flush()
    with contextlib.ExitStack() as stack:
        terminal = [os.dup(1), os.dup(2)]
        for fd in terminal:
            stack.callback(os.close, fd)
        streams = [stack.enter_context(open(fd, "w", encoding="utf-8", errors="replace", closefd=False))
                   for fd in terminal]
        log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        stack.callback(os.close, log_fd)
        stack.enter_context(environment("RAY_COLOR_PREFIX", "0"))  # Ray colours the worker lines it forwards
        stack.callback(os.dup2, terminal[1], 2)
        stack.callback(os.dup2, terminal[0], 1)
        stack.callback(sys.stderr.flush)
        stack.callback(sys.stdout.flush)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        yield streams[0], streams[1]


@contextlib.contextmanager
def environment(name: str, value: str) -> Iterator[None]:
    """``os.environ[name] = value`` within the block, restored after."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before

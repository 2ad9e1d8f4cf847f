"""Quiet runs: library output of every kind goes to the run's log file, the pipeline's own lines to the terminal."""

import subprocess
import sys
import textwrap

import fsspec

from denseclip.runlog import log_url

SCRIPT = textwrap.dedent("""
    import os, subprocess, sys, warnings
    from denseclip.runlog import run_log

    url = sys.argv[1] if sys.argv[1] != "-" else None
    with run_log(url) as console:
        print("python print")
        warnings.warn("a deprecation warning")
        os.write(2, b"[2026-01-01 00:00:00,000 E 1 1] core_worker.cc: written by C++\\n")
        subprocess.run(["echo", "a child process"], check=True)
        console.print("our progress line")
        console.error("our error line")
    print("after the block")
""")
NOISE = ("python print", "a deprecation warning", "core_worker.cc", "a child process")


def run(url: str | None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT, url or "-"], capture_output=True, text=True, check=True,
                          timeout=60)


def test_library_output_goes_to_the_log_and_our_lines_to_the_terminal(tmp_path):
    url = log_url(str(tmp_path / "run"), "label")
    assert url.startswith(str(tmp_path / "run" / "logs" / "label-")) and url.endswith(".log")
    done = run(url)
    assert done.stdout.splitlines() == ["our progress line", "after the block"]
    assert done.stderr.splitlines() == ["our error line"]
    log = (tmp_path / "run" / "logs").joinpath(url.rsplit("/", 1)[-1]).read_text()
    assert all(noise in log for noise in NOISE) and "our progress line" not in log


def test_verbose_leaves_everything_on_the_terminal(tmp_path):
    done = run(None)
    printed = done.stdout + done.stderr
    assert all(noise in printed for noise in NOISE + ("our progress line", "our error line"))
    assert not list(tmp_path.iterdir())


def test_a_log_in_object_storage_is_uploaded_when_the_run_ends(make_bucket):
    url = log_url(f"{make_bucket('logs')}/masks", "label")
    done = run(url)
    assert done.stdout.splitlines() == ["our progress line", "after the block"]
    with fsspec.open(url, "r") as f:
        log = f.read()
    assert all(noise in log for noise in NOISE), log

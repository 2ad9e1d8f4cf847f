"""One vocabulary across the ``denseclip`` commands: the shared flags where a command has that kind of input,
output, vocabulary, cluster, spec or long step; renamed flags kept as hidden aliases that say their new name once;
``denseclip`` and ``python -m denseclip`` reach every command."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from denseclip.commands import COMMANDS, options

ROOT = Path(__file__).resolve().parents[1]
# What each command takes, by the vocabulary (a command absent from a row has no such thing).
TAKES = {
    "--input": {"predict", "prepare", "label", "verify", "export", "train", "evaluate"},
    "--output": {"demo", "predict", "prepare", "label", "export", "train", "evaluate", "render-world",
                 "train-tiny-clip"},
    "--classes": {"predict", "label", "export", "evaluate"},
    "--address": {"label", "train", "evaluate", "reproduce", "submit"},
    "--config": {"label", "train", "reproduce"},
    "--set": {"label", "train", "reproduce"},
    "--verbose": {"demo", "prepare", "label", "train", "evaluate", "reproduce"},
}
# Old flag -> new flag, per command: existing scripts and job files keep running.
RENAMED = {
    "evaluate": {"--gt": "--input", "--dataset": "--classes", "--classes-file": "--classes", "--out": "--output"},
    "prepare": {"--root": "--input", "--out": "--output"},
    "export": {"--store": "--input", "--out": "--output"},
    "predict": {"--out": "--output", "--vocabulary": "--classes", "--classes-file": "--classes"},
    "label": {"--vocabulary": "--classes"},
    "render-world": {"--out": "--output"},
    "train-tiny-clip": {"--out": "--output"},
}


def _help(command: str, capsys) -> str:
    module = importlib.import_module(f"denseclip.commands.{COMMANDS[command][0]}")
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"], prog=f"denseclip {command}")
    assert exit_.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_speaks_the_shared_vocabulary(command, capsys):
    text = _help(command, capsys)
    assert text.startswith(f"usage: denseclip {command}")
    offered = {flag for flag in TAKES if f"{flag} " in text or f"{flag}\n" in text or f"{flag}]" in text}
    expected = {flag for flag, commands in TAKES.items() if command in commands}
    assert offered >= expected, f"denseclip {command} lacks {sorted(expected - offered)}"
    for old in RENAMED.get(command, {}):
        assert f"{old} " not in text and f"{old}\n" not in text  # hidden from --help


@pytest.mark.parametrize("command", sorted(RENAMED))
def test_a_renamed_flag_sets_its_new_flag_and_says_so_once(command, capsys, monkeypatch):
    monkeypatch.setattr(options, "_ANNOUNCED", set())
    module = importlib.import_module(f"denseclip.commands.{COMMANDS[command][0]}")
    parser = module.build_parser(f"denseclip {command}")
    for action in parser._actions:  # one flag at a time: the others' being required is not what is tested
        action.required = False
    parser.required_renamed.clear()
    for old, new in RENAMED[command].items():
        dest = parser._option_string_actions[new].dest
        for value in ("first", "second"):  # said the first time only
            namespace, _ = parser.parse_known_args([old, value])
            assert str(getattr(namespace, dest)) == value
        said = capsys.readouterr().err
        assert said.count(f"denseclip {command}: {old} is now {new}") == 1, said


def test_the_denseclip_command_and_the_module_reach_every_command():
    listed = subprocess.run([sys.executable, "-m", "denseclip", "--help"], capture_output=True, text=True,
                            check=True, cwd=ROOT).stdout
    assert all(f"  {command} " in listed for command in COMMANDS)
    unknown = subprocess.run([sys.executable, "-m", "denseclip", "lable"], capture_output=True, text=True,
                             check=False, cwd=ROOT)
    assert unknown.returncode == 2 and "unknown command 'lable'" in unknown.stderr
    script = Path(sys.executable).with_name("denseclip")  # [project.scripts], installed with the package
    version = subprocess.run([str(script), "render-world", "--help"], capture_output=True, text=True, check=True)
    assert "--output" in version.stdout

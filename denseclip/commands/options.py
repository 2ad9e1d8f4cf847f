"""The flags every command shares, in one vocabulary: ``--input`` / ``--output``, ``--classes`` (a dataset preset, a
class file or a comma list), ``--address`` (a Ray address), ``--config`` + ``--set KEY=VALUE``, ``--verbose``.

A flag that was renamed keeps working under its old name, hidden from ``--help``: it sets the new flag and says
the new name once (on stderr), so existing scripts and job files keep running.
"""

from __future__ import annotations

import argparse
import os
import sys

VERBOSE_ENV = "DENSECLIP_VERBOSE"  # "1": --verbose by default (how reproduce passes --verbose to its stages)

# The old names already announced in this process: each is said once.
_ANNOUNCED: set[str] = set()


class _Renamed(argparse.Action):
    """An old flag name: stores into the new flag's destination, and says the new name the first time."""

    def __init__(self, option_strings, dest, new: str, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string not in _ANNOUNCED:
            _ANNOUNCED.add(option_string)
            print(f"{parser.prog}: {option_string} is now {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose required flags may also be given under an old name (see :func:`renamed`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.required_renamed: list[argparse.Action] = []

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        missing = [a.option_strings[0] for a in self.required_renamed if getattr(namespace, a.dest, None) is None]
        if missing:
            self.error(f"the following arguments are required: {', '.join(missing)}")
        return namespace, extras


def renamed(parser: Parser, old: str, new: str) -> None:
    """Accept ``old`` as a hidden alias of the flag ``new`` already added to ``parser`` (same value, type and
    destination); using it says the new name once. A required ``new`` is then satisfied by either name."""
    action = parser._option_string_actions[new]  # argparse has no public lookup of an added flag
    if action.required:
        action.required = False
        parser.required_renamed.append(action)
    flag = action.nargs == 0
    parser.add_argument(old, dest=action.dest, action=_Renamed, new=new, help=argparse.SUPPRESS,
                        nargs=0 if flag else action.nargs, const=action.const if flag else None,
                        type=None if flag else action.type, choices=None if flag else action.choices)


def add_config(parser: argparse.ArgumentParser, required: bool = False, what: str = "job spec (YAML)") -> None:
    """``--config FILE`` and ``--set KEY=VALUE`` (repeatable; dotted keys, values read as YAML)."""
    parser.add_argument("--config", required=required, help=f"{what}; flags override its values")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="set a field of the spec by its dotted path, the value read as YAML (repeatable)")


def add_address(parser: argparse.ArgumentParser, use: str = "default: $RAY_ADDRESS, else a private local Ray") -> None:
    """``--address``: the Ray cluster to use."""
    parser.add_argument("--address", help="Ray cluster address (HOST:6379, auto, ray://HOST:10001, or the dashboard "
                        f"through a tunnel, http://127.0.0.1:8265); {use}")


def add_classes(parser: argparse.ArgumentParser, required: bool = False, extra: str = "") -> None:
    """``--classes``: a dataset preset, a class file or a comma-separated list of class names."""
    parser.add_argument("--classes", required=required,
                        help="a dataset preset (voc, voc20, context, context59, coco_stuff, synthetic), a class "
                        "file (one class per line, synonyms after commas) or comma-separated class names" + extra)


def add_verbose(parser: argparse.ArgumentParser, where: str = "") -> None:
    """``--verbose``: what Ray and the libraries print, on the terminal."""
    parser.add_argument("--verbose", action="store_true", default=os.environ.get(VERBOSE_ENV) == "1",
                        help="show what Ray and the libraries print" + (f" instead of writing it to {where}"
                                                                         if where else ""))

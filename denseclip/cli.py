"""The ``denseclip`` command: ``denseclip <command> [options]``, each command a module of
:mod:`denseclip.commands` (``denseclip <command> --help`` for its options)."""

from __future__ import annotations

import importlib
import sys

from denseclip.commands import COMMANDS


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:{width}s}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "usage: denseclip <command> [options]\n\ncommands:\n" + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), end="")
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(usage() + f"\ndenseclip: error: unknown command {argv[0]!r}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"denseclip.commands.{COMMANDS[argv[0]][0]}")
    return module.main(argv[1:], prog=f"denseclip {argv[0]}")


if __name__ == "__main__":
    sys.exit(main())

"""Check every part of a mask store against its record and manifest.

    denseclip verify --store s3://bucket/masks/ [--deep]

Reads every committed part's footer and record and checks that sizes, row counts and the key index agree
(``--deep``: also every part's SHA-256). Prints one line per damaged part and per disagreement of the key index,
then a total. Exit codes: 0 sound, 1 damaged parts or a disagreeing index, 2 no parts or an unreadable store.
"""

from __future__ import annotations

import argparse
import sys

from denseclip.commands.options import Parser


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = Parser(prog=prog or "denseclip verify", description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", "--input", dest="store", required=True, help="mask store root (a folder or URL)")
    parser.add_argument("--deep", action="store_true", help="also compare every part's SHA-256 with its manifest "
                        "(reads the whole store)")
    return parser


def verify(store: str, deep: bool = False) -> int:
    """Print the verification of the store at ``store``; 0 sound, 1 damaged. FileNotFoundError without parts."""
    from denseclip.mask_store import verify_store

    report = verify_store(store, deep=deep)
    if not report.parts:
        raise FileNotFoundError(f"no committed mask parts under {store}")
    for line in report.lines():
        print(line, flush=True)
    return 0 if report.ok else 1


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        return verify(args.store, args.deep)
    except (ValueError, OSError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2

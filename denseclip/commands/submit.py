"""Submit a command to a Ray cluster as a Ray job, with the cluster's token, and wait for it.

    denseclip submit --address http://127.0.0.1:8265 -- python pipelines/label.py --config jobs/label_bulk.yaml

What ``ray job submit --working-dir .`` does (``--working-dir``, by default the current folder, is the job's working
directory; the job's log is streamed here), for a cluster with token authentication: the token comes from ``$RAY_AUTH_TOKEN``,
``$RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token`` and no ``RAY_AUTH_MODE`` is needed here; a missing or refused
token, or a cluster that does not answer, is one line naming the fix (docs/cluster.md). ``--address`` is the
dashboard (the local end of ``ray dashboard infra/cluster.yaml`` or of ``kubectl port-forward``) or a Ray address.
Exit codes: 0 the job succeeded, 1 it failed or was stopped, 2 the cluster cannot be reached or refuses us.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import uuid

from denseclip.commands.options import Parser, add_address


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    parser = Parser(prog=prog or "denseclip submit", description=__doc__.split("\n\n")[0])
    add_address(parser)
    parser.set_defaults(address=os.environ.get("RAY_ADDRESS"))
    parser.add_argument("--working-dir", default=".", help="the folder the job runs in, uploaded (default: .)")
    parser.add_argument("--submission-id", help="the job's id (default: submit-<random>)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command the job runs")
    args = parser.parse_args(argv)
    args.command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not args.command or not args.address:
        parser.error("give --address (or $RAY_ADDRESS) and the command after --")
    return args


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = parse_args(argv, prog)
    from denseclip.ray.auth import ClusterAccessError
    from denseclip.ray.jobs import run_ray_job

    submission_id = args.submission_id or f"submit-{uuid.uuid4().hex[:8]}"
    try:
        run_ray_job(args.address, shlex.join(args.command), submission_id, os.path.abspath(args.working_dir))
    except ClusterAccessError as exc:
        print(f"submit: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"submit: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

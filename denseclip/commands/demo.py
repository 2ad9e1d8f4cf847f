"""The offline demo: DenseCLIP and DenseCLIP+ on the synthetic world with the shipped tiny CLIP, on CPU.

    denseclip demo --seed 1 --num-images 200 --output runs/demo

Writes ``DIR/index.html`` (every method side by side: the table, IoU per class, the same scenes under each
method), ``DIR/report.json`` (one entry per method, plus ``unseen_classes``, timings and the training logs) and
``DIR/<method>/`` (report, tables, confusion matrix, overlays, index.html); prints training progress, the unseen
split, the headline numbers, the timings and the report files.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from denseclip.commands.options import Parser, add_verbose, renamed
from denseclip.config import ConfigError
from denseclip.demo import METHODS, RESERVED_SEEDS, DemoConfig, default_training, run_demo
from denseclip.models import ModelLoadError
from denseclip.runlog import library_output


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = Parser(prog=prog or "denseclip demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults, training = DemoConfig(), default_training()
    parser.add_argument("--seed", type=int, required=True,
                        help=f"world seed of the held-out set (any but the training seeds {RESERVED_SEEDS})")
    parser.add_argument("--num-images", type=int, default=defaults.num_images, help="held-out scenes")
    parser.add_argument("--output", required=True, help="output folder")
    renamed(parser, "--out", "--output")
    parser.add_argument("--train-images", type=int, default=defaults.train_images,
                        help="DenseCLIP+ training scenes")
    parser.add_argument("--iterations", type=int, default=training.iterations,
                        help="DenseCLIP+ steps per run")
    parser.add_argument("--num-overlays", type=int, default=defaults.num_overlays,
                        help="overlay grids per method")
    parser.add_argument("--clip-weights", default=None,
                        help="tiny CLIP checkpoint (default: the shipped one)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared 2-core machine a second thread "
                             "made each training step ~10x slower, not faster)")
    add_verbose(parser)
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    if args.threads < 1:
        print(f"error: --threads must be >= 1 (got {args.threads})", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    config = DemoConfig(seed=args.seed, num_images=args.num_images, train_images=args.train_images,
                        training=dataclasses.replace(default_training(), iterations=args.iterations),
                        num_overlays=args.num_overlays, clip_weights=args.clip_weights)

    def progress(run: str, record: dict) -> None:
        held_out = ""
        if "held_out_miou" in record:
            held_out = (f", mIoU {record['held_out_miou']:.1f} on the first {record['held_out_images']} of the "
                        f"{args.num_images} held-out scenes")
        print(f"  {run}: step {record['step']} ({record['phase']}) loss {record['loss']:.3f}{held_out}",
              flush=True)

    try:
        with library_output(args.verbose):
            report = run_demo(config, args.output, on_log=progress)
    except (ConfigError, ModelLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"\nunseen classes (zero-shot split): {', '.join(report['unseen_classes'])}")
    print(f"all {args.num_images} held-out scenes, in %:")
    width = max(len(m.label) for m in METHODS)
    print(f"{'method':{width}s} {'mIoU':>6s} {'seen':>6s} {'unseen':>6s} {'pAcc':>6s}")
    for method in METHODS:
        r = report[method.key]
        cells = [r[k] for k in ("miou", "miou_seen", "miou_unseen", "pixel_accuracy")]
        print(f"{method.label:{width}s} " + " ".join("     -" if v is None else f"{v:6.2f}" for v in cells))
    print("\ntimings:")
    for stage, seconds in report["timings_s"].items():
        print(f"  {stage:24s} {seconds:8.1f} s")
    print(f"  {'total':24s} {sum(report['timings_s'].values()):8.1f} s")
    out = Path(args.output)
    print(f"\nall methods side by side: {out / report['pages']['comparison']}")
    print(f"each method: {out}/<method>/index.html ({', '.join(m.key for m in METHODS)})")
    print(f"numbers: {out / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

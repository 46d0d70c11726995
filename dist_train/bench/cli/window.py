"""`dist-train bench window`: its flags, example and argument checks, torch-free (the measurement:
dist_train/bench/window.py)."""
from __future__ import annotations

import argparse

HELP = "window parallelism: halo bytes, exposed communication and weak-scaling efficiency of a Swin block"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("example:\n  dist-train bench window --grid 1 2 --image 512 512 --window 8 --heads 4 --json w.json\n"
                     "  (each rank's tile is H×W tokens: weak scaling; the baseline is the same block on one process)")
    parser.add_argument("--grid", type=int, nargs=2, metavar=("GH", "GW"), default=[1, 2], help="tile grid (ranks = GH·GW)")
    parser.add_argument("--image", type=int, nargs=2, metavar=("H", "W"), default=[512, 512],
                        help="tokens per rank's tile (the single-process image)")
    parser.add_argument("--window", type=int, default=8, help="window size (square)")
    parser.add_argument("--shift", type=int, default=None, help="shift (default window // 2)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads")
    parser.add_argument("--head-dim", type=int, default=16, help="channels per head (C = heads · head_dim)")
    parser.add_argument("--batch", type=int, default=1, help="images per rank")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions of each variant (after 1 warm-up)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds before the ranks are killed")
    parser.add_argument("--json", metavar="PATH", default=None, help="write the results as JSON")


def check(args: argparse.Namespace) -> int:
    """The shift (``--shift``, default window // 2); ValueError on a grid, image, window or count the block
    cannot use."""
    gh, gw = args.grid
    h, w = args.image
    shift = args.window // 2 if args.shift is None else args.shift
    if gh < 1 or gw < 1:
        raise ValueError(f"--grid {gh} {gw}: both must be >= 1")
    if args.window < 1 or h % args.window or w % args.window:
        raise ValueError(f"--image {h} {w} must be multiples of --window {args.window} (>= 1)")
    if not 0 <= shift < args.window:
        raise ValueError(f"--shift {shift}: must satisfy 0 <= shift < window {args.window}")
    for name, v in (("heads", args.heads), ("head-dim", args.head_dim), ("batch", args.batch), ("reps", args.reps)):
        if v < 1:
            raise ValueError(f"--{name} {v}: must be >= 1")
    return shift

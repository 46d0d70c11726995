"""`dist-train bench ckpt`: its flags, examples and argument checks, torch-free (the measurement:
dist_train/bench/ckpt.py)."""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

HELP = "checkpoint save/load throughput vs raw disk bandwidth; async save stall vs sync save"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("examples:\n  dist-train bench ckpt --size-gb 1\n"
                     "  dist-train bench ckpt --size-gb 2 --dir /scratch --repeats 3 --json ckpt.json")
    parser.add_argument("--size-gb", type=float, default=1.0, help="model state size in GiB (default 1)")
    parser.add_argument("--dir", default=".", help="directory on the disk to measure (default: current dir)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement; medians are reported")
    parser.add_argument("--io-threads", type=int, default=2,
                        help="threads reading/writing shard bytes per rank (default 2)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")


def check(args: argparse.Namespace) -> int:
    """The model state's size in bytes; ValueError on a size, count or directory the bench cannot use (one
    without room for the files it writes)."""
    if not args.size_gb > 0:
        raise ValueError(f"--size-gb = {args.size_gb}: must be a positive number of GiB, e.g. --size-gb 1")
    if args.repeats < 1:
        raise ValueError(f"--repeats = {args.repeats}: must be >= 1")
    if args.io_threads < 1:
        raise ValueError(f"--io-threads = {args.io_threads}: must be >= 1")
    base = Path(args.dir)
    if not base.is_dir():
        raise ValueError(f"--dir = {args.dir}: not a directory")
    nbytes = int(args.size_gb * (1 << 30))
    free = shutil.disk_usage(base).free
    if free < 5.2 * nbytes:  # raw file + two new-file raw writes + two checkpoints (keep_last=1 + the new one)
        raise ValueError(f"--size-gb = {args.size_gb}: needs ~{5.2 * nbytes / 2**30:.1f} GiB free in {base}, "
                         f"{free / 2**30:.1f} GiB available")
    return nbytes

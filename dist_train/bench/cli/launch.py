"""`dist-train bench launch`: its flags, example and argument checks (the measurement:
dist_train/bench/launch.py)."""
from __future__ import annotations

import argparse

from ...config import check_unprofiled, load_config

HELP = "seconds from `dist-train launch` to the first training step per backend, and restart cost"
BACKENDS = ("local", "ray", "mpi")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("example:\n  dist-train bench launch configs/gpt_tiny.yaml --backends local ray mpi "
                     "--set parallel.dp=2 --json launch.json")
    parser.add_argument("config", help="YAML config file (its run.dir is replaced by a temp dir)")
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), help="subset of local ray mpi")
    parser.add_argument("--nproc", type=int, default=2, help="ranks (default 2)")
    parser.add_argument("--steps", type=int, default=4, help="training steps per run (default 4)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per backend; medians reported")
    parser.add_argument("--no-restart", action="store_true", help="skip the killed-rank restart measurement")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")


def check(args: argparse.Namespace) -> None:
    """ValueError on a backend or count the bench cannot use, or a profiled config (ConfigError: a config that does not
    validate); the arguments carry everything else."""
    bad = [b for b in args.backends if b not in BACKENDS]
    if bad:
        raise ValueError(f"--backends {' '.join(bad)}: valid backends are {', '.join(BACKENDS)}")
    if args.nproc < 1 or args.steps < 1 or args.repeats < 1:
        raise ValueError(f"--nproc {args.nproc} --steps {args.steps} --repeats {args.repeats}: all must be >= 1")
    check_unprofiled(load_config(args.config, args.set), "bench launch",
                     "trains in temporary run directories (deleted, traces included)")

"""`dist-train bench train`: its flags, examples and argument checks, torch-free (the measurement:
dist_train/bench/train.py). The checks load the config of the run and of its baseline, so a bad override or
rank count is refused before torch is imported or any rank starts."""
from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional

from ...config import Config, check_unprofiled, load_config, unread_reset_overrides
from .._paired import alternation

HELP = "training throughput, MFU, memory and compute/comm/data split of one config on N ranks"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("examples:\n  dist-train bench train configs/gpt_tiny.yaml --set parallel.dp=1 --set parallel.tp=2 "
                     "--set data.source=synthetic --nproc 2 --steps 8 --json tp2.json\n"
                     "  (the first step is excluded from the medians: warm-up)\n"
                     "  dist-train bench train configs/swin_era5_721x1440.yaml --set data.image=[128,256] "
                     "--set data.path=data_cache/weather_128x256 --set data.steps=16 --set train.global_batch=4 "
                     "--set train.activation_checkpointing=none --set parallel.wp=[1,1] "
                     "--set model.n_layers=4 --set parallel.pp=2 --baseline-set model.n_layers=2 "
                     "--baseline-set parallel.pp=1 --repeats 3 --steps 6 --json pp2_vs_pp1.json --png pp2_vs_pp1.png\n"
                     "  (pp2 against pp1 with the same blocks per rank, alternating baseline and run 3 times, 1 thread "
                     "per rank: medians, ratio, and the bubble formula's (m + pp - 1) / m)")
    parser.add_argument("config", help="YAML config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override (repeatable)")
    parser.add_argument("--nproc", type=int, default=None, help="ranks (default: the config's world size)")
    parser.add_argument("--steps", type=int, default=None, help="override train.steps (>= 2)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds before the ranks are killed")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per rank (default: $OMP_NUM_THREADS if set, else cores // ranks, the "
                             "larger rank count of run and baseline when there is a baseline)")
    parser.add_argument("--baseline-set", dest="baseline_overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override applied after --set for a baseline run in the same invocation (repeatable)")
    parser.add_argument("--baseline-nproc", type=int, default=None,
                        help="ranks of the baseline (default: its config's world size); alone it also asks for one")
    parser.add_argument("--repeats", type=int, default=1,
                        help="baseline/run pairs, alternating (needs a baseline when > 1)")
    parser.add_argument("--json", metavar="PATH", default=None, help="write the results as JSON")
    parser.add_argument("--png", metavar="PATH", default=None,
                        help="with a baseline: plot every launch's step time and the per-rank split")


def threads_per_rank(requested: int | None, env: Mapping[str, str], cores: int, ranks: int) -> int:
    """--threads, else the caller's OMP_NUM_THREADS (the ranks would otherwise silently override it), else
    cores // ranks; ValueError on a value below 1 or an OMP_NUM_THREADS that is not an integer."""
    if requested is None and env.get("OMP_NUM_THREADS"):
        text = env["OMP_NUM_THREADS"]
        if not text.strip().isdigit():
            raise ValueError(f"OMP_NUM_THREADS={text!r}: must be a positive integer (or pass --threads)")
        requested = int(text)
        if requested < 1:
            raise ValueError(f"OMP_NUM_THREADS={text!r}: must be >= 1")
    elif requested is not None and requested < 1:
        raise ValueError(f"--threads {requested}: must be >= 1")
    return requested if requested is not None else max(1, cores // ranks)


@dataclass(frozen=True)
class Variant:
    """One measured configuration: the overrides applied after the config file (a baseline's after the run's),
    the config they give and its rank count."""
    overrides: list[str]
    cfg: Config
    nproc: int


def _variant(config: str, overrides: list, nproc: int | None, label: str) -> Variant:
    """``config`` + ``overrides`` on ``nproc`` ranks (None: its world size); ValueError on a rank count or step
    count the bench cannot use."""
    cfg = load_config(config, overrides)
    nproc = nproc or cfg.world_size
    if nproc != cfg.world_size:
        raise ValueError(f"{label}--nproc {nproc} but the config's dp*tp*pp*cp*wp = {cfg.world_size}")
    if cfg.train.steps < 2:
        raise ValueError(f"train.steps = {cfg.train.steps}: need >= 2 (the first step is warm-up)")
    check_unprofiled(cfg, "bench train", "trains in a temporary run directory (deleted, traces included) and times "
                     "every step", label)
    return Variant(overrides, cfg, nproc)


@dataclass(frozen=True)
class Plan:
    """What one ``dist-train bench train`` measures: the run, its baseline (None: the run alone), the launch
    order of the alternating repeats, the torch threads per rank and the cores the ranks share."""
    run: Variant
    baseline: Optional[Variant]
    order: list[str]
    threads: int
    cores: int


def check(args: argparse.Namespace) -> Plan:
    """The plan of ``args``; ValueError on a config, rank count, step count, ``--repeats``, ``--png`` or thread
    count the bench cannot use."""
    overrides = list(args.overrides) + ([f"train.steps={args.steps}"] if args.steps is not None else [])
    run = _variant(args.config, overrides, args.nproc, "")
    paired = bool(args.baseline_overrides) or args.baseline_nproc is not None
    order = alternation(args.repeats)  # ValueError on --repeats < 1
    if args.repeats > 1 and not paired:
        raise ValueError(f"--repeats {args.repeats}: needs a baseline (--baseline-set or --baseline-nproc)")
    if args.png and not paired:
        raise ValueError(f"--png {args.png}: plots a comparison; needs a baseline (--baseline-set or --baseline-nproc)")
    # a baseline set to pp=1 / fsdp=false takes the pipeline / FSDP2 keys' defaults, not the run's (unread there)
    baseline_sets = unread_reset_overrides(args.baseline_overrides) + list(args.baseline_overrides)
    baseline = _variant(args.config, overrides + baseline_sets, args.baseline_nproc, "baseline: ") if paired else None
    # a baseline gets the run's threads per rank: sized for the larger rank count of the two
    ranks = max(run.nproc, baseline.nproc) if baseline else run.nproc
    cores = os.cpu_count() or 1
    return Plan(run, baseline, order, threads_per_rank(args.threads, os.environ, cores, ranks), cores)

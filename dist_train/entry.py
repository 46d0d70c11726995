"""One rank of a job, in this process: the single entry point every launcher ends in.

    run_rank("configs/gpt_tiny.yaml", ["train.steps=10"])   # reads RANK/WORLD_SIZE/MASTER_* from os.environ
"""
from __future__ import annotations

import os
import sys
from os import PathLike
from typing import Callable

import torch
import torch.distributed as dist

from .checkpoint.storage import CheckpointError
from .config import check_world_size, load_config
from .distributed import DistContext, env_rank_info, init_distributed, share_cpu_threads
from .dryrun import show_layout
from .lifecycle import EXIT_FAILED, EXIT_USAGE, TrainingDiverged
from .preflight import PREFLIGHT_ENV, preflight
from .rank_errors import clear_user_errors, record_user_error, user_errors
from .runlock import RunDirLocked
from .trainer import train


def run_rank(config_path: str, overrides: list[str]) -> int:
    """Validate, initialise the process group, train; returns the process exit code."""
    cfg = load_config(config_path, overrides)
    rank, world, _ = env_rank_info()
    try:
        check_world_size(cfg, world)  # before any process group exists
    except ValueError as e:
        if world != 1:
            raise
        p = cfg.parallel
        one = [f"--set parallel.{a}=1" for a in ("dp", "tp", "pp", "cp") if getattr(p, a) > 1]
        one += ["--set parallel.wp=[1,1]"] if cfg.wp_grid != (1, 1) else []
        n = cfg.world_size
        raise ValueError(f"{e}: `dist-train run` without a launcher is one process; for one rank pass {' '.join(one)}, "
                         f"or start {n} ranks: dist-train launch CONFIG, torchrun --nproc-per-node {n} -m dist_train "
                         f"run CONFIG, or mpiexec -n {n} dist-train run CONFIG") from None
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if os.environ.get(PREFLIGHT_ENV) != "1":  # `dist-train launch` ran it once for all ranks
        preflight(cfg, on_cuda=torch.cuda.is_available(), ranks_per_host=local_ranks)
    share_cpu_threads(local_ranks)
    if rank == 0:
        clear_user_errors(cfg.run.dir)  # before the rendezvous: no peer can have failed yet
    ctx = init_distributed(cfg.launch.collective_timeout_s, bind=cfg.launch.bind)
    return run_reporting_errors(lambda: train(cfg, ctx).exit_code, ctx, cfg.run.dir)


def run_reporting_errors(work: Callable[[], int], ctx: DistContext, errors_dir: PathLike) -> int:
    """``work()`` on this rank (its exit status) with a failure turned into one line and an exit status: a
    collective decision said once by rank 0; bad input said by the rank that met it and recorded in ``errors_dir``
    for the peers, which then exit quietly (exit 2) instead of burying the line under collective tracebacks.
    Destroys the process group at the end."""
    try:
        return work()
    except (TrainingDiverged, CheckpointError, RunDirLocked) as e:
        # every rank raises the same one-line decision (agreed collectively): rank 0 says it, once
        if ctx.rank == 0:
            print(f"dist-train: error: {str(e).splitlines()[0]}", file=sys.stderr, flush=True)
        return getattr(e, "exit_code", EXIT_FAILED)
    except (ValueError, FileNotFoundError) as e:
        # bad input met by this rank after start-up (the CLI's exit-2 kinds): say it and record it for the
        # peers (they then exit quietly instead of burying the line under collective tracebacks)
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"dist-train: error: {message}", file=sys.stderr, flush=True)  # before the launcher kills us
        record_user_error(errors_dir, ctx.rank, message)
        return EXIT_USAGE
    except Exception:
        if ctx.world_size > 1 and set(user_errors(errors_dir)) - {ctx.rank}:
            return EXIT_USAGE  # our collective failed because a peer stopped on bad input and said so: quiet
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def dry_run(config_path: str, overrides: list[str]) -> int:
    """``launch --dry-run``: validate and print every rank's mesh coordinates, pipeline layers and memory
    estimate (dist_train/dryrun.py, dist_train/cost/) — no process group is created."""
    return show_layout(load_config(config_path, overrides))

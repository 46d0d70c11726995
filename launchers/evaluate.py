"""``dist-train eval``: pre-flight, then the config's ranks started here, each running
:func:`dist_train.checkpoint_eval.evaluate_checkpoint`; rank 0's result printed as one line (and written as JSON).

    eval_main(args) -> exit status       # args: dist_train.eval_arguments

The ranks run ``python -m dist_train eval CONFIG --set ... --checkpoint STEP_DIR`` with ``EVAL_RANK_ENV`` naming a
scratch directory (outside run.dir) for their logs, error records and rank 0's result: the run dir is only read,
and its lock is not taken (an evaluation never blocks, nor is blocked by, the job training there).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

from dist_train.atomic_write import write_text_atomic
from dist_train.checkpoint import compat
from dist_train.checkpoint import manifest as mf
from dist_train.checkpoint.manager import checkpoint_root, resume_candidates
from dist_train.checkpoint_eval import evaluate_checkpoint
from dist_train.config import Config, ConfigError, TrainConfig, check_world_size, load_config, parse_split
from dist_train.distributed import init_distributed, share_cpu_threads
from dist_train.entry import run_reporting_errors
from dist_train.eval_arguments import eval_overrides
from dist_train.preflight import check_data, check_engine, check_model_fits, check_model_shapes, verified_manifest
from launchers.cli import forwarded_env
from launchers.local import LocalBackend
from launchers.supervisor import JobSpec, Supervisor

#: set in every eval rank's environment: the scratch directory of this evaluation (its presence makes the process
#: a rank rather than the launcher)
EVAL_RANK_ENV = "DIST_TRAIN_EVAL_RANK"
RESULT_FILE = "result.json"


def load_eval_config(config: str, user_overrides: list[str], overrides: list[str]) -> Config:
    """The config as the ranks load it (``overrides``: :func:`eval_overrides`). A config that has no held-out data
    is refused naming this command's ways to give it, not the validation schedule it never asked for."""
    try:
        return load_config(config, overrides)
    except ConfigError as e:
        try:
            # validation off (eval_steps at its default, as the config then wants it) shows the data as configured
            plain = load_config(config, [*user_overrides, "train.eval_every=0",
                                         f"train.eval_steps={TrainConfig().eval_steps}"])
        except ValueError:
            raise e from None
        d = plain.data
        if d.source == "indexed" and d.valid_path is None and (d.split is None or parse_split(d.split)[1] <= 0):
            raise ConfigError(f"{config}: no held-out data to evaluate on (data.valid_path unset, data.split "
                              f"{d.split!r} has no validation share): give --data PREFIX (an indexed dataset) or "
                              "--set data.split=98,2,0 (the validation share of data.path)") from None
        raise


def choose_checkpoint(cfg: Config, requested: Optional[str]) -> Path:
    """The checkpoint to evaluate, as ``checkpoint.resume`` resolves one (``latest`` is its ``auto``), newest
    first past damaged ones (``requested`` None: the run's newest, or before its first save what checkpoint.resume
    names); verified (manifest, sizes, small files' checksums) and of this config's model.
    Raises ConfigError (one line)."""
    root = checkpoint_root(cfg.checkpoint, cfg.run.dir)
    # by default what a restart of the run resumes: its own newest once it has one, else what checkpoint.resume names
    configured = "auto" if mf.list_checkpoints(root) else cfg.checkpoint.resume
    wanted = requested or (configured if configured not in ("auto", "none") else "latest")
    mode = "auto" if wanted == "latest" else wanted
    try:
        candidates, _ = resume_candidates(mode, root)
    except ValueError as e:
        raise ConfigError(str(e).replace("checkpoint.resume = ", "--checkpoint ", 1)) from None
    if not candidates:
        raise ConfigError(f"--checkpoint {wanted}: no step_N checkpoint under {root} (train first, or give --checkpoint "
                          "PATH: a step_N directory, a directory of them, or latest)")
    problems = []
    for ckpt in candidates:
        body, problem = verified_manifest(ckpt)
        if body is None:
            problems.append(f"{ckpt.name}: {problem}")
            continue
        check_model_shapes(cfg, ckpt, body)
        try:  # the model keys that change the function without changing a shape (rope_theta, norm_eps, ...)
            compat.check_config(ckpt, {"model": (body.get("config") or {}).get("model") or {}},
                                {"model": cfg.to_dict()["model"]}, cfg.checkpoint.allow_config_change)
        except compat.ResumeMismatchError as e:
            raise ConfigError(str(e).replace("resume refused", "evaluation refused", 1)) from None
        return ckpt.resolve()
    raise ConfigError(f"--checkpoint {wanted}: every checkpoint is damaged ({' | '.join(problems)})")


def eval_preflight(cfg: Config, requested: Optional[str], on_cuda: bool) -> Path:
    """The launch pre-flight's checks that apply to an evaluation (no directory is written, so none must be
    writable) and the checkpoint -> the step directory to evaluate. Raises ConfigError (one line)."""
    check_world_size(cfg, cfg.world_size)
    check_model_fits(cfg, on_cuda, ranks_per_host=cfg.world_size)
    check_engine(cfg, on_cuda)
    check_data(cfg)  # includes the held-out data: there, and enough samples for train.eval_steps batches
    return choose_checkpoint(cfg, requested)


def summary_line(result: dict) -> str:
    """The one line rank 0's result is shown as."""
    ppl = result["perplexity"]
    shown = "" if ppl is None else f" | perplexity {ppl:.4g}" if math.isfinite(ppl) else " | perplexity inf"
    return (f"eval {result['checkpoint']} (step {result['step']}): loss {result['loss']:.6f}{shown} | "
            f"{result['count']:,.0f} {result['count_unit']} in {result['batches']} batch(es) | "
            f"{result['world_size']} rank(s) | {result['time_s']:.2f} s")


def eval_main(args: argparse.Namespace) -> int:
    scratch = os.environ.get(EVAL_RANK_ENV)
    if scratch:
        return eval_rank(args, Path(scratch))
    overrides = eval_overrides(list(args.set or []), args.data, args.batches)
    cfg = load_eval_config(args.config, list(args.set or []), overrides)
    on_cuda = torch.cuda.is_available()
    ckpt = eval_preflight(cfg, args.checkpoint, on_cuda)
    nproc = cfg.world_size
    scratch_dir = Path(tempfile.mkdtemp(prefix="dist-train-eval-"))
    try:
        argv = [sys.executable, "-m", "dist_train", "eval", args.config, "--checkpoint", str(ckpt)]
        for item in overrides:
            argv += ["--set", item]
        spec = JobSpec(argv=argv, nproc=nproc, run_dir=scratch_dir, max_restarts=0, watchdog_s=0.0,
                       collective_timeout_s=cfg.launch.collective_timeout_s,
                       env={**forwarded_env(), EVAL_RANK_ENV: str(scratch_dir)})
        code = Supervisor(spec, LocalBackend(nproc, scratch_dir)).run()
        if code != 0:
            return code
        result = json.loads((scratch_dir / RESULT_FILE).read_text())
    finally:
        shutil.rmtree(scratch_dir, ignore_errors=True)
    print(summary_line(result), flush=True)
    if args.out:
        write_text_atomic(args.out, json.dumps(result, indent=2) + "\n")
    return 0


def eval_rank(args: argparse.Namespace, scratch: Path) -> int:
    """One rank started by :func:`eval_main` (the config and checkpoint already checked there)."""
    cfg = load_config(args.config, list(args.set or []))
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", cfg.world_size))
    share_cpu_threads(local_ranks)
    ctx = init_distributed(cfg.launch.collective_timeout_s, bind=cfg.launch.bind)

    def evaluate() -> int:
        result = evaluate_checkpoint(cfg, Path(args.checkpoint), ctx)
        if ctx.rank == 0:
            write_text_atomic(scratch / RESULT_FILE, json.dumps(result))
        return 0

    # e.g. a checkpoint pruned or changed since the pre-flight (one line; its peers quiet), damaged shards (the
    # pre-flight checks the small files only): one line; the ranks' error records go to the scratch dir
    return run_reporting_errors(evaluate, ctx, scratch)

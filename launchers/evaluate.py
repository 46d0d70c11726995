"""``dist-train eval``: pre-flight, then the config's ranks, each running
:func:`dist_train.checkpoint_eval.evaluate_checkpoint`; rank 0's result printed as one line (and written as JSON).

    eval_main(args) -> exit status       # args: launchers.arguments.add_eval_arguments

The ranks start as ``dist-train launch`` starts them (``launch_settings`` and ``build_backend``: local, mpi or Ray,
the same rank count, nodes and GPUs), once (no restarts, no watchdog). Each runs ``python -m dist_train eval CONFIG
--set ... --checkpoint STEP_DIR`` with ``EVAL_RANK_ENV`` naming a scratch directory (outside run.dir) for their logs,
error records and rank 0's result: the run dir is only read, and its lock is not taken (an evaluation never blocks,
nor is blocked by, the job training there). Rank 0's result reaches the launcher as a file in that directory, or,
under Ray (whose rank 0 may run on another node), as a line on its stdout (``RESULT_MARKER``) kept off the console.

A rank given ``--out`` has no launcher above it (``dist-train submit --eval``: srun/mpiexec started it): rank 0
then writes the JSON and prints the one line itself.
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

from dist_train.atomic_write import write_text_atomic
from dist_train.checkpoint_eval import evaluate_checkpoint
from dist_train.config import load_config
from dist_train.distributed import init_distributed, share_cpu_threads
from dist_train.entry import run_reporting_errors
from dist_train.eval_arguments import EVAL_RANK_ENV, eval_overrides
from dist_train.eval_preflight import check_out_path, eval_preflight, load_eval_config
from launchers.cli import build_backend, forwarded_env, launch_settings, ranks_on_cuda, supervise
from launchers.env import populate_rank_env
from launchers.procs import ConsoleSink, Sink, rank_prefix
from launchers.supervisor import JobSpec

RESULT_FILE = "result.json"
#: set (to 1) in a Ray eval's ranks: rank 0 also prints its result on stdout, after this marker, for the launcher
ECHO_ENV = "DIST_TRAIN_EVAL_ECHO"
RESULT_MARKER = "dist-train eval result: "


class ResultSink:
    """The ranks' console lines, passed on to ``console``, except rank 0's result line (``RESULT_MARKER``), kept in
    ``result`` instead."""

    def __init__(self, console: Optional[Sink] = None):
        self.console = console or ConsoleSink()
        self.result: Optional[dict] = None

    def __call__(self, stream: str, text: str) -> None:
        line = text.removeprefix(rank_prefix(0))
        if stream == "stdout" and line.startswith(RESULT_MARKER):
            self.result = json.loads(line[len(RESULT_MARKER):])
        else:
            self.console(stream, text)


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
    if args.out:
        check_out_path(args.out)
    backend, nproc, nodes, gpus, _ = launch_settings(cfg, args)  # launch.max_restarts unread: never restarted
    # here even for Ray ranks on other nodes (launch leaves its pre-flight to them): the checkpoint is chosen here, so
    # this machine must see what the ranks read (a shared file system, as `ray job submit` on the head node has)
    ckpt = eval_preflight(cfg, args.checkpoint, ranks_on_cuda(backend, gpus), max(1, nproc // max(1, nodes)))
    scratch_dir = Path(tempfile.mkdtemp(prefix="dist-train-eval-"))
    sink = ResultSink()
    try:
        argv = [sys.executable, "-m", "dist_train", "eval", args.config, "--checkpoint", str(ckpt)]
        for item in overrides:
            argv += ["--set", item]
        env = {**forwarded_env(), EVAL_RANK_ENV: str(scratch_dir), **({ECHO_ENV: "1"} if backend == "ray" else {})}
        spec = JobSpec(argv=argv, nproc=nproc, run_dir=scratch_dir, max_restarts=0, watchdog_s=0.0,
                       collective_timeout_s=cfg.launch.collective_timeout_s, env=env, checkpoints_on_stop=False)
        be = build_backend(backend, nproc, scratch_dir, args.address or cfg.launch.address, nodes, gpus,
                           cfg.launch.placement_timeout_s, sink=sink)
        code = supervise(spec, be)
        if code != 0:
            return code
        result = sink.result or json.loads((scratch_dir / RESULT_FILE).read_text())
    finally:
        shutil.rmtree(scratch_dir, ignore_errors=True)
    report(result, args.out)
    return 0


def report(result: dict, out: Optional[str]) -> None:
    """The result as one line on stdout and, with ``out``, as a JSON file (temp + rename)."""
    print(summary_line(result), flush=True)
    if result.get("input_normalisation_note"):
        print(f"eval: {result['input_normalisation_note']}", file=sys.stderr, flush=True)
    if out:
        write_text_atomic(out, json.dumps(result, indent=2) + "\n")


def eval_rank(args: argparse.Namespace, scratch: Path) -> int:
    """One rank started by :func:`eval_main`, or by a batch script's srun/mpiexec (``args.out`` given: rank 0
    reports); the config and checkpoint already checked there."""
    populate_rank_env()  # mpiexec / srun: RANK, WORLD_SIZE, MASTER_* from their variables
    cfg = load_config(args.config, list(args.set or []))
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", cfg.world_size))
    share_cpu_threads(local_ranks)
    ctx = init_distributed(cfg.launch.collective_timeout_s, bind=cfg.launch.bind)

    def evaluate() -> int:
        result = evaluate_checkpoint(cfg, Path(args.checkpoint), ctx)
        if ctx.rank == 0:
            if os.environ.get(ECHO_ENV) == "1":  # Ray: this node's files may not be the launcher's
                print(RESULT_MARKER + json.dumps(result), flush=True)
            elif args.out:  # no launcher above this rank
                report(result, args.out)
            else:
                write_text_atomic(scratch / RESULT_FILE, json.dumps(result))
        return 0

    # e.g. a checkpoint pruned or changed since the pre-flight (one line; its peers quiet), damaged shards (the
    # pre-flight checks the small files only): one line; the ranks' error records go to the scratch dir
    return run_reporting_errors(evaluate, ctx, scratch)

"""Launch latency: seconds from the ``dist-train launch`` command to the first finished training step,
per backend (local, embedded Ray, mpi), and the cost of a restart after a killed rank.

First step = ``first_step_time`` in rank 0's heartbeat (``dist_train.lifecycle``: written the moment
step 1 finishes). Restart cost = from the launcher noticing the dead rank (``attempt_end`` in
``logs/launcher.jsonl``) to the first step of the restarted attempt (incl. teardown, process start,
rendezvous and checkpoint load). Each backend runs in a fresh subprocess and run dir, ``--repeats``
times; medians are reported.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from ..config import own_checkpoint_overrides


def _first_step_time(run_dir: Path, attempt: int) -> Optional[float]:
    try:
        hb = json.loads((run_dir / "heartbeats" / "rank_0.json").read_text())
    except (OSError, ValueError):
        return None
    return hb.get("first_step_time") if hb.get("attempt") == attempt else None


def _one_run(args: argparse.Namespace, backend: str, work: Path, fault: bool) -> dict:
    run_dir = work / f"{backend}{'_restart' if fault else ''}_{time.time_ns()}"
    steps = max(args.steps, 4) if fault else args.steps
    sets = [*args.set, f"run.dir={run_dir}", f"train.steps={steps}", "train.progress=false",
            *own_checkpoint_overrides(run_dir)]
    cmd = [sys.executable, "-m", "dist_train", "launch", args.config, "--backend", backend, "--nproc",
           str(args.nproc), *(a for s in sets for a in ("--set", s))]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIST_TRAIN_FAULT")}
    if fault:
        cmd += ["--max-restarts", "1", "--set", "checkpoint.every=1"]
        env["DIST_TRAIN_FAULT"] = f"rank={args.nproc - 1},step=2,signal=KILL"
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first: dict[int, float] = {}
    while proc.poll() is None:
        for attempt in (0, 1) if fault else (0,):
            if attempt not in first and (t := _first_step_time(run_dir, attempt)) is not None:
                first[attempt] = t
        time.sleep(0.02)
    err = proc.stderr.read() if proc.stderr else ""
    total = time.time() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"bench launch {backend}: exit {proc.returncode}: {err.strip().splitlines()[-5:]}")
    out = {"backend": backend, "to_first_step_s": first[0] - t0 if 0 in first else None, "total_s": total}
    if fault:
        events = [json.loads(x) for x in (run_dir / "logs" / "launcher.jsonl").read_text().splitlines()]
        failed = next(e["time"] for e in events if e["event"] == "attempt_end" and e["attempt"] == 0)
        out["restart_s"] = first[1] - failed if 1 in first else None
    return out


def _median(values: list) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def run(args: argparse.Namespace, checked: None) -> int:
    """``checked``: dist_train.bench.cli.launch.check hands nothing on (the arguments carry it all)."""
    results = []
    with tempfile.TemporaryDirectory(prefix="dt_bench_launch_") as tmp:
        for backend in args.backends:
            runs = [_one_run(args, backend, Path(tmp), fault=False) for _ in range(args.repeats)]
            row = {"backend": backend, "to_first_step_s": _median([r["to_first_step_s"] for r in runs]),
                   "total_s": _median([r["total_s"] for r in runs]), "runs": runs}
            if not args.no_restart:
                faults = [_one_run(args, backend, Path(tmp), fault=True) for _ in range(args.repeats)]
                row["restart_s"] = _median([r["restart_s"] for r in faults])
                row["restart_runs"] = faults
            results.append(row)
    base = next((r["to_first_step_s"] for r in results if r["backend"] == "local"), None)
    print(f"launch latency, {args.nproc} ranks, {args.steps} steps, median of {args.repeats} "
          f"(first step = rank 0's first heartbeat)")
    print(f"{'backend':8} {'to 1st step s':>14} {'vs local':>9} {'total s':>9} {'restart s':>10}")
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    for r in results:
        ratio = (f"{r['to_first_step_s'] / base:.2f}x" if base and r["to_first_step_s"] is not None else "-")
        print(f"{r['backend']:8} {fmt(r['to_first_step_s']):>14} {ratio:>9} {fmt(r['total_s']):>9} "
              f"{fmt(r.get('restart_s')):>10}")
    if args.json:
        Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "nproc": args.nproc,
                                               "steps": args.steps, "results": results}, indent=2))
    return 0

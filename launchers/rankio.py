"""Per-rank I/O wrapper for launchers we do not control (``mpiexec``, ``srun``)::

    mpiexec -n 4 python -m launchers.rankio --log-dir RUN/logs -- python -m dist_train run CONFIG ...

It runs the command as a child, prefixes every console line with ``[rank N]`` (N from the launcher's
environment, see ``launchers.env``), appends the child's raw stderr to ``RUN/logs/rank_N.stderr``,
forwards SIGTERM / SIGUSR1 (SIGINT as SIGTERM) to it, and records its status in ``RUN/logs/rank_N.exit``.

A child that exits ``EXIT_PREEMPTED`` makes the wrapper exit 0 by default: MPI process managers kill
every other rank as soon as one exits non-zero, which would interrupt the others' preemption checkpoint.
The status file still says 75, and ``dist-train launch --backend mpi`` reads it from there. Batch scripts
pass ``--preempted-exit 75`` (``srun`` waits for every task) so the script itself sees the status.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from dist_train.atomic_write import write_text_atomic
from dist_train.lifecycle import EXIT_PREEMPTED, current_attempt, exit_code_for_signal, kill_me_with_parent
from launchers.env import detect_rank_env
from launchers.procs import ConsoleSink, RankProcess


def exit_status_path(log_dir: Path, rank: int) -> Path:
    return Path(log_dir) / f"rank_{rank}.exit"


def read_exit_status(log_dir: Path, rank: int, attempt: int):
    """The code a wrapped rank ended with in ``attempt`` (Popen convention), or None."""
    try:
        data = json.loads(exit_status_path(log_dir, rank).read_text())
    except (OSError, ValueError):
        return None
    return data["code"] if data.get("attempt") == attempt else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launchers.rankio", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-dir", required=True, help="where rank_N.stderr and rank_N.exit go")
    parser.add_argument("--preempted-exit", type=int, default=0, metavar="N",
                        help="own exit status when the rank exits EXIT_PREEMPTED (default 0, see above; "
                             "batch scripts use 75 so that they can requeue)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- the per-rank command")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command after --")
    # die with the process manager that started this wrapper (mpiexec, srun's step daemon), and the rank with it
    # (RankProcess): a SIGKILLed `dist-train launch --backend mpi` took mpiexec along but left every rank training.
    # A process manager gone before this line (while this interpreter started) is not noticed.
    kill_me_with_parent()
    rank = detect_rank_env(os.environ).rank
    attempt = current_attempt()
    child = RankProcess(command, rank, dict(os.environ), ConsoleSink(), log_dir=Path(args.log_dir),
                        attempt=attempt, pass_fds=True)

    def forward(signum: int, frame: object) -> None:
        child.send_signal(signal.SIGTERM if signum == signal.SIGINT else signum)

    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, forward)
    code = child.wait()  # signal handlers run in between (PEP 475 retries the wait)
    child.close()
    path = exit_status_path(Path(args.log_dir), rank)
    write_text_atomic(path, json.dumps({"rank": rank, "attempt": attempt, "code": code, "time": time.time()}))
    if code == EXIT_PREEMPTED:
        return args.preempted_exit
    return exit_code_for_signal(-code) if code < 0 else code


if __name__ == "__main__":
    sys.exit(main())

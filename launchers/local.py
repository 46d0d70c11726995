"""``--backend local``: every rank a subprocess of the launcher on this machine (like torchrun
``--standalone``). The launcher picks a free port; rank 0 hosts the TCP store on 127.0.0.1."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

from dist_train.loopback import loopback_environment
from launchers.env import free_port
from launchers.procs import ConsoleSink, RankProcess, Sink
from launchers.supervisor import RankProgress, progress_from_heartbeats


def rank_environment(base: dict[str, str], rank: int, world_size: int, local_rank: int, local_world_size: int,
                     master_addr: str, master_port: int, extra: dict[str, str]) -> dict[str, str]:
    """The environment of one rank: the launcher's, the torch.distributed variables, ``extra``."""
    env = dict(base)
    env.update(extra)
    env.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(local_rank),
                "LOCAL_WORLD_SIZE": str(local_world_size), "MASTER_ADDR": master_addr,
                "MASTER_PORT": str(master_port), "PYTHONUNBUFFERED": "1"})
    return env


class LocalAttempt:
    """All ranks of one attempt as local subprocesses."""

    def __init__(self, ranks: list[RankProcess], run_dir: Path, attempt: int, started: float):
        self.ranks, self.run_dir, self.attempt, self.started = ranks, run_dir, attempt, started
        self.world_size = len(ranks)

    def poll(self) -> list[Optional[int]]:
        return [r.poll() for r in self.ranks]

    def progress(self) -> dict[int, RankProgress]:
        return progress_from_heartbeats(self.run_dir, range(self.world_size), self.attempt, self.started)

    def send_signal(self, sig: int) -> None:
        for r in self.ranks:
            if r.proc.poll() is None:
                r.send_signal(sig)

    def kill(self) -> None:
        for r in self.ranks:
            r.kill()

    def tail(self, rank: int) -> list[str]:
        return list(self.ranks[rank].tail)

    def close(self) -> None:
        for r in self.ranks:
            r.close()


class LocalBackend:
    """Start ``nproc`` ranks here. ``sink`` receives the prefixed console lines (default: our console)."""

    name = "local"

    def __init__(self, nproc: int, run_dir: Path, sink: Optional[Sink] = None, cwd: Optional[str] = None):
        if nproc < 1:
            raise ValueError(f"--nproc {nproc}: the local backend needs at least 1 rank")
        self.nproc, self.run_dir, self.cwd = nproc, Path(run_dir), cwd
        self.sink = sink or ConsoleSink()

    def start(self, argv: list[str], env: dict[str, str], attempt: int) -> LocalAttempt:
        port = free_port("127.0.0.1")  # a fresh port per attempt: the old store may linger in TIME_WAIT
        started = time.time()
        base = {k: v for k, v in os.environ.items()}
        ranks: list[RankProcess] = []
        try:
            for r in range(self.nproc):
                env_r = rank_environment(base, r, self.nproc, r, self.nproc, "127.0.0.1", port,
                                         {**loopback_environment(base), **env})
                ranks.append(RankProcess(argv, r, env_r, self.sink, log_dir=self.run_dir / "logs", attempt=attempt,
                                         cwd=self.cwd))
        except BaseException:
            for p in ranks:  # e.g. the command does not exist: no half-started job may survive
                p.close()
            raise
        return LocalAttempt(ranks, self.run_dir, attempt, started)

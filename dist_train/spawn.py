"""Spawn P gloo ranks on this machine and run one function on each (tests and benchmarks).

    results = run_ranks(my_case_fn, world_size=3, args=(cfg,), timeout=120)

* Rendezvous is a file in a fresh temp dir (no fixed ports, so parallel test runs never collide).
* Each rank runs with one torch thread, so P ranks fit on a 2-core machine.
* ``fn(rank, world_size, *args)`` runs after ``dist.init_process_group`` on the default (gloo) group
  and must be importable by name (a module-level function): it is pickled by reference.
  It should assert; an exception on any rank fails the test with that rank's traceback.
* Its return value (picklable) comes back in ``results[rank]``.
* A hard timeout kills every rank and names the ranks that had not finished.

Ranks are forked by a fork server that imported torch and the trainer once (``PRELOAD``), so a rank
starts in a fraction of a second instead of the seconds a spawned rank spends importing them; each rank
takes the caller's current environment and directory, as a spawned one would. Still, put many cases
into one rank function: every call pays for its ranks' process group and its test module's import.
tests/dist_harness.py re-exports :func:`run_ranks` for the test suite.
"""
from __future__ import annotations

import multiprocessing as mp
from multiprocessing import forkserver
import os
import queue
import tempfile
import traceback
from datetime import timedelta
from typing import Any, Callable, Sequence

from .lifecycle import kill_me_with_parent


def _rank_main(fn: Callable, rank: int, world_size: int, init_file: str, args: Sequence[Any],
               out: "mp.Queue", timeout_s: float, environ: dict[str, str], cwd: str) -> None:
    # A forked rank inherits the fork server's environment and directory, as they were when it started:
    # take the caller's, as they are now (what a spawned rank would get).
    os.environ.clear()
    os.environ.update(environ)
    os.environ["OMP_NUM_THREADS"] = "1"
    os.chdir(cwd)
    # A forked rank inherits the write end of the pipe whose closing tells the fork server that its caller
    # is gone: leave it to the caller alone, so that a killed test or `dist-train bench` stops the server,
    # whose exit kills its ranks (PR_SET_PDEATHSIG), as spawned ranks died with their caller.
    server = forkserver._forkserver
    if server._forkserver_alive_fd is not None:
        os.close(server._forkserver_alive_fd)
        server._forkserver_alive_fd = None
    kill_me_with_parent()
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=timeout_s))
        result = fn(rank, world_size, *args)
        dist.barrier()
        out.put((rank, True, result))
    except BaseException:  # noqa: BLE001 - the parent reports it
        out.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# Imported once by the fork server; every rank forked from it starts with them loaded instead of spending
# seconds importing torch (and the trainer) again, as a spawned rank does.
PRELOAD = ["torch", "torch.distributed", "dist_train.trainer"]


class RankFailure(AssertionError):
    """A spawned rank raised, died or hung. (An AssertionError, so pytest reports it as a failed check.)"""


def run_ranks(fn: Callable, world_size: int, args: Sequence[Any] = (), timeout: float = 180.0) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned gloo ranks; return per-rank results."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    out: mp.Queue = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="dt_rdzv_") as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_rank_main, args=(fn, r, world_size, init_file, tuple(args), out, timeout,
                                                         dict(os.environ), os.getcwd()),
                             daemon=True) for r in range(world_size)]
        for p in procs:
            p.start()
        results: dict[int, Any] = {}
        failures: dict[int, str] = {}
        import time

        deadline = time.monotonic() + timeout
        while len(results) + len(failures) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                rank, ok, payload = out.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs)
                        if not p.is_alive() and p.exitcode not in (0, None)
                        and r not in results and r not in failures]
                for r in dead:
                    failures[r] = f"rank {r} died with exit code {procs[r].exitcode}"
                continue
            (results if ok else failures)[rank] = payload
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
        if failures:
            first = min(failures)
            raise RankFailure(f"{len(failures)} of {world_size} ranks failed; rank {first}:\n{failures[first]}")
        missing = [r for r in range(world_size) if r not in results]
        if missing:
            raise RankFailure(f"timeout after {timeout:.0f}s: ranks {missing} of {world_size} did not finish")
        return [results[r] for r in range(world_size)]

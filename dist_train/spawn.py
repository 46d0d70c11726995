"""Start P ranks on this machine and run one function on each (tests and benchmarks).

    results = run_ranks(my_case_fn, world_size=3, args=(cfg,), timeout=120)
    results = run_ranks(train_one_rank, 1, args=(...), threads=2, process_group=False, fresh=True)  # `bench train`

* Rendezvous is a file in a fresh temp dir (no fixed ports, so parallel test runs never collide).
* Each rank runs with ``threads`` torch threads (default one, so P ranks fit on a 2-core machine); its
  environment is the caller's plus ``OMP_NUM_THREADS`` and torchrun's ``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, its directory the caller's.
* ``fn(rank, world_size, *args)`` runs after ``dist.init_process_group`` on the default (gloo) group, or
  with no process group at all when ``process_group=False`` (a 1-rank run measured as it runs alone), and
  must be importable by name (a module-level function): it is pickled by reference.
  It should assert; an exception on any rank fails the run with that rank's traceback.
* Its return value (picklable) comes back in ``results[rank]``.
* The first rank that raises or dies stops the others (they would only wait in a collective for it);
  a hard timeout kills every rank and names the ranks that had not finished. Either raises RankFailure.

Ranks are forked by a fork server that imported torch and the trainer once (``PRELOAD``, more with
:func:`preload_in_fork_server`), so a rank starts in a fraction of a second instead of the seconds a spawned
rank spends importing them. ``fresh=True`` spawns a new interpreter per rank instead, as a launcher starts one:
what a benchmark measures (peak resident memory, thread pools) is then not shaped by the fork server's. Still,
put many cases into one rank function: every call pays for its ranks' process group and its test module's import.
tests/dist_harness.py re-exports :func:`run_ranks` for the test suite.
"""
from __future__ import annotations

import gc
import multiprocessing as mp
import os
import pickle
import queue
import tempfile
import time
import traceback
from datetime import timedelta
from multiprocessing import forkserver, reduction
from typing import Any, Callable, Sequence

from .lifecycle import describe_exit, kill_me_with_parent
from .loopback import loopback_environment


class _CallerFd:
    """The caller's file descriptor ``fd`` as it is when a rank starts, handed to the rank (pickled while the
    rank starts, it travels as an inherited descriptor; unpickled, it is that descriptor's number)."""

    def __init__(self, fd: int):
        self.fd = fd

    def __reduce__(self) -> tuple[Callable[[Any], int], tuple[Any]]:
        return _inherited_fd, (reduction.DupFd(self.fd),)


def _inherited_fd(dup: Any) -> int:
    """The descriptor number a ``reduction.DupFd`` handle has in the rank (its context's own ``_DupFd``)."""
    return dup.detach()


def _rank_main(job: bytes, rank: int, world_size: int, init_file: str, out: "mp.Queue", timeout_s: float,
               threads: int, process_group: bool, environ: dict[str, str], cwd: str, stdio: tuple[int, int],
               parent_pid: int) -> None:
    """``job``: the pickled ``(fn, args)``, unpickled only after this rank's set-up, since unpickling imports
    fn's module (a test module, its imports): a caller killed meanwhile would leave the rank behind.
    ``stdio``: the caller's stdout and stderr (see :class:`_CallerFd`); ``parent_pid``: the process that
    starts the rank (the fork server, or the caller when spawned)."""
    # A forked rank inherits the fork server's stdout/stderr, environment and directory, as they were when
    # it started (under pytest: the first test's captured output): take the caller's, as they are now (what
    # a spawned rank would get).
    for target, fd in zip((1, 2), stdio):
        if fd != target:
            os.dup2(fd, target)
            os.close(fd)
    os.environ.clear()
    os.environ.update(environ)
    os.environ.update({"OMP_NUM_THREADS": str(threads), "RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "LOCAL_RANK": str(rank)})
    os.chdir(cwd)
    # A forked rank inherits the write end of the pipe whose closing tells the fork server that its caller
    # is gone: leave it to the caller alone, so that a killed test or `dist-train bench` stops the server,
    # whose exit kills its ranks (PR_SET_PDEATHSIG), as spawned ranks died with their caller.
    server = forkserver._forkserver
    if server._forkserver_alive_fd is not None:
        os.close(server._forkserver_alive_fd)
        server._forkserver_alive_fd = None
    # a parent gone before this line (the rank read its job, imported __main__ meanwhile) sends no signal
    kill_me_with_parent(parent_pid)
    # torch only now: a fresh (spawned) rank has its thread count in the environment before torch reads it (a
    # forked rank has torch already, from the fork server's PRELOAD)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    # What the rank holds now (a forked rank: the fork server's whole heap, torch, the trainer, the preloaded engines,
    # ~400k objects) lives as long as the rank: frozen, as a dist-train rank freezes its imports
    # (cli.import_command_module), so that a full collection examines only what the rank made since. DeepSpeed's ZeRO-3
    # set-up runs one (its defragment), the collector its own oldest-generation passes: 0.25-0.4 s each here, ~0 frozen.
    # A train() in the rank then leaves its own freeze in place, as in a dist-train rank (gc_schedule.close): the
    # parameter-offload test's 7 runs in one rank grew its RSS by 76-84 MiB with this freeze, 81-89 MiB without.
    gc.freeze()
    try:
        fn, args = pickle.loads(job)
        if process_group:
            dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                    world_size=world_size, timeout=timedelta(seconds=timeout_s))
        result = fn(rank, world_size, *args)
        if process_group:
            dist.barrier()
        out.put((rank, True, result))
    except BaseException:  # noqa: BLE001 - the parent reports it
        out.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# Imported once by the fork server; every rank forked from it starts with them loaded instead of spending
# seconds importing torch (and the trainer) again, as a spawned rank does. The pipeline engine imports
# torch.distributed.pipelining (and with it torch._dynamo) only in a pipeline rank: preloaded for those.
PRELOAD = ["torch", "torch.distributed", "dist_train.trainer", "torch.distributed.pipelining"]


def preload_in_fork_server(*modules: str) -> None:
    """Have the fork server import ``modules`` too, besides :data:`PRELOAD`, when it starts (the server is
    started once per process, by the first ``run_ranks``: call this before it). A rank unpickles its function
    by importing the function's module; what that module imports and the server already has costs the rank
    nothing. The test suite (tests/conftest.py) preloads pytest and its helpers: each test module's ranks
    imported them again, on every call. A module that is not importable is skipped (the fork server's rule)."""
    PRELOAD.extend(m for m in modules if m not in PRELOAD)


class RankFailure(AssertionError):
    """A rank raised, died or hung. (An AssertionError, so pytest reports it as a failed check.)"""


def _stop(procs: list, kill: bool) -> None:
    """Join the ranks; ``kill``: at once (a failure or a timeout), else only the ones not gone within 5 s."""
    for p in procs:
        if kill and p.is_alive():
            p.kill()
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)


def run_ranks(fn: Callable, world_size: int, args: Sequence[Any] = (), timeout: float = 180.0, threads: int = 1,
              process_group: bool = True, fresh: bool = False) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` ranks with ``threads`` torch threads each, in one
    gloo group unless ``process_group`` is False, forked by the fork server (``fresh``: spawned); return the
    per-rank results. RankFailure names the first rank that raised (with its traceback) or died, or on
    ``timeout`` the ranks still running."""
    if fresh:
        ctx, parent_pid = mp.get_context("spawn"), os.getpid()
    else:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        forkserver.ensure_running()
        parent_pid = forkserver._forkserver._forkserver_pid
    out: mp.Queue = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="dt_rdzv_") as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        job = pickle.dumps((fn, tuple(args)))
        procs = [ctx.Process(target=_rank_main, args=(job, r, world_size, init_file, out, timeout, threads,
                                                      process_group, {**os.environ, **loopback_environment()},
                                                      os.getcwd(),
                                                      (_CallerFd(1), _CallerFd(2)), parent_pid), daemon=True)
                 for r in range(world_size)]
        for p in procs:
            p.start()
        results: dict[int, Any] = {}
        failures: dict[int, str] = {}  # in the order they were seen: the first is the cause, the rest its echo
        deadline = time.monotonic() + timeout
        done = False
        try:
            while len(results) < world_size and not failures:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    rank, ok, payload = out.get(timeout=min(remaining, 1.0))
                except queue.Empty:
                    for r, p in enumerate(procs):
                        if not p.is_alive() and p.exitcode not in (0, None) and r not in results:
                            failures.setdefault(r, f"rank {r} died: {describe_exit(p.exitcode)}")
                    continue
                (results if ok else failures)[rank] = payload
            if failures:  # collect what the others reported meanwhile (their echo of the first failure)
                while True:
                    try:
                        rank, ok, payload = out.get(timeout=0.2)
                    except queue.Empty:
                        break
                    if not ok:
                        failures.setdefault(rank, payload)
            done = len(results) == world_size
        finally:
            _stop(procs, kill=not done)
    if failures:
        first, *others = failures
        also = f" (then ranks {sorted(others)})" if others else ""
        stopped = "; the other ranks were stopped" if world_size > 1 else ""
        raise RankFailure(f"rank {first} of {world_size} failed{also}{stopped}:\n{failures[first]}")
    missing = [r for r in range(world_size) if r not in results]
    if missing:
        raise RankFailure(f"timeout after {timeout:.0f}s: ranks {missing} of {world_size} did not finish")
    return [results[r] for r in range(world_size)]

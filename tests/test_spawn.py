"""dist_train.spawn: ranks started by a test or a benchmark never outlive their parent; the first rank that
fails is named with its traceback and stops the others; threads, environment and the optional process group."""
import gc
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import torch.distributed as dist

from dist_train.spawn import RankFailure, run_ranks

REPO = Path(__file__).resolve().parents[1]
PARENT = """
import sys, time
from dist_train.spawn import run_ranks
from tests.spawn_sleeper import sleep_forever
run_ranks(sleep_forever, 2, args=(sys.argv[2],), timeout=600, fresh=sys.argv[1] == "fresh")
"""


def rank_1_breaks(rank, world_size):
    if rank == 1:
        raise ValueError("rank one is broken")
    dist.barrier()  # waits for rank 1 until the group's timeout: only being stopped ends it early


def say(rank, world_size, word):
    # one write each: the ranks share the caller's descriptors, and print() may split a line in two writes
    os.write(1, f"rank {rank} out: {word}\n".encode())
    os.write(2, f"rank {rank} err: {word}\n".encode())


def what_the_rank_sees(rank, world_size):
    return (torch.get_num_threads(), dist.is_initialized(),
            *(os.environ[k] for k in ("OMP_NUM_THREADS", "RANK", "WORLD_SIZE", "LOCAL_RANK")))


@pytest.mark.slow
def test_the_first_failing_rank_is_named_with_its_traceback_and_stops_the_others():
    t0 = time.monotonic()
    with pytest.raises(RankFailure) as info:
        run_ranks(rank_1_breaks, 2, timeout=300)
    message = str(info.value)
    assert message.startswith("rank 1 of 2 failed") and "the other ranks were stopped" in message, message
    assert "ValueError: rank one is broken" in message and "in rank_1_breaks" in message, message
    assert time.monotonic() - t0 < 120, "rank 0 was left waiting in its barrier"


def the_fork_servers_threads(rank, world_size):
    return len(os.listdir(f"/proc/{os.getppid()}/task"))


@pytest.mark.slow
def test_ranks_get_their_threads_and_torchrun_variables_and_a_group_only_when_asked():
    assert run_ranks(what_the_rank_sees, 1, threads=2, process_group=False, fresh=True) == \
        [(2, False, "2", "0", "1", "0")]
    assert run_ranks(what_the_rank_sees, 2) == [(1, True, "1", str(r), "2", str(r)) for r in range(2)]
    # A fork copies only the forking thread: a heap or lock another thread held mid-update stays so in the rank
    # (glibc's "malloc(): unaligned tcache chunk"). The fork server, with all it preloads, must have one thread.
    assert run_ranks(the_fork_servers_threads, 2, process_group=False) == [1, 1]


def what_a_full_collection_examines(rank, world_size):
    """(objects the cyclic collector examines, objects frozen) in a rank, as its function starts."""
    return len(gc.get_objects()), gc.get_freeze_count()


def test_a_forked_rank_starts_with_the_fork_servers_heap_frozen():
    """A full collection in a rank (DeepSpeed's ZeRO-3 set-up runs one) examines what the rank made, not the ~400k
    objects of torch and the trainer it inherits from the fork server (0.25-0.4 s per collection otherwise)."""
    [(examined, frozen)] = run_ranks(what_a_full_collection_examines, 1, process_group=False)
    assert frozen > 100_000 and examined < frozen / 10, (examined, frozen)


def _exited(process: psutil.Process) -> bool:
    """Gone, or a zombie: exited, waiting for a reaper. Under a subreaper that reaps only at its own end (a CI
    wrapper, a container's init) an exited orphan stays a zombie; it holds no memory, files or sockets."""
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.slow
@pytest.mark.parametrize("start", ["forked", "fresh"])
def test_killed_parent_takes_its_ranks_with_it(start, tmp_path):
    parent = subprocess.Popen([sys.executable, "-c", PARENT, start, str(tmp_path)], cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.time() + 120
        ranks, servers = [], []
        # past their start-up, into the rank function: both said so (a fixed 1 s wait did not know, and took 1 s)
        while time.time() < deadline and (len(ranks) < 2 or len(list(tmp_path.iterdir())) < 2):
            children = psutil.Process(parent.pid).children()
            if start == "fresh":  # spawned: children of the parent
                ranks = [c for c in children if "spawn" in " ".join(c.cmdline())]
            else:  # forked by the fork server, a child of the parent
                servers = [c for c in children if "forkserver" in " ".join(c.cmdline())]
                ranks = [r for s in servers for r in s.children()]
            time.sleep(0.2)
        assert len(ranks) >= 2, "the ranks never started"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["0", "1"], "the ranks never reached their function"
        ranks += servers
        os.kill(parent.pid, signal.SIGKILL)  # no cleanup code of the parent runs
        parent.wait(timeout=30)
        alive = ranks
        deadline = time.time() + 30
        while alive and time.time() < deadline:
            alive = [p for p in alive if not _exited(p)]
            time.sleep(0.1)
        assert not alive, [p.pid for p in alive]
    finally:
        if parent.poll() is None:
            parent.kill()


ORPHAN = """
import os, sys, time
from dist_train.lifecycle import kill_me_with_parent
r, w = os.pipe()
middle = os.fork()
if middle == 0:
    middle = os.getpid()
    if os.fork() == 0:
        time.sleep(0.5)  # its parent exits meanwhile, before it asks to die with it
        kill_me_with_parent(middle if sys.argv[1] == "checked" else None)
        os.write(w, b"survived")
    os._exit(0)
os.close(w)
os.waitpid(middle, 0)
print(os.read(r, 100).decode() or "died")
"""


@pytest.mark.parametrize("check", ["checked", "unchecked"])
def test_a_process_whose_parent_died_before_it_asked_to_die_with_it_dies_at_once(check):
    """The gap between a rank's start and its PR_SET_PDEATHSIG request (reading its job, importing __main__):
    a parent that dies there would leave an orphan for good, unless the rank checks its parent is still there."""
    out = subprocess.run([sys.executable, "-c", ORPHAN, check], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert out.stdout.strip() == ("died" if check == "checked" else "survived"), out


def test_ranks_write_where_the_caller_writes_when_they_start(capfd):
    """Not where the caller wrote when the fork server started (under pytest: an earlier test's capture)."""
    devnull, saved = os.open(os.devnull, os.O_WRONLY), (os.dup(1), os.dup(2))
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    try:
        run_ranks(say, 1, args=("unseen",))  # this may be the call that starts the fork server
    finally:
        for fd, old in zip((1, 2), saved):
            os.dup2(old, fd)
            os.close(old)
        os.close(devnull)
    for word in ("first", "second"):
        run_ranks(say, 2, args=(word,))
        out, err = capfd.readouterr()
        assert sorted(out.splitlines()) == [f"rank {r} out: {word}" for r in range(2)], out
        said = sorted(line for line in err.splitlines() if line.startswith("rank "))
        assert said == [f"rank {r} err: {word}" for r in range(2)], err

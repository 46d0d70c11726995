"""One job per run directory (issue 13.2): a second launch is refused with one line naming the holder, exit 2,
before it touches anything; a stale lock is taken over with a message; a job's own ranks (and restarts) pass."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dist_train import runlock
from dist_train.checkpoint import CheckpointManager, complete_checkpoints, verify_checkpoint
from dist_train.lifecycle import EXIT_PREEMPTED, read_heartbeat
from dist_train.runlock import (LOCK_ENV, LOCK_NAME, RANKS_LOCK_NAME, RunDirLocked, RunLock, acquire_for_launcher,
                               hold_checkpoint_dir, hold_run_dir, read_owner)
from dist_train.trainer import train
from tests.dist_harness import run_ranks
from tests.trainer_utils import run_cli_here, tiny_gpt_config

REPO = Path(__file__).resolve().parents[1]


def test_second_holder_is_refused_naming_the_first(tmp_path):
    with RunLock.acquire(tmp_path / "run", role="dist-train launch") as first:
        with pytest.raises(RunDirLocked) as info:
            RunLock.acquire(tmp_path / "run")  # another open file description: flock refuses it
        msg = str(info.value)
        assert "\n" not in msg and info.value.exit_code == 2
        assert f"in use by another job: pid {os.getpid()} on " in msg and "(dist-train launch, started " in msg
        assert read_owner(tmp_path / "run")["token"] == first.token
    assert read_owner(tmp_path / "run") == {}  # released: cleared, so the next holder sees no stale lock
    out = io.StringIO()
    RunLock.acquire(tmp_path / "run", out=out).release()
    assert out.getvalue() == ""


def test_stale_lock_is_taken_over_with_a_message(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    # what a SIGKILLed holder leaves: its record, but no flock (the kernel dropped it with the process)
    (run / LOCK_NAME).write_text(json.dumps({"host": "node7", "pid": 999999, "started": 0, "role": "rank 0"}))
    out = io.StringIO()
    with RunLock.acquire(run, out=out) as lock:
        assert lock.owner["pid"] == os.getpid()
    said = out.getvalue()
    assert said.count("\n") == 1 and "taking over the lock" in said and "pid 999999 on node7" in said, said


def test_ranks_of_the_holding_launcher_pass_others_are_refused_untouched(tmp_path, monkeypatch):
    run = tmp_path / "run"
    with RunLock.acquire(run, role="dist-train launch") as launcher:
        monkeypatch.setenv(LOCK_ENV, launcher.token)
        with hold_run_dir(run, rank=0) as held:  # a rank (or a restarted rank) of this job
            assert held.path.name == RANKS_LOCK_NAME and held.token == launcher.token
        with hold_run_dir(run, rank=0) as held:  # the next attempt of the same job passes again
            assert held.path.name == RANKS_LOCK_NAME
        monkeypatch.setenv(LOCK_ENV, "someone-else")
        with pytest.raises(RunDirLocked), contextlib.ExitStack() as held:
            held.enter_context(hold_run_dir(run, rank=0))
        monkeypatch.delenv(LOCK_ENV)
        with pytest.raises(RunDirLocked, match="in use by another job"):
            train(tiny_gpt_config(run, steps=2))
        # no config, logs, heartbeats, checkpoints
        assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME, RANKS_LOCK_NAME]
    res = train(tiny_gpt_config(run, steps=2))  # released: the next job trains, and releases in turn
    assert len(res.losses) == 2 and read_owner(run) == {}


def test_ranks_that_outlived_their_launcher_keep_the_next_launch_out(tmp_path):
    run = tmp_path / "run"
    # an orphaned rank 0 (its launcher was SIGKILLed, an mpiexec kept the ranks alive): it holds the ranks'
    # lock under the dead launcher's token, and run.lock is free
    orphan = RunLock.acquire(run, role="rank 0", name=RANKS_LOCK_NAME, token="dead-launcher")
    with pytest.raises(RunDirLocked, match=f"pid {os.getpid()} on .*rank 0.* holds .*{RANKS_LOCK_NAME}"):
        acquire_for_launcher(run)
    assert read_owner(run) == {}  # the refused launcher left run.lock free again
    orphan.release()
    acquire_for_launcher(run).release()


def _launch(config: Path, run_dir: Path, *sets: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "dist_train.cli", "launch", str(config), "--backend", "local", "--nproc", "1",
            "--set", f"run.dir={run_dir}", *[a for s in sets for a in ("--set", s)]]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.mark.slow
def test_two_concurrent_launches_one_refused_the_other_intact(tmp_path, capsys):
    cfg = tmp_path / "job.yaml"
    cfg.write_text(json.dumps({
        "model": {"kind": "gpt", "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 64},
        "data": {"source": "synthetic", "seq_len": 32},
        "train": {"steps": 10**6, "global_batch": 4, "micro_batch": 2, "lr": 1e-2, "log_every": 50,
                  "progress": False},
        "checkpoint": {"every": 10, "keep_last": 2}}))
    run = tmp_path / "run"
    first = _launch(cfg, run)
    deadline = time.time() + 120
    while not (run / "heartbeats").is_dir() and time.time() < deadline and first.poll() is None:
        time.sleep(0.2)
    assert first.poll() is None, first.communicate()
    holder = read_owner(run)
    assert holder["role"] == "dist-train launch" and holder["pid"] == first.pid
    # the second launch's launcher is this process (its refusal comes before any rank starts; a launcher process of
    # its own cost ~5 s of CPU importing torch and the launchers), the bare rank a process of its own
    second = run_cli_here(capsys, "launch", str(cfg), "--backend", "local", "--nproc", "1", "--set", f"run.dir={run}")
    # a bare rank (no launcher) is refused the same way
    bare = subprocess.run([sys.executable, "-m", "dist_train.cli", "run", str(cfg), "--set", f"run.dir={run}"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    lines = [line for line in second.stderr.splitlines() if line.strip()]
    assert second.returncode == 2 and len(lines) == 1, second.stderr
    assert lines[0].startswith("dist-train: error: run.dir ") and f"pid {first.pid} " in lines[0], lines
    assert bare.returncode == 2 and f"pid {first.pid} " in bare.stderr and len(bare.stderr.splitlines()) == 1
    assert first.poll() is None  # still training, untouched
    # preempted past its first checkpoint (every 10 steps), it holds two: that one and the preemption's
    deadline = time.time() + 120
    while time.time() < deadline and first.poll() is None:
        saved = complete_checkpoints(run / "checkpoints")
        if saved and ((read_heartbeat(run, 0) or {}).get("step") or 0) > saved[0][0]:
            break
        time.sleep(0.1)
    first.send_signal(signal.SIGTERM)  # preempt it: it checkpoints and exits 75
    out, err = first.communicate(timeout=300)
    assert first.returncode == EXIT_PREEMPTED, err
    good = complete_checkpoints(run / "checkpoints")
    assert len(good) >= 2 and not any(verify_checkpoint(p) for _, p in good)
    assert read_owner(run) == {}


def test_two_jobs_sharing_a_checkpoint_dir_from_different_run_dirs_are_refused(tmp_path, monkeypatch):
    """checkpoint.dir outside run.dir: a second job with another run.dir would prune and replace the first
    one's checkpoints while it trains (keep_last counts both), so the checkpoint dir is held like run.dir."""
    shared = tmp_path / "shared_ckpt"
    ck = {"dir": str(shared), "at_end": True}
    refused = []
    real_resume = CheckpointManager.resume

    def second_job_starts_meanwhile(self, *args):
        monkeypatch.setattr(CheckpointManager, "resume", real_resume)
        with pytest.raises(RunDirLocked) as info:
            train(tiny_gpt_config(tmp_path / "b", steps=1, checkpoint=ck))
        refused.append(str(info.value))
        return real_resume(self, *args)

    monkeypatch.setattr(CheckpointManager, "resume", second_job_starts_meanwhile)
    train(tiny_gpt_config(tmp_path / "a", steps=2, checkpoint=ck))
    assert len(refused) == 1 and "\n" not in refused[0], refused
    assert f"checkpoint.dir {shared} is in use by another job: pid {os.getpid()}" in refused[0]
    assert [p.name for _, p in complete_checkpoints(shared)] == ["step_2"]
    assert not (tmp_path / "b" / "summary.json").exists()
    # once the first job ended, the next one takes the directory (and resumes it)
    assert train(tiny_gpt_config(tmp_path / "b", steps=3, checkpoint=ck)).start_step == 2


def test_a_job_whose_checkpoint_dir_is_a_running_jobs_default_one_is_refused(tmp_path, monkeypatch):
    """Job a keeps its checkpoints in run.dir/checkpoints (covered by a's run.dir lock); job b, with its own
    run.dir, names that directory as its checkpoint.dir: refused while a runs, like two shared checkpoint.dirs."""
    refused = []
    real_resume = CheckpointManager.resume

    def second_job_starts_meanwhile(self, *args):
        monkeypatch.setattr(CheckpointManager, "resume", real_resume)
        with pytest.raises(RunDirLocked) as info:
            train(tiny_gpt_config(tmp_path / "b", steps=1, checkpoint={"dir": str(tmp_path / "a" / "checkpoints")}))
        refused.append(str(info.value))
        return real_resume(self, *args)

    monkeypatch.setattr(CheckpointManager, "resume", second_job_starts_meanwhile)
    train(tiny_gpt_config(tmp_path / "a", steps=2, checkpoint={"at_end": True}))
    assert len(refused) == 1 and f"checkpoint.dir {tmp_path / 'a' / 'checkpoints'} is in use by another job" in \
        refused[0], refused
    assert [p.name for _, p in complete_checkpoints(tmp_path / "a" / "checkpoints")] == ["step_2"]


def _no_flock(fd, op):
    raise OSError(errno.ENOLCK, "No locks available")


def _rank_0_cannot_lock(rank, world_size, root):
    """Every rank gets rank 0's one-line refusal: none is left waiting in the broadcast for a rank that raised."""
    if rank == 0:
        fcntl_flock, fcntl.flock = fcntl.flock, _no_flock  # the runlock module calls fcntl.flock
    try:
        with pytest.raises(RunDirLocked) as info:
            with hold_checkpoint_dir(Path(root) / "ckpt", Path(root) / "run", rank):
                pytest.fail(f"rank {rank} holds the checkpoint dir although rank 0 could not lock it")
    finally:
        if rank == 0:
            fcntl.flock = fcntl_flock
    return str(info.value)


@pytest.mark.slow
def test_a_file_system_without_flock_is_one_line_on_every_rank(tmp_path):
    lines = run_ranks(_rank_0_cannot_lock, 2, args=(str(tmp_path),), timeout=120)
    assert lines[0] == lines[1] and "\n" not in lines[0], lines
    assert f"checkpoint.dir {tmp_path / 'ckpt'}: cannot lock" in lines[0] and "No locks available" in lines[0]
    assert "does not support flock" in lines[0], lines


def _renewing_elsewhere(monkeypatch, path: Path, record: dict) -> None:
    """While this job watches, the job on the record's machine renews it (with that machine's clock): each wait of
    the watch sees one renewal, so nothing depends on thread timing."""
    sleep = time.sleep

    def renew(seconds):
        record["renewed"] += runlock.LEASE_RENEW_S
        path.write_text(json.dumps(record))
        sleep(seconds)

    monkeypatch.setattr(runlock.time, "sleep", renew)


def test_a_lock_record_another_machine_keeps_renewing_is_refused_where_flock_is_local(tmp_path, monkeypatch):
    """On a file system whose flock does not reach across machines (NFS mounted with local locks), a job on
    another machine holds run.lock there while flock succeeds here: its record was taken for a stale one and
    "taken over", two jobs sharing one run dir. The record is a lease the holder renews: another machine's record
    renewed while this job watches it is refused and left untouched; one not renewed until its lease ends (a job
    killed there a moment ago) is taken over then, not refused (a requeued job on another node would end)."""
    monkeypatch.setattr(runlock, "LEASE_RENEW_S", 0.05)
    monkeypatch.setattr(runlock, "LEASE_S", 0.5)
    run = tmp_path / "run"
    run.mkdir()
    record = {"host": "node7", "pid": 4242, "started": time.time() - 600, "renewed": time.time() - 0.1,
              "role": "dist-train launch", "token": "t"}
    (run / LOCK_NAME).write_text(json.dumps(record))  # its flock is on node7 only
    with monkeypatch.context() as m:
        _renewing_elsewhere(m, run / LOCK_NAME, record)
        with pytest.raises(RunDirLocked, match=r"^run.dir .* in use by another job: pid 4242 on node7 .*renewed while "
                                               r"this job watched it; this file system's flock does not reach across"):
            RunLock.acquire(run, out=io.StringIO())
    assert json.loads((run / LOCK_NAME).read_text())["pid"] == 4242  # untouched
    killed = time.time() - 0.1
    (run / LOCK_NAME).write_text(json.dumps({**record, "renewed": killed}))  # killed there just now
    out = io.StringIO()
    with RunLock.acquire(run, out=out):
        assert "watching it up to" in out.getvalue() and "taking over the lock" in out.getvalue(), out.getvalue()
        assert "pid 4242 on node7" in out.getvalue() and time.time() - killed >= 0.49  # its lease ran out first
    # a holder renews its record while it holds the lock, so another machine sees it running
    monkeypatch.setattr(runlock, "LEASE_S", 30.0)
    with RunLock.acquire(run) as lock:
        first = read_owner(run)["renewed"]
        deadline = time.time() + 5
        while read_owner(run)["renewed"] == first and time.time() < deadline:
            time.sleep(0.05)
        assert read_owner(run)["renewed"] > first and read_owner(run)["token"] == lock.token
    assert read_owner(run) == {}


def test_a_record_stale_by_this_clock_that_is_still_renewed_is_refused(tmp_path, monkeypatch):
    """Clocks that disagree by more than LEASE_S - LEASE_RENEW_S (this machine's ahead) made a running job's record
    on another machine look stale by its time, and it was taken over: two jobs in one run dir. Every such record is
    watched for a renewal (at least WATCH_S renewal periods), no clocks compared; one that is not renewed meanwhile
    is taken over as before."""
    monkeypatch.setattr(runlock, "LEASE_RENEW_S", 0.05)
    run = tmp_path / "run"
    run.mkdir()
    record = {"host": "node7", "pid": 4242, "started": 1000.0, "renewed": 1000.0, "role": "rank 0", "token": "t"}
    (run / LOCK_NAME).write_text(json.dumps(record))  # renewed "decades ago" by this machine's clock
    with monkeypatch.context() as m:
        _renewing_elsewhere(m, run / LOCK_NAME, record)
        with pytest.raises(RunDirLocked, match=r"pid 4242 on node7 .*renewed while this job watched it; this file"):
            RunLock.acquire(run, out=io.StringIO())
    out = io.StringIO()  # a job that died there: not renewed while watched
    with RunLock.acquire(run, out=out):
        assert "watching it up to 0.1 s" in out.getvalue() and "taking over the lock" in out.getvalue(), out.getvalue()


def test_a_watch_stalled_past_its_end_still_reads_the_record_once(tmp_path, monkeypatch):
    """A process descheduled between setting the watch's deadline and its first look (a loaded machine, a short
    watch) ended the watch without reading the record once and took a running job's lock over. The record is read at
    least once after a wait: renewed then, refused."""
    record = {"host": "node7", "pid": 4242, "started": 1000.0, "renewed": 1000.0, "role": "rank 0", "token": "t"}
    (tmp_path / LOCK_NAME).write_text(json.dumps(record))
    out, watch_clock = io.StringIO(), []

    def monotonic() -> float:  # the watch's deadline is set at 0; every later look finds it long past
        if "watching it up to" not in out.getvalue():
            return 0.0
        watch_clock.append(None)
        return 0.0 if len(watch_clock) == 1 else 1e6

    monkeypatch.setattr(runlock.time, "monotonic", monotonic)
    _renewing_elsewhere(monkeypatch, tmp_path / LOCK_NAME, record)
    with pytest.raises(RunDirLocked, match=r"pid 4242 on node7 .*renewed while this job watched it"):
        RunLock.acquire(tmp_path, out=out)


def test_each_renewal_reaches_the_file_server(tmp_path, monkeypatch):
    """An NFS client writes a dirty page back up to ~30 s late: unsynced, the renewals of a running job reached the
    server (and the other machines) too late for LEASE_S. Each one is fsynced."""
    monkeypatch.setattr(runlock, "LEASE_RENEW_S", 0.02)
    synced = []
    fsync = os.fsync
    monkeypatch.setattr(runlock.os, "fsync", lambda fd: synced.append(fd) or fsync(fd))
    with RunLock.acquire(tmp_path) as lock:
        acquired = len(synced)
        deadline = time.monotonic() + 10
        while read_owner(tmp_path)["renewed"] == lock.owner["started"] and time.monotonic() < deadline:
            time.sleep(0.02)
        renewed = read_owner(tmp_path)["renewed"]
        while len(synced) == acquired and time.monotonic() < deadline:
            time.sleep(0.02)
    assert renewed > lock.owner["started"] and len(synced) > acquired and set(synced) == {synced[0]}


def test_a_record_another_machine_takes_over_during_the_watch_is_refused(tmp_path, monkeypatch):
    """While this job watches a dead job's record, a job on a third machine (its flock local too) takes the lock
    over and writes its own record: that job runs there, so this one is refused (it took a changed holder for a
    release and ran beside it)."""
    monkeypatch.setattr(runlock, "LEASE_RENEW_S", 0.05)
    path = tmp_path / LOCK_NAME
    dead = {"host": "node7", "pid": 4242, "started": 1000.0, "renewed": 1000.0, "role": "rank 0", "token": "t"}
    path.write_text(json.dumps(dead))
    sleep = time.sleep

    def third_machine_takes_over(seconds):
        path.write_text(json.dumps({**dead, "host": "node9", "pid": 99, "token": "u", "renewed": time.time()}))
        sleep(seconds)

    monkeypatch.setattr(runlock.time, "sleep", third_machine_takes_over)
    with pytest.raises(RunDirLocked, match=r"pid 4242 on node7 .*\(pid 99 on node9 .* took it over while this job "
                                           r"watched it; this file system's flock"):
        RunLock.acquire(tmp_path, out=io.StringIO())
    assert json.loads(path.read_text())["host"] == "node9"

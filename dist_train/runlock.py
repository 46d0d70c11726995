"""One job per run directory: an exclusive lock held for the life of the job.

    lock = RunLock.acquire(run_dir)          # raises RunDirLocked (one line naming the holder) if taken
    ...                                      # heartbeats, logs, checkpoints
    lock.release()

Who holds it:
* ``dist-train launch`` (any backend: local, Ray, MPI) takes it before it touches the run directory and
  keeps it across every restart of the job; it hands its token to the ranks in ``DIST_TRAIN_RUN_LOCK``.
  Rank 0 of such a job finds the token in the lock file and does not take ``run.lock``, so a restart is
  never refused by its own job's lock; it takes ``run.lock.ranks`` instead (waiting up to RESTART_WAIT_S
  for the previous attempt's rank 0 of the same token to be gone), which a new launcher probes: ranks that
  outlived a SIGKILLed launcher (an orphaned ``mpiexec``) keep the next launch out.
* Without our launcher (``dist-train run`` alone, torchrun, ``srun``/``mpiexec`` from a batch script), rank 0
  takes it in ``train()`` before anything else touches the run directory, and tells the other ranks (a
  broadcast); a refused job exits 2 on every rank, only rank 0 printing the line.

Mechanism: ``flock(LOCK_EX | LOCK_NB)`` on ``run_dir/run.lock``. The kernel releases it when the holder
dies, however it dies, so a lock can never outlive its job; the file's content (JSON: host, pid, start
time, token) names the holder in the refusal. Content left by a holder that did not release (it was
killed) marks a stale lock: it is taken over with one line saying whose it was. The file is never deleted
(deleting a lock file races with a process that has just opened it). ``flock`` is per machine on local
file systems; on NFS (v4) and Lustre/GPFS with ``flock`` enabled it is cluster-wide. Where it is not (NFS
mounted with local locks: every machine's flock succeeds), the record is a lease: the holder rewrites its
``renewed`` time every LEASE_RENEW_S (fsynced: NFS clients write a dirty page back up to ~30 s late), and another
machine's record found under a free flock is watched: renewed meanwhile, it is a job running there, refused like a
held flock; not renewed, it is taken over. The watch lasts until the lease would end by this machine's clock
(LEASE_S after ``renewed``: a job killed there a moment ago is taken over then, not refused), and at least WATCH_S
renewal periods, so clocks that disagree (this one ahead) never make a running job's record look stale.
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator, Optional

LOCK_NAME = "run.lock"
#: Held by rank 0 of a job whose launcher holds LOCK_NAME: ranks that outlive a SIGKILLed launcher (an
#: orphaned mpiexec) still keep the next launch out.
RANKS_LOCK_NAME = "run.lock.ranks"
#: Held by rank 0 in the checkpoint dir (``checkpoint.dir``, default run.dir/checkpoints): two jobs with different
#: run directories must not share one (each would prune and replace the other's checkpoints).
CHECKPOINT_LOCK_NAME = "checkpoints.lock"
RESTART_WAIT_S = 30.0  # how long rank 0 waits for the previous attempt's rank 0 of the same job to be gone
LOCK_ENV = "DIST_TRAIN_RUN_LOCK"  # the launcher's lock token, in every rank's environment
LEASE_RENEW_S = 5.0  # how often a holder rewrites its record's ``renewed`` time
LEASE_S = 30.0  # another machine's record is watched for a renewal until this long after its ``renewed`` time
WATCH_S = 2.5  # x LEASE_RENEW_S: the shortest watch (the other machine's clock may be behind this one's)
_RECORD_BYTES = 1024  # records are padded to this size: a renewal rewrites them in place, never truncated


class RunDirLocked(ValueError):
    """Another job holds the run directory (bad input for this launch: exit status 2)."""

    exit_code = 2


def describe_owner(owner: dict) -> str:
    started = owner.get("started")
    when = datetime.datetime.fromtimestamp(started).strftime("%Y-%m-%d %H:%M:%S") if started else "?"
    return f"pid {owner.get('pid', '?')} on {owner.get('host', '?')} ({owner.get('role', 'job')}, started {when})"


def _read(fd: int) -> dict:
    try:
        data = os.pread(fd, 1 << 16, 0)
        owner = json.loads(data.decode()) if data.strip() else {}
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def read_owner(run_dir: Path, name: str = LOCK_NAME) -> dict:
    """The recorded holder of ``run_dir``'s lock ({} when none is recorded)."""
    try:
        fd = os.open(Path(run_dir) / name, os.O_RDONLY)
    except OSError:
        return {}
    try:
        return _read(fd)
    finally:
        os.close(fd)


def _write_record(fd: int, owner: dict) -> None:
    """The owner record, padded to a fixed size (JSON ignores the trailing spaces), so that a renewal's
    in-place rewrite never shows a reader a truncated record."""
    os.pwrite(fd, json.dumps(owner).encode().ljust(_RECORD_BYTES), 0)


def _running_elsewhere(path: Path, owner: dict, out) -> Optional[str]:
    """Why ``owner`` (the record in ``path``, found under a flock this process just got) belongs to a job still
    running on another machine, the flock not reaching across machines; None when it is stale. A lease record is
    watched for a renewal (module doc), no clocks compared; an older version's record, which never renews, is
    running when it started less than LEASE_S ago. A record of this machine under a free flock is always stale
    (the kernel's flock)."""
    host = owner.get("host")
    if not host or host == socket.gethostname():
        return None
    renewed = owner.get("renewed", owner.get("started"))
    try:
        age = time.time() - float(renewed or 0.0)
    except (TypeError, ValueError):
        return None
    if "renewed" not in owner:
        return f"it started {age:.0f} s ago" if age < LEASE_S else None
    watch_s = min(LEASE_S, max(WATCH_S * LEASE_RENEW_S, LEASE_S - age))
    print(f"[dist-train] {path}: {describe_owner(owner)} renewed its record {age:.0f} s ago (this machine's clock); "
          f"watching it up to {watch_s:.1f} s for a renewal before taking it over", file=out or sys.stderr, flush=True)
    deadline = time.monotonic() + watch_s
    while True:  # the record is read at least once after a wait, however late this process was scheduled
        time.sleep(min(0.5, LEASE_RENEW_S / 5))
        now = read_owner(path.parent, path.name)  # opened again: an NFS client revalidates its cache at open
        if not now:
            return None  # released (cleared) meanwhile
        if now.get("token") != owner.get("token"):  # a job on a third machine took it over meanwhile
            return f"{describe_owner(now)} took it over while this job watched it"
        if now.get("renewed") != renewed:
            return "its record was renewed while this job watched it"
        if time.monotonic() >= deadline:
            return None


class RunLock:
    """A held lock; ``token`` identifies it to the ranks of the job that holds it. A thread renews the record's
    ``renewed`` time every LEASE_RENEW_S while it is held (module doc)."""

    def __init__(self, path: Path, fd: int, owner: dict):
        self.path, self._fd, self.owner = path, fd, owner
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._renewer = threading.Thread(target=self._renew, daemon=True, name=f"renew {path.name}")
        self._renewer.start()

    def _renew(self) -> None:
        while not self._stop.wait(LEASE_RENEW_S):
            with self._mutex:
                if self._fd < 0:
                    return
                self.owner["renewed"] = time.time()
                with contextlib.suppress(OSError):  # a missed renewal only shortens the lease others see
                    _write_record(self._fd, self.owner)
                    os.fsync(self._fd)  # to the file server now, not at the client's next write-back

    @property
    def token(self) -> str:
        return self.owner["token"]

    @classmethod
    def acquire(cls, run_dir: Path, role: str = "job", out=None, name: str = LOCK_NAME,
                token: Optional[str] = None, wait_same_job_s: float = 0.0, what: str = "run.dir") -> "RunLock":
        """Take the lock of ``run_dir`` (created if missing) or raise ``RunDirLocked`` naming the holder.
        ``token``: the job's (default: a new one); ``wait_same_job_s``: a holder with the same token (the
        previous attempt of this job, being killed by the supervisor) is waited for this long; ``what``: the
        config key naming the directory in the refusal."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / name
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait_same_job_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _read(fd)
                if token is not None and holder.get("token") == token and time.monotonic() < deadline:
                    time.sleep(0.1)
                    continue
                os.close(fd)
                raise RunDirLocked(f"{what} {run_dir} is in use by another job: {describe_owner(holder)} holds "
                                   f"{path}; wait for it to end or stop it, or use another {what}") from None
            except OSError as e:  # flock itself failed: a file system without locks (NFS without lockd: ENOLCK)
                os.close(fd)
                raise RunDirLocked(f"{what} {run_dir}: cannot lock {path} ({e.strerror or e}): its file system "
                                   f"does not support flock; use another {what} on one that does") from None
            except BaseException:
                os.close(fd)
                raise
        stale = _read(fd)
        if stale and not (token is not None and stale.get("token") == token):
            running = _running_elsewhere(path, stale, out)
            if running is not None:
                os.close(fd)  # drops the flock this machine granted
                raise RunDirLocked(f"{what} {run_dir} is in use by another job: {describe_owner(stale)} holds "
                                   f"{path} ({running}; this file system's flock does not reach across "
                                   f"machines); wait for it to end or stop it, or "
                                   f"use another {what}")
            print(f"[dist-train] taking over the lock of {run_dir}: its holder, {describe_owner(stale)}, is no "
                  f"longer running (it ended without releasing it)", file=out or sys.stderr, flush=True)
        now = time.time()
        owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": now, "renewed": now, "role": role,
                 "token": token or uuid.uuid4().hex}
        os.ftruncate(fd, 0)
        _write_record(fd, owner)
        os.fsync(fd)
        return cls(path, fd, owner)

    def release(self) -> None:
        """Clear the owner record (so the next holder sees no stale lock), then unlock."""
        self._stop.set()
        with self._mutex:
            if self._fd < 0:
                return
            try:
                # left uncleared, the next holder only prints a take-over line (or, from another machine, waits
                # out the lease): the lock itself is the flock
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, 0)
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def acquire_for_launcher(run_dir: Path, out=None) -> RunLock:
    """The launcher's lock: ``run.lock``, and no rank 0 of an earlier job still running (its launcher was
    killed, its ranks were not: they hold ``run.lock.ranks``)."""
    lock = RunLock.acquire(run_dir, role="dist-train launch", out=out)
    try:
        RunLock.acquire(run_dir, role="dist-train launch (probe)", name=RANKS_LOCK_NAME, token=lock.token,
                        out=out).release()
    except BaseException:
        lock.release()
        raise
    return lock


def held_by_our_launcher(run_dir: Path) -> bool:
    """True when this process belongs to the job whose launcher holds ``run_dir``'s lock."""
    token = os.environ.get(LOCK_ENV)
    return bool(token) and read_owner(run_dir).get("token") == token


@contextlib.contextmanager
def hold_run_dir(run_dir: Path, rank: int, device=None) -> Iterator[Optional[RunLock]]:
    """Collective over the default group (when initialised): rank 0 takes the lock unless our launcher
    holds it; every rank raises ``RunDirLocked`` if rank 0 was refused. Released on exit (rank 0)."""
    def take() -> RunLock:
        if held_by_our_launcher(run_dir):  # the launcher's lock covers us; ours keeps out a next launcher
            return RunLock.acquire(run_dir, role="rank 0", name=RANKS_LOCK_NAME, token=os.environ[LOCK_ENV],
                                   wait_same_job_s=RESTART_WAIT_S)
        return RunLock.acquire(run_dir, role="rank 0")
    with _held_by_rank0(take, rank, device) as lock:
        yield lock


@contextlib.contextmanager
def hold_checkpoint_dir(ckpt_dir: Path, run_dir: Path, rank: int, device=None) -> Iterator[Optional[RunLock]]:
    """Like :func:`hold_run_dir` for the checkpoint dir: ``checkpoints.lock`` there, waited for across restarts
    of the same launched job. Taken inside ``run_dir`` too (the default run.dir/checkpoints): the run directory's
    lock does not keep out a job with another run.dir whose ``checkpoint.dir`` names this one."""
    def take() -> RunLock:
        token = os.environ.get(LOCK_ENV) if held_by_our_launcher(run_dir) else None
        return RunLock.acquire(ckpt_dir, role="rank 0", name=CHECKPOINT_LOCK_NAME, token=token,
                               wait_same_job_s=RESTART_WAIT_S if token else 0.0, what="checkpoint.dir")
    with _held_by_rank0(take, rank, device) as lock:
        yield lock


@contextlib.contextmanager
def _held_by_rank0(take, rank: int, device) -> Iterator[Optional[RunLock]]:
    """Rank 0 runs ``take()``; its refusal is raised on every rank (a broadcast); the lock is released on exit."""
    lock, error = None, None
    if rank == 0:
        try:
            lock = take()
        except OSError as e:  # e.g. the directory cannot be created: raised alone, it would leave the others waiting
            error = f"cannot take the job's lock: {e}"
        except RunDirLocked as e:
            error = str(e)
    error = _broadcast_from_rank0(error, device)
    if error:
        raise RunDirLocked(error)
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()


def _broadcast_from_rank0(value: Optional[str], device) -> Optional[str]:
    # torch.distributed only when a job's process group exists (launchers import this module without torch)
    dist = sys.modules.get("torch.distributed")
    if dist is None or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, device=device)
    return box[0]

"""Per-rank lifecycle: preemption signals, step heartbeats, hang diagnostics, test fault injection,
and the exit codes every launcher and scheduler script agrees on.

The trainer uses it like this (one object per rank process)::

    lc = Lifecycle(run_dir=Path(cfg.run.dir), rank=rank, watchdog_s=cfg.launch.watchdog_s)
    for step in ...:
        ...train one step...
        lc.heartbeat(step)
        if lc.stop_agreed(mesh.host_world_group):  # True on EVERY rank if ANY rank got SIGTERM/SIGUSR1
            mgr.save(...); lc.close(); return EXIT_PREEMPTED
    lc.close()

Files (all under ``run_dir``):
* ``heartbeats/rank_N.json`` – ``{"rank", "step", "time", "alive", "gap_s", "busy", "first_step_time",
  "attempt", "pid"}``, replaced atomically: ``step`` finished at ``time``; ``alive`` is the last write (a
  background thread writes at least every ``ALIVE_INTERVAL_S``, so a rank waiting in a collective stays
  alive and a SIGSTOPped one does not); ``gap_s`` the longest time between two heartbeats so far (step +
  anything between steps but a ``busy`` stretch); ``busy`` what the rank does outside the step loop
  ("checkpoint"; ``time`` restarts when it ends). The launcher's watchdog reads it: a rank whose ``time`` is
  older than the watchdog limit has stopped.

Fault injection (tests only, off unless the variable is set)::

    DIST_TRAIN_FAULT="rank=1,step=7,signal=KILL"      # that rank sends itself SIGKILL in heartbeat(7)
    DIST_TRAIN_FAULT="rank=0,step=3,action=hang"      # that rank stops making progress (sleeps)
    DIST_TRAIN_FAULT="rank=2,step=5,action=exit,code=3"
    DIST_TRAIN_FAULT="rank=1,step=2,action=error"    # that rank raises a bad-input ValueError (exit 2)
    optional ",attempt=K" (default 0): fire only on that attempt; the launcher sets DIST_TRAIN_RESTART.
"""
from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from .atomic_write import write_text_atomic
from .own_files import clear_own_files

# -- exit codes --------------------------------------------------------------------------------
EXIT_OK = 0
#: A rank (or launcher) stopped after SIGTERM/SIGUSR1, having saved a checkpoint when the run can write one (NVMe
#: optimizer offload cannot: a restart of such a run starts over). 75 is
#: EX_TEMPFAIL from sysexits.h ("temporary failure, try again"), which is exactly what a scheduler
#: requeue means, and it is outside the 128+N range used for deaths by signal.
EXIT_PREEMPTED = 75
#: The launcher's watchdog found no step progress for ``launch.watchdog_s`` (same code as ``timeout``).
EXIT_HANG = 124
#: Generic failure of the launcher when no better code is known.
EXIT_FAILED = 1
#: Bad input (config, files, arguments): one line on stderr (``dist_train.cli.EXIT_USAGE``).
EXIT_USAGE = 2
#: Training stopped on a non-finite loss or gradient norm, or a loss spike (``train.on_nonfinite``); the last good
#: checkpoint is untouched. Not restartable: a restart would replay the same steps into the same NaN or spike.
EXIT_DIVERGED = 3
#: Every checkpoint the resume could use failed verification for its content (checksum or size mismatch, a file
#: missing, NaN/inf tensors, an unparsable manifest); they are left untouched. Not restartable: a restart re-reads
#: the same bytes. (An I/O error while reading them, which may pass, is a plain failure: restartable.)
EXIT_DAMAGED = 4


class TrainingDiverged(RuntimeError):
    """Non-finite loss or gradient norm under ``train.on_nonfinite``; the message is one line naming the step."""

    exit_code = EXIT_DIVERGED

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
#: A finished step reaches the heartbeat file at once when the last write is this old, else within this
#: long (background thread): the step a frozen rank reports is its last one up to this much training.
HEARTBEAT_INTERVAL_S = 0.25
#: The background thread rewrites the file (``alive``) at least this often, even without progress: a rank
#: blocked in a collective keeps writing, a stopped or frozen process does not.
ALIVE_INTERVAL_S = 1.0
#: No write of any kind for this long: the process is not running (SIGSTOP, frozen holding the GIL, gone).
NOT_RESPONDING_S = 3.0
#: ``launch.watchdog_s: null`` (auto): WATCHDOG_FACTOR x the slowest step (incl. saves between steps) seen,
#: at least WATCHDOG_MIN_S, at most WATCHDOG_COLLECTIVE_SHARE x ``launch.collective_timeout_s`` (so a stuck
#: rank is named before its peers' collectives time out and blame a healthy rank).
WATCHDOG_FACTOR = 10.0
WATCHDOG_MIN_S = 30.0
WATCHDOG_COLLECTIVE_SHARE = 0.8


def auto_watchdog_s(max_gap_s: Optional[float], collective_timeout_s: float, busy: bool = False) -> float:
    """The automatic step watchdog (see ``WATCHDOG_FACTOR``). Before two steps were timed, and while a rank
    is busy outside the step loop (a checkpoint save), only the collective-timeout bound applies."""
    hi = WATCHDOG_COLLECTIVE_SHARE * collective_timeout_s
    if max_gap_s is None or busy:
        return hi
    return min(hi, max(WATCHDOG_MIN_S, WATCHDOG_FACTOR * max_gap_s))
FAULT_ENV = "DIST_TRAIN_FAULT"
RESTART_ENV = "DIST_TRAIN_RESTART"


def kill_me_with_parent(parent_pid: Optional[int] = None) -> None:
    """Ask Linux to SIGKILL this process when the thread that started it goes (prctl PR_SET_PDEATHSIG):
    ranks, and ranks spawned by tests and benchmarks, never outlive a launcher killed without cleanup.
    ``parent_pid``: the process that started this one. If it is no longer the parent here, it died before the
    request was made (this process was handed to init or a subreaper) and no signal will ever come: die now."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)
        if parent_pid is not None and os.getppid() != parent_pid:
            os.kill(os.getpid(), signal.SIGKILL)


def exit_code_for_signal(signum: int) -> int:
    """Shell convention for a process killed by signal ``signum``: 128 + signum."""
    return 128 + int(signum)


def describe_exit(code: Optional[int]) -> str:
    """Human text for a subprocess return code (negative = killed by that signal, as in Popen)."""
    if code is None:
        return "still running"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}"
    if code == EXIT_PREEMPTED:
        # not "resumable": the rank may have had no checkpoint to write (its own line says which)
        return f"exit code {code} (preempted)"
    if code > 128:
        try:
            return f"exit code {code} ({signal.Signals(code - 128).name})"
        except ValueError:
            pass
    return f"exit code {code}"


def heartbeat_path(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / "heartbeats" / f"rank_{rank}.json"


def clear_heartbeats(run_dir: Path) -> None:
    """Remove an earlier attempt's heartbeats (only those: ``run_dir/heartbeats`` may be a person's own folder)."""
    clear_own_files(Path(run_dir) / "heartbeats", [r"rank_\d+\.json", r"\.rank_\d+\.json\.\d+\.tmp"])


def read_heartbeat(run_dir: Path, rank: int) -> Optional[dict]:
    """The last heartbeat a rank wrote, or None (not written yet, or half-replaced on a non-POSIX FS)."""
    try:
        return json.loads(heartbeat_path(run_dir, rank).read_text())
    except (OSError, ValueError):
        return None


# -- fault injection -----------------------------------------------------------------------------
@dataclass(frozen=True)
class FaultSpec:
    """A parsed ``DIST_TRAIN_FAULT``: which rank misbehaves, at which step, how, and on which attempt."""

    rank: int
    step: int
    action: str = "signal"  # signal | hang | exit | error
    signal: int = int(signal.SIGKILL)
    code: int = 1
    attempt: int = 0

    @staticmethod
    def parse(text: str) -> "FaultSpec":
        fields: dict[str, str] = {}
        for item in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"{FAULT_ENV}={text!r}: item {item!r} is not key=value")
            fields[key.strip()] = value.strip()
        unknown = set(fields) - {"rank", "step", "signal", "action", "code", "attempt"}
        if unknown or "rank" not in fields or "step" not in fields:
            raise ValueError(f"{FAULT_ENV}={text!r}: expected rank=R,step=S[,signal=KILL|action=hang|"
                             f"action=exit,code=N][,attempt=K]; unknown keys {sorted(unknown)}")
        action = fields.get("action", "signal")
        if action not in ("signal", "hang", "exit", "error"):
            raise ValueError(f"{FAULT_ENV}={text!r}: action={action!r}, valid: signal, hang, exit, error")
        sig_name = fields.get("signal", "KILL").upper()
        sig_name = sig_name if sig_name.startswith("SIG") else "SIG" + sig_name
        try:
            signum = int(signal.Signals[sig_name])
        except KeyError:
            raise ValueError(f"{FAULT_ENV}={text!r}: unknown signal {fields.get('signal')!r}") from None
        try:
            return FaultSpec(rank=int(fields["rank"]), step=int(fields["step"]), action=action, signal=signum,
                             code=int(fields.get("code", 1)), attempt=int(fields.get("attempt", 0)))
        except ValueError:
            raise ValueError(f"{FAULT_ENV}={text!r}: rank, step, code and attempt must be integers") from None


def current_attempt() -> int:
    """Which attempt of the job this process belongs to (0 = first launch); set by the launcher."""
    try:
        return int(os.environ.get(RESTART_ENV, "0"))
    except ValueError:
        return 0


# -- the per-rank object ------------------------------------------------------------------------------
class Lifecycle:
    """Signals → agreed stop, heartbeats → launcher watchdog, fault injection → tests.

    Args:
        run_dir: the run directory (``run.dir``); heartbeats go to ``run_dir/heartbeats``.
        rank: this process's global rank.
        watchdog_s: if > 0, a rank that makes no step progress for 0.8·watchdog_s dumps every thread's
            Python stack to stderr (→ ``logs/rank_N.stderr``), so the launcher's hang report, which
            fires at watchdog_s, can show *where* each rank stopped and not just at which step.
        install_signals: install SIGTERM/SIGUSR1 handlers (only possible on the main thread; elsewhere
            they are skipped and the launcher's signal still reaches the process's default handler).
    """

    def __init__(self, run_dir: Path, rank: int, watchdog_s: Optional[float] = 0.0, install_signals: bool = True,
                 collective_timeout_s: float = 300.0):
        self.run_dir = Path(run_dir)
        self.rank = int(rank)
        self.auto_watchdog = watchdog_s is None
        self.collective_timeout_s = float(collective_timeout_s)
        self.watchdog_s = auto_watchdog_s(None, collective_timeout_s) if watchdog_s is None else float(watchdog_s)
        self._max_gap: Optional[float] = None
        self._busy: Optional[str] = None
        self.attempt = current_attempt()
        self._signalled: Optional[int] = None
        self._previous: dict[int, Any] = {}
        self._last_write = 0.0
        self._first_step_time: Optional[float] = None
        self._latest: tuple[Optional[int], float] = (None, time.time())  # (step, when) not yet written
        self._written: tuple[Optional[int], float] = self._latest
        self._lock = threading.Lock()
        self._closed = False
        self._wake = threading.Event()
        text = os.environ.get(FAULT_ENV, "").strip()
        self._fault = FaultSpec.parse(text) if text else None
        if install_signals and threading.current_thread() is threading.main_thread():
            for sig in PREEMPT_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        (self.run_dir / "heartbeats").mkdir(parents=True, exist_ok=True)
        self._write(*self._latest)
        self._arm_stack_dump()
        # Heartbeats are written at most once per interval from heartbeat() itself; this thread writes
        # the last throttled one, so a rank that hangs right after a fast step still reports that step.
        self._flusher = threading.Thread(target=self._flush_loop, daemon=True, name="heartbeat-flush")
        self._flusher.start()

    # signals ---------------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: Any) -> None:
        # Only set a flag: the step in flight finishes, then every rank agrees in stop_agreed().
        self._signalled = signum

    @property
    def signalled(self) -> Optional[int]:
        """The preemption signal this rank received (None if none)."""
        return self._signalled

    def request_stop(self, signum: int = int(signal.SIGTERM)) -> None:
        """Same as receiving ``signum``: used by in-process launchers (threads cannot take signals)."""
        self._signalled = signum

    def stop_agreed(self, group: Any = None) -> bool:
        """All-reduce MAX of the local 'signal received' flag over ``group`` (every rank: the trainer passes the mesh's
        ``host_world_group``, a gloo group whose CPU flag is read without waiting for the device; None: the default
        group): True on every rank if any rank was signalled. Without an initialised process group it is just the
        local flag. Collective: every rank of ``group`` must call it at the same step."""
        local = 1 if self._signalled is not None else 0
        # Lazy: launchers import this module without torch; and if torch.distributed was never imported,
        # no process group can exist (importing it here would only cost seconds).
        dist = sys.modules.get("torch.distributed")
        if dist is None or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
            return bool(local)  # (a one-rank group, such as the GPU check's NCCL world of 1: nothing to agree on)
        import torch

        from .distributed import collective_device  # imports torch: lazy for the same reason

        # on the group's device: over gloo (the host group) a CPU tensor, read without waiting for the device; over
        # NCCL filled on the device (torch.tensor([local], device=cuda) would be a blocking copy from the host, a wait
        # for the device on top of the read below)
        flag = torch.full((1,), local, dtype=torch.int32, device=collective_device(group))
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return bool(flag.item())

    # heartbeats ------------------------------------------------------------------------------
    def heartbeat(self, step: int) -> None:
        """Record that ``step`` finished. Cheap: the file is rewritten at most every HEARTBEAT_INTERVAL_S."""
        now = time.time()
        with self._lock:
            if self._latest[0] is not None:
                gap = now - self._latest[1]
                self._max_gap = gap if self._max_gap is None else max(self._max_gap, gap)
                if self.auto_watchdog:
                    self.watchdog_s = auto_watchdog_s(self._max_gap, self.collective_timeout_s)
            self._latest = (step, now)
            if self._first_step_time is None:
                self._first_step_time = now
                self._write(step, now)
            elif now - self._last_write >= HEARTBEAT_INTERVAL_S:
                self._write(step, now)
        self._arm_stack_dump()
        self._maybe_inject_fault(step)

    @contextlib.contextmanager
    def busy(self, what: str) -> Iterator[None]:
        """Mark a stretch outside the step loop (``"checkpoint"``): the automatic watchdog gives it the
        collective-timeout bound instead of the step-based one. Written at once, cleared on exit; the step clock
        (``time``) restarts then: the stretch had its own bound, and a save longer than the step watchdog would
        otherwise make the rank look hung the moment it ends (nor does it count in ``gap_s``)."""
        with self._lock:
            self._busy = what
            self._write(*self._latest)
        if self.auto_watchdog:
            self._arm_stack_dump(auto_watchdog_s(None, self.collective_timeout_s))
        try:
            yield
        finally:
            with self._lock:
                self._busy = None
                self._latest = (self._latest[0], time.time())
                self._write(*self._latest)
            self._arm_stack_dump()

    def _flush_loop(self) -> None:
        while not self._wake.wait(HEARTBEAT_INTERVAL_S):
            with self._lock:
                if self._latest != self._written or time.time() - self._last_write >= ALIVE_INTERVAL_S:
                    self._write(*self._latest)

    def _write(self, step: Optional[int], now: float) -> None:
        path = heartbeat_path(self.run_dir, self.rank)
        payload = {"rank": self.rank, "step": step, "time": now, "alive": time.time(), "gap_s": self._max_gap,
                   "busy": self._busy, "first_step_time": self._first_step_time, "attempt": self.attempt,
                   "pid": os.getpid()}
        write_text_atomic(path, json.dumps(payload))  # readers never see a half-written file
        self._last_write = time.time()
        self._written = (step, now)

    def _arm_stack_dump(self, limit_s: Optional[float] = None) -> None:
        limit_s = self.watchdog_s if limit_s is None else limit_s
        if limit_s <= 0 or self._closed:
            return
        # faulthandler needs a real file descriptor: a replaced sys.stderr (notebook, pytest capture) has none
        for stream in (sys.stderr, sys.__stderr__):
            try:
                faulthandler.dump_traceback_later(0.8 * limit_s, repeat=False, file=stream, exit=False)
                return
            except (AttributeError, ValueError, OSError):  # io.UnsupportedOperation is both
                continue

    # fault injection -------------------------------------------------------------------------
    def _maybe_inject_fault(self, step: int) -> None:
        f = self._fault
        if f is None or f.rank != self.rank or f.step != step or f.attempt != self.attempt:
            return
        # Make the last step visible to the launcher before misbehaving (a real crash is no kinder,
        # but the tests want to assert where the rank stopped).
        with self._lock:
            self._write(*self._latest)
        print(f"[fault injection] rank {self.rank} step {step}: {f.action}"
              + (f" {signal.Signals(f.signal).name}" if f.action == "signal" else ""), file=sys.stderr, flush=True)
        if f.action == "signal":
            os.kill(os.getpid(), f.signal)  # a handled one (TERM, USR1) returns here with the flag set
        elif f.action == "exit":
            os._exit(f.code)
        elif f.action == "error":
            raise ValueError(f"injected bad-input error on rank {self.rank} at step {step} ({FAULT_ENV})")
        else:  # hang: stop making progress; only the watchdog or a kill ends this
            while True:
                time.sleep(3600)

    # teardown --------------------------------------------------------------------------------
    def close(self) -> None:
        """Restore the previous signal handlers and cancel the hang stack dump."""
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        self._flusher.join(timeout=5)
        with self._lock:
            if self._latest != self._written:
                self._write(*self._latest)
        if self.watchdog_s > 0:
            faulthandler.cancel_dump_traceback_later()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> "Lifecycle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

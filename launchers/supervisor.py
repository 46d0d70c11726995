"""The restart supervisor shared by every backend.

A backend starts one *attempt* of the job (all ranks) and hands back an :class:`Attempt`. The supervisor
watches it:

* a rank exits non-zero (not ``EXIT_PREEMPTED``) or dies by a signal → the whole group is torn down
  (every rank and its children killed) and, while ``max_restarts`` allows, started again with the resume
  arguments (``--set checkpoint.restart=true``: the run's newest committed checkpoint, or before its first save
  what checkpoint.resume names) and
  ``DIST_TRAIN_RESTART=<attempt>`` in every rank's environment;
* no step progress for ``watchdog_s`` on some running rank (heartbeats from ``dist_train.lifecycle``)
  → a hang: reported with the step each rank reached, then handled like a failure;
* SIGTERM / SIGUSR1 / SIGINT to the launcher → forwarded (SIGINT as SIGTERM) to every rank, which
  finishes its step, checkpoints and exits ``EXIT_PREEMPTED``; the launcher then exits ``EXIT_PREEMPTED``
  too (a scheduler requeues it). A second signal kills the group at once (exit 128+signal).

The final status is 0, ``EXIT_PREEMPTED``, ``EXIT_HANG`` or the failed rank's code (128+N for signal N),
with a summary naming the rank, its status and the last lines of its stderr. Every decision is also
appended to ``run_dir/logs/launcher.jsonl`` (the benchmark reads restart times from it).
"""
from __future__ import annotations

import json
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable, NamedTuple, Optional, Protocol

from dist_train.lifecycle import (EXIT_DAMAGED, EXIT_DIVERGED, EXIT_HANG, EXIT_OK, EXIT_PREEMPTED, EXIT_USAGE, NOT_RESPONDING_S,
                                  RESTART_ENV, WATCHDOG_COLLECTIVE_SHARE, WATCHDOG_FACTOR, WATCHDOG_MIN_S,
                                  auto_watchdog_s, clear_heartbeats, describe_exit, exit_code_for_signal,
                                  read_heartbeat)
from dist_train.rank_errors import user_errors

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
#: the override every restart of a job runs with (and every start of a batch job: launchers/batch.py)
RESTART_OVERRIDE = "checkpoint.restart=true"
#: Rank exit codes a restart cannot cure: bad input found after the ranks started, divergence (the restart would
#: resume from the last good checkpoint and replay the same steps into the same NaN or spike), and checkpoints
#: that all failed verification for their content (the restart would re-read the same damaged bytes).
NOT_RESTARTABLE = {EXIT_USAGE: "a configuration or input error",
                   EXIT_DIVERGED: "divergence (non-finite loss or a loss spike)",
                   EXIT_DAMAGED: "every checkpoint the resume could use is damaged (left untouched)"}


class Attempt(Protocol):
    """One start of all ranks. Every method must be cheap: the supervisor calls them ~10×/s."""

    world_size: int

    def poll(self) -> list[Optional[int]]:
        """Per-rank return codes (None = running; negative = killed by that signal)."""

    def progress(self) -> dict[int, "RankProgress"]:
        """rank → its ``RankProgress`` (last step or None before the first, seconds since then, seconds since
        it last wrote anything, …); ranks that have not created their Lifecycle yet are absent."""

    def send_signal(self, sig: int) -> None:
        """Deliver ``sig`` to every rank's main process."""

    def kill(self) -> None:
        """Kill every rank and its children (idempotent)."""

    def tail(self, rank: int) -> list[str]:
        """The last stderr lines of ``rank``."""

    def close(self) -> None:
        """Release everything (after kill or after all ranks ended)."""


class Backend(Protocol):
    name: str

    def start(self, argv: list[str], env: dict[str, str], attempt: int) -> Attempt:
        """Start ``argv`` once per rank with ``env`` added to each rank's environment."""


@dataclass
class JobSpec:
    """What to run. ``argv`` is the per-rank command; ``resume_args`` are appended on restarts."""

    argv: list[str]
    nproc: int
    run_dir: Path
    max_restarts: int = 0
    watchdog_s: Optional[float] = 0.0  # 0: off; None: automatic (dist_train.lifecycle.auto_watchdog_s)
    collective_timeout_s: float = 300.0  # the ranks' launch.collective_timeout_s (bounds the automatic watchdog)
    resume_args: list[str] = field(default_factory=lambda: ["--set", RESTART_OVERRIDE])
    env: dict[str, str] = field(default_factory=dict)
    #: What a restart would start from, asked once every rank stopped on a preemption, as one clause ("a restart
    #: resumes from …/step_40", "no checkpoint in …: a restart starts from scratch"): a run that wrote no checkpoint
    #: (NVMe optimizer offload, a stop before the first save) exits 75 too. None: the launcher cannot tell.
    restart_point: Optional[Callable[[], str]] = None
    #: Whether a rank asked to stop saves a checkpoint first (training). False: it saves nothing (an evaluation),
    #: and the launcher's lines must not promise a checkpoint or a resume.
    checkpoints_on_stop: bool = True


@dataclass
class Outcome:
    kind: str  # ok | preempted | failed | hang | interrupted
    code: int
    rank: Optional[int] = None
    detail: str = ""


class RankProgress(NamedTuple):
    """One rank's heartbeat as the supervisor sees it (ages in seconds, on the rank's machine's clock)."""

    step: Optional[int]  # last finished step (None before the first)
    age: float  # since that step finished (or since the rank started its Lifecycle)
    alive_age: float = 0.0  # since the rank last wrote anything: a waiting rank keeps writing, a frozen one not
    gap_s: Optional[float] = None  # the longest time between two of its steps so far
    busy: Optional[str] = None  # outside the step loop ("checkpoint")

    @property
    def responding(self) -> bool:
        return self.alive_age <= NOT_RESPONDING_S


def progress_from_heartbeats(run_dir: Path, ranks: range, attempt: int, started: float,
                             now: Optional[float] = None) -> dict[int, RankProgress]:
    """Read ``run_dir/heartbeats`` (on this machine) into the :meth:`Attempt.progress` format."""
    now = time.time() if now is None else now
    out: dict[int, RankProgress] = {}
    for r in ranks:
        hb = read_heartbeat(run_dir, r)
        if hb is not None and hb.get("attempt") == attempt:
            # The clock starts when the rank creates its Lifecycle (step None): start-up before that —
            # imports, rendezvous — is bounded by the collective timeout, not by the step watchdog.
            alive = max(hb.get("alive", hb["time"]), started)
            out[r] = RankProgress(hb.get("step"), now - max(hb["time"], started), now - alive, hb.get("gap_s"),
                                  hb.get("busy"))
    return out


def format_progress(progress: dict[int, RankProgress]) -> str:
    parts = []
    for r in sorted(progress):
        p = progress[r]
        where = "before its first step" if p.step is None else f"at step {p.step}"
        extra = "" if p.responding else f", not responding for {p.alive_age:.1f} s"
        extra += f", in {p.busy}" if p.busy else ""
        parts.append(f"rank {r} {where} ({p.age:.1f} s ago{extra})")
    return ", ".join(parts)


def frozen_ranks(progress: dict[int, RankProgress]) -> list[int]:
    """Ranks whose process wrote nothing for NOT_RESPONDING_S (stopped, frozen), longest silence first."""
    silent = [r for r, p in progress.items() if not p.responding]
    return sorted(silent, key=lambda r: -progress[r].alive_age)


def describe_frozen(r: int, p: RankProgress) -> str:
    where = "before its first step" if p.step is None else f"after step {p.step}"
    return (f"rank {r} stopped responding {where} (no heartbeat of any kind for {p.alive_age:.1f} s: its "
            f"process is stopped or frozen)")


class Supervisor:
    """Run a :class:`JobSpec` on a :class:`Backend` with restarts, hang detection and preemption."""

    def __init__(self, spec: JobSpec, backend: Backend, poll_s: float = 0.1, out: Optional[IO[str]] = None):
        self.spec, self.backend, self.poll_s = spec, backend, poll_s
        self.out = out or sys.stderr
        self._pending: list[int] = []
        self.attempts: list[Outcome] = []
        self.events_path = Path(spec.run_dir) / "logs" / "launcher.jsonl"
        self._owns_signals = False  # True while run() holds the process's signal handlers

    # bookkeeping ------------------------------------------------------------------------------
    def _say(self, msg: str) -> None:
        self.out.write(f"[launcher] {msg}\n")
        self.out.flush()

    def _event(self, kind: str, **data: object) -> None:
        self.events_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.events_path, "a") as f:
            f.write(json.dumps({"event": kind, "time": time.time(), **data}) + "\n")

    def _on_signal(self, signum: int, frame: object) -> None:
        self._pending.append(signum)

    # the loop -----------------------------------------------------------------------------------
    def run(self) -> int:
        """Run to completion; returns the launcher's exit status."""
        self._owns_signals = threading.current_thread() is threading.main_thread()
        previous = {s: signal.signal(s, self._on_signal) for s in FORWARDED_SIGNALS} if self._owns_signals else {}
        try:
            return self._run()
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def _reclaim_signals(self) -> None:
        """Put our handlers back where a library replaced them while a backend started.

        ``ray.init()`` installs its own SIGTERM handler (it exits at once): without this a preemption
        (``kill -TERM``, ``ray job stop``, Slurm/Kubernetes) would end the launcher with status 15 and
        no checkpoint instead of being forwarded to the ranks.
        """
        if not self._owns_signals:
            return
        for s in FORWARDED_SIGNALS:
            if signal.getsignal(s) != self._on_signal:
                signal.signal(s, self._on_signal)

    def _run(self) -> int:
        spec = self.spec
        attempt = 0
        while True:
            clear_heartbeats(spec.run_dir)
            argv = spec.argv + (spec.resume_args if attempt > 0 else [])
            # rank 0 draws its progress bar only when a person is watching this launcher's terminal
            env = {**spec.env, RESTART_ENV: str(attempt), "DIST_TRAIN_TTY": "1" if sys.stderr.isatty() else "0"}
            self._event("attempt_start", attempt=attempt, nproc=spec.nproc, argv=argv)
            try:
                handle = self.backend.start(argv, env, attempt)
            except BaseException as e:  # e.g. the Ray cluster refused us: the attempt still gets its end
                self._event("attempt_end", attempt=attempt, outcome="start_failed", code=None, rank=None,
                            detail=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                raise
            self._reclaim_signals()
            outcome: Optional[Outcome] = None
            try:
                outcome = self._watch(handle, attempt)
                summary = self._summary(outcome, handle)
            finally:
                if outcome is None or outcome.kind not in ("ok", "preempted"):
                    handle.kill()  # an exception in the loop, or a failure: no rank may survive
                handle.close()
            self.attempts.append(outcome)
            self._event("attempt_end", attempt=attempt, outcome=outcome.kind, code=outcome.code, rank=outcome.rank,
                        detail=outcome.detail)
            if outcome.kind in ("ok", "preempted", "interrupted"):
                if outcome.kind == "preempted":
                    where = (self.spec.restart_point() if self.spec.restart_point is not None else
                             "a restart resumes from the newest committed checkpoint, if the ranks wrote one"
                             if self.spec.checkpoints_on_stop else "the ranks save nothing: a rerun starts over")
                    self._say(f"preempted: every rank stopped; exiting with {EXIT_PREEMPTED} ({where})")
                elif outcome.kind == "interrupted":
                    self._say(f"interrupted twice: every rank killed, exit {outcome.code}")
                return outcome.code
            if outcome.code in NOT_RESTARTABLE and attempt < spec.max_restarts:
                self._say(f"not restarting: {NOT_RESTARTABLE[outcome.code]} (exit code {outcome.code}) would fail "
                          f"the same way again")
            elif attempt < spec.max_restarts and not self._pending:
                attempt += 1
                self._say(f"{summary}\n[launcher] restarting the job from its newest committed checkpoint (none "
                          f"yet: from checkpoint.resume) (restart {attempt} of {spec.max_restarts})")
                self._event("restart", attempt=attempt)
                continue
            total = attempt + 1
            self._say(f"FAILED after {total} attempt{'s' if total > 1 else ''}: {summary}")
            return outcome.code

    def _summary(self, outcome: Outcome, handle: Attempt) -> str:
        if outcome.kind not in ("failed", "hang") or outcome.rank is None:
            return outcome.detail
        lines = handle.tail(outcome.rank)
        log = Path(self.spec.run_dir) / "logs" / f"rank_{outcome.rank}.stderr"
        text = f"{outcome.detail}\n[launcher] last lines of rank {outcome.rank}'s stderr ({log}):"
        return text + ("".join(f"\n    {line}" for line in lines) if lines else "\n    (empty)")

    def _watch(self, handle: Attempt, attempt: int) -> Outcome:
        stopping = False
        fwd = int(signal.SIGTERM)
        while True:
            while self._pending:
                sig = self._pending.pop(0)
                if stopping:
                    handle.kill()
                    return Outcome("interrupted", exit_code_for_signal(sig))
                stopping = True
                fwd = signal.SIGTERM if sig == signal.SIGINT else sig
                what = "checkpoint and stop" if self.spec.checkpoints_on_stop else "stop"
                self._say(f"got {signal.Signals(sig).name}: asking every rank to {what} (again to kill)")
                self._event("signal", signal=signal.Signals(sig).name)
                handle.send_signal(fwd)
            codes = handle.poll()
            if stopping:
                # A rank that had not installed its handlers yet (still starting) dies of the forwarded
                # signal itself: nothing to save, but the job is as resumable as the preempted ranks.
                codes = [EXIT_PREEMPTED if c in (-fwd, exit_code_for_signal(fwd)) else c for c in codes]
            failed = [(r, c) for r, c in enumerate(codes) if c is not None and c not in (EXIT_OK, EXIT_PREEMPTED)]
            if failed:
                # a rank that stopped responding while still "running" is the cause of its peers' collective
                # timeouts (a SIGSTOPped rank): name it, not the healthy rank whose collective gave up
                running = {r: p for r, p in handle.progress().items() if codes[r] is None}
                frozen = frozen_ranks(running)
                handle.kill()
                recorded = user_errors(self.spec.run_dir)  # one snapshot for both decisions
                if frozen and not recorded:
                    r = frozen[0]
                    others = ", ".join(f"rank {o} {describe_exit(oc)}" for o, oc in failed)
                    return Outcome("hang", EXIT_HANG, r, f"hang: {describe_frozen(r, running[r])}; "
                                   f"then {others} (attempt {attempt})")
                # The root cause is a rank that recorded a bad-input error (its peers then exit quietly,
                # dist_train/rank_errors.py); else usually the rank killed by a signal (the others then fail
                # in a collective); else the lowest failed rank.
                if recorded:  # the recording rank may still be exiting after its quiet peers
                    r = min(recorded)
                    c = codes[r] if codes[r] is not None else EXIT_USAGE
                else:
                    r, c = min(failed, key=lambda rc: (rc[1] >= 0, rc[0]))
                others = ", ".join(f"rank {o} {describe_exit(oc)}" for o, oc in failed if o != r)
                what = f"stopped on bad input: {recorded[r]}" if r in recorded else describe_exit(c)
                detail = f"rank {r} {what} (attempt {attempt})" + (f"; also {others}" if others else "")
                code = exit_code_for_signal(-c) if c < 0 else c
                return Outcome("failed", code, r, detail)
            if all(c is not None for c in codes):
                if stopping or any(c == EXIT_PREEMPTED for c in codes):
                    return Outcome("preempted", EXIT_PREEMPTED)
                return Outcome("ok", EXIT_OK)
            if self.spec.watchdog_s is None or self.spec.watchdog_s > 0:
                hang = self._check_progress(handle, codes)
                if hang is not None:
                    return hang
            time.sleep(self.poll_s)

    def _limit(self, running: dict[int, RankProgress]) -> dict[int, float]:
        """Each running rank's step watchdog: ``launch.watchdog_s``, or the automatic one from the slowest
        step any rank has reported (ranks train in lockstep) and whether the rank is busy saving."""
        if self.spec.watchdog_s is not None:
            return {r: self.spec.watchdog_s for r in running}
        gaps = [p.gap_s for p in running.values() if p.gap_s is not None]
        gap = max(gaps) if gaps else None
        return {r: auto_watchdog_s(gap, self.spec.collective_timeout_s, busy=p.busy is not None)
                for r, p in running.items()}

    def _check_progress(self, handle: Attempt, codes: list[Optional[int]]) -> Optional[Outcome]:
        running = {r: p for r, p in handle.progress().items() if codes[r] is None}
        limit = self._limit(running)
        stalled = [r for r, p in running.items() if p.age > limit[r]]
        if not stalled:
            return None
        handle.kill()
        frozen = frozen_ranks(running)
        # the rank that stopped running is the cause; the others wait for it in a collective
        r = frozen[0] if frozen else max(stalled, key=lambda x: running[x].age)
        lim = limit[r]
        how = ("launch.watchdog_s" if self.spec.watchdog_s is not None else
               f"launch.watchdog_s auto: {WATCHDOG_FACTOR:g}x the slowest step, within [{WATCHDOG_MIN_S:g} s, "
               f"{WATCHDOG_COLLECTIVE_SHARE:g} x launch.collective_timeout_s]")
        cause = f"{describe_frozen(r, running[r])}; " if frozen else ""
        detail = (f"hang: {cause}no step progress for more than {lim:g} s ({how}) on "
                  f"rank{'s' if len(stalled) > 1 else ''} {', '.join(map(str, sorted(stalled)))}: "
                  f"{format_progress(running)}")
        return Outcome("hang", EXIT_HANG, r, detail)


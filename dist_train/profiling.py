"""Step profiling (``profile.*``): torch.profiler traces of chosen global steps, one per rank, in the run directory.

    profiler = StepProfiler.start(cfg, rank, run_dir, start_step, device, log, is_main, busy=lifecycle.busy,
                                  peers=mesh.host_world_group)
    for step in range(start_step, cfg.train.steps):
        profiler.step_begins(step + 1)      # the step's global number, 1-based as the metric lines count
        ...the step, its checkpoint, evaluation and metric line...
        profiler.step_ends(step + 1, stopping=bool(stop))  # stop: the ranks' agreed stop after this step
    profiler.close()                        # in a finally: a window the run leaves early is still written
    summary["profile_files"] = profiler.files   # rank 0: every rank's files, relative to run.dir

What a traced rank writes (docs/metrics.md, "Profiling training steps"):
  * ``run.dir/profile/rank_{r}_steps_{a}-{b}.pt.trace.json.gz``: the Chrome trace of global steps a..b (both
    included), one ``ProfilerStep#N`` span per step N (the whole loop iteration: data, forward, backward, optimizer,
    and the checkpoint save, evaluation and logging of that step), CPU operators and, on CUDA, kernels; open it in
    ui.perfetto.dev or chrome://tracing. Gzipped: 14x smaller on configs/gpt_tiny.yaml's CPU trace (docs/metrics.md);
    ``.pt.trace.json`` is the suffix TensorBoard's profiler plugin looks for;
  * the top :data:`TOP_OPS` operators by self time over those steps, a table in the rank's ``logs/rank_{r}.log``;
  * with ``profile.memory`` (CUDA only, refused on CPU ranks by the pre-flight):
    ``rank_{r}_steps_{a}-{b}.memory.pickle``, the caching allocator's alloc/free history over the steps and its
    segments after them (pytorch.org/memory_viz).
At the window's end (its last step, or an agreed stop inside it) the ranks exchange which files they wrote; rank 0
says once on the console which ranks traced and where, and lists the files in ``summary.json`` (``profile_files``).

The profiler exists from one warmup step before the window (when this start has a step there: its own start-up then
stays out of the first traced step, as torch.profiler's schedule recommends) to the window's last step; no other step
pays anything for it. A profiled step's ``step_time_s`` includes the profiler's overhead.

Restarts and resumes: a window before this start's first step (resumed past it) is not traced, said once by rank 0; a
window the start cuts (resumed inside it) traces its remaining steps and is named by them; a run that stops inside the
window (exit_interval, preemption, divergence) writes the steps it took. A restart that traces the same steps again
writes ``rank_{r}_steps_{a}-{b}.2.pt.trace.json.gz`` (then ``.3``, ...): an earlier trace is never overwritten. A new
run in the run directory moves an earlier run's ``profile/`` aside with its other records (``run_records.py``).

Profiling observes the computation and never changes it: the losses are bit-identical with and without it
(tests/test_profiling.py). Nor does it end it: a failure of torch.profiler's own code (its start, a step, the trace's
export, the operator table, the CUDA memory history or snapshot) is one warning line on that rank (rank 0's console
too), which traces nothing more, and the training goes on; in a failed run's ``close()`` the run's own error stands.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Optional

import torch
import torch.distributed as dist
from torch.profiler import ProfilerAction, ProfilerActivity, profile

from .config import Config, ConfigError
from .held_stderr import KINETO_NOISE, stderr_held_back
from .logs import LOG_FILE_ONLY

#: the folder of run.dir the traces go to
PROFILE_DIR = "profile"
TRACE_SUFFIX = ".pt.trace.json.gz"
MEMORY_SUFFIX = ".memory.pickle"
#: operators in the rank log's table
TOP_OPS = 15
#: allocator events profile.memory keeps (several KB each; beyond it the oldest are dropped): TorchTitan's value
MEMORY_HISTORY_ENTRIES = 100_000


def check_profile(cfg: Config, on_cuda: bool) -> None:
    """Refuse (ConfigError, one line) a profile setting this training job's ranks (``on_cuda``: they compute on CUDA)
    cannot honour: ``profile.ranks`` beyond the job's ``dp × tp × pp × cp × wp`` ranks (none of them would trace);
    ``profile.memory``, which records the CUDA caching allocator's history, on ranks that run on CPU. The training
    pre-flight asks (launch, run, submit), and ``train()`` again before it starts anything (an in-process call, a
    benchmark's ranks). Not ``dist-train eval``, which traces nothing and may run a profiled training config at
    another world size: the reason this is no part of ``config.check_world_size``, which eval shares."""
    missing = [r for r in cfg.profile.ranks or () if r >= cfg.world_size]
    if missing:
        raise ConfigError(f"profile.ranks = {cfg.profile.ranks!r}: rank {missing[0]} does not exist, the ranks are "
                          f"0..{cfg.world_size - 1}")
    if cfg.profile.memory and not on_cuda:
        raise ConfigError("profile.memory = true: it records the CUDA allocator's history and these ranks run on CPU; "
                          "remove it (the trace of profile.steps still holds every operator's time)")


@dataclass(frozen=True)
class Window:
    """The global steps one start traces: ``first``..``last`` (both included), the profiler warmed up from ``warmup``
    (``first - 1``, or ``first`` when this start has no step before it)."""
    warmup: int
    first: int
    last: int

    @classmethod
    def of(cls, steps: Optional[list], start_step: int) -> Optional["Window"]:
        """``profile.steps`` as this start (resumed at ``start_step``; 0: fresh) reaches it; None: nothing to trace."""
        if steps is None:
            return None
        first, last = max(steps[0], start_step + 1), steps[1]
        if first > last:
            return None
        return cls(warmup=first - 1 if first - 1 > start_step else first, first=first, last=last)

    def action(self, step: int) -> ProfilerAction:
        """torch.profiler's schedule, over global steps (the profiler's ``step_num`` is the global step)."""
        if step < self.warmup or step > self.last:
            return ProfilerAction.NONE
        if step < self.first:
            return ProfilerAction.WARMUP
        return ProfilerAction.RECORD if step < self.last else ProfilerAction.RECORD_AND_SAVE


class StepProfiler:
    """One rank's profiling of one training start (see the module docstring). ``meant``: ``profile.ranks`` names this
    rank; ``traced``: it still traces (False once its profiler failed); every rank follows the window, so that the
    window's end compares what each wrote and rank 0 can say where the traces are."""

    def __init__(self, cfg: Config, window: Optional[Window], rank: int, run_dir: Path, device: torch.device,
                 log: logging.Logger, is_main: bool, busy: Callable[[str], ContextManager], peers: Any = None):
        pr = cfg.profile
        self.window, self.rank, self.device, self.log, self.is_main = window, rank, device, log, is_main
        self.busy, self.peers = busy, peers
        self.meant = window is not None and (pr.ranks is None or rank in pr.ranks)  # profile.ranks names it
        self.traced = self.meant  # and it still traces: no failure of the profiler on it so far
        self.ranks = "every rank" if pr.ranks is None else "rank(s) " + ", ".join(map(str, sorted(pr.ranks)))
        self.memory, self.record_shapes, self.with_stack = pr.memory, pr.record_shapes, pr.with_stack
        self.expected = pr.ranks  # the ranks meant to trace (None: every rank)
        self.dir = Path(run_dir) / PROFILE_DIR
        self.taken: list[int] = []  # window steps begun (every rank): what the trace holds
        self.written: Optional[Path] = None  # this rank's trace, once written
        self.own: list[str] = []  # the files this rank wrote (trace, memory snapshot), relative to the run dir
        #: rank -> its files (relative to the run dir): every rank's once the window's end compared them
        #: (:meth:`_compare`), else this rank's alone
        self.wrote: dict[int, list[str]] = {}
        self._prof: Optional[profile] = None  # started and not yet stopped
        self._history = False  # the CUDA allocator's history recording (profile.memory), not yet stopped
        self._done = window is None

    @classmethod
    def start(cls, cfg: Config, rank: int, run_dir: Path, start_step: int, device: torch.device,
              log: logging.Logger, is_main: bool,
              busy: Callable[[str], ContextManager] = lambda what: contextlib.nullcontext(),
              peers: Any = None) -> "StepProfiler":
        """Every rank, before the first step of this start (resumed at ``start_step``). ``busy``: marks the writing
        of the traces (``Lifecycle.busy``: the automatic watchdog gives it its collective-timeout bound); ``peers``:
        the group of every rank (the mesh's ``host_world_group``; None: one rank), over which the ranks wait for each
        other at the window's end and tell rank 0 what they wrote (:meth:`step_ends`)."""
        window = Window.of(cfg.profile.steps, start_step)
        if cfg.profile.steps is not None and window is None and is_main:
            log.info(f"profile.steps = {cfg.profile.steps}: before this start's first step {start_step + 1} "
                     f"(resumed at step {start_step}), not traced")
        return cls(cfg, window, rank, run_dir, device, log, is_main, busy, peers)

    def _activities(self) -> list[ProfilerActivity]:
        return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])

    def step_begins(self, step: int) -> None:
        """Before global step ``step``'s work: the profiler starts (at the warmup step) or moves on to ``step``."""
        w = self.window
        if w is None or self._done or not w.warmup <= step <= w.last:
            return
        if step >= w.first:
            self.taken.append(step)
        if not self.traced:
            return
        with self._observing(f"step {step}'s profiling"):
            if self.memory and step == w.first:
                self._history = True  # before the call: one that fails half-way is still stopped
                torch.cuda.memory._record_memory_history(max_entries=MEMORY_HISTORY_ENTRIES)
            with stderr_held_back(skip=KINETO_NOISE):
                if self._prof is None:
                    prof = profile(activities=self._activities(), schedule=w.action,
                                   record_shapes=self.record_shapes, with_stack=self.with_stack)
                    # ProfilerStep#N names global step N: the profiler counts from step - 1 (NONE in the schedule,
                    # so start() does nothing but open that step's span, which step() closes unrecorded)
                    prof.step_num = step - 1
                    self._prof = prof  # before start(): a start that fails half-way is still stopped
                    prof.start()
                self._prof.step()  # ProfilerStep#step opens; the schedule's action for it takes effect

    def step_ends(self, step: int, stopping: bool = False) -> None:
        """After global step ``step`` (its checkpoint, evaluation and metric line included); ``stopping``: the run
        stops after it, as every rank agreed (exit_interval, a preemption: every rank at the same step). The window's
        last step, or a stop inside it, stops the profiler and writes the trace. Every rank then waits, marked busy,
        until every rank has written, and learns which did (:meth:`_compare`, over ``peers``, the host world group):
        a rank with nothing to write (``profile.ranks``) would otherwise wait for them in the next step's first
        collective, its heartbeat unchanged and not busy, and the launcher's automatic watchdog (10x the slowest step,
        at least 30 s) take a long write for a hang and kill the job, whose restart traced the window again."""
        if self.window is not None and not self._done and (step == self.window.last or stopping):
            with self.busy("profile"):
                self._finish(compare=True)

    def close(self) -> None:
        """Stop a profiler still running (the run failed inside the window) and write what it recorded. Idempotent.
        Nothing compared: a failed rank must not wait for its peers, so rank 0 knows its own files only."""
        if not self._done:
            with self.busy("profile"):
                self._finish(compare=False)

    @property
    def files(self) -> list[str]:
        """The files written into the profile folder, relative to the run dir, by rank: on rank 0 every rank's once
        the window's end compared them (``summary.json``'s ``profile_files``), else this rank's own."""
        return [f for rank in sorted(self.wrote) for f in self.wrote[rank]]

    def _finish(self, compare: bool) -> None:
        """Stop the profiler, write this rank's trace of the window's steps taken, with ``compare`` learn which ranks
        wrote theirs (collective), and say, on rank 0, where the traces are."""
        self._done = True
        if not self.taken:  # stopped at the warmup step: nothing recorded (nor the allocator's history started)
            if self._prof is not None:
                with self._observing("stopping the profiler"):
                    self._stop()
            return
        a, b = self.taken[0], self.taken[-1]
        if self._prof is not None:
            with self._observing(f"writing steps {a}-{b}'s profile"):
                self._write(a, b)
        self.wrote = {self.rank: list(self.own)}
        if compare and self.peers is not None:
            self.wrote = self._compare()
        known = compare or self.peers is None  # what every rank wrote (one rank: its own is all)
        if self.is_main:
            self._say(a, b, known)

    def _compare(self) -> dict[int, list[str]]:
        """Every rank's files, gathered over ``peers`` (collective, every rank at the window's end): it waits for the
        slowest writer as a barrier would and tells rank 0 what each wrote. Objects, not a flag tensor: a restart's
        names carry a ``.2`` only where an earlier start wrote that name, which rank 0 cannot tell from here. A few
        hundred bytes per rank, once per run."""
        gathered: list[Any] = [None] * dist.get_world_size(self.peers)
        dist.all_gather_object(gathered, (self.rank, self.own), group=self.peers)
        return dict(gathered)

    def _say(self, a: int, b: int, known: bool) -> None:
        """Rank 0's console line: which ranks traced steps a..b and where. ``known``: :attr:`wrote` holds every rank's
        files; otherwise (a failed run, nothing compared) its own only, and the line says no more than that."""
        def has_trace(files: list[str]) -> bool:
            return any(f.endswith(TRACE_SUFFIX) for f in files)

        where = "ui.perfetto.dev or chrome://tracing"
        if not known:
            mine = (f"wrote {Path(self.own[0]).name}" if has_trace(self.own) else "wrote no trace (see above)"
                    if self.meant else "traces nothing (profile.ranks)")
            self.log.info(f"profile: steps {a}-{b}: rank 0 {mine}; the traces of {self.ranks} go into {self.dir}/ "
                          f"({where}), each rank's log says whether its own was written")
            return
        wrote = sorted(r for r, files in self.wrote.items() if has_trace(files))
        meant = sorted(self.wrote) if self.expected is None else sorted(self.expected)
        missing = [r for r in meant if r not in wrote]
        if not wrote:
            self.log.warning(f"profile: steps {a}-{b}: no rank wrote a trace (see the warnings in the ranks' logs)")
            return
        example = next(Path(f).name for f in self.wrote[wrote[0]] if f.endswith(TRACE_SUFFIX))
        who = self.ranks if not missing else "rank(s) " + ", ".join(map(str, wrote))
        line = (f"profile: steps {a}-{b} traced on {who} into {self.dir}/ (e.g. {example}: {where}); top operators in "
                "each traced rank's log; the files in summary.json's profile_files")
        if missing:  # said where it cannot be missed: a rank's trace the user asked for is not there
            self.log.warning(f"{line}; rank(s) {', '.join(map(str, missing))} wrote none (see "
                             f"{'its' if len(missing) == 1 else 'their'} log)")
        else:
            self.log.info(line)

    @staticmethod
    def _exit(prof: profile) -> None:
        """Stop ``prof`` as a ``with`` block's end would: the trace stops and its events are collected."""
        with stderr_held_back(skip=KINETO_NOISE):
            prof.__exit__(None, None, None)

    def _stop(self) -> None:
        """Stop the running profiler (:meth:`_exit`); it is no longer this rank's, even when stopping it fails."""
        prof, self._prof = self._prof, None
        self._exit(prof)

    def _stop_history(self) -> None:
        """Stop the CUDA allocator's history recording (profile.memory); no longer on, even when stopping it fails."""
        self._history = False
        torch.cuda.memory._record_memory_history(enabled=None)

    @contextlib.contextmanager
    def _observing(self, what: str) -> Iterator[None]:
        """Run a piece of torch.profiler's work (``what``, for the warning) that must never end the training it only
        observes, nor replace a failed run's own error in the trainer's ``finally`` (a ``TrainingDiverged``, exit 3):
        any Exception it raises is one warning line (the rank's log, rank 0's console), the rank traces nothing more
        (the profiler and the allocator's history stopped as far as they stop) and the run goes on. It still follows
        the window, so that its end waits with the other ranks (:meth:`step_ends`)."""
        try:
            yield
        except Exception as e:
            reason = (str(e).splitlines() or [""])[0]
            self.log.warning(f"profile: {what} failed on rank {self.rank} ({type(e).__name__}: {reason}); "
                             "it traces nothing more, the training goes on")
            self.traced = False
            # a profiler that failed may fail again as it stops: nothing more is saved from it either way
            if self._prof is not None:
                with contextlib.suppress(Exception):
                    self._stop()
            if self._history:
                with contextlib.suppress(Exception):
                    self._stop_history()

    def _free_name(self, a: int, b: int) -> str:
        """``rank_{r}_steps_{a}-{b}``, or with ``.2``, ``.3``, ... when an earlier start wrote that name."""
        base = name = f"rank_{self.rank}_steps_{a}-{b}"
        n = 1
        while (self.dir / f"{name}{TRACE_SUFFIX}").exists() or (self.dir / f"{name}{MEMORY_SUFFIX}").exists():
            n += 1
            name = f"{base}.{n}"
        return name

    def _write(self, a: int, b: int) -> None:
        """Stop the profiler and write this rank's trace (and memory snapshot) of steps a..b into the run's profile
        folder, the top operators into its log. A file that cannot be written is said (a warning), not raised: the
        training it observed stands (and any other failure here: :meth:`_observing`, around it)."""
        prof = self._prof
        name = None
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            name = self._free_name(a, b)
            if self.memory:  # first: the allocator's state right after the window's last step
                torch.cuda.memory._dump_snapshot(str(self.dir / f"{name}{MEMORY_SUFFIX}"))
                self.own.append(f"{PROFILE_DIR}/{name}{MEMORY_SUFFIX}")
        except OSError as e:
            self.log.warning(f"profile: steps {a}-{b} could not be written into {self.dir} ({e})")
        finally:
            if self._history:
                self._stop_history()
            self._stop()
        path = self.dir / f"{name}{TRACE_SUFFIX}" if name is not None else None
        if path is not None:
            try:
                prof.export_chrome_trace(str(path))
                self.written = path
                self.own.insert(0, f"{PROFILE_DIR}/{path.name}")  # the trace first: what the console line names
            except OSError as e:
                self.log.warning(f"profile: the trace of steps {a}-{b} could not be written to {path} ({e})")
        cuda = self.device.type == "cuda"
        table = prof.key_averages().table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
                                          row_limit=TOP_OPS)
        self.log.info(f"profile: steps {a}-{b}, the top {TOP_OPS} operators by self {'CUDA' if cuda else 'CPU'} time "
                      f"(trace {path or 'not written'}):\n{table}", extra=LOG_FILE_ONLY)

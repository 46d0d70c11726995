"""Python's cyclic garbage collector during training (``train.gc_interval``).

    gcs = GcSchedule.start(cfg.train.gc_interval)   # every rank, once the model, engine, optimizer and data exist
    for step in ...:
        ...one training step...
        gcs.collect_if_due(step + 1)                  # the same global step on every rank
    gcs.close()                                       # in a finally: the collector as it was before start

Why: a full (generation-2) collection walks every object the collector tracks. A rank holds a few hundred thousand
after building a model (the import heap of torch and friends, the modules, parameters' wrappers, hooks); one full
collection then took 0.41-1.10 s per rank on the shared CPU machine (docs/benchmarks.md, the checkpoint bench). The
automatic collector starts one whenever enough objects have survived younger collections, on each rank at its own
moment (measured: 125 ms on one of two ranks, inside a checkpoint save, docs/benchmarks/gc.md): every other rank then
waits for it at the next collective (a straggler).

What this does, on every rank:
  * at start, one full collection frees the build's garbage and ``gc.freeze()`` moves every survivor (the model, the
    optimizer, the data, the import heap) out of the collector's sight: later collections walk only what training
    allocates after that, and no collection ever walks the model again;
  * ``interval`` 0: Python's automatic collector stays on (it now walks far fewer objects);
  * ``interval`` N > 0: the automatic collector is off, and a full collection runs on every rank after every N global
    steps (step % N == 0, so a resumed run collects at the same steps), inside the step's timed span, so its cost
    shows in the step time instead of being hidden. The reference cycles a step, an evaluation or a checkpoint save
    leaves live at most N steps: memory stays bounded. Megatron-LM's
    ``--manual-gc --manual-gc-interval N`` does the same.

The start's collection and freeze are for a process that is dist-train's own: a rank's heap is frozen before
``train()`` (``cli.import_command_module``, ``spawn``; Ray's ranks are ``dist-train run`` subprocesses), and there the
freeze is left in place (the process exits after training; an earlier run's model, engine and data are still freed by
reference counting, tests/test_gc_schedule.py). A caller whose heap nothing froze (a test or a notebook calling
``train()`` in-process) is not dist-train's to collect or freeze, as ``cli.import_command_module`` says too: its heap
is left as it is (a full collection of it cost ~0.2 s per ``train()`` call in a pytest process), and only the
interval applies. ``close`` restores the collector's on/off state.
"""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass


@dataclass
class GcSchedule:
    """The collector's state for one training run (see the module docstring). ``interval``: ``train.gc_interval``;
    ``frozen``: objects frozen at start (all of them, the import heap included); ``collected_at_start``: unreachable
    objects the start's collection freed; ``collections`` / ``collect_s``: the scheduled collections and their total
    seconds (this rank)."""
    interval: int
    was_enabled: bool
    frozen_before: int
    frozen: int = 0
    collected_at_start: int = 0
    collections: int = 0
    collect_s: float = 0.0

    @classmethod
    def start(cls, interval: int) -> "GcSchedule":
        """In a dist-train process (its heap frozen before), collect once and freeze the survivors; anywhere, turn
        the automatic collector off when ``interval`` > 0."""
        schedule = cls(interval=interval, was_enabled=gc.isenabled(), frozen_before=gc.get_freeze_count())
        if schedule.frozen_before:
            schedule.collected_at_start = gc.collect()
            gc.freeze()
            schedule.frozen = gc.get_freeze_count()
        if interval > 0:
            gc.disable()
        return schedule

    def collect_if_due(self, steps_done: int) -> bool:
        """A full collection after global step ``steps_done`` (1-based) when the schedule says so; True if it ran."""
        if self.interval <= 0 or steps_done % self.interval:
            return False
        t0 = time.perf_counter()
        gc.collect()
        self.collect_s += time.perf_counter() - t0
        self.collections += 1
        return True

    def describe(self) -> str:
        """One line for the run's log."""
        mode = (f"automatic collection off, a full collection on every rank every {self.interval} steps"
                if self.interval > 0 else "Python's automatic collection on (train.gc_interval = 0)")
        start = (f"{self.collected_at_start} unreachable objects freed and {self.frozen:,} frozen before the first step"
                 if self.frozen_before else "the calling process's heap left as it is (nothing frozen before train())")
        return f"gc: {start}; {mode}"

    def close(self) -> None:
        """The collector as it was before :meth:`start` (see the module docstring for the freeze)."""
        if self.was_enabled:
            gc.enable()

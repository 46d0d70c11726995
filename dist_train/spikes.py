"""Loss-spike detection: a finite loss far above the recent ones is treated like a non-finite one.

A run can diverge without ever producing NaN: the loss jumps an order of magnitude and stays there. Left
alone, such a run keeps saving checkpoints and ``checkpoint.keep_last`` prunes the good ones. With
``train.spike_factor`` set, a step whose global loss exceeds ``spike_factor`` × the median loss of the last
``train.spike_window`` applied steps is a spike: the engine does not apply it (weights, optimizer state and
LR schedule unchanged, the same all-rank agreement as a non-finite step) and ``train.on_nonfinite`` decides
what follows (stop: exit 3, the step not saved; skip: go on, counted with the non-finite ones against
``train.max_nonfinite_steps``).

The median (not the mean) keeps one earlier outlier from moving the limit; only applied steps enter the
window, so a run of spikes cannot raise its own limit. The window is saved with every checkpoint, so a
resume judges its very first step the way the interrupted run would have (replaying the batch that spiked
spikes again, instead of passing unjudged while the window refills)."""
from __future__ import annotations

import statistics
from collections import deque
from typing import Iterable, Optional

#: the checkpoint ``extra`` key holding the window (losses of the last applied steps, oldest first)
STATE_KEY = "recent_losses"


class LossSpikeGuard:
    """The window of recent applied-step losses and the limit it sets for the next step.

    ``factor``: ``train.spike_factor`` (None: off, ``limit()`` is always None); ``window``: ``train.spike_window``
    (the limit is set only once that many applied steps are known); ``recent``: losses from a checkpoint."""

    def __init__(self, factor: Optional[float], window: int, recent: Iterable[float] = ()):
        self.factor = factor
        self.window = window
        self.recent: deque[float] = deque(recent, maxlen=window)

    def limit(self) -> Optional[float]:
        """The largest loss the next step may have and still be applied; None while there is no verdict."""
        if self.factor is None or len(self.recent) < self.window:
            return None
        return self.factor * statistics.median(self.recent)

    def is_spike(self, loss: float, limit: Optional[float]) -> bool:
        """``loss`` (finite) exceeds ``limit`` (what ``limit()`` said before the step)."""
        return limit is not None and loss > limit

    def record(self, loss: float) -> None:
        """An applied step's global loss enters the window."""
        self.recent.append(float(loss))

    def state(self) -> list[float]:
        """The window for the checkpoint's ``extra[STATE_KEY]``."""
        return list(self.recent)

    def describe(self, limit: float) -> str:
        """How ``limit`` was set, for the divergence message."""
        return (f"> train.spike_factor {self.factor:g} x median {limit / self.factor:g} of the last "
                f"{self.window} applied steps")

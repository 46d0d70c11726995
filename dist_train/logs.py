"""Per-rank logging: everything to ``run.dir/logs/rank_N.log``; the console gets INFO on rank 0 and
WARNING and above on other ranks (``DIST_TRAIN_VERBOSE_RANKS=all`` prints INFO everywhere). A record logged with
``extra=LOG_FILE_ONLY`` (detail a person reads when looking into a run, not at every start) goes to the file only.
Launchers prefix console lines with the rank; they never need to parse levels.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Iterator, Optional

from tqdm import tqdm

LOGGER_NAME = "dist_train"
#: ``log.info(msg, extra=LOG_FILE_ONLY)``: into rank_N.log, not onto the console
LOG_FILE_ONLY = {"console": False}


class _ConsoleHandler(logging.StreamHandler):
    """Writes through tqdm so metric lines never tear rank 0's progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def setup_logging(rank: int, run_dir: Optional[Path]) -> logging.Logger:
    """The ``dist_train`` logger for this rank of a job (module docstring), inside :func:`caller_logging`: the
    handlers it had are the caller's, taken off here and put back (and this job's closed) when the job ends."""
    log = logging.getLogger(LOGGER_NAME)
    for h in list(log.handlers):
        log.removeHandler(h)
    log.setLevel(logging.INFO)
    log.propagate = False
    console = _ConsoleHandler(sys.stdout)
    verbose = os.environ.get("DIST_TRAIN_VERBOSE_RANKS", "") == "all"
    console.setLevel(logging.INFO if rank == 0 or verbose else logging.WARNING)
    console.setFormatter(logging.Formatter("%(message)s" if rank == 0 else "%(levelname)s %(message)s"))
    console.addFilter(lambda record: getattr(record, "console", True))
    log.addHandler(console)
    if run_dir is not None:
        logs = Path(run_dir) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(logs / f"rank_{rank}.log")
        fh.setLevel(logging.INFO)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(fh)
    return log


@contextlib.contextmanager
def caller_logging() -> Iterator[None]:
    """The ``dist_train`` logger as the caller had it (handlers, level, propagation), on return or error. A job
    run in-process (a notebook or a test calling ``train()``) sets it up for its rank: its run's ``rank_N.log``
    otherwise stayed open, and every later ``dist_train`` record of the caller's process (a checkpoint it converts
    next, say) went into that finished run's log and onto the console in the job's format."""
    log = logging.getLogger(LOGGER_NAME)
    handlers, level, propagate = list(log.handlers), log.level, log.propagate
    try:
        yield
    finally:
        for handler in list(log.handlers):
            log.removeHandler(handler)
            if handler not in handlers:
                handler.close()
        for handler in handlers:
            log.addHandler(handler)
        log.setLevel(level)
        log.propagate = propagate

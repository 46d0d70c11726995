"""Experiment trackers: where rank 0's metrics go (``train.trackers``).

    trackers = build_trackers(cfg, run_dir, start_step, is_main)   # [] off rank 0
    trackers.log(step, {"loss": 2.31, "lr": 1e-3, "valid_loss": 2.40, ...})
    trackers.flush()                                                # after each checkpoint
    trackers.close()                                                # at exit (also flushes)

``jsonl`` (run_dir/metrics.jsonl, one record per logged step), ``tensorboard`` (event files under
run_dir/tensorboard: ``tensorboard --logdir runs/``) and ``wandb`` (offline files under run_dir/wandb
unless WANDB_MODE says otherwise; never a network call by default). Default: jsonl + tensorboard when
the package is installed. Each tracker module imports its package at its top and is imported only when
configured. A resumed run continues the same curves: records after the resumed step are dropped
(jsonl), purged (TensorBoard ``purge_step``) or ignored (W&B keeps the run id in run_dir/wandb_run_id);
a run that starts at step 0 in an old run directory starts new curves there (the trainer first moves the
earlier run's records to run_dir/previous/<time>/: dist_train/run_records.py).
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Iterable, Protocol

from ..config import Config, default_trackers

#: record key -> (tracker tag, scale): what TensorBoard and W&B show, grouped by panel
TAGS = {
    "loss": ("train/loss", 1.0),
    "valid_loss": ("valid/loss", 1.0),
    "lr": ("train/lr", 1.0),
    "grad_norm": ("train/grad_norm", 1.0),
    "consumed_samples": ("train/consumed_samples", 1.0),
    "tokens_per_s": ("perf/tokens_per_s", 1.0),
    "tflops_per_device": ("perf/tflops_per_device", 1.0),
    "mfu": ("perf/mfu", 1.0),
    "step_time_s": ("perf/step_time_s", 1.0),
    "peak_mem_bytes": ("memory/peak_gib", 1.0 / 2 ** 30),
    "checkpoint_save_s": ("checkpoint/save_s", 1.0),
}
MODULES = {"jsonl": "jsonl_tracker", "tensorboard": "tensorboard_tracker", "wandb": "wandb_tracker"}


def scalars(record: dict) -> dict[str, float]:
    """The record's numbers under their tracker tags (unknown keys and non-numbers are skipped)."""
    out = {}
    for key, value in record.items():
        if key in TAGS and isinstance(value, (int, float)) and not isinstance(value, bool):
            tag, scale = TAGS[key]
            out[tag] = float(value) * scale
    return out


class Tracker(Protocol):
    def log(self, step: int, record: dict) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


class Trackers:
    """Every configured tracker behind one interface (empty on ranks other than 0)."""

    def __init__(self, trackers: Iterable[Tracker] = ()):
        self.trackers = list(trackers)

    def log(self, step: int, record: dict) -> None:
        for t in self.trackers:
            t.log(step, record)

    def flush(self) -> None:
        for t in self.trackers:
            t.flush()

    def close(self) -> None:
        for t in self.trackers:
            t.close()
        self.trackers = []


def build_trackers(cfg: Config, run_dir: Path, start_step: int, is_main: bool) -> Trackers:
    """The trackers of ``train.trackers`` (default :func:`~dist_train.config.default_trackers`) for a run
    continuing after ``start_step``; none off rank 0."""
    if not is_main:
        return Trackers()
    names = cfg.train.trackers if cfg.train.trackers is not None else default_trackers()
    out = []
    for name in names:
        module = importlib.import_module(f"{__name__}.{MODULES[name]}")
        out.append(module.open_tracker(cfg, Path(run_dir), start_step))
    return Trackers(out)

"""Weights & Biases, offline by default: files under ``run_dir/wandb`` (``wandb sync`` uploads them later).

No network call unless the user asked for one (``WANDB_MODE=online``); the run id is kept in
``run_dir/wandb_run_id`` so a resumed run appends to the same W&B run.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import wandb

from ..config import Config
from . import scalars


class WandbTracker:
    def __init__(self, cfg: Config, run_dir: Path, start_step: int):
        id_file = run_dir / "wandb_run_id"
        # a resumed run appends to its W&B run; a run starting from step 0 is a new W&B run
        run_id = id_file.read_text().strip() if id_file.is_file() and start_step else uuid.uuid4().hex[:16]
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "dist-train"), name=cfg.run.name, id=run_id,
                              dir=str(run_dir), resume="allow", config=cfg.to_dict(),
                              mode=os.environ.get("WANDB_MODE", "offline"))

    def log(self, step: int, record: dict) -> None:
        # W&B keeps steps increasing: a resumed run's steps up to what the earlier attempt logged are
        # dropped by W&B itself (with its warning), the rest continue the same run's curves
        self.run.log(scalars(record), step=step)

    def flush(self) -> None:
        """W&B writes each ``log`` call through its own process; nothing is buffered here."""

    def close(self) -> None:
        self.run.finish()


def open_tracker(cfg: Config, run_dir: Path, start_step: int) -> WandbTracker:
    return WandbTracker(cfg, run_dir, start_step)

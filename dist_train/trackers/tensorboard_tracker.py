"""TensorBoard event files under ``run_dir/tensorboard`` (``tensorboard --logdir runs/`` compares runs)."""
from __future__ import annotations

from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from ..config import Config
from . import scalars


class TensorBoardTracker:
    def __init__(self, log_dir: Path, start_step: int, text: dict):
        # purge_step: a resumed run hides the events an earlier attempt wrote after the resumed step, so
        # the curve continues without duplicate steps (a run starting at step 0 hides every earlier event)
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=start_step + 1, flush_secs=30)
        if not start_step:
            for tag, value in text.items():
                self.writer.add_text(tag, value, 0)

    def log(self, step: int, record: dict) -> None:
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def open_tracker(cfg: Config, run_dir: Path, start_step: int) -> TensorBoardTracker:
    p = cfg.parallel
    layout = f"dp{p.dp} tp{p.tp} pp{p.pp} cp{p.cp} wp{p.wp} zero {p.zero_stage}"
    return TensorBoardTracker(run_dir / "tensorboard", start_step,
                              {"run/name": cfg.run.name, "run/model": cfg.model.kind, "run/layout": layout})

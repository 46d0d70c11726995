"""Training engines: how gradients are reduced and the optimizer steps.

Every engine offers ``train_step(micro_batches, global_count) -> (global mean loss, grad norm)``,
``lr`` and ``module`` (the unwrapped model), ``optimizer`` and ``scheduler``.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..config import Config
from ..mesh import Mesh


def build_engine(cfg: Config, model: torch.nn.Module, mesh: Mesh, autocast_dtype: Optional[torch.dtype]):
    """Pick the engine for this config (plain DDP when parallel.zero_stage is null)."""
    from .ddp import DDPEngine

    return DDPEngine(model, mesh, cfg.train, autocast_dtype)

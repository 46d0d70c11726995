"""Training engines: how gradients are reduced and the optimizer steps.

Every engine offers ``train_step(micro_batches, global_count, loss_limit) -> (global mean loss, grad norm)``,
``lr`` and ``module`` (the unwrapped model), ``optimizer`` and ``scheduler``.

    parallel.pp > 1            -> PipelineEngine   (torch.distributed.pipelining; engines/pipeline.py),
                                  its stages sharded by FSDP2 with parallel.fsdp
    parallel.fsdp              -> FSDPEngine       (FSDP2 / ZeRO-3 over the grad group; engines/fsdp.py)
    parallel.zero_stage 0..3   -> DeepSpeedEngine  (ZeRO over the grad group; engines/deepspeed.py)
    otherwise                  -> DDPEngine        (torch DDP over the grad group; engines/ddp.py)
"""
from __future__ import annotations

from typing import Optional

import torch

from ..config import Config
from ..mesh import Mesh
from .ddp import DDPEngine
from .deepspeed import DeepSpeedEngine  # imports deepspeed itself only when one is built
from .fsdp import FSDPEngine
from .pipeline import PipelineEngine


def build_engine(cfg: Config, model: torch.nn.Module, mesh: Mesh, autocast_dtype: Optional[torch.dtype]):
    """Pick the engine for this config (config validation already rejected zero_stage with pp > 1 or with fsdp)."""
    if mesh.size("pp") > 1:
        return PipelineEngine(cfg, model, mesh, autocast_dtype)
    if cfg.parallel.fsdp:
        return FSDPEngine(cfg, model, mesh, autocast_dtype)
    if cfg.parallel.zero_stage is not None:
        return DeepSpeedEngine(cfg, model, mesh, autocast_dtype)
    return DDPEngine(model, mesh, cfg.train, autocast_dtype)

"""Training engines: how gradients are reduced and the optimizer steps.

Every engine offers ``train_step(micro_batches, global_count) -> (global mean loss, grad norm)``,
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


def build_engine(cfg: Config, model: torch.nn.Module, mesh: Mesh, autocast_dtype: Optional[torch.dtype]):
    """Pick the engine for this config (config validation already rejected zero_stage with pp > 1 or with fsdp)."""
    if mesh.size("pp") > 1:
        from .pipeline import PipelineEngine

        return PipelineEngine(cfg, model, mesh, autocast_dtype)
    if cfg.parallel.fsdp:
        from .fsdp import FSDPEngine

        return FSDPEngine(cfg, model, mesh, autocast_dtype)
    if cfg.parallel.zero_stage is not None:
        from .deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(cfg, model, mesh, autocast_dtype)
    from .ddp import DDPEngine

    return DDPEngine(model, mesh, cfg.train, autocast_dtype)

"""Training engines: how gradients are reduced and the optimizer steps.

Every engine offers ``train_step(micro_batches, global_count, loss_limit) -> (global mean loss, grad norm)``,
``lr`` and ``module`` (the unwrapped model), ``optimizer`` and ``scheduler``, and ``close()``: its owner calls it once,
after the engine's last use (on return or error), and the engine is unusable after it (DeepSpeed's destroys its
engine, which no gc collects; the others release nothing).

    parallel.pp > 1            -> PipelineEngine   (torch.distributed.pipelining; engines/pipeline.py),
                                  its stages sharded by FSDP2 with parallel.fsdp
    parallel.fsdp              -> FSDPEngine       (FSDP2 / ZeRO-3 over the grad group; engines/fsdp.py)
    parallel.zero_stage 0..3   -> DeepSpeedEngine  (ZeRO over the grad group; engines/deepspeed.py),
                                  DeepSpeedForwardEngine for an evaluation (no optimizer)
    otherwise                  -> DDPEngine        (torch DDP over the grad group; engines/ddp.py),
                                  ForwardEngine for an evaluation (``build_engine(..., evaluation_only=True)``)
"""
from __future__ import annotations

from typing import Optional

import torch

from ..config import Config, ConfigError
from ..mesh import Mesh
from .ddp import DDPEngine, ForwardEngine
from .deepspeed import DeepSpeedEngine, DeepSpeedForwardEngine  # import deepspeed itself only when one is built
from .fsdp import FSDPEngine
from .pipeline import PipelineEngine


def autocast_dtype(cfg: Config, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of ``train.precision`` on ``device``: bf16 for bf16, and for auto on CUDA; None (fp32, no
    autocast) otherwise. The ranks build their engine with it and the pre-flight checks the same precision."""
    p = cfg.train.precision
    if p == "bf16" or (p == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def cpu_autocast_refusal(cfg: Config, autocast_dtype: Optional[torch.dtype], device_type: str,
                         forward_only: bool = False) -> Optional[str]:
    """One line refusing a layout whose backward would fail on CPU, else None; ``forward_only`` (``dist-train eval``:
    no backward ever runs) None.

    Megatron-core's tensor-parallel linears restore autocast in their backward only on CUDA (``custom_bwd``
    for "cuda"), so under CPU autocast their backward multiplies a bf16 gradient by the fp32 weight and fails.
    The pipeline engine's autocast region spans its backward, FSDP2 casts the parameters to bf16, DeepSpeed runs
    no autocast, and sequence parallelism's linears are dist-train's own: what is left is the DDP engine with
    tp > 1 and Megatron's linears (each case run on 2 or 4 CPU ranks). Their forward is right under CPU autocast
    (``custom_fwd`` for "cuda" leaves the CPU's autocast on inside it): an evaluation's bf16 loss at tp 2 matches
    the single-rank one within bf16 rounding (tests/test_eval_command.py)."""
    p = cfg.parallel
    if forward_only or device_type != "cpu" or autocast_dtype is None:
        return None
    if p.tp == 1 or p.pp > 1 or p.fsdp or p.zero_stage is not None:
        return None
    if cfg.model.kind == "gpt" and p.sequence_parallel:
        return None
    sp = ", parallel.sequence_parallel: true" if cfg.model.kind == "gpt" else ""
    return (f"train.precision = {cfg.train.precision} (bf16 autocast) with parallel.tp = {p.tp} on CPU: Megatron-core's "
            f"tensor-parallel layers restore autocast in their backward only on CUDA, so the backward fails here; use "
            f"train.precision: fp32 (the CPU default){sp}, parallel.fsdp or parallel.pp > 1")


def build_engine(cfg: Config, model: torch.nn.Module, mesh: Mesh, autocast_dtype: Optional[torch.dtype],
                 evaluation_only: bool = False):
    """Pick the engine for this config (config validation already rejected zero_stage with pp > 1 or with fsdp).
    ``evaluation_only`` (``dist-train eval``: ``eval_loss_sum`` and ``checkpoint_kwargs``, never a training step):
    the DDP engine's place is taken by :class:`ForwardEngine`, without DDP's gradient buckets. The others are
    built as for training: FSDP2 shards and the pipeline's schedule are how their forward runs, their torch AdamW
    allocates no state before a step; DeepSpeed's is :class:`DeepSpeedForwardEngine`, built without an optimizer (no
    fp32 master copy, moments, gradient partitions or buckets). An evaluation runs no backward, so
    :func:`cpu_autocast_refusal` does not apply to it."""
    refusal = cpu_autocast_refusal(cfg, autocast_dtype, next(model.parameters()).device.type, evaluation_only)
    if refusal:
        raise ConfigError(refusal)
    if mesh.size("pp") > 1:
        return PipelineEngine(cfg, model, mesh, autocast_dtype)
    if cfg.parallel.fsdp:
        return FSDPEngine(cfg, model, mesh, autocast_dtype)
    if cfg.parallel.zero_stage is not None:
        if evaluation_only:
            return DeepSpeedForwardEngine(cfg, model, mesh, autocast_dtype)
        return DeepSpeedEngine(cfg, model, mesh, autocast_dtype)
    if evaluation_only:
        return ForwardEngine(model, mesh, autocast_dtype)
    return DDPEngine(model, mesh, cfg.train, autocast_dtype)

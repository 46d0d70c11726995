"""FSDP2 (``torch.distributed.fsdp.fully_shard``): ZeRO-3 data parallelism that composes with pp, tp and cp.

What is sharded, over which ranks. FSDP2 shards every parameter (dim 0, padded to a multiple of the shard
count), its gradient and therefore the optimizer state over the mesh's **grad axes** ``dp × wp × cp``
(``Mesh.grad_mesh``, one flattened 1-D DeviceMesh) — every axis over which weights would otherwise be
replicated, as TorchTitan shards over ``dp_shard × cp``. Per rank the model, gradient and AdamW bytes are
the tp shard / pipeline stage's bytes divided by ``grad_size``. Pipeline stages and tensor-parallel
shards are sharded independently: FSDP only ever sees this rank's (Megatron-local) tensors, so tp and pp
compose without DTensor tensor parallelism.

Units (one all-gather in forward, one in backward when ``reshard_after_forward``, one reduce-scatter of
gradients in backward, each overlapping the neighbouring unit's compute on CUDA):
    each transformer block / Swin block ........ ``fully_shard(block)``
    single stage (no pp): the root (embedding, final norm, head) ``fully_shard(model)`` — never resharded
        between forward and backward (FSDP2's root rule), which also keeps tied embeddings whole
    pipeline stage: the stage module (embedding on the first stage) is the root the schedule drives
        (gradient sync on the last micro-batch only, ``PipelineStage``'s FSDP path); the last stage's
        final norm and head, called from the schedule's loss function (``pipeline.LossHead``), are one
        more root unit.

Loss contract (identical to DDP): backward of ``loss_sum · grad_size / global_count``; FSDP2's
reduce-scatter *averages* over the ``grad_size`` shard ranks, so every shard holds its slice of
d(mean over all real tokens of the global batch).

Mixed precision: in bf16 (``train.precision`` bf16 on any device, or auto on CUDA: ``engines.autocast_dtype``)
FSDP2 all-gathers bf16 copies of the fp32 sharded parameters (``MixedPrecisionPolicy(param_dtype=bf16,
reduce_dtype=fp32)``): compute in bf16 — the residual stream and every norm input too, which the cost model
counts (``cost.memory.parameters_in_16_bits``) —, gradients reduced in fp32 into fp32 shards, optimizer (master
weights and moments) in fp32. In fp32 (auto on CPU) everything stays fp32.

Megatron's tensor-parallel attributes (``tensor_model_parallel``, ``partition_dim``) live on the original
parameter objects; ``fully_shard`` replaces them with new DTensor parameters, so they are copied over —
the gradient norm and the checkpoint's tp adapter read them.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from ..checkpoint.adapters import engine_checkpoint_kwargs
from ..config import Config, ParallelConfig
from ..mesh import Mesh
from .ddp import DDPEngine

TP_ATTRIBUTES = ("tensor_model_parallel", "partition_dim", "partition_stride")


def mixed_precision(autocast_dtype: Optional[torch.dtype]) -> MixedPrecisionPolicy:
    """bf16 all-gathered parameters and compute, fp32 gradient reduction (fp32 sharded master state);
    the default policy (everything in the parameters' fp32) when no autocast dtype is set (fp32 training)."""
    if autocast_dtype is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=autocast_dtype, reduce_dtype=torch.float32)


def layer_units(model: nn.Module) -> list[nn.Module]:
    """The per-layer FSDP units: the GPT's transformer blocks or the Swin model's window blocks."""
    if hasattr(model, "layers"):
        return list(model.layers.values())
    return list(model.blocks.values())  # a ModuleDict keyed by the global block index


class FSDPSharder:
    """Applies ``fully_shard`` over ``mesh.grad_mesh`` with one policy (reshard, mixed precision) and keeps
    Megatron's tp attributes on the new parameters. ``shard(modules)`` may be called bottom-up repeatedly."""

    def __init__(self, mesh: Mesh, parallel: ParallelConfig, autocast_dtype: Optional[torch.dtype]):
        if mesh.grad_mesh is None:
            raise ValueError(f"parallel.fsdp: no ranks to shard over (mesh {mesh.describe()}, dp × wp × cp = 1)")
        self.mesh = mesh.grad_mesh
        self.reshard_after_forward = parallel.fsdp_reshard_after_forward
        self.mp_policy = mixed_precision(autocast_dtype)

    def shard(self, modules, root: bool = False) -> FSDPModule:
        """``fully_shard`` on one module or a list of modules grouped into one unit. ``root``: leave
        ``reshard_after_forward`` to FSDP2's root rule (kept gathered until backward)."""
        group = modules if isinstance(modules, list) else [modules]
        saved = [{a: getattr(p, a) for a in TP_ATTRIBUTES if hasattr(p, a)} for m in group for p in m.parameters()]
        names = [[n for n, _ in m.named_parameters()] for m in group]
        out = fully_shard(modules, mesh=self.mesh, mp_policy=self.mp_policy,
                          reshard_after_forward=None if root else self.reshard_after_forward)
        # fully_shard registers new DTensor parameters in the same order under the same names
        new = [p for m, ns in zip(group, names) for p in (dict(m.named_parameters())[n] for n in ns)]
        for attrs, p in zip(saved, new):
            for a, v in attrs.items():
                setattr(p, a, v)
        return out

    def shard_model(self, model: nn.Module) -> FSDPModule:
        """Single stage: every layer, then the root (embedding, final norm, head)."""
        for unit in layer_units(model):
            self.shard(unit)
        return self.shard(model, root=True)

    def shard_stages(self, stage_modules: Sequence[nn.Module], loss_head: Optional[nn.Module]) -> None:
        """Pipeline: each stage's layers, the loss head (final norm + output, its own root: the schedule
        calls it outside the stage module) when this rank holds the last stage, then each stage module as
        its schedule-driven root."""
        for sm in stage_modules:
            for block in sm.blocks:
                self.shard(block)
        if loss_head is not None:
            self.shard(loss_head, root=True)
        for sm in stage_modules:
            self.shard(sm, root=True)


class FSDPEngine(DDPEngine):
    """The DDP engine's loop (``train_step``, clipping, schedule) with FSDP2 instead of DDP: the model is
    sharded in place before the optimizer is built, so AdamW only ever sees (and allocates state for) this
    rank's shards. Every micro-batch's backward reduce-scatters its gradients (ZeRO-3: no full-size
    gradient survives a micro-batch)."""

    def __init__(self, cfg: Config, model: nn.Module, mesh: Mesh, autocast_dtype: Optional[torch.dtype]):
        self._sharder = FSDPSharder(mesh, cfg.parallel, autocast_dtype)
        super().__init__(model, mesh, cfg.train, autocast_dtype)

    def _wrap(self, model: nn.Module) -> nn.Module:
        return self._sharder.shard_model(model)

    def checkpoint_kwargs(self) -> dict:
        """Sharded DTensor state; under tp each shard's blocks of the tp=1 tensor (checkpoint/adapters.py
        ``engine_checkpoint_kwargs``, ``fsdp_rectangles``)."""
        return engine_checkpoint_kwargs(self.module, self.mesh)

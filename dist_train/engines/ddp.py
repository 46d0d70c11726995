"""The baseline engine: torch DDP over every axis holding replicated weights (dp × wp × cp).

Loss contract: each micro-batch's ``loss_sum`` is scaled by ``grad_size / global_count`` before
backward; DDP *averages* over its ``grad_size`` ranks, so the reduced gradient is exactly
d(Σ loss over the global batch / global token count) — the mean over all real tokens, whatever dp,
cp, wp and accumulation are. Tensor-parallel layers reduce their activations' gradients inside
Megatron's mappings; the reported/clipped norm is the full model's (``grads.grad_norm_on_device``).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ..checkpoint.adapters import engine_checkpoint_kwargs
from ..config import TrainConfig
from ..mesh import Mesh
from ..optim import build_optimizer, build_scheduler
from .batches import batch_to_device, forward_loss_sum
from .grads import all_ranks_accept, all_reduce_sum, clip_grads_, grad_norm_on_device, read_floats

__all__ = ["DDPEngine", "ForwardEngine", "all_reduce_sum", "checked_step"]


def checked_step(engine, params: list[nn.Parameter], loss_sum: torch.Tensor, global_count: float,
                 loss_limit: Optional[float]) -> tuple[float, float]:
    """The end of an engine's step (DDP/FSDP and pipeline alike) -> (global mean loss, pre-clip gradient norm).

    ``engine``: has ``mesh``, ``optimizer``, ``scheduler``, ``grad_clip`` and sets ``last_step_skipped``.
    ``params``: the parameters whose (already reduced) gradients are measured, clipped and stepped.
    ``loss_sum``: the global batch's loss sum (float64, shape (1,), on the device), read with the norm and the ranks'
    agreement on the step (:func:`~.grads.all_ranks_accept`) in one host copy: the step's one wait for the device (the
    skip decision and the clipping coefficient need these values on the host). When the loss or the norm is not
    finite on any rank, or the loss exceeds ``loss_limit``, nothing is applied (``last_step_skipped``): the weights,
    optimizer state and schedule stay as they were and the gradients are dropped."""
    norm = grad_norm_on_device(params, engine.mesh.tp_group, engine.mesh.pp_group)
    accept = all_ranks_accept(loss_sum, norm, global_count, loss_limit)
    total, norm, accepted = read_floats(loss_sum, norm, accept)
    loss = total / global_count
    engine.last_step_skipped = accepted != 1.0
    if not engine.last_step_skipped:
        clip_grads_(params, norm, engine.grad_clip)
        engine.optimizer.step()
        engine.scheduler.step()
    engine.optimizer.zero_grad(set_to_none=True)
    return loss, norm


class ForwardEngine:
    """The DDP engine's forward-only part, for ``dist-train eval`` (``build_engine(..., evaluation_only=True)``):
    ``module``, ``eval_loss_sum`` and ``checkpoint_kwargs`` over the unwrapped model, and nothing a training step
    needs. DDP's wrapper allocates flat gradient buckets at construction (a second copy of the weights' bytes) and
    broadcasts rank 0's weights; the evaluation's forward never runs through it and loads every weight itself."""

    def __init__(self, model: nn.Module, mesh: Mesh, autocast_dtype: Optional[torch.dtype]):
        self.module = model
        self.mesh = mesh
        self.autocast_dtype = autocast_dtype

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        device_type = next(self.module.parameters()).device.type
        return torch.autocast(device_type, dtype=self.autocast_dtype)

    def checkpoint_kwargs(self) -> dict:
        """Extra CheckpointManager arguments: with tp > 1 an adapter that saves Megatron shards as DTensors
        of the full shape (checkpoint/adapters.py), else none."""
        return engine_checkpoint_kwargs(self.module, self.mesh)

    def eval_loss_sum(self, micro: list[dict]) -> float:
        """Forward only (no gradients, weights untouched) over this rank's micro-batches -> the loss sum of
        the whole global batch (all-reduced over the grad group), for validation."""
        return forward_loss_sum(self.module, micro, next(self.module.parameters()).device, self.mesh.grad_group,
                                self._autocast)

    def close(self) -> None:
        """Nothing to release (every engine has ``close()``, called once when ``train()`` or ``evaluate_checkpoint()``
        is done with it: DeepSpeed's must destroy its engine). This one, DDP's and FSDP2's hold their model, optimizer
        and process groups in no cycle through autograd nodes (a DDP- or FSDP2-wrapped model that ran a step is collected
        once unreferenced: checked on one gloo rank, torch 2.13), so they go with the engine."""


class DDPEngine(ForwardEngine):
    def __init__(self, model: nn.Module, mesh: Mesh, cfg: TrainConfig, autocast_dtype: Optional[torch.dtype]):
        super().__init__(model, mesh, autocast_dtype)
        self.grad_size = mesh.grad_size
        self.wrapped: nn.Module = self._wrap(model)
        self.optimizer = build_optimizer(list(model.named_parameters()), cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.grad_clip = cfg.grad_clip
        self.last_step_skipped = False  # the last train_step was not accepted (non-finite, spike): nothing applied

    def _wrap(self, model: nn.Module) -> nn.Module:
        """The module the forward runs through (subclasses shard instead); built before the optimizer."""
        return model if self.mesh.grad_group is None else DDP(model, process_group=self.mesh.grad_group)

    def forward_backward(self, batch: dict, inv_global_count: float, last_micro: bool) -> torch.Tensor:
        """Forward + backward of one micro-batch; returns its (detached) loss sum."""
        sync = last_micro or not isinstance(self.wrapped, DDP)
        with (contextlib.nullcontext() if sync else self.wrapped.no_sync()):
            with self._autocast():
                loss_sum, _ = self.wrapped(batch)
            (loss_sum * (self.grad_size * inv_global_count)).backward()
        return loss_sum.detach().float()

    def train_step(self, micro: list[dict], global_count: float,
                   loss_limit: Optional[float] = None) -> tuple[float, float]:
        """One optimizer step over this rank's micro-batches -> (global mean loss, pre-clip grad norm).

        ``global_count``: real tokens (or elements) in the whole global batch, summed over grad_group.
        ``loss_limit``: a global loss above it is not applied, like a non-finite one (dist_train/spikes.py).
        """
        device = next(self.module.parameters()).device
        # the loss sums add up on the device, in float64 in micro-batch order (the same sum a host accumulator gave):
        # a host copy per micro-batch would make the host wait for each micro-batch's forward and backward before
        # queueing the next one's kernels
        loss_sum = torch.zeros(1, dtype=torch.float64, device=device)
        for m, batch in enumerate(micro):
            batch = batch_to_device(batch, device)
            loss_sum += self.forward_backward(batch, 1.0 / global_count, m == len(micro) - 1).double()
        all_reduce_sum(loss_sum, self.mesh.grad_group)
        return self.step(loss_sum, global_count, loss_limit)

    def step(self, loss_sum: torch.Tensor, global_count: float,
             loss_limit: Optional[float] = None) -> tuple[float, float]:
        """Clip, step, zero grads, advance the LR schedule -> (global mean loss, pre-clip gradient norm); a step not
        accepted applies nothing (:func:`checked_step`). ``loss_sum``: the global batch's loss sum (float64, shape
        (1,), on the device)."""
        params = [p for p in self.module.parameters() if p.grad is not None]
        return checked_step(self, params, loss_sum, global_count, loss_limit)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

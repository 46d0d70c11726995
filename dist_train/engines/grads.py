"""Gradient arithmetic shared by the engines: the FULL-model gradient norm, clipping, bucketed reduction.

Norm over the full model (what every engine reports and clips by):
    ||g||² = Σ_tp (Σ tp-sharded params' squares) + Σ replicated params' squares, then Σ over pp.
Replicated parameters (norms) are identical on every tp rank and counted once; each pipeline stage
holds different parameters, so stages add. Ranks along dp/cp/wp hold identical (already reduced)
gradients and do not add.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from parallelism.host_copy import to_device

from ..distributed import collective_device
from ..models.tensor_parallel import is_tp_sharded


def all_reduce_sum(t: torch.Tensor, group) -> torch.Tensor:
    """In-place SUM over ``group`` (None: nothing to reduce). A tensor away from the group's device (the step's float64
    CPU scalars, token counts and loss sums, over NCCL) is reduced on that device and copied back
    (:func:`~dist_train.distributed.collective_device`); one already there (the gradient norm's partial sums on the
    GPU) is reduced in place, with no host round trip."""
    if group is not None:
        device = collective_device(group)
        if t.device != device:
            moved = to_device(t, device)  # asynchronous: the copy back below is the one wait
            dist.all_reduce(moved, op=dist.ReduceOp.SUM, group=group)
            t.copy_(moved)
        else:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def global_grad_norm_squared(params: Iterable[torch.nn.Parameter], tp_group=None, pp_group=None) -> torch.Tensor:
    """||g||² of the full model (see module docstring) as a float64 tensor of shape (1,), identical on every rank,
    left where the gradients are: no host copy and no device sync (on NCCL every reduction runs on the GPU).

    FSDP2 gradients are DTensors sharded over the grad mesh: each rank squares its own shard and the sums
    are added over that mesh first (both kinds), then tp and pp as for plain gradients. A rank without
    gradients contributes zeros from a CPU tensor (:func:`all_reduce_sum` reduces it on the group's device)."""
    sums = None  # [tp-sharded, tp-replicated] float64, on the gradients' device
    shard_group = None
    for p in params:
        if p.grad is None:
            continue
        g = p.grad.detach()
        if isinstance(g, DTensor):
            shard_group = g.device_mesh.get_group()
            g = g.to_local()
        square = g.double().pow(2).sum()
        if sums is None:
            sums = torch.zeros(2, dtype=torch.float64, device=square.device)
        sums[0 if is_tp_sharded(p) else 1] += square.to(sums.device)
    if sums is None:
        sums = torch.zeros(2, dtype=torch.float64)
    all_reduce_sum(sums, shard_group)
    sharded, replicated = sums[:1].clone(), sums[1:]
    total = all_reduce_sum(sharded, tp_group) + replicated
    return all_reduce_sum(total, pp_group)


def grad_norm_on_device(params: Iterable[torch.nn.Parameter], tp_group=None, pp_group=None) -> torch.Tensor:
    """L2 norm of the full model's gradient (:func:`global_grad_norm_squared`) as a float64 tensor of shape (1,),
    still on the device: the engines read it together with the step's loss (:func:`read_floats`), one wait."""
    return global_grad_norm_squared(params, tp_group, pp_group).sqrt()


def global_grad_norm(params: Iterable[torch.nn.Parameter], tp_group=None, pp_group=None) -> float:
    """L2 norm of the full model's gradient (:func:`global_grad_norm_squared`); every rank gets the same value.

    A host read: on a GPU it waits for the device."""
    return float(grad_norm_on_device(params, tp_group, pp_group).item())


def read_floats(*scalars: torch.Tensor) -> list[float]:
    """The values of one-element tensors, read to the host in ONE copy: a device's scalars wait for the device once,
    not once each. (Each value is the tensor's own, converted to a Python float exactly as ``float(t.item())``.)"""
    device = scalars[0].device
    return torch.cat([t.detach().reshape(1).to(device) for t in scalars]).tolist()


def all_ranks_accept(loss_sum: torch.Tensor, norm: torch.Tensor, global_count: float,
                     loss_limit: Optional[float] = None) -> torch.Tensor:
    """1.0 (accept) or 0.0, a float64 tensor of shape (1,) on the device, the same on every rank: 1.0 iff on every rank
    of the job (MIN over the default group) the loss ``loss_sum / global_count`` and the gradient norm are finite and
    the loss is at most ``loss_limit`` (None: no limit; see dist_train/spikes.py). ``loss_sum``, ``norm``: float64
    tensors of shape (1,) on the device.

    The loss and the gradient norm are already equal on all ranks when the engines' reductions are
    exact; the agreement makes the skip decision collective even when a reduction was not (a NaN on
    one dp rank only), so no rank ever applies a step that another skipped.

    Decided on the device (the same float64 division and comparisons the host would make) and left there: the engines
    read it with the loss and the norm in one copy (:func:`read_floats`), so the agreement adds no wait for the device
    of its own."""
    loss = loss_sum / global_count
    ok = torch.isfinite(loss) & torch.isfinite(to_device(norm, loss.device))  # (a rank with no gradients: a host norm)
    if loss_limit is not None:
        ok &= loss <= loss_limit
    flag = ok.to(torch.float64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flag = to_device(flag, collective_device(None))
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return flag


def clip_grads_(params: Iterable[torch.nn.Parameter], norm: float, max_norm: float) -> None:
    """torch.nn.utils.clip_grad_norm_'s rule with a given (global) norm: scale by max/(norm+1e-6) if < 1."""
    if not max_norm or max_norm <= 0:
        return
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0:
        for p in params:
            if p.grad is not None:
                p.grad.detach().mul_(coef)


def all_reduce_grads_(params: list[torch.nn.Parameter], group: Optional[dist.ProcessGroup]) -> None:
    """SUM every gradient over ``group`` in one flat buffer per dtype (missing grads count as zero)."""
    if group is None:
        return
    by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for p in params:
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            by_dtype.setdefault(p.grad.dtype, []).append(p)
    for ps in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in ps])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        offset = 0
        for p in ps:
            n = p.grad.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n

"""A micro-batch onto the device, its layout integers left on the host.

    batch = batch_to_device(batch, device)   # {"tokens": cuda, ..., "cu_seqlens": cpu, "image_size": cpu}

The batchers hand every value over as a host tensor. The model computes on some (tokens, labels, positions, pixels)
and only reads others on the host: the Swin tiling reads ``image_size`` with ``int()``, the attention plan reads
``cu_seqlens`` with ``.tolist()``, the trainer sums ``count``. Moved to a GPU, each of those reads would be a copy
back that waits for every kernel queued before it, once per micro-batch: the host could not queue the next
micro-batch's work until the device had caught up.
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import torch

from parallelism.host_copy import to_device

from .grads import all_reduce_sum

#: batch keys that hold layout integers the model reads on the host, never computes with on the device
HOST_KEYS = frozenset({"image_size", "cu_seqlens", "count"})


def batch_to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """``batch`` with every tensor but :data:`HOST_KEYS` copied to ``device`` (asynchronously, through pinned memory:
    :func:`~parallelism.host_copy.to_device`)."""
    return {k: v if k in HOST_KEYS else to_device(v, device) for k, v in batch.items()}


def forward_loss_sum(forward: Callable[[dict], tuple], micro: list[dict], device: torch.device, group,
                  context: Callable[[], ContextManager] = contextlib.nullcontext) -> float:
    """Forward only (no gradients, weights untouched) of this rank's micro-batches -> the loss sum of the whole global
    batch, for validation: each ``forward(batch)[0]`` (a scalar loss sum) added in float64 on ``device`` (no host
    read per micro-batch), all-reduced over ``group`` (the grad group), read once. ``context``: entered around the
    forwards (the plain engines' autocast)."""
    loss_sum = torch.zeros(1, dtype=torch.float64, device=device)
    with torch.no_grad(), context():
        for batch in micro:
            loss_sum += forward(batch_to_device(batch, device))[0].double()
    all_reduce_sum(loss_sum, group)
    return float(loss_sum.item())

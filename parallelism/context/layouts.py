"""Sequence layouts: which global token positions each rank of a context-parallel group holds.

Three layouts over P ranks and a global sequence of S tokens (DESIGN.md §2):

* ``contiguous`` — rank r holds tokens [r·S/P, (r+1)·S/P).
* ``striped``    — rank r holds tokens t with t mod P = r (in increasing order).
* ``zigzag``     — the sequence is cut into 2P equal chunks; rank r holds chunks r and 2P−1−r, in that order.

A rank's shard is described exactly by a short list of :class:`Chunk` (arithmetic progressions of
global positions); the ring planner works on these descriptors, never on index tensors, so its
schedule costs O(chunks) to derive whatever S is.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

LAYOUTS = ("contiguous", "striped", "zigzag")


@dataclass(frozen=True)
class Chunk:
    """Global positions ``start + stride * t`` for ``t in range(length)`` (a run of a rank's shard)."""

    start: int
    stride: int
    length: int

    @property
    def last(self) -> int:
        return self.start + self.stride * (self.length - 1)

    def positions(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """LongTensor [length]: the chunk's global positions, built on ``device`` (no host-to-device copy)."""
        return torch.arange(self.length, dtype=torch.long, device=device) * self.stride + self.start


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not supported; valid layouts: {', '.join(LAYOUTS)}")


def required_multiple(world_size: int, layout: str) -> int:
    """The global sequence length must be a multiple of this (P, or 2P for zigzag) to shard evenly."""
    check_layout(layout)
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be >= 1")
    return 2 * world_size if layout == "zigzag" else world_size


def padded_length(seq_len: int, world_size: int, layout: str) -> int:
    """Smallest valid sequence length >= seq_len (what a data layer pads to)."""
    m = required_multiple(world_size, layout)
    return -(-seq_len // m) * m


def check_seq_len(seq_len: int, world_size: int, layout: str) -> None:
    """Raise ValueError naming S, P, the required multiple and the nearest valid lengths."""
    m = required_multiple(world_size, layout)
    if seq_len <= 0 or seq_len % m:
        lower = (seq_len // m) * m
        upper = lower + m
        nearest = f"{lower} or {upper}" if lower > 0 else f"{upper}"
        raise ValueError(
            f"seq_len={seq_len} cannot be sharded over world_size={world_size} with layout={layout!r}: "
            f"it must be a positive multiple of {m}; nearest valid lengths: {nearest} "
            f"(pad with parallelism.context.padded_length)")


def rank_chunks(seq_len: int, rank: int, world_size: int, layout: str) -> tuple[Chunk, ...]:
    """The chunks (in local order) of ``rank``'s shard."""
    check_seq_len(seq_len, world_size, layout)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, {world_size})")
    n = seq_len // world_size
    if layout == "contiguous":
        return (Chunk(rank * n, 1, n),)
    if layout == "striped":
        return (Chunk(rank, world_size, n),)
    c = seq_len // (2 * world_size)
    return (Chunk(rank * c, 1, c), Chunk((2 * world_size - 1 - rank) * c, 1, c))


def sequence_positions(seq_len: int, *, rank: int, world_size: int, layout: str,
                       device: torch.device | str = "cpu") -> torch.Tensor:
    """LongTensor [S/P]: global positions of the local shard, in local order (use them for RoPE/masks), built on
    ``device`` (no host-to-device copy, which on a GPU waits for the device)."""
    return torch.cat([c.positions(device) for c in rank_chunks(seq_len, rank, world_size, layout)])


def _rank_and_size(group: Optional[dist.ProcessGroup]) -> tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


class _Shard(torch.autograd.Function):
    """Replicated full tensor -> this rank's shard; backward all-gathers the shard gradients."""

    @staticmethod
    def forward(ctx, x, dim, group, layout):
        rank, size = _rank_and_size(group)
        ctx.dim, ctx.group, ctx.layout = dim, group, layout
        pos = sequence_positions(x.shape[dim], rank=rank, world_size=size, layout=layout, device=x.device)
        return x.index_select(dim, pos)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad.contiguous(), ctx.dim, ctx.group, ctx.layout), None, None, None


class _Unshard(torch.autograd.Function):
    """Shard -> the full tensor on every rank; backward keeps this rank's slice (replicated semantics)."""

    @staticmethod
    def forward(ctx, x_local, dim, group, layout):
        ctx.dim, ctx.group, ctx.layout = dim, group, layout
        return _gather(x_local.contiguous(), dim, group, layout)

    @staticmethod
    def backward(ctx, grad):
        rank, size = _rank_and_size(ctx.group)
        pos = sequence_positions(grad.shape[ctx.dim], rank=rank, world_size=size, layout=ctx.layout,
                                 device=grad.device)
        return grad.index_select(ctx.dim, pos), None, None, None


def _gather(x_local: torch.Tensor, dim: int, group, layout: str) -> torch.Tensor:
    _, size = _rank_and_size(group)
    seq_len = x_local.shape[dim] * size
    parts = [torch.empty_like(x_local) for _ in range(size)]
    dist.all_gather(parts, x_local, group=group)
    order = torch.cat([sequence_positions(seq_len, rank=r, world_size=size, layout=layout, device=x_local.device)
                       for r in range(size)])
    full = torch.empty(list(x_local.shape[:dim]) + [seq_len] + list(x_local.shape[dim + 1:]),
                       dtype=x_local.dtype, device=x_local.device)
    return full.index_copy_(dim, order, torch.cat(parts, dim))


def _norm_dim(x: torch.Tensor, dim: int) -> int:
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim={dim} is out of range for a tensor with {x.dim()} dimensions")
    return dim % x.dim()


def shard_sequence(x: torch.Tensor, *, dim: int, group: Optional[dist.ProcessGroup] = None,
                   layout: str = "zigzag") -> torch.Tensor:
    """Full tensor (identical on all ranks) -> this rank's shard along ``dim`` (local order as documented).

    Differentiable: the backward all-gathers shard gradients (the input is treated as replicated).
    """
    check_layout(layout)
    dim = _norm_dim(x, dim)
    check_seq_len(x.shape[dim], dist.get_world_size(group), layout)
    return _Shard.apply(x, dim, group, layout)


def unshard_sequence(x_local: torch.Tensor, *, dim: int, group: Optional[dist.ProcessGroup] = None,
                     layout: str = "zigzag") -> torch.Tensor:
    """This rank's shard -> the full tensor in original order, on every rank (all-gather + un-permute).

    Differentiable: the backward returns this rank's slice of the (replicated) output gradient.
    """
    check_layout(layout)
    dim = _norm_dim(x_local, dim)
    size = dist.get_world_size(group)
    check_seq_len(x_local.shape[dim] * size, size, layout)
    return _Unshard.apply(x_local, dim, group, layout)

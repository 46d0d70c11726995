"""Ulysses (all-to-all) pieces: head checks, GQA K/V head replication, and the gathered-sequence order.

After ``seq_to_heads`` over a Ulysses group of G ranks, a rank holds the G shards of that group
(in group-rank order) for H/G heads. Those tokens are re-ordered into the order that splits into
the fewest arithmetic runs (for a whole-group Ulysses this is the natural order 0..S−1, i.e. one
causal block), and the ring planner takes over from there.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from ..host_copy import to_device
from .layouts import Chunk, sequence_positions


def check_heads(hq: int, hkv: int, degree: int) -> None:
    if hq % degree:
        lo = (hq // degree) * degree
        raise ValueError(f"Ulysses degree {degree} must divide the query heads Hq={hq}; "
                         f"nearest valid head counts: {lo or degree} or {lo + degree}")


def kv_replication(hq: int, hkv: int, degree: int) -> int:
    """Factor by which K/V heads are repeated so each of ``degree`` ranks gets whole groups.

    1 when Hkv is divisible by the degree (no replication); degree/Hkv when Hkv < degree and divides
    it; otherwise Hq/Hkv (K/V expanded to the query heads, which always splits evenly).
    """
    if hkv % degree == 0:
        return 1
    if degree % hkv == 0:
        return degree // hkv
    return hq // hkv


def replicate_kv(x: torch.Tensor, factor: int) -> torch.Tensor:
    """[B, S, Hkv, D] -> [B, S, Hkv·factor, D], each head repeated ``factor`` times (differentiable)."""
    return x if factor == 1 else x.repeat_interleave(factor, dim=2)


def runs(positions: list[int]) -> tuple[Chunk, ...]:
    """Greedy split of a position list, in the given order, into maximal increasing arithmetic runs."""
    out, i = [], 0
    while i < len(positions):
        j = i + 1
        stride = positions[j] - positions[i] if j < len(positions) else 1
        if stride <= 0:
            stride, j = 1, i + 1         # a descending step starts a new run
        else:
            while j < len(positions) and positions[j] - positions[j - 1] == stride:
                j += 1
        out.append(Chunk(positions[i], stride, j - i))
        i = j
    return tuple(out)


def gathered_order(seq_len: int, members: list[int], world_size: int,
                   layout: str) -> tuple[tuple[Chunk, ...], Optional[torch.Tensor]]:
    """Chunks of the tokens gathered from ``members`` and the permutation (None = keep) applied to them.

    The gathered order is the members' shards concatenated; sorting it is used when that yields
    fewer runs (e.g. zigzag or a whole-group Ulysses), so kernels see larger causal blocks.
    """
    pos = torch.cat([sequence_positions(seq_len, rank=m, world_size=world_size, layout=layout)
                     for m in members])
    as_is = runs(pos.tolist())
    order = torch.argsort(pos)
    by_pos = runs(pos[order].tolist())
    if len(by_pos) < len(as_is):
        return by_pos, order
    return as_is, None


@functools.lru_cache(maxsize=64)
def ring_orders(seq_len: int, degree: int, world_size: int, layout: str) -> tuple[tuple[Chunk, ...], ...]:
    """The chunks each member of the hybrid ring holds after its Ulysses all-to-all (:func:`gathered_order` of the
    ``degree`` consecutive ranks of ring member i, for i < world_size / degree), in ring order. Made once per shape:
    every layer of every step runs the same ring, and building the positions on the host each call (a tensor per
    rank, a sort, a walk over every position) would hold the host up in every layer call."""
    return tuple(gathered_order(seq_len, list(range(i * degree, (i + 1) * degree)), world_size, layout)[0]
                 for i in range(world_size // degree))


@functools.lru_cache(maxsize=64)
def gathered_permutation(seq_len: int, members: tuple[int, ...], world_size: int, layout: str,
                         device: torch.device) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`gathered_order`'s permutation and its inverse, LongTensors [len(members) * S/P] on ``device`` (None: the
    gathered order is kept). Made once per shape and device: a hybrid layer applies them in every call, and a copy
    to the GPU per call would be a wait for the device (the pinned, asynchronous copy here is made once)."""
    perm = gathered_order(seq_len, list(members), world_size, layout)[1]
    if perm is None:
        return None
    return to_device(perm, device), to_device(torch.argsort(perm), device)

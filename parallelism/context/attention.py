"""``context_parallel_attention``: validation and dispatch to the ring, Ulysses and hybrid methods.

All three share the ring loop: Ulysses is "all-to-all, then a one-rank ring over the gathered
sequence, then all-to-all back"; hybrid is "all-to-all inside consecutive groups of U ranks, then
a ring over the R = P/U groups".
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.distributed as dist

from .checks import METHODS, check_inputs
from .comm import heads_to_seq, run_local, run_p2p, seq_to_heads
from .documents import CuSeqlens, normalize_cu_seqlens
from .hybrid import subgroups
from .kernels import default_scale, get_kernel
from .layouts import Chunk, rank_chunks
from .plan import build_schedule
from .ring import CPStats, RingAttention
from .ulysses import check_heads, gathered_permutation, kv_replication, replicate_kv, ring_orders

def default_tile(window: Optional[int]) -> Optional[int]:
    """With a window, cut chunks into tiles of ~max(128, w) tokens so work is O(n·w), not O(n²)."""
    if window is None:
        return None
    tile = 128
    while tile < window:
        tile *= 2
    return tile


def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                    window: Optional[int] = None, scale: Optional[float] = None, kernel: str = "auto",
                    tile: Optional[int] = None, cu_seqlens: Optional[CuSeqlens] = None,
                    stats: Optional[CPStats] = None) -> torch.Tensor:
    """Exact attention over a whole, unsharded sequence through the tiled block kernels: the ring
    with one rank (no communication).

    q: [B, S, Hq, D]; k, v: [B, S, Hkv, D] -> [B, S, Hq, D] in q's dtype; the same masks as
    :func:`context_parallel_attention`. With a window the planner cuts the sequence into tiles of
    ``tile`` tokens (default ~max(128, w)) and computes only the tiles the window reaches, so work
    and memory are O(S·w): no [S, S] mask or score matrix, whatever S is. ``cu_seqlens``: packed
    documents, as in :func:`context_parallel_attention` (blocks between documents are skipped).
    """
    check_inputs(q, k, v, seq_len=q.shape[1], world_size=1, layout="contiguous", method="ring", window=window,
                 tile=tile, kv_piece=None, scale=scale)
    docs = normalize_cu_seqlens(cu_seqlens, q.shape[1], q.shape[0])
    scale = default_scale(q.shape[-1], scale)
    tile = default_tile(window) if tile is None else tile
    schedule = build_schedule(((Chunk(0, 1, q.shape[1]),),), causal, window, tile, None, docs)
    return RingAttention.apply(q, k, v, schedule, 0, run_local, get_kernel(kernel, q.device, q.dtype), scale,
                               stats)


def context_parallel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                               group: Optional[dist.ProcessGroup] = None, layout: str = "zigzag",
                               method: str = "ring", ulysses_degree: int = 1, causal: bool = True,
                               window: Optional[int] = None, scale: Optional[float] = None,
                               kernel: str = "auto", tile: Optional[int] = None,
                               kv_piece: Optional[int] = None,
                               cu_seqlens: Optional[CuSeqlens] = None,
                               stats: Optional[CPStats] = None) -> torch.Tensor:
    """Exact attention over the sequence sharded across ``group`` (None = the default group).

    q: [B, S_local, Hq, D]; k, v: [B, S_local, Hkv, D] — this rank's shard in ``layout``
    (``contiguous``/``striped``/``zigzag``). Returns [B, S_local, Hq, D] in q's dtype, equal up to
    rounding to softmax(q·kᵀ·scale + mask)·v over the full sequence with global positions: ``causal``
    allows j <= i; ``window=w`` also needs i − w <= j (and j <= i + w when not causal).

    method: ``ring`` (K/V passed around the group), ``ulysses`` (all-to-all sequence↔heads over the
    whole group; ``ulysses_degree`` must be 1 or P), ``hybrid`` (``ulysses_degree`` U consecutive
    ranks do Ulysses, rings of P/U ranks across them; every rank must call in the same order).
    kernel: ``auto``/``sdpa``/``math``/``flash`` local block kernel. tile: piece size used with
    windows (None = automatic). kv_piece: the ring moves K/V (and dK/dV in backward) in pieces of
    about this many tokens, one sub-ring per piece, so the ring's extra memory is O(kv_piece) instead
    of O(S_local); S/(8P) keeps the peak within 1.2× of single-device attention (None = whole
    shards; fastest).
    cu_seqlens: packed documents — GLOBAL document boundaries ``[0, b_1, …, S]`` (identical on every
    rank), one list shared by the batch or one per sample; a query then attends only to keys of its
    own document. Block pairs with no shared document are neither computed nor sent, blocks inside
    one document keep the causal/full fast path (parallelism/context/documents.py says why global
    boundaries rather than local doc ids). None or ``[0, S]``: one document, today's exact path.
    stats: a :class:`CPStats` to fill with this rank's counters.
    """
    P = dist.get_world_size(group)
    check_inputs(q, k, v, seq_len=q.shape[1] * P, world_size=P, layout=layout, method=method, window=window,
                 tile=tile, kv_piece=kv_piece, scale=scale)
    docs = normalize_cu_seqlens(cu_seqlens, q.shape[1] * P, q.shape[0])
    scale = default_scale(q.shape[-1], scale)
    blk_kernel = get_kernel(kernel, q.device, q.dtype)
    tile = default_tile(window) if tile is None else tile
    seq_len = q.shape[1] * P
    if method == "ring":
        degree = 1
    elif method == "ulysses":
        if ulysses_degree not in (1, P):
            raise ValueError(f"method='ulysses' uses the whole group: ulysses_degree must be 1 or P={P}, "
                             f"got {ulysses_degree} (use method='hybrid' for 1 < U < P)")
        degree = P
    else:
        degree = ulysses_degree
        if degree < 1 or P % degree:
            raise ValueError(f"ulysses_degree={degree} must divide the group size P={P}; valid: "
                             f"{[u for u in range(1, P + 1) if P % u == 0]}")
    if degree == 1:
        chunks = tuple(rank_chunks(seq_len, r, P, layout) for r in range(P))
        schedule = build_schedule(chunks, causal, window, tile, kv_piece, docs)
        drive = functools.partial(run_p2p, group=group)
        return RingAttention.apply(q, k, v, schedule, dist.get_rank(group), drive, blk_kernel, scale, stats)
    return _ulysses_ring(q, k, v, group, degree, layout, causal, window, scale, blk_kernel, tile,
                         kv_piece, docs, stats)


def _ulysses_ring(q, k, v, group, degree, layout, causal, window, scale, blk_kernel, tile, kv_piece,
                  docs, stats):
    """All-to-all inside the Ulysses sub-group, ring across sub-groups, all-to-all back."""
    P = dist.get_world_size(group)
    check_heads(q.shape[2], k.shape[2], degree)
    seq_len = q.shape[1] * P
    sub = subgroups(group, degree)
    factor = kv_replication(q.shape[2], k.shape[2], degree)
    k, v = replicate_kv(k, factor), replicate_kv(v, factor)
    qg, kg, vg = (seq_to_heads(x, sub.ulysses) for x in (q, k, v))      # [B, U·n, H/U, D]
    if stats is not None:
        stats.all_to_all_calls += 3
    chunks = ring_orders(seq_len, degree, P, layout)
    own = tuple(range(sub.ring_rank * degree, (sub.ring_rank + 1) * degree))
    perm = gathered_permutation(seq_len, own, P, layout, q.device)
    if perm is not None:
        perm, inverse = perm
        qg, kg, vg = (x.index_select(1, perm) for x in (qg, kg, vg))
    schedule = build_schedule(chunks, causal, window, tile, kv_piece, docs)
    drive = functools.partial(run_p2p, group=sub.ring)
    out = RingAttention.apply(qg, kg, vg, schedule, sub.ring_rank, drive, blk_kernel, scale, stats)
    if perm is not None:
        out = out.index_select(1, inverse)
    if stats is not None:
        stats.all_to_all_calls += 1
    return heads_to_seq(out, sub.ulysses)

"""THE ring loop: one forward and one backward generator serve every layout, method and driver.

Layouts (and hybrid chunk sets) differ only in the :class:`~parallelism.context.plan.RingPlan`:
which (query piece, key piece) blocks a rank computes against which source, with which mask. The
loop itself is layout-agnostic.

Forward, per step t: post the K/V sends/receives for step t+1 (``batch_isend_irecv``) BEFORE the
local blocks compute, so transfer overlaps compute; merge each block's (out, lse) into the running
fp32 state; wait.

Backward, per step t: the same K/V movement; each block's gradient uses the FINAL (out, lse); dq
accumulates locally in fp32; the dK/dV accumulator of the source travels with its K/V (received at
step start, forwarded after compute, overlapping the next step) and its last holder sends it
straight back to the owner. The owner posts that receive right after its own compute of the step
in which the last holder sends it (never later: the sender waits for it one step on), so the buffer
does not sit next to a step's block gradients.

K/V pieces: a schedule (:func:`~parallelism.context.plan.build_schedule`) may cut every shard's K/V
into pieces of about ``piece`` rows and run one sub-ring per piece, one after the other, into the
same running state. Each sub-ring is this same loop on the piece, so every buffer the ring adds to
what single-device attention holds is O(piece), not O(S/P): the K/V piece in flight, the
travelling dK/dV piece, one block's gradients. The next sub-ring's step 0 is local compute, so
there is no bubble between pieces.

Shapes: q [B, n, Hq, D]; k, v [B, n_k, Hkv, D] (this rank's shard; all ranks have equal shards).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Generator, Optional

import torch

from .comm import Post, Recv, Send, Wait
from .kernels import compute_dtype
from .merge import init_state, merge_
from .plan import BWD, FWD, Piece, RingPlan, RowsView

TAG_KV = {FWD: 10, BWD: 20}
TAG_ACC = {FWD: 30, BWD: 40}
TAG_FINAL = {FWD: 50, BWD: 60}


@dataclass
class CPStats:
    """Counters filled by one rank (pass ``stats=CPStats()``; values accumulate over calls).

    A "K/V block" is this rank's K and V shard, or one K/V piece of it (two tensors, one logical
    message); ``kv_rows_sent`` counts the token rows those forward messages carried.
    """

    kv_blocks_sent: int = 0          # forward ring
    kv_rows_sent: int = 0            # forward ring, token rows of K/V sent
    kv_blocks_sent_bwd: int = 0      # backward ring (K/V re-circulated)
    dkv_blocks_sent: int = 0         # dK/dV accumulators (to the next holder or back to the owner)
    all_to_all_calls: int = 0        # Ulysses exchanges (forward)
    ring_steps: int = 0              # forward ring steps executed
    blocks_computed: int = 0         # forward kernel calls
    # allowed (query, key) pairs computed in forward, per head and batch row; with documents that
    # differ per sample (several cu_seqlens rows) summed over the samples instead (masks.py)
    work_pairs: int = 0
    fwd_step_compute_s: list = field(default_factory=list)   # CPU time of each forward step's compute
    bwd_step_compute_s: list = field(default_factory=list)

    def forward_flops(self, batch: int, heads: int, head_dim: int) -> int:
        """Forward attention FLOPs of the computed pairs: q·kᵀ and p·v, 2·D each per pair and head.
        Skipped blocks (no shared document, outside the window or the causal triangle) cost nothing.
        ``batch``: the batch size, or 1 with per-sample documents (``work_pairs`` already sums the samples)."""
        return 4 * batch * heads * head_dim * self.work_pairs


def _send_block(peer: int, tensors, tag: int) -> list:
    return [Send(peer, t, tag + i) for i, t in enumerate(tensors)]


def _recv_block(peer: int, tensors, tag: int) -> list:
    return [Recv(peer, t, tag + i) for i, t in enumerate(tensors)]


def _exchange_kv(plan: RingPlan, rank: int, t: int, held: dict, like, stats: CPStats, attr: str):
    """Ops moving K/V one hop along each direction at the end of step t, and the receive buffers."""
    P = plan.world_size
    ops, incoming = [], {}
    for d in (FWD, BWD):
        if plan.sends(d, rank, t):
            ops += _send_block((rank + d) % P, held[d], TAG_KV[d])
            setattr(stats, attr, getattr(stats, attr) + 1)
            if attr == "kv_blocks_sent":
                stats.kv_rows_sent += held[d][0].shape[1]
        prev = (rank - d) % P
        if plan.sends(d, prev, t):
            incoming[d] = tuple(torch.empty_like(x) for x in like)
            ops += _recv_block(prev, incoming[d], TAG_KV[d])
    return ops, incoming


def ring_forward(schedule: tuple[Piece, ...], rank: int, q, k, v, kernel, scale: float,
                 stats: CPStats) -> Generator:
    """Yields comm requests; returns (out [B, n, Hq, D], lse [B, Hq, n]) in the compute dtype.

    One sub-ring per K/V piece of the schedule, one after the other, into the same running state.
    """
    o, lse = init_state(q, compute_dtype(q.dtype))
    for piece in schedule:
        kp, vp = piece.gather(k), piece.gather(v)
        yield from _forward_piece(piece.plan, rank, q, kp, vp, o, lse, kernel, scale, stats)
    return o, lse


def _forward_piece(plan: RingPlan, rank: int, q, k, v, o, lse, kernel, scale: float,
                   stats: CPStats) -> Generator:
    """One sub-ring: k, v [B, piece, Hkv, D] are this rank's piece; merges into (o, lse) in place."""
    held = {FWD: (k, v), BWD: (k, v)}
    for t in range(plan.num_steps):
        ops, incoming = _exchange_kv(plan, rank, t, held, (k, v), stats, "kv_blocks_sent")
        handle = (yield Post(ops)) if ops else None
        start = time.thread_time()
        for d, s in plan.work(rank, t):
            kk, vv = held[d] if d else (k, v)
            for b in (blk.call for blk in plan.blocks[rank][s]):
                o_b, lse_b = kernel.forward(q[:, b.q_lo:b.q_hi], kk[:, b.k_lo:b.k_hi],
                                            vv[:, b.k_lo:b.k_hi], b.mask, scale)
                merge_(o[:, b.q_lo:b.q_hi], lse[:, :, b.q_lo:b.q_hi], o_b, lse_b)
                stats.blocks_computed += 1
                stats.work_pairs += b.work
        stats.fwd_step_compute_s.append(time.thread_time() - start)
        stats.ring_steps += 1
        if handle is not None:
            yield Wait(handle)
        held = incoming


def _add_rows(acc, lo: int, hi: int, grad: torch.Tensor, shape, dtype):
    """``acc[:, lo:hi] += grad`` (acc: a tensor, a :class:`RowsView` or None), creating it on first use.

    A block gradient that spans every row (dim 1), is contiguous and already in the accumulator's
    dtype BECOMES the accumulator: no zero-filled buffer next to it and no extra pass over memory.
    """
    if acc is None:
        if lo == 0 and hi == shape[1] and grad.is_contiguous() and grad.dtype == dtype:
            return grad
        acc = torch.zeros(shape, dtype=dtype, device=grad.device)
    if isinstance(acc, RowsView):
        acc.add_rows_(lo, hi, grad)
    else:
        acc[:, lo:hi] += grad
    return acc


def ring_backward(schedule: tuple[Piece, ...], rank: int, q, k, v, o, lse, do, kernel, scale: float,
                  stats: CPStats) -> Generator:
    """Yields comm requests; returns (dq, dk, dv) in the compute dtype for this rank's shard.

    Memory: besides the saved tensors and the results (dq, own dK/dV), a rank holds at most the
    remote K/V piece it computes on, the next one in flight, the dK/dV accumulator it receives, the
    one it sent last step (until that send completes) and this step's block gradients.
    """
    c = compute_dtype(q.dtype)
    state = {"dq": None}
    # K/V travel (and their receive buffers copy their strides): p2p needs contiguous tensors, and a
    # caller's K/V may be a strided view (a [B, H, S, D] projection transposed; a hybrid's gathered
    # K/V with one token per rank and B > 1). The forward's piece.gather makes the same copy.
    k, v = k.contiguous(), v.contiguous()
    if len(schedule) == 1 and schedule[0].length == k.shape[1]:
        dk, dv = yield from _backward_piece(schedule[0].plan, rank, q, k, v, o, lse, do, state,
                                            kernel, scale, stats)
    else:
        dk = torch.zeros(k.shape, dtype=c, device=k.device)
        dv = torch.zeros(v.shape, dtype=c, device=v.device)
        for piece in schedule:
            yield from _backward_piece(piece.plan, rank, q, piece.gather(k), piece.gather(v), o, lse, do,
                                       state, kernel, scale, stats,
                                       own=(piece.accumulator(dk), piece.accumulator(dv)))
    dq = state["dq"] if state["dq"] is not None else torch.zeros(q.shape, dtype=c, device=q.device)
    return dq, dk, dv


def _backward_piece(plan: RingPlan, rank: int, q, k, v, o, lse, do, state: dict, kernel,
                    scale: float, stats: CPStats, own: Optional[tuple] = None) -> Generator:
    """One sub-ring of the backward: k, v [B, piece, Hkv, D] are this rank's piece. dq accumulates in
    ``state["dq"]``; returns (dk, dv) of the piece (own blocks plus what the ring sent back), summed
    in place into ``own`` (the shard's dK/dV rows of the piece: views or RowsViews) when given, so
    no piece-sized accumulator is held.

    The owner posts the receive of its finished remote dK/dV right after its own compute of the step
    in which the last holder sends it (never later: the sender waits for it one step on), so the
    buffer does not sit next to a step's block gradients.
    """
    P = plan.world_size
    c = compute_dtype(q.dtype)
    own_k, own_v = own if own is not None else (None, None)
    held = {FWD: (k, v), BWD: (k, v)}
    finals, final_handles = [], []
    pending, pending_ops = None, []      # last step's accumulator sends (tensors kept alive until waited)
    for t in range(plan.num_steps):
        ops, incoming = _exchange_kv(plan, rank, t, held, (k, v), stats, "kv_blocks_sent_bwd")
        acc = {}
        for d in (FWD, BWD):
            if t >= 2 and plan.on_path(d, rank, t):    # previous holder forwards the accumulator
                acc[d] = (torch.empty(k.shape, dtype=c, device=k.device),
                          torch.empty(v.shape, dtype=c, device=v.device))
                ops += _recv_block((rank - d) % P, acc[d], TAG_ACC[d])
        handle = (yield Post(ops)) if ops else None
        start = time.thread_time()
        parts = {}
        for d, s in plan.work(rank, t):
            kk, vv = held[d] if d else (k, v)
            dk, dv = (own_k, own_v) if d == 0 else (None, None)
            for b in (blk.call for blk in plan.blocks[rank][s]):
                rows, keys = slice(b.q_lo, b.q_hi), slice(b.k_lo, b.k_hi)
                dq_b, dk_b, dv_b = kernel.backward(do[:, rows], q[:, rows], kk[:, keys], vv[:, keys],
                                                   o[:, rows], lse[:, :, rows], b.mask, scale)
                state["dq"] = _add_rows(state["dq"], b.q_lo, b.q_hi, dq_b, q.shape, c)
                dk = _add_rows(dk, b.k_lo, b.k_hi, dk_b, k.shape, c)
                dv = _add_rows(dv, b.k_lo, b.k_hi, dv_b, v.shape, c)
                del dq_b, dk_b, dv_b                   # free each block's gradients before the next block
            if d == 0:
                own_k, own_v = dk, dv
            else:
                parts[d] = (dk, dv)
        stats.bwd_step_compute_s.append(time.thread_time() - start)
        if handle is not None:
            yield Wait(handle)
        if pending is not None:
            yield Wait(pending)
        ops, final_ops = [], []
        for d in (FWD, BWD):
            hops = plan.last[d][rank]
            if hops >= 1 and t == hops:        # the last holder of my block sends it back after this step
                finals.append((torch.empty(k.shape, dtype=c, device=k.device),
                               torch.empty(v.shape, dtype=c, device=v.device)))
                final_ops += _recv_block((rank + d * hops) % P, finals[-1], TAG_FINAL[d])
            if not plan.on_path(d, rank, t):
                continue
            s = plan.source(d, rank, t)
            mine = parts.pop(d, None)
            if d in acc:
                total = acc[d]
                if mine is not None:
                    total[0].add_(mine[0])
                    total[1].add_(mine[1])
            else:
                total = mine if mine is not None else (torch.zeros(k.shape, dtype=c, device=k.device),
                                                        torch.zeros(v.shape, dtype=c, device=v.device))
            del mine
            if t < plan.last[d][s]:
                ops += _send_block((rank + d) % P, total, TAG_ACC[d])
            else:
                ops += _send_block(s, total, TAG_FINAL[d])
            stats.dkv_blocks_sent += 1
        if final_ops:
            final_handles.append((yield Post(final_ops)))
        pending, pending_ops = ((yield Post(ops)) if ops else None), ops
        held = incoming
    if pending is not None:
        yield Wait(pending)
    del pending_ops
    for h in final_handles:
        yield Wait(h)
    own_k = own_k if own_k is not None else torch.zeros(k.shape, dtype=c, device=k.device)
    own_v = own_v if own_v is not None else torch.zeros(v.shape, dtype=c, device=v.device)
    for dk, dv in finals:
        own_k.add_(dk)
        own_v.add_(dv)
    return own_k, own_v


class RingAttention(torch.autograd.Function):
    """Differentiable ring attention for one rank; ``drive`` runs a generator over real ranks."""

    @staticmethod
    def forward(ctx, q, k, v, schedule: tuple[Piece, ...], rank: int, drive: Callable, kernel, scale: float,
                stats: Optional[CPStats]):
        stats = stats if stats is not None else CPStats()
        o, lse = drive(ring_forward(schedule, rank, q, k, v, kernel, scale, stats))
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.plan, ctx.rank, ctx.drive, ctx.kernel, ctx.scale, ctx.stats = schedule, rank, drive, kernel, scale, stats
        return o.to(q.dtype)

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = ctx.drive(ring_backward(ctx.plan, ctx.rank, q, k, v, o, lse, do.to(o.dtype),
                                             ctx.kernel, ctx.scale, ctx.stats))
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None

"""In-process simulator: run the SAME ring generators for P virtual ranks in one process.

The :class:`Simulator` advances every rank's generator round-robin; ``Post`` deposits copies of sent
tensors in per-(src, dst, tag) FIFO mailboxes, ``Wait`` completes once every awaited receive has
arrived. If every unfinished rank is blocked, the schedule has a deadlock or a send/receive
mismatch and :class:`ScheduleError` is raised — the simulator checks the protocol, not only the math
(including that every posted buffer is contiguous, as gloo and NCCL require).

:func:`simulate_ring_attention` takes FULL tensors, shards them with a layout, runs P ranks and
returns the full output; it is differentiable (backward runs the backward generators).
"""
from __future__ import annotations

from collections import defaultdict, deque
from typing import Generator, Optional, Sequence

import torch

from ..host_copy import to_device
from .checks import check_inputs
from .comm import Post, Recv, Send, Wait
from .documents import CuSeqlens, normalize_cu_seqlens
from .kernels import default_scale, get_kernel
from .layouts import rank_chunks, sequence_positions
from .plan import build_schedule
from .ring import CPStats, ring_backward, ring_forward
from .ulysses import check_heads, gathered_order


class ScheduleError(RuntimeError):
    """The simulated ranks can make no progress (deadlock) or left messages unconsumed."""


class Simulator:
    """Drives P ring generators in lock-step over in-memory mailboxes."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.mailbox: dict[tuple[int, int, int], deque] = defaultdict(deque)
        self.messages = 0

    def run(self, gens: Sequence[Generator]) -> list:
        n = len(gens)
        results: list = [None] * n
        done = [False] * n
        reply: list = [None] * n
        waiting: list[Optional[list]] = [None] * n    # outstanding receives per rank
        started = [False] * n
        while not all(done):
            progress = False
            for r in range(n):
                if done[r]:
                    continue
                if waiting[r] is not None:
                    still = [op for op in waiting[r] if not self._deliver(op, r)]
                    if still:
                        waiting[r] = still
                        continue
                    waiting[r] = None
                    reply[r] = None
                progress = True
                try:
                    msg = gens[r].send(reply[r]) if started[r] else next(gens[r])
                    started[r] = True
                    while isinstance(msg, Post):
                        for op in msg.ops:
                            if not op.tensor.is_contiguous():
                                # gloo and NCCL refuse strided p2p buffers: fail here as real ranks would
                                raise ScheduleError(f"rank {r} posts a non-contiguous {type(op).__name__} buffer "
                                                    f"(peer {op.peer}, tag {op.tag}, shape {tuple(op.tensor.shape)}, "
                                                    f"strides {op.tensor.stride()}): p2p needs contiguous tensors")
                            if isinstance(op, Send):
                                self.mailbox[(r, op.peer, op.tag)].append(op.tensor.clone())
                                self.messages += 1
                        msg = gens[r].send([op for op in msg.ops if isinstance(op, Recv)])
                    if not isinstance(msg, Wait):
                        raise TypeError(f"ring generator yielded {type(msg).__name__}")
                    waiting[r] = list(msg.handle)
                except StopIteration as stop:
                    results[r], done[r] = stop.value, True
            if not progress:
                blocked = {r: [(op.peer, op.tag) for op in waiting[r]] for r in range(n) if not done[r]}
                raise ScheduleError(f"deadlock: ranks blocked on (peer, tag) receives {blocked}")
        left = {k: len(v) for k, v in self.mailbox.items() if v}
        if left:
            raise ScheduleError(f"messages sent but never received: {left}")
        return results

    def _deliver(self, op: Recv, rank: int) -> bool:
        box = self.mailbox.get((op.peer, rank, op.tag))
        if not box:
            return False
        msg = box.popleft()
        if msg.shape != op.tensor.shape:
            raise ScheduleError(f"rank {rank} expected {tuple(op.tensor.shape)} from {op.peer} (tag {op.tag}), "
                                f"got {tuple(msg.shape)}")
        op.tensor.copy_(msg)
        return True


class _SimulatedRing(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: tuple, positions, kernel, scale, stats):
        P = plan[0].plan.world_size
        qs, ks, vs = ([x.index_select(1, pos) for pos in positions] for x in (q, k, v))
        outs = Simulator(P).run([ring_forward(plan, r, qs[r], ks[r], vs[r], kernel, scale, stats[r])
                                 for r in range(P)])
        ctx.save_for_backward(q, k, v)
        ctx.shards = (qs, ks, vs, outs)
        ctx.plan, ctx.positions, ctx.kernel, ctx.scale, ctx.stats = plan, positions, kernel, scale, stats
        return _unshard([o.to(q.dtype) for o, _ in outs], positions, q.shape[1])

    @staticmethod
    def backward(ctx, do):
        qs, ks, vs, outs = ctx.shards
        P = ctx.plan[0].plan.world_size
        dos = [do.index_select(1, pos).to(outs[r][0].dtype) for r, pos in enumerate(ctx.positions)]
        grads = Simulator(P).run([ring_backward(ctx.plan, r, qs[r], ks[r], vs[r], outs[r][0], outs[r][1],
                                                dos[r], ctx.kernel, ctx.scale, ctx.stats[r]) for r in range(P)])
        q, k, v = ctx.saved_tensors
        full = [_unshard([g[i].to(x.dtype) for g in grads], ctx.positions, x.shape[1])
                for i, x in enumerate((q, k, v))]
        return full[0], full[1], full[2], None, None, None, None, None


def _unshard(parts, positions, seq_len):
    x = parts[0]
    full = x.new_empty((x.shape[0], seq_len) + tuple(x.shape[2:]))
    return full.index_copy_(1, torch.cat(positions), torch.cat(parts, 1))


def simulated_shards(seq_len: int, world_size: int, layout: str, ulysses_degree: int = 1):
    """(chunks, positions) of each virtual ring rank: rank r's shard, or with ``ulysses_degree`` U > 1
    the gathered (and re-ordered, as :func:`~parallelism.context.ulysses.gathered_order` does) tokens
    of the U consecutive ranks of ring group r — what every member of that Ulysses group attends over
    after the all-to-all, for its H/U heads."""
    if ulysses_degree < 1 or world_size % ulysses_degree:
        raise ValueError(f"ulysses_degree={ulysses_degree} must divide world_size={world_size}; valid: "
                         f"{[u for u in range(1, world_size + 1) if world_size % u == 0]}")
    chunks, positions = [], []
    for i in range(world_size // ulysses_degree):
        members = list(range(i * ulysses_degree, (i + 1) * ulysses_degree))
        pos = torch.cat([sequence_positions(seq_len, rank=m, world_size=world_size, layout=layout)
                         for m in members])
        if ulysses_degree == 1:
            chunks.append(rank_chunks(seq_len, i, world_size, layout))
        else:
            ch, perm = gathered_order(seq_len, members, world_size, layout)
            chunks.append(ch)
            pos = pos if perm is None else pos[perm]
        positions.append(pos)
    return tuple(chunks), positions


def simulate_ring_attention(q, k, v, *, world_size: int, layout: str = "zigzag", causal: bool = True,
                            window: Optional[int] = None, scale: Optional[float] = None,
                            kernel: str = "auto", tile: Optional[int] = None,
                            kv_piece: Optional[int] = None, cu_seqlens: Optional[CuSeqlens] = None,
                            ulysses_degree: int = 1, stats: Optional[list] = None) -> torch.Tensor:
    """Ring attention of FULL q [B, S, Hq, D], k/v [B, S, Hkv, D] simulated on ``world_size`` ranks.

    ``ulysses_degree`` U > 1 simulates hybrid context parallelism (U = world_size: Ulysses): the
    all-to-all inside each group of U ranks is replaced by its result — the group's gathered tokens for
    all heads on one virtual rank (heads are independent, so this is exactly what the U members compute
    on H/U heads each) — and the ring runs over the P/U groups. The all-to-all itself is not simulated.
    Returns the full output [B, S, Hq, D]; differentiable. ``stats`` (list of P/U CPStats) is filled.
    ``cu_seqlens``: packed document boundaries (see ``context_parallel_attention``).
    """
    seq_len = q.shape[1]
    check_inputs(q, k, v, seq_len=seq_len, world_size=world_size, layout=layout,
                 method="ring" if ulysses_degree == 1 else "hybrid", window=window, tile=tile, kv_piece=kv_piece,
                 scale=scale)
    chunks, positions = simulated_shards(seq_len, world_size, layout, ulysses_degree)
    if ulysses_degree > 1:
        check_heads(q.shape[2], k.shape[2], ulysses_degree)     # the real all-to-all splits heads U ways
    ring = len(chunks)
    plan = build_schedule(chunks, causal, window, tile, kv_piece,
                          normalize_cu_seqlens(cu_seqlens, seq_len, q.shape[0]))
    positions = [to_device(pos, q.device) for pos in positions]  # a blocking copy would wait for the GPU
    if stats is None:
        stats = [CPStats() for _ in range(ring)]
    if len(stats) != ring:
        raise ValueError(f"stats must hold {ring} CPStats (one per ring rank), got {len(stats)}")
    return _SimulatedRing.apply(q, k, v, plan, positions, get_kernel(kernel, q.device, q.dtype),
                                default_scale(q.shape[-1], scale), stats)

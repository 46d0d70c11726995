"""Communication for the ring: the message protocol, the real p2p driver, and all-to-all helpers.

The ring loop (ring.py) is a *generator* that never touches torch.distributed itself. It yields

    Post([Send(peer, tensor, tag) | Recv(peer, tensor, tag), ...])  -> a handle (ops in flight)
    Wait(handle)                                                     -> None (receives are filled)

and a driver fulfils them: :func:`run_p2p` with ``dist.batch_isend_irecv`` on a real process group
(peers are ranks in that group), or :class:`parallelism.context.simulate.Simulator` for many
virtual ranks in one process. Messages between the same (src, dst, tag) are delivered in order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Generator, Optional

import torch
import torch.distributed as dist


@dataclass
class Send:
    peer: int
    tensor: torch.Tensor
    tag: int


@dataclass
class Recv:
    peer: int
    tensor: torch.Tensor
    tag: int


@dataclass
class Post:
    ops: list


@dataclass
class Wait:
    handle: object


def run_local(gen: Generator):
    """Drive a one-rank ring generator (it posts no message); returns its return value."""
    try:
        msg = next(gen)
    except StopIteration as stop:
        return stop.value
    raise RuntimeError(f"a one-rank ring has no peer, but its generator yielded {type(msg).__name__}")


def run_p2p(gen: Generator, group: Optional[dist.ProcessGroup]):
    """Drive a ring generator over real ranks of ``group``; returns the generator's return value."""
    try:
        msg = next(gen)
        while True:
            if isinstance(msg, Post):
                ops = [dist.P2POp(dist.isend if isinstance(op, Send) else dist.irecv, op.tensor,
                                  group=group, group_peer=op.peer, tag=op.tag) for op in msg.ops]
                msg = gen.send(dist.batch_isend_irecv(ops) if ops else [])
            elif isinstance(msg, Wait):
                for req in msg.handle:
                    req.wait()
                msg = gen.send(None)
            else:
                raise TypeError(f"ring generator yielded {type(msg).__name__}")
    except StopIteration as stop:
        return stop.value


class _AllToAll(torch.autograd.Function):
    """all_to_all_single over dim 0 of x [G, ...]; its adjoint is the same exchange."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.contiguous()
        out = torch.empty_like(x)          # contiguous like x (empty_like would keep permuted strides)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        out = torch.empty_like(grad)
        dist.all_to_all_single(out, grad, group=ctx.group)
        return out, None


def seq_to_heads(x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """[B, n, H, D] sequence shard -> [B, G·n, H/G, D]: the G ranks' shards (in group-rank order)
    for this rank's head slice [g·H/G, (g+1)·H/G). Differentiable."""
    g = dist.get_world_size(group)
    if g == 1:
        return x
    b, n, h, d = x.shape
    parts = x.reshape(b, n, g, h // g, d).permute(2, 0, 1, 3, 4)    # [G(dest), B, n, H/G, D]
    out = _AllToAll.apply(parts, group)                               # [G(src), B, n, H/G, D]
    return out.permute(1, 0, 2, 3, 4).reshape(b, g * n, h // g, d)


def heads_to_seq(x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Inverse of :func:`seq_to_heads`: [B, G·n, H/G, D] -> [B, n, H, D]. Differentiable."""
    g = dist.get_world_size(group)
    if g == 1:
        return x
    b, gn, hg, d = x.shape
    n = gn // g
    parts = x.reshape(b, g, n, hg, d).permute(1, 0, 2, 3, 4)         # [G(dest), B, n, H/G, D]
    out = _AllToAll.apply(parts, group)                               # [G(src head slice), B, n, H/G, D]
    return out.permute(1, 2, 0, 3, 4).reshape(b, n, g * hg, d)

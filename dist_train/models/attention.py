"""The model's one attention entry point: local causal attention, or context-parallel attention over
the cp group. Everything the model knows about sequence sharding is in :class:`AttentionContext`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from parallelism.context import context_parallel_attention, local_attention


@dataclass(frozen=True)
class AttentionContext:
    """How attention runs for the local shard.

    cp_group: the context-parallel group (None: the whole sequence is local).
    layout / method / ulysses_degree: see ``parallelism.context_parallel_attention``.
    window: sliding window in tokens (keys i-w..i), None = full causal.
    kernel: local block kernel choice (auto | sdpa | math | flash).
    kv_piece: ring K/V piece size in tokens (None = whole shards); bounds the ring's extra memory.
    """
    cp_group: Optional[dist.ProcessGroup] = None
    layout: str = "zigzag"
    method: str = "ring"
    ulysses_degree: int = 1
    window: Optional[int] = None
    kernel: str = "auto"
    kv_piece: Optional[int] = None


def local_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: Optional[int],
                           kernel: str = "auto") -> torch.Tensor:
    """q: [B, S, Hq, D]; k, v: [B, S, Hkv, D] -> [B, S, Hq, D]; causal (+ window), GQA by head groups.

    Full causal attention is torch SDPA (flash kernels, O(S) memory). A window (keys i-w..i) runs
    through the context-parallel block kernels as a one-rank ring, tiled so that work and memory
    are O(S·w): an [S, S] mask would be quadratic in S.
    """
    if window is not None:
        return local_attention(q, k, v, causal=True, window=window, kernel=kernel)
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, enable_gqa=qh.shape[1] != kh.shape[1])
    return out.transpose(1, 2)


def common_dtype(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q, k, v in one dtype: the autocast dtype when autocast is on (what torch SDPA does; RoPE leaves
    q and k in the fp32 of the residual stream while v is the bf16 output of a Linear), else the
    promoted dtype. The block kernels take a single dtype."""
    dev = q.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
    else:
        dt = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    return tuple(x if x.dtype == dt else x.to(dt) for x in (q, k, v))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext,
              cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """q: [B, S_local, Hq, D]; k, v: [B, S_local, Hkv, D] -> [B, S_local, Hq, D] (causal).

    cu_seqlens: packed documents, LongTensor [B, N+1] of GLOBAL document boundaries per sample
    (``parallelism.context.pack_cu_seqlens``); None: the sequence is one document. Local attention
    with documents runs the one-rank block plan, which skips the blocks between documents.
    """
    q, k, v = common_dtype(q, k, v)
    if ctx.cp_group is None:
        if cu_seqlens is not None:
            return local_attention(q, k, v, causal=True, window=ctx.window, kernel=ctx.kernel,
                                   cu_seqlens=cu_seqlens)
        return local_causal_attention(q, k, v, ctx.window, ctx.kernel)
    return context_parallel_attention(q, k, v, group=ctx.cp_group, layout=ctx.layout, method=ctx.method,
                                      ulysses_degree=ctx.ulysses_degree, causal=True, window=ctx.window,
                                      kernel=ctx.kernel, kv_piece=ctx.kv_piece, cu_seqlens=cu_seqlens)

"""The model's one attention entry point: local causal attention, or context-parallel attention over
the cp group. Everything the model knows about sequence sharding is in :class:`AttentionContext`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F


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


def sliding_window_mask(s_q: int, s_k: int, window: Optional[int], device: torch.device) -> torch.Tensor:
    """Boolean [s_q, s_k] mask (True = attend) for causal attention with an optional window."""
    i = torch.arange(s_q, device=device)[:, None]
    j = torch.arange(s_k, device=device)[None, :]
    keep = j <= i
    if window is not None:
        keep = keep & (j >= i - window)
    return keep


def local_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: Optional[int]) -> torch.Tensor:
    """q: [B, S, Hq, D]; k, v: [B, S, Hkv, D] -> [B, S, Hq, D]; causal (+ window), GQA by head groups."""
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    gqa = qh.shape[1] != kh.shape[1]
    if window is None:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, enable_gqa=gqa)
    else:
        mask = sliding_window_mask(q.shape[1], k.shape[1], window, q.device)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, enable_gqa=gqa)
    return out.transpose(1, 2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
    """q: [B, S_local, Hq, D]; k, v: [B, S_local, Hkv, D] -> [B, S_local, Hq, D] (causal)."""
    if ctx.cp_group is None:
        return local_causal_attention(q, k, v, ctx.window)
    from parallelism import context_parallel_attention

    return context_parallel_attention(q, k, v, group=ctx.cp_group, layout=ctx.layout, method=ctx.method,
                                      ulysses_degree=ctx.ulysses_degree, causal=True, window=ctx.window,
                                      kernel=ctx.kernel, kv_piece=ctx.kv_piece)

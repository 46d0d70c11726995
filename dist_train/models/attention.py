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


def sdpa_keeps_no_scores(q: torch.Tensor, grouped: bool) -> bool:
    """Whether torch SDPA runs a kernel that keeps no [S, S] scores for ``q`` [B, S, Hq, D] (``grouped``: fewer K/V
    heads than query heads). CPU: its flash kernel takes every float dtype, grouped or not. CUDA: grouped-query
    heads (``enable_gqa``) run in the flash and math kernels only (torch's SDPA docstring: "It currently works only
    for Flash_attention and math kernel on CUDA tensor"), and flash takes 16-bit inputs only, so fp32 GQA would run
    the math kernel, which keeps the softmax probabilities [B, Hq, S, S]."""
    return q.device.type != "cuda" or not grouped or q.dtype in (torch.float16, torch.bfloat16)


def local_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: Optional[int],
                           kernel: str = "auto") -> torch.Tensor:
    """q: [B, S, Hq, D]; k, v: [B, S, Hkv, D] -> [B, S, Hq, D]; causal (+ window), GQA by head groups.

    Full causal attention is torch SDPA (flash kernels, O(S) memory) wherever SDPA has a kernel that keeps no
    scores (:func:`sdpa_keeps_no_scores`); otherwise (CUDA fp32 with grouped-query heads) and with a window (keys
    i-w..i) it runs through the context-parallel block kernels as a one-rank ring — on CUDA the memory-efficient
    op with the K/V heads expanded per block — tiled so that work and memory are O(S·w) with a window: an [S, S]
    mask or score matrix would be quadratic in S.
    """
    grouped = q.shape[2] != k.shape[2]
    if window is not None or not sdpa_keeps_no_scores(q, grouped):
        return local_attention(q, k, v, causal=True, window=window, kernel=kernel)
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, enable_gqa=grouped)
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

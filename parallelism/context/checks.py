"""Argument checks shared by every attention entry point (the ring, Ulysses, hybrid, the one-rank
``local_attention`` and the simulator): a bad argument raises one ValueError naming the value and
what would be valid, before any rank communicates, instead of producing an output.

Why here and not in each entry point: the simulator used to skip them, so a configuration the real
API refuses (a negative window, heads a Ulysses degree does not divide) silently produced NaN or a
split the real ranks could never run.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .layouts import check_layout, check_seq_len

METHODS = ("ring", "ulysses", "hybrid")


def _is_int(x) -> bool:
    # bool is an int subclass: window=True would silently mean a window of 1 token
    return isinstance(x, int) and not isinstance(x, bool)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """q [B, S, Hq, D]; k, v [B, S, Hkv, D] with Hq % Hkv == 0, one dtype, S, Hq, Hkv, D >= 1."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, S_local, H, D]; got shapes {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k/v {tuple(k.shape)}/{tuple(v.shape)} must share "
                         f"B, S_local and D, and k and v must have the same shape")
    if min(q.shape[2], k.shape[2], q.shape[3]) < 1:
        raise ValueError(f"q {tuple(q.shape)}, k/v {tuple(k.shape)}: heads and head dim D must be >= 1")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads Hq={q.shape[2]} must be a multiple of K/V heads Hkv={k.shape[2]}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[1] == 0:
        raise ValueError("S_local=0: every rank must hold at least one token")


def check_options(window: Optional[int], tile: Optional[int], kv_piece: Optional[int],
                  scale: Optional[float]) -> None:
    """window: None or an int >= 0; tile, kv_piece: None or an int >= 1; scale: None or finite > 0."""
    if window is not None and (not _is_int(window) or window < 0):
        raise ValueError(f"window={window!r} must be None or an int >= 0")
    if tile is not None and (not _is_int(tile) or tile < 1):
        raise ValueError(f"tile={tile!r} must be None (automatic) or a positive number of tokens")
    if kv_piece is not None and (not _is_int(kv_piece) or kv_piece < 1):
        raise ValueError(f"kv_piece={kv_piece!r} must be None (whole shards) or a positive number of tokens")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        # torch's CPU flash op returns NaN for a causal block at scale <= 0 (−inf·scale)
        raise ValueError(f"scale={scale!r} must be None (1/sqrt(head_dim)) or a finite number > 0")


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, seq_len: int, world_size: int,
                 layout: str, method: str, window: Optional[int], tile: Optional[int],
                 kv_piece: Optional[int], scale: Optional[float]) -> None:
    """Every check of an attention call over a global sequence of ``seq_len`` tokens on
    ``world_size`` ranks (q, k, v: a rank's shard, or the whole sequence for the simulator)."""
    check_layout(layout)
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not supported; valid methods: {', '.join(METHODS)}")
    check_qkv(q, k, v)
    check_options(window, tile, kv_piece, scale)
    check_seq_len(seq_len, world_size, layout)

"""Attention masks between two chunks of global positions, and their classification.

Position i (query) may attend to position j (key) iff
``(not causal or j <= i) and (window is None or (i - window <= j and (causal or j <= i + window)))``.

A block (query chunk × key chunk) is classified so the kernel can take its fastest path:

* ``none``     — no pair allowed: neither computed nor (where the schedule allows) sent.
* ``full``     — every pair allowed: plain unmasked attention.
* ``causal``   — equal strides/lengths with the diagonal aligned: local index b <= a (SDPA ``is_causal``).
* ``shifted``  — equal strides/lengths, keys start after queries (striped): b < a, i.e. causal on
                 q[1:] × k[:-1] (the row 0 of the block is fully masked).
* ``explicit`` — anything else (window edges, hybrid chunk pairs): an explicit boolean mask.

Classification is exact: it counts allowed pairs analytically in O(query length).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .layouts import Chunk

KINDS = ("none", "full", "causal", "shifted", "explicit")


def _floor_div(a: torch.Tensor, b: int) -> torch.Tensor:
    return torch.div(a, b, rounding_mode="floor")


def allowed_per_query(q: Chunk, k: Chunk, causal: bool, window: Optional[int]) -> torch.Tensor:
    """LongTensor [q.length]: for each query of ``q``, how many keys of ``k`` it may attend to."""
    i = q.positions()
    big = q.last + k.last + 2 + (window or 0)
    hi = i if causal else i + (window if window is not None else big)
    lo = i - window if window is not None else torch.full_like(i, -big)
    # keys j = k.start + k.stride * b with lo <= j <= hi and 0 <= b < k.length
    b_hi = torch.clamp(_floor_div(hi - k.start, k.stride), max=k.length - 1)
    b_lo = torch.clamp(-_floor_div(k.start - lo, k.stride), min=0)
    return torch.clamp(b_hi - b_lo + 1, min=0)


def mask_tensor(q: Chunk, k: Chunk, causal: bool, window: Optional[int],
                device: torch.device | str = "cpu") -> torch.Tensor:
    """BoolTensor [q.length, k.length]: True where query may attend to key."""
    i = q.positions().to(device)[:, None]
    j = k.positions().to(device)[None, :]
    ok = torch.ones(q.length, k.length, dtype=torch.bool, device=device)
    if causal:
        ok &= j <= i
    if window is not None:
        ok &= j >= i - window
        if not causal:
            ok &= j <= i + window
    return ok


@dataclass(frozen=True)
class BlockMask:
    """What a kernel needs to mask one block: its kind and (for ``explicit``) the two chunks."""

    kind: str
    q: Chunk
    k: Chunk
    causal: bool
    window: Optional[int]
    allowed: int  # number of allowed (query, key) pairs: the block's work

    def tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        return mask_tensor(self.q, self.k, self.causal, self.window, device)


def classify(q: Chunk, k: Chunk, causal: bool, window: Optional[int]) -> BlockMask:
    """Exact classification of the block q × k (see module docstring)."""
    per_q = allowed_per_query(q, k, causal, window)
    allowed = int(per_q.sum())
    if allowed == 0:
        kind = "none"
    elif allowed == q.length * k.length:
        kind = "full"
    else:
        kind = "explicit"
        same_grid = q.stride == k.stride and q.length == k.length
        n = q.length
        if causal and same_grid:
            # Only a pure causal triangle (the window does not cut it) may use the causal fast paths.
            if 0 <= q.start - k.start < q.stride and allowed == n * (n + 1) // 2:
                kind = "causal"
            elif 0 < k.start - q.start < q.stride and allowed == n * (n - 1) // 2:
                kind = "shifted"
    return BlockMask(kind, q, k, causal, window, allowed)

"""Attention masks between two chunks of global positions, and their classification.

Position i (query) may attend to position j (key) iff
``(not causal or j <= i) and (window is None or (i - window <= j and (causal or j <= i + window)))``
and, with packed documents (``docs``, see documents.py), i and j lie in the same document.

A block (query chunk × key chunk) is classified so the kernel can take its fastest path:

* ``none``     — no pair allowed: neither computed nor (where the schedule allows) sent.
* ``full``     — every pair allowed: plain unmasked attention.
* ``causal``   — equal strides/lengths with the diagonal aligned: local index b <= a (SDPA ``is_causal``).
* ``shifted``  — equal strides/lengths, keys start after queries (striped): b < a, i.e. causal on
                 q[1:] × k[:-1] (the row 0 of the block is fully masked).
* ``explicit`` — anything else (window edges, hybrid chunk pairs): an explicit boolean mask.

Classification is exact: it counts allowed pairs analytically in O(query length). A document
boundary only removes pairs, so a block whose count equals the causal triangle (or the full block)
is exactly that triangle: blocks inside one document keep the fast paths.

With documents that differ per batch row, a block's ``allowed`` is summed over those rows and its
explicit mask is [rows, 1, Sq, Sk] (broadcast over heads); with one shared row it stays [Sq, Sk].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .documents import Docs, doc_extent, doc_index
from .layouts import Chunk

KINDS = ("none", "full", "causal", "shifted", "explicit")


def _floor_div(a: torch.Tensor, b: int) -> torch.Tensor:
    return torch.div(a, b, rounding_mode="floor")


def allowed_per_query(q: Chunk, k: Chunk, causal: bool, window: Optional[int],
                      doc_row: Optional[tuple[int, ...]] = None) -> torch.Tensor:
    """LongTensor [q.length]: for each query of ``q``, how many keys of ``k`` it may attend to
    (inside its own document of ``doc_row``, the boundaries of one batch row, when given)."""
    i = q.positions()
    big = q.last + k.last + 2 + (window or 0)
    hi = i if causal else i + (window if window is not None else big)
    lo = i - window if window is not None else torch.full_like(i, -big)
    if doc_row is not None:
        first, last = doc_extent(doc_row, i)
        lo, hi = torch.maximum(lo, first), torch.minimum(hi, last)
    # keys j = k.start + k.stride * b with lo <= j <= hi and 0 <= b < k.length
    b_hi = torch.clamp(_floor_div(hi - k.start, k.stride), max=k.length - 1)
    b_lo = torch.clamp(-_floor_div(k.start - lo, k.stride), min=0)
    return torch.clamp(b_hi - b_lo + 1, min=0)


def mask_tensor(q: Chunk, k: Chunk, causal: bool, window: Optional[int],
                device: torch.device | str = "cpu", docs: Optional[Docs] = None) -> torch.Tensor:
    """BoolTensor, True where query may attend to key: [q.length, k.length], or [rows, 1, q.length,
    k.length] when ``docs`` has several rows (broadcastable to [B, H, Sq, Sk] either way)."""
    i = q.positions().to(device)[:, None]
    j = k.positions().to(device)[None, :]
    ok = torch.ones(q.length, k.length, dtype=torch.bool, device=device)
    if causal:
        ok &= j <= i
    if window is not None:
        ok &= j >= i - window
        if not causal:
            ok &= j <= i + window
    if docs is None:
        return ok
    same = torch.stack([doc_index(row, i) == doc_index(row, j) for row in docs])   # [rows, Sq, Sk]
    return ok & same[0] if len(docs) == 1 else (ok & same)[:, None]


@dataclass(frozen=True)
class BlockMask:
    """What a kernel needs to mask one block: its kind and (for ``explicit``) the two chunks."""

    kind: str
    q: Chunk
    k: Chunk
    causal: bool
    window: Optional[int]
    allowed: int  # number of allowed (query, key) pairs: the block's work (summed over document rows)
    docs: Optional[Docs] = None   # document boundaries, kept only when they cut this block

    def tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        return mask_tensor(self.q, self.k, self.causal, self.window, device, self.docs)


def _kind(q: Chunk, k: Chunk, causal: bool, allowed: int) -> str:
    """Kind of a block with ``allowed`` pairs for ONE batch row (see the module docstring)."""
    if allowed == 0:
        return "none"
    if allowed == q.length * k.length:
        return "full"
    n = q.length
    if causal and q.stride == k.stride and q.length == k.length:
        # Only a pure causal triangle (no window or document cut) may use the causal fast paths.
        if 0 <= q.start - k.start < q.stride and allowed == n * (n + 1) // 2:
            return "causal"
        if 0 < k.start - q.start < q.stride and allowed == n * (n - 1) // 2:
            return "shifted"
    return "explicit"


def classify(q: Chunk, k: Chunk, causal: bool, window: Optional[int],
             docs: Optional[Docs] = None) -> BlockMask:
    """Exact classification of the block q × k (see module docstring)."""
    rows = (None,) if docs is None else docs
    counts = [int(allowed_per_query(q, k, causal, window, row).sum()) for row in rows]
    kinds = {_kind(q, k, causal, c) for c in counts}
    kind = kinds.pop() if len(kinds) == 1 else "explicit"
    cut = False
    if docs is not None and kind == "explicit":
        whole = int(allowed_per_query(q, k, causal, window).sum())  # the block without document cuts
        cut = any(c != whole for c in counts)
    return BlockMask(kind, q, k, causal, window, sum(counts), docs if cut else None)

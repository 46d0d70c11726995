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

Classification is exact: it counts allowed pairs analytically, in pure integer arithmetic that costs
O(documents the queries touch × log length) per block (:func:`allowed_pairs`), so a plan rebuilt for
every micro-batch of packed documents stays cheap on the host (no torch op per block). A document
boundary only removes pairs, so a block whose count equals the causal triangle (or the full block)
is exactly that triangle: blocks inside one document keep the fast paths.

With documents that differ per batch row, a block's ``allowed`` is summed over those rows and its
explicit mask is [rows, 1, Sq, Sk] (broadcast over heads); with one shared row it stays [Sq, Sk].
"""
from __future__ import annotations

import bisect
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


def _floor_sum(n: int, m: int, a: int, b: int) -> int:
    """sum_{x=0}^{n-1} floor((a*x + b) / m) for n >= 0, m > 0 and any integers a, b, in O(log m)
    (the Euclid-like reduction of AtCoder Library's ``floor_sum``; Python's floor division and modulo make its
    separate step for negative a and b the loop's own first reduction)."""
    ans = 0
    while True:
        ans += n * (n - 1) // 2 * (a // m)
        a %= m
        ans += n * (b // m)
        b %= m
        y_max = a * n + b
        if y_max < m:
            return ans
        n, b = divmod(y_max, m)
        m, a = a, m


def _keys_at_most(alpha: int, q_stride: int, k_stride: int, b0: int, b1: int, a_lo: int, a_hi: int) -> int:
    """sum over queries a in [a_lo, a_hi) of #{key index b in [b0, b1] : b <= floor((alpha + q_stride*a) /
    k_stride)}, i.e. of clamp(f(a) - b0 + 1, 0, b1 - b0 + 1) with f non-decreasing in a: zero below the first a
    where f reaches b0, the full key count from the first a where f reaches b1, a floor sum in between."""
    if a_hi <= a_lo:
        return 0
    first = min(max(-((alpha - k_stride * b0) // q_stride), a_lo), a_hi)    # f(a) >= b0 from here
    full = min(max(-((alpha - k_stride * b1) // q_stride), first), a_hi)    # f(a) >= b1 from here
    n = full - first
    between = _floor_sum(n, k_stride, q_stride, alpha + q_stride * first) - n * (b0 - 1)
    return between + (a_hi - full) * (b1 - b0 + 1)


def allowed_pairs(q: Chunk, k: Chunk, causal: bool, window: Optional[int],
                  doc_row: Optional[tuple[int, ...]] = None) -> int:
    """Number of allowed (query, key) pairs of q × k (inside one document of ``doc_row`` when given): the sum of
    :func:`allowed_per_query`, computed with Python integers per document the queries touch (no tensor).

    For the queries a (global i = q.start + q.stride*a) of one document [F, D], the allowed keys are the key
    indices b in [b0, b1] (keys inside the document) with i - window <= j <= hi(i), hi(i) = i (causal), i + window
    or unbounded: #(keys <= hi(i)) − #(keys <= i − window − 1), each summed over a in closed form."""
    if window is not None and window < 0:
        return 0
    if doc_row is None:
        docs = [(min(q.start, k.start), max(q.last, k.last))]
    else:   # only documents holding both queries and keys have pairs
        lo, hi = max(q.start, k.start), min(q.last, k.last)
        first, last = bisect.bisect_right(doc_row, lo) - 1, bisect.bisect_right(doc_row, hi) - 1
        docs = [(doc_row[d], doc_row[d + 1] - 1) for d in range(first, last + 1)]
    total = 0
    for lo, hi in docs:
        b0 = max(0, -((k.start - lo) // k.stride))
        b1 = min(k.length - 1, (hi - k.start) // k.stride)
        a_lo = max(0, -((q.start - lo) // q.stride))
        a_hi = min(q.length - 1, (hi - q.start) // q.stride) + 1
        if b1 < b0 or a_hi <= a_lo:
            continue
        shift = q.start - k.start
        if causal or window is not None:
            total += _keys_at_most(shift + (0 if causal else window), q.stride, k.stride, b0, b1, a_lo, a_hi)
        else:
            total += (a_hi - a_lo) * (b1 - b0 + 1)
        if window is not None:
            total -= _keys_at_most(shift - window - 1, q.stride, k.stride, b0, b1, a_lo, a_hi)
    return total


def mask_tensor(q: Chunk, k: Chunk, causal: bool, window: Optional[int],
                device: torch.device | str = "cpu", docs: Optional[Docs] = None) -> torch.Tensor:
    """BoolTensor, True where query may attend to key: [q.length, k.length], or [rows, 1, q.length,
    k.length] when ``docs`` has several rows (broadcastable to [B, H, Sq, Sk] either way). Built on ``device``
    with no synchronising copy (a CUDA kernel asks for one per masked block of every call)."""
    i = q.positions(device)[:, None]
    j = k.positions(device)[None, :]
    ok = torch.ones(q.length, k.length, dtype=torch.bool, device=device)
    if causal:
        ok &= j <= i
    if window is not None:
        ok &= j >= i - window
        if not causal:
            ok &= j <= i + window
    if docs is None:
        return ok
    # each row's document index of the queries and the keys in one lookup: one copy of its boundaries, not two
    both = torch.cat([i[:, 0], j[0]])
    index = [doc_index(row, both) for row in docs]
    same = torch.stack([d[:q.length, None] == d[None, q.length:] for d in index])   # [rows, Sq, Sk]
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
    counts = [allowed_pairs(q, k, causal, window, row) for row in rows]
    kinds = {_kind(q, k, causal, c) for c in counts}
    kind = kinds.pop() if len(kinds) == 1 else "explicit"
    cut = False
    if docs is not None and kind == "explicit":
        whole = allowed_pairs(q, k, causal, window)  # the block without document cuts
        cut = any(c != whole for c in counts)
    return BlockMask(kind, q, k, causal, window, sum(counts), docs if cut else None)

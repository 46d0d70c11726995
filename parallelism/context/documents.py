"""Packed documents: global document boundaries (``cu_seqlens``) and what they mean for a chunk.

A packed sequence of S tokens holds documents [b_0, b_1), [b_1, b_2), …, [b_{m−1}, b_m) with
b_0 = 0 and b_m = S (FlashAttention/TransformerEngine's ``cu_seqlens``, in GLOBAL positions). A
query attends only to keys of its own document, on top of the causal/window rule.

Why global boundaries and not per-token ``doc_ids`` of the local shard: the ring schedule (which
blocks a rank computes, which K/V blocks travel) must be derived identically on every rank with no
negotiation, and a rank's own doc ids say nothing about the other ranks' shards. Boundaries are a
few integers, identical everywhere, and turn every block decision into O(documents) arithmetic on
chunk descriptors, like the causal/window rule (masks.py).

``Docs`` is the normalised form: a tuple of rows, each row the boundaries of one batch sample, or
a single row shared by the whole batch; ``None`` means one document spanning everything (nothing
to mask, the exact unmasked code path).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from ..host_copy import to_device
from .layouts import Chunk

Docs = tuple[tuple[int, ...], ...]
CuSeqlens = Union[Sequence[int], Sequence[Sequence[int]], torch.Tensor]


def _row(values, seq_len: int, where: str) -> tuple[int, ...]:
    row = tuple(int(x) for x in values)
    if len(row) < 2 or row[0] != 0 or row[-1] != seq_len or any(b <= a for a, b in zip(row, row[1:])):
        raise ValueError(f"cu_seqlens{where}={list(row)} must be strictly increasing global document "
                         f"boundaries from 0 to the global sequence length {seq_len}")
    return row


def normalize_cu_seqlens(cu_seqlens: Optional[CuSeqlens], seq_len: int, batch: int) -> Optional[Docs]:
    """Validate ``cu_seqlens`` (one boundary list for the batch, or one per sample, or the padded
    LongTensor [B, N+1] of :func:`pack_cu_seqlens`) -> :data:`Docs`.

    Returns None when every row is the single document [0, seq_len) (no document masking at all).
    """
    if cu_seqlens is None:
        return None
    if isinstance(cu_seqlens, torch.Tensor):
        cu_seqlens = [_strip_padding(r) for r in cu_seqlens.tolist()] if cu_seqlens.dim() == 2 else cu_seqlens.tolist()
    cu_seqlens = list(cu_seqlens)
    nested = len(cu_seqlens) > 0 and not isinstance(cu_seqlens[0], (int,)) and hasattr(cu_seqlens[0], "__len__")
    if nested:
        if len(cu_seqlens) not in (1, batch):
            raise ValueError(f"cu_seqlens has {len(cu_seqlens)} rows; give one boundary list shared by the "
                             f"batch or one per sample (batch={batch})")
        rows = tuple(_row(r, seq_len, f"[{i}]") for i, r in enumerate(cu_seqlens))
    else:
        rows = (_row(cu_seqlens, seq_len, ""),)
    if all(r == (0, seq_len) for r in rows):
        return None
    if len(set(rows)) == 1:
        rows = rows[:1]
    return rows


def _strip_padding(row: list[int]) -> list[int]:
    """A row of :func:`pack_cu_seqlens` without the repeats of its last boundary."""
    n = len(row)
    while n > 2 and row[n - 2] == row[n - 1]:
        n -= 1
    return row[:n]


def pack_cu_seqlens(rows: Sequence[Sequence[int]]) -> torch.Tensor:
    """Per-sample boundary lists -> LongTensor [B, max_docs + 1], shorter rows padded by repeating
    their last boundary (S): a batch field that travels with ``.to(device)`` like the others and
    that ``cu_seqlens=`` takes as is."""
    width = max(len(r) for r in rows)
    return torch.tensor([list(r) + [r[-1]] * (width - len(r)) for r in rows], dtype=torch.long)


def boundaries_from_doc_ids(doc_ids: torch.Tensor) -> list[list[int]]:
    """doc_ids [B, S] (global order; a new document starts wherever the id changes) -> cu_seqlens rows."""
    out = []
    for row in doc_ids:
        starts = (torch.nonzero(row[1:] != row[:-1]).flatten() + 1).tolist()
        out.append([0] + starts + [row.shape[0]])
    return out


def doc_extent(row: tuple[int, ...], positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For global ``positions`` [n]: (first, last) global position of each one's document, [n] each."""
    b = torch.tensor(row, dtype=torch.long)
    idx = torch.searchsorted(b, positions, right=True) - 1
    return b[idx], b[idx + 1] - 1


def doc_index(row: tuple[int, ...], positions: torch.Tensor) -> torch.Tensor:
    """LongTensor [n]: index of the document holding each global position (on the positions' device; the
    boundaries get there by an asynchronous copy, :func:`~parallelism.host_copy.to_device`)."""
    return torch.searchsorted(to_device(torch.tensor(row, dtype=torch.long), positions.device), positions,
                              right=True) - 1


def local_cuts(chunk: Chunk, docs: Optional[Docs]) -> list[int]:
    """Local indices in (0, chunk.length) where a document of any row starts inside ``chunk``."""
    if docs is None:
        return []
    cuts = set()
    for row in docs:
        for b in row[1:-1]:
            if chunk.start < b <= chunk.last:
                cuts.add(-(-(b - chunk.start) // chunk.stride))
    return sorted(c for c in cuts if 0 < c < chunk.length)

"""Per-rank micro-batches addressed by global sample index.

For optimizer step t with ``consumed`` samples before it, micro-batch m of dp rank d holds the global
samples ``consumed + m·(micro_batch·dp) + d·micro_batch + [0, micro_batch)`` — the union over (m, d)
is always ``consumed + [0, global_batch)``, so losses do not depend on dp and resume is exact.

Labels are the next tokens, shifted on the *full* sequence before any context-parallel sharding, so no
label is lost at shard borders. The sequence is padded (label = IGNORE) to the layout's multiple.
Packed documents (:mod:`.documents`) are derived on the full sequence too, before sharding.
"""
from __future__ import annotations

from typing import Optional, Protocol

import torch
from parallelism import sequence_positions

from ..models.gpt import IGNORE_INDEX
from .documents import DocumentOptions, apply_documents


class TokenSource(Protocol):
    def __getitem__(self, global_index: int) -> torch.Tensor: ...  # [seq_len + 1] int64


def layout_multiple(cp: int, layout: str) -> int:
    """Sequence length multiple a cp layout needs (zigzag cuts 2·cp chunks)."""
    if cp == 1:
        return 1
    return 2 * cp if layout == "zigzag" else cp


def micro_batch_ids(consumed: int, micro: int, micro_batch: int, dp: int, dp_rank: int) -> list[int]:
    """Global sample ids of micro-batch ``micro`` of dp rank ``dp_rank`` (see the module docstring)."""
    base = consumed + micro * micro_batch * dp + dp_rank * micro_batch
    return list(range(base, base + micro_batch))


class TokenBatcher:
    def __init__(self, source: TokenSource, *, micro_batch: int, dp: int, dp_rank: int, cp: int = 1,
                 cp_rank: int = 0, layout: str = "zigzag", documents: Optional[DocumentOptions] = None):
        self.source, self.mb, self.dp, self.dp_rank = source, micro_batch, dp, dp_rank
        self.cp, self.cp_rank, self.layout = cp, cp_rank, layout
        self.documents = documents if documents is not None and documents.active else None

    @property
    def samples_per_epoch(self) -> Optional[int]:
        """Distinct samples before the order wraps into the next epoch (None: a generated, endless stream)."""
        n = getattr(self.source, "num_chunks", None)
        return None if n is None else int(n)

    def sample_ids(self, consumed: int, micro: int) -> list[int]:
        return micro_batch_ids(consumed, micro, self.mb, self.dp, self.dp_rank)

    def microbatch(self, consumed: int, micro: int) -> dict[str, torch.Tensor]:
        """-> {"tokens": [mb, S_local], "labels": [mb, S_local], "positions": [S_local] (global ids),
        "count": [] real labels in this shard}; with packed documents also "cu_seqlens" [mb, N+1]
        (``document_mask``: global boundaries) and "positions" [mb, S_local] (``reset_positions``)."""
        seqs = torch.stack([self.source[i] for i in self.sample_ids(consumed, micro)])
        tokens, labels = seqs[:, :-1], seqs[:, 1:]
        s = tokens.shape[1]
        mult = layout_multiple(self.cp, self.layout)
        pad = (-s) % mult
        if pad:
            tokens = torch.cat([tokens, tokens.new_zeros(tokens.shape[0], pad)], dim=1)
            labels = torch.cat([labels, labels.new_full((labels.shape[0], pad), IGNORE_INDEX)], dim=1)
        cu_seqlens = doc_pos = None
        if self.documents is not None:
            labels, cu_seqlens, doc_pos = apply_documents(tokens, labels, self.documents, s, IGNORE_INDEX)
        if self.cp == 1:
            idx = torch.arange(tokens.shape[1])
        else:
            idx = sequence_positions(tokens.shape[1], rank=self.cp_rank, world_size=self.cp, layout=self.layout)
            tokens, labels = tokens[:, idx], labels[:, idx]
        count = (labels != IGNORE_INDEX).sum().to(torch.float64)
        out = {"tokens": tokens, "labels": labels, "positions": idx if doc_pos is None else doc_pos[:, idx],
               "count": count}
        if cu_seqlens is not None:
            out["cu_seqlens"] = cu_seqlens
        return out

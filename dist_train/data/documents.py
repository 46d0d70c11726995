"""Packed documents from EOD tokens (Megatron's reset_attention_mask / reset_position_ids / eod_mask_loss).

A training sample is ``seq_len`` consecutive tokens of the packed stream. An EOD token ends its
document, so a new document starts right after every EOD: with ``document_mask`` attention stays
inside each document, with ``reset_positions`` RoPE positions restart at 0 there (positions are
global within the document, whatever the context-parallel layout), and with ``eod_mask_loss`` the
label that follows an EOD (the next document's first token, unpredictable from the previous
document) carries no loss. Layout padding (zigzag needs 2·cp) is one more document of its own, so
real tokens never see it and its labels are ignored anyway.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from parallelism.context import pack_cu_seqlens

from ..config import DataConfig
from .sidecar import read_sidecar, sidecar_path
from .tokenizer import get_tokenizer


@dataclass(frozen=True)
class DocumentOptions:
    """``data.document_mask`` / ``reset_positions`` / ``eod_mask_loss`` and the EOD id they use."""

    eod_id: int
    document_mask: bool = False
    reset_positions: bool = False
    eod_mask_loss: bool = False

    @property
    def active(self) -> bool:
        return self.document_mask or self.reset_positions or self.eod_mask_loss


def dataset_sidecar(d: DataConfig) -> Optional[dict]:
    """The sidecar of the indexed dataset ``data.path`` names (:func:`~.sidecar.read_sidecar`); None for other data or
    none there. What :func:`unknown_eod_message` and :func:`resolve_eod_id` take, read once for both."""
    return read_sidecar(d.path) if d.source == "indexed" and d.path else None


def unknown_eod_message(d: DataConfig, sidecar: Optional[dict]) -> Optional[str]:
    """One line when a document option is on and nothing says which id ends a document of the indexed dataset: no
    ``data.eod_id``, no ``sidecar`` (:func:`dataset_sidecar`'s: a dataset built elsewhere, e.g. by Megatron-LM's
    tools) and only the default byte tokenizer to fall back on, whose 256 may be an ordinary token of the dataset's
    vocabulary (documents would be cut at every occurrence of it, silently); None otherwise."""
    if d.eod_id is not None or d.source != "indexed" or not d.path or d.tokenizer != "byte":
        return None
    if not (Path(f"{d.path}.bin").is_file() and Path(f"{d.path}.idx").is_file()) or sidecar is not None:
        return None  # to be prepared (its sidecar will hold the byte tokenizer's id), or the sidecar says it
    option = (d.document_options_on or ["document_mask"])[0]
    return (f"data.{option}: data.path = {d.path} has no sidecar ({sidecar_path(d.path).name}: built elsewhere) to say "
            "which id ends a document, and the byte tokenizer's 256 may be an ordinary token of its vocabulary; set "
            "data.eod_id (e.g. 50256 for GPT-2's <|endoftext|>, 256 for byte-level data)")


def resolve_eod_id(d: DataConfig, sidecar: Optional[dict]) -> int:
    """``data.eod_id``, else the EOD id of the indexed dataset's ``sidecar`` (:func:`dataset_sidecar`'s), else the
    tokenizer's (a named tokenizer.json's, or the byte tokenizer's for a dataset still to be prepared with it;
    ValueError: :func:`unknown_eod_message`)."""
    if d.eod_id is not None:
        return d.eod_id
    if sidecar is not None:
        return int(sidecar["eod_id"])
    unknown = unknown_eod_message(d, sidecar)
    if unknown:
        raise ValueError(unknown)
    return get_tokenizer(d.tokenizer).eod_id


def document_options(d: DataConfig) -> Optional[DocumentOptions]:
    """The batcher's document options for ``data`` (None when no document option is on)."""
    if not d.document_options_on:
        return None
    eod = resolve_eod_id(d, dataset_sidecar(d) if d.eod_id is None else None)
    return DocumentOptions(eod, d.document_mask, d.reset_positions, d.eod_mask_loss)


def document_starts(tokens: torch.Tensor, eod_id: int) -> list[list[int]]:
    """tokens [B, S] -> per sample, the positions in (0, S) where a document starts (after each EOD)."""
    return [(torch.nonzero(row[:-1] == eod_id).flatten() + 1).tolist() for row in tokens]


def cu_seqlens_rows(starts: list[list[int]], seq_len: int, padded_len: int) -> list[list[int]]:
    """Global document boundaries per sample; [seq_len, padded_len) (layout padding) is its own document."""
    tail = [padded_len] if padded_len > seq_len else []
    return [[0] + s + [seq_len] + tail for s in starts]


def positions_in_document(rows: list[list[int]], padded_len: int) -> torch.Tensor:
    """LongTensor [B, padded_len]: each token's position counted from its document's first token."""
    out = torch.empty(len(rows), padded_len, dtype=torch.long)
    for r, row in enumerate(rows):
        for a, b in zip(row, row[1:]):
            out[r, a:b] = torch.arange(b - a)
    return out


def apply_documents(tokens: torch.Tensor, labels: torch.Tensor, opts: DocumentOptions, seq_len: int,
                    ignore_index: int) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """tokens, labels [B, S_pad] (global order; real tokens are the first ``seq_len``) ->
    (labels, cu_seqlens [B, N+1] or None, positions [B, S_pad] or None)."""
    starts = document_starts(tokens[:, :seq_len], opts.eod_id)
    rows = cu_seqlens_rows(starts, seq_len, tokens.shape[1])
    if opts.eod_mask_loss:
        labels = labels.masked_fill(tokens == opts.eod_id, ignore_index)
    cu = pack_cu_seqlens(rows) if opts.document_mask else None
    pos = positions_in_document(rows, tokens.shape[1]) if opts.reset_positions else None
    return labels, cu, pos

"""Held-out documents that are also training documents (train/validation contamination), found before any rank
starts.

    overlap = shared_documents(train_hashes, valid_hashes, valid_lengths, min_tokens=64)
    line = held_out_overlap_message(cfg, checked)   # one line when more than data.valid_overlap_max are shared

A validation set that partially repeats the training set (a split made before deduplication, shards concatenated
twice) gives an optimistic validation loss without a word. Each document is known by its 8-byte content hash
(:mod:`.document_hashes`: token for token, EOD included); a held-out document counts as shared when a training
document has the same hash. Documents shorter than ``data.valid_overlap_min_tokens`` tokens are not counted on
either side: empty or one-line boilerplate ("Thank you.", a licence stub) repeats in any corpus legitimately.

Held-out data is ``data.valid_path`` (its documents against all of ``data.path``'s, or under ``data.split`` against
those its training share reads any token of), or ``data.split``'s validation share of ``data.path`` (the documents
wholly inside that share against those the training share reads any token of). Cost: linear — the validation hashes are sorted once, the training hashes streamed past them in CHUNK-long
pieces through a filter on their low bits (O(D_train) time, memory O(D_valid + CHUNK)); reading a PREFIX.doc_hashes file is 8 B per
document, a dataset without one is hashed from its ``.bin`` first (2 million training documents: 0.04 s with the
file, 1.4 s without; ``dist-train bench overlap``, docs/benchmarks/overlap.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Optional

import numpy as np

from ..config import Config
from .datasets import dataset_identity, part_samples
from .document_hashes import dataset_document_hashes, token_range_and_hashes
from .integrity import IndexInfo, check_indexed_dataset, document_bounds, token_id_range

#: training hashes compared per step: 8 MiB of them
CHUNK = 1 << 20
#: the low-bits filter has this many one-byte slots per held-out hash (a training hash passes it by chance with
#: probability <= 1/64), at most 2**MAX_FILTER_BITS bytes
FILTER_SLOTS_PER_KEY, MAX_FILTER_BITS = 64, 26


@dataclass(frozen=True)
class Overlap:
    """Held-out documents of at least the minimum length (``counted``, ``counted_tokens``) and how many of them a
    training document repeats (``shared``, ``shared_tokens``); ``short``: held-out documents not counted."""

    shared: int
    counted: int
    shared_tokens: int
    counted_tokens: int
    short: int

    @property
    def fraction(self) -> float:
        return self.shared / self.counted if self.counted else 0.0


def shared_documents(train_hashes: np.ndarray, valid_hashes: np.ndarray, valid_lengths: np.ndarray,
                     min_tokens: int) -> Overlap:
    """train_hashes uint64 [D_train] (may be memory-mapped: read CHUNK at a time), valid_hashes uint64 [D_valid],
    valid_lengths int [D_valid] (tokens per held-out document) -> the :class:`Overlap`. A held-out document repeated
    within the held-out set counts each time."""
    counted = np.asarray(valid_lengths) >= min_tokens
    hashes, lengths = np.asarray(valid_hashes)[counted], np.asarray(valid_lengths, dtype=np.int64)[counted]
    keys = np.unique(hashes)  # sorted
    found = np.zeros(len(keys), dtype=bool)
    if len(keys):
        # a filter on the hash's low bits first (hashes are uniform): a gather per training hash, and the binary search
        # (a cache miss per step) only for the ~1/FILTER_SLOTS_PER_KEY of them that may be held-out ones
        slots = 1 << min(MAX_FILTER_BITS, max(16, int(len(keys) * FILTER_SLOTS_PER_KEY - 1).bit_length()))
        mask = np.uint64(slots - 1)
        maybe = np.zeros(slots, dtype=bool)
        maybe[keys & mask] = True
        for lo in range(0, len(train_hashes), CHUNK):
            chunk = np.asarray(train_hashes[lo:lo + CHUNK])
            chunk = chunk[maybe[chunk & mask]]
            at = np.minimum(np.searchsorted(keys, chunk), len(keys) - 1)
            found[at[keys[at] == chunk]] = True
    shared = found[np.searchsorted(keys, hashes)] if len(keys) else np.zeros(0, dtype=bool)
    return Overlap(int(shared.sum()), int(counted.sum()), int(lengths[shared].sum()), int(lengths.sum()),
                   int((~counted).sum()))


@dataclass(frozen=True)
class Checked:
    """A dataset as the pre-flight read it (:func:`~.integrity.check_indexed_dataset`'s ``index`` and ``sidecar``):
    the overlap check reads neither file again. ``key``: the config key naming it (data.path or data.valid_path), as
    its messages do. ``scanned_identity``/``scanned_hashes``: what :func:`checked_dataset`'s scan of the ``.bin``
    (a dataset without a sidecar) used and found, so neither is read again."""

    prefix: str
    index: IndexInfo
    sidecar: Optional[dict]
    key: str = "data.path"
    scanned_identity: Optional[str] = field(default=None, compare=False)
    scanned_hashes: Optional[np.ndarray] = field(default=None, compare=False, repr=False)

    @cached_property
    def identity(self) -> Optional[str]:
        """:func:`~.datasets.dataset_identity`, computed once: without a sidecar digest it is the sampled fingerprint
        (2 MiB read), which the same-data, overlap and resume checks of one pre-flight all need."""
        return self.scanned_identity or dataset_identity(self.prefix, self.sidecar)

    def hashes(self) -> np.ndarray:
        if self.scanned_hashes is not None:
            return self.scanned_hashes
        return dataset_document_hashes(self.prefix, self.index, self.identity, self.key)[0]

    def bounds(self) -> np.ndarray:
        return document_bounds(self.prefix, self.index, self.key)


def checked_dataset(prefix: str, vocab_size: int, seq_len: int, key: str, hash_documents: bool) -> Checked:
    """:func:`~.integrity.check_indexed_dataset` of the dataset at ``prefix`` (its ValueError), as a :class:`Checked`.
    ``hash_documents``: the overlap check will need its document hashes (:func:`overlap_checked`). A dataset without a
    sidecar has its ``.bin`` scanned for the token-id range: that same read computes the hashes too, unless a
    ``.doc_hashes`` file of this build holds them (:func:`~.document_hashes.token_range_and_hashes`), so its ``.bin``
    is read once per pre-flight, not once per check."""
    scanned: dict = {}

    def scan(prefix: str, info: IndexInfo) -> tuple[int, int]:
        # only a dataset without a sidecar is scanned: its identity is the sampled fingerprint, used for the file here
        identity = scanned["scanned_identity"] = dataset_identity(prefix, None)
        token_range, scanned["scanned_hashes"] = token_range_and_hashes(prefix, info, identity, key)
        return token_range

    result = check_indexed_dataset(prefix, vocab_size, seq_len, key, scan if hash_documents else token_id_range)
    return Checked(prefix, result["index"], result["sidecar"], key, **scanned)


def share_tokens(data: Checked, seq_len: int, split: str, part: str) -> tuple[int, int]:
    """Tokens [lo, hi) of ``data`` that ``split``'s ``part`` ("train" or "valid") reads, as
    :class:`~.datasets.IndexedTokenDataset` does (:func:`~.datasets.part_samples`): its samples of ``seq_len`` + 1
    tokens, the last one's label included; one token (hi - lo = 1, no sample) when the part is empty."""
    first, end = part_samples(data.index.tokens, seq_len, split, part)
    return first * seq_len, end * seq_len + 1


def documents_read(bounds: np.ndarray, tokens: tuple[int, int]) -> slice:
    """The documents (``bounds`` int64 [D + 1]: :func:`~.integrity.document_bounds`) holding any of ``tokens`` =
    [lo, hi)."""
    lo, hi = tokens
    return slice(int(np.searchsorted(bounds, lo, side="right")) - 1, int(np.searchsorted(bounds[:-1], hi, side="left")))


def documents_within(bounds: np.ndarray, tokens: tuple[int, int]) -> slice:
    """The documents lying wholly inside ``tokens`` = [lo, hi)."""
    lo, hi = tokens
    return slice(int(np.searchsorted(bounds[:-1], lo, side="left")), int(np.searchsorted(bounds, hi, side="right")) - 1)


def valid_path_overlap(train: Checked, valid: Checked, min_tokens: int, seq_len: int,
                       split: Optional[str]) -> Overlap:
    """The documents of the dataset ``valid`` that the dataset ``train`` holds too: all of its documents, or under
    ``split`` those its training share reads any token of (the others are never trained on)."""
    train_hashes = train.hashes()
    if split:
        train_hashes = train_hashes[documents_read(train.bounds(), share_tokens(train, seq_len, split, "train"))]
    return shared_documents(train_hashes, valid.hashes(), np.diff(valid.bounds()), min_tokens)


def split_overlap(data: Checked, seq_len: int, split: str, min_tokens: int) -> Overlap:
    """The documents wholly inside ``split``'s validation share of the dataset ``data`` (read as samples of
    ``seq_len`` + 1 tokens, as :class:`~.datasets.IndexedTokenDataset` does) that its training share holds too (any
    document of which training reads a token)."""
    bounds, hashes = data.bounds(), data.hashes()
    valid_tokens = share_tokens(data, seq_len, split, "valid")
    valid = documents_within(bounds, valid_tokens)
    # the training share's last label is the validation share's first token: a document starting there is read by
    # both, and is not a copy of itself
    read = documents_read(bounds, share_tokens(data, seq_len, split, "train"))
    train = slice(read.start, min(read.stop, valid.start))
    if valid_tokens[1] - valid_tokens[0] <= 1 or valid.stop <= valid.start:  # no sample: only the training label
        return Overlap(0, 0, 0, 0, 0)
    return shared_documents(hashes[train], hashes[valid], np.diff(bounds[valid.start:valid.stop + 1]), min_tokens)


def overlap_checked(cfg: Config) -> bool:
    """Whether :func:`held_out_overlap_message` compares document hashes: indexed data with validation on, held out
    by data.valid_path or data.split, and data.valid_overlap_max < 1 (1: not checked)."""
    d = cfg.data
    return bool(d.source == "indexed" and cfg.train.eval_every and d.valid_overlap_max < 1 and d.path
                and (d.valid_path or d.split))


def held_out_overlap_message(cfg: Config, checked: dict[str, Checked]) -> Optional[str]:
    """One line when more than ``data.valid_overlap_max`` of the held-out documents (``data.valid_path``'s, else
    ``data.split``'s validation share) are training documents too, naming both, the counts and the way on; None
    otherwise, when validation is off, or when ``data.valid_overlap_max`` is 1 (not checked). ``checked``: data.path
    and data.valid_path as the pre-flight read them, by prefix. ValueError: a damaged document table (one line)."""
    d = cfg.data
    if not overlap_checked(cfg):
        return None
    if d.valid_path:
        overlap = valid_path_overlap(checked[d.path], checked[d.valid_path], d.valid_overlap_min_tokens,
                                     d.seq_len, d.split)
        where = f"data.valid_path = {d.valid_path}: {overlap.shared:,} of its {overlap.counted:,} documents"
        training = f"the training data data.path = {d.path}"
        fix = "rebuild the held-out set without them (deduplicate, then split)"
    else:
        overlap = split_overlap(checked[d.path], d.seq_len, d.split, d.valid_overlap_min_tokens)
        where = (f"data.split = {d.split!r}: {overlap.shared:,} of the {overlap.counted:,} documents of the "
                 f"validation share of data.path = {d.path}")
        training = "its training share"
        fix = "deduplicate the corpus and prepare it again"
    if overlap.shared == 0 or overlap.fraction <= d.valid_overlap_max:
        return None
    accept = math.ceil(overlap.fraction * 1e4) / 1e4  # the smallest 4-decimal setting that passes
    return (f"{where} ({overlap.shared_tokens:,} of {overlap.counted_tokens:,} tokens) are also in {training}, "
            f"{100 * overlap.fraction:.3g}% > data.valid_overlap_max = {d.valid_overlap_max:g} (documents under "
            f"data.valid_overlap_min_tokens = {d.valid_overlap_min_tokens} tokens not counted): the validation loss "
            f"would partly measure training documents; {fix}, or accept it with data.valid_overlap_max: {accept:g}")

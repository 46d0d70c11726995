"""Token datasets addressed by *global sample index*, so the data order is independent of dp size and
a run resumes from a consumed-samples count.

A sample is ``seq_len + 1`` consecutive tokens (inputs and next-token labels, shifted before any
sharding). Chunks are drawn without replacement in a seeded order that is reshuffled every epoch.
"""
from __future__ import annotations

import warnings
from functools import lru_cache
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from ..config import Config, parse_split
from ..megatron_import import import_megatron_core
from .integrity import check_bin_size, read_index
from .fingerprint import dataset_fingerprint, digest_kind
from .sidecar import read_sidecar, sidecar_digest, sidecar_tokenizer


def megatron_indexed_dataset():
    """megatron-core's IndexedDataset module, imported without its 'Transformer Engine/Apex are not
    installed' warnings (irrelevant for reading data, and printed once per rank otherwise)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
        import_megatron_core()
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def split_ranges(n: int, fractions: tuple[float, float, float]) -> list[tuple[int, int]]:
    """Megatron's ``--split``: [lo, hi) sample ranges of (train, valid, test) out of ``n``, contiguous and in
    that order, sizes rounded from the cumulative fractions so they add up to ``n``."""
    bounds, acc = [0], 0.0
    for f in fractions:
        acc += f
        bounds.append(min(n, int(round(acc * n))))
    bounds[-1] = n
    return [(bounds[i], bounds[i + 1]) for i in range(3)]


def split_part(n: int, split: Optional[str], part: str) -> tuple[int, int]:
    """Samples [lo, hi) of the ``part`` ("train" or "valid") of ``n`` samples under ``data.split`` (all of
    them for both parts when split is None)."""
    if not split:
        return 0, n
    return split_ranges(n, parse_split(split))[{"train": 0, "valid": 1}[part]]


#: synthetic data validates on a held-out stream: the same generator under run.seed + this offset
SYNTHETIC_VALID_SEED_OFFSET = 1_000_003


def part_samples(tokens: int, seq_len: int, split: Optional[str], part: str) -> tuple[int, int]:
    """Samples [first, end) of the ``part`` ("train" or "valid") under ``data.split`` of a stream of ``tokens`` tokens
    cut into samples of ``seq_len`` + 1 tokens (each sample's last label is the next one's first input); empty (first
    == end) when the stream holds no sample or the part gets none. The one definition of what
    :class:`IndexedTokenDataset` reads (:func:`indexed_part`) and the overlap check compares (data/overlap.py)."""
    return split_part(max(0, (tokens - 1) // seq_len), split, part)


def indexed_part(prefix: str, tokens: int, seq_len: int, split: Optional[str], part: str,
                 key: str = "data.path") -> tuple[int, int]:
    """:func:`part_samples` of the indexed dataset at ``prefix`` (the config's ``key``: data.path or data.valid_path)
    holding ``tokens`` tokens. ValueError (one line) when there is no sample, or the part is empty."""
    first, end = part_samples(tokens, seq_len, split, part)
    if end <= first:
        total = part_samples(tokens, seq_len, None, "train")[1]  # split None: every sample
        if total < 1:
            raise ValueError(f"{key} = {prefix}: {tokens} tokens is fewer than data.seq_len + 1 = {seq_len + 1}")
        raise ValueError(f"data.split: the part [{first}, {end}) of the {total} samples of {prefix} "
                         f"(data.seq_len = {seq_len}) is empty; give it a larger share")
    return first, end


class IndexedTokenDataset:
    """A Megatron indexed dataset (PREFIX.bin/.idx) read as one memory-mapped token stream.

    ``split``/``part``: only the ``part`` ("train" or "valid") of the stream's samples under ``data.split``
    (no validation label is ever a training token: the only token both read is the training share's last label,
    the validation share's first input); default (split None) all of them. ``key``: the config key naming
    ``prefix`` in its messages (data.path or data.valid_path)."""

    def __init__(self, prefix: str, seq_len: int, seed: int, split: Optional[str] = None, part: str = "train",
                 key: str = "data.path"):
        if not Path(f"{prefix}.idx").is_file() or not Path(f"{prefix}.bin").is_file():
            raise ValueError(f"{key} = {prefix}: {prefix}.bin/.idx not found")
        index = read_index(prefix, key)  # one-line errors for a truncated or foreign .idx
        check_bin_size(prefix, index, key)  # the token id range is checked once, before the ranks start (preflight)
        # Megatron's .bin is the concatenation of every sequence's tokens in order: memmap it whole.
        self.tokens = np.memmap(f"{prefix}.bin", dtype=index.dtype, mode="r")
        self.seq_len = seq_len
        self.seed = seed
        self.first, end = indexed_part(prefix, len(self.tokens), seq_len, split, part, key)
        self.num_chunks = end - self.first

    @lru_cache(maxsize=4)
    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_chunks)

    def __getitem__(self, global_index: int) -> torch.Tensor:
        epoch, j = divmod(int(global_index), self.num_chunks)
        start = (self.first + int(self._order(epoch)[j])) * self.seq_len
        return torch.from_numpy(self.tokens[start:start + self.seq_len + 1].astype(np.int64))


def training_identity(cfg: Config) -> tuple[Optional[str], Optional[str]]:
    """What a checkpoint records of the GPT's indexed training data, from one read of its sidecar:
    ``(train_digest, train_tokenizer)``. ``train_digest``: :func:`dataset_identity`. ``train_tokenizer``: the
    fingerprint of the tokenizer the data was prepared with (:func:`~.sidecar.sidecar_tokenizer`), the tokens the
    model's ids mean; None when unknown (a dataset built elsewhere or before fingerprints were recorded).
    ``(None, None)`` for other data."""
    d = cfg.data
    if cfg.model.kind != "gpt" or d.source != "indexed" or not d.path:
        return None, None
    sidecar = read_sidecar(d.path)
    return dataset_identity(d.path, sidecar), sidecar_tokenizer(sidecar)


def agreed_training_identity(cfg: Config) -> tuple[Optional[str], Optional[str]]:
    """:func:`training_identity`, read by each rank and compared across all of them (one small all-gather): a
    ValueError (one line, raised on every rank alike) when they read different datasets at data.path. The pre-flight
    read it once before the ranks and passes them nothing: a dataset replaced between the pre-flight and a rank's
    start, or between two ranks' reads, would otherwise have tp and pp ranks computing on different tokens, dp ranks
    training on a mix, and the checkpoint recording rank 0's identity alone."""
    identity = training_identity(cfg)
    from_files = cfg.model.kind == "gpt" and cfg.data.source == "indexed" and cfg.data.path  # alike on every rank
    if not from_files or not dist.is_initialized() or dist.get_world_size() == 1:
        return identity
    seen: list = [None] * dist.get_world_size()
    dist.all_gather_object(seen, identity)
    other = next((r for r, s in enumerate(seen) if s != seen[0]), None)
    if other is not None:
        raise ValueError(f"data.path = {cfg.data.path} changed while the ranks started: rank 0 read token digest "
                         f"{seen[0][0]}, rank {other} {seen[other][0]} (tokenizer {seen[0][1]} / {seen[other][1]}); "
                         "ranks on different data would train wrongly without a word: start again once the dataset "
                         "is written")
    return identity


def dataset_identity(prefix: str, sidecar: Optional[dict]) -> Optional[str]:
    """The token-stream identity of the indexed dataset at ``prefix`` whose sidecar (None: none) was read as
    ``sidecar`` (:func:`~.sidecar.read_sidecar`): its whole-stream digest, else the stream's sampled fingerprint (a
    dataset built elsewhere or prepared before digests were recorded; data/fingerprint.py)."""
    return sidecar_digest(sidecar) or dataset_fingerprint(prefix)


def same_data_message(path: str, valid_path: str, identities: tuple[Optional[str], Optional[str]]) -> Optional[str]:
    """One line when the held-out dataset ``valid_path`` is the training dataset ``path`` itself — the same ``.bin``
    file, or an equal token-stream identity, e.g. a copy — so the validation loss would measure training data; None
    otherwise. ``identities``: the two datasets' :func:`dataset_identity` (sidecar digest, else fingerprint), in that
    order."""
    if Path(f"{path}.bin").samefile(f"{valid_path}.bin"):
        why = "the same .bin file"
    else:
        mine = identities[0]
        if mine is None or mine != identities[1]:
            return None
        why = f"equal {digest_kind(mine)} digests: a copy"
    return (f"data.valid_path = {valid_path} holds the training data of data.path = {path} ({why}): the validation "
            "loss would measure samples the model trains on; give a held-out dataset, or hold out a share with "
            "data.split instead")


class SyntheticTokenDataset:
    """Deterministic, learnable sequences (a noisy modular progression) for tests and benchmarks."""

    def __init__(self, vocab_size: int, seq_len: int, seed: int):
        self.vocab_size, self.seq_len, self.seed = vocab_size, seq_len, seed

    def __getitem__(self, global_index: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(global_index))
        start = torch.randint(0, self.vocab_size, (1,), generator=g)
        step = torch.randint(1, 8, (1,), generator=g)
        seq = (start + step * torch.arange(self.seq_len + 1)) % self.vocab_size
        noise = torch.rand(self.seq_len + 1, generator=g) < 0.05
        return torch.where(noise, torch.randint(0, self.vocab_size, (self.seq_len + 1,), generator=g), seq)

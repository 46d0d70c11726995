"""Token datasets addressed by *global sample index*, so the data order is independent of dp size and
a run resumes from a consumed-samples count.

A sample is ``seq_len + 1`` consecutive tokens (inputs and next-token labels, shifted before any
sharding). Chunks are drawn without replacement in a seeded order that is reshuffled every epoch.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from .integrity import check_bin_size, read_index


def megatron_indexed_dataset():
    """megatron-core's IndexedDataset module, imported without its 'Transformer Engine/Apex are not
    installed' warnings (irrelevant for reading data, and printed once per rank otherwise)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


class IndexedTokenDataset:
    """A Megatron indexed dataset (PREFIX.bin/.idx) read as one memory-mapped token stream."""

    def __init__(self, prefix: str, seq_len: int, seed: int):
        if not Path(f"{prefix}.idx").is_file() or not Path(f"{prefix}.bin").is_file():
            raise ValueError(f"data.path = {prefix}: {prefix}.bin/.idx not found")
        index = read_index(prefix)  # one-line errors for a truncated or foreign .idx
        check_bin_size(prefix, index)  # the token id range is checked once, before the ranks start (preflight)
        # Megatron's .bin is the concatenation of every sequence's tokens in order: memmap it whole.
        self.tokens = np.memmap(f"{prefix}.bin", dtype=index.dtype, mode="r")
        self.seq_len = seq_len
        self.seed = seed
        self.num_chunks = (len(self.tokens) - 1) // seq_len
        if self.num_chunks < 1:
            raise ValueError(f"data.path = {prefix}: {len(self.tokens)} tokens is fewer than data.seq_len + 1 = "
                             f"{seq_len + 1}")

    @lru_cache(maxsize=4)
    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_chunks)

    def __getitem__(self, global_index: int) -> torch.Tensor:
        epoch, j = divmod(int(global_index), self.num_chunks)
        start = int(self._order(epoch)[j]) * self.seq_len
        return torch.from_numpy(self.tokens[start:start + self.seq_len + 1].astype(np.int64))


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

"""Layout-independent initialisation: every parameter is drawn as its FULL tp=1 tensor from a generator
seeded by (base seed, parameter name), then this rank's tp shard is copied in. Any tp / pp layout
therefore starts from exactly the single-rank weights, and a pipeline rank never builds the layers it
does not hold.

    full = normal_full((3 * d, d), seed, "blocks.0.qkv.weight", std=0.02)
    copy_shard_(param, full, tp_rank, tp_size)
"""
from __future__ import annotations

import zlib

import torch


def param_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator for parameter ``name`` under base ``seed`` (the same on every rank and layout)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)


def normal_full(shape: tuple[int, ...], seed: int, name: str, std: float) -> torch.Tensor:
    """N(0, std²) tensor of the full (tp=1) ``shape`` for parameter ``name`` (fp32, CPU)."""
    return torch.randn(shape, generator=param_generator(seed, name)) * std

"""What autograd keeps for backward, counted the way the memory model is checked (tests/test_*_saved_tensors.py)."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


def parameter_storages(model: torch.nn.Module) -> set[int]:
    """The storages of ``model``'s parameters (they exist whatever the forward keeps)."""
    return {p.untyped_storage().data_ptr() for p in model.parameters()}


@contextlib.contextmanager
def kept_storages(params: set[int]) -> Iterator[dict[int, int]]:
    """Inside the block, every storage autograd saves for backward, each counted once, ``params`` left out:
    yields the dict {storage data_ptr: bytes} it fills."""
    kept: dict[int, int] = {}

    def pack(saved: torch.Tensor) -> torch.Tensor:
        storage = saved.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return saved

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda saved: saved):
        yield kept

"""What autograd keeps for backward, counted the way the memory model is checked (tests/test_*_saved_tensors.py)."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


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


class LiveStorages(TorchDispatchMode):
    """Every storage an op returns, with a weak reference to tell whether it lives and whether a collective touched
    it (gloo's worker may still hold a finished collective's buffers for a moment: they are transient unless
    autograd saved them). An address is a new storage once the one recorded there has died."""

    def __init__(self) -> None:
        super().__init__()
        self.made: dict[int, list] = {}   # address -> [weak ref, bytes, touched by a collective]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "c10d":
            for t in tree_leaves((args, kwargs)):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() in self.made:
                    self.made[t.untyped_storage().data_ptr()][2] = True
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                old = self.made.get(storage.data_ptr())
                if old is not None and not torch.UntypedStorage._expired(old[0]):
                    continue  # the same storage (a view or an in-place result)
                if old is not None:
                    torch.UntypedStorage._free_weak_ref(old[0])
                self.made[storage.data_ptr()] = [storage._weak_ref(), storage.nbytes(), False]
        return out

    def live_bytes(self, leave_out: set, saved: set) -> int:
        """Bytes of the recorded storages alive now, but those at ``leave_out`` and the unsaved ones a collective
        touched."""
        live = sum(n for ptr, (ref, n, communicated) in self.made.items()
                   if ptr not in leave_out and not (communicated and ptr not in saved)
                   and not torch.UntypedStorage._expired(ref))
        for ref, _, _ in self.made.values():
            torch.UntypedStorage._free_weak_ref(ref)
        return live

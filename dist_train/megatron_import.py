"""Import megatron-core without pulling in TorchDynamo and Inductor.

At import time megatron-core wraps its fused kernels (bias-GeLU, SwiGLU, MoE routing and others) with
``torch.compile``, through ``megatron.core.jit.jit_fuser``. The first ``torch.compile`` call imports TorchDynamo and
Inductor. On this CPU that is ~1.4 s of every rank's start-up: ``import megatron.core`` takes 4.5 s instead of
3.1 s. dist-train calls none of those kernels. It uses the tensor-parallel layers and mappings, the vocab-parallel
cross-entropy, the RNG tracker, ``parallel_state`` and the indexed dataset reader. So the first import runs with
``torch.compile`` replaced by an identity decorator, and the fused kernels Megatron defines stay plain eager
functions. ``torch.compile`` is restored as soon as the import returns.

The import also warns, four times on every rank of every tp run, that Transformer Engine and Apex are not
installed and Megatron falls back to local multi-tensor helpers and torch optimizers. dist-train uses neither
Megatron's optimizers nor those helpers, so the import holds back that one warning (any other still shows).

    megatron_core = import_megatron_core()   # then `from megatron.core... import ...` as usual
"""
from __future__ import annotations

import contextlib
import importlib
import sys
import warnings
from types import ModuleType
from typing import Iterator

import torch


#: the start of the import-time warning held back (see the module docstring)
NO_TE_OR_APEX_WARNING = "Transformer Engine and Apex are not installed"


def _identity_compile(fn=None, *args, **kwargs):
    """``torch.compile`` as an identity: ``compile(fn, ...)`` returns fn, ``compile(...)`` a no-op decorator."""
    if fn is None:
        return lambda f: f
    return fn


@contextlib.contextmanager
def compile_as_identity() -> Iterator[None]:
    """Within: ``torch.compile`` is :func:`_identity_compile`, so an import that wraps its functions in it at import
    time leaves them eager and imports no TorchDynamo or Inductor; restored on the way out. (Also DeepSpeed's Muon
    optimizer, dist_train.engines.deepspeed.)"""
    real = torch.compile
    torch.compile = _identity_compile
    try:
        yield
    finally:
        torch.compile = real


def import_megatron_core() -> ModuleType:
    """``megatron.core``, imported once per process with its fused kernels left eager (see module docstring)."""
    if "megatron.core" in sys.modules:
        return sys.modules["megatron.core"]
    with compile_as_identity(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=NO_TE_OR_APEX_WARNING, category=UserWarning)
        return importlib.import_module("megatron.core")

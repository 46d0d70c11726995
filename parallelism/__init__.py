"""dist-train's algorithmic core: sequence (context) and window parallel attention.

Pure torch + torch.distributed. The public names are resolved lazily so that importing one family
(e.g. window parallelism) never pays for another, and optional kernels (flash-attn) are imported
only inside the kernel that uses them.

    from parallelism import shard_sequence, unshard_sequence, sequence_positions, context_parallel_attention
    from parallelism import shard_image, unshard_image, window_parallel_attention
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "shard_sequence": "parallelism.context",
    "unshard_sequence": "parallelism.context",
    "sequence_positions": "parallelism.context",
    "context_parallel_attention": "parallelism.context",
    "shard_image": "parallelism.window",
    "unshard_image": "parallelism.window",
    "window_parallel_attention": "parallelism.window",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'parallelism' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__

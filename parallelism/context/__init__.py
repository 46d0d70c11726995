"""Context (sequence) parallel attention: exact attention over a sequence sharded across ranks.

    from parallelism.context import (shard_sequence, unshard_sequence, sequence_positions,
                                     context_parallel_attention, required_multiple, padded_length)

Modules, one job each: ``layouts`` (which tokens a rank holds), ``masks`` (block classification),
``plan`` (the ring schedule), ``kernels`` (local block (out, lse) kernels), ``merge`` (LSE merge),
``ring`` (THE ring loop, a generator over an abstract communicator), ``comm`` (p2p driver and
all-to-all), ``simulate`` (many virtual ranks in one process), ``ulysses`` / ``hybrid`` (all-to-all
and 2-D variants), ``documents`` (packed-document boundaries), ``attention`` (the public entry
point). See docs/context_parallel.md.
"""
from .attention import METHODS, context_parallel_attention, default_tile, local_attention
from .documents import boundaries_from_doc_ids, normalize_cu_seqlens, pack_cu_seqlens
from .kernels import KERNELS, get_kernel
from .layouts import (LAYOUTS, Chunk, check_seq_len, padded_length, rank_chunks, required_multiple,
                      sequence_positions, shard_sequence, unshard_sequence)
from .plan import Piece, RingPlan, build_plan, build_schedule
from .ring import CPStats
from .simulate import ScheduleError, Simulator, simulate_ring_attention

__all__ = [
    "CPStats", "Chunk", "KERNELS", "LAYOUTS", "METHODS", "Piece", "RingPlan", "ScheduleError", "Simulator",
    "boundaries_from_doc_ids", "build_plan", "build_schedule", "check_seq_len", "context_parallel_attention",
    "default_tile", "get_kernel", "local_attention", "normalize_cu_seqlens", "pack_cu_seqlens", "padded_length",
    "rank_chunks", "required_multiple", "sequence_positions", "shard_sequence", "simulate_ring_attention",
    "unshard_sequence",
]

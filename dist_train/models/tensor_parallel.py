"""Megatron-core glue for tensor parallelism: layers, vocab-parallel loss, process groups and RNG.

All Megatron state is derived from OUR DeviceMesh (``dist_train.mesh``), never from a second
``initialize_model_parallel`` that could disagree with it:

* layers receive the mesh's tp group explicitly (``tp_group=``);
* ``megatron.core.parallel_state``'s tensor-parallel globals (read by
  ``vocab_parallel_cross_entropy``) are set from the same group by :func:`bind_megatron_state`;
* the model-parallel RNG tracker is seeded per tp rank; on CPU Megatron's tracker (which stores
  CUDA generator states) is replaced by one that forks the CPU generator.

Weights are created by the model with its tp=1 initialisation (the full matrix, from a per-parameter
seeded generator) and :func:`copy_shard_` copies this rank's slice in, so tp=2 holds exactly the same
full matrices as tp=1 with the same seed.

    tp = TensorParallel.from_mesh(mesh, seed=cfg.run.seed)   # None when mesh.size("tp") == 1
    lin = tp.column(d_in, d_out)                             # ColumnParallelLinear, output [.., d_out/tp]

Sequence parallelism (``sequence_parallel=True``): outside the tp matmuls the activations are
[B, S/tp, d] (this rank's contiguous sequence chunk). :meth:`TensorParallel.enter` all-gathers the
sequence before the column-parallel matmuls (backward: reduce-scatter) and the row-parallel layers
reduce-scatter their partial sums along the sequence (backward: all-gather) instead of all-reducing.
Activations are batch-first while Megatron's SP collectives cut dim 0, so the layers keep
``sequence_parallel=False`` and the collectives run here: on NCCL through megatron-core's
``gather_from_sequence_parallel_region`` / ``reduce_scatter_to_sequence_parallel_region`` (on the
sequence-first transpose); on gloo, which has no reduce_scatter, through :class:`_SeqGather` /
:class:`_SeqReduceScatter` (reduce-scatter emulated as all-reduce + own slice: exact, tp× the bytes).

Column-parallel linears that share one input under sequence parallelism (wq|wk|wv, w1|w3, the head) run as
one autograd Function, :meth:`TensorParallel.gathered_linears` (Megatron-LM's rule): forward all-gathers the
local chunk once and applies each layer; backward all-gathers the chunk AGAIN (overlapping the input-gradient
matmuls) instead of keeping the gathered [B, S, d] for the weight gradients, so autograd keeps only
[B, S/tp, d] per group. :func:`column_outputs` picks it (SP) or the layers themselves (no SP / tp = 1).
"""
from __future__ import annotations

import contextlib
import functools
import operator
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..megatron_import import import_megatron_core
from .autocast_input import autocast_dtype_of, autocast_inputs
from .lean_autograd import at_least_fp32

# torch >= 2.13 names the dim-0 reduce-scatter reduce_scatter_single (reduce_scatter_tensor warns there)
_reduce_scatter_dim0 = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def silence_cuda_connections_advice() -> None:
    """Off CUDA, mark Megatron's one-time "set CUDA_DEVICE_MAX_CONNECTIONS to 1" warning as given: it is
    about CUDA stream scheduling and would otherwise print on every CPU rank of every tp run."""
    from megatron.core.tensor_parallel import layers

    linear = getattr(layers, "linear_with_grad_accumulation_and_async_allreduce", None)
    if linear is not None:  # a megatron-core without it has no such warning either
        linear.warned = True


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """Vocabulary padded up to a multiple of tp (Megatron's vocab-parallel layers need equal shards)."""
    return -(-vocab_size // tp) * tp


class CPURNGStatesTracker:
    """Megatron's ``CudaRNGStatesTracker`` interface (add / fork / get_states / set_states / reset)
    over the CPU default generator, for runs without CUDA (``model_parallel_cuda_manual_seed`` and
    Megatron's tracker call ``torch.cuda`` RNG functions)."""

    def __init__(self) -> None:
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def reset(self) -> None:
        self.states_, self.seeds_ = {}, set()

    def is_initialized(self) -> bool:
        return bool(self.states_)

    def get_states(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.states_.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self.states_ = dict(states)

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_ or name in self.states_:
            raise ValueError(f"RNG tracker: seed {seed} or state '{name}' already exists")
        self.seeds_.add(seed)
        g = torch.Generator().manual_seed(seed)
        self.states_[name] = g.get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise ValueError(f"RNG tracker: state '{name}' was never added; known: {sorted(self.states_)}")
        orig = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)


def seed_model_parallel_rng(seed: int, tp_rank: int, device: torch.device) -> None:
    """Megatron's convention: the 'model-parallel-rng' state (dropout inside tp regions) differs per tp
    rank, the default generator (dropout in replicated regions) is the same on every tp rank."""
    import_megatron_core()
    from megatron.core.tensor_parallel import random as mrandom

    if device.type == "cuda":
        mrandom.model_parallel_cuda_manual_seed(seed)
        return
    tracker = CPURNGStatesTracker()
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    mrandom._CUDA_RNG_STATE_TRACKER = tracker
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


def bind_megatron_state(tp_group: dist.ProcessGroup, tp_ranks: list[int]) -> None:
    """Point megatron.core.parallel_state's tensor-parallel globals at our mesh's tp group.

    Only the tensor-parallel state is bound: the layers and the vocab-parallel cross-entropy we use read
    nothing else (data/pipeline/context parallelism are run by our engines with the mesh's groups).
    Called on every model build so a process that builds several models always sees the current mesh.
    """
    import_megatron_core()
    from megatron.core import parallel_state as ps

    ps._TENSOR_MODEL_PARALLEL_GROUP = tp_group
    ps._TENSOR_MODEL_PARALLEL_GLOBAL_RANKS = list(tp_ranks)
    ps._MPU_TENSOR_MODEL_PARALLEL_WORLD_SIZE = dist.get_world_size(tp_group)
    ps._MPU_TENSOR_MODEL_PARALLEL_RANK = dist.get_rank(tp_group)


# -- sequence-parallel collectives along dim 1 of [B, S, ...] ----------------------------------------
def _seq_chunk(x: torch.Tensor, group) -> torch.Tensor:
    """This rank's contiguous chunk of the sequence dim (dim 1), a tensor of its own; S must be divisible by the group
    size. Always a copy: with one sample the chunk is a contiguous view, which would keep the whole [1, S, ...]
    storage alive wherever the chunk is kept (the first layer saves the embedding's scattered output: tp× the chunk;
    counted in tests/test_gpt_embedding_memory.py)."""
    n, r = dist.get_world_size(group), dist.get_rank(group)
    if x.shape[1] % n:
        raise ValueError(f"sequence parallelism: sequence length {x.shape[1]} is not divisible by tp = {n}; "
                         f"pad it to a multiple of {n}")
    part = x.shape[1] // n
    return x.narrow(1, r * part, part).clone(memory_format=torch.contiguous_format)


def _is_nccl(group) -> bool:
    """NCCL has the fused dim-0 collectives (and Megatron's SP mappings); gloo takes the list / emulated ones."""
    return dist.get_backend(group) == "nccl"


class _PendingSeq:
    """A started sequence all-gather or reduce-scatter along dim 1 of a batch-first tensor; ``wait()`` -> result.

    ``fused``: one dim-0 collective into one buffer (``all_gather_into_tensor`` / ``reduce_scatter_single``: NCCL's,
    through the [tp, B, S/tp, ...] layout); otherwise gloo's list all-gather and the exact reduce-scatter emulation
    (all-reduce, keep the own chunk: tp× the bytes)."""

    def __init__(self, work, finish: Callable[[], torch.Tensor]):
        self.work, self.finish = work, finish

    def wait(self) -> torch.Tensor:
        self.work.wait()
        return self.finish()

    @classmethod
    def all_gather(cls, x: torch.Tensor, group, fused: bool) -> "_PendingSeq":
        """[B, S/tp, ...] -> [B, S, ...] (rank chunks in tp-rank order)."""
        n, x = dist.get_world_size(group), x.contiguous()
        if fused:
            buf = x.new_empty((n * x.shape[0],) + tuple(x.shape[1:]))  # [tp·B, S/tp, ...]
            work = dist.all_gather_into_tensor(buf, x, group=group, async_op=True)
            return cls(work, lambda: buf.unflatten(0, (n, x.shape[0])).movedim(0, 1).flatten(1, 2))
        parts = [torch.empty_like(x) for _ in range(n)]
        return cls(dist.all_gather(parts, x, group=group, async_op=True), lambda: torch.cat(parts, dim=1))

    @classmethod
    def reduce_scatter(cls, x: torch.Tensor, group, fused: bool, owned: bool = False) -> "_PendingSeq":
        """[B, S, ...] partial sums -> this rank's chunk [B, S/tp, ...] of their tp-sum. ``owned``: x is the caller's
        own scratch, read no more: gloo's all-reduce runs in it (when contiguous) instead of in a copy."""
        n = dist.get_world_size(group)
        if fused:
            parts = x.unflatten(1, (n, x.shape[1] // n)).movedim(1, 0).contiguous()  # [tp, B, S/tp, ...]
            out = x.new_empty(parts.shape[1:])
            return cls(_reduce_scatter_dim0(out, parts.flatten(0, 1), group=group, async_op=True), lambda: out)
        full = x.contiguous() if owned else x.contiguous().clone()
        work = dist.all_reduce(full, op=dist.ReduceOp.SUM, group=group, async_op=True)
        return cls(work, lambda: _seq_chunk(full, group))


def sequence_all_gather(x: torch.Tensor, group) -> torch.Tensor:
    """[B, S/tp, ...] -> [B, S, ...] along the sequence (no autograd): NCCL's dim-0 collective, gloo's list one."""
    return _PendingSeq.all_gather(x, group, _is_nccl(group)).wait()


def sequence_reduce_scatter(x: torch.Tensor, group, owned: bool = False) -> torch.Tensor:
    """[B, S, ...] partial sums -> this rank's chunk [B, S/tp, ...] of their tp-sum (no autograd; ``owned``: as
    :meth:`_PendingSeq.reduce_scatter`)."""
    return _PendingSeq.reduce_scatter(x, group, _is_nccl(group), owned).wait()


def _seq_mapping(name: str, forward: Callable, backward: Callable, doc: str) -> type:
    """An autograd Function applying ``forward(x, group)``, with ``backward(grad, group)`` as its adjoint."""

    class _Mapping(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, group):
            ctx.group = group
            return forward(x, group)

        @staticmethod
        def backward(ctx, g):
            return backward(g, ctx.group), None

    _Mapping.__name__ = _Mapping.__qualname__ = name
    _Mapping.__doc__ = doc
    return _Mapping


_SeqGather = _seq_mapping(
    "_SeqGather", sequence_all_gather, sequence_reduce_scatter,
    "All-gather along the sequence; backward reduce-scatter (the gathered tensor feeds tp matmuls whose "
    "input gradients are per-rank partial sums).")
_SeqReduceScatter = _seq_mapping(
    "_SeqReduceScatter", sequence_reduce_scatter, sequence_all_gather,
    "Reduce-scatter along the sequence (row-parallel output); backward all-gather.")
_SeqScatter = _seq_mapping(
    "_SeqScatter", _seq_chunk, sequence_all_gather,
    "Keep the own sequence chunk of a replicated tensor; backward all-gather.")
_SeqGatherReplicated = _seq_mapping(
    "_SeqGatherReplicated", sequence_all_gather, _seq_chunk,
    "All-gather along the sequence; backward keep the own chunk (the gathered tensor is used identically "
    "on every tp rank, so its gradient is already the full one).")


class _GatheredLinears(torch.autograd.Function):
    """``outputs = [gather(x_local) @ W_i.T (+ b_i)]``: column-parallel linears sharing one sequence-parallel input,
    keeping only ``x_local`` [B, S/tp, d] (and the weights) for backward — Megatron-LM's sequence parallelism.

    Forward: one all-gather of ``x_local`` along the sequence (dim 1), then each layer's ``torch.matmul(x, W.t())``
    exactly as Megatron's ``LinearWithGradAccumulationAndAsyncCommunication`` computes it (+ the bias in the output's
    dtype, as :meth:`TensorParallel.column` adds it). Backward:
    the all-gather again, started before the input-gradient matmuls and waited for after them; the input
    gradient ``Σ_i dY_i @ W_i`` (each in x's dtype, as autograd sums the layers' gradients) is reduce-scattered
    to this rank's chunk while the weight gradients ``dY_i^T @ x`` (and bias ``Σ dY_i``) are computed. 16-bit:
    autocast's state of the forward is restored in backward (``torch.amp.custom_bwd``'s rule, on x's device —
    Megatron's ``custom_bwd`` is CUDA's only), so the same 16-bit matmuls run; weight gradients reach ``.grad``
    through autograd as with Megatron's layers (cast to the parameter's dtype). Under autocast the chunk is cast
    to the autocast dtype once, before it is kept and gathered (:func:`~.autocast_input.autocast_dtype_of`): the
    kept chunk and the all-gathers are 16-bit, as in Megatron-LM, whose norms output 16 bits; the input gradient
    stays in x's dtype."""

    @staticmethod
    def forward(ctx, x_local, group, fused, n_layers, *weights_and_biases):
        weights, biases = weights_and_biases[:n_layers], weights_and_biases[n_layers:]
        device = x_local.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.group, ctx.fused, ctx.biases = group, fused, [b is not None for b in biases]
        ctx.x_dtype = x_local.dtype
        cast = autocast_dtype_of(x_local)
        if cast is not None:
            # under autocast the matmuls would cast the gathered input to 16 bits anyway: cast the chunk first, so
            # the kept chunk and both all-gathers are 16-bit (the same values reach the matmuls)
            x_local = x_local.to(cast)
        ctx.save_for_backward(x_local, *weights)
        x = _PendingSeq.all_gather(x_local, group, fused).wait()
        outs = []
        for w, b in zip(weights, biases):
            y = torch.matmul(x, w.t())
            outs.append(y if b is None else y + b.to(y.dtype))  # the bias in the output's dtype, as _plain_output
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        x_local, *weights = ctx.saved_tensors
        device, enabled, dtype = ctx.autocast
        n = len(weights)
        need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[4:4 + n], ctx.needs_input_grad[4 + n:]
        with torch.autocast(device, enabled=enabled, dtype=dtype):
            gathering = _PendingSeq.all_gather(x_local, ctx.group, ctx.fused) if any(need_w) else None
            scattering = None
            if need_x:
                # folded from the first term (``sum`` would start with ``0 + dY_0 @ W_0``: one more [B, S, d]
                # pass per group), in layer order as autograd accumulates the layers' input gradients
                grad_x = functools.reduce(operator.add, (g.matmul(w).to(ctx.x_dtype) for g, w in zip(grads, weights)))
                # grad_x is this backward's own fresh sum: gloo reduces it in place
                scattering = _PendingSeq.reduce_scatter(grad_x, ctx.group, ctx.fused, owned=True)
            flat = [g.reshape(-1, g.shape[-1]) for g in grads]
            grad_w: list = [None] * n
            if gathering is not None:
                x = gathering.wait()
                x = x.reshape(-1, x.shape[-1])
                grad_w = [g.t().matmul(x) if need else None for g, need in zip(flat, need_w)]
            grad_b = [g.sum(dim=0) if has and need else None for g, has, need in zip(flat, ctx.biases, need_b)]
        grad_x_local = scattering.wait() if scattering is not None else None
        return (grad_x_local, None, None, None, *grad_w, *grad_b)


def column_outputs(tp: Optional["TensorParallel"], x: torch.Tensor, layers: Sequence[nn.Module]) -> list[torch.Tensor]:
    """Outputs of column-parallel ``layers`` (modules with ``weight`` and optional ``bias``) that share the input
    ``x``: under sequence parallelism x [B, S/tp, d] -> each [B, S, d_out/tp] through
    :meth:`TensorParallel.gathered_linears` (only the local chunk kept); otherwise each layer on ``x`` (tp = 1:
    ``nn.Linear``; tp without SP: Megatron's layers, which all-reduce their input gradient)."""
    if tp is None or not tp.sequence_parallel:
        # under autocast one 16-bit cast of x, shared (and kept once) by the layers instead of one per layer
        return [layer(xi) for layer, xi in zip(layers, autocast_inputs(x, len(layers)))]
    return tp.gathered_linears(x, layers)


def _megatron_seq_first(fn, x: torch.Tensor, *args) -> torch.Tensor:
    """Run a megatron-core sequence-parallel mapping (which cuts dim 0) on batch-first ``x``."""
    return fn(x.transpose(0, 1).contiguous(), *args).transpose(0, 1)


@dataclass
class TensorParallel:
    """This rank's view of the tp axis plus the Megatron config its layers share."""
    group: dist.ProcessGroup
    size: int
    rank: int
    config: "object"  # megatron.core.ModelParallelConfig
    sequence_parallel: bool = False

    @classmethod
    def from_mesh(cls, mesh, seed: int, device: torch.device, params_dtype: torch.dtype = torch.float32,
                  sequence_parallel: bool = False) -> Optional["TensorParallel"]:
        if mesh.size("tp") == 1:
            return None
        return cls.from_group(mesh.tp_group, mesh.ranks_along(("tp",)), seed, device, params_dtype,
                              sequence_parallel)

    @classmethod
    def from_group(cls, group: dist.ProcessGroup, ranks: list[int], seed: int, device: torch.device,
                   params_dtype: torch.dtype = torch.float32, sequence_parallel: bool = False) -> "TensorParallel":
        """The tp context over ``group`` (global ``ranks``, in group order): binds Megatron's tp state to it
        and seeds the model-parallel RNG. The trainer goes through :meth:`from_mesh`."""
        import_megatron_core()
        from megatron.core import ModelParallelConfig

        bind_megatron_state(group, ranks)
        if device.type != "cuda":
            silence_cuda_connections_advice()
        rank = dist.get_rank(group)
        size = dist.get_world_size(group)
        seed_model_parallel_rng(seed, rank, device)
        config = ModelParallelConfig(
            tensor_model_parallel_size=size,
            sequence_parallel=False,
            use_cpu_initialization=True,   # no torch.cuda calls while building; .to(device) moves it
            perform_initialization=False,  # the model copies its tp=1 init in (copy_shard_)
            params_dtype=params_dtype,
            gradient_accumulation_fusion=False,
            async_tensor_model_parallel_allreduce=False,
        )
        return cls(group=group, size=size, rank=rank, config=config, sequence_parallel=sequence_parallel)

    # -- layers ---------------------------------------------------------------------------------
    def column(self, d_in: int, d_out: int, bias: bool = False, stride: int = 1) -> nn.Module:
        """x [..., d_in] (replicated) -> [..., d_out/tp] (this rank's output columns, + its bias slice). With
        sequence parallelism the input comes from :meth:`enter`, whose backward already sums the input
        gradient over tp, so the layer's own all-reduce of it is disabled. ``stride`` > 1: the output is
        ``stride`` concatenated parts (a fused q|k|v) each split over tp — Megatron's partition_stride, see
        :func:`shard_of`."""
        from megatron.core.tensor_parallel import ColumnParallelLinear

        return _mark_sharded(_plain_output(ColumnParallelLinear)(
            d_in, d_out, config=self.config, init_method=_no_init, bias=bias, gather_output=False, skip_bias_add=True,
            tp_group=self.group, disable_grad_reduce=self.sequence_parallel, stride=stride), dim=0, stride=stride)

    def row(self, d_in: int, d_out: int, bias: bool = False) -> nn.Module:
        """x [..., d_in/tp] (this rank's slice) -> [..., d_out] summed over tp (+ the replicated bias, added
        once after the sum); with sequence parallelism x [B, S, d_in/tp] -> [B, S/tp, d_out] (the tp-sum
        reduce-scattered along the sequence; no bias)."""
        from megatron.core.tensor_parallel import RowParallelLinear

        if bias and self.sequence_parallel:
            raise ValueError("a row-parallel linear with a bias under sequence parallelism is not supported")
        cls = _sp_row(RowParallelLinear) if self.sequence_parallel else _plain_output(RowParallelLinear)
        layer = cls(d_in, d_out, config=self.config, init_method=_no_init, bias=bias, input_is_parallel=True,
                    skip_bias_add=True, tp_group=self.group)
        layer.tp = self
        return _mark_sharded(layer, dim=1)

    def embedding(self, vocab_size: int, d: int) -> nn.Module:
        """tokens [B, S] -> [B, S, d]; rows of the (padded) vocabulary split over tp."""
        from megatron.core.tensor_parallel import VocabParallelEmbedding

        return _mark_sharded(VocabParallelEmbedding(padded_vocab_size(vocab_size, self.size), d,
                                                    init_method=_no_init, config=self.config,
                                                    tp_group=self.group), dim=0)

    # -- sequence parallelism -----------------------------------------------------------------
    def _nccl(self) -> bool:
        return _is_nccl(self.group)

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        """The gathered input of a tp consumer: SP: [B, S/tp, d] -> [B, S, d] all-gathered (backward
        reduce-scatter); otherwise identity (the column layers all-reduce their input gradient). The model's
        consumers keep only the chunk instead (:meth:`gathered_linears`; the chunked loss gathers and
        reduce-scatters inside its Function); this is the plain composition they are tested against."""
        if not self.sequence_parallel:
            return x
        if self._nccl():
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            return _megatron_seq_first(gather_from_sequence_parallel_region, x, True, self.group)
        return _SeqGather.apply(x, self.group)

    def gathered_linears(self, x_local: torch.Tensor, layers: Sequence[nn.Module]) -> list[torch.Tensor]:
        """Sequence parallelism's column-parallel matmuls sharing one input: x_local [B, S/tp, d] -> per layer
        [B, S, d_out/tp] = all-gathered x @ weight.T (+ bias), keeping only x_local for backward (which all-gathers
        it again; :class:`_GatheredLinears`). Same values and gradients as ``layer(enter(x_local))`` per layer."""
        weights = [layer.weight for layer in layers]
        biases = [getattr(layer, "bias", None) for layer in layers]
        return list(_GatheredLinears.apply(x_local, self.group, self._nccl(), len(layers), *weights, *biases))

    def reduce_scatter(self, x: torch.Tensor) -> torch.Tensor:
        """SP exit of a row-parallel matmul: partial [B, S, d] -> tp-sum's chunk [B, S/tp, d]."""
        if self._nccl():
            from megatron.core.tensor_parallel import reduce_scatter_to_sequence_parallel_region

            return _megatron_seq_first(reduce_scatter_to_sequence_parallel_region, x, self.group)
        return _SeqReduceScatter.apply(x, self.group)

    def scatter(self, x: torch.Tensor) -> torch.Tensor:
        """Enter the SP region from a replicated tensor (embedding output): [B, S, d] -> own chunk
        [B, S/tp, d] (backward all-gather); identity without SP."""
        if not self.sequence_parallel:
            return x
        if self._nccl():
            from megatron.core.tensor_parallel import scatter_to_sequence_parallel_region

            return _megatron_seq_first(scatter_to_sequence_parallel_region, x, self.group)
        return _SeqScatter.apply(x, self.group)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Leave the SP region to a replicated consumer: [B, S/tp, d] -> [B, S, d] (backward: own chunk);
        identity without SP."""
        if not self.sequence_parallel:
            return x
        if self._nccl():
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            return _megatron_seq_first(gather_from_sequence_parallel_region, x, False, self.group)
        return _SeqGatherReplicated.apply(x, self.group)

    def replicated_weight(self, w: torch.Tensor) -> torch.Tensor:
        """A weight replicated over tp but applied to SP activations (norms): each rank sees S/tp tokens,
        so its gradient is summed over tp in backward (Megatron all-reduces its 'sequence_parallel'
        grads after backward; here the sum is part of autograd, so every engine gets full, tp-identical
        gradients and the global grad norm counts them once as replicated). Identity without SP."""
        return self.copy_to_region(w) if self.sequence_parallel else w

    def copy_to_region(self, x: torch.Tensor) -> torch.Tensor:
        """Identity forward, all-reduce of the gradient backward (input of a column-parallel matmul)."""
        from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

        return copy_to_tensor_model_parallel_region(x, group=self.group)

    # -- loss -----------------------------------------------------------------------------------
    def cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                      ignore_index: int) -> torch.Tensor:
        """logits: [..., V_pad/tp] this rank's vocab slice; labels: [...] -> per-token loss [...] (>= fp32),
        0 where ``labels == ignore_index``. Padded vocab entries get -inf so the softmax is over the real
        vocabulary only (identical to tp=1)."""
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        part = logits.shape[-1]
        start = self.rank * part
        n_pad = max(0, start + part - vocab_size)
        logits = logits.to(at_least_fp32(logits.dtype))
        if n_pad:
            mask = torch.zeros(part, dtype=torch.bool, device=logits.device)
            mask[part - n_pad:] = True
            logits = logits.masked_fill(mask, float("-inf"))
        valid = labels != ignore_index
        loss = vocab_parallel_cross_entropy(logits, torch.where(valid, labels, torch.zeros_like(labels)))
        return loss * valid


def parallel_linear(tp: Optional[TensorParallel], d_in: int, d_out: int, kind: str, bias: bool = False,
                    stride: int = 1) -> nn.Module:
    """``nn.Linear`` at tp=1; a Megatron column- (``kind='col'``: output split, ``stride`` parts) or row-
    (``'row'``: input split) parallel linear otherwise. Same parameter names (``weight``, ``bias``) either way."""
    if tp is None:
        return nn.Linear(d_in, d_out, bias=bias)
    if kind == "col":
        return tp.column(d_in, d_out, bias=bias, stride=stride)
    if kind == "row":
        return tp.row(d_in, d_out, bias=bias)
    raise ValueError(f"parallel_linear kind = {kind!r}: expected 'col' or 'row'")


_PLAIN: dict = {}  # Megatron class (or ('sp', class)) -> our subclass


def _plain_output(cls: type) -> type:
    """A subclass of a Megatron linear whose forward returns the output only, its bias added (Megatron returns
    (output, bias) with ``skip_bias_add``), so it is a drop-in for ``nn.Linear`` and the parameter stays
    ``<name>.weight``. The bias is added in the output's dtype, as ``nn.Linear`` under autocast does: Megatron's
    own add puts the fp32 bias on the 16-bit matmul output, which promotes the output — and, in a swin, the
    residual stream and the MLP after it — to fp32 (counted: tests/test_swin_saved_tensors.py)."""
    if cls not in _PLAIN:
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out, bias = cls.forward(self, x)
            return out if bias is None else out + bias.to(out.dtype)

        _PLAIN[cls] = type(cls.__name__, (cls,), {"forward": forward, "__module__": __name__})
    return _PLAIN[cls]


def _sp_row(cls: type) -> type:
    """Row-parallel linear for sequence parallelism: the local partial product, then a reduce-scatter
    along the sequence instead of Megatron's all-reduce (same weight parameter and attributes)."""
    if ("sp", cls) not in _PLAIN:
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.tp.reduce_scatter(F.linear(x, self.weight))

        _PLAIN[("sp", cls)] = type("SP" + cls.__name__, (cls,), {"forward": forward, "__module__": __name__})
    return _PLAIN[("sp", cls)]


def _mark_sharded(layer: nn.Module, dim: int, stride: int = 1) -> nn.Module:
    """Megatron sets the tp attributes (tensor_model_parallel, partition_dim, partition_stride) only
    inside its own init; with ``perform_initialization=False`` on CPU we set them (norms and DeepSpeed's
    model-parallel checks read them)."""
    if not getattr(layer.weight, "tensor_model_parallel", False):
        mark_tp_sharded(layer.weight, dim, stride)
    return layer


def mark_tp_sharded(param: torch.Tensor, dim: int, stride: int = 1) -> torch.Tensor:
    """Give a parameter that holds this tp rank's slice along ``dim`` Megatron's tp attributes (what the
    gradient norm, the checkpoint adapter and :func:`copy_shard_` read)."""
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    for attr in ("tensor_model_parallel", "partition_dim", "partition_stride"):
        if hasattr(param, attr):
            delattr(param, attr)
    set_tensor_model_parallel_attributes(param, is_parallel=True, dim=dim, stride=stride)
    return param


def _no_init(weight: torch.Tensor) -> None:
    """Megatron needs an init_method; ours runs later on the full matrix (see module docstring)."""
    return None


def is_tp_sharded(p: torch.Tensor) -> bool:
    """True for parameters split over tp (Megatron's attribute); replicated ones count once in norms."""
    return bool(getattr(p, "tensor_model_parallel", False))


def shard_of(full: torch.Tensor, dim: int, local: int, tp_rank: int, tp_size: int, stride: int = 1) -> torch.Tensor:
    """Tp rank ``tp_rank``'s ``local`` rows along ``dim`` of the tp=1 tensor ``full`` (Megatron's rule):
    ``full`` (zero-padded to ``local * tp_size`` rows: the vocabulary) is cut into ``stride * tp_size``
    equal pieces and the rank takes pieces ``tp_rank, tp_rank + tp_size, …`` — with ``stride`` = 3 on a
    fused [q; k; v] output that is the q, k and v rows of this rank's heads."""
    total = local * tp_size
    if full.shape[dim] < total:  # padded vocabulary rows: zero
        pad = list(full.shape)
        pad[dim] = total - full.shape[dim]
        full = torch.cat([full, full.new_zeros(pad)], dim=dim)
    if stride == 1:
        return full.narrow(dim, tp_rank * local, local)
    if local % stride:
        raise ValueError(f"a shard of {local} rows cannot hold {stride} equal strided parts")
    return torch.cat(full.split(local // stride, dim=dim)[tp_rank::tp_size], dim=dim)


def unshard_strided(shards: list[torch.Tensor], dim: int, stride: int) -> torch.Tensor:
    """Inverse of :func:`shard_of` for every rank's shard (tp-rank order) of a strided parameter: the tp=1
    tensor, each of the ``stride`` parts being the ranks' pieces of that part in rank order."""
    pieces = [s.chunk(stride, dim=dim) for s in shards]
    return torch.cat([pieces[r][j] for j in range(stride) for r in range(len(shards))], dim=dim)


def unsharded_shape(param: torch.Tensor, tp_size: int) -> list[int]:
    """The tp=1 shape of ``param`` (this rank's shard, or a replicated tensor), before any vocab padding rule."""
    shape = list(param.shape)
    if is_tp_sharded(param):
        shape[param.partition_dim] *= tp_size
    return shape


def copy_shard_(param: torch.Tensor, full: torch.Tensor, tp_rank: int, tp_size: int) -> None:
    """Copy this rank's shard of the tp=1 tensor ``full`` into ``param`` (zero-padding the vocab dim)."""
    if not is_tp_sharded(param):
        param.data.copy_(full)
        return
    dim = param.partition_dim
    param.data.copy_(shard_of(full, dim, param.shape[dim], tp_rank, tp_size, getattr(param, "partition_stride", 1)))

"""Engine-specific :class:`StateAdapter` s: every engine writes the ONE checkpoint layout of a tp=1, pp=1,
plain-optimizer run (``model.<fqn>`` with the full tensor's shape, ``optim.state.<fqn>.exp_avg``, …).

Why these exist — the danger they remove. DCP treats same-named plain tensors as replicas and keeps one:
* tensor parallel (Megatron layers): each tp rank's parameter is a *local shard* under the SAME name as the
  full tp=1 parameter; saved as plain tensors, one rank's shard would silently stand for the whole matrix.
  :class:`TensorParallelAdapter` presents each sharded parameter (and every optimizer state of its shape)
  as a ``DTensor`` over the tp sub-mesh with the full tp=1 shape, so DCP writes each shard once and
  reshards on load to any tp.
* DeepSpeed ZeRO 1-3: the fp32 master weights and the optimizer state are flat partitions inside
  DeepSpeed. :class:`DeepSpeedStateAdapter` gathers them per parameter into full plain tensors (replicated
  after gathering → de-duplicated by DCP) under the TorchStateAdapter's keys, and scatters them back.

    kwargs = engine_checkpoint_kwargs(module, mesh)                               # DDP / pipeline engines
    kwargs = engine_checkpoint_kwargs(module, mesh, DeepSpeedStateAdapter(ds_opt)) # DeepSpeed engine
    CheckpointManager(..., **kwargs)

* FSDP2: parameters and optimizer state are already ``DTensor`` s sharded over the grad mesh, which DCP
  writes shard by shard and reshards on load — nothing to adapt at tp = 1. Under tp > 1 the FSDP2 tensor
  is a shard of a Megatron-local shard (same name, different content on each tp rank):
  :class:`TensorParallelAdapter` presents it as its blocks of the tp=1 tensor (:func:`fsdp_rectangles`, a
  :class:`~dist_train.checkpoint.rectangles.Rectangles` of views), so each rank writes and reads only its own
  shard's bytes — nothing is gathered (:func:`fsdp_checkpoint_kwargs`).

Pipeline stages need nothing: each stage holds disjoint names (``layers.<global i>``), DCP merges them by
union. See docs/checkpointing.md ("Engines: tensor parallel, pipeline, ZeRO").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn

from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from ..models.tensor_parallel import is_tp_sharded
from .rectangles import Piece, Rectangles
from .state import StateAdapter, TorchStateAdapter


# ---------------------------------------------------------------------------------------------
# Tensor parallel
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TPShard:
    """How one parameter is split over tp: along ``dim``, ``local`` rows per rank (Megatron: equal shards,
    the last ones zero-padded), ``size`` real rows in the full tensor (``size <= local * tp``); ``stride``
    > 1: Megatron's strided split (a fused q|k|v: each of ``stride`` parts split over tp, see
    ``models.tensor_parallel.shard_of``)."""
    dim: int
    local: int
    size: int
    stride: int = 1


def _contiguous_stride(shape: list[int]) -> tuple[int, ...]:
    stride, acc = [], 1
    for n in reversed(shape):
        stride.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(stride))


class TensorParallelAdapter(StateAdapter):
    """Wraps ``inner`` (default :class:`TorchStateAdapter`) so tp-sharded parameters and their optimizer
    states are ``DTensor`` s with ``Shard(dim)`` over ``tp_mesh`` and the full tp=1 shape.

    Vocabulary padding: Megatron pads the vocab to ``local * tp`` rows; the checkpoint holds the unpadded
    ``[vocab, d]`` tensor. DTensor's uneven ``Shard(0)`` gives rank r rows ``[r*local, min((r+1)*local,
    vocab))`` — exactly the real rows of Megatron's shard r when ``local == ceil(vocab / tp)`` (checked),
    so the DTensor's local tensor is a view of the shard's first rows and the padding never reaches disk.
    On load the padding rows are zeros (they are never used: no token has those ids, the loss masks their
    logits, so parameters and moments there stay zero in training too).

    Norms and other tp-replicated tensors stay plain tensors: DCP de-duplicates them exactly as it would a
    ``Replicate()`` DTensor, and their entries are byte-identical to a tp=1 checkpoint's.

    Strided shards (``partition_stride`` > 1: the Swin's fused q|k|v, each rank holding the q, k and v rows
    of its heads) are not one contiguous block of the full tensor, which a ``Shard`` placement cannot
    express: they become a :class:`~dist_train.checkpoint.rectangles.Rectangles` of their ``stride`` blocks
    (:func:`tp_local_blocks`), views DCP writes from and loads into — no gather.

    FSDP2 (``inner`` returns DTensors over the grad mesh: each a shard of the tp-local tensor): every tp-sharded
    entry becomes a :class:`~dist_train.checkpoint.rectangles.Rectangles` of its blocks of the tp=1 tensor
    (:func:`fsdp_rectangles`, strided and padded shards included), views of the FSDP2 shard that DCP writes from
    and loads into directly: no gather, no copy; ``set`` zeroes the shard's padding rows and hands the DTensors on.
    """

    def __init__(self, tp_mesh, shards: dict[str, TPShard], inner: Optional[StateAdapter] = None) -> None:
        self.mesh = tp_mesh
        self.tp = tp_mesh.size()
        self.rank = tp_mesh.get_local_rank()
        for name, s in shards.items():
            if s.stride > 1 and s.size != s.local * self.tp:
                raise ValueError(f"parameter '{name}': a strided shard (stride {s.stride}) of {s.local} rows along "
                                 f"dim {s.dim} must be exactly 1/{self.tp} of the {s.size} rows (no padding)")
            if s.local != -(-s.size // self.tp):
                raise ValueError(f"parameter '{name}': shard of {s.local} rows along dim {s.dim} for {s.size} "
                                 f"rows over tp = {self.tp}; expected ceil({s.size} / {self.tp}) = "
                                 f"{-(-s.size // self.tp)} (equal shards, padding at the end)")
        self.shards = dict(shards)
        self.inner = inner or TorchStateAdapter()

    @classmethod
    def for_module(cls, module: nn.Module, tp_mesh, inner: Optional[StateAdapter] = None) -> "TensorParallelAdapter":
        return cls(tp_mesh, tp_shards(module, tp_mesh.size()), inner)

    # -- keys -> shard spec ----------------------------------------------------------------------
    def _spec(self, section: str, key: str, value: Any) -> Optional[TPShard]:
        """The shard spec of a flat-dict entry: model ``<fqn>`` or optimizer ``state.<fqn>.<name>`` whose
        tensor has the parameter's local shape (scalars like Adam's ``step`` stay replicated)."""
        if not isinstance(value, torch.Tensor):
            return None
        fqn = self._fqn(section, key)
        if fqn is None:
            return None
        s = self.shards.get(fqn)
        if s is None or value.dim() <= s.dim or value.shape[s.dim] != s.local:
            return None
        return s

    def _fqn(self, section: str, key: str) -> Optional[str]:
        if section == "model":
            return key
        return key[len("state."):].rsplit(".", 1)[0] if key.startswith("state.") else None

    def _blocks(self, v: torch.Tensor, s: TPShard) -> tuple[list[Piece], list[torch.Tensor]]:
        """``v`` 's blocks of the tp=1 tensor and its padding views: an FSDP2 DTensor's local chunk
        (:func:`fsdp_rectangles`), or this rank's whole tp shard (a strided one)."""
        if isinstance(v, DTensor):
            return fsdp_rectangles(v, s, self.rank, self.tp)
        return tp_local_blocks(v.detach(), (0,) * v.dim(), s, self.rank, self.tp)

    def _real_rows(self, s: TPShard) -> int:
        return max(0, min(s.local, s.size - self.rank * s.local))

    def _to_global(self, section: str, sd: Optional[dict]) -> Optional[dict]:
        if sd is None:
            return None
        out = {}
        for key, v in sd.items():
            s = self._spec(section, key, v)
            if s is None:
                out[key] = v
                continue
            shape = list(v.shape)
            shape[s.dim] = s.size
            if isinstance(v, DTensor) or s.stride > 1:  # FSDP2's shard of the tp shard, a strided shard: its blocks
                pieces, _ = self._blocks(v, s)
                out[key] = Rectangles(torch.Size(shape), pieces, v.dtype, v.device, source=v)
                continue
            local = v.narrow(s.dim, 0, self._real_rows(s))  # a view: DCP loads straight into the shard
            out[key] = DTensor.from_local(local, self.mesh, [Shard(s.dim)], run_check=False,
                                          shape=torch.Size(shape), stride=_contiguous_stride(shape))
        return out

    def _to_local(self, section: str, sd: Optional[dict]) -> Optional[dict]:
        if sd is None:
            return None
        out = {}
        for key, v in sd.items():
            if isinstance(v, Rectangles):  # loaded in place (views of the shard); padding zero, as below
                _, padding = self._blocks(v.source, self.shards[self._fqn(section, key)])
                with torch.no_grad():
                    for pad in padding:
                        pad.zero_()
                out[key] = v.source
                continue
            if not isinstance(v, DTensor) or self._fqn(section, key) not in self.shards:  # replicated, FSDP2's norms
                out[key] = v
                continue
            s = self.shards[self._fqn(section, key)]
            real = v.to_local()
            shape = list(real.shape)
            shape[s.dim] = s.local
            if shape == list(real.shape):
                out[key] = real
            else:  # re-pad the vocab shard with zero rows
                padded = real.new_zeros(shape)
                padded.narrow(s.dim, 0, real.shape[s.dim]).copy_(real)
                out[key] = padded
        return out

    def get(self, model, optimizer):
        model_sd, optim_sd = self.inner.get(model, optimizer)
        # Megatron's parallel linears report an empty ``_extra_state`` (None) for TransformerEngine
        # compatibility, ignore it on load and re-create it there (a load pre-hook): not part of the layout
        model_sd = {k: v for k, v in model_sd.items() if not (k.endswith("._extra_state") and v is None)}
        return self._to_global("model", model_sd), self._to_global("optim", optim_sd)

    def set(self, model, optimizer, model_sd, optim_sd):
        self.inner.set(model, optimizer, self._to_local("model", model_sd), self._to_local("optim", optim_sd))


def tp_shards(module: nn.Module, tp: int) -> dict[str, TPShard]:
    """Shard specs of ``module`` 's tp-sharded parameters (Megatron's ``tensor_model_parallel`` /
    ``partition_dim`` attributes). The full size along the split dim is ``local * tp`` unless the module
    says otherwise through ``full_shape(name, param)`` (the GPT's padded vocabulary). ZeRO-3 parameters are
    empty placeholders: their local shape is ``ds_shape``."""
    out = {}
    for name, p in module.named_parameters():
        if not is_tp_sharded(p):
            continue
        dim = int(p.partition_dim)
        local_shape = tuple(getattr(p, "ds_shape", p.shape))
        size = local_shape[dim] * tp
        if hasattr(module, "full_shape"):
            # a stand-in with the local shape and the tp attributes (a ZeRO-3 parameter's own shape is [0])
            proxy = torch.empty(local_shape, device="meta")
            proxy.tensor_model_parallel, proxy.partition_dim = True, dim
            size = int(module.full_shape(name, proxy)[dim])
        out[name] = TPShard(dim=dim, local=local_shape[dim], size=size, stride=int(getattr(p, "partition_stride", 1)))
    return out


# ---------------------------------------------------------------------------------------------
# DeepSpeed (ZeRO 1-3, bf16 optimizer)
# ---------------------------------------------------------------------------------------------
@dataclass
class _FlatGroup:
    """One flat fp32 partition of a DeepSpeed optimizer: the model parameters it covers, this rank's flat
    tensor (the key of the inner torch optimizer's ``state``) and the inner ``param_groups`` index."""
    params: list
    flat: torch.Tensor
    group: int


def _flat_groups(opt) -> Optional[list[_FlatGroup]]:
    """The partitions of a DeepSpeed optimizer wrapper (DeepSpeed 0.19 attribute names), or None for a
    plain torch optimizer (ZeRO stage 0 in fp32 hands the client optimizer through unchanged)."""
    if hasattr(opt, "fp32_partitioned_groups_flat"):  # ZeRO-3: sub-groups of the param groups
        return [_FlatGroup(list(ps), opt.fp32_partitioned_groups_flat[s], int(opt.sub_group_to_group_id[s]))
                for s, ps in enumerate(opt.fp16_groups)]
    if hasattr(opt, "single_partition_of_fp32_groups"):  # ZeRO-1/2
        return [_FlatGroup(list(ps), opt.single_partition_of_fp32_groups[i], i) for i, ps in enumerate(opt.bit16_groups)]
    if hasattr(opt, "fp32_groups_flat_partition"):  # BF16_Optimizer (stage 0 with bf16)
        return [_FlatGroup(list(ps), opt.fp32_groups_flat_partition[i], i) for i, ps in enumerate(opt.bf16_groups)]
    return None


class DeepSpeedStateAdapter(StateAdapter):
    """Full fp32 weights and optimizer state of a DeepSpeed optimizer, in :class:`TorchStateAdapter` 's
    per-parameter-name form, so ZeRO 0-3 at any dp and the plain DDP / pipeline engines read each other's
    checkpoints.

    ``zero_optimizer``: the DeepSpeed engine's optimizer (a ZeRO / bf16 wrapper, or the plain torch
    optimizer for stage 0 in fp32, which is handed to :class:`TorchStateAdapter` unchanged).

    Gathering is collective and per parameter (``deepspeed.utils.safe_get_full_fp32_param`` /
    ``safe_get_full_optimizer_state``: an all-reduce or all-gather over the data-parallel group each), so
    every rank holds the full fp32 model and its optimizer state while a save is collected — fine up to a
    few billion parameters per tp shard; beyond that the state must be written partition by partition
    (DeepSpeed's universal checkpoint), which this adapter does not do. Loading writes each rank's
    partition with ``safe_set_full_*`` (no communication) and then refreshes the low-precision / ZeRO-3
    working copies from the fp32 masters, exactly as after an optimizer step.
    """

    def __init__(self, zero_optimizer) -> None:
        self.opt = zero_optimizer
        self.groups = _flat_groups(zero_optimizer)
        self._plain = TorchStateAdapter()

    # -- helpers ---------------------------------------------------------------------------------
    @property
    def _inner(self) -> torch.optim.Optimizer:
        return self.opt.optimizer

    def _ensure_state(self) -> None:
        """Create the inner optimizer's state where it does not exist yet (it is lazy: a fresh engine has
        none) by one step with zero gradients and lr 0 — torch DCP's own trick: AdamW then leaves weights
        and moments unchanged (exactly), and every state value is overwritten by the load. Then link the
        per-parameter fragments to it (ZeRO-1/2 and bf16 do that after their first step)."""
        inner = self._inner
        missing = [g for g in self.groups if not inner.state.get(g.flat)]
        if missing:
            saved = [(pg["params"], pg["lr"]) for pg in inner.param_groups]
            try:
                for pg in inner.param_groups:
                    pg["params"], pg["lr"] = [], 0.0
                for g in missing:
                    inner.param_groups[g.group]["params"].append(g.flat)
                    g.flat.grad = torch.zeros_like(g.flat)
                inner.step()
            finally:
                for pg, (params, lr) in zip(inner.param_groups, saved):
                    pg["params"], pg["lr"] = params, lr
                for g in missing:
                    g.flat.grad = None
        if not hasattr(self.opt, "fp32_partitioned_groups_flat"):
            # ZeRO-1/2 / bf16 link every group's fragments once, right after the FIRST group's first step —
            # when later groups have no state yet, so their fragments stay empty for good (DeepSpeed 0.19.8,
            # any optimizer with more than one param group, e.g. ours: decay / no decay). Re-link: idempotent.
            from deepspeed.utils import lazy_init_hp_params_optimizer_state

            for g in self.groups:
                lazy_init_hp_params_optimizer_state(g.params, g.flat, inner.state)

    def _refresh_working_copies(self) -> None:
        """fp32 masters -> the weights the forward uses (what the wrappers do after every step)."""
        if hasattr(self.opt, "fp32_partitioned_groups_flat"):  # ZeRO-3
            self.opt.checkpoint_event_prologue()  # partition everything, persistent parameters included
            for s in range(len(self.opt.fp16_groups)):
                self.opt._reassign_or_swap_out_partitioned_parameters(s)
            self.opt.checkpoint_event_epilogue()  # re-gather the persistent (small, never partitioned) ones
        else:
            self.opt.update_lp_params()

    @staticmethod
    def _buffers(model: nn.Module, params: dict) -> dict:
        """Persistent buffers (views of the module's own). Non-tensor entries (Megatron's empty
        ``_extra_state``) are not state: the layers ignore them on load."""
        return {k: v for k, v in model.state_dict().items() if k not in params and isinstance(v, torch.Tensor)}

    # -- StateAdapter ----------------------------------------------------------------------------
    def get(self, model, optimizer):
        if self.groups is None:
            return self._plain.get(model, optimizer)
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        params = dict(model.named_parameters())
        model_sd = {name: safe_get_full_fp32_param(p).detach() for name, p in params.items()}
        model_sd.update(self._buffers(model, params))
        if optimizer is None:
            return model_sd, None
        self._ensure_state()
        names = {id(p): n for n, p in params.items()}
        optim_sd: dict[str, Any] = {}
        for g in self.groups:
            state, hyper = self._inner.state[g.flat], self._inner.param_groups[g.group]
            for p in g.params:
                name = names[id(p)]
                for k, v in state.items():
                    if isinstance(v, torch.Tensor) and v.shape == g.flat.shape:  # per element: gather
                        optim_sd[f"state.{name}.{k}"] = safe_get_full_optimizer_state(p, k).detach()
                    else:  # per partition (Adam's step): the same for every parameter of the group
                        optim_sd[f"state.{name}.{k}"] = v.detach().clone() if isinstance(v, torch.Tensor) else v
                for k, v in hyper.items():
                    if k != "params":
                        optim_sd[f"param_groups.{name}.{k}"] = v
        return model_sd, optim_sd

    def set(self, model, optimizer, model_sd, optim_sd):
        if self.groups is None:
            self._plain.set(model, optimizer, model_sd, optim_sd)
            return
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        zero3 = hasattr(self.opt, "fp32_partitioned_groups_flat")
        set_param = (lambda p, v: _set_zero3_partition(self.opt, p, v)) if zero3 else safe_set_full_fp32_param
        set_state = (lambda p, v, k: _set_zero3_partition(self.opt, p, v, k)) if zero3 else \
            safe_set_full_optimizer_state
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, p in params.items():
                set_param(p, model_sd[name])
            for name, buf in self._buffers(model, params).items():
                buf.copy_(model_sd[name])
        if optimizer is not None and optim_sd is not None:
            self._ensure_state()
            names = {id(p): n for n, p in params.items()}
            for g in self.groups:
                state, hyper = self._inner.state[g.flat], self._inner.param_groups[g.group]
                for k, v in list(state.items()):
                    if isinstance(v, torch.Tensor) and v.shape == g.flat.shape:
                        for p in g.params:
                            set_state(p, optim_sd[f"state.{names[id(p)]}.{k}"], k)
                    elif g.params:
                        saved = optim_sd[f"state.{names[id(g.params[0])]}.{k}"]
                        state[k] = saved.detach().clone() if isinstance(saved, torch.Tensor) else saved
                if g.params:
                    first = names[id(g.params[0])]
                    for k in hyper:
                        if k != "params":
                            hyper[k] = optim_sd[f"param_groups.{first}.{k}"]
        self._refresh_working_copies()


def _set_zero3_partition(opt, param: nn.Parameter, value: torch.Tensor, key: Optional[str] = None) -> None:
    """Write this rank's ZeRO-3 partition of the full fp32 ``value`` [*param.ds_shape] into the master weights
    (``key`` None) or the optimizer state ``key`` — what ``safe_set_full_fp32_param`` /
    ``safe_set_full_optimizer_state`` do, for every size. DeepSpeed 0.19.8's ``set_full_hp_param`` copies
    ``value[r·c : (r+1)·c]`` with partition size c = ceil(n / dp), which runs past the end of the tensor on the last
    ranks whenever dp does not divide n (a norm of 4096 at dp 3): those ranks raise mid-resume while the others go
    on into the next all-gather and hang. Here the partition's real elements are copied and its padding (past n)
    zeroed, as a fresh ZeRO-3 partition has it."""
    if not param.requires_grad:
        return
    part, group = opt._get_fp32_opt_state_partition(param, release_swap_buffers=False, optim_state_key=key)
    flat = value.detach().reshape(-1)
    if flat.numel() != param.ds_numel:
        raise ValueError(f"a ZeRO-3 parameter of {param.ds_numel} elements cannot take a checkpoint tensor of "
                         f"{flat.numel()}")
    size = part.numel()
    start = size * opt._get_param_partition_rank(param)
    real = max(0, min(size, flat.numel() - start))
    part.data[:real].copy_(flat[start:start + real])
    part.data[real:].zero_()
    if opt._swappable_optimizer_subgroup(group):
        opt._optimizer_states_and_gradient_swap_out(group)


def engine_checkpoint_kwargs(module: nn.Module, mesh, inner: Optional[StateAdapter] = None) -> dict:
    """What an engine's ``checkpoint_kwargs()`` returns: ``{"adapter": …}`` — ``inner`` (the engine's own
    state, e.g. :class:`DeepSpeedStateAdapter`) wrapped in a :class:`TensorParallelAdapter` when tp > 1 —
    or ``{}`` when the default :class:`TorchStateAdapter` is right (tp = 1, plain optimizer)."""
    adapter = inner
    if mesh.size("tp") > 1:
        adapter = TensorParallelAdapter.for_module(module, mesh.device_mesh["tp"], inner)
    return {} if adapter is None else {"adapter": adapter}


# ---------------------------------------------------------------------------------------------
# FSDP2
# ---------------------------------------------------------------------------------------------
def fsdp_rectangles(v: DTensor, s: TPShard, tp_rank: int, tp: int) -> tuple[list[Piece], list[torch.Tensor]]:
    """This rank's FSDP2 shard ``v`` of its tp rank's shard, as blocks of the tp=1 tensor, and the views of it that
    are vocabulary padding (:func:`tp_local_blocks`). ``v``: a DTensor over the grad mesh whose global shape is the
    tp-local shape; its placements say where its local tensor lies in the tp-local tensor."""
    local = v.to_local().detach()
    shape, offset = compute_local_shape_and_global_offset(v.shape, v.device_mesh, v.placements)
    if tuple(local.shape) != tuple(shape):
        raise ValueError(f"a DTensor shard of shape {list(local.shape)} where its placements {v.placements} give "
                         f"{list(shape)}")
    return tp_local_blocks(local, tuple(offset), s, tp_rank, tp)


def tp_local_blocks(local: torch.Tensor, offset: tuple[int, ...], s: TPShard, tp_rank: int,
                    tp: int) -> tuple[list[Piece], list[torch.Tensor]]:
    """``local``: the block of tp rank ``tp_rank`` 's shard (``s.local`` rows along ``s.dim``) at ``offset`` in it —
    an FSDP2 chunk: rows ``[lo, hi)`` along ``s.dim`` when ``s.dim`` = 0, all of them when ``s.dim`` = 1 (the chunk
    is along the other dim, whose offset carries over unchanged). Returns its blocks of the tp=1 tensor
    ``[(global offset, view of local)]`` and its views that are vocabulary padding (in no block).

    Tp-local row ``i`` lies in strided part ``j = i // p`` (``p = s.local / s.stride``; ``shard_of``: the rank holds
    parts ``tp_rank, tp_rank + tp, …`` of the ``stride · tp`` equal parts of the tp=1 tensor) at global row
    ``(tp_rank + j·tp)·p + i - j·p``; rows at or past ``s.size`` are the padding of the last tp ranks (stride 1
    only). So a chunk is at most ``stride`` blocks, each a view of ``local`` (no copy); a chunk that is empty or
    all padding has none."""
    lo, hi = offset[s.dim], offset[s.dim] + local.shape[s.dim]
    part = s.local // s.stride
    pieces: list[Piece] = []
    padding: list[torch.Tensor] = []
    for j in range(s.stride):
        a, b = max(lo, j * part), min(hi, (j + 1) * part)
        if a >= b:
            continue
        row = (tp_rank + j * tp) * part + a - j * part
        real = max(0, min(b - a, s.size - row))
        view = local.narrow(s.dim, a - lo, b - a)
        if real:
            at = list(offset)
            at[s.dim] = row
            pieces.append((tuple(at), view.narrow(s.dim, 0, real)))
        if real < b - a:
            padding.append(view.narrow(s.dim, real, b - a - real))
    return pieces, padding


def fsdp_checkpoint_kwargs(module: nn.Module, mesh) -> dict:
    """``checkpoint_kwargs()`` of FSDP2-sharded engines: the default adapter (sharded DTensors, written
    without gathering) at tp = 1; under tp > 1 the tp adapter around it, which turns each FSDP2 shard of a tp
    shard into its blocks of the tp=1 tensor (:func:`fsdp_rectangles`): every rank writes and reads its own."""
    return engine_checkpoint_kwargs(module, mesh)

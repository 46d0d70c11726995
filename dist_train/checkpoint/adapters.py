"""Engine-specific :class:`StateAdapter` s: every engine writes the ONE checkpoint layout of a tp=1, pp=1,
plain-optimizer run (``model.<fqn>`` with the full tensor's shape, ``optim.state.<fqn>.exp_avg``, …).

Why these exist — the danger they remove. DCP treats same-named plain tensors as replicas and keeps one:
* tensor parallel (Megatron layers): each tp rank's parameter is a *local shard* under the SAME name as the
  full tp=1 parameter; saved as plain tensors, one rank's shard would silently stand for the whole matrix.
  :class:`TensorParallelAdapter` presents each sharded parameter (and every optimizer state of its shape)
  as a ``DTensor`` over the tp sub-mesh with the full tp=1 shape — or, where one placement cannot say which
  blocks a rank holds (a strided q|k|v shard, an FSDP2 chunk, a ZeRO partition's boxes), as a
  :class:`~dist_train.checkpoint.rectangles.Rectangles` of those blocks — so DCP writes each shard once and
  reshards on load to any tp.
* DeepSpeed ZeRO 1-3: the fp32 master weights and the optimizer state are flat partitions inside
  DeepSpeed. :class:`DeepSpeedStateAdapter` presents each parameter's part in this rank's partition (a flat
  range of the flattened parameter) as a :class:`~dist_train.checkpoint.rectangles.Rectangles` of boxes of
  the full tensor, views of the partition, under the TorchStateAdapter's keys: each rank writes and reads
  its own partition, nothing is gathered. ZeRO-0 in bf16 keeps a whole fp32 master copy of each parameter
  (DeepSpeed's FP16_UnfusedOptimizer): :class:`MasterCopyAdapter` (through :class:`DeepSpeedStateAdapter`) presents
  those and their optimizer state as plain tensors under the same keys.

    kwargs = engine_checkpoint_kwargs(module, mesh)                               # DDP / pipeline / FSDP2 engines
    kwargs = engine_checkpoint_kwargs(module, mesh, DeepSpeedStateAdapter(ds_opt)) # DeepSpeed engine
    CheckpointManager(..., **kwargs)

* FSDP2: parameters and optimizer state are already ``DTensor`` s sharded over the grad mesh, which DCP
  writes shard by shard and reshards on load — nothing to adapt at tp = 1. Under tp > 1 the FSDP2 tensor
  is a shard of a Megatron-local shard (same name, different content on each tp rank):
  :class:`TensorParallelAdapter` presents it as its blocks of the tp=1 tensor (:func:`fsdp_rectangles`, a
  :class:`~dist_train.checkpoint.rectangles.Rectangles` of views), so each rank writes and reads only its own
  shard's bytes — nothing is gathered (:func:`engine_checkpoint_kwargs`, as for DDP).

Pipeline stages need nothing: each stage holds disjoint names (``layers.<global i>``), DCP merges them by
union. See docs/checkpointing.md ("Engines: tensor parallel, pipeline, ZeRO").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from ..models.tensor_parallel import is_tp_sharded
from .rectangles import Piece, Rectangles, flat_range_pieces
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
    states are ``DTensor`` s with ``Shard(dim)`` over ``tp_mesh`` and the full tp=1 shape (plain tensors of a
    contiguous tp shard; the strided, FSDP2 and ZeRO cases below are ``Rectangles``).

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
    ZeRO (``inner`` a :class:`DeepSpeedStateAdapter`: Rectangles of boxes of the tp-local tensor, views of the
    rank's fp32 partition) the same way: each box becomes its blocks of the tp=1 tensor (:func:`tp_local_blocks`),
    and ``set`` hands the inner Rectangles back once their padding is zeroed.
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
        (:func:`fsdp_rectangles`), the inner adapter's blocks of the tp-local tensor (a ZeRO partition's boxes:
        each mapped by :func:`tp_local_blocks`), or this rank's whole tp shard (a strided one)."""
        if isinstance(v, DTensor):
            return fsdp_rectangles(v, s, self.rank, self.tp)
        if isinstance(v, Rectangles):
            pieces: list[Piece] = []
            padding: list[torch.Tensor] = []
            for offset, box in v.pieces:
                p, pad = tp_local_blocks(box, offset, s, self.rank, self.tp)
                pieces += p
                padding += pad
            return pieces, padding
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
            if isinstance(v, (DTensor, Rectangles)) or s.stride > 1:  # FSDP2's / ZeRO's part, a strided shard
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
            s = self.shards.get(self._fqn(section, key))
            if isinstance(v, Rectangles) and s is not None:
                # ours (the inner adapter's Rectangles of a replicated tensor pass through below): loaded in place
                # (views of the shard); padding zero, as below
                _, padding = self._blocks(v.source, s)
                with torch.no_grad():
                    for pad in padding:
                        pad.zero_()
                out[key] = v.source
                continue
            if not isinstance(v, DTensor) or s is None:  # replicated, FSDP2's norms
                out[key] = v
                continue
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


def zero3_split(part: torch.Tensor, rank: int, numel: int) -> tuple[int, torch.Tensor, torch.Tensor]:
    """A ZeRO-3 partition of one parameter of ``numel`` elements -> ``(start, real, padding)``. ``part`` [c] is rank
    ``rank`` 's (its rank in the parameter's partition group): c = ceil(numel / dp) elements, ``[rank·c, (rank+1)·c)``
    of the flattened parameter, those at or past ``numel`` padding (DeepSpeed's partition_parameters.py, stage3.py);
    ``real`` [n] and ``padding`` are views of it, ``start`` the flat index of ``real`` 's first element."""
    start = part.numel() * rank
    real = max(0, min(part.numel(), numel - start))
    return start, part.narrow(0, 0, real), part.narrow(0, real, part.numel() - real)


def module_buffers(model: nn.Module, params: dict) -> dict:
    """``model`` 's persistent buffers (views of its own; ``params``: its named parameters, left out). Non-tensor
    entries (Megatron's empty ``_extra_state``) are not state: the layers ignore them on load."""
    return {k: v for k, v in model.state_dict().items() if k not in params and isinstance(v, torch.Tensor)}


def _check_rectangles(entries: dict[str, Any]) -> None:
    """A ZeRO adapter's ``set`` reads the Rectangles its ``get`` made in place, and nothing else (``entries``:
    checkpoint key -> what ``set`` was given for it)."""
    for entry, value in entries.items():
        if not isinstance(value, Rectangles):
            raise TypeError(f"'{entry}': the DeepSpeed adapter loads only the Rectangles its get() made "
                            "(read in place)")


def _flat_groups(opt) -> Optional[list[_FlatGroup]]:
    """The partitions of a DeepSpeed optimizer wrapper that keeps its fp32 masters flat (DeepSpeed 0.19 attribute
    names), or None for one that does not: a plain torch optimizer (ZeRO stage 0 in fp32 hands the client optimizer
    through unchanged) or the stage-0 master-copy wrapper (:class:`MasterCopyAdapter`)."""
    if hasattr(opt, "fp32_partitioned_groups_flat"):  # ZeRO-3: sub-groups of the param groups
        return [_FlatGroup(list(ps), opt.fp32_partitioned_groups_flat[s], int(opt.sub_group_to_group_id[s]))
                for s, ps in enumerate(opt.fp16_groups)]
    if hasattr(opt, "single_partition_of_fp32_groups"):  # ZeRO-1/2
        return [_FlatGroup(list(ps), opt.single_partition_of_fp32_groups[i], i) for i, ps in enumerate(opt.bit16_groups)]
    if hasattr(opt, "fp32_groups_flat_partition"):
        # BF16_Optimizer: DeepSpeed 0.19.8 builds it for bf16 at ZeRO-1 with data_types.grad_accum_dtype = fp32 (and
        # under its own pipeline engine, which dist-train does not use); bf16 at stage 0 is FP16_UnfusedOptimizer
        return [_FlatGroup(list(ps), opt.fp32_groups_flat_partition[i], i) for i, ps in enumerate(opt.bf16_groups)]
    return None


def _whole_tensor_adapter(opt) -> StateAdapter:
    """The adapter of a DeepSpeed optimizer with no flat partitions (:func:`_flat_groups` None): the client torch
    optimizer itself (stage 0 in fp32) or DeepSpeed's stage-0 master-copy wrapper (bf16). Anything else is refused
    here, when the engine builds its checkpoint manager — before the first step, not at the first save."""
    if isinstance(opt, torch.optim.Optimizer):
        return TorchStateAdapter()
    if MasterCopyAdapter.wraps(opt):
        return MasterCopyAdapter(opt)
    raise TypeError(f"DeepSpeed built a {type(opt).__name__} optimizer, whose state the checkpoint adapter cannot "
                    "read (it knows ZeRO-1/2/3, BF16_Optimizer, FP16_UnfusedOptimizer and a plain torch optimizer): "
                    "such a run could not save a checkpoint; use another zero_stage or precision")


def _load_into(live: torch.Tensor, given: torch.Tensor) -> None:
    """``live`` <- ``given`` unless ``given`` already is ``live`` 's memory (what DCP loaded in place: the tensor
    ``get`` returned or a view of all of it, as the tensor-parallel adapter hands back)."""
    same = (given.data_ptr() == live.data_ptr() and given.shape == live.shape and given.stride() == live.stride()
            and given.dtype == live.dtype)
    if not same:
        live.copy_(given)


class MasterCopyAdapter(StateAdapter):
    """fp32 weights and optimizer state of DeepSpeed's stage-0 low-precision wrapper, in :class:`TorchStateAdapter` 's
    per-parameter-name form.

    DeepSpeed 0.19.8 at ZeRO stage 0 in bf16 wraps a torch optimizer (ours: AdamW) in ``FP16_UnfusedOptimizer``
    (engine.py: model and gradient-accumulation dtype both bf16 -> ``ddp_bf16`` -> ``_configure_fp16_optimizer``; the
    fused ``FP16_Optimizer`` only for DeepSpeed's FusedAdam). Per param group ``i`` it keeps ``fp16_groups[i]`` (the
    module's bf16 parameters, trainable ones) and ``fp32_groups[i]`` (an fp32 copy of each, full shape and the same on
    every dp rank: stage 0 partitions nothing), and the inner optimizer steps the fp32 copies — its state (AdamW's
    ``exp_avg``, ``exp_avg_sq`` [*shape], ``step``) is keyed by them — after which the wrapper copies each into its
    bf16 parameter. So the state to save is the fp32 copies, the inner optimizer's state and its hyper-parameters:
    ``model.<fqn>`` is the fp32 master (as every engine writes it), ``optim.state.<fqn>.<k>`` the inner state of that
    master, ``optim.param_groups.<fqn>.<k>`` its group's hyper-parameters — the TorchStateAdapter's exact keys, so
    checkpoints go between this and every other engine and dp (the copies are replicas: DCP writes one, and every
    rank loads the whole tensor at any dp). The tensors are the live ones: DCP writes from and loads into them, no
    copy. A load then refreshes the bf16 parameters from the masters, as the wrapper does after each step.

    The loss scaler has no state to keep in bf16: DeepSpeed scales only fp16 (``use_grad_scaling``), so the scale is
    a constant 1.0 and its iteration count feeds nothing but the dynamic scaler; a wrapper that scales (fp16, which
    dist-train refuses) is refused here rather than resumed with its scale reset."""

    def __init__(self, wrapper) -> None:
        if getattr(wrapper.loss_scale_config, "use_grad_scaling", True):
            raise ValueError(f"DeepSpeed's {type(wrapper).__name__} scales the loss (fp16): its loss-scaler state is "
                             "not checkpointed; train in bf16 or fp32")
        for i, (group, masters) in enumerate(zip(wrapper.optimizer.param_groups, wrapper.fp32_groups, strict=True)):
            if [id(t) for t in group["params"]] != [id(t) for t in masters]:
                raise RuntimeError(f"DeepSpeed's {type(wrapper).__name__}: param group {i} of its inner optimizer does "
                                   "not step its fp32 copies (a DeepSpeed version with another layout?)")
        self.opt = wrapper

    @staticmethod
    def wraps(opt) -> bool:
        """Whether ``opt`` is the stage-0 master-copy wrapper (by its attribute names, as :func:`_flat_groups`)."""
        return all(hasattr(opt, a) for a in ("fp16_groups", "fp32_groups", "loss_scale_config", "optimizer"))

    def _masters(self, model: nn.Module) -> dict[str, tuple[int, nn.Parameter, torch.Tensor]]:
        """Parameter name -> (its param group, the parameter, its fp32 master); a parameter in none (frozen) has no
        master to save."""
        by_id = {id(p): (i, master) for i, (ps, masters) in enumerate(zip(self.opt.fp16_groups, self.opt.fp32_groups))
                 for p, master in zip(ps, masters, strict=True)}
        out = {}
        for name, p in model.named_parameters():
            if id(p) not in by_id:
                raise ValueError(f"parameter '{name}' is in no DeepSpeed optimizer group (requires_grad = False?): it "
                                 "has no fp32 master copy, so it cannot be checkpointed")
            group, master = by_id[id(p)]
            out[name] = (group, p, master)
        return out

    def _state(self, name: str, master: torch.Tensor) -> dict:
        state = self.opt.optimizer.state.get(master)
        if not state:  # the wrapper's constructor steps once with zero gradients, creating it
            raise RuntimeError(f"parameter '{name}': DeepSpeed's {type(self.opt).__name__} holds no optimizer state "
                               "for its fp32 master (a DeepSpeed version that creates it lazily?)")
        return state

    def get(self, model, optimizer):
        masters = self._masters(model)
        model_sd: dict[str, Any] = {name: master for name, (_, _, master) in masters.items()}
        model_sd.update(module_buffers(model, dict(model.named_parameters())))
        if optimizer is None:
            return model_sd, None
        optim_sd: dict[str, Any] = {}
        for name, (group, _, master) in masters.items():
            for k, v in self._state(name, master).items():
                optim_sd[f"state.{name}.{k}"] = v
            for k, v in self.opt.optimizer.param_groups[group].items():
                if k != "params":
                    optim_sd[f"param_groups.{name}.{k}"] = v
        return model_sd, optim_sd

    def set(self, model, optimizer, model_sd, optim_sd):
        """``model_sd`` / ``optim_sd``: what :meth:`get` returned, loaded (DCP: in place)."""
        masters = self._masters(model)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, (_, _, master) in masters.items():
                _load_into(master, model_sd[name])
            for name, buf in module_buffers(model, params).items():
                _load_into(buf, model_sd[name])
            if optimizer is not None and optim_sd is not None:
                for name, (group, _, master) in masters.items():
                    state = self._state(name, master)
                    for k, live in list(state.items()):
                        saved = optim_sd[f"state.{name}.{k}"]
                        if isinstance(live, torch.Tensor):
                            _load_into(live, saved)
                        else:
                            state[k] = saved
                    hyper = self.opt.optimizer.param_groups[group]
                    for k in hyper:
                        if k != "params":
                            hyper[k] = optim_sd[f"param_groups.{name}.{k}"]
            for _, p, master in masters.values():  # the wrapper's after-step copy (round to nearest even in bf16)
                p.data.copy_(master)


class DeepSpeedStateAdapter(StateAdapter):
    """fp32 weights and optimizer state of a DeepSpeed optimizer, in :class:`TorchStateAdapter` 's
    per-parameter-name form, so ZeRO 0-3 at any dp and the plain DDP / pipeline / FSDP2 engines read each other's
    checkpoints — written and read by each rank from its own partition, nothing gathered.

    ``zero_optimizer``: the DeepSpeed engine's optimizer: a ZeRO / BF16_Optimizer wrapper (flat fp32 partitions, read
    here), the plain torch optimizer of stage 0 in fp32 (handed to :class:`TorchStateAdapter` unchanged) or stage 0's
    bf16 wrapper (whole fp32 master copies: :class:`MasterCopyAdapter`); any other is refused when the adapter is
    built, before the run's first step.

    Every parameter ``model.<fqn>`` [*shape] (and each per-element optimizer state ``optim.state.<fqn>.exp_avg``,
    …) is a :class:`~dist_train.checkpoint.rectangles.Rectangles` of the full shape whose pieces are views of this
    rank's fp32 partition (of the inner optimizer's state tensor of the partition's shape): the partition holds a
    flat range ``[start, start + n)`` of the flattened parameter (:meth:`_partition`), which is at most
    ``2·dim - 1`` boxes, each a view (:func:`~dist_train.checkpoint.rectangles.flat_range_pieces`). DCP writes
    them and checks that the dp ranks' boxes tile every tensor; a load reads straight into them. So a save or a
    load allocates nothing per parameter (a gather of every parameter's fp32 weight and AdamW moments — 12 B per
    tp-local parameter on every rank — is what this replaced). Under tp the
    :class:`TensorParallelAdapter` maps the boxes, which are in tp-local coordinates, to the tp=1 tensor.

    After a load the padding of ZeRO-3 partitions (elements past the parameter's end on the last ranks) is zeroed,
    the per-partition state (Adam's ``step``) and hyper-parameters are set, and the low-precision / ZeRO-3 working
    copies are refreshed from the fp32 masters, exactly as after an optimizer step.
    """

    def __init__(self, zero_optimizer) -> None:
        self.opt = zero_optimizer
        self.groups = _flat_groups(zero_optimizer)
        self.zero3 = hasattr(zero_optimizer, "fp32_partitioned_groups_flat")
        # no flat partitions: the whole tensors of a plain torch optimizer or of the stage-0 bf16 wrapper
        self._whole = None if self.groups is not None else _whole_tensor_adapter(zero_optimizer)

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
            # with offload_optimizer.device = cpu a partition's .grad is DeepSpeed's persistent host gradient
            # buffer, which its backward copies into: put that object back, not None
            grads = [g.flat.grad for g in missing]
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
                for g, grad in zip(missing, grads):
                    g.flat.grad = grad
        if not self.zero3:
            # ZeRO-1/2 / bf16 link every group's fragments once, right after the FIRST group's first step —
            # when later groups have no state yet, so their fragments stay empty for good (DeepSpeed 0.19.8,
            # any optimizer with more than one param group, e.g. ours: decay / no decay). Re-link: idempotent,
            # for DeepSpeed's own readers of the fragments (this adapter reads the state tensors directly).
            from deepspeed.utils import lazy_init_hp_params_optimizer_state  # deepspeed only where it runs

            for g in self.groups:
                lazy_init_hp_params_optimizer_state(g.params, g.flat, inner.state)

    def _refresh_working_copies(self) -> None:
        """fp32 masters -> the weights the forward uses (what the wrappers do after every step)."""
        if self.zero3:
            self.opt.checkpoint_event_prologue()  # partition everything, persistent parameters included
            for s in range(len(self.opt.fp16_groups)):
                self.opt._reassign_or_swap_out_partitioned_parameters(s)
            self.opt.checkpoint_event_epilogue()  # re-gather the persistent (small, never partitioned) ones
        else:
            self.opt.update_lp_params()

    def _group_of(self, params: dict) -> dict[str, _FlatGroup]:
        """Parameter name -> its flat group; a parameter in none (frozen) has no fp32 master to save."""
        by_id = {id(p): g for g in self.groups for p in g.params}
        missing = [n for n, p in params.items() if id(p) not in by_id]
        if missing:
            raise ValueError(f"parameter '{missing[0]}' is in no DeepSpeed optimizer group (requires_grad = False?): "
                             "its fp32 master weights are not in any ZeRO partition, so they cannot be checkpointed")
        return {n: by_id[id(p)] for n, p in params.items()}

    def _partition(self, g: _FlatGroup, p: nn.Parameter,
                   key: Optional[str]) -> tuple[int, torch.Tensor, Optional[torch.Tensor]]:
        """This rank's part of parameter ``p`` in the fp32 masters (``key`` None) or in the inner optimizer's state
        ``key`` (a tensor of the flat partition's shape): ``(start, real, padding)`` — ``real`` [n] is a view of
        elements ``[start, start + n)`` of the flattened parameter (n = 0: none here), ``padding`` a view of the
        ZeRO-3 partition's elements past the parameter's end (None at ZeRO-1/2, where the partition holds only
        fragments of parameters)."""
        if self.zero3:
            part, _ = self.opt._get_fp32_opt_state_partition(p, release_swap_buffers=False, optim_state_key=key)
            return zero3_split(part, self.opt._get_param_partition_rank(p), p.ds_numel)
        flat = g.flat if key is None else self._inner.state[g.flat][key]
        mapping = p._hp_mapping  # ZeRO-1/2, bf16: the fragment of p this rank's flat partition holds, if any
        if mapping is None:
            return 0, flat.narrow(0, 0, 0), None
        hp, lp = mapping.hp_fragment_address, mapping.lp_fragment_address
        if key is None and mapping.hp_fragment.data_ptr() != flat.data_ptr() + hp.start * flat.element_size():
            raise RuntimeError(f"DeepSpeed's fp32 fragment of a parameter of shape {list(p.shape)} is not a view of "
                               "the flat partition the adapter reads (a DeepSpeed version with another layout?)")
        return lp.start, flat.narrow(0, hp.start, hp.numel), None

    def _per_element(self, g: _FlatGroup) -> list[str]:
        """The inner optimizer's state keys of ``g`` held per element (a tensor of the flat partition's shape: AdamW's
        moments), which get() saves as each parameter's boxes and set() reads in place; the others (Adam's ``step``)
        are per partition."""
        return [k for k, v in self._inner.state[g.flat].items()
                if isinstance(v, torch.Tensor) and v.shape == g.flat.shape]

    def _rectangles(self, g: _FlatGroup, p: nn.Parameter, key: Optional[str]) -> Rectangles:
        """Parameter ``p`` (full shape: ZeRO-3's ``ds_shape``) as the boxes of this rank's part of it."""
        start, real, _ = self._partition(g, p, key)
        shape = torch.Size(p.ds_shape if self.zero3 else p.shape)
        return Rectangles(shape, flat_range_pieces(real, shape, start), real.dtype, real.device)

    def _refuse_swapping(self) -> None:
        if getattr(self.opt, "swap_optimizer", False):
            raise ValueError("checkpoints of a ZeRO-3 run with offload_optimizer.device = nvme are not supported: "
                             "its optimizer state is swapped out to NVMe, where the checkpoint cannot read it in "
                             "place; offload to cpu or none")

    # -- StateAdapter ----------------------------------------------------------------------------
    def get(self, model, optimizer):
        if self.groups is None:
            return self._whole.get(model, optimizer)
        self._refuse_swapping()
        params = dict(model.named_parameters())
        group = self._group_of(params)
        model_sd: dict[str, Any] = {name: self._rectangles(group[name], p, None) for name, p in params.items()}
        model_sd.update(module_buffers(model, params))
        if optimizer is None:
            return model_sd, None
        self._ensure_state()
        optim_sd: dict[str, Any] = {}
        for name, p in params.items():
            g = group[name]
            state, hyper = self._inner.state[g.flat], self._inner.param_groups[g.group]
            per_element = self._per_element(g)
            for k, v in state.items():
                if k in per_element:  # this rank's boxes
                    optim_sd[f"state.{name}.{k}"] = self._rectangles(g, p, k)
                else:  # per partition (Adam's step): the same for every parameter of the group
                    optim_sd[f"state.{name}.{k}"] = v.detach().clone() if isinstance(v, torch.Tensor) else v
            for k, v in hyper.items():
                if k != "params":
                    optim_sd[f"param_groups.{name}.{k}"] = v
        return model_sd, optim_sd

    def set(self, model, optimizer, model_sd, optim_sd):
        """``model_sd`` / ``optim_sd``: what :meth:`get` returned, its Rectangles loaded in place (DCP)."""
        if self.groups is None:
            self._whole.set(model, optimizer, model_sd, optim_sd)
            return
        params = dict(model.named_parameters())
        group = self._group_of(params)
        with_optim = optimizer is not None and optim_sd is not None
        per_element = {name: self._per_element(group[name]) if with_optim else [] for name in params}
        _check_rectangles({**{f"model.{name}": model_sd[name] for name in params},
                           **{f"optim.state.{name}.{k}": optim_sd[f"state.{name}.{k}"]
                              for name in params for k in per_element[name]}})
        with torch.no_grad():
            if self.zero3:  # a fresh partition's padding is zero; the checkpoint has none to give
                for name, p in params.items():
                    for key in [None] + per_element[name]:
                        self._partition(group[name], p, key)[2].zero_()
            for name, buf in module_buffers(model, params).items():
                buf.copy_(model_sd[name])
        if with_optim:
            for g in self.groups:
                if not g.params:
                    continue
                first = next(n for n, p in params.items() if p is g.params[0])
                state, hyper = self._inner.state[g.flat], self._inner.param_groups[g.group]
                for k in list(state):
                    if k not in per_element[first]:
                        saved = optim_sd[f"state.{first}.{k}"]
                        state[k] = saved.detach().clone() if isinstance(saved, torch.Tensor) else saved
                for k in hyper:
                    if k != "params":
                        hyper[k] = optim_sd[f"param_groups.{first}.{k}"]
        self._refresh_working_copies()


class ZeRO3WeightsAdapter(StateAdapter):
    """The weights of a forward-only ZeRO-3 engine, for ``dist-train eval``: DeepSpeed's engine built without an
    optimizer (``engines.deepspeed.DeepSpeedForwardEngine``), whose ``DeepSpeedZeRoOffload`` partitions the parameters
    over the data-parallel group and gathers them around each module's forward, with no fp32 master copy, gradient
    partition or bucket. Each parameter ``model.<fqn>`` [*ds_shape] is the :class:`Rectangles` of this rank's
    partition of its working copy (``p.ds_tensor`` [c], in the engine's dtype: :func:`zero3_split`), under
    :class:`DeepSpeedStateAdapter` 's keys, so a ZeRO-3 checkpoint (and any other engine's: one layout) loads straight
    into the partitions at any dp. Its fp32 weights become the working copy as a training engine's step and load
    make it (``copy_`` from the fp32 master, round to nearest even in bf16): the forward is the trained engine's, bit
    for bit. Weights only: an optimizer is refused.

    ``zero_offload``: the engine's ``DeepSpeedZeRoOffload`` (``engine.optimizer`` when built without one)."""

    def __init__(self, zero_offload) -> None:
        self.offload = zero_offload

    @staticmethod
    def _parts(params: dict[str, nn.Parameter]) -> dict[str, tuple[int, torch.Tensor, torch.Tensor]]:
        """Parameter name -> :func:`zero3_split` of this rank's partition of it."""
        out = {}
        for name, p in params.items():
            if getattr(p.ds_tensor, "final_location", None) == "nvme":
                raise ValueError(f"parameter '{name}' is swapped out to NVMe (zero_optimization.offload_param.device "
                                 "= nvme): a checkpoint cannot be read into it in place; offload to cpu or none")
            out[name] = zero3_split(p.ds_tensor, dist.get_rank(p.ds_process_group), p.ds_numel)
        return out

    def get(self, model, optimizer):
        if optimizer is not None:
            raise TypeError("ZeRO3WeightsAdapter holds a forward-only engine's weights: it has no optimizer state")
        params = dict(model.named_parameters())
        model_sd: dict[str, Any] = {}
        for name, (start, real, _) in self._parts(params).items():
            shape = torch.Size(params[name].ds_shape)
            model_sd[name] = Rectangles(shape, flat_range_pieces(real, shape, start), real.dtype, real.device)
        model_sd.update(module_buffers(model, params))
        return model_sd, None

    def set(self, model, optimizer, model_sd, optim_sd):
        """``model_sd``: what :meth:`get` returned, its Rectangles loaded in place (DCP). Then every gathered copy is
        released (``partition_all_parameters``: the persistent parameters stay gathered from their first forward on),
        so the next forward gathers the loaded partitions."""
        params = dict(model.named_parameters())
        _check_rectangles({f"model.{name}": model_sd[name] for name in params})
        with torch.no_grad():
            for _, _, padding in self._parts(params).values():  # the checkpoint has no padding to give
                padding.zero_()
            for name, buf in module_buffers(model, params).items():
                buf.copy_(model_sd[name])
        self.offload.partition_all_parameters()


def engine_checkpoint_kwargs(module: nn.Module, mesh, inner: Optional[StateAdapter] = None) -> dict:
    """What an engine's ``checkpoint_kwargs()`` returns: ``{"adapter": …}`` — ``inner`` (the engine's own
    state, e.g. :class:`DeepSpeedStateAdapter`) wrapped in a :class:`TensorParallelAdapter` when tp > 1 —
    or ``{}`` when the default :class:`TorchStateAdapter` is right (tp = 1, plain optimizer; FSDP2's DTensors). FSDP2
    under tp needs nothing more: the tp adapter turns its DTensors into their blocks (:func:`fsdp_rectangles`)."""
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
    shape, offset = _chunk_placement(tuple(v.shape), v.device_mesh, tuple(v.placements))
    if tuple(local.shape) != tuple(shape):
        raise ValueError(f"a DTensor shard of shape {list(local.shape)} where its placements {v.placements} give "
                         f"{list(shape)}")
    return tp_local_blocks(local, tuple(offset), s, tp_rank, tp)


#: :func:`_chunk_placement`'s results by (global shape, mesh shape, this rank's mesh coordinate, placements): what
#: torch's ``compute_local_shape_and_global_offset`` depends on, and no mesh: a cache keyed on the DeviceMesh kept
#: every mesh of a process (and its process groups) alive after its job ended. Cleared when full (a run's few
#: placements fit many times over).
_PLACEMENTS: dict[tuple, tuple[tuple[int, ...], tuple[int, ...]]] = {}
_PLACEMENTS_MAX = 4096


def _chunk_placement(shape: tuple[int, ...], mesh, placements: tuple) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(local shape, offset) of this process's chunk of a DTensor of global ``shape`` on ``mesh`` under
    ``placements``. Cached: torch's ``compute_local_shape_and_global_offset`` (mesh coordinate lookups, per call)
    was 13-21 ms of a bench save and 18-24 ms of a load (90 / 180 calls on the same few placements; see
    docs/benchmarks/ckpt_engines.md). The key is all the result depends on: the mesh's shape and this process's
    coordinate in it (None: not in the mesh), besides ``shape`` and ``placements`` (:data:`_PLACEMENTS`)."""
    coordinate = mesh.get_coordinate()
    key = (shape, tuple(mesh.shape), None if coordinate is None else tuple(coordinate), placements)
    hit = _PLACEMENTS.get(key)
    if hit is None:
        local_shape, offset = compute_local_shape_and_global_offset(torch.Size(shape), mesh, list(placements))
        if len(_PLACEMENTS) >= _PLACEMENTS_MAX:
            _PLACEMENTS.clear()
        hit = _PLACEMENTS[key] = (tuple(local_shape), tuple(offset))
    return hit


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

"""What goes into a checkpoint, as flat ``{key: tensor}`` (for DCP) + ``{key: JSON value}`` (for us).

    adapter = TorchStateAdapter()
    model_sd, optim_sd = adapter.get(model, optimizer)     # flat dicts: fqn -> Tensor/DTensor, key -> tensor|scalar
    tensors, values = split_state({"model": model_sd, "optim": optim_sd})
    # tensors: {"model.layers.0.attention.wq.weight": Tensor[out, in], "optim.state.<fqn>.exp_avg": ...}
    # values:  {"optim.param_groups.<fqn>.lr": 0.003, "optim.param_groups.<fqn>.betas": (0.9, 0.95), ...}

Why flat: every key is independent, so per-rank dicts (pipeline stages, tensor-parallel shards) merge by
union and DCP reshards tensor keys at load — a tensor-parallel weight is simply a ``DTensor`` with
``Shard(dim)`` placements under the same key. ``StateAdapter`` is the one seam an engine (DeepSpeed) replaces.
RNG states are per rank and go to JSON (torch states as base64 of their byte tensors): no pickle anywhere.
"""
from __future__ import annotations

import abc
import base64
import os
import random
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from .rectangles import Rectangles


class StateAdapter(abc.ABC):
    """Turns (model, optimizer) into flat state dicts and back. Engines implement both methods.

    ``get`` returns ``(model_sd, optim_sd)``: flat ``{key: Tensor | DTensor | int | float | bool | str | None |
    tuple}`` dicts (a tensor may be a :class:`Rectangles` of views of the live state); ``optim_sd`` is None without an
    optimizer. ``set`` loads such dicts back (in place): the ones ``get`` returned, once DCP has read the checkpoint
    into them (``CheckpointManager.load``) — an adapter whose tensors are views of the state (the DeepSpeed adapter)
    takes nothing else."""

    @abc.abstractmethod
    def get(self, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> tuple[dict, Optional[dict]]:
        """-> (model_sd, optim_sd)."""

    @abc.abstractmethod
    def set(self, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer], model_sd: dict,
            optim_sd: Optional[dict]) -> None:
        """Load ``model_sd`` / ``optim_sd`` into ``model`` / ``optimizer`` in place."""


class TorchStateAdapter(StateAdapter):
    """Plain / DDP-unwrapped / FSDP / DTensor modules via ``torch.distributed.checkpoint.state_dict``.

    The optimizer dict is DCP's *flattened* form (``state.<fqn>.exp_avg``, ``param_groups.<fqn>.lr``) so
    that it is keyed by parameter name and mergeable across ranks that hold different parameters."""

    options = StateDictOptions(flatten_optimizer_state_dict=True)

    def get(self, model, optimizer):
        if optimizer is None:
            return get_state_dict(model, [], options=self.options)[0], None
        model_sd, optim_sd = get_state_dict(model, optimizer, options=self.options)
        return model_sd, optim_sd

    def set(self, model, optimizer, model_sd, optim_sd):
        if optimizer is None or optim_sd is None:
            set_state_dict(model, [], model_state_dict=model_sd, optim_state_dict={}, options=self.options)
        else:
            set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                           options=self.options)


def split_state(sections: dict[str, Optional[dict]]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``{"model": flat_sd, "optim": flat_sd}`` -> (tensors, json-able values), keys ``section.key``."""
    tensors: dict[str, torch.Tensor] = {}
    values: dict[str, Any] = {}
    for section, sd in sections.items():
        for key, v in (sd or {}).items():
            full = f"{section}.{key}"
            if isinstance(v, torch.Tensor):
                tensors[full] = v
            else:
                values[full] = to_json(v, full)
    return tensors, values


def join_state(section: str, target: dict, tensors: dict[str, torch.Tensor], values: dict[str, Any],
               where: str) -> dict:
    """Rebuild one section's flat dict in the layout of ``target`` (this rank's keys): tensors are the
    (already loaded) ``tensors`` entries, other values come from the checkpoint's JSON ``values``."""
    out = {}
    for key, cur in target.items():
        full = f"{section}.{key}"
        if isinstance(cur, torch.Tensor):
            out[key] = tensors[full]
        elif full in values:
            out[key] = from_json(values[full])
        else:
            raise KeyError(f"{where}: checkpoint has no value for '{full}'")
    return out


# ---------------------------------------------------------------------------------------------
# JSON encoding of the non-tensor values (tuples, non-finite floats and bytes survive the round trip)
# ---------------------------------------------------------------------------------------------
def to_json(v: Any, where: str = "value") -> Any:
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if np.isfinite(v) else {"__float__": repr(v)}
    if isinstance(v, tuple):
        return {"__tuple__": [to_json(x, where) for x in v]}
    if isinstance(v, list):
        return [to_json(x, where) for x in v]
    if isinstance(v, dict):
        if not all(isinstance(k, str) for k in v):
            return {"__intkeys__": [[to_json(k, where), to_json(x, where)] for k, x in v.items()]}
        return {k: to_json(x, where) for k, x in v.items()}
    if isinstance(v, (bytes, bytearray)):
        return {"__bytes__": base64.b64encode(bytes(v)).decode()}
    if isinstance(v, torch.Tensor) and v.numel() <= 1 << 16 and v.device.type == "cpu":
        return {"__tensor__": base64.b64encode(v.contiguous().view(torch.uint8).numpy().tobytes()).decode(),
                "dtype": str(v.dtype).replace("torch.", ""), "shape": list(v.shape)}
    if isinstance(v, np.ndarray):
        return {"__ndarray__": base64.b64encode(v.tobytes()).decode(), "dtype": str(v.dtype), "shape": list(v.shape)}
    if isinstance(v, np.generic):
        return to_json(v.item(), where)
    raise TypeError(f"{where}: value of type {type(v).__name__} cannot be stored as JSON")


def from_json(v: Any) -> Any:
    if isinstance(v, list):
        return [from_json(x) for x in v]
    if not isinstance(v, dict):
        return v
    if "__tuple__" in v:
        return tuple(from_json(x) for x in v["__tuple__"])
    if "__float__" in v:
        return float(v["__float__"])
    if "__intkeys__" in v:
        return {from_json(k): from_json(x) for k, x in v["__intkeys__"]}
    if "__bytes__" in v:
        return base64.b64decode(v["__bytes__"])
    if "__tensor__" in v:
        raw = bytearray(base64.b64decode(v["__tensor__"]))
        dtype = getattr(torch, v["dtype"])
        return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(v["shape"]).clone() if raw else \
            torch.empty(v["shape"], dtype=dtype)
    if "__ndarray__" in v:
        return np.frombuffer(base64.b64decode(v["__ndarray__"]), dtype=v["dtype"]).reshape(v["shape"]).copy()
    return {k: from_json(x) for k, x in v.items()}


# ---------------------------------------------------------------------------------------------
# RNG (per rank)
# ---------------------------------------------------------------------------------------------
def capture_rng() -> dict:
    """This rank's RNG states as JSON: python ``random``, numpy global, torch CPU and (if present) CUDA."""
    state = {"python": to_json(random.getstate()), "numpy": to_json(np.random.get_state()),
             "torch_cpu": to_json(torch.get_rng_state())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = [to_json(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict) -> None:
    random.setstate(from_json(state["python"]))
    np.random.set_state(from_json(state["numpy"]))
    torch.set_rng_state(from_json(state["torch_cpu"]))
    if "torch_cuda" in state and torch.cuda.is_available():
        cuda = [from_json(s) for s in state["torch_cuda"]]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


# ---------------------------------------------------------------------------------------------
# Staging for async saves
# ---------------------------------------------------------------------------------------------
_COPY_PIECE = 64 << 20  # bytes: large tensors are copied in pieces so every core gets work


def _parallel_copy(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """dst.copy_(src) for every (dst, src) pair, spread over all cores. Training is blocked while an
    async save stages, so the copy may use every core; ``copy_`` releases the GIL."""
    pieces: list[tuple[torch.Tensor, torch.Tensor]] = []
    for dst, src in pairs:
        if not (dst.is_contiguous() and src.is_contiguous()) or dst.numel() * dst.element_size() <= _COPY_PIECE:
            pieces.append((dst, src))
            continue
        step = max(1, _COPY_PIECE // dst.element_size())
        d, s = dst.view(-1), src.reshape(-1)
        pieces += [(d[i:i + step], s[i:i + step]) for i in range(0, d.numel(), step)]
    workers = min(len(pieces), os.cpu_count() or 1)
    if workers <= 1:
        for dst, src in pieces:
            dst.copy_(src)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ckpt-stage") as pool:
        for f in [pool.submit(dst.copy_, src) for dst, src in pieces]:
            f.result()


def host_dtensor(local: torch.Tensor, like: DTensor) -> DTensor:
    """A DTensor of ``like``'s global layout (mesh, placements, shape, stride) whose local shard is ``local`` itself,
    a host buffer of ``like``'s local shape and dtype. Not ``DTensor.from_local``: that moves its tensor to the mesh's
    device type, so on a CUDA mesh (FSDP2 on GPUs) each staged shard went straight back to the GPU — a second copy of
    the sharded state in device memory for every async save, and the pinned staging undone. DCP reads the shard
    through ``to_local()`` and the layout from the spec, never from the shard's device."""
    return DTensor(local, like._spec, requires_grad=False)


class HostStager:
    """Copies tensors into host buffers that are reused from one save to the next.

    Reuse matters: a fresh allocation pays a page fault per 4 KiB on first touch, which makes the
    copy (the only training stall of an async save) several times slower. CUDA tensors go to pinned
    memory with non-blocking copies and one synchronize. DTensors are staged through their local shard
    and re-wrapped with the same mesh/placements, :class:`Rectangles` piece by piece (same offsets), so DCP
    still sees the global layout."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def _buffer(self, key: str, t: torch.Tensor) -> torch.Tensor:
        buf = self._buffers.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            pin = t.device.type == "cuda"
            buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)
            self._buffers[key] = buf
        return buf

    def stage(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        host_copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        any_cuda = False

        def staged(key: str, local: torch.Tensor) -> torch.Tensor:
            nonlocal any_cuda
            buf = self._buffer(key, local)
            if local.device.type == "cuda":
                buf.copy_(local, non_blocking=True)
                any_cuda = True
            else:
                host_copies.append((buf, local))
            return buf

        with torch.no_grad():
            for key, t in tensors.items():
                if isinstance(t, Rectangles):
                    pieces = [(at, staged(f"{key}@{list(at)}", p.detach())) for at, p in t.pieces]
                    out[key] = Rectangles(t.shape, pieces, t.dtype, torch.device("cpu"))
                elif isinstance(t, DTensor):
                    out[key] = host_dtensor(staged(key, t.to_local()), t)
                else:
                    out[key] = staged(key, t.detach())
            _parallel_copy(host_copies)
        if any_cuda:
            torch.cuda.synchronize()
        return out

    def release(self) -> None:
        self._buffers.clear()

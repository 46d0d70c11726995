"""Bridges between dist-train checkpoints and stock torch formats (``dist-train ckpt convert --to dcp|torch``,
``--from dcp``).

    to_dcp("runs/x/checkpoints/step_100", "out_dcp")     # a stock DCP directory: dcp.load(FileSystemReader) reads it
    to_torch("runs/x/checkpoints/step_100", "model.pt")  # one torch.save file: the full model state dict
    from_dcp("stock_dcp", "runs/init", config)           # runs/init/step_0: a dist-train checkpoint to resume from

Our shards are raw bytes tagged ``dist-train-raw/1`` (``storage.py``), which stock ``dcp.load`` and
``format_utils.dcp_to_torch_save`` refuse; ``to_dcp`` rewrites the model tensors with DCP's own
``FileSystemWriter``. Both exports hold the model's full (unsharded, tp=1) state dict under its parameter
names (``layers.0.attention.wq.weight``, …), so ``dcp.load(model.state_dict(), checkpoint_id=OUT)`` and
``model.load_state_dict(torch.load(OUT))`` work on a single-process model; optimizer state and RNG are not
exported. Works for any ``model.kind`` (gpt, swin).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Union

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter

from dist_train.atomic_write import atomic_path
from dist_train.checkpoint import manifest as mf
from dist_train.checkpoint.hf import (check_tensor_shapes, expected_shapes, fresh_output, load_model_tensors,
                                      write_step0)
from dist_train.checkpoint.manager import quiet_single_process
from dist_train.checkpoint.storage import SafeReader, load_dcp_metadata
from dist_train.config import Config
from dist_train.models.swin import build_swin

PathLike = Union[str, Path]


def to_dcp(ckpt: PathLike, out: PathLike) -> Path:
    """Write the model state dict of ``ckpt`` as a stock DCP checkpoint directory ``out``."""
    out = Path(out)
    fresh_output(out)
    tensors, _ = load_model_tensors(ckpt)
    out.mkdir(parents=True, exist_ok=True)
    with quiet_single_process():
        dcp.save(tensors, storage_writer=FileSystemWriter(str(out)), no_dist=True)
    return out


def to_torch(ckpt: PathLike, out: PathLike) -> Path:
    """Write the model state dict of ``ckpt`` as one ``torch.save`` file ``out``."""
    out = Path(out)
    if out.exists():
        raise ValueError(f"{out}: already exists; choose a new output file")
    tensors, _ = load_model_tensors(ckpt)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        torch.save(tensors, tmp)
    return out


def read_stock_dcp(src: PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a stock DCP directory ``src`` (non-tensor entries are refused: they would be
    unpickled). A state dict saved nested under ``"model"`` loses that prefix."""
    src = Path(src)
    if (src / mf.MANIFEST).exists():
        raise ValueError(f"{src}: is already a dist-train checkpoint; resume from it directly")
    if not (src / mf.DCP_METADATA).is_file():
        raise ValueError(f"{src}: no {mf.DCP_METADATA} file; expected a directory written by "
                         "torch.distributed.checkpoint.save")
    md = load_dcp_metadata(src / mf.DCP_METADATA)
    state = {fqn: torch.empty(tuple(m.size), dtype=m.properties.dtype) for fqn, m in md.state_dict_metadata.items()}
    if not state:
        raise ValueError(f"{src}: the DCP checkpoint holds no tensors")
    with quiet_single_process():
        dcp.load(state, storage_reader=SafeReader(src), no_dist=True)
    if all(k.startswith("model.") for k in state):
        state = {k[len("model."):]: v for k, v in state.items()}
    return state


def model_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """{name: shape} of the single-process model ``cfg`` builds (tp=1, one window tile)."""
    if cfg.model.kind == "gpt":
        return expected_shapes(cfg.model)
    with torch.device("meta"):
        model = build_swin(cfg.model, wp_group=None, grid=(1, 1))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_against(tensors: dict[str, torch.Tensor], cfg: Config, what: str) -> None:
    """ValueError (one line) unless ``tensors`` are exactly the model of ``cfg``, names and shapes."""
    check_tensor_shapes(tensors, model_shapes(cfg), what, f"the {cfg.model.kind} of the config")


def from_dcp(src: PathLike, out: PathLike, cfg: Optional[Config] = None) -> Path:
    """A dist-train checkpoint ``out/step_0`` (weights only) from a stock DCP model state dict ``src``.
    cfg: the run's config; when given the tensors must be exactly its model and the config is recorded."""
    tensors = read_stock_dcp(src)
    if cfg is not None:
        check_against(tensors, cfg, str(src))
    fresh_output(Path(out))
    config = {"source": str(src)}
    if cfg is not None:
        config.update(model=dataclasses.asdict(cfg.model), data={"seq_len": cfg.data.seq_len})
    return write_step0(out, tensors, config)

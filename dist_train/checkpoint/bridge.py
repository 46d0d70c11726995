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
exported. Works for any ``model.kind`` (gpt, swin). A Swin's input normalisation, which no state dict holds, goes
into a sidecar (``input_normalisation.py``: ``OUT/input_normalisation.json``, ``OUT.input_normalisation.json``),
and ``from_dcp`` records it again: a Swin import without one is refused unless told to take the statistics of the
data it will be trained on.
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
from dist_train.checkpoint.input_normalisation import SIDECAR_NAME, read_sidecar, sidecar_path, write_sidecar
from dist_train.checkpoint.manager import checkpoint_extra, quiet_single_process
from dist_train.checkpoint.storage import SafeReader, load_dcp_metadata
from dist_train.config import Config
from dist_train.data.image_batches import NORMALISATION_KEY
from dist_train.models.swin import build_swin

PathLike = Union[str, Path]


def _normalisation(ckpt: PathLike) -> Optional[dict]:
    """The input normalisation ``ckpt`` records (a Swin's), None when it records none (a GPT)."""
    return checkpoint_extra(Path(ckpt)).get(NORMALISATION_KEY) or None


def _write_normalisation(ckpt: PathLike, out: Path) -> None:
    """The sidecar of the export ``out`` when ``ckpt`` records an input normalisation (a Swin's)."""
    norm = _normalisation(ckpt)
    if norm:
        write_sidecar(out, norm)


def to_dcp(ckpt: PathLike, out: PathLike) -> Path:
    """Write the model state dict of ``ckpt`` as a stock DCP checkpoint directory ``out`` (and a Swin's input
    normalisation as ``out/input_normalisation.json``)."""
    out = Path(out)
    fresh_output(out)
    tensors, _ = load_model_tensors(ckpt)
    out.mkdir(parents=True, exist_ok=True)
    with quiet_single_process():
        dcp.save(tensors, storage_writer=FileSystemWriter(str(out)), no_dist=True)
    _write_normalisation(ckpt, out)
    return out


def to_torch(ckpt: PathLike, out: PathLike) -> Path:
    """Write the model state dict of ``ckpt`` as one ``torch.save`` file ``out`` (and a Swin's input normalisation
    as ``out.input_normalisation.json`` beside it)."""
    out = Path(out)
    norm = _normalisation(ckpt)
    # the sidecar only when one is written: a GPT's export beside someone's stale file is no conflict
    for path in (out, *([sidecar_path(out)] if norm else [])):
        if path.exists():
            raise ValueError(f"{path}: already exists; choose a new output file")
    tensors, _ = load_model_tensors(ckpt)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        torch.save(tensors, tmp)
    if norm:
        write_sidecar(out, norm)
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


#: tensors only a Swin state dict has (a GPT's are ``tok_embeddings``, ``layers.i.…``, ``output``): what says an
#: import without --config is a Swin
SWIN_TENSORS = ("embed.weight", "head.weight")


def import_normalisation(src: Path, tensors: dict[str, torch.Tensor], cfg: Optional[Config],
                         from_data: bool) -> Optional[dict[str, list[float]]]:
    """The input normalisation a Swin import records: its export's sidecar. None for a GPT, and for a Swin whose
    run is to take the statistics of its own data (``from_data``: --input-normalisation-from-data, then said in one
    line by the run). ValueError (one line) for a Swin with neither, and for ``from_data`` where it means nothing."""
    swin = cfg.model.kind == "swin" if cfg is not None else all(k in tensors for k in SWIN_TENSORS)
    flag = "--input-normalisation-from-data"
    if not swin:
        if from_data:
            raise ValueError(f"{flag}: {src} is not a Swin state dict (a Swin's inputs are normalised, a GPT's are "
                             "token ids); remove the flag")
        return None
    norm = read_sidecar(src, cfg.model.in_channels if cfg is not None else None)
    if norm is not None and from_data:
        raise ValueError(f"{flag}: {sidecar_path(src)} records the statistics the model was trained with, and "
                         "normalising with other ones changes the model; remove the flag to keep them (or the file "
                         "to re-normalise on purpose)")
    if norm is None and not from_data:
        raise ValueError(f"{src}: a Swin state dict without {SIDECAR_NAME} (`ckpt convert --to dcp` writes it): the "
                         "statistics its inputs were normalised with are unknown; write them with `dist-train ckpt "
                         f"inspect CKPT --json {sidecar_path(src)}` from the checkpoint it came from, or pass {flag} "
                         "to normalise with the statistics of the data it will be trained on")
    return norm


def from_dcp(src: PathLike, out: PathLike, cfg: Optional[Config] = None, normalisation_from_data: bool = False) -> Path:
    """A dist-train checkpoint ``out/step_0`` (weights only) from a stock DCP model state dict ``src``.
    cfg: the run's config; when given the tensors must be exactly its model and the config is recorded.
    A Swin's input normalisation is recorded from ``src``'s sidecar (``import_normalisation``)."""
    tensors = read_stock_dcp(src)
    if cfg is not None:
        check_against(tensors, cfg, str(src))
    norm = import_normalisation(Path(src), tensors, cfg, normalisation_from_data)
    fresh_output(Path(out))
    config = {"source": str(src)}
    if cfg is not None:
        config.update(model=dataclasses.asdict(cfg.model), data={"seq_len": cfg.data.seq_len})
    return write_step0(out, tensors, config, {NORMALISATION_KEY: norm} if norm is not None else None)

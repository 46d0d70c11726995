"""One rank of ``dist-train eval``: the validation loss of a checkpoint's weights, without training.

    result = evaluate_checkpoint(cfg, Path("runs/x/checkpoints/step_30"), ctx)   # every rank, collective
    # {"loss": 5.42, "perplexity": 226.1, "count": 8160.0, "step": 30, ...}  (the same on every rank)

The pieces are the trainer's: its model, engine (layout; forward only: ``build_engine``'s ``evaluation_only``, no
DDP gradient buckets, DeepSpeed's engine without an optimizer) and validation batcher, the checkpoint manager's ``load``
(weights only: no optimizer is given, so none is read) and :class:`dist_train.evaluation.Evaluator` over the same
batches a training evaluation reads. The loss therefore equals the ``valid_loss`` the trainer logged at the
checkpoint's step under the same config (the weights it evaluated are the ones it saved): bit for bit on the
trained layout, within float rounding on another (the reduction order changes; tests: 1e-5 under dp/cp/tp/pp 2).

Read-only: no run-dir lock, no log file, tracker or config written under ``run.dir``; the checkpoint is only read.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

from torch import nn

from .checkpoint import CheckpointManager
from .config import Config
from .data.image_batches import NORMALISATION_KEY, WeatherBatcher, same_normalisation_data
from .distributed import DistContext, caller_process_state
from .engines import autocast_dtype, build_engine
from .evaluation import Evaluator
from .mesh import Mesh, build_mesh
from .trainer import build_batcher, build_model, layout_dict


def evaluate_checkpoint(cfg: Config, ckpt: Path, ctx: DistContext) -> dict:
    """Load ``ckpt``'s weights into ``cfg``'s model under ``cfg.parallel`` and evaluate ``cfg.train.eval_steps``
    held-out batches -> the result dict (the same on every rank). Collective over every rank. The caller's environment
    and process group state are as they were on return or error (caller_process_state, as for ``train()``: an
    in-process DeepSpeed evaluation's own one-rank group is destroyed, the caller's kept)."""
    with caller_process_state():
        return _evaluate(cfg, ckpt, ctx)


def _evaluate(cfg: Config, ckpt: Path, ctx: DistContext) -> dict:
    """:func:`evaluate_checkpoint` inside the caller's process state."""
    started = time.perf_counter()
    mesh = build_mesh(cfg.parallel, ctx.world_size, ctx.device.type, host_timeout_s=cfg.launch.collective_timeout_s)
    model = build_model(cfg, mesh, ctx.device)
    engine = build_engine(cfg, model, mesh, autocast_dtype(cfg, ctx.device), evaluation_only=True)
    try:
        return _evaluate_with(cfg, ckpt, ctx, mesh, model, engine, started)
    finally:  # a DeepSpeed engine outlived the evaluation before (engines/deepspeed.py close)
        engine.close()


def _evaluate_with(cfg: Config, ckpt: Path, ctx: DistContext, mesh: Mesh, model: nn.Module, engine,
                   started: float) -> dict:
    """:func:`_evaluate` once its engine is built: the checkpoint's weights loaded and the held-out batches run."""
    # only the model section is compared with the checkpoint's: data, training and layout keys may differ (another
    # held-out set, another layout), the model may not
    manager = CheckpointManager(cfg.checkpoint, run_dir=cfg.run.dir, config={"model": cfg.to_dict()["model"]},
                                layout=layout_dict(cfg, ctx.world_size), rank=ctx.rank, world_size=ctx.world_size,
                                **engine.checkpoint_kwargs())
    extra = manager.load(ckpt, engine.module, optimizer=None, scheduler=None, verify=True, with_rng=False)
    train_batcher, normalisation = None, None
    if cfg.model.kind == "swin":  # validation inputs are normalised as the model was trained (the checkpoint's)
        train_batcher = build_batcher(cfg, mesh, model)
        if isinstance(train_batcher, WeatherBatcher):
            normalisation = train_batcher.resume_normalisation(
                extra.get(NORMALISATION_KEY), same_normalisation_data(manager.saved_config, cfg.to_dict()))
    evaluator = Evaluator(cfg, mesh, build_batcher(cfg, mesh, model, part="valid", train_batcher=train_batcher))
    loss, count = evaluator.run(engine)
    t = cfg.train
    return {
        "checkpoint": str(ckpt), "step": int(extra["step"]), "loss": loss,
        # GPT: exp of the mean next-token cross-entropy; swin's loss is an MSE, which has no perplexity
        "perplexity": (math.exp(loss) if loss < 700 else math.inf) if cfg.model.kind == "gpt" else None,
        "count": count, "count_unit": "tokens" if cfg.model.kind == "gpt" else "values",
        "batches": t.eval_steps, "samples": t.eval_steps * t.global_batch,
        "data": cfg.data.valid_path or (f"{cfg.data.path} (data.split {cfg.data.split!r}, validation share)"
                                        if cfg.data.source == "indexed" else f"{cfg.data.source} (held-out)"),
        "world_size": ctx.world_size, "layout": layout_dict(cfg, ctx.world_size),
        # a Swin's inputs normalised otherwise than with this data's own statistics, or with those for want of the
        # checkpoint's: which statistics the loss is of (None: the checkpoint's, equal to this data's)
        "input_normalisation_note": normalisation.removeprefix("resume: ") if normalisation else None,
        "time_s": time.perf_counter() - started,
    }

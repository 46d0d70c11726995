"""The training loop. It never knows who launched it: it reads the initialised default group (or none).

    result = train(cfg)            # every rank; returns per-step losses (identical on all ranks)

One optimizer step = ``grad_accum_steps`` micro-batches per dp rank. The loss is the mean over every
real token of the global batch (see engines/ddp.py for the scaling contract).
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from .checkpoint import CheckpointManager
from .checkpoint import compat
from .checkpoint.manager import checkpoint_root, trained_tokenizer
from .checkpoint.manifest import step_dir_name
from .checkpoint.storage import CheckpointError
from .config import Config, check_world_size, checkpoint_blocker, save_config
from .cost.flops import (Throughput, attention_flops_per_key, document_keys, flop_convention, model_params,
                         param_count, train_flops_per_token)
from .cost.layout import stages_of_rank
from .cost.shape import cp_execution, shape_of
from .data.batches import TokenBatcher
from .data.datasets import (SYNTHETIC_VALID_SEED_OFFSET, IndexedTokenDataset, SyntheticTokenDataset,
                            agreed_training_identity)
from .data.documents import document_options
from .data.image_batches import NORMALISATION_KEY, WeatherBatcher, same_normalisation_data
from .data.prepare import ensure_prepared
from .distributed import DistContext, caller_process_state, current_context
from .engines import autocast_dtype, build_engine
from .engines.ddp import all_reduce_sum
from .evaluation import Evaluator
from .gc_schedule import GcSchedule
from .lifecycle import EXIT_PREEMPTED, Lifecycle, TrainingDiverged
from .logs import LOG_FILE_ONLY, caller_logging, setup_logging
from .mesh import Mesh, build_mesh
from .metrics import HonestPeak, device_peak, format_metrics, peak_memory_bytes
from .models.gpt import build_gpt
from .models.swin import build_swin
from .models.tensor_parallel import TensorParallel
from .optim import RESUME_APPLIED, apply_changed_hyperparameters
from .profiling import StepProfiler, check_profile
from .rankstats import RankStats
from .run_records import set_aside_earlier_run
from .runlock import hold_checkpoint_dir, hold_run_dir
from .spikes import STATE_KEY as SPIKE_STATE_KEY
from .spikes import LossSpikeGuard
from .trackers import build_trackers

#: the checkpoint ``extra`` key holding how many steps in a row were skipped (train.on_nonfinite = skip) up to the
#: saved step: ``train.max_nonfinite_steps`` counts across a resume, as it would in an uninterrupted run
SKIPPED_STATE_KEY = "skipped_in_a_row"


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    start_step: int = 0
    exit_code: int = 0
    summary: dict = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# Building the pieces
# ---------------------------------------------------------------------------------------------
def build_model(cfg: Config, mesh: Mesh, device: torch.device) -> torch.nn.Module:
    seed_everything(cfg.run.seed)  # identical initial weights on every rank
    if cfg.model.kind == "gpt":
        return build_gpt(cfg, mesh, device)
    stages = stages_of_rank(cfg, mesh.coord("pp")) if cfg.parallel.pp > 1 else None
    tp = TensorParallel.from_mesh(mesh, cfg.run.seed, device)
    return build_swin(cfg.model, wp_group=mesh.wp_group, grid=cfg.wp_grid, cp_group=mesh.cp_group,
                      activation_checkpointing=cfg.train.activation_checkpointing, stages=stages, tp=tp,
                      init_seed=cfg.run.seed).to(device)


def build_batcher(cfg: Config, mesh: Mesh, model: torch.nn.Module, part: str = "train", train_batcher=None):
    """Per-rank micro-batches of the training data (``part = "train"``) or of the held-out validation data
    (``"valid"``: data.valid_path, the data.split share, or synthetic data under a held-out seed). ``train_batcher``:
    the training one, whose input normalisation weather validation batches take (a resume's included)."""
    d = cfg.data
    if cfg.model.kind == "swin":
        if d.source != "weather":
            raise ValueError(f"data.source = {d.source!r}: model.kind = swin trains on data.source = weather")
        return WeatherBatcher(cfg, mesh, model, part, normalise_as=train_batcher)
    if d.source == "synthetic":
        seed = cfg.run.seed + (SYNTHETIC_VALID_SEED_OFFSET if part == "valid" else 0)
        source = SyntheticTokenDataset(cfg.model.vocab_size, d.seq_len, seed)
    elif d.source == "indexed":
        if not d.path:
            raise ValueError("data.path is not set: give the prefix of a Megatron indexed dataset "
                             "(dist-train data prepare --output PREFIX)")
        if mesh.rank == 0:
            ensure_prepared(d.path, d.prepare, d.tokenizer)
        if dist.is_initialized():
            dist.barrier()
        if part == "valid" and d.valid_path:
            source = IndexedTokenDataset(d.valid_path, d.seq_len, cfg.run.seed, key="data.valid_path")
        else:
            source = IndexedTokenDataset(d.path, d.seq_len, cfg.run.seed, d.split, part)
    else:
        raise ValueError(f"data.source = {d.source!r} needs model.kind = swin")
    return TokenBatcher(source, micro_batch=cfg.train.micro_batch, dp=mesh.size("dp"), dp_rank=mesh.coord("dp"),
                        cp=mesh.size("cp"), cp_rank=mesh.coord("cp"), layout=cfg.parallel.cp_layout,
                        documents=document_options(d))


def layout_dict(cfg: Config, world_size: int) -> dict:
    """The parallel layout a checkpoint records (RNG states are restored only into the same one). ``cp_method`` is
    the cp that runs: a swin with cp > 1 runs Ulysses inside windows whatever ``parallel.cp_method`` says
    (:func:`~dist_train.cost.shape.cp_execution`); a GPT's is the configured one."""
    p = cfg.parallel
    method = cp_execution(cfg).method if cfg.model.kind == "swin" and p.cp > 1 else p.cp_method
    return {"dp": p.dp, "tp": p.tp, "pp": p.pp, "cp": p.cp, "wp": list(cfg.wp_grid), "cp_layout": p.cp_layout,
            "cp_method": method, "zero_stage": p.zero_stage, "fsdp": p.fsdp, "world_size": world_size}


def recorded_layouts(cfg: Config, world_size: int) -> list[dict]:
    """Other layout dicts a checkpoint of this same execution may hold: a swin with cp > 1 was recorded with the
    configured ``parallel.cp_method`` (``ring``, its default, or ``ulysses``) before :func:`layout_dict` recorded
    the Ulysses it runs, so its RNG states still resume."""
    if cfg.model.kind != "swin" or cfg.parallel.cp == 1:
        return []
    layout = layout_dict(cfg, world_size)
    return [{**layout, "cp_method": method} for method in ("ring", "ulysses") if method != layout["cp_method"]]


def _stop_reason(t, steps_done: int, start_step: int, lifecycle, mesh: Mesh) -> Optional[str]:
    """Why this process stops after ``steps_done`` (None: keep going). Collective (stop_agreed, over every rank's host
    group: the agreement waits for no device)."""
    if t.exit_interval and (steps_done - start_step) % t.exit_interval == 0 and steps_done < t.steps:
        return "exit_interval"
    if lifecycle.stop_agreed(mesh.host_world_group):
        return "preempted"
    return None


def _preemption_cause(lifecycle) -> str:
    """What stopped the run, for its last line: this rank's signal, or (stop_agreed is a MAX over the ranks) another
    rank's, whose number this rank never saw."""
    return "another rank was signalled" if lifecycle.signalled is None else f"signal {lifecycle.signalled}"


def _report_resume_changes(cfg: Config, engine, ckpt, start_step: int, log, is_main: bool) -> None:
    """Apply changed training hyper-parameters from the resume step on and say so; say which model keys
    changed under ``checkpoint.allow_config_change`` (any other change was refused by the manager), and which
    other data/train/parallel keys differ from the checkpoint (applied as configured now)."""
    changed = apply_changed_hyperparameters(engine.optimizer, engine.scheduler, cfg.train,
                                            ckpt.saved_config.get("train") or {})
    if is_main and changed:
        log.info(f"resume: {', '.join(changed)} (differ from the checkpoint): applied from step {start_step + 1} "
                 f"on, lr now {engine.lr:.3g}")
    if is_main and ckpt.config_changes:
        log.warning("resume: " + ", ".join(f"{k} {old!r} -> {new!r}" for k, old, new in ckpt.config_changes)
                    + " (allowed by checkpoint.allow_config_change)")
    # the train keys apply_changed_hyperparameters compares are named above whenever they differ (and the
    # allowed changes are checked keys, which applied_differences leaves out itself)
    others = compat.applied_differences(ckpt.saved_config, cfg.to_dict(), [f"train.{k}" for k in RESUME_APPLIED])
    if is_main and others:
        log.info("resume: " + ", ".join(f"{k} {old!r} -> {new!r}" for k, old, new in others)
                 + f" (differ from the checkpoint): as configured now from step {start_step + 1} on")


def _continues_own_checkpoints(ckpt, start_step: int) -> bool:
    """This start continues the run dir's own lineage: resumed at a step > 0 from a ``step_N`` of the run's checkpoint
    dir (``checkpoint.dir``), so the records there are its own and the trackers continue them after ``start_step``.
    Any other start (fresh, an import at step 0, another run's checkpoint) begins a new run in run.dir."""
    return (start_step > 0 and ckpt.resumed_from is not None
            and ckpt.resumed_from.resolve().parent == ckpt.root.resolve())


def _check_step(cfg: Config, engine, spikes: LossSpikeGuard, limit: Optional[float], step: int, loss: float,
                grad_norm: float, run: int, ckpt, log, is_main: bool) -> int:
    """Apply ``train.on_nonfinite`` to the step just taken; returns the new count of consecutive skipped
    steps or raises ``TrainingDiverged`` (the same decision on every rank: the engines agree on the flag).
    A step with a non-finite loss or gradient norm, or a loss above ``limit`` (a spike, dist_train/spikes.py),
    is not accepted; an accepted step's loss enters the spike window.

    The engines never apply a step they did not accept (``last_step_skipped``), so the weights stay finite
    and no later checkpoint can hold NaN or a spike's update; DeepSpeed applies its own step, so there an
    unaccepted step always stops."""
    skipped = getattr(engine, "last_step_skipped", False)
    finite = math.isfinite(loss) and math.isfinite(grad_norm)
    spike = finite and spikes.is_spike(loss, limit)
    if not skipped and finite and not spike:
        spikes.record(loss)
        return 0
    t = cfg.train
    what = f"step {step}: loss {loss:g}, grad norm {grad_norm:g}"
    what += f" is a loss spike ({spikes.describe(limit)})" if spike else " is not finite"
    good = ckpt.last_good()
    tail = f"last good checkpoint: {good or 'none'} (untouched)"
    if t.on_nonfinite == "stop" or not skipped:
        raise TrainingDiverged(f"{what}: training stopped (train.on_nonfinite = {t.on_nonfinite}); "
                               f"the step was not saved; {tail}")
    run += 1
    if run > t.max_nonfinite_steps:
        raise TrainingDiverged(f"{what}: {run} consecutive skipped steps > "
                               f"train.max_nonfinite_steps = {t.max_nonfinite_steps}, training stopped; {tail}")
    (log.warning if is_main else log.info)(f"{what}: step skipped, weights and optimizer unchanged "
                f"({run} of at most {t.max_nonfinite_steps} consecutive, train.on_nonfinite = skip)")
    return run


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------
def train(cfg: Config, ctx: Optional[DistContext] = None) -> TrainResult:
    """Train this rank of ``cfg``'s job (``ctx``: its process group; None: the default group, or one process).
    The caller's environment, process group state and ``dist_train`` logger are as they were on return or error
    (caller_process_state: an engine's own one-rank group, DeepSpeed's, is destroyed, the caller's kept;
    caller_logging: this run's log file is closed)."""
    with caller_process_state(), caller_logging():
        ctx = ctx or current_context()
        check_world_size(cfg, ctx.world_size)
        check_profile(cfg, ctx.device.type == "cuda")  # profile.ranks in the job, profile.memory on CUDA
        # one job per run directory, taken before anything touches it (dist_train/runlock.py)
        run_dir, ckpt_dir = Path(cfg.run.dir), checkpoint_root(cfg.checkpoint, cfg.run.dir)
        with (hold_run_dir(run_dir, ctx.rank, ctx.device),
              hold_checkpoint_dir(ckpt_dir, run_dir, ctx.rank, ctx.device)):
            return _train(cfg, ctx)


def _train(cfg: Config, ctx: DistContext) -> TrainResult:
    run_dir = Path(cfg.run.dir)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    log = setup_logging(ctx.rank, run_dir)
    mesh = build_mesh(cfg.parallel, ctx.world_size, ctx.device.type, host_timeout_s=cfg.launch.collective_timeout_s)
    if mesh.host_note:
        log.info(mesh.host_note, extra=LOG_FILE_ONLY)
    if ctx.is_main:
        log.info(f"dist-train | {cfg.run.name} | {ctx.world_size} rank(s) on {ctx.device.type} | mesh {mesh.describe()}")
    else:  # the console shows warnings only on these ranks; rank_N.log still says who this rank is
        log.info(f"rank {ctx.rank} of {ctx.world_size} on {ctx.device} | coordinates {mesh.coords()} | pid {os.getpid()}")

    model = build_model(cfg, mesh, ctx.device)
    engine = build_engine(cfg, model, mesh, autocast_dtype(cfg, ctx.device))
    try:
        return _train_with(cfg, ctx, log, mesh, model, engine)
    finally:  # after the engine's last use (the rank record, the summary): a DeepSpeed engine outlived train() before
        engine.close()


def _train_with(cfg: Config, ctx: DistContext, log, mesh: Mesh, model: torch.nn.Module, engine) -> TrainResult:
    """:func:`_train` once its engine is built: the data, the checkpoint manager, the loop and the summary."""
    run_dir = Path(cfg.run.dir)
    batcher = build_batcher(cfg, mesh, model)
    n_params = model_params(cfg)  # the full model, not this rank's tp shard / pipeline stage / ZeRO-3 partition

    t = cfg.train
    accum = cfg.grad_accum_steps
    # the dataset's identity a checkpoint records: samples per epoch of data read from files (None: generated); every
    # rank's read agreed (the pre-flight's is not passed on: the files may have been replaced since)
    train_samples, (train_digest, train_tokenizer) = batcher.samples_per_epoch, agreed_training_identity(cfg)
    ckpt = CheckpointManager(cfg.checkpoint, run_dir=run_dir, config=cfg.to_dict(),
                             layout=layout_dict(cfg, ctx.world_size), rank=ctx.rank, world_size=ctx.world_size,
                             same_layouts=recorded_layouts(cfg, ctx.world_size),
                             data_digest=train_digest, data_samples=train_samples, data_tokenizer=train_tokenizer,
                             **engine.checkpoint_kwargs())
    resumed = ckpt.resume(engine.module, engine.optimizer, engine.scheduler)
    # the tokenizer the model's ids mean: its data's; on data that does not say (built elsewhere), the checkpoint's
    train_tokenizer = train_tokenizer or trained_tokenizer(resumed or {})
    start_step = int(resumed["step"]) if resumed else 0
    consumed = int(resumed["consumed_samples"]) if resumed else 0
    # the losses a loss spike is judged against go on from the checkpoint (an older one holds none)
    spikes = LossSpikeGuard(t.spike_factor, t.spike_window, (resumed or {}).get(SPIKE_STATE_KEY, ()))
    if resumed:
        # every rank continues its own random streams from the saved state (restored by resume)
        log.info(f"resumed from {ckpt.resumed_from} at step {start_step} ({consumed} samples consumed)")
        _report_resume_changes(cfg, engine, ckpt, start_step, log, ctx.is_main)
        if isinstance(batcher, WeatherBatcher):
            kept = batcher.resume_normalisation(resumed.get(NORMALISATION_KEY),
                                                same_normalisation_data(ckpt.saved_config, cfg.to_dict()))
            if kept and ctx.is_main:
                log.info(kept)
    result = TrainResult(start_step=start_step)
    lifecycle = Lifecycle(run_dir, ctx.rank, watchdog_s=cfg.launch.watchdog_s,
                          collective_timeout_s=cfg.launch.collective_timeout_s)
    # the same on every rank (config only): a stop skips a save known to fail instead of starting one
    unsavable = checkpoint_blocker(cfg)

    def save_state(step_done: int, force: bool) -> bool:
        """Save (``force``) or save when checkpoint.every says so; True when a checkpoint was committed (or, async,
        handed to the writer), as ``CheckpointManager.save`` says."""
        state = {"step": step_done, "consumed_samples": consumed, SPIKE_STATE_KEY: spikes.state(),
                 SKIPPED_STATE_KEY: nonfinite_run}
        if train_samples is not None:  # the dataset's identity for compat.check_dataset at the next resume
            state["train_samples"] = train_samples
        if train_digest is not None:
            state["train_digest"] = train_digest
        if train_tokenizer is not None:  # for compat.check_tokenizer at the next resume or fine-tune, and HF export
            state["train_tokenizer"] = train_tokenizer
        if isinstance(batcher, WeatherBatcher):  # what the model's inputs are normalised with
            state[NORMALISATION_KEY] = batcher.normalisation()
        if not force and not ckpt.due(step_done):
            return False
        with lifecycle.busy("checkpoint"):  # the automatic watchdog allows a save more than a step
            return ckpt.save(step_done, engine.module, engine.optimizer, engine.scheduler, extra=state)

    # MFU's denominator, with where it comes from; HonestPeak fixes it (and says so) if a step beats it
    honest = HonestPeak(device_peak(ctx.device, t.peak_tflops, autocast_dtype(cfg, ctx.device)), ctx.device,
                        configured=bool(t.peak_tflops))
    tokens_sample = cfg.data.seq_len if cfg.model.kind == "gpt" else batcher.tokens_per_sample
    thr = Throughput(train_flops_per_token(cfg) * tokens_sample * t.global_batch, t.global_batch * tokens_sample,
                     ctx.world_size, honest.peak.tflops)
    packed = cfg.model.kind == "gpt" and cfg.data.document_mask
    if packed:     # FLOPs/MFU count each step's Σ Lᵢ·S_eff(Lᵢ) attention term (docs/metrics.md)
        sh = shape_of(cfg)
        thr.flops_per_key, thr.keys_per_query = attention_flops_per_key(sh), sh.keys_per_query
    step_keys: list[float] = []   # packed: S_eff of each step
    evaluator = (Evaluator(cfg, mesh, build_batcher(cfg, mesh, model, part="valid", train_batcher=batcher))
                 if t.eval_every else None)
    # a new run here (a fresh start, or from a checkpoint not this run dir's own): the trackers would truncate/purge
    # an earlier run's records after start_step, and summary/config be replaced: keep them aside
    if ctx.is_main and not _continues_own_checkpoints(ckpt, start_step):
        moved = set_aside_earlier_run(run_dir, keep=ckpt.root,
                                      start=f"start from {ckpt.resumed_from}" if resumed else "fresh start")
        if moved:
            log.info(moved)
    trackers = build_trackers(cfg, run_dir, start_step, ctx.is_main)
    if ctx.is_main:  # only once the resume accepted it and the run has all it needs to train: a refused or failed
        save_config(cfg, run_dir / "config.yaml")  # start never replaces the config the checkpoints were trained with
    valid_loss: Optional[float] = None
    if ctx.is_main:
        log.info(f"model {cfg.model.kind}: {param_count(n_params)} params | global batch {t.global_batch} = "
                 f"micro {t.micro_batch} x accum {accum} x dp {mesh.size('dp')} | steps {t.steps} | "
                 f"FLOPs/token convention: {flop_convention(cfg.model.kind)} | device peak {honest.peak.tflops:.4g} TFLOP/s "
                 f"({honest.peak.source})")

    def honest_mfu(step_done: int, achieved_tflops: float) -> None:
        """Rank 0: an MFU above 100% fixes the peak (HonestPeak) and warns once."""
        warning = honest.check(step_done, achieved_tflops) if ctx.is_main else None
        thr.peak_tflops = honest.peak.tflops
        if warning:
            log.warning(warning)

    bar = None
    # a bar only where a person watches: a terminal here, or one behind the launcher (DIST_TRAIN_TTY=1)
    if ctx.is_main and t.progress and (sys.stderr.isatty() or os.environ.get("DIST_TRAIN_TTY") == "1"):
        bar = tqdm(total=t.steps, initial=start_step, desc="train", unit="step", file=sys.stderr,
                   dynamic_ncols=True, leave=False, mininterval=0.5)
    step_times: list[float] = []
    # consecutive skipped (non-finite or spike) steps, going on from the checkpoint (an older one holds none)
    nonfinite_run = int((resumed or {}).get(SKIPPED_STATE_KEY, 0))
    diverged: Optional[TrainingDiverged] = None  # the loop's divergence, if any (it decides how the run ends)
    rank_stats = RankStats.start(run_dir, ctx.rank)  # per-rank record for `dist-train scale` (DIST_TRAIN_RANK_STATS=1)
    model.train()
    # every rank: the build's garbage collected and the survivors frozen; train.gc_interval > 0 takes the automatic
    # collector's place with a full collection at the same steps on every rank (no rank waits for another's mid-step)
    gcs = GcSchedule.start(t.gc_interval)
    if ctx.is_main:  # the log file's: a detail of every start, not a line for the console
        log.info(gcs.describe(), extra=LOG_FILE_ONLY)
    # profile.steps: a torch.profiler trace of those global steps on each profiled rank (dist_train/profiling.py)
    profiler = StepProfiler.start(cfg, ctx.rank, run_dir, start_step, ctx.device, log, ctx.is_main, lifecycle.busy,
                                  mesh.host_world_group)
    try:
        for step in range(start_step, t.steps):
            profiler.step_begins(step + 1)
            t0 = time.perf_counter()
            micro = [batcher.microbatch(consumed, m) for m in range(accum)]
            data_s = time.perf_counter() - t0
            count = [sum(float(b["count"]) for b in micro)]
            if packed:   # cp ranks repeat their samples' documents: the keys/tokens RATIO is unaffected
                keys = [document_keys(b["cu_seqlens"].tolist(), cfg.data.seq_len, cfg.model.attention_window)
                        for b in micro]
                count += [sum(k for k, _ in keys), sum(n for _, n in keys)]
            # a host value: over the host group (gloo) its read below waits for no device (NCCL would take it there)
            totals = all_reduce_sum(torch.tensor(count, dtype=torch.float64), mesh.host_grad_group)
            global_count = float(totals[0])
            if packed:
                step_keys.append(float(totals[1] / totals[2]))
            if global_count <= 0:
                raise ValueError(f"step {step}: the global batch has no real tokens to train on")
            lr = engine.lr
            limit = spikes.limit()
            loss, grad_norm = engine.train_step(micro, global_count, limit)
            nonfinite_run = _check_step(cfg, engine, spikes, limit, step + 1, loss, grad_norm, nonfinite_run, ckpt,
                                        log, ctx.is_main)
            skipped = nonfinite_run > 0  # not applied (train.on_nonfinite = skip): always recorded, marked
            consumed += t.global_batch
            gcs.collect_if_due(step + 1)  # inside the timed step: its cost shows in the step time
            dt = time.perf_counter() - t0
            step_times.append(dt)
            rank_stats.step(dt, data_s)
            result.losses.append(loss)
            result.grad_norms.append(grad_norm)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}")
            lifecycle.heartbeat(step + 1)
            saved = save_state(step + 1, force=False)
            stop = _stop_reason(t, step + 1, start_step, lifecycle, mesh)
            if stop == "preempted" and unsavable:  # (validation refuses its other saves); rank 0 says it, once
                result.exit_code = EXIT_PREEMPTED
                stop_line = (log.warning if ctx.is_main else log.info,
                             f"preempted ({_preemption_cause(lifecycle)}): no checkpoint written after step "
                             f"{step + 1}: {unsavable}; a restart starts from scratch, exiting with status "
                             f"{EXIT_PREEMPTED}")
            elif stop:
                saved = save_state(step + 1, force=True) or saved
                with lifecycle.busy("checkpoint"):
                    ckpt.wait()  # the process exits next: say "saved" only of a committed checkpoint
                good = ckpt.last_good()  # reads every checkpoint's manifest: once
                kept = (f"checkpoint saved after step {step + 1}" if good == step_dir_name(step + 1) else
                        f"the checkpoint of step {step + 1} failed (see above): a restart resumes from "
                        f"{good or 'scratch'}")
                # said after this step's metric line (below), which is the last one the run prints
                if stop == "preempted":
                    result.exit_code = EXIT_PREEMPTED
                    # rank 0 says it on the console; every other rank (the same words) in its own log only
                    stop_line = (log.warning if ctx.is_main else log.info,
                                 f"preempted ({_preemption_cause(lifecycle)}): {kept}, exiting with "
                                 f"resumable status {EXIT_PREEMPTED}")
                else:
                    stop_line = (log.info, f"exit_interval {t.exit_interval}: {kept}, exiting")
            valid = evaluator.run(engine) if evaluator is not None and evaluator.due(step + 1) else None
            if (step + 1) % t.log_every == 0 or step + 1 == t.steps or stop or valid or saved or skipped:
                keys = step_keys[-1] if packed else None
                honest_mfu(step + 1, thr.tflops_per_device(dt, keys))
                rec = {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm, **thr.metrics(dt, keys),
                       "step_time_s": dt, "peak_mem_bytes": peak_memory_bytes(ctx.device),
                       "consumed_samples": consumed}
                if valid:
                    valid_loss = valid[0]
                    rec.update(valid_loss=valid[0], valid_count=valid[1])
                if saved:
                    rec["checkpoint_save_s"] = ckpt.last_stall_s
                if skipped:
                    rec["skipped"] = True
                trackers.log(step + 1, rec)
                if ctx.is_main:
                    log.info(format_metrics(rec, t.steps))
            if saved:
                trackers.flush()  # what a checkpoint keeps, the curves show
            profiler.step_ends(step + 1, stopping=bool(stop))  # a stop inside the window: the ranks compare there
            if stop:
                say, line = stop_line
                say(line)
                break
        finished = start_step + len(result.losses) == t.steps
        if finished and cfg.checkpoint.at_end and t.steps > start_step:
            save_state(t.steps, force=True)
    except TrainingDiverged as e:
        diverged = e
        raise
    finally:
        try:
            # an async save of an earlier (finite) step still commits when a later step diverged; marked busy: the
            # automatic watchdog would otherwise take a long final commit for a hang and kill the job mid-commit
            with lifecycle.busy("checkpoint"):
                ckpt.close()
        except CheckpointError as e:
            if diverged is None:
                raise
            # the divergence decides how the run ends (exit 3: a restart would replay the same steps into it); that
            # save's failure (on_error = stop) is said, not raised in its place
            (log.error if ctx.is_main else log.info)(f"{str(e).splitlines()[0]} (the run diverged after that step: "
                                                     "see below)")
        finally:
            try:  # a window the run left early (a stop, a divergence): the steps it took are written
                profiler.close()
            finally:
                gcs.close()
                lifecycle.close()
        if bar is not None:
            bar.close()
        trackers.close()

    rank_stats.finish(peak_memory_bytes(ctx.device), engine)
    timed = step_times[1:] if len(step_times) > 1 else step_times
    med = float(np.median(timed)) if timed else float("nan")
    if timed:
        honest_mfu(start_step + len(result.losses),
                   thr.tflops_per_device(med, float(np.mean(step_keys)) if packed else None))
    result.summary = {
        "name": cfg.run.name, "steps": start_step + len(result.losses), "start_step": start_step,
        "exit_code": result.exit_code, "world_size": ctx.world_size,
        "layout": layout_dict(cfg, ctx.world_size), "params": n_params,
        "first_loss": result.losses[0] if result.losses else None,
        "final_loss": result.losses[-1] if result.losses else None,
        "median_step_time_s": med if timed else None, **(thr.metrics(med, float(np.mean(step_keys)) if packed else None) if timed else
                                      {"tokens_per_s": None, "tflops_per_device": None, "mfu": None}),
        "valid_loss": valid_loss,
        "flop_convention": flop_convention(cfg.model.kind), "device_peak_tflops": honest.peak.tflops,
        "device_peak_source": honest.peak.source, "mfu_peak_warning": honest.warning,
        "peak_mem_bytes": peak_memory_bytes(ctx.device),
        "checkpoint_failed_saves": ckpt.failed_saves,
        "gc_interval": t.gc_interval, "gc_collections": gcs.collections, "gc_collect_s": gcs.collect_s,
        "profile_files": profiler.files,  # this start's traces (rank 0: every rank's), relative to run_dir
    }
    if not ctx.is_main:
        log.info(f"rank {ctx.rank} done: {len(result.losses)} steps from step {start_step}, exit code "
                 f"{result.exit_code}, peak memory {result.summary['peak_mem_bytes'] / 2**30:.2f} GiB")
    if ctx.is_main and start_step >= t.steps:  # a finished run started again: keep its summary, say why
        log.info(f"nothing to train: {ckpt.resumed_from} is at step {start_step} and train.steps = {t.steps}; "
                 f"raise train.steps to continue, or start over with another run.dir or checkpoint.dir (or move "
                 f"{ckpt.root}'s checkpoints away) ({run_dir / 'summary.json'} kept)")
    elif ctx.is_main:
        (run_dir / "summary.json").write_text(json.dumps(result.summary, indent=2))
        s = result.summary
        if s["first_loss"] is not None:  # a preempted or time-sliced run is not done: its line must not say so
            # unsavable: nothing was written; else the preemption's save may have failed with no earlier one to go on
            ended = ("preempted, no checkpoint to resume from" if result.exit_code == EXIT_PREEMPTED and
                     (unsavable or ckpt.last_good() is None)
                     else "preempted, resumable" if result.exit_code == EXIT_PREEMPTED
                     else f"stopped with exit status {result.exit_code}" if result.exit_code
                     else "done" if s["steps"] == t.steps
                     else f"stopped at train.exit_interval = {t.exit_interval} (step {s['steps']} of {t.steps}), "
                          "resumable")
            log.info(f"{ended}: loss {s['first_loss']:.4f} -> {s['final_loss']:.4f} in {len(result.losses)} steps | "
                     f"median {med:.3f} s/step | summary {run_dir / 'summary.json'}")
    if ctx.is_main and ckpt.failed_saves:  # on_error=continue trained on: the run looks finished, its saves are not
        log.warning(f"{ckpt.failed_saves} checkpoint save(s) failed (checkpoint.on_error = continue): a restart "
                    f"resumes from {ckpt.last_good() or 'scratch'}")
    return result

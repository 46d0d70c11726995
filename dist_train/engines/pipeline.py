"""Pipeline-parallel engine on ``torch.distributed.pipelining`` (1F1B, interleaved 1F1B, GPipe).

Why this engine (docs/parallelism.md): it runs on CPU/gloo and on CUDA/NCCL alike, takes the mesh's pp
group explicitly, and leaves the stage module to us — so a stage can contain Megatron-core
tensor-parallel layers and context-parallel attention over other mesh groups.

Loss contract: the last stage's loss function returns ``loss_sum / global_count`` per micro-batch
(``scale_grads=False``), so after the schedule every stage holds d(Σ local losses / global count);
summing gradients over the grad group (dp × cp × wp) gives d(mean over all real tokens of the global
batch) — whatever dp, cp, pp and the number of micro-batches are. With ``parallel.fsdp`` the stages are
sharded by FSDP2 (engines/fsdp.py) whose reduce-scatter *averages* over the grad group, so the loss
function then also multiplies by ``grad_size``.

The rank's model (GPT or swin) holds only its stages' layers / blocks; each stage module
(:class:`StageModule`, ``models.swin.SwinStageModule``) is a view over it (shared parameters), one per virtual
stage. The model-specific parts (stage modules, batch → schedule input and target, loss) are
:class:`GPTPipeline` and ``models.swin.SwinPipeline``; a swin stage passes tokens [B, th, tw, d] of this rank's
tile, every stage holding the same wp/cp tiling (SWiPe).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn as nn

from parallelism.context import pack_cu_seqlens
from parallelism.host_copy import to_device

from ..checkpoint.adapters import engine_checkpoint_kwargs
from ..config import Config
from ..mesh import Mesh
from ..optim import build_optimizer, build_scheduler
from ..models.swin import SwinPipeline
from .fsdp import FSDPSharder
from .ddp import checked_step
from .grads import all_reduce_grads_, all_reduce_sum


class StageModule(nn.Module):
    """One pipeline stage over a shared GPT: tokens [B, S] (first stage) or hidden [B, S, d] -> hidden
    [B, S, d]. The last stage's norm/head/loss run in the schedule's loss function.

    ``positions``: [S_local] shared by every sample, or [N, S_local] per sample of the rank's whole local batch
    (``data.reset_positions``); ``cu_seqlens``: [N, D+1] per sample (``data.document_mask``) or None. The
    schedule sets ``micro_index`` before each forward (``MicroBatchIndexedStage``): the stage reads the rows of
    that micro-batch, samples [micro_index * B, (micro_index + 1) * B) of the N."""

    def __init__(self, gpt: nn.Module, stage):
        super().__init__()
        self.stage = stage
        # register the owned pieces (shared with ``gpt``) so .parameters() is this stage's
        self.blocks = nn.ModuleList(gpt.layers[str(i)] for i in stage.layers)
        self.embedding = gpt.tok_embeddings if stage.first else None
        object.__setattr__(self, "gpt", gpt)  # not registered: the GPT holds every stage of this rank
        self.positions: Optional[torch.Tensor] = None
        self.cu_seqlens: Optional[torch.Tensor] = None
        self.micro_index = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = slice(self.micro_index * x.shape[0], (self.micro_index + 1) * x.shape[0])
        positions = self.positions if self.positions.dim() == 1 else self.positions[rows]
        cu_seqlens = None if self.cu_seqlens is None else self.cu_seqlens[rows]
        if self.stage.first:
            x = self.gpt.embed(x)
        return self.gpt.run_layers(x, positions, self.stage.layers, cu_seqlens=cu_seqlens)


class LossHead(nn.Module):
    """The last stage's final norm + output head + loss as one module (shared parameters), so the schedule's
    loss function runs through ``forward`` — FSDP2 gathers a unit on its module's forward.
    hidden [B, S, d], labels [B, S] -> (loss sum, real-token count)."""

    def __init__(self, gpt: nn.Module):
        super().__init__()
        self.norm, self.output = gpt.norm, gpt.output
        object.__setattr__(self, "gpt", gpt)

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gpt.loss(hidden, labels)


class GPTPipeline:
    """What the pipeline engine needs from a GPT: stage modules, the loss head (last stage), and micro-batches
    as the schedule's input (first stage: tokens) and target (last stage: labels); positions are set on every
    stage module."""

    def __init__(self, gpt: nn.Module):
        self.model = gpt
        self.device = next(gpt.parameters()).device
        self.stage_modules = [StageModule(gpt, st) for st in gpt.pipeline_stages]
        self.loss_head = LossHead(gpt) if gpt.has_head else None

    def inputs(self, micro: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """Accumulation micro-batches -> (tokens, labels) [N, S_local] of the whole local batch; every stage
        module gets the batch's positions (shared [S_local] or per sample [N, S_local]) and, with packed
        documents, its per-sample boundaries [N, D+1] (on the host: the attention plan reads them there)."""
        positions = micro[0]["positions"]
        if positions.dim() == 1:
            if any(not torch.equal(b["positions"], positions) for b in micro):
                raise ValueError("pipeline engine: every micro-batch must share one positions vector")
        else:
            positions = torch.cat([b["positions"] for b in micro])
        positions = to_device(positions, self.device)
        cu_seqlens = None
        if "cu_seqlens" in micro[0]:
            # the micro-batches' rows, padded to one width as the batcher pads one micro-batch's
            cu_seqlens = pack_cu_seqlens([row for b in micro for row in b["cu_seqlens"].tolist()])
        for sm in self.stage_modules:
            sm.positions, sm.cu_seqlens, sm.micro_index = positions, cu_seqlens, 0
        return torch.cat([b["tokens"] for b in micro]), torch.cat([b["labels"] for b in micro])


class PipelineEngine:
    """``train_step(micro_batches, global_count) -> (global mean loss, grad norm)`` like the DDP engine."""

    def __init__(self, cfg: Config, model: nn.Module, mesh: Mesh, autocast_dtype: Optional[torch.dtype]):
        self.cfg, self.module, self.mesh = cfg, model, mesh
        self.autocast_dtype = autocast_dtype
        self.device = next(model.parameters()).device
        self.last_step_skipped = False  # the last train_step was not accepted (non-finite, spike): nothing applied
        self.pipe = SwinPipeline(model) if cfg.model.kind == "swin" else GPTPipeline(model)
        self.stage_modules = self.pipe.stage_modules
        self.loss_head = self.pipe.loss_head
        self.fsdp = cfg.parallel.fsdp
        if self.fsdp:  # before the optimizer: AdamW then holds state for this rank's shards only
            FSDPSharder(mesh, cfg.parallel, autocast_dtype).shard_stages(self.stage_modules, self.loss_head)
        self._grad_scale = float(mesh.grad_size) if self.fsdp else 1.0
        self.optimizer = build_optimizer(list(model.named_parameters()), cfg.train)
        self.scheduler = build_scheduler(self.optimizer, cfg.train)
        self.grad_clip = cfg.train.grad_clip
        self._schedule = None
        self._n_micro: Optional[int] = None
        self._inv_count = 0.0
        self._loss_sums: list[torch.Tensor] = []

    # -- schedule --------------------------------------------------------------------------------
    def _loss_fn(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss_sum, _ = self.loss_head(hidden, labels)
        self._loss_sums.append(loss_sum.detach().double())  # summed on the device: see DDPEngine.train_step
        return loss_sum * (self._inv_count * self._grad_scale)

    def _build_schedule(self, n_micro: int):
        # Imported here, by a pipeline rank alone: torch.distributed.pipelining imports torch._dynamo (0.4 s of
        # every rank's start-up, and of every pre-flight, at module level); the ranks' fork server preloads it.
        from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B
        from .pipeline_stage import MicroBatchIndexedStage

        n_stages = self.mesh.size("pp") * len(self.stage_modules)
        stages = [MicroBatchIndexedStage(sm, sm.stage.index, n_stages, self.device, group=self.mesh.pp_group)
                  for sm in self.stage_modules]
        kind = self.cfg.parallel.pp_schedule
        if kind == "interleaved":
            return ScheduleInterleaved1F1B(stages, n_micro, loss_fn=self._loss_fn, scale_grads=False)
        cls = ScheduleGPipe if kind == "gpipe" else Schedule1F1B
        return cls(stages[0], n_micro, loss_fn=self._loss_fn, scale_grads=False)

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # -- step ------------------------------------------------------------------------------------
    def _run_schedule(self, micro: list[dict], inv_count: float, forward_only: bool) -> torch.Tensor:
        """This rank's local batch (all accumulation micro-batches concatenated) through the schedule as
        ``parallel.microbatches`` pipeline micro-batches (default: the accumulation count) -> the loss sum
        of this rank's micro-batches (zero off the last stage). ``forward_only``: the schedule's eval pass."""
        # the micro-batches' checks and concatenation run on the host (no device syncs)
        inputs, target = self.pipe.inputs(micro)
        samples = inputs.shape[0]
        n_micro = self.cfg.parallel.microbatches or len(micro)
        if samples % n_micro:
            raise ValueError(f"parallel.microbatches = {n_micro} does not divide the local batch of "
                             f"{samples} samples (micro_batch x accumulation)")
        if self._schedule is None or self._n_micro != n_micro:
            self._schedule, self._n_micro = self._build_schedule(n_micro), n_micro
        self._inv_count = inv_count
        self._loss_sums = []
        first = any(sm.stage.first for sm in self.stage_modules)
        last = any(sm.stage.last for sm in self.stage_modules)
        # only the first stage reads the inputs and only the last the target: the other is dropped before the
        # schedule runs, not moved to the device nor kept through the step
        # through pinned memory, asynchronously: a plain .to() of pageable memory waits for the device
        args = (to_device(inputs, self.device),) if first else ()
        target = to_device(target, self.device) if last else None
        del inputs
        run = self._schedule.eval if forward_only else self._schedule.step
        with self._autocast(), (torch.no_grad() if forward_only else contextlib.nullcontext()):
            # return_outputs=False: the losses come from the loss function; returning the last stage's outputs
            # would keep every micro-batch's hidden states [mb, ..., d] alive until the step ends and then
            # concatenate them, a copy nothing reads
            run(*args, target=target, return_outputs=False)
        loss_sum = torch.zeros(1, dtype=torch.float64, device=self.device)
        if last:
            # the schedule's first step also calls the loss function once for metadata inference (on
            # placeholder tensors); the real micro-batches are always the last n_micro calls
            loss_sum += torch.stack(self._loss_sums[-n_micro:]).sum()
        return loss_sum

    def train_step(self, micro: list[dict], global_count: float,
                   loss_limit: Optional[float] = None) -> tuple[float, float]:
        """One optimizer step over this rank's micro-batches -> (global mean loss, pre-clip grad norm);
        ``loss_limit``: see ``DDPEngine.train_step``."""
        loss_sum = self._run_schedule(micro, 1.0 / global_count, forward_only=False)
        params = [p for p in self.module.parameters() if p.requires_grad]
        if not self.fsdp:  # FSDP2 reduce-scattered inside backward
            all_reduce_grads_(params, self.mesh.grad_group)
        all_reduce_sum(loss_sum, self.mesh.pp_group)  # only the last stage contributes
        all_reduce_sum(loss_sum, self.mesh.grad_group)
        # the norm and the ranks' agreement, read with the loss in the step's one wait for the device; a non-finite
        # loss or norm, or a spike, on any rank: apply nothing
        return checked_step(self, params, loss_sum, global_count, loss_limit)

    def eval_loss_sum(self, micro: list[dict]) -> float:
        """Forward only through the pipeline (the schedule's eval pass, no gradients) -> the loss sum of the
        whole global batch (summed over pp, where only the last stage holds it, then the grad group)."""
        loss_sum = self._run_schedule(micro, 1.0, forward_only=True)
        all_reduce_sum(loss_sum, self.mesh.pp_group)
        all_reduce_sum(loss_sum, self.mesh.grad_group)
        return float(loss_sum.item())

    def checkpoint_kwargs(self) -> dict:
        """Extra CheckpointManager arguments: stages hold disjoint global names (``layers.<i>``) and merge by
        union; with tp > 1 the tensor-parallel adapter (checkpoint/adapters.py); FSDP2 shards as DTensors (under tp:
        their blocks of the tp=1 tensor)."""
        return engine_checkpoint_kwargs(self.module, self.mesh)

    def close(self) -> None:
        """Nothing to release (see ``ForwardEngine.close``): the schedule, stages, optimizer and groups are plain Python
        references of this engine, collected with it."""

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

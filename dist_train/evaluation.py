"""Validation: the held-out loss under the training loss contract, exact whatever the layout.

    ev = Evaluator(cfg, mesh, valid_batcher)   # trainer.build_batcher(cfg, mesh, model, part="valid")
    if ev.due(step):
        loss, count = ev.run(engine)           # the same two numbers on every rank

The validation set is fixed: evaluation batch e holds the held-out samples ``e·global_batch + [0,
global_batch)``, split over micro-batches and dp ranks exactly like a training step (so it does not
depend on dp), for e < ``train.eval_steps``. The loss is the sum over every real token (GPT) or value
(swin: the MSE) of all evaluation batches divided by their real count, the count all-reduced over the
grad group (dp × wp × cp) and the loss sums by the engine (``eval_loss_sum``: forward only, no gradient,
pipeline stages through the schedule's eval pass) — the training contract (docs/architecture.md).
"""
from __future__ import annotations

import torch

from .config import Config
from .engines.grads import all_reduce_sum
from .mesh import Mesh


class Evaluator:
    def __init__(self, cfg: Config, mesh: Mesh, batcher):
        self.cfg, self.mesh, self.batcher = cfg, mesh, batcher

    def due(self, step: int) -> bool:
        """Evaluate after ``step`` (1-based): every ``train.eval_every`` steps and after the last one."""
        every = self.cfg.train.eval_every
        return bool(every) and (step % every == 0 or step == self.cfg.train.steps)

    def run(self, engine) -> tuple[float, float]:
        """-> (validation loss, real tokens or values it averages over); collective over every rank."""
        t = self.cfg.train
        total, local_count = 0.0, 0.0
        for e in range(t.eval_steps):
            micro = [self.batcher.microbatch(e * t.global_batch, m) for m in range(self.cfg.grad_accum_steps)]
            local_count += sum(float(b["count"]) for b in micro)
            total += engine.eval_loss_sum(micro)
        # one collective for the whole evaluation (whole counts: exact in float64)
        count = float(all_reduce_sum(torch.tensor([local_count], dtype=torch.float64), self.mesh.grad_group).item())
        if count <= 0:
            raise ValueError("validation: the evaluation batches hold no real tokens")
        return total / count, count

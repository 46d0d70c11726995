"""Validation: the held-out loss under the training loss contract, exact whatever the layout.

    ev = Evaluator(cfg, mesh, valid_batcher)   # trainer.build_batcher(cfg, mesh, model, part="valid")
    if ev.due(step):
        loss, count = ev.run(engine)           # the same two numbers on every rank

The validation set is fixed: evaluation batch e holds the held-out samples ``e·global_batch + [0,
global_batch)``, split over micro-batches and dp ranks exactly like a training step (so it does not
depend on dp), for e < ``train.eval_steps``. The loss is the sum over every real token (GPT) or value
(swin: the MSE) of all evaluation batches divided by their real count, the count all-reduced over the
grad group's ranks (dp × wp × cp; a host value, over the mesh's host group) and the loss sums by the engine
(``eval_loss_sum``: forward only, no gradient, pipeline stages through the schedule's eval pass) — the training
contract (docs/architecture.md).

Every held-out sample counts at most once: ``eval_steps · global_batch`` beyond the held-out samples would
wrap into the next epoch's order and count some of them twice (a weighted loss no one asked for), so such a
configuration is refused (:func:`held_out_overrun`; the pre-flight says so before any rank starts).
"""
from __future__ import annotations

from typing import Optional

import torch

from .config import Config
from .engines.grads import all_reduce_sum
from .mesh import Mesh


def held_out_overrun(cfg: Config, held_out: Optional[int]) -> Optional[str]:
    """One line refusing an evaluation that reads more than the ``held_out`` validation samples (None: a
    generated, endless stream); None when it fits."""
    t = cfg.train
    wanted = t.eval_steps * t.global_batch
    if held_out is None or wanted <= held_out:
        return None
    where = (f"data.valid_path = {cfg.data.valid_path}" if cfg.data.valid_path
             else f"the validation share of data.split = {cfg.data.split!r}")
    fix = (f"set train.eval_steps <= {held_out // t.global_batch}" if held_out >= t.global_batch else
           "give validation more data (a larger data.split share) or set a smaller train.global_batch")
    return (f"train.eval_steps = {t.eval_steps} x train.global_batch = {t.global_batch} reads {wanted} held-out "
            f"samples per evaluation, but {where} holds {held_out}: {wanted - held_out} would be read again (a sample "
            f"counted twice or more); {fix}")


class Evaluator:
    def __init__(self, cfg: Config, mesh: Mesh, batcher):
        """``batcher``: the validation batcher; its ``samples_per_epoch`` (None: endless) bounds the evaluation."""
        refusal = held_out_overrun(cfg, batcher.samples_per_epoch)
        if refusal:
            raise ValueError(refusal)
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
        # one collective for the whole evaluation (whole counts: exact in float64), over the host group: a host value,
        # read without waiting for the device
        count = float(all_reduce_sum(torch.tensor([local_count], dtype=torch.float64),
                                     self.mesh.host_grad_group).item())
        if count <= 0:
            raise ValueError("validation: the evaluation batches hold no real tokens")
        return total / count, count

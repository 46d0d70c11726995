"""A finite loss spike (``train.spike_factor``) is handled like a non-finite step: never applied, never
saved; ``stop`` keeps the last good checkpoint untouched, ``skip`` goes on exactly as a skipped NaN step
does; the window of recent losses is saved with each checkpoint, so a resume judges its first step."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dist_train.checkpoint import complete_checkpoints
from dist_train.checkpoint.state import from_json
from dist_train.engines import ddp, deepspeed, pipeline
from dist_train.lifecycle import TrainingDiverged
from dist_train.metrics import format_metrics
from dist_train.plot import plot_runs
from dist_train.spikes import STATE_KEY, LossSpikeGuard
from dist_train.trainer import train
from tests.dist_harness import run_ranks
from tests.trainer_utils import tiny_gpt_config

SPIKE = 100.0  # what the injected step multiplies its loss by


def test_guard_limit_is_factor_times_the_window_median():
    g = LossSpikeGuard(3.0, 3)
    for loss in (9.0, 2.0):
        assert g.limit() is None  # no verdict before the window is full
        g.record(loss)
    g.record(4.0)
    assert g.limit() == 3.0 * 4.0  # median of 9, 2, 4: one large earlier loss does not move it
    assert g.is_spike(12.5, g.limit()) and not g.is_spike(12.0, g.limit())
    g.record(1.0)
    assert g.state() == [2.0, 4.0, 1.0] and g.limit() == 3.0 * 2.0  # the oldest left the window
    assert LossSpikeGuard(None, 3, [1.0, 1.0, 1.0]).limit() is None  # off
    assert LossSpikeGuard(2.0, 2, [5.0, 1.0, 3.0]).state() == [1.0, 3.0]  # a smaller window keeps the newest


def _scale_loss_at(engine_cls, method: str, steps: set[int]):
    """Multiply the loss sum ``engine_cls.method`` returns by SPIKE at the given 1-based training steps (the
    gradients are untouched: only what the engine judges the step by changes); returns the original."""
    real, calls = getattr(engine_cls, method), {"n": 0}

    def scaled(self, micro, *args, **kw):
        if kw.get("forward_only"):  # the pipeline engine's validation pass
            return real(self, micro, *args, **kw)
        calls["n"] += 1
        out = real(self, micro, *args, **kw)
        return out * SPIKE if calls["n"] in steps else out
    setattr(engine_cls, method, scaled)
    return real


def _spike_ddp_step(step: int, micro: int = 2):
    """DDP: forward_backward runs once per micro-batch; scale every micro-batch of ``step``."""
    return _scale_loss_at(ddp.DDPEngine, "forward_backward",
                          set(range((step - 1) * micro + 1, step * micro + 1)))


def _nan_norm_at(module, step: int):
    """The engine module's gradient norm is NaN at ``step`` (the already tested non-finite skip)."""
    real, calls = module.grad_norm_on_device, {"n": 0}

    def norm(*args, **kw):
        calls["n"] += 1
        value = real(*args, **kw)  # the norm on the device, read with the loss
        return torch.full_like(value, float("nan")) if calls["n"] == step else value
    module.grad_norm_on_device = norm
    return real


def _extra(ckpt: Path) -> dict:
    return from_json(json.loads((ckpt / "train_state.json").read_text())["extra"])


def test_stop_keeps_the_last_good_checkpoint_and_its_window(tmp_path):
    ref = train(tiny_gpt_config(tmp_path / "ref", steps=8))
    guard = {"spike_factor": 3.0, "spike_window": 3}
    cfg = tiny_gpt_config(tmp_path / "run", steps=8, train=guard, checkpoint={"every": 1, "keep_last": 1})
    real = _spike_ddp_step(6)
    try:
        with pytest.raises(TrainingDiverged) as info:
            train(cfg)
    finally:
        ddp.DDPEngine.forward_backward = real
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("step 6: loss ") and "is a loss spike (> train.spike_factor 3 x " \
        "median" in msg and "of the last 3 applied steps): training stopped (train.on_nonfinite = stop)" in msg, msg
    assert msg.endswith("the step was not saved; last good checkpoint: step_5 (untouched)"), msg
    good = complete_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for _, p in good] == ["step_5"], good
    assert _extra(good[0][1])[STATE_KEY] == ref.losses[2:5]
    # resumed with the spike still in the data: the saved window judges the very first step
    real = _spike_ddp_step(1)
    try:
        with pytest.raises(TrainingDiverged, match=r"^step 6: .*is a loss spike"):
            train(cfg)
    finally:
        ddp.DDPEngine.forward_backward = real
    assert [p.name for _, p in complete_checkpoints(tmp_path / "run" / "checkpoints")] == ["step_5"]
    # and without it, the resumed run trains on
    assert len(train(cfg).losses) == 3


def test_skip_goes_on_exactly_as_a_skipped_nonfinite_step(tmp_path):
    skip = {"on_nonfinite": "skip", "spike_factor": 3.0, "spike_window": 2}
    real = _spike_ddp_step(4)
    try:
        spiked = train(tiny_gpt_config(tmp_path / "spike", steps=6, train=skip))
    finally:
        ddp.DDPEngine.forward_backward = real
    real = _nan_norm_at(ddp, 4)
    try:
        nan = train(tiny_gpt_config(tmp_path / "nan", steps=6, train=skip))
    finally:
        ddp.grad_norm_on_device = real
    assert math.isfinite(spiked.grad_norms[3]) and math.isnan(nan.grad_norms[3])
    assert spiked.losses[3] > 3.0 * max(spiked.losses[1:3])
    # step 4 applied nothing in either run, and the spike did not enter the window
    assert spiked.losses[:3] + spiked.losses[4:] == nan.losses[:3] + nan.losses[4:]
    # its record says so (written whatever log_every is), and the plot shows it as a marker beside the curve
    records = [json.loads(line) for line in (tmp_path / "spike" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("skipped")] == [4] and records[3]["loss"] == spiked.losses[3]
    assert "skipped (not applied)" in format_metrics(records[3], 6)
    assert plot_runs([tmp_path / "spike"], tmp_path / "spike.png", [])["panels"]["loss vs step"] == 2
    assert plot_runs([tmp_path / "nan"], tmp_path / "nan.png", [])["panels"]["loss vs step"] == 2
    # off (the default): the same loss is applied, so the run goes on differently
    real = _spike_ddp_step(4)
    try:
        applied = train(tiny_gpt_config(tmp_path / "off", steps=5))
    finally:
        ddp.DDPEngine.forward_backward = real
    assert applied.losses[4] != spiked.losses[4]


@pytest.mark.slow
def test_pipeline_skips_a_spike_on_every_stage(tmp_path):
    per_rank = run_ranks(_pipeline_cases, 2, args=(str(tmp_path),), timeout=240)
    assert per_rank[0] == per_rank[1], per_rank  # both stages judged (and skipped) the same step
    spiked, nan = per_rank[0]
    assert spiked[:2] + spiked[3:] == nan[:2] + nan[3:] and spiked[2] > 3.0 * max(spiked[:2])


def _pipeline_cases(rank, world, root):
    skip = {"on_nonfinite": "skip", "spike_factor": 3.0, "spike_window": 2}
    layout = {"pp": 2, "microbatches": 2}
    real = _scale_loss_at(pipeline.PipelineEngine, "_run_schedule", {3})
    try:
        spiked = train(tiny_gpt_config(f"{root}/spike", steps=5, parallel=layout, train=skip)).losses
    finally:
        pipeline.PipelineEngine._run_schedule = real
    real = _nan_norm_at(ddp, 3)  # the engines share ddp.checked_step
    try:
        nan = train(tiny_gpt_config(f"{root}/nan", steps=5, parallel=layout, train=skip)).losses
    finally:
        ddp.grad_norm_on_device = real
    return spiked, nan


@pytest.mark.slow
def test_deepspeed_stops_on_a_spike_and_keeps_the_last_good_checkpoint(tmp_path):
    """DeepSpeed applies its update inside engine.step(), before the loss is known: the engine ignores the limit
    and the trainer stops on the spike itself (skip is refused with ZeRO), the spiked step never saved."""
    pytest.importorskip("deepspeed")
    real, calls = deepspeed.DeepSpeedEngine.train_step, {"n": 0}

    def spiked(self, micro, global_count, loss_limit=None):
        calls["n"] += 1
        loss, norm = real(self, micro, global_count, loss_limit)
        return (loss * SPIKE if calls["n"] == 5 else loss), norm
    deepspeed.DeepSpeedEngine.train_step = spiked
    try:
        with pytest.raises(TrainingDiverged, match=r"^step 5: .*is a loss spike .*training stopped .*; the step was "
                                                   r"not saved; last good checkpoint: step_4 \(untouched\)$"):
            train(tiny_gpt_config(tmp_path, steps=6, parallel={"zero_stage": 1},
                                  train={"spike_factor": 3.0, "spike_window": 2},
                                  checkpoint={"every": 1, "keep_last": 1}))
    finally:
        deepspeed.DeepSpeedEngine.train_step = real
    assert [p.name for _, p in complete_checkpoints(tmp_path / "checkpoints")] == ["step_4"]

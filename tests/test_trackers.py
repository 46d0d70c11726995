"""Experiment trackers: TensorBoard event files read back with tensorboard's own reader, metrics.jsonl,
resumed runs continue the curves without a duplicate step, W&B offline files (skipped when wandb is not
installed), configuration errors."""
from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import sys
import types

import pytest

from dist_train.config import ConfigError, default_trackers
from dist_train.trainer import train
from tests.trainer_utils import tiny_gpt_config

TRAIN = {"eval_every": 2, "eval_steps": 1, "trackers": ["jsonl", "tensorboard"]}


def _events(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return acc


def _jsonl(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_events_hold_every_curve(tmp_path):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    res = train(tiny_gpt_config(run, steps=4, train=TRAIN, checkpoint={"every": 2}))
    acc = _events(run)
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "valid/loss", "perf/tokens_per_s", "perf/mfu",
            "perf/tflops_per_device", "memory/peak_gib", "checkpoint/save_s"} <= tags, tags
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3, 4]
    assert [e.value for e in loss] == pytest.approx(res.losses, rel=1e-6)
    assert [e.step for e in acc.Scalars("valid/loss")] == [2, 4]
    assert acc.Scalars("valid/loss")[-1].value == pytest.approx(res.summary["valid_loss"], rel=1e-6)
    assert [r["step"] for r in _jsonl(run)] == [1, 2, 3, 4]


def test_resumed_run_continues_the_curves_without_duplicate_steps(tmp_path):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    # the first attempt logs steps 1-3 but its last checkpoint is step 2 (as after a crash at step 3)
    train(tiny_gpt_config(run, steps=3, train=TRAIN, checkpoint={"every": 2, "at_end": False}))
    res = train(tiny_gpt_config(run, steps=5, train=TRAIN, checkpoint={"every": 2, "at_end": False}))
    assert res.start_step == 2
    assert [r["step"] for r in _jsonl(run)] == [1, 2, 3, 4, 5]
    steps = [e.step for e in _events(run).Scalars("train/loss")]
    assert steps == [1, 2, 3, 4, 5], steps
    assert _jsonl(run)[2]["loss"] == pytest.approx(res.losses[0])  # step 3 is the resumed run's record
    # a fresh run (no resume) in the same directory, its checkpoints moved away, starts new curves: nothing of
    # the old run is shown there
    (run / "checkpoints").rename(tmp_path / "old_checkpoints")
    fresh = train(tiny_gpt_config(run, steps=2, train=TRAIN, checkpoint={"resume": "none", "at_end": False}))
    assert [r["step"] for r in _jsonl(run)] == [1, 2]
    assert [e.value for e in _events(run).Scalars("train/loss")] == pytest.approx(fresh.losses, rel=1e-6)
    # and the old run's curves are kept aside as they were (dist_train/run_records.py)
    [kept] = list((run / "previous").iterdir())
    assert [r["step"] for r in _jsonl(kept)] == [1, 2, 3, 4, 5]
    assert [e.step for e in _events(kept).Scalars("train/loss")] == [1, 2, 3, 4, 5]


def test_wandb_offline_files(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run = tmp_path / "run"
    train(tiny_gpt_config(run, steps=2, train={"trackers": ["jsonl", "wandb"]}))
    run_id = (run / "wandb_run_id").read_text().strip()
    assert list((run / "wandb").glob(f"offline-run-*-{run_id}")), list((run / "wandb").iterdir())


def test_wandb_tracker_is_offline_and_resumes_the_same_run(tmp_path, monkeypatch):
    """Our side of W&B with a stand-in module (runs whether or not wandb is installed): offline unless
    WANDB_MODE says otherwise, one run id kept across a resume, every scalar under its tag and step."""
    calls: list = []

    class Run:
        def log(self, data, step):
            calls.append(("log", step, dict(data)))

        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kw: calls.append(("init", kw)) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delitem(sys.modules, "dist_train.trackers.wandb_tracker", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run = tmp_path / "run"
    for steps, resume in ((2, "auto"), (3, "auto"), (1, "none")):  # the second run resumes the first one
        if resume == "none":  # a fresh run in the same run.dir: the old run's checkpoints moved away first
            (run / "checkpoints").rename(tmp_path / "old_checkpoints")
        train(tiny_gpt_config(run, steps=steps, train={"trackers": ["wandb"]},
                              checkpoint={"at_end": True, "resume": resume}))
    inits = [c[1] for c in calls if c[0] == "init"]
    assert len(inits) == 3 and all(kw["mode"] == "offline" and kw["resume"] == "allow" for kw in inits)
    assert inits[0]["id"] == inits[1]["id"] != inits[2]["id"] == (run / "wandb_run_id").read_text().strip()
    assert [c[1] for c in calls if c[0] == "log"] == [1, 2, 3, 1]
    assert "train/loss" in calls[1][2] and calls.count(("finish",)) == 3


def test_tracker_configuration_errors(tmp_path):
    with pytest.raises(ConfigError, match="train.trackers = \\['csv'\\]"):
        tiny_gpt_config(tmp_path, train={"trackers": ["csv"]})
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(ConfigError, match="wandb is configured but the wandb package is not installed"):
            tiny_gpt_config(tmp_path, train={"trackers": ["jsonl", "wandb"]})
    expected = ["jsonl"] + (["tensorboard"] if importlib.util.find_spec("tensorboard") else [])
    assert default_trackers() == expected

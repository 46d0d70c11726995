"""train.gc_interval (dist_train/gc_schedule.py): the same losses whatever it is; with N > 0 no automatic collection
inside a step and a full collection after every N-th step, exactly; cycles a step leaves live at most N steps; the
collector as it was after train() returns."""
from __future__ import annotations

import gc
import sys
import weakref

import pytest

from dist_train import trainer
from dist_train.gc_schedule import GcSchedule
from dist_train.trainer import train
from tests.trainer_utils import tiny_gpt_config


class CollectionRecorder:
    """Every collection while the ``with`` block runs (``gc.callbacks``): (generation, the training step it ran in or
    None, whether it ran inside the engine's ``train_step``, whether the schedule started it)."""

    def __init__(self):
        self.seen: list[tuple[int, object, bool, bool]] = []

    def _tick(self, phase: str, info: dict) -> None:
        if phase != "start":
            return
        step, in_step, scheduled = None, False, False
        frame = sys._getframe(1)
        while frame is not None:
            name = frame.f_code.co_name
            in_step |= name == "train_step"
            scheduled |= name == "collect_if_due"
            if name == "_train_with" and step is None:  # the trainer's loop (trainer._train_with)
                step = frame.f_locals.get("step")
            frame = frame.f_back
        self.seen.append((info["generation"], step, in_step, scheduled))

    def __enter__(self) -> "CollectionRecorder":
        gc.callbacks.append(self._tick)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._tick)


@pytest.fixture
def eager_collector():
    """The automatic collector firing every few allocations, so that it would certainly fire inside a step."""
    thresholds = gc.get_threshold()
    gc.set_threshold(20, 2, 2)
    yield
    gc.set_threshold(*thresholds)


def _train(tmp_path, name: str, interval: int, steps: int = 4):
    return train(tiny_gpt_config(tmp_path / name, steps=steps, train={"gc_interval": interval}))


def test_scheduled_collections_replace_the_automatic_ones_and_change_no_loss(tmp_path, eager_collector):
    assert gc.isenabled() and gc.get_freeze_count() == 0
    with CollectionRecorder() as auto:
        base = _train(tmp_path, "auto", 0)
    assert gc.isenabled() and gc.get_freeze_count() == 0  # as before train()
    # the control: the recorder sees the automatic collector inside steps when it is on
    assert any(in_step for _, _, in_step, _ in auto.seen)
    with CollectionRecorder() as manual:
        sched = _train(tmp_path, "every2", 2)
    assert gc.isenabled() and gc.get_freeze_count() == 0
    # none inside a step; full collections after steps 2 and 4 (0-based 1 and 3), one each
    assert not any(in_step for _, _, in_step, _ in manual.seen)
    assert [(gen, step) for gen, step, _, scheduled in manual.seen if scheduled] == [(2, 1), (2, 3)]
    assert sched.summary["gc_collections"] == 2
    assert sched.losses == base.losses and sched.grad_norms == base.grad_norms  # bit-identical


class _Cycle:
    def __init__(self):
        self.me = self


def test_cycles_a_step_leaves_live_at_most_the_interval(tmp_path, monkeypatch):
    """Each step leaves one reference cycle (only the collector frees it): with the automatic collector off, the
    schedule must free them every 3 steps, or they would pile up for the whole run."""
    alive: weakref.WeakSet = weakref.WeakSet()
    counts: list[int] = []
    build = trainer.build_engine

    def leaky_engine(*args, **kwargs):
        engine = build(*args, **kwargs)
        step = engine.train_step

        def train_step(*a, **k):
            counts.append(len(alive))  # cycles still alive when this step starts
            alive.add(_Cycle())
            return step(*a, **k)
        engine.train_step = train_step
        return engine

    monkeypatch.setattr(trainer, "build_engine", leaky_engine)
    _train(tmp_path, "leaky", 3, steps=8)
    assert counts == [0, 1, 2, 0, 1, 2, 0, 1]


def test_start_collects_freezes_and_close_restores():
    """In a dist-train process (its heap frozen before): the start collects, freezes and close keeps the freeze; the
    collector's on/off state restored either way."""
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        garbage = _Cycle()
        probe = weakref.ref(garbage)
        del garbage
        kept = _Cycle()  # what the build made and training holds: frozen (no longer in any generation the collector walks)
        assert any(o is kept for o in gc.get_objects())
        s = GcSchedule.start(0)
        assert probe() is None and s.collected_at_start > 0  # the build's garbage freed before the freeze
        assert not any(o is kept for o in gc.get_objects())
        # (no count compared: frozen objects freed by reference counting meanwhile, the start's own temporaries, lower it)
        assert s.frozen > 0 and not gc.isenabled()  # 0 leaves the caller's choice
        s.close()
        assert not any(o is kept for o in gc.get_objects()) and not gc.isenabled()  # close keeps a rank's freeze
    finally:
        gc.unfreeze()
        gc.enable()
    s = GcSchedule.start(5)
    assert not gc.isenabled()
    assert [s.collect_if_due(n) for n in range(1, 11)] == [n % 5 == 0 for n in range(1, 11)]
    assert s.collections == 2 and "every 5 steps" in s.describe()
    s.close()
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_an_in_process_caller_s_heap_is_neither_collected_nor_frozen():
    """A test or notebook calling train() (nothing frozen): its heap is not dist-train's to walk or freeze."""
    gc.disable()
    try:
        garbage = _Cycle()
        probe = weakref.ref(garbage)
        del garbage
        s = GcSchedule.start(0)
        assert probe() is not None and s.collected_at_start == 0 and gc.get_freeze_count() == 0
        assert "left as it is" in s.describe()
        s.close()
        assert not gc.isenabled() and probe() is not None
    finally:
        gc.enable()
        gc.collect()


def test_a_resume_runs_the_configured_interval_at_global_steps_and_says_it_changed(tmp_path):
    """4 steps at gc_interval 3 (a collection after step 3), then a resume to 6 steps at gc_interval 2: the schedule
    counts global steps (a collection after step 6, none after 5), as an uninterrupted run at 2 would."""
    run = tmp_path / "r"
    first = train(tiny_gpt_config(run, steps=4, train={"gc_interval": 3}, checkpoint={"at_end": True}))
    assert first.summary["gc_collections"] == 1
    with CollectionRecorder() as seen:
        second = train(tiny_gpt_config(run, steps=6, train={"gc_interval": 2}))
    assert second.start_step == 4
    assert [step for _, step, _, scheduled in seen.seen if scheduled] == [5]  # 0-based: after global step 6
    assert "train.gc_interval 3 -> 2" in (run / "logs" / "rank_0.log").read_text()


def test_a_process_frozen_before_keeps_no_earlier_run_alive(tmp_path, capsys):
    """A dist-train rank's heap is frozen before train() (close leaves the freeze): a model, engine or batcher of an
    earlier train() in the same process must still be freed (by reference counting) once it returns."""
    gc.collect()
    gc.freeze()
    try:
        frozen = []
        for i in range(3):
            _train(tmp_path, f"run{i}", 2, steps=2)
            frozen.append(gc.get_freeze_count())
        assert gc.isenabled()
        assert abs(frozen[2] - frozen[1]) < 100, frozen  # the first run's first-use caches aside, nothing piles up
    finally:
        gc.unfreeze()


def test_the_start_s_line_goes_to_the_run_s_log_not_the_console(tmp_path, capsys):
    _train(tmp_path, "quiet", 0, steps=1)
    assert "gc: " in (tmp_path / "quiet" / "logs" / "rank_0.log").read_text()
    out = capsys.readouterr().out
    assert "done: loss" in out and "gc: " not in out  # the console still has rank 0's lines

"""``train()`` and ``evaluate_checkpoint()`` called in-process (a notebook, a test) leave their caller as they found
it: a DeepSpeed engine set up a one-rank gloo group and RANK / WORLD_SIZE / LOCAL_RANK for itself
(engines/deepspeed.py ``_ensure_process_group``) and both stayed behind, so a job the caller started next ran in that stale one-rank world. Checked here in the test
body: tests/conftest.py restores ``os.environ`` after every test, which would hide what they left."""
from __future__ import annotations

import gc
import json
import logging
import os
import weakref

import psutil
import pytest
import torch
import torch.distributed as dist
from deepspeed.runtime.zero import parameter_offload
from deepspeed.utils import groups as deepspeed_groups

from dist_train import checkpoint_eval, trainer as trainer_module
from dist_train.checkpoint import CheckpointError
from dist_train.checkpoint_eval import evaluate_checkpoint
from dist_train.distributed import caller_process_state, current_context
from dist_train.engines import build_engine
from dist_train.logs import LOGGER_NAME
from dist_train.trainer import train
from tests.trainer_utils import one_rank_engine_and_batches, tiny_gpt_config

ZERO1 = {"dp": 1, "zero_stage": 1}


def _rank_environment_unset(monkeypatch) -> None:
    """The caller's environment as a notebook's is: no rank variables (whatever an earlier test or launcher set)."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "DS_ACCELERATOR"):
        monkeypatch.delenv(key, raising=False)


def test_an_in_process_deepspeed_run_leaves_no_environment_and_no_process_group_behind(tmp_path, monkeypatch):
    """One rank, in-process, DeepSpeed ZeRO-1 on a tiny GPT: on return and on an error after the engine was built,
    the caller's os.environ is the same mapping and no process group is left (the engine's is destroyed); a
    second run in the same process trains the same losses on a group of its own."""
    _rank_environment_unset(monkeypatch)
    assert not dist.is_initialized()
    before = dict(os.environ)
    first = train(tiny_gpt_config(tmp_path / "a", steps=2, parallel=ZERO1, checkpoint={"at_end": False}))
    assert first.exit_code == 0 and len(first.losses) == 2
    # DeepSpeed's module-level mpu (our engine's, holding its groups) is the caller's again: a later
    # deepspeed.initialize of the caller's without an mpu would otherwise use our destroyed groups
    assert deepspeed_groups.mpu is None
    assert dict(os.environ) == before, {k: os.environ.get(k) for k in set(os.environ) ^ set(before)}
    assert not dist.is_initialized()

    again = train(tiny_gpt_config(tmp_path / "b", steps=2, parallel=ZERO1, checkpoint={"at_end": False}))
    assert again.losses == first.losses and not dist.is_initialized() and dict(os.environ) == before

    def refuse(*args, **kwargs):  # after the engine (its group, its environment) is set up
        assert dist.is_initialized() and os.environ["WORLD_SIZE"] == "1"
        raise ValueError("no data today")

    monkeypatch.setattr(trainer_module, "build_batcher", refuse)
    with pytest.raises(ValueError, match="no data today"):
        train(tiny_gpt_config(tmp_path / "c", steps=2, parallel=ZERO1, checkpoint={"at_end": False}))
    assert dict(os.environ) == before and not dist.is_initialized()


def test_a_process_group_the_caller_created_is_kept_and_its_environment_restored(tmp_path, monkeypatch):
    """A caller that made its own (one-rank) default group keeps it, the same group, after an in-process DeepSpeed
    run; the rank variables the engine set beside it are gone again."""
    _rank_environment_unset(monkeypatch)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        world = dist.group.WORLD
        before = dict(os.environ)
        result = train(tiny_gpt_config(tmp_path / "run", steps=1, parallel=ZERO1, checkpoint={"at_end": False}))
        assert result.exit_code == 0
        assert dist.is_initialized() and dist.group.WORLD is world
        assert dict(os.environ) == before
    finally:
        dist.destroy_process_group()


def test_the_callers_state_comes_back_whatever_the_block_changed(monkeypatch):
    """caller_process_state alone: keys added, changed and removed inside come back as they were (key by key), and
    a group created inside is destroyed, on an exception too."""
    monkeypatch.setenv("DIST_TRAIN_KEPT", "1")
    monkeypatch.setenv("DIST_TRAIN_CHANGED", "before")
    monkeypatch.delenv("DIST_TRAIN_ADDED", raising=False)
    before = dict(os.environ)
    with pytest.raises(RuntimeError), caller_process_state():
        os.environ["DIST_TRAIN_ADDED"] = "x"
        os.environ["DIST_TRAIN_CHANGED"] = "after"
        del os.environ["DIST_TRAIN_KEPT"]
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        raise RuntimeError("stop")
    assert dict(os.environ) == before and not dist.is_initialized()


def test_an_in_process_deepspeed_evaluation_leaves_no_environment_and_no_process_group_behind(tmp_path, monkeypatch):
    """``evaluate_checkpoint`` in-process on one rank, DeepSpeed ZeRO-1: its forward-only engine's one-rank group and
    rank variables are gone on return (the loss is the one the run logged) and on an error after the engine was
    built; the group stayed behind before."""
    _rank_environment_unset(monkeypatch)
    cfg = tiny_gpt_config(tmp_path / "run", steps=1, parallel=ZERO1, train={"eval_every": 1, "eval_steps": 1},
                          checkpoint={"at_end": True})
    train(cfg)
    logged = [r["valid_loss"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
              if "valid_loss" in r]
    before = dict(os.environ)
    assert not dist.is_initialized()
    step = tmp_path / "run" / "checkpoints" / "step_1"
    assert evaluate_checkpoint(cfg, step, current_context())["loss"] == logged[-1]
    assert dict(os.environ) == before, {k: os.environ.get(k) for k in set(os.environ) ^ set(before)}
    assert not dist.is_initialized()

    def refuse(*args, **kwargs):  # after the engine (its group, its environment) is set up
        assert dist.is_initialized() and os.environ["WORLD_SIZE"] == "1"
        raise ValueError("no held-out data today")

    monkeypatch.setattr(checkpoint_eval, "Evaluator", refuse)
    with pytest.raises(ValueError, match="no held-out data today"):
        evaluate_checkpoint(cfg, step, current_context())
    assert dict(os.environ) == before and not dist.is_initialized()


def _listening() -> set:
    """(ip, port) of every TCP socket this process listens on (tests/test_launch_listen.py's check)."""
    return {(c.laddr.ip, c.laddr.port) for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.pid == os.getpid()}


def _record_engines(monkeypatch, module) -> list:
    """Weak references to what every ``build_engine`` of ``module`` (the trainer, the evaluation) builds: our engine,
    and DeepSpeed's engine inside it where there is one (``close()`` drops the engine's own reference to it)."""
    built = []

    def recording(*args, **kwargs):
        engine = build_engine(*args, **kwargs)
        built.append(weakref.ref(engine))
        if hasattr(engine, "engine"):
            built.append(weakref.ref(engine.engine))
        return engine

    monkeypatch.setattr(module, "build_engine", recording)
    return built


def _released(built: list, listening_before: set) -> None:
    """Every recorded engine is collected and this process listens on nothing new (a live one-rank gloo group
    would: its loopback socket)."""
    gc.collect()
    assert built and [ref() for ref in built if ref() is not None] == []
    assert _listening() - listening_before == set()


def test_an_in_process_deepspeed_run_releases_its_engine(tmp_path, monkeypatch):
    """ZeRO-1 on one rank, in-process: on return and on an error after the engine was built, DeepSpeed's
    engine (its model, fp32 master copy, optimizer state, groups) is gone after a gc.collect() and its gloo group's
    listening socket closed. Its ZeRO optimizer's hooks on the parameters (cycles through C++ autograd nodes) kept
    it alive for the life of the process before (engines/deepspeed.py close)."""
    _rank_environment_unset(monkeypatch)
    listening = _listening()
    built = _record_engines(monkeypatch, trainer_module)
    parallel = ZERO1
    result = train(tiny_gpt_config(tmp_path / "a", steps=2, parallel=parallel, checkpoint={"at_end": False}))
    assert result.exit_code == 0 and len(result.losses) == 2 and len(built) == 2
    _released(built, listening)

    def refuse(*args, **kwargs):
        raise ValueError("no data today")

    monkeypatch.setattr(trainer_module, "build_batcher", refuse)
    with pytest.raises(ValueError, match="no data today"):
        train(tiny_gpt_config(tmp_path / "b", steps=2, parallel=parallel, checkpoint={"at_end": False}))
    assert len(built) == 4
    _released(built, listening)


def test_an_in_process_deepspeed_evaluation_releases_its_engine(tmp_path, monkeypatch):
    """``evaluate_checkpoint`` in-process under ZeRO-1 (a stage-0 forward engine, no ZeRO optimizer: collected before
    ``close()`` too): its forward-only engine is gone after a gc.collect(), its socket closed."""
    _rank_environment_unset(monkeypatch)
    cfg = tiny_gpt_config(tmp_path / "run", steps=1, parallel=ZERO1,
                          train={"eval_every": 1, "eval_steps": 1}, checkpoint={"at_end": True})
    train(cfg)
    gc.collect()
    listening = _listening()
    built = _record_engines(monkeypatch, checkpoint_eval)
    result = evaluate_checkpoint(cfg, tmp_path / "run" / "checkpoints" / "step_1", current_context())
    assert result["step"] == 1 and len(built) == 2
    _released(built, listening)


def test_in_process_zero3_training_and_evaluation_release_their_engines(tmp_path, monkeypatch):
    """ZeRO-3 on one rank, in-process: the training engine and then the evaluation's forward-only engine are gone
    after a gc.collect(), their gloo groups' sockets closed. DeepSpeed's ZeRO-3 keeps the model in module-level
    state that ``destroy()`` leaves (a forward-module stack, a class-level lru_cache of its coordinator), and the
    model's hooks hold the engine: both stayed for the life of the process before (engines/deepspeed.py
    ``release_zero3_globals``)."""
    _rank_environment_unset(monkeypatch)
    listening = _listening()
    linear = torch.nn.functional.linear
    trained = _record_engines(monkeypatch, trainer_module)
    cfg = tiny_gpt_config(tmp_path / "run", steps=1, parallel={"dp": 1, "zero_stage": 3},
                          train={"eval_every": 1, "eval_steps": 1}, checkpoint={"at_end": True})
    result = train(cfg)
    assert result.exit_code == 0 and len(trained) == 2
    # the engine build swapped it for DeepSpeed's zero3_linear_wrap for the life of the process: set back
    assert torch.nn.functional.linear is linear
    _released(trained, listening)
    evaluated = _record_engines(monkeypatch, checkpoint_eval)
    logged = [r["valid_loss"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
              if "valid_loss" in r]
    step = tmp_path / "run" / "checkpoints" / "step_1"
    assert evaluate_checkpoint(cfg, step, current_context())["loss"] == logged[-1] and len(evaluated) == 2
    assert torch.nn.functional.linear is linear
    _released(evaluated, listening)


def test_closing_a_zero3_engine_leaves_another_live_one_training_as_a_lone_one():
    """Two ZeRO-3 engines in one process (one rank): closing one (``release_zero3_globals`` clears DeepSpeed's
    class-level lru_cache of release sets, every coordinator's, and takes that engine's modules off the forward-module
    stack) leaves the other on the stack, and its steps before and after equal a lone engine's bit for bit: the
    other's release sets are recomputed from its coordinator's trace, as DeepSpeed computed them."""
    zero3 = {"dp": 1, "zero_stage": 3}
    with caller_process_state():
        alone, micro = one_rank_engine_and_batches("gpt", "cpu", accumulation=2, parallel=zero3)
        want = [alone.train_step(micro, 32.0) for _ in range(4)]
        alone.close()
        kept, _ = one_rank_engine_and_batches("gpt", "cpu", accumulation=2, parallel=zero3)
        got = [kept.train_step(micro, 32.0) for _ in range(2)]  # its trace complete, its release sets cached
        closed, _ = one_rank_engine_and_batches("gpt", "cpu", accumulation=2, parallel=zero3)
        closed.train_step(micro, 32.0)
        closed_module = closed.engine.module
        closed.close()
        on_stack = [id(m) for m in parameter_offload.FWD_MODULE_STACK]
        assert id(kept.engine.module) in on_stack and id(closed_module) not in on_stack
        got += [kept.train_step(micro, 32.0) for _ in range(2)]
        kept.close()
    assert got == want


def test_an_in_process_ddp_run_is_released_as_before(tmp_path, monkeypatch):
    """The DDP engine's ``close()`` releases nothing: its engine is collected as it always was, and the run trains
    the same losses as a second one."""
    _rank_environment_unset(monkeypatch)
    listening = _listening()
    built = _record_engines(monkeypatch, trainer_module)
    first = train(tiny_gpt_config(tmp_path / "a", steps=2, checkpoint={"at_end": False}))
    again = train(tiny_gpt_config(tmp_path / "b", steps=2, checkpoint={"at_end": False}))
    assert first.exit_code == 0 and first.losses == again.losses and len(built) == 2
    _released(built, listening)


class _Records(logging.Handler):
    """A caller's own handler on the ``dist_train`` logger: keeps the messages it is given."""

    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_the_callers_dist_train_logger_comes_back_and_the_runs_log_is_closed(tmp_path):
    """On return and on error: the caller's handlers (not closed), level and propagation are the logger's again, the
    run's rank_0.log is closed (no descriptor of this process on it), and a later record reaches the caller's
    handler, not the finished run's log."""
    log = logging.getLogger(LOGGER_NAME)
    mine = _Records()
    saved = list(log.handlers), log.level, log.propagate
    log.handlers, log.level, log.propagate = [mine], logging.WARNING, True
    try:
        for name, steps in (("ok", 1), ("bad", 0)):
            run_dir = tmp_path / name
            cfg = tiny_gpt_config(run_dir, steps=1, checkpoint={"at_end": False})
            if steps:
                train(cfg)
            else:  # fails after the logger was set up for the run: an unreadable checkpoint to resume from
                (run_dir / "checkpoints" / "step_1").mkdir(parents=True)
                (run_dir / "checkpoints" / "step_1" / "manifest.json").write_text("{")
                with pytest.raises(CheckpointError, match="no valid checkpoint"):
                    train(cfg)
            assert (log.handlers, log.level, log.propagate) == ([mine], logging.WARNING, True), name
            rank_log = run_dir / "logs" / "rank_0.log"
            assert rank_log.stat().st_size > 0, name
            assert not [f for f in psutil.Process().open_files() if f.path == str(rank_log)], name
            size = rank_log.stat().st_size
            log.warning(f"after the {name} run")
            assert mine.messages[-1] == f"after the {name} run" and rank_log.stat().st_size == size, name
    finally:
        log.handlers, log.level, log.propagate = saved

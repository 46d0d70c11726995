"""Checkpoint housekeeping (issue 13.8): a kill while pruning never leaves a half-deleted ``step_N``; a full
disk while rewriting ``latest`` leaves the committed checkpoint committed, ``latest`` intact and no temp file;
re-signed metadata that the allow-list unpickler refuses fails verification and auto-resume falls back."""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import pickle
import shutil
from pathlib import Path
from typing import Iterator

import pytest
import torch

from dist_train.checkpoint import CheckpointError, CheckpointManager, complete_checkpoints, verify_checkpoint
from dist_train.checkpoint import manager as manager_mod
from dist_train.checkpoint import storage
from dist_train.checkpoint.cli import verify as cli_verify
from dist_train.checkpoint.manifest import list_checkpoints, read_latest
from tests.test_ckpt_common import (CkptCfg, build, eval_outputs, flip_byte, model_config, seed_rank, shard_files,
                                   train_steps)
from tests.test_divergence import resign


@contextlib.contextmanager
def killed_after_the_swap(monkeypatch) -> Iterator[None]:
    """The block's save is killed (a KeyboardInterrupt standing for SIGKILL) right after the manager moved the
    checkpoint it replaces aside to ``step_N.replaced…``, before the new one took its name; expected."""
    real_replace = manager_mod.os.replace

    def killed_after_swap(src, dst):
        real_replace(src, dst)
        if ".replaced" in str(dst):
            raise KeyboardInterrupt

    monkeypatch.setattr(manager_mod.os, "replace", killed_after_swap)
    with pytest.raises(KeyboardInterrupt):
        yield
    monkeypatch.setattr(manager_mod.os, "replace", real_replace)


def _mgr(root: Path, **kw) -> CheckpointManager:
    return CheckpointManager(CkptCfg(dir=str(root), **kw), run_dir=root, config=model_config(),
                             layout={"dp": 1, "world_size": 1})


def _saver(root: Path, **kw):
    seed_rank(0)
    model, opt, sched = build()
    mgr = _mgr(root, **kw)

    def save(step: int):
        train_steps(model, opt, sched, step, step)
        mgr.save(step, model, opt, sched, extra={"step": step, "consumed_samples": 6 * step})
        return eval_outputs(model)
    return save


def test_kill_while_pruning_leaves_no_half_deleted_checkpoint(tmp_path, monkeypatch, capsys):
    root = tmp_path / "ckpt"
    save = _saver(root, keep_last=2)
    save(1)
    save(2)
    real_rmtree = manager_mod.shutil.rmtree

    def killed_midway(path, ignore_errors=False):
        path = Path(path)
        victim = sorted(p for p in path.rglob("*") if p.is_file())[0]
        victim.unlink()  # some files are gone when the "kill" arrives
        raise KeyboardInterrupt  # stands for SIGKILL: nothing after this point runs

    monkeypatch.setattr(manager_mod.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        save(3)  # commits step_3, then prunes step_1 and is killed inside the delete
    monkeypatch.setattr(manager_mod.shutil, "rmtree", real_rmtree)
    assert (root / "step_1.deleting").is_dir() and not (root / "step_1").exists()
    assert [p.name for _, p in list_checkpoints(root)] == ["step_3", "step_2"]
    assert cli_verify(root) == 0, capsys.readouterr().out  # every step_N verifies; the leftover is no checkpoint
    out4 = save(4)  # the next prune removes the leftover
    assert not list(root.glob("*.deleting")) and [p.name for _, p in list_checkpoints(root)] == ["step_4", "step_3"]
    fresh = build(seed=9)
    assert _mgr(root).resume(*fresh)["step"] == 4 and torch.equal(eval_outputs(fresh[0]), out4)


def test_disk_full_while_rewriting_latest_keeps_the_committed_checkpoint(tmp_path, monkeypatch, caplog):
    root = tmp_path / "ckpt"
    save = _saver(root)
    save(1)
    real_fsync = storage.os.fsync

    def full_for_latest(fd):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(".latest."):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(storage.os, "fsync", full_for_latest)
    with caplog.at_level(logging.WARNING, logger="dist_train.checkpoint"):
        out2 = save(2)  # no exception: the checkpoint is committed
    monkeypatch.undo()
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(said) == 1 and "step_2 is committed, but rewriting" in said[0] and "No space left" in said[0] \
        and "still names step_1" in said[0], said
    assert read_latest(root) == "step_1" and not list(root.glob(".latest.*.tmp"))
    assert [p.name for _, p in complete_checkpoints(root)] == ["step_2", "step_1"]
    assert not verify_checkpoint(root / "step_2")
    fresh = build(seed=9)
    assert _mgr(root).resume(*fresh)["step"] == 2 and torch.equal(eval_outputs(fresh[0]), out2)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_resigned_refused_metadata_fails_verify_and_auto_falls_back(tmp_path, caplog, capsys):
    root = tmp_path / "ckpt"
    save = _saver(root)
    out2 = save(2)
    save(4)
    (root / "step_4" / ".metadata").write_bytes(pickle.dumps(_Evil()))
    resign(root / "step_4")  # checksums match the evil bytes: only the unpickler can tell
    problems = verify_checkpoint(root / "step_4")
    assert len(problems) == 1 and "builtins.print' is not allowed" in problems[0], problems
    assert cli_verify(root) == 1 and "BAD" in capsys.readouterr().out
    with caplog.at_level(logging.WARNING, logger="dist_train.checkpoint"):
        fresh = build(seed=9)
        assert _mgr(root).resume(*fresh)["step"] == 2
    assert torch.equal(eval_outputs(fresh[0]), out2)
    assert any("step_4 failed verification" in r.getMessage() and "falling back to step_2" in r.getMessage()
               for r in caplog.records)
    with pytest.raises(CheckpointError, match="not allowed"):
        _mgr(root, resume=str(root / "step_4")).resume(*build(seed=9))


def test_a_fresh_run_into_a_checkpoint_dir_with_checkpoints_is_refused_and_touches_nothing(tmp_path):
    """resume: none beside an earlier run's checkpoints would prune them (keep_last counts both runs) or replace
    the step both reach, and its own first saves would be pruned at once as the oldest: refused, one line."""
    root = tmp_path / "ckpt"
    save = _saver(root, keep_last=2)
    save(10)
    save(20)
    before = {p.name: p.stat().st_mtime_ns for p in root.iterdir()}
    fresh = build(seed=9)
    with pytest.raises(CheckpointError, match=r"checkpoint.resume = none, but .*ckpt holds checkpoints \(step_20, "
                                              r"step_10\)") as e:
        _mgr(root, resume="none", keep_last=2).resume(*fresh)
    assert "\n" not in str(e.value) and e.value.exit_code == 2
    assert {p.name: p.stat().st_mtime_ns for p in root.iterdir()} == before
    empty = tmp_path / "empty"
    assert _mgr(empty, resume="none").resume(*fresh) is None  # nothing there: a fresh start


def test_a_resume_path_older_than_the_newest_checkpoint_there_is_refused(tmp_path):
    """A roll-back (resume: PATH at step 10) beside step_20/step_30 of the abandoned run: every restart resumes
    with resume: auto, which takes the newest, so a crash would silently continue the abandoned run (and its
    saves would replace this run's steps). Refused in one line; with them moved away it goes ahead."""
    root = tmp_path / "ckpt"
    save = _saver(root, keep_last=3)
    save(10)
    save(20)
    save(30)
    model, opt, sched = build(seed=9)
    with pytest.raises(CheckpointError, match=r"checkpoint.resume = .*step_10 is at step 10, but .*ckpt holds newer "
                                              r"checkpoints \(step_30, step_20\)") as e:
        _mgr(root, resume=str(root / "step_10"), keep_last=1).resume(model, opt, sched)
    assert "\n" not in str(e.value) and e.value.exit_code == 2
    assert [p.name for _, p in complete_checkpoints(root)] == ["step_30", "step_20", "step_10"]
    for name in ("step_30", "step_20"):
        (root / name).rename(tmp_path / name)
    mgr = _mgr(root, resume=str(root / "step_10"), keep_last=1)
    assert mgr.resume(model, opt, sched)["step"] == 10


def test_the_checkpoint_just_committed_is_never_pruned(tmp_path):
    """keep_last=1 and a save below the newest step (saved by hand, ckpt convert, a second manager): it must not
    be deleted as it commits."""
    root = tmp_path / "ckpt"
    save = _saver(root, keep_last=3)
    save(10)
    save(30)
    model, opt, sched = build(seed=9)
    assert _mgr(root, keep_last=1).save(15, model, opt, sched, extra={"step": 15, "consumed_samples": 90})
    assert [p.name for _, p in complete_checkpoints(root)] == ["step_30", "step_15"]


def test_kill_between_the_two_renames_of_a_resaved_step_loses_neither(tmp_path, monkeypatch):
    """Re-saving step_N (a second manager saving the same step) swaps step_N aside, then renames step_N.tmp in:
    a kill between the two renames leaves no step_N. The next start puts the old one back instead of resuming
    from an older step and deleting it as a leftover."""
    root = tmp_path / "ckpt"
    save = _saver(root, keep_last=3)
    save(10)
    out20 = save(20)
    model, opt, sched = build(seed=9)
    mgr = _mgr(root, keep_last=3)
    with killed_after_the_swap(monkeypatch):  # right after step_20 was moved aside
        mgr.save(20, model, opt, sched, extra={"step": 20, "consumed_samples": 120})
    assert not (root / "step_20").exists()
    fresh = build(seed=5)
    assert _mgr(root).resume(*fresh)["step"] == 20 and torch.equal(eval_outputs(fresh[0]), out20)
    assert not list(root.glob("step_20.replaced*"))


def test_a_leftover_of_a_committed_re_save_never_comes_back_as_a_pruned_step(tmp_path):
    """A re-save of step_10 committed, then was killed before deleting the old one (step_10.replaced<pid>, or
    step_10.replaced<pid>.deleting mid-delete). Once step_10 is pruned, that leftover is an older lineage's
    step 10, not an interrupted re-save: it is deleted, never renamed back to step_10."""
    root = tmp_path / "ckpt"
    save = _saver(root, keep_last=1)
    save(10)
    shutil.copytree(root / "step_10", root / "step_10.replaced4242")
    shutil.copytree(root / "step_10", root / "step_10.replaced4343.deleting")
    save(20)  # prunes step_10
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("step_")) == ["step_20"]


def _names(root: Path) -> list[str]:
    return [p.name for _, p in list_checkpoints(root)]


def _files(ckpt: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in ckpt.iterdir()}


@pytest.mark.parametrize("damage", ["unfinished", "shard"])
@pytest.mark.parametrize("resume", ["auto", "dir"])
def test_a_damaged_newest_checkpoint_resumes_the_newest_good_one_and_no_good_one_is_lost(tmp_path, caplog, monkeypatch,
                                                                                        damage, resume):
    """step_30 damaged (never finished: no manifest; or a flipped shard byte). ``resume: auto`` and ``resume: DIR``
    (the checkpoint dir itself) both resume step_20 with one warning line naming both. The run then goes on:
    keep_last counts only good checkpoints (a damaged step_30 would otherwise take a slot and step_22 be
    pruned); the damaged one is left untouched; a kill while re-saving step 30 brings the damaged one back and
    the restart falls back to step_23; the re-save of step 30 replaces it."""
    root = tmp_path / "ckpt"
    save = _saver(root, keep_last=3)
    save(10)
    out20 = save(20)
    save(30)
    if damage == "unfinished":
        (root / "step_30" / "manifest.json").unlink()
    else:
        flip_byte(shard_files(root / "step_30")[0])
    damaged = _files(root / "step_30")
    mode = "auto" if resume == "auto" else str(root)
    model, opt, sched = build(seed=9)
    mgr = _mgr(root, resume=mode, keep_last=2)
    with caplog.at_level(logging.WARNING, logger="dist_train.checkpoint"):
        assert mgr.resume(model, opt, sched)["step"] == 20
    assert torch.equal(eval_outputs(model), out20)
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(said) == 1 and "step_30 failed verification" in said[0] and "falling back to step_20" in said[0], said

    def run_to(last: int, step_from: int) -> torch.Tensor:
        for step in range(step_from, last + 1):
            train_steps(model, opt, sched, step, step)
            if step in (21, 22, 23, 30):
                mgr.save(step, model, opt, sched, extra={"step": step, "consumed_samples": 6 * step})
        return eval_outputs(model)

    out23 = run_to(23, 21)
    # keep_last=2 good ones (23, 22), the one resumed from (20); the damaged step_30 untouched
    assert _names(root) == ["step_30", "step_23", "step_22", "step_20"]
    assert _files(root / "step_30") == damaged
    with killed_after_the_swap(monkeypatch):  # right after the damaged step_30 was moved aside
        run_to(30, 24)
    restart = build(seed=5)
    again = _mgr(root, resume=mode, keep_last=2)
    assert again.resume(*restart)["step"] == 23 and torch.equal(eval_outputs(restart[0]), out23)
    assert _files(root / "step_30") == damaged and _names(root) == ["step_30", "step_23", "step_22", "step_20"]
    model, opt, sched = restart
    mgr = again
    run_to(30, 24)
    assert not verify_checkpoint(root / "step_30") and _names(root) == ["step_30", "step_23"]

"""Damaged checkpoints, checksum records written before XXH3-64 (CRC-32) or that cannot vouch for their
file, failing disks and pruning (one process, no process group)."""
from __future__ import annotations

import errno
import json
import logging
import zlib
from pathlib import Path

import pytest
import torch

from dist_train.checkpoint import CheckpointError, CheckpointManager, complete_checkpoints, verify_checkpoint
from dist_train.checkpoint import blockio, storage
from dist_train.checkpoint import manifest as mf
from dist_train.checkpoint.manager import CheckpointDamaged
from dist_train.checkpoint.manifest import MANIFEST, read_latest, read_manifest, write_manifest
from dist_train.lifecycle import EXIT_DAMAGED, EXIT_FAILED, EXIT_PREEMPTED, EXIT_USAGE, FAULT_ENV, read_heartbeat
from dist_train.trainer import train
from tests.trainer_utils import tiny_gpt_config
from tests.test_ckpt_common import (CkptCfg, build, eval_outputs, flip_byte, model_config, seed_rank, shard_files,
                                    train_steps)


def _mgr(root: Path, **kw) -> CheckpointManager:
    return CheckpointManager(CkptCfg(dir=str(root), **kw), run_dir=root, config=model_config(),
                             layout={"dp": 1, "world_size": 1})


def _train_and_save(root: Path, steps=(2, 4), **kw):
    """Save at each of ``steps``; return {step: outputs on the fixed batch at that step}."""
    seed_rank(0)
    model, opt, sched = build()
    mgr = _mgr(root, **kw)
    outs, done = {}, 0
    for step in steps:
        train_steps(model, opt, sched, done + 1, step)
        done = step
        mgr.save(step, model, opt, sched, extra={"step": step, "consumed_samples": 6 * step})
        outs[step] = eval_outputs(model)
    mgr.close()
    return outs


def _resume(root: Path, **kw):
    model, opt, sched = build(seed=9)
    extra = _mgr(root, **kw).resume(model, opt, sched)
    return extra, model


@pytest.mark.parametrize("damage", ["flip", "missing", "truncated_manifest", "flip_manifest_value"])
def test_damaged_newest_checkpoint_is_refused_and_auto_falls_back(tmp_path, damage, caplog):
    root = tmp_path / "ckpt"
    outs = _train_and_save(root)
    newest = root / "step_4"
    shard = shard_files(newest)[0]
    if damage == "flip":
        flip_byte(shard, offset=shard.stat().st_size - 200)  # inside the last tensor's data
        expect = [shard.name, "xxh3_64 checksum mismatch", "tensor"]
    elif damage == "missing":
        shard.unlink()
        expect = [shard.name, "missing"]
    elif damage == "truncated_manifest":
        data = (newest / MANIFEST).read_bytes()
        (newest / MANIFEST).write_bytes(data[: len(data) // 2])
        expect = [MANIFEST, "truncated"]
    else:
        text = (newest / MANIFEST).read_text().replace('"step": 4', '"step": 5', 1)
        (newest / MANIFEST).write_text(text)
        expect = [MANIFEST, "checksum mismatch"]
    problems = verify_checkpoint(newest)
    assert problems and all(e in problems[0] for e in expect), problems
    assert not verify_checkpoint(root / "step_2")

    # an explicit PATH must verify: refused, naming the file
    with pytest.raises((CheckpointError, ValueError)) as info:
        _resume(root, resume=str(newest))
    assert expect[0] in str(info.value)

    # auto: falls back to step_2 with one warning line naming the problem
    with caplog.at_level(logging.WARNING, logger="dist_train.checkpoint"):
        extra, model = _resume(root, resume="auto")
    assert extra["step"] == 2 and torch.equal(eval_outputs(model), outs[2])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "step_4" in warnings[0] and "falling back to step_2" in warnings[0], warnings
    assert expect[0] in warnings[0]


def _rewrite_records(ckpt: Path, change) -> dict:
    """Replace every file record of ``ckpt``'s manifest by ``change(name, record, file bytes)`` (the manifest
    self-checksum is recomputed, as a writer of that format would have); returns the original records."""
    body = read_manifest(ckpt)
    original = dict(body["files"])
    body["files"] = {n: change(n, r, (ckpt / n).read_bytes()) for n, r in original.items()}
    write_manifest(ckpt, body)
    return original


def _crc32_record(name: str, rec: dict, data: bytes) -> dict:
    """The record format of checkpoints written before XXH3-64, computed here with zlib (not our code)."""
    b = rec["block"]
    return {"bytes": rec["bytes"], "block": b,
            "crc32": [f"{zlib.crc32(data[i:i + b]):08x}" for i in range(0, len(data), b)]}


def test_crc32_records_still_verify_and_unusable_records_are_refused(tmp_path):
    root = tmp_path / "ckpt"
    outs = _train_and_save(root, steps=(2,))
    ckpt = root / "step_2"
    assert {r["checksum"] for r in read_manifest(ckpt)["files"].values()} == {"xxh3_64"}
    _rewrite_records(ckpt, _crc32_record)
    assert not verify_checkpoint(ckpt)
    extra, model = _resume(root, resume=str(ckpt))  # shards checked with CRC-32 while reading
    assert extra["step"] == 2 and torch.equal(eval_outputs(model), outs[2])

    shard = shard_files(ckpt)[0]
    flip_byte(shard, offset=shard.stat().st_size - 200)
    problems = verify_checkpoint(ckpt)
    assert len(problems) == 1 and shard.name in problems[0] and "crc32 checksum mismatch" in problems[0], problems
    assert "tensor" in problems[0], problems
    with pytest.raises(CheckpointError, match=f"{shard.name}: crc32 checksum mismatch.*tensors? stored there"):
        _resume(root, resume=str(ckpt))
    flip_byte(shard, offset=shard.stat().st_size - 200)  # undo: valid again
    assert not verify_checkpoint(ckpt)

    # a record that cannot vouch for its file (unknown algorithm, too few digests, no digests) is a problem
    # naming the file, for the shard (verified while loading) and for small files alike; never skipped
    bad_records = {
        "not supported": lambda n, r, d: {"bytes": r["bytes"], "block": r["block"], "checksum": "sha1",
                                          "digests": r["crc32"]} if n == shard.name else r,
        "digests for": lambda n, r, d: {**r, "crc32": r["crc32"][:-1]} if n == "train_state.json" else r,
        "no digests": lambda n, r, d: {"bytes": r["bytes"], "block": r["block"]} if n == shard.name else r,
    }
    for needle, change in bad_records.items():
        original = _rewrite_records(ckpt, change)
        bad = shard.name if needle != "digests for" else "train_state.json"
        problems = verify_checkpoint(ckpt)
        assert len(problems) == 1 and bad in problems[0] and needle in problems[0], (needle, problems)
        with pytest.raises(CheckpointError, match=f"{bad}: manifest record: .*{needle}"):
            _resume(root, resume=str(ckpt))
        _rewrite_records(ckpt, lambda n, r, d: original[n])
    assert not verify_checkpoint(ckpt)


def test_all_checkpoints_bad_is_an_error_not_a_fresh_start(tmp_path):
    root = tmp_path / "ckpt"
    _train_and_save(root, steps=(2,))
    shard_files(root / "step_2")[0].unlink()
    with pytest.raises(CheckpointError, match="no valid checkpoint"):
        _resume(root, resume="auto")
    with pytest.raises(CheckpointError, match="checkpoint.resume = none, but .* holds checkpoints"):
        _resume(root, resume="none")  # a fresh start would prune them: they must be moved away first
    (root / "step_2").rename(tmp_path / "step_2.damaged")
    extra, _ = _resume(root, resume="none")
    assert extra is None


def _tree_bytes(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("damage", ["flip", "missing", "nan"])
def test_every_checkpoint_damaged_is_not_restartable_and_left_untouched(tmp_path, damage):
    """Content damage is persistent: a restart re-reads the same bytes, so the resume's error carries its own
    exit code (the supervisor does not restart it), tells the user what to do, and deletes or rewrites nothing."""
    root = tmp_path / "ckpt"
    _train_and_save(root)
    for step in (2, 4):
        shard = shard_files(root / f"step_{step}")[0]
        if damage == "flip":
            flip_byte(shard, offset=shard.stat().st_size - 200)
        elif damage == "missing":
            shard.unlink()
        else:  # a checkpoint saved before non-finite states were refused: valid checksums over NaN weights
            body = read_manifest(root / f"step_{step}")
            data = bytearray(shard.read_bytes())
            data[-8:] = bytes(torch.full((2,), float("nan")).view(torch.uint8).numpy())
            shard.write_bytes(bytes(data))
            body["files"][shard.name] = storage.file_block_digests(shard)
            write_manifest(root / f"step_{step}", body)
    before = _tree_bytes(root)
    for mode in ("auto", str(root / "step_4")):
        with pytest.raises(CheckpointDamaged) as info:
            _resume(root, resume=mode)
        assert info.value.exit_code == EXIT_DAMAGED and EXIT_DAMAGED not in (EXIT_FAILED, EXIT_USAGE)
        line = str(info.value)
        assert "\n" not in line and "step_4" in line and "left untouched" in line, line
        assert ("move the damaged step_N" in line and "run.dir" in line) if mode == "auto" else (
            "set checkpoint.resume to another checkpoint" in line), line
    assert _tree_bytes(root) == before


def _eio_reading(ckpt: Path, monkeypatch) -> None:
    """Every checksum read of a file under ``ckpt`` fails with EIO (an NFS server going away)."""
    real = mf.file_block_digests

    def flaky(path, *a, **kw):
        if Path(path).parent == ckpt:
            raise OSError(errno.EIO, "Input/output error", str(path))
        return real(path, *a, **kw)

    monkeypatch.setattr(mf, "file_block_digests", flaky)


def test_transient_io_error_is_restartable_and_does_not_fall_back(tmp_path, monkeypatch):
    """An I/O error (EIO, ESTALE) may be gone on a restart: the resume neither falls back past a checkpoint that
    may be good nor reports damage; it raises a plain (restartable) CheckpointError naming the file."""
    root = tmp_path / "ckpt"
    _train_and_save(root)
    _eio_reading(root / "step_4", monkeypatch)
    with pytest.raises(CheckpointError) as info:
        _resume(root, resume="auto")
    assert not isinstance(info.value, CheckpointDamaged)
    assert getattr(info.value, "exit_code", EXIT_FAILED) == EXIT_FAILED
    assert "step_4" in str(info.value) and "Input/output error" in str(info.value), info.value
    monkeypatch.undo()
    extra, _ = _resume(root, resume="auto")  # the error went away: the newest checkpoint, nothing lost
    assert extra["step"] == 4


def test_manifest_read_io_error_is_transient_but_bad_json_is_damage(tmp_path, monkeypatch):
    root = tmp_path / "ckpt"
    _train_and_save(root, steps=(2,))
    ckpt = root / "step_2"
    real = Path.read_text

    def stale(self, *a, **kw):
        if self.name == MANIFEST:
            raise OSError(errno.ESTALE, "Stale file handle", str(self))
        return real(self, *a, **kw)

    monkeypatch.setattr(Path, "read_text", stale)
    with pytest.raises(storage.CheckpointIOError, match="Stale file handle"):
        read_manifest(ckpt)
    with pytest.raises(CheckpointError) as info:
        _resume(root, resume="auto")
    assert not isinstance(info.value, CheckpointDamaged)
    monkeypatch.undo()
    (ckpt / MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable or truncated") as info:
        read_manifest(ckpt)
    assert not isinstance(info.value, storage.CheckpointIOError)
    with pytest.raises(CheckpointDamaged):
        _resume(root, resume="auto")


def _disk_full(*args):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("where", ["shards", "metadata"])
def test_disk_full_keeps_last_good_checkpoint(tmp_path, monkeypatch, caplog, where):
    root = tmp_path / "ckpt"
    outs = _train_and_save(root, steps=(2,))
    seed_rank(0)
    model, opt, sched = build()
    train_steps(model, opt, sched, 1, 3)
    if where == "shards":  # the raw shard bytes (positional writes on the I/O threads)
        monkeypatch.setattr(blockio.os, "pwrite", _disk_full)
    else:  # DCP's .metadata (written through the checksum stream)
        monkeypatch.setattr(storage._ChecksumStream, "write", _disk_full)

    stop = _mgr(root, on_error="stop")
    with pytest.raises(CheckpointError, match="save at step 3 failed.*No space left.*last good checkpoint: step_2"):
        stop.save(3, model, opt, sched)
    assert read_latest(root) == "step_2" and not list(root.glob("step_3*"))

    cont = _mgr(root, on_error="continue")
    with caplog.at_level(logging.WARNING, logger="dist_train.checkpoint"):
        assert cont.save(3, model, opt, sched) is False  # nothing was committed: no caller may count it
    assert cont.failed_saves == 1
    assert [r for r in caplog.records if "No space left" in r.getMessage() and "continuing" in r.getMessage()]

    # async: the failure surfaces at the next save / close, per on_error
    asyn = _mgr(root, on_error="stop", async_save=True)
    asyn.save(3, model, opt, sched)
    with pytest.raises(CheckpointError, match="No space left"):
        asyn.close()
    assert read_latest(root) == "step_2" and [p.name for _, p in complete_checkpoints(root)] == ["step_2"]
    assert not verify_checkpoint(root / "step_2")

    monkeypatch.undo()  # disk has space again: the same manager saves fine, then resume takes step_3
    assert cont.save(3, model, opt, sched) and read_latest(root) == "step_3"
    extra, loaded = _resume(root)
    assert extra["step"] == 3 and torch.equal(eval_outputs(loaded), eval_outputs(model))
    assert not torch.equal(outs[2], eval_outputs(model))


def test_keep_last_prunes_but_never_the_loaded_or_newest(tmp_path):
    root = tmp_path / "ckpt"
    _train_and_save(root, steps=(1, 2, 3, 4), keep_last=2)
    assert [p.name for _, p in complete_checkpoints(root)] == ["step_4", "step_3"]

    # resume from an older checkpoint explicitly (the newer one moved away: a restart would resume it), keep_last=1:
    # it stays while this run saves newer ones
    (root / "step_4").rename(tmp_path / "step_4")
    model, opt, sched = build()
    mgr = _mgr(root, keep_last=1, resume=str(root / "step_3"))
    assert mgr.resume(model, opt, sched)["step"] == 3
    for step in (5, 6):
        train_steps(model, opt, sched, step, step)
        mgr.save(step, model, opt, sched)
    assert [p.name for _, p in complete_checkpoints(root)] == ["step_6", "step_3"]
    assert read_latest(root) == "step_6"
    # a save at a step that is not newer than the newest complete one never removes the newest, nor itself
    mgr.save(1, model, opt, sched)
    names = [p.name for _, p in complete_checkpoints(root)]
    assert names == ["step_6", "step_3", "step_1"]
    # saving the step just loaded/saved again is a no-op
    assert mgr.save(1, model, opt, sched) is False


@pytest.mark.parametrize("async_save", [False, True])
def test_a_failed_stop_checkpoint_is_not_reported_as_saved(tmp_path, monkeypatch, capsys, async_save):
    """exit_interval (and preemption) save, then exit: with on_error=continue a failed save must not be followed
    by "checkpoint saved" (the next start resumes from the last good one, and the steps since are lost)."""
    monkeypatch.setattr(storage._ChecksumStream, "write", _disk_full)  # (os.pwrite would also fail run.lock)
    cfg = tiny_gpt_config(tmp_path / "run", steps=4, train={"exit_interval": 2},
                          checkpoint={"on_error": "continue", "async_save": async_save})
    assert train(cfg).exit_code == 0
    out = capsys.readouterr()
    text = out.out + out.err
    assert "checkpoint saved" not in text, text
    assert "exit_interval 2: the checkpoint of step 2 failed (see above): a restart resumes from scratch" in text
    assert not complete_checkpoints(tmp_path / "run" / "checkpoints")


def test_a_preempted_run_whose_only_save_failed_is_not_called_resumable(tmp_path, monkeypatch, capsys):
    """SIGTERM, and the preemption's save (the run's first) fails under on_error=continue: the run's last line (and so
    the launcher's, which looks for a committed checkpoint) says nothing can be resumed, not "preempted, resumable"."""
    monkeypatch.setattr(storage._ChecksumStream, "write", _disk_full)
    monkeypatch.setenv(FAULT_ENV, "rank=0,step=2,signal=TERM")
    cfg = tiny_gpt_config(tmp_path / "run", steps=4, checkpoint={"on_error": "continue", "async_save": False})
    assert train(cfg).exit_code == EXIT_PREEMPTED
    out = capsys.readouterr()
    text = out.out + out.err
    assert "the checkpoint of step 2 failed (see above): a restart resumes from scratch" in text, text
    assert "preempted, no checkpoint to resume from: loss" in text and "preempted, resumable" not in text, text


@pytest.mark.parametrize("async_save", [False, True])
def test_failed_saves_under_continue_are_not_recorded_as_saves_and_the_run_says_how_many(tmp_path, monkeypatch,
                                                                                          capsys, async_save):
    """on_error=continue keeps training through failed saves: the step's metrics record must not carry a save time
    for a synchronous save that committed nothing, and the end of the run (its last line, summary.json) says how
    many saves failed and which checkpoint a restart would take (a run whose every save failed looks finished)."""
    monkeypatch.setattr(storage._ChecksumStream, "write", _disk_full)
    run = tmp_path / "run"
    cfg = tiny_gpt_config(run, steps=4, checkpoint={"on_error": "continue", "every": 2, "async_save": async_save})
    res = train(cfg)
    assert res.exit_code == 0 and not complete_checkpoints(run / "checkpoints")
    recs = {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    if not async_save:  # async: the stall of handing the state to the writer did happen; it fails later
        assert "checkpoint_save_s" not in recs[2] and "checkpoint_save_s" not in recs[4], recs
    summary = json.loads((run / "summary.json").read_text())
    assert summary["checkpoint_failed_saves"] == 2, summary
    out = capsys.readouterr().out
    assert "2 checkpoint save(s) failed (checkpoint.on_error = continue): a restart resumes from scratch" in out, out


def test_the_wait_for_the_last_async_save_is_marked_busy_for_the_watchdog(tmp_path, monkeypatch):
    """After the last step the trainer waits for the async save still in flight (``at_end``, or the last
    ``every``). The launcher's automatic watchdog allows a step's time x 10 (at least 30 s) without step progress
    unless the rank's heartbeat says ``busy: checkpoint``; a large checkpoint's write outlasts that, the job was
    killed as hung mid-commit and its final checkpoint lost (seen with `dist-train launch` and a commit slowed to
    40 s: "FAILED after 1 attempt: hang: no step progress for more than 30 s")."""
    seen = []
    real_close = CheckpointManager.close

    def close(self):
        pending = self._pending is not None
        seen.append((pending, (read_heartbeat(tmp_path / "run", 0) or {}).get("busy")))
        real_close(self)

    monkeypatch.setattr(CheckpointManager, "close", close)
    cfg = tiny_gpt_config(tmp_path / "run", steps=2, checkpoint={"async_save": True, "at_end": True})
    train(cfg)
    assert seen and seen[-1][0], seen  # the final save was still in flight when the trainer closed the manager
    assert seen[-1][1] == "checkpoint", seen
    assert [p.name for _, p in complete_checkpoints(tmp_path / "run" / "checkpoints")] == ["step_2"]

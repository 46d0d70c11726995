"""A fresh start in an old run directory never destroys that run's records: they move, byte for byte, into
run.dir/previous/<when that run ended>/ with one line on rank 0; a resume moves nothing (dist_train/run_records.py)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dist_train.config import load_config
from dist_train.plot import load_run
from dist_train.run_records import PREVIOUS_DIR, set_aside_earlier_run
from dist_train.trainer import train
from tests.dist_harness import run_ranks
from tests.trainer_utils import tiny_gpt_config

RECORDED = ("metrics.jsonl", "summary.json", "config.yaml")


def _snapshot(run: Path) -> dict[str, bytes]:
    return {name: (run / name).read_bytes() for name in RECORDED}


def _steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _moved_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if "fresh start in" in line]


def _previous(run: Path) -> list[Path]:
    return sorted((run / PREVIOUS_DIR).iterdir()) if (run / PREVIOUS_DIR).is_dir() else []


def test_fresh_starts_keep_every_earlier_runs_records_byte_identical_under_previous(tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_gpt_config(run, steps=2))  # saves no checkpoint: every rerun is a fresh start
    first = _snapshot(run)
    assert not _moved_lines(capsys.readouterr().out) and not _previous(run)  # a new run dir: nothing to move

    train(tiny_gpt_config(run, steps=3, train={"lr": 5e-3}))
    lines = _moved_lines(capsys.readouterr().out)
    [kept] = _previous(run)
    assert _snapshot(kept) == first
    assert lines == [f"fresh start in {run}: the earlier run's records (metrics.jsonl, summary.json, config.yaml) "
                     f"moved to {kept}/"], lines
    assert _steps(run) == [1, 2, 3]  # the new run's own curve, from step 1
    assert load_config(run / "config.yaml").train.steps == 3
    second = _snapshot(run)
    assert "fresh start in" in (run / "logs" / "rank_0.log").read_text()  # the log keeps the line too

    train(tiny_gpt_config(run, steps=1))
    assert len(_moved_lines(capsys.readouterr().out)) == 1
    folders = _previous(run)
    assert len(folders) == 2 and kept in folders
    [newer] = [f for f in folders if f != kept]
    assert _snapshot(kept) == first and _snapshot(newer) == second
    assert [r["step"] for r in load_run(run)["records"]] == [1]  # `dist-train plot run` plots the current run
    assert [r["step"] for r in load_run(newer)["records"]] == [1, 2, 3]  # and `plot run/previous/<time>` that one


def test_a_resume_moves_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_gpt_config(run, steps=2, checkpoint={"every": 2}))
    capsys.readouterr()
    res = train(tiny_gpt_config(run, steps=4, checkpoint={"every": 2}))
    assert res.start_step == 2
    assert not _moved_lines(capsys.readouterr().out) and not _previous(run)
    assert _steps(run) == [1, 2, 3, 4]  # appended from its step, as before


def test_only_what_records_a_run_moves(tmp_path):
    """Logs (appended by every attempt and the launcher), checkpoints, locks and empty files stay; a plot moves."""
    run = tmp_path / "run"
    for name, data in {"metrics.jsonl": b"", "logs/rank_0.log": b"earlier attempt\n", "run.lock": b"",
                       "checkpoints/checkpoints.lock": b"", "tensorboard/events.out.tfevents.1": b"\x01",
                       "curves.png": b"\x89PNG", "rank_stats/rank_0.json": b"{}",
                       "profile/rank_0_steps_2-3.pt.trace.json.gz": b"\x1f\x8b"}.items():
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_bytes(data)
    line = set_aside_earlier_run(run, keep=run / "checkpoints")
    [kept] = _previous(run)
    assert line == (f"fresh start in {run}: the earlier run's records (tensorboard/, rank_stats/, profile/, "
                    f"curves.png) moved to {kept}/")
    assert sorted(p.name for p in kept.iterdir()) == ["curves.png", "profile", "rank_stats", "tensorboard"]
    assert (kept / "tensorboard" / "events.out.tfevents.1").read_bytes() == b"\x01"
    for stays in ("metrics.jsonl", "logs/rank_0.log", "run.lock", "checkpoints/checkpoints.lock"):
        assert (run / stays).is_file(), stays
    assert set_aside_earlier_run(run) is None and len(_previous(run)) == 1  # nothing left that records a run
    # a later run that ended in the same second gets its own folder: an earlier one is never written into; the
    # folder is named for the summary's time, not for a plot drawn an hour later
    stamp = max(f.stat().st_mtime for f in kept.rglob("*") if f.is_file() and f.suffix != ".png")  # renames keep it
    for name, when in (("summary.json", stamp), ("curves.png", stamp + 3600)):
        (run / name).write_text("{}")
        os.utime(run / name, (when, when))
    set_aside_earlier_run(run)
    assert [p.name for p in _previous(run)] == [kept.name, f"{kept.name}-2"]
    assert sorted(p.name for p in kept.iterdir()) == ["curves.png", "profile", "rank_stats", "tensorboard"]
    # a checkpoint dir configured inside a record folder keeps that folder where it is
    (run / "tensorboard" / "ckpt").mkdir(parents=True)
    (run / "tensorboard" / "ckpt" / "checkpoints.lock").write_bytes(b"x")
    assert set_aside_earlier_run(run, keep=run / "tensorboard" / "ckpt") is None


def _fresh_dp2(rank: int, world: int, run_dir: str) -> None:
    train(tiny_gpt_config(run_dir, steps=2, parallel={"dp": 2}))


@pytest.mark.slow  # two 2-rank jobs: ~5 s
def test_only_rank_0_moves_and_every_rank_trains_on(tmp_path):
    run = tmp_path / "run"
    run_ranks(_fresh_dp2, 2, args=(str(run),), timeout=120)
    first = _snapshot(run)
    run_ranks(_fresh_dp2, 2, args=(str(run),), timeout=120)
    [kept] = _previous(run)
    assert _snapshot(kept) == first and _steps(run) == [1, 2]
    assert "fresh start in" in (run / "logs" / "rank_0.log").read_text()
    assert "fresh start in" not in (run / "logs" / "rank_1.log").read_text()


def test_a_start_from_another_runs_checkpoint_keeps_the_earlier_runs_records(tmp_path, capsys):
    """A start that does not continue this run dir's own checkpoints (a fine-tune from another run's step_N, an
    import) is a new run there whatever step it starts at: the earlier run's records move aside as on a fresh
    start. The trackers truncated metrics.jsonl after the resumed step instead, deleting the earlier run's steps
    beyond it and leaving the ones before mixed into the new run's curve."""
    src = tmp_path / "src"
    train(tiny_gpt_config(src, steps=2, checkpoint={"at_end": True}))
    run = tmp_path / "run"
    from_src = {"resume": str(src / "checkpoints" / "step_2")}  # saves nothing of its own: run.dir has no checkpoint
    train(tiny_gpt_config(run, steps=4, checkpoint=from_src))
    first = _snapshot(run)
    capsys.readouterr()
    train(tiny_gpt_config(run, steps=3, train={"lr": 5e-3}, checkpoint=from_src))
    [kept] = _previous(run)
    assert _snapshot(kept) == first and _steps(kept) == [3, 4]
    [line] = [x for x in capsys.readouterr().out.splitlines() if "the earlier run's records" in x]
    assert line.startswith(f"start from {src / 'checkpoints' / 'step_2'} in {run}: "), line
    assert _steps(run) == [3]

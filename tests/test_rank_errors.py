"""A rank that stops on bad input after start-up records its line; its peers exit 2 quietly instead of
adding a gloo traceback, and the launcher names the recording rank (dist_train/rank_errors.py)."""
from pathlib import Path

import pytest

from dist_train.data.prepare import prepare_indexed
from dist_train.lifecycle import clear_heartbeats
from dist_train.rank_errors import clear_user_errors, record_user_error, user_errors
from tests.trainer_utils import run_cli_here

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_dataset(tmp_path) -> str:
    text = tmp_path / "doc.txt"
    text.write_text("a small document for two ranks\n" * 20)
    prefix = str(tmp_path / "ds")
    prepare_indexed([text], prefix)
    return prefix


def test_records_are_one_line_per_rank_and_cleared(tmp_path):
    assert user_errors(tmp_path) == {}
    record_user_error(tmp_path, 1, "data.path = x: not found\nsecond line")
    record_user_error(tmp_path, 3, "other")
    assert user_errors(tmp_path) == {1: "data.path = x: not found", 3: "other"}
    clear_user_errors(tmp_path)
    assert user_errors(tmp_path) == {}
    (tmp_path / "file").write_text("")
    record_user_error(tmp_path / "file" / "sub", 0, "x")  # unwritable run dir: best effort, no exception
    assert user_errors(tmp_path / "file" / "sub") == {}


@pytest.mark.slow
def test_peer_of_a_bad_input_rank_exits_quietly(tmp_path, tiny_dataset, capfd, monkeypatch):
    # the launcher is this process (what is tested is its ranks' output and its summary of their exits; a launcher
    # process of its own cost ~5 s of CPU importing torch and the launchers), the ranks are processes of their own
    run_dir = tmp_path / "run"
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("DIST_TRAIN_FAULT", "rank=1,step=2,action=error")
    r = run_cli_here(capfd, "launch", str(REPO / "configs" / "gpt_tiny.yaml"), "--backend", "local", "--max-restarts",
                     "1", "--set", f"run.dir={run_dir}", "--set", f"data.path={tiny_dataset}", "--set",
                     "data.seq_len=16", "--set", "train.steps=4", "--set", "train.progress=false", "--set",
                     "train.peak_tflops=1")
    err = r.stderr
    assert r.returncode == 2, err[-3000:]
    assert "Traceback" not in err and "Gloo" not in err, err[-3000:]
    assert "FAILED after 1 attempt: rank 1 stopped on bad input: injected bad-input error on rank 1" in err, err
    assert "not restarting" in err
    assert [line for line in err.splitlines() if line.startswith("[rank 0]") and "error" in line] == []


def test_clearing_keeps_a_persons_files_in_a_run_dir_that_was_there_before(tmp_path):
    """run.dir may be an existing folder (``--set run.dir=.``): its own errors/ folder lost every file to the
    rmtree that cleared the records. Only the records go; the folder too when they were all it held."""
    mine = tmp_path / "errors" / "notes.txt"
    mine.parent.mkdir()
    mine.write_text("a person's file")
    record_user_error(tmp_path, 0, "bad input")
    clear_user_errors(tmp_path)
    assert user_errors(tmp_path) == {} and mine.read_text() == "a person's file"
    mine.unlink()
    record_user_error(tmp_path, 1, "bad input")
    clear_user_errors(tmp_path)
    assert not (tmp_path / "errors").exists()


def test_clearing_takes_only_names_dist_train_writes(tmp_path):
    """errors/rank_N.txt and heartbeats/rank_N.json are ours; a person's rank_notes.txt or rank_summary.json beside
    them matched the glob rank_*.txt / rank_*.json and was deleted."""
    errors, beats = tmp_path / "errors", tmp_path / "heartbeats"
    for folder, theirs in ((errors, "rank_notes.txt"), (beats, "rank_summary.json")):
        folder.mkdir()
        (folder / theirs).write_text("a person's file")
    record_user_error(tmp_path, 3, "bad input")
    (beats / "rank_12.json").write_text("{}")
    (beats / ".rank_12.json.4242.tmp").write_text("{")
    clear_user_errors(tmp_path)
    clear_heartbeats(tmp_path)
    assert sorted(p.name for p in errors.iterdir()) == ["rank_notes.txt"]
    assert sorted(p.name for p in beats.iterdir()) == ["rank_summary.json"]

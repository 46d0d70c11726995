"""``dist-train eval``: a checkpoint's validation loss without training.

The loss equals the ``valid_loss`` the trainer logged at the checkpoint's step: bit for bit on the trained layout
(same weights, same batches, same reduction), within 1e-5 under dp2 / cp2 / tp2 / pp2 on 2 ranks (the validation
contract across layouts, tests/test_validation.py). The command only reads the run dir (no file there changes,
even while a job holds its lock), and bad input is one line and exit 2 before any rank starts."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dist_train.cli import main
from dist_train.checkpoint_eval import evaluate_checkpoint
from dist_train.config import load_config, save_config
from dist_train.distributed import current_context
from dist_train.runlock import hold_run_dir
from dist_train.trainer import train
from launchers.evaluate import choose_checkpoint
from tests.dist_harness import run_ranks
from tests.trainer_utils import tiny_gpt_config, tiny_swin_config

REPO = Path(__file__).resolve().parents[1]
TRAIN = {"eval_every": 1, "eval_steps": 2}
LAYOUTS = {"dp2": ["parallel.dp=2"], "cp2": ["parallel.cp=2"], "tp2": ["parallel.tp=2"], "pp2": ["parallel.pp=2"]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step run validated and checkpointed after each step -> (config path, run dir, {step: logged valid_loss})."""
    root = tmp_path_factory.mktemp("eval")
    cfg = tiny_gpt_config(root / "run", steps=2, train=TRAIN, checkpoint={"every": 1, "at_end": True})
    train(cfg)
    save_config(cfg, root / "cfg.yaml")
    logged = {r["step"]: r["valid_loss"] for r in map(json.loads, (root / "run" / "metrics.jsonl").read_text()
                                                     .splitlines()) if "valid_loss" in r}
    assert set(logged) == {1, 2}
    return root / "cfg.yaml", root / "run", logged


def _snapshot(run_dir: Path) -> dict:
    """Every file's size and mtime, except run.lock: the lock's holder (the test, as a training job would) refreshes it."""
    return {str(p.relative_to(run_dir)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(run_dir.rglob("*")) if p.name != "run.lock"}


def test_eval_loss_is_the_logged_validation_loss_bit_for_bit(trained):
    cfg_path, run_dir, logged = trained
    for step in (1, 2):
        result = evaluate_checkpoint(load_config(str(cfg_path)), run_dir / "checkpoints" / f"step_{step}",
                                     current_context())
        assert result["step"] == step
        assert result["loss"] == logged[step]  # the trainer's number, exactly
        assert result["count"] == 2 * 4 * 32 and result["batches"] == 2  # eval_steps x global_batch x seq_len


def _layout_losses(rank, world, cfg_path, ckpt):
    return {name: evaluate_checkpoint(load_config(cfg_path, sets), Path(ckpt), current_context())["loss"]
            for name, sets in LAYOUTS.items()}


@pytest.mark.slow
def test_eval_on_two_ranks_matches_the_logged_loss_under_dp_cp_tp_pp(trained):
    cfg_path, run_dir, logged = trained
    results = run_ranks(_layout_losses, 2, args=(str(cfg_path), str(run_dir / "checkpoints" / "step_2")), timeout=600)
    for rank, got in enumerate(results):
        for name, loss in got.items():
            assert abs(loss - logged[2]) <= 1e-5, (rank, name, loss, logged[2])


@pytest.mark.slow
def test_cli_launches_ranks_reads_only_and_ignores_the_run_lock(trained, tmp_path):
    cfg_path, run_dir, logged = trained
    out = tmp_path / "eval.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # a job holds the run dir: the evaluation neither waits for nor takes its lock
    with hold_run_dir(run_dir, 0):
        before = _snapshot(run_dir)
        proc = subprocess.run([sys.executable, "-m", "dist_train", "eval", str(cfg_path), "--checkpoint", "latest",
                               "--set", "parallel.dp=2", "--out", str(out)],
                              capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
        after = _snapshot(run_dir)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and "(step 2): loss" in lines[0] and "perplexity" in lines[0], proc.stdout
    result = json.loads(out.read_text())
    assert result["step"] == 2 and result["world_size"] == 2 and result["layout"]["dp"] == 2
    assert abs(result["loss"] - logged[2]) <= 1e-5
    assert after == before  # nothing written, moved or removed in the run dir (its lock file included)


@pytest.mark.parametrize("extra, says", [
    (["--checkpoint", "NOWHERE"], "--checkpoint NOWHERE: no such checkpoint"),
    (["--set", "model.d_model=64"], "holds a model of another size"),
    (["--set", "model.rope_theta=500.0"], "model.rope_theta"),
    (["--set", "data.source=indexed", "--set", "data.path=NOWHERE", "--data", "NOWHERE_VALID"],
     "data.valid_path = NOWHERE_VALID"),
    (["--set", "train.eval_every=0"], "train.eval_every = 0"),
    (["--set", "data.source=indexed", "--set", "data.path=NOWHERE"], "no held-out data to evaluate on"),
    (["--set", "data.source=indexed", "--set", "data.path=NOWHERE", "--set", "data.split=100,0,0"],
     "no held-out data to evaluate on"),
])
def test_bad_input_is_one_line_and_exit_2_before_any_rank(trained, capsys, extra, says):
    cfg_path, _, _ = trained
    assert main(["eval", str(cfg_path), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0], err


def test_a_run_without_checkpoints_is_refused(tmp_path, capsys):
    cfg = tiny_gpt_config(tmp_path / "fresh", train=TRAIN)
    save_config(cfg, tmp_path / "cfg.yaml")
    assert main(["eval", str(tmp_path / "cfg.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--checkpoint latest: no step_N checkpoint under" in err[0], err
    assert not (tmp_path / "fresh").exists()  # nothing created


def test_swin_eval_is_the_logged_validation_mse(tmp_path):
    """A swin (weather batches, normalised with the statistics its checkpoint recorded): the validation MSE the
    trainer logged, bit for bit, and no perplexity."""
    cfg = tiny_swin_config(tmp_path / "run", tmp_path / "data", steps=2, data={"split": "75,25,0"},
                           train={"eval_every": 2, "eval_steps": 1}, checkpoint={"at_end": True})
    logged = train(cfg).summary["valid_loss"]
    result = evaluate_checkpoint(cfg, tmp_path / "run" / "checkpoints" / "step_2", current_context())
    assert result["loss"] == logged and result["perplexity"] is None and result["count_unit"] == "values"


def test_the_default_checkpoint_is_the_runs_newest_else_what_resume_names(trained, tmp_path):
    """A fine-tune config names its start (checkpoint.resume = PATH): before the run's first save that is what is
    evaluated, afterwards the run's own newest, as a restart would resume."""
    cfg_path, run_dir, _ = trained
    start = run_dir / "checkpoints" / "step_1"
    fresh = load_config(str(cfg_path), [f"run.dir={tmp_path / 'fine'}", f"checkpoint.resume={start}"])
    assert choose_checkpoint(fresh, None) == start.resolve()
    own = load_config(str(cfg_path), [f"checkpoint.resume={start}"])
    assert choose_checkpoint(own, None) == (run_dir / "checkpoints" / "step_2").resolve()
    assert choose_checkpoint(own, str(start)) == start.resolve()

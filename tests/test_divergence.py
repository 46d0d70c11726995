"""A diverged run never destroys good checkpoints (issue 13.1): non-finite steps are not applied, never
committed, stop (``train.on_nonfinite: stop``, exit 3, one line) or are skipped on every rank (``skip``,
at most ``train.max_nonfinite_steps`` in a row); ``ckpt verify`` and resume refuse NaN/inf tensors."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_train.checkpoint import CheckpointError, CheckpointManager, complete_checkpoints, storage, verify_checkpoint
from dist_train.checkpoint.manager import nonfinite_tensor
from dist_train.checkpoint.manifest import read_manifest, write_manifest
from dist_train.checkpoint.rectangles import Rectangles
from dist_train.checkpoint.storage import file_block_digests, load_dcp_metadata
from dist_train.engines import ddp
from dist_train.lifecycle import EXIT_DIVERGED, TrainingDiverged
from dist_train.trainer import train
from tests.dist_harness import run_ranks
from tests.test_ckpt_common import CkptCfg, build, eval_outputs, model_config, seed_rank, train_steps
from tests.trainer_utils import tiny_gpt_config

REPO = Path(__file__).resolve().parents[1]


def _mgr(root: Path, **kw) -> CheckpointManager:
    return CheckpointManager(CkptCfg(dir=str(root), **kw), run_dir=root, config=model_config(),
                             layout={"dp": 1, "world_size": 1})


def resign(ckpt: Path) -> None:
    """Recompute every file record of ``ckpt``'s manifest (what someone editing a checkpoint would do)."""
    body = read_manifest(ckpt)
    body["files"] = {name: file_block_digests(ckpt / name) for name in body["files"]}
    write_manifest(ckpt, body)


def poison_tensor(ckpt: Path, prefix: str = "model.") -> str:
    """Overwrite the stored bytes of the first floating tensor named ``prefix…`` with NaN; re-sign."""
    md = load_dcp_metadata(ckpt / ".metadata")
    index, info = min(((i, s) for i, s in md.storage_data.items() if i.fqn.startswith(prefix)),
                      key=lambda kv: kv[0].fqn)
    dtype = md.state_dict_metadata[index.fqn].properties.dtype
    nan = torch.full((info.length // dtype.itemsize,), float("nan"), dtype=dtype)
    with open(ckpt / info.relative_path, "r+b") as f:
        f.seek(info.offset)
        f.write(nan.view(torch.uint8).numpy().tobytes())
    resign(ckpt)
    return index.fqn


def _all_finite(ckpt: Path) -> bool:
    return not verify_checkpoint(ckpt)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_nonfinite_tensor_finds_nan_and_both_infinities_anywhere(dtype):
    """One min/max reduction per tensor: NaN at the first, a middle or the last element (SIMD lanes and the
    tail), +inf and -inf, in a strided view and in a Rectangles block; finite and integer tensors pass."""
    n = 10_007  # not a multiple of any vector width
    clean = {"a": torch.randn(n, dtype=dtype), "b": torch.arange(5), "c": torch.empty(0, dtype=dtype)}
    assert nonfinite_tensor(clean) is None
    for bad in (math.nan, math.inf, -math.inf):
        for pos in (0, n // 2, n - 1):
            x = torch.randn(n, dtype=dtype)
            x[pos] = bad
            assert nonfinite_tensor({**clean, "z": x}) == "z", (bad, pos)
            assert nonfinite_tensor({**clean, "z": x.view(-1, 1).expand(n, 2)[:, 1]}) == "z", (bad, pos)
        block = torch.randn(4, 3, dtype=dtype)
        block[3, 2] = bad
        r = Rectangles(torch.Size([8, 3]), [((4, 0), block)], dtype, torch.device("cpu"))
        assert nonfinite_tensor({"a": clean["a"], "r": r}) == "r", bad


def test_nonfinite_state_is_never_committed_nor_pruned_for(tmp_path):
    root = tmp_path / "ckpt"
    seed_rank(0)
    model, opt, sched = build()
    mgr = _mgr(root, keep_last=1)
    train_steps(model, opt, sched, 1, 2)
    mgr.save(2, model, opt, sched)
    with torch.no_grad():
        next(model.parameters())[0] = float("nan")
    with pytest.raises(CheckpointError, match=r"save at step 3 failed.*holds NaN/inf values \(not committed\).*"
                                              r"last good checkpoint: step_2 \(untouched\)"):
        mgr.save(3, model, opt, sched)
    assert [p.name for _, p in complete_checkpoints(root)] == ["step_2"] and not list(root.glob("step_3*"))
    assert _all_finite(root / "step_2")


def test_verify_reports_nonfinite_tensors_and_resume_falls_back(tmp_path):
    root = tmp_path / "ckpt"
    seed_rank(0)
    model, opt, sched = build()
    mgr = _mgr(root)
    outs = {}
    for step in (2, 4):
        train_steps(model, opt, sched, step - 1, step)
        mgr.save(step, model, opt, sched)
        outs[step] = eval_outputs(model)
    name = poison_tensor(root / "step_4")
    problems = verify_checkpoint(root / "step_4")
    assert problems == [f"{root / 'step_4'}: tensor '{name}' holds NaN/inf values"], problems
    fresh, fopt, fsched = build(seed=9)
    extra = _mgr(root).resume(fresh, fopt, fsched)  # auto: step_4 refused, step_2 loaded
    assert extra["step"] == 2 and torch.equal(eval_outputs(fresh), outs[2])
    with pytest.raises(CheckpointError, match="holds NaN/inf"):
        _mgr(root, resume=str(root / "step_4")).resume(*build(seed=9))


def test_stop_keeps_the_last_finite_checkpoint(tmp_path):
    cfg = tiny_gpt_config(tmp_path / "run", steps=8, train={"lr": 1e6, "warmup_steps": 0},
                          checkpoint={"every": 1, "keep_last": 1, "at_end": True})
    with pytest.raises(TrainingDiverged) as info:
        train(cfg)
    msg = str(info.value)
    assert "\n" not in msg and "train.on_nonfinite = stop" in msg, msg
    step = int(msg.split(":")[0].split()[1])
    good = complete_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for _, p in good] == [f"step_{step - 1}"], good
    assert f"last good checkpoint: step_{step - 1} (untouched)" in msg
    assert _all_finite(good[0][1])


def _nan_norm_at(steps: set[int], ranks: set[int]):
    """Patch the DDP engine's gradient norm to NaN at the given 1-based steps on the given ranks."""
    real, calls = ddp.grad_norm_on_device, {"n": 0}

    def norm(*args, **kw):
        calls["n"] += 1
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        value = real(*args, **kw)
        return torch.full_like(value, float("nan")) if calls["n"] in steps and rank in ranks else value
    ddp.grad_norm_on_device = norm
    return real


def test_skip_applies_nothing_and_stops_after_too_many(tmp_path):
    ref = train(tiny_gpt_config(tmp_path / "ref", steps=3))
    real = _nan_norm_at({2, 3}, {0})
    try:
        res = train(tiny_gpt_config(tmp_path / "skip", steps=5, train={"on_nonfinite": "skip"},
                                    checkpoint={"every": 1}))
        # steps 2 and 3 were not applied: step 4 sees the weights (and schedule) step 2 saw
        assert res.losses[0] == ref.losses[0] and res.losses[1] == ref.losses[1]
        assert math.isnan(res.grad_norms[1]) and math.isnan(res.grad_norms[2])
        assert all(_all_finite(p) for _, p in complete_checkpoints(tmp_path / "skip" / "checkpoints"))
        ddp.grad_norm_on_device = real
        _nan_norm_at({2, 3, 4}, {0})
        with pytest.raises(TrainingDiverged, match=r"step 4: .*3 consecutive skipped steps > "
                                                   r"train.max_nonfinite_steps = 2"):
            train(tiny_gpt_config(tmp_path / "many", steps=6,
                                  train={"on_nonfinite": "skip", "max_nonfinite_steps": 2}))
    finally:
        ddp.grad_norm_on_device = real


@pytest.mark.slow
def test_skip_is_agreed_by_every_rank_and_cli_stop_is_one_line(tmp_path):
    one, both = run_ranks(_skip_cases, 2, args=(str(tmp_path),), timeout=240)[0]
    # rank 1 alone saw the NaN: had rank 0 applied the step its replica would differ and so would the loss
    assert one == both, (one, both)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "dist_train.cli", "run", str(REPO / "configs" / "gpt_tiny.yaml"),
                          "--set", f"run.dir={tmp_path / 'cli'}", "--set", "parallel.dp=1", "--set", "train.lr=1e6",
                          "--set", "train.steps=6", "--set", "data.source=synthetic", "--set", "data.seq_len=32",
                          "--set", "model.d_model=32", "--set", "checkpoint.every=1", "--set", "train.progress=false"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == EXIT_DIVERGED, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dist-train: error: step "), out.stderr


def _skip_cases(rank, world, root):
    out = []
    for name, ranks in (("one", {1}), ("both", {0, 1})):
        real = _nan_norm_at({2}, ranks)
        try:
            res = train(tiny_gpt_config(f"{root}/{name}", steps=4, parallel={"dp": 2}, train={"on_nonfinite": "skip"}))
        finally:
            ddp.grad_norm_on_device = real
        out.append(res.losses)
    return out


def test_consecutive_skipped_steps_are_counted_across_a_resume(tmp_path):
    """``max_nonfinite_steps`` counts skipped steps in a row; a checkpoint taken inside such a row must carry the
    count, else every restart (exit_interval, preemption) grants a diverging run a fresh allowance and it trains on
    past the point where the uninterrupted run stops."""
    skip = {"on_nonfinite": "skip", "max_nonfinite_steps": 2}
    real = _nan_norm_at({2, 3, 4}, {0})
    try:
        with pytest.raises(TrainingDiverged, match=r"step 4: .*3 consecutive skipped steps"):
            train(tiny_gpt_config(tmp_path / "straight", steps=6, train=skip))
        ddp.grad_norm_on_device = real
        _nan_norm_at({2, 3}, {0})
        first = train(tiny_gpt_config(tmp_path / "r", steps=6, train={**skip, "exit_interval": 3},
                                      checkpoint={"every": 1}))
        assert math.isnan(first.grad_norms[1]) and math.isnan(first.grad_norms[2])  # steps 2, 3 skipped, saved at 3
        ddp.grad_norm_on_device = real
        _nan_norm_at({1}, {0})  # the resumed run's first step, step 4
        with pytest.raises(TrainingDiverged, match=r"step 4: .*3 consecutive skipped steps"):
            train(tiny_gpt_config(tmp_path / "r", steps=6, train=skip, checkpoint={"every": 1}))
    finally:
        ddp.grad_norm_on_device = real


def test_a_failed_async_save_does_not_hide_the_divergence_that_follows_it(tmp_path, monkeypatch, capsys):
    """The async save of step 2 fails (disk full, checkpoint.on_error = stop) while step 3 diverges: the run must
    still end as diverged (exit 3, which the launcher does not restart: it would replay the same steps into the
    same NaN). The save's failure, surfaced by the final wait, replaced the divergence: exit 1, restarted."""
    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(storage._ChecksumStream, "write", disk_full)
    real = _nan_norm_at({3}, {0})
    try:
        with pytest.raises(TrainingDiverged, match=r"step 3: .* is not finite"):
            train(tiny_gpt_config(tmp_path / "run", steps=4, checkpoint={"every": 2, "async_save": True}))
    finally:
        ddp.grad_norm_on_device = real
    out = capsys.readouterr()
    assert "checkpoint save at step 2 failed" in out.out + out.err  # said, not lost

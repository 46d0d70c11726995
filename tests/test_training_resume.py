"""Exact resume through the trainer: 20 steps straight == 10 steps + restart + 10 steps (bitwise, fp32 CPU)."""
import json

from dist_train.trainer import train
from tests.dist_harness import run_ranks
from tests.trainer_utils import tiny_gpt_config


def _resume_cases(rank, world, root):
    out = {}
    straight = train(tiny_gpt_config(f"{root}/straight", steps=20, parallel={"dp": 2}))
    out["straight"] = straight.losses
    for mode in ("sync", "async"):
        ck = {"every": 5, "async_save": mode == "async", "keep_last": 2}
        first = train(tiny_gpt_config(f"{root}/{mode}", steps=20, parallel={"dp": 2}, checkpoint=ck,
                                      train={"exit_interval": 10}))
        # a new process would build everything from scratch: so does train(); resume=auto finds step 10
        second = train(tiny_gpt_config(f"{root}/{mode}", steps=20, parallel={"dp": 2}, checkpoint=ck))
        out[mode] = (first.losses, second.start_step, second.losses)
    return out


def test_resume_is_bitwise_exact_sync_and_async(tmp_path):
    res = run_ranks(_resume_cases, 2, args=(str(tmp_path),), timeout=240)
    for r in res:
        for mode in ("sync", "async"):
            first, start, second = r[mode]
            assert start == 10
            assert first + second == r["straight"], (mode, first + second, r["straight"])
    ckpts = sorted(p.name for p in (tmp_path / "async" / "checkpoints").iterdir() if p.name.startswith("step_"))
    # keep_last = 2 plus step_10, the checkpoint this run was loaded from (never pruned); no .tmp left
    assert ckpts == ["step_10", "step_15", "step_20"]
    summary = json.loads((tmp_path / "sync" / "summary.json").read_text())
    assert summary["start_step"] == 10 and summary["steps"] == 20

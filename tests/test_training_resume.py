"""Exact resume through the trainer: 8 steps straight == 4 steps + restart + 4 steps (bitwise, fp32 CPU)."""
import json

from dist_train.trainer import train
from tests.dist_harness import run_ranks
from tests.trainer_utils import rel_close, tiny_gpt_config

#: 8 steps, saving every 2, the first run exiting after step 4: a save before the exit's, the resumed run's two
#: saves pruned to keep_last around the checkpoint it loaded, and every step of both runs bit for bit (20 steps
#: saving every 5 and exiting at 10 checked the same)
STEPS, EVERY, EXIT = 8, 2, 4


def _resume_cases(rank, world, root):
    out = {}
    straight = train(tiny_gpt_config(f"{root}/straight", steps=STEPS, parallel={"dp": 2}))
    out["straight"] = straight.losses
    for mode in ("sync", "async"):
        ck = {"every": EVERY, "async_save": mode == "async", "keep_last": 2}
        first = train(tiny_gpt_config(f"{root}/{mode}", steps=STEPS, parallel={"dp": 2}, checkpoint=ck,
                                      train={"exit_interval": EXIT}))
        # a new process would build everything from scratch: so does train(); resume=auto finds step EXIT
        second = train(tiny_gpt_config(f"{root}/{mode}", steps=STEPS, parallel={"dp": 2}, checkpoint=ck))
        out[mode] = (first.losses, second.start_step, second.losses)
    return out


def test_resume_is_bitwise_exact_sync_and_async(tmp_path):
    res = run_ranks(_resume_cases, 2, args=(str(tmp_path),), timeout=240)
    for r in res:
        for mode in ("sync", "async"):
            first, start, second = r[mode]
            assert start == EXIT
            assert first + second == r["straight"], (mode, first + second, r["straight"])
    ckpts = sorted(p.name for p in (tmp_path / "async" / "checkpoints").iterdir() if p.name.startswith("step_"))
    # keep_last = 2 plus step_4, the checkpoint this run was loaded from (never pruned); no .tmp left
    assert ckpts == ["step_4", "step_6", "step_8"]
    summary = json.loads((tmp_path / "sync" / "summary.json").read_text())
    assert summary["start_step"] == EXIT and summary["steps"] == STEPS


def _three_rank_cases(rank, world, root):
    # gpt_tiny's shapes: more than DDP's 1 MiB first bucket, so the restart's first step reduces in the
    # initial bucket order while the uninterrupted run already uses the rebuilt one
    sizes = {"model": {"d_model": 128, "vocab_size": 257}, "train": {"global_batch": 6, "micro_batch": 2}}
    straight = train(tiny_gpt_config(f"{root}/straight", steps=6, parallel={"dp": 3}, **sizes))
    ck = {"every": 3, "keep_last": 2}
    first = train(tiny_gpt_config(f"{root}/r", steps=6, parallel={"dp": 3}, checkpoint=ck,
                                  model=sizes["model"], train={**sizes["train"], "exit_interval": 3}))
    second = train(tiny_gpt_config(f"{root}/r", steps=6, parallel={"dp": 3}, checkpoint=ck, **sizes))
    return straight.losses, first.losses + second.losses, second.start_step


def test_three_rank_resume_within_one_ulp_of_reduction_order(tmp_path):
    """docs/checkpointing.md: with 3+ ranks a restart's first step may differ in the last bit (DDP rebuilds
    its gradient buckets after its first step; a ring all-reduce of another bucket layout adds the same
    numbers in another order); every later step agrees within 1e-7 relative."""
    res = run_ranks(_three_rank_cases, 3, timeout=300, args=(str(tmp_path),))
    for straight, resumed, start in res:
        assert start == 3
        assert rel_close(straight, resumed, 1e-7), (straight, resumed)
        assert straight[:4] == resumed[:4]  # bit for bit up to the first step after the restart

"""Resharding through the trainer: a checkpoint saved under one layout resumes under another and
training continues with the losses the saving layout produced (1e-5 relative)."""
from dist_train.trainer import train
from tests.dist_harness import run_ranks
from tests.trainer_utils import rel_close, tiny_gpt_config, tiny_swin_config

#: 5 steps, saved after step 2 and resumed there: 2 before the save and 3 after it, as tests/test_ckpt_engines.py
#: (STEPS) explains; measured on these tiny models, one rank: a resume that drops the optimizer state differs from
#: the saving run by 1.3e-2 (Swin) / 3.0e-3 (GPT) relative at the second loss after it, one that drops the LR
#: scheduler's position by 2.4e-2 / 8.8e-4 at the third (10 steps saved at 5 checked nothing more)
STEPS, SAVED_AT = 5, 2
CKPT = {"every": SAVED_AT, "keep_last": 3}


def _save_run(rank, world, kind, run_dir, par, data_dir):
    if kind == "gpt":
        return train(tiny_gpt_config(run_dir, steps=STEPS, parallel=par, checkpoint=CKPT)).losses
    return train(tiny_swin_config(run_dir, data_dir, steps=STEPS, parallel=par, checkpoint=CKPT)).losses


def _check(saved_losses, resumed):
    assert resumed.start_step == SAVED_AT
    assert rel_close(resumed.losses, saved_losses[SAVED_AT:], 1e-5), (resumed.losses, saved_losses[SAVED_AT:])


def test_cp2_checkpoint_resumes_on_cp1(tmp_path):
    saved = run_ranks(_save_run, 2, args=("gpt", str(tmp_path / "cp2"), {"cp": 2}, None), timeout=240)[0]
    saved_at = tmp_path / "cp2" / "checkpoints" / f"step_{SAVED_AT}"
    resumed = train(tiny_gpt_config(tmp_path / "cp1", steps=STEPS, checkpoint={"resume": str(saved_at)}))
    _check(saved, resumed)


def test_wp_1x2_checkpoint_resumes_on_1x1(tmp_path):
    data = tmp_path / "weather"
    saved = run_ranks(_save_run, 2, args=("swin", str(tmp_path / "wp12"), {"wp": [1, 2]}, str(data)),
                      timeout=240)[0]
    saved_at = tmp_path / "wp12" / "checkpoints" / f"step_{SAVED_AT}"
    resumed = train(tiny_swin_config(tmp_path / "wp11", data, steps=STEPS, checkpoint={"resume": str(saved_at)}))
    _check(saved, resumed)

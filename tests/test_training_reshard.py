"""Resharding through the trainer: a checkpoint saved under one layout resumes under another and
training continues with the losses the saving layout produced (1e-5 relative)."""
from dist_train.trainer import train
from tests.dist_harness import run_ranks
from tests.trainer_utils import rel_close, tiny_gpt_config, tiny_swin_config

CKPT = {"every": 5, "keep_last": 3}


def _save_run(rank, world, kind, run_dir, par, data_dir):
    if kind == "gpt":
        return train(tiny_gpt_config(run_dir, steps=10, parallel=par, checkpoint=CKPT)).losses
    return train(tiny_swin_config(run_dir, data_dir, steps=10, parallel=par, checkpoint=CKPT)).losses


def _check(saved_losses, resumed):
    assert resumed.start_step == 5
    assert rel_close(resumed.losses, saved_losses[5:], 1e-5), (resumed.losses, saved_losses[5:])


def test_cp2_checkpoint_resumes_on_cp1(tmp_path):
    saved = run_ranks(_save_run, 2, args=("gpt", str(tmp_path / "cp2"), {"cp": 2}, None), timeout=240)[0]
    resumed = train(tiny_gpt_config(tmp_path / "cp1", steps=10,
                                    checkpoint={"resume": str(tmp_path / "cp2" / "checkpoints" / "step_5")}))
    _check(saved, resumed)


def test_wp_1x2_checkpoint_resumes_on_1x1(tmp_path):
    data = tmp_path / "weather"
    saved = run_ranks(_save_run, 2, args=("swin", str(tmp_path / "wp12"), {"wp": [1, 2]}, str(data)),
                      timeout=240)[0]
    resumed = train(tiny_swin_config(tmp_path / "wp11", data, steps=10,
                                     checkpoint={"resume": str(tmp_path / "wp12" / "checkpoints" / "step_5")}))
    _check(saved, resumed)

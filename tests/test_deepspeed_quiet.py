"""A ZeRO run on CPU printed, on every rank, DeepSpeed's "Setting accelerator to CPU. If you have GPU or other
accelerator, we were unable to detect it." and twice torch's FutureWarning that DeepSpeed's
``all_gather_into_tensor`` is deprecated (12 lines of noise on 4 ranks, none about the user's run)."""
import os
import subprocess
import sys
import warnings

import pytest

from dist_train.engines.deepspeed import quiet_deepspeed
from tests.trainer_utils import REPO


def test_deepspeeds_deprecation_warnings_are_held_back_and_others_shown(monkeypatch):
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_deepspeed(on_cpu=True)
        for name in ("all_gather_into_tensor", "reduce_scatter_tensor"):
            warnings.warn(f"`torch.distributed.{name}` is deprecated. Please use ...", FutureWarning)
        warnings.warn("`torch.distributed.something_else` is deprecated.", FutureWarning)
    assert [str(w.message) for w in seen] == ["`torch.distributed.something_else` is deprecated."]
    assert os.environ["DS_ACCELERATOR"] == "cpu"
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    quiet_deepspeed(on_cpu=True)
    assert os.environ["DS_ACCELERATOR"] == "cuda"  # a user's choice stands


@pytest.mark.slow
def test_a_zero_run_on_cpu_prints_no_accelerator_warning(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    done = subprocess.run([sys.executable, "-m", "dist_train", "run", str(REPO / "configs" / "gpt_tiny.yaml"),
                           "--set", "parallel.dp=1", "--set", "parallel.zero_stage=2", "--set", "train.steps=2",
                           "--set", f"run.dir={tmp_path / 'run'}", "--set", "data.source=synthetic",
                           "--set", "checkpoint.at_end=false"],
                          capture_output=True, text=True, cwd=tmp_path, env=dict(env, PYTHONPATH=str(REPO)), timeout=180)
    out = done.stdout + done.stderr
    assert done.returncode == 0 and "done: loss" in out, out[-2000:]
    assert "Setting accelerator" not in out, out[-2000:]

"""Validation loss: the mean over every real token of the fixed held-out batches, exact across layouts.

dp2 / cp2 / tp2 / pp2 / ZeRO-1 and swin on a 1x2 window-parallel grid (one spawn of two gloo ranks runs
them all) equal the single-rank validation loss within 1e-5 after one training step, on every rank; the held-out stream differs from the training one;
data.split cuts contiguous Megatron-style shares; swin reports validation MSE the same way."""
from __future__ import annotations

import json
import math

import pytest

from dist_train.config import ConfigError, parse_split
from dist_train.data.datasets import split_ranges
from dist_train.trainer import train
from tests.dist_harness import run_ranks
from tests.trainer_utils import tiny_gpt_config, tiny_swin_config

EVAL = {"steps": 1, "eval_every": 1, "eval_steps": 2}
LAYOUTS = {"dp2": {"dp": 2}, "cp2": {"cp": 2}, "tp2": {"tp": 2}, "pp2": {"pp": 2},
           "zero1": {"dp": 2, "zero_stage": 1}}
SWIN_EVAL = {"data": {"split": "60,40,0"}, "train": EVAL}  # 4 held-out pairs: 2 batches of 2


def _valid_losses(rank, world, run_dir):
    out = {}
    for name, parallel in LAYOUTS.items():
        res = train(tiny_gpt_config(f"{run_dir}/{name}", parallel=parallel, train=EVAL))
        out[name] = res.summary["valid_loss"]
    swin = tiny_swin_config(f"{run_dir}/swin_wp", f"{run_dir}/weather", parallel={"wp": [1, 2]}, **SWIN_EVAL)
    out["swin_wp1x2"] = train(swin).summary["valid_loss"]
    return out


@pytest.mark.slow
def test_validation_loss_is_exact_across_dp_cp_tp_pp(tmp_path):
    ref = train(tiny_gpt_config(tmp_path / "ref", train=EVAL))
    want = ref.summary["valid_loss"]
    assert want is not None and math.isfinite(want)
    # held out: not the training loss of the same step (a different seed's stream)
    assert want != pytest.approx(ref.losses[0], abs=1e-3)
    swin_want = train(tiny_swin_config(tmp_path / "swin", tmp_path / "weather", **SWIN_EVAL)).summary["valid_loss"]
    results = run_ranks(_valid_losses, 2, args=(str(tmp_path),), timeout=900)
    for rank, got in enumerate(results):
        assert abs(got.pop("swin_wp1x2") - swin_want) <= 1e-5, rank  # validation MSE over window-parallel tiles
        assert set(got) == set(LAYOUTS)
        for name, loss in got.items():
            assert abs(loss - want) <= 1e-5, (rank, name, loss, want)
    rec = [json.loads(line) for line in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    assert rec[-1]["valid_loss"] == want and rec[-1]["valid_count"] == 2 * 4 * 32  # eval_steps x batch x S


def test_split_shares_are_contiguous_and_add_up():
    assert parse_split("98,2,0") == pytest.approx((0.98, 0.02, 0.0))
    assert parse_split("9,1") == pytest.approx((0.9, 0.1, 0.0))
    assert split_ranges(1000, parse_split("98,2,0")) == [(0, 980), (980, 1000), (1000, 1000)]
    assert split_ranges(7, parse_split("1,1,1")) == [(0, 2), (2, 5), (5, 7)]
    for bad in ("a,b", "-1,2", "0,0,0", "1,2,3,4"):
        with pytest.raises(ConfigError, match="data.split"):
            parse_split(bad)


def test_eval_needs_held_out_data(tmp_path):
    with pytest.raises(ConfigError, match="needs held-out data"):
        tiny_gpt_config(tmp_path, data={"source": "indexed", "path": "x"}, train={"eval_every": 2})
    with pytest.raises(ConfigError, match="no validation share"):
        tiny_gpt_config(tmp_path, data={"source": "indexed", "path": "x", "split": "100,0,0"},
                        train={"eval_every": 2})
    # weather data takes no valid_path (refused): the advice is the split alone, with a share that holds steps
    with pytest.raises(ConfigError, match=r"needs held-out data: set data.split \(e.g. \"90,10,0\"") as e:
        tiny_swin_config(tmp_path / "run", tmp_path / "data", train={"eval_every": 2})
    assert "set data.valid_path" not in str(e.value)


def test_swin_reports_validation_mse(tmp_path):
    cfg = tiny_swin_config(tmp_path / "run", tmp_path / "data", steps=2,
                           data={"split": "75,25,0"}, train={"eval_every": 2, "eval_steps": 1})
    res = train(cfg)
    rec = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "valid_loss" not in rec[0] and rec[-1]["valid_loss"] == res.summary["valid_loss"]
    # MSE over every real value: global_batch 2 x the 10x16 image x 2 fields
    assert rec[-1]["valid_count"] == 2 * 10 * 16 * 2 and 0 < rec[-1]["valid_loss"] < 10

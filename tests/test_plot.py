"""``dist-train plot``: a PNG with one train series per run (+ one validation series per run that has
validation records) in each loss panel, against steps and tokens, and one series per run per extra panel."""
from __future__ import annotations

import json

import matplotlib.image
import pytest

from dist_train.cli import main
from dist_train.config import save_config
from dist_train.plot import loss_axis_label, plot_runs
from tests.trainer_utils import tiny_gpt_config


def _fake_run(run_dir, name: str, valid: bool) -> None:
    cfg = tiny_gpt_config(run_dir, run={"name": name})
    run_dir.mkdir(parents=True)
    save_config(cfg, run_dir / "config.yaml")
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step in range(1, 7):
            rec = {"step": step, "loss": 4.0 / step, "tokens_per_s": 1000.0 + step, "mfu": 0.01,
                   "peak_mem_bytes": 2 ** 28, "consumed_samples": 4 * step}
            if valid and step % 3 == 0:
                rec["valid_loss"] = 4.2 / step
            f.write(json.dumps(rec) + "\n")
        f.write('{"step": 7, "lo')  # a killed run's torn last line is skipped


def test_plot_series_per_panel(tmp_path):
    _fake_run(tmp_path / "a", "dp2", valid=True)
    _fake_run(tmp_path / "b", "cp2", valid=False)
    out = tmp_path / "curves.png"
    info = plot_runs([tmp_path / "a", tmp_path / "b"], out, ["tokens_per_s", "mfu", "memory"])
    assert info["runs"] == ["dp2", "cp2"]
    assert info["panels"]["loss vs step"] == info["panels"]["loss vs tokens"] == 3  # 2 train + 1 valid
    assert info["panels"]["tokens/s vs tokens"] == info["panels"]["MFU (%) vs step"] == 2
    assert info["panels"]["peak memory (GiB) vs step"] == 2
    h, w = matplotlib.image.imread(out).shape[:2]
    assert w > 1000 and h > 1000


def test_plot_cli(tmp_path, capsys):
    _fake_run(tmp_path / "a", "demo", valid=True)
    assert main(["plot", str(tmp_path / "a"), "--out", str(tmp_path / "c.png")]) == 0
    assert "wrote " in capsys.readouterr().out and (tmp_path / "c.png").is_file()
    assert main(["plot", str(tmp_path / "missing"), "--out", str(tmp_path / "d.png")]) == 2
    assert "metrics.jsonl not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["plot", "--help"])


def test_one_run_without_out_writes_its_curves_png_and_several_need_out(tmp_path, capsys):
    _fake_run(tmp_path / "a", "a", valid=True)
    _fake_run(tmp_path / "b", "b", valid=False)
    assert main(["plot", str(tmp_path / "a")]) == 0
    assert f"wrote {tmp_path / 'a' / 'curves.png'}" in capsys.readouterr().out
    assert (tmp_path / "a" / "curves.png").is_file()
    assert main(["plot", str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "--out FILE.png is needed to plot 2 runs together" in err and err.count("\n") == 1


def test_a_run_whose_recorded_config_a_later_version_refuses_still_plots(tmp_path):
    """config.yaml records a config that validated when its run started; a key a later version refuses (here
    train.eval_steps without eval_every, refused since nothing reads it) must not make that run unplottable."""
    _fake_run(tmp_path / "old", "old", valid=False)
    path = tmp_path / "old" / "config.yaml"
    path.write_text(path.read_text().replace("eval_steps: 4", "eval_steps: 8"))
    info = plot_runs([tmp_path / "old"], tmp_path / "c.png", [])
    assert info["runs"] == ["old"] and info["panels"]["loss vs tokens"] == 1


def test_the_loss_axis_names_the_loss_of_the_runs_kind():
    """A Swin's curves were labelled "loss" like a GPT's: its loss is a mean squared error."""
    assert loss_axis_label([{"kind": "swin"}]).startswith("MSE loss")
    assert loss_axis_label([{"kind": "gpt"}, {"kind": "gpt"}]).startswith("cross-entropy loss")
    assert loss_axis_label([{"kind": "gpt"}, {"kind": "swin"}]).startswith("loss")
    assert loss_axis_label([{"kind": None}]).startswith("loss")  # no config.yaml: kind unknown

"""Honest MFU: a planted too-low device peak is fixed (recalibrated, raised to what the run achieved) with
one warning naming the numbers, and no logged MFU exceeds 100%; the CPU calibration records when and how;
CUDA peaks come from the datasheet table by device name."""
from __future__ import annotations

import json

import pytest
import torch

from dist_train import metrics
from dist_train.cost.flops import FLOP_CONVENTION, flop_convention, param_count
from dist_train.metrics import CUDA_PEAK_TFLOPS, DevicePeak, HonestPeak, cpu_peak, cpu_peak_cache, format_metrics
from dist_train.trainer import train
from tests.trainer_utils import tiny_gpt_config


def _plant(cache_dir, tflops: float, load: float = 0.0) -> None:
    key = metrics._cpu_key(torch.get_num_threads())
    entry = {"tflops": tflops, "threads": torch.get_num_threads(), "measured_at": "2026-01-01T00:00:00Z",
             "load_avg_1m": load, "method": "planted by the test"}
    (cache_dir / "cpu_peak.json").write_text(json.dumps({key: entry}))


def test_planted_low_peak_is_fixed_and_warned_once(tmp_path, monkeypatch):
    monkeypatch.setenv("DIST_TRAIN_CACHE", str(tmp_path))
    _plant(tmp_path, 1e-9)
    res = train(tiny_gpt_config(tmp_path / "run", steps=3))
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["mfu"] <= 1.0 for r in recs), [r["mfu"] for r in recs]
    s = res.summary
    assert s["mfu"] <= 1.0 and s["device_peak_tflops"] > 1e-6
    assert s["mfu_peak_warning"].startswith("MFU ") and "is impossible: the device peak 1e-09 TFLOP/s" in \
        s["mfu_peak_warning"]
    assert "planted by the test" in s["mfu_peak_warning"] and "best of" in s["device_peak_source"]
    entry = next(iter(json.loads(cpu_peak_cache().read_text()).values()))
    assert entry["tflops"] == s["device_peak_tflops"] and entry["method"].startswith("best of")
    log = (tmp_path / "run" / "logs" / "rank_0.log").read_text()
    assert log.count("is impossible") == 1 and "WARNING MFU " in log


def test_honest_peak_raises_a_configured_peak_and_warns_once():
    guard = HonestPeak(DevicePeak(1.0, "configured: train.peak_tflops"), torch.device("cpu"), configured=True)
    assert guard.check(1, 0.5) is None and guard.peak.tflops == 1.0
    warning = guard.check(2, 2.5)
    assert "MFU 250.0% at step 2 is impossible" in warning and "2.5 TFLOP/s/device" in warning
    assert guard.peak.tflops == 2.5 and "raised at step 2" in guard.peak.source
    assert guard.check(3, 3.0) is None and guard.peak.tflops == 3.0  # fixed again, warned only once


def test_cpu_calibration_records_when_and_how(tmp_path, monkeypatch):
    monkeypatch.setenv("DIST_TRAIN_CACHE", str(tmp_path))
    monkeypatch.setitem(metrics.CPU_CALIBRATION, "size", 128)
    peak = cpu_peak(1)
    entry = json.loads(cpu_peak_cache().read_text())[metrics._cpu_key(1)]
    assert peak.tflops == entry["tflops"] > 0 and entry["threads"] == 1
    assert entry["method"] == "best of 3x8 fp32 torch.mm 128^3 with 1 thread(s)"
    assert entry["measured_at"].endswith("Z") and "load average" in peak.source


def test_a_peak_measured_on_a_busy_machine_is_remeasured_when_quiet(tmp_path, monkeypatch):
    monkeypatch.setenv("DIST_TRAIN_CACHE", str(tmp_path))
    monkeypatch.setitem(metrics.CPU_CALIBRATION, "size", 128)
    _plant(tmp_path, 1e-9, load=99.0)
    monkeypatch.setattr(metrics.os, "getloadavg", lambda: (120.0, 0.0, 0.0))
    assert cpu_peak(torch.get_num_threads()).tflops == 1e-9  # still busy: the cached value stands
    monkeypatch.setattr(metrics.os, "getloadavg", lambda: (0.5, 0.0, 0.0))
    quiet = cpu_peak(torch.get_num_threads())
    assert quiet.tflops > 1e-9 and "load average 0.5" in quiet.source
    assert cpu_peak(torch.get_num_threads()).tflops == quiet.tflops  # and it never falls back


@pytest.mark.parametrize("name,dtype,want", [
    ("NVIDIA H200", torch.bfloat16, 989.4), ("NVIDIA H100 80GB HBM3", torch.float32, 66.9),
    ("NVIDIA H200 NVL", torch.bfloat16, 835.5), ("NVIDIA H100 NVL", torch.float32, 60.0),
    ("NVIDIA GH200 480GB", torch.bfloat16, 989.4),
    ("NVIDIA H100 PCIe", torch.bfloat16, 756.0), ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312.0),
    ("NVIDIA B200", torch.bfloat16, 2250.0)])
def test_cuda_peak_from_the_datasheet_table(monkeypatch, name, dtype, want):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    peak = metrics.cuda_peak(torch.device("cuda"), dtype)
    assert peak.tflops == want and peak.source.startswith(f"datasheet table: {name} dense")
    assert all(len(v) == 2 for v in CUDA_PEAK_TFLOPS.values())


def test_a_metric_line_off_the_log_every_grid_says_it_is_the_checkpoint_step():
    """With log_every 2 and checkpoint.every 5, steps 5, 15, ... printed a line too, with nothing saying why."""
    rec = {"step": 5, "loss": 4.9, "lr": 3e-3, "grad_norm": 1.7, "tokens_per_s": 26464.0, "tflops_per_device": 0.012,
           "mfu": 0.117, "peak_mem_bytes": 2 ** 28, "step_time_s": 0.077}
    assert "checkpoint" not in format_metrics(rec, 40)
    assert format_metrics({**rec, "checkpoint_save_s": 0.0123}, 40).endswith(" | checkpoint (blocked 0.012 s)")


def test_the_last_line_of_a_run_stopped_by_exit_interval_does_not_say_done(tmp_path, capsys):
    """A time-sliced job (train.exit_interval) saves and exits 0 before train.steps: its last line said `done:`."""
    cfg = tiny_gpt_config(tmp_path / "run", steps=4, train={"exit_interval": 2, "log_every": 2})
    assert train(cfg).exit_code == 0
    out = capsys.readouterr()
    text = out.out + out.err
    assert "done:" not in text and "stopped at train.exit_interval = 2 (step 2 of 4), resumable: loss" in text, text
    train(cfg)  # resumes at step 2 and trains the rest: that run is done
    out = capsys.readouterr()
    assert "done: loss" in out.out + out.err


def test_the_header_reads_a_tiny_models_size_and_a_swins_convention():
    """A 19.7k-parameter Swin was printed as "0.0M params" by `plan` and "0.02M" by the trainer, under a
    convention line that said causal S_eff ~ S/2 for its (non-causal) window attention."""
    assert [param_count(n) for n in (512, 19_652, 1_234_567, 124_475_904, 8.03e9)] == \
        ["512", "19.7k", "1.23M", "124M", "8.03B"]
    # rounding up to the next unit names that unit (was "1e+03k", "1e+03M"), and a trillion is T (was "1.2e+03B")
    assert [param_count(n) for n in (999_499, 999_500, 999_999, 999_600_000, 1.2e12)] == \
        ["999k", "1M", "1M", "1B", "1.2T"]
    assert flop_convention("gpt") == FLOP_CONVENTION and "causal" in FLOP_CONVENTION
    assert "window area" in flop_convention("swin") and "S/2" not in flop_convention("swin")

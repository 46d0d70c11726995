"""`dist-train bench train --baseline-set ... --repeats N`: the pure parts (alternation order, the bubble
formula's predicted ratio, medians / ratios / overhead) and the argument checks that refuse before any rank
starts. Nothing here is timed."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dist_train.bench import train as bench_train
from dist_train.bench._paired import alternation, compare, predicted_ratio, step_units
from dist_train.bench._paired_plot import plot_paired
from dist_train.bench.cli import train as bench_train_cli
from dist_train.bench.cli.train import threads_per_rank
from dist_train.cli import _run_bench
from dist_train.config import load_config
from dist_train.cost.layout import bubble_fraction
from dist_train.rankstats import ENV, RankStats
from dist_train.trainer import train

SWIN = "configs/swin_era5_721x1440.yaml"
SMALL = ["data.image=[128,256]", "train.global_batch=4", "train.micro_batch=1", "parallel.wp=[1,1]"]


def _cfg(*sets: str):
    return load_config(SWIN, SMALL + list(sets))


def test_alternation_puts_the_baseline_first_in_every_pair():
    assert alternation(2) == ["baseline", "run", "baseline", "run"]
    with pytest.raises(ValueError, match="--repeats 0"):
        alternation(0)


def test_bubble_fraction_per_schedule():
    assert bubble_fraction(_cfg("model.n_layers=2")) == 0.0
    assert bubble_fraction(_cfg("model.n_layers=4", "parallel.pp=2")) == pytest.approx(1 / 5)  # m = accum = 4
    assert bubble_fraction(_cfg("model.n_layers=4", "parallel.pp=2", "parallel.microbatches=2")) == pytest.approx(1 / 3)
    assert bubble_fraction(_cfg("model.n_layers=8", "parallel.pp=2", "parallel.pp_schedule=interleaved")) == \
        pytest.approx(1 / 10)


def test_predicted_ratio_is_the_bubble_formula_at_equal_work_per_rank():
    pp1 = _cfg("model.n_layers=2")
    # pp2 with twice the blocks: 2 blocks per rank, 4 micro-batches -> (m + pp - 1) / m
    assert predicted_ratio(_cfg("model.n_layers=4", "parallel.pp=2"), pp1) == pytest.approx(5 / 4)
    # dp2 at twice the global batch: the same work per rank, no bubble
    assert predicted_ratio(_cfg("model.n_layers=2", "parallel.dp=2", "train.global_batch=8"), pp1) == pytest.approx(1)
    # wp 1x2 halves each rank's tokens; wp 1x2 x pp2 on twice the blocks matches it plus the bubble
    wp = _cfg("model.n_layers=2", "parallel.wp=[1,2]")
    assert step_units(wp) == pytest.approx(step_units(pp1) / 2)
    assert predicted_ratio(_cfg("model.n_layers=4", "parallel.wp=[1,2]", "parallel.pp=2"), wp) == pytest.approx(5 / 4)
    # pp2 on the SAME 4 blocks: half the work per rank, times the bubble
    assert predicted_ratio(_cfg("model.n_layers=4", "parallel.pp=2"), _cfg("model.n_layers=4")) == pytest.approx(5 / 8)
    # tp2 splits every block's heads and MLP: ideally half the time on the same tokens
    assert predicted_ratio(_cfg("model.n_layers=2", "parallel.tp=2"), pp1) == pytest.approx(1 / 2)


def test_compare_medians_ratio_and_overhead_beyond_the_prediction():
    out = compare([1.0, 2.0, 1.2], [1.5, 2.4, 1.5], 1.25)
    assert out["baseline_median_s"] == 1.2 and out["run_median_s"] == 1.5
    assert out["ratio"] == pytest.approx(1.25) and out["overhead_beyond_prediction"] == pytest.approx(0.0)
    assert out["pair_ratios"] == pytest.approx([1.5, 1.2, 1.25])
    assert out["pair_ratio_median"] == pytest.approx(1.25)
    assert compare([1.0], [1.5], 1.25)["overhead_beyond_prediction"] == pytest.approx(0.2)
    with pytest.raises(ValueError, match="as many baseline as run"):
        compare([1.0, 1.0], [1.0], 1.0)


def test_step_spread_takes_each_steps_slowest_rank_after_the_first():
    """A straggler on one rank (rank 1, step 4) is the job's step time there; the warm-up step is left out."""
    spread = bench_train.step_spread([[9.0, 1.0, 1.1, 1.0, 1.2, 1.0], [9.0, 1.1, 1.0, 3.0, 1.0, 1.0]])
    assert spread["median"] == 1.1 and spread["max"] == 3.0
    assert spread["p90"] == pytest.approx(1.2 + 0.6 * (3.0 - 1.2))  # [1, 1.1, 1.1, 1.2, 3.0] at 0.9, linear
    assert bench_train.step_spread([[2.0]]) == {"median": 2.0, "p90": 2.0, "max": 2.0}


def test_threads_per_rank_honours_the_flag_then_omp_num_threads_then_divides_the_cores():
    assert threads_per_rank(3, {"OMP_NUM_THREADS": "1"}, 2, 1) == 3
    assert threads_per_rank(None, {"OMP_NUM_THREADS": "1"}, 2, 1) == 1
    assert threads_per_rank(None, {}, 2, 1) == 2 and threads_per_rank(None, {}, 2, 4) == 1
    for requested, env, message in ((0, {}, "--threads 0"), (None, {"OMP_NUM_THREADS": "two"}, "OMP_NUM_THREADS='two'"),
                                    (None, {"OMP_NUM_THREADS": "0"}, "OMP_NUM_THREADS='0'")):
        with pytest.raises(ValueError, match=message):
            threads_per_rank(requested, env, 2, 1)


def _args(**kw) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench_train_cli.add_arguments(parser)
    args = parser.parse_args([SWIN] + [f"--set={s}" for s in SMALL + ["model.n_layers=4", "parallel.pp=2"]])
    args.bench_cmd = "train"  # what the `bench` subparser records: the dispatch reads it
    for k, v in kw.items():
        setattr(args, k, v)
    return args


@pytest.mark.parametrize("kw, message", [
    ({"repeats": 3}, "--repeats 3: needs a baseline"),
    ({"repeats": 0, "baseline_overrides": ["parallel.pp=1"]}, "--repeats 0"),
    ({"baseline_overrides": ["model.n_layers=2", "parallel.pp=1"], "baseline_nproc": 2}, "baseline: --nproc 2"),
    ({"steps": 1, "baseline_nproc": 1}, "train.steps = 1"),
    ({"png": "x.png"}, "--png x.png: plots a comparison"),
])
def test_bad_arguments_are_refused_before_any_rank_starts(kw, message, monkeypatch):
    def no_launch(*a, **k):
        raise AssertionError("ranks were started")

    monkeypatch.setattr(bench_train, "run_ranks", no_launch)
    with pytest.raises(ValueError, match=message):
        _run_bench(_args(**kw))


def test_work_ratio_leaves_the_bubble_out():
    pp1, pp2 = _cfg("model.n_layers=2"), _cfg("model.n_layers=4", "parallel.pp=2")
    assert predicted_ratio(pp2, pp1, with_bubble=False) == pytest.approx(1.0)
    assert step_units(pp2, with_bubble=False) * 5 / 4 == pytest.approx(step_units(pp2))


def test_rank_stats_record_cpu_data_seconds_and_held_state(tmp_path, monkeypatch):
    """The bench's "cpu" column: the process's CPU seconds per step, next to wall time and blocked comm; its
    "data" column as the trainer reported it; the parameter and optimizer bytes the engine holds."""
    module = torch.nn.Linear(4, 3)  # 15 fp32 parameters
    optimizer = torch.optim.AdamW(module.parameters())
    module(torch.ones(1, 4)).sum().backward()
    optimizer.step()  # AdamW state per tensor: exp_avg, exp_avg_sq (its shape) and step (a scalar)
    monkeypatch.setenv(ENV, "1")
    stats = RankStats.start(tmp_path, 0)
    for _ in range(2):
        t0, c0 = time.perf_counter(), time.process_time()
        spins = 0
        while time.process_time() - c0 < 0.02:  # busy: CPU time advances with wall time
            spins += 1
        stats.step(time.perf_counter() - t0, 0.01)
    time.sleep(0.05)  # idle between steps: wall time only
    stats.step(0.05, 0.02)
    stats.finish(0, SimpleNamespace(module=module, optimizer=optimizer))
    rec = json.loads((tmp_path / "rank_stats" / "rank_0.json").read_text())
    assert len(rec["cpu_s"]) == 3 and all(c >= 0.02 for c in rec["cpu_s"][:2]), rec
    assert rec["cpu_s"][2] < 0.04, rec
    assert rec["data_s"] == [0.01, 0.01, 0.02], rec
    assert rec["param_bytes"] == 15 * 4 and rec["optim_bytes"] == 2 * 15 * 4 + 2 * 4, rec


def test_paired_plot_writes_a_png_from_a_recorded_comparison(tmp_path):
    """The PNG of ``--png``, drawn from a stored record (docs/benchmarks/swin_pipeline/), not a timed run."""
    record = json.loads((Path(__file__).resolve().parent.parent / "docs" / "benchmarks" / "swin_pipeline" /
                         "pp2_vs_dp2.json").read_text())
    plot_paired(record, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_measured_run_never_resumes_from_or_saves_into_the_configs_checkpoint_dir(tmp_path, monkeypatch):
    """`bench train` runs the user's config in a temporary run.dir, but a checkpoint.dir outside run.dir stayed the
    config's: the measured run resumed the real run's checkpoint (measuring from there), and a stop (exit_interval,
    a SIGTERM) saved into it — pruning the real run's checkpoints with its keep_last. Now it starts from scratch in
    its own directory and leaves the config's checkpoint dir byte for byte alone."""
    real = tmp_path / "real_ckpts"
    base = ["data.source=synthetic", "parallel.dp=1", "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1",
            "data.seq_len=32", "train.global_batch=2", "train.micro_batch=2", "train.peak_tflops=1.0",
            "train.progress=false", f"checkpoint.dir={real}", "checkpoint.keep_last=1"]
    train_cfg = load_config("configs/gpt_tiny.yaml", base + [f"run.dir={tmp_path / 'real'}", "train.steps=2",
                                                              "checkpoint.at_end=true"])
    train(train_cfg)
    before = {p.relative_to(real).as_posix(): p.read_bytes() for p in real.rglob("*") if p.is_file()}
    assert "step_2/manifest.json" in before
    # _train_rank sets the variable for its (here: this) process; setenv makes monkeypatch unset it again afterwards,
    # where a delenv of an unset variable records nothing and the "1" leaked into later tests' runs
    monkeypatch.setenv(ENV, "0")
    rec = bench_train._train_rank(0, 1, "configs/gpt_tiny.yaml", base + ["train.steps=4", "train.exit_interval=1"],
                                  str(tmp_path / "bench_run"))
    assert rec["summary"]["start_step"] == 0, rec["summary"]
    after = {p.relative_to(real).as_posix(): p.read_bytes() for p in real.rglob("*") if p.is_file()}
    assert after == before


def test_a_baseline_without_a_pipeline_drops_the_runs_pipeline_keys():
    """`--set parallel.pp_schedule=gpipe` (the documented pp2 GPipe vs pp1 pair) applies to the baseline too, whose
    `--baseline-set parallel.pp=1` leaves nothing to read it: the baseline takes the pipeline keys' defaults (a
    refusal otherwise), the run keeps them, an explicit --baseline-set still wins."""
    args = _args(overrides=SMALL + ["model.n_layers=4", "parallel.pp=2", "parallel.pp_schedule=gpipe",
                                    "parallel.microbatches=2"], baseline_overrides=["model.n_layers=2", "parallel.pp=1"])
    plan = bench_train_cli.check(args)
    run, base = plan.run.cfg.parallel, plan.baseline.cfg.parallel
    assert (run.pp, run.pp_schedule, run.microbatches) == (2, "gpipe", 2)
    assert (base.pp, base.pp_schedule, base.microbatches) == (1, "1f1b", None)
    args.baseline_overrides = ["model.n_layers=2", "parallel.pp=1", "parallel.pp_schedule=interleaved"]
    with pytest.raises(ValueError, match=r"^parallel.pp_schedule = 'interleaved': only the pipeline engine"):
        bench_train_cli.check(args)
    args = _args(overrides=SMALL + ["model.n_layers=4", "parallel.dp=2", "parallel.fsdp=true",
                                    "parallel.fsdp_reshard_after_forward=false"],
                 baseline_overrides=["parallel.fsdp=false"])
    assert bench_train_cli.check(args).baseline.cfg.parallel.fsdp_reshard_after_forward is True


def test_a_ring_baseline_drops_the_runs_all_to_all_degree():
    """A hybrid run against a ring baseline (`--baseline-set parallel.cp_method=ring`): the ring never reads the run's
    parallel.ulysses_degree, so the baseline takes its default (it was refused as unread); the run keeps it."""
    args = _args(config="configs/gpt_tiny.yaml", overrides=[
        "data.source=synthetic", "parallel.dp=1", "parallel.cp=4", "parallel.cp_method=hybrid",
        "parallel.ulysses_degree=2"], baseline_overrides=["parallel.cp_method=ring"])
    plan = bench_train_cli.check(args)
    assert (plan.run.cfg.parallel.cp_method, plan.run.cfg.parallel.ulysses_degree) == ("hybrid", 2)
    assert (plan.baseline.cfg.parallel.cp_method, plan.baseline.cfg.parallel.ulysses_degree) == ("ring", 1)

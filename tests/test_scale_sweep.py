"""dist-train scale: sweep parsing and its errors, efficiency arithmetic, resumption, failed points, and a
real 2-point sweep end to end."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dist_train.cli import main
from dist_train.plan.report import (add_efficiency, efficiency, error_summary, markdown_table, memory_axis,
                                    write_outputs)
from dist_train.plan.sweep import classify_failure, expand, launch_command, load_sweep, point_config, run_sweep

ROOT = Path(__file__).resolve().parents[1]
BASE = {"model": {"kind": "gpt", "d_model": 32, "n_layers": 1, "n_heads": 2, "vocab_size": 64},
        "data": {"source": "synthetic", "seq_len": 64},
        "train": {"global_batch": 2, "micro_batch": 2, "warmup_steps": 1},
        "checkpoint": {"at_end": False}}


def write_sweep(tmp: Path, **sweep) -> Path:
    (tmp / "base.yaml").write_text(yaml.safe_dump(BASE))
    data = {"base": "base.yaml", "mode": "strong", "world_sizes": [1, 2], "scale": "cp"}
    data.update(sweep)
    data = {k: v for k, v in data.items() if v is not None}
    p = tmp / "sweep.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


@pytest.mark.parametrize("sweep, message", [
    ({"mode": "linear"}, "mode = 'linear': valid modes are strong, weak, sequence-weak, grid"),
    ({"scale": "ep"}, "scale = 'ep': valid axes are dp, cp, tp, pp, wp"),
    ({"world_sizes": []}, "world_sizes = []: mode strong needs a non-empty list"),
    ({"world_sizes": [1, 0]}, "world_sizes[] = 0: expected an integer >= 1"),
    ({"base": "missing.yaml"}, "base = 'missing.yaml': no such file"),
    ({"axes": {"cp_layout": ["zigzag"]}}, "axes key 'cp_layout': expected a dotted config key"),
    ({"axes": {"parallel.cp_layout": []}}, "axes.parallel.cp_layout = []: expected a non-empty list"),
    ({"launcher": "slurm"}, "launcher = 'slurm': valid launchers are local, ray, mpi, torchrun"),
    ({"warmup": 3}, "unknown key 'warmup'; valid keys:"),
    ({"timeout_s": -1}, "timeout_s = -1: expected a positive number"),
    ({"world_sizes": [1, 3], "set": ["data.seq_len=64"], "axes": {"parallel.tp": [2]}},
     "point world_size=1 {'parallel.tp': 2}: the layout spans 2 devices"),
    ({"axes": {"parallel.cp_layout": ["diagonal"]}}, "parallel.cp_layout = 'diagonal': valid values are"),
    ({"mode": "grid", "world_sizes": None}, "mode grid needs axes"),
    ({"set": ["profile.steps=[1,2]"]}, "point {'world_size': 1}: profile.steps = [1, 2]: dist-train scale times every "
                                       "measured step (a traced step's time includes the profiler's overhead); trace "
                                       "steps with dist-train launch (run.dir/profile/)"),
    ({"axes": {"profile.steps": [None, [1, 1]]}}, "point {'profile.steps': [1, 1], 'world_size': 1}: profile.steps"),
])
def test_sweep_validation_errors_are_one_line(tmp_path, sweep, message):
    with pytest.raises(ValueError) as e:
        load_sweep(write_sweep(tmp_path, **sweep))
    text = str(e.value)
    assert message in text and "\n" not in text and str(tmp_path / "sweep.yaml") in text


def test_scale_refuses_a_profiled_sweep_in_one_line_before_any_point_runs(tmp_path, capsys):
    """A traced step's time carries the profiler's overhead into the point's medians: `dist-train scale` (its dry run
    too) refuses a profiled config as bench train and bench launch do (config.check_unprofiled), exit 2, nothing run;
    it measured the traced steps as any other before."""
    sweep = write_sweep(tmp_path)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({**BASE, "profile": {"steps": [1, 2]}}))
    for dry in ([], ["--dry-run"]):
        assert main(["scale", str(sweep), "--out", str(tmp_path / "out"), "--no-progress", *dry]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "profile.steps = [1, 2]: dist-train scale times every measured step" in err, err
    assert not (tmp_path / "out").exists()


def test_expand_modes(tmp_path):
    spec = load_sweep(write_sweep(tmp_path, axes={"parallel.cp_layout": ["contiguous", "zigzag"]}))
    pts = expand(spec)
    assert [(p.world_size, p.series["parallel.cp_layout"]) for p in pts] == [
        (1, "contiguous"), (2, "contiguous"), (1, "zigzag"), (2, "zigzag")]
    assert "parallel.cp=2" in pts[1].overrides and len({p.id for p in pts}) == 4
    weak = expand(load_sweep(write_sweep(tmp_path, mode="weak", scale="dp", world_sizes=[1, 2])))
    assert [p.params["train.global_batch"] for p in weak] == [2, 4]
    seq = expand(load_sweep(write_sweep(tmp_path, mode="sequence-weak", world_sizes=[1, 2, 4])))
    assert [p.params["data.seq_len"] for p in seq] == [64, 128, 256]
    grid = expand(load_sweep(write_sweep(tmp_path, mode="grid", world_sizes=None, set=["train.micro_batch=1"],
                                         axes={"parallel.dp": [1, 2], "data.seq_len": [32, 64]})))
    assert sorted((p.world_size, p.params["data.seq_len"]) for p in grid) == [(1, 32), (1, 64), (2, 32), (2, 64)]


def test_efficiency_arithmetic():
    base = {"world_size": 1, "step_time_s": 1.0, "flops_per_step": 100.0}
    # strong: fixed problem, 2 devices at 0.625 s: 1*1 / (0.625*2) = 0.8
    assert efficiency("strong", base, {"world_size": 2, "step_time_s": 0.625, "flops_per_step": 100.0}) == 0.8
    # weak: twice the work in 1.25 s on 2 devices: (200/1.25/2) / (100/1/1) = 0.8
    assert efficiency("weak", base, {"world_size": 2, "step_time_s": 1.25, "flops_per_step": 200.0}) == 0.8
    # sequence-weak on FLOPs: 2x sequence -> 3x FLOPs in 2 s on 2 devices: (300/2/2)/100 = 0.75
    assert efficiency("sequence-weak", base, {"world_size": 2, "step_time_s": 2.0, "flops_per_step": 300.0}) == 0.75
    assert efficiency("grid", base, base) is None
    recs = [dict(base, status="ok", series={"a": 1}), {"world_size": 4, "step_time_s": 0.5, "status": "ok",
                                                        "series": {"a": 1}, "flops_per_step": 100.0},
            {"world_size": 2, "status": "failed", "series": {"a": 1}},
            {"world_size": 2, "step_time_s": 1.0, "status": "ok", "series": {"a": 2}, "flops_per_step": 1.0}]
    add_efficiency("strong", recs)
    assert [r["efficiency"] for r in recs] == [1.0, 0.5, None, 1.0]   # each series against its own smallest N
    errs = error_summary([{"status": "ok", "step_error": -0.1, "mem_error": 0.02},
                          {"status": "ok", "step_error": 0.3, "mem_error": -0.04},
                          {"status": "ok", "step_error": 0.2, "mem_error": 0.0}])
    assert errs["step_error"]["median_abs"] == pytest.approx(0.2) and errs["mem_error"]["max_abs"] == 0.04


def fake_runner(calls: list, fail_world: int | None = None, timeout_world: int | None = None):
    """Stands in for the launcher: writes what the trainer writes (rank_stats, summary) or fails."""
    def run(argv, env, timeout, log):
        world = int(argv[argv.index("--nproc") + 1])
        calls.append(world)
        assert env["DIST_TRAIN_RANK_STATS"] == "1" and env["OMP_NUM_THREADS"] == "1"
        if world == timeout_world:
            return None, "", True
        if world == fail_world:
            return 1, "Traceback ...\nRuntimeError: ring step 3 exploded\n", False
        run_dir = Path(next(a.split("=", 1)[1] for a in argv if a.startswith("run.dir=")))
        (run_dir / "rank_stats").mkdir(parents=True)
        for r in range(world):
            steps = [9.0, 9.0] + [0.5 / world * (1 + 0.1 * r)] * 4
            (run_dir / "rank_stats" / f"rank_{r}.json").write_text(json.dumps(
                {"rank": r, "step_times_s": steps, "comm_wait_s": [0.0] * 2 + [0.01 * r] * 4,
                 "peak_mem_bytes": 1000 + r}))
        (run_dir / "summary.json").write_text(json.dumps({"device_peak_tflops": 0.1, "final_loss": 3.0}))
        return 0, "ok", False
    return run


def test_resumption_and_failed_points(tmp_path):
    spec = load_sweep(write_sweep(tmp_path, world_sizes=[1, 2, 4], warmup_steps=2, measure_steps=4))
    out = tmp_path / "out"
    calls: list = []
    recs = run_sweep(spec, out, progress=False, runner=fake_runner(calls, fail_world=2, timeout_world=4),
                     log=lambda m: None)
    assert calls == [1, 2, 4]
    ok, failed, timed_out = recs
    assert ok["status"] == "ok" and ok["step_time_s"] == 0.5 and ok["measured_steps"] == 4   # warm-up excluded
    assert failed["status"] == "failed" and failed["reason"] == "crash (exit 1): RuntimeError: ring step 3 exploded"
    assert timed_out["reason"] == "timeout"
    # rerun: every point is finished (ok or failed) -> nothing runs
    calls.clear()
    assert [r["status"] for r in run_sweep(spec, out, progress=False, runner=fake_runner(calls),
                                           log=lambda m: None)] == ["ok", "failed", "failed"]
    assert calls == []
    # --retry-failed reruns only the failed points, and they now succeed
    recs = run_sweep(spec, out, retry_failed=True, progress=False, runner=fake_runner(calls), log=lambda m: None)
    assert calls == [2, 4] and all(r["status"] == "ok" for r in recs)
    two = recs[1]
    assert two["straggler_spread"] == pytest.approx(1.1 / 1.0 * (1 - 0.0) / (1 - 0.0), rel=0.2)
    assert two["per_rank_peak_mem_bytes"] == [1000, 1001] and two["peak_mem_bytes"] == 1001
    assert 0 < two["exposed_comm_fraction"] < 0.05


def test_classify_failure():
    assert classify_failure(None, "", True) == "timeout"
    assert classify_failure(-9, "", False) == "oom"
    assert classify_failure(1, "RuntimeError: DefaultCPUAllocator: can't allocate memory: out of memory", False) == "oom"
    assert classify_failure(2, "dist-train: error: parallel.cp = 3 ...", False).startswith("invalid: dist-train: error")


@pytest.mark.slow
def test_real_two_point_sweep_end_to_end(tmp_path):
    """1 rank and 2 ranks (cp=2, zigzag ring) through `dist-train scale` and the local launcher."""
    sweep = write_sweep(tmp_path, world_sizes=[1, 2], warmup_steps=1, measure_steps=2, launcher="local",
                        timeout_s=150)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "dist_train", "scale", str(sweep), "--out", str(out), "--no-progress",
                        "--device", "cpu"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    pts = res["points"]
    assert [p["status"] for p in pts] == ["ok", "ok"], [p.get("reason") for p in pts]
    one, two = pts
    assert one["efficiency"] == 1.0 and 0 < two["efficiency"] < 2
    assert len(two["per_rank_peak_mem_bytes"]) == 2 and two["exposed_comm_fraction"] > 0   # ring p2p waits seen
    for p in pts:
        assert p["measured_steps"] == 2 and p["pred_peak_mem_bytes"] > 0 and p["mfu"] > 0
    for name in ("results.csv", "results.md", "efficiency.png", "throughput.png", "memory.png",
                 "aggregate_loglog.png"):
        assert (out / name).stat().st_size > 0
    assert "6N + 12*L*d_attn*S_eff" in (out / "results.md").read_text()
    # each point names its layout (the table's "n2" alone did not say what ran), in the table, CSV and JSON
    assert one["layout"] == "mb2" and two["layout"].startswith("cp2 "), (one["layout"], two["layout"])
    assert f"| n2 | 2 | {two['layout']} |" in (out / "results.md").read_text()
    assert (out / "results.csv").read_text().splitlines()[0].startswith("id,status,world_size,layout,varied,")


def test_memory_plot_is_against_sequence_length_only_when_the_sweep_varies_it():
    """A dp/wp/pp sweep at one sequence length drew every point on one vertical line of memory.png."""
    one_length = [{"seq_len": 8192, "world_size": n} for n in (1, 2, 4)]
    assert memory_axis(one_length, "world_size") == ("world_size", "devices")
    assert memory_axis(one_length, "point_index") == ("point_index", "point")
    growing = [{"seq_len": 1024 * n, "world_size": n} for n in (1, 2, 4)]
    assert memory_axis(growing, "world_size") == ("seq_len", "sequence length (tokens)")


def test_every_shipped_sweep_loads_and_expands():
    """The example sweeps in configs/sweeps/ stay valid as their base configs change."""
    files = sorted(Path("configs/sweeps").glob("*.yaml"))
    assert files
    for f in files:
        assert expand(load_sweep(f)), f


def test_a_point_checkpoints_in_its_own_run_dir_from_scratch(tmp_path):
    """A base config whose checkpoint.dir lies outside run.dir names a real run's checkpoints: a point ran with
    resume=none there, so it was refused (the dir holds checkpoints), or, once that run had none yet, saved beside
    it. Every point gets its own checkpoint dir under its run dir."""
    spec = load_sweep(write_sweep(tmp_path))
    point = expand(spec)[0]
    argv = launch_command(spec, point, tmp_path / "p0")
    assert f"checkpoint.dir={tmp_path / 'p0' / 'checkpoints'}" in argv and "checkpoint.resume=none" in argv


def test_a_pp_sweeps_point_without_a_pipeline_drops_the_pipeline_keys(tmp_path):
    """The base's parallel.microbatches / pp_schedule are read only with pp > 1 (validation refuses them unread): the
    sweep's pp = 1 point takes their defaults, the pipelined points keep them."""
    spec = load_sweep(write_sweep(tmp_path, scale="pp", world_sizes=[1, 2],
                                  set=["model.n_layers=2", "parallel.pp=2", "parallel.microbatches=2",
                                       "parallel.pp_schedule=gpipe"]))
    points = {p.world_size: point_config(spec, p).parallel for p in expand(spec)}
    assert (points[1].pp, points[1].microbatches, points[1].pp_schedule) == (1, None, "1f1b")
    assert (points[2].pp, points[2].microbatches, points[2].pp_schedule) == (2, 2, "gpipe")


def test_a_sweeps_description_heads_its_results(tmp_path):
    """The sweep file's `description` (accepted, and read by nothing before) is the results' second line and in
    results.json's meta; without one the table is as before."""
    meta = {"name": "s", "mode": "strong", "flop_convention": "6N", "efficiency_definition": "e", "device": "cpu",
            "command": "dist-train scale s.yaml", "description": "cp strong scaling at 1k tokens"}
    lines = markdown_table([], meta).splitlines()
    assert lines[:3] == ["# Sweep `s` (strong scaling)", "", "cp strong scaling at 1k tokens"]
    assert markdown_table([], {**meta, "description": ""}).splitlines()[2].startswith("FLOP convention")
    assert load_sweep(write_sweep(tmp_path, description="cp strong")).description == "cp strong"


def test_a_grid_point_without_a_pipeline_or_fsdp_drops_their_keys(tmp_path):
    spec = load_sweep(write_sweep(tmp_path, mode="grid", world_sizes=None, scale=None,
                                  axes={"parallel.pp": [1, 2], "parallel.fsdp": [False, True]},
                                  set=["model.n_layers=2", "parallel.dp=2", "train.global_batch=4",
                                       "train.micro_batch=1", "parallel.pp=2", "parallel.pp_schedule=gpipe",
                                       "parallel.fsdp=true",
                                       "parallel.fsdp_reshard_after_forward=false"]))
    got = {(p.series["parallel.pp"], p.series["parallel.fsdp"]): point_config(spec, p).parallel for p in expand(spec)}
    assert {k: (v.pp_schedule, v.fsdp_reshard_after_forward) for k, v in got.items()} == {
        (1, False): ("1f1b", True), (1, True): ("1f1b", False), (2, False): ("gpipe", True), (2, True): ("gpipe", False)}


def test_a_grid_of_cp_methods_gives_the_ring_point_the_default_all_to_all_degree(tmp_path):
    """Ring vs hybrid in one grid: the hybrid needs parallel.ulysses_degree, which the ring never reads (refused there
    as unread): the ring point takes its default."""
    spec = load_sweep(write_sweep(tmp_path, mode="grid", world_sizes=None, scale=None,
                                  axes={"parallel.cp_method": ["ring", "hybrid"]},
                                  set=["parallel.dp=1", "parallel.cp=4", "parallel.cp_method=hybrid",
                                       "parallel.ulysses_degree=2",
                                       "train.global_batch=1", "train.micro_batch=1"]))
    got = {p.series["parallel.cp_method"]: point_config(spec, p).parallel.ulysses_degree for p in expand(spec)}
    assert got == {"ring": 1, "hybrid": 2}


def test_a_strong_cp_sweeps_one_rank_point_takes_the_default_all_to_all_degree(tmp_path):
    """The cp = 1 point of a cp sweep whose base runs a hybrid all-to-all of degree 2: nothing splits heads at cp 1
    (degree 2 is refused there), so the point takes the degree's default; the others keep it."""
    spec = load_sweep(write_sweep(tmp_path, world_sizes=[1, 2, 4], set=[
        "parallel.cp=4", "parallel.cp_method=hybrid", "parallel.ulysses_degree=2", "model.n_heads=4",
        "train.global_batch=1", "train.micro_batch=1"]))
    got = {p.world_size: point_config(spec, p).parallel for p in expand(spec)}
    assert {n: (p.cp, p.ulysses_degree) for n, p in got.items()} == {1: (1, 1), 2: (2, 2), 4: (4, 2)}


def test_a_sweeps_base_may_set_the_pipeline_keys_its_pipelined_points_read(tmp_path):
    """A pp weak-scaling sweep from pp = 1 (like configs/sweeps/swin_wp_pp_weak.yaml) giving its pipelined points
    parallel.microbatches: the base (pp = 1) was refused as not reading it; now each point is checked as it is, the
    pp = 1 point taking the default."""
    spec = load_sweep(write_sweep(tmp_path, scale="pp", world_sizes=[1, 2],
                                  set=["model.n_layers=2", "parallel.microbatches=2", "parallel.pp_schedule=gpipe"]))
    points = {p.world_size: point_config(spec, p).parallel for p in expand(spec)}
    assert (points[1].pp, points[1].microbatches, points[1].pp_schedule) == (1, None, "1f1b")
    assert (points[2].pp, points[2].microbatches, points[2].pp_schedule) == (2, 2, "gpipe")

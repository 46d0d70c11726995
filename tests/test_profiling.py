"""profile.* (dist_train/profiling.py): each traced rank's Chrome trace holds exactly the requested global steps, the
losses are bit-identical with and without profiling, restarts never overwrite a trace, bad settings are refused in
one line before any rank starts; the CUDA memory snapshot's calls, in order, with torch's memory API stood in."""
from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import logging
import shutil
import time
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as dist

from dist_train import profiling
from dist_train.bench.cli.launch import check as bench_launch_check
from dist_train.bench.cli.train import check as bench_train_check
from dist_train.config import ConfigError
from dist_train.lifecycle import TrainingDiverged
from dist_train.preflight import preflight
from dist_train.profiling import MEMORY_SUFFIX, TRACE_SUFFIX, StepProfiler, Window
from dist_train.trainer import train
from launchers.cli import launch_settings
from tests.dist_harness import run_ranks
from tests.trainer_utils import tiny_gpt_config


def _traced_steps(path: Path) -> list[int]:
    """The N of every ``ProfilerStep#N`` span in a gzipped Chrome trace (parsed as JSON), in order."""
    events = json.loads(gzip.decompress(path.read_bytes()))["traceEvents"]
    return sorted(int(e["name"].split("#")[1]) for e in events if e.get("name", "").startswith("ProfilerStep#"))


def _traces(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "profile").iterdir())


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory) -> tuple[Path, list[float]]:
    """(run dir, losses) of the 4-step one-rank run without profiling that the profiled runs must equal bit for bit
    (trained once for the module: each test trained the same run again)."""
    run = tmp_path_factory.mktemp("profiling") / "plain"
    return run, train(tiny_gpt_config(run, steps=4)).losses


def test_one_rank_traces_exactly_the_window_and_trains_the_same(tmp_path, capfd, plain_run):
    plain_dir, plain = plain_run
    run = tmp_path / "profiled"
    profiled = train(tiny_gpt_config(run, steps=4, profile={"steps": [2, 3], "record_shapes": True}))
    assert profiled.losses == plain  # bit-identical: profiling observes, it computes nothing
    assert _traces(run) == [f"rank_0_steps_2-3{TRACE_SUFFIX}"]
    assert _traced_steps(run / "profile" / f"rank_0_steps_2-3{TRACE_SUFFIX}") == [2, 3]  # not the warmup step 1
    out = capfd.readouterr()
    said = [line for line in out.out.splitlines() if line.startswith("profile:")]
    assert said == [f"profile: steps 2-3 traced on every rank into {run / 'profile'}/ (e.g. rank_0_steps_2-3"
                    f"{TRACE_SUFFIX}: ui.perfetto.dev or chrome://tracing); top operators in each traced rank's log; "
                    "the files in summary.json's profile_files"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["profile_files"] == [f"profile/rank_0_steps_2-3{TRACE_SUFFIX}"]  # relative to the run dir
    assert json.loads((plain_dir / "summary.json").read_text())["profile_files"] == []
    assert "USDT:" not in out.err  # libkineto's start/stop lines are held back
    log = (run / "logs" / "rank_0.log").read_text()
    table = log.split("the top 15 operators by self CPU time", 1)[1]
    assert "aten::" in table and "Self CPU time total" in table  # the key-averages table, in the log only
    assert "Self CPU time total" not in out.out


def test_a_run_stopped_inside_the_window_lists_the_steps_it_traced(tmp_path):
    """train.exit_interval stops the run after step 2 of the window [2, 3] (every rank at the same step, the trainer's
    step_ends(stopping=True)): the trace holds step 2, the console line and summary.json name it."""
    run = tmp_path / "run"
    result = train(tiny_gpt_config(run, steps=3, train={"exit_interval": 2}, profile={"steps": [2, 3]}))
    assert len(result.losses) == 2
    name = f"rank_0_steps_2-2{TRACE_SUFFIX}"
    assert _traces(run) == [name] and _traced_steps(run / "profile" / name) == [2]
    assert json.loads((run / "summary.json").read_text())["profile_files"] == [f"profile/{name}"]
    assert f"profile: steps 2-2 traced on every rank into {run / 'profile'}/ (e.g. {name}:" in (
        run / "logs" / "rank_0.log").read_text()


def _raises(*args, **kwargs):
    raise RuntimeError("kineto: trace export failed\nsecond line of the C++ error")


@pytest.mark.parametrize("failing", ["start", "export_chrome_trace", "key_averages"])
def test_a_profiler_failure_is_one_warning_and_the_run_trains_on(failing, tmp_path, monkeypatch, plain_run):
    """torch.profiler's own code failing (its start at the warmup step, the trace's export, the operator table) ends
    the profiling of that rank, never the training it observes: one warning line in the rank's log, the same losses
    as without profiling, nothing more traced (a trace exported before the table failed stays). Only OSError was caught before: the RuntimeError ended the run."""
    _, plain = plain_run
    monkeypatch.setattr(profiling.profile, failing, _raises)
    run = tmp_path / "profiled"
    profiled = train(tiny_gpt_config(run, steps=4, profile={"steps": [2, 3]}))
    assert profiled.exit_code == 0 and profiled.losses == plain
    warnings = [line for line in (run / "logs" / "rank_0.log").read_text().splitlines()
                if "profile:" in line and "failed on rank 0" in line]
    assert len(warnings) == 1 and warnings[0].endswith("(RuntimeError: kineto: trace export failed); it traces "
                                                       "nothing more, the training goes on"), warnings
    written = _traces(run) if (run / "profile").exists() else []
    assert written == ([f"rank_0_steps_2-3{TRACE_SUFFIX}"] if failing == "key_averages" else []), written
    # its console line says what is there: it said "traced on every rank" after the warning, with no trace written
    said = [line.split(" ", 3)[-1] for line in (run / "logs" / "rank_0.log").read_text().splitlines()
            if "profile: steps 2-3" in line and "operators by self" not in line]
    summary = json.loads((run / "summary.json").read_text())
    if failing == "key_averages":
        assert len(said) == 1 and "traced on every rank" in said[0], said
        assert summary["profile_files"] == [f"profile/rank_0_steps_2-3{TRACE_SUFFIX}"]
    else:
        assert said == ["profile: steps 2-3: no rank wrote a trace (see the warnings in the ranks' logs)"], said
        assert summary["profile_files"] == []


def test_a_profiler_failing_as_a_diverged_run_closes_leaves_the_divergence_to_end_it(tmp_path, monkeypatch):
    """The trainer's ``finally`` closes the profiler of a window the run left early; its export failing there replaced
    the run's TrainingDiverged (exit 3: a restart would replay the same steps into it) by a RuntimeError."""
    monkeypatch.setattr(profiling.profile, "export_chrome_trace", _raises)
    cfg = tiny_gpt_config(tmp_path / "run", steps=8, train={"lr": 1e6, "warmup_steps": 0}, profile={"steps": [1, 8]})
    with pytest.raises(TrainingDiverged, match="train.on_nonfinite = stop"):
        train(cfg)
    assert "profile: writing steps 1-" in (tmp_path / "run" / "logs" / "rank_0.log").read_text()


def _drive(cfg, run_dir: Path, rank: int = 0, start_step: int = 0, is_main: bool = True,
           log: logging.Logger = logging.getLogger("test_profiling"), on_step=None, peers=None,
           stop_after: int | None = None, fail_after: int | None = None) -> StepProfiler:
    """A StepProfiler through the steps after ``start_step`` of ``cfg``, each a small matmul (no model; ``peers``:
    the ranks' group, None: one rank). ``stop_after``: the ranks' agreed stop after that step; ``fail_after``: the run
    fails after that step (the trainer's finally closes the profiler, no step_ends)."""
    prof = StepProfiler.start(cfg, rank, run_dir, start_step, torch.device("cpu"), log, is_main, peers=peers)
    x = torch.randn(32, 32)
    for step in range(start_step + 1, cfg.train.steps + 1):
        prof.step_begins(step)
        (x @ x).sum()
        if on_step:
            on_step(step)
        if step == fail_after:
            break
        prof.step_ends(step, stopping=step == stop_after)
        if step == stop_after:
            break
    prof.close()
    return prof


def test_the_first_step_is_traced_without_a_warmup_step(tmp_path):
    _drive(tiny_gpt_config(tmp_path, steps=2, profile={"steps": [1, 1]}), tmp_path)
    assert _traced_steps(tmp_path / "profile" / f"rank_0_steps_1-1{TRACE_SUFFIX}") == [1]


class _Lines(logging.Handler):
    """The records a logger emits, as (level name, message)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.levelname, record.getMessage()))


#: name -> (profile section, train.steps, the rank(s) whose trace export fails, stop_after, fail_after)
_WINDOWS = {
    "rank_1_only": ({"steps": [3, 4], "ranks": [1]}, 4, (), None, None),
    "rank_0_fails": ({"steps": [1, 2]}, 2, (0,), None, None),
    "rank_1_fails": ({"steps": [1, 2]}, 2, (1,), None, None),
    "stopped_inside": ({"steps": [2, 4]}, 4, (), 3, None),
    "failed_inside": ({"steps": [1, 3]}, 3, (), None, 2),
}


def _windows_on_two_ranks(rank: int, world: int, root: str) -> dict:
    """Every rank, over the default (gloo) group as the host group: each window of :data:`_WINDOWS` in its own run
    dir -> {name: (this rank's ``files``, the profile lines it logged)}."""
    out = {}
    for name, (section, steps, failing, stop_after, fail_after) in _WINDOWS.items():
        cfg = tiny_gpt_config(f"{root}/{name}", steps=steps, profile=section, parallel={"dp": 2})
        log = logging.getLogger(f"test_profiling.{name}.{rank}")
        lines = _Lines()
        log.addHandler(lines)
        log.setLevel(logging.INFO)
        log.propagate = False
        export = (mock.patch.object(profiling.profile, "export_chrome_trace", _raises) if rank in failing
                  else contextlib.nullcontext())
        with export:
            prof = _drive(cfg, Path(root) / name, rank=rank, is_main=rank == 0, log=log, peers=dist.group.WORLD,
                          stop_after=stop_after, fail_after=fail_after)
        out[name] = (prof.files, [(level, m) for level, m in lines.lines  # not the operator tables
                                  if m.startswith("profile: steps") and "operators by self" not in m])
    return out


def test_rank_0_says_which_ranks_wrote_their_traces_and_lists_every_ranks_files(tmp_path):
    """The window's end compares what each rank wrote (an all_gather over the host group, in place of the barrier): rank
    0's line names the ranks whose trace is there and the ones whose is not (it said "traced on every rank" after its
    own export had failed), and its ``files`` (summary.json's profile_files) are every rank's. A run that fails inside
    the window compares nothing (a failed rank must not wait): rank 0 then says only what it knows."""
    seen = run_ranks(_windows_on_two_ranks, 2, args=(str(tmp_path),), timeout=180)
    tail = "ui.perfetto.dev or chrome://tracing); top operators in each traced rank's log; the files in summary.json's " \
           "profile_files"

    def trace(r: int, steps: str) -> str:
        return f"profile/rank_{r}_steps_{steps}{TRACE_SUFFIX}"

    def folder(name: str) -> Path:
        return tmp_path / name / "profile"

    expected = {
        "rank_1_only": ([trace(1, "3-4")], [(
            "INFO", f"profile: steps 3-4 traced on rank(s) 1 into {folder('rank_1_only')}/ (e.g. rank_1_steps_3-4"
                    f"{TRACE_SUFFIX}: {tail}")]),
        "rank_0_fails": ([trace(1, "1-2")], [(
            "WARNING", f"profile: steps 1-2 traced on rank(s) 1 into {folder('rank_0_fails')}/ (e.g. rank_1_steps_1-2"
                       f"{TRACE_SUFFIX}: {tail}; rank(s) 0 wrote none (see its log)")]),
        "rank_1_fails": ([trace(0, "1-2")], [(
            "WARNING", f"profile: steps 1-2 traced on rank(s) 0 into {folder('rank_1_fails')}/ (e.g. rank_0_steps_1-2"
                       f"{TRACE_SUFFIX}: {tail}; rank(s) 1 wrote none (see its log)")]),
        "stopped_inside": ([trace(0, "2-3"), trace(1, "2-3")], [(
            "INFO", f"profile: steps 2-3 traced on every rank into {folder('stopped_inside')}/ (e.g. rank_0_steps_2-3"
                    f"{TRACE_SUFFIX}: {tail}")]),
        "failed_inside": ([trace(0, "1-2")], [(
            "INFO", f"profile: steps 1-2: rank 0 wrote rank_0_steps_1-2{TRACE_SUFFIX}; the traces of every rank go "
                    f"into {folder('failed_inside')}/ (ui.perfetto.dev or chrome://tracing), each rank's log says "
                    "whether its own was written")]),
    }
    for name, (files, lines) in expected.items():
        assert seen[0][name] == (files, lines), (name, seen[0][name])
        # rank 1 learns the same files (an all_gather) and prints nothing; after a failure, its own only
        own = [trace(1, "1-2")] if name == "failed_inside" else files
        assert seen[1][name] == (own, []), (name, seen[1][name])
        assert sorted(p.name for p in folder(name).glob("*")) == sorted(
            {Path(f).name for f in files + own}), name


def test_a_window_behind_the_resume_is_said_once_and_not_traced(tmp_path, caplog):
    cfg = tiny_gpt_config(tmp_path, steps=6, profile={"steps": [2, 3]})
    with caplog.at_level(logging.INFO, logger="test_profiling"):
        assert _drive(cfg, tmp_path, start_step=3).written is None
    assert [r.getMessage() for r in caplog.records] == [
        "profile.steps = [2, 3]: before this start's first step 4 (resumed at step 3), not traced"]
    assert not (tmp_path / "profile").exists()


def test_a_run_that_stops_inside_the_window_writes_the_steps_it_took(tmp_path):
    prof = StepProfiler.start(tiny_gpt_config(tmp_path, steps=6, profile={"steps": [2, 5]}), 0, tmp_path, 0,
                              torch.device("cpu"), logging.getLogger("test_profiling"), True)
    for step in (1, 2, 3):  # then an exit_interval stop, a preemption or a divergence: the trainer's finally closes
        prof.step_begins(step)
        prof.step_ends(step)
    prof.close()
    assert _traced_steps(prof.written) == [2, 3] and prof.written.name == f"rank_0_steps_2-3{TRACE_SUFFIX}"


def _two_ranks(rank, world, root):
    """Every rank: a dp=2 run without profiling, then one tracing steps 2-3 on every rank."""
    dp2 = {"parallel": {"dp": 2}}
    plain = train(tiny_gpt_config(f"{root}/plain", steps=3, **dp2)).losses
    return plain, train(tiny_gpt_config(f"{root}/every", steps=3, profile={"steps": [2, 3]}, **dp2)).losses


#: how long rank 0's trace takes to write in the window-end test (stretched: a large CUDA trace takes many seconds)
SLOW_WRITE_S = 0.5


def _window_end_on_two_ranks(rank: int, world: int, run_dir: str) -> tuple[list, float]:
    """Rank 0 alone traces (profile.ranks = [0]) and takes SLOW_WRITE_S longer to write; -> this rank's busy marks
    (what, enter, exit) and how long its step_ends of the window's last step took."""
    cfg = tiny_gpt_config(run_dir, steps=2, profile={"steps": [1, 2], "ranks": [0]}, parallel={"dp": 2})
    marks = []

    @contextlib.contextmanager
    def busy(what: str):
        entered = time.perf_counter()
        yield
        marks.append((what, entered, time.perf_counter()))

    prof = StepProfiler.start(cfg, rank, Path(run_dir), 0, torch.device("cpu"), logging.getLogger("test_profiling"),
                              rank == 0, busy, peers=dist.group.WORLD)
    if rank == 0:
        write = prof._write

        def slow_write(*args):
            time.sleep(SLOW_WRITE_S)
            write(*args)
        prof._write = slow_write
    prof.step_begins(1)
    prof.step_ends(1)
    prof.step_begins(2)
    t0 = time.perf_counter()
    prof.step_ends(2)
    took = time.perf_counter() - t0
    prof.close()
    return [(what, entered - t0, left - t0) for what, entered, left in marks], took


def test_at_the_windows_end_every_rank_waits_busy_for_the_traced_ones(tmp_path):
    """A rank that traces nothing waits at the window's end, marked busy, until the traced ranks have written: without
    it, it waited in the next step's first collective with no heartbeat, and the launcher's automatic watchdog (30 s
    at least) took a long trace write for a hang, killed the job, and its restart traced the window again."""
    (marks0, _), (marks1, took1) = run_ranks(_window_end_on_two_ranks, 2, args=(str(tmp_path),), timeout=120)
    assert took1 >= 0.8 * SLOW_WRITE_S, took1  # it waited for rank 0's write ...
    assert len(marks1) == 1 and marks1[0][0] == "profile", marks1  # ... marked busy the whole time
    assert marks1[0][2] - marks1[0][1] >= 0.8 * SLOW_WRITE_S, marks1
    assert [m[0] for m in marks0] == ["profile"]
    assert _traces(tmp_path) == [f"rank_0_steps_1-2{TRACE_SUFFIX}"]


@pytest.mark.slow  # two 2-rank runs: 9.6 s at load 4.4 on 2 cores
def test_two_ranks_each_trace_the_window_and_train_the_same(tmp_path):
    for plain, profiled in run_ranks(_two_ranks, 2, args=(str(tmp_path),), timeout=180):
        assert profiled == plain
    assert _traces(tmp_path / "every") == [f"rank_{r}_steps_2-3{TRACE_SUFFIX}" for r in (0, 1)]
    assert json.loads((tmp_path / "every" / "summary.json").read_text())["profile_files"] == [
        f"profile/rank_{r}_steps_2-3{TRACE_SUFFIX}" for r in (0, 1)]  # rank 0's summary lists every rank's
    for r in (0, 1):
        assert _traced_steps(tmp_path / "every" / "profile" / f"rank_{r}_steps_2-3{TRACE_SUFFIX}") == [2, 3]


@pytest.mark.slow  # two runs saving every step: 8.9 s at load 4.4 on 2 cores
def test_a_restart_never_overwrites_a_trace(tmp_path):
    run = tmp_path / "run"
    sections = {"profile": {"steps": [2, 3]}, "checkpoint": {"every": 1, "keep_last": 5}}
    train(tiny_gpt_config(run, steps=3, **sections))
    first = run / "profile" / f"rank_0_steps_2-3{TRACE_SUFFIX}"
    written = first.read_bytes()
    for lost in ("step_2", "step_3"):  # a crash before those saves: the restart resumes at step 1
        shutil.rmtree(run / "checkpoints" / lost)
    assert train(tiny_gpt_config(run, steps=3, **sections)).start_step == 1
    again = run / "profile" / f"rank_0_steps_2-3.2{TRACE_SUFFIX}"
    assert sorted(_traces(run)) == sorted([first.name, again.name])
    assert first.read_bytes() == written and _traced_steps(again) == [2, 3]
    # the summary lists the files this start wrote
    assert json.loads((run / "summary.json").read_text())["profile_files"] == [f"profile/{again.name}"]


@pytest.mark.parametrize("steps, start, window", [
    ([3, 5], 0, Window(warmup=2, first=3, last=5)),   # a step before the window warms the profiler up
    ([1, 2], 0, Window(warmup=1, first=1, last=2)),   # none before the first step
    ([3, 5], 2, Window(warmup=3, first=3, last=5)),   # resumed right before it: none in this start
    ([3, 5], 3, Window(warmup=4, first=4, last=5)),   # resumed inside it: the rest, named by its steps
    ([3, 5], 5, None),                                 # resumed past it
    (None, 0, None),
])
def test_the_window_a_start_traces(steps, start, window):
    assert Window.of(steps, start) == window


@pytest.mark.parametrize("profile, line", [
    ({"steps": [0, 2]}, "profile.steps = [0, 2]: expected [first, last]: global steps 1 <= first <= last <= "
                        "train.steps = 4, both traced (e.g. [3, 4]), or null (off)"),
    ({"steps": [-1, 2]}, "profile.steps = [-1, 2]: expected [first, last]"),
    ({"steps": [3]}, "profile.steps = [3]: expected [first, last]"),
    ({"steps": [3, 2]}, "profile.steps = [3, 2]: first > last; [first, last] are both traced, e.g. [2, 3] (one "
                        "step: [3, 3])"),
    ({"steps": [3, 5]}, "profile.steps = [3, 5]: step 5 is after the run's last step (train.steps = 4); trace "
                        "steps within 1..4"),
    ({"steps": [1, 2], "ranks": [0, 0]}, "profile.ranks = [0, 0]: expected a list of distinct ranks >= 0 (e.g. "
                                         "[0]), or null (every rank)"),
    ({"steps": [1, 2], "ranks": []}, "profile.ranks = []: expected a list of distinct ranks"),
    ({"memory": True}, "profile.memory = True: only a profiled window reads it and profile.steps is null (off); set "
                       "profile.steps (e.g. [3, 4]) or remove it (on the command line: --set profile.memory=false, "
                       "its default)"),
    ({"ranks": [0]}, "profile.ranks = [0]: only a profiled window reads it"),
])
def test_bad_profile_settings_are_refused_in_one_line(profile, line, tmp_path):
    with pytest.raises(ConfigError) as info:
        tiny_gpt_config(tmp_path, steps=4, profile=profile)
    assert str(info.value).startswith(line) and "\n" not in str(info.value), str(info.value)


def test_ranks_beyond_the_world_and_cpu_memory_history_are_refused_before_the_ranks(tmp_path):
    cfg = tiny_gpt_config(tmp_path / "run", profile={"steps": [1, 2], "ranks": [0, 2]}, parallel={"dp": 2})
    with pytest.raises(ConfigError, match=r"^profile.ranks = \[0, 2\]: rank 2 does not exist, the ranks are 0..1$"):
        preflight(cfg, on_cuda=False)
    cfg = tiny_gpt_config(tmp_path / "run", profile={"steps": [1, 2], "memory": True})
    refusal = ("profile.memory = true: it records the CUDA allocator's history and these ranks run on CPU; remove it "
               "(the trace of profile.steps still holds every operator's time)")
    with pytest.raises(ConfigError) as info:
        preflight(cfg, on_cuda=False)
    assert str(info.value) == refusal
    preflight(cfg, on_cuda=True)  # CUDA ranks record it
    with pytest.raises(ConfigError) as info:  # an in-process train() (no pre-flight) on CPU refuses it as well
        train(cfg)
    assert str(info.value) == refusal


def test_ranks_beyond_the_world_are_a_trainings_refusal_not_an_evaluations(tmp_path):
    """profile.ranks names ranks of the training job: train() refuses one beyond it in one line (as the pre-flight
    does, above), with no hint about the rank count, which is right. ``dist-train eval`` traces nothing and may load
    a profiled training config at another world size (here the 2-rank run's, evaluated on one rank): its world check,
    launch_settings as a launch's, accepts it (it refused "rank 1 does not exist ... pass --nproc 1")."""
    cfg = tiny_gpt_config(tmp_path / "run", profile={"steps": [1, 2], "ranks": [1]})
    with pytest.raises(ConfigError, match=r"^profile.ranks = \[1\]: rank 1 does not exist, the ranks are 0..0$"):
        train(cfg)
    flags = argparse.Namespace(backend="local", nodes=None, gpus_per_node=None, nproc=None, max_restarts=None,
                               address=None)
    assert launch_settings(cfg, flags)[:2] == ("local", 1)


def test_the_benchmarks_refuse_a_profiled_config():
    """bench train's and bench launch's run directories are temporary (the traces would vanish); bench train times
    every step."""
    args = argparse.Namespace(config="configs/gpt_tiny.yaml", overrides=["profile.steps=[2,3]"], steps=None, nproc=None,
                              baseline_overrides=[], baseline_nproc=None, repeats=1, png=None, threads=None)
    with pytest.raises(ValueError, match=r"^profile.steps = \[2, 3\]: bench train trains in a temporary run "):
        bench_train_check(args)
    args = argparse.Namespace(config="configs/gpt_tiny.yaml", set=["profile.steps=[2,3]"], backends=["local"], nproc=2,
                              steps=4, repeats=1)
    with pytest.raises(ValueError, match=r"^profile.steps = \[2, 3\]: bench launch trains in temporary run "):
        bench_launch_check(args)
    bench_launch_check(argparse.Namespace(**{**vars(args), "set": []}))


def test_the_memory_snapshot_brackets_the_window(tmp_path, monkeypatch):
    """CUDA only (no GPU here): torch's memory API stood in, the profiler on CPU activities; the allocator's history
    starts before the window's first step, and after its last the snapshot is dumped before the history stops."""
    calls = []
    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history",
                        lambda enabled="all", **kw: calls.append(("record", enabled, kw.get("max_entries"))))
    monkeypatch.setattr(torch.cuda.memory, "_dump_snapshot",
                        lambda filename: (calls.append(("dump", Path(filename).name)), Path(filename).write_bytes(b"")))
    cfg = tiny_gpt_config(tmp_path / "run", steps=4, profile={"steps": [2, 3], "memory": True})  # as on CUDA ranks
    prof = _drive(cfg, tmp_path / "run", is_main=False, on_step=lambda step: calls.append(("step", step)))
    assert prof.files == [f"profile/rank_0_steps_2-3{TRACE_SUFFIX}", f"profile/rank_0_steps_2-3{MEMORY_SUFFIX}"]
    assert calls == [("step", 1), ("record", "all", profiling.MEMORY_HISTORY_ENTRIES), ("step", 2), ("step", 3),
                     ("dump", f"rank_0_steps_2-3{MEMORY_SUFFIX}"), ("record", None, None), ("step", 4)]
    assert _traces(tmp_path / "run") == [f"rank_0_steps_2-3{MEMORY_SUFFIX}", f"rank_0_steps_2-3{TRACE_SUFFIX}"]


def test_a_failed_memory_snapshot_stops_the_history_and_the_rank_follows_the_window_untraced(tmp_path, monkeypatch,
                                                                                           caplog):
    """CUDA only (torch's memory API stood in): ``_dump_snapshot`` raising a RuntimeError (not an OSError) is a
    warning; the allocator's history and the profiler are still stopped. A rank whose profiler failed to start keeps
    following the window (the steps it spans), so that its end still waits with the other ranks."""
    calls = []
    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history", lambda enabled="all", **kw: calls.append(enabled))
    monkeypatch.setattr(torch.cuda.memory, "_dump_snapshot", _raises)
    cfg = tiny_gpt_config(tmp_path / "run", steps=4, profile={"steps": [2, 3], "memory": True})
    with caplog.at_level(logging.WARNING, logger="test_profiling"):
        prof = _drive(cfg, tmp_path / "run")
    assert calls == ["all", None] and prof._prof is None and prof.written is None
    assert [r.getMessage().split(" (")[0] for r in caplog.records if r.levelno == logging.WARNING] == [
        "profile: writing steps 2-3's profile failed on rank 0", "profile: steps 2-3: no rank wrote a trace"]
    monkeypatch.setattr(profiling.profile, "start", _raises)
    prof = _drive(tiny_gpt_config(tmp_path / "other", steps=4, profile={"steps": [2, 3]}), tmp_path / "other")
    assert prof.taken == [2, 3] and not prof.traced and prof._prof is None

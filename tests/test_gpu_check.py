"""``make gpu-check`` on a machine without CUDA: the same command as on the GPU, as a smoke run
(tests skip with their reason, benchmarks report why they did not run), and an import check of the whole
GPU path against what the GPU machine has (no deepspeed, megatron-core or ray)."""
from __future__ import annotations

import importlib.metadata
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import dist_train.gpucheck.env as env_mod
import dist_train.gpucheck.runner as runner
import tests.test_gpu_path as gpu_path
from dist_train.gpucheck import report as rep
from dist_train.gpucheck.bench import (_batch, bench_checkpoint, bench_documents, bench_kernels, bench_longest,
                                       build_llama, document_boundaries,
                                       llama_config, matmul_peak_tflops, run_llama, train_step, trial_step)
from dist_train.config import ModelConfig
from dist_train.cost.step_time import EAGER_OPS_PER_LAYER
from dist_train.gpucheck import dispatch
from dist_train.gpucheck.dispatch import SEQ_LEN, TINY_GPT, OpCounter, measure_dispatch
from dist_train.gpucheck.env import commit_of
from dist_train.models.gpt import GPT
from dist_train.gpucheck.runner import _run, gpu_test_files, run_bench
from parallelism.context.kernels import CudaSdpaKernel, SdpaCpuKernel
from tests.test_cuda_kernel import _fake_aten

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("deepspeed", "megatron", "ray")


def _blocking_path(tmp_path: Path) -> str:
    """A PYTHONPATH entry whose deepspeed/megatron/ray packages raise on import."""
    for name in BLOCKED:
        pkg = tmp_path / "blocked" / name
        pkg.mkdir(parents=True)
        (pkg / "__init__.py").write_text(f"raise ImportError('{name} is not installed on the GPU machine')\n")
    return str(tmp_path / "blocked")


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA, make gpu-check runs the real check")
@pytest.mark.slow
def test_make_gpu_check_smoke_run_on_cpu(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHONPATH=_blocking_path(tmp_path))
    res = subprocess.run(["make", "-s", "--no-print-directory", "gpu-check", f"GPU_CHECK_PY={sys.executable}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=170)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "CPU smoke" in res.stdout
    report = json.loads((out / "gpu-report.json").read_text())
    assert report["status"].startswith("passed") and report["environment"]["torch"] == torch.__version__
    files = {t["test"].split("::")[0] for t in report["tests"]}
    assert {"tests/test_cuda_kernel.py", "tests/test_gpu_path.py"} <= files, files
    assert all(t["outcome"] == "skipped" and "CUDA" in t["message"] for t in report["tests"]), report["tests"]
    dispatch = report["benchmarks"].pop("dispatch")  # the one benchmark with a CPU smoke
    assert report["benchmarks"] == {"kernels": {"skipped": "no CUDA device"}, "llama": {"skipped": "no CUDA device"}}
    assert dispatch["device"] == "cpu" and dispatch["smoke"].startswith("no CUDA device: measured on CPU")
    assert dispatch["host_us_per_forward_op"] > 0 and dispatch["profile"] == "cpu"
    md = (out / "gpu-report.md").read_text()
    assert "## Environment" in md and "test_trainer_on_one_gpu_with_nccl_bf16_vs_fp32" in md
    assert "us per forward op** with its backward" in md and "planner: profile cpu assumes op_overhead_us = 12" in md


#: what the GPU machine's python3 has besides the standard library (issue #21): torch and these
#: distributions, with what they require; deepspeed, megatron-core and ray are absent
GPU_MACHINE = ("torch", "numpy", "pyyaml", "tqdm", "psutil", "xxhash", "matplotlib", "safetensors", "transformers",
               "tensorboard", "mpi4py", "pytest")

#: the GPU path on CPU in one process: the gpu tests' modules and the helpers they import lazily, the trainer
#: at world size 1 with the gpu tests' precision (bf16) and an async checkpoint, the llama benchmark (tiny
#: model: step, async checkpoint, longest-S search), the dispatch benchmark (one timed step: what it imports is
#: the same for any count), the environment probe. Prints {module: [distribution]}
#: for every imported module that comes from an installed distribution (not the project's own editable-install
#: finder).
GPU_PATH_SCRIPT = """
import importlib.metadata, json, sys
from pathlib import Path
import torch
from tests.trainer_utils import tiny_gpt_config
from dist_train.trainer import train
from dist_train.gpucheck import bench, env, runner
import tests.test_gpu_path, tests.test_cuda_kernel, tests.test_wp_attention, tests.test_ckpt_common
out = Path(sys.argv[1])
r = train(tiny_gpt_config(out / "run", steps=1, train={"precision": "bf16", "peak_tflops": 1.0},
                          checkpoint={"every": 0, "at_end": True, "async_save": True}))
assert r.exit_code == 0
tiny = dict(kind="gpt", d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_hidden=64, vocab_size=64)
bench.run_llama(out / "llama.json", 60.0, torch.device("cpu"), model=tiny, seq_len=64, window=16, longest_start=64,
                longest_limit=64, peak_n=64)
bench.DISPATCH_CPU_SMOKE = dict(iters=1, repeats=1)  # its imports, not its timing (10 x 3 steps: 1.5 s of CPU)
bench.run_dispatch()
env.environment()
owners = importlib.metadata.packages_distributions()
print(json.dumps({m: owners.get(m, [m]) for m in sorted({n.split(".")[0] for n in sys.modules})
                  if "-packages" in str(getattr(sys.modules[m], "__file__", None) or "")
                  and not m.startswith("__editable__")}))
"""


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _with_requirements(dists) -> set[str]:
    """``dists`` and everything they require, transitively (extras left out), as canonical names."""
    seen, todo = set(), [_canonical(d) for d in dists]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        todo += [_canonical(re.match(r"[A-Za-z0-9_.-]+", r).group(0)) for r in reqs
                 if "extra" not in r.partition(";")[2]]
    return seen


@pytest.mark.slow
def test_gpu_path_imports_only_what_the_gpu_machine_has(tmp_path):
    """The whole GPU path (GPU_PATH_SCRIPT) runs on CPU with deepspeed, megatron-core and ray unimportable,
    and every installed distribution it imports is torch, one on the GPU machine's list, or required by one."""
    script = tmp_path / "gpu_path.py"
    script.write_text(GPU_PATH_SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([_blocking_path(tmp_path), str(ROOT)]),
               DIST_TRAIN_CACHE=str(tmp_path / "cache"))
    res = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=170)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    imported = json.loads(res.stdout.strip().splitlines()[-1])
    assert "torch" in imported and not set(imported) & set(BLOCKED), imported
    allowed = _with_requirements(GPU_MACHINE)
    foreign = {m: d for m, d in imported.items() if not {_canonical(x) for x in d} & allowed}
    assert not foreign, f"the GPU path imports modules of distributions the GPU machine lacks: {foreign}"


def test_gpu_test_files_are_found_by_their_marker():
    files = gpu_test_files()
    assert "tests/test_cuda_kernel.py" in files and "tests/test_gpu_path.py" in files
    assert "tests/test_gpu_check.py" not in files and "tests/test_training.py" not in files


def test_report_from_junit(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text("""<testsuites><testsuite>
<testcase classname="tests.test_a" name="test_ok" time="0.5"><properties><property name="peak_mib" value="131.5"/>
<property name="errors" value="{'bf16': 0.004}"/></properties></testcase>
<testcase classname="tests.test_a" name="test_bad" time="1.0"><failure message="assert 1 == 2">trace</failure></testcase>
<testcase classname="tests.test_b" name="test_gpu" time="0"><skipped message="needs a CUDA device"/></testcase>
<testcase classname="tests.test_b" name="test_err" time="0"><error message="fixture | broke"/></testcase>
</testsuite></testsuites>""")
    tests = rep.junit_results(xml)
    assert [(t["test"], t["outcome"]) for t in tests] == [
        ("tests/test_a.py::test_ok", "passed"), ("tests/test_a.py::test_bad", "failed"),
        ("tests/test_b.py::test_gpu", "skipped"), ("tests/test_b.py::test_err", "error")]
    report = {"status": "failed", "environment": {}, "tests": tests, "notes": ["n1"],
              "benchmarks": {"kernels": {"rows": [{"seq_len": 8192, "causal": True, "kernel": "auto",
                                                   "kernel_name": "cuda", "ops": {"flash": 6}, "ms": 2.0,
                                                   "sdpa_ms": 1.9, "tflops": 500.0, "sdpa_tflops": 526.3,
                                                   "vs_sdpa": 0.95}]},
                             "llama": {"matmul_peak_tflops": 812.5, "step": {"tokens_per_s": 41000.0, "mfu_vs_measured_peak": 0.41},
                                       "longest": {"longest_seq_len": 524288, "trials": [
                                           {"seq_len": 524288, "ok": True, "step_s": 30.0, "peak_gib": 120.0,
                                            "bytes_per_token": 2.1e5},
                                           {"seq_len": 1048576, "ok": False, "error": "CUDA out of memory"}]}}}}
    rep.write(report, tmp_path / "r")
    md = (tmp_path / "r" / "gpu-report.md").read_text()
    assert "**step**: tokens_per_s=41,000, mfu_vs_measured_peak=0.41" in md and "matmul_peak_tflops=812" in md
    assert "- S=524288: ok, 30 s, peak 120 GiB" in md and "- S=1048576: failed: CUDA out of memory" in md
    assert "fixture \\| broke" in md and "| 8192 | causal | auto=cuda {'flash': 6} | 2 | 500 |" in md
    # issue 21's targets beside the numbers they judge
    assert ("target (issue 21): speed vs SDPA >= 90%; measured 95.0% (lowest row: auto, S=8192, causal): met"
            in md)
    assert "target (issue 21): MFU vs the measured bf16 matmul peak >= 45%; measured 41.0%: **not met**" in md
    assert tests[0]["numbers"] == {"peak_mib": "131.5", "errors": "{'bf16': 0.004}"} and tests[1]["numbers"] == {}
    assert "| tests/test_a.py::test_ok | passed | 0.50 |  | peak_mib=131.5; errors={'bf16': 0.004} |" in md
    assert json.loads((tmp_path / "r" / "gpu-report.json").read_text())["summary"] == {
        "passed": 1, "failed": 1, "skipped": 1, "error": 1}
    # a section stopped by its time limit: the error, then what it measured before
    cut = {"environment": {}, "tests": [], "benchmarks": {
        "kernels": {"error": "exit 1 after 3 s: CUDA error"},
        "llama": {"error": "exit 124 after 300 s: KeyboardInterrupt", "step": {"tokens_per_s": 41000.0},
                  "longest": {"window": 4096, "stopped_by": "running", "trials": [
                      {"seq_len": 32768, "ok": True, "step_s": 2.0, "peak_gib": 30.0, "bytes_per_token": 9e5}]}}}}
    rep.write(cut, tmp_path / "cut")
    md = (tmp_path / "cut" / "gpu-report.md").read_text()
    assert "### kernels\n\n**error**: exit 1 after 3 s: CUDA error\n\nno rows measured" in md
    assert "**error**: exit 124 after 300 s: KeyboardInterrupt" in md and "**step**: tokens_per_s=41,000" in md
    assert "- S=32768: ok, 2 s, peak 30 GiB" in md and "stopped_by=running" in md


@pytest.mark.slow
def test_a_section_at_its_time_limit_is_interrupted_and_keeps_its_finished_tests(tmp_path):
    """SIGINT before SIGKILL: pytest, stopped by the limit in its second test, still writes the JUnit
    result of the first one, which the report then lists."""
    (tmp_path / "test_limit.py").write_text("import time\n\ndef test_quick():\n    pass\n\n"
                                             "def test_hangs():\n    time.sleep(120)\n")
    xml = tmp_path / "junit.xml"
    t0 = time.perf_counter()
    rc, secs = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
                     str(tmp_path / "test_limit.py")], 12.0, tmp_path / "pytest.log")
    # SIGINT at 9 s (the limit less its grace, a quarter) leaves a loaded machine time to start pytest and pass
    # test_quick first (~1.2 s at load average 5.5 on the 2 cores), and the 3 s grace time to write the JUnit file
    # (0.5-1.5 s after the SIGINT at load 7). The limit was 20 s: 6 s more of waiting on every run.
    assert rc == 124 and secs <= 13.0 and time.perf_counter() - t0 <= 14.0, (rc, secs)
    assert [(t["test"].rsplit("::", 1)[1], t["outcome"]) for t in rep.junit_results(xml)] == [("test_quick", "passed")]


def test_a_section_is_interruptible_when_the_check_runs_with_sigint_ignored(tmp_path):
    """A background job of a non-interactive shell (``make gpu-check &``, nohup) starts with SIGINT ignored, which its
    children inherit: the section's pytest would then never see the limit's SIGINT, be killed and lose its JUnit
    file. The runner starts each section with SIGINT at its default (the full suite, run in the background, lost it)."""
    child = ("import signal, sys, time\n"
             "print(signal.getsignal(signal.SIGINT) is signal.default_int_handler, flush=True)\n")
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        rc, _ = _run([sys.executable, "-c", child], 10.0, tmp_path / "child.log")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert rc == 0 and (tmp_path / "child.log").read_text().strip() == "True"


def test_a_benchmark_without_time_to_start_is_reported_as_skipped(tmp_path):
    report = {"benchmarks": {}, "sections": {}, "notes": []}
    run_bench(report, "llama", tmp_path, 12.0, budget_s=0.0)
    assert report["benchmarks"]["llama"]["skipped"].startswith("time budget: 12 s left") and not report["sections"]
    assert report["notes"] == ["llama: not run, the time budget was spent"]


def test_longest_sequence_bisection():
    def trial(s):      # steps fit up to 300k tokens; time linear in S
        return ({"seq_len": s, "ok": True, "step_s": s * 1e-6, "bytes_per_token": 1000.0} if s <= 300_000
                else {"seq_len": s, "ok": False, "error": "CUDA out of memory"})

    res = bench_longest(trial, deadline=float("inf"), start=32768)
    assert [t["seq_len"] for t in res["trials"]][:5] == [32768, 65536, 131072, 262144, 524288]
    assert 262144 <= res["longest_seq_len"] <= 300_000 and res["stopped_by"] == "bisection converged"
    assert res["first_failure"] - res["longest_seq_len"] <= res["longest_seq_len"] // 8
    assert bench_longest(trial, 0.0, start=32768)["stopped_by"].startswith("time budget")
    assert bench_longest(trial, float("inf"), start=32768, limit=100_000)["longest_seq_len"] == 65536
    # every trial is handed out as it finishes (a run killed later keeps them)
    seen = []
    final = bench_longest(trial, float("inf"), start=32768, on_trial=seen.append)
    assert [len(p["trials"]) for p in seen] == list(range(1, len(final["trials"]) + 1))
    assert all(p["stopped_by"] == "running" for p in seen) and seen[-1]["trials"] == final["trials"]
    # a first trial the budget cannot hold (predicted from a known step: 4 x 10 s x 1.3 + 5) is not started
    called = []
    res = bench_longest(lambda s: called.append(s) or trial(s), time.perf_counter() + 50.0, start=32768,
                        known={"seq_len": 8192, "step_s": 10.0})
    assert called == [] and res["trials"] == [] and res["longest_seq_len"] is None
    assert res["stopped_by"] == "time budget (first S=32768 predicted 57 s)"
    assert bench_longest(trial, time.perf_counter() + 60.0, start=32768, known={"seq_len": 8192, "step_s": 10.0},
                         limit=32768)["longest_seq_len"] == 32768


def test_the_matmul_peak_is_timed_after_a_warm_up():
    """An idle GPU raises its clocks only under load: the peak (every MFU's denominator) is timed after warmup_s of
    the same matmuls, not cold (the lower bound on the time is what the test can check without a GPU)."""
    t0 = time.perf_counter()
    assert matmul_peak_tflops(torch.device("cpu"), n=64, repeats=2, warmup_s=0.3) > 0
    assert time.perf_counter() - t0 >= 0.3


def test_llama_benchmark_code_runs_on_cpu_with_a_tiny_model(tmp_path):
    """The benchmark's own code path (step, async checkpoint, longest-S search) on CPU, tiny model."""
    tiny = dict(kind="gpt", d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128, vocab_size=256)
    out = tmp_path / "llama.json"
    res = run_llama(out, 120.0, torch.device("cpu"), model=tiny, seq_len=128, window=32, longest_start=128,
                    longest_limit=512, peak_n=128)
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    step = res["step"]
    assert step["tokens_per_s"] > 0 and 0 < step["mfu_vs_measured_peak"] and step["params"] > 0
    ck = res["checkpoint"]
    assert ck["failed_saves"] == 0 and ck["state_bytes"] > 3 * 4 * step["params"] * 0.9 and ck["gb_per_s"] > 0
    lo = res["longest"]
    assert lo["window"] == 32 and lo["longest_seq_len"] == 512 and lo["stopped_by"] == "the length limit 512"
    assert [t["seq_len"] for t in lo["trials"]] == [128, 256, 512] and all(t["ok"] for t in lo["trials"])


@pytest.mark.slow
def test_gpu_test_bodies_run_on_cpu(monkeypatch, tmp_path):
    """The gpu-marked tests' own code stays runnable (CI never has CUDA): the device-agnostic ones run
    here with DEV = "cpu" — window-parallel, chunked loss, async checkpoint round trip, the GPT's kept
    activations against the GPU memory model, masked attention blocks, a data-parallel step, and the CP
    error comparison for every variant at P = 1 and 4 (short sequence)."""
    monkeypatch.setattr(gpu_path, "DEV", "cpu")
    recorded = []
    record = lambda name, value: recorded.append((name, value))  # noqa: E731 - pytest's record_property
    gpu_path.test_window_parallel_attention_on_cuda(torch.float32, 1e-4, record)
    gpu_path.test_chunked_cross_entropy_on_cuda_equals_the_full_loss(torch.bfloat16, 3e-2, record)
    gpu_path.test_async_checkpoint_of_gpu_tensors_is_bit_exact(tmp_path)
    gpu_path.test_gpt_kept_activations_on_cuda_are_the_memory_model("selective", record)
    gpu_path.test_fp32_gqa_attention_on_cuda_keeps_no_scores(record)
    gpu_path.test_masked_attention_blocks_make_no_device_sync("per-sample documents")
    gpu_path.test_a_data_parallel_step_waits_for_the_device_once("swin", monkeypatch)
    assert [name for name, _ in recorded] == ["errors_out_dq_dk_dv", "errors_loss_dh_dw", "counted_bytes",
                                              "predicted_bytes", "error_s512"], recorded
    for variant in gpu_path.CP_VARIANTS:
        e1, e4 = gpu_path._cp_errors(variant, 1, S=256), gpu_path._cp_errors(variant, 4, S=256)
        assert max(e1 + e4) <= 3e-2 and all(b <= 1.5 * a for a, b in zip(e1, e4)), (variant, e1, e4)


def test_the_longest_search_stops_at_an_error_that_is_not_memory():
    """A trial that fails for another reason than memory (a kernel's size limit, a CUDA error) ends the search: no
    bisection below it, the lengths that trained are kept, and ``stopped_by`` names the error."""
    def trial(s):
        if s >= 131072:
            return {"seq_len": s, "ok": False, "fatal": True, "error": "RuntimeError: invalid configuration argument"}
        return {"seq_len": s, "ok": True, "step_s": 1e-3, "bytes_per_token": 1000.0}

    res = bench_longest(trial, float("inf"), start=32768)
    assert [t["seq_len"] for t in res["trials"]] == [32768, 65536, 131072]
    assert res["longest_seq_len"] == 65536 and res["first_failure"] == 131072
    assert res["stopped_by"] == "error at S=131072: RuntimeError: invalid configuration argument"


class _Failing(torch.nn.Module):
    """A model whose step raises ``error`` (what a GPU raises at a length it cannot take)."""

    def __init__(self, error: Exception):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.error = error

    def forward(self, batch):
        raise self.error


def test_a_trial_tells_running_out_of_memory_from_other_errors():
    tiny = dict(kind="gpt", d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_hidden=64, vocab_size=64)
    cfg = llama_config(64, None, tiny)
    # memory also runs out outside the caching allocator: in a library's own allocation or a raw cudaMalloc, raised
    # as a plain RuntimeError (AcceleratorError); a shorter length still fits there, so the search must go on
    for error, fatal in ((torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), False),
                         (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
                          False),
                         (RuntimeError("CUDA error: out of memory\nCompile with TORCH_USE_CUDA_DSA"), False),
                         (RuntimeError("CUDA error: an illegal memory access was encountered"), True),
                         (ValueError("seq_len=1048576 is too long for the kernel"), True)):
        model = _Failing(error)
        rec = trial_step(model, torch.optim.AdamW(model.parameters()), cfg, 64)
        first_line = str(error).splitlines()[0].split(".")[0]
        assert rec["ok"] is False and bool(rec.get("fatal")) is fatal and first_line in rec["error"], (error, rec)


def test_the_checkpoint_part_hands_out_its_stall_before_the_write_ends(tmp_path):
    """The disk write is the one part nothing bounds: the stall and the step times are handed out (and written to the
    JSON) before the writer is waited for, so a llama process stopped during the write keeps them."""
    tiny = dict(kind="gpt", d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_hidden=64, vocab_size=64)
    cfg = llama_config(64, None, tiny)
    model, opt = build_llama(cfg, torch.device("cpu"))
    train_step(model, opt, _batch(64, 64, torch.device("cpu")))  # AdamW's state exists, as after the step part
    parts = []
    res = bench_checkpoint(model, opt, cfg, on_part=lambda part: parts.append(dict(part)))
    assert [sorted(p) for p in parts] == [
        ["stall_includes_pinned_allocation", "stall_s", "state_bytes", "step_s_quiet"],
        ["stall_includes_pinned_allocation", "stall_s", "state_bytes", "step_s_during_write", "step_s_quiet"]]
    assert res["failed_saves"] == 0 and res["gb_per_s"] > 0 and res["stall_s"] == parts[0]["stall_s"]


#: what the dispatch benchmark writes on an H200 (a stand-in: these are not measured numbers)
DISPATCH_RESULT = {"device": "cuda", "model": {"d_model": 64, "n_layers": 2, "seq_len": 64}, "iters": 50, "repeats": 5,
                   "precision": "bf16 autocast", "forward_ops": 169, "backward_ops": 190, "step_s": 0.005,
                   "host_loop_s": 0.00495, "scaled_batch": 4, "scaled_step_s": 0.0052, "host_us_per_forward_op": 29.6,
                   "host_us_per_dispatched_op": 13.9, "planner_ops": 152.0, "host_us_per_planner_op": 32.9,
                   "host_bound": True, "optimizer_tensors": 21, "optimizer_ops": 212, "optimizer_us_per_tensor": 60.0,
                   "optimizer_us_per_op": 5.9, "optimizer_host_bound": True, "planner_ops_per_layer": 48,
                   "planner_optimizer_ops_per_tensor": 14, "profile": "h200", "profile_field": "host_op_us",
                   "profile_us": 20.0}


def _stand_in_sections(calls: list, llama_rc: int):
    """A stand-in for the runner's ``_run``: the gpu tests pass, dispatch measures, kernels measures a row, llama writes its step, longest-S
    and checkpoint-stall numbers and exits ``llama_rc`` (124: stopped by its limit). Records (section, limit)."""
    def fake_run(cmd, timeout, log):
        calls.append(("pytest" if "pytest" in cmd else cmd[3], timeout))
        log.write_text("stand-in section\n")
        if "pytest" in cmd:
            xml = Path(next(c for c in cmd if c.startswith("--junitxml=")).split("=", 1)[1])
            xml.write_text('<testsuites><testsuite><testcase classname="tests.test_gpu_path" name="test_ok" '
                           'time="1.0"/></testsuite></testsuites>')
            return 0, 12.0
        out = Path(cmd[cmd.index("--out") + 1])
        if cmd[3] == "dispatch":
            out.write_text(json.dumps(DISPATCH_RESULT))
            return 0, 18.0
        if cmd[3] == "kernels":
            out.write_text(json.dumps({"rows": [{"seq_len": 8192, "causal": True, "kernel": "auto", "kernel_name": "cuda",
                                                 "ops": {"flash": 6}, "ms": 4.0, "sdpa_ms": 3.9, "tflops": 480.0,
                                                 "sdpa_backend": "cudnn_attention", "sdpa_tflops": 493.0,
                                                 "vs_sdpa": 0.975}]}))
            return 0, 20.0
        out.write_text(json.dumps({"matmul_peak_tflops": 780.0, "step": {"tokens_per_s": 25000.0, "mfu_vs_measured_peak": 0.38},
                                   "longest": {"window": 4096, "longest_seq_len": 393216, "stopped_by": "bisection converged",
                                               "trials": []},
                                   "checkpoint": {"state_bytes": 13.2e9, "stall_s": 4.5}}))
        return llama_rc, timeout if llama_rc == 124 else 200.0
    return fake_run


@pytest.fixture
def cuda_runner(monkeypatch):
    """The runner with its environment probe saying CUDA is there and one gpu test file (sections are stood in by each
    test)."""
    monkeypatch.setattr(env_mod, "environment", lambda: {"cuda_available": True, "gpus": [], "torch": "stand-in"})
    monkeypatch.setattr(runner, "gpu_test_files", lambda: ["tests/test_gpu_path.py"])
    return runner


def test_a_failed_benchmark_keeps_every_finished_number_in_the_report(tmp_path, monkeypatch, cuda_runner):
    """The runner's CUDA branch on CPU (the sections' processes stood in): the tests pass, kernels measures, llama is
    stopped by its limit after its step, longest-S search and checkpoint stall. The report keeps all of it, says
    what stopped, and the check fails."""
    calls = []
    monkeypatch.setattr(cuda_runner, "_run", _stand_in_sections(calls, llama_rc=124))
    rc = cuda_runner.main(["--out", str(tmp_path / "out"), "--budget-s", "470"])
    report = json.loads((tmp_path / "out" / "gpu-report.json").read_text())
    assert rc == 1 and report["status"] == "failed", report["status"]
    assert [name for name, _ in calls] == ["pytest", "dispatch", "kernels", "llama"]
    # each section its own limit: tests 240 s, dispatch 45 s, kernels 90 s, llama what is left (the stand-ins return
    # at once)
    assert 235.0 < calls[0][1] <= 240.0 and calls[1][1] == 45.0 and calls[2][1] == 90.0, calls
    assert 450.0 < calls[3][1] < 470.0, calls
    assert [t["outcome"] for t in report["tests"]] == ["passed"]
    assert list(report["benchmarks"]) == ["dispatch", "kernels", "llama"]
    assert report["benchmarks"]["dispatch"]["host_us_per_forward_op"] == 29.6
    assert report["benchmarks"]["kernels"]["rows"][0]["vs_sdpa"] == 0.975
    llama = report["benchmarks"]["llama"]
    assert llama["error"].startswith("exit 124") and llama["longest"]["longest_seq_len"] == 393216
    assert llama["checkpoint"]["stall_s"] == 4.5 and llama["step"]["mfu_vs_measured_peak"] == 0.38
    md = (tmp_path / "out" / "gpu-report.md").read_text()
    assert "**error**: exit 124" in md and "longest_seq_len=393216" in md and "stall_s=4.5" in md
    assert "| 8192 | causal | auto=cuda {'flash': 6} | 4 | 480 | cudnn_attention | 3.9 |" in md and "llama: exit 124" in md


def test_a_second_try_runs_only_the_sections_asked_for(tmp_path, monkeypatch, cuda_runner):
    """``--sections llama``: no tests, no kernels (reported as not run), llama gets the whole budget; its success is
    the check's. An unknown section is refused with exit 2."""
    calls = []
    monkeypatch.setattr(cuda_runner, "_run", _stand_in_sections(calls, llama_rc=0))
    rc = cuda_runner.main(["--out", str(tmp_path / "out"), "--sections", "llama"])
    report = json.loads((tmp_path / "out" / "gpu-report.json").read_text())
    assert rc == 0 and report["status"] == "passed" and [name for name, _ in calls] == ["llama"]
    assert calls[0][1] > 450.0 and report["tests"] == [] and "gpu tests not run (--sections)" in report["notes"]
    assert report["benchmarks"]["kernels"] == {"skipped": "not run (--sections / --skip-bench)"}
    assert report["benchmarks"]["dispatch"] == {"skipped": "not run (--sections / --skip-bench)"}
    assert report["benchmarks"]["llama"]["longest"]["longest_seq_len"] == 393216
    # the command as run, for recording the numbers with it
    command = f"{Path(sys.executable).name} -m dist_train.gpucheck --out {tmp_path / 'out'} --sections llama"
    assert report["command"] == command
    assert f"command: `{command}`" in (tmp_path / "out" / "gpu-report.md").read_text()
    with pytest.raises(SystemExit) as e:
        cuda_runner.main(["--out", str(tmp_path / "bad"), "--sections", "tests,bench"])
    assert e.value.code == 2


def test_the_sections_logs_come_back_with_the_report_and_an_earlier_runs_are_never_read(tmp_path, monkeypatch,
                                                                                          cuda_runner):
    """On a lent GPU only $OUT comes back: pytest's log (the failures' tracebacks), the JUnit file and each benchmark's
    log and JSON are kept in gpu-check-logs/ beside the report (they were in a temporary folder, deleted). The folder is
    emptied first: a benchmark that crashed before writing its JSON must not report an earlier run's numbers."""
    out = tmp_path / "out"
    (out / "gpu-check-logs").mkdir(parents=True)
    (out / "gpu-check-logs" / "llama.json").write_text(json.dumps({"step": {"tokens_per_s": 1.0}}))  # an earlier run

    def crashed_llama(cmd, timeout, log):
        log.write_text("Traceback (most recent call last):\nRuntimeError: CUDA error: misaligned address\n")
        return 1, 3.0

    monkeypatch.setattr(cuda_runner, "_run", crashed_llama)
    assert cuda_runner.main(["--out", str(out), "--sections", "llama"]) == 1
    report = json.loads((out / "gpu-report.json").read_text())
    assert "step" not in report["benchmarks"]["llama"] and "misaligned address" in report["benchmarks"]["llama"]["error"]
    assert (out / "gpu-check-logs" / "llama.log").read_text().startswith("Traceback")
    assert sorted(p.name for p in (out / "gpu-check-logs").iterdir()) == ["llama.log"]
    assert "full logs: `gpu-check-logs/`" in (out / "gpu-report.md").read_text()


def test_the_report_names_the_commit_of_a_tree_copied_without_git(tmp_path, monkeypatch):
    """The GPU machine gets the working tree without .git: the commit is then the one $DIST_TRAIN_COMMIT gives, marked
    as such (git's answer where there is a repository)."""
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # no repository above tmp_path is found
    monkeypatch.delenv("DIST_TRAIN_COMMIT", raising=False)
    assert commit_of(tmp_path) is None
    monkeypatch.setenv("DIST_TRAIN_COMMIT", "0123abc")
    assert commit_of(tmp_path) == "0123abc (from $DIST_TRAIN_COMMIT: no .git here)"
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert commit_of(ROOT) == head


#: what ``pytest -v`` had written (unbuffered) when the limit's SIGKILL stopped it inside a test that ignored SIGINT
#: (recorded from a real run of such a test under runner._run)
KILLED_PYTEST_LOG = """============================= test session starts ==============================
collecting ... collected 3 items

tests/test_gpu_path.py::test_quick PASSED              [ 33%]
tests/test_gpu_path.py::test_skip[1] SKIPPED (no CUDA)      [ 66%]
tests/test_gpu_path.py::test_hangs_in_nccl_init """


def test_a_tests_section_killed_before_its_junit_file_keeps_what_finished(tmp_path, monkeypatch):
    """A test hanging where SIGINT cannot reach it (inside a CUDA or NCCL call) is killed with pytest, which then
    writes no JUnit file: the outcomes come from pytest's verbose log, and the note names the test that hung."""
    def killed(cmd, timeout, log):
        assert "-v" in cmd and not (tmp_path / "junit-test_gpu_path.xml").exists()
        log.write_text(KILLED_PYTEST_LOG)
        return 124, timeout

    monkeypatch.setattr(runner, "gpu_test_files", lambda: ["tests/test_gpu_path.py"])
    monkeypatch.setattr(runner, "_run", killed)
    report = {"notes": [], "sections": {}}
    runner.run_tests(report, tmp_path, 240.0)
    assert [(t["test"], t["outcome"]) for t in report["tests"]] == [
        ("tests/test_gpu_path.py::test_quick", "passed"), ("tests/test_gpu_path.py::test_skip[1]", "skipped")]
    assert ("tests/test_gpu_path.py::test_hangs_in_nccl_init was running when its pytest stopped (exit 124)"
            in report["notes"][0])
    # a JUnit file cut off while being written is no better than none
    (tmp_path / "junit-test_gpu_path.xml").write_text('<testsuites><testsuite><testcase classname="tests.test_gpu_path" name="test_q')
    monkeypatch.setattr(runner, "_run", lambda cmd, timeout, log: (log.write_text(KILLED_PYTEST_LOG), (124, timeout))[1])
    report = {"notes": [], "sections": {}}
    runner.run_tests(report, tmp_path, 240.0)
    assert len(report["tests"]) == 2 and report["sections"]["tests"]["exit_code"] == 124


def test_a_test_that_kills_its_process_costs_only_the_rest_of_its_own_file(tmp_path, monkeypatch):
    """Each gpu test file runs in its own pytest: one killed by a crash in a CUDA library (SIGSEGV, no JUnit file) or
    poisoned by a sticky CUDA error loses the rest of its own file only; the next file still runs and reports, and the
    section counts as crashed. A file the time left cannot start is reported as not run."""
    files = ["tests/test_cuda_kernel.py", "tests/test_gpu_path.py"]
    seen = []

    def crash_then_pass(cmd, timeout, log):
        path = cmd[-1]
        seen.append((path, timeout))
        if path == files[0]:
            log.write_text("tests/test_cuda_kernel.py::test_a PASSED [ 50%]\ntests/test_cuda_kernel.py::test_b ")
            return -11, 5.0
        xml = Path(next(c for c in cmd if c.startswith("--junitxml=")).split("=", 1)[1])
        xml.write_text('<testsuites><testsuite><testcase classname="tests.test_gpu_path" name="test_ok" time="1.0"/>'
                       '</testsuite></testsuites>')
        log.write_text("1 passed\n")
        return 0, 30.0

    monkeypatch.setattr(runner, "gpu_test_files", lambda: files)
    monkeypatch.setattr(runner, "_run", crash_then_pass)
    report = {"notes": [], "sections": {}}
    runner.run_tests(report, tmp_path, 240.0)
    assert [path for path, _ in seen] == files and seen[1][1] <= seen[0][1] <= 240.0
    assert [(t["test"], t["outcome"]) for t in report["tests"]] == [
        ("tests/test_cuda_kernel.py::test_a", "passed"), ("tests/test_gpu_path.py::test_ok", "passed")]
    tests = report["sections"]["tests"]
    assert tests["exit_code"] == -11 and tests["seconds"] == 35.0 and "test_cuda_kernel.py::test_b" in tests["log_tail"]
    assert tests["files"] == {files[0]: {"exit_code": -11, "seconds": 5.0}, files[1]: {"exit_code": 0, "seconds": 30.0}}
    assert "tests/test_cuda_kernel.py::test_b was running when its pytest stopped (exit -11)" in report["notes"][0]
    # no time left for a file: not started, reported, and the section is not complete
    seen.clear()
    report = {"notes": [], "sections": {}}
    runner.run_tests(report, tmp_path, 10.0)
    assert seen == [] and report["tests"] == [] and report["sections"]["tests"]["exit_code"] == 124
    assert re.fullmatch(r"tests/test_cuda_kernel\.py: not run, \d+ s left of the tests section's 10 s", report["notes"][0])


def test_kernel_benchmark_code_runs_on_cpu():
    """The kernels benchmark's own code on CPU, tiny blocks: one row per length, mask and kernel, SDPA measured
    alongside, and each row's op counts are that row's calls only (1 warm-up + the repeats): the CUDA kernel
    class with its aten ops stood in, beside the CPU kernel."""
    seen = []
    kernels = {"sdpa": SdpaCpuKernel(),
               "cuda": CudaSdpaKernel(available=("flash", "efficient"), aten=_fake_aten([]))}
    t0 = time.perf_counter()
    rows = bench_kernels(seq_lens=(64, 128), heads=2, head_dim=16, repeats=2, device=torch.device("cpu"),
                         kernels=kernels, on_row=lambda r: seen.append(len(r)), warmup_s=0.2)
    assert time.perf_counter() - t0 >= 0.2   # the warm-up before the first row's SDPA
    assert [(r["seq_len"], r["causal"], r["kernel"]) for r in rows] == [
        (s, c, k) for s in (64, 128) for c in (True, False) for k in ("sdpa", "cuda")]
    assert seen == list(range(1, 9))
    assert all(r["ops"] == {"flash": 3} for r in rows if r["kernel"] == "cuda"), [r["ops"] for r in rows]
    assert all(r["tflops"] > 0 and r["sdpa_tflops"] > 0 and r["vs_sdpa"] > 0 for r in rows)
    # which kernel SDPA ran, beside its time (on a GPU: cuDNN's, flash's, ...; on CPU torch's CPU flash kernel)
    assert {r["sdpa_backend"] for r in rows} == {"flash_attention"}, rows


def test_document_benchmark_code_runs_on_cpu(tmp_path):
    """The kernels section's packed-document rows on CPU, tiny: unmasked, documents shared by the batch and
    documents that differ per sample, each with the forward's kernel calls and its allowed pairs per sample, which
    equal the causal pairs inside each document counted here from the boundaries; the speed-up columns are the
    ratios of those; the report shows the rows."""
    S, B, L = 256, 2, 32
    seen = []
    rows = bench_documents(seq_len=S, batch=B, heads=2, head_dim=16, doc_len=L, repeats=1, device=torch.device("cpu"),
                           dtype=torch.float32, on_row=lambda r: seen.append(len(r)))
    assert [r["case"] for r in rows] == ["unmasked", "shared documents", "per-sample documents"] and seen == [1, 2, 3]

    def causal_pairs(row):
        return sum((b - a) * (b - a + 1) // 2 for a, b in zip(row, row[1:]))

    per_sample = document_boundaries(S, B, L, True)
    assert per_sample[0] != per_sample[1] and all(r[0] == 0 and r[-1] == S for r in per_sample)
    assert document_boundaries(S, B, L, True) == per_sample  # seeded: the same batch in every run
    assert rows[0]["pairs"] == causal_pairs([0, S]) and rows[0]["kernel_calls"] == 1
    assert rows[1]["pairs"] == causal_pairs(list(range(0, S, L)) + [S]) and rows[1]["documents"] == [S // L]
    assert rows[2]["pairs"] == sum(causal_pairs(r) for r in per_sample) / B
    assert rows[2]["documents"] == [len(r) - 1 for r in per_sample]
    for r in rows[1:]:
        assert r["kernel_calls"] > 1 and r["ideal"] == pytest.approx(rows[0]["pairs"] / r["pairs"])
        assert r["vs_unmasked"] == pytest.approx(rows[0]["ms"] / r["ms"])
        assert r["of_ideal"] == pytest.approx(r["vs_unmasked"] / r["ideal"])
    rep.write({"environment": {}, "tests": [], "benchmarks": {"kernels": {"rows": [
        {"seq_len": 8192, "causal": True, "kernel": "auto", "kernel_name": "cuda", "ops": {}, "ms": 2.0,
         "sdpa_ms": 1.9, "tflops": 500.0, "sdpa_tflops": 526.3, "vs_sdpa": 0.95}], "documents": rows}}}, tmp_path)
    md = (tmp_path / "gpu-report.md").read_text()
    assert f"packed documents, causal fwd+bwd through local_attention (B={B}, S={S})" in md
    assert f"| per-sample documents | {rows[2]['documents']} | {rows[2]['kernel_calls']} |" in md


def test_a_gpu_test_s_recorded_numbers_reach_the_report(tmp_path, monkeypatch):
    """The tests section as it runs (a real pytest, -m gpu, JUnit): what a gpu test records with record_property is in
    the report, for a passing and for a failing test (a failure's numbers are what a person needs most)."""
    # the marker spelled through getattr: gpu_test_files finds test files by the text of it, and this file is not one
    (tmp_path / "test_numbers.py").write_text(
        "import pytest\n\ngpu = getattr(pytest.mark, 'gpu')\n\n"
        "@gpu\ndef test_ok(record_property):\n    record_property('peak_mib', 131.5)\n\n"
        "@gpu\ndef test_bad(record_property):\n    record_property('ratio', 1.7)\n    assert 1.7 <= 1.5\n")
    monkeypatch.setattr(runner, "gpu_test_files", lambda: [str(tmp_path / "test_numbers.py")])
    report = {"notes": [], "sections": {}}
    runner.run_tests(report, tmp_path, 60.0)
    got = {t["test"].rsplit("::", 1)[1]: (t["outcome"], t["numbers"]) for t in report["tests"]}
    assert got == {"test_ok": ("passed", {"peak_mib": "131.5"}), "test_bad": ("failed", {"ratio": "1.7"})}, got
    assert report["sections"]["tests"]["exit_code"] == 1 and "PytestWarning" not in report["sections"]["tests"]["log_tail"]


def test_dispatch_benchmark_code_runs_on_cpu():
    """The dispatch measurement's code on CPU, a few iterations: forward and backward ops counted, µs per op, the
    optimizer's per tensor, the cpu profile's serial op_overhead_us beside it (the GPU's host_op_us there)."""
    res = measure_dispatch(torch.device("cpu"), iters=2, repeats=1)
    assert res["device"] == "cpu" and res["precision"] == "fp32" and res["model"]["seq_len"] == SEQ_LEN
    assert res["forward_ops"] > 2 * 40 and res["backward_ops"] > res["forward_ops"] // 2
    assert res["host_us_per_forward_op"] == pytest.approx(res["step_s"] / res["forward_ops"] * 1e6)
    assert res["host_us_per_dispatched_op"] < res["host_us_per_forward_op"]
    # the value for host_op_us: a step over the ops the planner counts for it (48 a layer, 26 + 30 outside)
    assert res["planner_ops"] == 2 * 48 + 26 + 30
    assert res["host_us_per_planner_op"] == pytest.approx(res["step_s"] / res["planner_ops"] * 1e6)
    assert res["scaled_batch"] == 4 and res["scaled_step_s"] > 0
    assert res["host_bound"] == (res["scaled_step_s"] < 2.0 * res["step_s"])
    assert res["optimizer_tensors"] == sum(1 for _ in GPT(ModelConfig(**TINY_GPT)).parameters())
    assert res["optimizer_ops"] >= 8 * res["optimizer_tensors"] and res["optimizer_us_per_tensor"] > 0
    assert (res["profile"], res["profile_field"], res["profile_us"]) == ("cpu", "op_overhead_us", 12.0)
    assert (res["planner_ops_per_layer"], res["planner_optimizer_ops_per_tensor"]) == (48, 14)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
def test_the_planner_s_eager_op_count_is_the_gpt_s(autocast):
    """step_time.EAGER_OPS_PER_LAYER["gpt"] (what host_op_us and op_overhead_us multiply) is within 15% of the non-view
    aten ops one more layer adds to the real GPT's forward, as the dispatch benchmark counts them (45 in fp32, 54 under
    bf16 autocast, 2026-11-30)."""
    def forward_ops(layers: int) -> int:
        model = GPT(ModelConfig(**dict(TINY_GPT, n_layers=layers)), init_seed=0)
        tokens = torch.randint(0, TINY_GPT["vocab_size"], (1, 33))
        batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "positions": torch.arange(32)}
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), OpCounter() as counter:
            model(batch)
        return counter.ops

    per_layer = forward_ops(3) - forward_ops(2)
    assert abs(per_layer - EAGER_OPS_PER_LAYER["gpt"]) <= 0.15 * EAGER_OPS_PER_LAYER["gpt"], per_layer


def test_the_report_puts_the_measured_dispatch_beside_the_profile_s_assumption(tmp_path):
    report = {"status": "passed", "tests": [], "notes": [], "benchmarks": {"dispatch": dict(DISPATCH_RESULT)}}
    rep.write(report, tmp_path)
    md = (tmp_path / "gpu-report.md").read_text()
    assert "**29.6 us per forward op** with its backward (169 forward + 190 backward aten ops" in md
    assert "(152 forward ops for this model's step, 48 a layer + the embedding, head and loss): **32.9 us per op**, " \
           "the value for host_op_us" in md
    assert "planner: profile h200 assumes host_op_us = 20 us per forward op, measured / assumed = 1.65" in md
    assert "60 us per parameter tensor" in md and "did not keep up" not in md
    report["benchmarks"]["dispatch"].update(host_bound=False, scaled_step_s=0.015, profile=None, profile_us=None)
    rep.write(report, tmp_path)
    md = (tmp_path / "gpu-report.md").read_text()
    assert "**the device did not keep up** (4 samples a step took 3x one sample's time" in md
    assert "no built-in profile matches this device's name" in md
    report["benchmarks"]["dispatch"].update(smoke="no CUDA device: measured on CPU")  # no device to keep up
    rep.write(report, tmp_path)
    assert "did not keep up" not in (tmp_path / "gpu-report.md").read_text()


def test_a_dispatch_run_whose_time_grows_with_the_device_s_work_is_not_host_bound(monkeypatch):
    """host_bound is decided by the device's work, not by the host's loop against the synchronised end: one
    synchronising op per step (the chunked loss's nonzero until 2026-11-30) makes the loop end with the device
    whether or not it kept up. The CPU runs every kernel synchronously, the limit of that: a GPT whose kernels dominate its dispatch (d 512,
    S 256) is device-bound, and its 4-sample steps take ~4x as long; the tiny one's barely longer."""
    monkeypatch.setattr(dispatch, "TINY_GPT", dict(TINY_GPT, d_model=512, n_heads=8, n_kv_heads=4, ffn_hidden=2048))
    monkeypatch.setattr(dispatch, "SEQ_LEN", 256)
    res = measure_dispatch(torch.device("cpu"), iters=2, repeats=1)
    assert res["scaled_step_s"] > dispatch.HOST_BOUND_RATIO * res["step_s"] and not res["host_bound"], res

"""Sections of the GPU check under one time budget: environment, gpu tests, dispatch, kernel and llama benchmarks.

Each section runs in a subprocess with a time limit (a CUDA fault or a hang loses one section, not the
report); the report is rewritten after every section. A section reaching its limit is interrupted
(SIGINT) :data:`INTERRUPT_GRACE_S` before it is killed, so pytest still writes the results of the
tests it finished and a benchmark keeps the JSON of the parts it measured. Exit status: 0 when no test
failed and no section crashed (skips are fine: that is the CPU smoke run), 1 otherwise, 2 for bad
arguments.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from . import report as rep

ROOT = Path(__file__).resolve().parents[2]
#: a section at its time limit gets SIGINT this long before SIGKILL (pytest then writes its JUnit file)
INTERRUPT_GRACE_S = 10.0
#: a benchmark process's start (python, torch with its CUDA libraries, the CUDA context) happens before its
#: own --budget-s clock starts
BENCH_START_S = 15.0
#: the sections' own files, kept in this folder of the report's directory: pytest's log (with the failures' tracebacks),
#: its JUnit file, each benchmark's log and JSON. On a lent GPU only $OUT comes back, and the report's 500-character
#: messages do not say where a test failed. Emptied at the start of every check.
LOGS_DIR = "gpu-check-logs"
#: a gpu test file is not started with less than this left of the tests section (its process's start, torch's CUDA
#: context and the collection alone take seconds)
MIN_TEST_FILE_S = 20.0
#: the check's sections, in the order they run (``--sections`` picks some: a second try reruns what failed)
SECTIONS = ("tests", "dispatch", "kernels", "llama")
#: the benchmarks that also run without CUDA (a smoke of their code on CPU)
CPU_SMOKE_BENCHES = ("dispatch",)
#: the dispatch benchmark's limit: its process's start (BENCH_START_S) and a few seconds of timing
DISPATCH_LIMIT_S = 45.0
EXAMPLES = """examples:
  make gpu-check                                  # python3 as is; report in $OUT or runs/gpu-check/
  PYTHONPATH=. python3 -m dist_train.gpucheck --out /tmp/gpu --budget-s 470
  PYTHONPATH=. python3 -m dist_train.gpucheck --skip-bench     # tests only
  PYTHONPATH=. python3 -m dist_train.gpucheck --sections llama  # a second try of one section"""


def gpu_test_files(root: Path = ROOT) -> list[str]:
    """Test files that hold tests marked ``gpu`` (found by their text, so no other test module, and
    none of their heavy imports, is loaded)."""
    return sorted(str(p.relative_to(root)) for p in (root / "tests").glob("test_*.py")
                  if "mark.gpu" in p.read_text(errors="replace"))


def _let_sections_see_sigint() -> None:
    """A check started as a background job of a non-interactive shell (``make gpu-check &``, nohup) has SIGINT
    ignored, and "ignored" survives exec: every section would then ignore the limit's SIGINT and lose, when killed,
    what it had finished. A handled SIGINT is reset to its default by exec, so this process takes Python's handler and
    the sections start with SIGINT at its default. (Not a ``preexec_fn`` in the child: Python code between fork and
    exec can deadlock when the parent has threads, which the CUDA driver probed by ``environment()`` may start.)"""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _run(cmd: list[str], timeout: float, log: Path) -> tuple[int, float]:
    """Run ``cmd`` in the repository root with the project on PYTHONPATH for at most ``timeout`` seconds:
    SIGINT at ``timeout`` minus the grace (:data:`INTERRUPT_GRACE_S`, at most a quarter of ``timeout``),
    SIGKILL at ``timeout``. Returns (exit status, or 124 when the limit stopped it; seconds)."""
    # unbuffered: a section killed at its limit leaves its log complete up to that moment (run_tests reads it)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               PYTHONUNBUFFERED="1")
    timeout = max(1.0, timeout)
    grace = min(INTERRUPT_GRACE_S, timeout / 4)
    t0 = time.perf_counter()
    _let_sections_see_sigint()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(timeout=timeout - grace)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):  # still running after the grace: killed below
                proc.wait(timeout=grace)
            rc = 124
        finally:  # also when the check itself is interrupted: no section outlives it
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return rc, time.perf_counter() - t0


def _tail(path: Path, n: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def run_tests(report: dict, work: Path, timeout: float) -> None:
    """Every gpu test file in its own pytest process, one after another within ``timeout`` seconds (each may use what
    the ones before it left). One process per file: a test that kills its process (a segfault in a CUDA library) or
    leaves a sticky CUDA error (after an illegal memory access every later CUDA call of that process fails) costs the
    rest of its own file, not the other files' results."""
    files = gpu_test_files()
    report["test_files"], report["tests"] = files, []
    deadline = time.perf_counter() + timeout
    runs = []
    for path in files:
        left = deadline - time.perf_counter()
        if left < MIN_TEST_FILE_S:
            report["notes"].append(f"{path}: not run, {max(0.0, left):.0f} s left of the tests section's "
                                   f"{timeout:.0f} s")
            runs.append({"file": path, "exit_code": 124, "seconds": 0.0, "log": None})
            continue
        runs.append(_run_test_file(report, path, work, left))
    # the run a reader needs first: a crash (not 0: passed, nor 1: tests failed), else a failure, else the last
    worst = next((r for r in runs if r["exit_code"] not in (0, 1)), None) or next(
        (r for r in runs if r["exit_code"] == 1), runs[-1] if runs else None)
    report["sections"]["tests"] = {
        "exit_code": 5 if worst is None else worst["exit_code"],   # 5: pytest's "no tests collected"
        "seconds": sum(r["seconds"] for r in runs),
        "log_tail": _tail(worst["log"]) if worst is not None and worst["log"] is not None else "",
        "files": {r["file"]: {"exit_code": r["exit_code"], "seconds": r["seconds"]} for r in runs}}


def _run_test_file(report: dict, path: str, work: Path, timeout: float) -> dict:
    """pytest -m gpu over one file (at most ``timeout`` seconds); its tests are added to ``report``. -> its run."""
    stem = Path(path).stem
    xml, log = work / f"junit-{stem}.xml", work / f"pytest-{stem}.log"
    # -v: each test's outcome on its own line as it finishes, so a pytest killed before writing its JUnit file
    # (a hang that ignores SIGINT, e.g. inside a CUDA or NCCL call) still shows what finished and what hung
    # junit_family xunit1: the JUnit file keeps each test's record_property numbers (xunit2 has no place for them)
    rc, secs = _run([sys.executable, "-m", "pytest", "-m", "gpu", "-v", "-p", "no:cacheprovider", "-o",
                     "junit_family=xunit1", f"--junitxml={xml}", path], timeout, log)
    try:
        report["tests"] += rep.junit_results(xml)
    except (OSError, ET.ParseError):  # killed before (or while) writing it
        tests, running = rep.log_results(log) if log.exists() else ([], None)
        report["tests"] += tests
        report["notes"].append(f"{path}: no complete JUnit file: the test outcomes come from the pytest log"
                               + (f"; {running} was running when its pytest stopped (exit {rc})" if running else ""))
    if rc == 124:
        report["notes"].append(f"{path}: stopped by the time limit ({timeout:.0f} s); the tests listed are those "
                               "that finished before it")
    return {"file": path, "exit_code": rc, "seconds": secs, "log": log}


def run_bench(report: dict, name: str, work: Path, timeout: float, budget_s: float | None = None) -> None:
    """Benchmark ``name`` in a subprocess limited to ``timeout`` seconds (its results, or why it did not
    run, into ``report``); not started when ``timeout`` cannot even hold the process's start and stop."""
    overhead = BENCH_START_S + INTERRUPT_GRACE_S
    if timeout <= overhead:
        report["benchmarks"][name] = {"skipped": f"time budget: {max(0.0, timeout):.0f} s left, not enough to start "
                                                 f"and stop a benchmark process ({overhead:.0f} s)"}
        report["notes"].append(f"{name}: not run, the time budget was spent")
        return
    out = work / f"{name}.json"
    cmd = [sys.executable, "-m", "dist_train.gpucheck.bench", name, "--out", str(out)]
    if budget_s is not None:
        cmd += ["--budget-s", f"{budget_s:.0f}"]
    rc, secs = _run(cmd, timeout, work / f"{name}.log")
    try:
        res = json.loads(out.read_text())
    except (OSError, ValueError):
        res = {}
    if rc != 0:
        res["error"] = f"exit {rc} after {secs:.0f} s: {_tail(work / f'{name}.log', 600)}"
    report["benchmarks"][name] = res
    report["sections"][name] = {"exit_code": rc, "seconds": secs}


def _parse_args(argv) -> tuple[argparse.Namespace, list[str]]:
    """The check's arguments and the sections to run (exit 2 with one line for a bad value)."""
    parser = argparse.ArgumentParser(prog="python3 -m dist_train.gpucheck",
                                     description="Run every gpu-marked test and the GPU benchmarks; write "
                                                 "gpu-report.json and gpu-report.md.",
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None,
                        help="report directory (default: $OUT when set, else runs/gpu-check)")
    parser.add_argument("--budget-s", type=float, default=470.0, help="wall-clock budget of the whole check")
    parser.add_argument("--skip-bench", action="store_true", help="run the tests only")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated sections to run, of {','.join(SECTIONS)} (default: all); the others "
                             "are reported as not run")
    args = parser.parse_args(argv)
    if args.budget_s <= 0:
        parser.error(f"--budget-s {args.budget_s}: must be > 0")
    sections = [name for name in args.sections.split(",") if name]
    if not sections or set(sections) - set(SECTIONS):
        parser.error(f"--sections {args.sections!r}: a comma-separated list of {', '.join(SECTIONS)}")
    return args, sections


def _run_sections(report: dict, sections: list[str], skip_bench: bool, deadline: float, out: Path) -> None:
    """Each section asked for, in order, under its own limit within ``deadline`` (perf_counter time); the report is
    rewritten to ``out`` after each."""
    def left(reserve: float = 5.0) -> float:
        return deadline - time.perf_counter() - reserve

    cuda = report["environment"]["cuda_available"]
    work = out / LOGS_DIR
    shutil.rmtree(work, ignore_errors=True)  # an earlier run's benchmark JSON must never be read as this run's
    work.mkdir(parents=True)
    report["logs"] = LOGS_DIR
    if "tests" in sections:
        run_tests(report, work, min(240.0, left()))
        rep.write(report, out)
    else:
        report["notes"].append("gpu tests not run (--sections)")
    benches = [name for name in SECTIONS[1:] if name in sections and not skip_bench]
    if skip_bench:
        report["notes"].append("benchmarks skipped (--skip-bench)")
    for name in SECTIONS[1:]:  # every benchmark gets its place in the report, in the order they run
        if name not in benches:
            report["benchmarks"][name] = {"skipped": "not run (--sections / --skip-bench)"}
        elif not cuda and name not in CPU_SMOKE_BENCHES:
            report["benchmarks"][name] = {"skipped": "no CUDA device"}
        else:  # replaced by its results (run_bench); stays if the check is stopped before it
            report["benchmarks"][name] = {"skipped": "not run: the check stopped before it"}
    if "dispatch" in benches:  # a few seconds; llama keeps 150 s when it runs after (kernels shrinks first)
        run_bench(report, "dispatch", work, min(DISPATCH_LIMIT_S, left(150.0 if cuda and "llama" in benches else 5.0)))
        rep.write(report, out)
    if cuda and "kernels" in benches:  # at most 90 s, and llama keeps 150 s when it runs after
        run_bench(report, "kernels", work, min(90.0, left(150.0 if "llama" in benches else 5.0)))
        rep.write(report, out)
    if cuda and "llama" in benches:
        llama_limit = left()
        run_bench(report, "llama", work, llama_limit,
                  budget_s=llama_limit - INTERRUPT_GRACE_S - BENCH_START_S)
    for name, sec in report["sections"].items():
        if name != "tests":
            report["notes"].append(f"{name}: exit {sec['exit_code']} in {sec['seconds']:.0f} s")


def _failed(report: dict) -> bool:
    """A test failed, or a section crashed (pytest exits 1 when tests fail, counted here; anything else, 5: none
    collected, or a tests section that listed no test is a crash; a benchmark's non-zero exit too)."""
    failed = any(t["outcome"] in ("failed", "error") for t in report["tests"])
    tests = report["sections"].get("tests")
    crashed = ((tests is not None and (tests["exit_code"] not in (0, 1) or not report["tests"]))
               or any(sec["exit_code"] != 0 for name, sec in report["sections"].items() if name != "tests"))
    return failed or crashed


def main(argv=None) -> int:
    args, sections = _parse_args(argv)
    out = args.out or Path(os.environ.get("OUT") or ROOT / "runs" / "gpu-check")
    t0 = time.perf_counter()
    # here, not at the top: env imports torch, which --help and a refused argument (exit 2) do not need; the
    # CUDA probe starts only once the arguments are good
    from .env import environment

    # the command as run, for whoever records the report's numbers with it (docs/benchmarks.md)
    command = shlex.join([Path(sys.executable).name, "-m", "dist_train.gpucheck",
                          *(sys.argv[1:] if argv is None else argv)])
    report = {"status": "running", "command": command, "budget_s": args.budget_s, "environment": environment(),
              "tests": [], "benchmarks": {}, "sections": {}, "notes": []}
    rep.write(report, out)
    _run_sections(report, sections, args.skip_bench, t0 + args.budget_s, out)
    failed = _failed(report)
    cuda = report["environment"]["cuda_available"]
    report["status"] = "failed" if failed else ("passed" if cuda else "passed (CPU smoke: CUDA parts skipped)")
    report["wall_s"] = time.perf_counter() - t0
    rep.write(report, out)
    print(f"gpu-check: {report['status']} | tests {report['summary']} | {report['wall_s']:.0f} s | "
          f"report {out / 'gpu-report.md'}")
    return 1 if failed else 0

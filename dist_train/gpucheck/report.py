"""``gpu-report.json`` (everything) and ``gpu-report.md`` (the same for a person) of one GPU check."""
from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Optional


def junit_results(path: Path) -> list[dict]:
    """Every test case of a pytest JUnit XML file: id, outcome (passed/failed/error/skipped), seconds,
    the failure/skip message (first 500 characters) and the numbers the test recorded (``record_property``:
    errors, bytes, losses; kept for a failed test too). A run interrupted by its time limit lists the
    tests it finished."""
    root = ET.parse(path).getroot()
    out = []
    for case in root.iter("testcase"):
        if case.get("name") is None:  # an interrupted pytest leaves a nameless case for the test it stopped
            continue
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = "failed" if tag == "failure" else tag
                message = (el.get("message") or el.text or "").strip()[:500]
                break
        cls = case.get("classname", "").replace(".", "/")
        out.append({"test": f"{cls}.py::{case.get('name')}", "outcome": outcome,
                    "seconds": float(case.get("time") or 0.0), "message": message,
                    "numbers": {prop.get("name"): prop.get("value") for prop in case.iter("property")}})
    return out


#: a finished test in ``pytest -v`` output: "tests/test_x.py::test_y[id] PASSED   [ 10%]"
_VERBOSE_LINE = re.compile(r"^(\S+\.py::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")
_VERBOSE_OUTCOME = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failed", "ERROR": "error", "SKIPPED": "skipped",
                    "XFAIL": "skipped"}


def log_results(path: Path) -> tuple[list[dict], Optional[str]]:
    """The tests a ``pytest -v`` log (written unbuffered) shows finished, and the one it shows started but not
    finished (None when none): what is left of a pytest killed before it wrote its JUnit file (a hang that ignored
    SIGINT). No seconds or messages: the log has none per test."""
    out, running = [], None
    for line in path.read_text(errors="replace").splitlines():
        m = _VERBOSE_LINE.match(line)
        if m:
            out.append({"test": m.group(1), "outcome": _VERBOSE_OUTCOME[m.group(2)], "seconds": 0.0,
                        "message": "from the pytest log (no JUnit file)"})
            running = None
        elif re.match(r"^\S+\.py::\S+ *$", line):
            running = line.strip()
    return out, running


def summarize(report: dict) -> dict:
    counts: dict = {}
    for t in report.get("tests", []):
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    return counts


#: issue 21's targets, printed beside the numbers they judge: the block kernel at >= 90% of torch SDPA's speed, and the
#: ~1B Llama step at >= 45% MFU against the bf16 matmul peak measured in the same run
TARGET_VS_SDPA = 0.90
TARGET_MFU = 0.45


def _target_line(what: str, value: float, target: float, where: str = "") -> str:
    verdict = "met" if value >= target else "**not met**"
    return f"target (issue 21): {what} >= {target:.0%}; measured {value:.1%}{where}: {verdict}"


def _fmt(x, digits: int = 3) -> str:
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:,.0f}"
    return "—" if x is None else str(x)


def _env_md(env: dict) -> list[str]:
    gpus = ", ".join(f"{g['name']} (sm {g['capability']}, {g['memory_gib']} GiB)" for g in env.get("gpus", []))
    rows = [("GPU", gpus or "none (CUDA not available)"), ("driver", env.get("driver")),
            ("torch", env.get("torch")), ("CUDA (torch build)", env.get("torch_cuda")), ("cuDNN", env.get("cudnn")),
            ("attention ops", ", ".join(env.get("attention_ops", [])) or "—"), ("python", env.get("python")),
            ("host", f"{env.get('host')} ({env.get('cpu_count')} CPUs, load "
                     f"{' '.join(f'{x:.2f}' for x in env.get('load_average') or [])})"),
            ("optional packages", ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in env.get("packages", {}).items())),
            ("commit", env.get("commit"))]
    return ["| | |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in rows]


def _document_lines(rows: list[dict]) -> list[str]:
    """The packed-document rows of the kernels benchmark (bench.bench_documents) as a table; none: nothing."""
    if not rows:
        return []
    lines = [f"packed documents, causal fwd+bwd through local_attention (B={rows[0]['batch']}, S={rows[0]['seq_len']}): "
             "`ideal` is the speed-up the skipped pairs allow, `of ideal` how much of it the plan's kernel calls keep", "",
             "| case | documents | kernel calls | ms | vs unmasked | ideal | of ideal |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {_fmt(r['documents'])} | {r['kernel_calls']} | {_fmt(r['ms'])} | "
                     f"{_fmt(r.get('vs_unmasked'))} | {_fmt(r.get('ideal'))} | {_fmt(r.get('of_ideal'))} |")
    return lines + [""]


def _dispatch_lines(res: dict) -> list[str]:
    """The dispatch benchmark (gpucheck.dispatch.measure_dispatch): the host's µs per eager op of the GPT beside what
    the planner's profile assumes."""
    if "host_us_per_forward_op" not in res:
        return ["no measurement", ""]
    m = res["model"]
    lines = [f"host dispatch of the eager GPT (d {m['d_model']}, {m['n_layers']} layers, S {m['seq_len']}, "
             f"{res['precision']}, on {res['device']}; {res['iters']} forward+backward x {res['repeats']} runs, "
             f"synchronised by the check at each run's end): **{_fmt(res['host_us_per_forward_op'])} us per forward op** with its "
             f"backward ({res['forward_ops']} forward + {res['backward_ops']} backward aten ops, "
             f"{_fmt(res['host_us_per_dispatched_op'])} us per dispatched op)", "",
             f"per the planner's op count ({_fmt(res['planner_ops'])} forward ops for this model's step, "
             f"{res['planner_ops_per_layer']} a layer + the embedding, head and loss): "
             f"**{_fmt(res['host_us_per_planner_op'])} us per op**"
             + ("" if res.get("smoke") else ", the value for host_op_us"), ""]
    assumed = res.get("profile_us")
    if res.get("profile") is None:
        lines += ["planner: no built-in profile matches this device's name", ""]
    else:
        ratio = f", measured / assumed = {_fmt(res['host_us_per_planner_op'] / assumed)}" if assumed else ""
        lines += [f"planner: profile {res['profile']} assumes {res['profile_field']} = {_fmt(assumed)} us per forward "
                  f"op{ratio}", ""]
    if not res["host_bound"] and not res.get("smoke"):  # on CPU the ops run on the host: no device to keep up
        lines += [f"**the device did not keep up** ({res['scaled_batch']} samples a step took "
                  f"{_fmt(res['scaled_step_s'] / res['step_s'])}x one sample's time, the same ops with more device work: "
                  "the device's kernels set part of the pace): the number above is not the host's dispatch alone", ""]
    lines += [f"optimizer (torch AdamW foreach=False): {_fmt(res['optimizer_us_per_tensor'])} us per parameter tensor, "
              f"{_fmt(res['optimizer_ops'] / res['optimizer_tensors'])} ops each, {_fmt(res['optimizer_us_per_op'])} us "
              "per op (not in the planner's host term)", ""]
    return lines + ([res["smoke"], ""] if res.get("smoke") else [])


def _bench_md(name: str, res: dict) -> list[str]:
    lines = [f"### {name}", ""]
    if not res or "skipped" in res:
        return lines + [f"{res.get('skipped') or 'not run'}", ""]
    if "error" in res:  # a crash or the time limit: the parts measured before it still follow
        lines += [f"**error**: {res['error']}", ""]
    if name == "dispatch":
        return lines + _dispatch_lines(res)
    if name == "kernels":
        if not res.get("rows"):
            return lines + ["no rows measured", ""]
        lines += ["| S | mask | kernel (ops) | ms | TFLOP/s | SDPA kernel | SDPA ms | SDPA TFLOP/s | vs SDPA |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in res.get("rows", []):
            lines.append(f"| {r['seq_len']} | {'causal' if r['causal'] else 'full'} | {r['kernel']}={r['kernel_name']} "
                         f"{r['ops']} | {_fmt(r['ms'])} | {_fmt(r['tflops'])} | {_fmt(r.get('sdpa_backend'))} | "
                         f"{_fmt(r['sdpa_ms'])} | {_fmt(r['sdpa_tflops'])} | {_fmt(r['vs_sdpa'])}× |")
        worst = min(res["rows"], key=lambda r: r["vs_sdpa"])
        where = f" (lowest row: {worst['kernel']}, S={worst['seq_len']}, {'causal' if worst['causal'] else 'full'})"
        lines += ["", _target_line("speed vs SDPA", worst["vs_sdpa"], TARGET_VS_SDPA, where), ""]
        return lines + _document_lines(res.get("documents") or [])
    for part in ("step", "longest", "checkpoint"):  # the order they run in
        if part in res:
            body = {k: v for k, v in res[part].items() if k != "trials"}
            lines += [f"**{part}**: " + ", ".join(f"{k}={_fmt(v)}" for k, v in body.items()), ""]
    if res.get("step", {}).get("mfu_vs_measured_peak") is not None:
        lines += [_target_line("MFU vs the measured bf16 matmul peak", res["step"]["mfu_vs_measured_peak"],
                               TARGET_MFU), ""]
    for t in res.get("longest", {}).get("trials", []):
        lines.append(f"- S={t['seq_len']}: " + (f"ok, {_fmt(t['step_s'])} s, peak {_fmt(t['peak_gib'])} GiB, "
                                              f"{_fmt(t['bytes_per_token'])} B/token" if t["ok"] else f"failed: {t['error']}"))
    extra = {k: v for k, v in res.items() if not isinstance(v, dict) and k != "error"}
    return lines + ["", ", ".join(f"{k}={_fmt(v)}" for k, v in extra.items()), ""]


def write(report: dict, out_dir: Path) -> None:
    """(Re)write both files; called after every section."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report["summary"] = summarize(report)
    (out_dir / "gpu-report.json").write_text(json.dumps(report, indent=2, default=str))
    lines = ["# dist-train GPU check", "", f"status: **{report.get('status', 'running')}** | tests: "
             + ", ".join(f"{v} {k}" for k, v in report["summary"].items())
             + f" | wall {_fmt(report.get('wall_s'))} s of budget {_fmt(report.get('budget_s'))} s", "",
             f"command: `{report.get('command', '—')}`", ""]
    if report.get("logs"):
        lines += [f"full logs: `{report['logs']}/` beside this file (pytest-<file>.log with the failures' tracebacks, junit-<file>.xml, "
                  "each benchmark's .log and .json)", ""]
    lines += ["## Environment", ""] + _env_md(report.get("environment", {}))
    lines += ["", "## Tests", "", "| test | outcome | s | message | numbers |", "|---|---|---|---|---|"]
    for t in report.get("tests", []):
        msg = t["message"].replace("|", "\\|").replace("\n", " ")[:200]
        numbers = "; ".join(f"{k}={v}" for k, v in t.get("numbers", {}).items()).replace("|", "\\|")[:400]
        lines.append(f"| {t['test']} | {t['outcome']} | {t['seconds']:.2f} | {msg} | {numbers} |")
    lines += ["", "## Benchmarks", ""]
    for name, res in report.get("benchmarks", {}).items():
        lines += _bench_md(name, res)
    for note in report.get("notes", []):
        lines.append(f"- {note}")
    (out_dir / "gpu-report.md").write_text("\n".join(lines) + "\n")

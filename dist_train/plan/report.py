"""Scaling efficiency and the sweep's outputs: results.csv, results.json, results.md and PNG plots.

Efficiency (docs/scaling.md), per series (points sharing every value but the device count), against
the series' smallest device count N₁ measured in the same sweep:
    strong          E(N) = T₁·N₁ / (T_N·N)                      T: median step time, fixed problem
    weak            E(N) = (F_N / N) / (F₁ / N₁)                 F: achieved FLOP/s (work grows with N)
    sequence-weak   E(N) = (F_N / N) / (F₁ / N₁)                 on FLOP throughput: tokens/s must fall when
                                                                 the sequence grows (attention is O(S²))
    grid            no efficiency (points are not a scaling series)
"""
from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path
from typing import Optional

COLUMNS = ["id", "status", "world_size", "layout", "varied", "step_time_s", "step_time_iqr_s", "tokens_per_s",
           "tokens_per_s_per_device", "tflops_per_device", "mfu", "efficiency", "peak_mem_bytes",
           "pred_peak_mem_bytes", "mem_error", "pred_step_time_s", "step_error", "exposed_comm_fraction",
           "pred_exposed_comm_fraction", "straggler_spread", "seq_len", "global_batch", "load_avg_1m_before",
           "reason"]


def series_key(rec: dict) -> str:
    return json.dumps(rec.get("series") or {}, sort_keys=True, default=str)


def efficiency(mode: str, base: dict, rec: dict) -> Optional[float]:
    """Scaling efficiency of ``rec`` against the series baseline ``base`` (both status ok)."""
    n1, n = base["world_size"], rec["world_size"]
    if mode == "strong":
        return base["step_time_s"] * n1 / (rec["step_time_s"] * n)
    if mode in ("weak", "sequence-weak"):
        f1 = base["flops_per_step"] / base["step_time_s"] / n1
        fn = rec["flops_per_step"] / rec["step_time_s"] / n
        return fn / f1
    return None


def add_efficiency(mode: str, records: list[dict]) -> list[dict]:
    """Set ``efficiency`` on every ok record (None for grid or a series without an ok baseline)."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(series_key(r), []).append(r)
    for rs in groups.values():
        ok = sorted((r for r in rs if r.get("status") == "ok"), key=lambda r: r["world_size"])
        for r in rs:
            r["efficiency"] = efficiency(mode, ok[0], r) if ok and r.get("status") == "ok" else None
    return records


def rel_error(pred: Optional[float], meas: Optional[float]) -> Optional[float]:
    if pred is None or not meas:
        return None
    return (pred - meas) / meas


def error_summary(records: list[dict]) -> dict:
    """Median absolute relative error of the planner's step time and peak memory over ok points."""
    out = {}
    for key in ("step_error", "mem_error"):
        errs = [abs(r[key]) for r in records if r.get("status") == "ok" and r.get(key) is not None]
        out[key] = {"median_abs": statistics.median(errs) if errs else None,
                    "max_abs": max(errs) if errs else None, "points": len(errs)}
    return out


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v, default=str)
    return str(v)


def write_csv(records: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for r in records:
            w.writerow([_cell(r.get(c)) for c in COLUMNS])


def markdown_table(records: list[dict], meta: dict) -> str:
    def pct(v):
        return "" if v is None else f"{100 * v:+.0f}%"

    def pct_abs(v):
        return "" if v is None else f"{100 * v:.0f}%"

    lines = [f"# Sweep `{meta['name']}` ({meta['mode']} scaling)", "",
             *([meta["description"], ""] if meta.get("description") else []),
             f"FLOP convention: {meta['flop_convention']}", "",
             f"Efficiency: {meta['efficiency_definition']}", "",
             f"Device: {meta['device']}. Command: `{meta['command']}`", "",
             "| point | N | layout | step ms (IQR) | tok/s | tok/s/dev | TFLOP/s/dev | MFU | eff. | peak MiB meas / pred (err) "
             "| pred step ms (err) | exposed comm meas / pred | straggler | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        if r.get("status") != "ok":
            lines.append(f"| {_label(r)} | {r['world_size']} | {r.get('layout', '')} | | | | | | | | | | | failed: "
                         f"{r.get('reason', '')} |")
            continue
        lines.append(
            f"| {_label(r)} | {r['world_size']} | {r.get('layout', '')} | {1e3 * r['step_time_s']:.1f} ({1e3 * r['step_time_iqr_s']:.1f}) "
            f"| {r['tokens_per_s']:,.0f} | {r['tokens_per_s_per_device']:,.0f} | {r['tflops_per_device']:.4f} "
            f"| {100 * r['mfu']:.1f}% | {pct_abs(r['efficiency'])} "
            f"| {r['peak_mem_bytes'] / 2 ** 20:.0f} / {r['pred_peak_mem_bytes'] / 2 ** 20:.0f} ({pct(r['mem_error'])}) "
            f"| {1e3 * r['pred_step_time_s']:.1f} ({pct(r['step_error'])}) "
            f"| {100 * r['exposed_comm_fraction']:.0f}% / {100 * r['pred_exposed_comm_fraction']:.0f}% "
            f"| {r['straggler_spread']:.2f} | ok |")
    errs = error_summary(records)
    s, m = errs["step_error"], errs["mem_error"]
    if s["points"]:
        lines += ["", f"Planner error over {s['points']} points: step time median |err| "
                      f"{100 * s['median_abs']:.1f}% (max {100 * s['max_abs']:.1f}%), peak memory median |err| "
                      f"{100 * m['median_abs']:.1f}% (max {100 * m['max_abs']:.1f}%)."]
    return "\n".join(lines) + "\n"


def _label(r: dict) -> str:
    s = r.get("series") or {}
    extra = " ".join(f"{k.split('.')[-1]}={v}" for k, v in s.items())
    return extra or r["id"].rsplit("-", 1)[0]


def _series_points(records: list[dict], x_key: str, y_key: str) -> dict[str, tuple[list, list]]:
    out: dict[str, tuple[list, list]] = {}
    for r in sorted(records, key=lambda r: r.get(x_key) or 0):
        if r.get("status") != "ok" or r.get(y_key) is None or r.get(x_key) is None:
            continue
        lab = " ".join(f"{k.split('.')[-1]}={v}" for k, v in (r.get("series") or {}).items()) or "all"
        xs, ys = out.setdefault(lab, ([], []))
        xs.append(r[x_key])
        ys.append(r[y_key])
    return out


def memory_axis(ok_records: list[dict], x_key: str) -> tuple[str, str]:
    """memory.png's x axis: the sequence length when the sweep varies it (sequence-weak, cp grids), else
    ``x_key`` (devices, or the point of a grid): one sequence length would stack every point on one vertical line."""
    if len({r.get("seq_len") for r in ok_records}) > 1:
        return "seq_len", "sequence length (tokens)"
    return x_key, "devices" if x_key == "world_size" else "point"


def write_plots(records: list[dict], out: Path, meta: dict) -> list[Path]:
    """efficiency.png, throughput.png, memory.png, aggregate_loglog.png (matplotlib, Agg backend)."""
    import matplotlib  # only when plots are written: `dist-train scale --help` and the CSV/JSON need none

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    paths = []
    ok = [r for r in records if r.get("status") == "ok"]
    if not ok:
        return paths
    ns = sorted({r["world_size"] for r in ok})

    def save(fig, name):
        p = out / name
        fig.tight_layout()
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)

    if meta["mode"] != "grid":
        fig, ax = plt.subplots(figsize=(6, 4))
        for lab, (xs, ys) in _series_points(records, "world_size", "efficiency").items():
            ax.plot(xs, [100 * y for y in ys], "o-", label=lab)
        ax.plot(ns, [100] * len(ns), "k--", label="ideal")
        ax.set(xlabel="devices", ylabel="efficiency (%)", title=f"{meta['name']}: {meta['mode']} scaling efficiency",
               ylim=(0, 120))
        ax.set_xticks(ns)
        ax.legend(fontsize=7)
        save(fig, "efficiency.png")

    x_key = "world_size" if meta["mode"] != "grid" else "point_index"
    for i, r in enumerate(records):
        r["point_index"] = i
    fig, ax = plt.subplots(figsize=(6, 4))
    for lab, (xs, ys) in _series_points(records, x_key, "tokens_per_s_per_device").items():
        ax.plot(xs, ys, "o-", label=f"{lab} measured")
    for lab, (xs, ys) in _series_points(records, x_key, "pred_tokens_per_s_per_device").items():
        ax.plot(xs, ys, "x:", label=f"{lab} planner")
    ax.set(xlabel="devices" if x_key == "world_size" else "point", ylabel="tokens/s per device",
           title=f"{meta['name']}: throughput per device")
    if x_key == "world_size":
        ax.set_xticks(ns)  # whole devices, not 1.2, 1.4, ...
    ax.legend(fontsize=7)
    save(fig, "throughput.png")

    mem_x, mem_label = memory_axis(ok, x_key)
    fig, ax = plt.subplots(figsize=(6, 4))
    for lab, (xs, ys) in _series_points(records, mem_x, "peak_mem_bytes").items():
        ax.plot(xs, [y / 2 ** 20 for y in ys], "o-", label=f"{lab} measured (max over ranks)")
    for lab, (xs, ys) in _series_points(records, mem_x, "pred_peak_mem_bytes").items():
        ax.plot(xs, [y / 2 ** 20 for y in ys], "x:", label=f"{lab} planner")
    ax.set(xlabel=mem_label, ylabel="peak memory per rank (MiB)",
           title=f"{meta['name']}: memory vs {mem_label.split(' (')[0]}")
    if mem_x == "world_size":
        ax.set_xticks(ns)
    ax.legend(fontsize=7)
    save(fig, "memory.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for lab, (xs, ys) in _series_points(records, "world_size", "tflops_total").items():
        ax.loglog(xs, ys, "o-", base=2, label=lab)
        ax.loglog(xs, [ys[0] * x / xs[0] for x in xs], "k--", base=2, alpha=0.5)
    ax.set(xlabel="devices", ylabel="aggregate TFLOP/s", title=f"{meta['name']}: aggregate throughput (dashed: ideal)")
    ax.set_xticks(ns, [str(n) for n in ns])  # device counts, not 2^0, 2^1
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    ax.legend(fontsize=7)
    save(fig, "aggregate_loglog.png")
    return paths


def write_outputs(records: list[dict], out: Path, meta: dict) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "results.csv", "json": out / "results.json", "md": out / "results.md"}
    write_csv(records, paths["csv"])
    paths["json"].write_text(json.dumps({"meta": meta, "errors": error_summary(records), "points": records},
                                        indent=2, default=str))
    paths["md"].write_text(markdown_table(records, meta))
    for p in write_plots(records, out, meta):
        paths[p.stem] = p
    return paths

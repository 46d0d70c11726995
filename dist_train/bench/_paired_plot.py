"""PNG of a baseline-vs-run comparison of ``dist-train bench train --baseline-set … --png FILE``.

Left: every launch's median step time in launch order (baseline and run alternate), the two medians, and
the run time the bubble formula (÷ tp) predicts from the baseline median. Right: the per-rank split of each
variant's median launch — compute, blocked communication and data as stacked bars, the process CPU
seconds as a marker (a bar well above its marker is time spent waiting for a core).
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from ._paired import ORDER  # noqa: E402

COLOURS = {"baseline": "tab:blue", "run": "tab:orange"}


def _median_launch(launches: list[dict]) -> dict:
    """The launch whose median step time is the median (the lower middle one for an even count)."""
    ranked = sorted(launches, key=lambda r: r["median_step_s"])
    return ranked[(len(ranked) - 1) // 2]


def plot_paired(record: dict, path: str) -> None:
    """``record``: the JSON of a paired bench train (baseline, run, comparison, order) -> PNG at ``path``."""
    cmp = record["comparison"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.6), gridspec_kw={"width_ratios": [1.1, 1]})
    seen = {name: 0 for name in ORDER}
    for i, name in enumerate(record["order"]):
        launch = record[name][seen[name]]
        seen[name] += 1
        left.plot(i + 1, launch["median_step_s"], "o", color=COLOURS[name], ms=8,
                  label=f"{name} ({launch['nproc']} rank(s))" if seen[name] == 1 else None)
        left.annotate(f"load {launch['load_avg_1min'][0]:.1f}", (i + 1, launch["median_step_s"]), fontsize=7,
                      textcoords="offset points", xytext=(4, -12))
    n = len(record["order"])
    left.hlines(cmp["baseline_median_s"], 0.5, n + 0.5, colors=COLOURS["baseline"], lw=1)
    left.hlines(cmp["run_median_s"], 0.5, n + 0.5, colors=COLOURS["run"], lw=1)
    left.hlines(cmp["baseline_median_s"] * cmp["predicted_ratio"], 0.5, n + 0.5, colors="k", linestyles="--",
                lw=1, label=f"baseline × predicted {cmp['predicted_ratio']:.3f}")
    left.set_xticks(range(1, n + 1))
    left.set_xlabel("launch (alternating)")
    left.set_ylabel("median step time (s)")
    top = max(r["median_step_s"] for name in ORDER for r in record[name])
    left.set_ylim(0, 1.15 * max(top, cmp["baseline_median_s"] * cmp["predicted_ratio"]))
    left.set_title(f"ratio {cmp['ratio']:.3f} vs formula {cmp['predicted_ratio']:.3f}: "
                   f"{100 * cmp['overhead_beyond_prediction']:+.1f}% beyond it", fontsize=10)
    left.legend(fontsize=8, loc="lower right")

    x, ticks = 0.0, []
    for name in ORDER:
        launch = _median_launch(record[name])
        for r in launch["ranks"]:
            bottom = 0.0
            for part, hatch in (("compute_s", None), ("comm_s", "//"), ("data_s", "..")):
                right.bar(x, r[part], bottom=bottom, color=COLOURS[name], hatch=hatch, edgecolor="white",
                          alpha=1.0 if part == "compute_s" else 0.5)
                bottom += r[part]
            right.plot(x, r["cpu_s"], "k_", ms=22, mew=2)
            ticks.append((x, f"{name}\nrank {r['rank']}"))
            x += 1
        x += 0.5
    right.set_xticks([t for t, _ in ticks], [lbl for _, lbl in ticks], fontsize=8)
    right.set_ylabel("seconds per step (median launch)")
    right.set_title("compute (solid), blocked comm (//), data (..); — = CPU s", fontsize=10)
    fig.suptitle(f"bench train: {record['run'][0]['config']}, {record['threads_per_rank']} thread(s) per rank on "
                 f"{record['cores']} cores", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

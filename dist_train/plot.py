"""``dist-train plot RUN_DIR [RUN_DIR ...] [--out FILE.png]``: training curves without any tool.

Loss (solid; steps skipped by ``train.on_nonfinite: skip`` as crosses) and validation loss (dashed, markers)
of every run against the optimizer step (left) and against the tokens trained on (right), one colour per
run, labelled by run name; optionally throughput, MFU and peak memory below. Reads each run's ``metrics.jsonl``
and ``config.yaml`` (tokens per sample).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")  # files only: no display on a training node
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.ticker import EngFormatter, FuncFormatter, MaxNLocator  # noqa: E402

from .cli import examples  # noqa: E402
from .config import load_yaml_unique  # noqa: E402

#: --extra name -> (metrics.jsonl key, y label, scale)
EXTRAS = {"tokens_per_s": ("tokens_per_s", "tokens/s", 1.0), "mfu": ("mfu", "MFU (%)", 100.0),
          "memory": ("peak_mem_bytes", "peak memory (GiB)", 1.0 / 2 ** 30)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Plot the training loss (solid) and validation loss (dashed) of one or more runs against "
                          "optimizer steps and against tokens trained on, one colour per run, from each run's "
                          "metrics.jsonl; --extra adds tokens/s, MFU and peak-memory panels. See docs/metrics.md.")
    parser.epilog = examples("dist-train plot runs/demo          # writes runs/demo/curves.png",
                             "dist-train plot runs/demo --out runs/demo/curves.png",
                             "dist-train plot runs/dp2 runs/cp2 --out compare.png --extra tokens_per_s mfu memory")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (holding metrics.jsonl)")
    parser.add_argument("--out", metavar="FILE.png",
                        help="the PNG to write (default for one run: RUN_DIR/curves.png; needed for several)")
    parser.add_argument("--extra", nargs="*", default=[], choices=sorted(EXTRAS),
                        help="more panels below the loss: tokens_per_s, mfu, memory")


def load_run(run_dir: Path) -> dict:
    """{"name", "records", "tokens_per_sample"} of one run directory."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics} not found: is {run_dir} a run directory (run.dir of a config)?")
    records = []
    for line in metrics.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a torn last line of a killed run
    if not records:
        raise ValueError(f"{metrics} holds no step record yet")
    name, tokens, kind = run_dir.name, None, None
    if (run_dir / "config.yaml").is_file():
        # the record of a config that validated when its run started, read as written: a later version may refuse a
        # key it holds (an unread one, a renamed one), which must not make the earlier run's curves unplottable
        cfg = load_yaml_unique((run_dir / "config.yaml").read_text(), f"{run_dir}/config.yaml")
        run, model, data = (cfg.get(section) or {} for section in ("run", "model", "data"))
        name, kind = run.get("name", name), model.get("kind", "gpt")
        if kind == "gpt":
            tokens = data.get("seq_len")
        elif data.get("image"):
            patch = model.get("patch_size", 1)
            tokens = (data["image"][0] // patch) * (data["image"][1] // patch)
    return {"name": name, "records": records, "tokens_per_sample": tokens, "kind": kind}


#: what each model kind's loss is (the loss axis says it when every plotted run is of one kind)
LOSS_NAMES = {"gpt": "cross-entropy", "swin": "MSE"}


def loss_axis_label(runs: list[dict]) -> str:
    """The loss panel's y label: the loss's name when all runs share a model kind (a Swin's is an MSE)."""
    kinds = {r.get("kind") for r in runs}
    what = LOSS_NAMES.get(next(iter(kinds))) if len(kinds) == 1 else None
    return f"{what} loss (train solid, validation dashed)" if what else "loss (train solid, validation dashed)"


def _labels(runs: list[dict], dirs: list[Path]) -> list[str]:
    names = [r["name"] for r in runs]
    # two runs of one config share a name: tell them apart by directory
    return [n if names.count(n) == 1 else f"{n} ({d})" for n, d in zip(names, dirs)]


def plot_runs(run_dirs: list[Path], out: Path, extras: list[str]) -> dict:
    """Write the figure; returns {"panels": {title: number of plotted series}, "runs": labels}."""
    runs = [load_run(Path(d)) for d in run_dirs]
    labels = _labels(runs, [Path(d) for d in run_dirs])
    rows = 1 + len(extras)
    fig, axes = plt.subplots(rows, 2, figsize=(13, 3.6 * rows + 0.6), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    series: dict = {}
    with_tokens = [r for r in runs if r["tokens_per_sample"]]
    # the loss axis spans the curves (applied steps and validation); a skipped step's loss (a spike: often 100x)
    # would squash them, so its marker sits at the top edge, labelled with its value, when it lies above
    curve = [r["loss"] for run in runs for r in run["records"] if not r.get("skipped") and math.isfinite(r["loss"])]
    curve += [r["valid_loss"] for run in runs for r in run["records"] if r.get("valid_loss") is not None]
    top = max(curve) if curve else math.inf
    for col, xkey in enumerate(("step", "tokens")):
        for row, panel in enumerate(["loss"] + list(extras)):
            ax = axes[row][col]
            n = 0
            for i, (run, label) in enumerate(zip(runs, labels)):
                if xkey == "tokens" and not run["tokens_per_sample"]:
                    continue
                c = colours[i % len(colours)]

                def xs(recs):
                    return [r["step"] if xkey == "step" else r["consumed_samples"] * run["tokens_per_sample"]
                            for r in recs]
                recs = run["records"]
                if panel == "loss":
                    applied = [r for r in recs if not r.get("skipped")]
                    ax.plot(xs(applied), [r["loss"] for r in applied], color=c, lw=1.4, label=f"{label} train")
                    n += 1
                    # a skipped step (non-finite or a spike: not applied) is a marker, not part of the curve
                    skipped = [r for r in recs if r.get("skipped") and math.isfinite(r["loss"])]
                    if skipped:
                        ax.plot(xs(skipped), [min(r["loss"], top) for r in skipped], color=c, ls="none",
                                marker="x", ms=7, mew=2, label=f"{label} skipped (not applied)")
                        for x, r in zip(xs(skipped), skipped):
                            if r["loss"] > top:
                                ax.annotate(f"{r['loss']:.3g}", (x, top), textcoords="offset points",
                                            xytext=(5, -10), fontsize=7, color=c)
                        n += 1
                    valid = [r for r in recs if r.get("valid_loss") is not None]
                    if valid:
                        ax.plot(xs(valid), [r["valid_loss"] for r in valid], color=c, lw=1.4, ls="--", marker="o",
                                ms=4, label=f"{label} valid")
                        n += 1
                else:
                    key, _, scale = EXTRAS[panel]
                    pts = [r for r in recs if r.get(key) is not None]
                    ax.plot(xs(pts), [r[key] * scale for r in pts], color=c, lw=1.2, label=label)
                    n += 1
            title = "loss" if panel == "loss" else EXTRAS[panel][1]
            series[f"{title} vs {xkey}"] = n
            ax.set_ylabel(loss_axis_label(runs) if panel == "loss" else EXTRAS[panel][1])
            ax.set_xlabel("optimizer step" if xkey == "step" else "tokens trained on")
            if xkey == "tokens":
                ax.xaxis.set_major_formatter(EngFormatter())
            else:
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if panel == "loss":
                if curve and min(curve) > 0 and max(curve) / min(curve) > 3:
                    ax.set_yscale("log")  # early loss drops by orders of magnitude; the tail stays readable
                    plain = FuncFormatter(lambda v, _: f"{v:g}")  # 2, 3, 4 rather than 2x10^0
                    ax.yaxis.set_major_formatter(plain)
                    ax.yaxis.set_minor_formatter(plain)
            if panel == "tokens_per_s":
                ax.yaxis.set_major_formatter(EngFormatter())
            ax.grid(True, alpha=0.3)
            if n and (row == 0 or len(runs) > 1):
                ax.legend(fontsize=8)
            if xkey == "tokens" and not with_tokens:
                ax.text(0.5, 0.5, "no config.yaml: tokens per sample unknown", ha="center", transform=ax.transAxes)
    axes[0][0].set_title("against optimizer steps")
    axes[0][1].set_title("against tokens")
    fig.suptitle(", ".join(labels))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return {"panels": series, "runs": labels}


#: what ``dist-train plot RUN_DIR`` writes without --out (as ``make demo`` does)
DEFAULT_PNG = "curves.png"


def output_path(out: Optional[str], runs: list[str]) -> Path:
    """--out, else RUN_DIR/curves.png for one run; several runs have no directory of their own to write in."""
    if out is not None:
        return Path(out)
    if len(runs) == 1:
        return Path(runs[0]) / DEFAULT_PNG
    raise ValueError(f"--out FILE.png is needed to plot {len(runs)} runs together (one run without it writes "
                     f"RUN_DIR/{DEFAULT_PNG})")


def run(args: argparse.Namespace) -> int:
    out = output_path(args.out, list(args.runs))
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out {args.out}: give a .png file")
    info = plot_runs([Path(d) for d in args.runs], out, list(args.extra))
    print(f"wrote {out}: {len(info['runs'])} run(s), "
          + ", ".join(f"{k}: {v} series" for k, v in info["panels"].items()))
    return 0

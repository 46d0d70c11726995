"""`dist-train bench train`: one training run on N spawned gloo ranks, measured.

Reports tokens/s, TFLOP/s per device and MFU (FLOP convention of dist_train.cost.flops: 6N + 12·L·d·S_eff,
causal S_eff ≈ S/2, Megatron halving), peak memory per rank, the median step split into
  * data     — time in the batcher (recorded by dist_train.rankstats, like the next two),
  * comm     — exposed communication: wall time blocked in torch.distributed's Python collectives and
               Work.wait() (dist_train.rankstats). DDP's bucketed all-reduce runs in C++ inside
               backward and is counted as compute (gloo on CPU overlaps little of it),
  * compute  — the rest of the step,
  * cpu      — the process's CPU seconds in the step, all its threads (dist_train.rankstats): at 1 thread,
               compute well above it means the rank waited for a core (other processes on a shared
               machine), not that it had more work,
and per-rank bytes of parameters and optimizer state actually held (ZeRO partitions counted as held),
next to the memory model of dist_train.cost.memory (16 bytes/param mixed precision, 4+4+8 fp32 AdamW, ÷ sharding).

With ``--baseline-set`` / ``--baseline-nproc`` the same invocation also runs a baseline (the config with the
baseline overrides applied after ``--set``), alternating baseline and run ``--repeats`` times, and reports
both medians, their ratio and the ratio the pipeline bubble formula predicts (dist_train.bench._paired).
Both then get the same torch threads per rank, so a 1-rank baseline does not use the cores of 2 ranks.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from collections.abc import Mapping
from pathlib import Path

from ..config import load_config
from ..cost.layout import axis_sizes, rank_coords, stages_of_rank
from ..cost.memory import estimate_memory
from ..plan.profiles import get_profile
from ..spawn import run_ranks
from ._paired import ORDER, alternation, compare, predicted_ratio

HELP = "training throughput, MFU, memory and compute/comm/data split of one config on N ranks"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("examples:\n  dist-train bench train configs/gpt_tiny.yaml --set parallel.dp=1 --set parallel.tp=2 "
                     "--set data.source=synthetic --nproc 2 --steps 8 --json tp2.json\n"
                     "  (the first step is excluded from the medians: warm-up)\n"
                     "  dist-train bench train configs/swin_era5_721x1440.yaml --set data.image=[128,256] "
                     "--set data.path=data_cache/weather_128x256 --set data.steps=12 --set train.global_batch=4 "
                     "--set train.activation_checkpointing=none --set parallel.wp=[1,1] "
                     "--set model.n_layers=4 --set parallel.pp=2 --baseline-set model.n_layers=2 "
                     "--baseline-set parallel.pp=1 --repeats 3 --steps 6 --json pp2_vs_pp1.json --png pp2_vs_pp1.png\n"
                     "  (pp2 against pp1 with the same blocks per rank, alternating baseline and run 3 times, 1 thread "
                     "per rank: medians, ratio, and the bubble formula's (m + pp - 1) / m)")
    parser.add_argument("config", help="YAML config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override (repeatable)")
    parser.add_argument("--nproc", type=int, default=None, help="ranks (default: the config's world size)")
    parser.add_argument("--steps", type=int, default=None, help="override train.steps (>= 2)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds before the ranks are killed")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per rank (default: $OMP_NUM_THREADS if set, else cores // ranks, the "
                             "larger rank count of run and baseline when there is a baseline)")
    parser.add_argument("--baseline-set", dest="baseline_overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override applied after --set for a baseline run in the same invocation (repeatable)")
    parser.add_argument("--baseline-nproc", type=int, default=None,
                        help="ranks of the baseline (default: its config's world size); alone it also asks for one")
    parser.add_argument("--repeats", type=int, default=1,
                        help="baseline/run pairs, alternating (needs a baseline when > 1)")
    parser.add_argument("--json", metavar="PATH", default=None, help="write the results as JSON")
    parser.add_argument("--png", metavar="PATH", default=None,
                        help="with a baseline: plot every launch's step time and the per-rank split")


def _train_rank(rank: int, world: int, config: str, overrides: list, run_dir: str) -> dict:
    """One rank of a measured run (spawned by dist_train.spawn.run_ranks) -> its record: the trainer's summary
    and losses, and the per-step times, memory and held state bytes it wrote through dist_train.rankstats."""
    # the trainer (torch) only in the rank: `dist-train bench <any>` imports this module to build its parser
    # (dist_train/cli.py imports every bench module), which must not cost a torch import
    from ..rankstats import ENV as RANK_STATS_ENV
    from ..trainer import train

    os.environ[RANK_STATS_ENV] = "1"  # the trainer writes rank_stats/rank_<rank>.json
    cfg = load_config(config, overrides + [f"run.dir={run_dir}", "train.progress=false", "checkpoint.at_end=false",
                                           "checkpoint.every=0"])
    res = train(cfg)
    stats = json.loads((Path(run_dir) / "rank_stats" / f"rank_{rank}.json").read_text())
    return {"summary": res.summary, "losses": res.losses, "step_s": stats["step_times_s"],
            "comm_s": stats["comm_wait_s"], "cpu_s": stats["cpu_s"], "data_s": stats["data_s"],
            **{k: stats[k] for k in ("peak_mem_bytes", "param_bytes", "optim_bytes")}}


def _median_tail(xs: list[float]) -> float:
    return statistics.median(xs[1:] if len(xs) > 1 else xs)


def _measure(config: str, overrides: list, cfg, nproc: int, threads: int, timeout: float) -> dict:
    """One measured launch of ``config`` + ``overrides`` (``cfg``: that config, loaded and checked once) -> the
    JSON record (layout, throughput, per-rank split and memory, load average)."""
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="dt_bench_train_") as tmp:
        # fresh interpreters, as a launcher starts them (a forked rank's peak RSS would count pages it shares
        # with the fork server); a 1-rank run gets no process group: it is measured as it would run alone
        results = run_ranks(_train_rank, nproc, args=(config, overrides, os.path.join(tmp, "run")), timeout=timeout,
                            threads=threads, process_group=nproc > 1, fresh=True)
    load_after = os.getloadavg()[0]
    s0 = results[0]["summary"]
    sizes = axis_sizes(cfg.parallel)
    prof = get_profile("cpu")
    ranks = []
    for r in range(nproc):
        res = results[r]
        step, comm, data, cpu = (_median_tail(res[k]) for k in ("step_s", "comm_s", "data_s", "cpu_s"))
        est = estimate_memory(cfg, stages_of_rank(cfg, rank_coords(r, sizes)["pp"]), prof)
        ranks.append({"rank": r, "step_s": step, "comm_s": comm, "data_s": data, "compute_s": step - comm - data,
                      "cpu_s": cpu,
                      "peak_mem_bytes": res["peak_mem_bytes"], "param_bytes": res["param_bytes"],
                      "optim_bytes": res["optim_bytes"], "formula_param_bytes": est.params,
                      "formula_optim_bytes": est.optimizer, "formula_grad_bytes": est.grads})
    return {"config": config, "overrides": overrides, "nproc": nproc, "threads_per_rank": threads,
            "load_avg_1min": [load_before, load_after], "layout": s0["layout"],
            "params": s0["params"], "tokens_per_s": s0["tokens_per_s"], "tflops_per_device": s0["tflops_per_device"],
            "mfu": s0["mfu"], "device_peak_tflops": s0["device_peak_tflops"],
            "device_peak_source": s0["device_peak_source"], "flop_convention": s0["flop_convention"],
            "median_step_s": s0["median_step_time_s"], "losses": results[0]["losses"], "ranks": ranks}


def _print_run(out: dict) -> None:
    lay, nproc = out["layout"], out["nproc"]
    print(f"bench train | {nproc} rank(s) x {out['threads_per_rank']} thread(s) | dp{lay['dp']} tp{lay['tp']} "
          f"pp{lay['pp']} cp{lay['cp']} zero {lay['zero_stage']} | {out['params'] / 1e6:.2f}M params | "
          f"FLOPs: {out['flop_convention']} | load avg {out['load_avg_1min'][0]:.2f} -> {out['load_avg_1min'][1]:.2f}")
    print(f"tokens/s {out['tokens_per_s']:,.0f} | TFLOP/s/device {out['tflops_per_device']:.4f} | "
          f"MFU {100 * out['mfu']:.1f}% of {out['device_peak_tflops']:.3f} | median step {out['median_step_s']:.3f} s")
    print(f"{'rank':>4} {'step s':>8} {'compute':>8} {'cpu':>8} {'comm':>8} {'data':>8} {'peak MiB':>9} {'param MiB':>10} "
          f"{'optim MiB':>10} {'formula p+g+o MiB':>18}")
    mib = 2 ** 20
    for x in out["ranks"]:
        f = (x["formula_param_bytes"] + x["formula_grad_bytes"] + x["formula_optim_bytes"]) / mib
        print(f"{x['rank']:>4} {x['step_s']:>8.3f} {x['compute_s']:>8.3f} {x['cpu_s']:>8.3f} {x['comm_s']:>8.3f} "
              f"{x['data_s']:>8.3f} "
              f"{x['peak_mem_bytes'] / mib:>9.1f} {x['param_bytes'] / mib:>10.2f} {x['optim_bytes'] / mib:>10.2f} "
              f"{f:>18.2f}")


def _busiest_cpu(out: dict) -> float:
    """CPU seconds per step of the rank that used the most (median over its steps after the first)."""
    return max(r["cpu_s"] for r in out["ranks"])


def threads_per_rank(requested: int | None, env: Mapping[str, str], cores: int, ranks: int) -> int:
    """--threads, else the caller's OMP_NUM_THREADS (the ranks would otherwise silently override it), else
    cores // ranks; ValueError on a value below 1 or an OMP_NUM_THREADS that is not an integer."""
    if requested is None and env.get("OMP_NUM_THREADS"):
        text = env["OMP_NUM_THREADS"]
        if not text.strip().isdigit():
            raise ValueError(f"OMP_NUM_THREADS={text!r}: must be a positive integer (or pass --threads)")
        requested = int(text)
        if requested < 1:
            raise ValueError(f"OMP_NUM_THREADS={text!r}: must be >= 1")
    elif requested is not None and requested < 1:
        raise ValueError(f"--threads {requested}: must be >= 1")
    return requested if requested is not None else max(1, cores // ranks)


def _checked(config: str, overrides: list, nproc: int | None, label: str) -> tuple:
    """(config, ranks) of one variant; ValueError on a rank count or step count the bench cannot use."""
    cfg = load_config(config, overrides)
    nproc = nproc or cfg.world_size
    if nproc != cfg.world_size:
        raise ValueError(f"{label}--nproc {nproc} but the config's dp*tp*pp*cp*wp = {cfg.world_size}")
    if cfg.train.steps < 2:
        raise ValueError(f"train.steps = {cfg.train.steps}: need >= 2 (the first step is warm-up)")
    return cfg, nproc


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + ([f"train.steps={args.steps}"] if args.steps is not None else [])
    cfg, nproc = _checked(args.config, overrides, args.nproc, "")
    paired = bool(args.baseline_overrides) or args.baseline_nproc is not None
    order = alternation(args.repeats)  # ValueError on --repeats < 1
    if args.repeats > 1 and not paired:
        raise ValueError(f"--repeats {args.repeats}: needs a baseline (--baseline-set or --baseline-nproc)")
    if args.png and not paired:
        raise ValueError(f"--png {args.png}: plots a comparison; needs a baseline (--baseline-set or --baseline-nproc)")
    cores = os.cpu_count() or 1
    if not paired:
        out = _measure(args.config, overrides, cfg, nproc, threads_per_rank(args.threads, os.environ, cores, nproc),
                       args.timeout)
        _print_run(out)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(out, fh, indent=2)
        return 0
    base_overrides = overrides + list(args.baseline_overrides)
    base_cfg, base_nproc = _checked(args.config, base_overrides, args.baseline_nproc, "baseline: ")
    threads = threads_per_rank(args.threads, os.environ, cores, max(nproc, base_nproc))
    variants = {"baseline": (base_overrides, base_cfg, base_nproc), "run": (overrides, cfg, nproc)}
    runs: dict[str, list[dict]] = {"baseline": [], "run": []}
    for name in order:
        over, variant_cfg, n = variants[name]
        print(f"--- {name} {len(runs[name]) + 1}/{args.repeats}: {n} rank(s), extra overrides "
              f"{over[len(overrides):] if name == 'baseline' else '(none)'}", flush=True)
        runs[name].append(_measure(args.config, over, variant_cfg, n, threads, args.timeout))
        _print_run(runs[name][-1])
    cmp = compare([r["median_step_s"] for r in runs["baseline"]], [r["median_step_s"] for r in runs["run"]],
                  predicted_ratio(cfg, base_cfg))
    cpu = compare([_busiest_cpu(r) for r in runs["baseline"]], [_busiest_cpu(r) for r in runs["run"]],
                  predicted_ratio(cfg, base_cfg, with_bubble=False))
    loads = [x for name in ORDER for r in runs[name] for x in r["load_avg_1min"]]
    print(f"\nbaseline vs run, {args.repeats} alternating repeat(s), {threads} thread(s) per rank on {cores} cores "
          f"(load avg {min(loads):.2f}-{max(loads):.2f})")
    print(f"  baseline {base_nproc} rank(s): median step {cmp['baseline_median_s']:.3f} s  "
          f"{[round(r['median_step_s'], 3) for r in runs['baseline']]}")
    print(f"  run      {nproc} rank(s): median step {cmp['run_median_s']:.3f} s  "
          f"{[round(r['median_step_s'], 3) for r in runs['run']]}")
    print(f"  ratio {cmp['ratio']:.3f} (pairs: median {cmp['pair_ratio_median']:.3f}) | work ÷ tp ÷ (1 − bubble) predicts "
          f"{cmp['predicted_ratio']:.3f} | beyond it: {100 * cmp['overhead_beyond_prediction']:+.1f}% "
          f"(pairs {100 * cmp['pair_overhead_beyond_prediction']:+.1f}%)")
    print(f"  CPU s/step of the busiest rank: baseline {cpu['baseline_median_s']:.3f}, run {cpu['run_median_s']:.3f}, "
          f"ratio {cpu['ratio']:.3f} against {cpu['predicted_ratio']:.3f} for the work per rank: "
          f"{100 * cpu['overhead_beyond_prediction']:+.1f}% (the parallelism's own costs: communication, replicated work; no bubble, no waiting for a core)")
    if nproc * threads > cores or base_nproc * threads > cores:
        print(f"  note: {max(nproc, base_nproc)} rank(s) x {threads} thread(s) oversubscribe {cores} cores: "
              f"not a weak-scaling measurement")
    record = {"baseline": runs["baseline"], "run": runs["run"], "comparison": cmp, "cpu_comparison": cpu,
              "threads_per_rank": threads, "cores": cores, "order": order}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(record, fh, indent=2)
    if args.png:
        from ._paired_plot import plot_paired  # matplotlib: only when a plot is asked for

        plot_paired(record, args.png)
    return 0

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
from pathlib import Path

from ..config import load_config, own_checkpoint_overrides
from ..cost.layout import axis_sizes, rank_coords, stages_by_rank
from ..cost.memory import estimate_memory
from ..plan.profiles import get_profile
from ..rankstats import ENV as RANK_STATS_ENV
from ..spawn import run_ranks
from ..trainer import train
from ._paired import ORDER, compare, predicted_ratio
from .cli.train import Plan, Variant


def _train_rank(rank: int, world: int, config: str, overrides: list, run_dir: str) -> dict:
    """One rank of a measured run (spawned by dist_train.spawn.run_ranks) -> its record: the trainer's summary
    and losses, and the per-step times, memory and held state bytes it wrote through dist_train.rankstats."""
    os.environ[RANK_STATS_ENV] = "1"  # the trainer writes rank_stats/rank_<rank>.json
    cfg = load_config(config, overrides + [f"run.dir={run_dir}", "train.progress=false", "checkpoint.at_end=false",
                                           "checkpoint.every=0", *own_checkpoint_overrides(run_dir)])
    res = train(cfg)
    stats = json.loads((Path(run_dir) / "rank_stats" / f"rank_{rank}.json").read_text())
    return {"summary": res.summary, "losses": res.losses, "step_s": stats["step_times_s"],
            "comm_s": stats["comm_wait_s"], "cpu_s": stats["cpu_s"], "data_s": stats["data_s"],
            **{k: stats[k] for k in ("peak_mem_bytes", "param_bytes", "optim_bytes")}}


def _median_tail(xs: list[float]) -> float:
    return statistics.median(xs[1:] if len(xs) > 1 else xs)


def step_spread(step_s_by_rank: list[list[float]]) -> dict:
    """Each rank's step times (seconds, one list per rank, same steps) -> the median, 90th percentile and maximum of
    the job's step time, each step's slowest rank, the first step (warm-up) left out: a rank held up mid-step (its
    garbage collector, a core taken by another process) holds every rank at the next collective, so stragglers show
    in the tail (p90, max), not in the median."""
    steps = [max(times) for times in zip(*step_s_by_rank)]
    steps = steps[1:] if len(steps) > 1 else steps
    p90 = statistics.quantiles(steps, n=10, method="inclusive")[8] if len(steps) > 1 else steps[0]
    return {"median": statistics.median(steps), "p90": p90, "max": max(steps)}


def _measure(config: str, variant: Variant, threads: int, timeout: float) -> dict:
    """One measured launch of ``config`` + ``variant.overrides`` (``variant.cfg``: that config, loaded and checked
    once) -> the JSON record (layout, throughput, per-rank split and memory, load average)."""
    overrides, cfg, nproc = variant.overrides, variant.cfg, variant.nproc
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
    # one estimate per pipeline rank (the ranks of one pp coordinate hold the same stages), from one layer balancing
    by_pp = [estimate_memory(cfg, stages, prof) for stages in stages_by_rank(cfg)]
    ranks = []
    for r in range(nproc):
        res = results[r]
        step, comm, data, cpu = (_median_tail(res[k]) for k in ("step_s", "comm_s", "data_s", "cpu_s"))
        est = by_pp[rank_coords(r, sizes)["pp"]]
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
            "median_step_s": s0["median_step_time_s"], "losses": results[0]["losses"], "ranks": ranks,
            "step_spread_s": step_spread([results[r]["step_s"] for r in range(nproc)])}


def _print_run(out: dict) -> None:
    lay, nproc = out["layout"], out["nproc"]
    print(f"bench train | {nproc} rank(s) x {out['threads_per_rank']} thread(s) | dp{lay['dp']} tp{lay['tp']} "
          f"pp{lay['pp']} cp{lay['cp']} zero {lay['zero_stage']} | {out['params'] / 1e6:.2f}M params | "
          f"FLOPs: {out['flop_convention']} | load avg {out['load_avg_1min'][0]:.2f} -> {out['load_avg_1min'][1]:.2f}")
    print(f"tokens/s {out['tokens_per_s']:,.0f} | TFLOP/s/device {out['tflops_per_device']:.4f} | "
          f"MFU {100 * out['mfu']:.1f}% of {out['device_peak_tflops']:.3f} | median step {out['median_step_s']:.3f} s")
    spread = out["step_spread_s"]
    print(f"step s, each step's slowest rank (after the first): median {spread['median']:.3f} | p90 {spread['p90']:.3f} "
          f"| max {spread['max']:.3f}")
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


def _write_json(path: str, record: dict) -> None:
    with open(path, "w") as fh:
        json.dump(record, fh, indent=2)


def run(args: argparse.Namespace, plan: Plan) -> int:
    """``plan``: the run, baseline, order and threads dist_train.bench.cli.train.check derived from ``args``."""
    threads, cores = plan.threads, plan.cores
    if plan.baseline is None:
        out = _measure(args.config, plan.run, threads, args.timeout)
        _print_run(out)
        if args.json:
            _write_json(args.json, out)
        return 0
    cfg, nproc, base_cfg, base_nproc = plan.run.cfg, plan.run.nproc, plan.baseline.cfg, plan.baseline.nproc
    variants = {"baseline": plan.baseline, "run": plan.run}
    runs: dict[str, list[dict]] = {"baseline": [], "run": []}
    for name in plan.order:
        variant = variants[name]
        print(f"--- {name} {len(runs[name]) + 1}/{args.repeats}: {variant.nproc} rank(s), extra overrides "
              f"{variant.overrides[len(plan.run.overrides):] if name == 'baseline' else '(none)'}", flush=True)
        runs[name].append(_measure(args.config, variant, threads, args.timeout))
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
    for name in ORDER:
        spreads = [r["step_spread_s"] for r in runs[name]]
        print(f"  {name:8s} tail (each step's slowest rank): p90 {[round(x['p90'], 3) for x in spreads]} s, "
              f"max {[round(x['max'], 3) for x in spreads]} s")
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
              "threads_per_rank": threads, "cores": cores, "order": plan.order}
    if args.json:
        _write_json(args.json, record)
    if args.png:
        # matplotlib only when a plot is asked for, not at the top: every rank imports this module (its rank
        # function) and the peak memory of that rank is what is measured
        from ._paired_plot import plot_paired

        plot_paired(record, args.png)
    return 0

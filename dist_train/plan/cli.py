"""``dist-train plan`` and ``dist-train scale``: the functions ``dist_train.cli`` mounts.

    add_plan_arguments(parser);  plan_main(args)  -> exit status
    add_scale_arguments(parser); scale_main(args) -> exit status
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..cli import examples, positive_int
from ..config import Config, load_config
from ..cost.flops import flop_convention, flops_per_token, matmul_params, param_count
from ..cost.predict import predict
from ..cost.shape import shape_of
from .enumerate import enumerate_layouts, layout_label, rank_layouts, why_slower
from .profiles import calibrate, get_profile
from .report import add_efficiency, write_outputs
from .sweep import expand, load_sweep, point_config, run_sweep

GIB = 2 ** 30


# ---------------------------------------------------------------------------------------------
# dist-train plan
# ---------------------------------------------------------------------------------------------
def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Predict per-device memory and step time for every valid layout (dp, tp, pp, cp, wp, cp "
                          "method and layout, ZeRO stage, checkpointing) with an analytic model and device/link "
                          "profiles; rank the layouts that fit by predicted tokens/s. GPU numbers are model "
                          "outputs. See docs/planner.md.")
    parser.epilog = examples(
        "dist-train plan configs/gpt_tiny.yaml --devices 2 --device cpu",
        "dist-train plan configs/sweeps/projections/llama8b_1m.yaml --devices 64 --device h100 --explain",
        "dist-train plan configs/sweeps/projections/swin_721x1440.yaml --devices 256 --device h100 --image 721 1440",
        "dist-train plan --calibrate          # measure this machine once (~1 min), stored under ~/.cache/dist-train")
    parser.add_argument("config", nargs="?", help="YAML config file (model, data, batch)")
    parser.add_argument("--devices", type=positive_int, help="number of devices to plan for")
    parser.add_argument("--device", default="cpu", help="h100 | h100-nvl | h200 | h200-nvl | a100 | cpu, or a profile .yaml "
                        "(default cpu)")
    parser.add_argument("--seq-len", type=int, help="override data.seq_len")
    parser.add_argument("--image", type=int, nargs=2, metavar=("H", "W"), help="override data.image (swin)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    parser.add_argument("--top", type=positive_int, default=8, help="layouts to list (default 8)")
    parser.add_argument("--explain", action="store_true", help="print the memory and time breakdown of the best")
    parser.add_argument("--current", action="store_true", help="only predict the config's own layout")
    parser.add_argument("--calibrate", action="store_true", help="measure this machine and store a cpu profile")
    parser.add_argument("--profile-path", help="where --calibrate stores (and cpu reads) the profile")
    parser.add_argument("--json", metavar="PATH", help="write the ranked predictions as JSON")


def _plan_config(args: argparse.Namespace) -> Config:
    sets = list(args.set or [])
    if args.seq_len is not None:
        if args.seq_len < 2:
            raise ValueError(f"--seq-len {args.seq_len}: must be >= 2")
        sets.append(f"data.seq_len={args.seq_len}")
    if args.image is not None:
        if min(args.image) < 1:
            raise ValueError(f"--image {args.image[0]} {args.image[1]}: both sides must be >= 1")
        sets.append(f"data.image=[{args.image[0]},{args.image[1]}]")
    return load_config(args.config, sets, derives_layouts=True)  # e.g. microbatches for the pipelined candidates


def own_layout_rank(cfg, ranked: list, devices: int) -> tuple[str, Optional[int]]:
    """The config's own layout label and its index in ``ranked`` ((prediction, config) pairs, best first); None when
    it is not there (another device count, or a layout the planner does not enumerate)."""
    own = layout_label(cfg)
    if devices != cfg.world_size:
        return own, None
    return own, next((i for i, (_, c) in enumerate(ranked) if layout_label(c) == own), None)


def plan_main(args: argparse.Namespace) -> int:
    if args.calibrate:
        path, prof = calibrate(args.profile_path, log=lambda m: print(m, file=sys.stderr))
        print(f"stored calibrated profile {path}: matmul up to {prof.peak_tflops * 1e3:.0f} GFLOP/s per core, "
              f"memory {prof.mem_bw_gbs:.1f} GB/s, op {prof.op_overhead_us:.1f} us, all-reduce "
              f"{prof.intra.bw_gbs:.2f} GB/s + {prof.intra.latency_us:.0f} us, baseline RSS {prof.baseline_gib:.2f} GiB")
        if not args.config:
            return 0
    if not args.config:
        raise ValueError("plan: give a CONFIG file (or --calibrate)")
    cfg = _plan_config(args)
    prof = get_profile(args.device, args.profile_path)
    devices = args.devices or cfg.world_size
    sh = shape_of(cfg)
    print(f"{cfg.model.kind}: {param_count(sh.params(cfg.model.tie_embeddings))} params, {sh.layers} layers, "
          f"d={sh.d}, {sh.tokens:,} tokens/sample, global batch {cfg.train.global_batch} | device {prof.name} "
          f"({prof.description}; profile: {prof.source}) x {devices}")
    print(f"FLOP convention: {flop_convention(cfg.model.kind)}: {flops_per_token(sh) / 1e9:.4g} GFLOP/token "
          f"(dense 6N = {6 * matmul_params(sh) / 1e9:.4g}, attention = "
          f"{12 * sh.layers * sh.q_dim * sh.keys_per_query / 1e9:.4g}, S_eff = {sh.keys_per_query:,.0f})")
    if not prof.is_cpu:
        print("GPU predictions are MODEL OUTPUTS from datasheet profiles, not measurements.")
    if not prof.is_cpu and prof.host_op_us == 0:
        print(f"profile {prof.name} sets no host_op_us: the host's dispatch is not costed (every launch assumed to hide "
              "behind the kernels)")
    if prof.fused_kernels and sh.kind == "gpt":
        print(f"profile {prof.name} has fused_kernels: true — a what-if: the GPT is costed as a Transformer-Engine "
              "style fused layer, which dist-train does not run (it runs its eager modules, what the built-in "
              "profiles cost)")
    if args.current:
        if devices != cfg.world_size:
            raise ValueError(f"--current with --devices {devices}: the config's layout spans {cfg.world_size}")
        ranked = [(predict(cfg, prof), cfg)]
    else:
        cands = enumerate_layouts(cfg, devices)
        if not cands:
            raise ValueError(f"no valid layout of this config on {devices} devices (check heads, layers, "
                             f"global_batch and seq_len divisibility)")
        ranked = rank_layouts(cands, prof)
    best = ranked[0][0]
    fitting = sum(1 for p, _ in ranked if p.fits)
    print(f"{len(ranked)} layouts, {fitting} fit in {prof.memory_gib:.0f} GiB; ranked by predicted tokens/s:")
    hdr = (f"{'#':>3}  {'layout':<44} {'mem GiB':>9} {'step s':>10} {'tokens/s':>12} {'TFLOP/s':>8} {'MFU':>6} "
           f"{'comm':>6}  why not first")
    print(hdr)
    print("-" * len(hdr))
    shown = ranked[:args.top]
    own, own_rank = own_layout_rank(cfg, ranked, devices)
    # also show why the best layouts of other families lost (one per distinct reason family)
    for i, (p, c) in enumerate(shown):
        why = "best" if i == 0 and p.fits else why_slower(p, best, prof.memory_bytes)
        why += " [host-bound]" if p.host_bound else ""
        why += "  <- this config" if i == own_rank and len(ranked) > 1 else ""
        print(f"{i + 1:>3}  {layout_label(c):<44} {p.memory['total'] / GIB:>9.2f} {p.step_time_s:>10.4g} "
              f"{p.tokens_per_s:>12,.0f} {p.tflops_per_device:>8.4g} {100 * p.mfu:>5.1f}% "
              f"{100 * p.exposed_comm_fraction:>5.0f}%  {why}")
    losers = _representative_losers(ranked[args.top:], best, prof.memory_bytes)
    if losers:
        print("other layouts lose because:")
        for line in losers:
            print(f"  - {line}")
    if own_rank is not None and own_rank >= len(shown):
        p = ranked[own_rank][0]
        print(f"this config's layout ({own}): #{own_rank + 1} of {len(ranked)}, {p.tokens_per_s:,.0f} tokens/s: "
              f"{why_slower(p, best, prof.memory_bytes)}")
    elif own_rank is None and devices == cfg.world_size:
        print(f"this config's layout ({own}) is not among them (the planner's candidates: docs/planner.md)")
    if args.explain:
        print(f"breakdown of #1 ({layout_label(ranked[0][1])}):")
        for line in best.breakdown_lines():
            print(f"  {line}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "device": prof.name, "devices": devices, "flop_convention": flop_convention(cfg.model.kind),
            "layouts": [dict(p.to_dict(), label=layout_label(c)) for p, c in ranked]}, indent=2))
    return 0


def _representative_losers(rest, best, mem_limit) -> list[str]:
    """One line per family of losing layouts (first of each distinct reason), at most 6."""
    seen, out = set(), []
    for p, c in rest:
        reason = why_slower(p, best, mem_limit)
        family = reason.split(":")[0] if not p.fits else reason.split(": ")[-1].split(" +")[0]
        if family in seen:
            continue
        seen.add(family)
        out.append(f"{layout_label(c)}: {reason}")
        if len(out) >= 6:
            break
    return out


# ---------------------------------------------------------------------------------------------
# dist-train scale
# ---------------------------------------------------------------------------------------------
EFFICIENCY = {
    "strong": "strong: E(N) = T1*N1 / (T_N*N), T = median step time, fixed problem",
    "weak": "weak: E(N) = (F_N/N) / (F1/N1), F = achieved FLOP/s (global batch grows with N)",
    "sequence-weak": "sequence-weak: E(N) = (F_N/N) / (F1/N1) on FLOP throughput (sequence grows with N; "
                     "tokens/s must fall as attention is O(S^2))",
    "grid": "grid: none (not a scaling series)",
}


def add_scale_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Run a scaling sweep: every point through the launchers (warm-up + measured steps), "
                          "resumable, failures recorded; per point median step time, tokens/s, TFLOP/s and MFU, "
                          "peak memory vs the planner, exposed communication, straggler spread; efficiency per "
                          "mode; CSV/JSON/markdown and PNG plots. See docs/scaling.md.")
    parser.epilog = examples(
        "dist-train scale configs/sweeps/gpt_cp_strong.yaml",
        "dist-train scale configs/sweeps/gpt_seq_weak.yaml --out runs/scale/seq_weak --retry-failed",
        "dist-train scale configs/sweeps/gpt_dp_weak.yaml --dry-run")
    parser.add_argument("sweep", help="sweep YAML file (configs/sweeps/*.yaml)")
    parser.add_argument("--out", help="output directory (default runs/scale/<sweep name>)")
    parser.add_argument("--retry-failed", action="store_true", help="rerun points recorded as failed")
    parser.add_argument("--dry-run", action="store_true", help="list the points and the planner's predictions only")
    parser.add_argument("--device", default=None, help="planner profile for predictions (default: the sweep's, cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def derive(spec, point, rec: dict, prof) -> dict:
    """Add throughput, MFU and the planner's prediction (and its error) to a point record."""
    cfg = point_config(spec, point)
    sh = shape_of(cfg)
    pred = predict(cfg, prof)
    tokens_step = cfg.train.global_batch * sh.tokens
    flops_step = flops_per_token(sh) * tokens_step
    n = point.world_size
    rec.update(layout=layout_label(cfg), seq_len=cfg.data.seq_len if sh.kind == "gpt" else sh.tokens,
               global_batch=cfg.train.global_batch,
               flops_per_step=flops_step, tokens_per_step=tokens_step, prediction=pred.to_dict(),
               pred_step_time_s=pred.step_time_s, pred_peak_mem_bytes=pred.memory["total"],
               pred_exposed_comm_fraction=pred.exposed_comm_fraction,
               pred_tokens_per_s_per_device=pred.tokens_per_s / n)
    if rec.get("status") == "ok":
        t = rec["step_time_s"]
        peak = rec.get("device_peak_tflops") or prof.peak_tflops
        rec.update(tokens_per_s=tokens_step / t, tokens_per_s_per_device=tokens_step / t / n,
                   tflops_per_device=flops_step / t / n / 1e12, tflops_total=flops_step / t / 1e12,
                   mfu=flops_step / t / n / 1e12 / peak,
                   step_error=(pred.step_time_s - t) / t,
                   mem_error=(pred.memory["total"] - rec["peak_mem_bytes"]) / rec["peak_mem_bytes"])
    return rec


def scale_main(args: argparse.Namespace) -> int:
    spec = load_sweep(args.sweep)
    prof = get_profile(args.device or spec.device)
    out = Path(args.out) if args.out else Path("runs") / "scale" / spec.name
    points = expand(spec)
    print(f"sweep {spec.name}: {spec.mode} scaling, {len(points)} points, launcher {spec.launcher}, "
          f"{spec.warmup_steps} warm-up + {spec.measure_steps} measured steps, {spec.threads_per_rank} thread(s)/rank "
          f"| planner profile {prof.name} ({prof.source}) | out {out}")
    convention = flop_convention(point_config(spec, points[0]).model.kind)
    print(f"FLOP convention: {convention}")
    cores = prof.cores or 0
    if cores and max(p.world_size for p in points) * spec.threads_per_rank > cores:
        print(f"note: points with more than {cores // spec.threads_per_rank} ranks oversubscribe this machine's "
              f"{cores} cores; the planner models the shared cores")
    if args.dry_run:
        for p in points:
            cfg = point_config(spec, p)
            pred = predict(cfg, prof)
            print(f"  {p.id:<28} N={p.world_size} {layout_label(cfg):<28} predicted {pred.step_time_s * 1e3:9.1f} "
                  f"ms/step {pred.memory['total'] / 2 ** 20:8.0f} MiB")
        return 0
    records = run_sweep(spec, out, retry_failed=args.retry_failed, progress=not args.no_progress,
                        annotate=lambda p, r: derive(spec, p, r, prof))
    add_efficiency(spec.mode, records)
    meta = {"name": spec.name, "mode": spec.mode, "description": spec.description, "sweep": str(spec.path),
            "base": str(spec.base),
            "launcher": spec.launcher, "flop_convention": convention, "efficiency_definition": EFFICIENCY[spec.mode],
            "device": f"{prof.name} ({prof.description})", "threads_per_rank": spec.threads_per_rank,
            "command": f"dist-train scale {args.sweep}" + (f" --out {args.out}" if args.out else ""),
            "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    paths = write_outputs(records, out, meta)
    print((out / "results.md").read_text())
    failed = [r for r in records if r.get("status") != "ok"]
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    if failed:
        print(f"{len(failed)} point(s) failed (recorded with their reason; rerun with --retry-failed)")
    return 0

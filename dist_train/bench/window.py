"""`dist-train bench window`: weak scaling of one shifted Swin block under window parallelism.

Spawns gh·gw gloo ranks (one torch thread each). Every rank holds a tile of ``--image H W`` tokens,
so the global image is (gh·H)×(gw·W). On each rank, in the same processes and interleaved, it times
forward+backward of the same shifted window block (halo roll of the block input, pre-norm window
attention with relative position bias, MLP, roll back):
  * single — on its tile alone as a 1×1 image (no communication): the one-process baseline,
  * dist   — on its tile of the global image (halo exchange with its neighbours).
Reported: halo bytes sent per rank per layer (measured by the counters, and the formula
4·(s_h·w + s_w·h − s_h·s_w)·B·C·4 bytes: roll + roll back, forward and backward), medians,
exposed communication = dist − single, weak-scaling efficiency = single / dist. CPU only here.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist

from parallelism.window import TileLayout, halo_stats, halo_tokens, reset_halo_stats

from ..models.swin import WindowBlock, _TileContext
from ..spawn import run_ranks


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _worker(rank: int, world: int, cfg: dict) -> dict:
    """One rank of the benchmark (run by dist_train.spawn.run_ranks after the gloo group is up)."""
    gh, gw = cfg["grid"]
    h, w = cfg["image"]
    win, s = (cfg["window"],) * 2, (cfg["shift"],) * 2
    d = cfg["heads"] * cfg["head_dim"]
    torch.manual_seed(0)
    block = WindowBlock(d, cfg["heads"], 4 * d, win, s, 1e-5)
    x = torch.randn(cfg["batch"], h, w, d, requires_grad=True)
    full = TileLayout.build(gh * h, gw * w, (gh, gw), win)
    single = TileLayout.build(h, w, (1, 1), win)
    ctx_dist = _TileContext(full, rank, (full.height, full.width), (False, False), None)
    ctx_single = _TileContext(single, 0, (h, w), (False, False), None)

    def step(ctx):
        block.zero_grad(set_to_none=True)
        x.grad = None
        block(x, ctx).square().mean().backward()

    step(ctx_single)
    reset_halo_stats()
    step(ctx_dist)  # warm-up, and the byte count of one layer (forward + backward)
    stats = halo_stats()
    times = {"single": [], "dist": []}
    for _ in range(cfg["reps"]):
        for name, ctx in (("single", ctx_single), ("dist", ctx_dist)):
            dist.barrier()
            times[name].append(_time(lambda: step(ctx)))
    return {"bytes_sent": stats["bytes_sent"], "messages_sent": stats["messages_sent"],
            "tile": full.tile_shape(rank), "single_s": times["single"], "dist_s": times["dist"]}


def _spawn(cfg: dict, world: int) -> list[dict]:
    return run_ranks(_worker, world, args=(cfg,), timeout=cfg["timeout"])


def run(args: argparse.Namespace, shift: int) -> int:
    """``shift``: the one dist_train.bench.cli.window.check resolved (``--shift``, default window // 2)."""
    gh, gw = args.grid
    world = gh * gw
    cfg = {"grid": [gh, gw], "image": list(args.image), "window": args.window, "shift": shift,
           "heads": args.heads, "head_dim": args.head_dim, "batch": args.batch, "reps": args.reps,
           "timeout": args.timeout}
    results = _spawn(cfg, world)
    c = args.heads * args.head_dim
    rows = []
    for rank, r in enumerate(results):
        h, w = r["tile"]
        tokens = halo_tokens(h, w, shift if gh > 1 else 0, shift if gw > 1 else 0)
        formula = 4 * tokens * args.batch * c * 4
        single, distributed = statistics.median(r["single_s"]), statistics.median(r["dist_s"])
        rows.append({"rank": rank, "tile": [h, w], "bytes_sent": r["bytes_sent"], "bytes_formula": formula,
                     "bytes_match": r["bytes_sent"] == formula, "messages_sent": r["messages_sent"],
                     "single_s": single, "dist_s": distributed, "exposed_comm_s": distributed - single,
                     "efficiency": single / distributed, "single_all_s": r["single_s"], "dist_all_s": r["dist_s"]})
    worst = min(row["efficiency"] for row in rows)
    print(f"window parallel Swin block, fwd+bwd, grid {gh}x{gw}, tile {args.image[0]}x{args.image[1]} tokens/rank "
          f"(global {gh * args.image[0]}x{gw * args.image[1]}), window {args.window}, shift {shift}, "
          f"C={c} ({args.heads} heads), batch {args.batch}, fp32 CPU, 1 thread/rank, medians of {args.reps}")
    print(f"{'rank':>4} {'bytes sent':>12} {'formula':>12} {'match':>5} {'single s':>9} {'wp s':>9} "
          f"{'exposed s':>9} {'eff':>6}")
    for row in rows:
        print(f"{row['rank']:>4} {row['bytes_sent']:>12} {row['bytes_formula']:>12} {str(row['bytes_match']):>5} "
              f"{row['single_s']:>9.3f} {row['dist_s']:>9.3f} {row['exposed_comm_s']:>9.3f} {row['efficiency']:>6.1%}")
    print(f"weak-scaling efficiency (worst rank): {worst:.1%}; bytes == formula on every rank: "
          f"{all(r['bytes_match'] for r in rows)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": cfg, "ranks": rows, "efficiency_worst": worst,
                       "bytes_match_all": all(r["bytes_match"] for r in rows), "device": "cpu (no GPU lent)"}, f,
                      indent=2)
    return 0 if all(r["bytes_match"] for r in rows) else 1

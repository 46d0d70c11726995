"""Benchmark context-parallel attention on real gloo ranks (one torch thread each), fwd+bwd.

Reports per rank: compute time (own CPU time of the ring steps), exposed communication (wall −
compute), total; and overall: efficiency = (single-process full attention time / P) ÷ time,
work imbalance (max/mean allowed (q, k) pairs per rank), critical path (Σ over ring steps of the
slowest rank's CPU time — meaningful even with more ranks than cores), the local kernel's speed
relative to torch SDPA at the shard shape, and peak memory growth relative to single-device
attention at S/P tokens. Medians over --repeats.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import tempfile
import time
from datetime import timedelta

HELP = "context-parallel attention: efficiency, critical path, imbalance vs single-process attention"
EPILOG = """example:
  dist-train bench attention --world-size 2 --seq-len 16384 --layout zigzag --method ring --json out.json
  dist-train bench attention --world-size 4 --seq-len 8192 --layout contiguous,striped,zigzag
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.add_argument("--world-size", type=int, default=2, help="number of ranks P (default 2)")
    parser.add_argument("--seq-len", type=int, default=8192, help="global sequence length S")
    parser.add_argument("--layout", default="zigzag", help="comma list of contiguous,striped,zigzag")
    parser.add_argument("--method", default="ring", help="comma list of ring,ulysses,hybrid")
    parser.add_argument("--ulysses-degree", type=int, default=1, help="U for --method hybrid")
    parser.add_argument("--heads", type=int, default=8, help="query heads H")
    parser.add_argument("--kv-heads", type=int, default=None, help="K/V heads (default: H)")
    parser.add_argument("--head-dim", type=int, default=64, help="head dimension D")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--window", type=int, default=None, help="sliding window w (default: none)")
    parser.add_argument("--no-causal", action="store_true", help="full (bidirectional) attention")
    parser.add_argument("--forward-only", action="store_true", help="time forward only (default fwd+bwd)")
    parser.add_argument("--kernel", default="auto", help="auto, sdpa or math")
    parser.add_argument("--repeats", type=int, default=3, help="timed iterations (median reported)")
    parser.add_argument("--json", default=None, help="write the records to this JSON file")


def _split(value: str, valid: tuple, name: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in valid]
    if not items or bad:
        raise ValueError(f"--{name} {value!r}: unknown {bad or 'empty'}; valid: {', '.join(valid)}")
    return items


def _inputs(cfg: dict, seq: int, seed: int = 0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    hkv = cfg["kv_heads"] or cfg["heads"]
    shape = (cfg["batch"], seq)
    return (torch.randn(*shape, cfg["heads"], cfg["head_dim"], generator=gen),
            torch.randn(*shape, hkv, cfg["head_dim"], generator=gen),
            torch.randn(*shape, hkv, cfg["head_dim"], generator=gen))


def _full_attention_step(cfg: dict, q, k, v) -> float:
    """One single-process torch SDPA step (fwd[+bwd]); returns its CPU time."""
    import torch
    import torch.nn.functional as F

    g = q.shape[2] // k.shape[2]
    xs = [x.clone().requires_grad_() for x in (q, k, v)]
    start = time.thread_time()
    kk, vv = (x.repeat_interleave(g, dim=2) if g > 1 else x for x in xs[1:])
    out = F.scaled_dot_product_attention(xs[0].transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2),
                                         is_causal=cfg["causal"] and cfg["window"] is None,
                                         attn_mask=_window_mask(cfg, q.shape[1]))
    if not cfg["forward_only"]:
        out.backward(torch.ones_like(out))
    return time.thread_time() - start


def _window_mask(cfg: dict, seq: int):
    if cfg["window"] is None:
        return None
    from parallelism.context.masks import mask_tensor
    from parallelism.context.layouts import Chunk

    return mask_tensor(Chunk(0, 1, seq), Chunk(0, 1, seq), cfg["causal"], cfg["window"])


def _kernel_ratio(cfg: dict, n: int) -> float:
    """CPU time of torch SDPA ÷ our local block kernel (fwd[+bwd]) on one causal n-token block."""
    import torch

    from parallelism.context.kernels import get_kernel
    from parallelism.context.masks import classify
    from parallelism.context.layouts import Chunk

    q, k, v = _inputs(dict(cfg, window=None), n, seed=5)
    kern = get_kernel(cfg["kernel"], q.device, q.dtype)
    mask = classify(Chunk(0, 1, n), Chunk(0, 1, n), True, None)
    scale = cfg["head_dim"] ** -0.5
    ours, theirs = [], []
    for _ in range(cfg["repeats"] + 1):
        start = time.thread_time()
        out, lse = kern.forward(q, k, v, mask, scale)
        if not cfg["forward_only"]:
            kern.backward(torch.ones_like(out), q, k, v, out, lse, mask, scale)
        ours.append(time.thread_time() - start)
        theirs.append(_full_attention_step(dict(cfg, causal=True, window=None), q, k, v))
    return statistics.median(theirs[1:]) / statistics.median(ours[1:])


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _rank_main(rank: int, world: int, init_file: str, cfg: dict, out: "mp.Queue") -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    import torch.distributed as dist

    from parallelism.context import CPStats, context_parallel_attention

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=600))
        rss0 = _maxrss_mib()      # before any tensor: growth = inputs + attention at S/P tokens
        q, k, v = _inputs(cfg, cfg["seq_len"] // world, seed=rank)   # values do not matter for timing
        records = []
        for it in range(cfg["repeats"] + 1):
            stats = CPStats()
            xs = [x.clone().requires_grad_() for x in (q, k, v)]
            dist.barrier()
            start, cpu0 = time.perf_counter(), time.thread_time()
            o = context_parallel_attention(*xs, layout=cfg["layout"], method=cfg["method"],
                                           ulysses_degree=cfg["ulysses_degree"], causal=cfg["causal"],
                                           window=cfg["window"], kernel=cfg["kernel"], stats=stats)
            if not cfg["forward_only"]:
                o.backward(torch.ones_like(o))
            wall = time.perf_counter() - start
            records.append(dict(wall=wall, cpu=time.thread_time() - cpu0,
                                compute=sum(stats.fwd_step_compute_s) + sum(stats.bwd_step_compute_s),
                                steps=stats.fwd_step_compute_s + stats.bwd_step_compute_s,
                                kv_sent=stats.kv_blocks_sent, work=stats.work_pairs))
            del o, xs
        out.put((rank, True, dict(iters=records[1:], rss_growth_mib=_maxrss_mib() - rss0)))
    except BaseException as exc:  # noqa: BLE001 - reported by the parent
        import traceback

        out.put((rank, False, f"{exc!r}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _single_rss_main(cfg: dict, n: int, out: "mp.Queue") -> None:
    """Peak memory growth of single-device attention at n tokens (fresh process, same measure)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    rss0 = _maxrss_mib()
    q, k, v = _inputs(cfg, n)
    for _ in range(cfg["repeats"] + 1):
        _full_attention_step(cfg, q, k, v)
    out.put(_maxrss_mib() - rss0)


def _spawn(cfg: dict, world: int) -> list[dict]:
    ctx = mp.get_context("spawn")
    q: mp.Queue = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="dt_bench_") as tmp:
        procs = [ctx.Process(target=_rank_main, args=(r, world, os.path.join(tmp, "rdzv"), cfg, q))
                 for r in range(world)]
        for p in procs:
            p.start()
        results = {}
        for _ in range(world):
            rank, ok, payload = q.get(timeout=3600)
            if not ok:
                raise RuntimeError(f"rank {rank} failed: {payload}")
            results[rank] = payload
        for p in procs:
            p.join()
    return [results[r] for r in range(world)]


def _single_rss(cfg: dict, n: int) -> float:
    ctx = mp.get_context("spawn")
    q: mp.Queue = ctx.Queue()
    p = ctx.Process(target=_single_rss_main, args=(cfg, n, q))
    p.start()
    value = q.get(timeout=3600)
    p.join()
    return value


def measure(cfg: dict) -> dict:
    """Run one configuration; returns its JSON record."""
    import torch

    from parallelism.context import build_plan, default_tile, rank_chunks

    torch.set_num_threads(1)
    P, S = cfg["world_size"], cfg["seq_len"]
    full = [_full_attention_step(cfg, *_inputs(cfg, S)) for _ in range(cfg["repeats"] + 1)][1:]
    single = statistics.median(full)
    ranks = _spawn(cfg, P)
    n_iter = len(ranks[0]["iters"])
    walls = [max(r["iters"][i]["wall"] for r in ranks) for i in range(n_iter)]
    crit = [sum(max(r["iters"][i]["steps"][t] for r in ranks) for t in range(len(ranks[0]["iters"][i]["steps"])))
            for i in range(n_iter)]
    time_s = statistics.median(walls)
    critical = statistics.median(crit)
    if cfg["method"] == "ring":
        chunks = tuple(rank_chunks(S, r, P, cfg["layout"]) for r in range(P))
        plan = build_plan(chunks, cfg["causal"], cfg["window"], default_tile(cfg["window"]))
        work = [plan.rank_work(r) for r in range(P)]
    else:
        work = [r["iters"][0]["work"] for r in ranks]
    per_rank = [dict(rank=i, compute_s=statistics.median(it["compute"] for it in r["iters"]),
                     cpu_s=statistics.median(it["cpu"] for it in r["iters"]),
                     wall_s=statistics.median(it["wall"] for it in r["iters"]),
                     kv_blocks_sent=r["iters"][0]["kv_sent"], rss_growth_mib=r["rss_growth_mib"])
                for i, r in enumerate(ranks)]
    for pr in per_rank:
        pr["exposed_comm_s"] = max(pr["wall_s"] - pr["compute_s"], 0.0)
    single_rss = _single_rss(cfg, S // P)
    return dict(method=cfg["method"], layout=cfg["layout"], world_size=P, seq_len=S, heads=cfg["heads"],
                kv_heads=cfg["kv_heads"] or cfg["heads"], head_dim=cfg["head_dim"], batch=cfg["batch"],
                causal=cfg["causal"], window=cfg["window"], fwd_bwd=not cfg["forward_only"],
                ulysses_degree=cfg["ulysses_degree"], time_s=time_s, single_process_s=single,
                ideal_time_s=single / P, efficiency=(single / P) / time_s,
                critical_path_s=critical, critical_path_efficiency=(single / P) / critical,
                imbalance=max(work) / (sum(work) / len(work)),
                kernel_vs_sdpa=_kernel_ratio(cfg, S // P),
                # maxrss growth is only meaningful when the baseline grows past import-time peaks
                peak_mem_ratio=(max(pr["rss_growth_mib"] for pr in per_rank) / single_rss
                                if single_rss >= 1.0 else None),
                single_rss_growth_mib=single_rss, ranks=per_rank)


def _print(rec: dict) -> None:
    print(f"\n{rec['method']}/{rec['layout']}  P={rec['world_size']} S={rec['seq_len']} "
          f"H={rec['heads']}/{rec['kv_heads']} D={rec['head_dim']} causal={rec['causal']} "
          f"window={rec['window']} {'fwd+bwd' if rec['fwd_bwd'] else 'fwd'}")
    print(f"{'rank':>4} {'compute_s':>10} {'exposed_comm_s':>14} {'total_s':>8} {'kv_sent':>7} {'rss_MiB':>8}")
    for r in rec["ranks"]:
        print(f"{r['rank']:>4} {r['compute_s']:>10.3f} {r['exposed_comm_s']:>14.3f} {r['wall_s']:>8.3f} "
              f"{r['kv_blocks_sent']:>7} {r['rss_growth_mib']:>8.1f}")
    print(f"time {rec['time_s']:.3f}s  ideal {rec['ideal_time_s']:.3f}s  efficiency {rec['efficiency']:.1%}  "
          f"critical path {rec['critical_path_s']:.3f}s ({rec['critical_path_efficiency']:.1%})  "
          f"imbalance {rec['imbalance']:.3f}  kernel/SDPA speed {rec['kernel_vs_sdpa']:.2f}  peak-mem ratio "
          + (f"{rec['peak_mem_ratio']:.2f}" if rec["peak_mem_ratio"] is not None else
             f"n/a (single-device growth {rec['single_rss_growth_mib']:.1f} MiB below import peak)"))


def run(args: argparse.Namespace) -> int:
    from parallelism.context import LAYOUTS, METHODS, check_seq_len

    if args.world_size < 1:
        raise ValueError(f"--world-size {args.world_size} must be >= 1")
    if args.repeats < 1:
        raise ValueError(f"--repeats {args.repeats} must be >= 1")
    layouts = _split(args.layout, LAYOUTS, "layout")
    methods = _split(args.method, METHODS, "method")
    for layout in layouts:
        check_seq_len(args.seq_len, args.world_size, layout)
    records = []
    for method in methods:
        for layout in layouts:
            cfg = dict(world_size=args.world_size, seq_len=args.seq_len, layout=layout, method=method,
                       ulysses_degree=args.ulysses_degree, heads=args.heads, kv_heads=args.kv_heads,
                       head_dim=args.head_dim, batch=args.batch, window=args.window,
                       causal=not args.no_causal, forward_only=args.forward_only, kernel=args.kernel,
                       repeats=args.repeats)
            rec = measure(cfg)
            _print(rec)
            records.append(rec)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    return 0

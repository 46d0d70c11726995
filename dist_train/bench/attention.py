"""Benchmark context-parallel attention on real gloo ranks (one torch thread each), fwd+bwd.

Reports per rank: compute time (own CPU time of the ring steps), exposed communication (wall −
compute), total; and overall: efficiency = (single-process full attention time / P) ÷ time
(torch SDPA; with ``--window`` the model's single-device windowed attention, which needs no [S, S] mask),
work imbalance (max/mean allowed (q, k) pairs per rank), critical path (Σ over ring steps of the
slowest rank's CPU time — meaningful even with more ranks than cores), the local kernel's speed
relative to torch SDPA at the shard shape, and peak tensor memory per rank relative to single-device
attention at S/P tokens. Medians over --repeats.

Peak memory is measured at the allocator, not from RSS: one extra (untimed) fwd+bwd step runs under
``torch.profiler`` with ``profile_memory=True``, whose ``[memory]`` events are every CPU tensor
allocation (+bytes) and free (−bytes) made by this thread through c10's allocator (kernel workspaces
included; frees of tensors allocated before the step are not reported). The peak of their running
sum is the step's peak tensor memory: its inputs (the q, k, v leaves), activations, communication
buffers and gradients. The meter is checked on a known allocation pattern before every run.

``--simulate`` drives the SAME ring schedule for P virtual ranks in one process (one thread, ranks
one after another, no process competes for a core): each rank's per-step CPU time is its own, so the
critical path there is free of oversubscription. Layouts are interleaved per repeat (same noise).

``--docs N`` packs N equal documents (``cu_seqlens``) into the same S and runs every configuration
twice, unmasked and packed, interleaved: the packed record reports its speed-up over the unmasked
one against the ideal S² / Σ Lᵢ² (the work ratio) and the fraction of that ideal reached.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
import warnings
from typing import Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch._C._autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from parallelism.context import (LAYOUTS, METHODS, Chunk, CPStats, build_schedule, check_seq_len,
                                 context_parallel_attention, default_tile, get_kernel, local_attention,
                                 normalize_cu_seqlens, rank_chunks, simulate_ring_attention)
from parallelism.context.masks import classify

from ..held_stderr import KINETO_NOISE, stderr_held_back
from ..spawn import run_ranks


def _split(value: str, valid: tuple, name: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in valid]
    if not items or bad:
        raise ValueError(f"--{name} {value!r}: unknown {bad or 'empty'}; valid: {', '.join(valid)}")
    return items


def _inputs(cfg: dict, seq: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hkv = cfg["kv_heads"] or cfg["heads"]
    shape = (cfg["batch"], seq)
    return (torch.randn(*shape, cfg["heads"], cfg["head_dim"], generator=gen),
            torch.randn(*shape, hkv, cfg["head_dim"], generator=gen),
            torch.randn(*shape, hkv, cfg["head_dim"], generator=gen))


def _cu_seqlens(cfg: dict):
    """Global boundaries of ``cfg["docs"]`` equal documents (the last takes the remainder); None: unmasked."""
    n, S = cfg.get("docs"), cfg["seq_len"]
    if not n:
        return None
    return [i * (S // n) for i in range(n)] + [S]


def _full_attention_step(cfg: dict, q, k, v) -> float:
    """One single-process attention step (fwd[+bwd]) over all of q's tokens; returns its CPU time. torch SDPA;
    with a window, the model's single-device windowed attention (``local_attention``: the tiled block kernels as a
    one-rank ring, O(S·w) time and memory), since SDPA would need an [S, S] mask: quadratic in S, at the long S
    this bench is run at, and a baseline doing S² masked work instead of the S·w the window leaves."""
    xs = [x.clone().requires_grad_() for x in (q, k, v)]
    start = time.thread_time()
    if cfg["window"] is not None:
        out = local_attention(*xs, causal=cfg["causal"], window=cfg["window"], kernel=cfg["kernel"])
    else:
        g = q.shape[2] // k.shape[2]
        kk, vv = (x.repeat_interleave(g, dim=2) if g > 1 else x for x in xs[1:])
        out = F.scaled_dot_product_attention(xs[0].transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2),
                                             is_causal=cfg["causal"])
    if not cfg["forward_only"]:
        out.backward(torch.ones_like(out))
    return time.thread_time() - start


def _kernel_ratio(cfg: dict, n: int) -> float:
    """CPU time of torch SDPA ÷ our local block kernel (fwd[+bwd]) on one causal n-token block."""
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


def peak_tensor_bytes(fn):
    """Run ``fn()``; return (its result, peak bytes of CPU tensor memory allocated during the call).

    Counts allocations and frees reported by c10's CPU allocator to the profiler on this thread
    (autograd's CPU backward runs on the calling thread); tensors that existed before are ignored, and c10's
    warning that such a tensor was freed (:data:`_UNKNOWN_BLOCK_FREED`) is held back: what else ``fn`` writes
    to stderr reaches it when ``fn`` returns or raises.
    """
    with _quiet_profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof, \
            stderr_held_back(skip_containing=(_UNKNOWN_BLOCK_FREED,)):
        result = fn()
    live = peak = 0
    for _, nbytes in _memory_events(prof):
        live += nbytes
        peak = max(peak, live)
    return result, peak


#: c10's CPU allocator logs (C++, to file descriptor 2, in a rank as ``[rankN]:[W… CPUAllocator.cpp:245] Memory
#: block of unknown size was allocated before the profiling started, profiler results will not include the
#: deallocation event``) at the first free under a memory profile of a tensor allocated before it, then at every
#: 1000th; ignoring those frees is what the meter means to do, so the line only buries a benchmark's output
_UNKNOWN_BLOCK_FREED = b"Memory block of unknown size was allocated before the profiling started"
#: the start of torch.profiler's "Profiler clears events at the end of each cycle" warning (a regex prefix)
_CYCLE_WARNING = "Warning: Profiler clears events"


@contextlib.contextmanager
def _quiet_profile(**kwargs) -> Iterator[profile]:
    """``torch.profiler.profile(**kwargs)`` whose start and stop do not print libkineto's USDT lines (a benchmark
    printing four such lines per point buries its own results); what runs inside the block writes to stderr as
    usual."""
    prof = profile(**kwargs)
    with stderr_held_back(skip=KINETO_NOISE), warnings.catch_warnings():
        # torch 2.11 warns at the first start of every profile object (2.13 only at a restart) that events are
        # cleared between cycles; each meter profile runs exactly one cycle, so the warning is only noise
        warnings.filterwarnings("ignore", message=_CYCLE_WARNING, category=UserWarning)
        prof.start()
    try:
        yield prof
    finally:
        with stderr_held_back(skip=KINETO_NOISE):
            prof.stop()


def _memory_events(prof) -> list[tuple[int, int]]:
    """(time ns, ±bytes) of the CPU allocator events in time order (stable for equal times)."""
    return sorted(((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                   if e.name() == "[memory]" and e.device_type() == DeviceType.CPU), key=lambda e: e[0])


def check_memory_meter() -> None:
    """Validate :func:`peak_tensor_bytes` on a known pattern: 1 MiB + 2 MiB live, free 1, add 1, free
all, then a small matmul → exactly 3 MiB."""
    before = torch.empty(1 << 20, dtype=torch.uint8)    # allocated before: its free must not count

    def pattern():
        a = torch.empty(1 << 20, dtype=torch.uint8)
        b = torch.empty(2 << 20, dtype=torch.uint8)
        del a
        c = torch.empty(1 << 20, dtype=torch.uint8)
        del b, c
        return (torch.ones(64, 64) @ torch.ones(64, 64)).sum()     # op inputs/outputs: 48 KiB

    held = [before]
    _, peak = peak_tensor_bytes(lambda: (pattern(), held.clear()))    # frees `before` inside: ignored
    if peak != 3 << 20:
        raise RuntimeError(f"memory meter self-check failed: measured {peak} bytes, expected {3 << 20}")


def _ring_step(cfg: dict, q, k, v, stats) -> None:
    """One fwd[+bwd] context-parallel step on fresh leaves cloned from this rank's shard."""
    xs = [x.clone().requires_grad_() for x in (q, k, v)]
    o = context_parallel_attention(*xs, layout=cfg["layout"], method=cfg["method"],
                                   ulysses_degree=cfg["ulysses_degree"], causal=cfg["causal"],
                                   window=cfg["window"], kernel=cfg["kernel"], kv_piece=cfg["kv_piece"],
                                   cu_seqlens=_cu_seqlens(cfg), stats=stats)
    if not cfg["forward_only"]:
        o.backward(torch.ones_like(o))


def _rank_main(rank: int, world: int, cfg: dict) -> dict:
    """One rank of the benchmark (run by dist_train.spawn.run_ranks after the gloo group is up)."""
    q, k, v = _inputs(cfg, cfg["seq_len"] // world, seed=rank)   # values do not matter for timing
    records = []
    for it in range(cfg["repeats"] + 1):
        stats = CPStats()
        dist.barrier()
        start, cpu0 = time.perf_counter(), time.thread_time()
        _ring_step(cfg, q, k, v, stats)
        wall = time.perf_counter() - start
        records.append(dict(wall=wall, cpu=time.thread_time() - cpu0,
                            compute=sum(stats.fwd_step_compute_s) + sum(stats.bwd_step_compute_s),
                            steps=stats.fwd_step_compute_s + stats.bwd_step_compute_s,
                            kv_sent=stats.kv_blocks_sent, work=stats.work_pairs))
    dist.barrier()
    _, peak = peak_tensor_bytes(lambda: _ring_step(cfg, q, k, v, CPStats()))    # untimed step
    return dict(iters=records[1:], peak_bytes=peak)


def _spawn(cfg: dict, world: int) -> list[dict]:
    return run_ranks(_rank_main, world, args=(cfg,), timeout=3600)


def _single_peak_bytes(cfg: dict, n: int) -> int:
    """Peak tensor memory of one single-device torch SDPA step (fwd[+bwd]) at n tokens, inputs included."""
    q, k, v = _inputs(cfg, n)
    _full_attention_step(cfg, q, k, v)                       # warm-up: lazily created state
    return peak_tensor_bytes(lambda: _full_attention_step(cfg, q, k, v))[1]


def measure(cfg: dict) -> dict:
    """Run one configuration; returns its JSON record."""
    torch.set_num_threads(1)
    P, S = cfg["world_size"], cfg["seq_len"]
    full = [_full_attention_step(cfg, *_inputs(cfg, S)) for _ in range(cfg["repeats"] + 1)][1:]
    single = statistics.median(full)
    ranks = _spawn(cfg, P)
    n_iter = len(ranks[0]["iters"])
    walls = [max(r["iters"][i]["wall"] for r in ranks) for i in range(n_iter)]
    time_s = statistics.median(walls)
    critical = statistics.median(_critical_path([r["iters"][i]["steps"] for r in ranks]) for i in range(n_iter))
    work = _plan_work(cfg) if cfg["method"] == "ring" else [r["iters"][0]["work"] for r in ranks]
    per_rank = [dict(rank=i, compute_s=statistics.median(it["compute"] for it in r["iters"]),
                     cpu_s=statistics.median(it["cpu"] for it in r["iters"]),
                     wall_s=statistics.median(it["wall"] for it in r["iters"]),
                     kv_blocks_sent=r["iters"][0]["kv_sent"], peak_mib=r["peak_bytes"] / 2**20)
                for i, r in enumerate(ranks)]
    for pr in per_rank:
        pr["exposed_comm_s"] = max(pr["wall_s"] - pr["compute_s"], 0.0)
    single_peak = _single_peak_bytes(cfg, S // P) / 2**20
    return dict(_header(cfg), time_s=time_s, single_process_s=single,
                ideal_time_s=single / P, efficiency=(single / P) / time_s,
                critical_path_s=critical, critical_path_efficiency=(single / P) / critical,
                imbalance=max(work) / (sum(work) / len(work)),
                kernel_vs_sdpa=_kernel_ratio(cfg, S // P),
                peak_mem_ratio=max(pr["peak_mib"] for pr in per_rank) / single_peak,
                single_peak_mib=single_peak, ranks=per_rank)


def _plan_work(cfg: dict) -> list[int]:
    """Allowed (query, key) pairs per rank in the ring plan of ``cfg``."""
    P, S = cfg["world_size"], cfg["seq_len"]
    chunks = tuple(rank_chunks(S, r, P, cfg["layout"]) for r in range(P))
    schedule = build_schedule(chunks, cfg["causal"], cfg["window"], default_tile(cfg["window"]), cfg["kv_piece"],
                              normalize_cu_seqlens(_cu_seqlens(cfg), S, cfg["batch"]))
    return [sum(p.plan.rank_work(r) for p in schedule) for r in range(P)]


def block_kernels(cfg: dict) -> list[dict]:
    """fwd[+bwd] CPU time of the local kernel on each block shape of the ring at n = S/P tokens.

    contiguous computes full n×n blocks and one causal n block; striped only causal (or shifted,
    run as causal) n blocks; zigzag half blocks (n×n/2, n/2×n) plus, locally, two causal n/2 blocks
    and one full n/2×n/2. Shapes are interleaved per repeat; the minimum CPU time is reported
    (other processes only add time). Useful GFLOP/s count allowed pairs only (4·D per pair forward,
    2.5× that for the backward).
    """
    torch.set_num_threads(1)
    n, h = cfg["seq_len"] // cfg["world_size"], cfg["kv_heads"] or cfg["heads"]
    kern = get_kernel(cfg["kernel"], torch.device("cpu"), torch.float32)
    shapes = {"full n x n": (n, n, False), "causal n": (n, n, True), "full n x n/2": (n, n // 2, False),
              "full n/2 x n": (n // 2, n, False), "causal n/2": (n // 2, n // 2, True),
              "full n/2 x n/2": (n // 2, n // 2, False)}
    gen = torch.Generator().manual_seed(3)
    cases = {}
    for name, (sq, sk, causal) in shapes.items():
        q = torch.randn(cfg["batch"], sq, cfg["heads"], cfg["head_dim"], generator=gen)
        k, v = (torch.randn(cfg["batch"], sk, h, cfg["head_dim"], generator=gen) for _ in range(2))
        mask = classify(Chunk(0 if causal else sk, 1, sq), Chunk(0, 1, sk), True, None)
        cases[name] = (q, k, v, mask, [])
    scale = cfg["head_dim"] ** -0.5
    for _ in range(cfg["repeats"] + 1):
        for q, k, v, mask, times in cases.values():
            start = time.thread_time()
            out, lse = kern.forward(q, k, v, mask, scale)
            if not cfg["forward_only"]:
                kern.backward(torch.ones_like(out), q, k, v, out, lse, mask, scale)
            times.append(time.thread_time() - start)
    flops_per_pair = 4 * cfg["head_dim"] * cfg["heads"] * cfg["batch"] * (1 if cfg["forward_only"] else 3.5)
    out = []
    for name, (q, k, v, mask, times) in cases.items():
        best = min(times[1:])
        out.append(dict(block=name, n=n, pairs=mask.allowed, min_s=best, median_s=statistics.median(times[1:]),
                        useful_gflops=flops_per_pair * mask.allowed / best / 1e9))
    full = out[0]["useful_gflops"]
    for rec in out:
        rec["vs_full"] = rec["useful_gflops"] / full
    return out


def _critical_path(step_times: list[list[float]]) -> float:
    """Σ over ring steps of the slowest rank's CPU time; step_times[rank][step] (fwd then bwd steps)."""
    return sum(max(rank[t] for rank in step_times) for t in range(len(step_times[0])))


def simulate(cfgs: list[dict]) -> list[dict]:
    """Critical paths of ring configurations (same P, S, shapes) with P virtual ranks in ONE process.

    Every rank's blocks run on this one thread (ranks take turns), so a rank's per-step CPU time is
    never inflated by other ranks competing for a core. Configurations and the single-process
    baseline are interleaved within each repeat so machine noise hits them alike. Besides the median
    over repeats of each repeat's critical path, reports the critical path of the per-(rank, step)
    MINIMUM CPU times (and the single-process minimum): on a shared machine other processes only
    ever add CPU time (cache and memory-bandwidth contention), and a max over P noisy ranks per
    step otherwise penalises balanced layouts for noise rather than for work.
    """
    torch.set_num_threads(1)
    bad = [c["method"] for c in cfgs if c["method"] != "ring"]
    if bad:
        raise ValueError(f"--simulate runs the ring schedule only; got --method {','.join(bad)}")
    base = cfgs[0]
    P, S = base["world_size"], base["seq_len"]
    q, k, v = _inputs(base, S)
    singles, steps = [], [[] for _ in cfgs]         # steps[config][iteration][rank][step]
    for _ in range(base["repeats"] + 1):
        singles.append(_full_attention_step(base, q, k, v))
        for i, cfg in enumerate(cfgs):
            stats = [CPStats() for _ in range(P)]
            xs = [x.clone().requires_grad_() for x in (q, k, v)]
            o = simulate_ring_attention(*xs, world_size=P, layout=cfg["layout"], causal=cfg["causal"],
                                        window=cfg["window"], kernel=cfg["kernel"], kv_piece=cfg["kv_piece"],
                                        cu_seqlens=_cu_seqlens(cfg), stats=stats)
            if not cfg["forward_only"]:
                o.backward(torch.ones_like(o))
            steps[i].append([st.fwd_step_compute_s + st.bwd_step_compute_s for st in stats])
    single = statistics.median(singles[1:])
    records = []
    for cfg, runs in zip(cfgs, steps):
        runs = runs[1:]
        critical = statistics.median(_critical_path(r) for r in runs)
        step_min = [[min(it[r][t] for it in runs) for t in range(len(runs[0][r]))] for r in range(P)]
        critical_min = _critical_path(step_min)
        work = _plan_work(cfg)
        records.append(dict(_header(cfg), simulated=True, single_process_s=single, ideal_time_s=single / P,
                            critical_path_s=critical, critical_path_efficiency=(single / P) / critical,
                            single_process_min_s=min(singles[1:]), critical_path_min_s=critical_min,
                            critical_path_min_efficiency=min(singles[1:]) / P / critical_min,
                            imbalance=max(work) / (sum(work) / len(work)),
                            ranks=[dict(rank=r, compute_s=statistics.median(sum(it[r]) for it in runs),
                                        step_s=[statistics.median(it[r][t] for it in runs)
                                                for t in range(len(runs[0][r]))])
                                   for r in range(P)]))
    return records


def _header(cfg: dict) -> dict:
    return dict(method=cfg["method"], layout=cfg["layout"], world_size=cfg["world_size"],
                seq_len=cfg["seq_len"], heads=cfg["heads"], kv_heads=cfg["kv_heads"] or cfg["heads"],
                head_dim=cfg["head_dim"], batch=cfg["batch"], causal=cfg["causal"], window=cfg["window"],
                fwd_bwd=not cfg["forward_only"], ulysses_degree=cfg["ulysses_degree"], kv_piece=cfg["kv_piece"],
                docs=cfg.get("docs"))


def _add_speedups(records: list[dict]) -> None:
    """critical-path speed-up of every record over the contiguous layout of the same method."""
    for key, out in (("critical_path_s", "speedup_vs_contiguous"),
                     ("critical_path_min_s", "speedup_vs_contiguous_min")):
        base = {(r["method"], r["kv_piece"], r["docs"]): r[key] for r in records
                if r["layout"] == "contiguous" and key in r}
        for r in records:
            if (r["method"], r["kv_piece"], r["docs"]) in base and key in r:
                r[out] = base[(r["method"], r["kv_piece"], r["docs"])] / r[key]


def _add_packing(records: list[dict]) -> None:
    """Packed records: speed-up over the unmasked twin (same method, layout, piece) vs the ideal S²/ΣLᵢ²."""
    twins = {(r["method"], r["layout"], r["kv_piece"]): r for r in records if not r["docs"]}
    for r in records:
        twin = twins.get((r["method"], r["layout"], r["kv_piece"]))
        if not r["docs"] or twin is None:
            continue
        cu = _cu_seqlens(r)
        r["ideal_ratio"] = sum((b - a) ** 2 for a, b in zip(cu, cu[1:])) / r["seq_len"] ** 2
        for key, suffix in (("critical_path_s", ""), ("critical_path_min_s", "_min"), ("time_s", "_wall")):
            if key in r and key in twin:
                r[f"packed_speedup{suffix}"] = twin[key] / r[key]
                r[f"fraction_of_ideal{suffix}"] = r[f"packed_speedup{suffix}"] * r["ideal_ratio"]


def plot_packing(records: list[dict], path: str) -> None:
    """PNG: packed-document speed-up over unmasked per (P, layout, method) record, the ideal S²/ΣLᵢ² as
    a line, and the fraction of it reached on each bar. ``records``: any runs' --docs records."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    packed = [r for r in records if "packed_speedup" in r or "packed_speedup_wall" in r]
    if not packed:
        raise ValueError("--png needs --docs N: no packed-document record to plot")
    key = "packed_speedup" if "packed_speedup" in packed[0] else "packed_speedup_wall"
    labels = [f"P={r['world_size']} {r['layout']}" + (f" {r['method']}" if r["method"] != "ring" else "")
              for r in packed]
    fig, ax = plt.subplots(figsize=(1.6 * len(packed) + 2, 4))
    bars = ax.bar(labels, [r[key] for r in packed], color="tab:blue", label="measured (critical path)")
    for bar, r in zip(bars, packed):
        ideal = 1 / r["ideal_ratio"]
        ax.hlines(ideal, bar.get_x(), bar.get_x() + bar.get_width(), colors="black", linestyles="--")
        ax.hlines(0.8 * ideal, bar.get_x(), bar.get_x() + bar.get_width(), colors="tab:red", linestyles=":")
        ax.text(bar.get_x() + bar.get_width() / 2, r[key], f"{r[key] * r['ideal_ratio']:.0%}", ha="center",
                va="bottom")
    ax.plot([], [], "k--", label="ideal S²/ΣLᵢ²")
    ax.plot([], [], ":", color="tab:red", label="80% of ideal")
    ax.set_ylabel("speed-up of packed over unmasked")
    ax.set_title(f"{packed[0]['docs']} equal documents, S={packed[0]['seq_len']}, causal fwd+bwd")
    ax.set_ylim(0, 1.3 * max(1 / r["ideal_ratio"] for r in packed))
    ax.legend(loc="upper center", ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _print(rec: dict) -> None:
    print(f"\n{rec['method']}/{rec['layout']}  P={rec['world_size']} S={rec['seq_len']} "
          f"H={rec['heads']}/{rec['kv_heads']} D={rec['head_dim']} causal={rec['causal']} "
          f"window={rec['window']} kv_piece={rec['kv_piece']} docs={rec['docs']} "
          f"{'fwd+bwd' if rec['fwd_bwd'] else 'fwd'}"
          + ("  [simulated: P ranks in one process]" if rec.get("simulated") else ""))
    speed = (f"  speed-up vs contiguous {rec['speedup_vs_contiguous']:.2f}x"
             if "speedup_vs_contiguous" in rec else "")
    if "packed_speedup" in rec or "packed_speedup_wall" in rec:
        parts = [f"{name} {rec['packed_speedup' + sfx]:.2f}x = {rec['fraction_of_ideal' + sfx]:.1%} of ideal"
                 for name, sfx in (("critical path", ""), ("per-step minima", "_min"), ("wall", "_wall"))
                 if "packed_speedup" + sfx in rec]
        print(f"packed {rec['docs']} documents vs unmasked at the same S: ideal speed-up "
              f"{1 / rec['ideal_ratio']:.2f}x (S^2/sum L^2); " + ", ".join(parts))
    if rec.get("simulated"):
        print(f"{'rank':>4} {'compute_s':>10}  per-step CPU s")
        for r in rec["ranks"]:
            print(f"{r['rank']:>4} {r['compute_s']:>10.3f}  " + " ".join(f"{t:.3f}" for t in r["step_s"]))
        print(f"critical path {rec['critical_path_s']:.3f}s ({rec['critical_path_efficiency']:.1%} of "
              f"single/P {rec['ideal_time_s']:.3f}s)  imbalance {rec['imbalance']:.3f}{speed}")
        print(f"critical path of per-step minima {rec['critical_path_min_s']:.3f}s "
              f"({rec['critical_path_min_efficiency']:.1%} of min single/P)"
              + (f"  speed-up vs contiguous {rec['speedup_vs_contiguous_min']:.2f}x"
                 if "speedup_vs_contiguous_min" in rec else ""))
        return
    print(f"{'rank':>4} {'compute_s':>10} {'exposed_comm_s':>14} {'total_s':>8} {'kv_sent':>7} {'peak_MiB':>8}")
    for r in rec["ranks"]:
        print(f"{r['rank']:>4} {r['compute_s']:>10.3f} {r['exposed_comm_s']:>14.3f} {r['wall_s']:>8.3f} "
              f"{r['kv_blocks_sent']:>7} {r['peak_mib']:>8.1f}")
    print(f"time {rec['time_s']:.3f}s  ideal {rec['ideal_time_s']:.3f}s  efficiency {rec['efficiency']:.1%}  "
          f"critical path {rec['critical_path_s']:.3f}s ({rec['critical_path_efficiency']:.1%})  "
          f"imbalance {rec['imbalance']:.3f}  kernel/SDPA speed {rec['kernel_vs_sdpa']:.2f}{speed}")
    print(f"peak tensor memory per rank {max(r['peak_mib'] for r in rec['ranks']):.1f} MiB vs single-device "
          f"attention at S/P tokens {rec['single_peak_mib']:.1f} MiB: ratio {rec['peak_mem_ratio']:.2f}")


def run(args: argparse.Namespace, pieces: list[Optional[int]]) -> int:
    """``pieces``: the ``--kv-piece`` values that dist_train.bench.cli.attention.check parsed."""
    layouts = _split(args.layout, LAYOUTS, "layout")
    methods = _split(args.method, METHODS, "method")
    for layout in layouts:
        check_seq_len(args.seq_len, args.world_size, layout)
    docs = [None, args.docs] if args.docs else [None]
    cfgs = [dict(world_size=args.world_size, seq_len=args.seq_len, layout=layout, method=method,
                 ulysses_degree=args.ulysses_degree, heads=args.heads, kv_heads=args.kv_heads,
                 head_dim=args.head_dim, batch=args.batch, window=args.window,
                 causal=not args.no_causal, forward_only=args.forward_only, kernel=args.kernel,
                 repeats=args.repeats, kv_piece=piece, docs=n)
            for piece in pieces for method in methods for layout in layouts for n in docs]
    if args.block_kernels:
        records = block_kernels(cfgs[0])
        print(f"local kernel {args.kernel}, n=S/P={records[0]['n']}, {'fwd' if args.forward_only else 'fwd+bwd'}, "
              f"min of {args.repeats} (useful GFLOP/s: allowed pairs only)")
        for r in records:
            print(f"  {r['block']:>15}  {r['min_s'] * 1e3:8.1f} ms  {r['useful_gflops']:6.1f} GFLOP/s  "
                  f"{r['vs_full']:.2f} of full n x n")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(records, f, indent=1)
        return 0
    if args.simulate:
        records = simulate(cfgs)
    else:
        check_memory_meter()
        records = [measure(cfg) for cfg in cfgs]
    _add_speedups(records)
    _add_packing(records)
    for rec in records:
        _print(rec)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    if args.png:
        plot_packing(records, args.png)
    return 0

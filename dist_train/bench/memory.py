"""`dist-train bench memory`: peak memory per rank, bytes per token and s/step of GPT training steps over a
sweep of sequence lengths S, at a fixed model, for each cp (ranks on this machine, one torch thread each).

Each point builds the model exactly as training does (``build_gpt`` on the config's mesh, the config's
engine with ``--precision``'s autocast, zigzag cp shards, synthetic learnable tokens) and runs optimizer steps on sequences of S tokens:
per ``--loss-chunk`` setting one step measured for memory, then ``--steps`` timed steps per setting,
interleaved. The memory step runs under ``torch.profiler`` with
``profile_memory=True`` (the tensor meter of ``bench attention``, validated on a known allocation pattern
first): the peak of live CPU tensor bytes allocated during the step — activations, checkpoints, the loss
chunk, attention workspaces, ring buffers, gradients and the optimizer state it creates; the weights
that exist before the step are reported separately (``param_bytes``). Bytes per token = that peak ÷ the
tokens this rank holds (S / cp). Step time: the median of the timed steps of the slowest rank (with
``--steps 0``: the memory step's own time, a first step under the profiler: ``step_s_timed`` false). The process's
peak resident set (``ru_maxrss``, interpreter and libraries included) is reported as well.

Memory linear in S means bytes per token is flat over the sweep: the summary prints max/min − 1 per cp.
With ``--loss-chunk auto,full`` both settings run in the same ranks on the same model, and the summary prints
the chunked/full ratios of step time and peak memory (the unchunked loss holds [S/cp, V] logits).
"""
from __future__ import annotations

import argparse
import csv
import json
import resource
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist

from ..config import config_from_dict
from ..data.batches import TokenBatcher
from ..data.datasets import SyntheticTokenDataset
from ..engines import autocast_dtype, build_engine
from ..mesh import build_mesh
from ..models.gpt import build_gpt
from ..spawn import run_ranks
from .attention import check_memory_meter, peak_tensor_bytes
from .cli.memory import Sweep


def point_config(args: argparse.Namespace, seq_len: int, cp: int, loss_chunk: Any) -> dict:
    """The training config (as a dict for ``config_from_dict``) of one sweep point."""
    return {
        "run": {"name": "bench_memory", "dir": "/tmp/unused", "seed": 1234},
        "model": {"kind": "gpt", "d_model": args.d_model, "n_layers": args.layers, "n_heads": args.heads,
                  "n_kv_heads": args.kv_heads, "vocab_size": args.vocab, "rope_theta": 500000.0,
                  "attention_window": args.window or None},
        "data": {"source": "synthetic", "seq_len": seq_len},
        "parallel": {"cp": cp, "cp_layout": "zigzag", "cp_kv_piece": args.kv_piece or None},
        "train": {"steps": args.steps + 1, "global_batch": 1, "micro_batch": 1, "lr": 2e-3, "warmup_steps": 0,
                  "activation_checkpointing": args.checkpointing, "loss_chunk": loss_chunk, "progress": False,
                  "precision": args.precision},
        "checkpoint": {"every": 0, "at_end": False},
    }


def _point(rank: int, world: int, cfg_dict: dict, chunks: list, steps: int) -> dict:
    """One rank of one (S, cp) point (run by dist_train.spawn.run_ranks): per ``train.loss_chunk`` setting
    one memory-measured step, then ``steps`` timed steps per setting, the settings interleaved round-robin
    (the same model and process, so machine noise hits every setting alike)."""
    check_memory_meter()
    cfg = config_from_dict(cfg_dict)
    mesh = build_mesh(cfg.parallel, world)
    model = build_gpt(cfg, mesh, torch.device("cpu"))
    model.train()
    engine = build_engine(cfg, model, mesh, autocast_dtype(cfg, torch.device("cpu")))
    source = SyntheticTokenDataset(cfg.model.vocab_size, cfg.data.seq_len, cfg.run.seed)
    batcher = TokenBatcher(source, micro_batch=1, dp=1, dp_rank=0, cp=cfg.parallel.cp, cp_rank=mesh.coord("cp"),
                           layout=cfg.parallel.cp_layout)
    n_steps, tokens = 0, 0

    def step(chunk) -> float:
        nonlocal n_steps, tokens
        model.loss_chunk = chunk
        batch = batcher.microbatch(n_steps, 0)
        n_steps, tokens = n_steps + 1, int(batch["tokens"].numel())
        count = batch.pop("count").clone()
        if world > 1:
            dist.all_reduce(count)
        return engine.train_step([batch], float(count))[0]

    out = {str(c): {"losses": [], "step_s": []} for c in chunks}
    for c in chunks:
        t0 = time.perf_counter()
        loss, peak = peak_tensor_bytes(lambda: step(c))
        out[str(c)].update(peak_bytes=peak, measured_step_s=time.perf_counter() - t0)
        out[str(c)]["losses"].append(loss)
    for _ in range(steps):
        for c in chunks:
            if world > 1:
                dist.barrier()
            t0 = time.perf_counter()
            out[str(c)]["losses"].append(step(c))
            out[str(c)]["step_s"].append(time.perf_counter() - t0)
    return {"per_chunk": out, "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "rss_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "tokens": tokens}


def measure(args: argparse.Namespace, cps: list[int], seq_lens: list[int], chunks: list) -> list[dict]:
    """Every (S, cp) point, one record per loss-chunk setting (measured in the same ranks)."""
    records = []
    for cp in cps:
        for s in seq_lens:
            cfg_dict = point_config(args, s, cp, chunks[0])
            t0 = time.perf_counter()
            per_rank = run_ranks(_point, cp, args=(cfg_dict, chunks, args.steps), timeout=args.timeout)
            wall = time.perf_counter() - t0
            tokens = per_rank[0]["tokens"]
            for chunk in chunks:
                mine = [r["per_chunk"][str(chunk)] for r in per_rank]
                peak = max(m["peak_bytes"] for m in mine)
                # --steps 0: the memory step's own time (first step of the process, under the profiler)
                step_s = max(statistics.median(m["step_s"]) if args.steps else m["measured_step_s"] for m in mine)
                rec = {"seq_len": s, "cp": cp, "loss_chunk": chunk, "window": args.window or None,
                       "precision": args.precision,
                       "tokens_per_rank": tokens, "peak_bytes_per_rank": peak, "bytes_per_token": peak / tokens,
                       "step_s": step_s, "step_s_timed": bool(args.steps), "rss_peak_bytes_per_rank": max(r["rss_peak_bytes"] for r in per_rank),
                       "param_bytes": per_rank[0]["param_bytes"], "losses": mine[0]["losses"], "wall_s": wall}
                records.append(rec)
                print(f"S {s:>9,} cp {cp} loss_chunk {chunk!s:>5} | peak/rank {peak / 2**30:7.3f} GiB | "
                      f"{rec['bytes_per_token']:8.0f} B/token | {step_s:8.2f} s/step | RSS "
                      f"{rec['rss_peak_bytes_per_rank'] / 2**30:6.2f} GiB | loss {rec['losses'][0]:.3f}"
                      f"->{rec['losses'][-1]:.3f}", flush=True)
    return records


def _series(records: list[dict]) -> dict:
    """{(cp, loss_chunk): that series' records in order of S}."""
    keys = sorted({(r["cp"], str(r["loss_chunk"])) for r in records})
    return {(cp, chunk): sorted((r for r in records if r["cp"] == cp and str(r["loss_chunk"]) == chunk),
                                key=lambda r: r["seq_len"]) for cp, chunk in keys}


def summarize(records: list[dict]) -> dict:
    """Per (cp, loss_chunk): bytes/token max/min − 1 over S; per (S, cp): chunked/full ratios."""
    out: dict = {"flatness": [], "loss_chunk_vs_full": []}
    for (cp, chunk), pts in _series(records).items():
        bpt = [r["bytes_per_token"] for r in pts]
        out["flatness"].append({"cp": cp, "loss_chunk": chunk, "seq_lens": [r["seq_len"] for r in pts],
                                "bytes_per_token_spread": max(bpt) / min(bpt) - 1.0,
                                "last_over_first": bpt[-1] / bpt[0]})
    for r in records:
        if r["loss_chunk"] == "full":
            continue
        full = [f for f in records if f["loss_chunk"] == "full" and f["cp"] == r["cp"] and f["seq_len"] == r["seq_len"]]
        if full:
            out["loss_chunk_vs_full"].append({"seq_len": r["seq_len"], "cp": r["cp"], "loss_chunk": r["loss_chunk"],
                                              "step_time_ratio": r["step_s"] / full[0]["step_s"],
                                              "peak_ratio": r["peak_bytes_per_rank"] / full[0]["peak_bytes_per_rank"]})
    return out


def plot(records: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for (cp, chunk), pts in _series(records).items():
        xs = [r["seq_len"] for r in pts]
        label = f"cp={cp}, loss_chunk={chunk}"
        axes[0].plot(xs, [r["bytes_per_token"] / 1024 for r in pts], "o-", label=label)
        axes[1].plot(xs, [r["peak_bytes_per_rank"] / 2**30 for r in pts], "o-", label=label)
        axes[2].plot(xs, [r["step_s"] for r in pts], "o-", label=label)
    titles = ("peak tensor bytes per token (KiB)", "peak tensor memory per rank (GiB)", "s/step (slowest rank)")
    for ax, title in zip(axes, titles):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length S (tokens)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylim(0, 1.3 * max(r["bytes_per_token"] for r in records) / 1024)  # flat lines clear of the legend
    axes[1].set_yscale("log", base=2)
    axes[2].set_yscale("log", base=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _write_csv(records: list[dict], path: str) -> None:
    cols = ["seq_len", "cp", "loss_chunk", "window", "precision", "tokens_per_rank", "peak_bytes_per_rank", "bytes_per_token",
            "step_s", "rss_peak_bytes_per_rank", "param_bytes", "wall_s"]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(records)


def _point_key(record: dict) -> tuple[int, int, str]:
    """What identifies a record's point: (S, cp, loss_chunk); a point measured again replaces an --extend record."""
    return record["seq_len"], record["cp"], str(record["loss_chunk"])


def run(args: argparse.Namespace, sweep: Sweep) -> int:
    """``sweep``: the points dist_train.bench.cli.memory.check parsed, with an ``--extend`` file's records."""
    new = measure(args, sweep.cps, sweep.seq_lens, sweep.loss_chunks)
    measured = {_point_key(r) for r in new}
    records = [r for r in sweep.previous if _point_key(r) not in measured] + new
    summary = summarize(records)
    for f in summary["flatness"]:
        print(f"cp {f['cp']} loss_chunk {f['loss_chunk']}: bytes/token spread over S "
              f"{f['seq_lens'][0]:,}..{f['seq_lens'][-1]:,} = {100 * f['bytes_per_token_spread']:.1f}% "
              f"(last/first {f['last_over_first']:.3f})")
    for c in summary["loss_chunk_vs_full"]:
        print(f"S {c['seq_len']:,} cp {c['cp']}: loss_chunk {c['loss_chunk']} / full: step time "
              f"{c['step_time_ratio']:.3f}x, peak memory {c['peak_ratio']:.3f}x")
    if args.json:
        with open(args.json, "w") as fh:
            options = {k: v for k, v in vars(args).items() if not callable(v)}  # not argparse's handler
            json.dump({"args": options, "records": records, "summary": summary}, fh, indent=2, default=str)
    if args.csv:
        _write_csv(records, args.csv)
    if args.png:
        plot(records, args.png)
    return 0

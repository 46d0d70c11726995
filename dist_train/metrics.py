"""Throughput accounting: FLOPs per token, device peak, MFU, peak memory, the metrics.jsonl writer.

FLOP convention (stated wherever a number is printed; docs/metrics.md):
    training FLOPs per token = 6·N + 12·L·d_attn·S_eff
    N      = parameters that take part in matmuls (all Linear weights + the LM head; the input
             embedding lookup and norms are excluded)
    d_attn = n_heads · head_dim
    S_eff  = S/2 for causal attention (Megatron's halving of the score/value matmuls), min(w, S/2)-ish
             for a sliding window w (exactly: the mean number of keys a query sees), S for full attention.
PaLM/TorchTitan use S_eff = S for causal; our MFU is therefore the *lower*, useful-work figure.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import time
from pathlib import Path
from typing import Optional

import torch

FLOP_CONVENTION = "6N + 12*L*d_attn*S_eff (causal S_eff = mean keys per query ~ S/2, Megatron halving)"

# dense bf16 peak TFLOP/s per device (no sparsity)
CUDA_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def mean_keys_per_query(seq_len: int, window: Optional[int], causal: bool = True) -> float:
    """Average number of keys each query attends to (the S_eff of the FLOP convention)."""
    if not causal:
        return float(seq_len)
    if window is None or window + 1 >= seq_len:
        return (seq_len + 1) / 2.0
    w = window + 1  # keys i-w..i inclusive
    # queries 0..w-1 see i+1 keys; the rest see w
    total = w * (w + 1) / 2 + (seq_len - w) * w
    return total / seq_len


def gpt_matmul_params(cfg) -> int:
    from .models.gpt import ffn_hidden_size

    d, L = cfg.d_model, cfg.n_layers
    hd = d // cfg.n_heads
    kv = cfg.n_kv_heads or cfg.n_heads
    attn = d * cfg.n_heads * hd * 2 + d * kv * hd * 2
    mlp = 3 * d * ffn_hidden_size(cfg)
    return L * (attn + mlp) + d * cfg.vocab_size


def gpt_total_params(cfg) -> int:
    """Every parameter of the full (unsharded) GPT: matmul weights, the input embedding when untied, norms."""
    embed = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model
    return gpt_matmul_params(cfg) + embed + (2 * cfg.n_layers + 1) * cfg.d_model


def gpt_flops_per_token(cfg, seq_len: int) -> float:
    """Training (fwd+bwd) FLOPs per token for the GPT under FLOP_CONVENTION."""
    n = gpt_matmul_params(cfg)
    s_eff = mean_keys_per_query(seq_len, cfg.attention_window)
    return 6.0 * n + 12.0 * cfg.n_layers * cfg.d_model * s_eff


def calibrate_cpu_tflops(threads: Optional[int] = None, size: int = 1024, repeats: int = 5) -> float:
    """Measured fp32 matmul TFLOP/s with this process's torch thread count (the CPU 'device peak')."""
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * size ** 3 / best / 1e12


def device_peak_tflops(device: torch.device, configured: Optional[float] = None) -> float:
    """Per-device peak for MFU: the configured value, the CUDA table, or a cached CPU calibration."""
    if configured:
        return float(configured)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, val in CUDA_PEAK_TFLOPS.items():
            if key in name:
                return val
        return 989.0
    threads = torch.get_num_threads()
    cache = Path(os.environ.get("DIST_TRAIN_CACHE", Path.home() / ".cache" / "dist-train")) / "cpu_peak.json"
    key = f"{platform.processor() or platform.machine()}|{os.cpu_count()}|{threads}"
    try:
        table = json.loads(cache.read_text())
    except (OSError, ValueError):
        table = {}
    if key not in table:
        table[key] = calibrate_cpu_tflops(threads)
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(table))
            os.replace(tmp, cache)
        except OSError:
            pass
    return float(table[key])


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated device memory (CUDA) or this process's peak resident set size (CPU)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class MetricsWriter:
    """Appends one JSON object per logged step to ``metrics.jsonl`` (rank 0 only)."""

    def __init__(self, path: Optional[Path]):
        self.path = path
        self._f = open(path, "a", buffering=1) if path is not None else None

    def write(self, record: dict) -> None:
        if self._f is not None:
            self._f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def format_metrics(r: dict, total_steps: int) -> str:
    return (f"step {r['step']:>5}/{total_steps} | loss {r['loss']:.4f} | lr {r['lr']:.2e} | "
            f"gnorm {r['grad_norm']:.3f} | {r['tokens_per_s']:,.0f} tok/s | "
            f"{r['tflops_per_device']:.3f} TFLOP/s/dev | MFU {100 * r['mfu']:.1f}% | "
            f"mem {r['peak_mem_bytes'] / 2**30:.2f} GiB | {r['step_time_s']:.3f} s/step")

"""Measuring a run: the device peak for MFU (CUDA table or calibrated CPU matmul), peak memory, the
metrics.jsonl writer and the metric line rank 0 prints. What a step *should* cost (FLOPs under the one
convention, tokens/s, MFU arithmetic) is the cost model's: :mod:`dist_train.cost.flops`.
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

# dense bf16 peak TFLOP/s per device (no sparsity)
CUDA_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


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

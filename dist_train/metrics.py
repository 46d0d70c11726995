"""Measuring a run: the device peak for MFU (CUDA datasheet table or a measured matmul, the calibrated CPU
matmul) with where it comes from, the guard that keeps MFU honest, peak memory and the metric line rank 0
prints (the records go to ``dist_train.trackers``). What a step *should* cost (FLOPs under the one
convention, tokens/s, MFU arithmetic) is the cost model's: :mod:`dist_train.cost.flops`.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import platform
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .atomic_write import write_text_atomic

#: dense (no sparsity) datasheet peaks, TFLOP/s per device: (bf16 tensor core, fp32 without TF32). Matched
#: against torch.cuda.get_device_name(), longest key first ("H100 PCIe" before "H100"; the NVL cards, "NVIDIA H200
#: NVL" and "NVIDIA H100 NVL", run at lower clocks than the SXM parts: 1,671 sparse = 835.5 dense bf16, 60 fp32).
CUDA_PEAK_TFLOPS = {
    "B200": (2250.0, 75.0), "H200": (989.4, 66.9), "H200 NVL": (835.5, 60.0), "GH200": (989.4, 66.9),
    "H100 PCIe": (756.0, 51.2), "H100 NVL": (835.5, 60.0), "H100": (989.4, 66.9), "A100": (312.0, 19.5),
    "L40S": (362.1, 91.6), "L4": (121.0, 30.3), "A10": (125.0, 31.2),
}
#: the CPU calibration: best of ROUNDS x REPEATS timed fp32 matmuls of SIZE^3 (best-of discards the runs a
#: busy machine slowed down; a peak measured too low makes MFU read above 100%)
CPU_CALIBRATION = {"size": 1024, "rounds": 3, "repeats": 8}


@dataclass
class DevicePeak:
    """The per-device peak MFU is relative to, and where it comes from (printed and kept in summary.json)."""

    tflops: float
    source: str


def _utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def timed_matmul_tflops(device: torch.device, dtype: torch.dtype, size: int, rounds: int, repeats: int) -> float:
    """Best TFLOP/s of ``rounds`` x ``repeats`` timed [size, size] @ [size, size] matmuls on ``device``
    (after one warm-up), with this process's torch thread count on CPU."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.mm(a, b)
    best = math.inf
    for _ in range(rounds):
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            torch.mm(a, b)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - t0)
        time.sleep(0.05)  # spread the rounds: a burst of load from other processes rarely covers all of them
    return 2 * size ** 3 / best / 1e12


def cpu_peak_cache() -> Path:
    return Path(os.environ.get("DIST_TRAIN_CACHE", Path.home() / ".cache" / "dist-train")) / "cpu_peak.json"


def _cpu_key(threads: int) -> str:
    return f"{platform.processor() or platform.machine()}|{os.cpu_count()}|{threads}"


def calibrate_cpu_peak(threads: int) -> dict:
    """Measure this CPU's fp32 matmul peak with ``threads`` torch threads (the count the run uses) and
    record when and how: {"tflops", "threads", "measured_at", "load_avg_1m", "method"}."""
    c = CPU_CALIBRATION
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        tflops = timed_matmul_tflops(torch.device("cpu"), torch.float32, c["size"], c["rounds"], c["repeats"])
    finally:
        torch.set_num_threads(saved)
    return {"tflops": tflops, "threads": threads, "measured_at": _utc_now(), "load_avg_1m": os.getloadavg()[0],
            "method": f"best of {c['rounds']}x{c['repeats']} fp32 torch.mm {c['size']}^3 with {threads} thread(s)"}


def _read_cpu_table() -> dict:
    try:
        table = json.loads(cpu_peak_cache().read_text())
    except (OSError, ValueError):
        return {}
    return table if isinstance(table, dict) else {}


def store_cpu_peak(threads: int, entry: dict) -> None:
    """Write one calibration into the cache (atomic; best effort: a read-only home only costs a re-measure)."""
    cache = cpu_peak_cache()
    table = _read_cpu_table()
    table[_cpu_key(threads)] = entry
    with contextlib.suppress(OSError):  # unwritable cache: the next run measures again, nothing else is lost
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(cache, json.dumps(table, indent=1))


def _cpu_source(entry: dict) -> str:
    return (f"cpu calibration: {entry['method']}, measured {entry['measured_at']} "
            f"(load average {entry['load_avg_1m']:.1f}), cached in {cpu_peak_cache()}")


def cpu_peak(threads: int) -> DevicePeak:
    """The cached calibration for this CPU and thread count, measured now when missing (or an old cache
    entry without its provenance), and measured again when the machine is now much less loaded than it was
    then (1-minute load average below half): the cache keeps the higher of the two, so a peak measured on
    a busy machine rises once the machine is quiet and never falls."""
    entry = _read_cpu_table().get(_cpu_key(threads))
    if not (isinstance(entry, dict) and {"tflops", "measured_at", "method", "load_avg_1m"} <= set(entry)):
        entry = calibrate_cpu_peak(threads)
        store_cpu_peak(threads, entry)
    elif os.getloadavg()[0] < entry["load_avg_1m"] / 2:
        fresh = calibrate_cpu_peak(threads)
        if fresh["tflops"] > entry["tflops"]:
            entry = fresh
        else:
            entry = {**entry, "load_avg_1m": fresh["load_avg_1m"]}  # confirmed on a quieter machine
        store_cpu_peak(threads, entry)
    return DevicePeak(float(entry["tflops"]), _cpu_source(entry))


def cuda_peak(device: torch.device, dtype: torch.dtype) -> DevicePeak:
    """The datasheet peak of the visible card for ``dtype`` (bf16 under autocast, else fp32), or, for a card
    not in :data:`CUDA_PEAK_TFLOPS`, a measured matmul (best of 3x10 4096^3) — the source says which."""
    name = torch.cuda.get_device_name(device)
    column = 0 if dtype == torch.bfloat16 else 1
    for key in sorted(CUDA_PEAK_TFLOPS, key=len, reverse=True):
        if key in name:
            return DevicePeak(CUDA_PEAK_TFLOPS[key][column],
                              f"datasheet table: {name} dense {'bf16' if column == 0 else 'fp32'} ({key})")
    tflops = timed_matmul_tflops(device, dtype, 4096, 3, 10)
    return DevicePeak(tflops, f"measured: best of 3x10 {str(dtype).replace('torch.', '')} torch.mm 4096^3 on "
                              f"{name} at {_utc_now()} (not in the datasheet table)")


def device_peak(device: torch.device, configured: Optional[float] = None,
                dtype: Optional[torch.dtype] = None) -> DevicePeak:
    """Per-device peak for MFU: ``train.peak_tflops`` when set, the CUDA table (or a measured matmul), or
    the cached CPU calibration with this process's thread count."""
    if configured:
        return DevicePeak(float(configured), "configured: train.peak_tflops")
    if device.type == "cuda":
        return cuda_peak(device, dtype or torch.float32)
    return cpu_peak(torch.get_num_threads())


class HonestPeak:
    """MFU above 100% means the peak is wrong, never that the run beat the hardware: on the first logged
    step whose achieved TFLOP/s/device exceeds the peak, the peak is fixed (CPU: recalibrated now and
    raised to at least what the run achieved, the cache updated; a configured or table peak: raised to
    what the run achieved) and one warning names the numbers. Nothing is clamped."""

    def __init__(self, peak: DevicePeak, device: torch.device, configured: bool):
        self.peak, self.device, self.configured = peak, device, configured
        self.warning: Optional[str] = None

    def check(self, step: int, achieved_tflops: float) -> Optional[str]:
        """Fix the peak if ``achieved_tflops`` exceeds it; returns the warning the first time (else None)."""
        if achieved_tflops <= self.peak.tflops:
            return None
        old = self.peak
        if self.device.type == "cpu" and not self.configured:
            threads = torch.get_num_threads()
            entry = calibrate_cpu_peak(threads)
            entry["tflops"] = max(entry["tflops"], achieved_tflops)
            entry["method"] += f"; raised to the {achieved_tflops:.4g} TFLOP/s a training step achieved"
            store_cpu_peak(threads, entry)
            self.peak = DevicePeak(entry["tflops"], _cpu_source(entry))
        else:
            self.peak = DevicePeak(achieved_tflops, f"{old.source}; raised at step {step} to the TFLOP/s the run "
                                                    "achieved (the configured/table value was too low)")
        first = self.warning is None
        self.warning = (f"MFU {100 * achieved_tflops / old.tflops:.1f}% at step {step} is impossible: the device "
                        f"peak {old.tflops:.4g} TFLOP/s ({old.source}) is below the {achieved_tflops:.4g} "
                        f"TFLOP/s/device this run achieved; peak now {self.peak.tflops:.4g} TFLOP/s "
                        f"({self.peak.source}); MFU from here on is relative to it")
        return self.warning if first else None


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated device memory (CUDA) or this process's peak resident set size (CPU)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def format_metrics(r: dict, total_steps: int) -> str:
    valid = f" | valid {r['valid_loss']:.4f}" if r.get("valid_loss") is not None else ""
    return (f"step {r['step']:>5}/{total_steps} | loss {r['loss']:.4f}{valid} | lr {r['lr']:.2e} | "
            f"gnorm {r['grad_norm']:.3f} | {r['tokens_per_s']:,.0f} tok/s | "
            f"{r['tflops_per_device']:.3f} TFLOP/s/dev | MFU {100 * r['mfu']:.1f}% | "
            f"mem {r['peak_mem_bytes'] / 2**30:.2f} GiB | {r['step_time_s']:.3f} s/step"
            + (" | skipped (not applied)" if r.get("skipped") else "")
            # why a step off the log_every grid has a line: the checkpoint saved after it
            + (f" | checkpoint (blocked {r['checkpoint_save_s']:.3f} s)" if r.get("checkpoint_save_s") is not None
               else ""))

"""Per-rank measurements for ``dist-train scale`` and ``dist-train bench train``: step times, time blocked in
communication, time in the batcher, CPU time, peak memory, bytes of parameters and optimizer state held.

The trainer calls (three lines; everything is a no-op unless ``DIST_TRAIN_RANK_STATS=1``, which the
sweep and the bench set for their runs)::

    stats = RankStats.start(run_dir, rank)   # before the loop: wraps torch.distributed's Python calls
    stats.step(dt, data_s)                   # after each optimizer step (data_s: of dt, in the batcher)
    stats.finish(peak_mem_bytes, engine)     # at the end: writes run_dir/rank_stats/rank_<rank>.json

"Communication time" is the wall time this rank's Python thread spends inside a blocking collective or
in ``Work.wait()`` of an async one (ring p2p, Ulysses all-to-all, halo exchange, the loss/count
all-reduces): the *exposed* part, since anything that overlapped with compute finished before the
wait. DDP's bucketed gradient all-reduce runs in C++ inside ``backward()`` and is not seen here.
"CPU time" is the process's CPU seconds per step (all its threads): on a shared machine, wall time minus
blocked communication well above it means the rank was waiting for a core (others' processes), not working.
"Held" bytes count what this rank keeps: its ZeRO partition, its FSDP2 shard, not the global sizes.
"""
from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from .atomic_write import write_text_atomic

ENV = "DIST_TRAIN_RANK_STATS"
_BLOCKING = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all_single",
             "all_to_all", "broadcast", "barrier", "send", "recv", "isend", "irecv", "batch_isend_irecv",
             "gather", "scatter", "reduce")


class _TimedWork:
    """Proxy of a ``torch.distributed.Work`` whose ``wait()`` is timed."""

    def __init__(self, work, timer: "CommTimer"):
        self._work, self._timer = work, timer

    def wait(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self._work.wait(*args, **kwargs)
        finally:
            self._timer.seconds += time.perf_counter() - t0

    def __getattr__(self, name):
        return getattr(self._work, name)


class CommTimer:
    """Accumulates seconds spent blocked in torch.distributed calls made through the module attributes."""

    def __init__(self):
        self.seconds = 0.0
        self._saved: dict = {}

    def _wrap(self, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                out = fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
            if isinstance(out, list):
                return [_TimedWork(w, self) if hasattr(w, "wait") else w for w in out]
            return _TimedWork(out, self) if out is not None and hasattr(out, "wait") else out
        return timed

    def install(self) -> None:
        for name in _BLOCKING:
            fn = getattr(dist, name, None)
            if fn is not None and name not in self._saved:
                self._saved[name] = fn
                setattr(dist, name, self._wrap(fn))
        if "P2POp" not in self._saved:
            # P2POp accepts only the original isend/irecv: hand it the unwrapped function (the batch's
            # works are timed by the wrapped batch_isend_irecv)
            p2p = self._saved["P2POp"] = dist.P2POp
            dist.P2POp = lambda op, *a, **k: p2p(getattr(op, "__wrapped__", op), *a, **k)

    def uninstall(self) -> None:
        for name, fn in self._saved.items():
            setattr(dist, name, fn)
        self._saved.clear()


def held_state_bytes(engine) -> tuple[int, int]:
    """(parameter bytes, optimizer-state bytes) this rank holds, ZeRO partitions and FSDP2 shards (DTensor:
    this rank's local shard, not the global size) included."""
    params = 0
    for p in engine.module.parameters():
        held = getattr(p, "ds_tensor", None)  # ZeRO-3: p.data is empty, the partition lives here
        t = held if held is not None else p.data
        t = t.to_local() if isinstance(t, DTensor) else t
        params += t.numel() * t.element_size()
    seen: set[int] = set()
    optim = 0

    def add(t) -> None:
        nonlocal optim
        t = t.to_local() if isinstance(t, DTensor) else t
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen and t.numel():
            seen.add(t.data_ptr())
            optim += t.numel() * t.element_size()

    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)  # DeepSpeed wraps the torch optimizer
    for st in inner.state.values():
        for v in st.values():
            add(v)
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):  # ZeRO fp32 masters
        for t in getattr(opt, name, None) or []:
            add(t)
    return params, optim


class RankStats:
    def __init__(self, run_dir: Optional[Path], rank: int, timer: Optional[CommTimer]):
        self.run_dir, self.rank, self.timer = run_dir, rank, timer
        self.step_times: list[float] = []
        self.comm_times: list[float] = []
        self.cpu_times: list[float] = []
        self.data_times: list[float] = []
        self._comm_mark = 0.0
        self._cpu_mark = time.process_time()

    @classmethod
    def start(cls, run_dir, rank: int) -> "RankStats":
        if os.environ.get(ENV) != "1":
            return cls(None, rank, None)
        timer = CommTimer()
        timer.install()
        return cls(Path(run_dir), rank, timer)

    def step(self, seconds: float, data_seconds: float) -> None:
        """One optimizer step took ``seconds``, ``data_seconds`` of them in the batcher."""
        if self.timer is None:
            return
        self.step_times.append(float(seconds))
        self.data_times.append(float(data_seconds))
        self.comm_times.append(self.timer.seconds - self._comm_mark)
        self._comm_mark = self.timer.seconds
        cpu = time.process_time()
        self.cpu_times.append(cpu - self._cpu_mark)
        self._cpu_mark = cpu

    def finish(self, peak_mem_bytes: int, engine) -> None:
        """Write the record; ``engine``: the trainer's (its module and optimizer hold the counted state)."""
        if self.timer is None:
            return
        self.timer.uninstall()
        param_bytes, optim_bytes = held_state_bytes(engine)
        out = self.run_dir / "rank_stats"
        out.mkdir(parents=True, exist_ok=True)
        rec = {"rank": self.rank, "step_times_s": self.step_times, "comm_wait_s": self.comm_times,
               "cpu_s": self.cpu_times, "data_s": self.data_times,
               "peak_mem_bytes": int(peak_mem_bytes), "param_bytes": param_bytes, "optim_bytes": optim_bytes,
               "pid": os.getpid()}
        write_text_atomic(out / f"rank_{self.rank}.json", json.dumps(rec))

"""`dist-train bench ckpt`: checkpoint save/load throughput against the raw disk bandwidth measured in the
same run, and the training stall of an async save against a sync save.

What is measured (one process, world 1, model weights only — optimizer state is more tensors of the same
kind and goes through the same path):
* raw write: the same bytes written sequentially to one file in 64 MiB pieces, then fsync; the file is
  rewritten in place (``O_TRUNC``) every repeat, so the kernel reuses the page-cache pages it just freed.
* raw write, new file: the same, but into a new file while the previous one still exists, which is then
  deleted — the page-cache and allocation pattern of a save with ``keep_last=1`` (the old checkpoint may
  only go once the new one is committed). On a VM whose host backs guest memory lazily, a write that needs
  fresh page-cache pages pays for first-touching them (docs/benchmarks/ckpt.md), so this is the like-for-like
  baseline for the save; both ratios are reported.
* raw read: that file read back after dropping its pages from the page cache (posix_fadvise DONTNEED on a
  fsynced file: the kernel drops clean pages; a hypervisor/host cache below the VM may still serve them).
* save (sync): ``CheckpointManager.save`` end to end: DCP planning, raw shard bytes + block checksums
  (``checkpoint.checksum``: XXH3-64) + fsync,
  ``.metadata``, RNG/train-state/manifest files, renames, ``latest``, pruning the previous checkpoint.
* load: page cache dropped for every checkpoint file first; ``load(verify=False)`` reads the shard bytes
  into the model's tensors; ``load(verify=True)`` (what ``resume`` does) also checks every block's checksum
  while reading, plus the sizes and small files — one pass over the data either way.
* checksum alone: the model's bytes hashed in 4 MiB blocks on one thread, in memory, with the current
  algorithm (XXH3-64) and with CRC-32 (what checkpoints used before; still verified): the CPU cost that
  save and verified load add to the raw I/O.
* async: ``save`` return time (= stall: the copy into reused host buffers) vs the sync save time; the
  first async save also allocates the buffers and is reported separately.
Every time is a median over ``--repeats`` runs; each run measures raw and checkpoint I/O back to back and the
"vs raw" ratios are medians of the per-run ratios (the machine's load drifts between runs).

``--engine LAYOUT,…`` measures engine checkpoints instead (FSDP2 × tp, DeepSpeed ZeRO: time, memory and bytes
per rank against the engine's usual save and load, in the same ranks): dist_train/bench/_ckpt_engines.py.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import CheckpointManager, checksum
from ..checkpoint.blockio import BLOCK
from ..config import CheckpointConfig
from . import _ckpt_engines
from ._os_meters import drop_cache
from .cli.ckpt import EngineRun

PIECE = 64 << 20  # bytes per tensor / per raw write


def _raw_write(path: Path, tensors: list) -> float:
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for t in tensors:
            os.write(fd, memoryview(t.numpy()).cast("B"))
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def _raw_write_new(work: Path, i: int, tensors: list) -> float:
    """``_raw_write`` into ``raw_new_<i>.bin`` while ``raw_new_<i-1>.bin`` exists, then delete that one (timed)."""
    t0 = time.perf_counter()
    _raw_write(work / f"raw_new_{i}.bin", tensors)
    (work / f"raw_new_{i - 1}.bin").unlink(missing_ok=True)
    return time.perf_counter() - t0


def _hash_time(tensors: list, algorithm: str) -> float:
    """Seconds to hash ``tensors``' bytes in ``BLOCK``-sized blocks with ``algorithm`` on this thread."""
    t0 = time.perf_counter()
    for t in tensors:
        view = memoryview(t.numpy()).cast("B")
        for i in range(0, len(view), BLOCK):
            checksum.digest(view[i:i + BLOCK], algorithm)
    return time.perf_counter() - t0


def _raw_read(path: Path) -> float:
    drop_cache(path)
    buf = bytearray(PIECE)
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    return time.perf_counter() - t0


def run(args: argparse.Namespace, checked: "int | EngineRun") -> int:
    """``checked``: what dist_train.bench.cli.ckpt.check returned — the layouts of ``--engine`` (measured by
    ``_ckpt_engines``) or the model state's size in bytes from ``--size-gb``."""
    if isinstance(checked, EngineRun):
        return _ckpt_engines.run(args, checked)
    nbytes = checked
    base = Path(args.dir)
    n_full, rest = divmod(nbytes // 4, PIECE // 4)
    model = nn.Module()
    sizes = [PIECE // 4] * n_full + ([rest] if rest else [])
    model.w = nn.ParameterList(nn.Parameter(torch.empty(n).normal_()) for n in sizes)
    tensors = [p.data for p in model.w]
    gib = sum(t.numel() * 4 for t in tensors) / 2**30

    work = Path(tempfile.mkdtemp(prefix="dt_ckpt_bench_", dir=base))
    res: dict = {"size_gib": gib, "tensors": len(tensors), "dir": str(base.resolve()), "repeats": args.repeats,
                 "io_threads": args.io_threads}
    try:
        raw = work / "raw.bin"

        def manager(async_save: bool) -> "CheckpointManager":
            return CheckpointManager(CheckpointConfig(keep_last=1, resume="none", at_end=False, async_save=async_save,
                                                      dir=str(work / "ckpt")), run_dir=work,
                                     config={"bench": "ckpt"}, layout={"world_size": 1},
                                     io_threads=args.io_threads)

        # each repeat measures the raw writes and the save, then raw read, load and verified load, back to
        # back, so every ratio compares the paths under (nearly) the same machine load; the order within a
        # group rotates between repeats (the second of two back-to-back GiB writes pays for the first's
        # write-back on a virtual disk); medians over repeats are reported
        step, sync = 0, manager(False)
        t: dict[str, list[float]] = {k: [] for k in ("raw_write", "raw_write_new", "save", "raw_read", "load",
                                                     "load_verify", "hash_xxh3_64", "hash_crc32")}

        def timed(fn) -> float:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0

        def load(verify: bool) -> None:
            drop_cache(ckpt)
            t["load_verify" if verify else "load"].append(timed(lambda: sync.load(ckpt, model, verify=verify)))

        for i in range(args.repeats):
            step += 1
            ckpt = work / "ckpt" / f"step_{step}"
            writes = [lambda: t["raw_write"].append(_raw_write(raw, tensors)),
                      lambda: t["save"].append(timed(lambda: sync.save(step, model))),
                      lambda: t["raw_write_new"].append(_raw_write_new(work, i, tensors))]
            reads = [lambda: t["raw_read"].append(_raw_read(raw)), lambda: load(False), lambda: load(True)]
            for fn in writes[i % 3:] + writes[:i % 3] + (reads if i % 2 == 0 else reads[::-1]):
                fn()
            for algorithm in ("xxh3_64", "crc32"):
                t[f"hash_{algorithm}"].append(_hash_time(tensors, algorithm))
        raw.unlink()
        (work / f"raw_new_{args.repeats - 1}.bin").unlink()
        sync.close()
        res["raw_write_s"], res["raw_read_s"] = statistics.median(t["raw_write"]), statistics.median(t["raw_read"])
        res["raw_write_new_s"] = statistics.median(t["raw_write_new"])
        res["save_sync_s"], res["load_s"] = statistics.median(t["save"]), statistics.median(t["load"])
        res["load_verify_s"] = statistics.median(t["load_verify"])
        for algorithm in ("xxh3_64", "crc32"):
            res[f"hash_{algorithm}_s"] = statistics.median(t[f"hash_{algorithm}"])
        res["per_repeat_s"] = t
        pairs = {"save_vs_raw": ("raw_write", "save"), "save_vs_raw_new": ("raw_write_new", "save"),
                 "load_vs_raw": ("raw_read", "load"),
                 "load_verify_vs_raw": ("raw_read", "load_verify")}
        for key, (ref, ours) in pairs.items():  # median of the per-repeat ratios
            res[key] = statistics.median(r / o for r, o in zip(t[ref], t[ours]))

        asyn = manager(True)
        stalls, writes = [], []
        for i in range(args.repeats + 1):  # the first one allocates the host buffers
            step += 1
            asyn.save(step, model)
            asyn.wait()
            if i == 0:
                res["async_first_stall_s"] = asyn.last_stall_s
            else:
                stalls.append(asyn.last_stall_s)
                writes.append(asyn.last_write_s)
        asyn.close()
        res["async_stall_s"], res["async_write_s"] = statistics.median(stalls), statistics.median(writes)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    gb = res["size_gib"]
    res["raw_write_gibps"] = gb / res["raw_write_s"]
    res["raw_read_gibps"] = gb / res["raw_read_s"]
    res["async_stall_vs_sync"] = res["async_stall_s"] / res["save_sync_s"]

    print(f"ckpt bench: {gb:.2f} GiB model state ({len(tensors)} fp32 tensors) in {res['dir']}, "
          f"median of {args.repeats}, {args.io_threads} I/O thread(s)")
    print(f"  {'':30} {'time s':>8} {'GiB/s':>7} {'vs raw':>7}   (vs raw: median of per-repeat ratios)")
    rows = [("raw write + fsync (rewrite)", res["raw_write_s"], None),
            ("raw write, new file (+ rm old)", res["raw_write_new_s"], None),
            ("raw read (page cache dropped)", res["raw_read_s"], None),
            ("save, sync (hash+fsync+commit)", res["save_sync_s"], res["save_vs_raw"]),
            ("  same save vs new-file write", res["save_sync_s"], res["save_vs_raw_new"]),
            ("load, no verify", res["load_s"], res["load_vs_raw"]),
            ("load, verified while reading", res["load_verify_s"], res["load_verify_vs_raw"]),
            ("checksum xxh3_64, 1 thread", res["hash_xxh3_64_s"], None),
            ("checksum crc32 (old), 1 thread", res["hash_crc32_s"], None)]
    for name, t, ratio in rows:
        print(f"  {name:30} {t:8.3f} {gb / t:7.2f} {'' if ratio is None else f'{ratio:6.0%}':>7}")
    print(f"  async save: stall {res['async_stall_s']:.3f} s = {res['async_stall_vs_sync']:.1%} of the sync save "
          f"(first save, allocating buffers: {res['async_first_stall_s']:.3f} s); background write "
          f"{res['async_write_s']:.3f} s")
    print("  targets: save and load >= 70% of raw; async stall <= 10% of sync save")
    print("  (save 'vs raw' is against the in-place rewrite, the next row against a new file written while the "
          "previous one exists, as a save must)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0

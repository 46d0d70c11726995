"""`dist-train bench ckpt`: checkpoint save/load throughput against the raw disk bandwidth measured in the
same run, and the training stall of an async save against a sync save.

What is measured (one process, world 1, model weights only — optimizer state is more tensors of the same
kind and goes through the same path):
* raw write: the same bytes written sequentially to one file in 64 MiB pieces, then fsync.
* raw read: that file read back after dropping its pages from the page cache (posix_fadvise DONTNEED on a
  fsynced file: the kernel drops clean pages; a hypervisor/host cache below the VM may still serve them).
* save (sync): ``CheckpointManager.save`` end to end: DCP shards + CRC-32 + fsync + manifest + rename.
* load: page cache dropped for every checkpoint file first; ``load(verify=True)`` reads every file twice
  (checksum pass, then DCP load — the second from cache), ``verify=False`` once.
* async: ``save`` return time (= stall: the copy into reused host buffers) vs the sync save time; the
  first async save also allocates the buffers and is reported separately.
Every number is a median over ``--repeats`` runs.
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

HELP = "checkpoint save/load throughput vs raw disk bandwidth; async save stall vs sync save"

PIECE = 64 << 20  # bytes per tensor / per raw write


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("examples:\n  dist-train bench ckpt --size-gb 1\n"
                     "  dist-train bench ckpt --size-gb 2 --dir /scratch --repeats 3 --json ckpt.json")
    parser.add_argument("--size-gb", type=float, default=1.0, help="model state size in GiB (default 1)")
    parser.add_argument("--dir", default=".", help="directory on the disk to measure (default: current dir)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement; medians are reported")
    parser.add_argument("--io-threads", type=int, default=1, help="DCP writer threads per rank (default 1)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")


def _drop_cache(path: Path) -> None:
    """Ask the kernel to drop the (clean, fsynced) pages of ``path`` or of every file under it."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


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


def _raw_read(path: Path) -> float:
    _drop_cache(path)
    buf = bytearray(PIECE)
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    return time.perf_counter() - t0


def run(args: argparse.Namespace) -> int:
    import torch
    from torch import nn

    from dist_train.checkpoint import CheckpointManager
    from dist_train.config import CheckpointConfig

    if not args.size_gb > 0:
        raise ValueError(f"--size-gb = {args.size_gb}: must be a positive number of GiB, e.g. --size-gb 1")
    if args.repeats < 1:
        raise ValueError(f"--repeats = {args.repeats}: must be >= 1")
    base = Path(args.dir)
    if not base.is_dir():
        raise ValueError(f"--dir = {args.dir}: not a directory")
    nbytes = int(args.size_gb * (1 << 30))
    free = shutil.disk_usage(base).free
    if free < 3.2 * nbytes:  # raw file + up to two checkpoints (keep_last=1 plus the one being written)
        raise ValueError(f"--size-gb = {args.size_gb}: needs ~{3.2 * nbytes / 2**30:.1f} GiB free in {base}, "
                         f"{free / 2**30:.1f} GiB available")

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
        w_times, r_times = [], []
        for _ in range(args.repeats):
            w_times.append(_raw_write(raw, tensors))
            r_times.append(_raw_read(raw))
        raw.unlink()
        res["raw_write_s"], res["raw_read_s"] = statistics.median(w_times), statistics.median(r_times)

        def manager(async_save: bool) -> "CheckpointManager":
            return CheckpointManager(CheckpointConfig(keep_last=1, resume="none", at_end=False, async_save=async_save,
                                                      dir=str(work / "ckpt")), run_dir=work,
                                     config={"bench": "ckpt"}, layout={"world_size": 1},
                                     io_threads=args.io_threads)

        step = 0
        sync, sync_times = manager(False), []
        for _ in range(args.repeats):
            step += 1
            t0 = time.perf_counter()
            sync.save(step, model)
            sync_times.append(time.perf_counter() - t0)
        res["save_sync_s"] = statistics.median(sync_times)

        ckpt = work / "ckpt" / f"step_{step}"
        load_v, load_nv = [], []
        for _ in range(args.repeats):
            _drop_cache(ckpt)
            t0 = time.perf_counter()
            sync.load(ckpt, model, verify=True)
            load_v.append(time.perf_counter() - t0)
            _drop_cache(ckpt)
            t0 = time.perf_counter()
            sync.load(ckpt, model, verify=False)
            load_nv.append(time.perf_counter() - t0)
        res["load_verify_s"], res["load_s"] = statistics.median(load_v), statistics.median(load_nv)
        sync.close()

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
    res["save_vs_raw"] = res["raw_write_s"] / res["save_sync_s"]
    res["load_vs_raw"] = res["raw_read_s"] / res["load_s"]
    res["load_verify_vs_raw"] = res["raw_read_s"] / res["load_verify_s"]
    res["async_stall_vs_sync"] = res["async_stall_s"] / res["save_sync_s"]

    print(f"ckpt bench: {gb:.2f} GiB model state ({len(tensors)} fp32 tensors) in {res['dir']}, "
          f"median of {args.repeats}")
    print(f"  {'':30} {'time s':>8} {'GiB/s':>7} {'vs raw':>7}")
    rows = [("raw write + fsync", res["raw_write_s"], None), ("raw read (page cache dropped)", res["raw_read_s"], None),
            ("save, sync (DCP+CRC+fsync+commit)", res["save_sync_s"], res["save_vs_raw"]),
            ("load, no verify", res["load_s"], res["load_vs_raw"]),
            ("load, verify + load", res["load_verify_s"], res["load_verify_vs_raw"])]
    for name, t, ratio in rows:
        print(f"  {name:30} {t:8.3f} {gb / t:7.2f} {'' if ratio is None else f'{ratio:6.0%}':>7}")
    print(f"  async save: stall {res['async_stall_s']:.3f} s = {res['async_stall_vs_sync']:.1%} of the sync save "
          f"(first save, allocating buffers: {res['async_first_stall_s']:.3f} s); background write "
          f"{res['async_write_s']:.3f} s")
    print("  targets: save and load >= 70% of raw; async stall <= 10% of sync save")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0

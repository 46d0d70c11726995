"""`dist-train bench ckpt --engine LAYOUT[,LAYOUT…]`: per rank, the save and load time, peak extra CPU memory and
bytes written of our gather-free engine checkpoints against what a user of that engine would otherwise run, in
the same ranks, alternating.

Per layout (``cli.ckpt.LAYOUTS``: FSDP2 dp2 × tp2, FSDP2 dp2, DeepSpeed ZeRO-1/2/3 dp2, ZeRO-2 with the optimizer
offloaded to the host) gloo ranks are spawned fresh on CPU (one torch thread each), build a GPT of ``--d-model``,
``--layers`` and ``--vocab`` (odd: tp pads it) under the layout's engine and take one AdamW step, so every state
tensor exists. Then ``--repeats`` rounds, each saving and loading with both paths (which goes first alternates):

* **ours**: ``CheckpointManager.save`` (sync) and ``load(verify=True)`` (what a resume runs; ``--no-verify``:
  without the checksums and the collective manifest check, to see their share): each rank writes and
  reads its own shards' blocks of the tp=1 tensors (checkpoint/rectangles.py, ``DeepSpeedStateAdapter``) with
  checksums, fsync and the manifest — a checkpoint any layout resumes.
* **baseline**, FSDP2: torch DCP ``get_state_dict`` / ``set_state_dict`` with ``full_state_dict=True``: every
  rank gathers the full tp-local weights and AdamW moments (all-gathers over dp), dp rank 0 of each tp rank
  ``torch.save``\\ s them to one file (fsynced, as ours are); a load ``torch.load``\\ s that file on every rank and
  ``set_state_dict`` keeps its shard. (``cpu_offload=True`` would keep the gather on global rank 0 only, which
  under tp drops the other tp ranks' tensors.)
* **baseline**, DeepSpeed: its own ``save_checkpoint`` / ``load_checkpoint`` (each rank's partition of the fp32
  weights and optimizer state, plus rank 0's module weights; its files fsynced after it returns). It is sharded,
  not a gather: the comparison is cost, and only ours resumes under another layout.
* **baseline**, FSDP2 with ``--fsdp-baseline dcp``: torch DCP's own sharded ``dcp.save`` / ``dcp.load`` of
  ``get_state_dict`` (each rank its DTensor shards, no gather; fsynced as ours are), what ours is built on
  without its checksums, tp=1 blocks and manifest check: the cost of those.

Before the timed rounds, one untimed warm-up round of both paths (their first use: process groups' first
collectives, DCP's first plans), then what the ranks hold is collected and frozen (``gc.freeze``), as a dist-train
rank's import is (``cli.import_command_module``). Before every timed call each rank runs a cyclic garbage collection,
untimed: otherwise the cyclic garbage a path leaves (thousands of objects per call: DCP's plans and metadata) is
freed by a full collection that lands in whichever call comes next, and one rank's collection (0.2-0.4 s of an
unfrozen heap) stalls every rank at its next collective: at dp2 x tp2 ours loaded in 0.21-0.24 s when it went
first in its round and in 0.36-0.41 s right after the baseline (docs/benchmarks/ckpt_engines.md). The time the
collector runs inside each call is recorded (``save_gc_s``, ``load_gc_s``), and the medians are also reported by
the path's place in its round.
Before every load each rank's state is zeroed and the page cache of the checkpoint dropped; after it, every
weight, moment and working copy must equal what was saved (both paths: a load that did nothing fails the run).
Measured per rank and call: wall time (each rank's own; the row reports the slowest rank: the checkpoint is done
when the last rank is), the resident-set peak above the call's start (every allocation, tensors or not;
``_os_meters``), the bytes it sent to storage (``/proc/self/io``). One more save and load per path, untimed, runs
under the tensor meter of the checkpoint memory tests (``bench.attention.peak_tensor_bytes``: CPU tensor bytes
allocated during the call at their peak). Memory is also given as a fraction of the model's full fp32 state
(12 B per parameter: weights and two AdamW moments), what a full gather holds.
"""
from __future__ import annotations

import argparse
import csv
import gc
import json
import math
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from ..checkpoint.adapters import DeepSpeedStateAdapter
from ..checkpoint import manifest as mf
from ..checkpoint.manager import CheckpointManager
from ..config import Config, config_from_dict
from ..engines import build_engine
from ..engines.deepspeed import DeepSpeedEngine
from ..mesh import build_mesh
from ..models.gpt import build_gpt
from ..spawn import run_ranks
from ._os_meters import drop_cache, fsync_files, peak_resident_growth, storage_write_bytes
from .attention import check_memory_meter, peak_tensor_bytes
from .cli.ckpt import LAYOUTS, EngineRun, engine_config, engine_model

PATHS = ("ours", "baseline")
METRICS = ("save_s", "load_s", "save_gc_s", "load_gc_s", "save_rss_bytes", "load_rss_bytes", "save_written_bytes",
           "load_written_bytes")


def one_step_gpt_engine(parallel: dict, rank: int, world: int, model: Optional[dict] = None):
    """``(cfg, engine)``: a GPT (:func:`~.cli.ckpt.engine_config`: ``model``'s sizes, default the checkpoint memory
    tests' model, an odd vocabulary that tp pads) built under ``parallel`` on CPU, after one training step on
    16 tokens, so the optimizer has its state — what the checkpoint memory tests and this bench save and load (one
    process of ``world``, this ``rank``)."""
    cfg = config_from_dict(engine_config(parallel, model))
    mesh = build_mesh(cfg.parallel, world)
    engine = build_engine(cfg, build_gpt(cfg, mesh, torch.device("cpu")).train(), mesh, None)
    vocab = cfg.model.vocab_size
    tokens = torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(rank))
    engine.train_step([{"tokens": tokens, "labels": tokens, "positions": torch.arange(16)}], 32.0)
    return cfg, engine


def engine_state_tensors(engine) -> list[torch.Tensor]:
    """This rank's live state that a checkpoint of ``engine`` holds: FSDP2 — its weight shards and their AdamW
    moment shards (the DTensors' local tensors); DeepSpeed ZeRO — its fp32 partitions, their AdamW moments and the
    forward's working copies (ZeRO-3: their partitions)."""
    if isinstance(engine, DeepSpeedEngine):
        adapter = DeepSpeedStateAdapter(engine.optimizer)
        flats = [g.flat for g in adapter.groups]
        moments = [v for f in flats for v in adapter._inner.state[f].values() if v.shape == f.shape]
        working = [p.ds_tensor if adapter.zero3 else p for p in engine.module.parameters()]
        return [t.data for t in flats + moments + working]
    moments = [v for st in engine.optimizer.state.values() for v in st.values() if isinstance(v, DTensor)]
    return [t.to_local() for t in list(engine.module.parameters()) + moments]


class _Ours:
    """CheckpointManager, as the trainer runs it (sync save; load verified, as resume does)."""
    describe = "CheckpointManager: each rank's own shard blocks of the tp=1 tensors, checksums, fsync, manifest"

    def __init__(self, cfg: Config, engine, root: Path, rank: int, world: int, io_threads: int, verify: bool):
        self.engine, self.verify = engine, verify
        # keep every step: the pruning of an old one inside save would be a cost the baseline does not pay
        ck = replace(cfg.checkpoint, keep_last=1 << 20, dir=str(root / "ours"))
        self.ckpt = CheckpointManager(ck, run_dir=root, rank=rank, world_size=world, io_threads=io_threads,
                                      **engine.checkpoint_kwargs())

    def dir(self, step: int) -> Path:
        return self.ckpt.root / f"step_{step}"

    def save(self, step: int) -> None:
        if not self.ckpt.save(step, self.engine.module, self.engine.optimizer):
            raise RuntimeError(f"bench ckpt: CheckpointManager.save({step}) saved nothing")

    def load(self, step: int) -> None:
        self.ckpt.load(self.dir(step), self.engine.module, self.engine.optimizer, verify=self.verify)


class _FullStateDict:
    """FSDP2: torch DCP's full state dict, gathered on every rank, saved by dp rank 0 of each tp rank."""
    describe = ("torch DCP get_state_dict/set_state_dict(full_state_dict=True): full tp-local state gathered on "
                "every rank, torch.save by dp rank 0 per tp rank (+fsync), torch.load on every rank")
    OPTIONS = StateDictOptions(full_state_dict=True)

    def __init__(self, engine, root: Path):
        self.engine, self.root = engine, root / "full_state_dict"
        mesh = engine.mesh
        self.writer = mesh.coord("dp") == 0
        self.name = f"tp{mesh.coord('tp')}.pt"

    def dir(self, step: int) -> Path:
        return self.root / f"step_{step}"

    def save(self, step: int) -> None:
        model_sd, optim_sd = get_state_dict(self.engine.module, self.engine.optimizer, options=self.OPTIONS)
        if self.writer:
            self.dir(step).mkdir(parents=True, exist_ok=True)
            path = self.dir(step) / self.name
            torch.save({"model": model_sd, "optim": optim_sd}, path)
            fsync_files(path)
        del model_sd, optim_sd
        dist.barrier()

    def load(self, step: int) -> None:
        saved = torch.load(self.dir(step) / self.name, weights_only=True)
        set_state_dict(self.engine.module, self.engine.optimizer, model_state_dict=saved["model"],
                       optim_state_dict=saved["optim"], options=self.OPTIONS)


class _ShardedDcp:
    """FSDP2: torch DCP's own sharded checkpoint, what ours is built on, without what ours adds. The tp shards are
    plain tensors under one name on every tp rank (DCP would keep one tp rank's and drop the others'), so each tp
    rank saves its own DCP checkpoint over its FSDP2 shard group, as a user of this tp writes it."""
    describe = ("torch DCP get_state_dict + dcp.save / dcp.load + set_state_dict per tp rank over its FSDP2 shard "
                "group (sharded, no gather; +fsync; no checksums, no tp=1 blocks, no manifest check)")

    def __init__(self, engine, root: Path):
        self.engine, self.root = engine, root / "sharded_dcp"
        self.group, self.name = engine.mesh.grad_group, f"tp{engine.mesh.coord('tp')}"

    def dir(self, step: int) -> Path:
        return self.root / f"step_{step}"

    def save(self, step: int) -> None:
        model_sd, optim_sd = get_state_dict(self.engine.module, self.engine.optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(self.dir(step) / self.name),
                 process_group=self.group)
        dist.barrier()  # every rank's files are written: each fsyncs them all, as ours are fsynced
        fsync_files(self.dir(step))
        dist.barrier()

    def load(self, step: int) -> None:
        model_sd, optim_sd = get_state_dict(self.engine.module, self.engine.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(self.dir(step) / self.name), process_group=self.group)
        set_state_dict(self.engine.module, self.engine.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])


class _DeepSpeedNative:
    """DeepSpeed's own checkpoint: each rank's ZeRO partition files, rank 0's module weights."""
    describe = "DeepSpeed engine.save_checkpoint/load_checkpoint (its per-rank partition files; +fsync)"

    def __init__(self, engine, root: Path):
        self.ds, self.root = engine.engine, root / "deepspeed"

    def dir(self, step: int) -> Path:
        return self.root / f"step_{step}"

    def save(self, step: int) -> None:
        self.ds.save_checkpoint(str(self.root), tag=f"step_{step}")
        dist.barrier()  # every rank's files are written: each fsyncs them all (a clean file's fsync is cheap)
        fsync_files(self.dir(step))
        dist.barrier()

    def load(self, step: int) -> None:
        path, _ = self.ds.load_checkpoint(str(self.root), tag=f"step_{step}", load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"bench ckpt: DeepSpeed load_checkpoint found nothing in {self.dir(step)}")


#: --fsdp-baseline -> the FSDP2 layouts' baseline
FSDP_BASELINE = {"full": _FullStateDict, "dcp": _ShardedDcp}


def _baseline_class(parallel: dict, fsdp_baseline: str) -> type:
    return _DeepSpeedNative if "zero_stage" in parallel else FSDP_BASELINE[fsdp_baseline]


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class GcClock:
    """Seconds the cyclic garbage collector ran in this process while the ``with`` block ran (``gc.callbacks``)::

        with GcClock() as clock:
            fn()
        clock.seconds
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self._start: Optional[float] = None

    def _tick(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        elif self._start is not None:
            self.seconds += time.perf_counter() - self._start
            self._start = None

    def __enter__(self) -> "GcClock":
        gc.callbacks.append(self._tick)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._tick)


def _cycle(path, step: int, rank: int, engine, reference: list[torch.Tensor], meter: Callable, peak: str) -> dict:
    """One save and load of ``path`` at ``step``, each call under ``meter(fn) -> (result, bytes)`` (reported as
    ``save_<peak>``, ``load_<peak>``) and after an untimed garbage collection (the module doc); the engine's
    state zeroed and the page cache dropped in between; asserts the load restored ``reference`` (listed afresh:
    DeepSpeed's own load replaces the optimizer's state tensors instead of copying into them)."""
    out = {}
    for phase in ("save", "load"):
        if phase == "load":
            if rank == 0:
                drop_cache(path.dir(step))
            with torch.no_grad():
                for t in engine_state_tensors(engine):
                    t.zero_()
        gc.collect()
        dist.barrier()
        written = storage_write_bytes()
        with GcClock() as clock:
            t0 = time.perf_counter()
            _, out[f"{phase}_{peak}"] = meter(lambda: getattr(path, phase)(step))
            out[f"{phase}_s"] = time.perf_counter() - t0
        out[f"{phase}_gc_s"] = clock.seconds
        out[f"{phase}_written_bytes"] = storage_write_bytes() - written
    dist.barrier()
    state = engine_state_tensors(engine)
    if rank == 0:
        out["dir_bytes"] = _dir_bytes(path.dir(step))
    bad = [i for i, (a, b) in enumerate(zip(state, reference)) if not torch.equal(a, b)]
    if bad:
        raise AssertionError(f"bench ckpt: rank {rank}: {type(path).__name__} load at step {step} did not restore "
                             f"{len(bad)} of {len(state)} state tensors (first: #{bad[0]}, shape "
                             f"{tuple(state[bad[0]].shape)})")
    return out


def _rank(rank: int, world: int, parallel: dict, model: dict, root: str, repeats: int, io_threads: int,
          verify: bool, fsdp_baseline: str = "full") -> dict:
    """One rank of one layout (run by dist_train.spawn.run_ranks): one untimed warm-up round, ``repeats`` timed
    rounds of both paths (the order alternating; each run records whether its path went ``first``), then one round
    under the tensor meter."""
    check_memory_meter()
    cfg, engine = one_step_gpt_engine(parallel, rank, world, model)
    base = Path(root)
    paths = {"ours": _Ours(cfg, engine, base, rank, world, io_threads, verify),
             "baseline": _baseline_class(parallel, fsdp_baseline)(engine, base)}
    state = engine_state_tensors(engine)
    reference = [t.clone() for t in state]
    state_bytes = sum(t.numel() * t.element_size() for t in state)
    del state
    for name in PATHS:  # warm-up at step 0, untimed
        _cycle(paths[name], 0, rank, engine, reference, peak_resident_growth, "rss_bytes")
    gc.collect()
    gc.freeze()
    runs: dict = {name: [] for name in PATHS}
    for i in range(repeats):
        order = PATHS if i % 2 == 0 else PATHS[::-1]
        for name in order:
            runs[name].append({**_cycle(paths[name], i + 1, rank, engine, reference, peak_resident_growth,
                                        "rss_bytes"), "first": name == order[0]})
    tensor_peaks = {name: _cycle(paths[name], repeats + 1, rank, engine, reference, peak_tensor_bytes,
                         "tensor_peak_bytes")
                    for name in PATHS}
    paths["ours"].ckpt.close()
    # the model's parameters, counted in the tp=1 layout the checkpoint's manifest lists
    tensors = mf.tensor_table(mf.read_manifest(paths["ours"].dir(repeats + 1)))
    numel = sum(math.prod(t["shape"]) for t in tensors if t["name"].startswith("model."))
    return {"runs": runs, "tensor_peaks": tensor_peaks, "numel": numel,
            "state_bytes": state_bytes}


def _row(layout: str, name: str, per_rank: list[dict], full_state: int, describe: str) -> dict:
    """One path of one layout: per-rank medians over the repeats, and the row's figures (times and memory: the
    largest rank; bytes: the sum over ranks)."""
    ranks = []
    for r, res in enumerate(per_rank):
        runs = res["runs"][name]
        med = {m: statistics.median(run[m] for run in runs) for m in METRICS}
        peaks = res["tensor_peaks"][name]
        ranks.append({"rank": r, **med, "save_tensor_peak_bytes": peaks["save_tensor_peak_bytes"],
                      "load_tensor_peak_bytes": peaks["load_tensor_peak_bytes"], "state_bytes": res["state_bytes"],
                      **{f"{m}_runs": [run[m] for run in runs] for m in ("save_s", "load_s", "save_gc_s", "load_gc_s")},
                      "first_runs": [run["first"] for run in runs]})
    worst = ("save_s", "load_s", "save_gc_s", "load_gc_s", "save_rss_bytes", "load_rss_bytes",
             "save_tensor_peak_bytes", "load_tensor_peak_bytes")
    row = {"layout": layout, "path": name, "describe": describe, "full_state_bytes": full_state,
           **{m: max(r[m] for r in ranks) for m in worst},
           "written_bytes": sum(r["save_written_bytes"] for r in ranks),
           "dir_bytes": per_rank[0]["runs"][name][-1]["dir_bytes"], "ranks": ranks}
    for m in ("save_tensor_peak_bytes", "load_tensor_peak_bytes", "save_rss_bytes", "load_rss_bytes"):
        row[m.replace("_bytes", "_of_full_state")] = row[m] / full_state
    for phase in ("save_s", "load_s"):  # by the path's place in its round (None: it never had that place)
        times, first = _slowest(row, phase), ranks[0]["first_runs"]
        for place, went_first in (("first", True), ("second", False)):
            mine = [t for t, f in zip(times, first) if f == went_first]
            row[f"{phase}_{place}"] = statistics.median(mine) if mine else None
    return row


def _slowest(row: dict, phase: str) -> list[float]:
    """Per repeat, the time of ``phase`` (``save_s``/``load_s``) on the row's slowest rank in that repeat."""
    per_rank = [r[f"{phase}_runs"] for r in row["ranks"]]
    return [max(times) for times in zip(*per_rank)]


RATIOS = ("save_s", "load_s", "save_tensor_peak_bytes", "load_tensor_peak_bytes", "save_rss_bytes",
          "load_rss_bytes", "written_bytes")


#: a resident-set growth of ours below this is no denominator: the resident set moves in pages and the allocator
#: reuses what it freed earlier (a 40 KiB growth against the baseline's 86 MiB would read as 2000x). The tensor
#: meter counts every allocation to the byte: its ratios stand
MEMORY_FLOOR = 1 << 20


def _ratios(ours: dict, base: dict) -> dict:
    """baseline / ours for every figure (> 1: ours is faster / smaller; None for a resident-set growth of ours
    under :data:`MEMORY_FLOOR`, or a zero), and the per-repeat time ratios' medians on the slowest rank (the round's
    two paths ran back to back, under nearly the same load)."""
    out = {m: None if (m.endswith("_rss_bytes") and ours[m] < MEMORY_FLOOR) or not ours[m] else base[m] / ours[m]
           for m in RATIOS}
    for phase in ("save_s", "load_s"):
        out[f"{phase}_pair_median"] = statistics.median(b / o for o, b in zip(_slowest(ours, phase),
                                                                              _slowest(base, phase)))
    return out


def _by_place(ours: dict, base: dict) -> str:
    """One line: each path's median time (slowest rank) when it went first and when it went second in its round,
    and the collector's time inside its calls (the median over the repeats, largest rank)."""
    def seconds(v: Optional[float]) -> str:
        return "—" if v is None else f"{v:.3f}"

    parts = []
    for phase in ("save", "load"):
        each = [f"{row['path']} {seconds(row[f'{phase}_s_first'])} / {seconds(row[f'{phase}_s_second'])}"
                for row in (ours, base)]
        parts.append(f"{phase} " + ", ".join(each))
    gc_ms = ", ".join(f"{row['path']} {1e3 * row['save_gc_s']:.0f} / {1e3 * row['load_gc_s']:.0f}"
                      for row in (ours, base))
    return f"s when first / second in the round: {'; '.join(parts)}; gc ms in save / load: {gc_ms}"


def _mib(b: float) -> str:
    return f"{b / 2**20:9.2f}"


def _print_table(rows: list[dict], ratios: dict) -> None:
    print(f"{'layout':18} {'path':9} {'save s':>7} {'load s':>7} {'save tens MiB':>13} {'load tens MiB':>13} "
          f"{'save RSS+ MiB':>13} {'load RSS+ MiB':>13} {'written MiB':>11}  (per rank: slowest / largest; "
          "written: all ranks)")
    for row in rows:
        print(f"{row['layout']:18} {row['path']:9} {row['save_s']:7.3f} {row['load_s']:7.3f} "
              f"{_mib(row['save_tensor_peak_bytes']):>13} {_mib(row['load_tensor_peak_bytes']):>13} "
              f"{_mib(row['save_rss_bytes']):>13} {_mib(row['load_rss_bytes']):>13} {_mib(row['written_bytes']):>11}")
        if row["path"] == "baseline":
            r = {m: "—" if v is None else f"{v:.2f}x" for m, v in ratios[row["layout"]].items()}
            print(f"{row['layout']:18} {'base/ours':9} {r['save_s']:>7} {r['load_s']:>7} "
                  f"{r['save_tensor_peak_bytes']:>13} {r['load_tensor_peak_bytes']:>13} "
                  f"{r['save_rss_bytes']:>13} {r['load_rss_bytes']:>13} {r['written_bytes']:>11}")


CSV_COLUMNS = ("layout", "path", "rank", "save_s", "load_s", "save_gc_s", "load_gc_s", "save_tensor_peak_bytes",
               "load_tensor_peak_bytes", "save_rss_bytes", "load_rss_bytes", "save_written_bytes", "load_written_bytes",
               "state_bytes")


def _write_csv(rows: list[dict], path: str) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for row in rows:
            for r in row["ranks"]:
                w.writerow({"layout": row["layout"], "path": row["path"], **r})


def plot(record: dict, path: str) -> None:
    """Left: save and load time (slowest rank) per layout, ours against the baseline; right: the peak extra
    memory of each (tensor meter, resident-set growth as a marker) as a fraction of the model's full fp32 state."""
    import matplotlib  # here: the ranks import this module, and an unused matplotlib would inflate their memory

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = record["rows"]
    layouts = list(dict.fromkeys(r["layout"] for r in rows))
    by = {(r["layout"], r["path"]): r for r in rows}
    colours = {"ours": "tab:blue", "baseline": "tab:orange"}
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.6))
    width = 0.2
    for k, layout in enumerate(layouts):
        for j, (name, phase) in enumerate((("ours", "save"), ("baseline", "save"), ("ours", "load"),
                                           ("baseline", "load"))):
            x = k + (j - 1.5) * width
            row = by[(layout, name)]
            label = f"{name} {phase}" if k == 0 else None
            left.bar(x, row[f"{phase}_s"], width, color=colours[name], alpha=1.0 if phase == "save" else 0.55,
                     hatch=None if phase == "save" else "//", edgecolor="white", label=label)
            right.bar(x, row[f"{phase}_tensor_peak_of_full_state"], width, color=colours[name],
                      alpha=1.0 if phase == "save" else 0.55, hatch=None if phase == "save" else "//",
                      edgecolor="white", label=label)
            right.plot(x, row[f"{phase}_rss_of_full_state"], "k_", ms=14, mew=2,
                       label="resident-set growth" if k == 0 and j == 0 else None)
    for ax in (left, right):
        ax.set_xticks(range(len(layouts)), layouts, fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    left.set_ylabel("seconds (slowest rank, median of repeats)")
    against = ("torch DCP's sharded checkpoint (FSDP2)" if record.get("fsdp_baseline") == "dcp"
               else "the engine's usual checkpoint")
    left.set_title(f"save and load time: ours vs {against}", fontsize=10)
    right.set_ylabel("peak extra memory / full fp32 state (12 B/param)")
    right.set_title("peak extra CPU memory per rank (bars: tensors; —: resident set)", fontsize=10)
    fig.suptitle(f"bench ckpt --engine: GPT {record['model']}, {record['repeats']} repeats, FSDP2 baseline "
                 f"{record.get('fsdp_baseline', 'full')}, load average "
                 f"{record['load_avg'][0]:.1f}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace, choice: EngineRun) -> int:
    """Every layout of ``choice`` in its own fresh ranks; the table, and ``--json``/``--csv``/``--png``."""
    model = engine_model(args)
    rows, ratios = [], {}
    load_avg = os.getloadavg()
    for layout in choice.layouts:
        parallel, world = LAYOUTS[layout]
        work = Path(tempfile.mkdtemp(prefix="dt_ckpt_engine_bench_", dir=args.dir))
        try:
            t0 = time.perf_counter()
            per_rank = run_ranks(_rank, world, args=(parallel, model, str(work), args.repeats, args.io_threads,
                                                       not args.no_verify, choice.fsdp_baseline),
                                 timeout=args.timeout, fresh=True)
            wall = time.perf_counter() - t0
        finally:
            shutil.rmtree(work, ignore_errors=True)
        full_state = 12 * per_rank[0]["numel"]
        describe = {"ours": _Ours.describe, "baseline": _baseline_class(parallel, choice.fsdp_baseline).describe}
        ours, base = (_row(layout, name, per_rank, full_state, describe[name]) for name in PATHS)
        ours["wall_s"] = base["wall_s"] = wall
        rows += [ours, base]
        ratios[layout] = _ratios(ours, base)
    record = {"model": model, "repeats": args.repeats, "io_threads": args.io_threads, "verify": not args.no_verify,
              "fsdp_baseline": choice.fsdp_baseline,
              "load_avg": load_avg,
              "load_avg_after": os.getloadavg(), "cores": os.cpu_count(), "rows": rows, "ratios": ratios}
    print(f"bench ckpt --engine: GPT d {args.d_model}, {args.layers} layers, vocab {args.vocab}; median of "
          f"{args.repeats} per rank; ours loads {'without' if args.no_verify else 'with'} verification; load average {load_avg[0]:.2f} at the start, "
          f"{record['load_avg_after'][0]:.2f} at the end")
    _print_table(rows, ratios)
    print(f"  base/ours > 1: ours faster or smaller; —: ours' RSS+ under {MEMORY_FLOOR >> 20} MiB (no denominator). "
          "RSS+: the resident set's peak growth, a lower bound (the allocator reuses freed pages); tens: CPU tensor "
          "bytes allocated during the call at their peak")
    by = {(row["layout"], row["path"]): row for row in rows}
    for layout in choice.layouts:
        r = ratios[layout]
        print(f"  {layout}: baseline/ours per-repeat median: save {r['save_s_pair_median']:.2f}x, load "
              f"{r['load_s_pair_median']:.2f}x")
        print(f"  {layout}: {_by_place(by[(layout, 'ours')], by[(layout, 'baseline')])}")
    for layout in choice.layouts:
        print(f"  baseline {layout}: {_baseline_class(LAYOUTS[layout][0], choice.fsdp_baseline).describe}")
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1))
    if args.csv:
        _write_csv(rows, args.csv)
    if args.png:
        plot(record, args.png)
    return 0

"""``dist-train launch … --dry-run``: every rank's mesh coordinates, pipeline stages and memory, without
any process group.

    rows = rank_layout(cfg)                       # one RankLayout per rank: coords, stages, memory
    print(format_layout(cfg, rows))

The stages and the memory come from the cost model (:mod:`dist_train.cost.layout`,
:mod:`dist_train.cost.memory`): the planner ranks layouts with the same numbers, so the two never disagree.
This module adds the mesh coordinates and the choice of device profile for the host it runs on.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from .config import Config
from .cost.layout import stages_by_rank
from .cost.memory import PHASE_LABELS, MemoryEstimate, estimate_memory
from .mesh import AXES, axis_sizes, rank_coords
from .plan.profiles import DeviceProfile, builtin_profiles, get_profile, profile_for_device_name


def device_profile(on_cuda: bool) -> tuple[DeviceProfile, str]:
    """(profile, header label) of the dry run: ``cpu`` (the calibrated one when ``dist-train plan
    --calibrate`` has run) off CUDA; on CUDA the built-in profile whose name the visible device's name
    names (``profile_for_device_name``: H100, H100 NVL, H200, H200 NVL, A100), else h100 — the label then says it
    was assumed and why."""
    if not on_cuda:
        prof = get_profile("cpu")
        return prof, f"cpu ({prof.source})"
    table = builtin_profiles()
    if not torch.cuda.is_available():
        return table["h100"], "h100 (assumed: no CUDA device visible on this host)"
    name = torch.cuda.get_device_name()
    hit = profile_for_device_name(name)
    if hit is None:
        return table["h100"], f"h100 (assumed: no profile for {name!r})"
    return table[hit], f"{hit} ({name})"


@dataclass
class RankLayout:
    rank: int
    coords: dict
    stages: list = field(default_factory=list)
    memory: Optional[MemoryEstimate] = None

    @property
    def layers(self) -> list[int]:
        return [i for st in self.stages for i in st.layers]


def rank_layout(cfg: Config, on_cuda: bool = False, profile: Optional[DeviceProfile] = None) -> list[RankLayout]:
    """Every rank's mesh coordinates, pipeline stages and memory (pure arithmetic, no process group).
    Memory: :func:`~dist_train.cost.memory.estimate_memory` on ``profile`` (default :func:`device_profile`),
    once per pipeline rank; swin needs ``data.image`` for it (the token grid), else ``memory`` is None."""
    label = None
    if profile is None:
        profile, label = device_profile(on_cuda)
    sizes = axis_sizes(cfg.parallel)
    world = math.prod(sizes[a] for a in AXES)
    stages = stages_by_rank(cfg)
    by_pp: dict = {}
    if cfg.model.kind == "gpt" or cfg.data.image:
        by_pp = {r: estimate_memory(cfg, st, profile, label) for r, st in enumerate(stages)}
    out = []
    for r in range(world):
        c = rank_coords(r, sizes)
        out.append(RankLayout(rank=r, coords=c, stages=stages[c["pp"]], memory=by_pp.get(c["pp"])))
    return out


def _gib(x: float) -> str:
    return f"{x / 2**30:.3f}"


def _layers_str(layers: list[int]) -> str:
    if not layers:
        return "-"
    runs, start = [], layers[0]
    for a, b in zip(layers, layers[1:] + [None]):
        if b != a + 1:
            runs.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ",".join(runs)


def format_layout(cfg: Config, rows: list[RankLayout]) -> str:
    """The human table printed by ``--dry-run``."""
    p = cfg.parallel
    mem0 = rows[0].memory if rows else None
    source = (f"dist_train/cost/memory.py on device profile {mem0.device}" if mem0
              else "none: the swin memory model needs data.image")
    lines = [f"layout: {len(rows)} ranks = pp{p.pp} x dp{p.dp} x wp{cfg.wp_grid[0]}x{cfg.wp_grid[1]} x cp{p.cp} "
             f"x tp{p.tp} (mesh axes outer->inner: {', '.join(AXES)}) | zero_stage {p.zero_stage} | "
             f"fsdp {'on' if p.fsdp else 'off'} | "
             f"pp_schedule {p.pp_schedule if p.pp > 1 else '-'} | checkpointing {cfg.train.activation_checkpointing}",
             f"memory per rank in GiB ({source}): params, grads (+ DDP or ZeRO buckets), optimizer, activations, "
             "other (baseline, logits, comm buffers, workspace, FSDP2 gathered copies, pp receive buffers); total: the step's peak, at "
             "phase loss (end of forward), bwd or optim; not the columns' sum, which never all coexist"]
    # columns as wide as their largest value: a 16,384-rank layout stays aligned
    wr = max([4] + [len(str(r.rank)) for r in rows])
    wc = max([3] + [len(str(v)) for r in rows for v in r.coords.values()])
    wl = max([10] + [len(_layers_str(r.layers)) for r in rows])
    shown = ("dp", "pp", "cp", "tp", "wp")  # the mesh coordinates, in the table's order
    lines.append(" ".join([f"{'rank':>{wr}}", *(f"{a:>{wc}}" for a in shown)]) +
                 f"  {'stages':<8} {'layers':<{wl}} {'emb':>3} {'head':>4} {'params':>8} {'grads':>8} "
                 f"{'optim':>8} {'acts':>8} {'other':>8} {'total':>8} at")
    for r in rows:
        st = ",".join(str(s.index) for s in r.stages) or "-"
        emb = "y" if any(s.first for s in r.stages) else "-"
        head = "y" if any(s.last for s in r.stages) else "-"
        mem = r.memory
        mem_s = " ".join([*(f"{_gib(x):>8}" for x in (mem.params, mem.grads, mem.optimizer, mem.activations,
                                                      mem.other, mem.total)),
                          PHASE_LABELS[mem.peak_phase]]) if mem else "-"
        lines.append(" ".join([f"{r.rank:>{wr}}", *(f"{r.coords[a]:>{wc}}" for a in shown)]) +
                     f"  {st:<8} {_layers_str(r.layers):<{wl}} {emb:>3} {head:>4} {mem_s}")
    return "\n".join(lines)


def show_layout(cfg: Config) -> int:
    """Print the dry run's table for a loaded (validated) config; returns the exit code 0."""
    print(format_layout(cfg, rank_layout(cfg, on_cuda=cfg.launch.gpus_per_node > 0)))
    return 0

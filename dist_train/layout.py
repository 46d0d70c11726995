"""The job's layout without any process group: pipeline stages, what each pipeline rank holds, per-rank
coordinates and memory (what ``dist-train launch … --dry-run`` prints).

    stages = pipeline_stages(cfg)                 # [Stage(index, rank, layers, first, last)]
    loads = rank_loads(cfg)                       # per pp rank: layers, embedding?, head?, micro-batches in flight
    rows = rank_layout(cfg)                       # one RankLayout per rank: coords, layers, memory
    print(format_layout(cfg, rows))

Memory has ONE model: the planner's ``dist_train.plan.model.memory_model`` (``dist-train plan`` and the
predictions beside each ``dist-train scale`` point), given each rank's exact :class:`RankLoad`; the
planner takes the most loaded of the same loads, so the two can never disagree.

Stage balance: the embedding and the output head each count as one layer (Megatron's
``account_for_embedding/loss_in_pipeline_split``), every stage holds at least one transformer layer,
and stage s lives on pipeline rank s mod pp (interleaved: 2 virtual stages per rank).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from .config import Config, ConfigError
from .mesh import AXES, axis_sizes, rank_coords
from .plan.profiles import DeviceProfile, builtin_profiles, get_profile

VIRTUAL_STAGES_INTERLEAVED = 2


@dataclass(frozen=True)
class Stage:
    index: int          # global stage index 0..n_stages-1 (schedule order)
    rank: int           # pipeline rank (pp coordinate) holding it
    layers: tuple       # global transformer layer indices, contiguous
    first: bool         # holds the token embedding
    last: bool          # holds the final norm + output head + loss


def virtual_stages(cfg: Config) -> int:
    """Stages per pipeline rank: 2 for the interleaved schedule, else 1."""
    return VIRTUAL_STAGES_INTERLEAVED if cfg.parallel.pp > 1 and cfg.parallel.pp_schedule == "interleaved" else 1


def balanced_layer_counts(n_layers: int, n_stages: int) -> list[int]:
    """Layers per stage minimising the largest stage cost, where the first stage also pays one unit for
    the embedding and the last one for the head; each stage gets >= 1 layer. Greedy on unit items is
    optimal for the max; ties go to the later stage (the first stage also holds the most in-flight
    micro-batches under 1F1B)."""
    if n_layers < n_stages:
        raise ConfigError(f"model.n_layers = {n_layers} < {n_stages} pipeline stages: each stage needs a layer")
    counts = [1] * n_stages
    extra = [0] * n_stages
    extra[0] += 1
    extra[-1] += 1
    for _ in range(n_layers - n_stages):
        cost = [c + e for c, e in zip(counts, extra)]
        best = min(range(n_stages), key=lambda s: (cost[s], -s))
        counts[best] += 1
    return counts


def pipeline_stages(cfg: Config) -> list[Stage]:
    """All stages of the job (one per pp rank; two per rank for the interleaved schedule)."""
    pp = cfg.parallel.pp
    n_stages = pp * virtual_stages(cfg)
    counts = balanced_layer_counts(cfg.model.n_layers, n_stages)
    out, start = [], 0
    for s, c in enumerate(counts):
        out.append(Stage(index=s, rank=s % pp, layers=tuple(range(start, start + c)), first=s == 0,
                         last=s == n_stages - 1))
        start += c
    return out


def stages_of_rank(cfg: Config, pp_rank: int) -> list[Stage]:
    """The stages pipeline rank ``pp_rank`` holds, in schedule order."""
    return [s for s in pipeline_stages(cfg) if s.rank == pp_rank]


def in_flight_microbatches(cfg: Config, pp_rank: int) -> float:
    """Micro-batches whose activations pipeline rank ``pp_rank`` holds at its peak, in units of ALL the
    rank's layers (torch.distributed.pipelining's schedules, which the pipeline engine runs):
    no pipeline 1; GPipe m (every forward before any backward); 1F1B min(m, pp - r) (rank r runs
    pp - r warm-up forwards, then one backward before each further forward); interleaved 1F1B
    min(warm-up + 1, m·v) forwards of ONE virtual stage, warm-up = (v - 1)·(micro-batches per round)
    + 2·(pp - 1 - r) (``_get_warmup_ops``), divided by v to count in whole-rank units."""
    p = cfg.parallel
    if p.pp == 1:
        return 1.0
    m = p.microbatches or cfg.grad_accum_steps
    if p.pp_schedule == "gpipe":
        return float(m)
    if p.pp_schedule == "interleaved":
        v = virtual_stages(cfg)
        per_round = m // max(1, m // p.pp)
        forwards = min((v - 1) * per_round + 2 * (p.pp - 1 - pp_rank) + 1, m * v)
        return forwards / v
    return float(min(m, p.pp - pp_rank))


@dataclass(frozen=True)
class RankLoad:
    """What one pipeline rank holds, as the memory model (dist_train/plan/model.py) needs it."""

    layers: int         # transformer layers over all of this rank's stages
    embedding: bool     # holds the token / patch embedding (first stage)
    head: bool          # holds the final norm + output head + loss (last stage)
    in_flight: float    # micro-batches of activations alive at the peak (:func:`in_flight_microbatches`)


def load_of(cfg: Config, stages: list[Stage]) -> RankLoad:
    """The load of the pipeline rank holding ``stages`` (all of one rank: :func:`stages_of_rank`)."""
    assert stages and len({s.rank for s in stages}) == 1, stages
    return RankLoad(layers=sum(len(s.layers) for s in stages), embedding=any(s.first for s in stages),
                    head=any(s.last for s in stages), in_flight=in_flight_microbatches(cfg, stages[0].rank))


def rank_loads(cfg: Config) -> list[RankLoad]:
    """One :class:`RankLoad` per pipeline rank, in pp order (pp = 1: the whole model, one micro-batch)."""
    return [load_of(cfg, stages_of_rank(cfg, r)) for r in range(cfg.parallel.pp)]


# ---------------------------------------------------------------------------------------------
# Memory estimate: the planner's model (dist_train/plan/model.py) for each pipeline rank
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryEstimate:
    """One rank's memory, bytes by the planner's components (``memory_model``'s dict, with "total"),
    grouped into the dry-run table's columns."""

    components: dict
    device: str         # the device profile the numbers come from, as the table header states it

    @property
    def params(self) -> float:
        return self.components["weights"]

    @property
    def grads(self) -> float:
        # DDP's flat buckets are a second copy of the gradients
        return self.components["grads"] + self.components["ddp_buckets"]

    @property
    def optimizer(self) -> float:
        return self.components["optimizer"]

    @property
    def activations(self) -> float:
        return self.components["activations"]

    @property
    def total(self) -> float:
        return self.components["total"]

    @property
    def other(self) -> float:
        """Baseline (CUDA context / framework RSS), logits, communication buffers, workspace."""
        return self.total - self.params - self.grads - self.optimizer - self.activations


def device_profile(on_cuda: bool) -> tuple[DeviceProfile, str]:
    """(profile, header label) of the dry run: ``cpu`` (the calibrated one when ``dist-train plan
    --calibrate`` has run) off CUDA; on CUDA the built-in profile whose name the visible device's name
    contains (H100, H200, A100), else h100 — the label then says it was assumed and why."""
    if not on_cuda:
        prof = get_profile("cpu")
        return prof, f"cpu ({prof.source})"
    import torch

    table = builtin_profiles()
    if not torch.cuda.is_available():
        return table["h100"], "h100 (assumed: no CUDA device visible on this host)"
    name = torch.cuda.get_device_name()
    hits = [k for k in table if k != "cpu" and k in name.lower()]
    if not hits:
        return table["h100"], f"h100 (assumed: no profile for {name!r})"
    return table[hits[0]], f"{hits[0]} ({name})"


def estimate_memory(cfg: Config, stages: list[Stage], on_cuda: bool = False,
                    profile: Optional[DeviceProfile] = None, label: Optional[str] = None) -> MemoryEstimate:
    """Bytes one rank holding ``stages`` (all on one pipeline rank: :func:`stages_of_rank`) uses, by the
    planner's :func:`~dist_train.plan.model.memory_model` on ``profile`` (default: :func:`device_profile`)."""
    from .plan.model import memory_model, rank_inputs  # lazily: plan.model imports this module

    if profile is None:
        profile, label = device_profile(on_cuda)
    sh, loc = rank_inputs(cfg, profile)
    return MemoryEstimate(memory_model(cfg, sh, profile, loc, load_of(cfg, stages)), label or profile.name)


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
    Memory: :func:`estimate_memory` on ``profile`` (default :func:`device_profile`), once per pipeline
    rank; swin needs ``data.image`` for it (the token grid), else ``memory`` is None."""
    label = None
    if profile is None:
        profile, label = device_profile(on_cuda)
    sizes = axis_sizes(cfg.parallel)
    world = math.prod(sizes[a] for a in AXES)
    by_pp: dict = {}
    if cfg.model.kind == "gpt" or cfg.data.image:
        by_pp = {r: estimate_memory(cfg, stages_of_rank(cfg, r), profile=profile, label=label)
                 for r in range(cfg.parallel.pp)}
    out = []
    for r in range(world):
        c = rank_coords(r, sizes)
        st = stages_of_rank(cfg, c["pp"]) if cfg.model.kind == "gpt" else []
        out.append(RankLayout(rank=r, coords=c, stages=st, memory=by_pp.get(c["pp"])))
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
    source = (f"dist_train/plan/model.py on device profile {mem0.device}" if mem0
              else "none: the swin memory model needs data.image")
    lines = [f"layout: {len(rows)} ranks = pp{p.pp} x dp{p.dp} x wp{cfg.wp_grid[0]}x{cfg.wp_grid[1]} x cp{p.cp} "
             f"x tp{p.tp} (mesh axes outer->inner: {', '.join(AXES)}) | zero_stage {p.zero_stage} | "
             f"pp_schedule {p.pp_schedule if p.pp > 1 else '-'} | checkpointing {cfg.train.activation_checkpointing}",
             f"memory per rank in GiB ({source}): params, grads (+ DDP buckets), optimizer, activations, "
             "other (baseline, logits, comm buffers, workspace)",
             f"{'rank':>4} {'dp':>3} {'pp':>3} {'cp':>3} {'tp':>3} {'wp':>3}  {'stages':<8} {'layers':<10} "
             f"{'emb':>3} {'head':>4} {'params':>8} {'grads':>8} {'optim':>8} {'acts':>8} {'other':>8} {'total':>8}"]
    for r in rows:
        c = r.coords
        st = ",".join(str(s.index) for s in r.stages) or "-"
        emb = "y" if any(s.first for s in r.stages) else "-"
        head = "y" if any(s.last for s in r.stages) else "-"
        mem = r.memory
        mem_s = " ".join(f"{_gib(x):>8}" for x in (mem.params, mem.grads, mem.optimizer, mem.activations, mem.other,
                                                   mem.total)) if mem else "-"
        lines.append(f"{r.rank:>4} {c['dp']:>3} {c['pp']:>3} {c['cp']:>3} {c['tp']:>3} {c['wp']:>3}  {st:<8} "
                     f"{_layers_str(r.layers):<10} {emb:>3} {head:>4} {mem_s}")
    return "\n".join(lines)

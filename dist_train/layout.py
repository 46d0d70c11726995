"""The job's layout without any process group: pipeline stages, per-rank coordinates and a per-rank
memory estimate (what ``dist-train launch … --dry-run`` prints).

    stages = pipeline_stages(cfg)                 # [Stage(index, rank, layers, first, last)]
    rows = rank_layout(cfg)                       # one RankLayout per rank: coords, layers, memory
    print(format_layout(cfg, rows))

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


# ---------------------------------------------------------------------------------------------
# Memory estimate
# ---------------------------------------------------------------------------------------------
@dataclass
class MemoryEstimate:
    params: float       # bytes
    grads: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations


def _param_counts(cfg: Config, stages: list[Stage]) -> tuple[float, float]:
    """(tp-sharded, replicated) parameter counts held by one rank of these stages, tp=1 shapes / tp."""
    from .models.gpt import ffn_hidden_size

    m, tp = cfg.model, cfg.parallel.tp
    hd = m.d_model // m.n_heads
    kv = m.n_kv_heads or m.n_heads
    per_layer_sharded = (m.d_model * m.n_heads * hd * 2 + m.d_model * kv * hd * 2
                         + 3 * m.d_model * ffn_hidden_size(m)) / tp
    per_layer_repl = 2 * m.d_model
    vocab = -(-m.vocab_size // tp) * tp / tp * m.d_model
    sharded = repl = 0.0
    for st in stages:
        sharded += per_layer_sharded * len(st.layers)
        repl += per_layer_repl * len(st.layers)
        if st.first:
            sharded += vocab
        if st.last:
            repl += m.d_model
            if not m.tie_embeddings:
                sharded += vocab
    return sharded, repl


def activation_bytes_per_layer(cfg: Config, bytes_per_value: int) -> float:
    """Korthikanti et al.: s·b·h·(34 + 5·a·s/h) bytes per layer in 16-bit; the s² term vanishes with a
    fused (flash / SDPA) kernel, which we always use; sequence sharding over cp divides s; tp divides
    the parts inside the tp region (24 of the 34 without sequence parallelism: ≈ s·b·h·(10 + 24/t)).
    Full checkpointing keeps only the layer input (2·s·b·h). Scaled to ``bytes_per_value`` (2 = 16-bit)."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    s = cfg.data.seq_len / p.cp
    b, h = t.micro_batch, m.d_model
    if t.activation_checkpointing == "full":
        per = 2.0 * s * b * h
    else:
        per = s * b * h * (10 + 24 / p.tp)
        if t.activation_checkpointing == "none" and p.attn_kernel == "math":
            per += 5.0 * m.n_heads * s * s * b / p.tp  # materialised scores + softmax + dropout mask
    return per * bytes_per_value / 2


def estimate_memory(cfg: Config, stages: list[Stage], on_cuda: bool) -> MemoryEstimate:
    """Bytes one rank holds. Mixed precision (bf16 on CUDA): 2 (bf16 weights) + 2 (bf16 grads) + 12
    (fp32 master + Adam m, v) = 16 bytes/param; fp32 AdamW: 4 + 4 + 8. ZeRO-1 shards the optimizer
    state, ZeRO-2 also the gradients, ZeRO-3 also the weights, each over the gradient group
    (dp × cp × wp). Activations: micro-batches in flight — 1 without a pipeline, min(pp - stage, m)
    under 1F1B for the first stage (we report the worst rank), m under GPipe."""
    p = cfg.parallel
    gh, gw = cfg.wp_grid
    shard = p.dp * p.cp * gh * gw
    mixed = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and on_cuda)
    w_b, g_b, o_b = (2, 2, 12) if mixed else (4, 4, 8)
    sharded, repl = _param_counts(cfg, stages)
    n = sharded + repl
    zero = p.zero_stage or 0
    params = n * w_b / (shard if zero >= 3 else 1)
    grads = n * g_b / (shard if zero >= 2 else 1)
    optim = n * o_b / (shard if zero >= 1 else 1)
    layers = sum(len(st.layers) for st in stages)
    per_layer = activation_bytes_per_layer(cfg, 2 if mixed else 4)
    m = p.microbatches or cfg.grad_accum_steps
    if p.pp == 1:
        in_flight = 1
    elif p.pp_schedule == "gpipe":
        in_flight = m
    else:
        in_flight = min(p.pp, m)
    acts = per_layer * layers * in_flight
    return MemoryEstimate(params=params, grads=grads, optimizer=optim, activations=acts)


@dataclass
class RankLayout:
    rank: int
    coords: dict
    stages: list = field(default_factory=list)
    memory: Optional[MemoryEstimate] = None

    @property
    def layers(self) -> list[int]:
        return [i for st in self.stages for i in st.layers]


def rank_layout(cfg: Config, on_cuda: bool = False) -> list[RankLayout]:
    """Every rank's mesh coordinates, pipeline stages and memory estimate (pure arithmetic)."""
    sizes = axis_sizes(cfg.parallel)
    world = math.prod(sizes[a] for a in AXES)
    out = []
    for r in range(world):
        c = rank_coords(r, sizes)
        st = stages_of_rank(cfg, c["pp"]) if cfg.model.kind == "gpt" else []
        mem = estimate_memory(cfg, st, on_cuda) if cfg.model.kind == "gpt" else None
        out.append(RankLayout(rank=r, coords=c, stages=st, memory=mem))
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
    lines = [f"layout: {len(rows)} ranks = pp{p.pp} x dp{p.dp} x wp{cfg.wp_grid[0]}x{cfg.wp_grid[1]} x cp{p.cp} "
             f"x tp{p.tp} (mesh axes outer->inner: {', '.join(AXES)}) | zero_stage {p.zero_stage} | "
             f"pp_schedule {p.pp_schedule if p.pp > 1 else '-'} | checkpointing {cfg.train.activation_checkpointing}",
             "memory per rank in GiB: params + grads + optimizer + activations (Korthikanti, fused attention)",
             f"{'rank':>4} {'dp':>3} {'pp':>3} {'cp':>3} {'tp':>3} {'wp':>3}  {'stages':<8} {'layers':<10} "
             f"{'emb':>3} {'head':>4} {'params':>8} {'grads':>8} {'optim':>8} {'acts':>8} {'total':>8}"]
    for r in rows:
        c = r.coords
        st = ",".join(str(s.index) for s in r.stages) or "-"
        emb = "y" if any(s.first for s in r.stages) else "-"
        head = "y" if any(s.last for s in r.stages) else "-"
        mem = r.memory
        mem_s = (f"{_gib(mem.params):>8} {_gib(mem.grads):>8} {_gib(mem.optimizer):>8} {_gib(mem.activations):>8} "
                 f"{_gib(mem.total):>8}") if mem else "(memory model: gpt only)"
        lines.append(f"{r.rank:>4} {c['dp']:>3} {c['pp']:>3} {c['cp']:>3} {c['tp']:>3} {c['wp']:>3}  {st:<8} "
                     f"{_layers_str(r.layers):<10} {emb:>3} {head:>4} {mem_s}")
    return "\n".join(lines)

"""Pipeline stages and what each pipeline rank holds: pure arithmetic on the typed config.

    stages = pipeline_stages(cfg)                 # [Stage(index, rank, layers, first, last)]
    mine = stages_of_rank(cfg, pp_rank)           # the stages one pipeline rank builds (models/gpt.py)
    every = stages_by_rank(cfg)                   # stages_of_rank of each pp rank, from one pipeline_stages
    loads = rank_loads(cfg)                       # per pp rank: layers, embedding?, head?, micro-batches in flight, held sends
    bubble = bubble_fraction(cfg)                 # idle share of a pipelined step (0 without a pipeline)
    rank_coords(rank, axis_sizes(cfg.parallel))  # {"pp": 0, "dp": 1, "wp": 0, "cp": 1, "tp": 0}: mesh.py's order

Stage balance: the embedding and the output head each count as one layer (Megatron's
``account_for_embedding/loss_in_pipeline_split``), every stage holds at least one transformer layer,
and stage s lives on pipeline rank s mod pp (interleaved: 2 virtual stages per rank).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import Config, ConfigError, ParallelConfig, _as_grid, pipeline_microbatches, virtual_stages

# mesh axes, outermost -> innermost (dist_train/mesh.py says why this order)
AXES: tuple[str, ...] = ("pp", "dp", "wp", "cp", "tp")


def axis_sizes(parallel: ParallelConfig) -> dict[str, int]:
    """Size of each mesh axis of ``parallel`` (wp: the tile count of its grid)."""
    gh, gw = _as_grid(parallel.wp)
    return {"pp": parallel.pp, "dp": parallel.dp, "wp": gh * gw, "cp": parallel.cp, "tp": parallel.tp}


def rank_coords(rank: int, sizes: dict[str, int]) -> dict[str, int]:
    """Coordinates of ``rank`` in the mesh (row-major over AXES, tp fastest)."""
    coords = {}
    for axis in reversed(AXES):
        coords[axis] = rank % sizes[axis]
        rank //= sizes[axis]
    return {a: coords[a] for a in AXES}


@dataclass(frozen=True)
class Stage:
    index: int          # global stage index 0..n_stages-1 (schedule order)
    rank: int           # pipeline rank (pp coordinate) holding it
    layers: tuple       # global transformer layer indices, contiguous
    first: bool         # holds the token embedding
    last: bool          # holds the final norm + output head + loss


def bubble_fraction(cfg: Config) -> float:
    """Share of a pipelined step each rank idles in the fill/drain bubble: (pp - 1) / (m + pp - 1) for 1F1B and
    GPipe with m micro-batches, so a step takes (m + pp - 1) / m times the rank's bubble-free work; the
    interleaved schedule halves it (the time model's convention, :mod:`dist_train.cost.step_time`); 0 at pp 1."""
    p = cfg.parallel
    if p.pp == 1:
        return 0.0
    m = pipeline_microbatches(cfg)
    bubble = (p.pp - 1) / (m + p.pp - 1)
    return bubble / 2 if p.pp_schedule == "interleaved" else bubble


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


def swin_block_pairs(n_layers: int) -> int:
    """Pipeline units of a swin: (plain, shifted) block pairs, kept on one stage (an odd last block alone)."""
    return -(-n_layers // 2)


def pipeline_stages(cfg: Config) -> list[Stage]:
    """All stages of the job (one per pp rank; two per rank for the interleaved schedule). A swin splits by
    block pairs (each plain block with the shifted one after it), balanced like GPT layers."""
    pp = cfg.parallel.pp
    n_stages = pp * virtual_stages(cfg)
    n_layers = cfg.model.n_layers
    unit = 2 if cfg.model.kind == "swin" else 1
    units = swin_block_pairs(n_layers) if unit == 2 else n_layers
    if unit == 2 and units < n_stages:
        raise ConfigError(f"model.n_layers = {n_layers} ({units} swin block pairs) < "
                          f"{n_stages} pipeline stages: each stage needs a (plain, shifted) block pair")
    counts = balanced_layer_counts(units, n_stages)
    out, start = [], 0
    for s, c in enumerate(counts):
        stop = min(start + c * unit, n_layers)
        out.append(Stage(index=s, rank=s % pp, layers=tuple(range(start, stop)), first=s == 0,
                         last=s == n_stages - 1))
        start = stop
    return out


def stages_of_rank(cfg: Config, pp_rank: int) -> list[Stage]:
    """The stages pipeline rank ``pp_rank`` holds, in schedule order."""
    return [s for s in pipeline_stages(cfg) if s.rank == pp_rank]


def stages_by_rank(cfg: Config) -> list[list[Stage]]:
    """:func:`stages_of_rank` of every pipeline rank, in pp order, from one :func:`pipeline_stages` (whose layer
    balancing is O(layers · stages): per rank it made a 16,384-rank dry run take seconds)."""
    by_rank: list[list[Stage]] = [[] for _ in range(cfg.parallel.pp)]
    for s in pipeline_stages(cfg):
        by_rank[s.rank].append(s)
    return by_rank


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
    m = pipeline_microbatches(cfg)
    if p.pp_schedule == "gpipe":
        return float(m)
    if p.pp_schedule == "interleaved":
        v = virtual_stages(cfg)
        _, warmup = interleaved_warmup(cfg, pp_rank)
        return min(warmup + 1, m * v) / v
    return float(min(m, p.pp - pp_rank))


def interleaved_warmup(cfg: Config, pp_rank: int) -> tuple[int, int]:
    """(micro-batches per round, warm-up forwards) of pipeline rank ``pp_rank`` under torch's interleaved 1F1B
    (``ScheduleInterleaved1F1B``: rounds of ``m // max(1, m // pp)`` micro-batches; ``_get_warmup_ops``: (v - 1)
    rounds + 2·(pp - 1 - r) forwards), not clipped to the m·v forwards the rank runs."""
    p = cfg.parallel
    m = pipeline_microbatches(cfg)
    per_round = m // max(1, m // p.pp)
    return per_round, (virtual_stages(cfg) - 1) * per_round + 2 * (p.pp - 1 - pp_rank)


def schedule_peak(cfg: Config, pp_rank: int) -> tuple[int, int, int]:
    """(held, received, losses) at pipeline rank ``pp_rank``'s peak backward under torch's schedule (torch 2.13,
    ``torch/distributed/pipelining/``): ``held``, the stage-boundary tensors (each a micro-batch's [tokens, d] of the
    residual stream: a stage output sent forward or a stage input's gradient sent backward) still referenced by a
    send beyond the (stage, micro-batch) pairs in flight (:func:`in_flight_microbatches`, whose outputs
    ``PipelineStage`` caches anyway); ``received``, the pairs in flight whose stage input is one of
    ``PipelineStage``'s persistent receive buffers (every stage but the first), not a fresh tensor; ``losses``, the
    last stage's pairs in flight besides the one being backwarded, each keeping its loss's backward state.

    A send's ``dist.Work`` holds its tensor until the Work is dropped (gloo's ``SendWork::tensor_``; NCCL stashes
    it until the work is waited on or found complete), and the schedules drop them late (``schedules.py``):

    * 1F1B (``Schedule1F1B._step_microbatches``): the warm-up's last fired forward send (micro-batch warm-up − 2)
      stays in ``send_work`` through the whole 1B1F loop (waited, rebound only in the cooldown); the previous
      backward's input gradient stays in ``bwd_sends`` (the loop) or ``send_work`` (the cooldown) until the next
      backward is done. Loop backward k holds micro-batch warm-up − 2's output once k ≥ warm-up − 1, every
      backward k ≥ 1 of a non-first stage its predecessor's gradient;
    * interleaved 1F1B (``_PipelineScheduleRuntime._step_microbatches``): every send's Work is appended to
      ``send_ops`` and waited only when the step ends, so each pair already backwarded still holds its output
      (unless its stage is the last) and its input gradient (unless its stage is the first). The peak backward is
      the steady state's last, backward vm − W − 1 (the most in flight, then the most held: a pair's activations
      outweigh the two tensors a backward adds), in ``_get_1f1b_rank_ops``' order: forward f runs local stage
      (f // per round) mod v, backward b local stage v − 1 − (b // per round) mod v;
    * GPipe holds every send until its phase ends too, but its peak is the first backward, before any is extra;
      every other micro-batch's loss is pending then.

    Measured on CPU (gloo): tests/test_gpt_saved_tensors.py's engine step peaks; NCCL not measured."""
    p = cfg.parallel
    if p.pp == 1:
        return 0, 0, 0
    m = pipeline_microbatches(cfg)
    first, last = pp_rank == 0, pp_rank == p.pp - 1
    if p.pp_schedule == "gpipe":
        return 0, 0 if first else m, m - 1 if last else 0
    if p.pp_schedule == "interleaved":
        v = virtual_stages(cfg)
        per_round, warmup = interleaved_warmup(cfg, pp_rank)
        warmup = min(warmup, m * v)
        peak = max(0, m * v - warmup - 1)  # backwards done before the peak one
        in_flight = [0] * v                # per local stage
        for f in range(min(warmup + 1 + peak, m * v)):
            in_flight[(f // per_round) % v] += 1
        held = 0
        for b in range(peak):
            local = v - 1 - (b // per_round) % v
            in_flight[local] -= 1
            stage = local * p.pp + pp_rank
            held += (stage != v * p.pp - 1) + (stage != 0)
        received = sum(n for local, n in enumerate(in_flight) if local * p.pp + pp_rank != 0)
        backwarding_last = last and (peak // per_round) % v == 0  # backward ``peak`` runs local stage v - 1
        return held, received, in_flight[v - 1] - 1 if backwarding_last else in_flight[v - 1] if last else 0
    warmup = min(m, p.pp - pp_rank)
    # (in flight, held) at each backward k: the loop's m - warmup + 1 backwards hold warmup, the cooldown's fewer
    at = max((warmup if k <= m - warmup else m - k,
              int(not last and warmup >= 2 and warmup - 1 <= k <= m - warmup) + int(not first and k >= 1))
             for k in range(m))
    return at[1], 0 if first else at[0], 0  # the last stage has one micro-batch in flight


@dataclass(frozen=True)
class RankLoad:
    """What one pipeline rank holds, as the memory model (:mod:`dist_train.cost.memory`) needs it."""

    layers: int         # transformer layers over all of this rank's stages
    embedding: bool     # holds the token / patch embedding (first stage)
    head: bool          # holds the final norm + output head + loss (last stage)
    in_flight: float    # micro-batches of activations alive at the peak (:func:`in_flight_microbatches`)
    stages: int         # pipeline stages on this rank (interleaved: virtual stages), each with its own stage-wide tensors
    held_sends: int     # stage outputs / input gradients the schedule's sends still hold at the peak (:func:`schedule_peak`)
    received: int       # pairs in flight at the peak whose stage input is a receive buffer (:func:`schedule_peak`)
    losses: int         # last-stage pairs in flight at the peak, not being backwarded: their loss state (:func:`schedule_peak`)
    recv_buffers: int   # PipelineStage's persistent receive buffers, one per micro-batch and direction (:func:`recv_buffers`)


def load_of(cfg: Config, stages: list[Stage]) -> RankLoad:
    """The load of the pipeline rank holding ``stages`` (all of one rank: :func:`stages_of_rank`)."""
    assert stages and len({s.rank for s in stages}) == 1, stages
    held, received, losses = schedule_peak(cfg, stages[0].rank)
    return RankLoad(layers=sum(len(s.layers) for s in stages), embedding=any(s.first for s in stages),
                    head=any(s.last for s in stages), in_flight=in_flight_microbatches(cfg, stages[0].rank),
                    stages=len(stages), held_sends=held, received=received, losses=losses, recv_buffers=recv_buffers(cfg, stages))


def recv_buffers(cfg: Config, stages: list[Stage]) -> int:
    """``PipelineStage``'s receive buffers on the rank holding ``stages``, each a micro-batch's [tokens, d]: a stage
    allocates one activation buffer per micro-batch unless it is the first (``_setup_forward_recv_info``) and one
    gradient buffer per micro-batch unless it is the last (``_setup_backward_recv_info``), at the first step, and
    keeps them across steps. 0 without a pipeline."""
    if cfg.parallel.pp == 1:
        return 0
    m = pipeline_microbatches(cfg)
    return m * sum((not s.first) + (not s.last) for s in stages)


def rank_loads(cfg: Config) -> list[RankLoad]:
    """One :class:`RankLoad` per pipeline rank, in pp order (pp = 1: the whole model, one micro-batch)."""
    return [load_of(cfg, stages) for stages in stages_by_rank(cfg)]

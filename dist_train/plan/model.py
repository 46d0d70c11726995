"""The analytic model: per-device memory and step time of one layout of one config on one device profile.

    pred = predict(cfg, profile)            # cfg: a validated Config (its parallel.* is the layout)
    pred.memory["total"], pred.step_time_s, pred.tokens_per_s, pred.breakdown_lines()

Memory (bytes, one pipeline rank's :class:`~dist_train.layout.RankLoad` — its exact layers, embedding,
head and micro-batches in flight; by default the most loaded rank, which is what the planner ranks;
``dist-train launch --dry-run`` prints every rank from the same function):
    baseline            framework resident set / CUDA context (profile.baseline_gib)
    weights, grads      parameters on this rank (matmul weights and vocabulary rows ÷tp — the vocabulary
                        padded to a multiple of tp; norms replicated; only this rank's layers, embedding
                        and head; ÷ZeRO-3 shards) × element size (train.precision; auto: the profile's)
    optimizer           AdamW m, v (+ fp32 master copy in 16-bit training), ÷ shards for ZeRO ≥ 1
    ddp_buckets         DDP's flat gradient buckets (a second gradient copy) when gradients are reduced
    activations         per layer per token (Korthikanti et al. generalised to this model's tensors):
                        replicated part (norm inputs/outputs, ÷tp only with sequence parallel) +
                        tensor-parallel part (÷tp); + 2·heads·span scores without flash attention;
                        tokens per rank = micro_batch·S / (cp·wp); full checkpointing keeps the layer
                        input (d per token) per layer + one layer being recomputed; Ulysses keeps the
                        head-sharded q, k, v copies; × micro-batches in flight; + the stage input
    logits              head rank only: S·b·V_pad/tp × (logits + fp32 log-softmax + its gradient)
    comm_buffers        ring double buffers for K/V and dK/dV, all-to-all outputs
Time (seconds per optimizer step, per rank): matmuls by shape over the calibrated matmul curve,
attention (FLOP convention) over the attention curve with the causal critical-path factor of the cp
layout, elementwise traffic over memory bandwidth, eager op overhead, the optimizer, then the
communication of every axis: exposed = what the algorithm cannot overlap (profile.overlap).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from ..config import Config
from ..layout import RankLoad, rank_loads
from ..metrics import mean_keys_per_query
from .profiles import DeviceProfile

# eager autograd ops per transformer layer (forward ops; their backward is in the calibrated per-op cost),
# counted from dist_train/models/gpt.py and swin.py; fused kernels collapse them
EAGER_OPS_PER_LAYER = {"gpt": 48, "swin": 40}
FUSED_OPS_PER_LAYER = 14
# ops each extra cp ring step adds per layer (kernel call, LSE merge, send/recv bookkeeping)
RING_OPS_PER_STEP = 14
ULYSSES_OPS = 16
# elementwise passes over each stored activation byte (forward write, backward read of saved value,
# gradient write and read)
ELEMENTWISE_PASSES = 4


@dataclass(frozen=True)
class Shape:
    """What the model looks like to the cost model (one sample)."""

    kind: str
    layers: int
    d: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int            # gpt: vocabulary; swin: outputs per token of the head (cout·p²)
    embed_in: int         # swin: inputs per token of the patch embedding (cin·p²); gpt: 0 (lookup)
    tokens: int           # tokens per sample (sequence length, or padded token grid)
    keys_per_query: float  # S_eff of the FLOP convention
    span: int             # keys a query's kernel spans (throughput lookup, s² memory)
    grid: tuple[int, int] = (0, 0)   # swin padded token grid
    window: tuple[int, int] = (0, 0)

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def layer_params(self) -> int:
        d, f = self.d, self.ffn
        if self.kind == "gpt":
            return d * (2 * self.q_dim + 2 * self.kv_dim) + 3 * d * f + self.layer_replicated_params()
        wh, ww = self.window
        return 4 * d * d + 4 * d + 2 * d * f + f + d + self.heads * (2 * wh - 1) * (2 * ww - 1) + 4 * d

    def layer_replicated_params(self) -> int:
        """Parameters of one layer that tensor parallelism does not split: the norms (gpt: two RMSNorm
        weights; swin: two LayerNorms with bias — swin runs with tp = 1 anyway)."""
        return 2 * self.d if self.kind == "gpt" else 4 * self.d

    def vocab_rows(self, tp: int = 1) -> int:
        """Output rows per tp rank: the vocabulary padded up to a multiple of tp, split (Megatron's
        vocab-parallel embedding/head, ``padded_vocab_size``); swin heads are not tp-split (tp = 1)."""
        return -(-self.vocab // tp)

    def embed_params(self, tp: int = 1) -> int:
        return self.vocab_rows(tp) * self.d if self.kind == "gpt" else self.embed_in * self.d + self.d

    def head_params(self, tp: int = 1) -> int:
        return self.vocab_rows(tp) * self.d + (0 if self.kind == "gpt" else self.vocab)

    def final_norm_params(self) -> int:
        return self.d if self.kind == "gpt" else 2 * self.d

    def params(self, tied: bool = False) -> int:
        return (self.layers * self.layer_params() + self.embed_params() + (0 if tied else self.head_params())
                + self.final_norm_params())

    def matmul_params(self, tied: bool = False) -> int:
        """Parameters in matmuls (the 6N of the FLOP convention): every Linear weight and the head."""
        d, f = self.d, self.ffn
        if self.kind == "gpt":
            return self.layers * (d * (2 * self.q_dim + 2 * self.kv_dim) + 3 * d * f) + self.vocab * d
        return self.layers * (4 * d * d + 2 * d * f) + self.embed_in * d + self.vocab * d

    def flops_per_token(self, tied: bool = False) -> float:
        """Training FLOPs per token: 6·N_matmul + 12·L·d_attn·S_eff (S_eff: causal mean keys, or window area)."""
        return 6.0 * self.matmul_params(tied) + 12.0 * self.layers * self.q_dim * self.keys_per_query


def shape_of(cfg: Config) -> Shape:
    m = cfg.model
    if m.kind == "gpt":
        from ..models.gpt import ffn_hidden_size

        s = cfg.data.seq_len
        kv = m.n_kv_heads or m.n_heads
        w = m.attention_window
        return Shape("gpt", m.n_layers, m.d_model, m.n_heads, kv, m.d_model // m.n_heads, ffn_hidden_size(m),
                     m.vocab_size, 0, s, mean_keys_per_query(s, w), min(s, (w or s) + 1))
    from ..models.swin import token_grid
    from parallelism.window.layout import as_pair

    if not cfg.data.image:
        raise ValueError("data.image is not set: a swin plan needs the image size (--image H W)")
    win = as_pair(m.window, "model.window")
    _, _, ph, pw = token_grid(tuple(cfg.data.image), m.patch_size, win)
    area = win[0] * win[1]
    p2 = m.patch_size ** 2
    return Shape("swin", m.n_layers, m.d_model, m.n_heads, m.n_heads, m.d_model // m.n_heads,
                 m.ffn_hidden or 4 * m.d_model, m.out_channels * p2, m.in_channels * p2, ph * pw, float(area), area,
                 (ph, pw), win)


@dataclass
class Prediction:
    layout: dict
    memory: dict                  # bytes by component + "total"
    time: dict                    # seconds per step by component + "step"
    step_time_s: float
    tokens_per_s: float
    tflops_per_device: float
    mfu: float
    exposed_comm_fraction: float
    fits: bool
    device: str
    flops_per_token: float
    notes: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"layout": self.layout, "memory_bytes": self.memory, "time_s": self.time,
                "step_time_s": self.step_time_s, "tokens_per_s": self.tokens_per_s,
                "tflops_per_device": self.tflops_per_device, "mfu": self.mfu,
                "exposed_comm_fraction": self.exposed_comm_fraction, "fits": self.fits, "device": self.device,
                "flops_per_token": self.flops_per_token, "notes": self.notes}

    def breakdown_lines(self) -> list[str]:
        gib = 2 ** 30
        mem = ", ".join(f"{k} {v / gib:.3g}" for k, v in self.memory.items() if k != "total" and v)
        tim = ", ".join(f"{k} {v * 1e3:.3g}" for k, v in self.time.items() if k != "step" and v)
        return [f"memory GiB: total {self.memory['total'] / gib:.3g} = {mem}",
                f"time ms/step: total {self.step_time_s * 1e3:.4g} = {tim}"]


# ---------------------------------------------------------------------------------------------
def element_bytes(cfg: Config, prof: DeviceProfile) -> int:
    """Bytes per weight / activation element: train.precision when set (bf16 2, fp32 4), else (auto)
    the profile's (bf16 on the GPU profiles, fp32 on cpu) — what the trainer's autocast picks."""
    return {"bf16": 2, "fp32": 4}.get(cfg.train.precision, prof.bytes_per_elem)


@dataclass(frozen=True)
class _Local:
    """Per-rank quantities of a layout (one micro-batch)."""

    tokens: float       # tokens this rank processes per micro-batch
    layers: int         # layers on the most loaded pipeline rank (all its stages)
    q: float            # local attention width (÷tp)
    kv: float
    f: float
    heads: float
    vocab: float        # output rows on this rank (padded vocabulary ÷ tp)
    grad_shards: int    # ranks holding replicas of the weights (dp·cp·wp): ZeRO shard factor
    bpe: int            # bytes per element (:func:`element_bytes`)
    loads: tuple[RankLoad, ...]  # what each pipeline rank holds, in pp order


def rank_inputs(cfg: Config, prof: DeviceProfile) -> tuple[Shape, _Local]:
    """(shape, per-rank quantities) of ``cfg`` on ``prof``: the inputs of :func:`memory_model`."""
    sh = shape_of(cfg)
    return sh, _local(cfg, sh, prof)


def _local(cfg: Config, sh: Shape, prof: DeviceProfile) -> _Local:
    p = cfg.parallel
    gh, gw = cfg.wp_grid
    tp = p.tp
    if sh.kind == "swin":
        ph, pw = sh.grid
        wh, ww = sh.window
        # tiles are window-aligned: the largest tile has ceil(windows / grid) windows per axis
        tile = math.ceil(ph // wh / gh) * wh * math.ceil(pw // ww / gw) * ww
        tokens = cfg.train.micro_batch * tile / p.cp
    else:
        tokens = cfg.train.micro_batch * sh.tokens / p.cp
    kv_heads_local = max(1.0, sh.kv_heads / tp)
    loads = tuple(rank_loads(cfg))
    return _Local(tokens=tokens, layers=max(ld.layers for ld in loads), q=sh.q_dim / tp,
                  kv=kv_heads_local * sh.head_dim, f=sh.ffn / tp, heads=sh.heads / tp, vocab=sh.vocab_rows(tp),
                  grad_shards=p.dp * p.cp * gh * gw, bpe=element_bytes(cfg, prof), loads=loads)


def _ring_piece_tokens(cfg, loc) -> float:
    """Tokens of one ring message: the rank's whole shard, or ``parallel.cp_kv_piece`` per sequence."""
    piece = cfg.parallel.cp_kv_piece
    return loc.tokens if piece is None else min(loc.tokens, cfg.train.micro_batch * piece)


def activation_elems_per_token(cfg: Config, sh: Shape, prof: DeviceProfile, loc: _Local) -> dict:
    """Stored activation elements per token per layer: {"replicated", "parallel", "scores", "ulysses"}."""
    d = sh.d
    if sh.kind == "swin":
        rep, par = 4 * d, 5 * loc.q + 2 * loc.f
        scores = 2 * loc.heads * sh.span  # window_attention materialises scores and probabilities
    elif prof.fused_kernels:
        rep, par = 4 * d, 2 * loc.q + 2 * loc.kv + 3 * loc.f
        scores = 0.0 if prof.flash_attention and cfg.parallel.attn_kernel != "math" else 2 * loc.heads * sh.span
    else:
        # eager modules: RMSNorm keeps input and output (×2 norms); q and k keep pre-RoPE, rotate-half
        # and post-RoPE copies; v; the attention output and its contiguous copy into wo; SwiGLU keeps
        # w1 and w3 outputs, silu output and the product
        rep, par = 4 * d, 5 * loc.q + 4 * loc.kv + 4 * loc.f
        scores = 0.0 if prof.flash_attention and cfg.parallel.attn_kernel != "math" else 2 * loc.heads * sh.span
    if cfg.parallel.sequence_parallel and cfg.parallel.tp > 1:
        rep /= cfg.parallel.tp
    uly = 0.0
    if cfg.parallel.cp > 1 and cfg.parallel.cp_method in ("ulysses", "hybrid"):
        uly = loc.q + 2 * loc.kv  # the head-sharded q, k, v after the all-to-all
    return {"replicated": rep, "parallel": par, "scores": scores, "ulysses": uly}


def memory_model(cfg: Config, sh: Shape, prof: DeviceProfile, loc: _Local,
                 load: Optional[RankLoad] = None) -> dict:
    """Bytes by component (+ "total") of the pipeline rank holding ``load``; None: the most loaded of
    ``loc.loads`` (every pp rank's exact stages), the rank that decides whether a layout fits."""
    if load is None:
        return max((memory_model(cfg, sh, prof, loc, ld) for ld in loc.loads), key=lambda m: m["total"])
    p, t = cfg.parallel, cfg.train
    bpe = loc.bpe
    tied = cfg.model.tie_embeddings if sh.kind == "gpt" else False
    rep = sh.layer_replicated_params()
    n_local = load.layers * ((sh.layer_params() - rep) / p.tp + rep)
    if load.embedding:
        n_local += sh.embed_params(p.tp)
    if load.head:
        n_local += sh.final_norm_params() + (0 if tied else sh.head_params(p.tp))
    z = p.zero_stage
    shards = loc.grad_shards
    master = 4 if bpe < 4 else 0
    weights = n_local * bpe / (shards if z == 3 else 1)
    grads = n_local * bpe / (shards if z is not None and z >= 2 else 1)
    optim = n_local * (8 + master) / (shards if z is not None and z >= 1 else 1)
    ddp = n_local * bpe if (z is None and shards > 1) else 0.0

    el = activation_elems_per_token(cfg, sh, prof, loc)
    per_layer_tok = el["replicated"] + el["parallel"] + el["scores"] + el["ulysses"]
    if t.activation_checkpointing == "full":
        # every in-flight micro-batch keeps its layer inputs; one layer is recomputed at a time
        stored_tok = load.layers * sh.d * load.in_flight + per_layer_tok
    else:
        if t.activation_checkpointing == "selective":
            per_layer_tok -= loc.q + el["scores"]   # the attention core is recomputed
        stored_tok = load.layers * per_layer_tok * load.in_flight
    stored_tok += sh.d * load.in_flight  # the stage input per micro-batch (the embedding output on stage 0)
    acts = stored_tok * loc.tokens * bpe
    # one micro-batch's logits: the last stage runs its loss and backward before the next forward
    logits = loc.tokens * loc.vocab * (bpe + 4 + 4) if load.head else 0.0
    comm = 0.0
    if p.cp > 1:
        if p.cp_method in ("ring", "hybrid"):
            # K/V in flight (double buffer) + dK/dV accumulators, per K/V piece when the ring is pieced
            comm += 4 * _ring_piece_tokens(cfg, loc) * loc.kv * bpe * 2
        if p.cp_method in ("ulysses", "hybrid"):
            comm += loc.tokens * (loc.q + 2 * loc.kv) * bpe
    workspace = 2 * loc.tokens * (sh.d + loc.f) * bpe  # one layer's activation gradients in flight
    out = {"baseline": prof.baseline_bytes, "weights": weights, "grads": grads, "optimizer": optim,
           "ddp_buckets": ddp, "activations": acts, "logits": logits, "comm_buffers": comm, "workspace": workspace}
    out["total"] = sum(out.values())
    return out


def _matmuls(sh: Shape, loc: _Local) -> list[tuple[float, float, int]]:
    """(K, N, count) of every matmul of one layer (tp-sharded dims divided)."""
    d = sh.d
    if sh.kind == "gpt":
        return [(d, loc.q, 1), (d, loc.kv, 2), (loc.q, d, 1), (d, loc.f, 2), (loc.f, d, 1)]
    return [(d, 3 * loc.q, 1), (loc.q, d, 1), (d, loc.f, 1), (loc.f, d, 1)]


def _allreduce_s(nbytes: float, n: int, link) -> float:
    if n <= 1:
        return 0.0
    return 2 * (n - 1) / n * nbytes / (link.bw_gbs * 1e9) + 2 * (n - 1) * link.latency_us * 1e-6


def time_model(cfg: Config, sh: Shape, prof: DeviceProfile, loc: _Local, mem: dict, world: int) -> dict:
    p, t = cfg.parallel, cfg.train
    bpe = loc.bpe
    accum = cfg.grad_accum_steps
    ranks_per_node = min(world, prof.devices_per_node if prof.cores is None else world)
    share = prof.compute_share(ranks_per_node)
    recompute = 4.0 / 3.0 if t.activation_checkpointing == "full" else 1.0

    # -- compute per micro-batch ---------------------------------------------------------------
    mm = 0.0
    for k, n, c in _matmuls(sh, loc):
        mm += c * 6.0 * loc.tokens * k * n / (prof.matmul_tflops_at(int(k), int(n)) * 1e12)
    mm *= loc.layers * recompute
    head_in = sh.d if sh.kind == "gpt" else sh.d
    mm += 6.0 * loc.tokens * head_in * loc.vocab / (prof.matmul_tflops_at(head_in, int(loc.vocab)) * 1e12)
    if sh.kind == "swin":
        mm += 6.0 * loc.tokens * sh.embed_in * sh.d / (prof.matmul_tflops_at(sh.embed_in, sh.d) * 1e12)

    attn_flops = 12.0 * loc.q * sh.keys_per_query * loc.tokens * loc.layers
    kernel_keys = sh.span
    imbalance = 1.0
    if p.cp > 1 and sh.kind == "gpt":
        ring = p.cp if p.cp_method == "ring" else (p.cp // p.ulysses_degree if p.cp_method == "hybrid" else 1)
        if ring > 1:
            kernel_keys = max(1, int(sh.span / ring))
            causal_full = cfg.model.attention_window is None
            if p.cp_layout == "contiguous" and causal_full:
                imbalance = (2 * ring - 1) / ring  # the last rank's critical path: P - 1/2 blocks vs P/2
    attn = attn_flops * imbalance * recompute / (prof.attention_tflops_at(kernel_keys) * 1e12)

    el = activation_elems_per_token(cfg, sh, prof, loc)
    elems = el["replicated"] + el["parallel"] + el["ulysses"]
    ew = ELEMENTWISE_PASSES * elems * bpe * loc.tokens * loc.layers * recompute / (prof.mem_bw_gbs * 1e9)
    ew += 6 * loc.tokens * loc.vocab * 4 / (prof.mem_bw_gbs * 1e9)  # logits, log-softmax, their gradients
    ops = (FUSED_OPS_PER_LAYER if prof.fused_kernels else EAGER_OPS_PER_LAYER[sh.kind]) * loc.layers
    if p.cp > 1:
        ring = p.cp if p.cp_method == "ring" else (p.cp // p.ulysses_degree if p.cp_method == "hybrid" else 1)
        pieces = loc.tokens / _ring_piece_tokens(cfg, loc)   # one sub-ring per K/V piece
        ops += loc.layers * (RING_OPS_PER_STEP * (ring - 1) * pieces + (ULYSSES_OPS if p.cp_method != "ring" else 0))
    ovh = ops * recompute * prof.op_overhead_us * 1e-6
    compute_mb = (mm + attn + ew + ovh) / share

    # -- communication per micro-batch -----------------------------------------------------------
    tp_s = 0.0
    if p.tp > 1:
        link = prof.link(p.tp)
        tp_s = 4 * loc.layers * _allreduce_s(loc.tokens * sh.d * bpe, p.tp, link)
    cp_exposed = 0.0
    if p.cp > 1 and sh.kind == "gpt":
        link = prof.link(p.cp * p.tp)
        u = p.cp if p.cp_method == "ulysses" else (p.ulysses_degree if p.cp_method == "hybrid" else 1)
        ring = p.cp // u
        if u > 1:
            a2a_bytes = loc.tokens * (2 * loc.q + 2 * loc.kv) * bpe * (u - 1) / u  # q, k, v in; out back
            cp_exposed += 2 * loc.layers * (a2a_bytes / (link.bw_gbs * 1e9) + 4 * (u - 1) * link.latency_us * 1e-6)
        if ring > 1:
            pieces = loc.tokens / _ring_piece_tokens(cfg, loc)
            blk = 2 * loc.tokens * loc.kv * bpe / pieces  # one K/V block (piece)
            per_step_comm = link.seconds(blk, 2)
            per_step_compute = (attn / max(1, ring)) / loc.layers / share / pieces
            hidden = prof.overlap * per_step_compute
            fwd = (ring - 1) * pieces * max(0.0, per_step_comm - hidden)
            cp_exposed += loc.layers * 3 * fwd  # backward: K/V again plus dK/dV
    wp_s = 0.0
    gh, gw = cfg.wp_grid
    if sh.kind == "swin" and gh * gw > 1:
        wh, ww = sh.window
        sh_h, sh_w = wh // 2, ww // 2
        tile_h, tile_w = math.ceil(sh.grid[0] // wh / gh) * wh, math.ceil(sh.grid[1] // ww / gw) * ww
        halo = (sh_h * tile_w * (gh > 1) + sh_w * tile_h * (gw > 1) - sh_h * sh_w * (gh > 1 and gw > 1))
        link = prof.link(gh * gw * p.cp)
        per = link.seconds(halo * cfg.train.micro_batch * sh.d * bpe, 3)
        wp_s = (sh.layers // 2) * 2 * 2 * per * (1 - prof.overlap)  # roll and roll back, forward and backward
    pp_s = 0.0
    bubble = 0.0
    if p.pp > 1:
        link = prof.link(world)
        pp_s = 2 * link.seconds(loc.tokens * sh.d * bpe)
        m = p.microbatches or accum
        bubble = (p.pp - 1) / (m + p.pp - 1)
        if p.pp_schedule == "interleaved":
            bubble /= 2
    per_mb = compute_mb + tp_s + cp_exposed + wp_s + pp_s
    body = accum * per_mb / (1 - bubble) if bubble < 1 else float("inf")

    # -- once per step ---------------------------------------------------------------------------
    n_local = mem["weights"] * (loc.grad_shards if p.zero_stage == 3 else 1) / bpe
    tensors = (9 if sh.kind == "gpt" else 13) * loc.layers + 3
    shards = loc.grad_shards if (p.zero_stage or 0) >= 1 else 1
    opt = (n_local / shards * 4 * 10 / (prof.mem_bw_gbs * 1e9) + tensors * 14 * prof.op_overhead_us * 1e-6) / share
    grad_bytes = n_local * bpe
    g = loc.grad_shards
    dp_link = prof.link(world // max(1, p.pp))
    dp_comm = _allreduce_s(grad_bytes, g, dp_link) * (1.5 if p.zero_stage == 3 else 1.0)
    backward = accum * compute_mb * 2 / 3
    bucket = min(grad_bytes, 25 * 2 ** 20)
    last_bucket = _allreduce_s(bucket, g, dp_link)
    dp_exposed = max(last_bucket, dp_comm - prof.overlap * backward) if g > 1 else 0.0
    small = 2 * _allreduce_s(8, g, dp_link)  # token count and loss all-reduces
    out = {"matmul": accum * mm / share, "attention": accum * attn / share, "elementwise": accum * ew / share,
           "op_overhead": accum * ovh / share, "optimizer": opt, "tp_comm": accum * tp_s,
           "cp_comm_exposed": accum * cp_exposed, "wp_halo_exposed": accum * wp_s, "pp_p2p": accum * pp_s,
           "pp_bubble": body - accum * per_mb, "dp_comm_exposed": dp_exposed + small}
    out["step"] = body + opt + dp_exposed + small
    out["comm_total"] = accum * (tp_s + cp_exposed + wp_s + pp_s) + dp_exposed + small
    return out


def predict(cfg: Config, prof: DeviceProfile, world: Optional[int] = None) -> Prediction:
    """Memory and speed of ``cfg``'s layout on ``prof`` devices (world = dp·tp·pp·cp·wp by default)."""
    world = world or cfg.world_size
    sh, loc = rank_inputs(cfg, prof)
    mem = memory_model(cfg, sh, prof, loc)
    tm = time_model(cfg, sh, prof, loc, mem, world)
    comm_total = tm.pop("comm_total")
    step = tm["step"]
    tied = cfg.model.tie_embeddings if sh.kind == "gpt" else False
    fpt = sh.flops_per_token(tied)
    tokens_step = cfg.train.global_batch * sh.tokens
    tflops = fpt * tokens_step / step / world / 1e12
    p = cfg.parallel
    layout = {"dp": p.dp, "tp": p.tp, "pp": p.pp, "cp": p.cp, "wp": list(cfg.wp_grid), "cp_method": p.cp_method,
              "cp_layout": p.cp_layout, "ulysses_degree": p.ulysses_degree, "zero_stage": p.zero_stage,
              "checkpointing": cfg.train.activation_checkpointing, "micro_batch": cfg.train.micro_batch,
              "sequence_parallel": p.sequence_parallel}
    return Prediction(layout=layout, memory=mem, time=tm, step_time_s=step, tokens_per_s=tokens_step / step,
                      tflops_per_device=tflops, mfu=tflops / prof.peak_tflops,
                      exposed_comm_fraction=comm_total / step, fits=mem["total"] <= prof.memory_bytes,
                      device=prof.name, flops_per_token=fpt)

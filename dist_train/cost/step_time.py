"""The time model: seconds per optimizer step of one rank of a layout on a device profile.

Matmuls by shape over the calibrated matmul curve, attention (FLOP convention) over the attention curve
with the causal critical-path factor of the cp layout, elementwise traffic over memory bandwidth, eager
op overhead, the optimizer, then the communication of every axis: exposed = what the algorithm cannot
overlap (profile.overlap).

Host dispatch (:func:`host_bound_seconds`): on a device whose kernels launch asynchronously the host dispatches
each eager op (``profile.host_op_us``) while the device runs the ones before it, so a rank's compute per
micro-batch takes max(device time, host dispatch time), not their sum: a big model's
kernels hide the launches, a small model (or small per-rank shards) leaves the device waiting for the host. What
the device waits beyond its own work is the ``host_dispatch_exposed`` component. A CPU profile runs its ops on the
host: ``host_op_us`` is 0 there and ``op_overhead_us`` is its serial per-op cost, added to the compute time.
"""
from __future__ import annotations

import math

from ..config import Config, micro_batch_samples, resolve_loss_chunk, step_micro_batches
from ..plan.profiles import DeviceProfile
from .flops import attention_flops_per_key, recompute_flops_per_token
from .layout import RankLoad, bubble_fraction
from .memory import activation_elems_per_token, fsdp_layer_params, rank_params, zero3_persistent_params
from .shape import RankShape, Shape, cp_execution, recompute_runs_last_matmul, recompute_scope, ring_piece_tokens

# eager autograd ops per transformer layer (forward ops; their backward is in the calibrated per-op cost),
# counted from dist_train/models/gpt.py and swin.py; a fused what-if profile (``fused_kernels: true``, a layer
# dist-train does not run) collapses them. Times ``op_overhead_us`` serially (0 on the GPU profiles) and
# ``host_op_us`` as the host's dispatch, which overlaps the device's work (host_bound_seconds)
EAGER_OPS_PER_LAYER = {"gpt": 48, "swin": 40}
# ops of torch AdamW (foreach=False, dist_train/optim.py) per parameter tensor and step
OPTIMIZER_OPS_PER_TENSOR = 14
# forward ops outside the layers (embedding, final norm, head, loss), counted on the real models in fp32 with
# gpucheck.dispatch.OpCounter (tests/test_host_dispatch.py); the GPT's chunked loss adds LOSS_CHUNK_OPS per chunk of
# train.loss_chunk. In the host term only: the gpu check's measured us per op divides a step by all its forward ops,
# these included (the cpu profile's serial op_overhead_us term predates them and leaves them out)
OUTER_OPS = {"gpt": 26, "swin": 40}
LOSS_CHUNK_OPS = 30
FUSED_OPS_PER_LAYER = 14
# ops each extra cp ring step adds per layer (kernel call, LSE merge, send/recv bookkeeping)
RING_OPS_PER_STEP = 14
ULYSSES_OPS = 16
# elementwise passes over each stored activation byte (forward write, backward read of saved value,
# gradient write and read)
ELEMENTWISE_PASSES = 4


def _matmuls(sh: Shape, loc: RankShape) -> list[tuple[float, float, int]]:
    """(K, N, count) of every matmul of one layer (tp-sharded dims divided), in forward order: the last is the
    MLP's down projection (w2 / fc2)."""
    d = sh.d
    if sh.kind == "gpt":
        return [(d, loc.q, 1), (d, loc.kv, 2), (loc.q, d, 1), (d, loc.f, 2), (loc.f, d, 1)]
    return [(d, 3 * loc.q, 1), (loc.q, d, 1), (d, loc.f, 1), (loc.f, d, 1)]


def exchange_passes(cfg: Config) -> int:
    """Passes of a layer's cp and halo exchanges per micro-batch: the forward, the backward (the adjoint
    exchanges), and the forward again when checkpointing recomputes them (:func:`~dist_train.cost.shape.
    recompute_scope`)."""
    return 2 if recompute_scope(cfg) == "none" else 3


def halo_passes(cfg: Config) -> float:
    """Passes of a shifted swin block's halo rolls per micro-batch, in whole forward passes (out and back).
    Under checkpointing torch's non-reentrant recompute stops once the tensors the backward needs are back
    (early stop): without cp the block's closing roll of x (after fc2, which needs nothing saved) is not re-run,
    only the opening one — half a pass (tests/test_wp_model.py counts 2.5× the forward's halo bytes); with cp
    both rolls sit inside attention, before proj, and run again (:func:`exchange_passes`)."""
    passes = exchange_passes(cfg)
    return passes - 0.5 if passes == 3 and cfg.parallel.cp == 1 else float(passes)


def ulysses_traffic(cfg: Config, loc: RankShape) -> tuple[int, float]:
    """(all-to-alls, bytes sent to other ranks) of one layer's forward, one rank, one micro-batch, as
    :func:`~dist_train.cost.shape.cp_execution` runs them; the backward runs the adjoint exchanges, as many
    and as many bytes. Each sends (u−1)/u of this rank's q, k, v to the heads' owners and gets its share of
    the output back: loc.tokens · (2q + 2kv·kv_repeat) · (u−1)/u elements (a GPT's K/V heads travel repeated
    when u does not divide them, :class:`~dist_train.cost.shape.CpExecution`). Swin's uneven bands send unequal amounts;
    this is their mean over the cp group (tests/test_wp_cp_model.py counts both against it)."""
    cpx = cp_execution(cfg)
    u = cpx.ulysses
    if u == 1:
        return 0, 0.0
    return cpx.all_to_alls, loc.tokens * (2 * loc.q + 2 * loc.kv * cpx.kv_repeat) * loc.bpe * (u - 1) / u


def ulysses_recompute_traffic(cfg: Config, loc: RankShape) -> tuple[int, float]:
    """(all-to-alls, bytes sent) that checkpointing re-runs of one layer's :func:`ulysses_traffic`, by
    :func:`~dist_train.cost.shape.recompute_scope`: every one under "layer" (the output's feeds wo / proj, which
    saves it); under "attention" (a GPT's selective) those of q, k, v only — torch's early stop ends the
    recompute at the core's last saved tensor and the output's all-to-all after it saves nothing
    (loc.tokens · (q + 2kv) · (u−1)/u elements)."""
    scope = recompute_scope(cfg)
    a2as, nbytes = ulysses_traffic(cfg, loc)
    if scope == "none" or a2as == 0:
        return 0, 0.0
    if scope == "layer":
        return a2as, nbytes
    cpx = cp_execution(cfg)
    u = cpx.ulysses
    return a2as - 1, loc.tokens * (loc.q + 2 * loc.kv * cpx.kv_repeat) * loc.bpe * (u - 1) / u


def tp_collectives(cfg: Config) -> tuple[int, int]:
    """(all-reduces, all-gathers + reduce-scatters) of the tp group per layer and micro-batch, each over the
    layer's [tokens, d] activations (an all-gather or reduce-scatter moves half an all-reduce's bytes):
    forward and backward 2 each — the row-parallel wo / proj and w2 / fc2 sums, and the column-parallel
    linears' input gradients (with sequence parallelism: an all-gather into each column group and a reduce-scatter
    out of each row layer, and their adjoints, + in backward each column group's all-gather again, as it keeps
    only its local chunk: ``TensorParallel.gathered_linears``, 10). Full checkpointing re-runs the forward's up to
    w2 / fc2 (torch's early stop: w2's own sum comes after the layer's last saved tensor): wo's all-reduce, or with
    sp the two all-gathers and wo's reduce-scatter. A GPT's selective re-runs none (the attention core has no tp
    collective)."""
    p = cfg.parallel
    if p.tp == 1:
        return 0, 0
    again = recompute_scope(cfg) == "layer"
    if p.sequence_parallel and cfg.model.kind == "gpt":
        return 0, 10 + 3 * again
    return 4 + again, 0


def swin_halo_traffic(cfg: Config, sh: Shape, loc: RankShape) -> tuple[int, float]:
    """(rolls, bytes sent) of one shifted swin block's forward on a rank of the largest wp tile, one
    micro-batch (the backward sends the same back). Without cp the block rolls x (d channels) out and back;
    with cp (Ulysses inside windows, ``models/swin.py``) the whole tile's q|k|v of this rank's heads out and
    its attention output back: 4·q/u channels, q = d/tp. Tokens: the tile's two strips and corner
    (``parallelism.window.halo_tokens``; an axis with one tile rolls locally)."""
    gh, gw = cfg.wp_grid
    if sh.kind != "swin" or gh * gw == 1:
        return 0, 0.0
    wh, ww = sh.window
    sh_h, sh_w = (wh // 2 if gh > 1 else 0), (ww // 2 if gw > 1 else 0)
    tile_h, tile_w = math.ceil(sh.grid[0] // wh / gh) * wh, math.ceil(sh.grid[1] // ww / gw) * ww
    halo = sh_h * tile_w + sh_w * tile_h - sh_h * sh_w
    u = cp_execution(cfg).ulysses
    channels = 2 * sh.d if u == 1 else 4 * loc.q / u
    return 2, halo * micro_batch_samples(cfg) * channels * loc.bpe


def outer_ops(cfg: Config, sh: Shape, loc: RankShape) -> float:
    """Forward ops of one micro-batch outside the layers (:data:`OUTER_OPS`, + :data:`LOSS_CHUNK_OPS` per chunk of a
    GPT's chunked loss over the rank's tokens), charged to every rank as the head's matmul is."""
    ops = float(OUTER_OPS[sh.kind])
    chunk = resolve_loss_chunk(cfg.train.loss_chunk, int(loc.vocab)) if sh.kind == "gpt" else None
    if chunk is not None:
        ops += LOSS_CHUNK_OPS * math.ceil(loc.tokens / chunk)
    return ops


def host_bound_seconds(device_s: float, ops: float, prof: DeviceProfile) -> float:
    """Seconds of work that takes ``device_s`` on the device and dispatches ``ops`` eager ops from the host: on an
    asynchronous-launch profile the host launches op i+1 while the device runs op i, so the slower of the two sets
    the pace, max(device_s, ops · host_op_us); ``host_op_us`` 0 (the CPU, whose ops run on the host and cost
    ``op_overhead_us`` inside ``device_s``) leaves ``device_s`` exactly."""
    return max(device_s, ops * prof.host_op_us * 1e-6)


def _allreduce_s(nbytes: float, n: int, link) -> float:
    if n <= 1:
        return 0.0
    return 2 * (n - 1) / n * nbytes / (link.bw_gbs * 1e9) + 2 * (n - 1) * link.latency_us * 1e-6


def _allgather_s(nbytes: float, n: int, link) -> float:
    """Ring all-gather (or reduce-scatter) of ``nbytes`` (the full, unsharded size) over n ranks."""
    return _allreduce_s(nbytes, n, link) / 2


def fsdp_comm(cfg: Config, sh: Shape, loc: RankShape, n_local: float, compute_mb: float, link,
              overlap: float) -> dict:
    """FSDP2's communication per step (engines/fsdp.py) and what of it is exposed:

    * pp = 1: per micro-batch, each block all-gathers its weights (compute precision) in forward and — with
      ``fsdp_reshard_after_forward`` — again in backward, and reduce-scatters its gradients in fp32; the
      next block's all-gather and the previous block's reduce-scatter overlap the current block's compute
      (``profile.overlap`` of it), the first all-gather and the last reduce-scatter cannot;
    * pp > 1: the stage all-gathers once (first micro-batch's forward, overlapping it) and reduce-scatters
      once after the last backward (``PipelineStage.perform_reduce_grad``: not overlapped)."""
    p, bpe, g = cfg.parallel, loc.bpe, loc.grad_shards
    accum = step_micro_batches(cfg)
    unit = fsdp_layer_params(cfg, sh)
    ag, rs = _allgather_s(n_local * bpe, g, link), _allgather_s(n_local * 4, g, link)
    first_ag, last_rs = _allgather_s(unit * bpe, g, link), _allgather_s(unit * 4, g, link)
    if p.pp > 1:
        total = ag + rs
        exposed = max(first_ag, ag - overlap * compute_mb / 3) + rs
    else:
        per_mb = ag * (2 if p.fsdp_reshard_after_forward else 1) + rs
        total = accum * per_mb
        exposed = accum * (first_ag + last_rs + max(0.0, per_mb - first_ag - last_rs
                                                     - overlap * compute_mb))
    return {"total": total, "exposed": exposed}


def zero_dp_comm_s(cfg: Config, sh: Shape, loc: RankShape, load: RankLoad, n_local: float, link) -> float:
    """Seconds of DeepSpeed ZeRO's data-parallel collectives per step on the rank holding ``load`` (``n_local``
    parameters) over ``loc.grad_shards`` ranks: ZeRO-0/1/2 an all-reduce of the gradients; ZeRO-3 a reduce-scatter
    of the gradients and an all-gather of the parameters in the forward and again in the backward — but not of its
    persistent parameters (:func:`~dist_train.cost.memory.zero3_persistent_params`), which it gathers once and keeps
    whole (partitioned_param_coordinator.py gathers only NOT_AVAILABLE parameters; stage3.py re-gathers the
    persistent ones after the optimizer step, that all-gather is the step's own: counted once with the rest)."""
    g, bpe = loc.grad_shards, loc.bpe
    grad_bytes = n_local * bpe
    if cfg.parallel.zero_stage != 3 or g <= 1:
        return _allreduce_s(grad_bytes, g, link)
    persistent = zero3_persistent_params(cfg, sh, load, n_local)
    return _allgather_s(grad_bytes, g, link) + 2 * _allgather_s((n_local - persistent) * bpe, g, link)


def time_model(cfg: Config, sh: Shape, prof: DeviceProfile, loc: RankShape, mem: dict, world: int,
               load: RankLoad) -> dict:
    """Seconds per optimizer step by component (+ "step", the total, and "comm_total", all communication)
    on the rank of ``world`` that holds ``load`` (``mem``: :func:`~dist_train.cost.memory.memory_model` of that
    rank)."""
    p = cfg.parallel
    bpe = loc.bpe
    accum = step_micro_batches(cfg)
    ranks_per_node = min(world, prof.devices_per_node if prof.cores is None else world)
    share = prof.compute_share(ranks_per_node)
    scope = recompute_scope(cfg)
    # a recomputed forward adds one forward to the forward + backward (3 forwards' worth): the layer's matmuls
    # but its last (flops.recompute_flops_per_token: torch's early stop leaves out w2 / fc2, whose output nothing
    # saves — unless shape.recompute_runs_last_matmul: Megatron's tp linears), elementwise passes and ops under
    # full checkpointing; the attention core (its kernel and its cp steps) under either — a GPT's selective
    # re-runs exactly the core (4 of the 12·d·S_eff)
    recompute = 4.0 / 3.0 if scope == "layer" else 1.0
    core_recompute = 1.0 if scope == "none" else \
        1.0 + recompute_flops_per_token(sh, "attention") / (attention_flops_per_key(sh) * sh.keys_per_query)

    # -- compute per micro-batch ---------------------------------------------------------------
    mm = 0.0
    matmuls, last_matmul = _matmuls(sh, loc), recompute_runs_last_matmul(cfg)
    for i, (k, n, c) in enumerate(matmuls):
        again = recompute if i < len(matmuls) - 1 or last_matmul else 1.0  # the last (w2 / fc2): see above
        mm += again * c * 6.0 * loc.tokens * k * n / (prof.matmul_tflops_at(int(k), int(n)) * 1e12)
    mm *= loc.layers
    mm += 6.0 * loc.tokens * sh.d * loc.vocab / (prof.matmul_tflops_at(sh.d, int(loc.vocab)) * 1e12)  # the head
    if sh.kind == "swin":
        mm += 6.0 * loc.tokens * sh.embed_in * sh.d / (prof.matmul_tflops_at(sh.embed_in, sh.d) * 1e12)

    attn_flops = 12.0 * loc.q * sh.keys_per_query * loc.tokens * loc.layers
    kernel_keys = sh.span
    imbalance = 1.0
    cpx = cp_execution(cfg)
    ring = cpx.ring
    if ring > 1:
        kernel_keys = max(1, int(sh.span / ring))
        causal_full = cfg.model.attention_window is None
        if p.cp_layout == "contiguous" and causal_full:
            imbalance = (2 * ring - 1) / ring  # the last rank's critical path: P - 1/2 blocks vs P/2
    attn = attn_flops * imbalance * core_recompute / (prof.attention_tflops_at(kernel_keys) * 1e12)

    el = activation_elems_per_token(cfg, sh, prof, loc)
    elems = el["replicated"] + el["gathered"] + el["parallel"] + el["ulysses"]
    ew = ELEMENTWISE_PASSES * elems * bpe * loc.tokens * loc.layers * recompute / (prof.mem_bw_gbs * 1e9)
    ew += 6 * loc.tokens * loc.vocab * 4 / (prof.mem_bw_gbs * 1e9)  # logits, log-softmax, their gradients
    ops = (FUSED_OPS_PER_LAYER if prof.fused_kernels else EAGER_OPS_PER_LAYER[sh.kind]) * loc.layers
    core_ops = 0.0  # the cp steps' ops run inside the attention core
    if p.cp > 1:
        pieces = loc.tokens / ring_piece_tokens(cfg, loc)   # one sub-ring per K/V piece
        core_ops = loc.layers * (RING_OPS_PER_STEP * (ring - 1) * pieces + (ULYSSES_OPS if cpx.ulysses > 1 else 0))
    ops_mb = ops * recompute + core_ops * core_recompute
    ovh = ops_mb * prof.op_overhead_us * 1e-6
    device_mb = (mm + attn + ew + ovh) / share
    host_ops_mb = ops_mb + outer_ops(cfg, sh, loc)
    compute_mb = host_bound_seconds(device_mb, host_ops_mb, prof)

    # -- communication per micro-batch -----------------------------------------------------------
    tp_s = 0.0
    if p.tp > 1:
        link = prof.link(p.tp)
        all_reduces, halves = tp_collectives(cfg)
        tp_s = loc.layers * (all_reduces * _allreduce_s(loc.tokens * sh.d * bpe, p.tp, link)
                             + halves * _allgather_s(loc.tokens * sh.d * bpe, p.tp, link))
    cp_exposed = 0.0
    passes = exchange_passes(cfg)
    if p.cp > 1:
        link = prof.link(p.cp * p.tp)
        (a2as, a2a_bytes), (r_a2as, r_bytes) = ulysses_traffic(cfg, loc), ulysses_recompute_traffic(cfg, loc)
        if a2as:  # forward and backward, + what the recompute re-runs
            cp_exposed += loc.layers * ((2 * a2a_bytes + r_bytes) / (link.bw_gbs * 1e9)
                                        + (2 * a2as + r_a2as) * (cpx.ulysses - 1) * link.latency_us * 1e-6)
        if ring > 1:
            pieces = loc.tokens / ring_piece_tokens(cfg, loc)
            blk = 2 * loc.tokens * loc.kv * cpx.kv_repeat * bpe / pieces  # one K/V block (piece; hybrid: repeated heads)
            per_step_comm = link.seconds(blk, 2)
            per_step_compute = (attn / max(1, ring)) / loc.layers / share / pieces
            hidden = prof.overlap * per_step_compute
            fwd = (ring - 1) * pieces * max(0.0, per_step_comm - hidden)
            cp_exposed += loc.layers * (passes + 1) * fwd  # backward: K/V again plus dK/dV
    wp_s = 0.0
    rolls, halo_bytes = swin_halo_traffic(cfg, sh, loc)
    if rolls:
        gh, gw = cfg.wp_grid
        link = prof.link(gh * gw * p.cp)
        per_pass = halo_bytes / (link.bw_gbs * 1e9) + rolls * 3 * link.latency_us * 1e-6  # 2 strips + corner
        # the shifted blocks (odd ones; stages hold whole pairs) of this rank's layers
        wp_s = (loc.layers // 2) * halo_passes(cfg) * per_pass * (1 - prof.overlap)
    pp_s = 0.0
    bubble = bubble_fraction(cfg)
    if p.pp > 1:
        link = prof.link(world)
        pp_s = 2 * link.seconds(loc.tokens * sh.d * bpe)
    per_mb = compute_mb + tp_s + cp_exposed + wp_s + pp_s
    body = accum * per_mb / (1 - bubble) if bubble < 1 else float("inf")

    # -- once per step ---------------------------------------------------------------------------
    n_local = rank_params(cfg, sh, load)
    tensors = (9 if sh.kind == "gpt" else 13) * loc.layers + 3
    shards = loc.grad_shards if (p.zero_stage or 0) >= 1 or p.fsdp else 1
    # the optimizer's own dispatch (no autograd: ~3.5 us per op, not a forward op's host_op_us, gpucheck's dispatch
    # section) is not in the host term: host_op_us would overstate it several times over (docs/planner.md)
    opt = (n_local / shards * 4 * 10 / (prof.mem_bw_gbs * 1e9)
           + tensors * OPTIMIZER_OPS_PER_TENSOR * prof.op_overhead_us * 1e-6) / share
    grad_bytes = n_local * bpe
    g = loc.grad_shards
    dp_link = prof.link(world // max(1, p.pp))
    dp_comm = zero_dp_comm_s(cfg, sh, loc, load, n_local, dp_link)
    backward = accum * compute_mb * 2 / 3
    bucket = min(grad_bytes, 25 * 2 ** 20)
    last_bucket = _allreduce_s(bucket, g, dp_link)
    dp_exposed = max(last_bucket, dp_comm - prof.overlap * backward) if g > 1 else 0.0
    if p.fsdp and g > 1:
        fsdp = fsdp_comm(cfg, sh, loc, n_local, compute_mb, dp_link, prof.overlap)
        dp_comm, dp_exposed = fsdp["total"], fsdp["exposed"]
    small = 2 * _allreduce_s(8, g, dp_link)  # token count and loss all-reduces
    out = {"matmul": accum * mm / share, "attention": accum * attn / share, "elementwise": accum * ew / share,
           "op_overhead": accum * ovh / share, "host_dispatch_exposed": accum * (compute_mb - device_mb),
           "optimizer": opt, "tp_comm": accum * tp_s,
           "cp_comm_exposed": accum * cp_exposed, "wp_halo_exposed": accum * wp_s, "pp_p2p": accum * pp_s,
           "pp_bubble": body - accum * per_mb, "dp_comm_exposed": dp_exposed + small}
    out["step"] = body + opt + dp_exposed + small
    out["comm_total"] = accum * (tp_s + cp_exposed + wp_s + pp_s) + dp_exposed + small
    # per step: the eager ops the host dispatches for the micro-batches' compute, their dispatch seconds, the
    # device's seconds they overlap and whether the device waits (predict moves it to Prediction.host)
    dispatch = accum * host_ops_mb * prof.host_op_us * 1e-6
    out["host"] = {"ops": accum * host_ops_mb, "dispatch_s": dispatch, "device_s": accum * device_mb,
                   "bound": compute_mb > device_mb}
    return out

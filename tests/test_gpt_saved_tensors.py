"""The cost model's GPT activation memory against what autograd really keeps.

Every tensor the layers of a rank's GPT (``GPT.run_layers``, the real model with its real attention: CPU SDPA,
the cp ring, Ulysses, Megatron tp linears) save for backward is caught with
``torch.autograd.graph.saved_tensors_hooks`` (one storage counted once, parameters left out) and compared
with ``cost.memory.memory_model``'s activations: equal to the byte, once the stage output (which the model
keeps for the consumer of the layers, the final norm or the next pipeline stage) is added to the count.
Under full checkpointing the forward keeps the layer inputs (and RoPE's cos/sin); the model also holds one
layer being recomputed in backward, which the forward cannot show. Cases: multi-head and grouped-query
shapes, checkpointing none / selective / full, and on two gloo ranks cp 2 (ring; Ulysses with and without
the zigzag permutation, with repeated K/V heads) and tp 2 with and without sequence parallelism.

16-bit training is counted live as well: every storage the forward's ops created that is still alive at its end,
inside the autocast region (a TorchDispatchMode with weak references), because autocast caches its bf16 weight
copies for the region whether or not autograd saves them (under full checkpointing, inside Megatron's linears).
Cases: CPU bf16 autocast (the DDP and pipeline engines), DeepSpeed's bf16 module (its parameters cast, no
autocast; also the module of a real DeepSpeed engine), a real FSDP2 bf16 engine's GPT (saved tensors, its gathered
weights left out), tp 2 with and without sequence parallelism, Ulysses.
"""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch.distributed.tensor import DTensor
from torch.profiler import ProfilerActivity, record_function

from dist_train.bench.attention import _UNKNOWN_BLOCK_FREED, _memory_events, _quiet_profile, peak_tensor_bytes
from dist_train.config import config_from_dict
from dist_train.cost.layout import axis_sizes, load_of, rank_coords, stages_of_rank
from dist_train.cost.memory import (activation_elems_per_token, autocast_weight_bytes, embedding_kept_bytes,
                                    loss_kept_bytes, memory_model, optimizer_step_bytes, rank_memory,
                                    ulysses_permutation_bytes)
from dist_train.cost.shape import rank_inputs
from dist_train.engines import build_engine
from dist_train.held_stderr import stderr_held_back
from dist_train.mesh import build_mesh
from dist_train.models.gpt import build_gpt
from dist_train.optim import build_optimizer
from dist_train.plan.profiles import builtin_profiles
from tests.dist_harness import run_ranks
from tests.saved_tensors import LiveStorages, kept_storages, parameter_storages

# (d_model, heads, kv heads, ffn, seq_len): grouped-query and multi-head
SHAPES = [(64, 4, 2, 128, 64), (48, 3, 3, 80, 32)]
CPU = builtin_profiles()["cpu"]


def _config(d, heads, kv, ffn, seq, activation_checkpointing: str = "none", micro_batch: int = 1,
            window=None, precision: str = "fp32", **parallel):
    return config_from_dict({
        "model": {"kind": "gpt", "d_model": d, "n_layers": 2, "n_heads": heads, "n_kv_heads": kv, "ffn_hidden": ffn,
                  "vocab_size": 96, "attention_window": window},
        "data": {"seq_len": seq}, "parallel": copy.deepcopy(parallel),
        "train": {"global_batch": micro_batch * parallel.get("dp", 1), "micro_batch": micro_batch,
                  "precision": precision,
                  "activation_checkpointing": activation_checkpointing}})


def counted_bytes(cfg, world: int = 1, micro_batches: int = 1, live: bool = False, model=None,
                  device: str = "cpu") -> float:
    """Bytes the forward of this rank's layers keeps for backward plus the outputs it hands on,
    ``micro_batches`` forwards of random fp32 embeddings; in bf16 all of them in one torch.autocast region (as
    the pipeline engine runs its schedule; the DDP engine's region holds one). Counted: the storages autograd
    saves (``saved_tensors_hooks``, each storage once); ``live``: every storage the forward's ops created that
    is still alive at its end, inside the region — what it saves, what autocast caches, the outputs. ``model``:
    count that GPT (an engine's module) instead of building one; ``device``: where the model runs (tests/
    test_gpu_path.py counts on CUDA)."""
    rank = torch.distributed.get_rank() if world > 1 else 0
    p = cfg.parallel
    if model is None:
        model = build_gpt(cfg, build_mesh(p, world), torch.device(device)).train()
        if cfg.train.precision == "bf16" and p.zero_stage is not None:
            model.to(torch.bfloat16)  # DeepSpeed's bf16 mode casts the parameters; it runs no autocast
    params = parameter_storages(model)
    s_local = cfg.data.seq_len // p.cp
    s_stream = s_local // p.tp if p.sequence_parallel else s_local
    gen = torch.Generator().manual_seed(rank)
    positions = torch.arange(rank * s_local, (rank + 1) * s_local, device=device)
    autocast = (torch.autocast(device, dtype=torch.bfloat16)
                if cfg.train.precision == "bf16" and p.zero_stage is None else contextlib.nullcontext())
    dtype = next(model.parameters()).dtype
    with autocast:  # a first forward builds what is cached per process (cp plans, sub-groups), not per step
        model.run_layers(torch.randn(cfg.train.micro_batch, s_stream, cfg.model.d_model, dtype=dtype,
                                     device=device, requires_grad=True), positions)
    created = LiveStorages()
    with kept_storages(params) as kept, autocast:
        with created if live else contextlib.nullcontext():
            xs = [torch.randn(cfg.train.micro_batch, s_stream, cfg.model.d_model, generator=gen,
                              dtype=next(model.parameters()).dtype).to(device).requires_grad_()
                  for _ in range(micro_batches)]
            outs = [model.run_layers(x, positions) for x in xs]
        if live:
            # the test's inputs stand for the embedding output, which lives on only if a layer saves it
            inputs = {x.untyped_storage().data_ptr() for x in xs}
            return created.live_bytes(params | (inputs - set(kept)), set(kept))
    return sum(kept.values()) + sum(out.untyped_storage().nbytes() for out in outs)


def predicted_bytes(cfg, profile=CPU) -> float:
    """The memory model's activations of ``cfg``'s rank, less under full checkpointing the one layer it
    holds while recomputing it in backward, and less what the embedding keeps (the count starts at the layers;
    tests/test_gpt_embedding_memory.py counts the embedding)."""
    sh, loc = rank_inputs(cfg, profile)
    acts = memory_model(cfg, sh, profile, loc)["activations"] - embedding_kept_bytes(cfg, sh, loc)
    if cfg.train.activation_checkpointing == "full":
        acts -= sum(activation_elems_per_token(cfg, sh, profile, loc).values()) * loc.tokens * loc.bpe
    if cfg.train.activation_checkpointing != "none":
        # the hybrid layer's permutation lives in ulysses.gathered_permutation's cache; the forward saves it only
        # where the attention core is not checkpointed, so here the cache alone keeps it, unseen by the hooks
        acts -= ulysses_permutation_bytes(cfg, sh)
    return acts


@pytest.mark.parametrize("checkpointing", ["none", "selective", "full"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"d{s[0]}h{s[1]}kv{s[2]}f{s[3]}")
def test_gpt_activation_model_is_the_saved_tensors(shape, checkpointing):
    cfg = _config(*shape, activation_checkpointing=checkpointing)
    assert counted_bytes(cfg) == pytest.approx(predicted_bytes(cfg), rel=1e-12)


def test_gpt_saved_tensors_per_token_and_layer():
    """The hand count of one layer of d 64, 4 heads, 2 KV heads (head 16), f 128, fp32, one sample: each RMSNorm
    keeps x and its output (4d), rstd (2) — x·rstd is recomputed in backward (models/lean_autograd.rms_norm;
    autograd's composition kept it: 1,094 per token); RoPE only cos/sin (2·16 per stage); attention q, k, v, the
    output and the logsumexp (2q + 2kv + 4); SwiGLU gate, up and w2's input 3f — silu(gate) is recomputed in
    backward (models/lean_autograd.swiglu; 4f, 966 per token, before) — 838 + 32 per token, where the first model
    said 1,216."""
    cfg = _config(*SHAPES[0])
    tokens, layers = 64, 2
    assert counted_bytes(cfg) / 4 / tokens == layers * (4 * 64 + 2 + 2 * 64 + 2 * 32 + 4 + 3 * 128) + 2 * 16 + 64
    # two samples share one cos/sin: half of it per token
    two = _config(*SHAPES[0], micro_batch=2)
    assert counted_bytes(two) == pytest.approx(predicted_bytes(two), rel=1e-12)


@pytest.mark.parametrize("attention", [{"attn_kernel": "math"}, {"window": 16}, {"window": 16, "attn_kernel": "math"}],
                         ids=["math", "window", "window_math"])
def test_gpt_attention_keeps_no_scores_with_any_kernel(attention):
    """attn_kernel math without cp is torch SDPA all the same, and the block kernels of a window run inside
    RingAttention, which keeps q, k, v, the output and the logsumexp: no scores (the model added 2·heads·S)."""
    cfg = _config(*SHAPES[0], **attention)
    assert counted_bytes(cfg) == pytest.approx(predicted_bytes(cfg), rel=1e-12)


@pytest.mark.parametrize("checkpointing", ["none", "selective", "full"])
def test_gpt_bf16_autocast_keeps_fp32_norms_bf16_casts_and_weight_copies(checkpointing):
    """train.precision bf16 (torch.autocast on CPU, fp32 parameters): the residual stream, x of each norm (x·rstd is
    recomputed in backward), rstd, the logsumexp and cos/sin stay fp32; each norm's output is cast to bf16 once and
    its linears keep that one cast (each of the 5 linears kept its own before: models/autocast_input.py); matmul
    outputs are bf16; each linear keeps autocast's bf16 copy of its weight (cached for the region: under full
    checkpointing nothing saves them but the cache holds them to the forward's end); and under selective
    checkpointing the core's inputs q and k are RoPE's fp32 outputs."""
    cfg = _config(*SHAPES[0], activation_checkpointing=checkpointing, precision="bf16")
    assert counted_bytes(cfg, live=True) == pytest.approx(predicted_bytes(cfg), rel=1e-12)
    if checkpointing != "full":
        assert counted_bytes(cfg) == counted_bytes(cfg, live=True)  # all of it saved for backward


@pytest.mark.parametrize("checkpointing", ["none", "selective", "full"])
def test_gpt_bf16_module_of_deepspeed_keeps_bf16_stream_and_no_weight_copies(checkpointing):
    """ZeRO (DeepSpeed) in bf16 casts the parameters to bf16 and runs no autocast (here: the module cast as DeepSpeed's
    bf16 mode does, ``_cast_module_mixed_precision``): the residual stream, cos/sin and matmul inputs are bf16, each
    norm keeps its bf16 input x (its fp32 upcast and a bf16 x·rstd before models/lean_autograd.rms_norm), one bf16
    output per norm, no weight copies."""
    cfg = _config(*SHAPES[0], activation_checkpointing=checkpointing, precision="bf16", zero_stage=1)
    assert counted_bytes(cfg, live=True) == pytest.approx(predicted_bytes(cfg), rel=1e-12)


def test_gpt_autocast_weight_copies_are_one_per_region_not_per_micro_batch():
    """torch.autocast caches a weight's bf16 copy for the region (CPU as CUDA): two micro-batches in one region
    (the pipeline engine's whole schedule) share one copy of each weight; everything else doubles. Under full
    checkpointing the copies are cached, not saved: the forward keeps no weight."""
    cfg = _config(*SHAPES[0], precision="bf16")
    sh, loc = rank_inputs(cfg, CPU)
    copies = autocast_weight_bytes(cfg, sh, loc, loc.loads[0])
    assert copies == 2 * (64 * (2 * 64 + 2 * 32) + 3 * 64 * 128) * 2           # 2 layers, bf16
    assert counted_bytes(cfg, micro_batches=2) == pytest.approx(2 * (predicted_bytes(cfg) - copies) + copies)
    full = _config(*SHAPES[0], activation_checkpointing="full", precision="bf16")
    assert counted_bytes(full) == pytest.approx(predicted_bytes(full) - copies, rel=1e-12)
    assert counted_bytes(full, live=True) == pytest.approx(predicted_bytes(full), rel=1e-12)


# (name, parallel (and precision), shape, checkpointing) on two ranks
RANK_CASES = [
    ("cp2_ring", {"cp": 2}, SHAPES[0], "none"),
    ("cp2_ring_selective", {"cp": 2}, SHAPES[0], "selective"),
    ("cp2_ring_math", {"cp": 2, "attn_kernel": "math"}, SHAPES[0], "none"),
    ("cp2_ulysses_zigzag", {"cp": 2, "cp_method": "ulysses"}, SHAPES[0], "none"),
    ("cp2_ulysses_contiguous", {"cp": 2, "cp_method": "ulysses", "cp_layout": "contiguous"}, SHAPES[0], "none"),
    ("cp2_ulysses_repeated_kv", {"cp": 2, "cp_method": "ulysses"}, (64, 4, 1, 128, 64), "none"),
    ("cp2_ulysses_selective", {"cp": 2, "cp_method": "ulysses"}, SHAPES[0], "selective"),
    ("cp2_ulysses_full", {"cp": 2, "cp_method": "ulysses"}, SHAPES[0], "full"),
    ("tp2", {"tp": 2}, SHAPES[0], "none"),
    ("tp2_sp", {"tp": 2, "sequence_parallel": True}, SHAPES[0], "none"),
    ("tp2_sp_selective", {"tp": 2, "sequence_parallel": True}, SHAPES[0], "selective"),
    ("tp2_bf16", {"tp": 2, "precision": "bf16"}, SHAPES[0], "none"),
    ("tp2_sp_bf16", {"tp": 2, "sequence_parallel": True, "precision": "bf16"}, SHAPES[0], "none"),
    ("cp2_ulysses_selective_bf16", {"cp": 2, "cp_method": "ulysses", "precision": "bf16"}, SHAPES[0], "selective"),
]


def _rank_counts(rank: int, world: int, cases) -> dict:
    out = {}
    for name, parallel, shape, checkpointing in cases:
        cfg = _config(*shape, activation_checkpointing=checkpointing, **parallel)
        # Megatron's tp linears cast their weights inside their autograd Function: autocast caches those copies
        # for the region without saving them, so bf16 is counted live
        out[name] = (counted_bytes(cfg, world, live=cfg.train.precision == "bf16"), predicted_bytes(cfg))
    return out


def _deepspeed_counts(rank: int, world: int) -> tuple:
    cfg = _config(*SHAPES[0], precision="bf16", dp=2, zero_stage=1)
    mesh = build_mesh(cfg.parallel, world)
    engine = build_engine(cfg, build_gpt(cfg, mesh, torch.device("cpu")), mesh, torch.bfloat16)
    return counted_bytes(cfg, world, live=True, model=engine.module.train()), predicted_bytes(cfg)


@pytest.mark.slow
def test_gpt_activation_model_of_a_real_deepspeed_bf16_engine():
    """The module a real DeepSpeed engine trains (dp 2, ZeRO-1, bf16 on two gloo ranks, 6 s): what its layers keep
    is the model's bf16-module count (its parameters are bf16; nothing autocasts)."""
    for counted, predicted in run_ranks(_deepspeed_counts, 2, timeout=300):
        assert counted == pytest.approx(predicted, rel=1e-12)


@pytest.mark.slow
def test_gpt_activation_model_under_cp_and_tp_is_the_saved_tensors():
    """cp 2 and tp 2 on two gloo ranks (3 s): the ring keeps what one rank keeps per token; Ulysses keeps the
    head-sharded q, k, v, output (+ repeated K/V heads), wo's sequence-layout copy of the output and, zigzag,
    the permutation; tp halves the heads and the MLP but not the norms, and sequence parallelism halves the
    norms and the norm outputs the column-parallel linears keep (their local chunk, gathered again in backward;
    the all-gathered ones were kept before TensorParallel.gathered_linears)."""
    for rank_out in run_ranks(_rank_counts, 2, args=(RANK_CASES,), timeout=180):
        for name, (counted, predicted) in rank_out.items():
            assert counted == pytest.approx(predicted, rel=1e-12), (name, counted, predicted)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_gpt_forward_end_is_activations_and_what_the_loss_keeps(precision):
    """The whole single-rank forward (embedding, layers, chunked loss), counted live at its end inside the autocast
    region: the activations + what the loss keeps for its backward (``loss_kept_bytes``: the final norm's rstd (its
    x is the stage output), the fp32 dL/dh and dL/dW the chunked loss computes in the forward, autocast's copy of
    the head weight) — to the loss's two fp32 scalars. The model said dL/dh only (in the compute dtype) + dL/dW in
    16-bit."""
    cfg = _config(*SHAPES[0], micro_batch=2, precision=precision)
    model = build_gpt(cfg, build_mesh(cfg.parallel, 1), torch.device("cpu")).train()
    params = parameter_storages(model)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 96, (2, 64), generator=gen)
    batch = {"tokens": tokens, "labels": torch.roll(tokens, -1, 1), "positions": torch.arange(64)}
    batch_storages = {t.untyped_storage().data_ptr() for t in batch.values()}
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    created = LiveStorages()
    with autocast:
        with created:
            loss, count = model(batch)
        live = created.live_bytes(params | batch_storages, set())
    sh, loc = rank_inputs(cfg, CPU)
    mem = memory_model(cfg, sh, CPU, loc)
    kept = mem["activations"] + loss_kept_bytes(cfg, sh, loc, CPU)
    assert live - (loss.untyped_storage().nbytes() + count.untyped_storage().nbytes()) == kept


def _sp_loss_ends(rank: int, world: int) -> list:
    """Per precision: (bytes the GPT's loss forward leaves alive at its end, less its two scalars;
    ``loss_kept_bytes``) for tp 2 with sequence parallelism — the loss alone (from the last hidden chunk
    [B, S/tp, d]), as Megatron's embedding keeps its masked token ids and mask, which the model does not count."""
    out = []
    for precision in ("fp32", "bf16"):
        cfg = _config(*SHAPES[0], micro_batch=2, precision=precision, tp=2, sequence_parallel=True)
        model = build_gpt(cfg, build_mesh(cfg.parallel, world), torch.device("cpu")).train()
        params = parameter_storages(model)
        seq = cfg.data.seq_len
        gen = torch.Generator().manual_seed(rank)
        x = torch.randn(2, seq // world, cfg.model.d_model, generator=gen).requires_grad_()
        labels = torch.randint(0, cfg.model.vocab_size, (2, seq), generator=torch.Generator().manual_seed(0))
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
        created = LiveStorages()
        with kept_storages(params) as kept, autocast:  # saved tensors count even when a collective read them
            with created:
                loss, count = model.loss(x, labels)
            inputs = {x.untyped_storage().data_ptr(), labels.untyped_storage().data_ptr()}
            live = created.live_bytes(params | inputs, set(kept))
        sh, loc = rank_inputs(cfg, CPU)
        out.append((live - loss.untyped_storage().nbytes() - count.untyped_storage().nbytes(),
                    loss_kept_bytes(cfg, sh, loc, CPU)))
    return out


@pytest.mark.slow
def test_gpt_loss_under_sequence_parallelism_keeps_the_local_chunk_of_dh():
    """tp 2 with sequence parallelism on two gloo ranks (3 s), fp32 and bf16: the chunked loss reduce-scatters dL/dh
    in its forward and keeps this rank's [B, S/tp, d] of it, so what the loss's forward leaves alive is
    ``loss_kept_bytes`` (÷tp dL/dh) exactly. Failed before: the loss all-gathered h first and kept dL/dh [B, S, d],
    16 KiB more per rank here."""
    for per_rank in run_ranks(_sp_loss_ends, 2, timeout=180):
        for counted, predicted in per_rank:
            assert counted == predicted


def _step_phases_above_states(cfg) -> dict:
    """``rank_memory``'s phases of ``cfg``'s rank less what lives before the step (baseline, weights, optimizer state,
    DDP buckets) and, in the backward, the gradients: the step's live tensors as the meter sees them (the
    gradients exist from a first step on and are accumulated in place)."""
    sh, loc = rank_inputs(cfg, CPU)
    mem, phases = rank_memory(cfg, sh, CPU, loc)
    states = mem["baseline"] + mem["weights"] + mem["optimizer"] + mem["ddp_buckets"]
    return {"loss": phases["loss"] - states, "backward": phases["backward"] - states - mem["grads"]}


#: the record_function span that marks the forward inside a metered step
_FORWARD_SPAN = "test_gpt_saved_tensors.forward"


def _step_and_forward_peaks(forward) -> tuple[int, int]:
    """(peak, forward's peak) of CPU tensor memory over one ``forward().backward()``: the meter of
    ``bench.attention.peak_tensor_bytes`` (the c10 allocator's events, tensors from before ignored), its peak over
    the whole step and over the events up to the forward's end (a ``record_function`` span, on the events' clock).
    The allocator's events of a forward are those of the same forward metered alone, so one metered step gives both
    peaks (a second metered forward, and its backward, cost a third of each case: bf16 steps take ~3 s on CPU)."""
    with _quiet_profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof, \
            stderr_held_back(skip_containing=(_UNKNOWN_BLOCK_FREED,)):
        with record_function(_FORWARD_SPAN):
            loss = forward()
        loss.backward()
    forward_end = max(e.end_ns() for e in prof.profiler.kineto_results.events() if e.name() == _FORWARD_SPAN)
    live = peak = forward_peak = 0
    for t, nbytes in _memory_events(prof):
        live += nbytes
        peak = max(peak, live)
        if t <= forward_end:
            forward_peak = peak
    return peak, forward_peak


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("checkpointing", ["none", "selective", "full"])
def test_gpt_training_step_peak_is_the_memory_model(checkpointing, precision):
    """The whole step, measured: the peak of CPU tensor memory (torch.profiler's allocator events,
    ``bench.attention.peak_tensor_bytes``) over one forward + backward of a single-rank GPT (4,096 tokens,
    chunked loss; bf16: CPU autocast around the forward, as the DDP engine runs it) is the memory model's peak
    phase within 1%, and the forward alone (through the loss) is its "loss" phase. Without checkpointing the
    step peaks in the final norm's backward (6 fp32 [tokens, d] over every activation; the loss's peak, the chunk's
    logits and logsumexp's temporary, is 3% lower), under full checkpointing in the backward of the last layer
    (its recompute + SwiGLU's gradients). When written: the model within 0.03% of every peak; the sum it replaced
    (activations + loss + workspace) said +7.3% / +7.3% / +16% (fp32) and +4.3% / +4.0% / +39% (bf16)."""
    torch.set_num_threads(1)
    cfg = _config(64, 4, 2, 128, 4096, activation_checkpointing=checkpointing, precision=precision)
    model = build_gpt(cfg, build_mesh(cfg.parallel, 1), torch.device("cpu")).train()
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 96, (1, 4096), generator=gen)
    batch = {"tokens": tokens, "labels": torch.roll(tokens, -1, 1), "positions": torch.arange(4096)}
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()

    def forward():
        with autocast:
            return model(batch)[0]

    # as in training from the second step on: a forward has run and the gradients exist, accumulated into in place by
    # the metered backward. Zeros stand for a first backward's gradients: both peaks are the same to the byte (checked
    # for every case, 2026-12-01), and a first backward cost 4x its forward in bf16
    forward()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    peak, forward_peak = _step_and_forward_peaks(forward)
    phases = _step_phases_above_states(cfg)
    assert max(phases.values()) == pytest.approx(peak, rel=0.01), (phases, peak)
    if checkpointing == "full":
        # the checkpointed forward's own transient (one layer's intermediates) is not a phase: the backward's
        # recompute of the same layer keeps all of them at once, plus the gradients
        assert phases["loss"] < forward_peak < phases["backward"]
    else:
        assert phases["loss"] == pytest.approx(forward_peak, rel=0.01), (phases, forward_peak)


@pytest.mark.parametrize("shape", SHAPES)
def test_optimizer_step_transient_is_the_models(shape):
    """The optimizer phase's transient, measured: the allocator peak of a steady-state ``optimizer.step()`` (AdamW
    as ``optim.build_optimizer`` builds it, state allocated by a first step) is ``optimizer_step_bytes`` (fp32 sqrt and
    division of a matrix while the previous one's denom is still bound: w1 → w3 for the first shape, the last w2 → the
    head for the second, whose vocabulary rows outnumber f), to the step's few scalars. A first guess of two tensors of the
    largest parameter was 1/3 short."""
    cfg = _config(*shape)
    model = build_gpt(cfg, build_mesh(cfg.parallel, 1), torch.device("cpu")).train()
    optimizer = build_optimizer(list(model.named_parameters()), cfg.train)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    _, peak = peak_tensor_bytes(optimizer.step)
    sh, loc = rank_inputs(cfg, CPU)
    n_local = sum(p.numel() for p in model.parameters())
    predicted = optimizer_step_bytes(cfg, sh, loc, load_of(cfg, stages_of_rank(cfg, 0)), n_local)
    assert 0 <= peak - predicted <= 64, (peak, predicted)


# (parallel, micro-batches per step): the whole train_step of each engine, measured against the model's peak phase
ENGINE_CASES = {"ddp_m1": ({}, 1), "ddp_m2": ({}, 2), "ddp_dp2_m1": ({"dp": 2}, 1), "ddp_dp2_m2": ({"dp": 2}, 2),
                "pp2_1f1b_m4": ({"pp": 2, "microbatches": 4}, 4), "fsdp_dp2_m1": ({"dp": 2, "fsdp": True}, 1),
                "pp2_gpipe_m4": ({"pp": 2, "pp_schedule": "gpipe", "microbatches": 4}, 4),
                "pp2_interleaved_m4": ({"pp": 2, "pp_schedule": "interleaved", "microbatches": 4}, 4),
                "pp2_interleaved_m8": ({"pp": 2, "pp_schedule": "interleaved", "microbatches": 8}, 8)}
# (lowest, highest) of model / measured − 1, per case and pipeline rank, with what the model leaves out
ENGINE_BANDS = {
    "ddp_m1": (0.0, 0.03),        # conservative: every gradient in the backward, where only the head's exists yet
    "ddp_m2": (-0.005, 0.005),    # the first micro-batch made every gradient: exact
    "ddp_dp2_m1": (0.0, 0.03),    # conservative, as ddp_m1
    "ddp_dp2_m2": (-0.005, 0.005),
    # torch's schedules, counted from their order (cost/layout.schedule_peak: sends held, receive buffers, pending
    # losses): exact to the int64 scalars (a fused concatenation of both ids and labels on every rank, 8 B per token,
    # would fail these)
    "pp2_1f1b_m4": (-0.001, 0.001),
    "fsdp_dp2_m1": (0.0, 0.03),   # conservative, as ddp_m1
    "pp2_gpipe_m4": (0.0, 0.006),  # conservative: every gradient, where GPipe's first backward has made none yet
    # up to +0.2%: once in a full-suite run on a loaded machine rank 0's peak was 49,408 B (0.114%) below the usual
    # (equal to the model's), never reproduced alone or three at a time: a buffer the interleaved schedule holds at
    # the peak was already released, which depends on when the peer's transfer completes; the model stays an upper bound
    "pp2_interleaved_m4": (-0.001, 0.002),
    "pp2_interleaved_m8": (-0.001, 0.002),  # 4 rounds: the sends send_ops holds grow with every backward
}


def _engine_step_peaks(rank: int, world: int, names: list) -> dict:
    """Per case: (the allocator meter's peak over one steady-state ``engine.train_step`` — forward, backward and the
    optimizer step —, the model's peak phase less what lives before the step: baseline, weights, AdamW state, the
    pipeline stages' receive buffers), a
    4-layer GPT with 2,048 tokens per micro-batch. DDP's gradient buckets are not left out: the meter sees a
    gradient-sized buffer allocated within every synchronised step (with two micro-batches the peak is the first
    micro-batch's gradients + that buffer + the final norm's backward, exactly the model's with its ``ddp_buckets``)."""
    out = {}
    for name in names:
        parallel, n_micro = ENGINE_CASES[name]
        dp = parallel.get("dp", 1)
        cfg = config_from_dict({
            "model": {"kind": "gpt", "d_model": 64, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 128,
                      "vocab_size": 96},
            "data": {"seq_len": 2048}, "parallel": copy.deepcopy(parallel),
            "train": {"global_batch": n_micro * dp, "micro_batch": 1}})
        if cfg.world_size != world:
            continue
        mesh = build_mesh(cfg.parallel, world)
        engine = build_engine(cfg, build_gpt(cfg, mesh, torch.device("cpu")).train(), mesh, None)
        gen = torch.Generator().manual_seed(rank)
        micro = []
        for _ in range(n_micro):
            tokens = torch.randint(0, 96, (1, 2048), generator=gen)
            micro.append({"tokens": tokens, "labels": torch.roll(tokens, -1, 1), "positions": torch.arange(2048)})
        count = 2048.0 * n_micro * dp
        engine.train_step(micro, count)  # the optimizer state and the pipeline's buffers exist from here on
        _, peak = peak_tensor_bytes(lambda: engine.train_step(micro, count))
        sh, loc = rank_inputs(cfg, CPU)
        pp_rank = rank_coords(rank, axis_sizes(cfg.parallel))["pp"]
        mem, phases = rank_memory(cfg, sh, CPU, loc, load_of(cfg, stages_of_rank(cfg, pp_rank)))
        states = mem["baseline"] + mem["weights"] + mem["optimizer"] + mem["pp_buffers"]
        out[name] = (peak, max(phases.values()) - states)
        assert _receive_buffer_bytes(engine) == mem["pp_buffers"], (name, _receive_buffer_bytes(engine), mem)
    return out


def _receive_buffer_bytes(engine) -> int:
    """Bytes of the receive buffers the pipeline engine's ``PipelineStage`` objects hold between steps (one activation
    buffer per micro-batch on every stage but the first, one gradient buffer per micro-batch on every stage but the
    last); 0 for other engines."""
    schedule = getattr(engine, "_schedule", None)
    stages = [] if schedule is None else getattr(schedule, "_stages", None) or [schedule._stage]
    storages = {}
    for stage in stages:
        for infos in [*stage.args_recv_info.values(), *stage.grad_recv_info.values()]:
            for info in infos:
                if info.buffer is not None:
                    storage = info.buffer.untyped_storage()
                    storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
def test_engine_step_peak_is_the_memory_model(world):
    """Each engine's whole train_step (the DDP engine on one rank and dp 2, with one and two micro-batches; 1F1B,
    GPipe and interleaved 1F1B over pp 2 with 4 micro-batches, interleaved with 8 too; FSDP2 over dp 2), its live-tensor peak on every rank
    against the model's peak phase, within the bands of ``ENGINE_BANDS`` (which say what the model leaves out). When
    written: +1.96%, −0.00%, +1.92%, −0.00%, −0.0000% / −0.0003% (1F1B pp ranks 0 / 1), +1.9%, +0.47% / +0.43%
    (GPipe), +0.0000% / −0.0002% (interleaved), +0.0000% / −0.0003% (interleaved, 8 micro-batches). Before the schedules' own references were counted
    (cost/layout.schedule_peak) the pipelines were −1.98% / −3.34%, +0.26% / +0.11% (the missing pending losses and
    the receive buffers counted as fresh inputs cancelling), −3.9% / −9.3%; the components' sum said +6.1%, +4.1%,
    +6.0%, +4.0%, −2.0% / +3.7%, +6.0%. About 15 s on two ranks."""
    for per_rank in run_ranks(_engine_step_peaks, world, args=(list(ENGINE_CASES),), timeout=300):
        for name, (peak, predicted) in per_rank.items():
            low, high = ENGINE_BANDS[name]
            assert low <= predicted / peak - 1 <= high, (name, peak, predicted)


def _fsdp_counts(rank: int, world: int) -> dict:
    """Per checkpointing: (bytes the layers of a real FSDP2 bf16 engine's GPT save for backward + their output,
    the model's). FSDP2's mixed precision computes with bf16 parameters (gathered per block, cast inputs) inside the
    engine's autocast, so the embedding output — the layers' input — is bf16: it is fed in bf16 here. The gathered
    weights the linears save are FSDP2's (``fsdp_unsharded``), left out like parameters: a saved storage is
    left out when it is one of the model's parameters' at the moment it is saved (the block's gathered ones)."""
    out = {}
    for checkpointing in ("none", "selective", "full"):
        cfg = _config(*SHAPES[0], activation_checkpointing=checkpointing, precision="bf16", dp=2, fsdp=True)
        mesh = build_mesh(cfg.parallel, world)
        model = build_gpt(cfg, mesh, torch.device("cpu")).train()
        build_engine(cfg, model, mesh, torch.bfloat16)  # shards the model in place
        kept: dict = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            ptr = t.untyped_storage().data_ptr()
            # the running block's parameters are its gathered bf16 tensors, the others sharded DTensors
            params = {(p.to_local() if isinstance(p, DTensor) else p).untyped_storage().data_ptr()
                      for p in model.parameters()}
            if ptr not in params:
                kept[ptr] = t.untyped_storage().nbytes()
            return t

        x = torch.randn(1, cfg.data.seq_len, cfg.model.d_model, generator=torch.Generator().manual_seed(rank),
                        dtype=torch.bfloat16, requires_grad=True)
        positions = torch.arange(cfg.data.seq_len)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model.run_layers(x.detach().clone().requires_grad_(), positions)  # first forward: FSDP2's lazy init
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                y = model.run_layers(x, positions)
        out[checkpointing] = (sum(kept.values()) + y.untyped_storage().nbytes(), predicted_bytes(cfg))
    return out


@pytest.mark.slow
def test_gpt_activation_model_of_a_real_fsdp2_bf16_engine():
    """FSDP2 in bf16 (dp 2 on two gloo ranks, none / selective / full): the parameters it computes with are bf16, so
    the residual stream, each norm's input, cos/sin and every matmul input are bf16 — as in DeepSpeed's bf16 module
    (``cost.memory.parameters_in_16_bits``), not fp32 as under plain autocast — and no autocast weight copy exists."""
    for per_rank in run_ranks(_fsdp_counts, 2, timeout=300):
        for checkpointing, (counted, predicted) in per_rank.items():
            assert counted == pytest.approx(predicted, rel=1e-12), (checkpointing, counted, predicted)

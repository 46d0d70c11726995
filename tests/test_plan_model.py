"""Planner: memory formulas against hand-computed cases, time-model structure, enumeration, profiles."""
from __future__ import annotations

import copy
import dataclasses
import itertools
import math

import pytest
import yaml

from dist_train.cli import main
from dist_train.config import check_world_size, config_from_dict, save_config
from dist_train.cost.flops import (attention_flops_per_key, flops_per_token, matmul_params, model_params,
                                   recompute_flops_per_token, train_flops_per_token)
from dist_train.cost.layout import stages_of_rank
from dist_train.cost.memory import estimate_memory, memory_model, swin_masked_blocks
from dist_train.cost.predict import predict
from dist_train.cost.shape import cp_execution, rank_inputs, shape_of
from dist_train.cost.step_time import EAGER_OPS_PER_LAYER, ULYSSES_OPS, ulysses_traffic
from dist_train.plan.enumerate import enumerate_layouts, layout_label, rank_layouts, why_slower
from dist_train.dryrun import format_layout, rank_layout
from dist_train.metrics import CUDA_PEAK_TFLOPS
from dist_train.plan.profiles import (Link, _lookup, builtin_profiles, fit_link, get_profile, load_profile_file,
                                      profile_for_device_name, profile_to_dict)

GPT = {"model": {"kind": "gpt", "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 100,
                 "ffn_hidden": 128},
       "data": {"source": "synthetic", "seq_len": 64},
       "train": {"global_batch": 4, "micro_batch": 2}}


def cfg(**sets):
    # deep copy: config_from_dict writes --set overrides into the nested dicts of the mapping it is given
    return config_from_dict(copy.deepcopy(GPT), [f"{k}={v}" for k, v in sets.items()])


@pytest.fixture(scope="module")
def cpu():
    return builtin_profiles()["cpu"]


def test_shape_matches_trainer_flop_convention_and_real_model():
    import torch

    from dist_train.models.gpt import GPT as Model

    c = cfg()
    sh = shape_of(c)
    model = Model(c.model)
    # the trainer's MFU counts GPT FLOPs exactly as the planner does; 6N counts every weight except the
    # embedding lookup and the norms
    assert train_flops_per_token(c) == flops_per_token(sh)
    d, L = c.model.d_model, c.model.n_layers
    lookup_and_norms = c.model.vocab_size * d + (2 * L + 1) * d
    assert matmul_params(sh) == sum(p.numel() for p in model.parameters()) - lookup_and_norms
    assert sh.params() == model_params(c) == sum(p.numel() for p in model.parameters())
    del torch


def test_memory_hand_computed_single_rank(cpu):
    c = cfg()
    pred = predict(c, cpu)
    m = pred.memory
    # d=64, q=64, kv=32 (2 heads x 16), f=128, V=100, L=2
    layer = 64 * (2 * 64 + 2 * 32) + 3 * 64 * 128 + 2 * 64     # 36992
    n = 2 * layer + 100 * 64 * 2 + 64                          # 86784
    assert m["weights"] == n * 4 and m["grads"] == n * 4 and m["optimizer"] == n * 8
    assert m["ddp_buckets"] == 0
    # eager per token per layer (what autograd keeps, tests/test_gpt_saved_tensors.py): 4d (each norm's x and output)
    # + 2q + 2kv + 3f (SwiGLU's gate, up and product) + 2 norm rstd + 4 heads' logsumexp = 256 + 128 + 64 + 384 + 6
    # = 838 elements; per micro-batch the stage output (d)
    # and RoPE's cos/sin (2·16 per position, shared by the micro-batch's 2 samples: 16 per token)
    tokens = 2 * 64
    assert m["activations"] == (2 * 838 + 64 + 16) * tokens * 4
    # chunked loss (auto: one chunk holds all 128 tokens), at its peak (torch.logsumexp; tests/test_gpt_saved_tensors.py):
    # fp32 logits and logsumexp's temporary of their size, 30 B of per-token tensors, the final norm's fp32 output h
    # + what the forward keeps for the backward: the final norm's rstd (its x is the stage output), and dL/dh, dL/dW
    # in fp32
    kept = tokens * 4 + (tokens + 100) * 64 * 4
    assert m["logits"] == tokens * 100 * 8 + tokens * 30 + tokens * 64 * 4 + kept
    full = predict(cfg(**{"train.loss_chunk": "full"}), cpu).memory
    assert full["logits"] == tokens * 100 * (4 + 4 + 4)                  # logits + fp32 log-softmax + grad
    # the backward's workspace: the final norm's 6 fp32 [tokens, d] + 16 B (1552 B/token) above SwiGLU's 3f (1536)
    assert m["workspace"] == tokens * (6 * 64 * 4 + 16)
    # the total is the step's peak phase: the final norm's backward (the loss's tensors freed but dL/dh, its
    # workspace formed), above the loss (2 micro-batches: the second's loss runs with the first's gradients)
    states = m["baseline"] + m["weights"] + m["grads"] + m["optimizer"]
    phases = pred.memory_phases
    assert phases["loss"] == states + m["activations"] + m["logits"]
    assert phases["backward"] == states + m["activations"] + m["workspace"]
    assert phases["optimizer"] == states + 3 * 4 * 128 * 64   # AdamW: w3's sqrt and division while w1's denom is bound
    assert m["total"] == phases["backward"] > phases["loss"]
    assert m["total"] < sum(v for k, v in m.items() if k != "total")


def test_memory_of_the_chunked_loss(cpu):
    """train.loss_chunk: one chunk's logits (not the micro-batch's), dL/dh, and in 16-bit training the
    16-bit matmul output and gradient cast per chunk plus an fp32 dL/dW accumulator."""
    tokens, d, v = 2 * 64, 64, 100
    c32 = predict(cfg(**{"train.loss_chunk": 32}), cpu).memory
    kept = tokens * 4 + (tokens + v) * d * 4      # final norm's rstd; fp32 dL/dh, dL/dW
    # one chunk's fp32 logits and logsumexp's temporary, its 30 B per token, the final norm's fp32 output h
    assert c32["logits"] == 32 * v * 8 + 32 * 30 + tokens * d * 4 + kept
    bf = predict(cfg(**{"train.loss_chunk": 32, "train.precision": "bf16"}), cpu).memory
    assert bf["logits"] == 32 * v * 8 + 32 * 30 + tokens * d * 4 + kept + v * d * 2  # + autocast's bf16 copy of the head
    big = predict(cfg(**{"train.loss_chunk": 32, "data.seq_len": 64 * 16}), cpu).memory
    assert big["logits"] - c32["logits"] == 15 * tokens * (2 * d * 4 + 4)   # 16x the tokens: only per-token terms


def test_memory_sharding_rules(cpu):
    base = predict(cfg(), cpu).memory
    cp2 = predict(cfg(**{"parallel.cp": 2}), cpu).memory
    assert cp2["activations"] == pytest.approx(base["activations"] / 2)   # sequence split over cp
    assert cp2["ddp_buckets"] == base["grads"]                           # gradients reduced: bucket copy
    z1 = predict(cfg(**{"parallel.dp": 2, "parallel.zero_stage": 1}), cpu).memory
    z2 = predict(cfg(**{"parallel.dp": 2, "parallel.zero_stage": 2}), cpu).memory
    z3 = predict(cfg(**{"parallel.dp": 2, "parallel.zero_stage": 3}), cpu).memory
    # fp32 here: DeepSpeed's ZeRO optimizer steps an fp32 master clone of its partition even so (4 B/param besides
    # AdamW's 8; cost.memory.fp32_master_bytes); ZeRO-0 steps the parameters themselves
    assert z1["optimizer"] == base["optimizer"] * 12 / 8 / 2 and z1["grads"] == base["grads"]
    z0 = predict(cfg(**{"parallel.dp": 2, "parallel.zero_stage": 0}), cpu).memory
    assert z0["optimizer"] == base["optimizer"]
    assert z2["grads"] == base["grads"] / 2 and z2["weights"] == base["weights"]
    assert z1["ddp_buckets"] == 0
    # ZeRO-3 keeps every tensor of at most stage3_param_persistence_threshold elements (default 1e5: all of this small
    # model's) whole besides its partition; with 0 none
    assert z3["weights"] == base["weights"] / 2 + base["weights"]
    none_whole = predict(cfg(**{"parallel.dp": 2, "parallel.zero_stage": 3, "parallel.deepspeed":
                                '{"zero_optimization": {"stage3_param_persistence_threshold": 0}}'}), cpu).memory
    assert none_whole["weights"] == base["weights"] / 2
    full = predict(cfg(**{"train.activation_checkpointing": "full"}), cpu).memory
    tokens = 2 * 64
    assert full["activations"] == (2 * 64 + 838 + 64 + 16) * tokens * 4      # layer inputs + one layer recomputed
    sel = predict(cfg(**{"train.activation_checkpointing": "selective"}), cpu).memory
    # the checkpointed core's inputs q, k, v are kept, and wo keeps its output: only the logsumexp goes
    assert sel["activations"] == (2 * (838 - 4) + 64 + 16) * tokens * 4
    uly = predict(cfg(**{"parallel.cp": 2, "parallel.cp_method": "ulysses"}), cpu).memory
    # wo's sequence-layout copy of the output (q) in each of the 2 layers, and zigzag's permutation and inverse
    # once for both (2 int64 tensors of u · S/cp = 2 · 32: ulysses.gathered_permutation keeps one of each)
    assert uly["activations"] - cp2["activations"] == 2 * 64 * 64 * 4 + 2 * 8 * (2 * 32)


def test_memory_pipeline_ranks_tp_padding_and_precision(cpu):
    c = cfg(**{"parallel.pp": 2})
    sh, loc = rank_inputs(c, cpu)
    r0, r1 = (memory_model(c, sh, cpu, loc, ld) for ld in loc.loads)
    # 2 layers on 2 stages (embedding and head count one layer each): rank 0 = layer 0 + embedding
    # (36992 + 6400), rank 1 = layer 1 + final norm + head (36992 + 64 + 6400)
    assert r0["weights"] == (36992 + 6400) * 4 and r1["weights"] == (36992 + 6400 + 64) * 4
    # global batch 4 / micro_batch 2 = 2 micro-batches; 1F1B keeps min(2, pp - r) in flight: 2 on rank 0,
    # 1 on rank 1, each 1 layer × 838 + the stage output 64 + cos/sin 16 elements per token, 128 tokens, fp32
    # + the engine's int64 token ids (rank 0) / labels (rank 1) of both micro-batches; rank 1's input is read from a
    # receive buffer, not kept, while the send of its previous backward's input gradient holds one of the same size
    ids = 8 * 128 * 2
    assert r0["activations"] == 2 * (838 + 80) * 128 * 4 + ids and r1["activations"] == (838 + 80) * 128 * 4 + ids
    # PipelineStage's receive buffers, one per micro-batch: rank 0's gradients, rank 1's inputs ([128, 64] fp32)
    assert r0["pp_buffers"] == r1["pp_buffers"] == 2 * 128 * 64 * 4
    # the loss lives on the last stage
    assert r0["logits"] == 0 and r1["logits"] == 128 * 100 * 8 + 128 * 30 + 128 * 64 * 4 + 128 * 4 + (128 + 100) * 64 * 4
    assert predict(c, cpu).memory == r0                               # the planner ranks the most loaded rank
    # tp=2 with vocab 101: padded to 102, 51 rows per rank for embedding and head; norms (2·64 per layer,
    # final 64) replicated, the other 36864 parameters of a layer halve
    tp = predict(cfg(**{"parallel.tp": 2, "model.vocab_size": 101}), cpu).memory
    assert tp["weights"] == (2 * (36864 // 2 + 128) + 2 * 51 * 64 + 64) * 4
    assert tp["logits"] == 128 * 51 * 8 + 128 * 30 + 128 * 64 * 4 + 128 * 4 + (128 + 51) * 64 * 4
    # train.precision overrides the profile's element size: bf16 on the cpu profile is 2 + 2 + (8 + 4 master)
    bf16 = predict(cfg(**{"train.precision": "bf16"}), cpu).memory
    base = predict(cfg(), cpu).memory
    assert bf16["weights"] == base["weights"] / 2 and bf16["optimizer"] == base["optimizer"] * 12 / 8
    # autocast: the residual stream (each norm keeps its input x), rstd, logsumexp and cos/sin stay fp32; each norm's
    # output is cast to bf16 once, shared by its linears; matmul outputs are bf16 — bytes per token
    # per layer 2·64·4 + 2·64·2 + (2·64 + 2·32 + 3·128)·2 + 2·4 + 4·4, per micro-batch 64·4 + 2·16·4 / 2
    layer_bytes = 512 + 256 + 1152 + 8 + 16
    weight_copies = 2 * 36864 * 2   # autocast's bf16 copy of each layer matmul weight, kept for its backward
    assert bf16["activations"] == (2 * layer_bytes + 256 + 64) * 128 + weight_copies


def test_korthikanti_s2_term_without_flash(cpu):
    """A device without flash attention keeps scores and probabilities: + 2·heads·S elements per token per
    layer. attn_kernel=math does not: without cp it is torch SDPA all the same, and its block kernels run
    inside RingAttention, which keeps no scores (counted: tests/test_gpt_saved_tensors.py)."""
    flash = predict(cfg(), cpu).memory["activations"]
    assert predict(cfg(**{"parallel.attn_kernel": "math"}), cpu).memory["activations"] == flash
    no_flash = predict(cfg(), dataclasses.replace(cpu, flash_attention=False)).memory["activations"]
    assert no_flash - flash == 2 * (2 * 4 * 64) * (2 * 64) * 4


def test_fused_profile_matches_korthikanti_style_count():
    """``fused_kernels: true`` stays available as a what-if for a custom profile (a Transformer-Engine style layer
    dist-train does not run; the built-in GPU profiles cost the eager modules, tests/test_gpu_profiles.py)."""
    fused = dataclasses.replace(builtin_profiles()["h100"], name="h100-fused-what-if", fused_kernels=True)
    c = cfg()
    m = predict(c, fused).memory
    # fused: 4d + 2q + 2kv + 3f = 256 + 128 + 64 + 384 = 832 elements, bf16; mixed-precision Adam 16 B/param;
    # + autocast's bf16 copies of the 2 layers' 36,864 matmul weights (DDP: one autocast region per micro-batch)
    assert m["activations"] == (2 * 832 + 64) * 128 * 2 + 2 * 36864 * 2
    n = m["weights"] / 2
    assert m["weights"] + m["grads"] + m["optimizer"] == pytest.approx(16 * n)


def test_time_model_scales_and_orders_layouts(cpu):
    one = predict(cfg(**{"data.seq_len": 1024}), cpu)
    zig = predict(cfg(**{"data.seq_len": 1024, "parallel.cp": 2, "parallel.cp_layout": "zigzag"}), cpu)
    con = predict(cfg(**{"data.seq_len": 1024, "parallel.cp": 2, "parallel.cp_layout": "contiguous"}), cpu)
    assert zig.time["matmul"] == pytest.approx(one.time["matmul"] / 2)
    # contiguous causal: the last rank's critical path is (2P-1)/P of the balanced share
    assert con.time["attention"] == pytest.approx(zig.time["attention"] * 1.5)
    assert zig.time["cp_comm_exposed"] > 0 and one.time["cp_comm_exposed"] == 0
    assert one.step_time_s == pytest.approx(sum(v for k, v in one.time.items() if k != "step"))
    over = predict(cfg(**{"data.seq_len": 1024, "parallel.cp": 4}), cpu)   # 4 ranks on 2 cores
    assert over.time["matmul"] == pytest.approx(one.time["matmul"] / 4 * 2)


def test_profiles_lookup_and_link_fit():
    assert _lookup({128: 1.0, 512: 3.0}, 256) == pytest.approx(2.0)   # log-linear
    assert _lookup({128: 1.0, 512: 3.0}, 10) == 1.0 and _lookup(5.0, 99) == 5.0
    link = Link(bw_gbs=2.0, latency_us=50.0)
    samples = {b: 2 * 50e-6 + b / 2e9 for b in (4096, 1 << 24)}  # 2 ranks: factor 1
    fit = fit_link(samples, 2)
    assert fit.bw_gbs == pytest.approx(link.bw_gbs) and fit.latency_us == pytest.approx(50.0)
    with pytest.raises(ValueError, match="valid devices are"):
        get_profile("tpu9")


def test_nvl_cards_get_their_own_profiles_by_device_name():
    """H100 NVL and H200 NVL (PCIe cards, bridged in 2s / 4s, lower clocks) are not the SXM parts: a CUDA device's
    name picks the longest matching profile name, as metrics.CUDA_PEAK_TFLOPS does; the peaks agree with it."""
    names = {"NVIDIA H100 NVL": "h100-nvl", "NVIDIA H200 NVL": "h200-nvl", "NVIDIA H100 80GB HBM3": "h100",
             "NVIDIA H200": "h200", "NVIDIA A100-SXM4-80GB": "a100", "Tesla V100-SXM2-16GB": None}
    for device, profile in names.items():
        assert profile_for_device_name(device) == profile, device
    table = builtin_profiles()
    for name, card, memory, bw, link, pair in (("h100-nvl", "H100 NVL", 94, 3900, 300, 2),
                                               ("h200-nvl", "H200 NVL", 141, 4800, 450, 4)):
        p = table[name]
        assert p.peak_tflops == CUDA_PEAK_TFLOPS[card][0] == 835.5 and p.memory_gib == memory
        assert p.mem_bw_gbs < bw and p.intra.bw_gbs < link and p.devices_per_node == pair
        assert p.link(pair) is p.intra and p.link(pair + 1) is p.inter  # beyond the bridge: not NVLink
        sxm = table[name.split("-")[0]]
        assert p.matmul_tflops < sxm.matmul_tflops and p.attention_tflops < sxm.attention_tflops


def test_enumerate_and_rank(cpu):
    c = cfg(**{"data.seq_len": 128})
    cands = enumerate_layouts(c, 4)
    labels = {layout_label(x) for x in cands}
    assert all(x.world_size == 4 for x in cands)
    assert "cp4 ring/zigzag mb2" in labels and "dp2 cp2 ulysses zero1 mb2" in labels
    assert "dp2 tp2 mb2" in labels and "dp2 tp2 sp mb2" in labels   # tp with and without sequence parallelism
    assert "tp4 mb2" not in labels                           # n_kv_heads 2 < tp 4: rejected by validation
    assert not any(x.parallel.tp == 8 for x in cands)
    assert all(x.parallel.pp <= 2 for x in cands)          # n_layers = 2
    ranked = rank_layouts(cands, cpu)
    best = ranked[0][0]
    assert all(p.tokens_per_s <= best.tokens_per_s for p, _ in ranked if p.fits)
    assert why_slower(ranked[-1][0], best, cpu.memory_bytes)
    # equal time: the phrase says how much more memory, or that it is a tie
    assert why_slower(best, best, cpu.memory_bytes) == "ties with the best (same predicted time and memory)"
    bigger = dataclasses.replace(best, memory={**best.memory, "total": best.memory["total"] + 2 ** 30})
    assert why_slower(bigger, best, cpu.memory_bytes) == "as fast as the best; 1.00 GiB more memory"
    tiny = rank_layouts(cands, builtin_profiles()["cpu"].__class__(**{**builtin_profiles()["cpu"].__dict__,
                                                                      "memory_gib": 0.4}))
    assert not tiny[0][0].fits and why_slower(tiny[0][0], best, 0.4 * 2 ** 30).startswith("out of memory")
    with pytest.raises(ValueError, match="--devices 0"):
        enumerate_layouts(c, 0)


def test_swin_shape_and_wp():
    data = {"model": {"kind": "swin", "d_model": 32, "n_layers": 2, "n_heads": 2, "window": 4, "in_channels": 3,
                      "out_channels": 3},
            "data": {"source": "weather", "image": [30, 60]}, "train": {"global_batch": 2, "micro_batch": 1}}
    c = config_from_dict(copy.deepcopy(data))
    sh = shape_of(c)
    assert sh.grid == (32, 60) and sh.tokens == 32 * 60 and sh.keys_per_query == 16
    from dist_train.models.swin import build_swin

    model = build_swin(c.model, wp_group=None, grid=(1, 1))
    assert sh.params() == sum(p.numel() for p in model.parameters())
    cands = enumerate_layouts(c, 4)
    grids = {tuple(x.wp_grid) for x in cands}
    assert (2, 2) in grids and (1, 4) in grids
    # cp: the Ulysses inside windows a swin runs (n_heads 2: cp <= 2), over the devices wp leaves
    with_cp = [x for x in cands if x.parallel.cp > 1]
    assert with_cp and all(x.parallel.cp == 2 and x.parallel.cp_method == "ulysses" and
                           x.parallel.tp * x.parallel.pp * x.parallel.dp * 2 * math.prod(x.wp_grid) == 4
                           for x in with_cp)
    assert {tuple(x.wp_grid) for x in with_cp if x.parallel.dp == 1} == {(1, 2), (2, 1)}
    # data parallelism beside the tiles (global batch 2: dp <= 2): dp2 alone, × wp 1x2 and 2x1, × cp2
    with_dp = {(x.parallel.cp, tuple(x.wp_grid)) for x in cands if x.parallel.dp == 2}
    assert with_dp == {(1, (1, 1)), (1, (1, 2)), (1, (2, 1)), (2, (1, 1))}
    assert {x.parallel.dp for x in cands} == {1, 2}
    cpu = builtin_profiles()["cpu"]
    p1 = predict(c, cpu)
    p4 = predict(config_from_dict(copy.deepcopy(data), ["parallel.wp=[2,2]"]), cpu)
    # 8x15 windows on a 2x2 grid: the largest tile has 4x8 windows = 512 of the 1920 tokens
    assert p4.memory["activations"] == pytest.approx(p1.memory["activations"] * 512 / 1920)
    assert p4.time["wp_halo_exposed"] > 0


@pytest.mark.parametrize("kind", ["swin", "gpt"])
def test_every_planned_layout_passes_the_dry_run(kind, cpu):
    """Each layout the planner proposes, as the config a user would write (its full mapping, built and validated
    again), fits the world it was planned for and gets the dry run's rank table (``dist-train launch CONFIG
    --dry-run`` = load_config + dryrun.rank_layout/format_layout) — a swin's dp × tp × pp × cp × wp layouts
    included (a global batch of 4 allows dp 4 on 4 devices). One of them also travels through a YAML file."""
    if kind == "swin":
        data = {"model": {"kind": "swin", "d_model": 32, "n_layers": 4, "n_heads": 2, "window": 4, "in_channels": 3,
                          "out_channels": 3},
                "data": {"source": "weather", "image": [30, 60]}, "train": {"global_batch": 4, "micro_batch": 1}}
        c = config_from_dict(copy.deepcopy(data))
    else:
        c = cfg(**{"data.seq_len": 128, "train.global_batch": 4})
    cands = enumerate_layouts(c, 4)
    assert {x.parallel.dp for x in cands} == {1, 2, 4}
    for x in cands:
        loaded = config_from_dict(x.to_dict())
        check_world_size(loaded, 4)
        rows = rank_layout(loaded, profile=cpu)
        assert len(rows) == 4 and all(r.memory is not None for r in rows) and format_layout(loaded, rows)
        assert layout_label(loaded) == layout_label(x)


@pytest.mark.slow
def test_a_planned_swin_dp_wp_layout_launches_dry(tmp_path, capsys):
    """``dist-train launch --dry-run`` itself (its CLI entry, ``main``, as ``python -m dist_train`` calls it: a process
    of its own only imported torch again, ~3 s of CPU) on a planned dp × wp swin layout written to a file."""
    data = {"model": {"kind": "swin", "d_model": 32, "n_layers": 2, "n_heads": 2, "window": 4, "in_channels": 3,
                      "out_channels": 3},
            "data": {"source": "weather", "image": [30, 60]}, "train": {"global_batch": 4, "micro_batch": 1}}
    x = next(x for x in enumerate_layouts(config_from_dict(copy.deepcopy(data)), 8)
             if x.parallel.dp == 2 and x.wp_grid == (2, 2))
    save_config(x, tmp_path / "planned.yaml")
    rc = main(["launch", str(tmp_path / "planned.yaml"), "--dry-run", "--nproc", "8"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out.count("\n") > 8


def test_swin_cp_is_costed_as_the_ulysses_it_runs(cpu):
    """A swin's cp runs Ulysses inside windows over the whole cp group whatever parallel.cp_method says
    (models/swin.py; the config accepts the default ring and ulysses): the default and ulysses predict the
    same, with the window-Ulysses all-to-alls (q|k|v out, the output back: 2 per block and pass) and no ring."""
    data = {"model": {"kind": "swin", "d_model": 32, "n_layers": 2, "n_heads": 2, "window": 4, "in_channels": 3,
                      "out_channels": 3},
            "data": {"source": "weather", "image": [30, 60]}, "train": {"global_batch": 2, "micro_batch": 1}}
    one = predict(config_from_dict(copy.deepcopy(data)), cpu)
    default = config_from_dict(copy.deepcopy(data), ["parallel.cp=2"])
    ring, uly = predict(default, cpu), predict(config_from_dict(copy.deepcopy(data), ["parallel.cp=2",
                                                                                       "parallel.cp_method=ulysses"]), cpu)
    assert ring.memory == uly.memory and ring.time == uly.time
    assert ring.layout["cp_method"] == uly.layout["cp_method"] == "ulysses" and ring.layout["ulysses_degree"] == 2
    assert layout_label(default) == "cp2 ulysses mb1"
    sh, loc = rank_inputs(default, cpu)
    assert loc.tokens == 32 * 60 / 2  # each cp rank's band of the 32x60 padded token grid
    assert ulysses_traffic(default, loc) == (2, loc.tokens * 4 * 32 * loc.bpe / 2)  # q|k|v + out, half leaves
    link = cpu.link(2)
    a2a = 2 * 2 * 2 * (loc.tokens * 4 * 32 * loc.bpe / 2 / (link.bw_gbs * 1e9) + 2 * link.latency_us * 1e-6)
    assert ring.time["cp_comm_exposed"] == pytest.approx(a2a)  # 2 micro-batches, 2 blocks, forward and backward
    # eager ops: the Ulysses bookkeeping once per block, no ring steps (2 micro-batches of 2 blocks)
    assert ring.time["op_overhead"] == pytest.approx(
        2 * 2 * (EAGER_OPS_PER_LAYER["swin"] + ULYSSES_OPS) * cpu.op_overhead_us * 1e-6 / cpu.compute_share(2))
    # memory: window attention keeps the head-sharded q, k, v instead of the qkv output, so activations are
    # the cp-1 ones per token, but for the masks, which cover the whole tile on every cp rank (N bools per tile
    # token in each block that masks — both here, the 30 rows pad to 32: one more N per rank token and layer at
    # cp 2, 2 layers, N = 16; tests/test_swin_saved_tensors.py counts them); buffers: one all-to-all output of
    # q|k|v, no K/V ring buffers
    assert swin_masked_blocks(default, sh) == 2
    assert ring.memory["activations"] == pytest.approx(one.memory["activations"] / 2 + loc.tokens * 2 * 16)
    assert ring.memory["comm_buffers"] == loc.tokens * 3 * 32 * loc.bpe


def test_recompute_is_costed_as_the_model_runs_it(cpu):
    """A swin's selective checkpointing recomputes whole blocks as full does (SwinModel.run_blocks): same
    memory and time; under either, every cp all-to-all and halo roll of the forward runs a third time (the
    recompute), and a GPT's attention recompute (selective) re-runs its cp exchanges before the core (the q, k, v
    all-to-alls, not the output's: step_time.ulysses_recompute_traffic)."""
    from dist_train.cost.step_time import ulysses_recompute_traffic

    data = {"model": {"kind": "swin", "d_model": 32, "n_layers": 2, "n_heads": 2, "window": 4, "in_channels": 3,
                      "out_channels": 3},
            "data": {"source": "weather", "image": [30, 60]}, "train": {"global_batch": 2, "micro_batch": 1},
            "parallel": {"cp": 2, "wp": [1, 2]}}
    run = {ck: predict(config_from_dict(copy.deepcopy(data), [f"train.activation_checkpointing={ck}"]), cpu)
           for ck in ("none", "selective", "full")}
    assert run["selective"].memory == run["full"].memory and run["selective"].time == run["full"].time
    assert run["full"].memory["activations"] < run["none"].memory["activations"]
    for part in ("cp_comm_exposed", "wp_halo_exposed"):
        assert run["full"].time[part] == pytest.approx(run["none"].time[part] * 3 / 2), part
    c = {ck: cfg(**{"parallel.cp": 2, "parallel.cp_method": "ulysses", "train.activation_checkpointing": ck})
         for ck in ("none", "selective", "full")}
    gpt = {ck: predict(x, cpu).time["cp_comm_exposed"] for ck, x in c.items()}
    assert gpt["full"] == pytest.approx(gpt["none"] * 3 / 2)
    sh, loc = rank_inputs(c["selective"], cpu)
    a2as, nbytes = ulysses_recompute_traffic(c["selective"], loc)
    assert (a2as, nbytes) == (3, loc.tokens * (loc.q + 2 * loc.kv) * loc.bpe / 2)
    link = cpu.link(2)
    again = 2 * sh.layers * (nbytes / (link.bw_gbs * 1e9) + a2as * link.latency_us * 1e-6)  # 2 micro-batches
    assert gpt["selective"] == pytest.approx(gpt["none"] + again) and gpt["selective"] < gpt["full"]


def test_swin_halo_counts_the_shifted_blocks_of_the_rank(cpu):
    """Pipeline stages hold whole (plain, shifted) block pairs: a pp rank rolls the halo of its own shifted
    blocks, half of them at pp 2 (the whole model's were counted on every rank before)."""
    data = {"model": {"kind": "swin", "d_model": 32, "n_layers": 4, "n_heads": 2, "window": 4, "in_channels": 3,
                      "out_channels": 3},
            "data": {"source": "weather", "image": [30, 60]}, "train": {"global_batch": 2, "micro_batch": 1},
            "parallel": {"wp": [1, 2]}}
    one = predict(config_from_dict(copy.deepcopy(data)), cpu)
    two = predict(config_from_dict(copy.deepcopy(data), ["parallel.pp=2"]), cpu)
    assert two.time["wp_halo_exposed"] == pytest.approx(one.time["wp_halo_exposed"] / 2) and two.time["wp_halo_exposed"]


def _causal_core_flops(q_shape, k_shape, is_causal: bool, matmuls: int) -> int:
    """``matmuls`` [B,H,S,D] products over the keys each query sees (causal: query i sees i+1 keys)."""
    b, h, s, d = q_shape
    keys = s * (s + 1) // 2 if is_causal else s * k_shape[2]
    return 2 * matmuls * b * h * d * keys


def _sdpa_cpu_fwd(q, k, v, dropout_p=0.0, is_causal=False, *args, out_shape=None, **kwargs) -> int:
    return _causal_core_flops(q, k, is_causal, 2)  # QKᵀ, PV


def _sdpa_cpu_bwd(grad_out, q, k, v, out, lse, dropout_p=0.0, is_causal=False, *args, out_shape=None, **kwargs) -> int:
    return _causal_core_flops(q, k, is_causal, 4)  # dV, dP, dQ, dK


def _counted_train_flops(c) -> dict:
    """torch's FlopCounterMode over one forward + backward of the real GPT (CPU SDPA registered with the causal
    count above; the counter has no formula for the CPU flash kernel): FLOPs by op."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from dist_train.models.gpt import GPT as Model

    torch.manual_seed(0)
    model = Model(c.model, activation_checkpointing=c.train.activation_checkpointing).train()
    tokens = torch.randint(0, c.model.vocab_size, (c.train.micro_batch, c.data.seq_len))
    aten = torch.ops.aten
    with FlopCounterMode(display=False, custom_mapping={aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_fwd,
                         aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_bwd}) as counter:
        loss, _ = model({"tokens": tokens, "positions": torch.arange(c.data.seq_len), "labels": tokens})
        loss.backward()
    return {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}


def test_selective_checkpointing_costs_the_attention_core_it_recomputes(cpu):
    """A GPT's selective checkpointing re-runs the attention core's forward (QKᵀ, PV) and no projection: torch's
    FLOP counter on the real model finds exactly recompute_flops_per_token(…, "attention") more FLOPs per token
    (4·L·d_attn·S_eff, a third of the core's 12·L·d_attn·S_eff; the convention's causal S_eff) and the same
    matmuls; the time model pays that third on the attention term (it used to cost selective as free)."""
    c = {ck: cfg(**{"train.activation_checkpointing": ck}) for ck in ("none", "selective")}
    counted = {ck: _counted_train_flops(x) for ck, x in c.items()}
    sh = shape_of(c["none"])
    tokens = c["none"].train.micro_batch * sh.tokens
    assert counted["selective"]["aten.mm"] == counted["none"]["aten.mm"]
    extra = sum(counted["selective"].values()) - sum(counted["none"].values())
    assert extra == recompute_flops_per_token(sh, "attention") * tokens == 4 * 2 * 64 * (64 + 1) / 2 * tokens
    core = sum(n for op, n in counted["none"].items() if "attention" in op)
    assert core == attention_flops_per_key(sh) * sh.keys_per_query * tokens  # the convention's count, causal
    assert recompute_flops_per_token(sh, "none") == 0
    pred = {ck: predict(x, cpu) for ck, x in c.items()}
    assert pred["selective"].time["attention"] == pytest.approx(pred["none"].time["attention"] * (1 + extra / core))
    assert pred["selective"].time["matmul"] == pred["none"].time["matmul"]
    full = predict(cfg(**{"train.activation_checkpointing": "full"}), cpu)
    assert full.time["attention"] == pytest.approx(pred["selective"].time["attention"])


def _counted_swin_train_flops(c) -> dict:
    """FlopCounterMode over one forward + backward of the real single-tile swin of ``c``: FLOPs by op."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from dist_train.models.swin import build_swin

    model = build_swin(c.model, wp_group=None, grid=(1, 1), activation_checkpointing=c.train.activation_checkpointing,
                       init_seed=1).train()
    h, w = c.data.image
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(1, h, w, c.model.in_channels, generator=gen), torch.randn(1, h, w, 3, generator=gen)
    with FlopCounterMode(display=False) as counter:
        model({"x": x, "y": y, "image_size": (h, w)})[0].backward()
    return {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}


def test_full_checkpointing_recomputes_every_matmul_but_the_last(cpu):
    """Full checkpointing re-runs a layer's forward up to the last tensor its backward needs (torch's early stop):
    every matmul but the MLP's down projection (w2 / fc2, whose output nothing saves) and the attention core.
    torch's FLOP counter on the real GPT and swin counts exactly recompute_flops_per_token(…, "layer") more
    FLOPs per token; the time model re-runs every matmul but the last (it used to re-run all: ×4/3)."""
    gpt = {ck: cfg(**{"train.activation_checkpointing": ck}) for ck in ("none", "full")}
    counted = {ck: _counted_train_flops(x) for ck, x in gpt.items()}
    sh = shape_of(gpt["none"])
    extra = sum(counted["full"].values()) - sum(counted["none"].values())
    d, q, kv, f = 64, 64, 32, 128
    assert extra == recompute_flops_per_token(sh, "layer") * 2 * 64 == \
        (2 * 2 * (d * (2 * q + 2 * kv) + 2 * d * f) + 4 * 2 * q * (64 + 1) / 2) * 2 * 64
    data = {"model": {"kind": "swin", "d_model": 32, "n_layers": 2, "n_heads": 2, "window": 8, "in_channels": 3,
                      "out_channels": 3, "ffn_hidden": 64},
            "data": {"source": "weather", "image": [32, 32]}, "train": {"global_batch": 1, "micro_batch": 1}}
    swin = {ck: config_from_dict(copy.deepcopy(data), [f"train.activation_checkpointing={ck}"]) for ck in ("none", "full")}
    counted = {ck: _counted_swin_train_flops(x) for ck, x in swin.items()}
    extra = sum(counted["full"].values()) - sum(counted["none"].values())
    assert extra == recompute_flops_per_token(shape_of(swin["none"]), "layer") * 32 * 32 == \
        (2 * 2 * (4 * 32 * 32 + 32 * 64) + 4 * 2 * 32 * 64) * 32 * 32
    # time, at one flat matmul rate: the matmul term grows by exactly the recomputed matmul FLOPs (2 micro-batches)
    flat = dataclasses.replace(cpu, matmul_tflops=0.1)
    none, full = predict(gpt["none"], flat), predict(gpt["full"], flat)
    matmul_flops = recompute_flops_per_token(sh, "layer") - recompute_flops_per_token(sh, "attention")
    assert (full.time["matmul"] - none.time["matmul"]) * 0.1e12 == pytest.approx(matmul_flops * 2 * 2 * 64)


def _gpt_ulysses_exchanges(rank: int, world: int, data: dict, kv_heads: tuple[int, ...]) -> dict:
    """One rank of the real GPT with Ulysses over ``world`` cp ranks: (all-to-all calls, bytes sent to other
    ranks) of one forward + backward on this rank's share, by (KV heads, checkpointing)."""
    import torch
    import torch.distributed as dist

    from dist_train.models.attention import AttentionContext
    from dist_train.models.gpt import GPT as Model

    sent = {"calls": 0, "bytes": 0}
    all_to_all = dist.all_to_all_single

    def counting(out, inp, *args, **kwargs):  # even splits: (world − 1)/world of the input leaves the rank
        sent["calls"] += 1
        sent["bytes"] += inp.numel() * inp.element_size() * (world - 1) // world
        return all_to_all(out, inp, *args, **kwargs)

    dist.all_to_all_single = counting
    ctx = AttentionContext(cp_group=dist.group.WORLD, layout="contiguous", method="ulysses", ulysses_degree=world)
    out = {}
    for kv, ck in itertools.product(kv_heads, ("none", "selective", "full")):
        c = config_from_dict(copy.deepcopy(data), [f"model.n_kv_heads={kv}"])
        n = c.data.seq_len // world
        torch.manual_seed(0)
        model = Model(c.model, ctx, activation_checkpointing=ck).train()
        tokens = torch.randint(0, c.model.vocab_size, (c.train.micro_batch, n))
        sent.update(calls=0, bytes=0)
        model({"tokens": tokens, "positions": torch.arange(rank * n, (rank + 1) * n), "labels": tokens})[0].backward()
        out[(kv, ck)] = dict(sent)
    return out


@pytest.mark.slow  # spawns ranks (and imports megatron-core): 2.5-3 s
def test_selective_checkpointing_re_runs_the_ulysses_all_to_alls_before_the_core():
    """Under a GPT's selective checkpointing torch's early stop ends the recompute at the core's last saved tensor:
    the q, k, v all-to-alls run again, the output's (after the core, nothing saves it) does not — 11 all-to-alls
    per layer, not 12 (full checkpointing re-runs all four: wo saves its input). Counted on 2 real gloo ranks of the
    GPT = the time model's step_time.ulysses_recompute_traffic (it used to re-run all four under selective). With
    one KV head on 2 Ulysses ranks the K/V heads travel repeated (``ulysses.kv_replication``: ×2), as
    shape.cp_execution's kv_repeat says (the bytes used to be counted unrepeated)."""
    from dist_train.cost.step_time import ulysses_recompute_traffic
    from tests.dist_harness import run_ranks

    counted = run_ranks(_gpt_ulysses_exchanges, 2, args=(GPT, (2, 1)))
    for kv, ck in itertools.product((2, 1), ("none", "selective", "full")):
        c = cfg(**{"parallel.cp": 2, "parallel.cp_method": "ulysses", "train.precision": "fp32",
                   "train.activation_checkpointing": ck, "model.n_kv_heads": kv})
        assert cp_execution(c).kv_repeat == 3 - kv
        sh, loc = rank_inputs(c, builtin_profiles()["cpu"])
        (a2as, nbytes), (r_a2as, r_bytes) = ulysses_traffic(c, loc), ulysses_recompute_traffic(c, loc)
        for rank in counted:
            assert rank[(kv, ck)] == {"calls": sh.layers * (2 * a2as + r_a2as),
                                      "bytes": sh.layers * (2 * nbytes + r_bytes)}, (kv, ck)
    assert [counted[0][(2, ck)]["calls"] for ck in ("none", "selective", "full")] == [2 * 8, 2 * 11, 2 * 12]


def _gpt_tp_collectives(rank: int, world: int, data: dict) -> dict:
    """One rank of the real GPT over a ``world``-rank Megatron tp group: tp collectives of one forward + backward,
    by (sequence parallel, checkpointing). gloo has no reduce-scatter: the sp reduce-scatter runs as an
    all-reduce here (``models.tensor_parallel._SeqReduceScatter``), so with sp all_reduce counts those."""
    import torch
    import torch.distributed as dist

    from dist_train.models.gpt import GPT as Model
    from dist_train.models.tensor_parallel import TensorParallel

    calls = {"all_reduce": 0, "all_gather": 0}
    for name in calls:
        def counting(*args, _orig=getattr(dist, name), _name=name, **kwargs):
            calls[_name] += 1
            return _orig(*args, **kwargs)
        setattr(dist, name, counting)
    c = config_from_dict(copy.deepcopy(data))
    out = {}
    for sp in (False, True):
        tp = TensorParallel.from_group(dist.group.WORLD, list(range(world)), 0, torch.device("cpu"), sequence_parallel=sp)
        for ck in ("none", "selective", "full"):
            torch.manual_seed(0)
            model = Model(c.model, activation_checkpointing=ck, tp=tp).train()
            tokens = torch.randint(0, c.model.vocab_size, (c.train.micro_batch, c.data.seq_len))
            calls.update(all_reduce=0, all_gather=0)
            model({"tokens": tokens, "positions": torch.arange(c.data.seq_len), "labels": tokens})[0].backward()
            out[(sp, ck)] = dict(calls)
    return out


@pytest.mark.slow  # spawns ranks (and imports megatron-core): 2.5-3 s
def test_full_checkpointing_re_runs_the_tp_collectives_before_the_last_matmul():
    """Full checkpointing re-runs a layer's forward tp collectives up to w2 (early stop: w2's own all-reduce /
    reduce-scatter comes after the last saved tensor): wo's all-reduce (+1 all-reduce per layer), or with sequence
    parallelism the two all-gathers into the column linears and wo's reduce-scatter (+3 halves). Counted on 2
    real gloo ranks of the GPT = step_time.tp_collectives; selective re-runs none (the model used to count 4
    all-reduces per layer whatever the checkpointing)."""
    from dist_train.cost.step_time import tp_collectives
    from tests.dist_harness import run_ranks

    counted = run_ranks(_gpt_tp_collectives, 2, args=(GPT,))[0]
    layers = GPT["model"]["n_layers"]
    for sp in (False, True):
        model = {ck: tp_collectives(cfg(**{"parallel.tp": 2, "parallel.sequence_parallel": str(sp).lower(),
                                           "train.activation_checkpointing": ck})) for ck in ("none", "selective", "full")}
        assert model["none"] == ((4, 0) if not sp else (0, 10))
        for ck in ("selective", "full"):
            extra = {k: counted[(sp, ck)][k] - counted[(sp, "none")][k] for k in ("all_reduce", "all_gather")}
            more = tuple(m - n for m, n in zip(model[ck], model["none"]))
            # sp: all_gather counts the all-gathers, all_reduce the (emulated) reduce-scatters
            assert (extra["all_reduce"] + extra["all_gather"]) == layers * (more[0] + more[1]), (sp, ck, extra, more)
            if sp:
                assert extra == {"all_reduce": layers * (ck == "full"), "all_gather": 2 * layers * (ck == "full")}
    assert tp_collectives(cfg(**{"train.activation_checkpointing": "full"})) == (0, 0)
    cpu = builtin_profiles()["cpu"]
    for sp, ratio in ((False, 5 / 4), (True, 13 / 10)):  # the time model's tp term (latency halves with the bytes)
        t = {ck: predict(cfg(**{"parallel.tp": 2, "parallel.sequence_parallel": str(sp).lower(),
                                "train.activation_checkpointing": ck}), cpu).time["tp_comm"] for ck in ("none", "full")}
        assert t["full"] == pytest.approx(ratio * t["none"]), sp


def _megatron_layer_matmul_flops(rank: int, world: int, gpt_data: dict, swin_data: dict) -> dict:
    """One rank: forward + backward FLOPs by op (and checkpointing) of the real GPT and swin built
    with Megatron's tp linears over a one-rank tp group — the layers a tp > 1 run uses (their all-reduces are
    no-ops on one rank, their autograd is the same)."""
    import torch
    import torch.distributed as dist
    from torch.utils.flop_counter import FlopCounterMode

    from dist_train.models.gpt import GPT as Model
    from dist_train.models.swin import build_swin
    from dist_train.models.tensor_parallel import TensorParallel

    tp = TensorParallel.from_group(dist.group.WORLD, [0], 0, torch.device("cpu"))
    out = {}
    for ck in ("none", "full"):
        g = config_from_dict(copy.deepcopy(gpt_data))
        for kind, sp in (("gpt", False), ("gpt_sp", True)):
            torch.manual_seed(0)
            model = Model(g.model, activation_checkpointing=ck, tp=dataclasses.replace(tp, sequence_parallel=sp)).train()
            tokens = torch.randint(0, g.model.vocab_size, (g.train.micro_batch, g.data.seq_len))
            with FlopCounterMode(display=False) as counter:
                model({"tokens": tokens, "positions": torch.arange(g.data.seq_len), "labels": tokens})[0].backward()
            out[(kind, ck)] = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
        s = config_from_dict(copy.deepcopy(swin_data))
        swin = build_swin(s.model, wp_group=None, grid=(1, 1), activation_checkpointing=ck, tp=tp, init_seed=1).train()
        h, w = s.data.image
        x = torch.randn(1, h, w, 3, generator=torch.Generator().manual_seed(0))
        with FlopCounterMode(display=False) as counter:
            swin({"x": x, "y": x, "image_size": (h, w)})[0].backward()
        out[("swin", ck)] = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    return out


@pytest.mark.slow  # spawns ranks (and imports megatron-core): 2.5-3 s
def test_full_checkpointing_under_tp_recomputes_the_last_matmul_too(cpu):
    """torch's early stop ends the recompute at the last saved tensor; an aten matmul (nn.Linear, tp = 1) saves its
    inputs BEFORE it runs, so w2 / fc2 is cut, but Megatron's row-parallel linear is an autograd Function whose
    saved tensors are packed AFTER its forward ran: under tp > 1 every matmul of the layer runs again — except
    under sequence parallelism, whose row-parallel layer is F.linear + a reduce-scatter. FLOP counter on the real
    GPT (with and without sp) and swin with Megatron's layers = recompute_flops_per_token(…, "layer",
    last_matmul=recompute_runs_last_matmul) (the model used to cut w2 / fc2 at every tp); the time model's
    matmul term grows by exactly 4/3 under tp without sp."""
    from dist_train.cost.shape import recompute_runs_last_matmul
    from tests.dist_harness import run_ranks

    swin_data = {"model": {"kind": "swin", "d_model": 32, "n_layers": 2, "n_heads": 2, "window": 8, "in_channels": 3,
                           "out_channels": 3, "ffn_hidden": 64},
                 "data": {"source": "weather", "image": [32, 32]}, "train": {"global_batch": 1, "micro_batch": 1}}
    counted = run_ranks(_megatron_layer_matmul_flops, 1, args=(GPT, swin_data))[0]
    for kind, data, tokens in (("gpt", GPT, 2 * 64), ("gpt_sp", GPT, 2 * 64), ("swin", swin_data, 32 * 32)):
        sh = shape_of(config_from_dict(copy.deepcopy(data)))
        layer_mm = 2 * (matmul_params(sh) - sh.vocab * sh.d - sh.embed_in * sh.d * (kind == "swin"))
        if kind == "gpt_sp":  # w2 is F.linear again: cut
            extra = counted[(kind, "full")]["aten.mm"] - counted[(kind, "none")]["aten.mm"]
            assert extra == (recompute_flops_per_token(sh, "layer", last_matmul=False)
                             - recompute_flops_per_token(sh, "attention")) * tokens == \
                (layer_mm - 2 * sh.layers * sh.ffn * sh.d) * tokens
        elif kind == "gpt":  # the projections (aten.mm; the counter has no formula for the CPU SDPA core)
            extra = counted[(kind, "full")]["aten.mm"] - counted[(kind, "none")]["aten.mm"]
            assert extra == (recompute_flops_per_token(sh, "layer", last_matmul=True)
                             - recompute_flops_per_token(sh, "attention")) * tokens == layer_mm * tokens
        else:  # every matmul: the projections (aten.mm) and the window core (aten.bmm)
            extra = sum(counted[(kind, "full")].values()) - sum(counted[(kind, "none")].values())
            assert extra == recompute_flops_per_token(sh, "layer", last_matmul=True) * tokens == \
                (layer_mm + 4 * sh.layers * sh.q_dim * sh.keys_per_query) * tokens
    tp2 = {ck: cfg(**{"train.activation_checkpointing": ck, "parallel.tp": 2}) for ck in ("none", "selective", "full")}
    assert [recompute_runs_last_matmul(c) for c in tp2.values()] == [False, False, True]
    assert not recompute_runs_last_matmul(cfg(**{"train.activation_checkpointing": "full"}))
    assert not recompute_runs_last_matmul(cfg(**{"train.activation_checkpointing": "full", "parallel.tp": 2,
                                                 "parallel.sequence_parallel": "true"}))
    flat = dataclasses.replace(cpu, matmul_tflops=0.1)
    none, full = predict(tp2["none"], flat), predict(tp2["full"], flat)
    head = 6.0 * 2 * 64 * 64 * 50 / 0.1e12 * 2   # the tp-split head (2 micro-batches): not recomputed
    assert full.time["matmul"] - head == pytest.approx(4 / 3 * (none.time["matmul"] - head))


def test_a_pipeline_micro_batch_is_the_local_batch_split_into_parallel_microbatches():
    """The pipeline engine splits the rank's local batch (global_batch / dp) into ``parallel.microbatches``, whatever
    ``train.micro_batch`` says: three configs running the same pp2 step (8 samples in 4 micro-batches of 2) cost the
    same memory and time (they were 2.25, 4.48 and 8.94 MiB of activations: each micro-batch sized at micro_batch)."""
    def cfg(micro_batch: int):
        return config_from_dict({"model": {"kind": "gpt", "d_model": 64, "n_layers": 4, "n_heads": 4, "vocab_size": 96},
                                 "data": {"source": "synthetic", "seq_len": 64}, "parallel": {"pp": 2, "microbatches": 4},
                                 "train": {"global_batch": 8, "micro_batch": micro_batch}})
    cpu = builtin_profiles()["cpu"]
    estimates = [[estimate_memory(c, stages_of_rank(c, r), cpu).components for r in range(2)]
                 for c in (cfg(2), cfg(8), cfg(4))]
    assert estimates[0] == estimates[1] == estimates[2]
    times = [predict(c, cpu, 2).step_time_s for c in (cfg(2), cfg(8), cfg(4))]
    assert times[0] == pytest.approx(times[1], rel=1e-12) and times[0] == pytest.approx(times[2], rel=1e-12)


def test_a_profile_key_nothing_reads_is_refused(tmp_path):
    """A misspelt optional profile key (``core:`` for ``cores``) kept its default silently (no oversubscription
    modelled); now one line naming it. Every built-in profile and a --calibrate file (which records its name) load."""
    for name, prof in builtin_profiles().items():
        d = profile_to_dict(prof)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({**d, "name": name}))
        assert load_profile_file(path) == dataclasses.replace(prof, source=str(path))
    path.write_text(yaml.safe_dump({**d, "core": 16}))
    with pytest.raises(ValueError, match=rf"device profile '{name}' in .*: unknown key 'core'; valid keys: "):
        load_profile_file(path)


def test_plan_marks_the_configs_own_layout_in_the_ranking(tmp_path, capsys):
    """`plan` ranked the layouts without saying which one the config runs: a user could not tell how far theirs
    was from the best. It is marked in the table, or named with its rank below it when the table is cut."""
    cfg = yaml.safe_load(open("configs/swin_weather.yaml"))
    cfg["data"]["path"] = str(tmp_path / "w")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["plan", str(path), "--devices", "2", "--top", "40"]) == 0
    table = capsys.readouterr().out.splitlines()
    marked = [line for line in table if line.endswith("<- this config")]
    assert len(marked) == 1 and " wp1x2 mb1 " in marked[0], table
    rank = int(marked[0].split()[0])
    if rank == 1:
        return  # the best: nothing to cut it from
    assert main(["plan", str(path), "--devices", "2", "--top", str(rank - 1)]) == 0
    cut = capsys.readouterr().out
    assert "<- this config" not in cut and f"this config's layout (wp1x2 mb1): #{rank} of " in cut, cut

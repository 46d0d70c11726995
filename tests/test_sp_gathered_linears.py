"""Sequence parallelism's column-parallel linears keep only the local chunk (``TensorParallel.gathered_linears``).

On real gloo ranks, float64: the Function against the plain all-gather + linear of the full input (forward and
every gradient: the input chunk's, each weight's and bias's), with both collective paths — gloo's exact emulation
and the dim-0 ``all_gather_into_tensor`` / ``reduce_scatter_single`` path NCCL takes (gloo runs those too on this
torch) — asserts on every rank, 2 and 3 ranks; its collectives (forward one all-gather; backward one all-gather and
one reduce-scatter); bf16 autocast against the unfused Megatron layers (the same 16-bit matmuls), and tp2 + sequence
parallelism training in bf16 on CPU like one rank (it failed before: Megatron's backward restores CUDA's autocast
only); and what autograd keeps: an attention and an FFN block under sequence parallelism save their input's
[B, S/tp, d] chunk, never the all-gathered [B, S, d] (that failed before: ``tp.enter`` gathered ahead of
Megatron's linears, which kept the gathered tensor).
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dist_train.models.tensor_parallel import TensorParallel, _GatheredLinears, column_outputs
from dist_train.trainer import train
from tests.dist_harness import run_ranks
from tests.trainer_utils import rel_close, tiny_gpt_config

B, S, D = 2, 12, 8
OUT = (6, 3, 9)  # per-rank output widths of three column layers sharing one input
WITH_BIAS = (True, False, True)


def _tp(world: int, sp: bool = True) -> TensorParallel:
    return TensorParallel.from_group(dist.group.WORLD, list(range(world)), 0, torch.device("cpu"),
                                     sequence_parallel=sp)


def _against_plain(rank: int, world: int) -> dict:
    """Forward and every gradient of the Function vs the plain reference on this rank's shard: y_i = x_full @ W_i.T
    + b_i with x_full the gathered chunks; its input gradient is the tp-sum of dL/dx_full, this rank's chunk."""
    gen = torch.Generator().manual_seed(11)  # same full input and cotangents on every rank, per-rank weights
    x_full = torch.randn(B, S, D, generator=gen, dtype=torch.float64)
    cots = [torch.randn(world, B, S, o, generator=gen, dtype=torch.float64)[rank] for o in OUT]
    wgen = torch.Generator().manual_seed(100 + rank)
    weights = [torch.randn(o, D, generator=wgen, dtype=torch.float64) for o in OUT]
    biases = [torch.randn(o, generator=wgen, dtype=torch.float64) if b else None for o, b in zip(OUT, WITH_BIAS)]
    part = S // world
    worst = {}
    for fused in (False, True):
        x = x_full[:, rank * part:(rank + 1) * part].clone().requires_grad_()
        ws = [w.clone().requires_grad_() for w in weights]
        bs = [b.clone().requires_grad_() if b is not None else None for b in biases]
        outs = _GatheredLinears.apply(x, dist.group.WORLD, fused, len(ws), *ws, *bs)
        sum((y * c).sum() for y, c in zip(outs, cots)).backward()
        # reference: autograd through the plain gathered input and F.linear
        rx = x_full.clone().requires_grad_()
        rws = [w.clone().requires_grad_() for w in weights]
        rbs = [b.clone().requires_grad_() if b is not None else None for b in biases]
        ref = [torch.nn.functional.linear(rx, w, b) for w, b in zip(rws, rbs)]
        sum((y * c).sum() for y, c in zip(ref, cots)).backward()
        gx = rx.grad.clone()
        dist.all_reduce(gx)  # every rank's layers contribute to the input gradient
        diffs = [(y - r).abs().max().item() for y, r in zip(outs, ref)]
        diffs.append((x.grad - gx[:, rank * part:(rank + 1) * part]).abs().max().item())
        diffs += [(w.grad - r.grad).abs().max().item() for w, r in zip(ws, rws)]
        diffs += [(b.grad - r.grad).abs().max().item() for b, r in zip(bs, rbs) if b is not None]
        assert all(d < 1e-12 for d in diffs), (rank, fused, diffs)
        assert len(diffs) == 3 + 1 + 3 + 2
        worst[fused] = max(diffs)
    return worst


@pytest.mark.slow  # spawns 2, then 3 ranks: 3 s
def test_gathered_linears_match_plain_gather_and_linear_on_2_and_3_ranks():
    for world in (2, 3):
        out = run_ranks(_against_plain, world, timeout=120)
        assert len(out) == world and all(max(r.values()) < 1e-12 for r in out), out


def _kept_and_collectives(rank: int, world: int) -> dict:
    """What autograd keeps of an attention and an FFN block of the real GPT (tp = world, sequence parallel), and
    the collectives of one Function call."""
    from dist_train.config import config_from_dict
    from dist_train.models.attention import AttentionContext
    from dist_train.models.gpt import Attention, FeedForward, rope_cos_sin

    cfg = config_from_dict({"model": {"kind": "gpt", "d_model": 16, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2,
                                      "ffn_hidden": 40, "vocab_size": 32}, "data": {"seq_len": S}})
    tp = _tp(world)
    torch.manual_seed(0)
    attn, ffn = Attention(cfg.model, AttentionContext(), tp), FeedForward(cfg.model, tp)
    x = torch.randn(B, S // world, 16, requires_grad=True)
    cos, sin = rope_cos_sin(torch.arange(S), 4, 10000.0, torch.float32)
    shapes: list = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.nn.Parameter):
            shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        a = attn(x, cos, sin)
        f = ffn(x)
    calls = {"all_gather": 0, "all_reduce": 0}
    originals = {name: getattr(dist, name) for name in calls}

    def counting(name):
        def call(*args, **kwargs):
            calls[name] += 1
            return originals[name](*args, **kwargs)
        return call

    for name in calls:
        setattr(dist, name, counting(name))
    try:
        y = column_outputs(tp, x, (ffn.w1, ffn.w3))
        forward = dict(calls)
        sum(t.sum() for t in y).backward()
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    backward = {k: calls[k] - forward[k] for k in calls}
    return {"a": tuple(a.shape), "f": tuple(f.shape), "shapes": shapes, "forward": forward, "backward": backward}


def test_sequence_parallel_blocks_keep_the_local_chunk_not_the_gathered_input():
    """The attention's q, k, v and the FFN's w1, w3 save x's [B, S/tp, d] chunk (once per group) and never the
    gathered [B, S, d]; one Function call all-gathers once in forward and once more in backward, where the input
    gradient is reduce-scattered (gloo: an all-reduce + own chunk)."""
    for rank_out in run_ranks(_kept_and_collectives, 2, timeout=120):
        assert rank_out["a"] == rank_out["f"] == (B, S // 2, 16)
        assert (B, S, 16) not in rank_out["shapes"], rank_out["shapes"]
        assert rank_out["shapes"].count((B, S // 2, 16)) == 2, rank_out["shapes"]  # one per column group
        assert rank_out["forward"] == {"all_gather": 1, "all_reduce": 0}
        assert rank_out["backward"] == {"all_gather": 1, "all_reduce": 1}


def _bf16_against_megatron(rank: int, world: int) -> dict:
    """bf16 CPU autocast: the Function's outputs and gradients against Megatron's column layers on the all-gathered
    input (the unfused path, run with autocast re-entered for its backward as CUDA's custom_bwd does)."""
    tp = _tp(world)
    torch.manual_seed(1)
    layers = [tp.column(D, o * world, bias=b) for o, b in zip(OUT, WITH_BIAS)]
    for layer in layers:
        torch.nn.init.normal_(layer.weight)
        if layer.bias is not None:
            torch.nn.init.normal_(layer.bias)
    gen = torch.Generator().manual_seed(5 + rank)
    x = torch.randn(B, S // world, D, generator=gen).requires_grad_()
    cots = [torch.randn(B, S, o, generator=gen) for o in OUT]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = tp.gathered_linears(x, layers)
        sum((y.float() * c).sum() for y, c in zip(outs, cots)).backward()
    got = [y.detach() for y in outs] + [x.grad] + [p.grad for layer in layers for p in layer.parameters()]
    x_ref = x.detach().clone().requires_grad_()
    for layer in layers:
        layer.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = [layer(tp.enter(x_ref)) for layer in layers]
        sum((y.float() * c).sum() for y, c in zip(ref, cots)).backward()
    want = [y.detach() for y in ref] + [x_ref.grad] + [p.grad for layer in layers for p in layer.parameters()]
    assert [t.dtype for t in got] == [t.dtype for t in want], ([t.dtype for t in got], [t.dtype for t in want])
    return {"max_rel": max(((g.float() - w.float()).abs().max() / w.float().abs().max()).item()
                           for g, w in zip(got, want)),
            "dtypes": [str(t.dtype) for t in got]}


@pytest.mark.slow  # spawns ranks, imports megatron-core: 2.5 s
def test_gathered_linears_under_bf16_autocast_compute_what_megatrons_layers_compute():
    """Outputs bf16 (with a bias too: it is added in the output's dtype, as ``nn.Linear`` under autocast does and as
    ``TensorParallel.column`` adds it — Megatron's own ``output + bias`` made them fp32), input and weight gradients
    fp32, equal to Megatron's layers up to the order the input gradients are summed in."""
    for rank_out in run_ranks(_bf16_megatron_cpu, 2, timeout=120):
        assert rank_out["max_rel"] < 1e-6, rank_out  # 0.0 when written
        assert rank_out["dtypes"][:4] == ["torch.bfloat16"] * 3 + ["torch.float32"], rank_out  # 3 outputs, dL/dx


def _bf16_megatron_cpu(rank: int, world: int) -> dict:
    """Megatron's Function restores CUDA's autocast state in backward only (``custom_bwd(device_type='cuda')``), so
    on CPU its backward runs under the CPU autocast that the engine's backward does not carry: give it the same
    state the Function restores, then compare."""
    import megatron.core.tensor_parallel.layers as mlayers

    fn = mlayers.LinearWithGradAccumulationAndAsyncCommunication
    original = fn.backward

    def backward(ctx, *grads):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return original(ctx, *grads)

    fn.backward = staticmethod(backward)
    try:
        return _bf16_against_megatron(rank, world)
    finally:
        fn.backward = staticmethod(original)


def _train_bf16(rank: int, world: int, run_dir: str) -> list[float]:
    cfg = tiny_gpt_config(run_dir, steps=3, parallel={"tp": 2, "sequence_parallel": True}, train={"precision": "bf16"})
    return train(cfg).losses


@pytest.mark.slow  # 2 ranks x 3 steps + the single-rank run: 5 s
def test_tp2_sequence_parallel_trains_in_bf16_on_cpu(tmp_path):
    """bf16 autocast on CPU with tp2 + sequence parallelism trains like single-rank bf16 (within 2e-3): the Function
    restores the forward's CPU autocast in its backward. Before, Megatron's column layers failed there ('expected
    m1 and m2 to have the same dtype': their custom_bwd restores CUDA's autocast only)."""
    ref = train(tiny_gpt_config(tmp_path / "ref", steps=3, train={"precision": "bf16"})).losses
    for losses in run_ranks(_train_bf16, 2, args=(str(tmp_path / "tp2_sp"),), timeout=240):
        assert rel_close(losses, ref, 2e-3), (losses, ref)

"""Tensor parallelism for the pixel-level Swin equals the single-rank model in float64, forward and backward.

Megatron-core layers as in the GPT: heads split over tp (``qkv`` column-parallel with stride 3 — each rank
holds the q, k and v rows of its heads — and ``proj`` row-parallel), the relative-position bias split by
heads, the MLP split over its hidden units; norms, the row layers' biases, the patch embedding and the
pixel head replicated. Cases: tp 3 (odd) alone, tp 2 × wp[1,2] and tp 2 × cp 2 (Ulysses inside
windows on heads/(tp·cp) heads) on 4 ranks, and all three, tp 2 × cp 2 × wp[1,2], on 8 (slow; also what the blocks
keep, counted live, against the memory model). Ranks are laid out like the mesh, tp innermost:
global rank = (wp_rank·cp + cp_rank)·tp + tp_rank.

On every rank: the cost model counts exactly the parameters the rank holds and predicts the all-to-alls
and halo bytes it sends (per tp rank: the q|k|v of its heads/(tp·cp) heads; x whole for the halo without
cp; the all-to-all bytes as the mean over the cp group, whose bands may differ); the initial weights are
exactly the reference's shard (per-parameter seeded init, whatever the layout); the loss summed over wp × cp
equals the reference; every gradient summed over wp × cp equals the reference gradient's shard (tp-sharded
parameters) or the whole reference gradient (replicated ones).
"""
from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from dist_train.cost.layout import pipeline_stages
from dist_train.cost.memory import estimate_memory, rank_param_tensors
from dist_train.cost.shape import rank_inputs
from dist_train.cost.step_time import swin_halo_traffic, ulysses_traffic
from dist_train.models.swin import build_swin
from dist_train.models.tensor_parallel import TensorParallel, copy_shard_, is_tp_sharded, shard_of, unshard_strided
from dist_train.plan.profiles import builtin_profiles
from parallelism.window import halo_stats, reset_halo_stats, reset_ulysses_stats, ulysses_stats
from tests.dist_harness import run_ranks
from tests.test_swin_saved_tensors import _config as swin_config
from tests.test_swin_saved_tensors import counted_block_bytes, predicted_block_bytes
from tests.trainer_utils import tiny_swin_config

B, D_HEAD, SEED = 2, 4, 5
# by world size: (tp, wp grid, cp, heads, image H, W, window, wrap)
# (tp 2 alone trains against one rank in tests/test_training_swin_pp.py; every spawned rank pays ~5 s of
# megatron-core imports, so the float64 cases start at 3 ranks)
CASES = {
    3: [(3, (1, 1), 1, 3, 13, 8, (4, 4), (False, False)),    # one head per rank; padded rows
        (3, (1, 1), 1, 6, 7, 9, (3, 3), (False, False))],    # two heads per rank
    4: [(2, (1, 2), 1, 2, 10, 16, (4, 4), (False, True)),    # tp 2 × wp 1×2 (halo exchange per tp rank)
        (2, (1, 1), 2, 4, 9, 14, (3, 4), (False, False))],   # tp 2 × cp 2: one head per rank
    8: [(2, (1, 2), 2, 4, 10, 16, (4, 4), (False, True))],   # tp 2 × cp 2 × wp 1×2: the halo of q|k|v, one head
}
# world 8 also counts what the blocks keep (tests/test_swin_saved_tensors.py's live count) against the memory model:
# (d_model, heads, ffn, window, image) without padding, fp32 and bf16 autocast, no and full checkpointing
KEPT_SHAPE = (16, 4, 48, 4, (8, 16))


def _cfg(heads, window, wrap):
    return SimpleNamespace(kind="swin", d_model=heads * D_HEAD, n_layers=2, n_heads=heads, ffn_hidden=12 * heads,
                           norm_eps=1e-5, patch_size=1, window=list(window), in_channels=3, out_channels=3,
                           init_std=0.2, wrap=list(wrap))


def _groups(tp: int, nwp: int, cp: int):
    """(tp group + its ranks, wp group, cp group, grad group = wp × cp at this tp coordinate) of this rank;
    every rank creates every group in the same order."""
    rank = dist.get_rank()
    t, c, w = rank % tp, rank // tp % cp, rank // (tp * cp)
    at = lambda w_, c_, t_: (w_ * cp + c_) * tp + t_  # noqa: E731
    found = {}
    for kind, members in (
            ("tp", [[at(w_, c_, t_) for t_ in range(tp)] for w_ in range(nwp) for c_ in range(cp)]),
            ("wp", [[at(w_, c_, t_) for w_ in range(nwp)] for c_ in range(cp) for t_ in range(tp)]),
            ("cp", [[at(w_, c_, t_) for c_ in range(cp)] for w_ in range(nwp) for t_ in range(tp)]),
            ("grad", [[at(w_, c_, t_) for w_ in range(nwp) for c_ in range(cp)] for t_ in range(tp)])):
        for ranks in members:
            g = dist.new_group(ranks)
            if rank in ranks:
                found[kind] = (g, ranks)
    del t, c, w
    return found


def _model_cases(rank: int, world: int) -> int:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        done = _checked_cases(world)
    # Megatron's advice to set a CUDA stream variable is noise on every CPU rank of every tp run
    assert not [w for w in caught if "CUDA_DEVICE_MAX_CONNECTIONS" in str(w.message)], "megatron's CUDA warning"
    return done


def _checked_cases(world: int) -> int:
    for case_id, (tp, grid, cp, heads, H, W, window, wrap) in enumerate(CASES[world]):
        nwp = grid[0] * grid[1]
        assert tp * nwp * cp == world
        groups = _groups(tp, nwp, cp)
        tpc = TensorParallel.from_group(*groups["tp"], seed=SEED, device=torch.device("cpu"))
        cfg = _cfg(heads, window, wrap)
        tag = f"case {case_id} tp {tp} grid {grid} cp {cp} heads {heads} image {H}x{W} window {window}"
        gen = torch.Generator().manual_seed(80 + case_id)
        x = torch.randn(B, H, W, 3, generator=gen, dtype=torch.float64)
        y = torch.randn(B, H, W, 3, generator=gen, dtype=torch.float64)

        ref = build_swin(cfg, wp_group=None, grid=(1, 1), init_seed=SEED).double()
        par = build_swin(cfg, wp_group=groups["wp"][0] if nwp > 1 else None, grid=grid,
                         cp_group=groups["cp"][0] if cp > 1 else None, tp=tpc, init_seed=SEED).double()
        ref_params = dict(ref.named_parameters())
        planned = tiny_swin_config("/nonexistent", "/nonexistent", model={
            "d_model": cfg.d_model, "n_heads": heads, "ffn_hidden": cfg.ffn_hidden, "window": list(window),
            "wrap": list(wrap), "in_channels": 3, "out_channels": 3}, data={"image": [H, W], "channels": 3},
            parallel={"tp": tp, "cp": cp, "wp": list(grid)}, train={"global_batch": B, "micro_batch": B})
        mem = estimate_memory(planned, pipeline_stages(planned), builtin_profiles()["cpu"])
        assert mem.params == 4 * sum(p.numel() for p in par.parameters()), f"{tag}: the cost model's weights"
        planned_sh, planned_loc = rank_inputs(planned, builtin_profiles()["cpu"])
        # tensor by tensor, in module order: what ZeRO-3's persistence threshold is applied to (cost.memory)
        modelled = rank_param_tensors(planned, planned_sh, planned_loc.loads[0])
        assert [p.numel() for p in par.parameters()] == modelled, tag
        assert par.blocks["0"].qkv.weight.shape == (3 * cfg.d_model // tp, cfg.d_model), tag
        assert par.blocks["0"].bias.shape[0] == heads // tp, tag
        for name, p in par.named_parameters():  # the same weights as one rank, sharded
            full = ref_params[name].detach()
            want = shard_of(full, p.partition_dim, p.shape[p.partition_dim], tpc.rank, tp,
                            p.partition_stride) if is_tp_sharded(p) else full
            assert torch.equal(p.detach(), want), f"{tag}: initial {name} is not the single-rank shard"

        with torch.no_grad():  # the zero-initialised head would hide every block from the gradients
            ref.head.weight.normal_(std=0.2, generator=gen)
            for blk in ref.blocks.values():  # distinct heads and biases: a swapped head slice shows
                for p in (blk.bias, blk.qkv.bias, blk.proj.bias, blk.fc1.bias, blk.fc2.bias):
                    p.normal_(std=0.3, generator=gen)
            for name, p in par.named_parameters():
                copy_shard_(p, ref_params[name].detach(), tpc.rank, tp)
        ref_loss, ref_count = ref({"x": x, "y": y, "image_size": (H, W)})
        ref_loss.backward()

        rows, cols = par.tile_slices((H, W))
        reset_ulysses_stats()
        reset_halo_stats()
        loss, count = par({"x": x[:, rows, cols], "y": y[:, rows, cols], "image_size": (H, W)})
        loss.backward()
        sh, loc = rank_inputs(planned, builtin_profiles()["cpu"])
        (a2as, a2a), (_, halo) = ulysses_traffic(planned, loc), swin_halo_traffic(planned, sh, loc)
        sent = torch.tensor([float(ulysses_stats()["bytes_sent"])], dtype=torch.float64)
        if cp > 1:
            dist.all_reduce(sent, group=groups["cp"][0])
        L = cfg.n_layers  # forward and backward; float64 here, the planned run's elements are loc.bpe bytes
        assert ulysses_stats()["calls"] == 2 * L * a2as == (4 * L if cp > 1 else 0), (tag, ulysses_stats())
        assert float(sent) / cp == pytest.approx(2 * L * a2a / loc.bpe * 8, rel=1e-12), (tag, float(sent), a2a)
        assert halo_stats()["bytes_sent"] == 2 * (L // 2) * halo / loc.bpe * 8, (tag, halo_stats(), halo)
        assert (halo > 0) == (nwp > 1), tag
        grad_group = groups["grad"][0]
        total = torch.stack([loss.detach(), count.double()])
        dist.all_reduce(total, group=grad_group)
        assert float(total[1]) == float(ref_count) == B * H * W * 3, tag
        assert torch.allclose(total[0], ref_loss.detach(), rtol=1e-11, atol=0), f"{tag}: {total[0]} vs {ref_loss}"
        for name, p in par.named_parameters():
            ref_grad = ref_params[name].grad
            assert ref_grad.abs().max() > 0, f"{tag}: {name} has no gradient in the reference"
            want = shard_of(ref_grad, p.partition_dim, p.shape[p.partition_dim], tpc.rank, tp,
                            p.partition_stride) if is_tp_sharded(p) else ref_grad
            g = p.grad.clone()
            dist.all_reduce(g, group=grad_group)  # the trainer's reduction over wp × cp (not tp)
            assert torch.allclose(g, want, rtol=1e-9, atol=1e-12), \
                f"{tag}: {name} grad max err {(g - want).abs().max()}"

    if world == 8:
        groups = _groups(2, 2, 2)
        tpc = TensorParallel.from_group(*groups["tp"], seed=SEED, device=torch.device("cpu"))
        for precision in ("fp32", "bf16"):
            for checkpointing in ("none", "full"):
                cfg = swin_config(*KEPT_SHAPE, activation_checkpointing=checkpointing, precision=precision, tp=2,
                                  cp=2, wp=[1, 2])
                counted = counted_block_bytes(cfg, wp_group=groups["wp"][0], cp_group=groups["cp"][0], tp=tpc,
                                              live=True)
                assert counted == pytest.approx(predicted_block_bytes(cfg), rel=1e-12), (precision, checkpointing)
    if world == 4:  # bad input: heads not divisible by tp·cp
        groups = _groups(2, 1, 2)
        tpc = TensorParallel.from_group(*groups["tp"], seed=SEED, device=torch.device("cpu"))
        with pytest.raises(ValueError, match=r"n_heads = 2 is not divisible by tp·cp = 2·2.*one of \[1, 2\]"):
            build_swin(_cfg(2, (4, 4), (False, False)), wp_group=None, grid=(1, 1), cp_group=groups["cp"][0],
                       tp=tpc)
    return len(CASES[world])


@pytest.mark.parametrize("world", [3, 4, pytest.param(8, marks=pytest.mark.slow)])
def test_swin_tensor_parallel_equals_single_rank(world):
    """World 8 (tp 2 × cp 2 × wp 1×2 on 8 gloo ranks; 7–11 s when written at load average 6–10 on the 2 cores):
    the halo exchange of the shifted block carries q|k|v of this rank's heads/(tp·cp) heads out and the attention
    output back — 4·d/(tp·cp) channels of the tile's two strips and corner, which ``swin_halo_traffic`` predicts —
    and the blocks keep what the memory model says, per rank, fp32 and bf16."""
    assert run_ranks(_model_cases, world, timeout=300) == [len(CASES[world])] * world


def test_strided_shards_follow_megatron_and_invert():
    """``shard_of`` with stride 3 is Megatron's own split (``_initialize_affine_weight_cpu``): rank r holds
    the q, k and v rows of its heads; ``unshard_strided`` puts the ranks' shards back together."""
    from megatron.core.tensor_parallel.layers import _initialize_affine_weight_cpu

    d, tp = 12, 3
    full = torch.arange(3 * d * 5, dtype=torch.float32).reshape(3 * d, 5)
    shards = []
    for r in range(tp):
        mine = torch.empty(3 * d // tp, 5)
        _initialize_affine_weight_cpu(mine, 3 * d, 5, 3 * d // tp, 0, lambda w: w.copy_(full), stride=3,
                                      rank=r, world_size=tp)
        assert torch.equal(shard_of(full, 0, 3 * d // tp, r, tp, stride=3), mine)
        q, k, v = mine.chunk(3)
        heads = slice(r * d // tp, (r + 1) * d // tp)
        assert torch.equal(q, full[:d][heads]) and torch.equal(k, full[d:2 * d][heads]) and torch.equal(v, full[2 * d:][heads])
        shards.append(mine)
    assert torch.equal(unshard_strided(shards, 0, 3), full)
    assert torch.equal(shard_of(full, 0, 3 * d // tp, 1, tp), full[3 * d // tp:2 * 3 * d // tp])  # stride 1

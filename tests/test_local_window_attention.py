"""Windowed attention without the ring (cp=1, and Ulysses' gathered sequence): the tiled block
kernels as a one-rank ring, exact against the masked float64 reference, and O(S·w) memory."""
from __future__ import annotations

import pytest
import torch

import parallelism.context.plan as plan
from dist_train.bench.attention import _single_peak_bytes, check_memory_meter, peak_tensor_bytes
from dist_train.models.attention import AttentionContext, attention, local_causal_attention
from parallelism.context import default_tile, local_attention, simulate_ring_attention
from parallelism.context.layouts import Chunk, rank_chunks
from parallelism.context.masks import classify
from parallelism.context.plan import EXPLICIT_TILE, build_schedule
from tests.dist_harness import run_ranks
from tests.test_cp_reference import max_rel_err, random_qkv, reference_attention


def _grads(out, q, k, v, seed=1):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, (q, k, v), g)


def _check(s, hq, hkv, window, tile, kernel="auto", tol=1e-12):
    q, k, v = random_qkv(2, s, hq, hkv, 8)
    ref = reference_attention(q, k, v, causal=True, window=window)
    if tile is None:
        out = local_causal_attention(q, k, v, window, kernel)
    else:
        out = local_attention(q, k, v, causal=True, window=window, tile=tile, kernel=kernel)
    errs = [max_rel_err(out, ref)] + [max_rel_err(a, b) for a, b in zip(_grads(out, q, k, v), _grads(ref, q, k, v))]
    assert max(errs) <= tol, (s, hq, hkv, window, tile, kernel, errs)


@pytest.mark.parametrize("window", [5, 16, 40])           # smaller than, equal to and larger than the tile
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (6, 1)])
def test_tiled_window_equals_masked_reference(window, hq, hkv):
    _check(100, hq, hkv, window, tile=16)                    # 100 = 6 tiles + a 4-token last tile


@pytest.mark.parametrize("window", [1, 200, 256, 300, 700])
def test_model_entry_point_with_default_tiles(window):
    """The model's local attention (default tile ~max(128, w)): w < tile, w = tile, w > S."""
    _check(384, 4, 2, window, tile=None)


def test_math_kernel_and_non_causal_window():
    _check(64, 2, 1, 7, tile=8, kernel="math")
    q, k, v = random_qkv(1, 50, 2, 2, 8)
    out = local_attention(q, k, v, causal=False, window=6, tile=8)
    assert max_rel_err(out, reference_attention(q, k, v, causal=False, window=6)) <= 1e-12


def test_window_work_is_linear_in_sequence():
    """The one-rank ring's kernel calls with a window: tile-sized, at most two per query tile, so the
    computed (query, key) area per token is bounded by 2·tile whatever S is."""
    tile = default_tile(64)
    for s in (1024, 4096, 16384):
        blocks = build_schedule(((Chunk(0, 1, s),),), True, 64, tile, None)[0].plan.blocks[0][0]
        assert all(b.q_hi - b.q_lo <= tile and b.k_hi - b.k_lo <= tile for b in blocks)
        assert len(blocks) == 2 * (s // tile) - 1
        assert sum((b.q_hi - b.q_lo) * (b.k_hi - b.k_lo) for b in blocks) <= 2 * tile * s


def test_bad_window_is_one_clear_error():
    q, k, v = random_qkv(1, 16, 2, 2, 4)
    with pytest.raises(ValueError, match="window=-1"):
        local_attention(q, k, v, window=-1)


def _attention_peaks(rank, world, seq_lens, window):
    """Peak tensor bytes of the model's attention entry point, fwd+bwd, at each S (cp = world)."""
    import torch.distributed as dist

    from dist_train.bench.attention import check_memory_meter, peak_tensor_bytes

    check_memory_meter()
    ctx = AttentionContext(cp_group=dist.group.WORLD if world > 1 else None, window=window)
    peaks = []
    for s in seq_lens:
        n = s // world
        g = torch.Generator().manual_seed(rank)
        q = torch.randn(1, n, 4, 32, generator=g, requires_grad=True)
        k, v = (torch.randn(1, n, 2, 32, generator=g, requires_grad=True) for _ in range(2))

        def step():
            attention(q, k, v, ctx).sum().backward()

        step()                                     # lazily created state is not the step's
        peaks.append(peak_tensor_bytes(step)[1])
    return peaks


@pytest.mark.slow
def test_windowed_attention_memory_is_linear_in_sequence_cp1():
    """cp=1: doubling S with a window grows the peak by at most 2.2x (an [S, S] mask would be 4x)."""
    peaks = _attention_peaks(0, 1, (4096, 8192), 64)
    assert peaks[1] <= 2.2 * peaks[0], peaks


@pytest.mark.slow
def test_windowed_attention_memory_is_linear_in_sequence_cp2():
    for peaks in run_ranks(_attention_peaks, 2, args=((4096, 8192), 64), timeout=170):
        assert peaks[1] <= 2.2 * peaks[0], peaks


def test_mixed_dtypes_under_autocast_take_the_autocast_dtype():
    """Under bf16 autocast RoPE leaves q, k in fp32 while v is bf16: the entry point casts all three to
    the autocast dtype (as torch SDPA does) instead of refusing mixed dtypes."""
    q, k, v = random_qkv(1, 64, 4, 2, 8)
    ref = reference_attention(q, k, v, causal=True, window=9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q.float(), k.float(), v.to(torch.bfloat16), AttentionContext(window=9))
    assert out.dtype == torch.bfloat16 and max_rel_err(out, ref) <= 2e-2
    out = attention(q.float(), k.float(), v.to(torch.bfloat16), AttentionContext(window=9))
    assert out.dtype == torch.float32 and max_rel_err(out, ref) <= 2e-2           # promoted without autocast


def test_sdpa_is_taken_only_where_it_keeps_no_scores():
    """torch SDPA on CPU (any float dtype) and CUDA 16-bit, or CUDA without grouped-query heads; CUDA fp32 with
    grouped-query heads would run SDPA's math kernel ([B, Hq, S, S] probabilities kept): the block kernels instead."""
    from dist_train.models.attention import sdpa_keeps_no_scores

    cpu, meta = torch.empty(1, 4, 2, 8), torch.empty(1, 4, 2, 8, device="meta")
    assert sdpa_keeps_no_scores(cpu, grouped=True) and sdpa_keeps_no_scores(cpu.double(), grouped=True)

    class Cuda:  # the device and dtype are all the rule reads (no CUDA on this machine)
        def __init__(self, dtype):
            self.device, self.dtype = torch.device("cuda"), dtype
    assert sdpa_keeps_no_scores(Cuda(torch.bfloat16), True) and sdpa_keeps_no_scores(Cuda(torch.float16), True)
    assert sdpa_keeps_no_scores(Cuda(torch.float32), False)
    assert not sdpa_keeps_no_scores(Cuda(torch.float32), True)
    assert meta.device.type == "meta" and sdpa_keeps_no_scores(meta, True)


@pytest.mark.parametrize("hq,hkv", [(4, 2), (6, 1)])
def test_full_causal_gqa_where_sdpa_would_keep_scores_runs_the_block_kernels(hq, hkv, monkeypatch):
    """The route CUDA fp32 GQA takes (forced here on CPU): exact against the float64 reference, forward and
    backward, through the one-rank ring (RingAttention saves q, k, v, out and the logsumexp: no [S, S] tensor)."""
    import dist_train.models.attention as model_attention

    monkeypatch.setattr(model_attention, "sdpa_keeps_no_scores", lambda q, grouped: not grouped)
    _check(96, hq, hkv, None, tile=None)
    q, k, v = random_qkv(1, 96, hq, hkv, 8)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        local_causal_attention(q, k, v, None)
    assert saved and max(saved) < 96 * 96, saved   # the largest kept: q [1, 96, hq, 8]


def test_bench_attention_single_device_baseline_with_a_window_is_linear_in_sequence():
    """`dist-train bench attention --window w`'s single-process baseline (time and peak memory) is the model's
    windowed attention, O(S·w): doubling S grows its peak by at most 2.2x (SDPA with an [S, S] mask grew it 3.6x)."""
    check_memory_meter()
    cfg = {"batch": 1, "heads": 2, "kv_heads": 1, "head_dim": 16, "causal": True, "window": 64,
           "forward_only": False, "kernel": "auto"}
    small, large = (_single_peak_bytes(cfg, n) for n in (1024, 2048))
    assert large <= 2.2 * small, (small, large)


def test_wide_window_edge_blocks_are_at_most_explicit_tile():
    """A window wider than EXPLICIT_TILE has tiles of ~w tokens (up to S when w > S/2): its masked edge blocks are
    computed in sub-blocks of at most EXPLICIT_TILE rows and keys, on one rank and on every rank of a ring, so no
    kernel builds a [w, w] (or [S, S]) mask."""
    S = 8 * EXPLICIT_TILE
    for window in (EXPLICIT_TILE + 100, 3 * S // 4):
        tile = default_tile(window)
        for P, layout in ((1, "contiguous"), (2, "zigzag")):
            chunks = tuple(rank_chunks(S, r, P, layout) for r in range(P))
            blocks = [b for piece in build_schedule(chunks, True, window, tile, None) for per_rank in piece.plan.blocks
                      for per_source in per_rank for b in per_source]
            explicit = [b for b in blocks if b.mask.kind == "explicit"]
            assert explicit and all(b.q_hi - b.q_lo <= EXPLICIT_TILE and b.k_hi - b.k_lo <= EXPLICIT_TILE
                                    for b in explicit), (window, P, layout)


def test_wide_window_split_edge_blocks_stay_exact():
    """w = 600 (1024-token tiles, edge blocks cut into 512-token sub-blocks) at S = 1100: float64 exact, on one
    rank and on a simulated zigzag ring of 2."""
    _check(1100, 2, 1, 600, tile=None)
    q, k, v = random_qkv(1, 1100, 2, 1, 4, seed=4)
    ref = reference_attention(q, k, v, causal=True, window=600)
    out = simulate_ring_attention(q, k, v, world_size=2, layout="zigzag", window=600)
    errs = [max_rel_err(out, ref)] + [max_rel_err(a, b) for a, b in zip(_grads(out, q, k, v), _grads(ref, q, k, v))]
    assert max(errs) <= 1e-12, errs


def test_attention_memory_with_a_window_wider_than_half_the_sequence_is_linear():
    """Doubling S and w together (w = 0.7·S: one tile of S tokens, its edge block cut by the window): the model's
    attention peak (fwd+bwd) grows at most 2.2x: the edge block's mask is EXPLICIT_TILE-sized, not [S, S] (3.4x)."""
    check_memory_meter()
    peaks = []
    for s in (1024, 2048):
        g = torch.Generator().manual_seed(0)
        q = torch.randn(1, s, 2, 16, generator=g, requires_grad=True)
        k, v = (torch.randn(1, s, 1, 16, generator=g, requires_grad=True) for _ in range(2))
        ctx = AttentionContext(window=7 * s // 10)

        def step():
            attention(q, k, v, ctx).sum().backward()

        step()
        peaks.append(peak_tensor_bytes(step)[1])
    assert peaks[1] <= 2.2 * peaks[0], peaks


def test_window_planning_classifies_only_blocks_near_the_diagonal(monkeypatch):
    """Planning a window is linear in S too: tiles further than the window from every query are proven empty
    without classifying them (classifying every pair below the diagonal was O(S²/tile): 1.4 s at S = 262,144)."""
    calls = []
    monkeypatch.setattr(plan, "classify", lambda *a, **kw: calls.append(1) or classify(*a, **kw))
    counts = []
    for s in (2048, 8192):
        calls.clear()
        plan.build_plan.cache_clear()
        plan.build_schedule.cache_clear()
        plan.build_schedule(((Chunk(0, 1, s),),), True, 64, 128, None)
        counts.append(len(calls))
    assert counts[1] <= 4.5 * counts[0], counts

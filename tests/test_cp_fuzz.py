"""Seeded randomized differential testing of context-parallel attention (tests/cp_fuzz.py) against the
float64 reference, and the regressions its long runs found.

The fixed draws cover, between them, every feature :func:`tests.cp_fuzz.features` names (odd P with
every layout, 1–2-token shards, Ulysses with replicated K/V heads, hybrid, windows 0, 1, n ± 1,
c ± 1 and >= S, documents on and next to chunk borders, single-token documents, per-sample and
packed documents, K/V pieces, tiles, long chunks cut at 64 rows, every kind of invalid argument);
the coverage test keeps it that way if the draw changes. The long run:
``python -m tests.cp_fuzz --draws 3000 --seed 0`` (and ``--gloo P`` for real ranks).
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import parallelism.context.plan as plan
from parallelism.context import ScheduleError, Simulator, local_attention, simulate_ring_attention
from parallelism.context.comm import Post, Recv, Send, Wait
from tests.cp_fuzz import Draw, check, draw, features, run_gloo, run_simulated, runners
from tests.test_cp_reference import random_qkv

# 20 consecutive draws, then the cheapest draws adding coverage (greedy over seeds 0..2499)
SEEDS = list(range(20)) + [1060, 492, 824, 58, 864, 1046, 1849, 147, 560, 2248, 979, 1655, 2079, 422, 1455, 1686,
                           1968, 1490, 355, 1493, 1303, 2073, 183, 316]
# draws whose explicit blocks, cut at EXPLICIT_TILE = 2, mix explicit, full, causal and empty sub-blocks: ring
# (P 2, 5, 6, 7), Ulysses and hybrid (P 8, 4), every layout, causal and full, windows, shared and per-sample
# documents, K/V pieces
SPLIT_SEEDS = [21, 37, 51, 78, 90, 92, 97, 100, 103, 110, 120, 227, 329]
# P = 3 on gloo: ring, Ulysses with replicated K/V heads, documents, K/V pieces, windows, and three
# invalid draws that every rank must refuse alike
GLOO_SEEDS = [7, 26, 35, 22, 87, 157, 445, 310, 229, 220, 343]
# P = 4 hybrids (U = 2) from the draw: documents per sample / shared with window 0, K/V pieces
GLOO_HYBRID_SEEDS = [23, 694]


def test_fixed_draws_cover_every_feature():
    covered = set().union(*(features(draw(s)) for s in SEEDS))
    space = set().union(*(features(draw(s)) for s in range(600)))
    assert space - covered == set(), sorted(space - covered)
    assert {"invalid:scale", "invalid:tile", "invalid:window", "invalid:heads", "long"} <= covered


def test_fixed_fuzz_draws_match_the_float64_reference():
    """Simulator (and, at P = 1, local_attention and the model's attention) against the reference,
    forward and dq, dk, dv within 1e-10; invalid draws refused with a ValueError."""
    failures = [f"seed {s} {run.__name__}: {msg}" for s in SEEDS for run in runners(draw(s))
                if (msg := check(draw(s), run)) is not None]
    assert not failures, "\n".join(failures)


@pytest.fixture
def explicit_tile_2(monkeypatch):
    """plan.EXPLICIT_TILE = 2 for one test, with the plan caches (not keyed on it) cleared before and after."""
    monkeypatch.setattr(plan, "EXPLICIT_TILE", 2)
    plan.build_plan.cache_clear()
    plan.build_schedule.cache_clear()
    yield
    plan.build_plan.cache_clear()
    plan.build_schedule.cache_clear()


def test_fuzz_draws_with_explicit_blocks_cut_into_sub_blocks_match_the_float64_reference(explicit_tile_2, monkeypatch):
    """The planner cuts an explicit block larger than EXPLICIT_TILE (512) into sub-blocks classified on their own.
    The draws' shards (1–5 tokens a chunk) never reach 512, so at the real size nothing here cuts a block, and the
    hand-picked cases cover only causal zigzag/contiguous rings; at 2 tokens these draws' explicit blocks are cut (the
    count is asserted) and stay exact, forward and dq, dk, dv."""
    cut = []
    parts = plan._explicit_parts
    monkeypatch.setattr(plan, "_explicit_parts", lambda *a, **kw: cut.append(1) or parts(*a, **kw))
    failures = []
    for s in SPLIT_SEEDS:
        before = len(cut)
        failures += [f"seed {s} {run.__name__}: {msg}" for run in runners(draw(s))
                     if (msg := check(draw(s), run)) is not None]
        if len(cut) == before:
            failures.append(f"seed {s}: no explicit block was cut")
    assert not failures, "\n".join(failures)


@pytest.mark.slow  # 11 draws on 3 spawned gloo ranks: ~7 s on the loaded 2-core machine
def test_fuzz_draws_on_gloo_ranks():
    """The same draws through context_parallel_attention on 3 real gloo ranks (the all-to-all and the
    K/V head replication the simulator does not run), asserted on every rank."""
    assert {draw(s).world_size for s in GLOO_SEEDS} == {3}
    assert {draw(s).method for s in GLOO_SEEDS} == {"ring", "ulysses"}
    assert sum(draw(s).invalid is not None for s in GLOO_SEEDS) == 3
    failures = run_gloo([draw(s) for s in GLOO_SEEDS], timeout=170)
    assert not failures, failures


def test_strided_kv_through_the_ring_on_gloo_ranks():
    """Regression: K/V that are strided views made the whole-shard backward ring send them as they
    were, and gloo refused ("RuntimeError: input tensor has to be contiguous"). Found with a hybrid
    (U = 2) holding one token per rank with B = 2: the all-to-all's gathered K/V is then a view, not a
    copy, even for contiguous inputs; non-contiguous inputs (``strided``) through the plain ring too."""
    base = Draw(seed=5044, world_size=4, layout="striped", ulysses_degree=2, seq_len=4, batch=2, hq=2, hkv=1,
                head_dim=4, causal=True, window=None, tile=None, kv_piece=None, cu_seqlens=None, packed=False,
                kernel="sdpa", scale=None)
    # hkv = 2: with one K/V head a [B, H, S, D] view transposed is still contiguous
    draws = [base, replace(base, seed=5045, ulysses_degree=1, seq_len=8, hkv=2, strided=True, causal=False)]
    draws += [draw(s) for s in GLOO_HYBRID_SEEDS]
    assert all(d.world_size == 4 for d in draws) and {d.method for d in draws} == {"hybrid", "ring"}
    failures = run_gloo(draws, timeout=170)
    assert not failures, failures


# ---------------------------------------------------------------- regressions found by the fuzz
def _full(B=1, S=12, hq=4, hkv=2, D=4):
    return [x.detach() for x in random_qkv(B, S, hq, hkv, D, seed=0)]


def test_simulator_refuses_what_the_real_ranks_refuse():
    """The simulator skipped the API's checks: a negative window gave NaN (every row empty) and
    heads a Ulysses degree does not divide were computed although no real all-to-all can split them."""
    q, k, v = _full()
    with pytest.raises(ValueError, match=r"window=-1 must be None or an int >= 0"):
        simulate_ring_attention(q, k, v, world_size=3, layout="zigzag", window=-1)
    q3, k3, v3 = _full(hq=3, hkv=1)
    with pytest.raises(ValueError, match=r"Ulysses degree 2 must divide the query heads Hq=3"):
        simulate_ring_attention(q3, k3, v3, world_size=2, layout="contiguous", ulysses_degree=2)
    with pytest.raises(ValueError, match=r"query heads Hq=4 must be a multiple of K/V heads Hkv=3"):
        simulate_ring_attention(q, *_full(hkv=3)[1:], world_size=2, layout="striped")


@pytest.mark.parametrize("entry", ["local", "simulated"])
def test_bad_tile_scale_and_window_are_refused(entry):
    """tile=-1 produced an all-zero output (no tile was ever cut), scale <= 0 NaN (torch's CPU flash op
    on a causal block), window=True a RuntimeError deep in the planner, an empty head dimension a
    ZeroDivisionError; each is now one ValueError."""
    q, k, v = _full()

    def call(**kw):
        if entry == "local":
            return local_attention(q, k, v, **kw)
        return simulate_ring_attention(q, k, v, world_size=3, layout="contiguous", **kw)

    for kw, msg in (({"tile": -1}, r"tile=-1 must be None"), ({"tile": 0}, r"tile=0 must be None"),
                    ({"tile": 2.5, "window": 3}, r"tile=2.5 must be None"),
                    ({"scale": 0.0}, r"scale=0.0 must be None"), ({"scale": -1.0}, r"scale=-1.0 must be None"),
                    ({"scale": float("nan")}, r"scale=nan must be None"), ({"window": True}, r"window=True must be")):
        with pytest.raises(ValueError, match=msg):
            call(**kw)
    # no heads or a zero head dim: was a ZeroDivisionError deep in the kernel setup
    for shape in ((1, 12, 0, 4), (1, 12, 2, 0)):
        x = torch.zeros(shape, dtype=torch.float64)
        with pytest.raises(ValueError, match=r"heads and head dim D must be >= 1"):
            local_attention(x, x, x) if entry == "local" else simulate_ring_attention(x, x, x, world_size=3,
                                                                                      layout="contiguous")
    assert torch.isfinite(call(scale=0.01)).all()


def test_simulator_refuses_non_contiguous_p2p_buffers():
    """The simulator checks what real p2p needs: a strided buffer posted by a ring generator is a
    ScheduleError (gloo: "input tensor has to be contiguous"), not a silent clone."""
    def rank_gen(r, x):
        handle = yield Post([Send(1 - r, x, 0), Recv(1 - r, torch.empty(2, 3), 0)])
        yield Wait(handle)

    ok = Simulator(2).run([rank_gen(0, torch.zeros(2, 3)), rank_gen(1, torch.zeros(2, 3))])
    assert ok == [None, None]
    with pytest.raises(ScheduleError, match=r"rank 1 posts a non-contiguous Send buffer .*strides \(1, 2\)"):
        Simulator(2).run([rank_gen(0, torch.zeros(2, 3)), rank_gen(1, torch.zeros(3, 2).t())])


@pytest.mark.parametrize("seed", [52, 441])
def test_work_counters_count_every_pair_of_per_sample_documents(seed):
    """Regression: fusing adjacent full blocks set the fused block's ``allowed`` to its area, dropping
    the factor of the document rows (per-sample documents sum a block's pairs over the samples), so
    CPStats.work_pairs and the plan's rank_work under-counted: 64 of 80 pairs (seed 52: P = 1, K/V
    pieces), 64 of 72 (seed 441: P = 5 zigzag, window 1). run_simulated asserts the sum equals the
    pairs the reference allows."""
    d = draw(seed)
    assert isinstance(d.cu_seqlens[0], tuple) and d.batch > 1 and d.invalid is None
    assert max(run_simulated(d)) <= 1e-10

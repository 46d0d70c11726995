"""The ring schedule for P up to 8 in one process (no real ranks): exactness, bf16 error growth,
communication counts, work balance, tiling, block classification, LSE merge and layouts."""
from __future__ import annotations

import pytest
import torch

from parallelism.context import (CPStats, LAYOUTS, Chunk, build_plan, check_seq_len, padded_length,
                                 rank_chunks, required_multiple, sequence_positions,
                                 simulate_ring_attention)
from parallelism.context.masks import classify, mask_tensor
from parallelism.context.merge import init_state, merge_
from tests.test_cp_reference import max_rel_err, random_qkv, reference_attention


def _check(P, layout, causal, window, hkv, kernel="auto", tile=None, dtype=torch.float64, tol=1e-12,
           kv_piece=None, stats=None, ulysses_degree=1, hq=4):
    S = 2 * P * 3
    q, k, v = random_qkv(1, S, hq, hkv, 8, dtype=torch.float64, seed=P)
    ref = reference_attention(q, k, v, causal=causal, window=window)
    grad = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
    xs = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    out = simulate_ring_attention(*xs, world_size=P, layout=layout, causal=causal, window=window,
                                  kernel=kernel, tile=tile, kv_piece=kv_piece, stats=stats,
                                  ulysses_degree=ulysses_degree)
    grads = torch.autograd.grad(out, xs, grad.to(dtype))
    errs = [max_rel_err(out, ref)] + [max_rel_err(g, r) for g, r in zip(grads, ref_grads)]
    assert max(errs) <= tol, (P, layout, causal, window, hkv, kernel, errs)


@pytest.mark.parametrize("P,U", [(4, 2), (4, 4), (6, 3), (6, 2)])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_simulated_hybrid_and_ulysses_are_exact_in_float64(P, U, layout):
    """Hybrid (U ranks do Ulysses, a ring over P/U groups) and Ulysses (U = P) in the simulator, with
    Hq = 12 heads (the all-to-all splits them U ways: U = 3 would refuse 4 heads, as the real ranks do)."""
    _check(P, layout, True, None, 2, ulysses_degree=U, stats=[CPStats() for _ in range(P // U)], hq=12)
    _check(P, layout, True, 5, 4, ulysses_degree=U, tile=4, hq=12)
    with pytest.raises(ValueError, match="ulysses_degree=4 must divide"):
        _check(6, layout, True, None, 2, ulysses_degree=4)


@pytest.mark.parametrize("P", [5, 6, 8])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_simulated_ring_is_exact_in_float64(P, layout):
    for causal in (True, False):
        for window, hkv in ((None, 2), (5, 1)):
            _check(P, layout, causal, window, hkv)


def test_simulated_math_kernel_and_small_tiles_are_exact():
    for layout in LAYOUTS:
        for causal in (True, False):
            _check(4, layout, causal, 4, 2, kernel="math", tile=2)
            _check(3, layout, causal, 2, 4, kernel="sdpa", tile=3)


@pytest.mark.parametrize("P", [1, 3, 4, 5])
def test_kv_pieces_are_exact_and_move_the_same_rows(P):
    """Sub-rings over K/V pieces (1 row, uneven 4+2 / 5+1 parts of the 6-row shard) equal the reference
    in float64, forward and every gradient; without a window they send exactly the whole-shard
    ring's K/V rows in m times as many messages (fewer where a piece is needed by no further rank),
    and with a window never more rows."""
    for layout in LAYOUTS:
        for causal in (True, False):
            for window, hkv in ((None, 2), (5, 1)):
                whole = [CPStats() for _ in range(P)]
                _check(P, layout, causal, window, hkv, stats=whole)
                # pieces per shard: m = ceil(6 / piece), but a zigzag piece takes >= 1 row of each chunk
                for piece, m in ((1, 3 if layout == "zigzag" else 6), (4, 2), (5, 2)):
                    st = [CPStats() for _ in range(P)]
                    _check(P, layout, causal, window, hkv, kv_piece=piece, stats=st)
                    for w, p in zip(whole, st):
                        assert p.kv_rows_sent <= w.kv_rows_sent, (layout, causal, piece)
                        # striped causal: a source's last row is needed by no later rank -> pruned
                        if window is None and not (layout == "striped" and causal and piece == 1):
                            assert p.kv_rows_sent == w.kv_rows_sent, (layout, causal, piece)
                            assert p.kv_blocks_sent == m * w.kv_blocks_sent, (layout, causal, piece)


def test_kv_pieces_balance_zigzag_and_keep_calls_piece_sized():
    """A zigzag piece takes a part of BOTH chunks, so every sub-ring step costs every rank the same;
    no kernel call spans more query rows than a piece (its dq stays piece-sized)."""
    from parallelism.context import build_schedule

    P, S, piece = 4, 4 * 2 * 64, 32
    chunks = tuple(rank_chunks(S, r, P, "zigzag") for r in range(P))
    schedule = build_schedule(chunks, True, None, None, piece)
    assert len(schedule) == 4 and all(p.rows == ((16 * i, 16 * i + 16), (64 + 16 * i, 80 + 16 * i))
                                      for i, p in enumerate(schedule))
    for p in schedule:
        for t in range(1, p.plan.num_steps):
            costs = {sum(b.work for d, s in p.plan.work(r, t) for b in p.plan.blocks[r][s]) for r in range(P)}
            assert len(costs) == 1, (p.rows, t, costs)
        assert max(b.q_hi - b.q_lo for r in range(P) for s in range(P) for b in p.plan.blocks[r][s]) <= piece
    with pytest.raises(ValueError, match="piece=0"):
        build_schedule(chunks, True, None, None, 0)


def test_bf16_error_does_not_grow_with_ring_size():
    S, errs = 256, {}
    q, k, v = random_qkv(1, S, 2, 2, 16, seed=11)
    ref = reference_attention(q, k, v, causal=True)
    for P in (1, 8):
        for layout in ("contiguous", "zigzag"):
            out = simulate_ring_attention(*(x.detach().bfloat16() for x in (q, k, v)), world_size=P,
                                          layout=layout, causal=True)
            assert out.dtype == torch.bfloat16
            errs[(P, layout)] = max_rel_err(out, ref)
    for layout in ("contiguous", "zigzag"):
        assert errs[(8, layout)] <= 1.5 * errs[(1, layout)], errs


def _sends(plan, rank):
    return sum(plan.sends(d, rank, t) for d in (1, -1) for t in range(plan.num_steps))


def _plan(S, P, layout, causal, window, tile=None):
    return build_plan(tuple(rank_chunks(S, r, P, layout) for r in range(P)), causal, window, tile)


def test_communication_counts_without_window():
    for P in (2, 3, 5, 8):
        S = 4 * P
        for layout in LAYOUTS:
            for causal in (True, False):
                plan = _plan(S, P, layout, causal, None)
                sends = [_sends(plan, r) for r in range(P)]
                if causal and layout == "contiguous":
                    # only sources s <= r are needed: P(P-1)/2 blocks in total, rank P-1 sends none
                    assert sum(sends) == P * (P - 1) // 2 and sends[-1] == 0, sends
                    assert max(sends) <= P - 1
                else:
                    assert sends == [P - 1] * P, (layout, causal, sends)


def test_window_communication_grows_with_window_not_with_sequence():
    for P in (4, 8):
        for S in (16 * P, 64 * P):          # 8 and 32 tokens per zigzag chunk
            plan = _plan(S, P, "zigzag", True, 8)
            assert [_sends(plan, r) for r in range(P)] == [1] + [2] * (P - 2) + [1]
            assert plan.num_steps == 2
            plan = _plan(S, P, "contiguous", True, 8)
            assert [_sends(plan, r) for r in range(P)] == [1] * (P - 1) + [0]
    # a window spanning two contiguous shards needs two hops, whatever P
    plan = _plan(8 * 8, 8, "contiguous", True, 12)
    # (rank 0 never forwards the wrapped block of rank 7; rank 7 has nobody to send to)
    assert plan.num_steps == 3 and [_sends(plan, r) for r in range(8)] == [1] + [2] * 6 + [0]


def test_simulated_counters_match_the_plan():
    P, S = 4, 32
    stats = [CPStats() for _ in range(P)]
    q, k, v = random_qkv(1, S, 2, 1, 4, seed=2)
    simulate_ring_attention(q, k, v, world_size=P, layout="zigzag", window=3, stats=stats).sum().backward()
    assert [s.kv_blocks_sent for s in stats] == [1, 2, 2, 1]
    assert [s.kv_blocks_sent_bwd for s in stats] == [1, 2, 2, 1]
    # every remote contribution is one dK/dV accumulator sent straight back to its owner
    assert [s.dkv_blocks_sent for s in stats] == [1, 2, 2, 1]
    assert all(s.ring_steps == 2 for s in stats)


def test_causal_work_per_step_matches_the_layout_theory():
    P, S = 4, 64
    n = S // P
    for layout in LAYOUTS:
        plan = _plan(S, P, layout, True, None)
        work = [plan.rank_work(r) for r in range(P)]
        assert sum(work) == S * (S + 1) // 2
        if layout == "contiguous":
            # rank r: r full blocks plus one causal triangle
            assert work == [r * n * n + n * (n + 1) // 2 for r in range(P)]
        elif layout == "zigzag":
            # every remote step is exactly half a block
            for r in range(P):
                for s in range(P):
                    if s != r:
                        assert sum(b.work for b in plan.blocks[r][s]) == n * n // 2
                        assert len(plan.blocks[r][s]) == 1     # fused into one kernel call
        else:
            for r in range(P):
                for s in range(P):
                    kinds = {b.mask.kind for b in plan.blocks[r][s]}
                    assert kinds == ({"causal"} if s <= r else {"shifted"})


def test_block_classification_is_exact():
    cases = [(Chunk(0, 1, 6), Chunk(0, 1, 6), True, None, "causal"),
             (Chunk(2, 4, 5), Chunk(3, 4, 5), True, None, "shifted"),
             (Chunk(3, 4, 5), Chunk(2, 4, 5), True, None, "causal"),
             (Chunk(6, 1, 6), Chunk(0, 1, 6), True, None, "full"),
             (Chunk(0, 1, 6), Chunk(6, 1, 6), True, None, "none"),
             (Chunk(20, 1, 6), Chunk(0, 1, 6), True, 8, "none"),
             (Chunk(6, 1, 6), Chunk(0, 1, 6), True, 8, "explicit"),
             (Chunk(0, 1, 6), Chunk(0, 1, 6), True, 2, "explicit")]
    for q, k, causal, window, kind in cases:
        m = classify(q, k, causal, window)
        assert m.kind == kind, (q, k, m)
        assert m.allowed == int(mask_tensor(q, k, causal, window).sum())


def test_merge_is_stable_and_handles_empty_rows():
    q = torch.zeros(1, 3, 1, 2)
    o, lse = init_state(q, torch.float32)
    ob = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]], [[0.0, 0.0]]]])
    merge_(o, lse, ob, torch.tensor([[[1000.0, -1000.0, float("-inf")]]]))
    merge_(o, lse, 2 * ob, torch.tensor([[[1000.0, -1000.0, float("-inf")]]]))
    assert torch.isfinite(o).all()
    assert torch.allclose(o[0, :2, 0], torch.tensor([[1.5, 3.0], [4.5, 6.0]]))
    assert torch.allclose(lse[0, 0, :2], torch.tensor([1000.0, -1000.0]) + torch.log(torch.tensor(2.0)))
    assert torch.isneginf(lse[0, 0, 2]) and torch.equal(o[0, 2], torch.zeros(1, 2))


def test_layouts_positions_and_errors():
    for P in (1, 2, 3, 4):
        for layout in LAYOUTS:
            S = 4 * required_multiple(P, layout)
            pos = [sequence_positions(S, rank=r, world_size=P, layout=layout) for r in range(P)]
            assert torch.equal(torch.sort(torch.cat(pos)).values, torch.arange(S))
            # RoPE consistency: the positions of a shard are the shard of arange(S)
            for r in range(P):
                chunks = rank_chunks(S, r, P, layout)
                assert torch.equal(torch.cat([c.positions() for c in chunks]), pos[r])
    assert sequence_positions(8, rank=1, world_size=2, layout="zigzag").tolist() == [2, 3, 4, 5]
    assert sequence_positions(8, rank=1, world_size=2, layout="striped").tolist() == [1, 3, 5, 7]
    assert required_multiple(4, "zigzag") == 8 and padded_length(13, 4, "zigzag") == 16
    with pytest.raises(ValueError, match=r"seq_len=13 .*world_size=4.*multiple of 8; nearest valid lengths: 8 or 16"):
        check_seq_len(13, 4, "zigzag")
    with pytest.raises(ValueError, match="layout='rows'"):
        required_multiple(2, "rows")

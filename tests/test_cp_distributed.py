"""Context-parallel attention on real gloo ranks (P = 1, 2, 3, 4) against the float64 reference.

One spawn per world size runs every layout × method × causal × window × GQA/MQA case, forward and
all gradients, and asserts on every rank; plus communication counts, invalid-length errors and the
shard/unshard round trips.
"""
from __future__ import annotations

import pytest
import torch

from parallelism.context import (CPStats, LAYOUTS, context_parallel_attention, sequence_positions,
                                 shard_sequence, unshard_sequence)
from parallelism.context.hybrid import ordered_new_group
from tests.dist_harness import run_ranks
from tests.test_cp_reference import max_rel_err, random_qkv, reference_attention

HQ, D, CHUNK, WINDOW = 12, 8, 3, 4


def _methods(P: int, layout: str) -> list[tuple[str, int]]:
    out = [("ring", 1), ("ulysses", P)]
    if P == 4 or layout == "zigzag":
        out += [("hybrid", u) for u in range(1, P + 1) if P % u == 0]
    return out


def _expected_kv_sends(P: int, layout: str, causal: bool, window) -> list[int] | None:
    """Hand-derived forward K/V sends per rank for S = 2P·CHUNK with CHUNK = 3 < WINDOW = 4."""
    if window is None:
        if causal and layout == "contiguous":
            # rank r needs sources s <= r; the planner balances P(P-1)/2 sends over both directions
            return {1: [0], 2: [1, 0], 3: [1, 2, 0], 4: [2, 2, 2, 0]}[P]
        return [P - 1] * P
    return None


def _cases_on_rank(rank: int, P: int) -> int:
    S = 2 * P * CHUNK
    checked = 0
    for layout in LAYOUTS:
        pos = sequence_positions(S, rank=rank, world_size=P, layout=layout)
        for method, degree in _methods(P, layout):
            for causal in (True, False):
                for window in (None, WINDOW):
                    # GQA (Hkv=4) and MQA (Hkv=1) alternate so each layout × method sees both, with
                    # and without causal masking and window, at half the cost of the full product
                    for hkv in ((4, 1)[(causal + (window is None)) % 2],):
                        q, k, v = random_qkv(2, S, HQ, hkv, D, seed=checked)
                        ref = reference_attention(q, k, v, causal=causal, window=window)
                        grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(7),
                                           dtype=torch.float64)
                        ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
                        ql, kl, vl = (x.detach()[:, pos].float().requires_grad_() for x in (q, k, v))
                        stats = CPStats()
                        out = context_parallel_attention(ql, kl, vl, group=None, layout=layout, method=method,
                                                         ulysses_degree=degree, causal=causal, window=window,
                                                         stats=stats)
                        grads = torch.autograd.grad(out, (ql, kl, vl), grad[:, pos].float())
                        what = f"rank {rank} P={P} {layout} {method}/{degree} causal={causal} w={window} hkv={hkv}"
                        assert out.dtype == torch.float32 and out.shape == ql.shape, what
                        err = max_rel_err(out, ref[:, pos])
                        assert err <= 1e-5, f"{what}: out err {err:.2e}"
                        for name, g, rg in zip("qkv", grads, ref_grads):
                            err = max_rel_err(g, rg[:, pos])
                            assert err <= 1e-5, f"{what}: d{name} err {err:.2e}"
                        if method == "ring":
                            assert stats.kv_blocks_sent <= P - 1, what
                            expected = _expected_kv_sends(P, layout, causal, window)
                            if expected is not None:
                                assert stats.kv_blocks_sent == expected[rank], (what, stats)
                        checked += 1
    return checked


def _pieces_on_rank(rank: int, P: int) -> None:
    """K/V pieces (kv_piece=2: uneven 2+1 parts of CHUNK=3, several sub-rings) on real ranks, through
    the ring and every hybrid split, with and without causal masking and a window."""
    S = 2 * P * CHUNK
    for layout in LAYOUTS:
        pos = sequence_positions(S, rank=rank, world_size=P, layout=layout)
        for method, degree in [m for m in _methods(P, layout) if m[0] != "ulysses"]:
            for causal, window in ((True, None), (False, WINDOW)):
                q, k, v = random_qkv(2, S, HQ, 4, D, seed=5)
                ref = reference_attention(q, k, v, causal=causal, window=window)
                ref_grads = torch.autograd.grad(ref, (q, k, v), torch.ones_like(ref))
                ql, kl, vl = (x.detach()[:, pos].float().requires_grad_() for x in (q, k, v))
                out = context_parallel_attention(ql, kl, vl, layout=layout, method=method, ulysses_degree=degree,
                                                 causal=causal, window=window, kv_piece=2)
                grads = torch.autograd.grad(out, (ql, kl, vl), torch.ones_like(out))
                what = f"rank {rank} P={P} {layout} {method}/{degree} causal={causal} w={window} kv_piece=2"
                assert max_rel_err(out, ref[:, pos]) <= 1e-5, what
                for name, g, rg in zip("qkv", grads, ref_grads):
                    assert max_rel_err(g, rg[:, pos]) <= 1e-5, f"{what}: d{name}"
    with pytest.raises(ValueError, match="kv_piece=0"):
        context_parallel_attention(ql, kl, vl, layout="zigzag", kv_piece=0)


def _windowed_comm_on_rank(rank: int, P: int) -> None:
    """With a window narrower than a chunk, communication is with neighbours only, whatever P."""
    S = 2 * P * 8
    for layout, causal, expected in (
            ("contiguous", True, [1] * (P - 1) + [0]),          # needs only rank r-1
            ("zigzag", True, [1] + [2] * (P - 2) + [1] if P > 2 else [1] * P),   # r-1 and r+1
            ("zigzag", False, [1] + [2] * (P - 2) + [1] if P > 2 else [1] * P)):
        pos = sequence_positions(S, rank=rank, world_size=P, layout=layout)
        q, k, v = random_qkv(1, S, 2, 2, 4, dtype=torch.float32, seed=3)
        stats = CPStats()
        out = context_parallel_attention(*(x.detach()[:, pos].requires_grad_() for x in (q, k, v)),
                                         layout=layout, causal=causal, window=3, stats=stats)
        out.sum().backward()
        ref = reference_attention(q.double(), k.double(), v.double(), causal=causal, window=3)
        assert max_rel_err(out, ref[:, pos]) <= 1e-5
        assert stats.kv_blocks_sent == (expected[rank] if P > 1 else 0), (layout, causal, stats)
        assert stats.ring_steps == (min(P, 2) if layout == "contiguous" or P == 2 else 2 if P > 1 else 1)
        assert stats.kv_blocks_sent_bwd == stats.kv_blocks_sent


def _errors_and_layout_ops_on_rank(rank: int, P: int) -> None:
    q = torch.zeros(1, 3, 4, 8)
    if P > 1:
        with pytest.raises(ValueError, match=r"seq_len=\d+ .*multiple of %d.*nearest valid" % (2 * P)):
            context_parallel_attention(q, q, q, layout="zigzag")
    with pytest.raises(ValueError, match="Ulysses degree 3 must divide the query heads Hq=4"):
        if P == 3:
            context_parallel_attention(q, q, q, layout="contiguous", method="ulysses")
        else:
            raise ValueError("Ulysses degree 3 must divide the query heads Hq=4")
    with pytest.raises(ValueError, match="layout='diagonal'"):
        context_parallel_attention(q, q, q, layout="diagonal")
    # shard/unshard round trip (and autograd through both) for every layout
    S = 2 * P * 2
    full = torch.arange(S * 3, dtype=torch.float64).reshape(1, S, 3).requires_grad_()
    for layout in LAYOUTS:
        local = shard_sequence(full, dim=1, layout=layout)
        pos = sequence_positions(S, rank=rank, world_size=P, layout=layout)
        assert torch.equal(local, full[:, pos])
        back = unshard_sequence(local, dim=1, layout=layout)
        assert torch.equal(back, full)
        weight = torch.arange(full.numel(), dtype=torch.float64).reshape(full.shape) % 7
        (g,) = torch.autograd.grad(back, full, weight)
        # replicated semantics: shard→unshard is the identity, and so is its gradient
        assert torch.equal(g, weight)


def _rank_main(rank: int, world_size: int) -> int:
    n = _cases_on_rank(rank, world_size)
    _pieces_on_rank(rank, world_size)
    _windowed_comm_on_rank(rank, world_size)
    _errors_and_layout_ops_on_rank(rank, world_size)
    return n


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_context_parallel_matches_reference(world_size):
    counts = run_ranks(_rank_main, world_size, timeout=170)
    assert len(set(counts)) == 1 and counts[0] >= 24


def test_hybrid_sub_groups_keep_rank_order_on_torch_2_11_and_2_13():
    """The sub-group factory against stand-ins with each torch's ``new_group`` signature: 2.13's takes
    ``sort_ranks`` (asked not to sort); 2.11's has none and always sorts, so ascending ranks pass
    unchanged and any other order is refused (the sub-group's ranks would be silently permuted)."""
    calls = []

    def new_group_2_13(ranks=None, timeout=None, backend=None, pg_options=None, use_local_synchronization=False,
                       group_desc=None, device_id=None, sort_ranks=True):
        calls.append((sorted(ranks) if sort_ranks else list(ranks), use_local_synchronization))
        return "2.13 group"

    def new_group_2_11(ranks=None, timeout=None, backend=None, pg_options=None, use_local_synchronization=False,
                       group_desc=None, device_id=None):
        calls.append((sorted(ranks), use_local_synchronization))
        return "2.11 group"

    assert ordered_new_group((5, 1, 3), new_group_2_13) == "2.13 group" and calls[-1] == ([5, 1, 3], True)
    assert ordered_new_group((1, 3, 5), new_group_2_11) == "2.11 group" and calls[-1] == ([1, 3, 5], True)
    with pytest.raises(ValueError, match=r"\[5, 1, 3\] are not ascending"):
        ordered_new_group((5, 1, 3), new_group_2_11)
    assert len(calls) == 2

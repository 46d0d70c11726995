"""Packed documents (``cu_seqlens``) through every context-parallel method against the float64 reference.

Simulator (P up to 8) and gloo ranks (P = 1..4): every layout × method × causal × window × GQA/MQA,
forward and all gradients, with documents that cross shard borders, documents shorter than a shard
or a tile, single-token documents, per-sample documents and uneven K/V pieces; one document
spanning everything is bit for bit today's path; skipped work and sends match the analytic counts.
"""
from __future__ import annotations

import pytest
import torch

from dist_train.bench.attention import check_memory_meter, peak_tensor_bytes
from dist_train.models.attention import AttentionContext, attention
from parallelism.context import (CPStats, LAYOUTS, context_parallel_attention, local_attention, pack_cu_seqlens,
                                 sequence_positions, simulate_ring_attention)
from parallelism.context.documents import boundaries_from_doc_ids, normalize_cu_seqlens
from parallelism.context.layouts import rank_chunks
from parallelism.context.plan import EXPLICIT_TILE, build_schedule
from tests.dist_harness import run_ranks
from tests.test_cp_reference import max_rel_err, random_qkv, reference_attention

HQ, D, CHUNK, WINDOW = 12, 8, 3, 4


def doc_ids(cu_seqlens, seq_len: int) -> torch.Tensor:
    """[S] (one boundary list) or [B, S] (one per sample) document ids from global boundaries."""
    if isinstance(cu_seqlens[0], int):
        return torch.searchsorted(torch.tensor(cu_seqlens), torch.arange(seq_len), right=True)
    return torch.stack([doc_ids(row, seq_len) for row in cu_seqlens])


def doc_shapes(S: int, P: int) -> list:
    """Documents crossing shard borders, shorter than a shard/tile, single tokens, per sample."""
    n = S // P
    cross = sorted({0, S} | {x for x in (n // 2 + 1, n + 1, S - 2) if 0 < x < S})
    tiny = sorted({0, S} | {x for x in (1, 2, 3, 5, S - 1) if 0 < x < S})   # single tokens, then a long one
    per_sample = [cross, [0, S // 3, S]]                   # B = 2 samples, different documents
    return [cross, tiny, per_sample]


def _check_sim(P, layout, causal, window, hkv, cu, kv_piece=None, tile=None, tol=1e-12):
    S = 2 * P * CHUNK
    q, k, v = random_qkv(2, S, 4, hkv, D, seed=P)
    ref = reference_attention(q, k, v, causal=causal, window=window, doc_ids=doc_ids(cu, S))
    grad = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
    out = simulate_ring_attention(q, k, v, world_size=P, layout=layout, causal=causal, window=window,
                                  tile=tile, kv_piece=kv_piece, cu_seqlens=cu)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    errs = [max_rel_err(out, ref)] + [max_rel_err(g, r) for g, r in zip(grads, ref_grads)]
    assert max(errs) <= tol, (P, layout, causal, window, hkv, cu, kv_piece, tile, errs)


@pytest.mark.parametrize("P", [2, 3, 5, 8])
def test_simulated_documents_are_exact_in_float64(P):
    S = 2 * P * CHUNK
    case = 0
    for layout in LAYOUTS:
        for causal in (True, False):
            for window in (None, WINDOW):
                shapes = doc_shapes(S, P)
                cu = shapes[case % len(shapes)]
                # uneven K/V pieces (2+1 of each 3-row chunk) and 2-token tiles (docs longer than a
                # tile) alternate so every layout sees both
                kv_piece, tile = ((2, None), (None, 2), (None, None))[case % 3]
                _check_sim(P, layout, causal, window, (2, 1)[case % 2], cu, kv_piece, tile)
                case += 1


def test_one_document_is_bit_for_bit_todays_result():
    P, S = 3, 18
    q, k, v = random_qkv(2, S, 4, 2, D, dtype=torch.float32, seed=3)
    for layout in LAYOUTS:
        for window in (None, WINDOW):
            outs, grads = [], []
            for cu in (None, [0, S], [[0, S], [0, S]]):
                xs = [x.detach().requires_grad_() for x in (q, k, v)]
                out = simulate_ring_attention(*xs, world_size=P, layout=layout, window=window, cu_seqlens=cu)
                outs.append(out)
                grads.append(torch.autograd.grad(out, xs, torch.ones_like(out)))
            for o, g in zip(outs[1:], grads[1:]):
                assert torch.equal(o, outs[0]) and all(torch.equal(a, b) for a, b in zip(g, grads[0]))


def _stats(P, S, layout, cu, causal=True):
    q, k, v = random_qkv(1, S, 2, 2, 4, dtype=torch.float32, seed=0)
    stats = [CPStats() for _ in range(P)]
    simulate_ring_attention(q, k, v, world_size=P, layout=layout, causal=causal, cu_seqlens=cu, stats=stats)
    return stats


def test_skipped_blocks_and_sends_match_the_analytic_counts():
    S = 512
    for n_docs in (1, 2, 4, 8):
        L = S // n_docs
        cu = list(range(0, S + 1, L))
        for P in (2, 4):
            for layout in LAYOUTS:
                st = _stats(P, S, layout, cu)
                # every computed pair is inside one document: total work is Σ L(L+1)/2 exactly
                assert sum(s.work_pairs for s in st) == n_docs * L * (L + 1) // 2, (n_docs, P, layout)
                assert sum(_stats(P, S, layout, cu, causal=False)[r].work_pairs for r in range(P)) == n_docs * L * L
                work = [s.work_pairs for s in st]
                if layout != "contiguous":
                    assert max(work) * P <= 1.1 * sum(work), (n_docs, P, layout, work)
                if layout == "contiguous" and n_docs >= P:
                    # each rank holds n_docs/P whole documents: one causal block each, nothing travels
                    assert [s.blocks_computed for s in st] == [n_docs // P] * P
                    assert [s.kv_blocks_sent for s in st] == [0] * P and [s.ring_steps for s in st] == [1] * P
                if layout == "zigzag" and n_docs >= 2 * P:
                    # each zigzag chunk holds 2·n_docs/(2P) whole documents: no sends, one step
                    assert [s.blocks_computed for s in st] == [n_docs // P] * P
                    assert [s.kv_blocks_sent for s in st] == [0] * P
    # zigzag P=2, two documents: rank 0 holds chunks 0 (doc 0) and 3 (doc 1) and needs chunk 2 (doc 1)
    # of rank 1; rank 1 holds chunks 1, 2 and needs chunk 0: two causal blocks + one full block each
    st = _stats(2, S, "zigzag", [0, 256, 512])
    assert [s.blocks_computed for s in st] == [3, 3] and [s.kv_blocks_sent for s in st] == [1, 1]
    assert [s.work_pairs for s in st] == [2 * 128 * 129 // 2 + 128 * 128] * 2
    assert st[0].forward_flops(batch=1, heads=2, head_dim=4) == 4 * 1 * 2 * 4 * st[0].work_pairs


def test_short_documents_share_pieces_and_stay_exact():
    """Documents shorter than the minimum piece are masked explicitly inside shared blocks."""
    P, S = 2, 512
    cu = sorted(set(range(0, S, 17)) | {S})
    st = _stats(P, S, "zigzag", cu)
    lengths = [b - a for a, b in zip(cu, cu[1:])]
    assert sum(s.work_pairs for s in st) == sum(n * (n + 1) // 2 for n in lengths)
    assert max(s.blocks_computed for s in st) <= 2 * (S // P) // 64


def test_local_attention_with_documents_matches_reference():
    S = 20
    for cu in ([0, 3, 4, 11, S], [[0, 3, 4, 11, S], [0, 19, S]]):
        for window in (None, 5):
            q, k, v = random_qkv(2, S, 4, 2, D, seed=2)
            ref = reference_attention(q, k, v, window=window, doc_ids=doc_ids(cu, S))
            out = local_attention(q, k, v, window=window, tile=4, cu_seqlens=cu)
            ref_g = torch.autograd.grad(ref, (q, k, v), torch.ones_like(ref))
            g = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
            assert max([max_rel_err(out, ref)] + [max_rel_err(a, b) for a, b in zip(g, ref_g)]) <= 1e-12
    q, k, v = (x.detach() for x in random_qkv(2, S, 4, 2, D, seed=2))
    assert torch.equal(local_attention(q, k, v, window=5), local_attention(q, k, v, window=5, cu_seqlens=[0, S]))


def test_cu_seqlens_validation_and_doc_id_conversion():
    assert normalize_cu_seqlens([0, 8], 8, 2) is None
    assert normalize_cu_seqlens([[0, 3, 8], [0, 3, 8]], 8, 2) == ((0, 3, 8),)
    assert normalize_cu_seqlens(torch.tensor([0, 3, 8]), 8, 1) == ((0, 3, 8),)
    with pytest.raises(ValueError, match=r"cu_seqlens=\[0, 3, 3, 8\] must be strictly increasing"):
        normalize_cu_seqlens([0, 3, 3, 8], 8, 1)
    with pytest.raises(ValueError, match="global sequence length 8"):
        normalize_cu_seqlens([0, 3, 7], 8, 1)
    with pytest.raises(ValueError, match="3 rows"):
        normalize_cu_seqlens([[0, 8]] * 3, 8, 2)
    ids = torch.tensor([[0, 0, 1, 1, 1, 2], [5, 5, 5, 5, 5, 5]])
    assert boundaries_from_doc_ids(ids) == [[0, 2, 5, 6], [0, 6]]


def _methods(P: int, layout: str) -> list[tuple[str, int]]:
    out = [("ring", 1), ("ulysses", P)]
    if P == 4 or layout == "zigzag":
        out += [("hybrid", u) for u in range(2, P) if P % u == 0]
    return out


def _docs_on_rank(rank: int, P: int) -> int:
    S = 2 * P * CHUNK
    checked = 0
    for layout in LAYOUTS:
        pos = sequence_positions(S, rank=rank, world_size=P, layout=layout)
        for method, degree in _methods(P, layout):
            for causal in (True, False):
                for window in (None, WINDOW):
                    hkv = (4, 1)[checked % 2]
                    shapes = doc_shapes(S, P)
                    cu = shapes[checked % len(shapes)]
                    kv_piece = 2 if checked % 3 == 0 and method != "ulysses" else None
                    q, k, v = random_qkv(2, S, HQ, hkv, D, seed=checked)
                    ref = reference_attention(q, k, v, causal=causal, window=window, doc_ids=doc_ids(cu, S))
                    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
                    ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
                    ql, kl, vl = (x.detach()[:, pos].requires_grad_() for x in (q, k, v))
                    out = context_parallel_attention(ql, kl, vl, layout=layout, method=method, ulysses_degree=degree,
                                                     causal=causal, window=window, kv_piece=kv_piece,
                                                     cu_seqlens=cu)
                    grads = torch.autograd.grad(out, (ql, kl, vl), grad[:, pos])
                    what = f"rank {rank} P={P} {layout} {method}/{degree} causal={causal} w={window} hkv={hkv} {cu}"
                    assert max_rel_err(out, ref[:, pos]) <= 1e-12, what
                    for name, g, rg in zip("qkv", grads, ref_grads):
                        assert max_rel_err(g, rg[:, pos]) <= 1e-12, f"{what}: d{name}"
                    checked += 1
        # one document spanning everything is today's path, bit for bit, on real ranks too
        q, k, v = (x.detach()[:, pos].float() for x in random_qkv(2, S, HQ, 4, D, seed=1))
        for method, degree in _methods(P, layout):
            outs = [context_parallel_attention(q, k, v, layout=layout, method=method, ulysses_degree=degree,
                                               window=WINDOW, cu_seqlens=cu) for cu in (None, [0, S])]
            assert torch.equal(outs[0], outs[1]), (rank, P, layout, method)
    return checked


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_documents_on_gloo_ranks_match_reference(world_size):
    counts = run_ranks(_docs_on_rank, world_size, timeout=170)
    assert len(set(counts)) == 1 and counts[0] >= 12


def test_bench_docs_pairs_packed_with_unmasked_records(tmp_path):
    """``dist-train bench attention --docs N`` bookkeeping (no timing asserted): the packed record of
    each layout carries the ideal S²/ΣLᵢ², its speed-up over the unmasked twin and the plan's balance."""
    from dist_train.bench.attention import _add_packing, plot_packing, simulate

    base = dict(world_size=2, seq_len=256, method="ring", ulysses_degree=1, heads=1, kv_heads=None, head_dim=8,
                batch=1, window=None, causal=True, forward_only=False, kernel="auto", repeats=1, kv_piece=None)
    records = simulate([dict(base, layout=layout, docs=n) for layout in ("zigzag", "striped") for n in (None, 8)])
    _add_packing(records)
    packed = [r for r in records if r["docs"]]
    assert len(packed) == 2
    for r in packed:
        # striped: rank 1's queries sit one position later in every document (+1 key each)
        assert r["ideal_ratio"] == 1 / 8 and r["imbalance"] == (1.0 if r["layout"] == "zigzag" else 272 / 264)
        assert r["fraction_of_ideal"] == r["packed_speedup"] * r["ideal_ratio"] > 0
    plot_packing(records, str(tmp_path / "packed.png"))
    assert (tmp_path / "packed.png").stat().st_size > 0


def _long_document_shapes(S: int) -> list:
    """Documents whose blocks a cut makes explicit and which grow with S: short documents then a long one
    (shared by the batch), and per-sample documents that differ (B = 2)."""
    return [[0, 10, 20, S], [[0, S // 2, S], [0, S // 3, S]]]


def test_document_blocks_without_a_window_are_tile_sized():
    """With packed documents and no window every explicit (masked) kernel call is at most EXPLICIT_TILE rows
    and keys on every rank of every layout, so a kernel's mask never grows with S (it was [L, L] for a long
    document behind short ones, and piece × piece for per-sample documents)."""
    S = 8 * EXPLICIT_TILE
    for cu in _long_document_shapes(S):
        docs = normalize_cu_seqlens(cu, S, 2)
        for P, layout in ((1, "contiguous"), (2, "zigzag"), (2, "contiguous"), (4, "striped")):
            chunks = tuple(rank_chunks(S, r, P, layout) for r in range(P))
            for piece in build_schedule(chunks, True, None, None, None, docs):
                blocks = [b for per_rank in piece.plan.blocks for per_source in per_rank for b in per_source]
                explicit = [b for b in blocks if b.mask.kind == "explicit"]
                assert explicit, (cu, P, layout)
                assert all(b.q_hi - b.q_lo <= EXPLICIT_TILE and b.k_hi - b.k_lo <= EXPLICIT_TILE
                           for b in explicit), (cu, P, layout)


@pytest.mark.parametrize("cu_of", [lambda S: [0, 10, 20, S], lambda S: [[0, 20, S], [0, 30, S]]])
def test_documents_split_into_sub_blocks_stay_exact(cu_of):
    """A sequence longer than EXPLICIT_TILE with documents that make its blocks explicit: the sub-blocks
    (some explicit, some full/causal, some skipped) are exact in float64, locally and on a simulated ring."""
    S = EXPLICIT_TILE + 36
    cu = cu_of(S)
    q, k, v = random_qkv(2, S, 2, 1, 4, seed=5)
    ref = reference_attention(q, k, v, doc_ids=doc_ids(cu, S))
    grad = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
    for out in (local_attention(q, k, v, cu_seqlens=cu),
                simulate_ring_attention(q, k, v, world_size=2, layout="zigzag", cu_seqlens=cu)):
        grads = torch.autograd.grad(out, (q, k, v), grad)
        errs = [max_rel_err(out, ref)] + [max_rel_err(g, r) for g, r in zip(grads, ref_grads)]
        assert max(errs) <= 1e-12, errs


def test_local_attention_memory_with_documents_is_linear_in_sequence():
    """The model's attention with packed documents and no window (fwd+bwd, profiler meter): doubling S
    grows the peak by at most 2.2x for each document shape (an [L, L] mask of a long document grew it 3.5x)."""
    check_memory_meter()
    for shape in range(2):
        peaks = []
        for S in (1024, 2048):
            cu = _long_document_shapes(S)[shape]
            cu = pack_cu_seqlens(cu if isinstance(cu[0], list) else [cu, cu])
            g = torch.Generator().manual_seed(0)
            q = torch.randn(2, S, 2, 16, generator=g, requires_grad=True)
            k, v = (torch.randn(2, S, 1, 16, generator=g, requires_grad=True) for _ in range(2))

            def step():
                attention(q, k, v, AttentionContext(), cu).sum().backward()

            step()                                     # lazily created state is not the step's
            peaks.append(peak_tensor_bytes(step)[1])
        assert peaks[1] <= 2.2 * peaks[0], (shape, peaks)

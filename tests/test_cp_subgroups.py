"""Context-parallel attention on process groups that are NOT the default group, against the float64 reference.

Inside the trainer the cp group is a sub-group of the mesh (ranks strided by tp, offset by dp/pp), so group
ranks and global ranks differ: the ring's peers, the Ulysses all-to-all and hybrid's own Ulysses/ring
sub-groups (built from the parent's GLOBAL ranks) must all translate. tests/test_cp_distributed.py runs every
case on the default group only, where the two numberings coincide. One spawn of 5 gloo ranks holds three
groups at once: A = {0, 2, 4} (odd, strided), B = {1, 3} (strided, the complement of A, running concurrently)
and C = {1, 2, 3, 4} (offset by one: hybrid U = 2, i.e. Ulysses sub-groups {1, 2}, {3, 4} and ring
sub-groups {1, 3}, {2, 4}; and Ulysses over all four, with GQA K/V heads replicated to pairs of ranks).
Forward and every input gradient, asserted on every member rank.

A second spawn of 7 ranks runs hybrid with an ODD ring inside a sub-group: D = {0, 2, 3, 4, 5, 6} (rank 1
outside; the gap means group rank m is not "first rank + m", as in no offset group), U = 2, so Ulysses
sub-groups {0, 2}, {3, 4}, {5, 6} and two rings of R = 3, {0, 3, 5} and {2, 4, 6}; plus U = 3 (Ulysses
{0, 2, 3}, {4, 5, 6}, rings of 2). Rank 1 creates only D itself, joins no sub-group and no exchange of D, and
its default-group collectives afterwards still line up with everyone's.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from parallelism.context import CPStats, LAYOUTS, context_parallel_attention, hybrid, sequence_positions
from tests.dist_harness import run_ranks
from tests.test_cp_documents import doc_ids, doc_shapes
from tests.test_cp_reference import max_rel_err, random_qkv, reference_attention

HQ, D, CHUNK, WINDOW = 12, 4, 3, 4
GROUPS = {"A": [0, 2, 4], "B": [1, 3], "C": [1, 2, 3, 4]}   # the 5-rank spawn
ODD_RING = {"D": [0, 2, 3, 4, 5, 6]}                         # the 7-rank spawn: rank 1 outside
MEMBERS = {**GROUPS, **ODD_RING}


def _cases(P: int, name: str) -> list[tuple]:
    """(layout, method, degree, causal, window, hkv, kv_piece, documents) for a group of P ranks."""
    if name == "D":
        return _odd_ring_cases()
    out = []
    for i, layout in enumerate(LAYOUTS):
        for j, (method, degree) in enumerate([("hybrid" if name == "C" else "ring", 2 if name == "C" else 1),
                                              ("ulysses", P)]):
            for causal, window in ((True, None), (False, WINDOW)):
                k = i + j + causal
                # Hkv 2 under Ulysses on 4 ranks replicates each K/V head to 2 ranks (degree/Hkv); 4 and 1
                # split evenly / expand
                out.append((layout, method, degree, causal, window, (4, 2, 1)[k % 3],
                            2 if method != "ulysses" and k % 2 else None, (i + causal) % 3 == 0))
    return out


def _odd_ring_cases() -> list[tuple]:
    """Hybrid on the 6 ranks of D: U = 2 (rings of 3) on every layout, causal and windowed, Hkv 4 / 2 / 1
    (1 replicated to the pair), whole and pieced K/V, documents; then U = 3 (rings of 2) with Hkv 1 (replicated
    to the three) and 6 (split)."""
    out = []
    for i, layout in enumerate(LAYOUTS):
        for causal, window in ((True, None), (False, WINDOW)):
            k = 2 * i + causal
            out.append((layout, "hybrid", 2, causal, window, (4, 2, 1)[k % 3], 2 if k % 2 == 0 else None, k % 3 == 1))
    out.append(("zigzag", "hybrid", 3, True, None, 1, None, False))
    out.append(("striped", "hybrid", 3, False, WINDOW, 6, 2, True))
    return out


def _check_group(group: dist.ProcessGroup, name: str) -> int:
    P, me = dist.get_world_size(group), dist.get_rank(group)
    assert dist.get_process_group_ranks(group) == MEMBERS[name]
    S = 2 * P * CHUNK
    checked = 0
    for layout, method, degree, causal, window, hkv, kv_piece, docs in _cases(P, name):
        pos = sequence_positions(S, rank=me, world_size=P, layout=layout)
        cu = doc_shapes(S, P)[checked % 3] if docs else None
        q, k, v = random_qkv(2, S, HQ, hkv, D, seed=checked)
        ref = reference_attention(q, k, v, causal=causal, window=window,
                                  doc_ids=None if cu is None else doc_ids(cu, S))
        grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
        ql, kl, vl = (x.detach()[:, pos].requires_grad_() for x in (q, k, v))
        stats = CPStats()
        out = context_parallel_attention(ql, kl, vl, group=group, layout=layout, method=method,
                                         ulysses_degree=degree, causal=causal, window=window, kv_piece=kv_piece,
                                         cu_seqlens=cu, stats=stats)
        grads = torch.autograd.grad(out, (ql, kl, vl), grad[:, pos])
        what = (f"group {name} {MEMBERS[name]} global rank {dist.get_rank()} (group rank {me}) {layout} "
                f"{method}/{degree} causal={causal} w={window} hkv={hkv} kv_piece={kv_piece} docs={cu}")
        assert max_rel_err(out, ref[:, pos]) <= 1e-12, what
        for which, g, rg in zip("qkv", grads, ref_grads):
            assert max_rel_err(g, rg[:, pos]) <= 1e-12, f"{what}: d{which}"
        if method == "hybrid":
            assert stats.all_to_all_calls == 4, (what, stats)     # q, k, v in; out back
        if method != "ulysses" and cu is None and window is None and kv_piece is None and layout != "contiguous":
            assert stats.kv_blocks_sent == P // degree - 1, (what, stats)   # one hop per other ring member
        checked += 1
    return checked


def _rank_main(rank: int, world: int) -> dict:
    groups = {name: dist.new_group(ranks) for name, ranks in GROUPS.items()}  # every rank, same order
    done = {}
    for name in ("A", "B", "C"):          # A and B run side by side (disjoint), then C on ranks 1-4
        if rank in GROUPS[name]:
            done[name] = _check_group(groups[name], name)
    dist.barrier()
    return done


def _odd_ring_main(rank: int, world: int) -> dict:
    members = ODD_RING["D"]
    group = dist.new_group(members)  # every rank, rank 1 included (new_group is collective)
    done = {"D": _check_group(group, "D")} if rank in members else {}
    # hybrid's cache of the sub-groups this rank built (private; read to check who joined what)
    built = sorted(hybrid._CACHE)
    if rank not in members:
        assert dist.get_rank(group) == -1     # not a member: no group rank, hence no ring/Ulysses position
        assert built == [], built             # and it built no sub-group of D
    else:
        assert built == [(tuple(members), 2), (tuple(members), 3)], built
    # the default group's collectives still pair up: rank 1 issued none of D's, the members all of theirs
    total = torch.tensor([float(rank + 1)])
    dist.all_reduce(total)
    assert float(total) == world * (world + 1) / 2, float(total)
    return done


def test_context_parallel_on_sub_groups_matches_reference():
    results = run_ranks(_rank_main, 5, timeout=170)
    for rank, done in enumerate(results):
        assert sorted(done) == sorted(n for n, ranks in GROUPS.items() if rank in ranks), (rank, done)
        assert all(n == 12 for n in done.values()), (rank, done)


def test_hybrid_odd_ring_on_sub_group_with_a_gap_matches_reference():
    results = run_ranks(_odd_ring_main, 7, timeout=170)
    assert results == [{"D": len(_odd_ring_cases())} if r in ODD_RING["D"] else {} for r in range(7)], results

"""Context-parallel attention on process groups that are NOT the default group, against the float64 reference.

Inside the trainer the cp group is a sub-group of the mesh (ranks strided by tp, offset by dp/pp), so group
ranks and global ranks differ: the ring's peers, the Ulysses all-to-all and hybrid's own Ulysses/ring
sub-groups (built from the parent's GLOBAL ranks) must all translate. tests/test_cp_distributed.py runs every
case on the default group only, where the two numberings coincide. One spawn of 5 gloo ranks holds three
groups at once: A = {0, 2, 4} (odd, strided), B = {1, 3} (strided, the complement of A, running concurrently)
and C = {1, 2, 3, 4} (offset by one: hybrid U = 2, i.e. Ulysses sub-groups {1, 2}, {3, 4} and ring
sub-groups {1, 3}, {2, 4}; and Ulysses over all four, with GQA K/V heads replicated to pairs of ranks).
Forward and every input gradient, asserted on every member rank.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from parallelism.context import CPStats, LAYOUTS, context_parallel_attention, sequence_positions
from tests.dist_harness import run_ranks
from tests.test_cp_documents import doc_ids, doc_shapes
from tests.test_cp_reference import max_rel_err, random_qkv, reference_attention

HQ, D, CHUNK, WINDOW = 12, 4, 3, 4
GROUPS = {"A": [0, 2, 4], "B": [1, 3], "C": [1, 2, 3, 4]}


def _cases(P: int, name: str) -> list[tuple]:
    """(layout, method, degree, causal, window, hkv, kv_piece, documents) for a group of P ranks."""
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


def _check_group(group: dist.ProcessGroup, name: str) -> int:
    P, me = dist.get_world_size(group), dist.get_rank(group)
    assert dist.get_process_group_ranks(group) == GROUPS[name]
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
        what = (f"group {name} {GROUPS[name]} global rank {dist.get_rank()} (group rank {me}) {layout} "
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


def test_context_parallel_on_sub_groups_matches_reference():
    results = run_ranks(_rank_main, 5, timeout=170)
    for rank, done in enumerate(results):
        assert sorted(done) == sorted(n for n, ranks in GROUPS.items() if rank in ranks), (rank, done)
        assert all(n == 12 for n in done.values()), (rank, done)

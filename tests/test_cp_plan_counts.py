"""The planner's pair counts (masks.allowed_pairs, pure integer arithmetic) against the per-query tensor count
(masks.allowed_per_query, the definition), and whole ring schedules built with either count: identical blocks,
kinds, counts, directions and sends, so the faster planning changes no kernel call.
"""
from __future__ import annotations

import random

import pytest

from parallelism.context import masks, plan
from parallelism.context.attention import default_tile
from parallelism.context.documents import normalize_cu_seqlens
from parallelism.context.layouts import Chunk, rank_chunks


def _tensor_count(q: Chunk, k: Chunk, causal: bool, window, doc_row=None) -> int:
    if q.length == 0:
        return 0
    return int(masks.allowed_per_query(q, k, causal, window, doc_row).sum())


def _random_chunk(rng: random.Random, S: int) -> Chunk:
    stride = rng.randint(1, 6)
    start = rng.randint(0, S - 1)
    return Chunk(start, stride, rng.randint(0, (S - 1 - start) // stride + 1))


def test_allowed_pairs_equals_the_per_query_count():
    """Strided, empty and offset chunks; causal or not; windows 0, 1, narrower than the stride, wider than S;
    document rows with single-token documents and boundaries between and on strided positions."""
    rng = random.Random(7)
    for _ in range(3000):
        S = rng.randint(1, 120)
        q, k = _random_chunk(rng, S), _random_chunk(rng, S)
        causal = rng.random() < 0.6
        window = rng.choice([None, None, 0, 1, 2, rng.randint(0, 10), rng.randint(0, 2 * S)])
        row = None
        if rng.random() < 0.75:
            row = tuple(sorted({0, S, *(rng.randint(1, S) for _ in range(rng.randint(0, 12)))}))
        got = masks.allowed_pairs(q, k, causal, window, row)
        assert got == _tensor_count(q, k, causal, window, row), (q, k, causal, window, row, got)


def _docs_row(S: int, mean: float, rng: random.Random) -> list[int]:
    row = [0]
    while row[-1] + (n := max(1, int(rng.expovariate(1 / mean)))) < S:
        row.append(row[-1] + n)
    return row + [S]


def _draws(count: int):
    rng = random.Random(3)
    for _ in range(count):
        P = rng.choice([1, 2, 3, 4])
        layout = rng.choice(["contiguous", "striped", "zigzag"])
        mult = 2 * P if layout == "zigzag" else P
        S = mult * rng.randint(2, 700 // mult)
        B = rng.choice([1, 1, 2, 3])
        mean = rng.choice([None, 3, 40, 150])
        docs = None if mean is None else normalize_cu_seqlens([_docs_row(S, mean, rng) for _ in range(B)], S, B)
        window = rng.choice([None, None, rng.randint(0, 40), rng.randint(0, S)])
        tile = rng.choice([None, default_tile(window), rng.randint(1, 200)])
        piece = rng.choice([None, None, rng.randint(1, S)])
        chunks = tuple(rank_chunks(S, r, P, layout) for r in range(P))
        yield chunks, rng.random() < 0.7, window, tile, piece, docs


def _schedules(draws) -> list:
    plan.build_schedule.cache_clear()
    plan.build_plan.cache_clear()
    try:
        # Block.call (the kernel's view of a shifted block) is part of what must not change
        return [(s, [[[b.call for b in blocks] for blocks in per_rank] for p in s for per_rank in p.plan.blocks])
                for s in (plan.build_schedule(*d) for d in draws)]
    finally:
        plan.build_schedule.cache_clear()
        plan.build_plan.cache_clear()


def test_schedules_are_identical_with_the_per_query_tensor_count(monkeypatch):
    """Seeded draws (P 1–4, every layout, causal and full, windows, tiles, K/V pieces, shared and per-sample
    documents, 1–200-token documents) with explicit sub-blocks of at most 16 rows so the sub-block cut runs."""
    monkeypatch.setattr(plan, "EXPLICIT_TILE", 16)
    draws = list(_draws(40))
    fast = _schedules(draws)
    monkeypatch.setattr(masks, "allowed_pairs", _tensor_count)
    reference = _schedules(draws)
    for d, got, want in zip(draws, fast, reference):
        assert got == want, d
    assert any(b.mask.kind == "explicit" for s, _ in fast for p in s for per_rank in p.plan.blocks
               for blocks in per_rank for b in blocks)


@pytest.mark.parametrize("causal", [True, False])
def test_negative_window_allows_nothing(causal):
    assert masks.allowed_pairs(Chunk(0, 1, 8), Chunk(0, 1, 8), causal, -1) == 0 == _tensor_count(
        Chunk(0, 1, 8), Chunk(0, 1, 8), causal, -1)

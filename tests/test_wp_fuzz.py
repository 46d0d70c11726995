"""Seeded randomized differential draws of window-parallel Swin attention on 3 gloo ranks
(tests/wp_fuzz.py) against the float64 reference, and the regression its long runs found.

The long run: ``python -m tests.wp_fuzz --draws 100 --world 5`` (grids of 1–6 ranks).
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from parallelism.window import window_parallel_attention
from parallelism.window.windows import window_attention
from tests.wp_fuzz import draw, run_gloo

# 1×3 and 3×1 grids, one-window tiles (9, 10), uneven tiles, rectangular windows, shifts on one or both
# axes, periodic and not, bias or not; 26 (a bias table for the wrong head count, with halo messages)
# and 7 (a shift >= the window) are invalid and are followed by valid draws on the same ranks
SEEDS = [2, 8, 9, 10, 26, 29, 33, 47, 7, 19]


@pytest.mark.slow  # 10 draws on 3 spawned gloo ranks: ~2.5 s on the loaded 2-core machine
def test_fixed_window_draws_on_gloo_ranks():
    draws = [draw(s, 3) for s in SEEDS]
    assert {d.invalid for d in draws} == {None, "bias_heads", "shift"}
    assert {d.grid for d in draws} == {(1, 3), (3, 1)}
    # the invalid draw 26 shifts along the split axis: it would post halo messages
    assert draws[SEEDS.index(26)].grid == (1, 3) and draws[SEEDS.index(26)].shift[1] > 0
    failures = run_gloo(draws, timeout=120)
    assert not failures, failures


def test_bad_bias_table_is_refused_before_any_message():
    """Regression: a bias table of the wrong shape was found inside the forward, after the halo
    exchange had been posted, and all ranks hung instead of raising (here bounded by the timeout)."""
    d = draw(26, 3)
    bad_shape = replace(d, bias_shape=(d.heads, 2 * d.window[0], 2 * d.window[1] - 1), invalid="bias")
    valid = replace(d, bias_shape=None, invalid=None)
    failures = run_gloo([bad_shape, d, valid], timeout=60)
    assert not failures, failures


def test_bias_heads_must_match_the_query_heads():
    """A one-head table used to broadcast silently over every head; it must be [heads, 2wh−1, 2ww−1]."""
    q = torch.zeros(1, 4, 4, 2, 3)
    with pytest.raises(ValueError, match=r"bias must have shape \[heads=2, 3, 3\] for window \(2, 2\), got \[1, 3, 3\]"):
        window_parallel_attention(q, q, q, window=2, shift=1, grid=1, group=None, bias=torch.zeros(1, 3, 3))
    with pytest.raises(ValueError, match=r"bias must have shape \[heads=2, 3, 3\]"):
        window_attention(q, q, q, window=(2, 2), bias=torch.zeros(1, 3, 3), scale=1.0)

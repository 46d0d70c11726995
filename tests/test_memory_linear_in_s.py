"""A whole GPT training step at cp=2 with K/V pieces, a window and the chunked loss: doubling S grows the
peak tensor memory per rank by at most 2.2x (no S² and no S·V term), and the chunked loss holds far less
than the unchunked [S/cp, V] logits. Measured with the profiler-based meter of the ring memory test
(tests/test_training_cp_memory.py), through `dist-train bench memory`'s per-point function."""
from __future__ import annotations

import argparse

import pytest

from dist_train.bench.memory import _point, point_config
from tests.dist_harness import run_ranks

MODEL = argparse.Namespace(d_model=32, layers=2, heads=4, kv_heads=2, vocab=2048, window=64, kv_piece=256,
                           checkpointing="full", precision="fp32", steps=0)


def _peaks(seq_len: int) -> dict:
    """Peak tensor bytes per rank (max over ranks) of one step per loss setting; "full" runs first, so
    the optimizer state it creates is not in the chunked step's peak (only its own gradients are)."""
    cfg = point_config(MODEL, seq_len, 2, "full")
    per_rank = run_ranks(_point, 2, args=(cfg, ["full", 64], 0), timeout=170)
    return {c: max(r["per_chunk"][c]["peak_bytes"] for r in per_rank) for c in ("full", "64")}


@pytest.mark.slow
def test_doubling_s_at_cp2_with_pieces_and_chunked_loss_at_most_doubles_peak_memory():
    small, large = _peaks(4096), _peaks(8192)
    assert large["64"] <= 2.2 * small["64"], (small, large)
    assert large["64"] >= 1.5 * small["64"], (small, large)  # the measured step really scales with S
    # 4096 tokens per rank x 2048 vocabulary: the unchunked loss keeps logits, log-softmax and gradient
    assert large["64"] < 0.5 * large["full"], (small, large)


def test_bench_memory_summary_spread_and_loss_ratios():
    from dist_train.bench.memory import summarize

    def rec(s, cp, chunk, peak, step):
        return {"seq_len": s, "cp": cp, "loss_chunk": chunk, "peak_bytes_per_rank": peak,
                "bytes_per_token": peak / (s // cp), "step_s": step}

    out = summarize([rec(1024, 2, "auto", 1000, 1.0), rec(2048, 2, "auto", 2100, 2.0),
                     rec(1024, 2, "full", 4000, 1.25)])
    auto = next(f for f in out["flatness"] if f["loss_chunk"] == "auto")
    assert abs(auto["bytes_per_token_spread"] - 0.05) < 1e-12 and abs(auto["last_over_first"] - 1.05) < 1e-12
    assert out["loss_chunk_vs_full"] == [{"seq_len": 1024, "cp": 2, "loss_chunk": "auto", "step_time_ratio": 0.8,
                                          "peak_ratio": 0.25}]

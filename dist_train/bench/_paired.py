"""A run against a baseline in the same invocation (``dist-train bench train --baseline-set``): the order
of the alternating repeats, the bubble formula's prediction of the step-time ratio, and the summary.

Why alternate: on a shared machine the load moves by 2x within minutes, so a baseline measured in another
invocation says little; baseline, run, baseline, run, ... puts both under the same drift and the medians
(and the median of the adjacent-pair ratios) are what is compared.

    order = alternation(3)                        # ["baseline", "run", "baseline", "run", "baseline", "run"]
    ratio = predicted_ratio(run_cfg, base_cfg)    # step-time ratio the bubble formula predicts
    summary = compare(base_s, run_s, ratio)       # medians, ratio, overhead beyond the prediction

The same comparison on the busiest rank's CPU seconds per step (``with_bubble=False``: an idle rank burns
no CPU) isolates the pipeline's own per-step costs (p2p copies, schedule bookkeeping) from both the bubble
and the time a rank spent waiting for a core that other processes held.
"""
from __future__ import annotations

import statistics

from ..config import Config
from ..cost.layout import bubble_fraction
from ..cost.shape import rank_inputs
from ..plan.profiles import get_profile

ORDER = ("baseline", "run")


def alternation(repeats: int) -> list[str]:
    """The launch order of ``repeats`` pairs: the baseline first in every pair (ValueError unless >= 1)."""
    if repeats < 1:
        raise ValueError(f"--repeats {repeats}: must be >= 1")
    return list(ORDER) * repeats


def step_units(cfg: Config, with_bubble: bool = True) -> float:
    """Bubble-formula step time of the most loaded rank, in units of one layer's forward+backward on one token:
    tokens per micro-batch on a rank (÷ wp tiles, ÷ cp) × micro-batches per step × layers on the most loaded
    pipeline rank ÷ tp (ideal tensor parallelism: the heads and MLP units split, nothing replicated) ÷ (1 −
    bubble fraction, unless not ``with_bubble``: the work, not the time). Embedding, head, the tp-replicated
    norms and communication are not counted: the ratio of two configs is the prediction only where those
    match or are small — for tp, "beyond the prediction" is what tp loses to its all-reduces and the work it
    replicates."""
    _, loc = rank_inputs(cfg, get_profile("cpu"))
    work = loc.tokens * cfg.grad_accum_steps * loc.layers / cfg.parallel.tp
    return work / (1.0 - (bubble_fraction(cfg) if with_bubble else 0.0))


def predicted_ratio(run: Config, baseline: Config, with_bubble: bool = True) -> float:
    """Step-time ratio run / baseline the bubble formula predicts (1.25 for pp2 at 4 micro-batches over pp1,
    same layers per rank: (m + pp − 1) / m; 0.5 for tp2 over tp1: :func:`step_units`); ``with_bubble=False``:
    the ratio of work per rank."""
    return step_units(run, with_bubble) / step_units(baseline, with_bubble)


def compare(baseline_s: list[float], run_s: list[float], predicted: float) -> dict:
    """Per-repeat median step times of the baseline and the run (same length, alternating) -> medians,
    ratio of the medians, median of the adjacent-pair ratios, the prediction and the overhead beyond it
    (ratio / predicted − 1: 0.10 is 10% slower than the bubble formula)."""
    if not baseline_s or len(baseline_s) != len(run_s):
        raise ValueError(f"compare: need as many baseline as run repeats (>= 1), got {len(baseline_s)} and "
                         f"{len(run_s)}")
    base, run = statistics.median(baseline_s), statistics.median(run_s)
    pairs = [r / b for b, r in zip(baseline_s, run_s)]
    ratio, pair_ratio = run / base, statistics.median(pairs)
    return {"baseline_median_s": base, "run_median_s": run, "ratio": ratio, "pair_ratios": pairs,
            "pair_ratio_median": pair_ratio, "predicted_ratio": predicted,
            "overhead_beyond_prediction": ratio / predicted - 1.0,
            "pair_overhead_beyond_prediction": pair_ratio / predicted - 1.0}

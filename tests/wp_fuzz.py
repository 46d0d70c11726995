"""Randomized differential testing of window-parallel (Swin shifted-window) attention on gloo ranks
against the plain float64 Swin reference of tests/test_wp_attention.py.

A draw picks a grid gh×gw (up to 6 ranks, odd ones included), a window (rectangular, 1 to 4 on an
axis), an image of whole windows with as few as one window row/column per tile (uneven tiles), a
shift in [0, window) per axis, periodic axes (``wrap``), a relative position bias or none, B, heads,
head dim and scale; a few draws are invalid on purpose (a shift >= the window, a bias table of the
wrong shape or head count) and every rank must refuse them with a ValueError and then go on with the
next draw.

    python -m tests.wp_fuzz --draws 60 --world 3       # 60 draws with a 3-rank grid
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Optional

import torch

from parallelism.window import TileLayout, halo_roll, shard_image, window_parallel_attention
from tests.cp_fuzz import rel_err
from tests.dist_harness import run_ranks
from tests.test_wp_attention import swin_reference

TOL = 1e-10
GRIDS = {1: [(1, 1)], 2: [(1, 2), (2, 1)], 3: [(1, 3), (3, 1)], 4: [(2, 2), (1, 4), (4, 1)],
         5: [(1, 5), (5, 1)], 6: [(2, 3), (3, 2), (1, 6)]}


@dataclass(frozen=True)
class WDraw:
    seed: int
    grid: tuple[int, int]
    height: int
    width: int
    window: tuple[int, int]
    shift: tuple[int, int]
    wrap: tuple[bool, bool]
    bias: bool
    batch: int
    heads: int
    head_dim: int
    scale: float
    invalid: Optional[str] = None
    bias_shape: Optional[tuple[int, int, int]] = None     # None: the right one

    def call(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in asdict(self).items())


def draw(seed: int, world_size: int) -> WDraw:
    """The draw of ``seed`` for a grid of ``world_size`` ranks (deterministic)."""
    rng = random.Random(seed * 31 + world_size)
    grid = rng.choice(GRIDS[world_size])
    window = (rng.randint(1, 4), rng.randint(1, 4))
    # windows per axis: at least one per tile, sometimes exactly one (the shift then reaches the next tile's
    # first rows from a one-window tile), sometimes uneven (earlier tiles one window more)
    nh = grid[0] * rng.choice((1, 1, 2)) + rng.randint(0, grid[0] - 1)
    nw = grid[1] * rng.choice((1, 1, 2)) + rng.randint(0, grid[1] - 1)
    shift = tuple(rng.choice((0, w - 1, w // 2, rng.randrange(w))) for w in window)
    wrap = (rng.random() < 0.4, rng.random() < 0.5)
    d = WDraw(seed, grid, nh * window[0], nw * window[1], window, shift, wrap, rng.random() < 0.6,
              rng.choice((1, 2)), rng.choice((1, 2, 3)), rng.choice((1, 2, 4)),
              rng.choice((0.5, 1.0, 0.3)))
    if rng.random() < 0.1:
        kind = rng.choice(("shift", "bias", "bias_heads"))
        if kind == "shift":
            d = replace(d, shift=(window[0] + rng.randint(0, 1), d.shift[1]), invalid=kind)
        elif kind == "bias":
            d = replace(d, bias=True, bias_shape=(d.heads, 2 * window[0], 2 * window[1] - 1), invalid=kind)
        else:
            d = replace(d, bias=True, bias_shape=(d.heads + 1, 2 * window[0] - 1, 2 * window[1] - 1), invalid=kind)
    return d


def run_on_rank(rank: int, d: WDraw) -> list[float]:
    """Errors [out, dq, dk, dv(, dbias)] of this rank's tile against the reference."""
    gen = torch.Generator().manual_seed(d.seed)
    shape = (d.batch, d.height, d.width, d.heads, d.head_dim)
    q, k, v, gout = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(4))
    bshape = d.bias_shape or (d.heads, 2 * d.window[0] - 1, 2 * d.window[1] - 1)
    bias = torch.randn(bshape, generator=gen, dtype=torch.float64) if d.bias else None
    tile = lambda t: shard_image(t, grid=d.grid, window=d.window, group=None)  # noqa: E731
    leaves = [tile(t).clone().requires_grad_() for t in (q, k, v)]
    bl = bias.clone().requires_grad_() if bias is not None else None
    out = window_parallel_attention(*leaves, window=d.window, shift=d.shift, grid=d.grid, group=None,
                                    wrap=d.wrap, bias=bl, scale=d.scale)
    grads = torch.autograd.grad(out, leaves + ([bl] if bl is not None else []), tile(gout))
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)] + ([bias.clone().requires_grad_()] if d.bias else [])
    ref = swin_reference(*ref_in[:3], window=d.window, shift=d.shift, wrap=d.wrap,
                         bias=ref_in[3] if d.bias else None, scale=d.scale)
    ref_grads = torch.autograd.grad(ref, ref_in, gout)
    errs = [rel_err(out, tile(ref))] + [rel_err(g, tile(r)) for g, r in zip(grads[:3], ref_grads[:3])]
    # the model's primitive on the same tiling: halo_roll (and its inverse) is torch.roll, exactly
    layout = TileLayout.build(d.height, d.width, d.grid, d.window)
    for sign, inverse in ((-1, False), (1, True)):
        rolled = halo_roll(tile(q), layout, rank, d.shift, None, inverse=inverse)
        assert torch.equal(rolled, tile(torch.roll(q, (sign * d.shift[0], sign * d.shift[1]), (1, 2)))), inverse
    if d.bias:
        gb = grads[3].clone()
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(gb)      # a replicated weight's gradient: summed over the ranks
        errs.append(rel_err(gb, ref_grads[3]))
    return errs


def check(rank: int, d: WDraw) -> Optional[str]:
    try:
        errs = run_on_rank(rank, d)
    except ValueError as e:
        return None if d.invalid else f"valid draw refused: {e}"
    except Exception as e:  # noqa: BLE001 - any other exception is a finding
        return f"{type(e).__name__}: {e}"
    if d.invalid:
        return f"invalid draw ({d.invalid}) was not refused: errors {errs}"
    if not all(e <= TOL for e in errs):
        return "errors [out, dq, dk, dv(, dbias)] = " + ", ".join(f"{e:.2e}" for e in errs)
    return None


def _rank(rank: int, world_size: int, draws: list[WDraw]) -> list[Optional[str]]:
    return [check(rank, d) for d in draws]


def run_gloo(draws: list[WDraw], timeout: float = 300) -> list[tuple[int, str]]:
    """(seed, message) for every draw (all with one world size) that misbehaved on some rank."""
    world = {d.grid[0] * d.grid[1] for d in draws}
    assert len(world) == 1, sorted(world)
    per_rank = run_ranks(_rank, world.pop(), args=(draws,), timeout=timeout)
    return [(d.seed, f"rank {r}: {m}") for r, msgs in enumerate(per_rank) for d, m in zip(draws, msgs) if m]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Fuzz window-parallel Swin attention on gloo ranks against the float64 "
                                             "reference (example: python -m tests.wp_fuzz --draws 60 --world 3)")
    ap.add_argument("--draws", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0, help="first draw's seed; draw i uses seed + i")
    ap.add_argument("--world", type=int, default=3, choices=sorted(GRIDS), help="ranks (grid sizes with this product)")
    args = ap.parse_args(argv)
    start = time.time()
    draws = [draw(args.seed + i, args.world) for i in range(args.draws)]
    fails = run_gloo(draws)
    for seed, msg in fails:
        print(f"FAIL seed={seed}: {msg}\n    {draw(seed, args.world).call()}", flush=True)
    print(f"{len(draws)} draws on {args.world} gloo ranks, {len(fails)} failures, {time.time() - start:.1f} s")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())

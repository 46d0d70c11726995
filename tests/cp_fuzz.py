"""Randomized differential testing of context-parallel attention against the float64 reference.

A *draw* is one random configuration from the space the hand-picked tests sample sparsely: world
size P (odd ones weighted up), layout, Ulysses degree U | P (ring / hybrid / Ulysses), very short
shards (1–5 tokens per chunk), batch B, GQA ratio, head dim, causal or full, sliding windows around
shard and chunk boundaries (0, 1, n ± 1, c ± 1, S − 1, ≥ S), tiles, K/V pieces, packed documents
(shared or per sample, boundaries on or next to shard/chunk borders, single-token documents, one
document spanning everything) as lists or as the padded tensor of ``pack_cu_seqlens``, kernel
(sdpa / math) and scale. :func:`run_simulated` runs a draw through the in-process ring simulator in
float64 and returns the relative errors of the output and of dq, dk, dv against
``reference_attention``; :func:`run_on_rank` runs it on a real gloo rank through
``context_parallel_attention``. A small fraction of draws is made invalid on purpose (an S the
layout cannot shard, heads U does not divide, a negative window, a non-increasing ``cu_seqlens``, a
zero ``kv_piece`` or ``tile``, a scale <= 0 or not finite, no heads or a zero head dim) and must be
refused with a ValueError.

    python -m tests.cp_fuzz --draws 2000 --seed 0     # the long run (prints failures, exits 1 on any)
    python -m tests.cp_fuzz --draws 40 --gloo 3       # 40 draws with P = 3 on real gloo ranks
"""
from __future__ import annotations

import argparse
import functools
import random
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Optional, Union

import torch

from dist_train.models.attention import AttentionContext
from dist_train.models.attention import attention as model_attention
from parallelism.context import (CPStats, context_parallel_attention, local_attention, normalize_cu_seqlens,
                                 pack_cu_seqlens, required_multiple, sequence_positions, shard_sequence,
                                 simulate_ring_attention, unshard_sequence)
from parallelism.context.layouts import LAYOUTS
from tests.dist_harness import run_ranks
from tests.test_cp_reference import reference_attention

TOL = 1e-10
INVALID_KINDS = ("seq_len", "heads", "window", "cu_seqlens", "kv_piece", "tile", "scale", "empty_dim")


@dataclass(frozen=True)
class Draw:
    """One configuration. ``seq_len`` is the global S; ``cu_seqlens`` global boundaries (None, one
    list, or one list per sample); ``packed``: pass them as ``pack_cu_seqlens``' tensor."""

    seed: int
    world_size: int
    layout: str
    ulysses_degree: int
    seq_len: int
    batch: int
    hq: int
    hkv: int
    head_dim: int
    causal: bool
    window: Optional[int]
    tile: Optional[int]
    kv_piece: Optional[int]
    cu_seqlens: Optional[Union[tuple[int, ...], tuple[tuple[int, ...], ...]]]
    packed: bool
    kernel: str
    scale: Optional[float]
    invalid: Optional[str] = None      # which rule the draw breaks (None: valid)
    strided: bool = False              # q, k, v given as non-contiguous [B, S, H, D] views of [B, H, S, D]

    @property
    def method(self) -> str:
        if self.ulysses_degree == 1:
            return "ring"
        return "ulysses" if self.ulysses_degree == self.world_size else "hybrid"

    def cu_arg(self):
        """``cu_seqlens`` as the API receives it."""
        if self.cu_seqlens is None or not self.packed:
            return None if self.cu_seqlens is None else _as_lists(self.cu_seqlens)
        rows = self.cu_seqlens if isinstance(self.cu_seqlens[0], tuple) else (self.cu_seqlens,) * self.batch
        return pack_cu_seqlens(rows)

    def doc_ids(self) -> Optional[torch.Tensor]:
        """[B, S] document ids for the reference (None: one document)."""
        if self.cu_seqlens is None:
            return None
        rows = self.cu_seqlens if isinstance(self.cu_seqlens[0], tuple) else (self.cu_seqlens,) * self.batch
        pos = torch.arange(self.seq_len)
        return torch.stack([torch.searchsorted(torch.tensor(r), pos, right=True) for r in rows])

    def call(self) -> str:
        """The draw as the keyword arguments of a call (what a failure report prints)."""
        return ", ".join(f"{k}={v!r}" for k, v in asdict(self).items())


def _as_lists(cu):
    return [list(r) for r in cu] if isinstance(cu[0], tuple) else list(cu)


def _boundaries(rng: random.Random, S: int, special: list[int]) -> tuple[int, ...]:
    """Random document boundaries favouring the ``special`` positions (shard/chunk borders ± 1)."""
    style = rng.choice(("special", "special", "random", "singles", "whole"))
    if style == "whole" or S == 1:
        return (0, S)
    inner = set()
    if style == "special" and special:
        inner |= set(rng.sample(special, k=rng.randint(1, min(4, len(special)))))
    elif style in ("special", "random"):
        inner |= {rng.randrange(1, S) for _ in range(rng.randint(1, 4))}
    else:                                  # single-token documents, then whatever is left
        start = rng.randrange(0, S)
        inner |= {start + i for i in range(rng.randint(1, 4))}
    return tuple(sorted({0, S} | {b for b in inner if 0 < b < S}))


def draw(seed: int) -> Draw:
    """The draw of ``seed`` (deterministic: the same seed gives the same configuration)."""
    rng = random.Random(seed)
    # 1 draw in 8 is "long": chunks of 60–140 rows, so the planner's 64-row document pieces and the
    # 128-token window tiles (default_tile) are cut for real; the others have 1–5 tokens per chunk
    long = rng.random() < 0.125
    P = rng.choice((1, 2, 3, 4) if long else (1, 2, 3, 3, 4, 5, 5, 6, 7, 7, 8))
    layout = rng.choice(LAYOUTS)
    U = rng.choice([u for u in range(1, P + 1) if P % u == 0]) if rng.random() < 0.4 else 1
    per_chunk = rng.randint(60, 140) if long else rng.choice((1, 1, 2, 2, 3, 4, 5))
    S = required_multiple(P, layout) * per_chunk
    n, c = S // P, (S // (2 * P) if layout == "zigzag" else S // P)
    B = rng.choice((1, 2) if long else (1, 1, 2, 3))
    hkv = rng.choice((1, 1, 2) if long else (1, 1, 2, 3))
    hq = hkv * rng.choice((1, 2) if long else (1, 2, 3))
    if U > 1 and hq % U:
        hq = hkv * U if rng.random() < 0.5 else hq * U       # Ulysses needs U | Hq
    D = rng.choice((2, 4) if long else (1, 2, 4, 8))
    causal = rng.random() < 0.6
    window = None
    if rng.random() < 0.55:
        near = (63, 64, 65, 127, 128, 129) if long else ()
        window = max(0, rng.choice((0, 1, 2, n - 1, n, n + 1, c - 1, c, c + 1, 2 * n - 1, S - 1, S, S + 3,
                                    rng.randrange(0, S + 1)) + near))
    tile = rng.choice((None, None, 1, 2, 3, n, n + 1) + ((17, 64, 100) if long else ())) if rng.random() < 0.4 else None
    if long and tile is not None and tile < 8:
        tile = None                                          # 1–3-token tiles of 500 tokens: too slow
    kv_piece = rng.choice((1, 2, 3, n - 1, n, n + 2) if not long else (7, 33, 64, n - 1, n)) \
        if rng.random() < 0.35 else None
    kv_piece = None if kv_piece is not None and kv_piece < 1 else kv_piece
    offsets = (-1, 0, 1) + ((62, 63, 64, 65, 66, -63, -64, -65) if long else ())
    borders = sorted({x + d for x in range(0, S, c) for d in offsets} | {1, S - 1})
    special = [b for b in borders if 0 < b < S]
    cu = None
    r = rng.random()
    if r < 0.35:
        cu = _boundaries(rng, S, special)
    elif r < 0.65 and B > 1:
        cu = tuple(_boundaries(rng, S, special) for _ in range(B))
    packed = cu is not None and rng.random() < 0.3
    kernel = rng.choice(("sdpa", "sdpa", "math"))
    scale = rng.choice((None, None, None, 0.3, 1.7))
    d = Draw(seed, P, layout, U, S, B, hq, hkv, D, causal, window, tile, kv_piece, cu, packed, kernel, scale)
    if rng.random() < 0.08:
        d = _break(d, rng)
    return replace(d, strided=rng.random() < 0.3)       # drawn last: earlier seeds keep their fields


def _break(d: Draw, rng: random.Random) -> Draw:
    """Make ``d`` invalid in one way that the API must refuse (or return it unchanged when the chosen
    rule cannot be broken for this shape, e.g. P = 1 has no invalid length)."""
    kind = rng.choice(INVALID_KINDS)
    m = required_multiple(d.world_size, d.layout)
    if kind == "seq_len" and m > 1:
        return replace(d, seq_len=d.seq_len + rng.randrange(1, m), cu_seqlens=None, invalid=kind)
    if kind == "heads" and d.ulysses_degree > 1:
        hkv = 1
        hq = next(h for h in range(d.ulysses_degree + 1, 4 * d.ulysses_degree) if h % d.ulysses_degree)
        return replace(d, hq=hq, hkv=hkv, invalid=kind)
    if kind == "window":
        return replace(d, window=-rng.randint(1, 3), invalid=kind)
    if kind == "cu_seqlens":
        bad = rng.choice(((0, 0, d.seq_len), (0, d.seq_len - 1), (1, d.seq_len), (0, d.seq_len, d.seq_len + 1)))
        return replace(d, cu_seqlens=bad, packed=False, invalid=kind)
    if kind == "kv_piece":
        return replace(d, kv_piece=rng.choice((0, -1)), invalid=kind)
    if kind == "tile":
        return replace(d, tile=rng.choice((0, -1, -3)), invalid=kind)
    if kind == "empty_dim":
        return replace(d, **rng.choice(({"hq": 0, "hkv": 0}, {"head_dim": 0})), invalid=kind)
    if kind == "scale":
        return replace(d, scale=rng.choice((0.0, -0.5, float("nan"), float("inf"))), invalid=kind)
    return d


def features(d: Draw) -> set[str]:
    """What a draw exercises (the fixed suite list asserts it still covers them all)."""
    n = d.seq_len // d.world_size
    c = d.seq_len // (2 * d.world_size) if d.layout == "zigzag" else n
    f = {f"method:{d.method}", f"causal:{d.causal}", f"kernel:{d.kernel}"}
    if d.invalid:
        f.add(f"invalid:{d.invalid}")
        return f
    f.add(f"gqa:{min(d.hq // d.hkv, 3)}")
    if d.world_size in (3, 5, 7):
        f.add(f"P{d.world_size}:{d.layout}")
    if d.world_size == 1:
        f.add("P1")
    if d.ulysses_degree > 1 and d.hkv % d.ulysses_degree:
        f.add("ulysses:kv-replicated")
    if d.window is not None:
        names = {0: "0", 1: "1", n - 1: "n-1", n: "n", n + 1: "n+1", c - 1: "c-1", c + 1: "c+1"}
        f.add("window:" + (">=S" if d.window >= d.seq_len else names.get(d.window, "other")))
    if d.cu_seqlens is not None:
        per_sample = isinstance(d.cu_seqlens[0], tuple)
        f.add("docs:per-sample" if per_sample else "docs:shared")
        if d.packed:
            f.add("docs:packed")
        for row in (d.cu_seqlens if per_sample else (d.cu_seqlens,)):
            if any(b - a == 1 for a, b in zip(row, row[1:])):
                f.add("docs:single-token")
            if any(x % c == 0 for x in row[1:-1]):
                f.add("docs:on-chunk-border")
            if any(x % c in (1, c - 1) for x in row[1:-1]):
                f.add("docs:next-to-chunk-border")
            if row == (0, d.seq_len):
                f.add("docs:one-spanning-all")
    for name, on in (("kv_piece", d.kv_piece), ("tile", d.tile), ("scale", d.scale is not None),
                     ("batch>1", d.batch > 1), ("strided", d.strided), ("shard<=2", n <= 2), ("long", n >= 60)):
        if on:
            f.add(name)
    return f


def tensors(d: Draw):
    """(q, k, v, output gradient) in float64, seeded by the draw (full sequence)."""
    gen = torch.Generator().manual_seed(d.seed)
    q, k, v = (torch.randn(d.batch, d.seq_len, h, d.head_dim, generator=gen, dtype=torch.float64)
               for h in (d.hq, d.hkv, d.hkv))
    grad = torch.randn(d.batch, d.seq_len, d.hq, d.head_dim, generator=gen, dtype=torch.float64)
    return q, k, v, grad


def reference(d: Draw, q, k, v, grad):
    """Float64 single-device output and (dq, dk, dv)."""
    xs = leaves((q, k, v), d.strided)
    out = reference_attention(*xs, causal=d.causal, window=d.window, scale=d.scale, doc_ids=d.doc_ids())
    return out.detach(), torch.autograd.grad(out, xs, grad)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x − ref| over the reference's max magnitude, floored at 1e-3: a gradient that is exactly
    0 in the reference (a query attending to one key has dq = 0) is compared absolutely, not 0/0."""
    x, ref = x.detach().double(), ref.detach().double()
    return float((x - ref).abs().max() / ref.abs().max().clamp_min(1e-3))


def leaves(xs, strided: bool) -> list[torch.Tensor]:
    """Fresh leaves with the values of ``xs`` ([B, S, H, D]), non-contiguous views when ``strided``
    (the strides a model gets from [B, H, S, D] projections)."""
    if strided:
        return [x.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for x in xs]
    return [x.clone().requires_grad_() for x in xs]


def _errors(out, grads, ref_out, ref_grads) -> list[float]:
    return [rel_err(out, ref_out)] + [rel_err(g, r) for g, r in zip(grads, ref_grads)]


def run_simulated(d: Draw) -> list[float]:
    """Errors [out, dq, dk, dv] of the simulator against the reference (a ValueError propagates).

    Also asserts that the ranks together computed every allowed (query, key) pair exactly once: a
    block computed twice (or by two ranks) is invisible in the output — merging a block with itself
    keeps o, and its doubled lse halves each copy's gradient — but it is wasted work."""
    q, k, v, grad = tensors(d)
    xs = leaves((q, k, v), d.strided)
    ring = d.world_size // d.ulysses_degree if d.ulysses_degree >= 1 and d.world_size % d.ulysses_degree == 0 else 1
    stats = [CPStats() for _ in range(ring)]
    out = simulate_ring_attention(*xs, world_size=d.world_size, layout=d.layout, causal=d.causal,
                                  window=d.window, scale=d.scale, kernel=d.kernel, tile=d.tile,
                                  kv_piece=d.kv_piece, cu_seqlens=d.cu_arg(), ulysses_degree=d.ulysses_degree,
                                  stats=stats)
    assert out.shape == q.shape and out.dtype == torch.float64, (out.shape, out.dtype)
    work, allowed = sum(st.work_pairs for st in stats), allowed_pairs(d)
    assert work == allowed, f"the ranks computed {work} (query, key) pairs, {allowed} are allowed"
    grads = torch.autograd.grad(out, xs, grad)
    return _errors(out, grads, *reference(d, q, k, v, grad))


def allowed_pairs(d: Draw) -> int:
    """Allowed (query, key) pairs of the draw, counted once per distinct document row (CPStats'
    convention: per (batch, head), summed over the rows when documents differ per sample)."""
    i, j = torch.arange(d.seq_len)[:, None], torch.arange(d.seq_len)[None, :]
    ok = torch.ones(d.seq_len, d.seq_len, dtype=torch.bool)
    if d.causal:
        ok &= j <= i
    if d.window is not None:
        ok &= j >= i - d.window
        if not d.causal:
            ok &= j <= i + d.window
    docs = normalize_cu_seqlens(d.cu_arg(), d.seq_len, d.batch)
    if docs is None:
        return int(ok.sum())
    ids = [torch.searchsorted(torch.tensor(row), torch.arange(d.seq_len), right=True) for row in docs]
    return sum(int((ok & (r[:, None] == r[None, :])).sum()) for r in ids)


def run_local(d: Draw) -> list[float]:
    """Errors of ``local_attention`` (the one-rank ring, no simulator) on a P = 1 draw."""
    q, k, v, grad = tensors(d)
    xs = leaves((q, k, v), d.strided)
    out = local_attention(*xs, causal=d.causal, window=d.window, scale=d.scale, kernel=d.kernel, tile=d.tile,
                          cu_seqlens=d.cu_arg())
    return _errors(out, torch.autograd.grad(out, xs, grad), *reference(d, q, k, v, grad))


def run_model(d: Draw) -> list[float]:
    """Errors of the model layer's ``attention`` without a cp group (torch SDPA, or the tiled one-rank
    ring with a window or documents) on a causal P = 1 draw with the default scale."""
    q, k, v, grad = tensors(d)
    xs = leaves((q, k, v), d.strided)
    cu = d.cu_arg()
    if cu is not None and not isinstance(cu, torch.Tensor):
        cu = pack_cu_seqlens([cu] * d.batch if isinstance(cu[0], int) else cu)
    out = model_attention(*xs, AttentionContext(window=d.window, kernel=d.kernel), cu_seqlens=cu)
    return _errors(out, torch.autograd.grad(out, xs, grad), *reference(d, q, k, v, grad))


def runners(d: Draw) -> list:
    """Every code path a draw can run on in one process."""
    out = [run_simulated]
    # neither takes kv_piece or a layout (whose length rule a seq_len draw breaks)
    if d.world_size == 1 and d.ulysses_degree == 1 and d.invalid not in ("kv_piece", "seq_len"):
        out.append(run_local)
        if d.causal and d.scale is None and d.tile is None and d.kv_piece is None:
            out.append(run_model)
    return out


def run_on_rank(rank: int, d: Draw) -> list[float]:
    """Errors [out, dq, dk, dv] of this rank's shard on real ranks (the default group), and of the
    full output gathered with ``unshard_sequence``."""
    q, k, v, grad = tensors(d)
    pos = sequence_positions(d.seq_len, rank=rank, world_size=d.world_size, layout=d.layout)
    xs = leaves([x[:, pos] for x in (q, k, v)], d.strided)
    out = context_parallel_attention(*xs, layout=d.layout, method=d.method, ulysses_degree=d.ulysses_degree,
                                     causal=d.causal, window=d.window, scale=d.scale, kernel=d.kernel,
                                     tile=d.tile, kv_piece=d.kv_piece, cu_seqlens=d.cu_arg())
    grads = torch.autograd.grad(out, xs, grad[:, pos])
    ref_out, ref_grads = reference(d, q, k, v, grad)
    # the layout ops on the same shapes: shard(full) is this rank's rows, unshard(out) the full output
    assert torch.equal(shard_sequence(q, dim=1, layout=d.layout), q[:, pos]), "shard_sequence"
    full_out = unshard_sequence(out.detach(), dim=1, layout=d.layout)
    return _errors(out, grads, ref_out[:, pos], [g[:, pos] for g in ref_grads]) + [rel_err(full_out, ref_out)]


def check(d: Draw, run=run_simulated) -> Optional[str]:
    """None when the draw behaves (exact within TOL, or an invalid draw refused with a ValueError);
    otherwise one line saying what went wrong."""
    try:
        errs = run(d)
    except ValueError as e:
        if d.invalid is not None:
            return None
        return f"valid draw refused: {type(e).__name__}: {e}"
    except Exception as e:  # noqa: BLE001 - any other exception is a finding, reported with the draw
        return f"{type(e).__name__}: {e}"
    if d.invalid is not None:
        return f"invalid draw ({d.invalid}) was not refused: errors {errs}"
    if not all(e <= TOL for e in errs):     # also catches NaN
        return "errors [out, dq, dk, dv] = " + ", ".join(f"{e:.2e}" for e in errs)
    return None


def _gloo_rank(rank: int, world_size: int, draws: list[Draw]) -> list[Optional[str]]:
    return [check(d, functools.partial(run_on_rank, rank)) for d in draws]


def seeds_for(world_size: int, count: int, first: int = 0) -> list[int]:
    """The first ``count`` seeds from ``first`` on whose draw has ``world_size`` ranks."""
    out, seed = [], first
    while len(out) < count:
        if draw(seed).world_size == world_size:
            out.append(seed)
        seed += 1
    return out


def run_gloo(draws: list[Draw], timeout: float = 300) -> list[tuple[int, str]]:
    """Run ``draws`` (all with the same world size) on real gloo ranks through
    ``context_parallel_attention``; (seed, message) for every draw that misbehaved on some rank."""
    sizes = {d.world_size for d in draws}
    assert len(sizes) == 1, f"one world size per spawn, got {sorted(sizes)}"
    per_rank = run_ranks(_gloo_rank, sizes.pop(), args=(draws,), timeout=timeout)
    return [(d.seed, f"rank {r}: {msg}") for r, msgs in enumerate(per_rank) for d, msg in zip(draws, msgs)
            if msg is not None]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Fuzz context-parallel attention against the float64 reference "
                                             "(example: python -m tests.cp_fuzz --draws 500 --seed 0)")
    ap.add_argument("--draws", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0, help="first draw's seed; draw i uses seed + i")
    ap.add_argument("--budget-s", type=float, default=None, help="stop after this many seconds")
    ap.add_argument("--gloo", type=int, default=None, metavar="P",
                    help="run the first DRAWS draws with P ranks on real gloo ranks instead of the simulator")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.gloo is not None:
        start = time.time()
        seeds = seeds_for(args.gloo, args.draws, args.seed)
        fails = run_gloo([draw(s) for s in seeds])
        for seed, msg in fails:
            print(f"FAIL seed={seed} gloo: {msg}\n    {draw(seed).call()}", flush=True)
        print(f"{len(seeds)} draws on {args.gloo} gloo ranks (seeds {seeds[0]}..{seeds[-1]}), "
              f"{len(fails)} failures, {time.time() - start:.1f} s")
        return 1 if fails else 0
    failures, start, done = 0, time.time(), 0
    for i in range(args.draws):
        if args.budget_s is not None and time.time() - start > args.budget_s:
            break
        d = draw(args.seed + i)
        done += 1
        for run in runners(d):
            msg = check(d, run)
            if msg is not None:
                failures += 1
                print(f"FAIL seed={d.seed} {run.__name__}: {msg}\n    {d.call()}", flush=True)
    print(f"{done} draws, {failures} failures, {time.time() - start:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""The ring schedule: which blocks each rank computes at each step, and which K/V blocks travel.

Built once per (chunks of every rank, causal, window, tile) and cached; every rank derives the same
plan, so sends and receives always match without any negotiation.

Directions. K/V blocks may travel forward (rank r -> r+1, so at step t rank r holds the block of
source r−t) and/or backward (r -> r−1, source r+t). Without a window one forward ring suffices.
With a window a rank typically needs both neighbours (zigzag's second chunk needs the *next* rank's
chunk), so the planner picks the step counts (T_fwd, T_bwd) that cover every needed (rank, source)
pair with the fewest K/V sends per rank: communication then grows with the window, not with S.

Pruning. The block of source s travelling in direction d is forwarded at step t only while a rank
further along still needs it (``last[d][s]``): e.g. contiguous causal never sends rank P−1's block
to rank 0. In backward, the dK/dV accumulator of s follows the same path and, at its last holder,
goes straight back to its owner s.
"""
from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass, replace
from typing import Optional

import torch

from .documents import Docs, local_cuts
from .layouts import Chunk
from .masks import BlockMask, classify

FWD, BWD = 1, -1
DOC_MIN_PIECE = 64   # documents shorter than this (local rows) share a piece: bounds kernel calls and plan size
#: an ``explicit`` block larger than this (no window: a document cut it — short documents sharing a piece, or
#: per-sample documents that differ; a window wider than 512: its tile of ~w tokens, up to S when w > S/2) is
#: computed in sub-blocks of at most this many rows and keys, so the boolean/additive mask a kernel builds is
#: O(EXPLICIT_TILE²) whatever S and w are, never [S, S] (and sub-blocks the mask fills or empties take the
#: full path or are skipped: less masked work)
EXPLICIT_TILE = 512


@dataclass(frozen=True)
class Block:
    """One kernel call: local query rows [q_lo, q_hi) × local key rows [k_lo, k_hi) of the source."""

    q_lo: int
    q_hi: int
    k_lo: int
    k_hi: int
    mask: BlockMask

    @property
    def work(self) -> int:
        return self.mask.allowed

    @functools.cached_property
    def call(self) -> "Block":
        """The kernel call computing this block. A shifted block (local b < a, striped keys after the
        queries) is exactly the causal block on rows [q_lo+1, q_hi) × keys [k_lo, k_hi−1): kernels run
        their plain causal path on it, with no fully masked row and no padded copies."""
        if self.mask.kind != "shifted":
            return self
        m = self.mask
        q = Chunk(m.q.start + m.q.stride, m.q.stride, m.q.length - 1)
        k = Chunk(m.k.start, m.k.stride, m.k.length - 1)
        inner = classify(q, k, m.causal, m.window)
        assert inner.kind in ("causal", "full") and m.allowed % inner.allowed == 0, (m, inner)   # 1×1: full
        # the same pairs; ``allowed`` keeps the outer count (summed over document rows, if any)
        return Block(self.q_lo + 1, self.q_hi, self.k_lo, self.k_hi - 1, replace(inner, allowed=m.allowed))


def _doc_segments(c: Chunk, docs: Optional[Docs], min_piece: int) -> list[int]:
    """Local cut points [0, …, c.length] at document starts, dropping those that would leave a
    piece shorter than ``min_piece`` rows (short documents share a piece, masked explicitly)."""
    kept = [0]
    for x in local_cuts(c, docs):
        if x - kept[-1] >= min_piece:
            kept.append(x)
    if len(kept) > 1 and c.length - kept[-1] < min_piece:
        kept.pop()
    return kept + [c.length]


def _tiles(chunks: tuple[Chunk, ...], tile: Optional[int],
           docs: Optional[Docs] = None) -> list[tuple[int, Chunk]]:
    """(local offset, chunk) pieces of at most ``tile`` tokens, in local order, cut at document
    starts first (so blocks inside one document are causal/full and blocks between documents empty)."""
    out, off = [], 0
    min_piece = DOC_MIN_PIECE if tile is None else min(tile, DOC_MIN_PIECE)
    for c in chunks:
        cuts = _doc_segments(c, docs, min_piece)
        for lo, hi in zip(cuts, cuts[1:]):
            step = tile or (hi - lo)
            for a in range(lo, hi, step):
                n = min(step, hi - a)
                out.append((off + a, Chunk(c.start + c.stride * a, c.stride, n)))
        off += c.length
    return out


def _doc_span(c: Chunk, docs: Optional[Docs]) -> Optional[tuple[tuple[int, int], ...]]:
    """Per document row: (index of the first, index of the last) document ``c`` touches."""
    if docs is None:
        return None
    return tuple((bisect.bisect_right(row, c.start) - 1, bisect.bisect_right(row, c.last) - 1) for row in docs)


def _disjoint(q: Chunk, k: Chunk, causal: bool, window: Optional[int], q_span, k_span) -> bool:
    """Cheap proof that q × k has no allowed pair (all keys after the queries, all keys further than the
    window from every query, or no shared document in any row), so long windowed or document-cut plans
    classify only the blocks near the diagonal (classifying every pair made planning O(S²/tile))."""
    if causal and k.start > q.last:
        return True
    if window is not None and (k.last < q.start - window or (not causal and k.start > q.last + window)):
        return True
    return q_span is not None and all(a[1] < b[0] or b[1] < a[0] for a, b in zip(q_span, k_span))


def pair_blocks(q_chunks: tuple[Chunk, ...], k_chunks: tuple[Chunk, ...], causal: bool,
                window: Optional[int], tile: Optional[int], max_rows: Optional[int] = None,
                docs: Optional[Docs] = None) -> tuple[Block, ...]:
    """Kernel calls for queries of one rank against keys of one source; fully masked blocks dropped.

    Fully unmasked blocks are fused: adjacent full key pieces of a query piece become one call, and
    adjacent query pieces with the same single full key range become one call of at most
    ``max_rows`` rows (None: unlimited; e.g. zigzag's half block per step is one kernel call). K/V
    pieces cap it at the piece size, so a call's dq stays piece-sized too.
    """
    rows: list[list[Block]] = []
    cap = min(tile or EXPLICIT_TILE, EXPLICIT_TILE)
    k_tiles = [(k_off, kc, _doc_span(kc, docs)) for k_off, kc in _tiles(k_chunks, tile, docs)]
    for q_off, qc in _tiles(q_chunks, tile, docs):
        row: list[Block] = []
        q_span = _doc_span(qc, docs)
        for k_off, kc, k_span in k_tiles:
            if _disjoint(qc, kc, causal, window, q_span, k_span):
                continue
            m = classify(qc, kc, causal, window, docs)
            if m.kind == "none":
                continue
            if m.kind == "explicit" and max(qc.length, kc.length) > cap:
                parts = _explicit_parts(q_off, qc, k_off, kc, causal, window, docs, cap)
            else:
                parts = [Block(q_off, q_off + qc.length, k_off, k_off + kc.length, m)]
            for blk in parts:
                prev = row[-1] if row else None
                if (prev is not None and blk.mask.kind == "full" and prev.mask.kind == "full"
                        and prev.k_hi == blk.k_lo and (prev.q_lo, prev.q_hi) == (blk.q_lo, blk.q_hi)):
                    row[-1] = Block(blk.q_lo, blk.q_hi, prev.k_lo, blk.k_hi, _fused(prev.mask, blk.mask))
                else:
                    row.append(blk)
        rows.append(row)
    out: list[Block] = []
    for row in rows:
        prev = out[-1] if out else None
        if (len(row) == 1 and prev is not None and row[0].mask.kind == "full" and prev.mask.kind == "full"
                and (max_rows is None or row[0].q_hi - prev.q_lo <= max_rows)
                and (prev.k_lo, prev.k_hi) == (row[0].k_lo, row[0].k_hi) and prev.q_hi == row[0].q_lo):
            b = row[0]
            out[-1] = Block(prev.q_lo, b.q_hi, b.k_lo, b.k_hi, _fused(prev.mask, b.mask))
        else:
            out.extend(row)
    return tuple(out)


def _explicit_parts(q_off: int, qc: Chunk, k_off: int, kc: Chunk, causal: bool, window: Optional[int],
                    docs: Optional[Docs], cap: int) -> list[Block]:
    """An ``explicit`` block q × k cut into sub-blocks of at most ``cap`` rows and keys, each classified on
    its own (those inside one document of every row take the full/causal fast paths, empty ones are dropped):
    a kernel then builds a mask of at most cap × cap (per document row), not one the size of the block,
    which can be a long document's [L, L] without a window, or [w, w] (up to [S, S]) for a wide one."""
    out = []
    for qa in range(0, qc.length, cap):
        q = Chunk(qc.start + qc.stride * qa, qc.stride, min(cap, qc.length - qa))
        q_span = _doc_span(q, docs)
        for ka in range(0, kc.length, cap):
            k = Chunk(kc.start + kc.stride * ka, kc.stride, min(cap, kc.length - ka))
            if _disjoint(q, k, causal, window, q_span, _doc_span(k, docs)):
                continue
            m = classify(q, k, causal, window, docs)
            if m.kind != "none":
                out.append(Block(q_off + qa, q_off + qa + q.length, k_off + ka, k_off + ka + k.length, m))
    return out


def _fused(a: BlockMask, b: BlockMask) -> BlockMask:
    # A fused block is full, so its chunks are never used to build a mask; keep the first ones.
    # Its allowed count is the parts' sum, not the fused area: with per-sample documents a full block's
    # count is summed over the document rows (masks.py), and the area would drop that factor.
    return BlockMask("full", a.q, a.k, a.causal, a.window, a.allowed + b.allowed)


@dataclass(frozen=True)
class RingPlan:
    """Schedule for P ranks. ``blocks[r][s]`` are rank r's kernel calls against source s's K/V."""

    world_size: int
    blocks: tuple[tuple[tuple[Block, ...], ...], ...]
    direction: tuple[tuple[int, ...], ...]  # [r][s]: 0 local, FWD, BWD; 0 also for "no work" pairs
    steps: dict  # {FWD: T_fwd, BWD: T_bwd}
    last: dict  # {FWD: (last step per source), BWD: (...)}

    @property
    def num_steps(self) -> int:
        return 1 + max(self.steps[FWD], self.steps[BWD])

    def source(self, d: int, rank: int, t: int) -> int:
        """The source whose K/V rank holds at step t in direction d."""
        return (rank - d * t) % self.world_size

    def sends(self, d: int, rank: int, t: int) -> bool:
        """Does ``rank`` pass its direction-d K/V block on at the end of step t?"""
        return t < self.last[d][self.source(d, rank, t)]

    def on_path(self, d: int, rank: int, t: int) -> bool:
        """Does ``rank`` hold a (still needed) direction-d block at step t >= 1?"""
        return 1 <= t <= self.last[d][self.source(d, rank, t)]

    def work(self, rank: int, t: int) -> list[tuple[int, int]]:
        """(direction, source) pairs rank computes at step t (direction 0 = its own K/V at t = 0)."""
        if t == 0:
            return [(0, rank)] if self.blocks[rank][rank] else []
        out = []
        for d in (FWD, BWD):
            s = self.source(d, rank, t)
            if t <= self.steps[d] and self.direction[rank][s] == d and self.blocks[rank][s] and s != rank:
                out.append((d, s))
        return out

    def rank_work(self, rank: int) -> int:
        return sum(b.work for s in range(self.world_size) for b in self.blocks[rank][s])


def _assign(needed: list[tuple[int, int]], P: int, t_f: int) -> tuple[dict, dict]:
    """Direction of every needed pair (forward when within t_f hops) and the last hop per source."""
    direction, last = {}, {FWD: [0] * P, BWD: [0] * P}
    for r, s in needed:
        d = FWD if (r - s) % P <= t_f else BWD
        direction[(r, s)] = d
        last[d][s] = max(last[d][s], (d * (r - s)) % P)
    return direction, last


def _choose_split(needed: list[tuple[int, int]], P: int) -> tuple[dict, dict]:
    """Split needed pairs between the two directions with the fewest K/V sends in total, then the
    fewest on the busiest rank, then preferring a single (forward) direction."""
    best = None
    for t_f in range(P):
        direction, last = _assign(needed, P, t_f)
        sends = [0] * P
        for d in (FWD, BWD):
            for s, hops in enumerate(last[d]):
                for t in range(hops):
                    sends[(s + d * t) % P] += 1
        key = (sum(sends), max(sends), max(last[BWD]) > 0, max(last[BWD]))
        if best is None or key < best[0]:
            best = (key, direction, last)
    return best[1], best[2]


@functools.lru_cache(maxsize=256)
def build_plan(chunks: tuple[tuple[Chunk, ...], ...], causal: bool, window: Optional[int],
               tile: Optional[int] = None,
               key_chunks: Optional[tuple[tuple[Chunk, ...], ...]] = None,
               max_rows: Optional[int] = None, docs: Optional[Docs] = None) -> RingPlan:
    """Plan the ring for ``chunks[r]`` = the chunks held by rank r (identical on all ranks).

    ``key_chunks[s]`` (default ``chunks[s]``) are the keys of source s that travel: one K/V piece
    (:func:`build_schedule`); block key offsets are then relative to the piece. ``max_rows`` caps
    the query rows of a fused kernel call (see :func:`pair_blocks`). ``docs``: packed document
    boundaries (documents.py); a source no block of a rank needs is neither computed nor sent there.
    """
    P = len(chunks)
    keys = chunks if key_chunks is None else key_chunks
    blocks = tuple(tuple(pair_blocks(chunks[r], keys[s], causal, window, tile, max_rows, docs)
                         for s in range(P))
                   for r in range(P))
    needed = [(r, s) for r in range(P) for s in range(P) if s != r and blocks[r][s]]
    assigned, last = _choose_split(needed, P)
    direction = tuple(tuple(assigned.get((r, s), 0) for s in range(P)) for r in range(P))
    steps = {FWD: max(last[FWD]), BWD: max(last[BWD])}
    return RingPlan(P, blocks, direction, steps, {d: tuple(v) for d, v in last.items()})


@dataclass(frozen=True)
class Piece:
    """One sub-ring: local rows ``rows`` (ranges, in order) of every rank's K/V travel, with their plan.

    The K/V of a piece is the concatenation of those row ranges; block key offsets index into it.
    Fused kernel calls are capped at the piece's row count, so a call's dq is O(piece) too.
    """

    rows: tuple[tuple[int, int], ...]
    plan: RingPlan

    @property
    def length(self) -> int:
        return sum(hi - lo for lo, hi in self.rows)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, n, ...] -> the piece [B, length, ...] (a view when it is one range)."""
        parts = [x[:, lo:hi] for lo, hi in self.rows]
        return parts[0].contiguous() if len(parts) == 1 else torch.cat(parts, 1)

    def accumulator(self, x: torch.Tensor):
        """Something that sums piece-ordered gradients into x[:, rows] in place, holding no copy: a
        view when the piece is one range, else a :class:`RowsView`."""
        if len(self.rows) == 1:
            return x[:, self.rows[0][0]:self.rows[0][1]]
        return RowsView(x, self.rows)


class RowsView:
    """Rows ``rows`` (ranges) of ``dst`` [B, n, ...] seen as one piece-ordered tensor, for in-place sums."""

    def __init__(self, dst: torch.Tensor, rows: tuple[tuple[int, int], ...]):
        self.dst, self.rows = dst, rows

    def add_rows_(self, lo: int, hi: int, grad: torch.Tensor) -> None:
        """piece rows [lo, hi) += grad [B, hi - lo, ...]."""
        off = 0
        for a, b in self.rows:
            s, e = max(lo, off), min(hi, off + b - a)
            if s < e:
                self.dst[:, a + s - off:a + e - off] += grad[:, s - lo:e - lo]
            off += b - a

    def add_(self, grad: torch.Tensor) -> "RowsView":
        self.add_rows_(0, grad.shape[1], grad)
        return self


def piece_rows(chunks: tuple[tuple[Chunk, ...], ...], piece: int) -> list[tuple[tuple[int, int], ...]]:
    """Cut every shard into m = ceil(n / piece) pieces; piece i takes part i of EVERY segment.

    Segments are the local row ranges between the union of all ranks' chunk boundaries (ranks may cut
    their equal-length shards differently: hybrid), so every part is one Chunk on every rank and all
    ranks send equal sizes. Taking a part of every segment keeps the layout's balance inside each
    piece: a zigzag piece holds rows of both the early and the late chunk, so every sub-ring step
    costs every rank the same, like the whole-shard ring. A segment shorter than m leaves some parts
    empty; a piece whose parts are all empty is dropped (fewer, larger pieces).
    """
    n = sum(c.length for c in chunks[0])
    cuts = {0, n}
    for rank_chunks in chunks:
        off = 0
        for c in rank_chunks:
            off += c.length
            cuts.add(off)
    cuts = sorted(cuts)
    m = -(-n // piece)
    out = []
    for i in range(m):
        rows = tuple((a + (b - a) * i // m, a + (b - a) * (i + 1) // m) for a, b in zip(cuts, cuts[1:]))
        rows = tuple(r for r in rows if r[1] > r[0])
        if rows:
            out.append(rows)
    return out


def _rows(chunks: tuple[Chunk, ...], lo: int, hi: int) -> Chunk:
    """The single Chunk holding local rows [lo, hi) (they never straddle two chunks)."""
    off = 0
    for c in chunks:
        if off <= lo and hi <= off + c.length:
            return Chunk(c.start + c.stride * (lo - off), c.stride, hi - lo)
        off += c.length
    raise AssertionError(f"rows [{lo}, {hi}) straddle chunks {chunks}")


@functools.lru_cache(maxsize=64)
def build_schedule(chunks: tuple[tuple[Chunk, ...], ...], causal: bool, window: Optional[int],
                   tile: Optional[int] = None, piece: Optional[int] = None,
                   docs: Optional[Docs] = None) -> tuple[Piece, ...]:
    """The ring as a sequence of sub-rings, one per K/V piece of about ``piece`` rows.

    ``piece=None`` (or >= the shard) is the classic ring: one piece, whole K/V blocks travel. With
    pieces, every buffer the ring adds (K/V in flight, travelling dK/dV, block gradients) is O(piece)
    instead of O(S/P); queries are cut at the same parts so causal diagonals stay on the kernels'
    fast path and each call's dq stays O(piece) too. A piece nobody attends to is dropped.
    ``docs``: packed document boundaries (documents.py).
    """
    n = sum(c.length for c in chunks[0])
    if piece is None or piece >= n:
        return (Piece(((0, n),), build_plan(chunks, causal, window, tile, docs=docs)),)
    if piece < 1:
        raise ValueError(f"piece={piece} must be a positive number of tokens (or None)")
    pieces = piece_rows(chunks, piece)
    parts = sorted(r for rows in pieces for r in rows)               # every part, in local row order
    q = tuple(tuple(_rows(chunks[r], lo, hi) for lo, hi in parts) for r in range(len(chunks)))
    out = []
    for rows in pieces:
        keys = tuple(tuple(_rows(chunks[r], lo, hi) for lo, hi in rows) for r in range(len(chunks)))
        plan = build_plan(q, causal, window, tile, keys, sum(b - a for a, b in rows), docs)
        if any(b for per_rank in plan.blocks for b in per_rank):
            out.append(Piece(rows, plan))
    return tuple(out) or build_schedule(chunks, causal, window, tile, None, docs)

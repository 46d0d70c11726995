"""Halo exchange: ``torch.roll`` of a tiled image, moving only the strips and corners that cross tiles.

A roll by ``-(dh, dw)`` gives the rank holding tile rows [a, b) × cols [c, d) the source pixels
rows [a+dh, b+dh) × cols [c+dw, d+dw) (mod H, W). With |dh|, |dw| at most a tile's size, those come
from this tile and its neighbours below, right and below-right: for a shift (sh, sw) a rank receives
``sh·w + sw·h − sh·sw`` tokens (two strips and a corner) and sends as many of its own. Pieces from
the same peer travel in ONE message (packed in a canonical order both sides compute); pieces whose
source is the rank itself (a grid of 1 along an axis) are local copies and never sent.

Backward of the roll is the roll by the opposite offset (a permutation's adjoint is its inverse),
i.e. the halo gradients go back to the ranks that own those pixels and land in their tile.

Byte counters (:func:`halo_stats`) record every byte this process sends, so tests and benchmarks can
assert them against the formula exactly.
"""
from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from .layout import TileLayout

# Counters of what this process sent through halo exchanges (not process-group state: plain numbers).
_STATS = {"bytes_sent": 0, "bytes_received": 0, "messages_sent": 0}


def halo_stats() -> dict[str, int]:
    """Bytes/messages this process has sent and received in halo exchanges since the last reset."""
    return dict(_STATS)


def reset_halo_stats() -> None:
    for key in _STATS:
        _STATS[key] = 0


def halo_tokens(h: int, w: int, sh: int, sw: int) -> int:
    """Tokens a rank with an h×w tile sends (and receives) for a roll by (sh, sw): two strips and a corner.

    Pass sh=0 (sw=0) for an axis with a grid of 1, where the roll along that axis is a local copy.
    """
    return sh * w + sw * h - sh * sw


Slices = tuple[slice, slice]


@dataclass(frozen=True)
class HaloPlan:
    """What one rank copies, sends and receives for one roll.

    ``local``: (src rows, src cols, dst rows, dst cols) copied within this rank (tile → rolled tile).
    ``sends[peer]``: slices of this rank's tile sent to ``peer``, in the canonical order.
    ``recvs[peer]``: slices of this rank's rolled tile filled from ``peer``, in the same order.
    """

    shape: tuple[int, int]
    local: tuple[tuple[slice, slice, slice, slice], ...]
    sends: tuple[tuple[int, tuple[Slices, ...]], ...]
    recvs: tuple[tuple[int, tuple[Slices, ...]], ...]

    def transpose(self) -> "HaloPlan":
        """The plan of the inverse roll (the adjoint): every piece travels back to where it came from."""
        return HaloPlan(self.shape, tuple((a, b, c, d_) for c, d_, a, b in self.local), self.recvs, self.sends)


def _axis_segments(bounds: tuple[int, ...], tile: int, offset: int) -> list[tuple[int, int, int, int]]:
    """Where the rolled tile ``tile`` gets its positions along one axis.

    Returns (source tile, start in source tile, length, start in destination tile) for the positions
    [bounds[tile] + offset, bounds[tile+1] + offset) mod N, cut at tile boundaries and at the wrap.
    """
    size = bounds[-1]
    start, stop = bounds[tile], bounds[tile + 1]
    out = []
    t = 0
    while t < stop - start:
        g = (start + t + offset) % size
        src = bisect.bisect_right(bounds, g) - 1
        length = min(stop - start - t, bounds[src + 1] - g)
        out.append((src, g - bounds[src], length, t))
        t += length
    return out


@functools.lru_cache(maxsize=256)
def make_plan(layout: TileLayout, rank: int, offset: tuple[int, int]) -> HaloPlan:
    """Plan of ``rank`` for the roll ``rolled[r, c] = image[(r + dh) % H, (c + dw) % W]``."""
    gh, gw = layout.grid
    me = layout.coords(rank)
    dh, dw = offset

    def pieces_of(i: int, j: int):
        for si, sr0, nr, dr0 in _axis_segments(layout.row_bounds, i, dh):
            for sj, sc0, nc, dc0 in _axis_segments(layout.col_bounds, j, dw):
                yield (si, sj), (slice(sr0, sr0 + nr), slice(sc0, sc0 + nc)), (slice(dr0, dr0 + nr), slice(dc0, dc0 + nc))

    local, recvs = [], {}
    for src, src_sl, dst_sl in pieces_of(*me):
        if src == me:
            local.append((*src_sl, *dst_sl))
        else:
            recvs.setdefault(layout.rank_of(*src), []).append(dst_sl)
    sends = {}
    for i in range(gh):
        for j in range(gw):
            if (i, j) == me:
                continue
            for src, src_sl, _ in pieces_of(i, j):
                if src == me:
                    sends.setdefault(layout.rank_of(i, j), []).append(src_sl)
    return HaloPlan(layout.tile_shape(rank), tuple(local),
                    tuple((p, tuple(v)) for p, v in sorted(sends.items())),
                    tuple((p, tuple(v)) for p, v in sorted(recvs.items())))


def _numel(sl: Slices) -> int:
    return (sl[0].stop - sl[0].start) * (sl[1].stop - sl[1].start)


def _peer(group: Optional[dist.ProcessGroup], peer: int) -> int:
    return peer if group is None else dist.get_global_rank(group, peer)


class PendingHalo:
    """Posted receives/sends of one exchange; :meth:`wait` returns the received pieces per peer."""

    def __init__(self, plan: HaloPlan, x: torch.Tensor, group: Optional[dist.ProcessGroup]):
        self.plan = plan
        self.lead, self.rest = x.shape[:1], x.shape[3:]
        per_token = x.shape[0] * x[0, 0, 0].numel()
        self.works, self.buffers = [], []
        # Post every receive before any send so no rank waits on an unposted receive.
        for peer, pieces in plan.recvs:
            buf = torch.empty(per_token * sum(_numel(s) for s in pieces), dtype=x.dtype, device=x.device)
            self.buffers.append(buf)
            self.works.append(dist.irecv(buf, src=_peer(group, peer), group=group))
            _STATS["bytes_received"] += buf.numel() * buf.element_size()
        for peer, pieces in plan.sends:
            packed = torch.cat([x[:, r, c].reshape(-1) for r, c in pieces])
            self.works.append(dist.isend(packed, dst=_peer(group, peer), group=group))
            self.buffers.append(packed)  # keep it alive until the send completes
            _STATS["bytes_sent"] += packed.numel() * packed.element_size()
            _STATS["messages_sent"] += 1

    def wait(self) -> list[tuple[Slices, torch.Tensor]]:
        """Block until done; returns (destination slices, piece [B, ph, pw, ...]) for every received piece."""
        for work in self.works:
            work.wait()
        out = []
        for (_, pieces), buf in zip(self.plan.recvs, self.buffers):
            at = 0
            for sl in pieces:
                n = _numel(sl) * self.lead.numel() * self.rest.numel()
                shape = (*self.lead, sl[0].stop - sl[0].start, sl[1].stop - sl[1].start, *self.rest)
                out.append((sl, buf[at:at + n].view(shape)))
                at += n
        return out


def assemble(plan: HaloPlan, x: torch.Tensor, received: list[tuple[Slices, torch.Tensor]]) -> torch.Tensor:
    """Rolled tile from this rank's tile ``x`` [B, h, w, ...] and the received pieces (differentiable)."""
    out = x.new_empty((x.shape[0], *plan.shape, *x.shape[3:]))
    for sr, sc, dr, dc in plan.local:
        out[:, dr, dc] = x[:, sr, sc]
    for (dr, dc), piece in received:
        out[:, dr, dc] = piece
    return out


def roll_tiles(plan: HaloPlan, x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Blocking distributed roll of the tile ``x`` [B, h, w, ...] following ``plan`` (no autograd)."""
    return assemble(plan, x, PendingHalo(plan, x, group).wait())


class HaloRoll(torch.autograd.Function):
    """Differentiable distributed roll: forward follows ``plan``, backward its transpose (the inverse roll)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, plan: HaloPlan, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
        ctx.plan, ctx.group = plan, group
        return roll_tiles(plan, x.contiguous(), group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return roll_tiles(ctx.plan.transpose(), grad.contiguous(), ctx.group), None, None


def halo_roll(x: torch.Tensor, layout: TileLayout, rank: int, shift: tuple[int, int],
              group: Optional[dist.ProcessGroup], inverse: bool = False) -> torch.Tensor:
    """``torch.roll(image, -shift, (1, 2))`` (or ``+shift`` when ``inverse``) on this rank's tile [B, h, w, ...]."""
    sign = -1 if inverse else 1
    return HaloRoll.apply(x, make_plan(layout, rank, (sign * shift[0], sign * shift[1])), group)

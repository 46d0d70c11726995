"""Ulysses inside windows: trade a cp rank's share of a tile's tokens for all of the tile's tokens on heads/cp heads.

The cp ranks of one window-parallel tile split the tile's token ROWS (:func:`share_rows`): cp rank c holds
rows [Σ_{c'<c} n_c', Σ_{c'≤c} n_c') of the tile, all columns. Per-token work (embedding, qkv, MLP) runs on the
share; before window attention :func:`shares_to_heads` (one all-to-all over the cp group) gives every cp rank
ALL tokens of the tile for its head slice [c·H/G, (c+1)·H/G), so attention runs on complete windows whatever
the split; :func:`heads_to_shares` is the inverse. Shares may differ in size (a tile whose rows do not divide
by cp): the exchange is an all-to-all with per-rank split sizes, so no padding travels and nothing is
approximated.

Counters (:func:`ulysses_stats`) record every all-to-all call and the bytes sent to OTHER ranks, so tests
and benchmarks can assert them against the formula exactly.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

from .layout import split_counts

# Counters of this process's all-to-alls (plain numbers, not process-group state).
_STATS = {"calls": 0, "bytes_sent": 0}


def ulysses_stats() -> dict[str, int]:
    """All-to-all calls and bytes sent to other ranks by this process since the last reset."""
    return dict(_STATS)


def reset_ulysses_stats() -> None:
    for key in _STATS:
        _STATS[key] = 0


def share_rows(tile_rows: int, cp: int, *, what: str = "the tile") -> list[int]:
    """Token rows of a tile held by each of ``cp`` ranks: as even as possible, earlier ranks take the extra row.

    When the tile's window rows divide by cp this is exactly whole window rows per rank. Otherwise balance
    wins over window alignment: Ulysses hands every rank complete windows anyway, so alignment buys the
    attention nothing, while the per-token work and the all-to-all sizes follow the row counts.
    ValueError when a rank would get no row (``tile_rows < cp``).
    """
    if cp < 1:
        raise ValueError(f"cp = {cp}: must be >= 1")
    if tile_rows < cp:
        raise ValueError(f"cp = {cp} splits the token rows of each tile over the cp ranks, but {what} has only "
                         f"{tile_rows} token rows: use cp <= {tile_rows}, or taller tiles (fewer wp grid rows, "
                         "a larger image or a smaller patch)")
    return split_counts(tile_rows, cp)


def _exchange(x: torch.Tensor, send: Sequence[int], recv: Sequence[int],
              group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """all_to_all_single of x [Σ send, F] → [Σ recv, F]: rows [Σ send[:g], Σ send[:g+1]) go to rank g."""
    x = x.contiguous()
    out = x.new_empty((sum(recv), *x.shape[1:]))
    dist.all_to_all_single(out, x, list(recv), list(send), group=group)
    me = dist.get_rank(group)
    row_bytes = x[0].numel() * x.element_size() if x.shape[0] else 0
    _STATS["calls"] += 1
    _STATS["bytes_sent"] += (sum(send) - send[me]) * row_bytes
    return out


class _AllToAllV(torch.autograd.Function):
    """Uneven all-to-all over dim 0; its adjoint is the exchange with send and receive splits swapped."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send: tuple[int, ...], recv: tuple[int, ...],
                group: Optional[dist.ProcessGroup]) -> torch.Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        return _exchange(x, send, recv, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _exchange(grad, ctx.recv, ctx.send, ctx.group), None, None, None


def _check(counts: Sequence[int], heads: int, group: Optional[dist.ProcessGroup]) -> tuple[int, int]:
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    if len(counts) != size:
        raise ValueError(f"{len(counts)} share sizes given for a cp group of {size} ranks")
    if heads % size:
        raise ValueError(f"{heads} heads are not divisible by the cp group size {size} (Ulysses gives each cp "
                         "rank heads/cp heads)")
    return rank, size


def shares_to_heads(x: torch.Tensor, counts: Sequence[int], group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """[B, n_r, H, D] this rank's share → [B, Σ n, H/G, D]: every rank's share (in group-rank order) for this
    rank's head slice [r·H/G, (r+1)·H/G). ``counts[g]`` = tokens of rank g's share. Differentiable."""
    if dist.get_world_size(group) == 1:
        return x
    b, n, h, d = x.shape
    rank, g = _check(counts, h, group)
    if n != counts[rank]:
        raise ValueError(f"share of {n} tokens on cp rank {rank}, but counts say {counts[rank]} ({list(counts)})")
    hg = h // g
    parts = x.reshape(b, n, g, hg, d).permute(2, 0, 1, 3, 4).reshape(g * b * n, hg * d)  # [dest, B, n] rows
    out = _AllToAllV.apply(parts, (b * n,) * g, tuple(b * c for c in counts), group)       # [src, B, n_src] rows
    return torch.cat([t.reshape(b, c, hg, d) for t, c in zip(out.split([b * c for c in counts]), counts)], dim=1)


def heads_to_shares(y: torch.Tensor, counts: Sequence[int], group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Inverse of :func:`shares_to_heads`: [B, Σ n, H/G, D] → [B, n_r, H, D]. Differentiable."""
    g = dist.get_world_size(group)
    if g == 1:
        return y
    b, total, hg, d = y.shape
    rank, _ = _check(counts, hg * g, group)
    if total != sum(counts):
        raise ValueError(f"{total} tokens given, but the shares {list(counts)} add up to {sum(counts)}")
    n = counts[rank]
    parts = torch.cat([t.reshape(b * c, hg * d) for t, c in zip(y.split(list(counts), dim=1), counts)])
    out = _AllToAllV.apply(parts, tuple(b * c for c in counts), (b * n,) * g, group)        # [src heads, B, n]
    return out.reshape(g, b, n, hg, d).permute(1, 2, 0, 3, 4).reshape(b, n, g * hg, d)

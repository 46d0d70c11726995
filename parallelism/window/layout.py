"""Tile layout: which rows and columns of an H×W image each rank of a gh×gw grid holds.

Tiles are aligned to the *unshifted* window grid. The H/wh window rows are split over the gh grid
rows as evenly as possible, earlier grid rows taking the extra one (5 window rows on 2 ranks →
3 + 2 → 3·wh + 2·wh pixel rows); columns likewise. Group rank ``i·gw + j`` holds tile (i, j).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

IntPair = Union[int, Sequence[int]]


def as_pair(value: IntPair, name: str) -> tuple[int, int]:
    """``4`` → ``(4, 4)``; ``(3, 5)`` → ``(3, 5)``; anything else → ValueError naming ``name``."""
    if isinstance(value, int):
        return (value, value)
    try:
        pair = tuple(int(v) for v in value)
    except TypeError as exc:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}") from exc
    if len(pair) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r} ({len(pair)} values)")
    return pair  # type: ignore[return-value]


def split_counts(total: int, parts: int) -> list[int]:
    """Split ``total`` items into ``parts`` counts as evenly as possible, earlier parts larger."""
    base, extra = divmod(total, parts)
    return [base + (1 if p < extra else 0) for p in range(parts)]


def _bounds(counts: Sequence[int], unit: int) -> tuple[int, ...]:
    out = [0]
    for c in counts:
        out.append(out[-1] + c * unit)
    return tuple(out)


@dataclass(frozen=True)
class TileLayout:
    """Row/column bounds of every tile of an image.

    ``row_bounds`` has gh+1 entries: grid row i holds pixel rows [row_bounds[i], row_bounds[i+1]).
    ``col_bounds`` likewise for columns. ``ranks[i][j]`` is the group rank holding tile (i, j).
    """

    height: int
    width: int
    row_bounds: tuple[int, ...]
    col_bounds: tuple[int, ...]

    @property
    def grid(self) -> tuple[int, int]:
        return (len(self.row_bounds) - 1, len(self.col_bounds) - 1)

    @property
    def world_size(self) -> int:
        gh, gw = self.grid
        return gh * gw

    @classmethod
    def build(cls, height: int, width: int, grid: IntPair, window: IntPair) -> "TileLayout":
        """Window-aligned layout of an ``height × width`` image over ``grid`` (ValueError on bad input)."""
        gh, gw = as_pair(grid, "grid")
        wh, ww = as_pair(window, "window")
        if gh < 1 or gw < 1:
            raise ValueError(f"grid must be positive, got {(gh, gw)}")
        if wh < 1 or ww < 1:
            raise ValueError(f"window must be positive, got {(wh, ww)}")
        for size, win, axis in ((height, wh, "H"), (width, ww, "W")):
            if size % win != 0:
                raise ValueError(f"image {axis}={size} is not a multiple of the window {win} along {axis}; "
                                 f"pad it to {-(-size // win) * win} (the Swin model pads for you)")
        nh, nw = height // wh, width // ww
        if nh < gh or nw < gw:
            raise ValueError(f"image {height}x{width} has {nh}x{nw} windows of {wh}x{ww}, fewer than the grid "
                             f"{gh}x{gw}: every tile needs at least one window row and column")
        return cls(height, width, _bounds(split_counts(nh, gh), wh), _bounds(split_counts(nw, gw), ww))

    def coords(self, rank: int) -> tuple[int, int]:
        """Grid coordinates (i, j) of group rank ``rank``."""
        gh, gw = self.grid
        if not 0 <= rank < gh * gw:
            raise ValueError(f"rank {rank} is outside the grid {gh}x{gw} (valid: 0..{gh * gw - 1})")
        return divmod(rank, gw)

    def rank_of(self, i: int, j: int) -> int:
        return i * self.grid[1] + j

    def tile(self, rank: int) -> tuple[slice, slice]:
        """Global (rows, cols) slices of ``rank``'s tile."""
        i, j = self.coords(rank)
        return (slice(self.row_bounds[i], self.row_bounds[i + 1]), slice(self.col_bounds[j], self.col_bounds[j + 1]))

    def tile_shape(self, rank: int) -> tuple[int, int]:
        rows, cols = self.tile(rank)
        return (rows.stop - rows.start, cols.stop - cols.start)

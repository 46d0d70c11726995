"""Window partition, Swin masks from global coordinates, relative position bias, local window attention.

Everything here works on a *rolled* tile: a window-aligned block of the image after
``torch.roll(image, -shift)``, so windows are plain non-overlapping wh×ww blocks of the tile.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from ..host_copy import to_device


def window_partition(x: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """[B, h, w, *rest] → [B, h/wh, w/ww, wh·ww, *rest] (tokens of each window in row-major order)."""
    b, h, w = x.shape[:3]
    wh, ww = window
    rest = x.shape[3:]
    x = x.reshape(b, h // wh, wh, w // ww, ww, *rest).transpose(2, 3)
    return x.reshape(b, h // wh, w // ww, wh * ww, *rest)


def window_merge(x: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`window_partition`: [B, nh, nw, wh·ww, *rest] → [B, nh·wh, nw·ww, *rest]."""
    b, nh, nw = x.shape[:3]
    wh, ww = window
    rest = x.shape[4:]
    x = x.reshape(b, nh, nw, wh, ww, *rest).transpose(2, 3)
    return x.reshape(b, nh * wh, nw * ww, *rest)


@functools.lru_cache(maxsize=32)
def relative_position_index(window: tuple[int, int]) -> torch.Tensor:
    """[N, N] index into a flattened [2wh−1, 2ww−1] bias table for in-window offsets (query − key), as Swin."""
    wh, ww = window
    r = torch.arange(wh).repeat_interleave(ww)
    c = torch.arange(ww).repeat(wh)
    dr = r[:, None] - r[None, :] + wh - 1
    dc = c[:, None] - c[None, :] + ww - 1
    return dr * (2 * ww - 1) + dc


def check_bias(bias: Optional[torch.Tensor], heads: int, window: tuple[int, int]) -> None:
    """ValueError unless ``bias`` is None or the table [heads, 2wh−1, 2ww−1] for ``heads`` heads."""
    wh, ww = window
    if bias is not None and tuple(bias.shape) != (heads, 2 * wh - 1, 2 * ww - 1):
        raise ValueError(f"bias must have shape [heads={heads}, {2 * wh - 1}, {2 * ww - 1}] for window {window}, "
                         f"got {list(bias.shape)}")


@functools.lru_cache(maxsize=32)
def _relative_position_index_on(window: tuple[int, int], device: torch.device) -> torch.Tensor:
    """:func:`relative_position_index` on ``device``, copied there once (not by every layer of every step)."""
    return to_device(relative_position_index(window), device)


def bias_matrix(bias: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """Relative position bias table [heads, 2wh−1, 2ww−1] → per-window bias [heads, N, N]. The table is its one
    caller's, :func:`window_attention`, which has checked its shape (:func:`check_bias`, with the head count)."""
    heads = bias.shape[0]
    return bias.reshape(heads, -1)[:, _relative_position_index_on(window, bias.device)]


def wrap_flags(start: int, length: int, shift: int, size: int, wrap: bool,
               device: torch.device | str = "cpu") -> Optional[torch.Tensor]:
    """Per position of a rolled axis, whether its source pixel came through the roll's wrap-around.

    ``start`` is the GLOBAL rolled coordinate of the tile's first position (a local one is exactly the
    classic bug). Two tokens that differ in this flag only meet through the wrap; on a non-periodic
    axis (``wrap=False``) Swin masks them. None when nothing needs masking along this axis. Built on ``device``
    (the attention's: no host-to-device copy).
    """
    if wrap or shift == 0 or start + length + shift <= size:
        return None
    return (torch.arange(start, start + length, device=device) + shift) >= size


def region_labels(row_flags: Optional[torch.Tensor], col_flags: Optional[torch.Tensor],
                  h: int, w: int) -> Optional[torch.Tensor]:
    """[h, w] int labels: tokens attend only to tokens with the same label (None: all the same); on the flags'
    device."""
    if row_flags is None and col_flags is None:
        return None
    device = (row_flags if row_flags is not None else col_flags).device
    rows = row_flags.long() if row_flags is not None else torch.zeros(h, dtype=torch.long, device=device)
    cols = col_flags.long() if col_flags is not None else torch.zeros(w, dtype=torch.long, device=device)
    return rows[:, None] * 2 + cols[None, :]


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: tuple[int, int],
                     labels: Optional[torch.Tensor] = None, key_valid: Optional[torch.Tensor] = None,
                     bias: Optional[torch.Tensor] = None, scale: float) -> torch.Tensor:
    """Non-causal attention inside every wh×ww window of a rolled tile.

    q, k, v: [B, h, w, heads, D]; labels: [h, w] region labels (pairs with different labels are masked);
    key_valid: [h, w] bool, False for padding — a real query never attends to a padded key (a padded
    query may, so no row is ever fully masked); bias: [heads, 2wh−1, 2ww−1]. Returns [B, h, w, heads, D].
    ``labels`` and ``key_valid`` may be host tensors (built from layout integers): they are copied to q's device
    (:func:`~parallelism.host_copy.to_device`), since a CUDA ``masked_fill`` refuses a CPU mask.
    """
    check_bias(bias, q.shape[3], window)
    labels, key_valid = (None if m is None else to_device(m, q.device) for m in (labels, key_valid))
    qw, kw, vw = (window_partition(t, window).movedim(-2, 3) for t in (q, k, v))  # [B, nh, nw, heads, N, D]
    scores = torch.matmul(qw, kw.transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias_matrix(bias, window).to(scores.dtype)
    mask = None
    if labels is not None:
        lw = window_partition(labels[None], window)[0]  # [nh, nw, N]
        mask = lw[..., :, None] != lw[..., None, :]
    if key_valid is not None:
        vw_ = window_partition(key_valid[None], window)[0]
        pad = vw_[..., :, None] & ~vw_[..., None, :]
        mask = pad if mask is None else (mask | pad)
    if mask is not None:
        scores = scores.masked_fill(mask[None, :, :, None], float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), vw)
    return window_merge(out.movedim(3, -2), window)

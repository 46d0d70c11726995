"""Window-parallel Swin attention: the distributed autograd function and the public entry points.

Each rank holds a window-aligned tile of q, k and v. Forward: post the halo exchange of the packed
[q|k|v] (the roll by −shift), compute the windows that lie entirely in this rank's own pixels while
the strips are in flight, then the boundary windows (last window row and column of the rolled tile),
then roll the output back by +shift (one more halo exchange). Backward mirrors it: roll the output
gradient by −shift, backpropagate through the local windows, and send the gradients of the received
halo pieces back to their owners, which add them into their tile's gradient.

With ``wrap=False`` the last grid row/column still receives the rows/columns that come through the
roll's wrap-around: those tokens form their own sub-window (Swin's mask separates them from the
others, not from each other), and their outputs ARE the outputs of the image's first ``shift``
rows/columns. Sending them keeps every rank's traffic identical (the formula) and the compute
balanced; not sending them would make the first tile compute extra partial windows instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist

from .halo import HaloPlan, PendingHalo, assemble, make_plan, roll_tiles
from .layout import IntPair, TileLayout, as_pair
from .windows import check_bias, region_labels, window_attention, wrap_flags


def group_rank_size(group: Optional[dist.ProcessGroup]) -> tuple[int, int]:
    """(rank, size) in ``group``; (0, 1) when torch.distributed is not initialised and group is None."""
    if group is None and not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def check_shift(shift: IntPair, window: tuple[int, int]) -> tuple[int, int]:
    sh, sw = as_pair(shift, "shift")
    if not (0 <= sh < window[0] and 0 <= sw < window[1]):
        raise ValueError(f"shift {(sh, sw)} must satisfy 0 <= shift < window {window} on each axis")
    return sh, sw


def _as_wrap(wrap: Union[bool, Sequence[bool]]) -> tuple[bool, bool]:
    if isinstance(wrap, bool):
        return (wrap, wrap)
    pair = tuple(bool(w) for w in wrap)
    if len(pair) != 2:
        raise ValueError(f"wrap must be a bool or a pair of bools, got {wrap!r}")
    return pair  # type: ignore[return-value]


def gather_layout(h: int, w: int, *, grid: tuple[int, int], window: tuple[int, int],
                  group: Optional[dist.ProcessGroup], device: torch.device) -> tuple[TileLayout, int]:
    """Layout of the whole image from every rank's tile shape (one tiny all-gather on ``device``, the tiles' device:
    NCCL gathers CUDA tensors only); validates the tiling."""
    rank, size = group_rank_size(group)
    gh, gw = grid
    if size != gh * gw:
        raise ValueError(f"grid {gh}x{gw} needs {gh * gw} ranks in the group, got {size}")
    shapes = [(h, w)]
    if size > 1:
        gathered = [torch.zeros(2, dtype=torch.long, device=device) for _ in range(size)]
        dist.all_gather(gathered, torch.tensor([h, w], dtype=torch.long, device=device), group=group)
        shapes = [tuple(int(v) for v in t) for t in gathered]
    heights = [shapes[i * gw][0] for i in range(gh)]
    widths = [shapes[j][1] for j in range(gw)]
    layout = TileLayout.build(sum(heights), sum(widths), grid, window)
    expected = [layout.tile_shape(r) for r in range(size)]
    if shapes != expected:
        raise ValueError(f"tile shapes {shapes} (by rank) do not match the window-aligned layout of a "
                         f"{layout.height}x{layout.width} image on grid {gh}x{gw}: expected {expected}")
    return layout, rank


@dataclass(frozen=True)
class WindowSpec:
    """Everything but the tensors: layout, this rank, window/shift/wrap, scale and the group."""

    layout: TileLayout
    rank: int
    window: tuple[int, int]
    shift: tuple[int, int]
    wrap: tuple[bool, bool]
    scale: float
    group: Optional[dist.ProcessGroup]

    def labels(self, device: torch.device | str = "cpu") -> Optional[torch.Tensor]:
        """[h, w] Swin region labels of this rank's rolled tile, from GLOBAL rolled coordinates, on ``device``."""
        rows, cols = self.layout.tile(self.rank)
        h, w = rows.stop - rows.start, cols.stop - cols.start
        return region_labels(wrap_flags(rows.start, h, self.shift[0], self.layout.height, self.wrap[0], device),
                             wrap_flags(cols.start, w, self.shift[1], self.layout.width, self.wrap[1], device), h, w)


def _attend(x: torch.Tensor, labels: Optional[torch.Tensor], bias: Optional[torch.Tensor],
            spec: WindowSpec) -> torch.Tensor:
    """Window attention on a rolled [B, h, w, 3, heads, D] block of packed q|k|v."""
    return window_attention(x.select(3, 0), x.select(3, 1), x.select(3, 2), window=spec.window,
                            labels=labels, bias=bias, scale=spec.scale)


class WindowParallelAttention(torch.autograd.Function):
    """out = roll(+s)(window_attention(roll(−s)(q|k|v))) on tiles; see the module docstring."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
                spec: WindowSpec) -> torch.Tensor:
        qkv = torch.stack([q, k, v], dim=3).contiguous()  # one message per neighbour for all three
        plan = make_plan(spec.layout, spec.rank, spec.shift)
        pending = PendingHalo(plan, qkv, spec.group)
        b, h, w = qkv.shape[:3]
        sh, sw = spec.shift
        wh, ww = spec.window
        # The windows of the rolled tile whose pixels are all this rank's own: computed while in flight.
        hi, wi = (h - sh) // wh * wh, (w - sw) // ww * ww
        labels = spec.labels(qkv.device)
        lab = (lambda r, c: None) if labels is None else (lambda r, c: labels[r, c])
        with torch.enable_grad():
            x = qkv.detach().requires_grad_(q.requires_grad or k.requires_grad or v.requires_grad)
            bias_d = None if bias is None else bias.detach().requires_grad_(bias.requires_grad)
            o_int = _attend(x[:, sh:sh + hi, sw:sw + wi], lab(slice(0, hi), slice(0, wi)), bias_d, spec)
            received = [(sl, piece.detach().requires_grad_(x.requires_grad)) for sl, piece in pending.wait()]
            rolled = assemble(plan, x, received)
            top = o_int
            if wi < w and hi > 0:
                o_right = _attend(rolled[:, :hi, wi:], lab(slice(0, hi), slice(wi, w)), bias_d, spec)
                top = torch.cat([o_int, o_right], dim=2)
            out_rolled = top
            if hi < h:
                o_bottom = _attend(rolled[:, hi:], lab(slice(hi, h), slice(0, w)), bias_d, spec)
                out_rolled = torch.cat([top, o_bottom], dim=1) if hi > 0 else o_bottom
        ctx.spec, ctx.plan = spec, plan
        ctx.graph = (out_rolled, x, received, bias_d)
        return roll_tiles(plan.transpose(), out_rolled.detach(), spec.group)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        spec: WindowSpec = ctx.spec
        plan: HaloPlan = ctx.plan
        out_rolled, x, received, bias_d = ctx.graph
        del ctx.graph
        grad_rolled = roll_tiles(plan, grad_out.contiguous(), spec.group)
        inputs = [t for t in [x] + [p for _, p in received] + [bias_d] if t is not None and t.requires_grad]
        grads = dict(zip(map(id, inputs), torch.autograd.grad(out_rolled, inputs, grad_rolled, allow_unused=True)))
        grad_q = grad_k = grad_v = None
        if x.requires_grad:
            gx = grads[id(x)]
            gx = torch.zeros_like(x) if gx is None else gx
            # Halo gradients: place each received piece's gradient where it sat in the rolled tile and
            # send it back along the transposed plan; the owner adds it into its own tile's gradient.
            halo_grad = torch.zeros_like(x)
            for (dr, dc), piece in received:
                g = grads[id(piece)]
                if g is not None:
                    halo_grad[:, dr, dc] = g
            back = PendingHalo(plan.transpose(), halo_grad, spec.group).wait()
            for (r, c), g in back:
                gx[:, r, c] += g
            grad_q, grad_k, grad_v = gx.unbind(3)
        grad_bias = grads.get(id(bias_d)) if bias_d is not None and bias_d.requires_grad else None
        return grad_q, grad_k, grad_v, grad_bias, None


def window_parallel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: IntPair,
                              shift: IntPair = 0, grid: IntPair, group: Optional[dist.ProcessGroup],
                              wrap: Union[bool, Sequence[bool]] = (False, False),
                              bias: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                              cu_seqlens: None = None) -> torch.Tensor:
    """Swin (shifted) window attention on window-aligned tiles spread over a gh×gw grid of ranks.

    q, k, v: this rank's tiles [B, h, w, heads, D] (group rank i·gw + j holds tile (i, j), see
    :class:`TileLayout`); bias: relative position bias [heads, 2wh−1, 2ww−1] (replicated; its gradient
    here is this rank's contribution); scale defaults to D**−0.5. Returns [B, h, w, heads, D] equal up to
    rounding to ``roll(+s)(windows(roll(−s)(image)))`` on the full image, with Swin's mask on the axes
    where ``wrap`` is False. Differentiable in q, k, v and bias. ``cu_seqlens`` (packed documents,
    as in ``context_parallel_attention``) is refused: an image has no documents.
    """
    if cu_seqlens is not None:
        raise ValueError("cu_seqlens (packed documents) is not supported by window_parallel_attention: Swin "
                         "windows tile an image, which has no documents; pass cu_seqlens=None")
    if q.dim() != 5 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must be [B, h, w, heads, D] of one shape, got {list(q.shape)}, "
                         f"{list(k.shape)}, {list(v.shape)}")
    win = as_pair(window, "window")
    grid_ = as_pair(grid, "grid")
    sft = check_shift(shift, win)
    # before any message: a bad table found inside the forward left the posted halo exchange
    # behind and every rank hung instead of raising
    check_bias(bias, q.shape[3], win)
    layout, rank = gather_layout(q.shape[1], q.shape[2], grid=grid_, window=win, group=group, device=q.device)
    spec = WindowSpec(layout, rank, win, sft, _as_wrap(wrap),
                      float(scale) if scale is not None else q.shape[-1] ** -0.5, group)
    return WindowParallelAttention.apply(q, k, v, bias, spec)


class _Unshard(torch.autograd.Function):
    """All-gather of uneven tiles; backward keeps this rank's tile of the gradient (the image is
    replicated, so each rank's tile gradient is its slice of the replicated image's gradient)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layout: TileLayout, rank: int, group: Optional[dist.ProcessGroup]):
        ctx.layout, ctx.rank = layout, rank
        size = layout.world_size
        hmax, wmax = max(layout.tile_shape(r)[0] for r in range(size)), max(layout.tile_shape(r)[1] for r in range(size))
        padded = x.new_zeros((x.shape[0], hmax, wmax, *x.shape[3:]))
        padded[:, :x.shape[1], :x.shape[2]] = x
        tiles = [padded] if size == 1 else [torch.empty_like(padded) for _ in range(size)]
        if size > 1:
            dist.all_gather(tiles, padded, group=group)
        full = x.new_empty((x.shape[0], layout.height, layout.width, *x.shape[3:]))
        for r, t in enumerate(tiles):
            rows, cols = layout.tile(r)
            full[:, rows, cols] = t[:, :rows.stop - rows.start, :cols.stop - cols.start]
        return full

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        rows, cols = ctx.layout.tile(ctx.rank)
        return grad[:, rows, cols], None, None, None


def _to_front(x: torch.Tensor, dims: tuple[int, int]) -> torch.Tensor:
    """Move the two image dims to positions 1, 2 (batch-like leading dim at 0)."""
    if tuple(dims) == (1, 2):
        return x
    d0, d1 = (d % x.dim() for d in dims)
    x = x.movedim((d0, d1), (-2, -1)).unsqueeze(0)  # [1, ..., H, W]
    return x.movedim((-2, -1), (1, 2))


def _from_front(y: torch.Tensor, like: torch.Tensor, dims: tuple[int, int]) -> torch.Tensor:
    if tuple(dims) == (1, 2):
        return y
    d0, d1 = (d % like.dim() for d in dims)
    return y.movedim((1, 2), (-2, -1)).squeeze(0).movedim((-2, -1), (d0, d1))


def shard_image(x: torch.Tensor, *, grid: IntPair, window: IntPair, group: Optional[dist.ProcessGroup],
                dims: tuple[int, int] = (1, 2)) -> torch.Tensor:
    """Full image (identical on all ranks) → this rank's window-aligned tile along ``dims``."""
    grid_, win = as_pair(grid, "grid"), as_pair(window, "window")
    rank, size = group_rank_size(group)
    if size != grid_[0] * grid_[1]:
        raise ValueError(f"grid {grid_} needs {grid_[0] * grid_[1]} ranks in the group, got {size}")
    d0, d1 = (d % x.dim() for d in dims)
    layout = TileLayout.build(x.shape[d0], x.shape[d1], grid_, win)
    rows, cols = layout.tile(rank)
    return x.narrow(d0, rows.start, rows.stop - rows.start).narrow(d1, cols.start, cols.stop - cols.start)


def unshard_image(x_local: torch.Tensor, *, grid: IntPair, window: IntPair, group: Optional[dist.ProcessGroup],
                  dims: tuple[int, int] = (1, 2)) -> torch.Tensor:
    """This rank's tile → the full image on every rank (tiles may be uneven)."""
    grid_, win = as_pair(grid, "grid"), as_pair(window, "window")
    d0, d1 = (d % x_local.dim() for d in dims)
    layout, rank = gather_layout(x_local.shape[d0], x_local.shape[d1], grid=grid_, window=win, group=group,
                                 device=x_local.device)
    front = _to_front(x_local, (d0, d1)).contiguous()
    full = _Unshard.apply(front, layout, rank, group)
    return _from_front(full, x_local, (d0, d1))

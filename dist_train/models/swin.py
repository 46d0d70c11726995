"""Pixel-level Swin encoder–decoder for dense prediction, window-parallel over a gh×gw grid of ranks.

    model = build_swin(model_cfg, wp_group=g, grid=(gh, gw), cp_group=None)
    rows, cols = model.tile_slices((H, W))           # the pixels this rank reads from the dataset
    loss_sum, count = model({"x": [B, h, w, Cin], "y": [B, h, w, Cout], "image_size": (H, W)})

Shapes: the image (H×W pixels) becomes a token grid of ceil(H/p)×ceil(W/p) patches, padded at the
bottom/right to a multiple of the window; tiles are window-aligned on that padded token grid (see
``parallelism.window.TileLayout``), so only the last grid row/column holds padding. Padding happens
BEFORE any roll: a shifted block rolls the padded grid, so padded tokens keep their global position
and are masked out of attention by their global (unrolled) coordinate, and out of the loss.

Each block: roll the block input x [B, h, w, C] once by −shift (halo exchange of C channels: two
strips and a corner), then pre-norm window attention with a relative position bias and a pre-norm MLP
entirely in the rolled frame (both are per-token, so the roll commutes with them), then roll back.
Weights are replicated over wp; the trainer's gradient reduction sums their per-rank contributions.
``cp_group`` of size > 1 is rejected with NotImplementedError for now (see docs/window_parallel.md).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from parallelism.window.attention import group_rank_size
from parallelism.window.halo import halo_roll
from parallelism.window.layout import TileLayout, as_pair
from parallelism.window.windows import region_labels, window_attention, wrap_flags


def token_grid(image_hw: tuple[int, int], patch: int, window: tuple[int, int]) -> tuple[int, int, int, int]:
    """(real token rows, real token cols, padded token rows, padded token cols) of an H×W image."""
    th, tw = -(-image_hw[0] // patch), -(-image_hw[1] // patch)
    return th, tw, -(-th // window[0]) * window[0], -(-tw // window[1]) * window[1]


class WindowBlock(nn.Module):
    """Pre-norm (shifted) window attention + MLP on a rolled tile; relative position bias per head."""

    def __init__(self, d: int, heads: int, ffn: int, window: tuple[int, int], shift: tuple[int, int], eps: float):
        super().__init__()
        self.heads, self.window, self.shift = heads, window, shift
        self.norm1 = nn.LayerNorm(d, eps=eps)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.bias = nn.Parameter(torch.zeros(heads, 2 * window[0] - 1, 2 * window[1] - 1))
        self.norm2 = nn.LayerNorm(d, eps=eps)
        self.fc1 = nn.Linear(d, ffn)
        self.fc2 = nn.Linear(ffn, d)

    def forward(self, x: torch.Tensor, ctx: "_TileContext") -> torch.Tensor:
        """x: this rank's tile [B, h, w, d] (unrolled frame) → same shape."""
        if any(self.shift):
            x = halo_roll(x, ctx.layout, ctx.rank, self.shift, ctx.wp_group)
        labels, key_valid = ctx.masks(self.shift)
        b, h, w, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, h, w, 3, self.heads, d // self.heads).unbind(3)
        o = window_attention(q, k, v, window=self.window, labels=labels, key_valid=key_valid, bias=self.bias,
                             scale=(d // self.heads) ** -0.5)
        x = x + self.proj(o.reshape(b, h, w, d))
        x = x + self.fc2(F.gelu(self.fc1(self.norm2(x))))
        if any(self.shift):
            x = halo_roll(x, ctx.layout, ctx.rank, self.shift, ctx.wp_group, inverse=True)
        return x


class _TileContext:
    """Per-forward facts about this rank's tile: layout, masks from global coordinates, cp shares."""

    def __init__(self, layout: TileLayout, rank: int, real_tokens: tuple[int, int], wrap: tuple[bool, bool],
                 wp_group):
        self.layout, self.rank, self.real, self.wrap, self.wp_group = layout, rank, real_tokens, wrap, wp_group
        self._masks: dict[tuple[int, int], Any] = {}

    def masks(self, shift: tuple[int, int]):
        """(Swin region labels, key_valid) of the rolled tile; both from GLOBAL rolled coordinates."""
        if shift not in self._masks:
            rows, cols = self.layout.tile(self.rank)
            h, w = rows.stop - rows.start, cols.stop - cols.start
            labels = region_labels(wrap_flags(rows.start, h, shift[0], self.layout.height, self.wrap[0]),
                                   wrap_flags(cols.start, w, shift[1], self.layout.width, self.wrap[1]), h, w)
            src_r = (torch.arange(rows.start, rows.stop) + shift[0]) % self.layout.height  # unrolled position
            src_c = (torch.arange(cols.start, cols.stop) + shift[1]) % self.layout.width
            valid = (src_r < self.real[0])[:, None] & (src_c < self.real[1])[None, :]
            self._masks[shift] = (labels, None if bool(valid.all()) else valid)
        return self._masks[shift]


class SwinModel(nn.Module):
    """Patch embedding → n_layers alternating plain/shifted window blocks → pixel decoder head."""

    def __init__(self, cfg: Any, *, wp_group, grid: tuple[int, int], cp_group=None):
        super().__init__()
        self.patch = int(cfg.patch_size)
        self.window = as_pair(cfg.window, "model.window")
        self.grid = as_pair(grid, "grid")
        wrap = getattr(cfg, "wrap", (False, False))  # periodic axes (a torus: longitude on a global grid)
        self.wrap = (bool(wrap), bool(wrap)) if isinstance(wrap, bool) else (bool(wrap[0]), bool(wrap[1]))
        self.wp_group, self.cp_group = wp_group, cp_group
        d, heads = int(cfg.d_model), int(cfg.n_heads)
        cin, cout = int(cfg.in_channels), int(cfg.out_channels)
        if self.patch < 1 or cin < 1 or cout < 1:
            raise ValueError(f"swin needs patch_size, in_channels, out_channels >= 1, got "
                             f"{self.patch}, {cin}, {cout}")
        if d % heads:
            raise ValueError(f"model.d_model = {d} is not a multiple of model.n_heads = {heads}")
        cp = group_rank_size(cp_group)[1] if cp_group is not None else 1
        if cp > 1:
            raise NotImplementedError(f"swin with cp = {cp}: Ulysses inside windows is not wired into the model "
                                      "yet (parallelism.window.ulysses has the heads all-to-all); use cp = 1")
        wp_size = group_rank_size(wp_group)[1]
        if wp_size != self.grid[0] * self.grid[1]:
            raise ValueError(f"grid {self.grid} needs {self.grid[0] * self.grid[1]} ranks in wp_group, got {wp_size}")
        ffn = int(cfg.ffn_hidden) if getattr(cfg, "ffn_hidden", None) else 4 * d
        eps = float(getattr(cfg, "norm_eps", 1e-5))
        self.cin, self.cout = cin, cout
        self.embed = nn.Linear(cin * self.patch ** 2, d)
        half = (self.window[0] // 2, self.window[1] // 2)
        self.blocks = nn.ModuleList(WindowBlock(d, heads, ffn, self.window, (0, 0) if i % 2 == 0 else half, eps)
                                    for i in range(int(cfg.n_layers)))
        self.norm = nn.LayerNorm(d, eps=eps)
        self.head = nn.Linear(d, cout * self.patch ** 2)
        std = float(getattr(cfg, "init_std", 0.02))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.head.weight)  # start as persistence (y ≈ x when in == out channels)

    def layout(self, image_hw: tuple[int, int]) -> tuple[TileLayout, tuple[int, int]]:
        """Token-grid layout of an H×W image (padded to whole windows) and the real token counts."""
        th, tw, ph, pw = token_grid(image_hw, self.patch, self.window)
        for axis, real, padded, periodic in (("H", th, ph, self.wrap[0]), ("W", tw, pw, self.wrap[1])):
            if periodic and real != padded:
                raise ValueError(f"model.wrap is periodic along {axis} but the image's {real} tokens along {axis} "
                                 f"need padding to {padded}: make {axis} a multiple of patch*window")
        return TileLayout.build(ph, pw, self.grid, self.window), (th, tw)

    def tile_slices(self, image_hw: tuple[int, int]) -> tuple[slice, slice]:
        """Pixel rows/cols of the REAL image this rank reads (the last tiles are shorter: padding is the model's)."""
        layout, _ = self.layout(image_hw)
        rows, cols = layout.tile(group_rank_size(self.wp_group)[0])
        p = self.patch
        return (slice(rows.start * p, min(rows.stop * p, image_hw[0])),
                slice(cols.start * p, min(cols.stop * p, image_hw[1])))

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """batch: x [B, h, w, Cin] and y [B, h, w, Cout] (this rank's real pixels), image_size (H, W).

        Returns (sum of squared errors over real pixels × channels, fp32; their count, float tensor).
        """
        x, y = batch["x"], batch["y"]
        if x.dim() == 3:
            x, y = x[None], y[None]
        image_hw = tuple(int(v) for v in batch["image_size"])
        layout, real = self.layout(image_hw)
        rank = group_rank_size(self.wp_group)[0]
        rows, cols = self.tile_slices(image_hw)
        hp, wp = rows.stop - rows.start, cols.stop - cols.start
        if tuple(x.shape[1:3]) != (hp, wp) or x.shape[3] != self.cin or tuple(y.shape[:3]) != tuple(x.shape[:3]) \
                or y.shape[3] != self.cout:
            raise ValueError(f"batch x {list(x.shape)} / y {list(y.shape)} do not match this rank's tile of the "
                             f"{image_hw[0]}x{image_hw[1]} image: expected [B, {hp}, {wp}, {self.cin}] / "
                             f"[B, {hp}, {wp}, {self.cout}] (use model.tile_slices)")
        p = self.patch
        th, tw = layout.tile_shape(rank)
        dtype = self.embed.weight.dtype
        xpad = F.pad(x.to(dtype), (0, 0, 0, tw * p - wp, 0, th * p - hp))  # pad BEFORE any roll
        b = x.shape[0]
        patches = xpad.reshape(b, th, p, tw, p, self.cin).transpose(2, 3).reshape(b, th, tw, p * p * self.cin)
        ctx = _TileContext(layout, rank, real, self.wrap, self.wp_group)
        t = self.embed(patches)
        for block in self.blocks:
            t = block(t, ctx)
        out = self.head(self.norm(t)).reshape(b, th, tw, p, p, self.cout).transpose(2, 3)
        pred = out.reshape(b, th * p, tw * p, self.cout)[:, :hp, :wp]  # drop the padded pixels
        if self.cin == self.cout:
            pred = pred + x.to(dtype)  # forecast the increment
        err = (pred - y.to(dtype)).square()
        return err.sum(), torch.tensor(float(err.numel()))


def build_swin(model_cfg: Any, *, wp_group, grid, cp_group=None) -> SwinModel:
    """The trainer's entry point: replicated weights (same seed on every rank → same init)."""
    return SwinModel(model_cfg, wp_group=wp_group, grid=as_pair(grid, "grid"), cp_group=cp_group)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_pixel(model: SwinModel) -> float:
    """Forward+backward FLOPs per token (6·N_params + 12·L·d·window tokens), PaLM convention (no halving)."""
    d = model.embed.out_features
    return 6 * count_params(model) + 12 * len(model.blocks) * d * math.prod(model.window)

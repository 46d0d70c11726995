"""Pixel-level Swin encoder–decoder for dense prediction, window-parallel over a gh×gw grid of ranks,
optionally with a cp sub-group per tile (Ulysses inside windows).

    model = build_swin(model_cfg, wp_group=g, grid=(gh, gw), cp_group=c, tp=tp, stages=stages, init_seed=seed)
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
Weights are replicated over wp (and cp); the trainer's gradient reduction sums their per-rank contributions.

With a ``cp_group`` of c > 1 ranks (used automatically whenever it has more than one rank) the c ranks of a
tile split its token rows (``parallelism.window.share_rows``: as even as possible; whole window rows when
they divide by c): each reads, embeds, normalises, projects and runs the MLP on its own share only, and the
loss covers only its share's real pixels. Attention needs whole windows: one all-to-all over cp trades the
share's q|k|v for the whole tile on n_heads/c heads (ValueError unless c divides n_heads), the shifted block
rolls THOSE by −shift with the halo exchange over the wp group (cp rank k of every tile holds the same heads,
so the wp group — fixed cp coordinate — pairs the right ranks), attention runs in the rolled frame, the
output rolls back and a second all-to-all returns it to the share. Per block and pass: 2 all-to-alls; per
shifted block 4·d/c channels of halo (q, k, v, out) per rank instead of 2·d (x and back) without cp.

With ``tp`` (a :class:`~dist_train.models.tensor_parallel.TensorParallel` over the mesh's tp group) each
block holds n_heads/tp heads and ffn/tp MLP units (Megatron-core layers; see :class:`WindowBlock`): two
all-reduces per block and pass, the tile whole on every tp rank. With cp too, each tp rank's Ulysses runs
on its n_heads/(tp·cp) heads. Pipeline stages (``stages``) build only their blocks (and the embedding /
head on the first / last stage); every parameter comes from a (seed, name)-seeded generator, so any layout
starts from the single-rank weights.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from parallelism.window.attention import group_rank_size
from parallelism.window.halo import halo_roll
from parallelism.window.layout import TileLayout, as_pair
from parallelism.window.ulysses import heads_to_shares, share_rows, shares_to_heads
from parallelism.host_copy import to_device
from parallelism.window.windows import region_labels, window_attention, wrap_flags

from ..cost.shape import token_grid
from .init import normal_full
from .tensor_parallel import TensorParallel, copy_shard_, mark_tp_sharded, parallel_linear, unsharded_shape


class WindowBlock(nn.Module):
    """Pre-norm (shifted) window attention + MLP on a rolled tile; relative position bias per head.

    Tensor parallelism (``tp``, Megatron-core layers like the GPT's): this rank holds heads/tp heads —
    ``qkv`` column-parallel with stride 3 (the q, k and v rows of its heads), the relative-position bias
    of those heads, ``proj`` row-parallel (one all-reduce) — and ffn/tp MLP columns (``fc1`` column-,
    ``fc2`` row-parallel). Norms and the row layers' biases are replicated."""

    def __init__(self, d: int, heads: int, ffn: int, window: tuple[int, int], shift: tuple[int, int], eps: float,
                 tp: Optional[TensorParallel] = None):
        super().__init__()
        tp_size = 1 if tp is None else tp.size
        self.head_dim, self.heads = d // heads, heads // tp_size  # heads held on this tp rank
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(d, eps=eps)
        self.qkv = parallel_linear(tp, d, 3 * d, "col", bias=True, stride=3)
        self.proj = parallel_linear(tp, d, d, "row", bias=True)
        self.bias = nn.Parameter(torch.zeros(self.heads, 2 * window[0] - 1, 2 * window[1] - 1))
        if tp is not None:
            mark_tp_sharded(self.bias, dim=0)
        self.norm2 = nn.LayerNorm(d, eps=eps)
        self.fc1 = parallel_linear(tp, d, ffn, "col", bias=True)
        self.fc2 = parallel_linear(tp, ffn, d, "row", bias=True)

    def forward(self, x: torch.Tensor, ctx: "_TileContext") -> torch.Tensor:
        """x: this rank's tokens in the unrolled frame → same shape: the whole tile [B, h, w, d] without cp,
        this cp rank's share of the tile's rows [B, r, w, d] with cp."""
        if ctx.cp > 1:
            x = x + _tokens(self.proj, self._ulysses_attention(self.norm1(x), ctx))
            return x + self._mlp(x)
        if any(self.shift):  # roll x once; attention and the per-token MLP both run in the rolled frame
            x = halo_roll(x, ctx.layout, ctx.rank, self.shift, ctx.wp_group)
        b, h, w, _ = x.shape
        q, k, v = _tokens(self.qkv, self.norm1(x)).reshape(b, h, w, 3, self.heads, self.head_dim).unbind(3)
        o = self._attend(q, k, v, self.bias, ctx).reshape(b, h, w, self.heads * self.head_dim)
        x = x + _tokens(self.proj, o)
        x = x + self._mlp(x)
        if any(self.shift):
            x = halo_roll(x, ctx.layout, ctx.rank, self.shift, ctx.wp_group, inverse=True)
        return x

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return _tokens(self.fc2, F.gelu(_tokens(self.fc1, self.norm2(x))))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                ctx: "_TileContext") -> torch.Tensor:
        """Window attention on the rolled whole tile: q, k, v [B, h, w, heads', D] → [B, h, w, heads', D]."""
        labels, key_valid = ctx.masks(self.shift, q.device)
        return window_attention(q, k, v, window=self.window, labels=labels, key_valid=key_valid, bias=bias,
                                scale=q.shape[-1] ** -0.5)

    def _ulysses_attention(self, h: torch.Tensor, ctx: "_TileContext") -> torch.Tensor:
        """Normed share [B, r, w, d] → attention output of the share [B, r, w, heads·D] (before proj; heads
        held on this tp rank).

        share → (all-to-all) whole tile on heads [k·H/cp, (k+1)·H/cp) of cp rank k → roll(−s) over wp
        → windows → roll(+s) → (all-to-all) share. q, k, v of a head travel together: one all-to-all and one halo message each way.
        """
        b, r, w, _ = h.shape
        hd, hl = self.head_dim, self.heads // ctx.cp
        qkv = _tokens(self.qkv, h).reshape(b, r * w, 3, self.heads, hd)
        qkv = qkv.transpose(2, 3).reshape(b, r * w, self.heads, 3 * hd)
        th, tw = ctx.layout.tile_shape(ctx.rank)
        tile = shares_to_heads(qkv, ctx.share_tokens, ctx.cp_group).reshape(b, th, tw, hl, 3, hd)
        if any(self.shift):
            tile = halo_roll(tile, ctx.layout, ctx.rank, self.shift, ctx.wp_group)
        q, k, v = tile.unbind(4)
        lo = ctx.cp_rank * hl
        o = self._attend(q, k, v, self.bias[lo:lo + hl], ctx)
        if any(self.shift):
            o = halo_roll(o, ctx.layout, ctx.rank, self.shift, ctx.wp_group, inverse=True)
        o = heads_to_shares(o.reshape(b, th * tw, hl, hd), ctx.share_tokens, ctx.cp_group)
        return o.reshape(b, r, w, self.heads * hd)


def _tokens(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A linear on x [B, h, w, C] through [B, h·w, C]: Megatron's parallel linears take [B, S, C] only."""
    return layer(x.flatten(1, 2)).unflatten(1, x.shape[1:3])


class _TileContext:
    """Per-forward facts about this rank's tile: layout, masks from global coordinates, cp shares."""

    def __init__(self, layout: TileLayout, rank: int, real_tokens: tuple[int, int], wrap: tuple[bool, bool],
                 wp_group, cp_group=None, cp_rank: int = 0, share_tokens: tuple[int, ...] = ()):
        self.layout, self.rank, self.real, self.wrap, self.wp_group = layout, rank, real_tokens, wrap, wp_group
        # cp: tokens of every cp rank's share of this tile (group-rank order) and this rank's place in it
        self.cp_group, self.cp_rank, self.share_tokens = cp_group, cp_rank, share_tokens
        self.cp = max(1, len(share_tokens))
        self._masks: dict[tuple[tuple[int, int], Any], Any] = {}

    def masks(self, shift: tuple[int, int], device: torch.device | str = "cpu"):
        """(Swin region labels, key_valid) of the rolled tile; both from GLOBAL rolled coordinates, on ``device``
        (built on the host, copied once per forward and shift: window_attention on CUDA needs them there)."""
        device = torch.device(device)
        if (shift, device) not in self._masks:
            rows, cols = self.layout.tile(self.rank)
            h, w = rows.stop - rows.start, cols.stop - cols.start
            labels = region_labels(wrap_flags(rows.start, h, shift[0], self.layout.height, self.wrap[0]),
                                   wrap_flags(cols.start, w, shift[1], self.layout.width, self.wrap[1]), h, w)
            src_r = (torch.arange(rows.start, rows.stop) + shift[0]) % self.layout.height  # unrolled position
            src_c = (torch.arange(cols.start, cols.stop) + shift[1]) % self.layout.width
            valid = (src_r < self.real[0])[:, None] & (src_c < self.real[1])[None, :]
            valid = None if bool(valid.all()) else valid
            self._masks[(shift, device)] = tuple(None if m is None else to_device(m, device) for m in (labels, valid))
        return self._masks[(shift, device)]


class SwinModel(nn.Module):
    """Patch embedding → n_layers alternating plain/shifted window blocks → pixel decoder head."""

    def __init__(self, cfg: Any, *, wp_group, grid: tuple[int, int], cp_group=None,
                 activation_checkpointing: str = "none", tp: Optional[TensorParallel] = None,
                 stages: Optional[list] = None, init_seed: Optional[int] = None):
        super().__init__()
        # "full" and "selective" both recompute whole blocks in backward: a block's biggest tensors are its
        # window scores, so recomputing only attention would save little more than the layer input
        self.activation_checkpointing = activation_checkpointing
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
        # cp_group None means "no cp" (the mesh passes None for an axis of size 1), never the default group
        self.cp_rank, self.cp = group_rank_size(cp_group) if cp_group is not None else (0, 1)
        tp_size = 1 if tp is None else tp.size
        if heads % (tp_size * self.cp):
            divisors = [c for c in range(1, heads + 1) if heads % c == 0]
            raise ValueError(f"model.n_heads = {heads} is not divisible by tp·cp = {tp_size}·{self.cp}: swin splits "
                             f"heads over tp and runs Ulysses inside windows over cp (n_heads/(tp·cp) heads per "
                             f"rank); tp·cp must be one of {divisors}")
        # grid 1×1 is "no wp" whatever wp_group is (the mesh passes None for an axis of size 1, which must not
        # be read as the default group); a larger grid takes None as the default group
        self.wp_rank, wp_size = group_rank_size(wp_group) if self.grid != (1, 1) else (0, 1)
        if wp_size != self.grid[0] * self.grid[1]:
            raise ValueError(f"grid {self.grid} needs {self.grid[0] * self.grid[1]} ranks in wp_group, got {wp_size}")
        ffn = int(cfg.ffn_hidden) if getattr(cfg, "ffn_hidden", None) else 4 * d
        eps = float(getattr(cfg, "norm_eps", 1e-5))
        if ffn % tp_size:
            raise ValueError(f"swin MLP hidden size {ffn} is not divisible by tp = {tp_size}")
        self.cin, self.cout = cin, cout
        self.tp = tp
        self.n_layers = int(cfg.n_layers)
        # pipeline (pp > 1): only this rank's stages' blocks; the patch embedding on the first stage, the
        # final norm and head on the last. Names stay global (blocks.<i>.…: a ModuleDict keyed by the global
        # block index), which is what lets checkpoints reshard between pp sizes.
        self.pipeline_stages: list = list(stages or [])
        held = sorted({i for st in self.pipeline_stages for i in st.layers}) if stages else list(range(self.n_layers))
        self.held_blocks = held
        first = not stages or any(st.first for st in stages)
        last = not stages or any(st.last for st in stages)
        half = (self.window[0] // 2, self.window[1] // 2)
        self.embed = nn.Linear(cin * self.patch ** 2, d) if first else None
        self.blocks = nn.ModuleDict({str(i): WindowBlock(d, heads, ffn, self.window, (0, 0) if i % 2 == 0 else half,
                                                         eps, tp) for i in held})
        self.norm = nn.LayerNorm(d, eps=eps) if last else None
        self.head = nn.Linear(d, cout * self.patch ** 2) if last else None
        self.init_std = float(getattr(cfg, "init_std", 0.02))
        self.init_seed = torch.initial_seed() if init_seed is None else int(init_seed)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Each parameter as its full tp=1 tensor from its own generator seeded by (init_seed, name), then this
        rank's tp shard copied in: every tp / pp / wp / cp layout starts from the single-rank weights. Linear
        weights N(0, init_std²) — the head's zero (the model starts as persistence, y ≈ x when in == out
        channels) — LayerNorm weights one, every bias and relative-position table zero."""
        tp_rank, tp_size = (0, 1) if self.tp is None else (self.tp.rank, self.tp.size)
        for mod_name, mod in self.named_modules():
            for p_name, p in mod.named_parameters(recurse=False):
                name = f"{mod_name}.{p_name}" if mod_name else p_name
                shape = unsharded_shape(p, tp_size)
                if isinstance(mod, nn.LayerNorm) and p_name == "weight":
                    full = torch.ones(shape)
                elif p.dim() == 2 and name != "head.weight":
                    full = normal_full(tuple(shape), self.init_seed, name, self.init_std)
                else:
                    full = torch.zeros(shape)
                copy_shard_(p, full, tp_rank, tp_size)

    def layout(self, image_hw: tuple[int, int]) -> tuple[TileLayout, tuple[int, int]]:
        """Token-grid layout of an H×W image (padded to whole windows) and the real token counts."""
        th, tw, ph, pw = token_grid(image_hw, self.patch, self.window)
        for axis, real, padded, periodic in (("H", th, ph, self.wrap[0]), ("W", tw, pw, self.wrap[1])):
            if periodic and real != padded:
                raise ValueError(f"model.wrap is periodic along {axis} but the image's {real} tokens along {axis} "
                                 f"need padding to {padded}: make {axis} a multiple of patch*window")
        return TileLayout.build(ph, pw, self.grid, self.window), (th, tw)

    def cp_rows(self, layout: TileLayout, rank: int) -> tuple[list[int], slice]:
        """Token rows of every cp rank's share of wp rank ``rank``'s tile, and this cp rank's rows (tile-local)."""
        th = layout.tile_shape(rank)[0]
        counts = share_rows(th, self.cp, what=f"the tile of wp rank {rank}") if self.cp > 1 else [th]
        start = sum(counts[:self.cp_rank])
        return counts, slice(start, start + counts[self.cp_rank])

    def tile_slices(self, image_hw: tuple[int, int]) -> tuple[slice, slice]:
        """Pixel rows/cols of the REAL image this rank reads: its tile, or its cp share of the tile's rows.

        The last tiles are shorter (padding is the model's); a cp share that is all padding is empty.
        """
        layout, _ = self.layout(image_hw)
        rank = self.wp_rank
        rows, cols = layout.tile(rank)
        share = self.cp_rows(layout, rank)[1]
        p, (h, w) = self.patch, image_hw
        r0, r1 = rows.start + share.start, rows.start + share.stop
        return slice(min(r0 * p, h), min(r1 * p, h)), slice(cols.start * p, min(cols.stop * p, w))

    def run_blocks(self, t: torch.Tensor, ctx: _TileContext, ids) -> torch.Tensor:
        """Blocks ``ids`` on this rank's tokens t [B, h, w, d] (or its cp share); with activation
        checkpointing each block keeps only its input and recomputes (halo exchanges included, in the same
        order on every rank: the autograd graphs are identical) in backward."""
        for i in ids:
            block = self.blocks[str(i)]
            if self.activation_checkpointing != "none" and self.training and torch.is_grad_enabled():
                t = checkpoint(block, t, ctx, use_reentrant=False)
            else:
                t = block(t, ctx)
        return t

    def check_batch(self, x: torch.Tensor, y: Optional[torch.Tensor], image_hw: tuple[int, int]) -> None:
        """ValueError unless x [B, h, w, Cin] (and y [B, h, w, Cout]) are this rank's pixels of the image."""
        rows, cols = self.tile_slices(image_hw)
        hp, wp = rows.stop - rows.start, cols.stop - cols.start
        if tuple(x.shape[1:3]) != (hp, wp) or x.shape[3] != self.cin or (y is not None and (
                tuple(y.shape[:3]) != tuple(x.shape[:3]) or y.shape[3] != self.cout)):
            raise ValueError(f"batch x {list(x.shape)} / y {list(y.shape) if y is not None else None} do not match "
                             f"this rank's tile (or cp share) of the {image_hw[0]}x{image_hw[1]} image: expected "
                             f"[B, {hp}, {wp}, {self.cin}] / [B, {hp}, {wp}, {self.cout}] (use model.tile_slices)")

    def tile_context(self, image_hw: tuple[int, int]) -> _TileContext:
        """The per-image facts every block needs (layout, masks, cp shares) for this rank."""
        layout, real = self.layout(image_hw)
        counts, _ = self.cp_rows(layout, self.wp_rank)
        tw = layout.tile_shape(self.wp_rank)[1]
        return _TileContext(layout, self.wp_rank, real, self.wrap, self.wp_group, self.cp_group, self.cp_rank,
                            tuple(c * tw for c in counts) if self.cp > 1 else ())

    def embed_pixels(self, x: torch.Tensor, ctx: _TileContext) -> torch.Tensor:
        """This rank's real pixels x [B, hp, wp, Cin] → tokens [B, th, tw, d] of its tile (or cp share),
        zero-padded at the bottom/right BEFORE any roll."""
        layout, p = ctx.layout, self.patch
        _, share = self.cp_rows(layout, ctx.rank)
        th, tw = share.stop - share.start, layout.tile_shape(ctx.rank)[1]
        b, hp, wp = x.shape[:3]
        xpad = F.pad(x.to(self.embed.weight.dtype), (0, 0, 0, tw * p - wp, 0, th * p - hp))
        patches = xpad.reshape(b, th, p, tw, p, self.cin).transpose(2, 3).reshape(b, th, tw, p * p * self.cin)
        return self.embed(patches)

    def prediction(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Last hidden t [B, th, tw, d] and this rank's real pixels x [B, hp, wp, Cin] → the model's output on
        those pixels [B, hp, wp, Cout] (padded pixels dropped; x + the increment when in == out channels)."""
        b, th, tw = t.shape[:3]
        p, hp, wp = self.patch, x.shape[1], x.shape[2]
        out = self.head(self.norm(t)).reshape(b, th, tw, p, p, self.cout).transpose(2, 3)
        pred = out.reshape(b, th * p, tw * p, self.cout)[:, :hp, :wp]
        if self.cin == self.cout:
            pred = pred + x.to(self.head.weight.dtype)  # forecast the increment
        return pred

    def loss(self, t: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Last hidden t [B, th, tw, d] and this rank's real pixels x, y [B, hp, wp, C] → (sum of squared errors
        over the real pixels × channels, their count as a float tensor). Padded pixels are dropped."""
        err = (self.prediction(t, x) - y.to(self.head.weight.dtype)).square()
        return err.sum(), torch.tensor(float(err.numel()))

    def forecast(self, x: torch.Tensor, image_hw: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """The next step of this rank's real pixels x [B, hp, wp, Cin] (one process: the whole image, image_hw
        defaults to x's) → [B, hp, wp, Cout], in the normalised units the model was trained in (the
        checkpoint's ``input_normalisation``: x = (field − mean) / scale in, field = out · scale + mean back)."""
        if self.pipeline_stages and len(self.held_blocks) != self.n_layers:
            raise RuntimeError("this swin holds one pipeline stage; run it through the pipeline engine")
        if x.dim() == 3:
            x = x[None]
        image_hw = tuple(int(v) for v in (image_hw or x.shape[1:3]))
        self.check_batch(x, None, image_hw)
        ctx = self.tile_context(image_hw)
        return self.prediction(self.run_blocks(self.embed_pixels(x, ctx), ctx, self.held_blocks), x)

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """batch: x [B, h, w, Cin] and y [B, h, w, Cout] (this rank's real pixels: ``tile_slices``), image_size.

        Returns (sum of squared errors over this rank's real pixels × channels; their count, float tensor).
        """
        if self.pipeline_stages and len(self.held_blocks) != self.n_layers:
            raise RuntimeError("this swin holds one pipeline stage; run it through the pipeline engine")
        x, y = batch["x"], batch["y"]
        if x.dim() == 3:
            x, y = x[None], y[None]
        image_hw = tuple(int(v) for v in batch["image_size"])
        self.check_batch(x, y, image_hw)
        ctx = self.tile_context(image_hw)
        t = self.run_blocks(self.embed_pixels(x, ctx), ctx, self.held_blocks)
        return self.loss(t, x, y)


class SwinStageModule(nn.Module):
    """One pipeline stage over a shared :class:`SwinModel` (every stage holds the same wp/cp tiling):
    this rank's pixels x [B, hp, wp, Cin] (first stage) or tokens [B, th, tw, d] → tokens [B, th, tw, d].
    The last stage's norm/head/loss run in the schedule's loss function (:meth:`SwinModel.loss`)."""

    def __init__(self, model: SwinModel, stage):
        super().__init__()
        self.stage = stage
        # register the owned pieces (shared with ``model``) so .parameters() is this stage's
        self.blocks = nn.ModuleList(model.blocks[str(i)] for i in stage.layers)
        self.embed = model.embed if stage.first else None
        object.__setattr__(self, "model", model)  # not registered: the model holds every stage of this rank
        self.ctx: Optional[_TileContext] = None

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        if self.stage.first:
            t = self.model.embed_pixels(t, self.ctx)
        return self.model.run_blocks(t, self.ctx, self.stage.layers)


class SwinLossHead(nn.Module):
    """The last stage's final norm + pixel head + loss as one module (shared parameters), called by the
    schedule's loss function: tokens t [B, th, tw, d], target x|y [B, hp, wp, Cin+Cout] -> (loss sum, count)."""

    def __init__(self, model: SwinModel):
        super().__init__()
        self.norm, self.head = model.norm, model.head
        object.__setattr__(self, "model", model)

    def forward(self, t: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cin = self.model.cin
        return self.model.loss(t, target[..., :cin], target[..., cin:])


class SwinPipeline:
    """What the pipeline engine needs from a swin: stage modules, the loss head (last stage), and
    micro-batches as the schedule's input (first stage: x) and target (last stage: x and y concatenated on
    channels, since the loss adds the forecast increment to x)."""

    def __init__(self, model: SwinModel):
        self.model = model
        self.stage_modules = [SwinStageModule(model, st) for st in model.pipeline_stages]
        self.loss_head = SwinLossHead(model) if model.head is not None else None

    def inputs(self, micro: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """Micro-batches (x, y [mb, hp, wp, C], image_size) → (x [B, hp, wp, Cin], x|y [B, hp, wp, Cin+Cout])."""
        image_hw = tuple(int(v) for v in micro[0]["image_size"])
        if any(tuple(int(v) for v in b["image_size"]) != image_hw for b in micro):
            raise ValueError("pipeline engine: every micro-batch must be of one image size")
        x = torch.cat([b["x"] for b in micro])
        y = torch.cat([b["y"] for b in micro])
        self.model.check_batch(x, y, image_hw)
        ctx = self.model.tile_context(image_hw)
        for sm in self.stage_modules:
            sm.ctx = ctx
        return x, torch.cat([x.to(y.dtype), y], dim=-1)


def build_swin(model_cfg: Any, *, wp_group, grid, cp_group=None, activation_checkpointing: str = "none",
               stages: Optional[list] = None, tp: Optional[TensorParallel] = None,
               init_seed: Optional[int] = None) -> SwinModel:
    """The trainer's entry point. Weights are replicated over wp/cp/dp (per-parameter seeded: the same on
    every rank); with ``tp`` (a :class:`TensorParallel`) this rank holds its shard of heads and MLP; with
    ``stages`` (pp > 1: this pipeline rank's ``cost.layout.Stage`` list) only those stages' pieces are built."""
    return SwinModel(model_cfg, wp_group=wp_group, grid=as_pair(grid, "grid"), cp_group=cp_group,
                     activation_checkpointing=activation_checkpointing, tp=tp, stages=stages, init_seed=init_seed)

"""Window-parallel attention vs a plain float64 Swin reference on the full image, on real gloo ranks.

Each spawned rank runs every case for its world size: grids 1×1, 1×2, 2×1, 1×3, 3×1 (uneven),
2×2 (uneven); square and rectangular windows; shift 0, half and odd; wrap on/off per axis; bias
on/off; float64 and float32 (≤ 1e-5 relative); forward and gradients of q, k, v and bias; exact
halo byte counts; and the two classic bugs (a roll that does nothing, a mask in local coordinates),
shown to differ from the reference on these very cases. The 4-rank run also runs the 3-rank cases on the
sub-group {1, 2, 3} (group ranks differ from global ranks, as for the mesh's wp groups).
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from parallelism.window import (TileLayout, halo_roll, halo_stats, halo_tokens, reset_halo_stats,
                                shard_image, unshard_image, window_parallel_attention)
from parallelism.window.attention import WindowParallelAttention, WindowSpec, gather_layout
from parallelism.window.windows import region_labels, wrap_flags
from tests.dist_harness import run_ranks


# ---------------------------------------------------------------- the reference, from the definition
def swin_reference(q, k, v, *, window, shift, wrap, bias, scale, roll=True):
    """Full-image Swin window attention written plainly (as in the Swin paper's code).

    q, k, v: [B, H, W, heads, D]. ``roll=False`` reproduces the classic bug (a roll that does nothing).
    """
    B, H, W, nh, D = q.shape
    wh, ww = window
    sh, sw = shift
    if roll:
        q, k, v = (torch.roll(t, shifts=(-sh, -sw), dims=(1, 2)) for t in (q, k, v))

    def part(t):  # [B, H, W, ...] -> [B*nW, wh*ww, ...]
        t = t.reshape(B, H // wh, wh, W // ww, ww, *t.shape[3:]).permute(0, 1, 3, 2, 4, *range(5, t.dim() + 2))
        return t.reshape(-1, wh * ww, *t.shape[5:])

    qw, kw, vw = part(q), part(k), part(v)  # [nWin, N, heads, D]
    scores = torch.einsum("wnhd,wmhd->whnm", qw, kw) * scale
    if bias is not None:
        coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)
        rel = coords[:, :, None] - coords[:, None, :]
        index = (rel[0] + wh - 1) * (2 * ww - 1) + (rel[1] + ww - 1)
        scores = scores + bias.reshape(nh, -1)[:, index][None]
    img = torch.zeros(H, W, device=q.device)  # the mask on the scores' device: a CUDA masked_fill refuses a CPU one
    h_sl = (slice(0, -wh), slice(-wh, -sh), slice(-sh, None)) if sh and not wrap[0] else (slice(None),)
    w_sl = (slice(0, -ww), slice(-ww, -sw), slice(-sw, None)) if sw and not wrap[1] else (slice(None),)
    cnt = 0
    for hs in h_sl:
        for ws in w_sl:
            img[hs, ws] = cnt
            cnt += 1
    mw = part(img[None].expand(B, H, W))  # [nWin, N]
    masked = mw[:, :, None] != mw[:, None, :]
    scores = scores.masked_fill(masked[:, None], float("-inf"))
    out = torch.einsum("whnm,wmhd->wnhd", torch.softmax(scores, -1), vw)
    out = out.reshape(B, H // wh, W // ww, wh, ww, nh, D).permute(0, 1, 3, 2, 4, 5, 6).reshape(B, H, W, nh, D)
    return torch.roll(out, shifts=(sh, sw), dims=(1, 2)) if roll else out


class LocalMaskSpec(WindowSpec):
    """The classic bug: Swin's mask built from the tile's LOCAL coordinates instead of global ones."""

    def labels(self, device="cpu"):
        rows, cols = self.layout.tile(self.rank)
        h, w = rows.stop - rows.start, cols.stop - cols.start
        return region_labels(wrap_flags(0, h, self.shift[0], h, self.wrap[0], device),
                             wrap_flags(0, w, self.shift[1], w, self.wrap[1], device), h, w)


# (grid, image H, W, window, shift, wrap, bias, batch)
CASES = {
    1: [((1, 1), 12, 8, (4, 4), (2, 2), (False, False), True, 2),
        ((1, 1), 9, 12, (3, 4), (1, 3), (True, False), True, 1)],
    2: [((1, 2), 12, 20, (4, 4), (2, 2), (False, False), True, 2),
        ((2, 1), 20, 12, (4, 4), (2, 2), (False, False), True, 1),   # 5 window rows → 3 + 2
        ((2, 1), 15, 9, (3, 3), (1, 1), (True, False), False, 1),
        ((1, 2), 8, 18, (4, 3), (2, 1), (False, True), True, 1),     # rectangular, 6 cols → 3 + 3
        ((2, 1), 12, 8, (4, 4), (0, 0), (False, False), True, 1)],   # no shift: no halo at all
    3: [((3, 1), 20, 8, (4, 4), (2, 2), (False, False), True, 1),    # 5 window rows → 2 + 2 + 1
        ((1, 3), 6, 21, (3, 3), (1, 2), (True, True), True, 1),      # 7 cols → 3 + 2 + 2
        ((3, 1), 12, 6, (3, 2), (2, 1), (False, True), False, 1)],
    4: [((2, 2), 20, 12, (4, 4), (2, 2), (False, False), True, 1),   # 5 x 3 windows → uneven both ways
        ((2, 2), 18, 20, (3, 4), (1, 3), (True, False), True, 1),
        ((2, 2), 12, 12, (4, 3), (3, 0), (False, True), True, 1)],
}
HEADS, DIM = 2, 4


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def _attention_cases(rank: int, world: int) -> int:
    checked = _swin_cases(CASES[world], None, world)
    _halo_and_unshard(rank, world, None)
    if world == 4:  # a sub-group (group rank i = global rank i + 1) runs the odd 3-rank cases
        sub = dist.new_group([1, 2, 3])
        if rank in (1, 2, 3):
            checked += _swin_cases(CASES[3], sub, 3)
            _halo_and_unshard(dist.get_rank(sub), 3, sub)
        dist.barrier()
    return checked


def _swin_cases(cases: list, group, world: int) -> int:
    """Every case on ``group`` of ``world`` ranks (None: the default group) -> the number checked."""
    checked = 0
    for case_id, (grid, H, W, window, shift, wrap, use_bias, B) in enumerate(cases):
        gen = torch.Generator().manual_seed(1000 + case_id)  # identical full tensors on every rank
        q, k, v, gout = (torch.randn(B, H, W, HEADS, DIM, generator=gen, dtype=torch.float64) for _ in range(4))
        bias = torch.randn(HEADS, 2 * window[0] - 1, 2 * window[1] - 1, generator=gen, dtype=torch.float64)
        scale = DIM ** -0.5
        leaves = [t.clone().requires_grad_() for t in (q, k, v, bias)]
        ref = swin_reference(*leaves[:3], window=window, shift=shift, wrap=wrap,
                             bias=leaves[3] if use_bias else None, scale=scale)
        (ref * gout).sum().backward()
        ref_grads = [t.grad for t in leaves]
        tile = lambda t: shard_image(t, grid=grid, window=window, group=group)  # noqa: E731
        tag = f"case {case_id} grid {grid} image {H}x{W} window {window} shift {shift} wrap {wrap} bias {use_bias}"

        for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
            ql, kl, vl = (tile(t).to(dtype).detach().requires_grad_() for t in (q, k, v))
            bl = bias.to(dtype).detach().requires_grad_() if use_bias else None
            reset_halo_stats()
            out = window_parallel_attention(ql, kl, vl, window=window, shift=shift, grid=grid, group=group,
                                            wrap=wrap, bias=bl, scale=scale)
            assert out.dtype == dtype and out.shape == ql.shape, tag
            assert _rel(out, tile(ref)) <= tol, f"{tag} {dtype}: forward rel err {_rel(out, tile(ref))}"
            fwd = halo_stats()
            (out * tile(gout).to(dtype)).sum().backward()
            for name, got, want in (("q", ql, ref_grads[0]), ("k", kl, ref_grads[1]), ("v", vl, ref_grads[2])):
                err = _rel(got.grad, tile(want))
                assert err <= tol, f"{tag} {dtype}: grad {name} rel err {err}"
            if use_bias:
                gb = bl.grad.double().clone()
                if world > 1:
                    dist.all_reduce(gb, group=group)  # the replicated weight's gradient reduction over wp
                assert _rel(gb, ref_grads[3]) <= tol, f"{tag} {dtype}: bias grad rel err {_rel(gb, ref_grads[3])}"

            # Bytes: forward sends packed q|k|v (3 tensors) + the output roll-back (1); backward sends the
            # output gradient's roll (1) + the q|k|v halo gradients back (3). Per tensor: the formula.
            h, w = ql.shape[1:3]
            tokens = halo_tokens(h, w, shift[0] if grid[0] > 1 else 0, shift[1] if grid[1] > 1 else 0)
            per_tensor = tokens * B * HEADS * DIM * ql.element_size()
            assert fwd["bytes_sent"] == 4 * per_tensor, f"{tag}: forward bytes {fwd['bytes_sent']} != 4*{per_tensor}"
            assert fwd["bytes_received"] == 4 * per_tensor, tag
            assert halo_stats()["bytes_sent"] == 8 * per_tensor, tag
            if shift == (0, 0):
                assert halo_stats()["messages_sent"] == 0, tag

        # The classic bugs must be caught by these cases: (1) a roll that does nothing,
        with torch.no_grad():
            noroll = swin_reference(q, k, v, window=window, shift=shift, wrap=wrap,
                                    bias=bias if use_bias else None, scale=scale, roll=False)
            if shift != (0, 0):
                assert _rel(noroll, ref) > 1e-3, f"{tag}: the no-roll bug is not detected by this case"
            # (2) a mask built in local tile coordinates: run our own pipeline with that one change.
            layout, me = gather_layout(*tile(q).shape[1:3], grid=grid, window=window, group=group, device=q.device)
            bad_spec = LocalMaskSpec(layout, me, window, shift, wrap, scale, group)
            bad = WindowParallelAttention.apply(tile(q), tile(k), tile(v), bias if use_bias else None, bad_spec)
            diff = torch.tensor([_rel(bad, tile(ref))], dtype=torch.float64)
            if world > 1:
                dist.all_reduce(diff, op=dist.ReduceOp.MAX, group=group)
            local_mask_differs = any(s and not wr and g > 1 for s, wr, g in zip(shift, wrap, grid))
            assert (float(diff) > 1e-3) == local_mask_differs, f"{tag}: local-mask bug diff {float(diff)}"
        checked += 1
    return checked


def _halo_and_unshard(rank: int, world: int, group) -> None:
    """halo_roll and shard/unshard_image on ``group`` (``rank``: the rank in it)."""
    # halo_roll (the model's primitive: roll the block input once) == torch.roll, and its adjoint.
    grid = {1: (1, 1), 2: (2, 1), 3: (1, 3), 4: (2, 2)}[world]
    H, W = 20, 21
    gen = torch.Generator().manual_seed(7)
    x, g = (torch.randn(2, H, W, 3, generator=gen, dtype=torch.float64) for _ in range(2))
    layout = TileLayout.build(H, W, grid, (4, 3))
    for shift in ((2, 1), (3, 2), (0, 2)):
        xl = shard_image(x, grid=grid, window=(4, 3), group=group).clone().requires_grad_()
        for inverse in (False, True):
            sign = 1 if inverse else -1
            y = halo_roll(xl, layout, rank, shift, group, inverse=inverse)
            want = shard_image(torch.roll(x, (sign * shift[0], sign * shift[1]), (1, 2)), grid=grid, window=(4, 3),
                               group=group)
            assert torch.equal(y, want), f"halo_roll {shift} inverse={inverse}"
            (gx,) = torch.autograd.grad((y * shard_image(g, grid=grid, window=(4, 3), group=group)).sum(), xl)
            want_g = shard_image(torch.roll(g, (-sign * shift[0], -sign * shift[1]), (1, 2)), grid=grid,
                                 window=(4, 3), group=group)
            assert torch.equal(gx, want_g), f"halo_roll grad {shift} inverse={inverse}"
    # unshard(shard(x)) == x on every rank, with uneven tiles and other image dims.
    assert torch.equal(unshard_image(shard_image(x, grid=grid, window=(4, 3), group=group), grid=grid,
                                     window=(4, 3), group=group), x)
    xt = x.permute(3, 0, 1, 2)  # [C, B, H, W]: image dims (2, 3)
    part = shard_image(xt, grid=grid, window=(4, 3), group=group, dims=(2, 3))
    assert torch.equal(unshard_image(part, grid=grid, window=(4, 3), group=group, dims=(2, 3)), xt)
    # its gradient: the replicated image is used identically on every rank, so a tile's gradient is that
    # tile of the image's gradient (uneven tiles, both dim orders)
    for img, dims in ((x, (1, 2)), (xt, (2, 3))):
        tl = shard_image(img, grid=grid, window=(4, 3), group=group, dims=dims).clone().requires_grad_()
        weight = torch.randn(img.shape, generator=gen, dtype=torch.float64)
        (gt,) = torch.autograd.grad((unshard_image(tl, grid=grid, window=(4, 3), group=group, dims=dims)
                                     * weight).sum(), tl)
        assert torch.equal(gt, shard_image(weight, grid=grid, window=(4, 3), group=group, dims=dims)), dims


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_window_parallel_attention_matches_swin_reference(world):
    results = run_ranks(_attention_cases, world, timeout=150)
    sub = [len(CASES[3]) if world == 4 and rank else 0 for rank in range(world)]  # the 4-rank run's sub-group
    assert results == [len(CASES[world]) + n for n in sub]


def test_bad_input_raises_value_error():
    x = torch.zeros(1, 10, 8, 2, 4)
    with pytest.raises(ValueError, match="multiple of the window"):
        window_parallel_attention(x, x, x, window=4, shift=2, grid=(1, 1), group=None)
    y = torch.zeros(1, 8, 8, 2, 4)
    with pytest.raises(ValueError, match="shift"):
        window_parallel_attention(y, y, y, window=4, shift=4, grid=(1, 1), group=None)
    with pytest.raises(ValueError, match="needs 2 ranks"):
        window_parallel_attention(y, y, y, window=4, grid=(1, 2), group=None)
    with pytest.raises(ValueError, match="fewer than the grid"):
        TileLayout.build(8, 8, (3, 1), 4)
    with pytest.raises(ValueError, match="bias must have shape"):
        window_parallel_attention(y, y, y, window=4, grid=(1, 1), group=None, bias=torch.zeros(2, 3, 3))
    with pytest.raises(ValueError, match="cu_seqlens .packed documents. is not supported by window_parallel_attention"):
        window_parallel_attention(y, y, y, window=4, grid=(1, 1), group=None, cu_seqlens=[0, 4, 8])


def test_layout_uneven_split():
    layout = TileLayout.build(20, 12, (3, 2), 4)  # 5 window rows → 2 + 2 + 1, 3 cols → 2 + 1
    assert layout.row_bounds == (0, 8, 16, 20) and layout.col_bounds == (0, 8, 12)
    assert layout.tile(5) == (slice(16, 20), slice(8, 12))
    assert halo_tokens(8, 8, 2, 2) == 2 * 8 + 2 * 8 - 4


def test_single_process_matches_reference_without_distributed():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 8, 12, 2, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    out = window_parallel_attention(q, k, v, window=4, shift=2, grid=1, group=None)
    want = swin_reference(q, k, v, window=(4, 4), shift=(2, 2), wrap=(False, False), bias=None, scale=0.5)
    assert _rel(out, want) < 1e-12

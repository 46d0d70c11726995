"""Swin with window parallelism × cp (Ulysses inside windows) equals the single-rank model, in float64.

The wp and cp groups are the job's DeviceMesh groups (dist_train.mesh.build_mesh, cp innermost): global rank =
wp_rank·cp + cp_rank; the wp group of a rank holds the ranks with its cp coordinate, the cp group the ranks of
its tile. Every case checks, on every rank, the loss and count summed over all ranks and every parameter
gradient summed over all ranks (the trainer's reduction over dp × wp × cp) against grid 1×1 without cp on the
full image, plus the number of all-to-alls and the bytes the all-to-alls and the halo exchanges send — against
the formulas and against the cost model's prediction for the same config (``dist_train.cost.step_time``:
``ulysses_traffic`` is the mean over a tile's cp ranks, ``swin_halo_traffic`` the largest tile). Images
need padding; splits are even (whole window rows), even across windows, uneven (exact via the uneven
all-to-all) and include a cp share that is all padding (it reads no pixel).

World 6 puts an odd wp grid and cp in one model: 3 tiles × cp 2, as grid [3, 1] (a short last tile, whose
second cp share is half padding) and [1, 3] (periodic along W, a narrow last tile); and an odd cp 3 × grid
[1, 2].
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from dist_train.config import ParallelConfig, config_from_dict
from dist_train.cost.shape import rank_inputs
from dist_train.cost.step_time import exchange_passes, swin_halo_traffic, ulysses_traffic
from dist_train.mesh import build_mesh
from dist_train.models.swin import build_swin
from dist_train.plan.profiles import builtin_profiles
from parallelism.window import halo_stats, halo_tokens, reset_halo_stats, reset_ulysses_stats, share_rows, \
    ulysses_stats
from tests.dist_harness import run_ranks

B, D_HEAD = 2, 4
# by world size: (wp grid, cp, heads, image H, W, patch, window, wrap, expected token rows per cp rank)
CASES = {
    2: [((1, 1), 2, 2, 10, 16, 1, (4, 4), (False, True), [6, 6]),     # 3 window rows → even rows across windows
        ((1, 1), 2, 2, 9, 14, 1, (3, 4), (False, False), [5, 4]),     # 9 token rows → uneven 5 + 4
        ((1, 1), 2, 2, 17, 24, 2, (3, 2), (False, True), [5, 4])],    # patch 2: 9 token rows, periodic W
    3: [((1, 1), 3, 3, 13, 8, 1, (4, 4), (False, False), [6, 5, 5]),
        ((1, 1), 3, 3, 7, 9, 1, (3, 3), (False, False), [3, 3, 3])],   # whole window rows
    4: [((1, 2), 2, 2, 10, 16, 1, (4, 4), (False, True), [6, 6]),
        ((1, 2), 2, 2, 9, 14, 1, (3, 4), (False, False), [5, 4]),
        ((2, 1), 2, 2, 15, 8, 1, (4, 4), (False, False), [4, 4]),     # tiles 8 + 8 rows, whole windows
        ((1, 1), 4, 4, 5, 8, 1, (4, 4), (False, False), [2, 2, 2, 2])],  # cp rank 3's share is all padding
    # by wp rank when the tiles differ: 5 window rows → tiles 8, 8, 4 rows; the last tile's image rows are
    # 16..18, so its cp shares read 2 real rows and 1 real row + 1 padding row
    6: [((3, 1), 2, 2, 19, 10, 1, (4, 4), (False, False), [[4, 4], [4, 4], [2, 2]]),
        ((1, 3), 2, 2, 9, 20, 1, (3, 4), (False, True), [5, 4]),       # periodic W: 5 windows → 8, 8, 4 cols
        ((1, 2), 3, 3, 13, 16, 1, (4, 4), (False, False), [6, 5, 5])],
}


def _cfg(heads, patch, window, wrap):
    return SimpleNamespace(kind="swin", d_model=heads * D_HEAD, n_layers=2, n_heads=heads, ffn_hidden=24,
                           norm_eps=1e-5, patch_size=patch, window=list(window), in_channels=3, out_channels=3,
                           init_std=0.2, wrap=list(wrap))


def _predicted(grid, cp, heads, H, W, patch, window, wrap, ck="none") -> dict:
    """The cost model's communication for this case as a trainer config (fp32: elements = bytes / 4)."""
    m = _cfg(heads, patch, window, wrap)
    c = config_from_dict({"model": vars(m), "data": {"source": "weather", "image": [H, W], "channels": 3},
                          "parallel": {"wp": list(grid), "cp": cp},
                          "train": {"global_batch": B, "micro_batch": B, "precision": "fp32",
                                    "activation_checkpointing": ck}})
    sh, loc = rank_inputs(c, builtin_profiles()["cpu"])
    (a2as, a2a_bytes), (rolls, halo_bytes) = ulysses_traffic(c, loc), swin_halo_traffic(c, sh, loc)
    return {"a2as": a2as, "a2a": a2a_bytes / loc.bpe, "rolls": rolls, "halo": halo_bytes / loc.bpe,
            "passes": exchange_passes(c)}


def _groups(world: int, grid: tuple[int, int], cp: int, cache: dict):
    """(wp group, cp group) of this rank from the mesh the trainer builds for wp = grid, cp (every rank builds it)."""
    if (grid, cp) not in cache:
        mesh = build_mesh(ParallelConfig(wp=list(grid), cp=cp), world)
        assert mesh.coords() == {"pp": 0, "dp": 0, "wp": dist.get_rank() // cp, "cp": dist.get_rank() % cp, "tp": 0}
        cache[(grid, cp)] = (mesh.wp_group, mesh.cp_group)
    return cache[(grid, cp)]


def _model_cases(rank: int, world: int) -> int:
    cache: dict = {}
    for case_id, (grid, cp, heads, H, W, patch, window, wrap, rows_expected) in enumerate(CASES[world]):
        nwp = grid[0] * grid[1]
        assert nwp * cp == world
        wp_group, cp_group = _groups(world, grid, cp, cache)
        cfg = _cfg(heads, patch, window, wrap)
        gen = torch.Generator().manual_seed(70 + case_id)
        x = torch.randn(B, H, W, 3, generator=gen, dtype=torch.float64)
        y = torch.randn(B, H, W, 3, generator=gen, dtype=torch.float64)
        torch.manual_seed(case_id)
        ref = build_swin(cfg, wp_group=None, grid=(1, 1)).double()  # None with grid 1×1: no wp (mesh style)
        with torch.no_grad():  # the zero-initialised head would hide every block from the gradients
            ref.head.weight.normal_(std=0.2, generator=gen)
            ref.blocks["1"].bias.normal_(std=0.5, generator=gen)  # distinct heads: a swapped head slice shows
        ref_loss, ref_count = ref({"x": x, "y": y, "image_size": (H, W)})
        ref_loss.backward()

        par = build_swin(cfg, wp_group=wp_group, grid=grid, cp_group=cp_group).double()  # wp None when nwp = 1
        par.load_state_dict(ref.state_dict())
        tag = f"case {case_id} grid {grid} cp {cp} image {H}x{W} patch {patch} window {window}"
        layout, _ = par.layout((H, W))
        th, tw = layout.tile_shape(par.wp_rank)
        counts, share = par.cp_rows(layout, par.wp_rank)
        if isinstance(rows_expected[0], list):
            rows_expected = rows_expected[par.wp_rank]
        assert counts == rows_expected, f"{tag}: rows {counts}"
        rows, cols = par.tile_slices((H, W))
        reset_ulysses_stats()
        reset_halo_stats()
        loss, count = par({"x": x[:, rows, cols], "y": y[:, rows, cols], "image_size": (H, W)})

        # communication in the forward: 2 all-to-alls per block; each sends what leaves this rank
        n_r, n_all, d, L = counts[par.cp_rank] * tw, th * tw, cfg.d_model, cfg.n_layers
        a2a_fwd = L * 8 * B * (d // cp) * (3 * n_r * (cp - 1) + (n_all - n_r))
        assert ulysses_stats() == {"calls": 2 * L, "bytes_sent": a2a_fwd}, (tag, ulysses_stats(), a2a_fwd)
        sh, sw = (window[0] // 2 if grid[0] > 1 else 0), (window[1] // 2 if grid[1] > 1 else 0)
        halo_fwd = halo_tokens(th, tw, sh, sw) * B * (3 + 1) * (d // cp) * 8  # q|k|v there, out back: heads/cp
        assert halo_stats()["bytes_sent"] == halo_fwd, (tag, halo_stats(), halo_fwd)
        loss.backward()
        a2a_bwd = L * 8 * B * (d // cp) * (n_r * (cp - 1) + 3 * (n_all - n_r))  # the adjoint exchanges
        assert ulysses_stats() == {"calls": 4 * L, "bytes_sent": a2a_fwd + a2a_bwd}, (tag, ulysses_stats())
        assert halo_stats()["bytes_sent"] == 2 * halo_fwd, (tag, halo_stats())  # the adjoint rolls, as many

        # the cost model predicts what ran: L·a2as all-to-alls per pass; forward + backward elements averaged
        # over the tile's cp ranks (uneven bands send unequal amounts); the halo of the largest tile (one
        # shifted block of L = 2)
        pred = _predicted(grid, cp, heads, H, W, patch, window, wrap)
        assert pred["passes"] * L * pred["a2as"] == ulysses_stats()["calls"], (tag, pred)
        sent = torch.tensor([float(ulysses_stats()["bytes_sent"])], dtype=torch.float64)
        dist.all_reduce(sent, group=cp_group)
        largest = (th, tw) == tuple(max(s) for s in zip(*(layout.tile_shape(r) for r in range(nwp))))
        if largest:
            assert float(sent) / cp == pytest.approx(2 * L * pred["a2a"] * 8, rel=1e-12), (tag, float(sent), pred)
            assert (L // 2) * pred["halo"] * 8 == halo_fwd and pred["rolls"] == (2 if nwp > 1 else 0), (tag, pred)
        else:
            assert halo_fwd <= (L // 2) * pred["halo"] * 8, (tag, pred)

        assert float(count) == B * (rows.stop - rows.start) * (cols.stop - cols.start) * 3, tag
        total = torch.stack([loss.detach(), count.double()])
        dist.all_reduce(total)
        assert float(total[1]) == float(ref_count) == B * H * W * 3, tag
        assert torch.allclose(total[0], ref_loss.detach(), rtol=1e-11, atol=0), f"{tag}: {total[0]} vs {ref_loss}"
        for (name, p_ref), p in zip(ref.named_parameters(), par.parameters()):
            g = p.grad.clone()
            dist.all_reduce(g)  # replicated weights: the gradient reduction over wp × cp
            assert p_ref.grad.abs().max() > 0, f"{tag}: {name} has no gradient in the reference"
            assert torch.allclose(g, p_ref.grad, rtol=1e-9, atol=1e-12), \
                f"{tag}: {name} grad max err {(g - p_ref.grad).abs().max()}"

        # checkpointing (a swin's selective recomputes whole blocks, like full): the forward's all-to-alls and
        # halo rolls run again in the backward — the third pass the cost model counts
        ck = build_swin(cfg, wp_group=wp_group, grid=grid, cp_group=cp_group,
                        activation_checkpointing="selective").double()
        ck.load_state_dict(ref.state_dict())
        reset_ulysses_stats()
        reset_halo_stats()
        ck({"x": x[:, rows, cols], "y": y[:, rows, cols], "image_size": (H, W)})[0].backward()
        pred_ck = _predicted(grid, cp, heads, H, W, patch, window, wrap, "selective")
        assert pred_ck["passes"] * L * pred_ck["a2as"] == ulysses_stats()["calls"] == 6 * L, (tag, ulysses_stats())
        assert ulysses_stats()["bytes_sent"] == 2 * a2a_fwd + a2a_bwd, (tag, ulysses_stats())
        assert halo_stats()["bytes_sent"] == pred_ck["passes"] * halo_fwd, (tag, halo_stats())

    if world == 2:  # bad input: heads not divisible by cp, a tile with fewer token rows than cp ranks
        _, cp_group = _groups(world, (1, 1), 2, cache)
        with pytest.raises(ValueError, match=r"n_heads = 3 is not divisible by tp·cp = 1·2.*one of \[1, 3\]"):
            build_swin(_cfg(3, 1, (4, 4), (False, False)), wp_group=None, grid=(1, 1), cp_group=cp_group)
        one_row = build_swin(_cfg(2, 4, (1, 4), (False, False)), wp_group=None, grid=(1, 1), cp_group=cp_group)
        with pytest.raises(ValueError, match="cp = 2 .* only 1 token rows: use cp <= 1"):
            one_row.tile_slices((4, 16))
    return len(CASES[world])


@pytest.mark.parametrize("world", [2, 3, 4, 6])
def test_swin_wp_cp_equals_single_rank(world):
    assert run_ranks(_model_cases, world, timeout=150) == [len(CASES[world])] * world


def test_share_rows_split():
    assert share_rows(12, 3) == [4, 4, 4]   # whole window rows of 4 when they divide
    assert share_rows(12, 2) == [6, 6]      # balance over alignment (3 window rows of 4)
    assert share_rows(9, 2) == [5, 4]       # uneven: earlier ranks take the extra row
    assert share_rows(5, 1) == [5]
    with pytest.raises(ValueError, match="cp = 4 .* has only 3 token rows: use cp <= 3"):
        share_rows(3, 4)
    with pytest.raises(ValueError, match="cp = 0"):
        share_rows(3, 0)

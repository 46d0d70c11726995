"""The window-parallel Swin model equals the single-tile model: loss and parameter gradients.

wp = [1, 2] and [2, 1] on 2 ranks, [3, 1] (uneven: 5 window rows → 2 + 2 + 1) and [1, 3] on 3 ranks,
each against grid [1, 1] on the same full image, in float64, with images that need padding (any H×W
trains: padded tokens are masked out of attention and out of the loss), patch 1 and 2, periodic W.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from dist_train.config import config_from_dict
from dist_train.cost.step_time import halo_passes
from dist_train.models.swin import build_swin
from parallelism.window import halo_stats, reset_halo_stats
from tests.dist_harness import run_ranks

# (grid by world size, image H, W, patch, window, wrap)
CASES = {
    2: [((1, 2), 19, 22, 1, (4, 4), (False, False)),
        ((2, 1), 19, 22, 1, (4, 4), (False, False)),
        ((2, 1), 17, 24, 2, (3, 2), (False, True))],
    3: [((3, 1), 19, 10, 1, (4, 4), (False, False)),
        ((1, 3), 9, 26, 1, (3, 4), (False, False))],
}


def _cfg(patch, window, wrap):
    return SimpleNamespace(kind="swin", d_model=16, n_layers=2, n_heads=2, ffn_hidden=32, norm_eps=1e-5,
                           patch_size=patch, window=list(window), in_channels=3, out_channels=3, init_std=0.2,
                           wrap=list(wrap))


def _model_cases(rank: int, world: int) -> int:
    singles = [dist.new_group([r]) for r in range(world)]  # every rank creates every group, same order
    for case_id, (grid, H, W, patch, window, wrap) in enumerate(CASES[world]):
        cfg = _cfg(patch, window, wrap)
        gen = torch.Generator().manual_seed(50 + case_id)
        x = torch.randn(2, H, W, 3, generator=gen, dtype=torch.float64)
        y = torch.randn(2, H, W, 3, generator=gen, dtype=torch.float64)
        torch.manual_seed(case_id)
        ref = build_swin(cfg, wp_group=singles[rank], grid=(1, 1)).double()
        with torch.no_grad():  # the zero-initialised head would hide every block from the gradients
            ref.head.weight.normal_(std=0.2, generator=gen)
        torch.manual_seed(case_id)
        par = build_swin(cfg, wp_group=None, grid=grid).double()
        par.load_state_dict(ref.state_dict())
        ref_loss, ref_count = ref({"x": x, "y": y, "image_size": (H, W)})
        ref_loss.backward()

        rows, cols = par.tile_slices((H, W))
        loss, count = par({"x": x[:, rows, cols], "y": y[:, rows, cols], "image_size": (H, W)})
        loss.backward()
        total = torch.stack([loss.detach(), count.double()])
        dist.all_reduce(total)
        tag = f"case {case_id} grid {grid} image {H}x{W} patch {patch} window {window}"
        assert float(total[1]) == float(ref_count) == 2 * H * W * 3, tag
        assert torch.allclose(total[0], ref_loss.detach(), rtol=1e-11, atol=0), f"{tag}: {total[0]} vs {ref_loss}"
        for (name, p_ref), p in zip(ref.named_parameters(), par.parameters()):
            g = p.grad.clone()
            dist.all_reduce(g)  # replicated weights: the gradient reduction over wp
            assert p_ref.grad.abs().max() > 0, f"{tag}: {name} has no gradient in the reference"
            assert torch.allclose(g, p_ref.grad, rtol=1e-9, atol=1e-12), \
                f"{tag}: {name} grad max err {(g - p_ref.grad).abs().max()}"

        # checkpointing: torch's recompute stops once the saved tensors are back, so a shifted block's opening
        # roll runs again and its closing one (after fc2) does not — what the cost model's halo_passes counts
        ck = build_swin(cfg, wp_group=None, grid=grid, activation_checkpointing="full").double()
        ck.load_state_dict(ref.state_dict())
        reset_halo_stats()
        loss_ck = ck({"x": x[:, rows, cols], "y": y[:, rows, cols], "image_size": (H, W)})[0]
        forward = halo_stats()["bytes_sent"]
        loss_ck.backward()
        planned = config_from_dict({
            "model": {"kind": "swin", "d_model": cfg.d_model, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
                      "ffn_hidden": cfg.ffn_hidden, "patch_size": patch, "window": list(window), "in_channels": 3,
                      "out_channels": 3, "wrap": list(wrap)},
            "data": {"source": "weather", "image": [H, W]}, "parallel": {"wp": list(grid)},
            "train": {"global_batch": 2, "micro_batch": 2, "activation_checkpointing": "full"}})
        assert forward > 0 and halo_stats()["bytes_sent"] == halo_passes(planned) * forward == 2.5 * forward, \
            (tag, forward, halo_stats())
    return len(CASES[world])


@pytest.mark.parametrize("world", [2, 3])
def test_swin_window_parallel_equals_single_tile(world):
    assert run_ranks(_model_cases, world, timeout=150) == [len(CASES[world])] * world


def test_swin_rejects_bad_tiles_and_periodic_padding():
    cfg = _cfg(1, (4, 4), (False, False))
    model = build_swin(cfg, wp_group=None, grid=(1, 1))
    x = torch.zeros(1, 8, 8, 3)
    with pytest.raises(ValueError, match="tile_slices"):
        model({"x": x, "y": x, "image_size": (8, 12)})
    periodic = build_swin(_cfg(1, (4, 4), (False, True)), wp_group=None, grid=(1, 1))
    with pytest.raises(ValueError, match="periodic along W"):
        periodic({"x": torch.zeros(1, 8, 10, 3), "y": torch.zeros(1, 8, 10, 3), "image_size": (8, 10)})
    loss, count = model({"x": x, "y": x + 1, "image_size": (8, 8)})
    assert float(count) == 8 * 8 * 3 and float(loss.detach()) == pytest.approx(8 * 8 * 3)  # zero head: persistence

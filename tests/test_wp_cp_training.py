"""Training the Swin with wp × cp (Ulysses inside windows) equals single-rank training.

wp [1, 2] × cp 2 on 4 ranks: each cp rank reads only its share (6 of the tile's 12 padded token rows) of every
sample through WeatherBatcher → model.tile_slices, and its (loss_sum, count) covers only that share; the
trainer's global count and the gradient reduction over dp × wp × cp make the 5 losses equal the wp [1, 1]
single-rank run. dp 2 × cp 2 (wp [1, 1]) on the same 4 ranks likewise. A rank reading more than its
share would be rejected by the model (shape check); a wrong count would change the losses.

An odd wp grid × cp on 6 ranks: wp [3, 1] × cp 2 (tiles of 4 token rows; the last tile holds image rows 8-9 and
2 padding rows, so its second cp rank reads no pixel at all) and wp [1, 3] × cp 2 (periodic W, uneven tiles of
8, 4, 4 columns).
"""
import pytest

from dist_train.trainer import train
from tests.dist_harness import run_ranks
from tests.test_training_swin import _swin_cases as _train_cases
from tests.trainer_utils import rel_close, tiny_swin_config


def test_wp_cp_training_matches_single_rank(tmp_path):
    data = tmp_path / "weather"
    ref = train(tiny_swin_config(tmp_path / "ref", data))
    # dp 2 × cp 2 with wp [1, 1]: the mesh passes wp_group None (must not be read as the default group)
    cases = [{"wp": [1, 2], "cp": 2}, {"dp": 2, "cp": 2}]
    for rank_out in run_ranks(_train_cases, 4, args=(str(tmp_path), str(data), cases), timeout=240):
        for par, (losses, gn) in zip(cases, rank_out):
            assert rel_close(losses, ref.losses, 1e-5), (par, losses, ref.losses)
            assert rel_close([gn], ref.grad_norms[:1], 1e-5), (par, gn, ref.grad_norms[0])


@pytest.mark.slow
def test_odd_wp_grid_with_cp_on_six_ranks_matches_single_rank(tmp_path):
    data = tmp_path / "weather"
    ref = train(tiny_swin_config(tmp_path / "ref", data))
    cases = [{"wp": [3, 1], "cp": 2}, {"wp": [1, 3], "cp": 2}]
    for rank_out in run_ranks(_train_cases, 6, args=(str(tmp_path), str(data), cases), timeout=240):
        for par, (losses, gn) in zip(cases, rank_out):
            assert rel_close(losses, ref.losses, 1e-5), (par, losses, ref.losses)
            assert rel_close([gn], ref.grad_norms[:1], 1e-5), (par, gn, ref.grad_norms[0])

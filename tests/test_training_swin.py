"""Window parallelism inside the Swin trainer: tiled training equals single-rank training."""
from dist_train.trainer import train
from tests.dist_harness import run_ranks
from tests.trainer_utils import rel_close, tiny_swin_config


def _swin_cases(rank, world, root, data_dir, cases):
    out = []
    for i, par in enumerate(cases):
        res = train(tiny_swin_config(f"{root}/{i}", data_dir, parallel=par))
        out.append((res.losses, res.grad_norms[0]))
    return out


def test_wp_tiles_match_single_rank(tmp_path):
    data = tmp_path / "weather"
    ref = train(tiny_swin_config(tmp_path / "ref", data))
    cases = [{"wp": [1, 2]}, {"wp": [2, 1]}]  # [2, 1]: 3 window rows over 2 ranks -> uneven 2 + 1 (padded)
    for rank_out in run_ranks(_swin_cases, 2, args=(str(tmp_path), str(data), cases), timeout=240):
        for par, (losses, gn) in zip(cases, rank_out):
            assert rel_close(losses, ref.losses, 1e-5), (par, losses, ref.losses)
            assert rel_close([gn], ref.grad_norms[:1], 1e-5), (par, gn, ref.grad_norms[0])


def test_dp2_wp_1x2_on_four_ranks_matches_single_rank(tmp_path):
    data = tmp_path / "weather"
    ref = train(tiny_swin_config(tmp_path / "ref", data))
    cases = [{"dp": 2, "wp": [1, 2]}]
    for rank_out in run_ranks(_swin_cases, 4, args=(str(tmp_path), str(data), cases), timeout=240):
        losses, gn = rank_out[0]
        assert rel_close(losses, ref.losses, 1e-5), (losses, ref.losses)
        assert rel_close([gn], ref.grad_norms[:1], 1e-5), (gn, ref.grad_norms[0])

"""A swin tiling the ranks would refuse at build time (a periodic axis that needs padding, more tiles than
windows, a tile with fewer token rows than cp) is refused by the config, before any rank starts, in one line
— and exactly those: the config's arithmetic agrees with the functions every rank runs (``SwinModel.layout``,
``TileLayout.build``, ``share_rows``) on each case."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from dist_train.config import ConfigError
from dist_train.models.swin import SwinModel
from parallelism.window import share_rows
from parallelism.window.layout import as_pair
from tests.trainer_utils import tiny_swin_config

# (image, patch, window, wrap, wp grid, cp); tiny_swin_config has 2 heads, so cp <= 2
CASES = [
    ((10, 16), 1, 4, [False, True], [1, 1], 1),   # H pads 10 -> 12, W periodic and whole: fine
    ((10, 16), 1, 4, [True, True], [1, 1], 1),    # H periodic but needs padding
    ((10, 18), 1, 4, [False, True], [1, 1], 1),   # W periodic, 18 not a multiple of 4
    ((10, 18), 2, 3, [False, True], [1, 1], 1),   # patch 2: 9 tokens = 3 windows of 3: fine
    ((10, 16), 1, 4, [False, True], [3, 1], 1),   # 3 window rows over 3 tiles: fine
    ((10, 16), 1, 4, [False, True], [4, 1], 1),   # 3 window rows, 4 tiles
    ((10, 16), 1, 4, [False, True], [1, 5], 1),   # 4 window columns, 5 tiles
    ((10, 16), 1, [1, 4], [False, True], [10, 1], 2),  # 1-row tiles split over cp 2
    ((10, 16), 1, [2, 4], [False, True], [5, 1], 2),   # 2-row tiles over cp 2: fine
]


def _rank_refuses(image, patch, window, wrap, grid, cp) -> bool:
    model = SimpleNamespace(patch=patch, window=as_pair(window, "window"), wrap=tuple(wrap), grid=tuple(grid))
    try:
        layout, _ = SwinModel.layout(model, image)
        for rank in range(grid[0] * grid[1]):
            share_rows(layout.tile_shape(rank)[0], cp)
    except ValueError:
        return True
    return False


@pytest.mark.parametrize("image, patch, window, wrap, grid, cp", CASES)
def test_config_refuses_exactly_the_tilings_a_rank_would(tmp_path, image, patch, window, wrap, grid, cp):
    sections = {"model": {"patch_size": patch, "window": window, "wrap": wrap},
                "data": {"image": list(image)}, "parallel": {"wp": grid, "cp": cp}}
    refuses = _rank_refuses(image, patch, window, wrap, grid, cp)
    if not refuses:
        tiny_swin_config(tmp_path, tmp_path, **sections)
        return
    with pytest.raises(ConfigError) as info:
        tiny_swin_config(tmp_path, tmp_path, **sections)
    msg = str(info.value)
    assert "\n" not in msg and ("model.wrap" in msg or "parallel.wp" in msg or "parallel.cp" in msg), msg


def test_the_cases_cover_every_rule():
    verdicts = [_rank_refuses(*case) for case in CASES]
    assert 3 <= sum(verdicts) < len(CASES)


@pytest.mark.parametrize("parallel, accepted", [
    ({"cp": 2}, True),                                              # the defaults: ring, zigzag
    ({"cp": 2, "cp_method": "ulysses"}, True),                      # what runs
    ({"cp": 2, "cp_method": "ulysses", "ulysses_degree": 2}, True),
    ({"cp": 1, "cp_layout": "striped", "cp_kv_piece": 8}, True),    # no cp: nothing to ignore
    ({"cp": 2, "cp_method": "hybrid", "ulysses_degree": 2}, "cp_method = 'hybrid'"),
    ({"cp": 2, "cp_layout": "contiguous"}, "cp_layout = 'contiguous'"),
    ({"wp": [3, 1], "cp": 2, "cp_kv_piece": 4}, "cp_kv_piece = 4"),
])
def test_config_refuses_cp_fields_a_swin_would_ignore(tmp_path, parallel, accepted):
    """Swin's cp is Ulysses inside windows over the whole cp group: a ring/hybrid field would be silently ignored."""
    if accepted is True:
        tiny_swin_config(tmp_path, tmp_path, parallel=parallel)
        return
    with pytest.raises(ConfigError) as info:
        tiny_swin_config(tmp_path, tmp_path, parallel=parallel)
    msg = str(info.value)
    assert "\n" not in msg and f"parallel.{accepted} with model.kind = swin" in msg and "remove it" in msg, msg

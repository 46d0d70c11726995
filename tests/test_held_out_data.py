"""Held-out data stays held out: what the validation share may and may not shape (no processes, tiny data)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from dist_train.data.image_batches import WeatherBatcher
from dist_train.data.weather import prepare_weather
from tests.trainer_utils import tiny_swin_config

ONE_RANK = SimpleNamespace(rank=0, size=lambda axis: 1, coord=lambda axis: 0)
WHOLE_IMAGE = SimpleNamespace(tile_slices=lambda size: (slice(0, size[0]), slice(0, size[1])))


def test_weather_normalisation_comes_from_the_training_share_only(tmp_path):
    """The per-channel mean and increment scale came from every time step, the validation share's included: the
    held-out fields shaped every training input. Now from the steps the training samples read (inputs and targets),
    and the validation batcher normalises with those same numbers."""
    cfg = tiny_swin_config(tmp_path / "run", tmp_path / "w", data={"split": "50,50,0"})
    prepare_weather(tmp_path / "w", height=10, width=16, steps=12, channels=2, seed=cfg.run.seed)
    fields = np.load(tmp_path / "w" / "fields.npy", mmap_mode="r+")  # 11 pairs: training 0..5 read steps 0..6
    fields[7:] = 1000.0 + 50.0 * np.arange(5, dtype=np.float32)[:, None, None, None]  # held-out steps far off
    fields.flush()
    train = WeatherBatcher(cfg, ONE_RANK, WHOLE_IMAGE, "train")
    valid = WeatherBatcher(cfg, ONE_RANK, WHOLE_IMAGE, "valid")
    sub = np.asarray(fields[:7, ::4, ::4], dtype=np.float64)
    want_mean = sub.reshape(-1, 2).mean(axis=0)
    want_scale = np.diff(sub, axis=0).reshape(-1, 2).std(axis=0)
    assert torch.allclose(train.mean.double(), torch.from_numpy(want_mean), rtol=1e-6)
    assert torch.allclose(train.scale.double(), torch.from_numpy(want_scale), rtol=1e-6)
    assert torch.equal(valid.mean, train.mean) and torch.equal(valid.scale, train.scale)
    assert (train.first, train.num_samples, valid.first, valid.num_samples) == (0, 6, 6, 5)

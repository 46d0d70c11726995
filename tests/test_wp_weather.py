"""The generated weather dataset: deterministic, tile reads, physics sanity; the Swin model learns it."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dist_train.data.weather import WeatherDataset, prepare_weather
from dist_train.models.swin import build_swin


def test_prepare_is_deterministic_and_tiles_read_the_memmap(tmp_path):
    a = WeatherDataset(prepare_weather(tmp_path / "a", height=24, width=48, steps=6, channels=3, seed=5))
    b = WeatherDataset(prepare_weather(tmp_path / "b", height=24, width=48, steps=6, channels=3, seed=5))
    c = WeatherDataset(prepare_weather(tmp_path / "c", height=24, width=48, steps=6, channels=3, seed=6))
    assert np.array_equal(a.fields, b.fields) and not np.array_equal(a.fields, c.fields)
    assert isinstance(a.fields, np.memmap) and len(a) == 5 and a.image_size == (24, 48)
    tile = a.sample(7, slice(8, 16), slice(24, 48))  # index wraps: t = 7 mod 5 = 2
    assert tile["x"].shape == (8, 24, 3) and tile["x"].dtype == torch.float32
    assert torch.equal(tile["x"], torch.from_numpy(np.array(a.fields[2, 8:16, 24:48])))
    assert torch.equal(tile["y"], torch.from_numpy(np.array(a.fields[3, 8:16, 24:48])))
    batch = a.batch([0, 1], slice(0, 24), slice(0, 48))
    assert batch["x"].shape == (2, 24, 48, 3) and batch["image_size"] == (24, 48)
    # fields evolve, stay finite and bounded; the same directory is reused, not regenerated
    assert np.isfinite(a.fields).all() and np.abs(a.fields).max() < 20
    assert not np.allclose(a.fields[0], a.fields[1])
    assert prepare_weather(tmp_path / "a", height=24, width=48, steps=6, channels=3, seed=5) == tmp_path / "a"
    with pytest.raises(ValueError, match="height"):
        prepare_weather(tmp_path / "d", height=1, width=48, steps=6, channels=3, seed=5)


def test_zonal_wind_moves_fields_eastward(tmp_path):
    ds = WeatherDataset(prepare_weather(tmp_path / "w", height=8, width=256, steps=4, channels=1, seed=1))
    f0, f3 = np.array(ds.fields[0, 3:5, :, 0]), np.array(ds.fields[3, 3:5, :, 0])  # rows at the equator
    corr = [float((np.roll(f0, s, axis=1) * f3).sum()) for s in range(-8, 9)]
    assert int(np.argmax(corr)) - 8 >= 3  # 3 steps of a ~1.5 cells/step jet: an eastward shift


def test_swin_learns_next_step(tmp_path):
    ds = WeatherDataset(prepare_weather(tmp_path / "t", height=16, width=32, steps=8, channels=2, seed=0))
    cfg = SimpleNamespace(kind="swin", d_model=16, n_layers=2, n_heads=2, ffn_hidden=32, norm_eps=1e-5,
                          patch_size=1, window=4, in_channels=2, out_channels=2)
    torch.manual_seed(0)
    model = build_swin(cfg, wp_group=None, grid=(1, 1))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    rows, cols = model.tile_slices(ds.image_size)
    losses = []
    for step in range(30):
        loss_sum, count = model(ds.batch([step % len(ds)], rows, cols))
        loss = loss_sum / count
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses

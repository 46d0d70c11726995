"""The generated weather dataset: deterministic, tile reads, physics sanity; the Swin model learns it."""
from __future__ import annotations

import re
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dist_train.config import ConfigError
from dist_train.data import weather
from dist_train.data.weather import WeatherDataset, prepare_weather
from dist_train.models.swin import build_swin
from dist_train.preflight import check_data
from dist_train.trainer import train
from tests.trainer_utils import tiny_swin_config


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


def test_a_dataset_of_another_config_is_never_regenerated_in_place(tmp_path):
    """Another job (or a resume with another run.seed, data.image, data.steps or data.channels) at the same
    data.path used to regenerate fields.npy in place: a job training on it read the other job's numbers through its
    memory map (measured: a time step changed by 0.41 under it), and a resume continued on other data with the same
    sample count. Now refused in one line, with the file untouched."""
    path = tmp_path / "w"
    a = WeatherDataset(prepare_weather(path, height=10, width=16, steps=12, channels=2, seed=3))
    before = np.array(a.fields).copy()
    meta = (path / "meta.json").read_text()
    for change, words in ((dict(seed=4), "seed 3"), (dict(height=6), "height 10"), (dict(steps=16), "steps 12"),
                          (dict(channels=3), "channels 2")):
        kw = {**dict(height=10, width=16, steps=12, channels=2, seed=3), **change}
        with pytest.raises(ValueError) as info:
            prepare_weather(path, **kw)
        msg = str(info.value)
        assert "\n" not in msg and words in msg and str(path) in msg and "another data.path" in msg, msg
    assert np.array_equal(np.array(a.fields), before) and (path / "meta.json").read_text() == meta
    assert sorted(p.name for p in path.iterdir()) == [".prepare.lock", "fields.npy", "meta.json"]


def test_an_interrupted_generation_is_never_read_as_a_dataset(tmp_path, monkeypatch):
    """fields.npy is written under a temporary name and renamed, meta.json last: a kill mid-way leaves no
    half-written dataset behind a matching meta.json, and the next start generates it again."""
    path = tmp_path / "w"
    calls = []

    def killed(*args, **kwargs):
        calls.append(1)
        raise KeyboardInterrupt  # stands in for a kill between two time steps

    monkeypatch.setattr("dist_train.data.weather._laplacian", killed)
    with pytest.raises(KeyboardInterrupt):
        prepare_weather(path, height=10, width=16, steps=12, channels=2, seed=3)
    assert calls and sorted(p.name for p in path.iterdir()) == [".prepare.lock"]
    monkeypatch.undo()
    ds = WeatherDataset(prepare_weather(path, height=10, width=16, steps=12, channels=2, seed=3))
    fresh = WeatherDataset(prepare_weather(tmp_path / "fresh", height=10, width=16, steps=12, channels=2, seed=3))
    assert np.array_equal(ds.fields, fresh.fields)


def test_preflight_refuses_another_dataset_at_the_weather_path_before_any_rank_starts(tmp_path):
    path = tmp_path / "w"
    prepare_weather(path, height=10, width=16, steps=12, channels=2, seed=3)  # what tiny_swin_config generates
    check_data(tiny_swin_config(tmp_path / "run", path))
    with pytest.raises(ConfigError, match=r"holds a weather dataset generated with height 10, this run needs height 6"):
        check_data(tiny_swin_config(tmp_path / "run", path, data={"image": [6, 16]}))


def test_own_fields_are_read_as_they_are_and_never_generated_over(tmp_path):
    """A fields.npy of one's own at data.path (no meta.json) was replaced by the generated fields, and the run
    trained on those without a word. Now: refused in one line naming the meta.json that makes them read, the file
    untouched; with it, they are what the batches hold, and a shape other than the config's is one line."""
    path = tmp_path / "own"
    path.mkdir()
    own = np.random.default_rng(0).standard_normal((12, 10, 16, 2)).astype(np.float32)  # tiny_swin_config's shape
    np.save(path / "fields.npy", own)
    cfg = tiny_swin_config(tmp_path / "run", path)
    with pytest.raises(ConfigError) as info:
        check_data(cfg)
    msg = str(info.value)
    assert "\n" not in msg and "holds fields.npy but no meta.json" in msg and '{"source": "own"}' in msg, msg
    with pytest.raises(ValueError, match="holds fields.npy but no meta.json"):
        prepare_weather(path, height=10, width=16, steps=12, channels=2, seed=3)
    assert np.array_equal(np.load(path / "fields.npy"), own) and [p.name for p in path.iterdir()] == ["fields.npy"]

    (path / "meta.json").write_text('{"source": "own"}')
    check_data(cfg)
    ds = WeatherDataset(prepare_weather(path, height=10, width=16, steps=12, channels=2, seed=3))
    assert np.array_equal(ds.sample(4, slice(0, 10), slice(0, 16))["y"].numpy(), own[5])
    res = train(cfg)
    assert len(res.losses) == 5 and np.array_equal(np.load(path / "fields.npy"), own)
    with pytest.raises(ConfigError, match=r"holds your own fields of shape \[12, 10, 16, 2\] \[steps, H, W, C\], "
                                          r"this run reads \[12, 6, 16, 2\]"):
        check_data(tiny_swin_config(tmp_path / "run2", path, data={"image": [6, 16]}))
    np.save(path / "fields.npy", own.astype(np.int32))
    with pytest.raises(ConfigError, match="holds int32 values; the fields must be floating point"):
        check_data(cfg)



@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_own_fields_with_a_non_finite_value_are_refused_before_the_ranks_naming_its_time_step(tmp_path, monkeypatch,
                                                                                              bad):
    """A NaN or ±inf in one's own fields passed the pre-flight; the ranks then normalised with NaN statistics (or hit
    it in a later batch) and the run stopped as diverged. Now one line naming the time step, before any rank (scanned
    in chunks of whole steps: a tiny chunk size here makes the bad step's chunk not the first)."""
    monkeypatch.setattr(weather, "_SCAN_BYTES", 1)
    path = tmp_path / "own"
    path.mkdir()
    own = np.random.default_rng(0).standard_normal((12, 10, 16, 2)).astype(np.float32)
    own[9, 7, 3, 1] = bad
    np.save(path / "fields.npy", own)
    (path / "meta.json").write_text('{"source": "own"}')
    with pytest.raises(ConfigError) as info:
        check_data(tiny_swin_config(tmp_path / "run", path))
    msg = str(info.value)
    assert "\n" not in msg and "fields.npy holds NaN or ±inf at time step 9 (of 12)" in msg, msg
    assert weather.first_nonfinite_step(np.load(path / "fields.npy", mmap_mode="r")) == 9
    own[9, 7, 3, 1] = 0.0
    assert weather.first_nonfinite_step(own) is None


def test_own_fields_big_endian_read_as_the_same_numbers_and_a_meta_with_unread_keys_is_refused(tmp_path):
    """Big-endian own fields (">f4", e.g. converted from a big-endian archive) passed the pre-flight and every rank then
    failed in torch.from_numpy ("byte order different from the native"); they now read as the same numbers. A
    meta.json of own fields with any other key was read as a generated dataset's and refused as "generated with
    version None, …"; it is now refused naming the keys nothing reads."""
    path = tmp_path / "own"
    path.mkdir()
    own = np.random.default_rng(0).standard_normal((12, 10, 16, 2)).astype(np.float32)
    np.save(path / "fields.npy", own.astype(">f4"))
    (path / "meta.json").write_text('{"source": "own"}')
    cfg = tiny_swin_config(tmp_path / "run", path)
    check_data(cfg)
    got = WeatherDataset(prepare_weather(path, height=10, width=16, steps=12, channels=2, seed=3)).sample(
        4, slice(0, 10), slice(2, 9))
    assert np.array_equal(got["x"].numpy(), own[4, :, 2:9]) and np.array_equal(got["y"].numpy(), own[5, :, 2:9])
    (path / "meta.json").write_text('{"source": "own", "units": "K"}')
    with pytest.raises(ConfigError) as info:
        check_data(cfg)
    msg = str(info.value)
    assert "\n" not in msg and 'meta.json says own fields but also holds units' in msg and "version" not in msg, msg
    (path / "meta.json").write_text('["own"]')
    with pytest.raises(ConfigError, match="holds a weather dataset generated with"):
        check_data(cfg)


def test_own_fields_that_are_no_npy_array_are_refused_in_one_line(tmp_path):
    """An empty fields.npy raised EOFError and a .npz saved as fields.npy AttributeError: tracebacks from the
    pre-flight. Each is one line now."""
    path = tmp_path / "own"
    path.mkdir()
    (path / "meta.json").write_text('{"source": "own"}')
    cfg = tiny_swin_config(tmp_path / "run", path)
    (path / "fields.npy").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"fields.npy is not a readable .npy array \(No data left in file\)$"):
        check_data(cfg)
    with open(path / "fields.npy", "wb") as fh:
        np.savez(fh, fields=np.zeros((12, 10, 16, 2), np.float32))
    with pytest.raises(ConfigError, match="fields.npy is a .npz archive, not one array; write the"):
        check_data(cfg)

def test_two_jobs_generating_at_one_fresh_path_never_mix_their_datasets(tmp_path, monkeypatch):
    """Two jobs (other run.seed) prepare the same fresh path at once (threads here: flock conflicts between two
    open()s as between two processes; the generation is slowed so that they overlap): one generates, the other then
    finds a dataset of other settings and is refused; the files left are exactly the winner's dataset."""
    generate = weather._generate

    def slow(*args):
        time.sleep(0.5)
        generate(*args)

    monkeypatch.setattr(weather, "_generate", slow)
    outcome = {}

    def job(seed):
        try:
            prepare_weather(tmp_path / "w", height=10, width=16, steps=12, channels=2, seed=seed)
            outcome[seed] = "ok"
        except ValueError as e:
            outcome[seed] = str(e)

    threads = [threading.Thread(target=job, args=(seed,)) for seed in (5, 6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    winner = [seed for seed, said in outcome.items() if said == "ok"]
    assert len(winner) == 1, outcome
    loser = ({5, 6} - set(winner)).pop()
    assert "holds a weather dataset generated with seed" in outcome[loser], outcome
    monkeypatch.undo()
    alone = WeatherDataset(prepare_weather(tmp_path / "alone", height=10, width=16, steps=12, channels=2,
                                           seed=winner[0]))
    assert np.array_equal(WeatherDataset(tmp_path / "w").fields, alone.fields)


@pytest.mark.parametrize("data, model", [({"channels": 4}, {}), ({}, {"out_channels": 3}), ({}, {"in_channels": 1})])
def test_preflight_refuses_channels_the_first_batch_would_not_fit(data, model, tmp_path):
    """x and y of a weather batch both hold data.channels fields; a swin built for other in/out channels refused its
    first batch on every rank after start-up, naming tensor shapes. Now one line naming the three keys, before."""
    cfg = tiny_swin_config(tmp_path / "run", tmp_path / "w", data=data, model=model)
    with pytest.raises(ConfigError, match=r"^data.channels = \d+ with model.in_channels = \d+, model.out_channels = \d+"):
        check_data(cfg)


@pytest.mark.parametrize("split, train, refused", [("99,1,0", {"eval_every": 2}, "the valid share of the 11"),
                                                   ("0.01,99,0", {}, "the train share of the 11"),
                                                   ("99,1,0", {}, None),
                                                   ("80,20,0", {"eval_every": 2, "eval_steps": 1}, None)])
def test_preflight_refuses_an_empty_weather_split_share_before_any_rank_starts(split, train, refused, tmp_path):
    """data.split over data.steps - 1 forecasting pairs: an empty training share (or validation share, when
    validation runs) was refused by every rank's batcher after start-up; it depends on the config alone."""
    cfg = tiny_swin_config(tmp_path / "run", tmp_path / "w", data={"split": split}, train=train)
    if refused is None:
        check_data(cfg)
        return
    with pytest.raises(ConfigError, match=rf"^data.split = '{re.escape(split)}': {refused} weather samples"):
        check_data(cfg)

"""A generated high-resolution "weather" dataset: tracers advected by a zonal jet on a lat–lon grid.

    path = prepare_weather("data/weather", height=256, width=512, steps=64, channels=4, seed=0)
    ds = WeatherDataset(path)
    ds.sample(i, rows, cols)  # {"x": [h, w, C] at step t, "y": [h, w, C] at step t+1} for this tile only
    ds.batch([i, j], rows, cols)  # {"x": [B, h, w, C], "y": ..., "image_size": (H, W)}: what the Swin model eats

Physics (grid units, one step = one model time step): each channel c is a tracer f_c on an H×W
latitude–longitude grid, periodic in longitude (W) with closed poles (H). Per step:
zonal advection by u(lat) = 0.006·W·cos(lat)·(1 + 0.3·sin 3·lat) cells/step (semi-Lagrangian, linear
interpolation), meridional advection by v = v_max·sin(2·lon + c)·cos(lat), diffusion κ∇² (periodic in
lon, zero flux at the poles) and relaxation to a per-channel forcing pattern (time scale τ), so the
fields stay non-trivial for any number of steps; the first SPINUP_STEPS steps (the initial noise
diffusing) are not written. The whole array [steps, H, W, C] float32 is written
once to ``fields.npy`` (deterministic in ``seed``) and memory-mapped: ``sample`` reads only the tile.

Your own fields: a directory holding ``fields.npy`` [steps, H, W, C] (floating point) and ``meta.json`` =
``{"source": "own"}`` is read as it is (its shape must be the run's data.steps, data.image, data.channels) and never
generated over; a ``fields.npy`` without ``meta.json`` is refused, not replaced.
"""
from __future__ import annotations

import fcntl
import json
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from ..atomic_write import atomic_path, write_text_atomic

_FORMAT_VERSION = 2  # 2: the first SPINUP_STEPS steps are integrated but not written
# The initial state (forcing + small-scale noise) diffuses fast: its first increments are ~5x the later
# ones, and one such sample dominates a whole run's loss on a big grid (one sample per step). These steps are
# integrated before the first written one.
SPINUP_STEPS = 8
META_FILE, FIELDS_FILE, LOCK_FILE = "meta.json", "fields.npy", ".prepare.lock"
#: ``meta.json`` beside fields a person supplies (``fields.npy`` [steps, H, W, C], floating point): read as they are,
#: never generated over
OWN_META = {"source": "own"}


def _laplacian(f: np.ndarray) -> np.ndarray:
    """5-point Laplacian of [H, W, C]: periodic in W, zero-flux (mirrored) at the H edges."""
    up = np.concatenate([f[:1], f[:-1]], axis=0)
    down = np.concatenate([f[1:], f[-1:]], axis=0)
    return up + down + np.roll(f, 1, axis=1) + np.roll(f, -1, axis=1) - 4 * f


def _shift_rows(f: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """Semi-Lagrangian zonal shift: row r of [H, W, C] becomes f(x − cells[r]) (periodic, linear interp)."""
    h, w = f.shape[:2]
    base = np.floor(cells).astype(np.int64)
    frac = (cells - base)[:, None, None]
    cols = np.arange(w)[None, :]
    i0 = (cols - base[:, None]) % w
    i1 = (i0 - 1) % w
    rows = np.arange(h)[:, None]
    return (1 - frac) * f[rows, i0] + frac * f[rows, i1]


def _shift_cols(f: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """Meridional shift: column c of [H, W, C] becomes f(y − cells[:, c]) with clamping at the poles."""
    h = f.shape[0]
    y = np.arange(h)[:, None] - cells
    y = np.clip(y, 0, h - 1)
    y0 = np.floor(y).astype(np.int64)
    y1 = np.minimum(y0 + 1, h - 1)
    frac = (y - y0)[..., None]
    cols = np.arange(f.shape[1])[None, :]
    return (1 - frac) * f[y0, cols] + frac * f[y1, cols]


def weather_settings(data, seed: int) -> dict:
    """The settings of the dataset a run reads (:func:`prepare_weather`'s keywords) from its ``data`` section
    (data.image [H, W], data.steps, data.channels) and ``run.seed``: one mapping for the rank that generates it and
    for the pre-flight that refuses another dataset at data.path."""
    return {"height": int(data.image[0]), "width": int(data.image[1]), "steps": data.steps,
            "channels": data.channels, "seed": seed}


def weather_meta(*, height: int, width: int, steps: int, channels: int, seed: int) -> dict:
    """What ``meta.json`` records of a dataset generated with these settings (it is deterministic in them)."""
    return {"version": _FORMAT_VERSION, "height": height, "width": width, "steps": steps,
            "channels": channels, "seed": seed, "spinup": SPINUP_STEPS}


def own_fields_message(path: Union[str, Path], meta: dict, check_values: bool = True) -> Optional[str]:
    """For a directory whose ``meta.json`` is :data:`OWN_META` (fields a person supplies, never generated nor
    overwritten): one line when its ``fields.npy`` is not a float array of the shape [steps, H, W, C] the run's
    ``meta`` (:func:`weather_meta`) reads, or (``check_values``: one read of the whole file) holds a NaN or ±inf;
    None when it is fine."""
    fields_file = Path(path) / FIELDS_FILE
    if not fields_file.is_file():
        return f"data.path = {path}: {META_FILE} says own fields, but there is no {FIELDS_FILE} ([steps, H, W, C])"
    try:
        fields = np.load(fields_file, mmap_mode="r")
    except (ValueError, OSError, EOFError) as e:  # EOFError: an empty file
        return f"data.path = {path}: {FIELDS_FILE} is not a readable .npy array ({' '.join(str(e).split())})"
    if not isinstance(fields, np.ndarray):  # np.load reads a .npz archive whatever its name
        return (f"data.path = {path}: {FIELDS_FILE} is a .npz archive, not one array; write the [steps, H, W, C] "
                "array with np.save")
    want = [meta["steps"], meta["height"], meta["width"], meta["channels"]]
    if list(fields.shape) != want:
        return (f"data.path = {path} holds your own fields of shape {list(fields.shape)} [steps, H, W, C], this run "
                f"reads {want} (data.steps, data.image, data.channels): set those to the file's")
    if not np.issubdtype(fields.dtype, np.floating):
        return f"data.path = {path}: {FIELDS_FILE} holds {fields.dtype} values; the fields must be floating point"
    if check_values:
        step = first_nonfinite_step(fields)
        if step is not None:
            return (f"data.path = {path}: {FIELDS_FILE} holds NaN or ±inf at time step {step} (of {len(fields)}): "
                    "the normalisation and every loss that reads that step would be NaN; fill or cut those values")
    return None


#: bytes of fields read at a time by :func:`first_nonfinite_step` (whole time steps, at least one)
_SCAN_BYTES = 64 << 20


def first_nonfinite_step(fields: np.ndarray) -> Optional[int]:
    """The first time step of ``fields`` [steps, H, W, C] (memory-mapped) holding NaN or ±inf, None when every value
    is finite. Read in chunks of whole steps (about :data:`_SCAN_BYTES`): min and max propagate NaN and ±inf is one
    of them, so a chunk costs no per-element temporary unless it holds one."""
    per_chunk = max(1, _SCAN_BYTES // max(1, fields[0].nbytes))
    for lo in range(0, len(fields), per_chunk):
        chunk = np.asarray(fields[lo:lo + per_chunk])
        if not (np.isfinite(chunk.min()) and np.isfinite(chunk.max())):
            bad = ~np.isfinite(chunk.reshape(len(chunk), -1)).all(axis=1)
            return lo + int(np.argmax(bad))
    return None


def other_dataset_message(path: Union[str, Path], meta: dict, check_values: bool = True) -> Optional[str]:
    """One line refusing to generate the dataset ``meta`` at ``path`` when a different one is there (None when none
    is, or the same): regenerating in place would change the numbers under a job memory-mapping it, and under a run
    resuming on it with the same sample count. A person's own fields (``meta.json`` = :data:`OWN_META`) are never
    generated over: :func:`own_fields_message` checks them against the run; a ``fields.npy`` with no ``meta.json``
    (someone's fields, or a generation killed between its two renames) is refused rather than replaced.
    ``check_values``: scan own fields for NaN and ±inf (:func:`own_fields_message`; the pre-flight does, once)."""
    meta_file = Path(path) / META_FILE
    if not meta_file.is_file():
        if (Path(path) / FIELDS_FILE).exists():
            return (f"data.path = {path} holds {FIELDS_FILE} but no {META_FILE}: not a dataset dist-train generated "
                    f"(or a generation killed before its last file); to train on your own fields [steps, H, W, C], "
                    f"write {META_FILE} beside it as {json.dumps(OWN_META)}; to generate the synthetic one, use another "
                    f"data.path or delete {FIELDS_FILE}")
        return None
    try:
        found = json.loads(meta_file.read_text())
    except ValueError:
        found = {}
    if not isinstance(found, dict):  # a JSON list or number: no dataset's meta
        found = {}
    if found == OWN_META:
        return own_fields_message(path, meta, check_values)
    if found.get("source") == OWN_META["source"]:  # own fields with keys nothing reads: refused, not ignored
        extra = sorted(set(found) - set(OWN_META))
        return (f"data.path = {path}: {META_FILE} says own fields but also holds {', '.join(extra)}, which nothing "
                f"reads (the shape comes from {FIELDS_FILE}); write it as exactly {json.dumps(OWN_META)}")
    if found == meta:
        return None
    differ = [k for k in meta if found.get(k) != meta[k]]
    held = ", ".join(f"{k} {found.get(k)}" for k in differ)
    wanted = ", ".join(f"{k} {meta[k]}" for k in differ)
    return (f"data.path = {path} holds a weather dataset generated with {held}, this run needs {wanted} (data.image, "
            "data.steps, data.channels, run.seed): another run may be training on it; use another data.path, or "
            "delete that directory to generate it again")


def _already_there(path: Path, meta: dict) -> bool:
    """True when the dataset ``meta`` is complete at ``path`` (both files); ValueError when another one is there."""
    # own fields' values were scanned by the pre-flight: rank 0 does not read the whole file a second time
    other = other_dataset_message(path, meta, check_values=False)
    if other:
        raise ValueError(other)
    return (path / META_FILE).exists() and (path / FIELDS_FILE).exists()


def prepare_weather(path: Union[str, Path], *, height: int, width: int, steps: int, channels: int,
                    seed: int) -> Path:
    """Generate the dataset at directory ``path`` unless the same one is already there; returns ``path``. A
    different one there is refused (:func:`other_dataset_message`), never regenerated in place; the files are
    written under temporary names and renamed, ``meta.json`` last, so no kill leaves a half-written dataset that
    reads as complete; generation holds ``flock`` on ``.prepare.lock`` there (per machine, like run.lock)."""
    for name, value, low in (("height", height, 2), ("width", width, 4), ("steps", steps, 2), ("channels", channels, 1)):
        if int(value) < low:
            raise ValueError(f"weather {name} = {value}: must be >= {low}")
    path = Path(path)
    meta = weather_meta(height=height, width=width, steps=steps, channels=channels, seed=seed)
    meta_file, data_file = path / META_FILE, path / FIELDS_FILE
    if _already_there(path, meta):
        return path
    path.mkdir(parents=True, exist_ok=True)
    # two jobs generating at one fresh path: the second waits, then finds the first one's dataset (or refuses it)
    with open(path / LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _already_there(path, meta):
            return path
        with atomic_path(data_file) as tmp_data:
            _generate(tmp_data, height, width, steps, channels, seed)
        write_text_atomic(meta_file, json.dumps(meta))  # last: the meta says the fields are complete
    return path


def _generate(data_file: Path, height: int, width: int, steps: int, channels: int, seed: int) -> None:
    """Integrate the tracers and write ``[steps, H, W, C]`` float32 to ``data_file`` (.npy)."""
    rng = np.random.default_rng(seed)
    lat = np.linspace(-np.pi / 2, np.pi / 2, height + 2)[1:-1]  # cell centres, poles excluded
    lon = np.linspace(0, 2 * np.pi, width, endpoint=False)
    yy, xx = np.meshgrid(lat, lon, indexing="ij")
    # Forcing: a few random large-scale waves per channel; initial state: forcing + small-scale noise.
    forcing = np.zeros((height, width, channels))
    for c in range(channels):
        for _ in range(4):
            kx, ky = rng.integers(1, 6), rng.integers(1, 4)
            forcing[..., c] += rng.normal() * np.cos(kx * xx + rng.uniform(0, 2 * np.pi)) * np.cos(ky * yy)
    f = forcing + 0.5 * rng.normal(size=forcing.shape)
    u = 0.006 * width * np.cos(lat) * (1 + 0.3 * np.sin(3 * lat))  # cells per step
    v = [0.002 * height * np.sin(2 * xx + c) * np.cos(yy) for c in range(channels)]  # [H, W] cells per step
    kappa, tau = 0.15, 40.0
    out = np.lib.format.open_memmap(data_file, mode="w+", dtype=np.float32, shape=(steps, height, width, channels))
    for t in range(-SPINUP_STEPS, steps):
        if t >= 0:
            out[t] = f
        f = _shift_rows(f, u)
        f = np.concatenate([_shift_cols(f[..., c:c + 1], v[c]) for c in range(channels)], -1)
        f = f + kappa * _laplacian(f) + (forcing - f) / tau
    out.flush()
    del out


class WeatherDataset:
    """Next-step forecasting pairs (t, t+1) from a prepared directory, memory-mapped read-only."""

    def __init__(self, path: Union[str, Path]):
        path = Path(path)
        if not (path / "fields.npy").exists():
            raise ValueError(f"no weather dataset at {path} (fields.npy missing): run prepare_weather first")
        self.fields = np.load(path / "fields.npy", mmap_mode="r")  # [steps, H, W, C]
        self.steps, self.height, self.width, self.channels = self.fields.shape

    @property
    def image_size(self) -> tuple[int, int]:
        return (self.height, self.width)

    def __len__(self) -> int:
        return self.steps - 1

    def sample(self, global_index: int, rows: slice, cols: slice) -> dict[str, torch.Tensor]:
        """{"x": [h, w, C], "y": [h, w, C]}: this tile of steps t and t+1 (t = global_index mod len)."""
        t = int(global_index) % len(self)
        native = self.fields.dtype.newbyteorder("=")  # own fields may be big-endian, which torch cannot hold
        x = torch.from_numpy(np.array(self.fields[t, rows, cols], dtype=native))
        y = torch.from_numpy(np.array(self.fields[t + 1, rows, cols], dtype=native))
        return {"x": x, "y": y}

    def batch(self, indices: Sequence[int], rows: slice, cols: slice) -> dict:
        """Stacked samples plus the global image size, the batch :class:`SwinModel` takes."""
        samples = [self.sample(i, rows, cols) for i in indices]
        return {"x": torch.stack([s["x"] for s in samples]), "y": torch.stack([s["y"] for s in samples]),
                "image_size": self.image_size}

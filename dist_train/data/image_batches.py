"""Per-rank micro-batches of the weather dataset: each rank reads only its own pixels of each sample.

Its own pixels are ``model.tile_slices``: its wp tile, or with cp > 1 its cp share of that tile's rows
(a share that is all padding reads nothing). ``count`` is the number of values read, so the trainer's
all-reduce of the counts over dp × wp × cp is the global batch's real pixels × channels.

Sample ids follow the same global-index scheme as the token batcher (``micro_batch_ids``), mapped to
time steps through a seeded permutation that is reshuffled every epoch.

Fields are normalised per channel as ``(f - mean) / std(one-step increment)``: the model forecasts
``x + Δ``, so the target increment has unit scale and the initial loss is ~1 whatever the physical
units (the usual residual normalisation of weather models). The statistics come from the time steps of
the *training* share (``data.split``; every step without one) on a strided pixel subset, read by every
rank (the same numbers everywhere, no communication): the validation batcher uses the same ones, so no
held-out field shapes the inputs of either. A checkpoint records the statistics (``normalisation``) and a resume goes
on with the ones its model was trained with, also after an allowed data change (``resume_normalisation``).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any, Mapping, Optional

import numpy as np
import torch
import torch.distributed as dist

from .batches import micro_batch_ids
from .datasets import split_part
from .weather import WeatherDataset, prepare_weather, weather_settings

#: the checkpoint ``extra`` key of the inputs' normalisation (``WeatherBatcher.normalisation``)
NORMALISATION_KEY = "input_normalisation"
#: the keys that decide which fields a run's statistics come from: the dataset (path, its generation settings, the
#: seed) and the training share of it
NORMALISATION_DATA_KEYS = ("data.path", "data.image", "data.channels", "data.steps", "data.split", "run.seed")


def same_normalisation_data(saved_config: Mapping[str, Any], config: Mapping[str, Any]) -> bool:
    """Whether two configs (``Config.to_dict()`` form) compute their statistics from the same fields."""
    def value(c: Mapping[str, Any], key: str) -> Any:
        section, name = key.split(".")
        return (c.get(section) or {}).get(name)
    return all(value(saved_config, k) == value(config, k) for k in NORMALISATION_DATA_KEYS)


def _floats(values: torch.Tensor) -> str:
    return "[" + ", ".join(f"{v:.6g}" for v in values.tolist()) + "]"


class WeatherBatcher:
    """``microbatch(consumed, m) -> {"x": [mb, h, w, C], "y": ..., "image_size": [2], "count": []}``."""

    def __init__(self, cfg, mesh, model, part: str = "train", normalise_as: Optional["WeatherBatcher"] = None):
        """``part``: "train" or "valid" — the ``data.split`` share of the forecasting pairs read (all of them for
        training when no split is set). No validation target is a training field: the only step both read is the
        training share's last target, the validation share's first input. ``normalise_as``: a batcher whose
        normalisation this one takes (the validation batcher the training one's, a resume's included) instead of
        reading the training share's fields again."""
        d = cfg.data
        if not d.path:
            raise ValueError("data.path is not set: give the directory of the weather dataset (generated there "
                             "on first use)")
        if not d.image or len(d.image) != 2:
            raise ValueError(f"data.image = {d.image!r}: the weather source needs [H, W]")
        if mesh.rank == 0:
            prepare_weather(d.path, **weather_settings(d, cfg.run.seed))
        if dist.is_initialized():
            dist.barrier()
        self.ds = WeatherDataset(d.path)
        if self.ds.image_size != (int(d.image[0]), int(d.image[1])) or self.ds.channels != d.channels:
            raise ValueError(f"data.path = {d.path} holds {self.ds.image_size} x {self.ds.channels} fields, "
                             f"but data.image = {d.image}, data.channels = {d.channels}")
        if normalise_as is not None:
            self.share_normalisation(normalise_as)
        else:
            self.mean, self.scale = self._field_stats(*split_part(len(self.ds), d.split, "train"))
        self.first, end = split_part(len(self.ds), d.split, part)
        self.num_samples = end - self.first
        if self.num_samples < 1:
            raise ValueError(f"data.split = {d.split!r}: the {part} share of the {len(self.ds)} weather samples is "
                             "empty; give it a larger share (or more data.steps)")
        self.rows, self.cols = model.tile_slices(self.ds.image_size)
        self.mb, self.dp, self.dp_rank, self.seed = cfg.train.micro_batch, mesh.size("dp"), mesh.coord("dp"), cfg.run.seed
        p = cfg.model.patch_size
        self.tokens_per_sample = (self.ds.height // p) * (self.ds.width // p)

    @property
    def samples_per_epoch(self) -> int:
        """Distinct samples (forecasting pairs of this share) before the order wraps into the next epoch."""
        return int(self.num_samples)

    def _field_stats(self, lo: int, hi: int, stride: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean of the fields and std of their one-step increment, shapes [C], over every time
        step the training samples [lo, hi) read (their inputs t and targets t + 1: steps lo..hi; all of them,
        so a start-up transient does not set the scale) on a strided pixel subset."""
        f = np.asarray(self.ds.fields[lo:hi + 1, ::stride, ::stride], dtype=np.float64)  # [T', H/s, W/s, C]
        std = np.diff(f, axis=0).reshape(-1, f.shape[-1]).std(axis=0)
        return (torch.from_numpy(f.reshape(-1, f.shape[-1]).mean(axis=0)).float(),
                torch.from_numpy(np.where(std > 0, std, 1.0)).float())

    def normalisation(self) -> dict[str, list[float]]:
        """What a checkpoint records: the per-channel ``mean`` and ``scale`` ([C] float32 values as floats, exact
        through JSON)."""
        return {"mean": self.mean.tolist(), "scale": self.scale.tolist()}

    def resume_normalisation(self, recorded: Optional[Mapping[str, list]], same_data: bool) -> Optional[str]:
        """Go on with the normalisation the resumed model was trained with: the checkpoint's ``recorded`` one, on
        this data or after an allowed data change (``same_data`` False, see ``same_normalisation_data``: a longer
        training share, more steps, a fine-tune onto other fields) alike, since the statistics are part of what the
        model computes and re-scaling its inputs would silently change it. A checkpoint written before they were
        recorded, on the same data: the statistics over every time step (that version's rule, which read the
        validation share's steps too); on other data (or an import made with --input-normalisation-from-data):
        this data's own, said in the line returned, since nothing says what the model was trained with. Returns one
        line saying which statistics are used when they are not the checkpoint's own, None when they are."""
        if recorded is None:
            if not same_data:
                return (f"resume: the checkpoint records no {NORMALISATION_KEY} (an import, or written before they "
                        "were recorded): the inputs are normalised with this data's own training-share statistics, "
                        f"mean {_floats(self.mean)}, scale {_floats(self.scale)}")
            mean, scale = self._field_stats(0, len(self.ds))
            source = "over every time step, as the version that wrote the checkpoint normalised"
        else:
            mean, scale = (torch.tensor(recorded[k], dtype=torch.float32) for k in ("mean", "scale"))
            if mean.shape != self.mean.shape or scale.shape != self.scale.shape:
                raise ValueError(f"the checkpoint's {NORMALISATION_KEY} has {mean.numel()} / {scale.numel()} "
                                 f"channels, the data {self.mean.numel()}")
            source = "as the checkpoint records" + ("" if same_data else "; the data changed since")
        if torch.equal(mean, self.mean) and torch.equal(scale, self.scale):
            return None
        line = (f"resume: the inputs are normalised with the statistics the checkpoint's model was trained with "
                f"({source}), mean {_floats(mean)}, scale {_floats(scale)}, not this data's own training-share "
                f"statistics, mean {_floats(self.mean)}, scale {_floats(self.scale)}")
        self.mean, self.scale = mean, scale
        return line

    def share_normalisation(self, other: "WeatherBatcher") -> None:
        """Normalise as ``other`` does (the validation batcher as the training one, after a resume)."""
        self.mean, self.scale = other.mean, other.scale

    @lru_cache(maxsize=4)
    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    def _time_index(self, global_index: int) -> int:
        epoch, j = divmod(global_index, self.num_samples)
        return self.first + int(self._order(epoch)[j])

    def microbatch(self, consumed: int, micro: int) -> dict[str, torch.Tensor]:
        ids = [self._time_index(i) for i in micro_batch_ids(consumed, micro, self.mb, self.dp, self.dp_rank)]
        b = self.ds.batch(ids, self.rows, self.cols)
        x, y = ((b[k] - self.mean) / self.scale for k in ("x", "y"))
        return {"x": x, "y": y, "image_size": torch.tensor(b["image_size"]),
                "count": torch.tensor(float(b["y"].numel()))}

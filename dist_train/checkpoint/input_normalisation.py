"""A Swin's input normalisation beside a stock export, so that ``ckpt convert --from dcp`` can record it again.

    write_sidecar(Path("stock_dcp"), norm)        # stock_dcp/input_normalisation.json
    write_sidecar(Path("wx.pt"), norm)            # wx.pt.input_normalisation.json
    read_sidecar(Path("stock_dcp"))               # {"mean": [C floats], "scale": [C floats]}, or None: no file

The statistics (``WeatherBatcher.normalisation``: per channel, x = (field - mean) / scale) are part of what the
model computes but not of its state dict, and a stock DCP or ``torch.save`` file has no place for them. The file
holds ``{"input_normalisation": {"mean": [...], "scale": [...]}}``: the key and values ``ckpt inspect --json``
writes, so that command's output is a valid sidecar too (its other keys are ignored). float32 values written as
JSON floats read back exactly.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping, Optional

from dist_train.atomic_write import write_text_atomic
from dist_train.data.image_batches import NORMALISATION_KEY

SIDECAR_NAME = f"{NORMALISATION_KEY}.json"


def sidecar_path(export: Path) -> Path:
    """Where the normalisation of the export ``export`` lies: inside a (DCP) directory, beside a file."""
    export = Path(export)
    return export / SIDECAR_NAME if export.is_dir() else export.with_name(f"{export.name}.{SIDECAR_NAME}")


def write_sidecar(export: Path, normalisation: Mapping[str, list]) -> Path:
    """Write ``normalisation`` ({"mean", "scale"}) beside ``export`` (written already); returns the file."""
    path = sidecar_path(export)
    write_text_atomic(path, json.dumps({NORMALISATION_KEY: {k: list(normalisation[k]) for k in ("mean", "scale")}},
                                       indent=1) + "\n")
    return path


def read_sidecar(export: Path, channels: Optional[int] = None) -> Optional[dict[str, list[float]]]:
    """The normalisation beside ``export`` (None when there is no file); ValueError (one line) when the file does
    not hold per-channel ``mean`` and positive ``scale`` lists of one length (``channels`` when given)."""
    path = sidecar_path(export)
    if not path.is_file():
        return None
    try:
        norm = json.loads(path.read_text())[NORMALISATION_KEY]
        mean, scale = ([float(v) for v in norm[k]] for k in ("mean", "scale"))
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: expected {{\"{NORMALISATION_KEY}\": {{\"mean\": [...], \"scale\": [...]}}}} "
                         f"(as `dist-train ckpt inspect CKPT --json` writes), could not read it: {e!r}") from None
    want = channels if channels is not None else len(mean)
    if not (len(mean) == len(scale) == want) or not all(math.isfinite(v) for v in mean + scale) \
            or min(scale, default=1.0) <= 0:
        raise ValueError(f"{path}: {NORMALISATION_KEY} has {len(mean)} means and {len(scale)} scales"
                         f"{f', the model {want} input channels' if channels is not None else ''}; expected one "
                         "finite mean and one positive finite scale per channel")
    return {"mean": mean, "scale": scale}

"""Shared helpers for training tests: a tiny config that trains in well under a second per step."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from dist_train.config import config_from_dict


def tiny_gpt_config(run_dir, steps: int = 5, **sections) -> "Config":
    base = {
        "run": {"name": "t", "dir": str(run_dir), "seed": 7},
        "model": {"kind": "gpt", "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 64},
        "data": {"source": "synthetic", "seq_len": 32},
        "train": {"steps": steps, "global_batch": 4, "micro_batch": 2, "lr": 1e-2, "warmup_steps": 2,
                  "log_every": 1, "progress": False, "trackers": ["jsonl"]},
        "checkpoint": {"every": 0, "at_end": False},
    }
    return _with_sections(base, sections)


def _with_sections(base: dict, sections: dict) -> "Config":
    for sec, vals in sections.items():
        base.setdefault(sec, {}).update(vals)
    return config_from_dict(base)


def rel_close(a: list[float], b: list[float], rtol: float) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= rtol * max(abs(x), abs(y), 1e-12) for x, y in zip(a, b))


def tiny_swin_config(run_dir, data_dir, steps: int = 5, **sections) -> "Config":
    """A pixel-level Swin forecasting a 10x16 two-field weather grid (H pads to 12, W periodic)."""
    base = {
        "run": {"name": "s", "dir": str(run_dir), "seed": 3},
        "model": {"kind": "swin", "d_model": 16, "n_layers": 2, "n_heads": 2, "ffn_hidden": 32, "patch_size": 1,
                  "window": 4, "in_channels": 2, "out_channels": 2, "wrap": [False, True]},
        "data": {"source": "weather", "path": str(data_dir), "image": [10, 16], "channels": 2, "steps": 12},
        "train": {"steps": steps, "global_batch": 2, "micro_batch": 1, "lr": 3e-3, "warmup_steps": 1,
                  "log_every": 1, "progress": False, "trackers": ["jsonl"]},
        "checkpoint": {"every": 0, "at_end": False},
    }
    return _with_sections(base, sections)


def losses_and_valid(res) -> list[float]:
    """A run's training losses, then its validation loss when it evaluated."""
    valid = res.summary.get("valid_loss")
    return res.losses + ([valid] if valid is not None else [])


REPO = Path(__file__).resolve().parent.parent


def run_cli(*args, env_extra=None, cwd=None, timeout=180) -> subprocess.CompletedProcess:
    """``python -m dist_train ARGS`` in a real process (exit status and stderr as a user sees them), with this
    checkout importable."""
    env = dict(os.environ, PYTHONPATH=str(REPO), **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "dist_train", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=timeout)

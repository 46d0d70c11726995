"""Shared helpers for training tests: a tiny config that trains in well under a second per step."""
from __future__ import annotations

from dist_train.config import config_from_dict


def tiny_gpt_config(run_dir, steps: int = 5, **sections) -> "Config":
    base = {
        "run": {"name": "t", "dir": str(run_dir), "seed": 7},
        "model": {"kind": "gpt", "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 64},
        "data": {"source": "synthetic", "seq_len": 32},
        "train": {"steps": steps, "global_batch": 4, "micro_batch": 2, "lr": 1e-2, "warmup_steps": 2,
                  "log_every": 1, "progress": False},
        "checkpoint": {"every": 0, "at_end": False},
    }
    for sec, vals in sections.items():
        base.setdefault(sec, {}).update(vals)
    return config_from_dict(base)


def rel_close(a: list[float], b: list[float], rtol: float) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= rtol * max(abs(x), abs(y), 1e-12) for x, y in zip(a, b))

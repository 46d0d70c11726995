"""Shared helpers for training tests: a tiny config that trains in well under a second per step."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch

from dist_train.checkpoint import manifest as mf
from dist_train.cli import main
from dist_train.config import config_from_dict, save_config
from dist_train.engines import build_engine
from dist_train.mesh import build_mesh
from dist_train.models.gpt import build_gpt
from dist_train.models.swin import build_swin
from dist_train.trainer import train


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


def one_rank_engine_and_batches(model: str, device, accumulation: int = 4, parallel: Optional[dict] = None):
    """``(engine, micro_batches)``: a one-rank data-parallel engine (clipping on) whose weights are on ``device``, and
    ``accumulation`` micro-batches as the batchers hand them over (every value a host tensor). ``model``: "gpt",
    "gpt, packed documents" (per-sample ``cu_seqlens``) or "swin" (a padded 30x32 image whose non-periodic axis
    makes the shifted blocks mask their wrapped rows; ``image_size``). ``parallel``: the config's section (one rank:
    ``zero_stage`` picks the DeepSpeed engine)."""
    gen = torch.Generator().manual_seed(0)
    train = {"global_batch": accumulation, "micro_batch": 1, "grad_clip": 0.5}
    if model == "swin":
        cfg = config_from_dict({"model": {"kind": "swin", "d_model": 32, "n_layers": 2, "n_heads": 4, "ffn_hidden": 64,
                                          "window": 8, "in_channels": 3, "out_channels": 3, "wrap": [False, True]},
                                "data": {"source": "weather", "image": [30, 32]}, "train": train,
                                "parallel": parallel or {}})
        built = build_swin(cfg.model, wp_group=None, grid=(1, 1), init_seed=3).to(device)
        image = tuple(cfg.data.image)
        batch = {"x": torch.randn(1, *image, 3, generator=gen), "y": torch.randn(1, *image, 3, generator=gen),
                 "image_size": torch.tensor(image), "count": torch.tensor(float(3 * image[0] * image[1]))}
    else:
        cfg = config_from_dict({"model": {"kind": "gpt", "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                                          "ffn_hidden": 128, "vocab_size": 95}, "data": {"seq_len": 16}, "train": train,
                                "parallel": parallel or {}})
        built = build_gpt(cfg, build_mesh(cfg.parallel, 1), torch.device(device))
        tokens = torch.randint(0, 95, (1, 17), generator=gen)
        batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "positions": torch.arange(16),
                 "count": torch.tensor(16.0)}
        if model == "gpt, packed documents":
            batch["cu_seqlens"] = torch.tensor([[0, 5, 16]])
    return build_engine(cfg, built.train(), build_mesh(cfg.parallel, 1), None), [batch] * accumulation


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


def run_cli_here(capture, *args: str) -> subprocess.CompletedProcess:
    """``dist-train ARGS`` run by this process (``dist_train.cli.main``), as :func:`run_cli`'s result: the exit
    status, and what was written to stdout and stderr meanwhile, read with ``capture`` (pytest's ``capfd``: the
    command's and its ranks' output; ``capsys``: this process's only). For a launcher whose own interpreter start is
    not what a test checks (~5 s of CPU importing torch and the launchers): its ranks are still processes of their
    own, started with this process's environment and working directory (set PYTHONPATH, cwd and the rest with
    monkeypatch; the autouse fixture in conftest.py puts os.environ back after the test)."""
    capture.readouterr()  # what was written before is not the command's
    code = main(list(args))
    out, err = capture.readouterr()
    return subprocess.CompletedProcess(["dist-train", *args], code, out, err)


def stale_file_handle_in(monkeypatch, step_dir: str) -> None:
    """Make every checksum read of a file in a directory named ``step_dir`` (e.g. ``step_2``) fail with ESTALE, an
    I/O error that may pass (an NFS client's), as the checkpoint verification meets it (``manifest.file_block_digests``)."""
    real = mf.file_block_digests

    def flaky(path, *a, **kw):
        if Path(path).parent.name == step_dir:
            raise OSError(errno.ESTALE, "Stale file handle", str(path))
        return real(path, *a, **kw)

    monkeypatch.setattr(mf, "file_block_digests", flaky)


#: what a run validates: after every step, 2 batches
EVAL_TRAIN = {"eval_every": 1, "eval_steps": 2}


def validated_checkpoints(root: Path) -> tuple[Path, Path, dict[int, float]]:
    """A 2-step tiny GPT run in ``root``, validated and checkpointed after each step -> (its config file, its run dir,
    {step: the valid_loss it logged}): what ``dist-train eval`` tests evaluate."""
    cfg = tiny_gpt_config(root / "run", steps=2, train=EVAL_TRAIN, checkpoint={"every": 1, "at_end": True})
    train(cfg)
    save_config(cfg, root / "cfg.yaml")
    logged = {r["step"]: r["valid_loss"] for r in map(json.loads, (root / "run" / "metrics.jsonl").read_text()
                                                     .splitlines()) if "valid_loss" in r}
    assert set(logged) == {1, 2}
    return root / "cfg.yaml", root / "run", logged


def run_dir_files(run_dir: Path) -> dict:
    """Every file's size and mtime, except run.lock: the lock's holder (a test, as a training job would) refreshes
    it. Equal before and after a command that only reads the run dir."""
    return {str(p.relative_to(run_dir)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(run_dir.rglob("*")) if p.name != "run.lock"}


def one_eval_result(proc: subprocess.CompletedProcess, out: Path) -> dict:
    """The JSON (``--out``) of a successful ``dist-train eval`` of :func:`validated_checkpoints`' latest step, whose
    stdout is exactly one summary line."""
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and "(step 2): loss" in lines[0] and "perplexity" in lines[0], proc.stdout
    return json.loads(out.read_text())

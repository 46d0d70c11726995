"""An earlier run's records in a run directory, moved aside before a new run writes its own.

    line = set_aside_earlier_run(run_dir, keep=checkpoint_root)   # rank 0, a new run's start, before any tracker
    if line:
        log.info(line)   # "fresh start in runs/x: the earlier run's records (…) moved to runs/x/previous/<time>/"

A new run in a run directory that already holds a run — one that starts at step 0 (a rerun of a config that saves no
checkpoints, ``checkpoint.resume: none``, a run dir whose checkpoints were moved away, a restart before the first
save), or from a checkpoint that is not the run dir's own (a fine-tune from another run's ``step_N``, rerun) — would
otherwise truncate that run's ``metrics.jsonl``, hide its TensorBoard curves (``purge_step``), mix its step traces
(``profile/``) with the new run's and replace its ``summary.json``, ``config.yaml`` and ``wandb_run_id``. They are
renamed, unchanged, into
``run_dir/previous/<when that run ended, UTC>/`` (``20261130T121503Z``: when its summary.json was written, else
its newest record; ``-2``, ``-3``, … when that folder exists: one is never reused).
``dist-train plot run_dir/previous/<time>`` plots that run; ``tensorboard --logdir runs/`` shows it beside the
current one.

Left where they are: ``logs/`` (appended by every attempt, and by the launcher before any rank starts),
heartbeats, ``errors/``, locks, launcher files (``submit_*.sh``, ``.ray_auth_token``, ``launched_config.yaml``,
``submitted_config-*.yaml``), ``wandb/`` (one folder per W&B run already), the checkpoints (``keep``; a fresh
start beside them is refused by the checkpoint manager), and anything else a person put there.

Safe against other jobs because only rank 0 calls it, inside ``train()``'s hold of the run directory's lock
(:mod:`dist_train.runlock`): no other job trains in this run.dir meanwhile, and this job's other ranks write
into it only ``rank_stats/`` at the end, after the collectives of the first step.
"""
from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Iterator, Optional

#: what the trainer and its trackers write into run.dir for one run (see docs/metrics.md), plus plots there
RECORDS = ("metrics.jsonl", "summary.json", "config.yaml", "tensorboard", "wandb_run_id", "rank_stats", "profile")
PLOT_SUFFIX = ".png"  # `dist-train plot runs/x --out runs/x/curves.png` (make demo): a picture of that run
PREVIOUS_DIR = "previous"


def _files(path: Path) -> Iterator[Path]:
    if path.is_dir() and not path.is_symlink():
        for p in sorted(path.rglob("*")):
            if p.is_file():
                yield p
    elif path.is_file():
        yield path


def _holds_record(path: Path) -> bool:
    """An empty file or a folder of no file records nothing (a start that failed before its first step)."""
    return any(f.stat().st_size > 0 for f in _files(path))


def earlier_records(run_dir: Path, keep: Optional[Path] = None) -> list[Path]:
    """The entries of ``run_dir`` that record an earlier run (never ``keep`` nor a folder holding it)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    keep = Path(os.path.abspath(keep)) if keep is not None else None
    names = list(RECORDS) + sorted(p.name for p in run_dir.glob(f"*{PLOT_SUFFIX}") if p.is_file())
    out = []
    for name in names:
        path = run_dir / name
        here = Path(os.path.abspath(path))
        if keep is not None and (keep == here or here in keep.parents):
            continue
        if path.exists() and _holds_record(path):
            out.append(path)
    return out


def ended_at(records: list[Path]) -> datetime.datetime:
    """When the run that wrote ``records`` ended, UTC: when it wrote its summary.json, else (stopped before its
    end) its newest record; a plot drawn later of it counts only when nothing else is there."""
    summary = [r for r in records if r.name == "summary.json"]
    written = summary or [r for r in records if r.suffix != PLOT_SUFFIX] or records
    newest = max(f.stat().st_mtime for r in written for f in _files(r))
    return datetime.datetime.fromtimestamp(newest, datetime.timezone.utc)


def _claim_folder(parent: Path, stamp: str) -> Path:
    """A new folder ``parent/stamp`` (``stamp-2``, ``stamp-3``, … if taken): ``mkdir`` fails on an existing one,
    so an earlier run's folder is never written into."""
    parent.mkdir(parents=True, exist_ok=True)
    n = 1
    while True:
        dest = parent / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            dest.mkdir()
            return dest
        except FileExistsError:
            n += 1


def set_aside_earlier_run(run_dir: Path, keep: Optional[Path] = None, start: str = "fresh start") -> Optional[str]:
    """Move the records of the run that used ``run_dir`` before into ``run_dir/previous/<UTC end time>/`` (renames
    within the directory: the bytes are the same files); returns the one line that says what moved where, or None
    when there was nothing to move. Rank 0 only, before a new run's start opens any of them; ``start`` names it in
    the line (a fresh start, or a start from another run's checkpoint)."""
    run_dir = Path(run_dir)
    records = earlier_records(run_dir, keep)
    if not records:
        return None
    dest = _claim_folder(run_dir / PREVIOUS_DIR, ended_at(records).strftime("%Y%m%dT%H%M%SZ"))
    for path in records:
        os.rename(path, dest / path.name)
    names = ", ".join(p.name + ("/" if (dest / p.name).is_dir() else "") for p in records)
    return f"{start} in {run_dir}: the earlier run's records ({names}) moved to {dest}/"

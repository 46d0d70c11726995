"""A rank's bad-input error, told to its peers and to the launcher through the run directory.

When one rank stops on bad input after the process group exists (rank 0 building the dataset, a file
only it reads), the other ranks fail in their next collective, and each adds a long gloo/NCCL traceback
that buries the one line that matters. So the failing rank records its line first, then exits 2; a peer
whose collective then fails finds the record and exits 2 quietly; the launcher names the recorded rank::

    clear_user_errors(run_dir)                   # rank 0, before the process group exists
    record_user_error(run_dir, rank, message)    # the failing rank, before it exits
    user_errors(run_dir)                          # {rank: message} (peers, the launcher)

Files: ``run_dir/errors/rank_N.txt`` (one line). Rank 0 clears them before the rendezvous, which no rank
passes before rank 0 joins it, so a record is always from this job. Ranks on other machines see each
other's records only when ``run.dir`` is shared (it is for checkpoints); otherwise peers report as before.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Union

from .atomic_write import write_text_atomic
from .own_files import clear_own_files

ERRORS_DIR = "errors"
RECORD_PATTERNS = (r"rank_\d+\.txt", r"\.rank_\d+\.txt\.\d+\.tmp")  # what record_user_error writes (atomic_write)

PathLike = Union[str, os.PathLike]


def _dir(run_dir: PathLike) -> Path:
    return Path(run_dir) / ERRORS_DIR


def clear_user_errors(run_dir: PathLike) -> None:
    """Remove the records of an earlier job (only those: ``run_dir/errors`` may be a person's own folder)."""
    clear_own_files(_dir(run_dir), RECORD_PATTERNS)


def record_user_error(run_dir: PathLike, rank: int, message: str) -> None:
    """Best effort: a rank that cannot write here (full disk) still exits with its message."""
    d = _dir(run_dir)
    # unwritable: the peers then report their own (secondary) failure too, but this rank's message still
    # reaches the user on its own stderr
    with contextlib.suppress(OSError):
        d.mkdir(parents=True, exist_ok=True)
        write_text_atomic(d / f"rank_{rank}.txt", message.splitlines()[0] if message else "")


def user_errors(run_dir: PathLike) -> dict[int, str]:
    """{rank: one-line message} of every rank that recorded a bad-input error in this job."""
    out: dict[int, str] = {}
    d = _dir(run_dir)
    if not d.is_dir():
        return out
    for p in d.glob("rank_*.txt"):
        try:
            out[int(p.stem.split("_")[1])] = p.read_text().strip()
        except (OSError, ValueError, IndexError):
            continue
    return out

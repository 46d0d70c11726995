"""Clearing what dist-train wrote into a folder of ``run.dir``, and nothing else.

``run.dir`` may be a directory that was there before (``--set run.dir=.``, a project folder, ``~``): a folder
of it that dist-train also uses (``errors/``, ``heartbeats/``) may hold a person's own files, which clearing
it with ``rmtree`` deleted. Only files named the way dist-train names its own are removed, a symlink as
itself (never what it points to), and the folder only when that leaves it empty.

    clear_own_files(run_dir / "errors", ["rank_*.txt", ".rank_*.txt.tmp"])
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Sequence, Union


def clear_own_files(folder: Union[str, os.PathLike], patterns: Sequence[str]) -> None:
    """Delete the files directly in ``folder`` whose names match one of ``patterns`` (glob), then ``folder``
    itself if it is left empty; anything else in it stays. A missing folder is nothing to do."""
    folder = Path(folder)
    for pattern in patterns:
        for path in folder.glob(pattern):
            if path.is_symlink() or path.is_file():
                with contextlib.suppress(FileNotFoundError):  # another process cleared it meanwhile
                    path.unlink()
    with contextlib.suppress(OSError):  # not empty (a person's files), missing, or not a directory
        folder.rmdir()

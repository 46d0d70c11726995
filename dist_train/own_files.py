r"""Clearing what dist-train wrote into a folder of ``run.dir``, and nothing else.

``run.dir`` may be a directory that was there before (``--set run.dir=.``, a project folder, the home): a folder
of it that dist-train also uses (``errors/``, ``heartbeats/``) may hold a person's own files, which clearing
it with ``rmtree`` deleted. Only files named exactly the way dist-train names its own are removed (a person's
``rank_notes.txt`` is not ``rank_N.txt``), a symlink as itself (never what it points to), and the folder only when
that leaves it empty.

    clear_own_files(run_dir / "errors", [r"rank_\d+\.txt", r"\.rank_\d+\.txt\.\d+\.tmp"])
"""
from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Sequence, Union


def clear_own_files(folder: Union[str, os.PathLike], patterns: Sequence[str]) -> None:
    """Delete the files directly in ``folder`` whose whole name matches one of ``patterns`` (regular expressions),
    then ``folder`` itself if it is left empty; anything else in it stays. A missing folder is nothing to do."""
    folder = Path(folder)
    try:
        entries = list(folder.iterdir())
    except OSError:  # missing, or not a directory
        return
    for path in entries:
        if any(re.fullmatch(p, path.name) for p in patterns) and (path.is_symlink() or path.is_file()):
            with contextlib.suppress(FileNotFoundError):  # another process cleared it meanwhile
                path.unlink()
    with contextlib.suppress(OSError):  # not empty (a person's files)
        folder.rmdir()

"""Replacing a file all at once: a reader (another rank, the launcher, a person) sees its old bytes or its new
ones, never part of them, and a write that fails leaves the old file as it was.

    write_text_atomic(run_dir / "heartbeats" / "rank_0.json", json.dumps(beat))
    write_bytes_atomic(root / "latest", b"step_20\\n", fsync=True)     # also survives a power cut
    with atomic_path(out) as tmp:                                      # a writer that wants a path
        torch.save(tensors, tmp)

The bytes go to a temp file ``.NAME.PID.tmp`` beside the target (a rename is atomic only within one file system;
the leading dot keeps it out of readers' globs such as ``rank_*.json``; the pid keeps two processes' temps apart),
which is then renamed over the target. Any exception, KeyboardInterrupt included, removes the temp file and leaves
the target untouched. ``fsync=True``: the temp file's bytes are flushed before the rename and the directory after
it, so that after a crash the name holds the new bytes (a POSIX rename is durable only once its directory is);
checkpoint metadata needs this, a heartbeat does not. A rename replaces whatever is there: a writer that must refuse
an existing file (``O_EXCL``, a lock) is not one of these.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Union

PathLike = Union[str, os.PathLike]


def temp_path(path: PathLike) -> Path:
    """The temp file an atomic write of ``path`` goes through in this process: ``.NAME.PID.tmp`` beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def fsync_path(path: PathLike) -> None:
    """fsync ``path`` through a read-only descriptor: a file's bytes (any descriptor of the inode flushes what every
    writer wrote) or a directory's entries."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: PathLike) -> None:
    """Make a rename or creation inside the directory ``path`` durable (POSIX: fsync the directory)."""
    fsync_path(path)


@contextlib.contextmanager
def atomic_path(path: PathLike, *, fsync: bool = False) -> Iterator[Path]:
    """Yield the temp path to write ``path``'s new content to (by any writer: ``np.lib.format.open_memmap``,
    ``torch.save``); on leaving the block without an exception it is renamed over ``path`` (``fsync``: the file
    before, the directory after). On an exception the temp file is removed and ``path`` is left as it was."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        yield tmp
        if fsync:
            fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if fsync:
        fsync_dir(path.parent)


def write_bytes_atomic(path: PathLike, data: bytes, *, fsync: bool = False) -> None:
    """Replace ``path``'s content with ``data`` at once (see the module doc)."""
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: PathLike, text: str, *, fsync: bool = False) -> None:
    """Replace ``path``'s content with ``text`` (encoded as ``Path.write_text`` does) at once (see the module doc)."""
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_text(text)

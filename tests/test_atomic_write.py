"""dist_train/atomic_write.py: a file is replaced all at once or not at all, and durably where promised.

A writer that fails half-way (disk full, an exception, Ctrl-C) leaves the old file's bytes and no temp file; the temp
file is hidden in the target's directory; ``fsync=True`` flushes the file before the rename and the directory after
it (counted through a patched ``os.fsync``), ``fsync=False`` never calls it."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from dist_train import atomic_write
from dist_train.atomic_write import atomic_path, temp_path, write_bytes_atomic, write_text_atomic


def _fsyncs(monkeypatch) -> list[str]:
    """Patch os.fsync to record what each call flushed ('file NAME' or 'dir NAME') and then do it."""
    done, real = [], os.fsync

    def fsync(fd: int) -> None:
        target = Path(os.readlink(f"/proc/self/fd/{fd}"))
        done.append(f"{'dir' if target.is_dir() else 'file'} {target.name}")
        real(fd)

    monkeypatch.setattr(atomic_write.os, "fsync", fsync)
    return done


def test_a_write_replaces_the_file_and_fsyncs_the_file_then_the_directory_only_when_asked(tmp_path, monkeypatch):
    target = tmp_path / "latest"
    done = _fsyncs(monkeypatch)
    write_text_atomic(target, "step_1\n")
    assert target.read_text() == "step_1\n" and done == []
    write_bytes_atomic(target, b"step_2\n", fsync=True)
    assert target.read_bytes() == b"step_2\n"
    assert done == [f"file {temp_path(target).name}", f"dir {tmp_path.name}"], done
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]


def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "result.json"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt):  # a streaming writer stopped half-way
        with atomic_path(target) as tmp:
            assert tmp.parent == tmp_path and tmp.name == f".result.json.{os.getpid()}.tmp"
            tmp.write_text("half of the ne")
            raise KeyboardInterrupt
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]

    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic_write.os, "fsync", disk_full)  # the bytes never reach the disk: no rename either
    with pytest.raises(OSError, match="No space left"):
        write_bytes_atomic(target, b"new", fsync=True)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]

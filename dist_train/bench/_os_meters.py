"""What the kernel (Linux ``/proc``) knows about a benchmarked process, for the checkpoint benchmarks:

    drop_cache(ckpt_dir)                        # the next read of its files comes from the disk
    result, grown = peak_resident_growth(fn)    # bytes the resident set rose above its start while fn ran
    before = storage_write_bytes(); fn(); written = storage_write_bytes() - before

The tensor meter (``bench.attention.peak_tensor_bytes``) sees only c10's CPU tensor allocations; the resident
set also counts what a save or load allocates outside tensors (pickled bytes, a zip writer's buffers, Python
objects). It is an undercount where the allocator reuses pages it freed earlier instead of asking the kernel.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable

from ..atomic_write import fsync_path

_KIB = 1024


def files_at(path: Path) -> list[Path]:
    """``path`` when it is a file, else every file under it (sorted)."""
    return [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())


def fsync_files(path: Path) -> None:
    """fsync ``path`` or every file under it: a saved checkpoint's bytes on the disk, as ours are when timed."""
    for f in files_at(path):
        fsync_path(f)


def drop_cache(path: Path) -> None:
    """Ask the kernel to drop the (clean, fsynced) pages of ``path`` or of every file under it."""
    for f in files_at(path):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def peak_resident_growth(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``fn()``; return (its result, the peak of this process's resident set during the call minus the
    resident set at its start, in bytes). Writing 5 to ``/proc/self/clear_refs`` resets the peak (``VmHWM``)
    to the current resident set (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")
    start = _status_kib("VmRSS")
    result = fn()
    return result, (_status_kib("VmHWM") - start) * _KIB


def storage_write_bytes() -> int:
    """Bytes this process (all its threads) has caused to be written to storage so far (``/proc/self/io``
    ``write_bytes``: counted when a page is dirtied, so page-cache writes count before their write-back)."""
    return int(re.search(r"^write_bytes: (\d+)", Path("/proc/self/io").read_text(), re.M).group(1))

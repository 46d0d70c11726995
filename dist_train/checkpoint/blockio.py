"""Positional file I/O straight to/from many buffers, with one checksum per fixed-size block, on several threads.

    segs = [Segment(0, 4096, tensor_bytes(a)), Segment(4096, 800, tensor_bytes(b))]
    rec = write_file(path, segs, size=4896, threads=2)   # {"bytes", "block", "checksum": "xxh3_64", "digests"}
    got = read_file(path, cover_blocks(segs, 4896), verify=True)  # {block index: hex digest}; bytes land in a, b

A ``Segment`` maps file bytes ``[offset, offset + nbytes)`` to ``source``: a memoryview of exactly ``nbytes``
(after ``skip``), a zero-argument callable returning one (resolved lazily on the thread that needs it, so a
device tensor is copied to host only when it is written), or ``None`` (reads only: the bytes are checksummed
and dropped — filler that completes a block that must be verified).

Why this shape: the checkpoint's tensors already sit in memory in their final byte layout, so the file is
written from them and read back into them with no intermediate buffer, and the checksum is taken on each
piece right after it was read (or right before it is written) while it is still in the CPU cache — one pass
over the data instead of two. Work is cut into ``threads`` contiguous spans at block boundaries, so every
block is handled by one thread in file order and the block digests are the same for any thread count.
The hash (``checksum``: XXH3-64 for new files, CRC-32 to verify old ones), ``os.preadv`` and ``os.pwrite``
release the GIL, so threads overlap hashing and copy work (whether that still pays with XXH3 is measured in
docs/benchmarks/ckpt.md).

Page cache (writes): each writing thread hands the pages of every finished ``window`` bytes back to the
kernel as it goes (``_WriteBack``: start write-back of the window, wait for the previous one and drop it), so
a save of N GiB cycles through a few hot windows of page cache instead of taking N GiB of fresh pages. On a
VM whose host backs guest memory lazily, fresh pages are what made a 1 GiB checkpoint write cost 2.3-2.9 s
against 0.3 s for recycled ones (docs/benchmarks/ckpt.md); on any machine it keeps checkpoint bytes from
evicting the training job's page cache and spreads write-back over the write instead of one large fsync at
the end. The final fsync still makes the file durable. Reads keep their pages: ranks on one node that load
the same replicated tensors read the same file bytes, and the page cache serves all but the first.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Callable, Optional, Union

from dist_train.checkpoint import checksum

BLOCK = 4 << 20  # checksum granularity and the unit of one read/write syscall
WINDOW = 64 << 20  # write-back / page-cache recycling granularity per writing thread (module doc); 0: off

Source = Union[memoryview, Callable[[], memoryview], None]


@dataclass(frozen=True)
class Segment:
    """File bytes ``[offset, offset + nbytes)`` <-> ``source[skip:skip + nbytes]`` (see module doc)."""
    offset: int
    nbytes: int
    source: Source
    skip: int = 0

    @property
    def end(self) -> int:
        return self.offset + self.nbytes


def _round_up(x: int, block: int) -> int:
    return -(-x // block) * block


def cover_blocks(segments: list[Segment], size: int, block: int = BLOCK) -> list[Segment]:
    """Sorted ``segments`` plus ``None`` fillers so that every block they touch is covered completely
    (bytes ``[b * block, min(size, (b + 1) * block))``): what verifying a partial read needs."""
    segs = sorted((s for s in segments if s.nbytes), key=lambda s: s.offset)
    out: list[Segment] = []
    pos = 0  # everything before pos is covered or belongs to blocks nobody reads
    for i, s in enumerate(segs):
        if s.offset < pos:
            raise ValueError(f"segments overlap at file offset {s.offset} (the previous one ends at {pos})")
        start = max(pos, s.offset // block * block)
        if start < s.offset:
            out.append(Segment(start, s.offset - start, None))
        out.append(s)
        pos = s.end
        block_end = min(size, _round_up(pos, block))
        nxt = segs[i + 1].offset if i + 1 < len(segs) else size
        if pos < block_end <= nxt:  # the next segment does not start inside this block: fill to its end
            out.append(Segment(pos, block_end - pos, None))
            pos = block_end
    return out


def _split(segments: list[Segment], threads: int, block: int) -> list[list[Segment]]:
    """Cut sorted segments into up to ``threads`` runs of about equal bytes, only at block boundaries."""
    total = sum(s.nbytes for s in segments)
    if threads <= 1 or total <= block:
        return [segments]
    cuts: list[int] = []  # file offsets, block-aligned, increasing
    acc, k = 0, 1
    for s in segments:
        while k < threads and acc + s.nbytes > total * k // threads:
            at = _round_up(s.offset + total * k // threads - acc, block)
            if (not cuts or at > cuts[-1]) and at < segments[-1].end:
                cuts.append(at)
            k += 1
        acc += s.nbytes
    runs: list[list[Segment]] = [[]]
    ci = 0
    for s in segments:
        while ci < len(cuts) and cuts[ci] <= s.offset:  # a cut in the gap before this segment
            if runs[-1]:
                runs.append([])
            ci += 1
        while ci < len(cuts) and s.offset < cuts[ci] < s.end:
            head = cuts[ci] - s.offset
            runs[-1].append(replace(s, nbytes=head))
            runs.append([])
            s = replace(s, offset=cuts[ci], nbytes=s.nbytes - head, skip=s.skip + head)
            ci += 1
        runs[-1].append(s)
    return [r for r in runs if r]


def _resolve(s: Segment) -> Optional[memoryview]:
    if s.source is None:
        return None
    view = s.source() if callable(s.source) else s.source
    return view[s.skip:s.skip + s.nbytes]


def _pread_fully(fd: int, view: memoryview, offset: int, path: str) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise EOFError(f"{path}: ends at byte {offset + done}, expected at least {offset + len(view)} bytes "
                           "(truncated)")
        done += n


def _pwrite_fully(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


@functools.lru_cache(maxsize=1)
def _sync_file_range() -> Optional[Callable[[int, int, int, int], int]]:
    """libc's ``sync_file_range`` (Linux; not in the ``os`` module), or None where there is none."""
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SFR_WAIT_BEFORE, _SFR_WRITE, _SFR_WAIT_AFTER = 1, 2, 4  # <linux/fs.h> SYNC_FILE_RANGE_*


class _WriteBack:
    """Hands one writing thread's finished ``window``-byte ranges of ``fd`` back to the kernel (module doc).

    A finished window's write-back is started (``sync_file_range(WRITE)``); the window before it is waited
    for and dropped (``posix_fadvise(DONTNEED)``; it only drops clean pages), so at most two windows per
    thread are dirty or cached at a time; ``write_file`` fsyncs and drops the rest. Advisory for the data:
    the file's bytes are the same with or without it; a write-back error is raised (as ``fsync`` would)."""

    def __init__(self, fd: int, window: int, path: str) -> None:
        self.fd, self.path = fd, path
        self.sfr = _sync_file_range() if window > 0 else None
        self.window = window if self.sfr is not None else 0  # no sync_file_range (not Linux): plain writes
        self.start: Optional[int] = None  # first offset of the current window
        self.prev: Optional[tuple[int, int]] = None  # (offset, length) being written back, not yet dropped

    def _sync(self, offset: int, length: int, flags: int) -> None:
        if self.sfr(self.fd, offset, length, flags) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{self.path}: write-back of bytes [{offset}, {offset + length}) failed: "
                               f"{os.strerror(err)}")

    def advance(self, offset: int, end: int) -> None:
        """Bytes ``[offset, end)`` were just written."""
        if not self.window:
            return
        if self.start is None:
            self.start = offset
        if end - self.start < self.window:
            return
        self._sync(self.start, end - self.start, _SFR_WRITE)
        if self.prev is not None:
            self._sync(*self.prev, _SFR_WAIT_BEFORE | _SFR_WRITE | _SFR_WAIT_AFTER)
            os.posix_fadvise(self.fd, *self.prev, os.POSIX_FADV_DONTNEED)
        self.prev, self.start = (self.start, end - self.start), end


def _run(path: str, fd_flags: int, run: list[Segment], writing: bool, algorithm: Optional[str], size: int,
         block: int, window: int) -> dict[int, str]:
    """One thread's span: I/O unit by unit (never crossing a block boundary), one ``algorithm`` digest per
    block (none when ``algorithm`` is None); when writing, finished ``window``s handed back to the kernel."""
    digests: dict[int, str] = {}
    scratch: Optional[memoryview] = None
    fd = os.open(path, fd_flags)
    try:
        if not writing and run:
            os.posix_fadvise(fd, run[0].offset, run[-1].end - run[0].offset, os.POSIX_FADV_SEQUENTIAL)
        write_back = _WriteBack(fd, window if writing else 0, path)
        cur, hasher = -1, None
        for s in run:
            view = _resolve(s)
            pos = 0
            while pos < s.nbytes:
                off = s.offset + pos
                n = min(s.nbytes - pos, (off // block + 1) * block - off)
                if view is None:
                    if scratch is None:
                        scratch = memoryview(bytearray(block))
                    piece = scratch[:n]
                else:
                    piece = view[pos:pos + n]
                if not writing:
                    _pread_fully(fd, piece, off, path)
                if algorithm is not None:
                    if off // block != cur:
                        assert off % block == 0, f"block {off // block} of {path} is not covered from its start"
                        cur, hasher = off // block, checksum.new_hasher(algorithm)
                    hasher.update(piece)
                    if (off + n) % block == 0 or off + n == size:
                        digests[cur], cur = hasher.hexdigest(), -1
                if writing:
                    _pwrite_fully(fd, piece, off)
                    write_back.advance(off, off + n)
                pos += n
    finally:
        os.close(fd)
    return digests


def _parallel(path: str, flags: int, segments: list[Segment], writing: bool, algorithm: Optional[str], size: int,
              threads: int, block: int, window: int) -> dict[int, str]:
    runs = _split(segments, threads, block)
    if len(runs) == 1:
        return _run(path, flags, runs[0], writing, algorithm, size, block, window)
    digests: dict[int, str] = {}
    # the calling thread takes the first span itself: one thread fewer to start per file (thread starts were
    # 12 of 351 ms in a cProfile of one rank's bench save under load; docs/benchmarks/ckpt_engines.md)
    with ThreadPoolExecutor(max_workers=len(runs) - 1, thread_name_prefix="ckpt-io") as pool:
        rest = [pool.submit(_run, path, flags, r, writing, algorithm, size, block, window) for r in runs[1:]]
        # on a failure here, leaving the block waits for the other spans before the error propagates
        digests.update(_run(path, flags, runs[0], writing, algorithm, size, block, window))
        for fut in rest:
            digests.update(fut.result())
    return digests


def write_file(path: Union[str, os.PathLike], segments: list[Segment], size: int, threads: int = 1,
               block: int = BLOCK, window: int = WINDOW) -> dict:
    """Create ``path`` from ``segments`` (which must tile ``[0, size)`` exactly), fsync it once, drop its
    pages from the page cache (with ``window`` > 0, see module doc), and return its checksum record
    (``checksum.make_record``: ``{"bytes", "block", "checksum": checksum.ALGORITHM, "digests": [hex, ...]}``)."""
    path = str(path)
    segs = sorted((s for s in segments if s.nbytes), key=lambda s: s.offset)
    pos = 0
    for s in segs:
        if s.offset != pos or s.source is None:
            raise ValueError(f"{path}: segments must tile the file: gap, overlap or empty source at byte {pos}")
        pos = s.end
    if pos != size:
        raise ValueError(f"{path}: segments cover {pos} bytes, size is {size}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        digests = _parallel(path, os.O_WRONLY, segs, True, checksum.ALGORITHM, size, threads, block, window)
        os.fsync(fd)  # one fsync flushes the pages every thread's descriptor wrote (same inode)
        if window > 0:  # now clean: hand the rest (each thread's last two windows) back too
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return checksum.make_record(size, block, [digests[b] for b in range(len(digests))])


def read_file(path: Union[str, os.PathLike], segments: list[Segment], threads: int = 1, verify: bool = False,
              size: int = -1, block: int = BLOCK, algorithm: str = checksum.ALGORITHM) -> dict[int, str]:
    """Read ``segments`` (sorted, non-overlapping; with ``verify`` they must cover whole blocks, see
    ``cover_blocks``, and ``size`` is the file size) into their buffers; return ``{block: hex digest}``
    (``algorithm``, the one named in the file's record) of every block read when ``verify``, else ``{}``.
    Raises ``EOFError`` naming the file when it is too short."""
    segs = sorted((s for s in segments if s.nbytes), key=lambda s: s.offset)
    return _parallel(str(path), os.O_RDONLY, segs, False, algorithm if verify else None, size, threads, block, 0)

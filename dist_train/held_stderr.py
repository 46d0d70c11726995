"""File descriptor 2 held back for a block and replayed after it: what C++ libraries write there directly (Ray's
client retrying a connection, libkineto's profiler start and stop lines) can be dropped whole or line by line,
and everything else still reaches stderr. Python's stdout held back for a block likewise: dropped, unless the block
fails (stdout_shown_on_error).

    with stderr_held_back() as held: ...; held.drop()   # nothing is replayed
    with stderr_held_back(skip=b"USDT:"): ...           # every line but those is replayed
    with stderr_held_back(skip_containing=(b"Memory block of unknown size",)): ...   # nor lines with these
    with stdout_shown_on_error(): ...                   # Python's stdout dropped, unless the block raises
"""
from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
from typing import Iterator, Optional, Sequence

#: libkineto (torch 2.13) writes ``USDT:<time> <pid> SyncActivityProfilerHandler.cpp:52] profiler_start`` (and
#: ``…_stop``) to stderr from C++ at every profiler start and stop; no log level or environment variable
#: silences it: ``stderr_held_back(skip=KINETO_NOISE)`` around a profiler's start and stop drops those lines only.
KINETO_NOISE = b"USDT:"


class HeldStderr:
    """The handle :func:`stderr_held_back` yields: ``drop()`` and nothing held is replayed."""

    def __init__(self) -> None:
        self.keep = True

    def drop(self) -> None:
        self.keep = False


@contextlib.contextmanager
def stderr_held_back(skip: Optional[bytes] = None, skip_containing: Sequence[bytes] = ()) -> Iterator[HeldStderr]:
    """Send file descriptor 2 (C++ libraries included) to a temporary file for the body; afterwards replay it,
    without the lines that start with ``skip`` or contain one of ``skip_containing`` (C++ log lines open with a
    level, a time and, in a distributed rank, ``[rankN]:``), unless the body called ``.drop()`` on the yielded
    handle. Held lines reach stderr when the body ends, exception or not."""
    held = HeldStderr()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield held
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if held.keep:
                caught.seek(0)
                _replay(b"".join(line for line in caught if not _skipped(line, skip, skip_containing)))


@contextlib.contextmanager
def stdout_shown_on_error() -> Iterator[None]:
    """Hold what the body prints to Python's ``sys.stdout`` (a library's chatter on a command whose stdout is its
    result) and drop it when the body ends normally; when it raises, write what was held to stderr first (the rank's
    log for a launched rank): what a library printed before it failed is part of the failure's story."""
    held = io.StringIO()
    try:
        with contextlib.redirect_stdout(held):
            yield
    except BaseException:
        _replay(held.getvalue().encode())
        raise


def _skipped(line: bytes, skip: Optional[bytes], skip_containing: Sequence[bytes]) -> bool:
    return (skip is not None and line.startswith(skip)) or any(part in line for part in skip_containing)


def _replay(data: bytes) -> None:
    if data and hasattr(sys.stderr, "buffer"):
        sys.stderr.buffer.write(data)
    elif data:  # a text-only stream (a test's capture)
        sys.stderr.write(data.decode(errors="replace"))
    sys.stderr.flush()

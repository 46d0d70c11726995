"""File descriptor 2 held back for a block and replayed after it: what C++ libraries write there directly (Ray's
client retrying a connection, libkineto's profiler start and stop lines) can be dropped whole or line by line,
and everything else still reaches stderr.

    with stderr_held_back() as held: ...; held.drop()   # nothing is replayed
    with stderr_held_back(skip=b"USDT:"): ...           # every line but those is replayed
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from typing import Iterator, Optional


class HeldStderr:
    """The handle :func:`stderr_held_back` yields: ``drop()`` and nothing held is replayed."""

    def __init__(self) -> None:
        self.keep = True

    def drop(self) -> None:
        self.keep = False


@contextlib.contextmanager
def stderr_held_back(skip: Optional[bytes] = None) -> Iterator[HeldStderr]:
    """Send file descriptor 2 (C++ libraries included) to a temporary file for the body; afterwards replay it,
    without the lines that start with ``skip``, unless the body called ``.drop()`` on the yielded handle."""
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
                _replay(b"".join(line for line in caught if skip is None or not line.startswith(skip)))


def _replay(data: bytes) -> None:
    if data and hasattr(sys.stderr, "buffer"):
        sys.stderr.buffer.write(data)
    elif data:  # a text-only stream (a test's capture)
        sys.stderr.write(data.decode(errors="replace"))
    sys.stderr.flush()

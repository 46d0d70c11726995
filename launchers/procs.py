"""One rank as an operating-system process: start it in its own session, forward its output line by line
with a ``[rank N]`` prefix, keep its raw stderr in ``logs/rank_N.stderr``, signal it, kill its whole tree.

Used by every backend: the local launcher (threads in the launcher), the Ray actors (one per rank, the
lines are buffered until the driver polls), and the MPI rank wrapper (``python -m launchers.rankio``).
"""
from __future__ import annotations

import collections
import functools
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Callable, Deque, Optional

from dist_train.lifecycle import kill_me_with_parent

#: ``sink(stream, text)``: stream is "stdout" or "stderr"; text is one line with its terminator
#: ("\n", or "\r" for progress-bar redraws, or none for a final unterminated line), already prefixed.
Sink = Callable[[str, str], None]
TAIL_LINES = 30


def rank_prefix(rank: int) -> str:
    return f"[rank {rank}] "


class ConsoleSink:
    """Writes prefixed lines to this process's stdout/stderr; one lock so lines never interleave."""

    def __init__(self, stdout: Optional[IO[str]] = None, stderr: Optional[IO[str]] = None):
        self._out = {"stdout": stdout or sys.stdout, "stderr": stderr or sys.stderr}
        self._lock = threading.Lock()

    def __call__(self, stream: str, text: str) -> None:
        with self._lock:
            f = self._out[stream]
            f.write(text)
            f.flush()


def _split_segments(buf: bytes) -> tuple[list[bytes], bytes]:
    """Split at b"\\n" and b"\\r" (keeping them); return complete segments and the unterminated rest."""
    segments, start = [], 0
    for i, b in enumerate(buf):
        if b in (10, 13):
            segments.append(buf[start:i + 1])
            start = i + 1
    return segments, buf[start:]


class Pump(threading.Thread):
    """Copy one pipe: prefixed segments to the sink, raw bytes to an optional log file, a tail in memory."""

    def __init__(self, pipe: IO[bytes], stream: str, prefix: str, sink: Sink, log: Optional[IO[bytes]],
                 tail: Deque[str]):
        super().__init__(daemon=True, name=f"pump-{stream}")
        self.pipe, self.stream, self.prefix, self.sink, self.log, self.tail = pipe, stream, prefix, sink, log, tail

    def _emit(self, seg: bytes) -> None:
        text = seg.decode("utf-8", errors="replace")
        body = text.rstrip("\r\n")
        if self.stream == "stderr" and body.strip():
            self.tail.append(body)
        self.sink(self.stream, self.prefix + text)

    def run(self) -> None:
        rest = b""
        fd = self.pipe.fileno()
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            if self.log is not None:
                self.log.write(chunk)
                self.log.flush()
            segments, rest = _split_segments(rest + chunk)
            for seg in segments:
                self._emit(seg)
        if rest:
            self._emit(rest + b"\n")
        self.pipe.close()


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to ``pid``, its process group (its session, since we start ranks with
    ``start_new_session``) and every descendant still parented to it (a child may have its own group)."""
    try:
        import psutil

        try:
            procs = psutil.Process(pid).children(recursive=True)
        except psutil.NoSuchProcess:
            procs = []
    except ImportError:  # psutil is a dependency; without it the process group still covers most cases
        procs = []
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    for p in [*procs]:
        try:
            p.send_signal(sig)
        except Exception:  # noqa: BLE001 - gone already (psutil.NoSuchProcess) or not ours
            continue
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


class RankProcess:
    """A running rank. ``argv`` is started with ``env`` in a new session (so a terminal's Ctrl-C does not
    hit it directly and ``kill_tree`` reaches its children); its output goes through ``sink``.

    Args:
        log_dir: if given, stderr is appended to ``log_dir/rank_N.stderr`` under an attempt header.
        pass_fds: keep inherited file descriptors open (MPI process managers pass PMI_FD this way).
        die_with_parent: on Linux the rank gets SIGKILL when the thread that started it dies (so a
            SIGKILLed launcher leaves no orphan ranks); only meaningful from a long-lived thread.
    """

    def __init__(self, argv: list[str], rank: int, env: dict[str, str], sink: Sink,
                 log_dir: Optional[Path] = None, attempt: int = 0, pass_fds: bool = False,
                 cwd: Optional[str] = None, die_with_parent: bool = True):
        self.rank = rank
        self.tail: Deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._log = None
        if log_dir is not None:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            self._log = open(Path(log_dir) / f"rank_{rank}.stderr", "ab")
            self._log.write(f"===== attempt {attempt} started {time.strftime('%Y-%m-%d %H:%M:%S')} "
                            f"=====\n".encode())
            self._log.flush()
        self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, start_new_session=True, close_fds=not pass_fds,
                                     cwd=cwd, preexec_fn=functools.partial(kill_me_with_parent, os.getpid())
                                     if die_with_parent else None)
        prefix = rank_prefix(rank)
        self._pumps = [Pump(self.proc.stdout, "stdout", prefix, sink, None, self.tail),
                       Pump(self.proc.stderr, "stderr", prefix, sink, self._log, self.tail)]
        for p in self._pumps:
            p.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> Optional[int]:
        """The return code once the process ended and its output is fully forwarded; else None."""
        code = self.proc.poll()
        if code is None:
            return None
        for p in self._pumps:  # the pipes close right after exit (unless a grandchild holds them)
            p.join(timeout=2.0)
        return code

    def send_signal(self, sig: int) -> None:
        """Signal the rank's own process (not its children: data-loader workers should not see SIGTERM)."""
        try:
            self.proc.send_signal(sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        kill_tree(self.proc.pid, signal.SIGKILL)

    def wait(self, timeout: Optional[float] = None) -> int:
        self.proc.wait(timeout=timeout)
        return self.poll()  # type: ignore[return-value]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill()
            self.proc.wait()
        for p in self._pumps:
            p.join(timeout=2.0)
        if self._log is not None:
            self._log.close()
            self._log = None

"""``--backend mpi``: wrap ``mpiexec -n N`` on this machine; each rank runs under the I/O wrapper
(``launchers.rankio``) and finds its rank in the MPI environment (``launchers.env.populate_rank_env``); the
master is 127.0.0.1 and a free port the launcher picks.

The ``mpiexec`` used is ``$DIST_TRAIN_MPIEXEC``, else the one next to this Python (the pip ``mpich``
package installs it there, and it is the MPI mpi4py was built against), else the first on ``PATH``. Where that
one is MPICH's hydra and its installation has ``mpiexec.gforker`` (pip's does), the ranks start with gforker:
hydra's ``mpiexec`` and proxy listen on 0.0.0.0 for each other (a control socket every rank inherits, which
``-iface lo``, ``-localhost`` and ``HYDRA_IFACE`` do not move), while gforker forks every rank here and talks
PMI over inherited socket pairs. A ``$DIST_TRAIN_MPIEXEC`` is used as given.
Multi-node MPI jobs are started by the scheduler (``dist-train submit`` writes ``srun``/``mpiexec`` lines
that run ``dist-train run`` directly), so this backend never needs ssh.
"""
from __future__ import annotations

import collections
import filecmp
import functools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from dist_train.lifecycle import EXIT_OK, EXIT_PREEMPTED, kill_me_with_parent
from dist_train.loopback import loopback_environment
from launchers.env import EXPECT_WORLD_ENV, LAUNCHER_ENV, TORCH_VARS, free_port
from launchers.procs import ConsoleSink, Pump, Sink, kill_tree
from launchers.rankio import exit_status_path, read_exit_status
from launchers.supervisor import RankProgress, progress_from_heartbeats

MPIEXEC_ENV = "DIST_TRAIN_MPIEXEC"
#: MPICH's process manager that forks every rank on this machine and listens on nothing.
GFORKER = "mpiexec.gforker"
#: How a rank dies when mpiexec ends the job because another rank exited non-zero without MPI_Finalize (gforker:
#: SIGINT, which launchers.rankio forwards as SIGTERM, then SIGQUIT).
CLEANUP_DEATHS = frozenset({-int(signal.SIGTERM), -int(signal.SIGINT), -int(signal.SIGQUIT)})


#: gforker's line on its stderr, as the job ends, for each rank wrapper that failed or died of a signal:
#: ``[0]1:Return code = 0, signaled with Killed`` (the signal as strsignal(3) names it)
GFORKER_REPORT = re.compile(r"\[\d+\](\d+):Return code = (-?\d+)(?:, signaled with (.+?))?\s*$")
_SIGNAL_NAMED = {signal.strsignal(s): s for s in signal.valid_signals() if signal.strsignal(s)}


class MpiexecReports:
    """The sink of mpiexec's stderr (the ranks' prefixed lines pass through it): every line goes on to ``console``;
    gforker's :data:`GFORKER_REPORT` of a rank is kept in ``codes`` (rank -> Popen convention: -signal when its
    wrapper was killed). A SIGKILLed wrapper writes no ``rank_N.exit``, so this is the only word of how it died."""

    def __init__(self, console: Sink):
        self.console, self.codes = console, {}

    def __call__(self, stream: str, text: str) -> None:
        found = GFORKER_REPORT.search(text)  # also after a rank's unterminated last line, on the same line
        if found and found[3] is None and int(found[2]) != 0:
            self.codes[int(found[1])] = int(found[2])
        elif found and found[3] in _SIGNAL_NAMED:
            self.codes[int(found[1])] = -int(_SIGNAL_NAMED[found[3]])
        self.console(stream, text)


def without_cleanup_deaths(codes: list[Optional[int]]) -> list[Optional[int]]:
    """Per-rank codes with the deaths mpiexec caused (:data:`CLEANUP_DEATHS`) shown as still running (None) when
    another rank failed otherwise: the supervisor names a rank killed by a signal as the cause, which named the
    bystander (`rank 0 killed by SIGTERM`, exit 143) instead of the rank that failed (exit 3). Only for an attempt
    this launcher has not signalled itself."""
    cause = any(c not in (None, EXIT_OK, EXIT_PREEMPTED) and c not in CLEANUP_DEATHS for c in codes)
    return [None if cause and c in CLEANUP_DEATHS else c for c in codes]


def find_mpiexec() -> Optional[str]:
    """The mpiexec to use (see the module docstring), or None."""
    explicit = os.environ.get(MPIEXEC_ENV)
    if explicit:
        return explicit
    sibling = Path(sys.executable).parent / "mpiexec"
    if sibling.is_file() and os.access(sibling, os.X_OK):
        return str(sibling)
    return shutil.which("mpiexec") or shutil.which("mpirun")


def gforker_beside(mpiexec: str) -> Optional[str]:
    """The ``mpiexec.gforker`` of the MPICH installation whose hydra ``mpiexec`` is, or None: ``mpiexec`` (after
    symbolic links) must be that directory's ``mpiexec.hydra`` or a copy of it (pip's ``mpiexec`` is), so an
    Open MPI ``mpiexec`` is never paired with another installation's gforker."""
    real = Path(os.path.realpath(mpiexec))
    gforker, hydra = real.parent / GFORKER, real.parent / "mpiexec.hydra"
    if not (gforker.is_file() and os.access(gforker, os.X_OK) and hydra.is_file()):
        return None
    return str(gforker) if real == hydra or filecmp.cmp(real, hydra, shallow=False) else None


def backend_mpiexec() -> Optional[str]:
    """What ``--backend mpi`` starts the ranks with: ``$DIST_TRAIN_MPIEXEC`` as given, else :func:`find_mpiexec`'s,
    or the gforker beside it (:func:`gforker_beside`: nothing listens on the network)."""
    found = find_mpiexec()
    if found is None or os.environ.get(MPIEXEC_ENV):
        return found
    return gforker_beside(found) or found


def _tail_of_file(path: Path, n: int) -> list[str]:
    """The last ``n`` non-empty lines of the last attempt section of a ``rank_N.stderr`` file."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    section = text.rsplit("===== attempt ", 1)[-1].split("\n", 1)[-1]
    return [line for line in section.splitlines() if line.strip()][-n:]


class MpiAttempt:
    """One ``mpiexec`` run. Per-rank status comes from the wrappers' ``rank_N.exit`` files, for a wrapper that
    left none (killed) from mpiexec's report on its stderr when ``proc`` was started with ``stderr=PIPE``."""

    def __init__(self, proc: subprocess.Popen, nproc: int, run_dir: Path, attempt: int, started: float):
        self.proc, self.world_size, self.run_dir, self.attempt, self.started = proc, nproc, run_dir, attempt, started
        self.log_dir = run_dir / "logs"
        self.signalled = False  # by this launcher (send_signal): then a rank's SIGTERM death is ours, not mpiexec's
        self.reports = MpiexecReports(ConsoleSink())
        self._stderr = None
        if proc.stderr is not None:
            self._stderr = Pump(proc.stderr, "stderr", "", self.reports, None, collections.deque(maxlen=1))
            self._stderr.start()

    def poll(self) -> list[Optional[int]]:
        codes = [read_exit_status(self.log_dir, r, self.attempt) for r in range(self.world_size)]
        launcher = self.proc.poll()
        if launcher is not None:
            # A rank that left no status died with its wrapper: as mpiexec reported that wrapper's end (gforker: a
            # SIGKILLed wrapper, `rank 1 killed by SIGKILL`), else mpiexec's code, unless that is 0 (gforker exits
            # 0 after a rank died of a signal, and after a single rank's failure).
            if self._stderr is not None:
                self._stderr.join(timeout=2.0)  # its report is the last it writes; the pipe closes as it exits
            codes = [c if c is not None else self.reports.codes.get(r, launcher or 1) for r, c in enumerate(codes)]
        if self.signalled:
            return codes
        if launcher is None:
            # mpiexec is still ending the job: the rank that made it do so may not have reported yet (a killed
            # wrapper only in mpiexec's report, as mpiexec exits), so a death mpiexec causes is no cause yet
            return [None if c in CLEANUP_DEATHS else c for c in codes]
        return without_cleanup_deaths(codes)

    def progress(self) -> dict[int, RankProgress]:
        return progress_from_heartbeats(self.run_dir, range(self.world_size), self.attempt, self.started)

    def _wrappers(self) -> list:
        import psutil

        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        out = []
        for p in kids:
            try:
                if "launchers.rankio" in " ".join(p.cmdline()):
                    out.append(p)
            except psutil.Error:
                continue
        return out

    def send_signal(self, sig: int) -> None:
        # Not to mpiexec: hydra answers SIGTERM by killing the ranks, which would lose the checkpoint.
        self.signalled = True
        for p in self._wrappers():
            try:
                p.send_signal(sig)
            except Exception:  # noqa: BLE001 - already gone
                continue

    def kill(self) -> None:
        kill_tree(self.proc.pid)

    def tail(self, rank: int) -> list[str]:
        from launchers.procs import TAIL_LINES

        return _tail_of_file(self.log_dir / f"rank_{rank}.stderr", TAIL_LINES)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill()
        self.proc.wait()
        if self._stderr is not None:
            self._stderr.join(timeout=2.0)


class MpiBackend:
    """Run ``nproc`` ranks with ``mpiexec -n nproc`` on this machine."""

    name = "mpi"

    def __init__(self, nproc: int, run_dir: Path, mpiexec: Optional[str] = None, extra_args: tuple[str, ...] = ()):
        if nproc < 1:
            raise ValueError(f"--nproc {nproc}: the mpi backend needs at least 1 rank")
        self.mpiexec = mpiexec or backend_mpiexec()
        if not self.mpiexec:
            raise ValueError("--backend mpi: no mpiexec found (set DIST_TRAIN_MPIEXEC, put one on PATH, or "
                             "pip install mpich)")
        self.nproc, self.run_dir, self.extra_args = nproc, Path(run_dir), tuple(extra_args)

    def command(self, argv: list[str]) -> list[str]:
        return [self.mpiexec, "-n", str(self.nproc), *self.extra_args, sys.executable, "-m", "launchers.rankio",
                "--log-dir", str(self.run_dir / "logs"), "--", *argv]

    def start(self, argv: list[str], env: dict[str, str], attempt: int) -> MpiAttempt:
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        for r in range(self.nproc):
            exit_status_path(self.run_dir / "logs", r).unlink(missing_ok=True)
        # Variables of an outer launcher (torchrun's RANK...) would hide MPI's from the ranks.
        full = {k: v for k, v in os.environ.items() if k not in TORCH_VARS}
        full.update(env)
        full.update({LAUNCHER_ENV: "mpi", EXPECT_WORLD_ENV: str(self.nproc), "PYTHONUNBUFFERED": "1"})
        # Every rank runs here: rank 0's store (no authentication) and the transports listen on loopback, as under
        # the local backend. Without MASTER_ADDR rank 0 broadcast the host's outside address and listened there.
        # A fresh port per attempt: the old store may linger in TIME_WAIT.
        full.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port("127.0.0.1")),
                     **loopback_environment(full)})
        started = time.time()
        # mpiexec dies with this launcher (SIGKILLed, OOM-killed), and each rank wrapper with mpiexec (launchers.rankio),
        # each rank with its wrapper: as local ranks, none outlives it (they kept training and held the run lock)
        proc = subprocess.Popen(self.command(argv), env=full, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True, preexec_fn=functools.partial(kill_me_with_parent, os.getpid()))
        return MpiAttempt(proc, self.nproc, self.run_dir, attempt, started)

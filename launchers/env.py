"""Turn whatever started this process into the torch.distributed environment of one rank.

``populate_rank_env()`` is what ``dist-train run`` calls first. It fills RANK, LOCAL_RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT in ``os.environ`` from, in this order:

1. torchrun / our own launchers (``RANK`` and ``WORLD_SIZE`` already set): passed through unchanged;
2. Open MPI ``mpirun`` (``OMPI_COMM_WORLD_*``);
3. MPICH / Intel MPI hydra ``mpiexec`` (``PMI_RANK``, ``PMI_SIZE``, ``MPI_LOCALRANKID``…);
4. Cray PALS ``mpiexec`` under PBS (``PALS_RANKID``, ``PALS_LOCAL_RANKID``, ``PMI_SIZE``…);
5. Slurm ``srun`` (``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``, ``SLURM_LOCALID``…);
6. nothing at all: a single process (nothing is set).

MPI launchers come before Slurm because an ``mpirun`` inside an ``sbatch`` script inherits the batch
step's ``SLURM_PROCID=0`` on every rank. For the MPI sources rank 0 chooses its address and a free port
and broadcasts them with mpi4py; the same step checks that MPI sees the world the environment promises
(an mpi4py built against another MPI than the launcher's makes every rank a world of its own — that is
reported in one line instead of hanging in the rendezvous). Slurm needs no MPI: the master is the first
host of the step's node list and the port is derived from the job and step ids.
"""
from __future__ import annotations

import os
import re
import socket
import sys
from dataclasses import dataclass
from typing import Mapping, MutableMapping, Optional


#: Set by ``dist-train launch --backend mpi`` (and batch scripts): how many ranks the launcher started,
#: so a rank that finds itself alone can say so.
EXPECT_WORLD_ENV = "DIST_TRAIN_EXPECT_WORLD"
#: ``mpi`` forces mpi4py discovery when the launcher's variables are unknown to us.
LAUNCHER_ENV = "DIST_TRAIN_LAUNCHER"
TORCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class LaunchError(ValueError):
    """The environment cannot describe a consistent job; the message is one line for the user."""


@dataclass(frozen=True)
class RankEnv:
    """Where this process sits in the job. ``world_size``/``local_world_size`` None = ask MPI."""

    rank: int
    local_rank: int
    world_size: Optional[int]
    local_world_size: Optional[int]
    source: str  # torchrun | openmpi | mpich | pals | slurm | mpi4py | single
    evidence: str = ""  # the variable that told us the world size, for error messages
    master_addr: Optional[str] = None
    master_port: Optional[int] = None

    @property
    def uses_mpi(self) -> bool:
        return self.source in ("openmpi", "mpich", "pals", "mpi4py")


# ----------------------------------------------------------------------------------------------
# Pure detection (no MPI, no sockets): unit-testable with a dict as the environment
# ----------------------------------------------------------------------------------------------
def _int(environ: Mapping[str, str], *names: str) -> tuple[Optional[int], str]:
    """The first of ``names`` present in ``environ`` as an int, and its name."""
    for name in names:
        raw = environ.get(name)
        if raw is not None and raw.strip() != "":
            try:
                return int(raw), name
            except ValueError:
                raise LaunchError(f"{name}={raw!r} is not an integer") from None
    return None, ""


def parse_slurm_tasks_per_node(text: str) -> list[int]:
    """``SLURM_TASKS_PER_NODE`` syntax ``'2(x3),1'`` → ``[2, 2, 2, 1]``."""
    out: list[int] = []
    for part in filter(None, text.split(",")):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise LaunchError(f"SLURM_TASKS_PER_NODE={text!r}: cannot parse {part!r} (expected N or N(xK))")
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def slurm_first_host(nodelist: str) -> str:
    """First host of a Slurm host list: ``'gpu[003-005,9],cpu1'`` → ``'gpu003'``."""
    m = re.match(r"\s*([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if not m or not m.group(1):
        raise LaunchError(f"SLURM node list {nodelist!r}: cannot find a host name")
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def detect_rank_env(environ: Mapping[str, str]) -> RankEnv:
    """Which launcher started this process and what it says about our place in the job."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        rank, _ = _int(environ, "RANK")
        world, _ = _int(environ, "WORLD_SIZE")
        local, _ = _int(environ, "LOCAL_RANK")
        lws, _ = _int(environ, "LOCAL_WORLD_SIZE")
        port, _ = _int(environ, "MASTER_PORT")
        return RankEnv(rank or 0, local if local is not None else (rank or 0), world, lws if lws else world,
                       "torchrun", "WORLD_SIZE", environ.get("MASTER_ADDR"), port)
    if "OMPI_COMM_WORLD_RANK" in environ:
        rank, _ = _int(environ, "OMPI_COMM_WORLD_RANK")
        world, ev = _int(environ, "OMPI_COMM_WORLD_SIZE")
        local, _ = _int(environ, "OMPI_COMM_WORLD_LOCAL_RANK")
        lws, _ = _int(environ, "OMPI_COMM_WORLD_LOCAL_SIZE")
        return RankEnv(rank or 0, local or 0, world, lws, "openmpi", ev)
    if "PALS_RANKID" in environ:
        rank, _ = _int(environ, "PALS_RANKID")
        local, _ = _int(environ, "PALS_LOCAL_RANKID", "PMI_LOCAL_RANK")
        world, ev = _int(environ, "PMI_SIZE", "PALS_SIZE")
        lws, _ = _int(environ, "PMI_LOCAL_SIZE", "PALS_LOCAL_SIZE")
        return RankEnv(rank or 0, local or 0, world, lws, "pals", ev)
    if "PMI_RANK" in environ:
        rank, _ = _int(environ, "PMI_RANK")
        world, ev = _int(environ, "PMI_SIZE")
        local, _ = _int(environ, "MPI_LOCALRANKID", "PMI_LOCAL_RANK")
        lws, _ = _int(environ, "MPI_LOCALNRANKS", "PMI_LOCAL_SIZE")
        return RankEnv(rank or 0, local or 0, world, lws, "mpich", ev)
    if "SLURM_PROCID" in environ and ("SLURM_STEP_NUM_TASKS" in environ or "SLURM_NTASKS" in environ):
        rank, _ = _int(environ, "SLURM_PROCID")
        world, ev = _int(environ, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS")
        local, _ = _int(environ, "SLURM_LOCALID")
        node, _ = _int(environ, "SLURM_NODEID")
        per_node_text = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE")
        lws = None
        if per_node_text:
            per_node = parse_slurm_tasks_per_node(per_node_text)
            lws = per_node[node or 0] if (node or 0) < len(per_node) else per_node[-1]
        nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or "localhost"
        job, _ = _int(environ, "SLURM_JOB_ID", "SLURM_JOBID")
        step, _ = _int(environ, "SLURM_STEP_ID", "SLURM_STEPID")
        # Derive the port from the job/step ids so every rank computes the same one without talking.
        port = 15000 + ((job or 0) * 16 + (step or 0)) % 20000
        return RankEnv(rank or 0, local or 0, world, lws, "slurm", ev, slurm_first_host(nodelist), port)
    if environ.get(LAUNCHER_ENV) == "mpi":
        return RankEnv(0, 0, None, None, "mpi4py", "mpi4py")
    return RankEnv(0, 0, 1, 1, "single")


def check_mpi_world(env: RankEnv, mpi_size: int, mpi_library: str = "mpi4py's MPI",
                    environ: Optional[Mapping[str, str]] = None) -> None:
    """Raise a one-line LaunchError if MPI's world disagrees with the launcher's environment.

    The classic failure: mpi4py linked against MPICH under Open MPI's ``mpirun`` (or the reverse) — each
    process initialises a singleton MPI, so every rank sees size 1 and would wait forever for the others.
    """
    environ = os.environ if environ is None else environ
    expected, ev = env.world_size, env.evidence
    promised, _ = _int(environ, EXPECT_WORLD_ENV)
    if promised is not None and (expected is None or expected == 1):
        expected, ev = promised, EXPECT_WORLD_ENV
    if expected is not None and expected != mpi_size:
        alone = " every rank is alone (each one is rank 0 of a world of 1)" if mpi_size == 1 else ""
        raise LaunchError(
            f"MPI launcher mismatch: the environment says {expected} ranks ({ev}={expected}) but {mpi_library} "
            f"sees {mpi_size};{alone} start the job with the mpiexec that belongs to the MPI mpi4py was "
            f"built against (e.g. {os.path.join(os.path.dirname(sys.executable), 'mpiexec')}), "
            f"or rebuild mpi4py for this launcher's MPI")


#: Which MPI family each launcher's variables belong to (Cray PALS starts Cray MPICH).
LAUNCHER_FAMILY = {"openmpi": "Open MPI", "mpich": "MPICH", "pals": "MPICH"}


def mpi_family(library_version: str) -> Optional[str]:
    """'Open MPI' or 'MPICH' (MPICH derivatives: Intel MPI, Cray MPICH, MVAPICH) from
    ``MPI_Get_library_version``; None when unknown."""
    text = library_version.lower()
    if "open mpi" in text:
        return "Open MPI"
    if any(k in text for k in ("mpich", "intel(r) mpi", "mvapich")):
        return "MPICH"
    return None


def check_mpi_family(env: RankEnv, library_version: str) -> None:
    """One line when the launcher (from its variables) and mpi4py's MPI are different implementations.

    Must run *before* MPI_Init: pip's MPICH initialised under Open MPI's ``mpirun`` aborts inside
    MPI_Init, before any message of ours could be printed.
    """
    launcher, library = LAUNCHER_FAMILY.get(env.source), mpi_family(library_version)
    if launcher and library and launcher != library:
        raise LaunchError(
            f"MPI launcher mismatch: this rank was started by {launcher}'s launcher ({env.evidence or env.source}) "
            f"but mpi4py is built against {library} ({library_version.splitlines()[0].strip()}): start the job with "
            f"{os.path.join(os.path.dirname(sys.executable), 'mpiexec')} (the mpiexec of mpi4py's MPI), or install "
            f"mpi4py built for {launcher}")


def _mpi_checked_before_init(env: RankEnv):
    """Import mpi4py's MPI without initialising it, check the family (:func:`check_mpi_family`), then
    initialise. A module that imported MPI earlier has initialised it already: nothing left to check."""
    import mpi4py

    if "mpi4py.MPI" not in sys.modules:
        mpi4py.rc.initialize = False
        mpi4py.rc.finalize = True
    from mpi4py import MPI

    if not MPI.Is_initialized():
        check_mpi_family(env, MPI.Get_library_version())
        MPI.Init()
    return MPI


# ----------------------------------------------------------------------------------------------
# Addresses and ports
# ----------------------------------------------------------------------------------------------
def free_port(host: str = "") -> int:
    """A TCP port that was free a moment ago on this machine (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, 0))
        return int(s.getsockname()[1])


def node_address() -> str:
    """An address of this machine that other nodes can reach: the host name's address unless that is a
    loopback one, else the address of the default-route interface (a UDP connect sends no packet)."""
    try:
        addr = socket.gethostbyname(socket.gethostname())
        if not addr.startswith("127."):
            return addr
    except OSError:
        pass
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            addr = s.getsockname()[0]
            if addr and not addr.startswith("0."):
                return addr
    except OSError:
        pass
    return "127.0.0.1"


# ----------------------------------------------------------------------------------------------
# The entry point of `dist-train run`
# ----------------------------------------------------------------------------------------------
def _complete_with_mpi(env: RankEnv, environ: Mapping[str, str]) -> RankEnv:
    """Ask MPI for what the environment did not say, check the two agree, agree on the master."""
    try:
        MPI = _mpi_checked_before_init(env)
    except ImportError:
        if env.world_size and env.local_world_size and "MASTER_ADDR" in environ and "MASTER_PORT" in environ:
            return env
        raise LaunchError(f"started by an MPI launcher ({env.source}) but mpi4py is not importable: "
                          "install it (pip install mpi4py mpich) or set MASTER_ADDR and MASTER_PORT") from None
    comm = MPI.COMM_WORLD
    library = f"mpi4py's MPI ({MPI.Get_library_version().splitlines()[0].strip()})"
    check_mpi_world(env, comm.Get_size(), library, environ)
    rank = comm.Get_rank() if env.source == "mpi4py" else env.rank
    if rank != comm.Get_rank():
        raise LaunchError(f"MPI launcher mismatch: the environment says rank {env.rank} but MPI says rank "
                          f"{comm.Get_rank()}")
    local_rank, lws = env.local_rank, env.local_world_size
    if env.source == "mpi4py" or lws is None:
        node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
        local_rank, lws = node.Get_rank(), node.Get_size()
        node.Free()
    master = (environ.get("MASTER_ADDR"), environ.get("MASTER_PORT"))
    if master[0] is None or master[1] is None:
        master = comm.bcast((node_address(), str(free_port())) if rank == 0 else None, root=0)
    return RankEnv(rank, local_rank, comm.Get_size(), lws, env.source, env.evidence, master[0], int(master[1]))


def refuse_mpi_backend_on_other_nodes(env: RankEnv, environ: Mapping[str, str]) -> None:
    """One line (LaunchError) when ``dist-train launch --backend mpi`` started this rank but mpiexec placed the job's
    ranks on more than one node: inside a Slurm allocation or with a hostfile it spreads them (hydra starts them with
    srun), while the backend gives them MASTER_ADDR=127.0.0.1 and loopback transports, one machine's setup: the
    other nodes' ranks would never reach rank 0 and the job would hang."""
    if environ.get(LAUNCHER_ENV) != "mpi" or not env.world_size or not env.local_world_size:
        return
    if env.local_world_size < env.world_size:
        raise LaunchError(f"--backend mpi runs every rank on this machine, but mpiexec placed {env.world_size} ranks "
                          f"on several nodes ({env.local_world_size} here: a Slurm/PBS allocation or a hostfile it "
                          f"read): start a multi-node job with dist-train submit, or srun/mpiexec ... dist-train run "
                          f"CONFIG (docs/launching.md)")


def populate_rank_env(environ: Optional[MutableMapping[str, str]] = None) -> RankEnv:
    """Detect the launcher and write the torch.distributed variables into ``environ`` (default
    ``os.environ``). torchrun variables and the single-process case leave it untouched."""
    environ = os.environ if environ is None else environ
    env = detect_rank_env(environ)
    if env.source in ("torchrun", "single"):
        return env
    refuse_mpi_backend_on_other_nodes(env, environ)  # before MPI_Init: its transports are on loopback
    if env.uses_mpi:
        env = _complete_with_mpi(env, environ)
        refuse_mpi_backend_on_other_nodes(env, environ)
    elif env.world_size is None:
        raise LaunchError(f"launcher {env.source}: the world size is unknown ({env.evidence or 'no variable'})")
    if env.local_world_size is None:
        env = RankEnv(env.rank, env.local_rank, env.world_size, env.world_size, env.source, env.evidence,
                      env.master_addr, env.master_port)
    if not 0 <= env.rank < (env.world_size or 0):
        raise LaunchError(f"{env.source}: rank {env.rank} is outside the world of {env.world_size} ranks")
    values = {"RANK": env.rank, "LOCAL_RANK": env.local_rank, "WORLD_SIZE": env.world_size,
              "LOCAL_WORLD_SIZE": env.local_world_size,
              "MASTER_ADDR": environ.get("MASTER_ADDR") or env.master_addr,
              "MASTER_PORT": environ.get("MASTER_PORT") or env.master_port}
    for key, value in values.items():
        environ[key] = str(value)
    return env

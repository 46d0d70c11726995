"""Slurm and PBS batch scripts for ``dist-train submit``.

Two ways to start the job inside the allocation:

* ``mpi`` (default): the scheduler's own launcher starts one process per rank — ``srun`` (Slurm) or
  ``mpiexec -n N --ppn P`` (PBS: MPICH hydra / Cray PALS syntax) — each running
  ``python -m launchers.rankio … -- python -m dist_train run CONFIG`` (rank from SLURM_*/PMI_*/PALS_*,
  see ``launchers.env``);
* ``ray``: a Ray head on the first node and one worker per other node (started with ``srun``/``mpiexec``
  on that node, never ssh), then ``dist-train launch --backend ray --address HEAD`` on the first node.

An evaluation (``dist-train submit --eval``, ``eval_args`` set) runs ``dist_train eval`` instead: per rank under
``mpi`` (``DIST_TRAIN_EVAL_RANK`` names its job dir; rank 0 writes ``--out`` and prints the one line), or as
``dist-train eval --backend ray`` under ``ray``. It is neither signalled before the time limit nor requeued by the
script (a rerun evaluates the same step again), and ``run_dir`` is its job dir (``FILE.json.job``), not run.dir.

Preemption and time limits (training): Slurm sends SIGUSR1 120 s before the limit (``--signal=USR1@120``) and
SIGTERM on preemption; every rank then saves and exits 75 (``EXIT_PREEMPTED``), and the script requeues
itself (``scontrol requeue`` / ``qsub`` of this script). Every start runs with ``checkpoint.restart=true``: the
run's newest committed checkpoint, or before its first save what ``checkpoint.resume`` names.
"""
from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from dist_train.eval_arguments import EVAL_RANK_ENV
from dist_train.lifecycle import EXIT_PREEMPTED
from launchers.supervisor import RESTART_OVERRIDE

SCHEDULERS = ("slurm", "pbs")
BACKENDS = ("mpi", "ray")


@dataclass
class BatchSpec:
    """Everything a batch script needs. ``overrides`` are ``--set`` items for the job."""

    config: str
    scheduler: str
    nodes: int
    time: str
    run_dir: str
    name: str
    gpus_per_node: int = 0
    ntasks_per_node: Optional[int] = None  # default: gpus_per_node, or 1 on CPU nodes
    backend: str = "mpi"
    overrides: list[str] = field(default_factory=list)
    modules: list[str] = field(default_factory=list)
    env_lines: list[str] = field(default_factory=list)
    directives: list[str] = field(default_factory=list)  # extra "#SBATCH …"/"#PBS …" lines, verbatim args
    python: str = sys.executable
    mpiexec: Optional[str] = None  # PBS: default the mpiexec beside ``python`` (its MPI), else "mpiexec"
    script_path: Optional[str] = None  # where the script will be written (PBS requeue resubmits it)
    # the absolute directory `dist-train submit` ran in: the job cds there and its log paths are absolute, so the
    # script runs the same wherever sbatch/qsub is typed (None: the scheduler's submit directory, relative logs)
    workdir: Optional[str] = None
    # the directory holding the dist_train and launchers packages the job runs (put first on PYTHONPATH: a PBS job
    # gets none of the submitting shell's environment without qsub -V); None: the job's python finds them itself
    code_root: Optional[str] = None
    eval_args: Optional[list[str]] = None  # an evaluation: its `dist_train eval` flags (--checkpoint, --out)

    @property
    def log_dir(self) -> str:
        """Where the scheduler's output and the ranks' logs go: run.dir/logs, absolute when ``workdir`` is set."""
        return str(Path(self.workdir, self.run_dir) / "logs") if self.workdir else f"{self.run_dir}/logs"

    @property
    def command(self) -> str:
        """The ``dist_train`` command the job runs."""
        return "run" if self.eval_args is None else "eval"

    @property
    def per_node(self) -> int:
        return self.ntasks_per_node or self.gpus_per_node or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.per_node

    @property
    def mpiexec_path(self) -> str:
        """PBS: the same resolved installation as ``python`` — a bare ``mpiexec`` is not on PATH in a
        batch job without ``qsub -V``, and another MPI's mpiexec cannot start pip's MPICH ranks."""
        if self.mpiexec:
            return self.mpiexec
        sibling = Path(self.python).parent / "mpiexec"
        return str(sibling) if sibling.is_file() else "mpiexec"


def validate(spec: BatchSpec) -> None:
    if spec.scheduler not in SCHEDULERS:
        raise ValueError(f"--scheduler {spec.scheduler!r}: valid values are {', '.join(SCHEDULERS)}")
    if spec.backend not in BACKENDS:
        raise ValueError(f"--backend {spec.backend!r}: batch scripts support {', '.join(BACKENDS)}")
    if spec.nodes < 1:
        raise ValueError(f"--nodes {spec.nodes}: must be >= 1")
    if spec.gpus_per_node < 0:
        raise ValueError(f"--gpus-per-node {spec.gpus_per_node}: must be >= 0")
    if spec.ntasks_per_node is not None and spec.ntasks_per_node < 1:
        raise ValueError(f"--ntasks-per-node {spec.ntasks_per_node}: must be >= 1")
    if not re.fullmatch(r"(\d+-)?\d{1,3}:\d{2}:\d{2}", spec.time):
        raise ValueError(f"--time {spec.time!r}: expected HH:MM:SS (or D-HH:MM:SS for Slurm), e.g. 02:00:00")
    if spec.scheduler == "pbs" and "-" in spec.time:
        raise ValueError(f"--time {spec.time!r}: PBS walltime is HH:MM:SS (e.g. 48:00:00 for two days)")
    # Values written into the script's #SBATCH/#PBS lines: a newline there starts a shell command of the job,
    # whitespace another scheduler option (e.g. --export=LD_PRELOAD=…); the config that names them may come
    # from someone else.
    for what, value in (("job name (--job-name, else run.name)", spec.name),
                        ("run.dir" if spec.eval_args is None else "--out", spec.run_dir),
                        ("the directory dist-train submit runs in (the job's log path starts with it)",
                         spec.workdir or "")):
        bad = next((c for c in value if c.isspace() or not c.isprintable()), None)
        if bad is not None:
            raise ValueError(f"{what} {value!r}: holds {bad!r}, which would end the #SBATCH/#PBS line it is "
                             f"written into; use a value without whitespace or control characters")
    for what, values in (("--directive", spec.directives), ("--module", spec.modules)):
        for value in values:
            if any(not c.isprintable() for c in value):
                raise ValueError(f"{what} {value!r}: holds a control character (a newline would start a shell "
                                 f"line of its own); give each line as its own {what}")


def _q(items: list[str]) -> str:
    return " ".join(shlex.quote(x) for x in items)


def _job_args(spec: BatchSpec) -> list[str]:
    args = [spec.config]
    for o in [*spec.overrides, *([RESTART_OVERRIDE] if spec.eval_args is None else [])]:
        args += ["--set", o]
    return args + list(spec.eval_args or [])


def _rank_command(spec: BatchSpec) -> str:
    """What each rank runs: the I/O wrapper around ``dist_train run`` (or ``eval``); preemption keeps status 75."""
    return _q([spec.python, "-m", "launchers.rankio", "--log-dir", spec.log_dir,
               "--preempted-exit", str(EXIT_PREEMPTED), "--", spec.python, "-m", "dist_train", spec.command,
               *_job_args(spec)])


def _header(spec: BatchSpec) -> list[str]:
    log = spec.log_dir
    if spec.scheduler == "slurm":
        lines = [f"#SBATCH --job-name={spec.name}", f"#SBATCH --nodes={spec.nodes}",
                 f"#SBATCH --ntasks-per-node={spec.per_node}", f"#SBATCH --time={spec.time}",
                 f"#SBATCH --output={log}/slurm-%j.out", "#SBATCH --open-mode=append", "#SBATCH --requeue",
                 # ray: only the batch shell gets USR1 (B:), it hands it to the launcher; the srun steps
                 # running `ray start` would die of it and take the cluster with them; an evaluation saves nothing
                 *(["#SBATCH --signal=B:USR1@120" if spec.backend == "ray" else "#SBATCH --signal=USR1@120"]
                   if spec.eval_args is None else [])]
        if spec.gpus_per_node:
            lines.append(f"#SBATCH --gpus-per-node={spec.gpus_per_node}")
        if spec.backend == "ray":
            lines.append("#SBATCH --exclusive")
        return lines + [f"#SBATCH {d}" for d in spec.directives]
    select = f"select={spec.nodes}:mpiprocs={spec.per_node}:ncpus={max(spec.per_node, 1)}"
    if spec.gpus_per_node:
        select += f":ngpus={spec.gpus_per_node}"
    lines = [f"#PBS -N {spec.name}", f"#PBS -l {select}", f"#PBS -l walltime={spec.time}",
             "#PBS -l place=scatter:excl", "#PBS -j oe", f"#PBS -o {log}/pbs.out", "#PBS -r y"]
    return lines + [f"#PBS {d}" for d in spec.directives]


def _free_port_command(spec: BatchSpec) -> str:
    """Shell: a TCP port free on this node (the batch shell runs on the allocation's first node, where
    rank 0 and the Ray head run) — not one derived from the job id, which may be taken."""
    code = "from launchers.env import free_port; print(free_port())"
    return f"$({shlex.quote(spec.python)} -c {shlex.quote(code)})"


def _mpi_body(spec: BatchSpec) -> list[str]:
    """Sets ``status`` to the job's exit status."""
    evaluating = ([f"export {EVAL_RANK_ENV}={shlex.quote(spec.run_dir)}  # eval ranks: logs, error records"]
                  if spec.eval_args is not None else [])
    if spec.scheduler == "slurm":
        # No --kill-on-bad-exit: a preempted rank exits 75 and must not kill the others mid-checkpoint;
        # a crashed rank brings the rest down through the collective timeout.
        return [*evaluating,
                f"export MASTER_PORT={_free_port_command(spec)}  # rank 0's rendezvous port, checked free here",
                f"srun --ntasks={spec.world_size} --ntasks-per-node={spec.per_node} {_rank_command(spec)}",
                "status=$?"]
    return [*evaluating, f"{shlex.quote(spec.mpiexec_path)} -n {spec.world_size} --ppn {spec.per_node} "
                         f"{_rank_command(spec)}", "status=$?"]


def _ray_body(spec: BatchSpec) -> list[str]:
    """Head on the first node, a worker on every other, then the Ray launcher (never ssh).

    The launcher runs in the background so that this shell can hand it the scheduler's signals
    (``--signal=B:USR1@…`` on Slurm, SIGTERM on preemption / qdel): it asks every rank to checkpoint and
    exits 75, while the ``ray start`` steps, which never see the signal, keep the cluster up until then.
    Sets ``status`` to the launcher's exit status.
    """
    gpus = f" --num-gpus={spec.gpus_per_node}" if spec.gpus_per_node else ""
    ray = shlex.quote(str(Path(spec.python).parent / "ray"))
    if spec.scheduler == "slurm":
        hosts = 'mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")'
        on_node = 'srun --nodes=1 --ntasks=1 -w "{host}"'
    else:
        hosts = 'mapfile -t NODES < <(sort -u "$PBS_NODEFILE")'
        on_node = shlex.quote(spec.mpiexec_path) + ' -n 1 --hosts "{host}"'
    launcher = "launch" if spec.eval_args is None else "eval"  # `dist-train eval` starts its ranks as launch does
    launch = _q([spec.python, "-m", "dist_train", launcher, "--backend", "ray", "--nodes", str(spec.nodes),
                 "--nproc", str(spec.world_size), *(["--gpus-per-node", str(spec.gpus_per_node)]
                                                    if spec.gpus_per_node else []), *_job_args(spec)])
    token = shlex.quote(f"{spec.run_dir}/.ray_auth_token")
    token_code = "import secrets; print(secrets.token_hex(32))"
    return [
        "# Ray with token authentication: a private token for this job's cluster, read by every node",
        # the default on a line of its own: inside "${…:-word}" single quotes are literal and $( ) runs
        f'[ -n "${{RAY_AUTH_TOKEN_PATH:-}}" ] || RAY_AUTH_TOKEN_PATH={token}',
        "export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH",
        f'[ -s "$RAY_AUTH_TOKEN_PATH" ] || (umask 077 && {shlex.quote(spec.python)} -c {shlex.quote(token_code)} '
        f'> "$RAY_AUTH_TOKEN_PATH")',
        hosts,
        'HEAD_IP=$(' + on_node.format(host="${NODES[0]}") + ' hostname -I | awk \'{print $1}\')',
        f"RAY_PORT={_free_port_command(spec)}",
        on_node.format(host="${NODES[0]}") + f' {ray} start --head --node-ip-address="$HEAD_IP" '
        f'--port=$RAY_PORT --num-cpus={spec.per_node}{gpus} --include-dashboard=false --block &',
        "for _ in $(seq 90); do",
        f'  {ray} status --address "$HEAD_IP:$RAY_PORT" >/dev/null 2>&1 && break  # the head answers',
        "  sleep 2",
        "done",
        'for ((i = 1; i < ${#NODES[@]}; i++)); do',
        "  " + on_node.format(host="${NODES[$i]}") + f' {ray} start --address="$HEAD_IP:$RAY_PORT" '
        f'--num-cpus={spec.per_node}{gpus} --block &',
        "done",
        "# the launcher waits for every node's bundle (launch.placement_timeout_s)",
        f'{launch} --address "$HEAD_IP:$RAY_PORT" &',
        "LAUNCHER=$!",
        'trap \'kill -USR1 "$LAUNCHER"\' USR1',
        'trap \'kill -TERM "$LAUNCHER"\' TERM',
        'wait "$LAUNCHER"; status=$?',
        '# a trapped signal interrupts `wait`: wait again until the launcher has really exited',
        'while kill -0 "$LAUNCHER" 2>/dev/null; do wait "$LAUNCHER"; status=$?; done',
    ]


def render(spec: BatchSpec) -> str:
    """The batch script text."""
    validate(spec)
    requeue = ('scontrol requeue "$SLURM_JOB_ID"' if spec.scheduler == "slurm"
               else f"qsub {shlex.quote(spec.script_path)}" if spec.script_path else "qsub \"$0\"")
    workdir = (f"cd {shlex.quote(spec.workdir)}" if spec.workdir
               else 'cd "$PBS_O_WORKDIR"' if spec.scheduler == "pbs" else 'cd "$SLURM_SUBMIT_DIR"')
    what = ("every start resumes from the newest committed checkpoint." if spec.eval_args is None else
            f"an evaluation ({_q(spec.eval_args)}): nothing is written under run.dir.")
    lines = ["#!/bin/bash", *_header(spec), "",
             f"# dist-train job {spec.name}: {spec.nodes} node(s) x {spec.per_node} rank(s), backend {spec.backend}",
             f"# written by `dist-train submit`; {what}",
             "set -uo pipefail", workdir, f"mkdir -p {shlex.quote(spec.log_dir)}"]
    if spec.scheduler == "pbs":
        # PBS writes -o anew at every start, and a requeue is a new job: each start appends to a file of its own
        lines.append(f'exec >> {shlex.quote(spec.log_dir)}/"pbs-$PBS_JOBID.out" 2>&1  # this start\'s output')
    lines += [f"module load {m}" for m in spec.modules]
    lines += list(spec.env_lines)
    if spec.code_root:  # after the modules and env lines, which may set a PYTHONPATH of their own (kept after it)
        lines.append(f'export PYTHONPATH={shlex.quote(spec.code_root)}"${{PYTHONPATH:+:$PYTHONPATH}}"  '
                     "# the dist-train code that wrote this script")
    lines += ["export PYTHONUNBUFFERED=1", f"export DIST_TRAIN_EXPECT_WORLD={spec.world_size}", ""]
    lines += _mpi_body(spec) if spec.backend == "mpi" else _ray_body(spec)
    if spec.eval_args is None:
        lines += [f"if [ \"$status\" -eq {EXIT_PREEMPTED} ]; then",
                  f"  echo \"dist-train: preempted (status {EXIT_PREEMPTED}): requeueing\"",
                  f"  {requeue}",
                  "fi"]
    lines += ['exit "$status"', ""]
    return "\n".join(lines)

"""``dist-train launch`` and ``dist-train submit``: what runs once the CLI in ``dist_train.cli`` parsed their
flags (defined in the torch-free :mod:`launchers.arguments`).

    launch_main(args) -> exit status
    submit_main(args) -> exit status

Command-line flags override ``launch.*`` from the config. Bad input raises ``ValueError`` (exit 2).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch

from dist_train.atomic_write import write_bytes_atomic
from dist_train.checkpoint.manager import checkpoint_root
from dist_train.checkpoint.manifest import complete_checkpoints
from dist_train.config import CheckpointConfig, Config, LaunchConfig, check_world_size, load_config
from dist_train.dryrun import show_layout
from dist_train.eval_arguments import eval_overrides
from dist_train.eval_preflight import eval_preflight, load_eval_config
from dist_train.preflight import PREFLIGHT_ENV, check_resume, preflight
from dist_train.profiling import check_profile
from dist_train.runlock import LOCK_ENV, acquire_for_launcher
from launchers.procs import Sink
from launchers.supervisor import JobSpec, Supervisor


def rank_argv(config: str, overrides: list[str], python: Optional[str] = None) -> list[str]:
    """The per-rank command: ``python -m dist_train run CONFIG --set k=v ...``."""
    argv = [python or sys.executable, "-m", "dist_train", "run", config]
    for item in overrides:
        argv += ["--set", item]
    return argv


def forwarded_env() -> dict[str, str]:
    """The launcher's DIST_TRAIN_* variables (fault injection, verbosity…) reach every rank, also
    Ray actors on other nodes, whose environment is not the launcher's."""
    return {k: v for k, v in os.environ.items() if k.startswith("DIST_TRAIN_")}


# ----------------------------------------------------------------------------------------------
# dist-train launch
# ----------------------------------------------------------------------------------------------
def restart_point(ckpt_cfg: CheckpointConfig, root: Path) -> str:
    """What a restart (``checkpoint.restart``) of the run whose checkpoints live in ``root`` starts from now, as one
    clause: the newest committed checkpoint there, else what ``checkpoint.resume`` names, else nothing (a run that
    wrote no checkpoint, e.g. under NVMe optimizer offload, also exits 75 when preempted)."""
    committed = complete_checkpoints(root)
    if committed:
        return f"a restart resumes from {committed[0][1]}"
    if ckpt_cfg.resume not in ("auto", "none"):
        return f"no checkpoint in {root}: a restart starts again from checkpoint.resume = {ckpt_cfg.resume}"
    return f"no checkpoint in {root}: a restart starts from scratch"


def resolve_launch(args: argparse.Namespace):
    """Config + flags → (cfg, backend, nproc, nodes, gpus_per_node, max_restarts). Raises ValueError."""
    cfg = load_config(args.config, list(args.set or []))
    return (cfg, *launch_settings(cfg, args))


def launch_settings(cfg: Config, args: argparse.Namespace) -> tuple[str, int, int, int, int]:
    """The loaded config (``cfg``, from ``args.config`` and ``args.set``) + flags → (backend, nproc, nodes,
    gpus_per_node, max_restarts). Raises ValueError."""
    lc = cfg.launch
    backend = args.backend or lc.backend
    nodes = args.nodes if args.nodes is not None else lc.nodes
    gpus = args.gpus_per_node if args.gpus_per_node is not None else lc.gpus_per_node
    if args.nproc is not None:
        nproc = args.nproc
    elif gpus and (args.gpus_per_node is not None or args.nodes is not None):
        nproc = nodes * gpus
    elif lc.nproc != 1:
        nproc = lc.nproc
    else:
        nproc = cfg.world_size
    max_restarts = args.max_restarts if args.max_restarts is not None else lc.max_restarts
    for name, v, lo in (("--nproc", nproc, 1), ("--nodes", nodes, 1), ("--gpus-per-node", gpus, 0),
                        ("--max-restarts", max_restarts, 0)):
        if v < lo:
            raise ValueError(f"{name} {v}: must be >= {lo}")
    if backend != "ray" and nodes > 1:
        raise ValueError(f"--nodes {nodes} with --backend {backend}: only the ray backend spans nodes from one "
                         f"command; for MPI use `dist-train submit` (srun/mpiexec start the ranks on each node)")
    refuse_ray_only_keys(cfg, backend, args.address, f"--backend {backend}")
    if backend != "ray" and gpus and not torch.cuda.is_available():
        given = "--gpus-per-node" if args.gpus_per_node is not None else "launch.gpus_per_node ="
        raise ValueError(f"{given} {gpus} with --backend {backend}: {backend} ranks compute on this machine's "
                         "CUDA devices when it has any, and it has none, so they would run on CPU; remove it "
                         "(launch.gpus_per_node: 0) or run where the GPUs are")
    try:
        check_world_size(cfg, nproc)
    except ValueError as e:
        mp = max(1, cfg.model_parallel_size)
        change = (f"e.g. --set parallel.dp={nproc // mp}" if nproc % mp == 0 else
                  f"tp·pp·cp·wp = {mp} does not divide {nproc} ranks")
        raise ValueError(f"{e} (launching {nproc}; pass --nproc {cfg.world_size} or change parallel.*, {change})") \
            from None
    return backend, nproc, nodes, gpus, max_restarts


def refuse_ray_only_keys(cfg: Config, backend: str, address_flag: Optional[str], how: str) -> None:
    """``launch.address`` (or ``--address``) and ``launch.placement_timeout_s`` are read by the Ray backend only: under
    another way of starting the ranks (``how``: "--backend local", "dist-train submit --backend mpi") they would be
    silently ignored, so they are refused (ValueError, one line)."""
    if backend == "ray":
        return
    address = address_flag or cfg.launch.address
    if address:
        where = "--address" if address_flag else "launch.address"
        raise ValueError(f"{where} {address!r} with {how}: only the ray backend connects to a cluster, these ranks "
                         f"start without it; remove it (--set launch.address=null) or use the ray backend")
    timeout = cfg.launch.placement_timeout_s
    if timeout != LaunchConfig.placement_timeout_s:
        raise ValueError(f"launch.placement_timeout_s = {timeout:g} with {how}: only the ray backend waits for node "
                         "bundles; remove it or use the ray backend")


def build_backend(backend: str, nproc: int, run_dir: Path, address: Optional[str], nodes: int, gpus: int,
                  placement_timeout_s: float = 120.0, files: Optional[dict[str, bytes]] = None,
                  sink: Optional[Sink] = None):
    """The backend that starts the ranks; ``files`` (absolute path -> bytes): what the rank command reads, written on
    each Ray node that lacks it (local and mpi ranks run on this machine, where it is); ``sink``: where local and Ray
    ranks' console lines go (default: this console; mpi ranks' wrappers print them themselves)."""
    if backend == "local":
        from launchers.local import LocalBackend

        return LocalBackend(nproc, run_dir, sink=sink)
    if backend == "mpi":
        from launchers.mpi import MpiBackend

        return MpiBackend(nproc, run_dir)
    from launchers.ray_backend import RayBackend

    return RayBackend(nproc, run_dir, address=address, nodes=nodes, gpus_per_node=gpus,
                      placement_timeout_s=placement_timeout_s, files=files, sink=sink)


def supervise(spec: JobSpec, backend) -> int:
    """Run the job ``spec`` on ``backend`` under a :class:`Supervisor` (its exit status), then shut the backend down
    (the embedded Ray cluster), however the run ended: ``launch`` and ``eval`` end the same way."""
    try:
        return Supervisor(spec, backend).run()
    finally:
        if hasattr(backend, "shutdown"):
            backend.shutdown()


def ranks_on_cuda(backend: str, gpus: int) -> bool:
    """Whether the ranks compute on CUDA: Ray gives each rank one of ``gpus`` per node (none: a CPU rank, Ray hides the
    GPUs); local and mpi ranks start on this machine and take its CUDA devices whenever it has any
    (``dist_train.distributed.pick_device``), whatever ``launch.gpus_per_node`` says (it only sizes --nproc there)."""
    return gpus > 0 if backend == "ray" else torch.cuda.is_available()


def ranks_on_this_machine(backend: str, nodes: int, address: Optional[str]) -> bool:
    """True when every rank runs here (local, mpi, an embedded Ray cluster): the launcher's pre-flight then
    sees the ranks' files and devices. A Ray cluster (--address, RAY_ADDRESS, --nodes > 1) may not."""
    return backend != "ray" or (nodes == 1 and not (address or os.environ.get("RAY_ADDRESS")))


def _launch_error(cfg: Config, args: argparse.Namespace) -> Optional[str]:
    """What the launch of ``cfg`` (loaded from ``args``) would refuse (rank count, flags) for ``--dry-run``: an
    explicit ``--nproc``, ``--nodes`` or ``--gpus-per-node`` that does not fit is an error there too (raised); a
    mismatch with the config's own ``launch.nproc`` only a note, since the dry run previews layouts under ``--set``.
    A profile setting the launch's pre-flight refuses against its ranks (``profiling.check_profile``: profile.ranks
    beyond them, profile.memory on CPU ranks) is a note too."""
    try:
        backend, _, _, gpus, _ = launch_settings(cfg, args)
    except ValueError as e:
        if args.nproc is not None or args.nodes is not None or args.gpus_per_node is not None:
            raise
        return str(e)
    try:
        check_profile(cfg, on_cuda=ranks_on_cuda(backend, gpus))
    except ValueError as e:
        return str(e)
    return None


#: the config file as `dist-train launch` read it, in the run dir: what every attempt of the job runs
LAUNCHED_CONFIG = "launched_config.yaml"
#: the same for `dist-train submit`: what every start of the batch job (its requeues included) runs. Named by its
#: bytes' digest: jobs submitted into one run dir (a chain of stages, --directive --dependency=...) may be queued at
#: once, and one file for all would have the last submission's config run by every job of the chain
SUBMITTED_CONFIG = "submitted_config-{digest}.yaml"
#: the directory holding the dist_train and launchers packages this process runs: a submitted job runs the same code
CODE_ROOT = Path(__file__).resolve().parents[1]


def snapshot_config(config: str, run_dir: Path, name: str = LAUNCHED_CONFIG) -> Path:
    """Copy the config file's bytes to ``run_dir/name`` (temp + rename; absolute path returned; ``{digest}`` in
    ``name``: the first 12 hex digits of the bytes' SHA-256): every attempt reads the config as launched. A restart
    re-read the original file, so an edit made while the job ran (a new run.dir or checkpoint.dir for the next run,
    another lr) silently changed what the restart did: with a new run.dir it trained from step 0 elsewhere, dropping
    the run's checkpoints, while the launcher said it restarted from the newest. Paths inside the file are relative
    to the working directory, not to the file, so the copy reads the same."""
    data = Path(config).read_bytes()
    run_dir.mkdir(parents=True, exist_ok=True)
    target = (run_dir / name.format(digest=hashlib.sha256(data).hexdigest()[:12])).absolute()
    write_bytes_atomic(target, data)
    return target


def snapshot_as_checked(config: str, cfg: Config, overrides: list[str], name: str = LAUNCHED_CONFIG,
                        directory: Optional[Path] = None) -> Path:
    """:func:`snapshot_config` into ``directory`` (default ``cfg.run.dir``), refused (ValueError, one line) when the
    copy is not the config ``cfg`` was loaded from (with ``overrides``): the file was edited after the launcher's
    checks read it, and the ranks would run a config nothing checked."""
    copy = snapshot_config(config, Path(directory or cfg.run.dir), name)
    if load_config(copy, overrides) != cfg:
        raise ValueError(f"config file {config} changed while it was being launched (the checks read its earlier "
                         "text); launch it again")
    return copy


def launch_main(args: argparse.Namespace) -> int:
    overrides = list(args.set or [])
    if getattr(args, "dry_run", False):
        cfg = load_config(args.config, overrides)  # once: the rank-count check and the table read the same config
        launch_error = _launch_error(cfg, args)
        code = show_layout(cfg)
        if launch_error:
            print(f"note: the layout is valid, but launching it as given would fail: {launch_error}",
                  file=sys.stderr)
        return code
    cfg, backend, nproc, nodes, gpus, max_restarts = resolve_launch(args)
    address = args.address or cfg.launch.address
    # Data, directories, resume: one line and exit 2 before any rank starts. Ranks on other machines (a Ray
    # cluster) may see other files than this one: they run the checks themselves, before their rendezvous.
    ranks_here = ranks_on_this_machine(backend, nodes, address)
    if ranks_here:
        preflight(cfg, on_cuda=ranks_on_cuda(backend, gpus), ranks_per_host=max(1, nproc // max(1, nodes)))
    run_dir = Path(cfg.run.dir)
    # the launcher holds the run directory for every attempt; its ranks know it by the token
    with acquire_for_launcher(run_dir) as lock:
        config = snapshot_as_checked(args.config, cfg, overrides)
        spec = JobSpec(argv=rank_argv(str(config), overrides), nproc=nproc, run_dir=run_dir,
                       max_restarts=max_restarts, watchdog_s=cfg.launch.watchdog_s,
                       collective_timeout_s=cfg.launch.collective_timeout_s,
                       env={**forwarded_env(), **({PREFLIGHT_ENV: "1"} if ranks_here else {}),
                            LOCK_ENV: lock.token},
                       restart_point=lambda: restart_point(cfg.checkpoint, checkpoint_root(cfg.checkpoint, run_dir)))
        # a Ray node whose run.dir is not this one's (node-local scratch) gets the config copy with its rank
        be = build_backend(backend, nproc, run_dir, address, nodes, gpus, cfg.launch.placement_timeout_s,
                           files={str(config): config.read_bytes()})
        print(f"[launcher] {backend}: {nproc} rank(s){f' on {nodes} nodes' if nodes > 1 else ''}, run dir "
              f"{run_dir}, max restarts {max_restarts}", file=sys.stderr, flush=True)
        return supervise(spec, be)


# ----------------------------------------------------------------------------------------------
# dist-train submit
# ----------------------------------------------------------------------------------------------
def refuse_unread_by_batch(cfg: Config, backend: str, evaluation: bool = False) -> None:
    """The launch keys a batch script would silently ignore (ValueError, one line): ``launch.address`` always (the
    script starts its own Ray head, or no Ray), and under ``--backend mpi`` the Ray-only keys and, for training,
    ``launch.max_restarts`` (srun/mpiexec start each rank once: a preempted job requeues itself, a failed one is
    not restarted; the ray body's ``dist-train launch`` restarts; an evaluation is never restarted)."""
    if cfg.launch.address:
        raise ValueError(f"launch.address {cfg.launch.address!r} with dist-train submit: the batch script starts the job "
                         "in its own allocation (a Ray head on the first node with --backend ray) and never connects "
                         "to another cluster; remove it (--set launch.address=null)")
    refuse_ray_only_keys(cfg, backend, None, f"dist-train submit --backend {backend}")
    if backend == "mpi" and cfg.launch.max_restarts and not evaluation:
        raise ValueError(f"launch.max_restarts = {cfg.launch.max_restarts} with dist-train submit --backend mpi: srun/"
                         "mpiexec start each rank once and a failed job is not restarted (a preempted one requeues "
                         "itself); use --backend ray, whose launcher restarts, or set launch.max_restarts: 0")


def submit_main(args: argparse.Namespace) -> int:
    from launchers.batch import BatchSpec, render

    overrides = list(args.set or [])
    if args.eval:
        if not args.out:
            raise ValueError("--eval without --out: give --out FILE.json, where the job writes the result (its script, "
                             "logs and config copy go to FILE.json.job/, nothing under run.dir)")
        overrides = eval_overrides(overrides, args.data, args.batches)
        cfg = load_eval_config(args.config, list(args.set or []), overrides)
        job_dir = f"{args.out}.job"
    else:
        given = next((flag for flag, v in (("--checkpoint", args.checkpoint), ("--data", args.data),
                                            ("--batches", args.batches), ("--out", args.out)) if v), None)
        if given:
            raise ValueError(f"{given} is a flag of an evaluation job: add --eval to submit one (or leave {given} "
                             "out to submit training)")
        cfg = load_config(args.config, overrides)
        job_dir = cfg.run.dir
    nodes = args.nodes if args.nodes is not None else cfg.launch.nodes
    gpus = args.gpus_per_node if args.gpus_per_node is not None else cfg.launch.gpus_per_node
    refuse_unread_by_batch(cfg, args.backend, evaluation=args.eval)
    script_path = Path(job_dir) / f"submit_{args.scheduler}.sh"
    spec = BatchSpec(config=args.config, scheduler=args.scheduler, nodes=nodes, time=args.time,
                     run_dir=job_dir, name=args.job_name or cfg.run.name, gpus_per_node=gpus,
                     ntasks_per_node=args.ntasks_per_node, backend=args.backend, overrides=overrides,
                     modules=list(args.module), env_lines=list(args.env_line), directives=list(args.directive),
                     script_path=str(script_path.absolute()), workdir=str(Path.cwd()), code_root=str(CODE_ROOT))
    try:
        check_world_size(cfg, spec.world_size, "in the batch script")
    except ValueError as e:
        # a suggestion that launches exactly the world: the most nodes up to --nodes that divide it
        nodes = max(n for n in range(1, spec.nodes + 1) if cfg.world_size % n == 0)
        raise ValueError(f"{e} (--nodes {spec.nodes} × {spec.per_node} rank(s) per node, from --ntasks-per-node or "
                         f"--gpus-per-node; e.g. --nodes {nodes} --ntasks-per-node {cfg.world_size // nodes}, or "
                         f"change parallel.*)") from None
    if args.eval:
        # the checkpoint is chosen now (as `dist-train eval` would: latest is the newest now) and checked on the ranks'
        # devices; the job evaluates that step directory
        ckpt = eval_preflight(cfg, args.checkpoint, on_cuda=spec.gpus_per_node > 0, ranks_per_host=spec.per_node)
        spec = dataclasses.replace(spec, eval_args=["--checkpoint", str(ckpt), "--out", args.out])
    else:
        # the script starts every time with checkpoint.restart=true (a requeue resumes the run's newest), so its
        # ranks cannot refuse a first start that would take over an earlier run's checkpoints (resume: none into
        # them, or a PATH older than their newest): checked here, as configured, before anything is written
        check_resume(cfg)
        check_profile(cfg, on_cuda=spec.gpus_per_node > 0)  # as the ranks' pre-flight will, before the job queues
    if args.dry_run:
        print(render(spec), end="")
        return 0
    # every start (requeues too) runs the config as submitted, not the file as edited since (see snapshot_config)
    text = render(dataclasses.replace(spec, config=str(snapshot_as_checked(args.config, cfg, overrides,
                                                                            SUBMITTED_CONFIG, Path(job_dir)))))
    script_path.parent.mkdir(parents=True, exist_ok=True)
    (script_path.parent / "logs").mkdir(exist_ok=True)
    script_path.write_text(text)
    script_path.chmod(0o755)
    tool = "sbatch" if args.scheduler == "slurm" else "qsub"
    exe = shutil.which(tool)
    if exe is None:
        raise ValueError(f"{tool} not found on PATH: the script is at {script_path}; run `{tool} {script_path}` "
                         f"where the scheduler is available (or use --dry-run to print it)")
    done = subprocess.run([exe, str(script_path)], capture_output=True, text=True)
    sys.stdout.write(done.stdout)
    sys.stderr.write(done.stderr)
    print(f"submitted {script_path}" if done.returncode == 0 else f"{tool} failed ({done.returncode})",
          file=sys.stderr)
    return done.returncode

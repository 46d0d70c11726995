"""The flags, help and examples of ``dist-train launch``, ``eval`` and ``submit``, without torch: ``--help`` and a
refused flag cost no torch import; :mod:`launchers.cli` (which imports preflight, hence torch) runs the command.

    add_launch_arguments(parser)
    add_eval_arguments(parser)
    add_submit_arguments(parser)
"""
from __future__ import annotations

import argparse

from dist_train.cli import examples
from dist_train.eval_arguments import add_arguments, add_evaluation_arguments

BACKENDS = ("ray", "local", "mpi")


def add_backend_arguments(parser: argparse.ArgumentParser) -> None:
    """How and where the ranks start (read by ``launchers.cli.launch_settings``): ``launch`` and ``eval``."""
    parser.add_argument("--backend", choices=BACKENDS, help="how to start ranks (default: launch.backend)")
    parser.add_argument("--nproc", type=int, help="ranks in total (default: launch.nproc, or the config's "
                                                  "world size dp*tp*pp*cp*wp when launch.nproc is 1)")
    parser.add_argument("--address", help="Ray cluster address (default: launch.address, then RAY_ADDRESS; "
                                          "none = embedded cluster)")
    parser.add_argument("--nodes", type=int, help="nodes (Ray placement bundles; default launch.nodes)")
    parser.add_argument("--gpus-per-node", type=int, help="GPUs per node, one rank each (default "
                                                          "launch.gpus_per_node; 0 = CPU ranks, gloo)")


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """``dist-train eval``: its own flags (:mod:`dist_train.eval_arguments`) and launch's way of starting the ranks
    (an evaluation is never restarted: no --max-restarts)."""
    add_arguments(parser)
    add_backend_arguments(parser)
    parser.set_defaults(max_restarts=None)


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Start every rank of a job and train: an embedded or existing Ray cluster, mpiexec, "
                          "or local subprocesses. Restarts from the last checkpoint on failure "
                          "(--max-restarts), forwards SIGTERM/SIGUSR1 for a preemption checkpoint "
                          "(exit status 75 = preempted: resumable once a checkpoint was written).")
    parser.epilog = examples(
        "dist-train launch configs/gpt_tiny.yaml --backend local --nproc 2 --set parallel.dp=2",
        "dist-train launch configs/demo.yaml --backend ray               # embedded Ray cluster",
        "ray job submit -- dist-train launch configs/demo.yaml --backend ray --nodes 2 --gpus-per-node 4 "
        "--set parallel.dp=4 --set train.global_batch=16   # 8 ranks: dp4 x cp2",
        "dist-train launch configs/gpt_tiny.yaml --backend mpi --nproc 2 --set parallel.dp=2 --max-restarts 2",
        "dist-train launch configs/gpt_tiny.yaml --set train.steps=60 --set parallel.dp=1 --set parallel.cp=2"
        "   # after a Ctrl-C (exit 75): resumes from its checkpoint, resharded to cp2",
        "dist-train launch configs/swin_weather.yaml --nproc 4 --set 'parallel.wp=[1,2]' --set parallel.cp=2"
        "   # Swin: 1x2 image tiles, each split over 2 ranks (Ulysses inside windows)",
        "dist-train launch configs/gpt_tiny.yaml --set 'profile.steps=[3,4]'   # every rank's trace of steps 3-4 in "
        "runs/gpt_tiny/profile/")
    parser.add_argument("config", help="YAML config file")
    add_backend_arguments(parser)
    parser.add_argument("--max-restarts", type=int, help="restarts after a failed or hung attempt "
                                                         "(default launch.max_restarts)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="print the layout and exit without starting ranks")


def add_submit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Write a Slurm or PBS batch script that runs the job (srun/mpiexec per rank, or a Ray "
                          "head + workers) with requeue on preemption, and submit it with sbatch/qsub.")
    parser.epilog = examples(
        "dist-train submit configs/demo.yaml --scheduler slurm --nodes 2 --gpus-per-node 4 --time 02:00:00 "
        "--set parallel.dp=4 --set train.global_batch=16 --dry-run",
        "dist-train submit configs/demo.yaml --scheduler pbs --nodes 4 --gpus-per-node 4 --time 01:00:00 "
        "--module cuda/12.4 --env-line 'export NCCL_DEBUG=WARN' --set parallel.dp=8 --set train.global_batch=32",
        "dist-train submit configs/gpt_tiny.yaml --scheduler slurm --nodes 2 --ntasks-per-node 1 --time 00:20:00 "
        "--eval --checkpoint latest --data data/heldout --out evals/gpt_tiny.json")
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("--scheduler", required=True, choices=("slurm", "pbs"))
    parser.add_argument("--nodes", type=int, help="nodes (default launch.nodes)")
    parser.add_argument("--gpus-per-node", type=int, help="GPUs per node, one rank each (default "
                                                          "launch.gpus_per_node)")
    parser.add_argument("--ntasks-per-node", type=int, help="ranks per node (default: GPUs per node, or 1)")
    parser.add_argument("--time", required=True, help="wall-clock limit HH:MM:SS")
    parser.add_argument("--backend", choices=("mpi", "ray"), default="mpi",
                        help="start ranks with srun/mpiexec (default) or a Ray cluster in the allocation")
    parser.add_argument("--module", action="append", default=[], metavar="NAME", help="module load NAME (repeatable)")
    parser.add_argument("--env-line", action="append", default=[], metavar="LINE",
                        help="a shell line before the job, e.g. 'export NCCL_DEBUG=WARN' (repeatable)")
    parser.add_argument("--directive", action="append", default=[], metavar="ARGS",
                        help="extra scheduler directive, e.g. '--account=abc' or '-q debug' (repeatable)")
    parser.add_argument("--job-name", help="job name (default run.name)")
    parser.add_argument("--eval", action="store_true",
                        help="the job evaluates a checkpoint instead of training (dist-train eval on the allocation's "
                             "ranks; needs --out): the checkpoint is chosen and checked now, the script, its logs and "
                             "the config copy go to FILE.json.job/, nothing under run.dir")
    add_evaluation_arguments(parser)
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="print the script; write and submit nothing")

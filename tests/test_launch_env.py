"""Launcher detection, fault specs, batch scripts and launch-flag resolution (no processes, except one
real 'every rank alone' MPI check)."""
import argparse
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from dist_train.config import load_config, save_config
from dist_train.lifecycle import (EXIT_PREEMPTED, FaultSpec, Lifecycle, auto_watchdog_s, describe_exit,
                                  heartbeat_path, read_heartbeat)
from dist_train.trainer import train
import launchers.cli as cli
from launchers.arguments import add_launch_arguments, add_submit_arguments
from launchers.batch import BatchSpec, render
from launchers.cli import (LAUNCHED_CONFIG, launch_main, rank_argv, ranks_on_cuda, ranks_on_this_machine, resolve_launch,
                           submit_main)
from launchers.env import (EXPECT_WORLD_ENV, LaunchError, check_mpi_family, check_mpi_world, detect_rank_env,
                           mpi_family, parse_slurm_tasks_per_node, populate_rank_env, slurm_first_host)
from launchers.ray_backend import RankActor, embedded_cluster_environment, refuse_unreachable, write_missing
from launchers.supervisor import progress_from_heartbeats
from tests.trainer_utils import tiny_gpt_config

SLURM = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
         "SLURM_NODEID": "1", "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_STEP_NODELIST": "gpu[003-004]",
         "SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0"}


def test_detect_each_launcher():
    e = detect_rank_env(SLURM)
    assert (e.source, e.rank, e.local_rank, e.world_size, e.local_world_size) == ("slurm", 5, 1, 8, 4)
    assert e.master_addr == "gpu003" and 15000 <= e.master_port < 35000
    assert detect_rank_env({**SLURM, "SLURM_STEP_ID": "1"}).master_port != e.master_port  # per step

    e = detect_rank_env({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4",
                         "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"})
    assert (e.source, e.rank, e.local_rank, e.world_size, e.local_world_size) == ("openmpi", 3, 1, 4, 2)
    assert e.uses_mpi

    e = detect_rank_env({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2",
                         "PMI_FD": "9"})
    assert (e.source, e.rank, e.local_rank, e.world_size, e.local_world_size) == ("mpich", 1, 1, 2, 2)

    pbs = {"PALS_RANKID": "6", "PALS_LOCAL_RANKID": "2", "PMI_SIZE": "12", "PMI_LOCAL_SIZE": "4",
           "PMI_RANK": "6", "PBS_JOBID": "77.pbs"}
    e = detect_rank_env(pbs)
    assert (e.source, e.rank, e.local_rank, e.world_size, e.local_world_size) == ("pals", 6, 2, 12, 4)
    e = detect_rank_env({"PALS_RANKID": "0", "PALS_LOCAL_RANKID": "0"})  # size from MPI later
    assert e.source == "pals" and e.world_size is None

    torchrun = {"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2",
                "MASTER_ADDR": "h", "MASTER_PORT": "29500", **SLURM}
    e = detect_rank_env(torchrun)
    assert (e.source, e.rank, e.world_size, e.master_addr, e.master_port) == ("torchrun", 2, 4, "h", 29500)

    assert detect_rank_env({}).source == "single"
    assert detect_rank_env({"DIST_TRAIN_LAUNCHER": "mpi"}).source == "mpi4py"
    # mpirun inside sbatch: every rank inherits the batch step's SLURM_PROCID=0; MPI's variables win.
    e = detect_rank_env({**SLURM, "SLURM_PROCID": "0", "OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4"})
    assert (e.source, e.rank) == ("openmpi", 3)
    with pytest.raises(LaunchError, match="PMI_SIZE='x'"):
        detect_rank_env({"PMI_RANK": "0", "PMI_SIZE": "x"})


def test_slurm_parsers():
    assert parse_slurm_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert parse_slurm_tasks_per_node("8") == [8]
    with pytest.raises(LaunchError, match="SLURM_TASKS_PER_NODE"):
        parse_slurm_tasks_per_node("2(y3)")
    assert slurm_first_host("gpu[003-005,9],cpu1") == "gpu003"
    assert slurm_first_host("nid001234") == "nid001234"
    assert slurm_first_host("a-b[10,12]") == "a-b10"


def test_populate_torchrun_single_slurm():
    env = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "x", "MASTER_PORT": "1"}
    before = dict(env)
    assert populate_rank_env(env).source == "torchrun" and env == before  # unchanged
    empty: dict = {}
    assert populate_rank_env(empty).world_size == 1 and empty == {}
    env = dict(SLURM)
    populate_rank_env(env)
    assert {k: env[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR")} == {
        "RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "gpu003"}
    with pytest.raises(LaunchError, match="outside the world"):
        populate_rank_env({**SLURM, "SLURM_PROCID": "8"})


def test_mpi_world_checks():
    ompi = detect_rank_env({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4"})
    check_mpi_world(ompi, 4, environ={})
    with pytest.raises(LaunchError, match=r"OMPI_COMM_WORLD_SIZE=4.* sees 1; every rank is alone"):
        check_mpi_world(ompi, 1, environ={})
    with pytest.raises(LaunchError, match="says 4 ranks .* sees 2"):
        check_mpi_world(ompi, 2, environ={})
    bare = detect_rank_env({"DIST_TRAIN_LAUNCHER": "mpi"})
    check_mpi_world(bare, 1, environ={})  # nothing promised: a single process is fine
    with pytest.raises(LaunchError, match=f"{EXPECT_WORLD_ENV}=3"):
        check_mpi_world(bare, 1, environ={EXPECT_WORLD_ENV: "3"})


def test_mpi_family_mismatch_is_one_line_before_mpi_init():
    """A real process: Open MPI's variables, but mpi4py is built against pip's MPICH. MPI_Init would
    abort under Open MPI's mpirun before any message of ours: the family is checked first."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "SLURM_", "PALS_"))}
    env.update({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "0"})
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    code = "from launchers.env import populate_rank_env, LaunchError\ntry:\n populate_rank_env()\n" \
           "except LaunchError as e:\n print(e); raise SystemExit(3)"
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 3, p.stderr
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1 and "MPI launcher mismatch" in lines[0], p.stdout + p.stderr
    assert "Open MPI's launcher" in lines[0] and "built against MPICH" in lines[0] and "mpiexec" in lines[0]


def test_mpi_family_from_library_version():
    assert mpi_family("Open MPI v4.1.5, package: Open MPI ...") == "Open MPI"
    assert mpi_family("MPICH Version:      4.3.0\nMPICH Release date: ...") == "MPICH"
    assert mpi_family("Intel(R) MPI Library 2021.10 for Linux* OS") == "MPICH"
    assert mpi_family("Something else") is None
    mpich = detect_rank_env({"PMI_RANK": "0", "PMI_SIZE": "2"})
    check_mpi_family(mpich, "MPICH Version: 4.3.0")  # matching families: nothing to say
    check_mpi_family(mpich, "Something else")  # unknown library: leave it to the world-size check
    with pytest.raises(LaunchError, match="started by MPICH's launcher .* built against Open MPI"):
        check_mpi_family(mpich, "Open MPI v5.0.0")


def test_fault_spec_and_exit_text():
    f = FaultSpec.parse("rank=1,step=7,signal=KILL")
    assert (f.rank, f.step, f.action, f.signal, f.attempt) == (1, 7, "signal", signal.SIGKILL, 0)
    assert FaultSpec.parse("rank=0, step=3, action=hang, attempt=2").attempt == 2
    assert FaultSpec.parse("rank=0,step=3,action=exit,code=5").code == 5
    for bad, msg in (("rank=1", "expected rank=R"), ("rank=1,step=2,signal=NOPE", "unknown signal"),
                     ("rank=1,step=2,action=boom", "action='boom'"), ("rank=a,step=2", "integers"),
                     ("rank=1,step=2,colour=red", "colour")):
        with pytest.raises(ValueError, match=msg):
            FaultSpec.parse(bad)
    assert describe_exit(-9) == "killed by SIGKILL"
    # a preempted rank may have had nothing to save (NVMe optimizer offload): its own line says whether it can resume
    assert describe_exit(EXIT_PREEMPTED) == "exit code 75 (preempted)"
    assert describe_exit(143) == "exit code 143 (SIGTERM)"


def test_lifecycle_in_process(tmp_path, monkeypatch):
    monkeypatch.setenv("DIST_TRAIN_RESTART", "2")
    monkeypatch.delenv("DIST_TRAIN_FAULT", raising=False)
    before = signal.getsignal(signal.SIGTERM)
    lc = Lifecycle(run_dir=tmp_path, rank=3, watchdog_s=30)
    hb = read_heartbeat(tmp_path, 3)
    assert hb["step"] is None and hb["attempt"] == 2 and hb["pid"] == os.getpid()
    lc.heartbeat(0)  # the first step is written at once
    first = read_heartbeat(tmp_path, 3)
    assert first["step"] == 0 and first["first_step_time"] == first["time"]
    lc.heartbeat(1)  # throttled: written by close() at the latest
    assert not lc.stop_agreed()
    os.kill(os.getpid(), signal.SIGUSR1)
    assert lc.signalled == signal.SIGUSR1 and lc.stop_agreed()  # no process group: the local flag
    lc.close()
    assert read_heartbeat(tmp_path, 3)["step"] == 1
    assert signal.getsignal(signal.SIGTERM) is before
    assert not list(heartbeat_path(tmp_path, 3).parent.glob(".*.tmp"))


def _spec(**kw):
    base = dict(config="configs/gpt_tiny.yaml", scheduler="slurm", nodes=2, time="01:30:00", run_dir="runs/x",
                name="x", gpus_per_node=4, overrides=["parallel.dp=8"], modules=["cuda/12.4"],
                env_lines=["export NCCL_DEBUG=WARN"], python="/opt/venv/bin/python", script_path="/r/s.sh")
    base.update(kw)
    return BatchSpec(**base)


def test_batch_scripts():
    s = render(_spec())
    for needle in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                   "#SBATCH --time=01:30:00", "#SBATCH --signal=USR1@120", "#SBATCH --requeue", "module load cuda/12.4",
                   "export NCCL_DEBUG=WARN", "srun --ntasks=8 --ntasks-per-node=4", "-m launchers.rankio",
                   "--preempted-exit 75", "-m dist_train run configs/gpt_tiny.yaml --set parallel.dp=8 --set "
                   "checkpoint.restart=true", 'if [ "$status" -eq 75 ]', 'scontrol requeue "$SLURM_JOB_ID"'):
        assert needle in s, needle
    assert "ssh" not in s and "pdsh" not in s
    p = render(_spec(scheduler="pbs"))
    for needle in ("#PBS -l select=2:mpiprocs=4:ncpus=4:ngpus=4", "#PBS -l walltime=01:30:00",
                   "mpiexec -n 8 --ppn 4", 'cd "$PBS_O_WORKDIR"', "qsub /r/s.sh"):
        assert needle in p, needle
    r = render(_spec(backend="ray"))
    assert "ray start --head" in r and 'srun --nodes=1 --ntasks=1 -w "${NODES[$i]}"' in r
    assert '--backend ray --nodes 2 --nproc 8 --gpus-per-node 4' in r and '--address "$HEAD_IP:$RAY_PORT"' in r
    rp = render(_spec(backend="ray", scheduler="pbs"))
    assert 'mpiexec -n 1 --hosts "${NODES[0]}"' in rp and "ssh" not in rp
    assert "--ntasks-per-node=2" in render(_spec(gpus_per_node=0, ntasks_per_node=2))
    for bad, msg in (({"time": "90"}, "HH:MM:SS"), ({"nodes": 0}, "--nodes 0"), ({"scheduler": "lsf"}, "slurm, pbs"),
                     ({"scheduler": "pbs", "time": "1-00:00:00"}, "PBS walltime")):
        with pytest.raises(ValueError, match=msg):
            render(_spec(**bad))


def _launch_args(*argv):
    parser = argparse.ArgumentParser()
    add_launch_arguments(parser)
    return parser.parse_args(list(argv))


def test_launch_flag_resolution(tmp_path):
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text("parallel: {dp: 1, cp: 2}\ntrain: {global_batch: 16, micro_batch: 2}\n"
                        "launch: {backend: mpi, max_restarts: 2}\n")
    cfg, backend, nproc, nodes, gpus, restarts = resolve_launch(_launch_args(str(cfg_path)))
    assert (backend, nproc, nodes, gpus, restarts) == ("mpi", 2, 1, 0, 2)  # nproc = world size dp*cp
    _, backend, nproc, _, _, restarts = resolve_launch(_launch_args(
        str(cfg_path), "--backend", "local", "--nproc", "4", "--set", "parallel.dp=2", "--max-restarts", "0"))
    assert (backend, nproc, restarts) == ("local", 4, 0)
    with pytest.raises(ValueError, match=r"4 ranks were launched.*--set parallel.dp=2\)"):
        resolve_launch(_launch_args(str(cfg_path), "--nproc", "4"))
    # no dp makes 3 ranks of cp 2: the hint was "--set parallel.dp=1", the config's own value
    with pytest.raises(ValueError, match=r"3 ranks were launched.*tp·pp·cp·wp = 2 does not divide 3 ranks\)"):
        resolve_launch(_launch_args(str(cfg_path), "--nproc", "3"))
    with pytest.raises(ValueError, match="only the ray backend spans nodes"):
        resolve_launch(_launch_args(str(cfg_path), "--backend", "local", "--nodes", "2"))
    with pytest.raises(ValueError, match="--max-restarts -1"):
        resolve_launch(_launch_args(str(cfg_path), "--max-restarts", "-1"))
    _, backend, nproc, nodes, gpus, _ = resolve_launch(_launch_args(
        str(cfg_path), "--backend", "ray", "--nodes", "2", "--gpus-per-node", "4", "--set", "parallel.dp=4"))
    assert (backend, nproc, nodes, gpus) == ("ray", 8, 2, 4)
    assert rank_argv("c.yaml", ["a=1", "b=2"], python="py") == ["py", "-m", "dist_train", "run", "c.yaml",
                                                                 "--set", "a=1", "--set", "b=2"]


def test_submit_dry_run_prints_script(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_submit_arguments(parser)
    args = parser.parse_args(["configs/gpt_tiny.yaml", "--scheduler", "slurm", "--nodes", "1",
                              "--ntasks-per-node", "2", "--time", "00:10:00", "--set", "parallel.dp=2",
                              "--set", f"run.dir={tmp_path}/r", "--dry-run"])
    assert submit_main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("#!/bin/bash") and "srun --ntasks=2" in out and not (tmp_path / "r").exists()
    args = parser.parse_args(["configs/gpt_tiny.yaml", "--scheduler", "pbs", "--nodes", "1", "--time", "00:10:00",
                              "--ntasks-per-node", "3", "--set", f"run.dir={tmp_path}/r", "--dry-run"])
    with pytest.raises(ValueError, match=r"= 2 but 3 ranks in the batch script \(--nodes 1 × 3 rank\(s\) per node, "
                                         r"from --ntasks-per-node or --gpus-per-node; e.g. --nodes 1 "
                                         r"--ntasks-per-node 2, or change parallel.\*\)"):
        submit_main(args)
    # 3 ranks do not split over 2 nodes: the example must still launch exactly 3 (not 2 × 2)
    args = parser.parse_args(["configs/gpt_tiny.yaml", "--scheduler", "slurm", "--nodes", "2", "--time", "00:10:00",
                              "--ntasks-per-node", "1", "--set", "parallel.dp=3", "--set", "train.global_batch=12",
                              "--set", f"run.dir={tmp_path}/r", "--dry-run"])
    with pytest.raises(ValueError, match=r"= 3 but 2 ranks in the batch script .* e.g. --nodes 1 --ntasks-per-node 3,"):
        submit_main(args)


def test_launch_keys_the_way_of_starting_ranks_never_reads_are_refused(tmp_path, capsys):
    """launch.address / --address and launch.placement_timeout_s are read by the ray backend only; a batch script
    never connects to another cluster, and under --backend mpi starts each rank once (launch.max_restarts unread):
    each was silently ignored, now one line naming it."""
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text("train: {global_batch: 4, micro_batch: 2}\nlaunch: {address: 'auto', max_restarts: 2}\n")
    with pytest.raises(ValueError, match=r"^launch.address 'auto' with --backend local: only the ray backend"):
        resolve_launch(_launch_args(str(cfg_path), "--backend", "local"))
    with pytest.raises(ValueError, match=r"^--address '10.0.0.1:6379' with --backend mpi"):
        resolve_launch(_launch_args("configs/gpt_tiny.yaml", "--backend", "mpi", "--address", "10.0.0.1:6379"))
    with pytest.raises(ValueError, match=r"^launch.placement_timeout_s = 30 with --backend local: only the ray"):
        resolve_launch(_launch_args("configs/gpt_tiny.yaml", "--set", "launch.placement_timeout_s=30"))
    assert resolve_launch(_launch_args(str(cfg_path), "--backend", "ray"))[1] == "ray"
    assert resolve_launch(_launch_args("configs/gpt_tiny.yaml", "--backend", "ray", "--set",
                                       "launch.placement_timeout_s=30"))[1] == "ray"
    parser = argparse.ArgumentParser()
    add_submit_arguments(parser)
    submit = ["configs/gpt_tiny.yaml", "--scheduler", "slurm", "--nodes", "1", "--ntasks-per-node", "2", "--time",
              "00:10:00", "--set", f"run.dir={tmp_path}/r", "--dry-run"]
    with pytest.raises(ValueError, match=r"^launch.max_restarts = 2 with dist-train submit --backend mpi: srun/"):
        submit_main(parser.parse_args(submit + ["--set", "launch.max_restarts=2"]))
    with pytest.raises(ValueError, match=r"^launch.address 'auto' with dist-train submit: the batch script"):
        submit_main(parser.parse_args(submit + ["--backend", "ray", "--set", "launch.address=auto"]))
    assert submit_main(parser.parse_args(submit + ["--backend", "ray", "--set", "launch.max_restarts=2"])) == 0
    assert "--backend ray" in capsys.readouterr().out


def test_local_and_mpi_ranks_compute_on_this_machines_gpus_whatever_gpus_per_node_says(monkeypatch):
    """local / mpi ranks take this machine's CUDA devices whenever it has any (pick_device): the launcher's pre-flight
    checks that device (it checked CPU on a GPU machine at gpus_per_node 0, refusing e.g. attn_kernel flash the ranks
    would run), and --gpus-per-node on a machine without CUDA, which those ranks would silently run on CPU, is refused."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert ranks_on_cuda("local", 0) and ranks_on_cuda("mpi", 0) and not ranks_on_cuda("ray", 0) and ranks_on_cuda("ray", 2)
    assert resolve_launch(_launch_args("configs/gpt_tiny.yaml", "--backend", "local", "--gpus-per-node", "2",
                                       "--nodes", "1"))[4] == 2
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not ranks_on_cuda("local", 2) and ranks_on_cuda("ray", 2)
    with pytest.raises(ValueError, match=r"^--gpus-per-node 2 with --backend local: local ranks compute on this "):
        resolve_launch(_launch_args("configs/gpt_tiny.yaml", "--backend", "local", "--gpus-per-node", "2",
                                    "--nodes", "1"))
    with pytest.raises(ValueError, match=r"^launch.gpus_per_node = 2 with --backend local: local ranks compute on "):
        resolve_launch(_launch_args("configs/gpt_tiny.yaml", "--set", "launch.gpus_per_node=2"))


def test_dry_run_refuses_an_explicit_rank_count_the_launch_would_refuse(capsys):
    """--nproc 3 on a 2-rank layout fails the launch, so its dry run says so (exit 2) instead of a table; the
    config's own launch.nproc against a --set layout is only a note under the table."""
    with pytest.raises(ValueError, match="= 2 but 3 ranks"):
        launch_main(_launch_args("configs/gpt_tiny.yaml", "--nproc", "3", "--dry-run"))
    assert launch_main(_launch_args("configs/gpt_tiny.yaml", "--set", "parallel.dp=1", "--dry-run")) == 0
    out, err = capsys.readouterr()
    assert "rank  dp" in out and "note: the layout is valid, but launching it as given would fail" in err
    assert "pass --nproc 1" in err
    assert launch_main(_launch_args("configs/gpt_tiny.yaml", "--set", "parallel.dp=1", "--nproc", "1",
                                    "--dry-run")) == 0
    assert "note:" not in capsys.readouterr().err


def test_dry_run_notes_a_profile_setting_the_launchs_preflight_refuses(capsys):
    """profile.ranks beyond the layout's ranks (and profile.memory on CPU ranks) is refused by the launch's pre-flight
    (profiling.check_profile), no longer by the rank-count check the dry run asks: its dry run shows the table and
    says so in a note, as for a rank count the launch would refuse (it said nothing)."""
    profiled = ["--set", "profile.steps=[1,2]", "--set", "parallel.dp=2"]
    assert launch_main(_launch_args("configs/gpt_tiny.yaml", *profiled, "--set", "profile.ranks=[0,2]",
                                    "--dry-run")) == 0
    out, err = capsys.readouterr()
    assert "rank  dp" in out
    assert err.strip() == ("note: the layout is valid, but launching it as given would fail: profile.ranks = [0, 2]: "
                           "rank 2 does not exist, the ranks are 0..1"), err
    assert launch_main(_launch_args("configs/gpt_tiny.yaml", *profiled, "--set", "profile.ranks=[1]", "--nproc", "2",
                                    "--dry-run")) == 0
    assert "note:" not in capsys.readouterr().err


def test_preflight_runs_in_the_launcher_only_when_the_ranks_run_here(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ranks_on_this_machine("local", 1, None) and ranks_on_this_machine("mpi", 1, None)
    assert ranks_on_this_machine("ray", 1, None)  # embedded cluster
    assert not ranks_on_this_machine("ray", 2, None)
    assert not ranks_on_this_machine("ray", 1, "10.0.0.1:6379")
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    assert not ranks_on_this_machine("ray", 1, None)


def test_an_unreachable_ray_address_is_one_line_at_once():
    """A wrong --address was minutes of Ray reconnect attempts and log lines; a closed port is refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ValueError, match=rf"^Ray cluster address 127.0.0.1:{port} .*nothing accepts connections there"):
        refuse_unreachable(f"127.0.0.1:{port}")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        refuse_unreachable(f"127.0.0.1:{server.getsockname()[1]}")  # something answers: Ray takes over
    if socket.has_ipv6:  # [::1]:port is IPv6 loopback, not a host named "[::1]"
        try:
            server6 = socket.socket(socket.AF_INET6)
            server6.bind(("::1", 0))
        except OSError:  # no IPv6 loopback on this machine
            server6 = None
        if server6 is not None:
            with server6:
                server6.listen()
                refuse_unreachable(f"[::1]:{server6.getsockname()[1]}")
    for left_to_ray in ("auto", f"ray://127.0.0.1:{port}", f"http://127.0.0.1:{port}"):
        refuse_unreachable(left_to_ray)


def test_the_watchdog_clock_restarts_when_a_checkpoint_save_ends(tmp_path, monkeypatch):
    """A save longer than the step watchdog (auto: 10 x the slowest step, at least 30 s) is covered by ``busy``,
    but the step clock kept running through it: the moment the save ended the rank looked hung and the job was
    killed (`dist-train launch` with a 45 s save at step 3: "FAILED after 1 attempt: hang: … rank 0 at step 3
    (45.1 s ago)", a committed checkpoint and a dead job). The next step gets the watchdog's full time again."""
    monkeypatch.delenv("DIST_TRAIN_FAULT", raising=False)
    clock = [1000.0]
    monkeypatch.setattr(time, "time", lambda: clock[0])
    lc = Lifecycle(run_dir=tmp_path, rank=0, watchdog_s=None, install_signals=False)
    try:
        for step in (1, 2):
            clock[0] += 1.0
            lc.heartbeat(step)
        with lc.busy("checkpoint"):
            clock[0] += 45.0  # a save longer than the automatic limit (30 s at 1 s per step)
            busy = progress_from_heartbeats(tmp_path, range(1), attempt=lc.attempt, started=0.0)[0]
            assert busy.busy == "checkpoint" and busy.age == 45.0
        clock[0] += 1.0
        after = progress_from_heartbeats(tmp_path, range(1), attempt=lc.attempt, started=0.0)[0]
        assert after.busy is None and after.step == 2
        assert after.age == 1.0, after  # was 46 s since step 2: over auto_watchdog_s(1 s gap) = 30 s, a "hang"
        assert after.age < auto_watchdog_s(after.gap_s, 300.0)
        clock[0] += 1.0
        lc.heartbeat(3)  # the save is not a step: it is not counted in the gap that sets the automatic limit
        assert read_heartbeat(tmp_path, 0)["gap_s"] == 2.0
    finally:
        lc.close()


def test_submit_refuses_a_start_that_would_resume_another_runs_checkpoints(tmp_path):
    """Every start of a batch job runs with checkpoint.restart=true (a requeue must resume the run's newest), so its
    ranks cannot tell a first start from a requeue: a job submitted with checkpoint.resume = none (or a fine-tune's
    PATH) into a run dir that still holds an earlier run's checkpoints silently continued that run (what `launch`
    refuses). `dist-train submit` checks the start as configured, before anything is written or submitted."""
    run = tmp_path / "r"
    cfg = tiny_gpt_config(run, steps=2, checkpoint={"every": 2})
    train(cfg)  # the earlier run: step_2 in r/checkpoints
    config = tmp_path / "c.yaml"
    save_config(cfg, config)
    # what the batch job's first start runs: it resumes step_2 although the config says none
    assert train(tiny_gpt_config(run, steps=3, checkpoint={"resume": "none", "restart": True, "at_end": True})
                 ).start_step == 2
    parser = argparse.ArgumentParser()
    add_submit_arguments(parser)
    submit = [str(config), "--scheduler", "slurm", "--nodes", "1", "--ntasks-per-node", "1", "--time", "00:10:00"]
    with pytest.raises(ValueError, match=r"^checkpoint.resume = none, but .* holds checkpoints \(step_3, step_2\)"):
        submit_main(parser.parse_args(submit + ["--set", "checkpoint.resume=none"]))
    with pytest.raises(ValueError, match=r"is at step 2, but .* holds newer checkpoints \(step_3\)"):
        submit_main(parser.parse_args(submit + ["--set", f"checkpoint.resume={run / 'checkpoints' / 'step_2'}"]))
    assert not list(run.glob("submit_*.sh"))
    assert submit_main(parser.parse_args(submit + ["--dry-run"])) == 0  # resume: auto continues the run: fine


def test_every_attempt_of_a_launch_runs_the_config_as_launched(tmp_path, monkeypatch):
    """A restart re-read the config file: edited while the job ran (a new run.dir for the next run), the automatic
    restart trained from step 0 in the other run dir and dropped the run's checkpoints, while the launcher said
    "restarting the job from its newest committed checkpoint" (`dist-train launch cfg.yaml --max-restarts 1`, a
    fault at step 7, run.dir edited after step_4: attempt 1 trained steps 1-12 in runB, runA's step_6 ignored)."""
    config = tmp_path / "cfg.yaml"
    text = (f"run: {{name: e, dir: {tmp_path / 'runA'}}}\ndata: {{source: synthetic, seq_len: 32}}\n"
            "train: {steps: 2, global_batch: 4, micro_batch: 2}\nlaunch: {backend: local, nproc: 1}\n")
    config.write_text(text)
    seen = {}

    def run(self):  # instead of starting ranks: what each attempt would read
        seen["argv"] = list(self.spec.argv)
        config.write_text(text.replace("runA", "runB"))  # edited while the job runs
        seen["read"] = load_config(self.spec.argv[4], []).run.dir
        return 0

    monkeypatch.setattr(cli.Supervisor, "run", run)
    monkeypatch.setattr(cli, "preflight", lambda *a, **k: None)
    assert launch_main(_launch_args(str(config), "--max-restarts", "1")) == 0
    assert seen["read"] == str(tmp_path / "runA"), seen  # the restart reads the config as launched
    assert seen["argv"][3:5] == ["run", str(tmp_path / "runA" / cli.LAUNCHED_CONFIG)], seen


def test_a_config_edited_between_its_checks_and_its_copy_is_refused(tmp_path, monkeypatch):
    """The launcher reads the file for its checks (validation, pre-flight: data, resume) and copies it for the ranks
    later (under the run dir's lock): an edit in between ran the ranks on a config nothing checked."""
    config = tmp_path / "cfg.yaml"
    text = (f"run: {{name: e, dir: {tmp_path / 'runA'}}}\ndata: {{source: synthetic, seq_len: 32}}\n"
            "train: {steps: 2, global_batch: 4, micro_batch: 2}\nlaunch: {backend: local, nproc: 1}\n")
    config.write_text(text)
    monkeypatch.setattr(cli.Supervisor, "run", lambda self: 0)
    monkeypatch.setattr(cli, "preflight", lambda *a, **k: config.write_text(text.replace("steps: 2", "steps: 9")))
    with pytest.raises(ValueError, match=r"^config file .*cfg.yaml changed while it was being launched"):
        launch_main(_launch_args(str(config)))
    monkeypatch.setattr(cli, "preflight", lambda *a, **k: None)
    assert launch_main(_launch_args(str(config))) == 0


def test_a_ray_rank_on_a_node_without_the_launchers_run_dir_gets_the_config_copy(tmp_path):
    """Ray ranks on other nodes run `dist_train run <run.dir>/launched_config.yaml`: with run.dir on node-local
    scratch that file exists only on the launcher's node, and the ranks there failed at start (they used to read
    the config file). Each Ray actor writes the copy it is handed where its node lacks it or holds other bytes (an
    earlier launch's, left on the scratch); one with the same bytes (a shared run.dir: the launcher's own) is left."""
    copy = tmp_path / "node2_scratch" / "run" / LAUNCHED_CONFIG
    text = b"run: {name: e}\n"
    check = f"import sys; sys.exit(0 if open({str(copy)!r}, 'rb').read() == {text!r} else 1)"
    actor = RankActor()
    actor.start([sys.executable, "-c", check], {}, 0, str(tmp_path / "run"), 0, None, {str(copy): text})
    deadline = time.monotonic() + 60
    while (code := actor.poll()["code"]) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert code == 0
    inode = copy.stat().st_ino
    write_missing({str(copy): text})
    assert copy.stat().st_ino == inode  # the same bytes (a shared run.dir's copy, the launcher's own): left as it is
    # an earlier launch's copy left on the node's scratch: its ranks ran it instead of the config launched now
    write_missing({str(copy): b"run: {name: edited}\n"})
    assert copy.read_bytes() == b"run: {name: edited}\n"


def test_every_start_of_a_submitted_job_runs_the_config_as_submitted(tmp_path, monkeypatch):
    """The batch script named the config file itself: a requeue (preemption, time limit) read it again, edits made
    since included (a new run.dir: the requeued job started over elsewhere). Submit copies it into the run dir."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text("#!/bin/sh\necho Submitted batch job 1\n")
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    config = tmp_path / "cfg.yaml"
    text = (f"run: {{name: e, dir: {tmp_path / 'runA'}}}\ndata: {{source: synthetic, seq_len: 32}}\n"
            "train: {steps: 2, global_batch: 4, micro_batch: 2}\n")
    config.write_text(text)
    parser = argparse.ArgumentParser()
    add_submit_arguments(parser)
    assert submit_main(parser.parse_args([str(config), "--scheduler", "slurm", "--nodes", "1", "--ntasks-per-node",
                                          "1", "--time", "00:10:00"])) == 0
    config.write_text(text.replace("runA", "runB"))  # edited after submitting
    snapshot, = (tmp_path / "runA").glob("submitted_config-*.yaml")
    script = (tmp_path / "runA" / "submit_slurm.sh").read_text()
    assert f"-m dist_train run {snapshot} " in script and str(config) not in script, script
    assert load_config(snapshot).run.dir == str(tmp_path / "runA")
    # a second job into the same run dir (the next stage of a chain, queued behind the first) with another config:
    # the first job, still queued or requeued, keeps running its own
    stage2 = tmp_path / "stage2.yaml"
    stage2.write_text(text.replace("steps: 2", "steps: 4"))
    assert submit_main(parser.parse_args([str(stage2), "--scheduler", "slurm", "--nodes", "1", "--ntasks-per-node",
                                          "1", "--time", "00:10:00"])) == 0
    assert load_config(snapshot).train.steps == 2
    second = (tmp_path / "runA" / "submit_slurm.sh").read_text()
    stage2_copy = second.split(" -m dist_train run ")[1].split()[0]
    assert str(snapshot) not in second and load_config(stage2_copy).train.steps == 4


def test_an_embedded_cluster_gets_a_token_of_its_own_unless_the_user_chose():
    """Every Ray server on loopback, and a fresh token per launch in the environment only (Ray's default token is
    a 0644 file in the home directory, reused by every later cluster); an authentication choice of the user's
    (a mode, a token, a token file) is kept."""
    first, second = embedded_cluster_environment({}), embedded_cluster_environment({})
    assert first["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0" and first["RAY_AUTH_MODE"] == "token"
    assert len(first["RAY_AUTH_TOKEN"]) == 64 and first["RAY_AUTH_TOKEN"] != second["RAY_AUTH_TOKEN"]
    for chosen in ({"RAY_AUTH_MODE": "disabled"}, {"RAY_AUTH_TOKEN": "t"}, {"RAY_AUTH_TOKEN_PATH": "/p"}):
        assert embedded_cluster_environment(chosen) == {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}

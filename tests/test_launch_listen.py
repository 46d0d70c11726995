"""Services bind to loopback on one machine: rank 0's rendezvous store and gloo listen on 127.0.0.1 only;
a taken MASTER_PORT is one line naming it."""
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import psutil
import pytest
import torch.distributed as dist

from dist_train.distributed import init_distributed
from dist_train.lifecycle import read_heartbeat
from dist_train.loopback import loopback_environment
from dist_train.rendezvous import RendezvousError, bind_address, create_store, listening_socket
from dist_train.spawn import run_ranks
from launchers.env import LAUNCHER_ENV, LaunchError, free_port, populate_rank_env
from launchers.mpi import GFORKER, MPIEXEC_ENV, MpiBackend, gforker_beside

REPO = Path(__file__).resolve().parents[1]


def _listening(pids):
    """(ip, port) of every TCP socket in LISTEN state owned by ``pids``."""
    out = []
    for c in psutil.net_connections(kind="tcp"):
        if c.status == psutil.CONN_LISTEN and c.pid in pids:
            out.append((c.laddr.ip, c.laddr.port))
    return out


def test_bind_address_rules():
    assert bind_address("127.0.0.1") == "127.0.0.1"
    assert bind_address("localhost") == "127.0.0.1"
    assert bind_address("127.0.0.1", bind="all") == "0.0.0.0"
    assert bind_address("10.1.2.3") == "10.1.2.3"  # a multi-node master: its own interface, not all


def test_taken_port_is_one_line_and_store_listens_on_loopback():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(RendezvousError) as e:
            listening_socket("127.0.0.1", port)
        assert f"MASTER_PORT {port} is already in use" in str(e.value) and "\n" not in str(e.value)
    # what this process listened on before (an in-process DeepSpeed engine of an earlier test lives on, its one-rank
    # gloo group's loopback socket with it: tests/test_in_process_train.py)
    before = set(_listening({os.getpid()}))
    port = free_port("127.0.0.1")
    store = create_store(0, 1, "127.0.0.1", port, timedelta(seconds=10))
    store.set("k", "v")
    assert store.get("k") == b"v"
    assert [a for a in _listening({os.getpid()}) if a not in before] == [("127.0.0.1", port)]


def test_under_torchrun_rank_0_connects_to_the_agents_store(monkeypatch):
    """torchrun's agent holds MASTER_PORT with its own store: rank 0 binding it found the port taken."""
    port = free_port("127.0.0.1")
    agent = dist.TCPStore("127.0.0.1", port, None, True, timedelta(seconds=10), wait_for_workers=False)
    with pytest.raises(RendezvousError, match="already in use"):
        create_store(0, 2, "127.0.0.1", port, timedelta(seconds=10))
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    rank0 = create_store(0, 2, "127.0.0.1", port, timedelta(seconds=10))
    rank0.set("k", "v")
    assert agent.get("k") == b"v"


@pytest.mark.slow
def test_local_job_listens_on_loopback_only(tmp_path):
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DIST_TRAIN_", "RANK", "WORLD_SIZE", "MASTER_"))}
    env.update({"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    cmd = [sys.executable, "-m", "dist_train", "launch", str(REPO / "configs" / "gpt_tiny.yaml"), "--backend", "local",
           "--nproc", "2", "--set", "parallel.dp=2", "--set", f"run.dir={run_dir}", "--set", "train.steps=400",
           "--set", "train.progress=false", "--set", "checkpoint.at_end=false"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            if all((read_heartbeat(run_dir, r) or {}).get("step") for r in range(2)):
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        pids = {proc.pid} | {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}
        sockets = _listening(pids)
        assert sockets, "the ranks listen on nothing: the meter is broken"
        assert all(ip.startswith("127.") for ip, _ in sockets), sockets
    finally:
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)


def test_mpi_backend_ranks_rendezvous_and_talk_on_loopback(tmp_path, monkeypatch):
    """`--backend mpi` runs every rank on this machine, but gave them no MASTER_ADDR: rank 0 broadcast the host's
    outside address and its store (no authentication) listened there, and gloo and MPICH's UCX/libfabric
    sockets took that interface too. What mpiexec hands the ranks, seen by a stand-in mpiexec."""
    seen = tmp_path / "env.txt"
    stub = tmp_path / "mpiexec"
    stub.write_text(f"#!/bin/sh\nenv > {seen}\n")
    stub.chmod(0o755)
    monkeypatch.setenv("MASTER_ADDR", "10.9.8.7")  # an outer launcher's: never the ranks'
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    attempt = MpiBackend(2, tmp_path / "run", mpiexec=str(stub)).start(["true"], {}, 0)
    attempt.proc.wait(timeout=30)
    env = dict(line.split("=", 1) for line in seen.read_text().splitlines() if "=" in line)
    loopback = next(n for n, addrs in psutil.net_if_addrs().items()
                    if any(a.family == socket.AF_INET and a.address.startswith("127.") for a in addrs))
    assert env["MASTER_ADDR"] == "127.0.0.1" and 0 < int(env["MASTER_PORT"]) < 65536
    assert all(env[k] == loopback for k in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "UCX_NET_DEVICES",
                                            "FI_TCP_IFACE")), env


def test_mpi_backend_starts_the_ranks_with_the_gforker_of_hydras_installation(tmp_path, monkeypatch):
    """hydra's mpiexec and proxy listen on 0.0.0.0 for each other (a control socket every rank inherits; `-iface lo`
    does not move it): `--backend mpi` starts the ranks with the `mpiexec.gforker` beside the mpiexec it found, when
    that one is the installation's hydra (pip's mpiexec is a copy of mpiexec.hydra). Another MPI's mpiexec and a
    `$DIST_TRAIN_MPIEXEC` are used as they are. (A real job's sockets: tests/test_launch_e2e.py, the mpi test.)"""
    pip = tmp_path / "venv" / "bin"
    pip.mkdir(parents=True)
    for name, text in (("mpiexec", "hydra"), ("mpiexec.hydra", "hydra"), (GFORKER, "gforker"), ("mpirun", "ompi")):
        (pip / name).write_text(text)
        (pip / name).chmod(0o755)
    gforker = str(pip / GFORKER)
    assert gforker_beside(str(pip / "mpiexec")) == gforker == gforker_beside(str(pip / "mpiexec.hydra"))
    (tmp_path / "mpiexec").symlink_to(pip / "mpiexec.hydra")  # /usr/bin/mpiexec -> the installation's hydra
    assert gforker_beside(str(tmp_path / "mpiexec")) == gforker
    assert gforker_beside(str(pip / "mpirun")) is None  # not this installation's hydra
    (pip / GFORKER).unlink()
    assert gforker_beside(str(pip / "mpiexec")) is None
    (pip / GFORKER).write_text("gforker")
    (pip / GFORKER).chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(pip / "python"))  # where find_mpiexec looks first
    monkeypatch.delenv(MPIEXEC_ENV, raising=False)
    assert MpiBackend(2, tmp_path / "run").mpiexec == gforker
    monkeypatch.setenv(MPIEXEC_ENV, str(pip / "mpiexec"))  # the user's choice
    assert MpiBackend(2, tmp_path / "run").mpiexec == str(pip / "mpiexec")


@pytest.mark.parametrize("placed", [
    {"PMI_RANK": "0", "PMI_SIZE": "2", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "1"},  # MPICH hydra
    {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
     "OMPI_COMM_WORLD_LOCAL_SIZE": "2"},  # Open MPI
])
def test_mpi_backend_ranks_that_mpiexec_placed_on_other_nodes_refuse_in_one_line(placed, monkeypatch):
    """Inside a Slurm allocation (or with a hostfile) mpiexec spreads `--backend mpi`'s ranks over the allocated
    nodes (hydra starts them with srun): with MASTER_ADDR=127.0.0.1 and the transports on loopback, the other nodes'
    ranks could never reach rank 0 and the job hung. A rank that finds the job on several nodes says so before any
    MPI or rendezvous step."""
    monkeypatch.setattr("launchers.env._complete_with_mpi", lambda env, environ: env)  # the MPI step, not reached
    environ = {LAUNCHER_ENV: "mpi", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", **placed}
    with pytest.raises(LaunchError) as e:
        populate_rank_env(environ)
    assert "--backend mpi" in str(e.value) and "nodes" in str(e.value) and "\n" not in str(e.value)
    one_node = {**environ, "MPI_LOCALNRANKS": environ.get("PMI_SIZE", "1"),
                "OMPI_COMM_WORLD_LOCAL_SIZE": environ.get("OMPI_COMM_WORLD_SIZE", "1")}
    populate_rank_env(one_node)
    assert one_node["WORLD_SIZE"] == one_node["LOCAL_WORLD_SIZE"]


def test_a_master_on_another_loopback_address_is_answered_there():
    """A host name in Debian's /etc/hosts is 127.0.1.1: the store bound 127.0.0.1 for it, which does not answer
    127.0.1.1, and rank 0's own client waited out the whole timeout. It listens on that address (loopback still)."""
    port = free_port("127.0.1.1")
    store = create_store(0, 1, "127.0.1.1", port, timedelta(seconds=3))
    store.set("k", "v")
    assert store.get("k") == b"v"
    here = [ip for ip, p in _listening({os.getpid()}) if p == port]  # (earlier tests' stores may still listen)
    assert here == ["127.0.1.1"], here


def gloo_interface_given_and_after_a_loopback_rendezvous(rank, world_size, port):
    """(GLOO_SOCKET_IFNAME as dist_train.spawn started this rank, as init_distributed leaves it for a loopback
    MASTER_ADDR when the rank's environment had none)."""
    given = os.environ.pop("GLOO_SOCKET_IFNAME", None)
    os.environ.pop("NCCL_SOCKET_IFNAME", None)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    init_distributed(timeout_s=60)
    after = os.environ.get("GLOO_SOCKET_IFNAME")
    dist.barrier()
    dist.destroy_process_group()
    return given, after


@pytest.mark.slow
def test_one_machine_ranks_put_gloo_on_loopback(monkeypatch):
    """gloo listens on the host name's address: where that name resolves to an outside address (a cluster node;
    shown here in a private mount+UTS namespace with the host name mapped to 192.0.2.2), the ranks of
    `dist-train bench` (dist_train.spawn) and of a run under a loopback MASTER_ADDR (torchrun on one node, a bare
    run) listened there. Both now name the loopback interface first (the user's own value is kept)."""
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    lo = loopback_environment({})["GLOO_SOCKET_IFNAME"]
    port = free_port("127.0.0.1")
    got = run_ranks(gloo_interface_given_and_after_a_loopback_rendezvous, 2, args=(port,), process_group=False)
    assert got == [(lo, lo)] * 2, got


def _init_rank_0_of(monkeypatch, world: int, local_world: int, master: str, port: int, **env: str) -> None:
    """init_distributed as rank 0 of a job of ``world`` ranks, ``local_world`` of them on this node, with ``env`` set
    too; no process group is made (only the store and the transport environment are looked at)."""
    for k in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "UCX_NET_DEVICES", "FI_TCP_IFACE",
              "TORCHELASTIC_USE_AGENT_STORE"):
        monkeypatch.setenv(k, "")  # recorded, so what init_distributed sets is undone after the test
        monkeypatch.delenv(k)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))
    monkeypatch.setenv("MASTER_ADDR", master)
    monkeypatch.setenv("MASTER_PORT", str(port))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: None)
    init_distributed(timeout_s=2)


def test_a_multi_node_master_whose_name_is_loopback_here_is_one_line_not_a_hang(monkeypatch):
    """A multi-node job (LOCAL_WORLD_SIZE < WORLD_SIZE: srun on 2 nodes, MASTER_ADDR the first node's name) whose
    master node maps its own name to 127.0.1.1 (Debian's /etc/hosts): the other nodes dial the name's routable
    address, so a store on loopback is never reached and every rank waited out the timeout. Rank 0 says so in one
    line, naming what to set. (`socket.gethostbyname` stands in for such an /etc/hosts.)"""
    real = socket.gethostbyname
    monkeypatch.setattr(socket, "gethostbyname", lambda h: "127.0.1.1" if h == "node-a" else real(h))
    port = free_port("127.0.0.1")
    with pytest.raises(RendezvousError) as e:
        _init_rank_0_of(monkeypatch, 4, 2, "node-a", port)
    assert "node-a" in str(e.value) and "launch.bind" in str(e.value) and "\n" not in str(e.value)


def test_a_multi_node_job_keeps_its_transports_off_loopback(monkeypatch):
    """The same multi-node job: gloo and NCCL of the master node's ranks were put on the loopback interface, where the
    other nodes cannot reach them (NCCL's own default picks an outside interface). A launch.bind the user named
    lets the store listen; the transports are left to NCCL/gloo (or the user's *_SOCKET_IFNAME)."""
    real = socket.gethostbyname
    monkeypatch.setattr(socket, "gethostbyname", lambda h: "127.0.1.1" if h == "node-a" else real(h))
    port = free_port("127.0.0.1")
    monkeypatch.setattr("dist_train.distributed.create_store", lambda *a, **k: None)
    _init_rank_0_of(monkeypatch, 4, 2, "node-a", port)
    assert "NCCL_SOCKET_IFNAME" not in os.environ and "GLOO_SOCKET_IFNAME" not in os.environ
    _init_rank_0_of(monkeypatch, 2, 2, "node-a", port)  # all ranks here: loopback, as before
    assert os.environ.get("GLOO_SOCKET_IFNAME") == loopback_environment({})["GLOO_SOCKET_IFNAME"]


def test_a_loopback_address_is_one_machine_even_when_launched_as_two_nodes(monkeypatch):
    """`MASTER_ADDR=127.0.0.1` with two 'nodes' on one machine (torchrun --nnodes 2 twice, to try a multi-node
    setup): every rank dials loopback, so every rank is here; it is not refused."""
    port = free_port("127.0.0.1")
    stores = []
    monkeypatch.setattr("dist_train.distributed.create_store", lambda *a, **k: stores.append(a))
    _init_rank_0_of(monkeypatch, 4, 2, "127.0.0.1", port)
    assert stores and os.environ.get("GLOO_SOCKET_IFNAME") == loopback_environment({})["GLOO_SOCKET_IFNAME"]


def test_under_torchrun_a_master_name_python_cannot_resolve_is_left_to_torch(monkeypatch):
    """Under torchrun every rank only connects to the agent's store (torch resolves the name itself, IPv6 included);
    the loopback check for the transports resolved MASTER_ADDR on every rank first, and a name without an IPv4
    address ended the job there. Such a name is simply not loopback."""
    real = socket.gethostbyname

    def v6_only(host):
        if host == "v6-only-node":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host)

    monkeypatch.setattr(socket, "gethostbyname", v6_only)
    stores = []
    monkeypatch.setattr("dist_train.distributed.create_store", lambda *a, **k: stores.append(a))
    _init_rank_0_of(monkeypatch, 2, 2, "v6-only-node", free_port("127.0.0.1"), TORCHELASTIC_USE_AGENT_STORE="True")
    assert stores and "GLOO_SOCKET_IFNAME" not in os.environ

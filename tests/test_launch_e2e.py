"""End to end: the real trainer (configs/gpt_tiny.yaml, a few steps, 2 CPU ranks) through every backend.

* embedded Ray + SIGTERM: checkpoint, status 75, the resumed run equals an uninterrupted one; per-rank logs
  exist, rank 0's lines reach the console exactly once;
* a rank SIGKILLed mid-run (local backend, --max-restarts 1) → restart from the last checkpoint, and the
  final loss equals an uninterrupted run started by a bare ``mpiexec -n 2 … dist_train run``;
* ``dist-train launch --backend mpi`` + SIGTERM → complete checkpoint, status 75, every socket the job listens
  on is on loopback; relaunch resumes at the next step;
* on one shared ``ray start`` cluster with token authentication (--address): a launch with the token and one with a
  wrong one, a placement the cluster cannot make, and ``dist-train eval --backend ray``.
"""
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from dist_train.config import load_config
from dist_train.lifecycle import EXIT_PREEMPTED, read_heartbeat
from dist_train.trainer import train
from launchers.env import free_port
from tests.dist_harness import run_ranks
from tests.trainer_utils import one_eval_result, run_cli_here, run_dir_files, validated_checkpoints

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "gpt_tiny.yaml")
BASE = ["--set", "parallel.dp=2", "--set", "train.log_every=1", "--set", "train.progress=false",
        "--set", "checkpoint.at_end=false"]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DIST_TRAIN_", "RANK", "WORLD_SIZE", "MASTER_"))}
    env.update({"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra})
    return env


def _launch(run_dir, *args, env=None, timeout=240):
    cmd = [sys.executable, "-m", "dist_train", "launch", CONFIG, *BASE, "--set", f"run.dir={run_dir}", *args]
    return subprocess.run(cmd, cwd=REPO, env=env or _env(), capture_output=True, text=True, timeout=timeout)


def _launch_here(run_dir, *args, capfd, monkeypatch, **env):
    """``dist-train launch`` with this process as the launcher (its ranks are processes of their own, started as
    from the command) and the environment ``_env`` gives a launcher process: a launcher process of its own cost
    ~5 s of CPU importing torch and the launchers, where the test is not about its start. What it and its ranks
    wrote to stdout and stderr, as a subprocess's result."""
    for key in [k for k in os.environ if k.startswith(("DIST_TRAIN_", "RANK", "WORLD_SIZE", "MASTER_"))]:
        monkeypatch.delenv(key)
    for key, value in {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **env}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(REPO)
    return run_cli_here(capfd, "launch", CONFIG, *BASE, "--set", f"run.dir={run_dir}", *args)


def _metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_killed_rank_restarts_and_matches_uninterrupted(tmp_path, capfd, monkeypatch):
    from launchers.mpi import find_mpiexec

    steps = ["--set", "train.steps=5", "--set", "checkpoint.every=2"]
    run_dir, ref_dir = tmp_path / "fault", tmp_path / "ref"
    mpiexec = find_mpiexec()
    with ThreadPoolExecutor(1) as pool:  # the uninterrupted reference trains while the faulty run does
        ref_run = None if mpiexec is None else pool.submit(
            subprocess.run, [mpiexec, "-n", "2", sys.executable, "-m", "dist_train", "run", CONFIG, *BASE, *steps,
                             "--set", f"run.dir={ref_dir}"],
            cwd=REPO, env=_env(), capture_output=True, text=True, timeout=240)
        p = _launch_here(run_dir, "--backend", "local", "--nproc", "2", "--max-restarts", "1", *steps, capfd=capfd,
                         monkeypatch=monkeypatch, DIST_TRAIN_FAULT="rank=1,step=3,signal=KILL")
        out = p.stdout + p.stderr
        assert p.returncode == 0, out[-4000:]
        assert "rank 1 killed by SIGKILL" in out and "restart 1 of 1" in out
        events = [json.loads(line)["event"] for line in (run_dir / "logs" / "launcher.jsonl").read_text().splitlines()]
        assert events.count("attempt_start") == 2
        if ref_run is None:
            pytest.skip("no mpiexec for the uninterrupted reference run")
        q = ref_run.result()
    assert q.returncode == 0, (q.stdout + q.stderr)[-4000:]
    got, ref = _metrics(run_dir)[-1], _metrics(ref_dir)[-1]
    assert got["step"] == ref["step"] == 5
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6, abs=1e-6)


def test_mpi_launch_sigterm_checkpoints_and_resumes(tmp_path, capfd, monkeypatch):
    from dist_train.checkpoint import complete_checkpoints
    from launchers.mpi import find_mpiexec

    if find_mpiexec() is None:
        pytest.skip("no mpiexec on this machine (pip install mpich)")
    run_dir = tmp_path / "pre"
    cmd = [sys.executable, "-m", "dist_train", "launch", CONFIG, *BASE, "--set", f"run.dir={run_dir}",
           "--backend", "mpi", "--nproc", "2", "--set", "train.steps=500", "--set", "checkpoint.every=0"]
    listening = []
    code, out = _preempt_when_stepping(cmd, run_dir, timeout=180, while_stepping=lambda pid: listening.append(
        _listening_outside_loopback(pid)))
    assert code == EXIT_PREEMPTED, out[-4000:]
    # this machine only: hydra's mpiexec and proxy listened on 0.0.0.0 (a control socket every rank inherits); the
    # ranks start under MPICH's gforker, and the store, gloo and MPICH's UCX listeners are on loopback
    outside, seen = listening[0]
    assert seen >= 3, f"{seen} listening sockets: the meter missed the store, gloo and MPICH's listeners"
    assert not outside, f"listening beyond loopback: {outside}"
    assert "[rank 0] preempted, resumable: loss " in out and "done: loss" not in out, out[-4000:]
    # the preemption line follows the last step's metric line (it came before it)
    lines = out.splitlines()
    last_step = max(i for i, line in enumerate(lines) if re.match(r"\[rank 0\] step +\d+/500 ", line))
    assert lines.index(next(line for line in lines if line.startswith("[rank 0] preempted (signal"))) > last_step
    # once, by rank 0: the other ranks' copies of the line (one per rank) stay in their logs
    assert not [line for line in lines if re.match(r"\[rank [1-9]\d*\] .*preempted \(signal", line)], out[-4000:]
    done = complete_checkpoints(run_dir / "checkpoints")
    assert done, out[-4000:]
    saved = done[0][0]
    assert 2 <= saved < 500
    # the launcher's last line names what the rank wrote, as rank 0's does
    assert (f"[launcher] preempted: every rank stopped; exiting with {EXIT_PREEMPTED} (a restart resumes from "
            f"{done[0][1]})") in out, out[-4000:]
    p = _launch_here(run_dir, "--backend", "local", "--nproc", "2", "--set", f"train.steps={saved + 1}", capfd=capfd,
                     monkeypatch=monkeypatch)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["start_step"] == saved  # resumed at the next step, trained exactly one
    assert _metrics(run_dir)[-1]["step"] == saved + 1


def _preempt_when_stepping(cmd, run_dir, env=None, min_step=2, timeout=240, while_stepping=None):
    """Start ``cmd``, SIGTERM it once every rank has finished ``min_step`` steps (first calling
    ``while_stepping(pid)``); (returncode, output)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env or _env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        hb = [read_heartbeat(run_dir, r) for r in range(2)]
        if all(h and (h.get("step") or 0) >= min_step for h in hb):
            if while_stepping is not None:
                while_stepping(proc.pid)
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def _listening_outside_loopback(pid):
    """``ip:port (process)`` of every listening socket (TCP in LISTEN state, UDP bound without a peer), on an address
    other than loopback, owned by ``pid`` or a process below it (an embedded Ray cluster's GCS, raylet, workers and
    agents are; mpiexec, its proxies and the ranks are), and how many listening sockets there were in all."""
    procs = {pid: psutil.Process(pid)}
    procs.update({c.pid: c for c in procs[pid].children(recursive=True)})
    outside, seen = [], 0
    for c in psutil.net_connections(kind="inet"):
        listening = c.status == psutil.CONN_LISTEN or (c.type == socket.SOCK_DGRAM and not c.raddr)
        if not listening or c.pid not in procs:
            continue
        seen += 1
        ip = ipaddress.ip_address(c.laddr.ip)
        if not (ip.is_loopback or getattr(ip, "ipv4_mapped", None) and ip.ipv4_mapped.is_loopback):
            kind = "udp" if c.type == socket.SOCK_DGRAM else "tcp"
            outside.append(f"{kind} {c.laddr.ip}:{c.laddr.port} ({procs[c.pid].name()})")
    return outside, seen


def test_ray_launch_sigterm_checkpoints_and_resume_equals_uninterrupted(tmp_path):
    """ray.init() installs its own SIGTERM handler: the launcher must keep forwarding preemption."""
    pytest.importorskip("ray")
    from dist_train.checkpoint import complete_checkpoints

    run_dir = tmp_path / "pre"
    # the preempted run is told 500 steps and the two compared 'saved + 2': a constant LR after warm-up
    # (min_lr_ratio 1) makes the schedule independent of the total, wherever the SIGTERM lands (it landed past
    # warm-up on a loaded machine, and the cosine over 500 steps had trained other steps than over saved + 2)
    flat = ["--set", "train.min_lr_ratio=1.0"]
    cmd = [sys.executable, "-m", "dist_train", "launch", CONFIG, *BASE, *flat, "--set", f"run.dir={run_dir}",
           "--backend", "ray", "--nproc", "2", "--set", "train.steps=500", "--set", "checkpoint.every=0"]
    listening = []
    # a home of its own, no authentication settings: the embedded cluster must leave no token file behind
    home = tmp_path / "home"
    env = {k: v for k, v in _env(HOME=str(home)).items() if not k.startswith("RAY_AUTH_")}
    code, out = _preempt_when_stepping(cmd, run_dir, env=env, while_stepping=lambda pid: listening.append(
        _listening_outside_loopback(pid)))
    assert code == EXIT_PREEMPTED, out[-4000:]
    assert "got SIGTERM" in out, out[-4000:]
    # the embedded cluster is this machine alone: Ray's servers and metrics ports listen on loopback only
    outside, seen = listening[0]
    assert seen >= 5, f"{seen} listening sockets: the meter missed Ray's servers"
    assert not outside, f"listening beyond loopback: {outside}"
    # its token lived in its processes' environment: Ray wrote ~/.ray/auth_token (mode 0644) and kept it
    assert not (home / ".ray" / "auth_token").exists()
    # the embedded cluster: per-rank logs, rank 0's lines exactly once, ours (not Ray's log forwarding)
    for r in range(2):
        assert (run_dir / "logs" / f"rank_{r}.log").is_file() and (run_dir / "logs" / f"rank_{r}.stderr").is_file()
    assert out.count("dist-train | gpt_tiny") == 1, out[-4000:]
    assert "[rank 0] " in out and "(RankActor" not in out
    rank1 = (run_dir / "logs" / "rank_1.log").read_text()
    assert "rank 1 of 2" in rank1 and "rank 1 done:" in rank1, rank1  # ranks > 0 log their start and end
    done = complete_checkpoints(run_dir / "checkpoints")
    assert done, out[-4000:]
    saved = done[0][0]
    assert 2 <= saved < 500
    # the resume and the uninterrupted reference train on the rank harness's 2 gloo ranks (forked with torch and the
    # trainer loaded; two `dist-train launch --backend local` cost 2 launchers and 4 ranks importing them): this test
    # is about the ray launcher's preemption, and test_mpi_launch_sigterm_checkpoints_and_resumes resumes through
    # `dist-train launch --backend local`
    total = _sets(*BASE, *flat, "--set", f"train.steps={saved + 2}")
    ref_dir = tmp_path / "ref"
    starts = run_ranks(_resume_then_train_uninterrupted, 2, args=(total, str(run_dir), str(ref_dir)), timeout=300)
    assert starts == [saved, saved]  # resumed at the next step
    got, ref = _metrics(run_dir)[-1], _metrics(ref_dir)[-1]
    assert got["step"] == ref["step"] == saved + 2
    assert got["loss"] == ref["loss"]


def _sets(*args: str) -> list[str]:
    """``--set K=V`` pairs as load_config's overrides (``K=V``)."""
    assert args[::2] == ("--set",) * (len(args) // 2), args
    return list(args[1::2])


def _resume_then_train_uninterrupted(rank, world, sets, run_dir, ref_dir):
    """On each rank: train ``run_dir`` on from its newest checkpoint, then ``ref_dir`` from scratch, as a rank
    `dist-train run` would (CONFIG's data path is relative to the repository); the resumed run's start step."""
    os.chdir(REPO)
    resumed = train(load_config(CONFIG, [*sets, f"run.dir={run_dir}"]))
    train(load_config(CONFIG, [*sets, f"run.dir={ref_dir}"]))
    return resumed.start_step


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A `ray start --head` cluster with token authentication on loopback (one node, 2 CPUs), shared by the tests
    that launch onto an existing cluster (--address): each start of a Ray cluster costs 10-20 s of this
    2-core machine. Yields (address, token file)."""
    pytest.importorskip("ray")
    tmp = tmp_path_factory.mktemp("ray_head")
    token = tmp / "auth_token"
    token.write_text("0123456789abcdef0123456789abcdef")
    port = free_port("127.0.0.1")
    ray_exe = str(Path(sys.executable).parent / "ray")
    head_env = _env(RAY_AUTH_TOKEN_PATH=str(token), RAY_USAGE_STATS_ENABLED="0")
    head_log = tmp / "head.log"
    ray_tmp = tempfile.mkdtemp(prefix="dt-ray-")  # Ray's socket paths must stay under 108 bytes
    with open(head_log, "w") as log:
        head = subprocess.Popen([ray_exe, "start", "--head", f"--port={port}", "--num-cpus=2",
                                 "--include-dashboard=false", f"--temp-dir={ray_tmp}", "--block"],
                                env=head_env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while "will now block" not in head_log.read_text() and time.time() < deadline and head.poll() is None:
            time.sleep(0.5)
        assert "will now block" in head_log.read_text(), head_log.read_text()[-3000:]
        yield f"127.0.0.1:{port}", token
    finally:
        if head.poll() is None:
            os.killpg(head.pid, signal.SIGKILL)  # the whole throw-away cluster (its own session) at once
            head.wait(timeout=60)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_ray_address_with_token_auth(tmp_path, ray_head):
    """A `ray start` cluster with token authentication: the launcher presents the token it finds (no
    RAY_AUTH_MODE needed); a wrong token is one line naming the address, exit 2."""
    address, token = ray_head
    # Ray retries a refused GCS connection once a second, 20 times by default; its own override of that
    # budget (ray/_private/node.py, _init_gcs_client) makes the refused client give up after 2 tries.
    # It runs while the good one trains.
    bad_env = _env(RAY_AUTH_TOKEN="not-the-token", RAY_gcs_server_port_wait_time_s="2")
    bad = subprocess.Popen([sys.executable, "-m", "dist_train", "launch", CONFIG, *BASE, "--set",
                            f"run.dir={tmp_path / 'bad'}", "--backend", "ray", "--address", address, "--nproc",
                            "1", "--set", "parallel.dp=1"], cwd=REPO, env=bad_env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ok = _launch(tmp_path / "ok", "--backend", "ray", "--address", address, "--nproc", "1",
                 "--set", "parallel.dp=1", "--set", "train.steps=1", env=_env(RAY_AUTH_TOKEN_PATH=str(token)),
                 timeout=300)
    bad_out, bad_err = bad.communicate(timeout=300)
    assert ok.returncode == 0, (ok.stdout + ok.stderr)[-4000:]
    errors = [line for line in (bad_out + bad_err).splitlines() if not line.startswith("[launcher]")]
    assert bad.returncode == 2, bad_err[-3000:]
    assert len(errors) == 1 and address in errors[0] and "RAY_AUTH_TOKEN" in errors[0], errors


def test_ray_impossible_placement_says_what_it_waits_for(tmp_path, ray_head):
    """Two node bundles on a one-node cluster: the wait is configurable and named, the failure is one line
    (exit 2), and launcher.jsonl closes the attempt. (On the shared `ray start` cluster: the placement wait is
    the same code after either connection, and an embedded cluster of its own cost 10-20 s more.)"""
    address, token = ray_head
    run_dir = tmp_path / "place"
    p = _launch(run_dir, "--backend", "ray", "--address", address, "--nproc", "2", "--nodes", "2",
                "--set", "launch.placement_timeout_s=2", env=_env(RAY_AUTH_TOKEN_PATH=str(token)))
    out = p.stdout + p.stderr
    assert p.returncode == 2, out[-4000:]
    assert "waiting up to 2 s (launch.placement_timeout_s)" in out
    errors = [line for line in out.splitlines() if line.startswith("dist-train: error:")]
    assert len(errors) == 1 and "within 2 s" in errors[0], out[-4000:]
    events = [json.loads(line) for line in (run_dir / "logs" / "launcher.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["attempt_start", "attempt_end"]
    assert events[-1]["outcome"] == "start_failed"


def test_eval_on_a_ray_cluster(tmp_path, ray_head):
    """`dist-train eval --backend ray` (a process of its own, on the shared cluster): rank 0's result comes back as a
    marked stdout line (its node need not be this one), kept off the console: stdout is the one summary line; the
    loss is the one the trainer logged, and the run dir is only read. (Eval's launcher builds its Ray backend as
    launch's does, with or without --address, and runs its pre-flight here either way: an embedded cluster's start,
    loopback and token are test_ray_launch_sigterm_checkpoints_and_resume_equals_uninterrupted's; each cluster start
    costs 10-20 s of this 2-core machine.)"""
    address, token = ray_head
    cfg_path, run_dir, logged = validated_checkpoints(tmp_path)
    out = tmp_path / "ray.json"
    before = run_dir_files(run_dir)
    proc = subprocess.run([sys.executable, "-m", "dist_train", "eval", str(cfg_path), "--set", "parallel.dp=2",
                           "--backend", "ray", "--address", address, "--out", str(out)], cwd=tmp_path,
                          env=_env(RAY_AUTH_TOKEN_PATH=str(token)), capture_output=True, text=True, timeout=300)
    result = one_eval_result(proc, out)
    assert result["world_size"] == 2 and abs(result["loss"] - logged[2]) <= 1e-5
    assert run_dir_files(run_dir) == before

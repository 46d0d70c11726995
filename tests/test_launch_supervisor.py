"""The restart supervisor on real rank processes, with a tiny lockstep job of our own (no trainer needed):
restart after a killed rank, failure summary, hang watchdog, SIGTERM preemption, the MPI backend."""
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

from dist_train.checkpoint.manifest import write_manifest
from dist_train.config import CheckpointConfig
from dist_train.lifecycle import EXIT_DAMAGED, EXIT_HANG, EXIT_PREEMPTED, read_heartbeat
from launchers.cli import restart_point
from launchers.local import LocalBackend
from launchers.supervisor import NOT_RESTARTABLE, JobSpec, Supervisor

REPO = Path(__file__).resolve().parents[1]

# A job that "checkpoints" its step in ckpt.txt (rank 0, every 2 steps), sums a number over all ranks
# each step, resumes from ckpt.txt when started with the resume arguments, and obeys the Lifecycle.
# The ranks run in lockstep over plain sockets (rank 0 listens on the launcher's MASTER_ADDR:MASTER_PORT, as gloo's
# store does): an all-reduce blocks until every rank has sent its number, a peer that died makes the others fail in
# it (end of stream), and a rank waiting for a stopped one stays in it with its heartbeat thread alive. What the
# supervisor sees is what a gloo job shows it, without the ~2.5 s of CPU each rank spent importing torch.
TINY = textwrap.dedent("""
    import os, socket, struct, sys, time
    from pathlib import Path
    sys.path.insert(0, {repo!r})
    from launchers.env import populate_rank_env
    populate_rank_env()
    from dist_train.lifecycle import Lifecycle, EXIT_PREEMPTED
    run_dir, steps = Path(sys.argv[1]), int(sys.argv[2])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    # TINY_LOCKSTEP=0: the ranks share nothing, and stop_agreed() is each rank's own flag.
    lockstep = os.environ.get("TINY_LOCKSTEP", "1") == "1"

    def recv_sum(sock):
        data = b""
        while len(data) < 8:
            more = sock.recv(8 - len(data))
            if not more:
                raise ConnectionError(f"rank {{rank}}: a peer closed its connection in the all-reduce")
            data += more
        return struct.unpack("d", data)[0]

    def all_reduce(x):
        if rank == 0:
            total = x + sum(recv_sum(p) for p in peers)
            for p in peers:
                p.sendall(struct.pack("d", total))
            return total
        peers[0].sendall(struct.pack("d", x))
        return recv_sum(peers[0])

    if lockstep:
        where = (os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))
        if rank == 0:
            server = socket.create_server(where)
            peers = [server.accept()[0] for _ in range(world - 1)]
        else:
            deadline = time.monotonic() + 60
            while True:
                try:
                    peers = [socket.create_connection(where)]
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
    lc = Lifecycle(run_dir=run_dir, rank=rank, watchdog_s=float(os.environ.get("TINY_WATCHDOG", "0")))
    ck = run_dir / "ckpt.txt"
    start = int(ck.read_text()) + 1 if ("checkpoint.restart=true" in sys.argv and ck.exists()) else 0
    print(f"start {{start}} world {{world}}", flush=True)
    total = 0.0
    for step in range(start, steps):
        if lockstep:
            total = all_reduce(float(rank + step))
        time.sleep(float(os.environ.get("TINY_SLEEP", "0.02")))
        lc.heartbeat(step)
        stop = lc.stop_agreed()
        if rank == 0 and (step % 2 == 1 or stop):
            ck.write_text(str(step))
        if lockstep:
            all_reduce(0.0)  # the barrier: no rank starts the next step before rank 0 has checkpointed this one
        if stop:
            print(f"preempted at {{step}}", flush=True)
            lc.close()
            sys.exit(EXIT_PREEMPTED)
    lc.close()
    print(f"done sum {{total:g}}", file=sys.stderr, flush=True)
""")


class Capture:
    """A sink that keeps the prefixed console lines."""

    def __init__(self):
        self.lines, self._lock = [], threading.Lock()

    def __call__(self, stream, text):
        with self._lock:
            self.lines.append(text)

    def text(self):
        return "".join(self.lines)


@pytest.fixture
def tiny(tmp_path):
    script = tmp_path / "tiny.py"
    script.write_text(TINY.format(repo=str(REPO)))
    return script


def _run(tmp_path, tiny, name, nproc, steps, backend="local", sink=None, **spec_kw):
    run_dir = tmp_path / name
    run_dir.mkdir()
    spec = JobSpec([sys.executable, str(tiny), str(run_dir), str(steps)], nproc=nproc, run_dir=run_dir, **spec_kw)
    if backend == "local":
        be = LocalBackend(nproc, run_dir, sink=sink)
    else:
        from launchers.mpi import MpiBackend

        be = MpiBackend(nproc, run_dir)
    out = io.StringIO()
    sup = Supervisor(spec, be, out=out)
    return sup, sup.run(), out.getvalue(), run_dir


def _events(run_dir):
    import json

    return [json.loads(line) for line in (run_dir / "logs" / "launcher.jsonl").read_text().splitlines()]


def test_restart_after_killed_rank_and_failure_summary(tmp_path, tiny):
    # rank 1 SIGKILLs itself at step 4 of the first attempt only; the others fail in their collective.
    cap = Capture()
    sup, code, said, run_dir = _run(tmp_path, tiny, "restart", 2, 8, sink=cap, max_restarts=1,
                                    env={"DIST_TRAIN_FAULT": "rank=1,step=4,signal=KILL"})
    assert code == 0, said + cap.text()
    assert [o.kind for o in sup.attempts] == ["failed", "ok"]
    assert sup.attempts[0].rank == 1 and sup.attempts[0].code == 128 + signal.SIGKILL
    assert "rank 1 killed by SIGKILL (attempt 0)" in said and "restart 1 of 1" in said
    text = cap.text()
    # every rank's lines arrive prefixed; the second attempt resumed after the last checkpoint (step 3)
    for r in range(2):
        assert f"[rank {r}] start 0 world 2" in text and f"[rank {r}] start 4 world 2" in text
        assert f"[rank {r}] done sum {sum(r2 + 7 for r2 in range(2)):g}" in text
    assert "[rank 1] [fault injection] rank 1 step 4: signal SIGKILL" in text
    ev = _events(run_dir)
    assert [e["event"] for e in ev] == ["attempt_start", "attempt_end", "restart", "attempt_start", "attempt_end"]
    assert ev[3]["argv"][-2:] == ["--set", "checkpoint.restart=true"] and "--set" not in ev[0]["argv"]
    stderr_log = (run_dir / "logs" / "rank_1.stderr").read_text()
    assert "===== attempt 0" in stderr_log and "===== attempt 1" in stderr_log and "fault injection" in stderr_log

    # the same fault without restarts: non-zero status, summary names the rank, signal and last lines
    sup, code, said, _ = _run(tmp_path, tiny, "norestart", 2, 8, sink=Capture(), max_restarts=0,
                              env={"DIST_TRAIN_FAULT": "rank=1,step=2,signal=KILL", "TINY_LOCKSTEP": "0"})
    assert code == 128 + signal.SIGKILL
    assert "FAILED after 1 attempt: rank 1 killed by SIGKILL" in said
    assert "last lines of rank 1's stderr" in said and "[fault injection] rank 1 step 2" in said


def test_divergence_and_usage_errors_are_not_restarted(tmp_path, tiny):
    for code in (3, 2):  # EXIT_DIVERGED, EXIT_USAGE: a restart would fail the same way
        sup, got, said, _ = _run(tmp_path, tiny, f"exit{code}", 2, 8, sink=Capture(), max_restarts=2,
                                 env={"DIST_TRAIN_FAULT": f"rank=1,step=1,action=exit,code={code}", "TINY_LOCKSTEP": "0"})
        assert got == code and len(sup.attempts) == 1, said
        assert "not restarting" in said and "FAILED after 1 attempt" in said


def test_hang_is_detected_with_steps_and_stacks(tmp_path, tiny):
    sup, code, said, run_dir = _run(
        tmp_path, tiny, "hang", 2, 50, sink=Capture(), watchdog_s=2.5, max_restarts=0,
        env={"DIST_TRAIN_FAULT": "rank=0,step=3,action=hang", "TINY_WATCHDOG": "2.5", "TINY_LOCKSTEP": "0",
             "TINY_SLEEP": "0.2"})
    assert code == EXIT_HANG, said
    assert "hang: no step progress for more than 2.5 s (launch.watchdog_s) on rank 0: rank 0 at step 3" in said
    assert sup.attempts[0].rank == 0
    # the rank's own watchdog dumped its Python stack before the launcher killed it
    assert "_maybe_inject_fault" in (run_dir / "logs" / "rank_0.stderr").read_text()


def test_sigstopped_rank_is_named_by_the_automatic_watchdog(tmp_path, tiny):
    # watchdog_s=None: automatic (10x the slowest step, within [30 s, 0.8 x collective timeout]); rank 1 is
    # SIGSTOPped after step 5 while rank 0 waits for it in an all-reduce: rank 1 must be named, at step 5
    t0 = time.time()
    sup, code, said, run_dir = _run(
        tmp_path, tiny, "stop", 2, 10**6, sink=Capture(), watchdog_s=None, collective_timeout_s=6.0,
        max_restarts=0, env={"DIST_TRAIN_FAULT": "rank=1,step=5,signal=STOP"})
    assert code == EXIT_HANG and sup.attempts[0].rank == 1, said
    assert "hang: rank 1 stopped responding after step 5 (no heartbeat of any kind for" in said, said
    assert "launch.watchdog_s auto" in said and "rank 0 at step 5" in said, said
    assert time.time() - t0 < 60


def test_externally_sigstopped_rank_is_named_not_the_healthy_one(tmp_path, tiny):
    # the case: `kill -STOP` from outside (no fault injector writing the heartbeat first)
    run_dir = tmp_path / "extstop"

    def stop_rank_1():
        deadline = time.time() + 60
        while time.time() < deadline:
            hb = read_heartbeat(run_dir, 1)
            if hb and (hb.get("step") or 0) >= 3:
                os.kill(hb["pid"], signal.SIGSTOP)
                return
            time.sleep(0.05)

    stopper = threading.Thread(target=stop_rank_1, daemon=True)
    stopper.start()
    sup, code, said, _ = _run(tmp_path, tiny, "extstop", 2, 10**6, sink=Capture(), watchdog_s=None,
                              collective_timeout_s=6.0, max_restarts=0, env={"TINY_SLEEP": "0.05"})
    stopper.join()
    assert code == EXIT_HANG and sup.attempts[0].rank == 1, said
    assert "hang: rank 1 stopped responding after step" in said and "rank 0 at step" in said, said


def test_sigterm_preempts_every_rank(tmp_path, tiny):
    run_dir = tmp_path / "pre"

    def preempt():  # once every rank is training, signal the launcher (this process) like a scheduler
        deadline = time.time() + 60
        while time.time() < deadline:
            hbs = [read_heartbeat(run_dir, r) for r in range(2)]
            if all(h and h.get("step") is not None for h in hbs):
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.05)

    threading.Thread(target=preempt, daemon=True).start()
    cap = Capture()
    sup, code, said, _ = _run(tmp_path, tiny, "pre", 2, 100000, sink=cap, max_restarts=3, env={"TINY_LOCKSTEP": "0"})
    assert code == EXIT_PREEMPTED, said + cap.text()
    assert [o.kind for o in sup.attempts] == ["preempted"]  # never restarted
    saved = int((run_dir / "ckpt.txt").read_text())
    assert f"[rank 0] preempted at {saved}" in cap.text() and "[rank 1] preempted at" in cap.text()
    # relaunching resumes at the next step
    spec = JobSpec([sys.executable, str(tiny), str(run_dir), str(saved + 3), "--set", "checkpoint.restart=true"],
                   nproc=2, run_dir=run_dir, env={"TINY_LOCKSTEP": "0"})
    cap2 = Capture()
    assert Supervisor(spec, LocalBackend(2, run_dir, sink=cap2), out=io.StringIO()).run() == 0
    assert f"[rank 0] start {saved + 1} world 2" in cap2.text()


def test_mpi_backend_restarts(tmp_path, tiny, capfd):
    from launchers.mpi import find_mpiexec

    if find_mpiexec() is None:
        pytest.skip("no mpiexec on this machine (pip install mpich)")
    sup, code, said, run_dir = _run(tmp_path, tiny, "mpi", 2, 6, backend="mpi", max_restarts=1,
                                    env={"DIST_TRAIN_FAULT": "rank=1,step=2,signal=KILL"})
    out = capfd.readouterr()
    assert code == 0, said + out.err
    assert [o.kind for o in sup.attempts] == ["failed", "ok"] and sup.attempts[0].rank == 1
    assert "[rank 0] start 0 world 2" in out.out and "[rank 1] start 2 world 2" in out.out
    assert "[rank 1] done sum 11" in out.err  # rank+5 summed over 2 ranks at the last step
    assert "[fault injection]" in (run_dir / "logs" / "rank_1.stderr").read_text()


def test_a_rank_mpiexec_stopped_after_another_failed_is_not_named_as_the_cause(tmp_path):
    """gforker SIGINTs (rankio forwards it as SIGTERM) every other rank once one exits non-zero after MPI_Init: the
    supervisor, which names a rank killed by a signal as the cause, said `rank 0 killed by SIGTERM` (exit 143) of a job
    whose rank 1 had exited 3 (measured with DIST_TRAIN_FAULT=rank=1,step=3,action=exit,code=3; hydra said rank 1,
    exit 3). A SIGTERM this launcher sent is still the rank's own death."""
    from launchers.mpi import MpiAttempt

    logs = tmp_path / "logs"
    logs.mkdir()
    for rank, code in ((0, -int(signal.SIGTERM)), (1, 3)):
        (logs / f"rank_{rank}.exit").write_text(json.dumps({"rank": rank, "attempt": 0, "code": code}))
    # mpiexec still running (a process of its own session, which the supervisor kills on the failure)
    mpiexec = subprocess.Popen(["sleep", "60"], start_new_session=True)
    attempt = MpiAttempt(mpiexec, 2, tmp_path, attempt=0, started=time.time())
    assert attempt.poll() == [None, 3]
    spec = JobSpec(["rank"], nproc=2, run_dir=tmp_path)
    outcome = Supervisor(spec, _ScriptedBackend(), poll_s=0.0, out=io.StringIO())._watch(attempt, 0)
    assert (outcome.kind, outcome.rank, outcome.code) == ("failed", 1, 3), outcome
    assert mpiexec.wait(timeout=10) == -signal.SIGKILL
    (logs / "rank_1.exit").write_text(json.dumps({"rank": 1, "attempt": 0, "code": -int(signal.SIGKILL)}))
    assert attempt.poll() == [None, -int(signal.SIGKILL)]  # a rank killed by another signal is the cause
    (logs / "rank_1.exit").write_text(json.dumps({"rank": 1, "attempt": 0, "code": -int(signal.SIGTERM)}))
    assert attempt.poll() == [-int(signal.SIGTERM)] * 2  # no other cause: as recorded
    attempt.send_signal(signal.SIGTERM)  # this launcher's own (no wrapper runs here to receive it)
    (logs / "rank_1.exit").write_text(json.dumps({"rank": 1, "attempt": 0, "code": 3}))
    assert attempt.poll() == [-int(signal.SIGTERM), 3]


def test_a_rank_whose_mpi_wrapper_was_sigkilled_is_named_with_its_signal(tmp_path, capfd):
    """A SIGKILLed rank wrapper (launchers.rankio) writes no rank_N.exit and gforker exits 0: the launcher said
    `rank 0 exit code 1; also rank 1 exit code 1`, naming neither the killed rank nor the signal. gforker's own
    report on its stderr (``[0]1:Return code = 0, signaled with Killed``) names both; every line still passes."""
    from launchers.mpi import MpiBackend, backend_mpiexec

    if backend_mpiexec() is None:
        pytest.skip("no mpiexec on this machine (pip install mpich)")
    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    attempt = MpiBackend(2, tmp_path).start([sys.executable, "-c", "import time; time.sleep(60)"], env, 0)
    try:
        deadline = time.monotonic() + 60
        while len(wrappers := attempt._wrappers()) < 2 or any(not w.children() for w in wrappers):
            assert attempt.proc.poll() is None and time.monotonic() < deadline, "the 2 ranks never started"
            time.sleep(0.1)
        ranks = {int(w.environ().get("PMI_RANK", "-1")): w for w in wrappers}
        ranks[1].kill()
        spec = JobSpec(["rank"], nproc=2, run_dir=tmp_path)
        outcome = Supervisor(spec, _ScriptedBackend(), poll_s=0.05, out=io.StringIO())._watch(attempt, 0)
    finally:
        attempt.close()
    assert (outcome.kind, outcome.rank, outcome.code) == ("failed", 1, 128 + signal.SIGKILL), outcome
    assert outcome.detail.startswith("rank 1 killed by SIGKILL"), outcome.detail
    assert "Return code = 0, signaled with Killed" in capfd.readouterr().err


def test_gforkers_report_is_read_even_after_a_ranks_unterminated_line_and_passed_on():
    """A rank killed mid-line leaves no newline: gforker's report then follows on the same console line (seen:
    ``…GLHF! \ufffd[0]0:Return code = 0, signaled with Quit``)."""
    from launchers.mpi import MpiexecReports

    lines = ["[rank 0] RuntimeError: Read error. GLHF! \ufffd[0]0:Return code = 0, signaled with Quit\n",
             "[0]1:Return code = 0, signaled with Killed\n", "[0]2:Return code = 3\n", "[rank 3] [0]3:Return code\n"]
    passed = []
    reports = MpiexecReports(lambda stream, text: passed.append(text))
    for line in lines:
        reports("stderr", line)
    assert reports.codes == {0: -int(signal.SIGQUIT), 1: -int(signal.SIGKILL), 2: 3} and passed == lines


#: each rank of _MPI_LAUNCHER's job: its command line starts with f"{sys.executable} -c {_SLEEPING_RANK}"
_SLEEPING_RANK = "import time; time.sleep(120)"
_MPI_LAUNCHER = f"""
import sys, time
from pathlib import Path
from launchers.mpi import MpiBackend
MpiBackend(2, Path(sys.argv[1])).start([sys.executable, "-c", {_SLEEPING_RANK!r}, sys.argv[1]], {{}}, 0)
time.sleep(120)
"""


def _processes_naming(text):
    """(process, command line) of every live process whose command line contains ``text`` (not a zombie: dead,
    waiting for whichever process inherited it to reap it)."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        line = " ".join(p.info["cmdline"] or [])
        if text in line and p.info["status"] != psutil.STATUS_ZOMBIE:
            found.append((p, line))
    return found


def test_a_sigkilled_mpi_launcher_leaves_no_rank_running(tmp_path):
    """SIGKILL of `dist-train launch --backend mpi` (or the OOM killer) left mpiexec, every rank wrapper and every
    rank running (they kept training and held the run lock): mpiexec dies with the launcher, each wrapper with
    mpiexec and each rank with its wrapper, as the local backend's ranks do."""
    from launchers.mpi import find_mpiexec

    if find_mpiexec() is None:
        pytest.skip("no mpiexec on this machine (pip install mpich)")
    run_dir = tmp_path / "mpi-orphans"
    launcher = subprocess.Popen([sys.executable, "-c", _MPI_LAUNCHER, str(run_dir)],
                                env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    try:
        deadline = time.monotonic() + 60
        # the ranks themselves: a wrapper starts its rank after asking to die with mpiexec (launchers.rankio). Not the
        # launcher, whose command line also starts "python -c" and names run_dir: counted, it let the launcher be
        # killed with one rank up and the other's wrapper still starting, before it asked (its flake last stop)
        rank_line = f"{sys.executable} -c {_SLEEPING_RANK} "
        while len([p for p, line in _processes_naming(str(run_dir)) if line.startswith(rank_line)]) < 2:
            assert launcher.poll() is None and time.monotonic() < deadline, "the 2 ranks never started"
            time.sleep(0.1)
    finally:
        launcher.kill()
        launcher.wait()
    deadline = time.monotonic() + 20
    while (left := _processes_naming(str(run_dir))) and time.monotonic() < deadline:
        time.sleep(0.1)
    for p, _ in left:
        with contextlib.suppress(psutil.Error):
            p.kill()
    assert not left, [line[:120] for _, line in left]


class _ExitedAttempt:
    """An attempt whose ranks have all exited with ``codes`` (no processes: the supervisor's decisions only)."""

    def __init__(self, codes):
        self.codes, self.world_size = list(codes), len(codes)

    def poll(self):
        return self.codes

    def progress(self):
        return {}

    def send_signal(self, sig):
        """No process runs: nothing to signal."""

    def kill(self):
        """No process runs: nothing to kill."""

    def tail(self, rank):
        return [f"dist-train: error: rank {rank} exit {self.codes[rank]}"]

    def close(self):
        """Nothing to release."""


class _ScriptedBackend:
    """Attempt i exits with ``script[min(i, len - 1)]``."""

    name = "scripted"

    def __init__(self, *script):
        self.script, self.started = script, 0

    def start(self, argv, env, attempt):
        self.started += 1
        return _ExitedAttempt(self.script[min(attempt, len(self.script) - 1)])


def test_damaged_checkpoints_are_not_restarted_but_a_failed_rank_is(tmp_path):
    """EXIT_DAMAGED (every checkpoint the resume could use failed verification: a restart re-reads the same bytes)
    stops at once with one line saying why; a plain failure (1: e.g. an I/O error while reading) is restarted."""
    spec = JobSpec(["rank"], nproc=2, run_dir=tmp_path, max_restarts=3)
    out = io.StringIO()
    be = _ScriptedBackend([EXIT_DAMAGED, EXIT_DAMAGED])
    assert Supervisor(spec, be, poll_s=0.0, out=out).run() == EXIT_DAMAGED
    said = out.getvalue()
    assert be.started == 1, said
    assert said.count("not restarting") == 1 and NOT_RESTARTABLE[EXIT_DAMAGED] in said, said
    assert "FAILED after 1 attempt" in said and "rank 0 exit 4" in said

    be = _ScriptedBackend([1, 1], [0, 0])
    assert Supervisor(spec, be, poll_s=0.0, out=io.StringIO()).run() == 0 and be.started == 2


def test_an_attempt_clears_only_heartbeats_from_the_run_dirs_heartbeats_folder(tmp_path):
    """Each attempt clears the earlier one's heartbeats; run.dir may be a folder that was there before, whose own
    heartbeats/ lost every file to the rmtree that did it."""
    class Refused:
        name = "refused"

        def start(self, argv, env, attempt):
            raise RuntimeError("no cluster")

    folder = tmp_path / "heartbeats"
    folder.mkdir()
    (folder / "notes.txt").write_text("a person's file")
    (folder / "rank_0.json").write_text("{}")
    with pytest.raises(RuntimeError, match="no cluster"):
        Supervisor(JobSpec(argv=["x"], nproc=1, run_dir=tmp_path), Refused(), out=io.StringIO()).run()
    assert (folder / "notes.txt").read_text() == "a person's file"
    assert not (folder / "rank_0.json").exists()


def test_the_preempted_line_says_what_a_restart_starts_from(tmp_path):
    """Every rank exited 75: the launcher's last line says what the run can resume from, as the ranks' own lines do; a
    run that wrote no checkpoint (NVMe optimizer offload, a stop before the first save) is not called resumable."""
    root = tmp_path / "checkpoints"
    for resume, committed, clause in (
            ("auto", False, f"no checkpoint in {root}: a restart starts from scratch"),
            ("none", False, f"no checkpoint in {root}: a restart starts from scratch"),
            ("/imports/step_7", False, f"no checkpoint in {root}: a restart starts again from checkpoint.resume = "
                                       "/imports/step_7"),
            ("/imports/step_7", True, f"a restart resumes from {root / 'step_4'}")):
        if committed:
            (root / "step_2").mkdir(parents=True)
            write_manifest(root / "step_2", {"step": 2})
            (root / "step_4").mkdir()
            write_manifest(root / "step_4", {"step": 4})
            (root / "step_6").mkdir()  # never committed (no manifest): not what a restart resumes from
        ckpt_cfg = CheckpointConfig(resume=resume)
        assert restart_point(ckpt_cfg, root) == clause
        spec = JobSpec(["rank"], nproc=2, run_dir=tmp_path, max_restarts=3,
                       restart_point=lambda: restart_point(ckpt_cfg, root))
        out = io.StringIO()
        be = _ScriptedBackend([EXIT_PREEMPTED, EXIT_PREEMPTED])
        assert Supervisor(spec, be, poll_s=0.0, out=out).run() == EXIT_PREEMPTED and be.started == 1
        said = out.getvalue()
        assert said == f"[launcher] preempted: every rank stopped; exiting with {EXIT_PREEMPTED} ({clause})\n", said
        assert ("resumes from" in said) == committed, said


class _RunningUntilSignalled(_ExitedAttempt):
    """Ranks that run until signalled, then die of the signal (no handler installed, as an evaluation's ranks)."""

    def __init__(self, nproc):
        super().__init__([None] * nproc)

    def send_signal(self, sig):
        self.codes = [-int(sig)] * self.world_size


@pytest.mark.parametrize("checkpoints_on_stop", [True, False])
def test_a_stop_promises_a_checkpoint_only_of_ranks_that_save_one(tmp_path, checkpoints_on_stop):
    """Ctrl-C of `dist-train eval` (whose ranks save nothing) said 'asking every rank to checkpoint and stop' and 'a
    restart resumes from the newest committed checkpoint'; a training launcher still says both."""

    class Backend:
        name = "until-signalled"

        def start(self, argv, env, attempt):
            return _RunningUntilSignalled(2)

    out = io.StringIO()
    sup = Supervisor(JobSpec(["rank"], nproc=2, run_dir=tmp_path, checkpoints_on_stop=checkpoints_on_stop), Backend(),
                     poll_s=0.0, out=out)
    sup._on_signal(signal.SIGINT, None)  # as the handler records a Ctrl-C
    assert sup.run() == EXIT_PREEMPTED
    said = out.getvalue()
    assert ("checkpoint" in said) == checkpoints_on_stop, said
    assert said.startswith("[launcher] got SIGINT: asking every rank to " +
                           ("checkpoint and stop" if checkpoints_on_stop else "stop (again to kill)")), said
    if not checkpoints_on_stop:
        assert said.endswith(f"exiting with {EXIT_PREEMPTED} (the ranks save nothing: a rerun starts over)\n"), said

"""Generated Slurm scripts run for real under bash, with stand-ins for srun/scontrol/ray and the job's
python: the time-limit signal reaches the Ray launcher (which checkpoints and exits 75) and the job
requeues; MPI jobs get a MASTER_PORT checked free on the first node."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launchers.batch import BatchSpec, render

STUBS = {
    "srun": '''#!/bin/bash
# drop srun's options (and -w HOST), run the step's command here
while [[ "${1:-}" == -* ]]; do [[ "$1" == -w ]] && shift; shift; done
exec "$@"
''',
    "mpiexec": '''#!/bin/bash
# drop mpiexec's options (-n N --ppn P), run the command here
while [[ "${1:-}" == -* ]]; do shift; shift; done
exec "$@"
''',
    "scontrol": '''#!/bin/bash
case "$1" in
  show) echo localhost ;;
  requeue) echo "$2" >> "$MARK/requeued" ;;
esac
''',
    "ray": '''#!/bin/bash
case "$1" in
  status) exit 0 ;;
  start) trap 'echo "$$" >> "$MARK/ray_got_usr1"' USR1; while true; do sleep 0.1; done ;;
esac
''',
    # the job's python: the launcher and the ranks are stand-ins; `-c` snippets run for real
    "python": '''#!/bin/bash
if [[ "$1" == -m && "$2" == dist_train ]]; then
  echo "$@" > "$MARK/launcher_args"
  trap 'echo USR1 >> "$MARK/launcher_got_usr1"; exit 75' USR1
  touch "$MARK/launcher_started"
  while true; do sleep 0.1; done
fi
if [[ "$1" == -m && "$2" == launchers.rankio ]]; then
  echo "$MASTER_PORT" >> "$MARK/master_port"; pwd > "$MARK/cwd"; echo "$PYTHONPATH" > "$MARK/pythonpath"
  echo "$@" > "$MARK/rank_args"; echo "a rank's line"; exit 0
fi
exec "$REAL_PYTHON" "$@"
''',
}


def _stub_env(tmp_path):
    bin_dir, mark = tmp_path / "bin", tmp_path / "mark"
    bin_dir.mkdir()
    mark.mkdir()
    for name, text in STUBS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "MARK": str(mark), "REAL_PYTHON": sys.executable,
           "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "SLURM_SUBMIT_DIR": str(tmp_path),
           "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "localhost"}
    return bin_dir, mark, env


def _script(tmp_path, bin_dir, **kw):
    kw.setdefault("run_dir", str(tmp_path / "run"))
    spec = BatchSpec(config="c.yaml", scheduler="slurm", nodes=1, time="00:10:00", name="t",
                     python=str(bin_dir / "python"), **kw)
    path = tmp_path / "job.sh"
    path.write_text(render(spec))
    return path


def _wait_for(path, timeout=60):
    deadline = time.time() + timeout
    while not path.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert path.exists(), f"{path.name} never appeared"


def _run_ray_job_to_time_limit(script, env, mark, log):
    """Run a Ray batch script until its launcher runs, then send what Slurm sends at the time limit (B:USR1);
    the script's exit status."""
    with open(log, "w") as sink:  # not a pipe: the `ray start --block` stand-ins outlive the script
        job = subprocess.Popen(["bash", str(script)], env=env, start_new_session=True, stdout=sink,
                               stderr=subprocess.STDOUT)
    try:
        _wait_for(mark / "launcher_started")
        job.send_signal(signal.SIGUSR1)
        job.wait(timeout=60)
    finally:
        os.killpg(job.pid, signal.SIGKILL)  # the stand-in `ray start --block` steps
    return job.returncode


def test_slurm_ray_time_limit_signal_reaches_launcher_and_requeues(tmp_path):
    bin_dir, mark, env = _stub_env(tmp_path)
    script = _script(tmp_path, bin_dir, backend="ray")
    text = script.read_text()
    assert "#SBATCH --signal=B:USR1@120" in text  # the batch shell alone, never the `ray start` steps
    log = tmp_path / "job.out"
    code = _run_ray_job_to_time_limit(script, env, mark, log)
    out = log.read_text()
    assert code == 75, out
    assert (mark / "launcher_got_usr1").read_text().strip() == "USR1"
    assert (mark / "requeued").read_text().strip() == "77"
    assert not (mark / "ray_got_usr1").exists()
    assert "--address" in (mark / "launcher_args").read_text()
    token = tmp_path / "run" / ".ray_auth_token"
    assert token.stat().st_mode & 0o077 == 0 and len(token.read_text().strip()) == 64  # private, per job


def test_slurm_mpi_master_port_is_checked_free(tmp_path):
    bin_dir, mark, env = _stub_env(tmp_path)
    script = _script(tmp_path, bin_dir, backend="mpi")
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    port = int((mark / "master_port").read_text().strip())
    assert 1024 < port < 65536


@pytest.mark.parametrize("scheduler", ["slurm", "pbs"])
def test_a_submitted_script_runs_the_same_from_any_directory(scheduler, tmp_path):
    """The script cd'd to the scheduler's submit directory and named run.dir and its logs relative to it: typed
    from another directory (`sbatch /abs/runs/x/submit_slurm.sh`, as the "not found on PATH" line advises), the
    job ran in the wrong place and Slurm could not open its --output. PBS wrote -o anew at every start, so a
    requeue lost the previous start's output. A PBS job (no qsub -V) did not see the code that wrote it."""
    bin_dir, mark, env = _stub_env(tmp_path)
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    spec = BatchSpec(config="c.yaml", scheduler=scheduler, nodes=1, time="00:10:00", name="t", run_dir="runs/x",
                     python=str(bin_dir / "python"), mpiexec=str(bin_dir / "mpiexec"), workdir=str(work),
                     code_root="/the/code")
    text = render(spec)
    logs = work / "runs" / "x" / "logs"
    assert (f"#SBATCH --output={logs}/slurm-%j.out" if scheduler == "slurm" else f"#PBS -o {logs}/pbs.out") in text
    script = tmp_path / "job.sh"
    script.write_text(text)
    env = {**env, "SLURM_SUBMIT_DIR": str(elsewhere), "PBS_O_WORKDIR": str(elsewhere), "PBS_JOBID": "12.pbs"}
    done = subprocess.run(["bash", str(script)], env=env, cwd=elsewhere, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (mark / "cwd").read_text().strip() == str(work) and logs.is_dir()
    assert f"--log-dir {logs} " in (mark / "rank_args").read_text()
    assert (mark / "pythonpath").read_text().startswith("/the/code:")
    if scheduler == "pbs":
        assert "a rank's line" in (logs / "pbs-12.pbs.out").read_text() and "a rank's line" not in done.stdout
    assert not list(elsewhere.iterdir())


def test_pbs_uses_the_mpiexec_beside_the_job_python(tmp_path):
    venv_bin = tmp_path / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "mpiexec").write_text("#!/bin/sh\n")
    spec = BatchSpec(config="c.yaml", scheduler="pbs", nodes=2, time="00:10:00", run_dir="/r", name="t",
                     python=str(venv_bin / "python"))
    text = render(spec)
    assert f"{venv_bin / 'mpiexec'} -n 2 --ppn 1" in text
    assert "\nmpiexec " not in text
    assert f"{venv_bin / 'mpiexec'} -n 1 --hosts" in render(BatchSpec(**{**spec.__dict__, "backend": "ray"}))


def test_a_run_dir_the_shell_would_expand_stays_literal(tmp_path):
    """The Ray token's default path is run.dir as written: ``$( )`` in it runs nothing (it ran when the quoted
    path sat inside ``"${RAY_AUTH_TOKEN_PATH:-…}"``, where single quotes are literal)."""
    bin_dir, mark, env = _stub_env(tmp_path)
    run_dir = tmp_path / "r$(touch${IFS}$MARK/injected)"
    script = _script(tmp_path, bin_dir, backend="ray", run_dir=str(run_dir))
    log = tmp_path / "job.out"
    assert _run_ray_job_to_time_limit(script, env, mark, log) == 75, log.read_text()
    assert not (mark / "injected").exists(), "a command in run.dir ran in the batch script"
    token = run_dir / ".ray_auth_token"
    assert token.stat().st_mode & 0o077 == 0 and len(token.read_text().strip()) == 64


@pytest.mark.parametrize("field, value", [
    ("name", "t\ntouch /tmp/pwned"),  # a shell line of the job
    ("name", "t --export=ALL,LD_PRELOAD=/tmp/x.so"),  # another sbatch option
    ("run_dir", "/r\rx"),
    ("run_dir", "/r s"),
    ("directives", ["--account=a\nrm -rf ~"]),
    ("modules", ["cuda/12.4\ncurl x | sh"]),
    ("workdir", "/home/a b"),  # the log path in #SBATCH --output / #PBS -o starts with it
])
@pytest.mark.parametrize("scheduler", ["slurm", "pbs"])
def test_values_that_would_end_a_directive_line_are_refused(field, value, scheduler):
    spec = BatchSpec(config="c.yaml", scheduler=scheduler, nodes=1, time="00:10:00", **{"run_dir": "/r", "name": "t",
                                                                                        field: value})
    with pytest.raises(ValueError) as e:
        render(spec)
    shown = repr(value[0] if isinstance(value, list) else value)
    assert shown in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_directives_with_spaces_are_kept():
    spec = BatchSpec(config="c.yaml", scheduler="pbs", nodes=1, time="00:10:00", run_dir="/r", name="t",
                     directives=["-l filesystems=home:eagle"], modules=["cuda/12.4"])
    text = render(spec)
    assert "#PBS -l filesystems=home:eagle\n" in text and "module load cuda/12.4\n" in text

"""dist_train.spawn: ranks started by a test or a benchmark never outlive their parent."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
PARENT = """
import time
from dist_train.spawn import run_ranks
from tests.test_spawn import sleep_forever
run_ranks(sleep_forever, 2, timeout=600)
"""


def sleep_forever(rank, world_size):
    time.sleep(600)


def test_killed_parent_takes_its_ranks_with_it():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.time() + 120
        ranks = []
        while time.time() < deadline and len(ranks) < 2:
            # the ranks are forked by the fork server, a child of the parent
            servers = [c for c in psutil.Process(parent.pid).children() if "forkserver" in " ".join(c.cmdline())]
            ranks = [r for s in servers for r in s.children()]
            time.sleep(0.2)
        assert len(ranks) >= 2, "the ranks never started"
        ranks += servers
        time.sleep(1.0)  # past their start-up, into the rank function
        os.kill(parent.pid, signal.SIGKILL)  # no cleanup code of the parent runs
        parent.wait(timeout=30)
        gone, alive = psutil.wait_procs(ranks, timeout=30)
        assert not alive, [p.pid for p in alive]
    finally:
        if parent.poll() is None:
            parent.kill()

"""Shared pytest setup: single-threaded torch in the test process, float64 helpers, and what the ranks'
fork server imports once for every rank (dist_train.spawn.preload_in_fork_server)."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

from dist_train.distributed import restore_environ
from dist_train.spawn import preload_in_fork_server

torch.set_num_threads(1)

# A forked rank imports its test module to find its function, and with it whatever the server lacks: pytest (every
# test module), the shared helpers, dist_train.plot's matplotlib (two modules) cost 0.1-0.8 s of CPU per rank start,
# on every run_ranks call; imported once by the server, 44 rank test modules import in 0.9 s of CPU instead of 4.1.
preload_in_fork_server("pytest", "tests.dist_harness", "tests.trainer_utils", "dist_train.plot")
# megatron-core and DeepSpeed too (on a CPU build of torch): ~1.3 s of CPU on every rank of every tp, ZeRO or
# DeepSpeed case's run_ranks call otherwise (see tests/fork_server_engines.py)
preload_in_fork_server("tests.fork_server_engines")


@pytest.fixture
def tmp_run_dir(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    return d


@pytest.fixture(autouse=True)
def _environment_left_as_found():
    """Each test leaves ``os.environ`` and ``torch.nn.functional.linear`` as it found them (what a module-scoped
    fixture set before it stays). A DeepSpeed engine built in-process outside ``train()`` (which gives them back:
    distributed.caller_process_state) sets RANK=0, WORLD_SIZE=1 and LOCAL_RANK=0 for good (engines/deepspeed.py
    ``_ensure_process_group``): every later test that starts a job with the pytest process's environment then ran
    torchrun's one-rank world.
    test_submitted_eval_job_writes_the_result failed so after test_spikes.py's DeepSpeed case (2 ranks each alone:
    world_size 1 in the result)."""
    before = dict(os.environ)
    linear = torch.nn.functional.linear
    yield
    restore_environ(before)
    # A ZeRO-3 engine built in-process outside train() swaps in DeepSpeed's zero3_linear_wrap for good (train() and
    # evaluate_checkpoint() set it back: distributed.caller_process_state): test_gpt_autocast_input.py, run after
    # such a test in the same xdist worker, saw DeepSpeed's casts instead of autocast's.
    torch.nn.functional.linear = linear

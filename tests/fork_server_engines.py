"""Imported once by the test suite's fork server (tests/conftest.py, ``preload_in_fork_server``): megatron-core and
DeepSpeed as the trainer imports them (``import_megatron_core``; ``quiet_deepspeed`` naming the CPU accelerator, then
DeepSpeed and its Muon module eager, ``import_deepspeed_muon_eager``), so that a forked rank of a tp or ZeRO case
starts with them instead of importing them itself.

Every rank of such a case paid for them on every ``run_ranks`` call (dozens in the suite, 2-4 ranks at once on the
2 cores): about 1.1 s of CPU for megatron-core and 0.2 s for DeepSpeed (2026-11-30). The server pays once per
pytest process, at its first ``run_ranks``. tests/test_swin_tp.py with tests/test_tp_sequence_parallel.py took 49 and
51 s of CPU instead of 78 and 83 (alternating runs, load 2-6), test_parallel_training.py 46.7 instead of 52.3.
(Dynamo and Inductor the server has already: dist_train.spawn.PRELOAD's torch.distributed.pipelining imports them.)

Only with a CPU build of torch: on a CUDA build the server must not touch CUDA before it forks (DeepSpeed's
accelerator probe would), and the ranks import the engines themselves, as before. A library that is not installed
is left out (the GPU machine has neither).
"""
from __future__ import annotations

import contextlib
import warnings

import torch

from dist_train.engines.deepspeed import import_deepspeed_muon_eager, quiet_deepspeed
from dist_train.megatron_import import import_megatron_core


def _cpu_build() -> bool:
    """True for a torch built without CUDA or ROCm: nothing here can initialise a device before the fork."""
    return torch.version.cuda is None and torch.version.hip is None


if _cpu_build():
    with contextlib.suppress(ImportError):
        import_megatron_core()
        import megatron.core.parallel_state  # noqa: F401
        import megatron.core.tensor_parallel  # noqa: F401
    # the filters quiet_deepspeed adds are the trainer's to add when a rank runs DeepSpeed: kept out of every rank.
    # Importing the Muon module imports DeepSpeed with it (and nothing, without DeepSpeed).
    with warnings.catch_warnings():
        quiet_deepspeed(on_cpu=True)
        import_deepspeed_muon_eager()

"""Process-group setup from the standard per-rank environment (RANK, WORLD_SIZE, MASTER_ADDR, ...).

Every launcher (torchrun, ``dist-train launch``, mpiexec, Ray) ends in that environment; with none of
it the job is a single process.
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from types import ModuleType
from typing import Iterator, Mapping, Optional

import torch
import torch.distributed as dist

from .loopback import loopback_environment
from .rendezvous import create_store, resolves_to_loopback, spans_nodes


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_rank_info() -> tuple[int, int, int]:
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def share_cpu_threads(local_ranks: int) -> None:
    """This rank's intra-op threads: ``OMP_NUM_THREADS`` if set, else the host's cores split between the
    ``local_ranks`` ranks on it (each rank defaulting to every core would oversubscribe them)."""
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, local_ranks))))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pick_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def collective_device(group) -> torch.device:
    """Where a collective over ``group`` takes its tensors: NCCL only CUDA tensors (this rank's device; a CPU tensor is
    refused with "No backend type associated with device type cpu"), gloo CPU ones."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(timeout_s: float = 300.0, bind: Optional[str] = None) -> DistContext:
    """Initialise the default group from the environment (no-op when already initialised or single).

    Rank 0's rendezvous store listens on loopback when MASTER_ADDR is loopback, else on MASTER_ADDR's
    interface or ``bind`` (launch.bind) — never on every interface by default (dist_train/rendezvous.py).
    """
    rank, world, local_rank = env_rank_info()
    device = pick_device(local_rank)
    if dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device)
    if world > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = timedelta(seconds=timeout_s)
        master = os.environ.get("MASTER_ADDR", "127.0.0.1")
        multi_node = spans_nodes(master, world, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
        # One machine (torchrun there, a bare run): gloo and NCCL on loopback too. Not on a multi-node job's master
        # node whose name is loopback only there: the other nodes could not reach them.
        if not multi_node and resolves_to_loopback(master):
            os.environ.update(loopback_environment())
        store = create_store(rank, world, master, int(os.environ.get("MASTER_PORT", "29500")), timeout, bind,
                             multi_node)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout,
                                device_id=device if device.type == "cuda" else None)
    return DistContext(rank, world, local_rank, device)


def current_context() -> DistContext:
    """The context of an already-initialised job (tests spawn ranks and initialise themselves)."""
    if dist.is_initialized():
        _, _, local_rank = env_rank_info()
        return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, pick_device(local_rank))
    return DistContext(0, 1, 0, pick_device(0))


def restore_environ(saved: Mapping[str, str]) -> None:
    """Make ``os.environ`` ``saved`` again, key by key (a thread still running never sees an empty environment, as
    ``os.environ.clear()`` would show it): keys added since are removed, changed or removed ones set back."""
    now = dict(os.environ)
    for key in now.keys() - saved.keys():
        del os.environ[key]
    for key, value in saved.items():
        if now.get(key) != value:
            os.environ[key] = value


@contextlib.contextmanager
def caller_process_state() -> Iterator[None]:
    """Leave the calling process as it was, on return or error: its ``os.environ`` (restore_environ) and its process
    group state. A job run in-process (a notebook or a test calling ``train()``) otherwise kept what its engine set
    up for itself: DeepSpeed's one-rank gloo group and the RANK / WORLD_SIZE / LOCAL_RANK it reads
    (engines/deepspeed.py ``_ensure_process_group``), DS_ACCELERATOR, and what DeepSpeed's import sets; a later
    job of the caller then ran in that stale one-rank world (a torchrun it started saw RANK=0, WORLD_SIZE=1). A
    default group that existed before (a launched rank's, a caller's own) is the caller's and is left alone; one
    created inside is destroyed. DeepSpeed's module-level ``deepspeed.utils.groups.mpu`` (set by every
    ``deepspeed.initialize``: our engine's MeshMPU, which holds the mesh's groups) is set back too: it kept those
    groups, and each gloo group's listening socket and threads, alive for the life of the caller's process. So is
    ``torch.nn.functional.linear``: building a ZeRO-3 engine swaps it for DeepSpeed's ``zero3_linear_wrap`` "for
    good" (0.19.8 partition_parameters.py ``_enable_mem_efficient_linear``), and every later model of the caller ran
    DeepSpeed's linear, with its own casts under autocast (a bf16 test in the same pytest worker failed so)."""
    environ = dict(os.environ)
    had_group = dist.is_initialized()
    deepspeed_mpu = _deepspeed_mpu()
    linear = torch.nn.functional.linear
    try:
        yield
    finally:
        if not had_group and dist.is_initialized():
            dist.destroy_process_group()
        _set_deepspeed_mpu(deepspeed_mpu)
        torch.nn.functional.linear = linear
        restore_environ(environ)


def _deepspeed_groups() -> Optional[ModuleType]:
    """DeepSpeed's group registry when DeepSpeed is loaded (looked up, never imported: most jobs never load it)."""
    return sys.modules.get("deepspeed.utils.groups")


def _deepspeed_mpu() -> object:
    groups = _deepspeed_groups()
    return None if groups is None else groups.mpu


def _set_deepspeed_mpu(mpu: object) -> None:
    groups = _deepspeed_groups()
    if groups is not None:
        groups.mpu = mpu

"""Collectives used by checkpointing, on a dedicated gloo group.

Why a separate group: an async save runs its collectives (DCP planning, the commit gather) in a
background thread while training keeps issuing collectives on the default group. Two threads issuing
collectives on one communicator can interleave differently on different ranks and deadlock; a second
communicator makes the background traffic independent. Gloo, because the objects exchanged are small
CPU tensors and pickled dicts, whatever the training backend is (NCCL included).
"""
from __future__ import annotations

from typing import Any, Optional

import torch.distributed as dist


class CheckpointComm:
    """``world == 1`` (or no process group): every call is local. Otherwise all ranks of the default group
    must construct it together (``new_group`` is collective) and call its methods in the same order."""

    def __init__(self, rank: int, world_size: int) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank = {rank}, world_size = {world_size}: need world_size >= 1 and "
                             f"0 <= rank < world_size")
        self.rank, self.world_size = rank, world_size
        self.group: Optional[dist.ProcessGroup] = None
        if world_size > 1:
            if not (dist.is_available() and dist.is_initialized()):
                raise ValueError(f"world_size = {world_size} but torch.distributed is not initialised; "
                                 "call init_process_group first (world_size 1 needs none)")
            if dist.get_world_size() != world_size or dist.get_rank() != rank:
                raise ValueError(f"rank/world_size = {rank}/{world_size} but the default process group has "
                                 f"{dist.get_rank()}/{dist.get_world_size()}")
            self.group = dist.new_group(backend="gloo")

    @property
    def distributed(self) -> bool:
        return self.group is not None

    def all_gather(self, obj: Any) -> list:
        if self.group is None:
            return [obj]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if self.group is None:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]

    def agree(self, error: Optional[str]) -> list[str]:
        """Every rank's local error (None = fine) -> the list of ``"rank r: error"`` on all ranks."""
        return [f"rank {r}: {e}" for r, e in enumerate(self.all_gather(error)) if e]

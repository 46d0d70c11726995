"""One DeviceMesh for the whole job, and the process groups every component receives explicitly.

Axis order, outermost → innermost: ``pp, dp, wp, cp, tp``. Consecutive ranks differ first in tp, then
cp, then wp: tensor parallelism (an all-reduce per layer) and the all-to-all / ring parts of context
parallelism get the fastest links (same node, NVLink), pipeline parallelism (point-to-point, the least
volume per step) the slowest. This is TorchTitan's order with wp placed next to cp, because both shard
the same activations and Ulysses-inside-windows all-to-alls over cp.

    mesh = build_mesh(cfg.parallel, world_size, device_type="cpu")
    mesh.cp_group, mesh.grad_group      # torch ProcessGroups (None when the axis has size 1)
    mesh.coords(rank)                  # {"pp": 0, "dp": 1, "wp": 0, "cp": 1, "tp": 0}
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Optional

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from .config import ParallelConfig
from .cost.layout import AXES, axis_sizes, rank_coords  # the arithmetic, torch-free for the planner and bench


@dataclass
class Mesh:
    """The job's DeviceMesh plus the groups derived from it.

    ``*_group`` is None when that axis has size 1 (no communication needed); components treat None
    as "not parallel along this axis". ``grad_group`` spans every axis over which weights are
    replicated and gradients summed (dp × wp × cp); ``loss_group`` spans the ranks that hold
    different tokens of the global batch (the same axes).
    """
    device_mesh: Optional[DeviceMesh]
    sizes: dict[str, int]
    rank: int
    groups: dict[str, Optional[dist.ProcessGroup]] = field(default_factory=dict)
    grad_mesh: Optional[DeviceMesh] = None  # 1-D mesh over the grad group's ranks (FSDP2 shards over it)

    def size(self, axis: str) -> int:
        return self.sizes[axis]

    def coords(self, rank: Optional[int] = None) -> dict[str, int]:
        return rank_coords(self.rank if rank is None else rank, self.sizes)

    def coord(self, axis: str) -> int:
        return self.coords()[axis]

    def group(self, name: str) -> Optional[dist.ProcessGroup]:
        return self.groups.get(name)

    @property
    def dp_group(self): return self.groups.get("dp")
    @property
    def cp_group(self): return self.groups.get("cp")
    @property
    def tp_group(self): return self.groups.get("tp")
    @property
    def pp_group(self): return self.groups.get("pp")
    @property
    def wp_group(self): return self.groups.get("wp")
    @property
    def grad_group(self): return self.groups.get("grad")

    @property
    def grad_size(self) -> int:
        return self.sizes["dp"] * self.sizes["wp"] * self.sizes["cp"]

    @property
    def world_size(self) -> int:
        n = 1
        for a in AXES:
            n *= self.sizes[a]
        return n

    def ranks_along(self, axis_names: tuple[str, ...], rank: Optional[int] = None) -> list[int]:
        """Global ranks that share every coordinate with ``rank`` except those in ``axis_names``."""
        base = self.coords(rank)
        out = []
        for combo in itertools.product(*[range(self.sizes[a]) for a in axis_names]):
            c = dict(base)
            c.update(zip(axis_names, combo))
            r = 0
            for a in AXES:
                r = r * self.sizes[a] + c[a]
            out.append(r)
        return sorted(out)

    def describe(self) -> str:
        return " × ".join(f"{a}{self.sizes[a]}" for a in AXES if self.sizes[a] > 1) or "single rank"


def build_mesh(parallel: ParallelConfig, world_size: int, device_type: str = "cpu") -> Mesh:
    """Create the job's DeviceMesh (needs an initialised default group when world_size > 1)."""
    sizes = axis_sizes(parallel)
    if world_size == 1 or not dist.is_initialized():
        return Mesh(device_mesh=None, sizes=sizes, rank=0, groups={})
    dm = init_device_mesh(device_type, tuple(sizes[a] for a in AXES), mesh_dim_names=AXES)
    groups: dict[str, Optional[dist.ProcessGroup]] = {}
    for a in AXES:
        groups[a] = dm.get_group(a) if sizes[a] > 1 else None
    grad_axes = tuple(a for a in ("dp", "wp", "cp") if sizes[a] > 1)
    grad_mesh = None
    if len(grad_axes) == 1:
        grad_mesh = dm[grad_axes[0]]
    elif grad_axes:
        grad_mesh = dm[grad_axes]._flatten("_".join(grad_axes))
    groups["grad"] = grad_mesh.get_group() if grad_mesh is not None else None
    return Mesh(device_mesh=dm, sizes=sizes, rank=dist.get_rank(), groups=groups, grad_mesh=grad_mesh)

"""One DeviceMesh for the whole job, and the process groups every component receives explicitly.

Axis order, outermost → innermost: ``pp, dp, wp, cp, tp``. Consecutive ranks differ first in tp, then
cp, then wp: tensor parallelism (an all-reduce per layer) and the all-to-all / ring parts of context
parallelism get the fastest links (same node, NVLink), pipeline parallelism (point-to-point, the least
volume per step) the slowest. This is TorchTitan's order with wp placed next to cp, because both shard
the same activations and Ulysses-inside-windows all-to-alls over cp.

    mesh = build_mesh(cfg.parallel, world_size, device_type="cpu")
    mesh.cp_group, mesh.grad_group      # torch ProcessGroups (None when the axis has size 1)
    mesh.host_world_group, mesh.host_grad_group   # the same ranks, for host values (CPU tensors, gloo)
    mesh.coords(rank)                  # {"pp": 0, "dp": 1, "wp": 0, "cp": 1, "tp": 0}

Host groups: some values the ranks agree on are host values (the stop agreement's flag, a step's token count). NCCL
takes CUDA tensors only, so over a device group such a value is copied to the GPU, reduced, and read back; the read
waits for every kernel queued before it (a whole step's). Over a gloo group the CPU tensor is reduced where it is
and its read waits for no device. So on a job whose groups are NCCL the mesh also builds gloo groups over the same
ranks, flattened from the same DeviceMesh with a backend override (one per distinct rank set: every rank, and the
grad group's ranks unless they are every rank); a gloo (CPU) job's device groups already take CPU tensors and are
used as they are.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Optional

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from .config import ParallelConfig
from .cost.layout import AXES, axis_sizes, rank_coords  # the arithmetic, torch-free for the planner and bench
from .distributed import collective_device

#: The backend of the host groups (CPU tensors)
HOST_BACKEND = "gloo"
#: Names of the flattened host meshes: every rank, and the grad group's ranks (``<axes>_host``)
HOST_WORLD_NAME = "host"
HOST_SUFFIX = "_host"


@dataclass
class Mesh:
    """The job's DeviceMesh plus the groups derived from it.

    ``*_group`` is None when that axis has size 1 (no communication needed); components treat None
    as "not parallel along this axis". ``grad_group`` spans every axis over which weights are
    replicated and gradients summed (dp × wp × cp); ``loss_group`` spans the ranks that hold
    different tokens of the global batch (the same axes).

    ``host_groups`` ("world": every rank, "grad": the grad group's ranks; None where that is one rank) reduce CPU
    tensors without the device: distinct gloo groups on a job whose device groups are NCCL, the device groups
    themselves (``dist.group.WORLD``, ``grad_group``) on a gloo job. ``host_note``: why a job whose device groups
    take no CPU tensor has none of its own (then they are the device groups; None otherwise), for the rank log.
    """
    device_mesh: Optional[DeviceMesh]
    sizes: dict[str, int]
    rank: int
    groups: dict[str, Optional[dist.ProcessGroup]] = field(default_factory=dict)
    grad_mesh: Optional[DeviceMesh] = None  # 1-D mesh over the grad group's ranks (FSDP2 shards over it)
    host_groups: dict[str, Optional[dist.ProcessGroup]] = field(default_factory=dict)
    host_note: Optional[str] = None

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
    def host_world_group(self): return self.host_groups.get("world")
    @property
    def host_grad_group(self): return self.host_groups.get("grad")

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


def build_mesh(parallel: ParallelConfig, world_size: int, device_type: str = "cpu",
               host_timeout_s: Optional[float] = None, separate_host_groups: bool = False) -> Mesh:
    """Create the job's DeviceMesh (needs an initialised default group when world_size > 1).

    ``host_timeout_s``: the collective timeout of host groups of their own: the trainer passes the default group's
    (``launch.collective_timeout_s``), which the stop agreement had there; None: torch's default for gloo.
    ``separate_host_groups``: build them even where the device groups take CPU tensors (a gloo job), so that a test
    on CPU can tell which group a collective used."""
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
    host_groups, note = _host_groups(dm, groups["grad"], grad_axes, host_timeout_s, separate_host_groups)
    return Mesh(device_mesh=dm, sizes=sizes, rank=dist.get_rank(), groups=groups, grad_mesh=grad_mesh,
                host_groups=host_groups, host_note=note)


def _host_groups(dm: DeviceMesh, grad_group: Optional[dist.ProcessGroup], grad_axes: tuple[str, ...],
                 timeout_s: Optional[float], separate: bool) -> tuple[dict[str, Optional[dist.ProcessGroup]],
                                                                      Optional[str]]:
    """The mesh's ``host_groups`` and ``host_note`` (see :class:`Mesh`). Collective over every rank (each builds the
    same groups in the same order)."""
    device = {"world": dist.group.WORLD, "grad": grad_group}
    if not separate and all(g is None or collective_device(g).type == "cpu" for g in device.values()):
        return device, None
    if not dist.is_gloo_available():  # the same on every rank (one installation): none builds a group
        return device, (f"host values (the stop agreement, the token count) are reduced over the "
                        f"{dist.get_backend()} groups: this torch has no {HOST_BACKEND} backend")
    options = dist.ProcessGroupGloo._Options()
    if timeout_s is not None:
        options._timeout = timedelta(seconds=timeout_s)
    override = (HOST_BACKEND, options)
    world = dm._flatten(HOST_WORLD_NAME, backend_override=override).get_group()
    if not grad_axes:
        grad = None
    elif dist.get_world_size(grad_group) == dist.get_world_size():
        grad = world  # the same ranks: one gloo group (each is a TCP connection per pair of ranks)
    else:
        grad = dm[grad_axes]._flatten("_".join(grad_axes) + HOST_SUFFIX, backend_override=override).get_group()
    return {"world": world, "grad": grad}, None

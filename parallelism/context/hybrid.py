"""2-D context parallelism: Ulysses (inner, consecutive ranks) × ring (outer).

A group of P = U·R ranks (in group-rank order g_0..g_{P−1}) is split into R Ulysses sub-groups of
U consecutive ranks {g_{iU}, …, g_{iU+U−1}} and U ring sub-groups {g_j, g_{j+U}, …}. Sub-groups are
created on first use with ``new_group(use_local_synchronization=True)`` — only the members take part
— and cached keyed by the parent's global ranks and U. Sub-group rank i is member i of the list
(:func:`ordered_new_group`: ``sort_ranks=False`` where torch has it; 2.13 does, 2.11 does not).

Every rank of the group must call with the same (group, ulysses_degree) in the same order: all
ranks first create their Ulysses sub-group, then their ring sub-group, so the creation order is
globally consistent (required to avoid deadlocks between overlapping groups).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch.distributed as dist

_CACHE: dict[tuple[tuple[int, ...], int], "SubGroups"] = {}


@dataclass(frozen=True)
class SubGroups:
    """This rank's Ulysses and ring sub-groups (None = a one-rank group: nothing to communicate)."""

    ulysses: Optional[dist.ProcessGroup]
    ulysses_rank: int
    ring: Optional[dist.ProcessGroup]
    ring_rank: int
    ring_size: int
    ulysses_members: tuple[int, ...]   # group ranks (not global) of this rank's Ulysses sub-group


def group_ranks(group: Optional[dist.ProcessGroup]) -> tuple[int, ...]:
    """Global ranks of ``group`` in group-rank order (None = the default group)."""
    if group is None:
        return tuple(range(dist.get_world_size()))
    return tuple(dist.get_process_group_ranks(group))


def ordered_new_group(ranks: Sequence[int], new_group: Optional[Callable] = None) -> Optional[dist.ProcessGroup]:
    """``new_group(ranks, use_local_synchronization=True)`` whose group rank i is ``ranks[i]``.

    Where ``new_group`` takes ``sort_ranks`` (torch 2.13) the caller's order is kept with
    ``sort_ranks=False``. torch 2.11's ``new_group`` has no such argument and always sorts: the same
    group when ``ranks`` ascend (always the case there, since the parent group was itself created
    sorted); any other order would be silently permuted, so it is refused. ``new_group``: the factory
    (default ``torch.distributed.new_group``; tests pass stand-ins with either signature).
    """
    new_group = dist.new_group if new_group is None else new_group
    ranks = list(ranks)
    if "sort_ranks" in inspect.signature(new_group).parameters:
        return new_group(ranks, use_local_synchronization=True, sort_ranks=False)
    if ranks != sorted(ranks):
        raise ValueError(f"sub-group ranks {ranks} are not ascending and this torch's new_group always sorts "
                         "them (its new_group has no sort_ranks argument): the sub-group's rank order would not "
                         "match the parent group's")
    return new_group(ranks, use_local_synchronization=True)


def subgroups(group: Optional[dist.ProcessGroup], degree: int) -> SubGroups:
    """The (cached) Ulysses/ring sub-groups of this rank for ``degree`` = U dividing the group size."""
    ranks = group_ranks(group)
    P = len(ranks)
    if degree < 1 or P % degree:
        raise ValueError(f"ulysses_degree={degree} must divide the group size {P}; valid degrees: "
                         f"{[u for u in range(1, P + 1) if P % u == 0]}")
    key = (ranks, degree)
    if key not in _CACHE:
        me = dist.get_rank(group)
        u_idx, r_idx = divmod(me, degree)
        u_members = tuple(range(u_idx * degree, (u_idx + 1) * degree))
        r_members = tuple(range(r_idx, P, degree))
        ulysses = ring = None
        if degree == P:
            ulysses = group
        elif degree > 1:
            ulysses = ordered_new_group([ranks[m] for m in u_members])
        if degree == 1:
            ring = group
        elif degree < P:
            ring = ordered_new_group([ranks[m] for m in r_members])
        _CACHE[key] = SubGroups(ulysses, r_idx, ring, u_idx, P // degree, u_members)
    return _CACHE[key]


def clear_cache() -> None:
    """Forget cached sub-groups (call after destroying the process groups they belong to)."""
    _CACHE.clear()

"""The one DeviceMesh: axis order, coordinates, and the groups built from it."""
from unittest import mock

import torch
import torch.distributed as dist

from dist_train.config import ParallelConfig
from dist_train.mesh import AXES, build_mesh, rank_coords
from tests.dist_harness import run_ranks


def test_coords_are_row_major_with_tp_innermost():
    sizes = {"pp": 2, "dp": 2, "wp": 1, "cp": 2, "tp": 2}
    assert AXES == ("pp", "dp", "wp", "cp", "tp")
    assert rank_coords(1, sizes) == {"pp": 0, "dp": 0, "wp": 0, "cp": 0, "tp": 1}
    assert rank_coords(2, sizes) == {"pp": 0, "dp": 0, "wp": 0, "cp": 1, "tp": 0}
    assert rank_coords(15, sizes) == {"pp": 1, "dp": 1, "wp": 0, "cp": 1, "tp": 1}


def _mesh_case(rank, world):
    out = {}
    for name, par in (("dp2cp2", ParallelConfig(dp=2, cp=2)), ("cp2tp2", ParallelConfig(cp=2, tp=2)),
                      ("dp4", ParallelConfig(dp=4))):
        mesh = build_mesh(par, world, "cpu")
        groups = {}
        for g in ("dp", "cp", "tp", "grad"):
            pg = mesh.group(g)
            groups[g] = None if pg is None else sorted(dist.get_process_group_ranks(pg))
            if pg is not None:  # the group really communicates among exactly those ranks
                t = torch.tensor([float(rank)])
                dist.all_reduce(t, group=pg)
                assert t.item() == sum(groups[g]), (name, g, groups[g], t.item())
        out[name] = groups
        # a gloo job's host groups are its device groups: no group of their own
        assert mesh.host_world_group is dist.group.WORLD and mesh.host_grad_group is mesh.grad_group, name
        assert mesh.host_note is None
        out[name + " host"] = _host_groups(rank, par, world)
    return out


def _host_groups(rank: int, par: ParallelConfig, world: int) -> dict:
    """The ranks of a mesh's host groups built as on an NCCL job (``separate_host_groups``), checked on this rank: gloo
    groups of their own (no device group's), of the given timeout, that really reduce over those ranks."""
    mesh = build_mesh(par, world, "cpu", host_timeout_s=42.0, separate_host_groups=True)
    device_groups = [dist.group.WORLD, *(g for g in mesh.groups.values() if g is not None)]
    out = {}
    for name in ("world", "grad"):
        pg = mesh.host_groups[name]
        out[name] = None if pg is None else sorted(dist.get_process_group_ranks(pg))
        if pg is not None:
            assert not any(pg is g for g in device_groups), name
            backend = pg._get_backend(torch.device("cpu"))
            assert dist.get_backend(pg) == "gloo" and backend.options._timeout.total_seconds() == 42.0, name
            t = torch.tensor([float(rank)], dtype=torch.float64)
            dist.all_reduce(t, group=pg)
            assert t.item() == sum(out[name]), (name, out[name], t.item())
    # one gloo group per distinct rank set: a grad group over every rank is the world's
    assert (mesh.host_grad_group is mesh.host_world_group) == (out["grad"] == out["world"]), out
    assert mesh.host_world_group is mesh.host_groups["world"] and mesh.host_grad_group is mesh.host_groups["grad"]
    # a torch without gloo: the host values stay on the device groups, and the rank log says why
    with mock.patch.object(dist, "is_gloo_available", lambda: False):
        fallback = build_mesh(par, world, "cpu", separate_host_groups=True)
    assert fallback.host_world_group is dist.group.WORLD and fallback.host_grad_group is fallback.grad_group
    assert "this torch has no gloo backend" in fallback.host_note and "\n" not in fallback.host_note
    return out


def test_groups_on_four_ranks():
    res = run_ranks(_mesh_case, 4, timeout=120)
    assert res[0]["dp2cp2"] == {"dp": [0, 2], "cp": [0, 1], "tp": None, "grad": [0, 1, 2, 3]}
    assert res[3]["dp2cp2"] == {"dp": [1, 3], "cp": [2, 3], "tp": None, "grad": [0, 1, 2, 3]}
    assert res[1]["cp2tp2"] == {"dp": None, "cp": [1, 3], "tp": [0, 1], "grad": [1, 3]}
    assert res[2]["dp4"] == {"dp": [0, 1, 2, 3], "cp": None, "tp": None, "grad": [0, 1, 2, 3]}
    everyone = [0, 1, 2, 3]
    assert res[3]["dp2cp2 host"] == {"world": everyone, "grad": everyone}
    assert res[1]["cp2tp2 host"] == {"world": everyone, "grad": [1, 3]}
    assert res[2]["cp2tp2 host"] == {"world": everyone, "grad": [0, 2]}
    assert res[0]["dp4 host"] == {"world": everyone, "grad": everyone}


def _tp_only_host_groups(rank, world):
    return _host_groups(rank, ParallelConfig(tp=2), world)


def test_a_tensor_parallel_pair_has_a_host_world_group_and_no_host_grad_group():
    """Weights replicated nowhere: no grad group, so no host grad group either (the token count is not reduced)."""
    assert run_ranks(_tp_only_host_groups, 2, timeout=120) == [{"world": [0, 1], "grad": None}] * 2

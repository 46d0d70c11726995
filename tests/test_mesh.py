"""The one DeviceMesh: axis order, coordinates, and the groups built from it."""
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
    return out


def test_groups_on_four_ranks():
    res = run_ranks(_mesh_case, 4, timeout=120)
    assert res[0]["dp2cp2"] == {"dp": [0, 2], "cp": [0, 1], "tp": None, "grad": [0, 1, 2, 3]}
    assert res[3]["dp2cp2"] == {"dp": [1, 3], "cp": [2, 3], "tp": None, "grad": [0, 1, 2, 3]}
    assert res[1]["cp2tp2"] == {"dp": None, "cp": [1, 3], "tp": [0, 1], "grad": [1, 3]}
    assert res[2]["dp4"] == {"dp": [0, 1, 2, 3], "cp": None, "tp": None, "grad": [0, 1, 2, 3]}

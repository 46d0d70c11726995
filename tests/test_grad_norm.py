"""The full-model gradient norm and clipping (dist_train/engines/grads.py) against the single-device
float64 norm, on 6 and 3 gloo ranks laid out like the mesh (tp innermost): tp 3 × pp 2 (1) with plain gradients,
and tp 3 × dp 2 (1) with FSDP2-style DTensor gradients sharded unevenly over dp. Every rank asserts the same norm.

What the formula must get right: tp-sharded gradients add over tp, tp-replicated ones (norms) count ONCE,
pipeline stages add, DTensor shards add over their mesh before either; ranks along dp hold identical
gradients and do not add. Clipping by that norm brings the global norm to max_norm on every rank.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from dist_train.engines import grads
from dist_train.engines.grads import clip_grads_, global_grad_norm
from tests.dist_harness import run_ranks

TP = 3


def _full_grads(stage: int) -> dict[str, torch.Tensor]:
    """The tp=1 gradients of one pipeline stage: two tp-sharded matrices (rows, cols) and a replicated vector."""
    g = torch.Generator().manual_seed(10 + stage)
    return {"col": torch.randn(6, 5, generator=g, dtype=torch.float64),     # split by rows over tp
            "row": torch.randn(4, 9, generator=g, dtype=torch.float64),     # split by columns over tp
            "norm": torch.randn(5, generator=g, dtype=torch.float64)}       # replicated over tp


def _param(grad: torch.Tensor, sharded: bool, dim: int = 0) -> torch.nn.Parameter:
    p = torch.nn.Parameter(torch.zeros_like(grad))
    p.grad = grad.clone()
    if sharded:  # Megatron's attributes, as the layers (or mark_tp_sharded) set them
        p.tensor_model_parallel, p.partition_dim, p.partition_stride = True, dim, 1
    return p


def _tp_params(full: dict, tp_rank: int, wrap=lambda t: t) -> list[torch.nn.Parameter]:
    return [_param(wrap(full["col"].chunk(TP, 0)[tp_rank].contiguous()), True, 0),
            _param(wrap(full["row"].chunk(TP, 1)[tp_rank].contiguous()), True, 1),
            _param(wrap(full["norm"]), False)]


def _norm_of(*grads: dict) -> float:
    return float(torch.sqrt(sum(g.pow(2).sum() for full in grads for g in full.values())))


def _check_clip(params, norm: float, groups: tuple) -> float:
    clip_grads_(params, norm, max_norm=norm / 4)
    after = global_grad_norm(params, *groups)
    assert abs(after - norm / 4) <= 1e-6 * norm, (after, norm)
    clip_grads_(params, after, max_norm=10 * after)       # a norm under max_norm is left alone
    assert global_grad_norm(params, *groups) == after
    return after


def _rank_main(rank: int, world: int) -> dict:
    n_outer = world // TP
    mesh = init_device_mesh("cpu", (n_outer, TP), mesh_dim_names=("outer", "tp"))   # rank = outer·3 + tp
    tp_group, outer_group = mesh["tp"].get_group(), mesh["outer"].get_group()
    outer, tp_rank = divmod(rank, TP)
    assert dist.get_rank(tp_group) == tp_rank and dist.get_rank(outer_group) == outer

    # tp 3 × pp n_outer: pipeline stage = outer coordinate, each stage its own parameters
    params = _tp_params(_full_grads(outer), tp_rank)
    want = _norm_of(*(_full_grads(stage) for stage in range(n_outer)))
    got = global_grad_norm(params, tp_group, outer_group)
    assert abs(got - want) <= 1e-12 * want, (f"tp3 x pp{n_outer}", rank, got, want)
    assert abs(global_grad_norm(params, tp_group) - _norm_of(_full_grads(outer))) <= 1e-12 * want  # one stage
    _check_clip(params, got, (tp_group, outer_group))

    # tp 3 × dp n_outer under FSDP2: one model, each tp shard's gradient a DTensor sharded by rows over dp
    # (at dp 2 the 2-row and 4-row tp shards split evenly, the 5-element norm vector unevenly: 3 + 2)
    full = _full_grads(0)
    shard = lambda t: distribute_tensor(t, mesh["outer"], [Shard(0)])  # noqa: E731
    params = _tp_params(full, tp_rank, wrap=shard)
    local_rows = {1: [[2, 4, 5]], 2: [[1, 2, 3], [1, 2, 2]]}[n_outer][outer]
    assert [p.grad.to_local().shape[0] for p in params] == local_rows, rank
    want = _norm_of(full)
    got = global_grad_norm(params, tp_group)
    assert abs(got - want) <= 1e-12 * want, (f"fsdp dp{n_outer} x tp3", rank, got, want)
    _check_clip(params, got, (tp_group,))
    return {"norm": got}


@pytest.mark.parametrize("world", [3, 6])
def test_global_grad_norm_and_clipping_match_the_single_device_norm(world):
    out = run_ranks(_rank_main, world, timeout=120)
    assert len({r["norm"] for r in out}) == 1, out


HOST_READS = ("cpu", "item", "tolist", "numpy")


def test_the_norm_reads_the_host_once_at_the_end(monkeypatch):
    """On a GPU every host read of a tensor waits for the device: the squares are summed where the gradients are,
    the partial sums reduced there, and the one read is the final norm's ``.item()`` (a ``.cpu()`` per gradient
    tensor was a wait per parameter; a ``.cpu()`` of the partial sums before the NCCL reductions, a host round trip
    per group). Counted here by patching the reads themselves; the norm is the same float64 sum."""
    reads = []
    for name in HOST_READS:
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _real=real, _name=name, **kw:
                            reads.append((_name, tuple(self.shape))) or _real(self, *a, **kw))
    params = [_param(torch.full((3,), float(i)), sharded=i % 2 == 0) for i in range(1, 9)]
    assert global_grad_norm(params) == math.sqrt(sum(3 * i * i for i in range(1, 9)))
    assert reads == [("item", (1,))], reads


def test_the_partial_sums_are_reduced_on_the_gradients_device(monkeypatch):
    """NCCL's case without a GPU: gradients on the ``meta`` device and groups whose collective device is ``meta``
    too. Every reduction must get the gradients' tensors as they are (a host copy of a meta tensor raises), and the
    squared norm comes back on that device, shape (1,). Exactness is the gloo test's above."""
    monkeypatch.setattr(grads, "collective_device", lambda group: torch.device("meta"))
    reduced = []
    monkeypatch.setattr(grads.dist, "all_reduce", lambda t, op=None, group=None:
                        reduced.append((t.device.type, tuple(t.shape), group)))
    tp_group, pp_group = object(), object()
    params = [_param(torch.ones(3, device="meta"), sharded=i % 2 == 0) for i in range(4)]
    total = grads.global_grad_norm_squared(params, tp_group, pp_group)
    assert (total.device.type, total.shape, total.dtype) == ("meta", (1,), torch.float64)
    assert reduced == [("meta", (1,), tp_group), ("meta", (1,), pp_group)], reduced

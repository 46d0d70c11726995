"""Host reads of a training step on two real gloo ranks: the data-parallel and the pipeline engine (a real 2-stage
1F1B schedule, which the meta-device tests of tests/test_device_placement.py cannot run: its stages send
activations to each other), alone and in the trainer's loop.

On a GPU every read of a device value (``.item()``, ``bool(t)``, ``float(t)``, ``.tolist()``, ``.cpu()``) waits for
all the work queued before it. On CPU the same calls are made, so they are counted here: the ``.item()``-like ones
through the dispatcher, ``.tolist()``/``.cpu()``/``.numpy()`` (which a CPU tensor answers without dispatching) at
the tensor class. Left out: the optimizer's step counters (``torch.optim`` keeps them on the host on a GPU too, and
reads each one per parameter).

In the loop, a value the ranks agree on is a device value when it travelled over a device group (NCCL takes CUDA
tensors only) and a host value when it travelled over a host group (gloo, CPU tensors). On CPU both are gloo, so
the loop test builds the mesh with host groups of their own (``separate_host_groups``, as on an NCCL job) and tells
the two kinds apart by the group each collective used.
"""
from __future__ import annotations

import contextlib
from typing import Iterator
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from dist_train import trainer
from dist_train.config import config_from_dict
from dist_train.engines import build_engine, ddp
from dist_train.lifecycle import Lifecycle
from dist_train.mesh import build_mesh
from dist_train.models.gpt import build_gpt
from tests.dist_harness import run_ranks
from tests.trainer_utils import tiny_gpt_config

#: Tensor methods that read a CPU tensor's values without going through the dispatcher
UNDISPATCHED_READS = ("tolist", "cpu", "numpy")


class Reads(TorchDispatchMode):
    """Every read of a tensor's values while ``on``, in order, as (how, tensor): "item" (``.item()``/``bool()``/
    ``float()``: ``_local_scalar_dense``) or the undispatched method's name; ``copies``: the number of values each
    of the engines' one-copy reads (``read_floats``) took."""

    def __init__(self, on: bool):
        super().__init__()
        self.on = on
        self.seen: list[tuple[str, torch.Tensor]] = []
        self.copies: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.on and func is torch.ops.aten._local_scalar_dense.default:
            self.seen.append(("item", args[0]))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def recorded_reads(on: bool = True) -> Iterator[Reads]:
    """The reads (:class:`Reads`) made in the block (while its ``on``)."""
    reads, read_floats = Reads(on), ddp.read_floats
    methods = {name: getattr(torch.Tensor, name) for name in UNDISPATCHED_READS}

    def counted(method_name, method):
        def read(self, *args, **kwargs):
            if reads.on:
                reads.seen.append((method_name, self))
            return method(self, *args, **kwargs)
        return read

    def one_copy(*scalars):
        if reads.on:
            reads.copies.append(len(scalars))
        return read_floats(*scalars)

    ddp.read_floats = one_copy
    for method_name, method in methods.items():
        setattr(torch.Tensor, method_name, counted(method_name, method))
    try:
        with reads:
            yield reads
    finally:
        ddp.read_floats = read_floats
        for method_name, method in methods.items():
            setattr(torch.Tensor, method_name, method)


def _engine_and_batches(parallel: dict, world: int):
    """A tiny GPT's engine for ``parallel`` on ``world`` gloo ranks, clipping on, and this rank's micro-batches of a
    global batch of 4 one-sample micro-batches."""
    cfg = config_from_dict({"model": {"kind": "gpt", "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                                      "ffn_hidden": 64, "vocab_size": 64}, "data": {"seq_len": 16},
                            "parallel": parallel, "train": {"global_batch": 4, "micro_batch": 1, "grad_clip": 0.5}})
    mesh = build_mesh(cfg.parallel, world, "cpu")
    engine = build_engine(cfg, build_gpt(cfg, mesh, torch.device("cpu")).train(), mesh, None)
    gen = torch.Generator().manual_seed(0)
    micro = []
    for _ in range(4 // mesh.size("dp")):
        tokens = torch.randint(0, 64, (1, 17), generator=gen)
        micro.append({"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "positions": torch.arange(16),
                      "count": torch.tensor(16.0)})
    return engine, micro


def _count_reads(rank: int, world: int) -> dict:
    """Per layout, over 2 steps after a first one (which builds the pipeline schedule and the optimizer state): the
    sizes of the step's ``read_floats`` copies, the other reads, and the steps' (loss, norm)."""
    out = {}
    for name, parallel in (("dp2", {"dp": 2}), ("pp2", {"pp": 2})):
        engine, micro = _engine_and_batches(parallel, world)
        engine.train_step(micro, 64.0, 100.0)
        with recorded_reads() as reads:
            steps = [engine.train_step(micro, 64.0, 100.0) for _ in range(2)]
        host = [s["step"] for s in engine.optimizer.state.values()]
        undispatched = [how for how, _ in reads.seen if how != "item"]
        scalars = [tuple(t.shape) for how, t in reads.seen if how == "item" and not any(t is h for h in host)]
        out[name] = (reads.copies, undispatched, scalars, steps, engine.last_step_skipped)
    return out


@pytest.mark.slow
def test_on_two_gloo_ranks_a_data_parallel_or_pipeline_step_reads_the_host_once():
    """Each step reads the host once: one copy of its loss, gradient norm and skip decision (agreed over the ranks on
    the device). Before, the skip flag's all-reduce was read on its own (a second read); on a GPU each read makes
    the host wait until the device has run everything queued, so it cannot queue the next step's work."""
    per_rank = run_ranks(_count_reads, 2, timeout=180)
    for rank, layouts in enumerate(per_rank):
        for name, (copies, undispatched, scalars, steps, skipped) in layouts.items():
            what = f"rank {rank} {name}"
            assert copies == [3, 3], (what, copies)
            assert undispatched == ["tolist", "tolist"] and scalars == [], (what, undispatched, scalars)
            assert not skipped and all(0.0 < loss < 10.0 and 0.0 < norm < 10.0 for loss, norm in steps), (what, steps)
    assert per_rank[0] == per_rank[1]  # the same loss and norm on every rank and stage


#: The loop test's window: from the heartbeat of step FIRST to that of step LAST, two whole turns of the loop (the
#: stop agreement after a step, the next step's token count, its training step, its heartbeat)
FIRST, LAST = 1, 3


def _loop_reads(rank: int, world: int, root: str) -> dict:
    """Per layout, a 3-step training run (an evaluation after step 2) on a mesh with host groups of their own: in the
    window, the shapes of the reads of values that travelled over a host group, of those that travelled over a device
    group, the engines' one-copy reads, and the run's losses (checked equal, with its gradient norms and validation
    loss, to those of the same run on the device groups alone)."""
    out = {}
    for name, parallel in (("dp2", {"dp": 2}), ("pp2", {"pp": 2})):
        meshes, reduced, all_reduce, heartbeat = [], [], dist.all_reduce, Lifecycle.heartbeat

        def host_groups_of_their_own(*args, **kwargs):
            meshes.append(build_mesh(*args, **kwargs, separate_host_groups=True))
            return meshes[-1]

        def recorded_all_reduce(tensor, *args, **kwargs):
            group = kwargs.get("group", args[1] if len(args) > 1 else None)  # (None: the default group, a device one)
            reduced.append((tensor, any(group is g for g in meshes[-1].host_groups.values() if g is not None)))
            return all_reduce(tensor, *args, **kwargs)

        def windowed_heartbeat(lifecycle, step):
            heartbeat(lifecycle, step)
            reads.on = FIRST <= step < LAST

        evaluation = {"eval_every": 2, "eval_steps": 1}
        cfg = tiny_gpt_config(f"{root}/{name}", steps=LAST, parallel=parallel, train=evaluation)
        with recorded_reads(on=False) as reads, mock.patch.object(trainer, "build_mesh", host_groups_of_their_own), \
                mock.patch.object(dist, "all_reduce", recorded_all_reduce), \
                mock.patch.object(Lifecycle, "heartbeat", windowed_heartbeat):
            result = trainer.train(cfg)
        over = {True: [], False: []}  # over a host group: the values' shapes; over a device group
        for _, t in reads.seen:
            storage = t.untyped_storage().data_ptr()  # (a reduced tensor is held in `reduced`: its storage is its own)
            host = [h for r, h in reduced if r.untyped_storage().data_ptr() == storage]
            if host:
                over[host[-1]].append(tuple(t.shape))
        # the same run on the device groups alone (a gloo job's own mesh): the same numbers, bit for bit
        same = trainer.train(tiny_gpt_config(f"{root}/{name} again", steps=LAST, parallel=parallel, train=evaluation))
        numbers = [(run.losses, run.grad_norms, run.summary["valid_loss"]) for run in (result, same)]
        assert numbers[0] == numbers[1], (name, numbers)
        out[name] = {"host": over[True], "device": over[False], "copies": reads.copies, "losses": result.losses}
    return out


@pytest.mark.slow
def test_in_the_training_loop_the_token_count_and_the_stop_agreement_wait_for_no_device(tmp_path):
    """Two turns of the loop on two ranks read the device once per step: the step's one copy (loss, norm, skip
    decision), and the evaluation its loss sum. The stop agreement's flag (shape (1,)) and the step's token count
    (shape ()) are host values and travel over the host groups (gloo, CPU tensors), as the evaluation's count does;
    over the device groups each would be a read of its own, three per step on dp2 where there is one (a GPU waits
    for everything queued at each). pp2 has no grad group: its count is not reduced."""
    per_rank = run_ranks(_loop_reads, 2, args=(str(tmp_path),), timeout=240)
    for rank, layouts in enumerate(per_rank):
        for name, got in layouts.items():
            what = f"rank {rank} {name}"
            assert got["copies"] == [3, 3] and got["device"] == [(1,)], (what, got)
            flag, count, eval_count = (1,), (), (1,)
            host = [flag, count, eval_count, flag, count] if name == "dp2" else [flag, flag]
            assert got["host"] == host, (what, got)
            assert len(got["losses"]) == LAST and all(0.0 < loss < 10.0 for loss in got["losses"]), (what, got)
    assert per_rank[0] == per_rank[1]  # the same losses on every rank and stage

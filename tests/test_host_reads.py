"""Host reads of a training step on two real gloo ranks: the data-parallel and the pipeline engine (a real 2-stage
1F1B schedule, which the meta-device tests of tests/test_device_placement.py cannot run: its stages send
activations to each other).

On a GPU every read of a device value (``.item()``, ``bool(t)``, ``float(t)``, ``.tolist()``, ``.cpu()``) waits for
all the work queued before it. On CPU the same calls are made, so they are counted here: the ``.item()``-like ones
through the dispatcher, ``.tolist()``/``.cpu()``/``.numpy()`` (which a CPU tensor answers without dispatching) at
the tensor class. Left out: the optimizer's step counters (``torch.optim`` keeps them on the host on a GPU too, and
reads each one per parameter).
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dist_train.config import config_from_dict
from dist_train.engines import build_engine, ddp
from dist_train.mesh import build_mesh
from dist_train.models.gpt import build_gpt
from tests.dist_harness import run_ranks

#: Tensor methods that read a CPU tensor's values without going through the dispatcher
UNDISPATCHED_READS = ("tolist", "cpu", "numpy")


class ScalarReads(TorchDispatchMode):
    """Records every ``.item()``/``bool()``/``float()`` of a tensor (``_local_scalar_dense``) but of ``host()``'s."""

    def __init__(self, host):
        super().__init__()
        self.host = host
        self.seen: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and not any(args[0] is t for t in self.host()):
            self.seen.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


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
        copies, read_floats = [], ddp.read_floats
        undispatched, methods = [], {name: getattr(torch.Tensor, name) for name in UNDISPATCHED_READS}

        def counted(method_name, method):
            return lambda self, *a, **k: undispatched.append(method_name) or method(self, *a, **k)

        ddp.read_floats = lambda *scalars: copies.append(len(scalars)) or read_floats(*scalars)
        for method_name, method in methods.items():
            setattr(torch.Tensor, method_name, counted(method_name, method))
        try:
            with ScalarReads(lambda: [s["step"] for s in engine.optimizer.state.values()]) as scalars:
                steps = [engine.train_step(micro, 64.0, 100.0) for _ in range(2)]
        finally:
            ddp.read_floats = read_floats
            for method_name, method in methods.items():
                setattr(torch.Tensor, method_name, method)
        out[name] = (copies, undispatched, scalars.seen, steps, engine.last_step_skipped)
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

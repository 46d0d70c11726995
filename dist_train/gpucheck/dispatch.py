"""The host's cost per eager op of the GPT: what the planner's ``host_op_us`` assumes (dist_train/profiles/devices.yaml).

    res = measure_dispatch(torch.device("cuda"))   # {"host_us_per_forward_op": ..., "forward_ops": ..., ...}

A tiny GPT (d 64, 2 layers) runs forward + backward over and over: its kernels are far shorter than their launches,
so the device waits for the host and the wall time of a run of steps, CUDA-synchronised by the check only at its end
(the step itself has no synchronising op: tests/test_chunked_loss.py guards the loss), is the host's dispatch time (Python, autograd, the ATen dispatcher, ``cudaLaunchKernel``). It is divided by the forward's
aten ops (non-view, counted with a :class:`OpCounter` the way docs/planner.md counts the eager layer's ops): µs per
forward op with its backward, the unit of the planner's ``host_op_us`` (whose op counts,
``step_time.EAGER_OPS_PER_LAYER`` and ``step_time.outer_ops`` for the embedding, head and loss, are forward ops too).
``host_bound`` says whether the host set the pace: the same steps on :data:`SCALED_BATCH` samples (the same ops, that
many times the device's work) took less than :data:`HOST_BOUND_RATIO` times as long. (Not the host's loop against
the synchronised end: one synchronising op in a step, as the chunked loss's ``nonzero`` was until 2026-11-30, makes
the host's loop end with the device's whether or not the device kept up.) The optimizer (torch AdamW ``foreach=False``, the trainer's) is timed the same way: µs per parameter tensor, beside the
planner's 14 ops per tensor. On CPU the same code runs as a smoke: the ops run on the host, so the number is the
CPU's serial per-op cost (``op_overhead_us``'s regime), not a GPU dispatch.
"""
from __future__ import annotations

import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dist_train.config import ModelConfig, config_from_dict
from dist_train.cost.predict import predict
from dist_train.cost.step_time import EAGER_OPS_PER_LAYER, OPTIMIZER_OPS_PER_TENSOR
from dist_train.models.attention import AttentionContext
from dist_train.models.gpt import GPT
from dist_train.plan.profiles import builtin_profiles, profile_for_device_name

#: the timed model: every kernel a few microseconds on any GPU, so the host sets the pace
TINY_GPT = dict(kind="gpt", d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128, vocab_size=128)
SEQ_LEN = 64
#: the optimizer's loop (no synchronisation inside) counts as host-bound when the synchronised end comes at most this
#: fraction after it
HOST_BOUND_SLACK = 0.10
#: samples per batch of the second timing: the same eager ops, this many times the device's work
SCALED_BATCH = 4
#: the GPT's steps count as host-bound when the scaled batch's take less than this many times as long: a device
#: that sets the pace takes ~SCALED_BATCH times as long, one that waits for the host the same time
HOST_BOUND_RATIO = 2.0


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched under it, views (``OpOverload.is_view``) left out: they launch no kernel."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops += 1
        return func(*args, **(kwargs or {}))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_runs(fn, device: torch.device, iters: int, repeats: int) -> list[tuple[float, float]]:
    """(host loop seconds, synchronised seconds) of ``repeats`` runs of ``iters`` calls of ``fn``; the device is
    synchronised before each run and only at its end."""
    out = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        host = time.perf_counter() - t0
        _sync(device)
        out.append((host, time.perf_counter() - t0))
    return out


def _median_run(runs: list[tuple[float, float]]) -> tuple[float, float]:
    """The run of median synchronised time (its host time with it)."""
    return sorted(runs, key=lambda r: r[1])[len(runs) // 2]


def measure_dispatch(device: torch.device, iters: int = 50, repeats: int = 5) -> dict:
    """Host µs per forward op (its backward included) and per optimizer op of :data:`TINY_GPT` on ``device`` (bf16
    autocast on CUDA, the trainer's GPU precision; fp32 on CPU), beside the built-in profile's assumption."""
    cfg = ModelConfig(**TINY_GPT)
    torch.manual_seed(0)
    model = GPT(cfg, AttentionContext(kernel="auto"), init_seed=0).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    tokens = torch.randint(0, cfg.vocab_size, (SCALED_BATCH, SEQ_LEN + 1), device=device)
    positions = torch.arange(SEQ_LEN, device=device)
    scaled = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "positions": positions}
    batch = {"tokens": tokens[:1, :-1], "labels": tokens[:1, 1:], "positions": positions}
    cast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    def forward(b: dict = batch):
        with cast:
            loss_sum, count = model(b)
        return loss_sum / count

    def step(b: dict = batch):
        forward(b).backward()  # the gradients accumulate, as over a step's micro-batches

    for _ in range(3):  # warm-up: kernels chosen, allocator filled, the gradients exist (accumulation from here on)
        step()
        step(scaled)
    opt.step()
    with OpCounter() as fwd:
        loss = forward()
    with OpCounter() as bwd:
        loss.backward()
    with OpCounter() as optc:
        opt.step()
    tensors = sum(1 for p in model.parameters() if p.grad is not None)
    host, total = _median_run(_timed_runs(step, device, iters, repeats))
    _, scaled_total = _median_run(_timed_runs(lambda: step(scaled), device, iters, repeats))
    opt_steps = max(1, iters // 5)
    opt_host, opt_total = _median_run(_timed_runs(opt.step, device, opt_steps, repeats))
    planned = planner_step_ops()
    res = {
        "device": str(device), "model": dict(TINY_GPT, seq_len=SEQ_LEN), "iters": iters, "repeats": repeats,
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "forward_ops": fwd.ops, "backward_ops": bwd.ops, "step_s": total / iters, "host_loop_s": host / iters,
        "host_us_per_forward_op": total / iters / fwd.ops * 1e6,
        "host_us_per_dispatched_op": total / iters / (fwd.ops + bwd.ops) * 1e6,
        "planner_ops": planned, "host_us_per_planner_op": total / iters / planned * 1e6,
        "scaled_batch": SCALED_BATCH, "scaled_step_s": scaled_total / iters,
        "host_bound": scaled_total < HOST_BOUND_RATIO * total,
        "optimizer_tensors": tensors, "optimizer_ops": optc.ops,
        "optimizer_us_per_tensor": opt_total / opt_steps / tensors * 1e6,
        "optimizer_us_per_op": opt_total / opt_steps / optc.ops * 1e6,
        "optimizer_host_bound": opt_total <= opt_host * (1 + HOST_BOUND_SLACK),
        "planner_ops_per_layer": EAGER_OPS_PER_LAYER["gpt"], "planner_optimizer_ops_per_tensor": OPTIMIZER_OPS_PER_TENSOR,
    }
    res.update(profile_assumption(device))
    return res


def planner_step_ops() -> float:
    """The eager forward ops the planner counts for one step of :data:`TINY_GPT` (one micro-batch of :data:`SEQ_LEN`
    tokens on one GPU: ``predict(...).host["ops"]``, its layers' ``EAGER_OPS_PER_LAYER`` + ``outer_ops``). A step's
    time ÷ these is what ``host_op_us`` stands for, so the planner predicts the measured step exactly; the aten count
    (``forward_ops``, larger under autocast's casts) is not the planner's unit."""
    cfg = config_from_dict({"model": TINY_GPT, "data": {"source": "synthetic", "seq_len": SEQ_LEN},
                            "train": {"global_batch": 1, "micro_batch": 1, "precision": "bf16"}})
    return predict(cfg, builtin_profiles()["h100"]).host["ops"]


def profile_assumption(device: torch.device) -> dict:
    """The built-in profile this device would be planned with and what it assumes per op: ``host_op_us`` on a GPU
    (None: no built-in profile matches the device's name), ``op_overhead_us`` (serial) on CPU."""
    table = builtin_profiles()
    if device.type != "cuda":
        prof = table["cpu"]
        return {"profile": "cpu", "profile_field": "op_overhead_us", "profile_us": prof.op_overhead_us}
    name = profile_for_device_name(torch.cuda.get_device_name(device))
    return {"profile": name, "profile_field": "host_op_us",
            "profile_us": None if name is None else table[name].host_op_us}

"""The GPT's lean autograd Functions (``models/lean_autograd.py``) against autograd's op-by-op composition.

RMSNorm: float64 ``torch.autograd.gradcheck``; fp32, bf16 autocast (fp32 stream, a linear after the norm) and
DeepSpeed's bf16 module (bf16 x and weight): the same forward values and the same gradients as the composition
``(x·rstd).type_as(x) * w`` the GPT ran before — bit-identical where x feeds only the norm; in the whole GPT,
where x also feeds the residual connection, x's gradients are summed in another order (fp32: within 1e-6
relative, stated below). What it keeps: x and rstd, not x·rstd.

SwiGLU: float64 gradcheck; fp32, bf16 (the matmul outputs under autocast) with its backward outside autocast (the
DDP engine) and inside it (the pipeline engine): the output dtype and values of the eager ``silu(gate) * up`` and
bit-identical gradients (the backward runs autograd's kernels: mul, ``aten.silu_backward``). What it keeps: gate
and up, not silu's output.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dist_train.config import config_from_dict
from dist_train.mesh import build_mesh
from dist_train.models import gpt
from dist_train.models.lean_autograd import at_least_fp32, rms_norm, swiglu

EPS = 1e-5


def rms_norm_composition(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """What models/gpt.RMSNorm computed before (autograd keeps x or its upcast, rstd and x·rstd)."""
    xf = x.to(at_least_fp32(x.dtype))
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * w


def _saved(fn, *args) -> list:
    """(dtype, shape) of every non-parameter tensor ``fn(*args)`` saves, one per storage."""
    seen: dict = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.nn.Parameter):
            seen[t.untyped_storage().data_ptr()] = (t.dtype, tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sorted(seen.values(), key=str)


def test_rms_norm_gradcheck_float64():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, EPS), (x, w))


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)],
                         ids=["fp32", "bf16_module"])
def test_rms_norm_is_bit_identical_to_the_composition(dtypes):
    x_dtype, w_dtype = dtypes
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 9, 16, generator=gen).to(x_dtype)
    w0 = (1 + 0.1 * torch.randn(16, generator=gen)).to(w_dtype)
    cot = torch.randn(2, 9, 16, generator=gen).to(x_dtype)
    outs = []
    for fn in (rms_norm, rms_norm_composition):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        y = fn(x, w, EPS)
        (y * cot).sum().backward()
        outs.append((y.detach(), x.grad, w.grad))
    for got, want in zip(*outs):
        assert got.dtype == want.dtype and torch.equal(got, want)


def test_rms_norm_under_bf16_autocast_feeding_a_linear_is_bit_identical_to_the_composition():
    gen = torch.Generator().manual_seed(2)
    x0, w0 = torch.randn(2, 9, 16, generator=gen), 1 + 0.1 * torch.randn(16, generator=gen)
    lin = torch.nn.Linear(16, 8)
    outs = []
    for fn in (rms_norm, rms_norm_composition):
        lin.zero_grad()
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = lin(fn(x, w, EPS))
        y.float().square().sum().backward()
        outs.append((y.detach(), x.grad, w.grad, lin.weight.grad))
    for got, want in zip(*outs):
        assert got.dtype == want.dtype and torch.equal(got, want)


def test_rms_norm_keeps_x_and_rstd_not_x_rstd():
    x = torch.randn(2, 9, 16, requires_grad=True)
    w = torch.nn.Parameter(torch.ones(16))
    assert _saved(rms_norm, x, w, EPS) == [(torch.float32, (2, 9, 1)), (torch.float32, (2, 9, 16))]
    assert len(_saved(rms_norm_composition, x, w, EPS)) == 3  # x, rstd and x·rstd
    xb, wb = x.detach().bfloat16().requires_grad_(), torch.nn.Parameter(torch.ones(16, dtype=torch.bfloat16))
    # DeepSpeed's bf16 module: x in its own dtype (the composition kept its fp32 upcast and a bf16 x·rstd too)
    assert _saved(rms_norm, xb, wb, EPS) == [(torch.bfloat16, (2, 9, 16)), (torch.float32, (2, 9, 1))]


def test_gpt_with_the_functions_trains_as_with_the_compositions(monkeypatch):
    """The whole fp32 GPT with both Functions against the compositions it ran before: loss bit-identical; gradients
    within 1e-6 of the largest (x's gradient is the sum of the residual's and the norm's, and autograd summed the
    norm's two parts into it one at a time)."""
    cfg = config_from_dict({"model": {"kind": "gpt", "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                                      "ffn_hidden": 48, "vocab_size": 64}, "data": {"seq_len": 16},
                            "train": {"global_batch": 2, "micro_batch": 2}})
    model = gpt.build_gpt(cfg, build_mesh(cfg.parallel, 1), torch.device("cpu")).train()
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    batch = {"tokens": tokens, "labels": torch.roll(tokens, -1, 1), "positions": torch.arange(16)}

    def step() -> tuple:
        model.zero_grad()
        loss, _ = model(batch)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss, grads = step()
    monkeypatch.setattr(gpt, "rms_norm", rms_norm_composition)
    monkeypatch.setattr(gpt, "swiglu", swiglu_composition)
    old_loss, old_grads = step()
    assert torch.equal(loss, old_loss)
    for name, g in grads.items():
        scale = old_grads[name].abs().max()
        assert (g - old_grads[name]).abs().max() <= 1e-6 * scale, name


def swiglu_composition(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """What models/gpt.FeedForward computed before (autograd keeps gate, silu's output and up)."""
    return F.silu(gate) * up


def test_swiglu_gradcheck_float64():
    gen = torch.Generator().manual_seed(3)
    gate, up = (torch.randn(2, 3, 7, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(swiglu, (gate, up))


@pytest.mark.parametrize("case", ["fp32", "bf16_backward_outside_autocast", "bf16_backward_inside_autocast"])
def test_swiglu_is_bit_identical_to_the_eager_expression(case):
    """gate and up come out of linears under bf16 autocast as the FFN's w1 and w3 produce them."""
    gen = torch.Generator().manual_seed(4)
    x0 = torch.randn(2, 9, 16, generator=gen)
    w1, w3 = torch.nn.Linear(16, 24), torch.nn.Linear(16, 24)
    cot = torch.randn(2, 9, 24, generator=gen)
    autocast = case != "fp32"
    outs = []
    for fn in (swiglu, swiglu_composition):
        w1.zero_grad()
        w3.zero_grad()
        x = x0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = fn(w1(x), w3(x))
            if case == "bf16_backward_inside_autocast":
                (y.float() * cot).sum().backward()
        if case != "bf16_backward_inside_autocast":
            (y.float() * cot).sum().backward()
        outs.append((y.detach(), x.grad, w1.weight.grad, w3.weight.grad, w1.bias.grad))
    assert outs[0][0].dtype == (torch.bfloat16 if autocast else torch.float32)
    for got, want in zip(*outs):
        assert got.dtype == want.dtype and torch.equal(got, want)


def test_swiglu_keeps_gate_and_up_not_silu():
    gate, up = torch.randn(2, 9, 24, requires_grad=True), torch.randn(2, 9, 24, requires_grad=True)
    assert _saved(swiglu, gate, up) == [(torch.float32, (2, 9, 24))] * 2
    assert len(_saved(swiglu_composition, gate, up)) == 3  # gate, silu(gate), up

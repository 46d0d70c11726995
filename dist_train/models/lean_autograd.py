"""Autograd Functions that keep for backward what a fused layer keeps, not what autograd's op-by-op graph keeps.

:func:`rms_norm` — autograd's graph of ``(x·rstd).type_as(x) * w`` keeps x (or its fp32 upcast), rstd AND x·rstd
(the weight's gradient reads it): 2d + 1 per token. This Function keeps x in its own dtype and rstd [..., 1]
(fp32), and recomputes x·rstd in backward — the rule of apex's / Megatron's ``MixedFusedRMSNorm`` and Transformer
Engine's RMSNorm (memory-efficient mode): d + 1 per token, and x is usually the residual stream, which exists
anyway.

:func:`swiglu` — autograd's graph of ``silu(gate) * up`` keeps gate (silu's input), silu's output and up: with the
next linear's input (the product) 4f per token. This Function keeps gate and up and recomputes silu(gate) in
backward (Megatron's fused ``bias_swiglu`` / Transformer Engine's ``swiglu`` rule): 3f with the product.

The forward runs the same ops as the composition (bit-identical values); the backward runs the ops autograd runs
for it, in its order, so gradients equal autograd's up to the order in which a tensor's gradients are summed
(x's, when x also feeds the residual connection).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    """Reductions (norms, softmax) run in fp32 for 16-bit inputs and keep float64 for float64 references."""
    return torch.promote_types(dtype, torch.float32)


class _RMSNorm(torch.autograd.Function):
    """x [..., d], weight [d] -> (x·rstd).type_as(x) * weight [..., d] (dtype: x's and weight's promoted), with
    rstd = rsqrt(mean(x², -1) + eps) [..., 1] in at-least-fp32; keeps x and rstd only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.to(at_least_fp32(x.dtype))
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return (xf * rstd).type_as(x) * weight

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        xf = x.to(rstd.dtype)
        normed = (xf * rstd).type_as(x)  # recomputed: x·rstd is what autograd's graph kept for the weight gradient
        grad_w = grad_x = None
        if ctx.needs_input_grad[1]:
            # mul's backward, then reduced over the broadcast (token) dims and cast as autograd reduces and casts it
            grad_w = (grad * normed).sum_to_size(weight.shape).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            grad_normed = (grad * weight).to(x.dtype).to(xf.dtype)     # through * weight, then type_as's backward
            grad_rstd = (grad_normed * xf).sum(-1, keepdim=True)        # xf * rstd, rstd's side: [..., 1]
            grad_mean = -0.5 * grad_rstd * rstd.pow(3)                  # rsqrt's backward
            grad_sq = grad_mean / x.shape[-1]                           # mean's backward (broadcast below)
            grad_xf = grad_normed * rstd + grad_sq * (2.0 * xf)         # xf * rstd, xf's side + pow(2)'s backward
            grad_x = grad_xf.to(x.dtype)
        return grad_x, grad_w, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x [..., d] with weight [d]: (x·rstd).type_as(x) * weight, keeping x and rstd (fp32 [..., 1]) for
    backward and recomputing x·rstd there (:class:`_RMSNorm`)."""
    return _RMSNorm.apply(x, weight, eps)


class _SwiGLU(torch.autograd.Function):
    """gate, up [..., f] -> silu(gate) * up [..., f] (dtype as the eager expression's); keeps gate and up only."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        grad_gate = grad_up = None
        if ctx.needs_input_grad[1]:
            grad_up = (grad * F.silu(gate)).to(up.dtype)  # silu(gate) recomputed: autograd's graph kept it
        if ctx.needs_input_grad[0]:
            # mul's backward into silu's output (gate's dtype), then silu's own backward kernel, as autograd runs them
            grad_gate = torch.ops.aten.silu_backward((grad * up).to(gate.dtype), gate)
        return grad_gate, grad_up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's product silu(gate) * up of gate, up [..., f], keeping gate and up for backward and recomputing
    silu(gate) there (:class:`_SwiGLU`)."""
    return _SwiGLU.apply(gate, up)

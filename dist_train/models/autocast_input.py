"""One 16-bit cast of an input that several linears share under autocast, kept once for their backward.

Under ``torch.autocast`` every ``F.linear`` casts its fp32 input to the autocast dtype itself, and each keeps
its OWN cast for its weight gradient: a norm output feeding wq, wk and wv is kept three times in 16 bits (w1,
w3: twice). A fused layer (Transformer Engine's LayerNormLinear, Megatron's fused qkv) keeps one. Here the
cast happens once, before the linears: autocast's cast of a tensor already in its dtype is a no-op returning
the same tensor (``cached_cast`` -> ``Tensor.to``), so every linear saves a view of one 16-bit storage.

    xs = autocast_inputs(x, 3)      # x [..., d] fp32 under bf16 autocast -> 3 views of one bf16 [..., d]
    q, k, v = (lin(xi) for lin, xi in zip((wq, wk, wv), xs))

Values are bit-identical to letting each linear cast (the same fp32 values cast to the same dtype). Gradients
too: each consumer's 16-bit input gradient is cast to x's dtype and they are summed there, in fp32, as autograd
summed the gradients of the per-linear casts (a single shared 16-bit tensor would sum them in 16 bits).
"""
from __future__ import annotations

from typing import Optional

import torch


def autocast_dtype_of(x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype autocast would cast ``x`` to for a matmul (its lower-precision op list), or None: autocast off
    on x's device, x not floating point, float64 (autocast leaves it alone) or already in that dtype."""
    device = x.device.type
    if not torch.is_autocast_enabled(device) or not x.is_floating_point() or x.dtype == torch.float64:
        return None
    dtype = torch.get_autocast_dtype(device)
    return None if x.dtype == dtype else dtype


class _SharedCast(torch.autograd.Function):
    """x [...] -> ``n`` views of one ``x.to(dtype)``; backward: the views' gradients cast to x's dtype, summed."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, n: int, dtype: torch.dtype):
        ctx.set_materialize_grads(False)
        ctx.x_dtype = x.dtype
        cast = x.to(dtype)
        # views, not the same tensor n times: each consumer gets its own gradient edge (summed in x's dtype below)
        return tuple(cast.view_as(cast) for _ in range(n))

    @staticmethod
    def backward(ctx, *grads):
        total = None
        for g in grads:  # in consumer order, as autograd accumulated the per-linear casts' gradients
            if g is None:
                continue
            g = g.to(ctx.x_dtype)
            total = g if total is None else total + g
        return total, None, None


def autocast_inputs(x: torch.Tensor, n: int) -> list[torch.Tensor]:
    """``n`` inputs for linears sharing ``x`` [..., d]: under autocast (:func:`autocast_dtype_of`) views of one cast
    of x to the autocast dtype (kept once by all of them); otherwise x itself, n times."""
    dtype = autocast_dtype_of(x)
    if dtype is None:
        return [x] * n
    if not (torch.is_grad_enabled() and x.requires_grad):
        cast = x.to(dtype)
        return [cast] * n
    return list(_SharedCast.apply(x, n, dtype))

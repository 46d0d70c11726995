"""The float64 single-device reference every context-parallel test compares against (and its own checks)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def reference_attention(q, k, v, *, causal: bool = True, window: Optional[int] = None,
                        scale: Optional[float] = None, doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """softmax(q·kᵀ·scale + mask)·v over the full sequence. q [B, S, Hq, D]; k, v [B, S, Hkv, D];
    doc_ids [B, S] (or [S]): a query sees only keys with its own document id."""
    b, s, hq, d = q.shape
    g = hq // k.shape[2]
    kk, vv = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)
    scale = d ** -0.5 if scale is None else scale
    scores = torch.einsum("bihd,bjhd->bhij", q, kk) * scale
    # the mask on the scores' device: a CUDA masked_fill refuses a CPU mask (the gpu tests use this reference)
    i = torch.arange(s, device=q.device)[:, None]
    j = torch.arange(s, device=q.device)[None, :]
    ok = torch.ones(s, s, dtype=torch.bool, device=q.device)
    if causal:
        ok &= j <= i
    if window is not None:
        ok &= j >= i - window
        if not causal:
            ok &= j <= i + window
    if doc_ids is not None:
        ids = doc_ids if doc_ids.dim() == 2 else doc_ids[None]
        ok = ok & (ids[:, :, None] == ids[:, None, :])[:, None]               # [B, 1, S, S]
    p = torch.softmax(scores.masked_fill(~ok, float("-inf")), dim=-1)
    return torch.einsum("bhij,bjhd->bihd", p, vv)


def random_qkv(b, s, hq, hkv, d, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, s, h, d, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
                 for h in (hq, hkv, hkv))


def max_rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x − ref| relative to the reference's scale (its max magnitude)."""
    x, ref = x.detach(), ref.detach()
    return float((x.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30))


def test_reference_matches_torch_sdpa_causal_gqa():
    q, k, v = random_qkv(2, 12, 4, 2, 8)
    ref = reference_attention(q, k, v, causal=True)
    kk, vv = (x.repeat_interleave(2, dim=2).transpose(1, 2) for x in (k, v))
    sdpa = F.scaled_dot_product_attention(q.transpose(1, 2), kk, vv, is_causal=True).transpose(1, 2)
    assert max_rel_err(ref, sdpa) < 1e-12


def test_reference_window_equals_banded_mask():
    q, k, v = random_qkv(1, 10, 2, 2, 4)
    for causal in (True, False):
        ref = reference_attention(q, k, v, causal=causal, window=2)
        i = torch.arange(10)
        band = (i[None, :] - i[:, None]).abs() <= 2
        if causal:
            band &= i[None, :] <= i[:, None]
        sdpa = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              attn_mask=band).transpose(1, 2)
        assert max_rel_err(ref, sdpa) < 1e-12

"""Local block kernels: attention of one query block against one key block, returning (out, lse).

Shapes (all kernels): q [B, Sq, Hq, D]; k, v [B, Sk, Hkv, D] with Hq % Hkv == 0 (GQA/MQA: K/V
heads are expanded here, inside the kernel, never before communication).

    forward(q, k, v, mask, scale)                     -> out [B, Sq, Hq, D], lse [B, Hq, Sq]
    backward(dout, q, k, v, out, lse, mask, scale)    -> dq [B, Sq, Hq, D], dk, dv [B, Sk, Hkv, D]

``out``/``lse`` are in the *compute dtype* (float64 for float64 inputs, else float32 on CPU) so the
log-sum-exp merge never sees a rounded partial result. ``backward`` is called with the FINAL merged
(out, lse) of the whole row, which makes each block's gradient its exact share of the total
(flash-attention's identity dS = P ∘ (dP − rowsum(dO ∘ O)) with P = exp(S − lse_final)).

Rows with no allowed key in the block get lse = −inf and out = 0 (the merge then ignores them).

Kernels: ``sdpa`` (CPU: aten._scaled_dot_product_flash_attention_for_cpu and its backward; full and
causal blocks use the fast path, other masks the additive attn_mask path — the ring never hands a
kernel a ``shifted`` block: :attr:`~parallelism.context.plan.Block.call` makes those causal),
``math`` (reference einsum implementation, any device/dtype), ``flash`` (flash-attn
on CUDA; full and causal blocks only, imported lazily). ``auto`` picks flash on CUDA when it is
importable and the dtype is half/bf16, else sdpa on CPU, else math.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .masks import BlockMask

KERNELS = ("auto", "sdpa", "math", "flash")
NEG_INF = float("-inf")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (exact references); everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _expand_kv(x: torch.Tensor, hq: int) -> torch.Tensor:
    """[B, S, Hkv, D] -> [B, S, Hq, D]; query head h uses K/V head h // (Hq / Hkv)."""
    b, s, hkv, d = x.shape
    if hkv == hq:
        return x
    return x[:, :, :, None, :].expand(b, s, hkv, hq // hkv, d).reshape(b, s, hq, d)


def _reduce_kv(dx: torch.Tensor, hkv: int) -> torch.Tensor:
    """Adjoint of _expand_kv: sum the gradients of the query heads sharing a K/V head."""
    b, s, hq, d = dx.shape
    if hkv == hq:
        return dx
    return dx.view(b, s, hkv, hq // hkv, d).sum(3)


def _empty_rows_to_neg_inf(lse: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SDPA reports lse = 0 for rows whose keys are all masked; the merge needs −inf there."""
    empty = ~mask.any(-1)
    if not bool(empty.any()):
        return lse
    return lse.masked_fill(empty, NEG_INF)


def _lse_for_backward(lse: torch.Tensor) -> torch.Tensor:
    # exp(s - lse) must be 0 (not NaN) on rows that attend to nothing anywhere.
    return torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)


class MathKernel:
    """Materialises the [Sq, Sk] score matrix; exact reference, any device and dtype."""

    name = "math"

    @staticmethod
    def _scores(q, k, mask: BlockMask, scale):
        c = compute_dtype(q.dtype)
        qh = q.to(c).transpose(1, 2)                                   # [B, Hq, Sq, D]
        kh = _expand_kv(k.to(c), q.shape[2]).transpose(1, 2)            # [B, Hq, Sk, D]
        s = torch.matmul(qh, kh.transpose(-1, -2)) * scale              # [B, Hq, Sq, Sk]
        if mask.kind != "full":
            s = s.masked_fill(~_bool_mask(mask, q.shape[1], k.shape[1], q.device), NEG_INF)
        return qh, kh, s

    def forward(self, q, k, v, mask: BlockMask, scale: float):
        c = compute_dtype(q.dtype)
        _, _, s = self._scores(q, k, mask, scale)
        lse = torch.logsumexp(s, dim=-1)                                # −inf on empty rows
        p = torch.exp(s - torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)[..., None])
        vh = _expand_kv(v.to(c), q.shape[2]).transpose(1, 2)
        return torch.matmul(p, vh).transpose(1, 2), lse

    def backward(self, dout, q, k, v, out, lse, mask: BlockMask, scale: float):
        c = compute_dtype(q.dtype)
        qh, kh, s = self._scores(q, k, mask, scale)
        vh = _expand_kv(v.to(c), q.shape[2]).transpose(1, 2)
        p = torch.exp(s - _lse_for_backward(lse)[..., None])
        doh, oh = dout.to(c).transpose(1, 2), out.to(c).transpose(1, 2)
        dp = torch.matmul(doh, vh.transpose(-1, -2))
        ds = p * (dp - (doh * oh).sum(-1, keepdim=True))
        dq = torch.matmul(ds, kh) * scale
        dk = torch.matmul(ds.transpose(-1, -2), qh) * scale
        dv = torch.matmul(p.transpose(-1, -2), doh)
        hkv = k.shape[2]
        return (dq.transpose(1, 2), _reduce_kv(dk.transpose(1, 2), hkv),
                _reduce_kv(dv.transpose(1, 2), hkv))


def _bool_mask(mask: BlockMask, sq: int, sk: int, device) -> torch.Tensor:
    if mask.kind == "causal":
        return torch.ones(sq, sk, dtype=torch.bool, device=device).tril()
    if mask.kind == "shifted":
        return torch.ones(sq, sk, dtype=torch.bool, device=device).tril(-1)
    return mask.tensor(device)


class SdpaCpuKernel:
    """torch's CPU flash-attention op, which returns the log-sum-exp and takes it back in backward."""

    name = "sdpa"

    def __init__(self):
        self._fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        self._bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

    @staticmethod
    def _heads_first(x, c, hq=None):
        x = x.to(c)
        if hq is not None:
            x = _expand_kv(x, hq)
        return x.transpose(1, 2)                                        # [B, H, S, D] view

    def forward(self, q, k, v, mask: BlockMask, scale: float):
        c = compute_dtype(q.dtype)
        hq = q.shape[2]
        qh, kh, vh = self._heads_first(q, c), self._heads_first(k, c, hq), self._heads_first(v, c, hq)
        attn_mask, bool_mask = self._additive(mask, qh)
        out, lse = self._fwd(qh, kh, vh, 0.0, mask.kind == "causal", attn_mask=attn_mask, scale=scale)
        if bool_mask is not None:
            lse = _empty_rows_to_neg_inf(lse, bool_mask)
        return out.transpose(1, 2), lse

    @staticmethod
    def _additive(mask: BlockMask, qh):
        if mask.kind in ("full", "causal"):
            return None, None
        bm = mask.tensor(qh.device)
        return torch.zeros(bm.shape, dtype=qh.dtype, device=qh.device).masked_fill(~bm, NEG_INF), bm

    def backward(self, dout, q, k, v, out, lse, mask: BlockMask, scale: float):
        c = compute_dtype(q.dtype)
        hq, hkv = q.shape[2], k.shape[2]
        qh, kh, vh = self._heads_first(q, c), self._heads_first(k, c, hq), self._heads_first(v, c, hq)
        doh, oh = self._heads_first(dout, c), self._heads_first(out, c)
        lse = _lse_for_backward(lse)
        attn_mask, _ = self._additive(mask, qh)
        dq, dk, dv = self._bwd(doh, qh, kh, vh, oh, lse, 0.0, mask.kind == "causal",
                               attn_mask=attn_mask, scale=scale)
        return (dq.transpose(1, 2), _reduce_kv(dk.transpose(1, 2), hkv),
                _reduce_kv(dv.transpose(1, 2), hkv))


class FlashKernel:
    """flash-attn (CUDA, fp16/bf16): full and causal blocks; other masks fall back to ``math``."""

    name = "flash"

    def __init__(self):
        from flash_attn import flash_attn_interface as fai  # optional dependency, CUDA only

        self._fai = fai
        self._fallback = MathKernel()

    def forward(self, q, k, v, mask: BlockMask, scale: float):
        if mask.kind not in ("full", "causal"):
            return self._fallback.forward(q, k, v, mask, scale)
        res = self._fai._flash_attn_forward(q, k, v, 0.0, scale, causal=mask.kind == "causal",
                                            window_size_left=-1, window_size_right=-1, softcap=0.0,
                                            alibi_slopes=None, return_softmax=False)
        out, lse = res[0], res[1]
        return out.float(), lse

    def backward(self, dout, q, k, v, out, lse, mask: BlockMask, scale: float):
        if mask.kind not in ("full", "causal"):
            return self._fallback.backward(dout, q, k, v, out, lse, mask, scale)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        self._fai._flash_attn_backward(dout.to(q.dtype), q, k, v, out.to(q.dtype), lse, dq, dk, dv,
                                       0.0, scale, mask.kind == "causal", -1, -1, 0.0, None, False)
        return dq.float(), dk.float(), dv.float()


def _flash_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def get_kernel(name: str, device: torch.device, dtype: torch.dtype):
    """Resolve a kernel name (``auto``/``sdpa``/``math``/``flash``) for inputs on device/dtype."""
    if name not in KERNELS:
        raise ValueError(f"kernel={name!r} is not supported; valid kernels: {', '.join(KERNELS)}")
    if name == "auto":
        if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and _flash_available():
            name = "flash"
        elif device.type == "cpu":
            name = "sdpa"
        else:
            name = "math"
    if name == "sdpa":
        if device.type != "cpu":
            raise ValueError(f"kernel='sdpa' is implemented for CPU tensors only (got device {device}); "
                             "use kernel='flash' or 'math' on CUDA")
        return SdpaCpuKernel()
    if name == "flash":
        if device.type != "cuda" or not _flash_available():
            raise ValueError(f"kernel='flash' needs CUDA tensors and the flash-attn package (device {device})")
        return FlashKernel()
    return MathKernel()


def default_scale(head_dim: int, scale: Optional[float]) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)

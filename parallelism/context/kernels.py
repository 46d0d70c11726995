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
``cuda`` (CUDA: torch's own attention ops that return the log-sum-exp and have a backward op taking
it — flash, memory-efficient (additive bias, fp32) and cuDNN; see :class:`CudaSdpaKernel`),
``math`` (reference einsum implementation that materialises the [Sq, Sk] scores: any device and
dtype, a reference only), ``flash`` (flash-attn on CUDA; full and causal blocks, other blocks
through ``cuda``; imported lazily). ``auto`` (:func:`resolve_kernel_name`): flash when flash-attn is
importable and the inputs are CUDA half/bf16, else ``cuda`` for CUDA fp16/bf16/fp32, ``sdpa`` on CPU,
``math`` otherwise (e.g. CUDA float64 references).

Window blocks never need an S×S mask: the ring planner tiles a window into blocks of ~max(128, w)
tokens (:func:`~parallelism.context.attention.default_tile`), so a kernel sees full and causal tiles
plus ``explicit`` edge blocks of at most :data:`~parallelism.context.plan.EXPLICIT_TILE` rows and keys
(as are document-cut blocks), which the CUDA kernel runs through the efficient op with an additive bias
of that size.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch

from .masks import BlockMask

KERNELS = ("auto", "sdpa", "math", "flash", "cuda")
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


CUDA_OPS = ("flash", "efficient", "cudnn")
DEFAULT_CUDA_OPS = ("flash", "efficient")      # cuDNN on request: its support varies by version and GPU
HALF_DTYPES = (torch.float16, torch.bfloat16)


def select_cuda_op(kind: str, dtype: torch.dtype, head_dim: int, available: tuple[str, ...],
                   prefer: tuple[str, ...] = DEFAULT_CUDA_OPS) -> str:
    """Which torch CUDA attention op computes a block (pure: the op table, no device needed).

    kind: the block's mask kind (``full``/``causal`` run unmasked or with ``is_causal``; any other
    kind needs an additive bias, which only the efficient op takes). flash and cuDNN take fp16/bf16
    only; the efficient op also takes fp32. ``available``: ops this device/torch build has
    (:func:`available_cuda_ops`); ``prefer``: the order to try. Raises ValueError naming the
    block, dtype and head dim when no op fits.
    """
    needs_bias = kind not in ("full", "causal")
    half = dtype in HALF_DTYPES
    for op in prefer:
        if op not in available:
            continue
        if op == "flash" and half and not needs_bias and head_dim % 8 == 0 and head_dim <= 256:
            return op
        if op == "cudnn" and half and not needs_bias and head_dim % 8 == 0 and head_dim <= 128:
            return op
        if op == "efficient" and (half or dtype == torch.float32) and head_dim % (8 if half else 4) == 0:
            return op
    raise ValueError(f"no torch CUDA attention op among {list(prefer)} (available: {list(available)}) "
                     f"computes a {kind} block in {dtype} with head_dim={head_dim}; flash/cudnn need "
                     "fp16/bf16 and head_dim % 8 == 0, efficient fp16/bf16/fp32 and head_dim % 8 (fp32: 4) "
                     "== 0; use kernel='math' for other shapes")


def available_cuda_ops(device: torch.device) -> tuple[str, ...]:
    """The torch CUDA attention ops this build and GPU support (flash and cuDNN need sm80+)."""
    major, _ = torch.cuda.get_device_capability(device)
    ops = []
    if major >= 8 and torch.backends.cuda.is_flash_attention_available():
        ops.append("flash")
    ops.append("efficient")
    if major >= 8 and torch.backends.cudnn.is_available() and (torch.backends.cudnn.version() or 0) >= 90000:
        ops.append("cudnn")
    return tuple(ops)


def lse_from_op(op: str, lse: torch.Tensor, sq: int) -> torch.Tensor:
    """An op's log-sum-exp -> [B, H, Sq] float32. flash: [B, H, Sq]; efficient: [B, H, ceil(Sq/32)·32]
    (rows past Sq are padding); cuDNN: [B, H, Sq, 1] (or [B, H, Sq])."""
    if op == "efficient":
        lse = lse[..., :sq]
    elif op == "cudnn" and lse.dim() == 4:
        lse = lse.squeeze(-1)
    return lse.float()


def lse_to_op(op: str, lse: torch.Tensor, ndim: int = 3) -> torch.Tensor:
    """[B, H, Sq] float32 -> the layout the op's backward reads (``ndim``: the rank of the lse the
    op's forward returned; cuDNN's is 4). The efficient op reads rows in tiles of 32: padded with 0."""
    lse = lse.float()
    if op == "efficient":
        sq = lse.shape[-1]
        pad = -(-sq // 32) * 32 - sq
        return torch.nn.functional.pad(lse, (0, pad)) if pad else lse.contiguous()
    if op == "cudnn" and ndim == 4:
        return lse.unsqueeze(-1).contiguous()
    return lse.contiguous()


def additive_bias(allowed: torch.Tensor, dtype: torch.dtype, b: int, h: int) -> torch.Tensor:
    """Bool [Sq, Sk] (or [B, 1, Sq, Sk]: per-sample documents; True = attend) -> additive bias
    [B, H, Sq, Sk] (0 / −inf) in ``dtype``.

    The efficient op needs the bias rows 16-element aligned: the storage is [Sq, ceil(Sk/16)·16] and
    the result a slice of it, broadcast over B and H with zero strides (one tile-sized buffer).
    """
    sq, sk = allowed.shape[-2:]
    width = -(-sk // 16) * 16
    store = torch.full((*allowed.shape[:-1], width), NEG_INF, dtype=dtype, device=allowed.device)
    store[..., :sk].masked_fill_(allowed, 0.0)
    return store[..., :sk].expand(b, h, sq, sk)


def zero_empty_rows(out: torch.Tensor, lse: torch.Tensor, allowed: Optional[torch.Tensor]):
    """out [B, Sq, H, D], lse [B, H, Sq]: rows with no allowed key get out = 0 and lse = −inf.

    A fully masked row of an additive-bias kernel is 0/0: whatever the op returns there (NaN, 0,
    a finite lse) is replaced, so the merge gives it weight 0 (and 0·NaN never reaches the state).
    Masked whether or not a row is empty: asking first (``bool(empty.any())``) would wait for the GPU
    once per masked block.
    """
    if allowed is None:
        return out, lse
    empty = ~allowed.any(-1)                                  # [Sq], or [B, 1, Sq] per-sample documents
    rows = empty if empty.dim() == 1 else empty[:, 0]         # [Sq] / [B, Sq]
    return (out.masked_fill(rows[..., None, None], 0.0), lse.masked_fill(empty, NEG_INF))


class CudaSdpaKernel:
    """torch's own CUDA attention ops (the ones PyTorch's context parallelism dispatches to).

    Per block (:func:`select_cuda_op`): full/causal fp16/bf16 blocks use
    ``aten._scaled_dot_product_flash_attention`` (or ``_cudnn_attention`` when preferred); fp32
    blocks and masked (window edge) blocks use ``aten._scaled_dot_product_efficient_attention`` with
    a tile-sized additive bias. Backward calls the matching ``*_backward`` op with the FINAL merged
    (out, lse), converted to the layout that op expects (:func:`lse_to_op`). K/V heads are expanded
    to Hq inside (GQA), and their gradients summed back in float32.

    ``available`` (default: probed from the device) and ``aten`` (default ``torch.ops.aten``) exist so
    the op choice and the layout handling can be exercised without a GPU.

    Outputs follow the kernel contract: out [B, Sq, Hq, D] and lse [B, Hq, Sq] in float32 (out is
    the op's fp16/bf16 result up-cast; the merge runs in fp32), lse = −inf on empty rows; backward
    returns float32 gradients.
    """

    name = "cuda"

    def __init__(self, prefer: tuple[str, ...] = DEFAULT_CUDA_OPS, available: Optional[tuple[str, ...]] = None,
                 aten=None):
        unknown = [op for op in prefer if op not in CUDA_OPS]
        if unknown or not prefer:
            raise ValueError(f"prefer={prefer!r}: CUDA attention ops are {', '.join(CUDA_OPS)}")
        self.prefer = tuple(prefer)
        self._available = available
        self._aten = torch.ops.aten if aten is None else aten    # tests substitute ops with their layouts
        self._aux: dict[str, tuple] = {}   # per op: the dropout-free RNG/varlen outputs of its forward
        self.calls: dict[str, int] = {}    # per op: forward calls (which op ran is part of the report)

    def op_for(self, mask: BlockMask, q: torch.Tensor) -> str:
        if self._available is None:
            self._available = available_cuda_ops(q.device)
        return select_cuda_op(mask.kind, q.dtype, q.shape[-1], self._available, self.prefer)

    @staticmethod
    def _heads_first(q, k, v):
        hq = q.shape[2]
        return q.transpose(1, 2), _expand_kv(k, hq).transpose(1, 2), _expand_kv(v, hq).transpose(1, 2)

    def forward(self, q, k, v, mask: BlockMask, scale: float):
        op = self.op_for(mask, q)
        self.calls[op] = self.calls.get(op, 0) + 1
        qh, kh, vh = self._heads_first(q, k, v)
        causal = mask.kind == "causal"
        allowed = None
        if op == "flash":
            res = self._aten._scaled_dot_product_flash_attention(
                qh, kh, vh, dropout_p=0.0, is_causal=causal, return_debug_mask=False, scale=scale)
            self._aux[op] = (res[2], res[3], res[6], res[7])           # cum_seq_q/k, philox seed/offset
        elif op == "cudnn":
            res = self._aten._scaled_dot_product_cudnn_attention(
                qh, kh, vh, None, True, dropout_p=0.0, is_causal=causal, return_debug_mask=False, scale=scale)
            self._aux[op] = (res[2], res[3], res[6], res[7], res[1].dim())
        else:
            bias = None
            if mask.kind not in ("full", "causal"):
                allowed = mask.tensor(q.device)
                bias = additive_bias(allowed, q.dtype, qh.shape[0], qh.shape[1])
            res = self._aten._scaled_dot_product_efficient_attention(
                qh, kh, vh, bias, True, dropout_p=0.0, is_causal=causal, scale=scale)
            self._aux[op] = (res[2], res[3])                           # philox seed/offset
        out, lse = res[0].transpose(1, 2).float(), lse_from_op(op, res[1], q.shape[1])
        return zero_empty_rows(out, lse, allowed)

    def _rng(self, op: str, device) -> tuple:
        """The philox seed/offset the op's forward returned (unused without dropout)."""
        if op in self._aux:
            return self._aux[op]
        empty = torch.empty((), dtype=torch.long, device=device)
        return (None, None, empty, empty, 3) if op in ("flash", "cudnn") else (empty, empty)

    def backward(self, dout, q, k, v, out, lse, mask: BlockMask, scale: float):
        op = self.op_for(mask, q)
        qh, kh, vh = self._heads_first(q, k, v)
        doh, oh = dout.to(q.dtype).transpose(1, 2), out.to(q.dtype).transpose(1, 2)
        causal = mask.kind == "causal"
        # exp(s - lse) must be 0 (not NaN) on rows that attend to nothing anywhere
        lse = _lse_for_backward(lse.float())
        sq, sk = q.shape[1], k.shape[1]
        if op == "flash":
            cq, ck, seed, offset = self._rng(op, q.device)[:4]
            dq, dk, dv = self._aten._scaled_dot_product_flash_attention_backward(
                doh, qh, kh, vh, oh, lse_to_op(op, lse), cq, ck, sq, sk, 0.0, causal, seed, offset, scale=scale)
        elif op == "cudnn":
            cq, ck, seed, offset, ndim = self._rng(op, q.device)
            dq, dk, dv = self._aten._scaled_dot_product_cudnn_attention_backward(
                doh, qh, kh, vh, oh, lse_to_op(op, lse, ndim), seed, offset, None, cq, ck, sq, sk, 0.0, causal,
                scale=scale)
        else:
            seed, offset = self._rng(op, q.device)
            bias = None
            if mask.kind not in ("full", "causal"):
                bias = additive_bias(mask.tensor(q.device), q.dtype, qh.shape[0], qh.shape[1])
            dq, dk, dv, _ = self._aten._scaled_dot_product_efficient_attention_backward(
                doh, qh, kh, vh, bias, oh, lse_to_op(op, lse), seed, offset, 0.0, [True, True, True, False],
                is_causal=causal, scale=scale)
        hkv = k.shape[2]
        return (dq.transpose(1, 2).float(), _reduce_kv(dk.transpose(1, 2).float(), hkv),
                _reduce_kv(dv.transpose(1, 2).float(), hkv))


class FlashKernel:
    """flash-attn (CUDA, fp16/bf16): full and causal blocks; other (tile-sized window edge) blocks
    go through :class:`CudaSdpaKernel` (efficient op with a tile-sized bias)."""

    name = "flash"

    def __init__(self):
        from flash_attn import flash_attn_interface as fai  # optional dependency, CUDA only

        self._fai = fai
        self._fallback = CudaSdpaKernel()

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
        self._fai._flash_attn_backward(dout.to(q.dtype), q, k, v, out.to(q.dtype),
                                       _lse_for_backward(lse.float()).contiguous(), dq, dk, dv,
                                       0.0, scale, mask.kind == "causal", -1, -1, 0.0, None, False)
        return dq.float(), dk.float(), dv.float()


@functools.lru_cache(maxsize=1)
def flash_available() -> bool:
    """Is the optional flash-attn package importable? (Asked once: a failed import is not cached by
    Python, and every attention call resolves its kernel.)"""
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_kernel_name(name: str, device_type: str, dtype: torch.dtype, flash_importable: bool) -> str:
    """``auto`` -> the kernel for inputs on ``device_type`` in ``dtype`` (pure); other names unchanged.

    flash-attn when importable on CUDA half/bf16; else torch's CUDA ops (``cuda``) for CUDA
    fp16/bf16/fp32; ``sdpa`` on CPU; ``math`` elsewhere (CUDA float64 references, other devices).
    """
    if name not in KERNELS:
        raise ValueError(f"kernel={name!r} is not supported; valid kernels: {', '.join(KERNELS)}")
    if name != "auto":
        return name
    if device_type == "cuda":
        if dtype in HALF_DTYPES and flash_importable:
            return "flash"
        return "cuda" if dtype in HALF_DTYPES + (torch.float32,) else "math"
    return "sdpa" if device_type == "cpu" else "math"


def get_kernel(name: str, device: torch.device, dtype: torch.dtype):
    """Resolve a kernel name (``auto``/``sdpa``/``math``/``flash``/``cuda``) for inputs on device/dtype."""
    device = torch.device(device)
    name = resolve_kernel_name(name, device.type, dtype, device.type == "cuda" and flash_available())
    if name == "sdpa":
        if device.type != "cpu":
            raise ValueError(f"kernel='sdpa' is implemented for CPU tensors only (got device {device}); "
                             "use kernel='cuda', 'flash' or 'math' on CUDA")
        return SdpaCpuKernel()
    if name == "cuda":
        if device.type != "cuda":
            raise ValueError(f"kernel='cuda' runs torch's CUDA attention ops and needs CUDA tensors (got "
                             f"device {device}); use kernel='sdpa' or 'math' on CPU")
        return CudaSdpaKernel()
    if name == "flash":
        if device.type != "cuda" or not flash_available():
            raise ValueError(f"kernel='flash' needs CUDA tensors and the flash-attn package (device {device})")
        return FlashKernel()
    return MathKernel()


def default_scale(head_dim: int, scale: Optional[float]) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)

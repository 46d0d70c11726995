"""The torch-native CUDA block kernel (``kernel='cuda'``).

On CPU: the op table (:func:`select_cuda_op`), the ``auto`` resolution, the lse layout conversions,
the aligned additive bias, empty-row handling, and the whole kernel against fp64 with the aten ops
replaced by CPU stand-ins that reproduce each op's layouts (efficient's 32-padded lse with garbage
past Sq, cuDNN's [B, H, Sq, 1] lse, NaN on fully masked rows).
On a GPU (marked ``gpu``): every CUDA kernel (each torch op, flash-attn if importable, math) against
the float64 reference in fp16/bf16/fp32, full/causal/window/shifted blocks, GQA, forward and backward.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import parallelism.context.kernels as kernels
import parallelism.context.simulate as simulate
from parallelism.context.kernels import (CUDA_OPS, CudaSdpaKernel, MathKernel, additive_bias, get_kernel,
                                         lse_from_op, lse_to_op, resolve_kernel_name, select_cuda_op,
                                         zero_empty_rows)
from parallelism.context.layouts import Chunk
from parallelism.context.masks import classify
from tests.test_cp_reference import max_rel_err, random_qkv, reference_attention
from tests.test_gpu_path import CP_VARIANTS

HALF = (torch.float16, torch.bfloat16)
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run by make gpu-check)")

# Blocks of the ring: (name, query chunk, key chunk, causal, window). "window" is a tile edge of a
# sliding window (an explicit mask with fully masked rows), "shifted" a striped block (keys after queries).
BLOCKS = {
    "full": (Chunk(64, 1, 64), Chunk(0, 1, 48), True, None),
    "causal": (Chunk(0, 1, 64), Chunk(0, 1, 64), True, None),
    "window": (Chunk(64, 1, 64), Chunk(0, 1, 64), True, 40),
    "shifted": (Chunk(0, 4, 64), Chunk(1, 4, 64), True, None),
}


def _block(name):
    q, k, causal, window = BLOCKS[name]
    return classify(q, k, causal, window)


def test_block_table_covers_the_kinds():
    assert [_block(n).kind for n in BLOCKS] == ["full", "causal", "explicit", "shifted"]
    assert bool((~_block("window").tensor().any(-1)).any())          # the window edge has empty rows


def test_op_selection_table():
    allops = CUDA_OPS
    assert select_cuda_op("causal", torch.bfloat16, 64, allops) == "flash"
    assert select_cuda_op("full", torch.float16, 128, allops) == "flash"
    assert select_cuda_op("causal", torch.float32, 64, allops) == "efficient"        # fp32: efficient only
    assert select_cuda_op("explicit", torch.bfloat16, 64, allops) == "efficient"     # a bias: efficient only
    assert select_cuda_op("shifted", torch.float16, 64, allops) == "efficient"
    assert select_cuda_op("causal", torch.bfloat16, 64, ("efficient",)) == "efficient"   # no flash (pre-sm80)
    assert select_cuda_op("causal", torch.bfloat16, 512, allops) == "efficient"      # flash: head_dim <= 256
    assert select_cuda_op("full", torch.bfloat16, 64, allops, ("cudnn", "efficient")) == "cudnn"
    assert select_cuda_op("full", torch.bfloat16, 192, allops, ("cudnn", "efficient")) == "efficient"
    for kind, dtype, d in (("causal", torch.float64, 64), ("causal", torch.bfloat16, 12),
                           ("causal", torch.float32, 6)):
        with pytest.raises(ValueError, match="head_dim"):
            select_cuda_op(kind, dtype, d, allops)


def test_auto_resolution():
    assert resolve_kernel_name("auto", "cuda", torch.bfloat16, True) == "flash"
    assert resolve_kernel_name("auto", "cuda", torch.float16, False) == "cuda"
    assert resolve_kernel_name("auto", "cuda", torch.float32, True) == "cuda"       # flash-attn: half only
    assert resolve_kernel_name("auto", "cuda", torch.float64, False) == "math"      # fp64 references
    assert resolve_kernel_name("auto", "cpu", torch.bfloat16, True) == "sdpa"
    assert resolve_kernel_name("auto", "mps", torch.float32, False) == "math"
    assert resolve_kernel_name("math", "cuda", torch.bfloat16, True) == "math"      # explicit names stay
    with pytest.raises(ValueError, match="valid kernels"):
        resolve_kernel_name("xformers", "cuda", torch.bfloat16, True)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        get_kernel("cuda", torch.device("cpu"), torch.float32)


def test_lse_layouts_round_trip():
    lse = torch.randn(2, 3, 45)
    padded = lse_to_op("efficient", lse)
    assert padded.shape == (2, 3, 64) and torch.equal(padded[..., :45], lse) and padded.is_contiguous()
    assert torch.equal(lse_from_op("efficient", torch.cat([lse, torch.full((2, 3, 19), 7.0)], -1), 45), lse)
    assert lse_to_op("efficient", lse[..., :32]).shape == (2, 3, 32)              # already aligned: no pad
    four = lse_to_op("cudnn", lse, ndim=4)
    assert four.shape == (2, 3, 45, 1) and torch.equal(lse_from_op("cudnn", four, 45), lse)
    assert torch.equal(lse_from_op("cudnn", lse, 45), lse)                         # a 3-D cuDNN lse
    strided = lse.transpose(1, 2).contiguous().transpose(1, 2)
    assert lse_to_op("flash", strided).is_contiguous()
    assert lse_from_op("flash", lse.half(), 45).dtype == torch.float32


def test_additive_bias_is_aligned_broadcast_and_exact():
    allowed = _block("window").tensor()
    bias = additive_bias(allowed, torch.bfloat16, 2, 4)
    assert bias.shape == (2, 4, 64, 64) and bias.dtype == torch.bfloat16
    assert bias.stride()[:2] == (0, 0) and bias.stride(2) % 16 == 0 and bias.stride(3) == 1
    assert torch.equal(bias[1, 3] == 0, allowed) and bool(torch.isneginf(bias[0, 0][~allowed]).all())
    odd = additive_bias(torch.ones(3, 21, dtype=torch.bool), torch.float32, 1, 1)
    assert odd.stride(2) == 32 and odd.shape[-1] == 21


def test_empty_rows_get_zero_out_and_neg_inf_lse():
    allowed = torch.tensor([[True, False], [False, False], [True, True]])
    out = torch.full((1, 3, 2, 4), float("nan"))
    out[:, 0] = 1.0
    out[:, 2] = 2.0
    lse = torch.zeros(1, 2, 3)
    o2, l2 = zero_empty_rows(out, lse, allowed)
    assert bool((o2[:, 1] == 0).all()) and bool(torch.isneginf(l2[..., 1]).all())
    assert bool((o2[:, 0] == 1).all()) and bool((o2[:, 2] == 2).all()) and bool((l2[..., [0, 2]] == 0).all())
    assert zero_empty_rows(out, lse, None)[0] is out
    # per-sample documents: the mask is [B, 1, Sq, Sk]; each sample keeps its own empty rows
    per_sample = torch.stack([allowed, torch.ones_like(allowed)])[:, None]
    out2 = torch.full((2, 3, 2, 4), float("nan"))
    out2[0, [0, 2]], out2[1] = 1.0, 1.0
    o3, l3 = zero_empty_rows(out2, torch.zeros(2, 2, 3), per_sample)
    assert bool((o3[0, 1] == 0).all()) and bool(torch.isneginf(l3[0, :, 1]).all()) and bool((o3[1] == 1).all())
    assert not bool(torch.isneginf(l3[1]).any())
    bias = additive_bias(per_sample, torch.float32, 2, 3)
    assert bias.shape == (2, 3, 3, 2) and torch.equal(bias[0, 2] == 0, allowed) and bool((bias[1] == 0).all())


# --- CPU stand-ins for the aten CUDA ops, with each op's own layouts ------------------------------

def _attend(q, k, v, bias, causal, scale):
    """[B, H, S, D] fp64 math: (out, lse [B, H, Sq], p)."""
    s = torch.matmul(q.double(), k.double().transpose(-1, -2)) * scale
    if causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool).tril(), float("-inf"))
    if bias is not None:
        s = s + bias.double()
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None])                         # NaN on fully masked rows, like 0/0
    return torch.matmul(p, v.double()), lse, s


def _attend_backward(do, q, k, v, out, lse, bias, causal, scale):
    _, _, s = _attend(q, k, v, bias, causal, scale)
    p = torch.exp(s - lse.double()[..., None])
    do, out = do.double(), out.double()
    dp = torch.matmul(do, v.double().transpose(-1, -2))
    ds = p * (dp - (do * out).sum(-1, keepdim=True))
    return ((torch.matmul(ds, k.double()) * scale).to(q.dtype), (torch.matmul(ds.transpose(-1, -2), q.double())
                                                              * scale).to(k.dtype),
            torch.matmul(p.transpose(-1, -2), do).to(v.dtype))


def _seed():
    return torch.empty((), dtype=torch.long)


def _fake_aten(seen: list):
    def flash(q, k, v, *, dropout_p, is_causal, return_debug_mask, scale):
        assert dropout_p == 0.0 and not return_debug_mask
        out, lse, _ = _attend(q, k, v, None, is_causal, scale)
        return out.to(q.dtype), lse.float(), None, None, q.shape[2], k.shape[2], _seed(), _seed(), None

    def flash_bwd(do, q, k, v, out, lse, cq, ck, max_q, max_k, dropout_p, is_causal, seed, offset, *, scale):
        assert lse.shape == q.shape[:3] and lse.is_contiguous() and lse.dtype == torch.float32
        assert out.dtype == q.dtype == do.dtype and (max_q, max_k) == (q.shape[2], k.shape[2])
        seen.append("flash")
        return _attend_backward(do, q, k, v, out, lse, None, is_causal, scale)

    def efficient(q, k, v, bias, compute_log_sumexp, *, dropout_p, is_causal, scale):
        assert compute_log_sumexp and (bias is None or (bias.stride(-2) % 16 == 0 and bias.dtype == q.dtype))
        out, lse, _ = _attend(q, k, v, bias, is_causal, scale)
        pad = -(-q.shape[2] // 32) * 32 - q.shape[2]
        lse = torch.cat([lse.float(), torch.full(lse.shape[:2] + (pad,), 1e30)], -1)    # garbage past Sq
        return out.to(q.dtype), lse, _seed(), _seed()

    def efficient_bwd(do, q, k, v, bias, out, lse, seed, offset, dropout_p, grad_input_mask, *, is_causal, scale):
        assert lse.shape[-1] % 32 == 0 and lse.shape[-1] >= q.shape[2] and grad_input_mask == [True, True, True, False]
        seen.append("efficient")
        return _attend_backward(do, q, k, v, out, lse[..., :q.shape[2]], bias, is_causal, scale) + (None,)

    def cudnn(q, k, v, bias, compute_log_sumexp, *, dropout_p, is_causal, return_debug_mask, scale):
        assert bias is None and compute_log_sumexp
        out, lse, _ = _attend(q, k, v, None, is_causal, scale)
        return out.to(q.dtype), lse.float()[..., None], None, None, q.shape[2], k.shape[2], _seed(), _seed(), None

    def cudnn_bwd(do, q, k, v, out, lse, seed, offset, bias, cq, ck, max_q, max_k, dropout_p, is_causal, *, scale):
        assert lse.dim() == 4 and lse.shape[-1] == 1
        seen.append("cudnn")
        return _attend_backward(do, q, k, v, out, lse[..., 0], None, is_causal, scale)

    return SimpleNamespace(
        _scaled_dot_product_flash_attention=flash, _scaled_dot_product_flash_attention_backward=flash_bwd,
        _scaled_dot_product_efficient_attention=efficient,
        _scaled_dot_product_efficient_attention_backward=efficient_bwd,
        _scaled_dot_product_cudnn_attention=cudnn, _scaled_dot_product_cudnn_attention_backward=cudnn_bwd)


def _inputs(name, hq, hkv, d, dtype, device="cpu", seed=0):
    mask = _block(name)
    gen = torch.Generator().manual_seed(seed)
    sq, sk = mask.q.length, mask.k.length
    q = torch.randn(2, sq, hq, d, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, sk, hkv, d, generator=gen, dtype=torch.float64) for _ in range(2))
    do = torch.randn(2, sq, hq, d, generator=gen, dtype=torch.float64)
    return mask, [x.to(device) for x in (q, k, v, do)], [x.to(device=device, dtype=dtype) for x in (q, k, v, do)]


def _rel(x, ref, rows=None):
    x, ref = x.double(), ref.double()
    if rows is not None:
        x, ref = x[:, rows], ref[:, rows]
    return float((x - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def _check_kernel(kern, name, hq, hkv, dtype, tol, device="cpu"):
    """Forward (out, lse) and backward (dq, dk, dv) of ``kern`` vs MathKernel in fp64; returns errors."""
    mask, ref_in, low = _inputs(name, hq, hkv, 32, dtype, device)
    scale = 32 ** -0.5
    ref = MathKernel()
    o64, l64 = ref.forward(*ref_in[:3], mask, scale)
    g64 = ref.backward(ref_in[3], *ref_in[:3], o64, l64, mask, scale)
    out, lse = kern.forward(*low[:3], mask, scale)
    assert out.dtype == lse.dtype == torch.float32 and lse.shape == l64.shape and out.shape == o64.shape
    empty = torch.isneginf(l64)
    assert torch.equal(torch.isneginf(lse), empty) and bool((out.transpose(1, 2)[empty] == 0).all())
    live = ~empty
    errs = {"out": _rel(out, o64), "lse": float((lse[live].double() - l64[live]).abs().max())}
    # backward gets the FINAL merged (out, lse) in fp32, as the ring hands it
    grads = kern.backward(low[3], *low[:3], o64.float(), l64.float(), mask, scale)
    for g_name, g, r in zip(("dq", "dk", "dv"), grads, g64):
        assert g.dtype == torch.float32 and g.shape == r.shape
        errs[g_name] = _rel(g, r)
    assert max(errs.values()) <= tol, (name, dtype, errs)
    return errs


@pytest.mark.parametrize("op", CUDA_OPS)
def test_cuda_kernel_layouts_with_stand_in_ops(op):
    """The kernel's op choice and layout handling, every block kind, GQA, bf16 and fp32, fwd and bwd."""
    seen = []
    kern = CudaSdpaKernel(prefer=(op, "efficient"), available=CUDA_OPS, aten=_fake_aten(seen))
    for name in BLOCKS:
        for dtype, tol in ((torch.bfloat16, 3e-2), (torch.float32, 1e-5)):
            _check_kernel(kern, name, 4, 2, dtype, tol)
    # flash/cuDNN take the bf16 full and causal blocks; everything else (fp32, masks) is efficient's
    n_op = 8 if op == "efficient" else 2
    assert kern.calls == ({"efficient": 8} if op == "efficient" else {op: 2, "efficient": 6}), kern.calls
    assert seen.count(op) == n_op and len(seen) == 8


@pytest.mark.parametrize("op", CUDA_OPS)
def test_installed_torch_ops_accept_the_kernels_arguments(op):
    """The REAL ``torch.ops.aten`` attention ops, on meta tensors (their shape functions run on any
    machine): each op's forward and backward accept exactly the arguments the kernel passes and return
    the layouts it expects — what breaks first when a torch release renames or reorders an argument.
    Masked (additive-bias) blocks too: the kernel reads no value of a device tensor (meta has none; on a GPU
    each read would be a sync)."""
    kern = CudaSdpaKernel(prefer=(op, "efficient"), available=CUDA_OPS)
    for name in ("full", "causal", "window"):
        mask = _block(name)
        for dtype in (torch.bfloat16, torch.float32):
            q = torch.empty(2, mask.q.length, 4, 64, device="meta", dtype=dtype)
            k = torch.empty(2, mask.k.length, 2, 64, device="meta", dtype=dtype)
            out, lse = kern.forward(q, k, k, mask, 0.125)
            assert out.shape == q.shape and out.dtype == torch.float32 and lse.shape == (2, 4, mask.q.length)
            dq, dk, dv = kern.backward(out, q, k, k, out, lse, mask, 0.125)
            assert dq.shape == q.shape and dk.shape == dv.shape == k.shape and dq.dtype == torch.float32
    assert kern.calls == ({"efficient": 6} if op == "efficient" else {op: 2, "efficient": 4}), kern.calls


def test_cuda_kernel_per_sample_documents_with_stand_in_ops():
    """Packed documents that differ per sample: an explicit [B, 1, Sq, Sk] mask (every row of sample 1
    fully masked) through the efficient op's bias, fwd and bwd, equals the fp64 math kernel."""
    # queries 12..23 x keys 0..11: sample 0 (documents [5, 24)) sees keys 5..11, sample 1 nothing
    mask = classify(Chunk(12, 1, 12), Chunk(0, 1, 12), True, None, docs=((0, 5, 24), (0, 12, 24)))
    assert mask.kind == "explicit" and mask.tensor().shape == (2, 1, 12, 12) and mask.allowed == 12 * 7
    kern = CudaSdpaKernel(prefer=("efficient",), available=CUDA_OPS, aten=_fake_aten([]))
    gen = torch.Generator().manual_seed(4)
    q, do = (torch.randn(2, 12, 4, 16, generator=gen, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(2, 12, 2, 16, generator=gen, dtype=torch.float64) for _ in range(2))
    ref = MathKernel()
    o64, l64 = ref.forward(q, k, v, mask, 0.25)
    g64 = ref.backward(do, q, k, v, o64, l64, mask, 0.25)
    out, lse = kern.forward(q.float(), k.float(), v.float(), mask, 0.25)
    assert _rel(out, o64) <= 1e-5 and bool(torch.isneginf(lse[1]).all()) and not bool(torch.isneginf(lse[0]).any())
    assert bool((out[1] == 0).all())
    grads = kern.backward(do.float(), q.float(), k.float(), v.float(), o64.float(), l64.float(), mask, 0.25)
    assert max(_rel(g, r) for g, r in zip(grads, g64)) <= 1e-5


@pytest.mark.parametrize("variant", list(CP_VARIANTS))
def test_the_simulated_ring_runs_the_cuda_kernel_with_stand_in_ops(monkeypatch, variant):
    """What the gpu test test_cp_bf16_error_does_not_grow_with_the_ring runs, with the CUDA kernel class inside the
    simulated ring (its aten ops stood in on CPU, with their layouts and 16-bit outputs): every variant at P = 4 equals
    the fp64 reference, forward and backward, in fp32 (efficient op everywhere) to 1e-5 and in bf16 (flash op on full
    and causal blocks) to the gpu test's 3e-2."""
    layout, degree, piece, window = CP_VARIANTS[variant]
    s, world = 256, 4
    window = None if window is None else 40  # the gpu test's S/8, at S = 256, and off the 32-token tile grid
    # K/V pieces of a quarter shard (16 tokens): the gpu test's size, S/(8P), would be 8 here and 4x the kernel calls
    kv_piece = None if piece(s, world) is None else s // world // 4
    made = []

    def cuda_kernel(name, device, dtype):
        made.append(CudaSdpaKernel(available=("flash", "efficient"), aten=_fake_aten([])))
        return made[-1]

    monkeypatch.setattr(simulate, "get_kernel", cuda_kernel)
    q, k, v = random_qkv(1, s, 8, 2, 16, seed=3)
    ref = reference_attention(q, k, v, causal=True, window=window)
    grad = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
    for dtype, tol, ops in ((torch.float32, 1e-5, {"efficient"}), (torch.bfloat16, 3e-2, {"flash"})):
        xs = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
        out = simulate.simulate_ring_attention(*xs, world_size=world, layout=layout, window=window,
                                               kv_piece=kv_piece, ulysses_degree=degree(world), tile=32)
        grads = torch.autograd.grad(out, xs, grad.to(dtype))
        errs = [max_rel_err(out, ref)] + [max_rel_err(g, r) for g, r in zip(grads, ref_grads)]
        assert max(errs) <= tol, (variant, dtype, errs)
        assert ops <= set(made[-1].calls), (variant, dtype, made[-1].calls)
        if window is not None:  # window-edge tiles carry a mask: the efficient op with a tile-sized bias
            assert made[-1].calls.get("efficient", 0) > 0, (variant, dtype, made[-1].calls)


# --- on a GPU --------------------------------------------------------------------------------------

# max error relative to the reference's largest magnitude (lse: absolute), per dtype
TOLERANCES = {torch.float16: 5e-3, torch.bfloat16: 3e-2, torch.float32: 5e-5}


#: every CUDA block kernel a machine may have, with the dtypes it computes: ``cuda:<op>`` is the torch-ops kernel
#: preferring that op (blocks the op cannot take, e.g. window edges for flash, run the efficient op, as in training)
CUDA_KERNEL_DTYPES = {"math": (torch.float32,) + HALF, "cuda:flash": HALF, "cuda:efficient": HALF + (torch.float32,),
                      "cuda:cudnn": HALF, "flash-attn": HALF}


def _cuda_kernel(label: str):
    """A factory of kernel ``label`` (:data:`CUDA_KERNEL_DTYPES`) on this CUDA machine, or None when it lacks it."""
    if label == "math":
        return MathKernel
    if label == "flash-attn":
        return kernels.FlashKernel if kernels.flash_available() else None
    op = label.split(":", 1)[1]
    available = kernels.available_cuda_ops(torch.device("cuda"))
    return (lambda: CudaSdpaKernel(prefer=(op, "efficient"))) if op in available else None


@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize("name", list(BLOCKS))
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2)])
# applied first, so it varies slowest: the kernels run one after another in CUDA_KERNEL_DTYPES's order, cuDNN (whose
# support varies most) after flash and efficient, so an op that leaves a sticky CUDA error (every later CUDA call of
# the process fails) cannot take the cases of the kernels before it down with it
@pytest.mark.parametrize("label", list(CUDA_KERNEL_DTYPES))
def test_cuda_kernels_match_float64(name, hq, hkv, label, record_property):
    """One test per kernel (and torch op), so that an op this GPU or torch build gets wrong or refuses fails alone and
    the report still shows every other kernel's result; every dtype of the kernel is checked before the verdict."""
    factory = _cuda_kernel(label)
    if factory is None:
        pytest.skip(f"{label} is not available on this machine (torch {torch.__version__}, "
                    f"{torch.cuda.get_device_name()})")
    results, failures = {}, {}
    for dtype in CUDA_KERNEL_DTYPES[label]:
        kern = factory()
        try:
            results[str(dtype)] = _check_kernel(kern, name, hq, hkv, dtype, TOLERANCES[dtype], "cuda")
        except Exception as e:  # noqa: BLE001 - every dtype's outcome goes into the one verdict below
            failures[str(dtype)] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    record_property("errors", {dt: {k: float(f"{e:.3g}") for k, e in errs.items()} for dt, errs in results.items()})
    assert not failures, f"{label} on a {name} block, {hq}:{hkv} heads: {failures}; passed: {results}"


def test_the_gpu_kernel_cases_run_kernel_by_kernel_cudnn_after_flash_and_efficient():
    """pytest varies the first-applied parametrize slowest: the kernel label is it, and cuDNN comes after the ops
    training uses (a sticky CUDA error in a cuDNN case then cannot fail their cases)."""
    params = [mark.args[0] for mark in test_cuda_kernels_match_float64.pytestmark if mark.name == "parametrize"]
    assert params[0] == "label", params
    labels = list(CUDA_KERNEL_DTYPES)
    assert labels.index("cuda:cudnn") > max(labels.index("math"), labels.index("cuda:flash"),
                                            labels.index("cuda:efficient"))


def test_every_cuda_kernel_label_resolves(monkeypatch):
    """The gpu test's kernel labels map to real kernels: each torch op to a CudaSdpaKernel preferring it, math and
    flash-attn to theirs, and an op the machine lacks to None (a skip), with the CUDA probes stood in on CPU."""
    monkeypatch.setattr(kernels, "available_cuda_ops", lambda device: ("flash", "efficient"))
    monkeypatch.setattr(kernels, "flash_available", lambda: False)
    assert _cuda_kernel("math") is MathKernel and _cuda_kernel("flash-attn") is None
    assert _cuda_kernel("cuda:cudnn") is None
    for op in ("flash", "efficient"):
        kern = _cuda_kernel(f"cuda:{op}")()
        assert isinstance(kern, CudaSdpaKernel) and kern.prefer == (op, "efficient")
    assert set(CUDA_KERNEL_DTYPES) == {"math", "flash-attn"} | {f"cuda:{op}" for op in CUDA_OPS}


@pytest.mark.gpu
@cuda_only
def test_auto_on_cuda_never_picks_math_for_low_precision():
    for dtype in HALF + (torch.float32,):
        assert get_kernel("auto", torch.device("cuda"), dtype).name in ("cuda", "flash")

"""The GPU path end to end (marked ``gpu``; run by ``make gpu-check``, skipped with a reason without CUDA).

One GPU: multi-rank context parallelism runs on the in-process simulator with CUDA tensors; NCCL is
checked with world size 1 through the real trainer.

Besides the few helpers imported below, the modules under test are imported inside the tests on purpose: on a
briefly lent GPU machine an import that fails there then fails one test, not the collection of this whole file
(which would leave the one run with no results).
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from dist_train.plan.profiles import builtin_profiles
from tests.test_cp_reference import max_rel_err, random_qkv, reference_attention
from tests.test_gpt_saved_tensors import SHAPES, _config, counted_bytes, predicted_bytes

DEV = "cuda"   # the rehearsal on CPU (docs/gpu_check.md) sets this to "cpu"; the tests run on CUDA

def _sig(x, digits: int = 4):
    """Floats (also inside lists and dicts) to ``digits`` significant digits: the numbers a test records for the report."""
    if isinstance(x, float):
        return float(f"{x:.{digits}g}")
    if isinstance(x, dict):
        return {k: _sig(v, digits) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_sig(v, digits) for v in x]
    return x


pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="needs a CUDA device (run by make gpu-check on a GPU machine)")]

# (name, layout, ulysses_degree(P) -> U, kv_piece(S, P), window): every context-parallel method/layout
CP_VARIANTS = {
    "ring": ("contiguous", lambda P: 1, lambda S, P: None, None),
    "zigzag": ("zigzag", lambda P: 1, lambda S, P: None, None),
    "striped": ("striped", lambda P: 1, lambda S, P: None, None),
    "ulysses": ("zigzag", lambda P: P, lambda S, P: None, None),
    "hybrid": ("zigzag", lambda P: min(2, P), lambda S, P: None, None),
    "kv_pieces": ("zigzag", lambda P: 1, lambda S, P: max(1, S // (8 * P)), None),
    "zigzag_window": ("zigzag", lambda P: 1, lambda S, P: None, 256),
}


def _cp_errors(variant: str, P: int, S: int = 2048) -> list[float]:
    """bf16 CUDA errors (out, dq, dk, dv) of the simulated variant at P ranks vs the fp64 reference."""
    from parallelism.context import simulate_ring_attention

    layout, degree, piece, window = CP_VARIANTS[variant]
    q, k, v = (x.detach().to(DEV).requires_grad_() for x in random_qkv(1, S, 8, 2, 64, seed=3))
    ref = reference_attention(q, k, v, causal=True, window=window)
    grad = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(DEV)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
    xs = [x.detach().to(torch.bfloat16).requires_grad_() for x in (q, k, v)]
    out = simulate_ring_attention(*xs, world_size=P, layout=layout, window=window, kv_piece=piece(S, P),
                                  ulysses_degree=degree(P))
    grads = torch.autograd.grad(out, xs, grad.to(torch.bfloat16))
    return [max_rel_err(out, ref)] + [max_rel_err(g, r) for g, r in zip(grads, ref_grads)]


@pytest.mark.parametrize("variant", list(CP_VARIANTS))
def test_cp_bf16_error_does_not_grow_with_the_ring(variant, record_property):
    """P = 1, 2, 4, 8 on CUDA bf16: every error vs fp64 is bf16-sized and P=8's is <= 1.5x P=1's (the errors, out/dq/dk/dv
    per P, go into the report)."""
    errs = {P: _cp_errors(variant, P) for P in (1, 2, 4, 8)}
    record_property("errors_out_dq_dk_dv", _sig({f"P{P}": e for P, e in errs.items()}, 3))
    for P, e in errs.items():
        assert max(e) <= 3e-2, (variant, P, e)
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        assert errs[8][i] <= 1.5 * errs[1][i], (variant, name, errs)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2), (torch.float32, 1e-4)])
def test_window_parallel_attention_on_cuda(dtype, tol, record_property):
    from parallelism.window import window_parallel_attention
    from tests.test_wp_attention import swin_reference

    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 16, 24, 4, 32, generator=gen, dtype=torch.float64).to(DEV).requires_grad_()
               for _ in range(3))
    want = swin_reference(q, k, v, window=(8, 8), shift=(4, 4), wrap=(False, False), bias=None, scale=32 ** -0.5)
    grad = torch.randn(want.shape, dtype=torch.float64, generator=gen).to(DEV)
    want_grads = torch.autograd.grad(want, (q, k, v), grad)
    xs = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    out = window_parallel_attention(*xs, window=8, shift=4, grid=1, group=None)
    assert out.device.type == DEV and out.dtype == dtype
    grads = torch.autograd.grad(out, xs, grad.to(dtype))
    errs = [max_rel_err(out, want)] + [max_rel_err(g, w) for g, w in zip(grads, want_grads)]
    record_property("errors_out_dq_dk_dv", _sig(errs, 3))
    assert max(errs) <= tol, errs


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_chunked_cross_entropy_on_cuda_equals_the_full_loss(dtype, tol, record_property):
    """Loss value and gradients (h, W) of the chunked loss on CUDA vs the unchunked loss in fp64, with
    ignored tokens and an uneven last chunk."""
    from dist_train.models.chunked_loss import chunked_cross_entropy

    gen = torch.Generator().manual_seed(0)
    n, d, vocab = 1000, 64, 3000
    h64, w64 = torch.randn(n, d, generator=gen, dtype=torch.float64), torch.randn(vocab, d, generator=gen,
                                                                                    dtype=torch.float64) * 0.1
    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[::7] = -100
    h64, w64, labels = h64.to(DEV).requires_grad_(), w64.to(DEV).requires_grad_(), labels.to(DEV)
    ref = torch.nn.functional.cross_entropy(h64 @ w64.t(), labels, ignore_index=-100, reduction="sum")
    ref_dh, ref_dw = torch.autograd.grad(ref, (h64, w64))
    h, w = (x.detach().to(dtype).requires_grad_() for x in (h64, w64))
    loss = chunked_cross_entropy(h, w, labels, 96, ignore_index=-100)
    dh, dw = torch.autograd.grad(loss, (h, w))
    assert loss.device.type == DEV and loss.dtype == torch.float32
    record_property("errors_loss_dh_dw", _sig([abs(loss.item() - ref.item()) / abs(ref.item()), max_rel_err(dh, ref_dh),
                                               max_rel_err(dw, ref_dw)], 3))
    assert abs(loss.item() - ref.item()) <= tol * abs(ref.item())
    assert max_rel_err(dh, ref_dh) <= tol and max_rel_err(dw, ref_dw) <= tol
    assert dh[::7].abs().max().item() == 0.0
    if DEV == "cuda":  # no device sync inside the loss: the host runs ahead through every chunk
        torch.cuda.synchronize()  # (set_sync_debug_mode "error" raises on a synchronizing call such as nonzero)
        torch.cuda.set_sync_debug_mode("error")
        try:
            chunked_cross_entropy(h, w, labels, 96, ignore_index=-100)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("case", ["window", "per-sample documents"])
def test_masked_attention_blocks_make_no_device_sync(case):
    """Window edges and document cuts are explicit blocks (a mask per block, built in every forward and backward)
    through the CUDA block kernel: under set_sync_debug_mode("error") no block reads a device value or makes a
    blocking host-to-device copy (tests/test_device_placement.py checks the same on meta tensors)."""
    from parallelism.context import local_attention

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 2048, 8, 64, generator=gen).to(DEV, torch.bfloat16).requires_grad_()
    k, v = (torch.randn(2, 2048, 2, 64, generator=gen).to(DEV, torch.bfloat16).requires_grad_() for _ in range(2))
    kwargs = {"window": {"window": 300},
              "per-sample documents": {"cu_seqlens": [[0, 700, 2048], [0, 1000, 1500, 2048]]}}[case]

    def step():
        local_attention(q, k, v, causal=True, **kwargs).sum().backward()

    step()  # a first call: the ops chosen, pinned host blocks allocated
    if DEV == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        if DEV == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    assert q.grad.device.type == DEV and bool(torch.isfinite(q.grad).all())


@pytest.mark.parametrize("model", ["gpt, packed documents", "swin"])
def test_a_data_parallel_step_waits_for_the_device_once(model, monkeypatch):
    """Whole steps of the data-parallel engine (4 micro-batches, clipping on: forward, backward, gradient norm, skip
    decision, clipping, AdamW) under set_sync_debug_mode("error"), but for the step's one read of its loss, gradient
    norm and skip decision (``grads.read_floats``: the skip and the clipping coefficient need them on the host),
    which is let through and counted (tests/test_device_placement.py checks the same on meta tensors)."""
    from dist_train.engines import ddp
    from tests.trainer_utils import one_rank_engine_and_batches

    engine, micro = one_rank_engine_and_batches(model, DEV)
    reads, read_floats = [], ddp.read_floats

    def allowed_read(*scalars):
        reads.append(len(scalars))
        if DEV == "cuda":
            torch.cuda.set_sync_debug_mode("default")
        try:
            return read_floats(*scalars)
        finally:
            if DEV == "cuda":
                torch.cuda.set_sync_debug_mode("error")

    engine.train_step(micro, 64.0, loss_limit=1e9)  # a first step: the ops chosen, optimizer state made
    monkeypatch.setattr(ddp, "read_floats", allowed_read)
    if DEV == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        losses = [engine.train_step(micro, 64.0, loss_limit=1e9)[0] for _ in range(2)]
    finally:
        if DEV == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    assert reads == [3, 3] and not engine.last_step_skipped and all(math.isfinite(x) for x in losses)


#: bytes per layer the CUDA attention may save beyond the model's q, k, v, output and logsumexp: flash attention's
#: RNG state (philox seed and offset, saved even without dropout), which the model does not count
CUDA_ATTENTION_RNG_BYTES = 64


@pytest.mark.parametrize("checkpointing", ["none", "selective", "full"])
def test_gpt_kept_activations_on_cuda_are_the_memory_model(checkpointing, record_property):
    """What the GPT's layers keep for backward on CUDA in bf16 autocast (torch SDPA's CUDA kernel, the lean norm and
    SwiGLU Functions, one 16-bit cast per column group, autocast's weight copies) equals the planner's GPU memory
    model (the h100 profile costing this repo's eager modules), as tests/test_gpt_saved_tensors.py checks it on
    CPU to the byte — up to the CUDA attention's RNG state per layer."""
    h100 = builtin_profiles()["h100"]  # costs the eager modules (fused_kernels: false, tests/test_gpu_profiles.py)
    cfg = _config(*SHAPES[0], activation_checkpointing=checkpointing, precision="bf16")
    counted, predicted = counted_bytes(cfg, live=True, device=DEV), predicted_bytes(cfg, h100)
    record_property("counted_bytes", counted)
    record_property("predicted_bytes", predicted)
    assert predicted <= counted <= predicted + CUDA_ATTENTION_RNG_BYTES * cfg.model.n_layers, (counted, predicted)


@pytest.fixture(scope="module")
def nccl_world_one(tmp_path_factory):
    """The default process group on NCCL with world size 1, for this module's NCCL tests, destroyed after them: a
    process exiting with a live NCCL group warns and can block in its destructor, and the tests section would then
    sit until its time limit after its last test."""
    rendezvous = tmp_path_factory.mktemp("nccl") / "rendezvous"
    dist.init_process_group("nccl", init_method=f"file://{rendezvous}", rank=0, world_size=1,
                            device_id=torch.device("cuda", torch.cuda.current_device()))
    assert dist.get_backend() == "nccl" and dist.get_world_size() == 1
    yield dist.group.WORLD
    dist.destroy_process_group()


def _tiny_run(tmp_path: Path, name: str, precision: str, steps: int = 12, **checkpoint):
    from dist_train.trainer import train
    from tests.trainer_utils import tiny_gpt_config

    cfg = tiny_gpt_config(tmp_path / name, steps=steps, train={"precision": precision, "global_batch": 8,
                                                               "micro_batch": 4, "lr": 3e-3},
                          model={"d_model": 128, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 257},
                          data={"seq_len": 256}, checkpoint=checkpoint or {"every": 0, "at_end": False})
    return train(cfg)


def test_trainer_on_one_gpu_with_nccl_bf16_vs_fp32(tmp_path, nccl_world_one, record_property):
    """gpt_tiny-sized model, NCCL world size 1: bf16 trains (loss falls) and tracks fp32 on the first
    steps; CUDA peak memory is reported; MFU uses the GPU's bf16 peak (not the CPU calibration)."""
    from dist_train.metrics import cuda_peak

    torch.cuda.reset_peak_memory_stats()
    bf16 = _tiny_run(tmp_path, "bf16", "bf16")
    fp32 = _tiny_run(tmp_path, "fp32", "fp32")
    assert bf16.exit_code == 0 and fp32.exit_code == 0
    s = bf16.summary
    record_property("bf16_losses", _sig(bf16.losses))
    record_property("fp32_losses", _sig(fp32.losses))
    for key in ("peak_mem_bytes", "median_step_time_s", "tokens_per_s", "mfu", "device_peak_tflops", "device_peak_source"):
        record_property(f"bf16_{key}", _sig(s[key]))
    assert bf16.losses[-1] < bf16.losses[0] - 0.3, bf16.losses
    for a, b in zip(bf16.losses[:3], fp32.losses[:3]):
        assert abs(a - b) <= 2e-2 * abs(b), (bf16.losses[:3], fp32.losses[:3])
    assert 0 < s["peak_mem_bytes"] <= torch.cuda.get_device_properties(0).total_memory
    bf16_peak = cuda_peak(torch.device("cuda", 0), torch.bfloat16)
    assert s["device_peak_tflops"] == bf16_peak.tflops and s["device_peak_source"] == bf16_peak.source, s
    assert s["mfu"] is not None and 0 < s["mfu"] < 1, s


def test_profiled_steps_on_cuda_trace_kernels_and_the_allocator(tmp_path, record_property):
    """``profile.steps`` with ``profile.memory`` on one GPU: the trace holds exactly the window's steps and CUDA
    kernels, the allocator snapshot loads with its segments and alloc/free history, and the losses are those of the
    same run unprofiled (profiling observes, never changes; equal to GPU run-to-run noise: tests/test_profiling.py
    checks them bit for bit on CPU)."""
    import gzip
    import json
    import pickle

    from dist_train.profiling import MEMORY_SUFFIX, PROFILE_DIR, TRACE_SUFFIX
    from dist_train.trainer import train
    from tests.trainer_utils import tiny_gpt_config

    def run(name: str, **profile):
        return train(tiny_gpt_config(tmp_path / name, steps=4, train={"precision": "bf16"},
                                     **({"profile": profile} if profile else {})))

    plain, profiled = run("plain"), run("profiled", steps=[3, 4], memory=True)
    # not bit for bit: the GPU's attention backward may accumulate in a different order run to run
    assert profiled.exit_code == 0 and all(math.isclose(a, b, rel_tol=5e-3) for a, b in
                                           zip(profiled.losses, plain.losses, strict=True)), (profiled.losses, plain.losses)
    folder = tmp_path / "profiled" / PROFILE_DIR
    trace, = folder.glob(f"*{TRACE_SUFFIX}")
    events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
    steps = sorted(int(e["name"].split("#")[1]) for e in events if e.get("name", "").startswith("ProfilerStep#"))
    kernels = [e for e in events if e.get("cat") == "kernel"]
    record_property("trace_kernels", len(kernels))
    assert steps == [3, 4] and kernels, (steps, len(kernels))
    snapshot, = folder.glob(f"*{MEMORY_SUFFIX}")
    with snapshot.open("rb") as f:
        memory = pickle.load(f)
    record_property("snapshot_segments", len(memory["segments"]))
    assert memory["segments"] and any(memory["device_traces"]), list(memory)
    summary = json.loads((tmp_path / "profiled" / "summary.json").read_text())
    assert summary["profile_files"] == [f"{PROFILE_DIR}/{trace.name}", f"{PROFILE_DIR}/{snapshot.name}"], summary


def test_the_steps_cpu_scalars_reduce_over_an_nccl_group(nccl_world_one):
    """The trainer's token count and the engines' loss sums are float64 CPU tensors, reduced over the mesh's groups;
    NCCL refuses CPU tensors ("No backend type associated with device type cpu"), so on more than one GPU every step
    failed. They are reduced on the group's device: checked on a world-size-1 NCCL group, which refuses a CPU tensor
    exactly as eight ranks do (the trainer at world size 1 has no groups). The gradient norm's partial sums stay on
    the GPU for all their reductions (no host round trip, no sync until the final float)."""
    from dist_train.engines.grads import all_reduce_sum, global_grad_norm, global_grad_norm_squared

    world = nccl_world_one
    with pytest.raises(RuntimeError):  # the premise: NCCL itself takes no CPU tensor
        dist.all_reduce(torch.ones(1, dtype=torch.float64), group=world)
    t = torch.tensor([3.0, 4.0], dtype=torch.float64)
    assert all_reduce_sum(t, world) is t and t.device.type == "cpu" and t.tolist() == [3.0, 4.0]
    p = torch.nn.Parameter(torch.ones(4, device="cuda"))
    p.grad = torch.full((4,), 2.0, device="cuda")
    assert global_grad_norm([p], tp_group=world, pp_group=world) == 4.0
    # the gradient norm's partial sums never leave the GPU: reduced there, no host copy, no device sync
    # (set_sync_debug_mode "error" raises on any synchronizing call: a .cpu(), .item(), stream synchronize)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        squared = global_grad_norm_squared([p], tp_group=world, pp_group=world)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert squared.device.type == "cuda" and squared.tolist() == [16.0], squared


def test_async_checkpoint_of_gpu_tensors_is_bit_exact(tmp_path):
    """Async save of CUDA model + optimizer state, verify the files, resume into fresh objects: every
    tensor equal bit for bit, back on the GPU."""
    from dist_train.checkpoint import CheckpointManager, complete_checkpoints, verify_checkpoint
    from dist_train.config import CheckpointConfig
    from tests.test_ckpt_common import build, model_config, seed_rank

    seed_rank(0)
    model, opt, sched = build()
    model.to(DEV)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(3):
        x = torch.randint(0, 29, (4, 8), device=DEV)
        model(x).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    cfg = CheckpointConfig(async_save=True, dir=str(tmp_path / "ckpt"))
    mgr = CheckpointManager(cfg, run_dir=tmp_path, config=model_config(), layout={"world_size": 1})
    assert mgr.save(3, model, opt, None, extra={"step": 3, "consumed_samples": 12})
    mgr.close()
    assert mgr.failed_saves == 0
    (step, path), = complete_checkpoints(tmp_path / "ckpt")
    assert step == 3 and verify_checkpoint(path) == []

    model2, _, _ = build(seed=9)
    model2.to(DEV)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=3e-3)
    mgr2 = CheckpointManager(cfg, run_dir=tmp_path, config=model_config(), layout={"world_size": 1})
    assert mgr2.resume(model2, opt2, None) == {"step": 3, "consumed_samples": 12}
    mgr2.close()
    for (n, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert b.device.type == DEV and torch.equal(a, b), n
    for st_a, st_b in zip(opt.state.values(), opt2.state.values()):
        for key in st_a:
            assert torch.equal(st_a[key].cpu(), st_b[key].cpu()), key


def test_bf16_matmul_peak_is_measurable(record_property):
    """The MFU denominator of the benchmarks: a large bf16 matmul runs and reports a plausible rate."""
    from dist_train.gpucheck.bench import matmul_peak_tflops

    tflops = matmul_peak_tflops(n=4096, repeats=3)
    record_property("bf16_matmul_4096_tflops", _sig(tflops))
    assert math.isfinite(tflops) and 1.0 < tflops < 5000.0, tflops


def test_fp32_gqa_attention_on_cuda_keeps_no_scores(record_property):
    """CUDA fp32 with grouped-query heads (SDPA would run its math kernel, [B, Hq, S, S] probabilities): the model's
    entry point takes the block kernels' memory-efficient op: exact against float64 at S 512 and, at S 8192 with
    8:2 heads, a fwd+bwd peak far below one [Hq, S, S] fp32 probability matrix (2 GiB)."""
    from dist_train.models.attention import local_causal_attention

    q, k, v = (x.detach().to(DEV).requires_grad_() for x in random_qkv(1, 512, 8, 2, 64, seed=5))
    ref = reference_attention(q, k, v, causal=True)
    out = local_causal_attention(*(x.float().detach().requires_grad_() for x in (q, k, v)), None)
    record_property("error_s512", _sig(max_rel_err(out, ref), 3))
    assert max_rel_err(out, ref) <= 1e-4
    s, hq = 8192, 8
    q, k, v = (torch.randn(1, s, h, 64, device=DEV, requires_grad=True) for h in (hq, 2, 2))
    if DEV == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    local_causal_attention(q, k, v, None).sum().backward()
    if DEV == "cuda":
        extra = torch.cuda.max_memory_allocated() - base
        record_property("fwd_bwd_extra_peak_mib_s8192", _sig(extra / 2**20))
        assert extra < hq * s * s * 4 / 8, extra       # an [Hq, S, S] fp32 matrix is 2 GiB

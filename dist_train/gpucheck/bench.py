"""GPU benchmarks of ``make gpu-check`` (CUDA only; each returns plain dicts for the report).

    python3 -m dist_train.gpucheck.bench dispatch --out dispatch.json
    python3 -m dist_train.gpucheck.bench kernels --out kernels.json
    python3 -m dist_train.gpucheck.bench llama --out llama.json --budget-s 240

``dispatch``: the host's cost per eager op of the GPT (:mod:`dist_train.gpucheck.dispatch`), beside the planner
profile's ``host_op_us``; the one benchmark that also runs without CUDA (a smoke on CPU, few iterations).
``kernels``: fwd+bwd TFLOP/s of the block kernel ``auto`` picks (and torch's CUDA ops kernel) vs
``torch.nn.functional.scaled_dot_product_attention`` on one S×S block, bf16, causal and full; then packed
documents through ``local_attention`` (the planner's blocks, sub-blocks of at most EXPLICIT_TILE where documents
cut a block): documents shared by the batch and documents that differ per sample, timed against the same
call without documents, beside the speed-up their skipped pairs would allow (the kernel calls the plan makes
cost launches and masks; a GPU is where that shows).
``llama``: a ~1B-parameter Llama-style GPT (d 2048, 16 layers, 32 heads / 8 K/V heads, SwiGLU 8192,
vocab 32000; 1.10B parameters) on one GPU in bf16 autocast with full activation checkpointing and the
chunked loss: (1) one training step
at S = 8192: tokens/s and MFU against the bf16 matmul peak measured in the same run (and the table
peak); (2) the longest S one step trains at with a sliding window (the million-token recipe at
cp = 1), by doubling then bisection under the time budget, with peak bytes per token; (3) an async
checkpoint of its model + AdamW state: bytes, GB/s, the stall of ``save()`` and the step time while
the write runs. Times are CUDA-event medians over repeats after a warm-up. A JSON file is
rewritten after every part, every longest-S trial and every checkpoint measurement, so a run cut
short keeps what it measured; the longest-S search starts no trial its time budget cannot hold
(predicted from the measured step) and leaves the checkpoint its reserve (the disk write is the one
part nothing bounds, so it runs last).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend
from parallelism.context import CPStats, local_attention
from parallelism.context.kernels import CudaSdpaKernel, get_kernel
from parallelism.context.layouts import Chunk
from parallelism.context.masks import classify

from dist_train.checkpoint import CheckpointManager
from dist_train.config import CheckpointConfig, Config, config_from_dict
from dist_train.cost.flops import FLOP_CONVENTION, model_params, train_flops_per_token
from dist_train.gpucheck.dispatch import measure_dispatch
from dist_train.metrics import cuda_peak, peak_memory_bytes, timed_matmul_tflops
from dist_train.models.attention import AttentionContext
from dist_train.models.gpt import GPT

#: the checkpoint part's time, planned before the longest-S search so that it keeps enough: the write at this
#: rate (the slowest disk planned for; NVMe writes several GB/s) plus the fixed part (pinned staging, two steps)
CHECKPOINT_PLAN_GB_S = 0.5
CHECKPOINT_FIXED_S = 15.0
LLAMA_1B = dict(kind="gpt", d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_hidden=8192,
                vocab_size=32000, rope_theta=500000.0)


def device_times(fn: Callable[[], object], repeats: int, device: torch.device = torch.device("cuda"),
                 warmup: int = 1) -> list[float]:
    """Seconds per call of ``fn`` (after ``warmup`` untimed calls): CUDA events on a GPU, wall time else."""
    for _ in range(warmup):
        fn()
    out = []
    if device.type != "cuda":
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        return out
    torch.cuda.synchronize()
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) / 1e3)
    return out


#: seconds of matmuls before the bf16 peak is timed on a GPU: an idle GPU runs at low clocks and raises them under
#: load; the llama benchmark times the peak first, after the GPU idled through the check's start, and ten 1.4 ms
#: matmuls timed cold would read a low peak and overstate every MFU measured against it
GPU_WARM_UP_S = 0.5
#: the matmul size of a warm-up on CPU (:func:`warm_up`)
CPU_WARM_UP_N = 256


def warm_up(device: torch.device, seconds: Optional[float] = None, n: int = 4096) -> None:
    """Keep ``device`` busy with bf16 [n, n] matmuls for ``seconds`` (None: :data:`GPU_WARM_UP_S` on CUDA, none on
    CPU), so that what is timed next runs at the clocks a loaded GPU has."""
    if seconds is None:
        seconds = GPU_WARM_UP_S if device.type == "cuda" else 0.0
    if seconds <= 0:
        return
    if device.type != "cuda":
        # a CPU has no clocks to ramp (the tests rehearse the code there): small matmuls, so that ``seconds`` bounds
        # the loop; one bf16 [4096, 4096] matmul takes minutes on a CPU without bf16 units, one thread
        n = min(n, CPU_WARM_UP_N)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        torch.mm(a, a)
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def matmul_peak_tflops(device: torch.device = torch.device("cuda"), n: int = 8192, repeats: int = 10,
                       warmup_s: Optional[float] = None) -> float:
    """The best bf16 [n, n] @ [n, n] rate of ``repeats`` runs on ``device``, in TFLOP/s: the same measurement
    as the CPU calibration (:func:`dist_train.metrics.timed_matmul_tflops`), after :func:`warm_up` (``warmup_s``)."""
    warm_up(device, warmup_s, n)
    return timed_matmul_tflops(device, torch.bfloat16, n, 1, repeats)


def table_peak_tflops(device: torch.device = torch.device("cuda")) -> float | None:
    """The GPU's bf16 peak from the table the trainer's MFU uses (None off CUDA)."""
    return cuda_peak(device, torch.bfloat16).tflops if device.type == "cuda" else None


def sdpa_backend_of(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> str:
    """The kernel ``F.scaled_dot_product_attention(q, k, v, is_causal=causal)`` dispatches to (q, k, v [B, H, S, D]):
    ``flash_attention``, ``efficient_attention``, ``cudnn_attention``, ``math``. The kernels' target is a ratio to
    SDPA, and which kernel SDPA is depends on the GPU, torch and cuDNN: torch 2.11 with cuDNN > 9.15 puts cuDNN first
    on sm90/sm100 (an H200 among them; ``TORCH_CUDNN_SDPA_DEPRIORITIZED=1`` puts flash back first), while the block
    kernel runs the flash op."""
    return SDPBackend(torch._fused_sdp_choice(q, k, v, is_causal=causal)).name.lower()


# ---------------------------------------------------------------------------------------------
def bench_kernels(seq_lens=(8192, 32768), heads: int = 16, head_dim: int = 128, repeats: int = 5,
                  on_row: Optional[Callable[[list[dict]], None]] = None, device: torch.device = torch.device("cuda"),
                  kernels: Optional[dict] = None, warmup_s: Optional[float] = None) -> list[dict]:
    """fwd+bwd of one block: our kernels vs torch SDPA, bf16, causal and full (4·S²·D·H FLOPs per
    forward for a full block, half for causal; backward 2.5× the forward). ``on_row(rows)`` gets the
    rows so far after each one. ``kernels`` ({label: kernel}; default: ``auto``'s kernel, and torch's CUDA
    ops kernel when ``auto`` is another) and ``device`` exist so the same code runs on CPU (tests). Each row times
    SDPA first: the device is warmed up first (:func:`warm_up`), or the first row's SDPA would run at an idle
    GPU's clocks and flatter the kernel beside it."""
    dev, dt = device, torch.bfloat16
    warm_up(dev, warmup_s)
    if kernels is None:
        kernels = {"auto": get_kernel("auto", dev, dt)}
        if kernels["auto"].name != "cuda":
            kernels["cuda"] = CudaSdpaKernel()
    rows = []
    for s in seq_lens:
        gen = torch.Generator(device=dev).manual_seed(0)
        q, k, v, do = (torch.randn(1, s, heads, head_dim, device=dev, dtype=dt, generator=gen) for _ in range(4))
        scale = head_dim ** -0.5
        for causal in (True, False):
            mask = classify(Chunk(0 if causal else s, 1, s), Chunk(0, 1, s), True, None)
            flops = 4.0 * s * s * head_dim * heads * (0.5 if causal else 1.0) * 3.5
            qs, ks, vs = (x.transpose(1, 2).detach().requires_grad_() for x in (q, k, v))
            dos = do.transpose(1, 2)

            def sdpa():
                out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal)
                out.backward(dos)

            t_sdpa = statistics.median(device_times(sdpa, repeats, dev))
            sdpa_backend = sdpa_backend_of(qs, ks, vs, causal)
            for label, kern in kernels.items():
                def ours(kern=kern):
                    out, lse = kern.forward(q, k, v, mask, scale)
                    kern.backward(do, q, k, v, out, lse, mask, scale)

                before = dict(getattr(kern, "calls", {}))   # the torch op each call ran, this row's calls only
                t = statistics.median(device_times(ours, repeats, dev))
                ops = {op: n - before.get(op, 0) for op, n in getattr(kern, "calls", {}).items() if n > before.get(op, 0)}
                rows.append({"seq_len": s, "causal": causal, "kernel": label, "kernel_name": kern.name,
                             "ops": ops, "ms": t * 1e3, "sdpa_ms": t_sdpa * 1e3, "sdpa_backend": sdpa_backend,
                             "tflops": flops / t / 1e12, "sdpa_tflops": flops / t_sdpa / 1e12,
                             "vs_sdpa": t_sdpa / t})
                if on_row is not None:
                    on_row(rows)
            del qs, ks, vs
        del q, k, v, do
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def document_boundaries(seq_len: int, batch: int, doc_len: int, per_sample: bool, seed: int = 0) -> list[list[int]]:
    """``cu_seqlens`` rows for ``batch`` samples of ``seq_len`` tokens: documents of ``doc_len`` tokens shared by
    every sample, or (``per_sample``) seeded lengths in [doc_len/2, 3·doc_len/2) that differ per sample, as the
    data path's per-sample EOD boundaries do (the last document of a row takes the remainder)."""
    if not per_sample:
        row = list(range(0, seq_len, doc_len)) + [seq_len]
        return [row] * batch
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        row, at = [0], 0
        while True:
            at += int(torch.randint(max(1, doc_len // 2), max(2, doc_len * 3 // 2), (1,), generator=gen))
            if at >= seq_len:
                break
            row.append(at)
        rows.append(row + [seq_len])
    return rows


def bench_documents(seq_len: int = 32768, batch: int = 2, heads: int = 16, head_dim: int = 128, doc_len: int = 2048,
                    repeats: int = 5, device: torch.device = torch.device("cuda"), dtype: torch.dtype = torch.bfloat16,
                    kernel: str = "auto", on_row: Optional[Callable[[list[dict]], None]] = None) -> list[dict]:
    """Causal fwd+bwd of ``local_attention`` over q, k, v [batch, seq_len, heads, head_dim]: without documents,
    with documents shared by the batch and with documents that differ per sample (:func:`document_boundaries`).
    Each row: ms, the forward's kernel calls and allowed pairs (per sample), ``ideal`` (the speed-up the skipped
    pairs would allow: unmasked pairs / these pairs), ``vs_unmasked`` (measured speed-up) and ``of_ideal`` (their
    ratio: 1 when nothing but the pairs counts; what falls short is the plan's extra calls and masks)."""
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v, do = (torch.randn(batch, seq_len, heads, head_dim, device=device, dtype=dtype, generator=gen)
                   for _ in range(4))
    # one boundary list for the batch, or one per sample (then CPStats.work_pairs sums the samples)
    cases = (("unmasked", None), ("shared documents", document_boundaries(seq_len, batch, doc_len, False)[0]),
             ("per-sample documents", document_boundaries(seq_len, batch, doc_len, True)))
    rows: list[dict] = []
    for case, cu in cases:
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        stats = CPStats()
        local_attention(*leaves, causal=True, kernel=kernel, cu_seqlens=cu, stats=stats)  # count one forward

        def step(leaves=leaves, cu=cu):
            local_attention(*leaves, causal=True, kernel=kernel, cu_seqlens=cu).backward(do)

        t = statistics.median(device_times(step, repeats, device))
        per_sample = cu is not None and isinstance(cu[0], list)
        pairs = stats.work_pairs / (batch if per_sample else 1)
        row = {"case": case, "seq_len": seq_len, "batch": batch, "doc_len": None if cu is None else doc_len,
               "documents": None if cu is None else [len(r) - 1 for r in (cu if per_sample else [cu])], "ms": t * 1e3,
               "kernel_calls": stats.blocks_computed, "pairs": pairs}
        if rows:
            base = rows[0]
            row.update(ideal=base["pairs"] / pairs, vs_unmasked=base["ms"] / row["ms"])
            row["of_ideal"] = row["vs_unmasked"] / row["ideal"]
        rows.append(row)
        if on_row is not None:
            on_row(rows)
        del leaves
    del q, k, v, do
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------
def llama_config(seq_len: int, window=None, model: dict = LLAMA_1B) -> Config:
    """The benchmark model as a full Config (what the FLOP and parameter counts read)."""
    return config_from_dict({"model": dict(model, attention_window=window),
                             "data": {"source": "synthetic", "seq_len": seq_len},
                             "train": {"activation_checkpointing": "full", "precision": "bf16"}})


def build_llama(cfg: Config, device: torch.device):
    """The GPT of ``cfg`` on ``device`` (fp32 master weights; chunked loss, full activation
    checkpointing) with AdamW (fused on CUDA)."""
    m = cfg.model
    model = GPT(m, AttentionContext(window=m.attention_window, kernel="auto"), activation_checkpointing="full",
                init_seed=0, loss_chunk=cfg.train.loss_chunk).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    return model, opt


def _batch(seq_len: int, vocab: int, device: torch.device) -> dict:
    gen = torch.Generator(device=device).manual_seed(seq_len)
    tokens = torch.randint(0, vocab, (1, seq_len + 1), device=device, generator=gen)
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "positions": torch.arange(seq_len, device=device)}


def train_step(model, opt, batch: dict) -> float:
    with torch.autocast(batch["tokens"].device.type, dtype=torch.bfloat16):
        loss_sum, count = model(batch)
    loss = loss_sum / count
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def _cuda_peak_bytes(device: torch.device) -> int | None:
    """The CUDA allocator's peak since the last reset (None on CPU, where the smoke run has none)."""
    return peak_memory_bytes(device) if device.type == "cuda" else None


def _reset_cuda_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def bench_step(model, opt, cfg: Config, peak: float, table_peak: float | None, repeats: int = 3) -> dict:
    """Median training step at cfg's S: tokens/s, TFLOP/s (FLOP convention of dist_train.cost) and MFU."""
    dev, s = _device_of(model), cfg.data.seq_len
    batch = _batch(s, cfg.model.vocab_size, dev)
    _reset_cuda_peak(dev)
    times = device_times(lambda: train_step(model, opt, batch), repeats, dev, warmup=1)
    t = statistics.median(times)
    tflops = train_flops_per_token(cfg) * s / t / 1e12
    peak_mem = _cuda_peak_bytes(dev)
    return {"seq_len": s, "params": model_params(cfg), "step_s": t, "step_times_s": times, "tokens_per_s": s / t,
            "tflops": tflops, "mfu_vs_measured_peak": tflops / peak, "mfu_vs_table_peak": tflops / table_peak if table_peak else None,
            "peak_mem_gib": None if peak_mem is None else peak_mem / 2**30, "activation_checkpointing": "full",
            "loss_chunk": cfg.train.loss_chunk, "flop_convention": FLOP_CONVENTION}


def bench_checkpoint(model, opt, cfg: Config, on_part: Optional[Callable[[dict], None]] = None) -> dict:
    """Async save of model + AdamW state: the stall of save(), the whole save's GB/s, and one training
    step run while the writer thread works (vs the same step undisturbed). ``on_part(result)`` gets the
    result so far after each measurement (the write's time depends on the disk, which nothing here
    bounds: a run stopped during it keeps the stall and the step times)."""
    dev = _device_of(model)
    nbytes = state_bytes(model, opt)
    batch = _batch(cfg.data.seq_len, cfg.model.vocab_size, dev)
    res: dict = {"state_bytes": nbytes,
                 "step_s_quiet": statistics.median(device_times(lambda: train_step(model, opt, batch), 2, dev,
                                                                warmup=0))}
    report = on_part or (lambda part: None)
    root = Path(tempfile.mkdtemp(prefix="gpucheck-ckpt-"))
    try:
        mgr = CheckpointManager(CheckpointConfig(async_save=True, dir=str(root)), run_dir=root,
                                config=cfg.to_dict(), layout={"world_size": 1})
        t0 = time.perf_counter()
        mgr.save(1, model, opt, None, extra={"step": 1})
        # a first save allocates the pinned host buffers that later saves of a run reuse
        res["stall_s"], res["stall_includes_pinned_allocation"] = mgr.last_stall_s, True
        report(res)
        res["step_s_during_write"] = device_times(lambda: train_step(model, opt, batch), 1, dev, warmup=0)[0]
        report(res)
        mgr.close()
        total = time.perf_counter() - t0
    finally:
        shutil.rmtree(root, ignore_errors=True)
    res.update(write_s=mgr.last_write_s, total_s=total, gb_per_s=nbytes / total / 1e9, failed_saves=mgr.failed_saves)
    return res


def state_bytes(model, opt) -> int:
    """Bytes of the model's state dict plus the optimizer's tensor states (what a checkpoint writes)."""
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return nbytes + sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
                        if torch.is_tensor(t))


def checkpoint_reserve_s(nbytes: int) -> float:
    """Seconds the llama benchmark keeps for its checkpoint part after the longest-S search: the write of
    ``nbytes`` at :data:`CHECKPOINT_PLAN_GB_S` plus :data:`CHECKPOINT_FIXED_S`."""
    return CHECKPOINT_FIXED_S + nbytes / CHECKPOINT_PLAN_GB_S / 1e9


#: how running out of GPU memory reads when it is not the caching allocator's OutOfMemoryError: a library's own
#: allocation ("CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED") or a raw cudaMalloc ("CUDA error: out of
#: memory"); none of these leaves the CUDA context unusable, so a shorter length can still be tried
OUT_OF_MEMORY_TEXTS = ("out of memory", "ALLOC_FAILED")


def is_out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` says the GPU ran out of memory (the longest-S search bisects below such a failure)."""
    return isinstance(e, torch.cuda.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and any(text in str(e) for text in OUT_OF_MEMORY_TEXTS))


def trial_step(model, opt, cfg: Config, seq_len: int) -> dict:
    """One training step at ``seq_len``: time, peak memory and bytes per token, or why it failed: out of memory
    (``ok`` False), or any other error (also ``fatal``: the search stops, :func:`bench_longest`)."""
    dev = _device_of(model)
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else None
    _reset_cuda_peak(dev)
    try:
        batch = _batch(seq_len, cfg.model.vocab_size, dev)
        t = device_times(lambda: train_step(model, opt, batch), 1, dev, warmup=0)[0]
    except Exception as e:  # noqa: BLE001 - every failure is a record; KeyboardInterrupt (the limit) still stops it
        opt.zero_grad(set_to_none=True)
        first_line = (str(e).splitlines() or [""])[0]
        if is_out_of_memory(e):
            return {"seq_len": seq_len, "ok": False, "error": first_line[:200]}
        # not memory (a kernel's size limit, a CUDA error): no longer length is tried
        return {"seq_len": seq_len, "ok": False, "fatal": True, "error": f"{type(e).__name__}: {first_line[:300]}"}
    peak = _cuda_peak_bytes(dev)
    return {"seq_len": seq_len, "ok": True, "step_s": t, "peak_gib": None if peak is None else peak / 2**30,
            "bytes_per_token": None if peak is None else (peak - base) / seq_len}


def predicted_step_s(known: dict, seq_len: int) -> float:
    """A training step's time at ``seq_len`` from a completed one (``known``: its ``seq_len`` and
    ``step_s``): linear in S (a window keeps attention linear), with a 1.3x + 5 s margin for the
    first-call and allocator costs of a new length."""
    return known["step_s"] * seq_len / known["seq_len"] * 1.3 + 5.0


def bench_longest(trial: Callable[[int], dict], deadline: float, start: int = 32768, quantum: int = 8192,
                  limit: int = 1 << 23, known: Optional[dict] = None,
                  on_trial: Optional[Callable[[dict], None]] = None) -> dict:
    """Double S from ``start`` until a step fails (OOM; any other error ends the search: ``stopped_by`` "error
    at S=..."), the next one would pass ``deadline``
    (perf_counter time) or exceed ``limit``, then bisect to within max(quantum, S/8). ``trial(S)`` ->
    :func:`trial_step`'s record. ``longest_seq_len`` is the largest S whose step completed (a lower
    bound unless ``stopped_by`` says the bisection converged). ``known``: a completed step of the same
    model (:func:`bench_step`'s record) that predicts the first trial, which is not started when it would
    pass ``deadline``. ``on_trial(result)`` gets the result so far (``stopped_by`` "running") after every
    trial, so a run stopped from outside keeps the trials it finished."""
    trials, ok, bad = [], None, None

    def result(stopped: str) -> dict:
        return {"longest_seq_len": ok["seq_len"] if ok else None,
                "bytes_per_token": ok["bytes_per_token"] if ok else None, "first_failure": bad,
                "stopped_by": stopped, "trials": list(trials)}

    s = start
    if known is not None and time.perf_counter() + predicted_step_s(known, s) > deadline:
        return result(f"time budget (first S={s} predicted {predicted_step_s(known, s):.0f} s)")
    while True:
        rec = trial(s)
        trials.append(rec)
        if rec["ok"]:
            ok = rec
        else:
            bad = s
        if on_trial is not None:
            on_trial(result("running"))
        if rec.get("fatal"):
            return result(f"error at S={s}: {rec['error']}")
        if ok is None:
            return result("the first length failed")
        if bad is None:
            nxt = 2 * s
        else:
            nxt = (ok["seq_len"] + bad) // 2 // quantum * quantum
            if bad - ok["seq_len"] <= max(quantum, ok["seq_len"] // 8) or nxt <= ok["seq_len"]:
                return result("bisection converged")
        if nxt > limit:
            return result(f"the length limit {limit}")
        predicted = predicted_step_s(ok, nxt)
        if time.perf_counter() + predicted > deadline:
            return result(f"time budget (next S={nxt} predicted {predicted:.0f} s)")
        s = nxt


def run_llama(out: Path, budget_s: float, device: torch.device, model: dict = LLAMA_1B, seq_len: int = 8192,
              window: int = 4096, longest_start: int = 32768, longest_limit: int = 1 << 23,
              peak_n: int = 8192) -> dict:
    """The three llama parts (step, longest S, checkpoint), rewriting ``out`` after each. The longest-S
    search stops itself at its deadline, which keeps :func:`checkpoint_reserve_s` for the checkpoint; the
    checkpoint runs last because nothing bounds its disk write (a run stopped there keeps the other parts
    and the checkpoint's stall). The keyword arguments exist so the same code runs on CPU with a tiny
    model (tests)."""
    deadline = time.perf_counter() + budget_s
    res: dict = {"model": dict(model), "device": str(device)}

    def dump():
        out.write_text(json.dumps(res, indent=2))

    t0 = time.perf_counter()
    res["matmul_peak_tflops"] = peak = matmul_peak_tflops(device, n=peak_n)
    res["table_peak_tflops"] = table = table_peak_tflops(device)
    cfg = llama_config(seq_len, None, model)
    mdl, opt = build_llama(cfg, device)
    res["build_s"] = time.perf_counter() - t0
    dump()
    res["step"] = bench_step(mdl, opt, cfg, peak, table)
    dump()
    reserve = checkpoint_reserve_s(state_bytes(mdl, opt))
    res["checkpoint_reserve_s"] = reserve
    # the same weights with a sliding window (the million-token recipe at cp = 1): attention reads
    # its context at call time
    full_ctx = {name: layer.attention.ctx for name, layer in mdl.layers.items()}
    for layer in mdl.layers.values():
        layer.attention.ctx = dataclasses.replace(layer.attention.ctx, window=window)
    cfg_w = llama_config(seq_len, window, model)

    def keep(part: dict) -> None:
        res["longest"] = dict(window=window, **part)
        dump()

    keep(bench_longest(lambda s: trial_step(mdl, opt, cfg_w, s), deadline - reserve, start=longest_start,
                       quantum=min(8192, longest_start), limit=longest_limit, known=res["step"], on_trial=keep))
    for name, layer in mdl.layers.items():  # the checkpoint's steps are the step measured above
        layer.attention.ctx = full_ctx[name]

    def keep_checkpoint(part: dict) -> None:
        res["checkpoint"] = dict(part)
        dump()

    keep_checkpoint(bench_checkpoint(mdl, opt, cfg, on_part=keep_checkpoint))
    return res


#: the dispatch benchmark's iterations without CUDA: a smoke of the code, not a measurement anyone plans with
DISPATCH_CPU_SMOKE = dict(iters=10, repeats=3)
DISPATCH_CPU_NOTE = ("no CUDA device: measured on CPU, where the ops run on the host (the cpu profile's serial "
                     "op_overhead_us regime), not a GPU's dispatch")


def run_dispatch() -> dict:
    """The dispatch benchmark on the GPU, or its smoke on CPU (few iterations, marked ``smoke``)."""
    if torch.cuda.is_available():
        return measure_dispatch(torch.device("cuda"))
    torch.set_num_threads(1)  # one core, as the cpu profile's calibration: a shared machine's threads would contend
    return dict(measure_dispatch(torch.device("cpu"), **DISPATCH_CPU_SMOKE), smoke=DISPATCH_CPU_NOTE)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m dist_train.gpucheck.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=("dispatch", "kernels", "llama"))
    parser.add_argument("--out", required=True, type=Path, help="JSON file to (re)write with the results")
    parser.add_argument("--budget-s", type=float, default=240.0, help="time budget of the llama benchmark")
    args = parser.parse_args(argv)
    if args.name == "dispatch":
        args.out.write_text(json.dumps(run_dispatch(), indent=2))
        return 0
    if not torch.cuda.is_available():
        args.out.write_text(json.dumps({"skipped": "no CUDA device"}))
        return 0
    if args.name == "kernels":
        res: dict = {}

        def keep(part: str) -> Callable[[list[dict]], None]:
            def write(rows: list[dict]) -> None:
                res[part] = rows
                args.out.write_text(json.dumps(res, indent=2))
            return write

        keep("rows")(bench_kernels(on_row=keep("rows")))
        keep("documents")(bench_documents(on_row=keep("documents")))
    else:
        res = run_llama(args.out, args.budget_s, torch.device("cuda"))
        if res["longest"]["stopped_by"].startswith("error"):  # every number is kept; the section reports the error
            print(f"longest-S search: {res['longest']['stopped_by']}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

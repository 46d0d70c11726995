"""Under autocast the norm output reaches its linears already in 16 bits, cast once (``models/autocast_input.py``).

The premise, on the installed torch: autocast's cast of a tensor already in its dtype is the same tensor, so a
linear keeps the caller's 16-bit tensor itself. Then the real GPT in CPU bf16 autocast against the same model with
one cast per linear (``autocast_inputs`` patched back to the input itself, what the code did before): loss and
every parameter's gradient bit-identical, and one 16-bit norm output kept per norm instead of one per linear
(3 for wq|wk|wv, 2 for w1|w3). fp32 and float64 see no cast. Tensor parallelism on two gloo ranks: Megatron's
column layers (no sequence parallelism, their backward under autocast as the pipeline engine runs it) and the
sequence-parallel Function (which casts its chunk before keeping and gathering it) bit-identical to the per-linear
cast too, and Megatron's backward outside autocast still fails on CPU (what ``engines.cpu_autocast_refusal``
refuses). What the whole layer keeps is counted to the byte in tests/test_gpt_saved_tensors.py.
"""
from __future__ import annotations

import pytest
import torch

from dist_train.config import config_from_dict
from dist_train.mesh import build_mesh
from dist_train.models import tensor_parallel
from dist_train.models.autocast_input import autocast_dtype_of, autocast_inputs
from dist_train.models.gpt import build_gpt
from tests.dist_harness import run_ranks
from tests.saved_tensors import parameter_storages

D, SEQ = 32, 16


def _cfg(**parallel):
    return config_from_dict({
        "model": {"kind": "gpt", "d_model": D, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 48,
                  "vocab_size": 64},
        "data": {"seq_len": SEQ}, "parallel": parallel,
        "train": {"global_batch": 2, "micro_batch": 2, "precision": "bf16"}})


def _per_linear_cast(x: torch.Tensor, n: int) -> list:
    """What column_outputs fed the linears before: x itself, each linear casting it under autocast."""
    return [x] * n


def test_autocast_cast_of_a_tensor_in_its_dtype_is_that_tensor():
    lin = torch.nn.Linear(8, 4)
    x16 = torch.randn(3, 8).to(torch.bfloat16).requires_grad_()
    saved: list = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lin(x16)
    assert any(t is x16 for t in saved)


def test_no_cast_without_autocast_or_for_float64():
    x = torch.randn(2, 3, requires_grad=True)
    assert autocast_inputs(x, 3) == [x, x, x]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x64 = x.double()
        assert autocast_dtype_of(x64) is None and autocast_inputs(x64, 2) == [x64, x64]
        assert autocast_dtype_of(x.bfloat16()) is None
        views = autocast_inputs(x, 3)
    assert {v.dtype for v in views} == {torch.bfloat16}
    assert len({v.untyped_storage().data_ptr() for v in views}) == 1


def _step(model, tokens) -> tuple:
    """One bf16-autocast forward + backward of ``model``: (loss, grads by name, dtypes and shapes of the kept
    non-parameter [B, S, d] storages)."""
    model.zero_grad()
    params = parameter_storages(model)
    kept: dict = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and t.shape[-1] == D and t.numel() == tokens.numel() * D:
            kept[ptr] = t.dtype
        return t

    batch = {"tokens": tokens, "labels": torch.roll(tokens, -1, 1), "positions": torch.arange(tokens.shape[1])}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = model(batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return loss.detach(), grads, sorted(str(t) for t in kept.values())


def test_gpt_bf16_autocast_is_bit_identical_to_one_cast_per_linear_and_keeps_one_cast_per_norm(monkeypatch):
    cfg = _cfg()
    model = build_gpt(cfg, build_mesh(cfg.parallel, 1), torch.device("cpu")).train()
    tokens = torch.randint(0, 64, (2, SEQ), generator=torch.Generator().manual_seed(0))
    loss, grads, kept = _step(model, tokens)
    monkeypatch.setattr(tensor_parallel, "autocast_inputs", _per_linear_cast)
    old_loss, old_grads, old_kept = _step(model, tokens)
    assert torch.equal(loss, old_loss)
    for name, g in grads.items():
        assert torch.equal(g, old_grads[name]), name
    # the [B, S, d]-sized kept storages differ only in the 16-bit norm outputs: 2 layers x (3 + 2) per-linear casts
    # before, 2 layers x 2 shared ones now
    assert old_kept.count("torch.bfloat16") - kept.count("torch.bfloat16") == 2 * (5 - 2)
    assert old_kept.count("torch.float32") == kept.count("torch.float32")


def _tp_new_vs_old(rank: int, world: int, sequence_parallel: bool) -> dict:
    """tp = world: the GPT's layers on this rank's input in bf16 autocast, forward + backward (autocast re-entered
    around Megatron's backward, as the pipeline engine's region spans it), with the shared cast and without."""
    cfg = _cfg(tp=world, sequence_parallel=sequence_parallel)
    model = build_gpt(cfg, build_mesh(cfg.parallel, world), torch.device("cpu")).train()
    s_stream = SEQ // world if sequence_parallel else SEQ
    x0 = torch.randn(2, s_stream, D, generator=torch.Generator().manual_seed(rank))
    cot = torch.randn(2, s_stream, D, generator=torch.Generator().manual_seed(10 + rank))

    def run() -> list:
        model.zero_grad()
        x = x0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model.run_layers(x, torch.arange(SEQ))
            (y.float() * cot).sum().backward()
        return [y.detach(), x.grad] + [p.grad.clone() for p in model.layers.parameters()]

    new = run()
    original_dtype_of, original_inputs = tensor_parallel.autocast_dtype_of, tensor_parallel.autocast_inputs
    tensor_parallel.autocast_dtype_of = lambda x: None
    tensor_parallel.autocast_inputs = _per_linear_cast
    try:
        old = run()
    finally:
        tensor_parallel.autocast_dtype_of, tensor_parallel.autocast_inputs = original_dtype_of, original_inputs
    refused = None
    if not sequence_parallel:
        # the DDP engine's backward runs outside autocast: Megatron's layers still multiply a bf16 gradient by the
        # fp32 weight there, so engines.cpu_autocast_refusal must still refuse tp without SP in bf16 on CPU
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model.run_layers(x0.clone().requires_grad_(), torch.arange(SEQ))
        try:
            (y.float() * cot).sum().backward()
            refused = False
        except RuntimeError:
            refused = True
    return {"equal": [torch.equal(a, b) for a, b in zip(new, old)], "backward_fails_outside_autocast": refused}


@pytest.mark.slow  # 2 ranks, megatron-core: 3 s
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2_sp"])
def test_tensor_parallel_layers_are_bit_identical_to_one_cast_per_linear(sequence_parallel):
    for out in run_ranks(_tp_new_vs_old, 2, args=(sequence_parallel,), timeout=180):
        assert all(out["equal"]), out
        assert out["backward_fails_outside_autocast"] is (None if sequence_parallel else True), out

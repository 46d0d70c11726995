"""Chunked cross-entropy (dist_train/models/chunked_loss.py) equals the full [N, V] loss in float64: value,
dL/dh and dL/dW, with ignored tokens and an uneven last chunk; inside GPT with tied and untied heads; and
vocab-parallel on real gloo ranks (tp = 2 and an odd tp = 3 with padded vocabulary), also under sequence
parallelism (which keeps only the rank's chunk of dL/dh), against the single-rank loss."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from dist_train.config import ConfigError, resolve_loss_chunk
from dist_train.models.chunked_loss import chunked_cross_entropy
from dist_train.models.gpt import GPT, IGNORE_INDEX
from tests.dist_harness import run_ranks
from tests.trainer_utils import tiny_gpt_config

TOL = 1e-11


def _problem(n: int = 37, d: int = 12, v: int = 23, seed: int = 0):
    """h [n, d], W [v, d] (float64), labels [n] with every 4th token ignored."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(v, d, generator=g, dtype=torch.float64)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::4] = IGNORE_INDEX
    return h, w, labels


def _reference(h, w, labels):
    """Value and gradients (h, W) of the unchunked sum loss, scaled by 0.7 upstream."""
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = F.cross_entropy(h @ w.t(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    (0.7 * loss).backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk", [1, 5, 8, 37, 100])
def test_chunked_equals_full_loss_fp64(chunk):
    h, w, labels = _problem()
    ref_loss, ref_dh, ref_dw = _reference(h, w, labels)
    hc, wc = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = chunked_cross_entropy(hc, wc, labels, chunk, ignore_index=IGNORE_INDEX)
    (0.7 * loss).backward()
    assert loss.dtype == torch.float64
    assert abs(loss.item() - ref_loss.item()) < TOL
    assert (hc.grad - ref_dh).abs().max().item() < TOL
    assert (wc.grad - ref_dw).abs().max().item() < TOL
    assert hc.grad[::4].abs().max().item() == 0.0  # ignored tokens get no gradient


class _AtenOps(TorchDispatchMode):
    """The aten ops dispatched while active (their packet names)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_chunked_loss_forms_its_gradient_with_no_op_whose_output_size_depends_on_the_data():
    """On a GPU an op like nonzero or boolean indexing waits for the device (its output size is data): one such op
    per chunk made the host and device take turns through the loss. The gradient is formed by a scatter instead;
    the values stay those of the float64 reference (test_chunked_equals_full_loss_fp64)."""
    h, w, labels = _problem()
    hc, wc = h.clone().requires_grad_(), w.clone().requires_grad_()
    with _AtenOps() as ops:
        chunked_cross_entropy(hc, wc, labels, 8, ignore_index=IGNORE_INDEX)
    synchronizing = {"nonzero", "masked_select", "item", "_local_scalar_dense"} & set(ops.names)
    assert "scatter_add_" in ops.names and not synchronizing, synchronizing


def test_chunked_loss_without_grad_and_all_ignored():
    h, w, labels = _problem()
    ref_loss = _reference(h, w, labels)[0].item()
    with torch.no_grad():
        assert abs(chunked_cross_entropy(h, w, labels, 6).item() - ref_loss) < TOL
    hc = h.clone().requires_grad_()
    loss = chunked_cross_entropy(hc, w, torch.full_like(labels, IGNORE_INDEX), 6)
    loss.backward()
    assert loss.item() == 0.0 and hc.grad.abs().max().item() == 0.0
    with pytest.raises(ValueError, match="chunk = 0"):
        chunked_cross_entropy(h, w, labels, 0)


def test_auto_chunk_is_a_fixed_logit_budget():
    assert resolve_loss_chunk("auto", 32768) == 512
    assert resolve_loss_chunk("auto", 131072) == 128
    assert resolve_loss_chunk("auto", 10**9) == 32
    assert resolve_loss_chunk(100, 50) == 100 and resolve_loss_chunk("full", 50) is None


@pytest.mark.parametrize("bad", [0, -3, "big", 1.5, True])
def test_loss_chunk_config_validation(tmp_path, bad):
    with pytest.raises(ConfigError, match="train.loss_chunk") as e:
        tiny_gpt_config(tmp_path, train={"loss_chunk": bad})
    assert "\n" not in str(e.value)
    assert tiny_gpt_config(tmp_path, train={"loss_chunk": 64}).train.loss_chunk == 64
    assert tiny_gpt_config(tmp_path).train.loss_chunk == "auto"


def _gpt_loss_and_grads(tie: bool, loss_chunk, x, labels):
    cfg = tiny_gpt_config("/tmp/unused", model={"tie_embeddings": tie, "vocab_size": 63})
    model = GPT(cfg.model, init_seed=5, loss_chunk=loss_chunk).double()
    x = x.clone().requires_grad_()
    loss_sum, count = model.loss(x, labels)
    (loss_sum / count).backward()
    return loss_sum.item(), x.grad, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tie", [False, True])
def test_gpt_chunked_loss_equals_full_loss(tie):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 13, 32, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 63, (2, 13), generator=g)
    labels[0, :3] = IGNORE_INDEX
    ref_loss, ref_dx, ref_grads = _gpt_loss_and_grads(tie, "full", x, labels)
    loss, dx, grads = _gpt_loss_and_grads(tie, 5, x, labels)  # 26 tokens: chunks of 5, the last of 1
    assert abs(loss - ref_loss) < TOL
    assert (dx - ref_dx).abs().max().item() < TOL
    head = "tok_embeddings.weight" if tie else "output.weight"
    assert set(grads) == set(ref_grads) and head in grads
    for name, grad in grads.items():
        assert (grad - ref_grads[name]).abs().max().item() < TOL, name


# -- vocab-parallel on real ranks ------------------------------------------------------------------
def _vocab_parallel_function(rank, world):
    """chunked_cross_entropy with W's rows split over ranks (padded to a multiple of world)."""
    h, w, labels = _problem(n=29, v=23)
    ref_loss, ref_dh, ref_dw = _reference(h, w, labels)
    part = -(-w.shape[0] // world)
    w_pad = torch.cat([w, w.new_zeros(part * world - w.shape[0], w.shape[1])])
    wl = w_pad[rank * part:(rank + 1) * part].clone().requires_grad_()
    hc = h.clone().requires_grad_()
    loss = chunked_cross_entropy(hc, wl, labels, 4, vocab_size=23, vocab_start=rank * part,
                                 group=dist.group.WORLD)
    (0.7 * loss).backward()
    dh = hc.grad.clone()
    dist.all_reduce(dh)  # partial over this rank's vocabulary slice (the tp region mapping sums it)
    worst = max(abs(loss.item() - ref_loss.item()), (dh - ref_dh).abs().max().item(),
                (wl.grad - torch.cat([ref_dw, ref_dw.new_zeros(part * world - 23, 12)])[rank * part:(rank + 1) * part])
                .abs().max().item())
    return worst


@pytest.mark.parametrize("world", [2, 3])
def test_vocab_parallel_chunked_loss_matches_single_rank(world, on_ranks):
    assert all(out["vocab_parallel"] < TOL for out in on_ranks(world))


def _sequence_parallel_function(rank, world):
    """chunked_cross_entropy under sequence parallelism: h is this rank's [B, S/tp, d] chunk, W's rows split over
    ranks (padded), float64 against the single-rank loss; what the forward keeps for backward is this rank's
    chunk of the summed dL/dh, [B, S/tp, d] (the whole [B, S, d] was kept before)."""
    h, w, labels = _problem(n=2 * 12, v=23, seed=4)
    ref_loss, ref_dh, ref_dw = _reference(h, w, labels)
    h3, lab3, ref_dh3 = h.view(2, 12, 12), labels.view(2, 12), ref_dh.view(2, 12, 12)
    s_part, part = 12 // world, -(-w.shape[0] // world)
    w_pad = torch.cat([w, w.new_zeros(part * world - w.shape[0], w.shape[1])])
    wl = w_pad[rank * part:(rank + 1) * part].clone().requires_grad_()
    hc = h3[:, rank * s_part:(rank + 1) * s_part].clone().requires_grad_()
    loss = chunked_cross_entropy(hc, wl, lab3, 5, vocab_size=23, vocab_start=rank * part, group=dist.group.WORLD,
                                 sequence_parallel=True)
    kept = tuple(loss.grad_fn.grads[0].shape)
    (0.7 * loss).backward()
    worst = max(abs(loss.item() - ref_loss.item()),
                (hc.grad - ref_dh3[:, rank * s_part:(rank + 1) * s_part]).abs().max().item(),
                (wl.grad - torch.cat([ref_dw, ref_dw.new_zeros(part * world - 23, 12)])[rank * part:(rank + 1) * part])
                .abs().max().item())
    return worst, kept


@pytest.mark.parametrize("world", [2, 3])
def test_sequence_parallel_chunked_loss_keeps_the_local_chunk_of_dh(world, on_ranks):
    for worst, kept in (out["sequence_parallel"] for out in on_ranks(world)):
        assert worst < TOL
        assert kept == (2, 12 // world, 12)


def test_sequence_parallel_chunked_loss_refuses_a_flat_h():
    h, w, labels = _problem()
    with pytest.raises(ValueError, match="sequence_parallel needs the tp group"):
        chunked_cross_entropy(h, w, labels, 5, sequence_parallel=True)


def _tp_gpt(rank, world, cases, model_extra=None, seq=16, vocab=63):
    """GPT at tp = world vs the tp=1 model (full loss), float64: loss and every gradient -> the largest
    difference per case (relative for the loss sum, absolute for the gradients of the mean loss).
    cases: (tie, sequence_parallel[, loss_chunk]); loss_chunk 5 (default: the chunked vocab-parallel loss)
    or "full" (Megatron's vocab_parallel_cross_entropy, which computes in fp32).
    ``vocab`` is padded to a multiple of tp (the last rank holds padding rows); ``seq`` divides by tp."""
    from dist_train.mesh import build_mesh
    from dist_train.models.gpt import build_gpt

    dev = torch.device("cpu")
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, vocab, (2, seq), generator=g)
    labels = torch.randint(0, vocab, (2, seq), generator=g)
    labels[1, 5:9] = IGNORE_INDEX
    batch = {"tokens": tokens, "labels": labels, "positions": torch.arange(seq)}
    out = []
    for tie, sp, *chunk in cases:
        worst = 0.0
        model_over = {"tie_embeddings": tie, "vocab_size": vocab, **(model_extra or {})}
        cfg = tiny_gpt_config("/tmp/unused", model=model_over, parallel={"tp": world, "sequence_parallel": sp},
                              train={"loss_chunk": chunk[0] if chunk else 5}, data={"seq_len": seq})
        ref_cfg = tiny_gpt_config("/tmp/unused", model=model_over, train={"loss_chunk": "full"},
                                  data={"seq_len": seq})
        model = build_gpt(cfg, build_mesh(cfg.parallel, world), dev).double()
        ref = build_gpt(ref_cfg, build_mesh(ref_cfg.parallel, 1), dev).double()
        loss, count = model(batch)
        ref_loss, ref_count = ref(batch)
        assert float(count) == float(ref_count) == 2 * seq - 4
        (loss / count).backward()
        (ref_loss / ref_count).backward()
        worst = max(worst, abs(loss.item() - ref_loss.item()) / abs(ref_loss.item()))   # the loss: relative
        ref_params = dict(ref.named_parameters())
        for name, p in model.named_parameters():
            grad = p.grad
            if getattr(p, "tensor_model_parallel", False):
                parts = [torch.empty_like(grad) for _ in range(world)]
                dist.all_gather(parts, grad.contiguous(), group=model.tp.group)
                grad = torch.cat(parts, dim=p.partition_dim)
                if name in ("output.weight", "tok_embeddings.weight"):
                    assert grad[vocab:].abs().max().item() == 0.0, name  # padding rows learn nothing
                    grad = grad.narrow(0, 0, vocab)
            worst = max(worst, (grad - ref_params[name].grad).abs().max().item())
        out.append(worst)
    return out


#: _tp_gpt's arguments after (rank, world), per world size: tp 2 (tie × sequence parallelism) and the odd tp 3
TP_GPT = {2: ([(False, False), (True, False), (False, True), (True, True)],),
          3: ([(False, True), (True, True), (False, False, "full"), (True, True, "full")],
              {"d_model": 48, "n_heads": 6, "n_kv_heads": 3, "ffn_hidden": 96}, 18, 62)}


def _every_rank_check(rank, world) -> dict:
    """This file's checks on real ranks at one world size, in one start of its ranks (each started its own: the
    ranks' start and gloo's rendezvous cost more than these few-millisecond float64 checks)."""
    return {"vocab_parallel": _vocab_parallel_function(rank, world),
            "sequence_parallel": _sequence_parallel_function(rank, world),
            "tp_gpt": _tp_gpt(rank, world, *TP_GPT[world])}


@pytest.fixture(scope="module")
def on_ranks():
    """``on_ranks(world)``: every rank's :func:`_every_rank_check` at that world size, run once for the module."""
    runs: dict = {}

    def get(world: int) -> list:
        if world not in runs:
            runs[world] = run_ranks(_every_rank_check, world, timeout=240)
        return runs[world]
    return get


def test_tp2_gpt_chunked_loss_matches_single_rank_full_loss(on_ranks):
    assert all(w < 1e-10 for out in on_ranks(2) for w in out["tp_gpt"])


def test_tp3_sequence_parallel_gpt_matches_single_rank_full_loss(on_ranks):
    """An odd tp with sequence parallelism: the gloo SP collectives (scatter, all-gather, reduce-scatter as
    all-reduce + own third) cut S = 18 in thirds, the vocabulary 62 pads to 63 (rank 2 holds a padding row),
    3 KV heads split one per rank; float64 loss and every gathered gradient equal tp = 1. The unchunked
    tp loss (Megatron's vocab-parallel cross-entropy over the -inf-masked padded vocabulary, fp32 inside)
    is checked too, at fp32 precision."""
    for per_rank in (out["tp_gpt"] for out in on_ranks(3)):
        assert max(per_rank[:2]) < 1e-10 and max(per_rank[2:]) < 1e-6, per_rank

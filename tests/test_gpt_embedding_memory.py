"""What a GPT's token embedding keeps for its backward, counted, against the memory model's first-stage term.

Megatron's vocab-parallel embedding (tp > 1) keeps its masked ids (int64) and the out-of-range mask (bool) per token
of the rank's sequence (``cost.memory.embedding_kept_bytes``, which ``memory_model`` adds to the activations of the
rank holding the embedding, per micro-batch in flight); ``nn.Embedding`` (tp 1) keeps only the batch's ids. Its
output — the first layer's input, which the model counts there — is a tensor of its own of the residual stream's
size: under sequence parallelism this rank's [B, S/tp, d] chunk, never a view of the whole [B, S, d] (with one sample
the chunk was a contiguous view, and the first layer kept the whole output alive through it). Counted live on two
gloo ranks: every storage the embedding's forward created that is alive at its end (``saved_tensors.LiveStorages``),
the token ids and the output left out.
"""
from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

from dist_train.config import config_from_dict
from dist_train.cost.memory import embedding_kept_bytes, memory_model, residual_elems_per_token
from dist_train.cost.shape import rank_inputs
from dist_train.mesh import build_mesh
from dist_train.models.gpt import build_gpt
from dist_train.plan.profiles import builtin_profiles
from tests.dist_harness import run_ranks
from tests.saved_tensors import LiveStorages, parameter_storages
from tests.test_gpt_saved_tensors import SHAPES, _config

CPU = builtin_profiles()["cpu"]
# (name, parallel, micro_batch, precision)
CASES = [("tp2", {"tp": 2}, 1, "fp32"), ("tp2_two_samples", {"tp": 2}, 2, "fp32"), ("tp2_bf16", {"tp": 2}, 2, "bf16"),
         ("tp2_sp", {"tp": 2, "sequence_parallel": True}, 1, "fp32"),
         ("tp2_sp_two_samples", {"tp": 2, "sequence_parallel": True}, 2, "fp32"),
         ("dp2", {"dp": 2}, 2, "fp32")]


def _embedding_counts(rank: int, world: int, cases) -> dict:
    """{case: (live bytes the embedding's forward leaves but its output and the ids, embedding_kept_bytes, output
    storage bytes, the residual stream's bytes the model counts for it)} on this rank."""
    out = {}
    for name, parallel, micro_batch, precision in cases:
        cfg = _config(*SHAPES[0], micro_batch=micro_batch, precision=precision, **parallel)
        model = build_gpt(cfg, build_mesh(cfg.parallel, world), torch.device("cpu")).train()
        params = parameter_storages(model)
        tokens = torch.randint(0, cfg.model.vocab_size, (micro_batch, cfg.data.seq_len),
                               generator=torch.Generator().manual_seed(rank))
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
        created = LiveStorages()
        with autocast:
            with created:
                x = model.embed(tokens)
            output = x.untyped_storage()
            live = created.live_bytes(params | {tokens.untyped_storage().data_ptr(), output.data_ptr()}, set())
        sh, loc = rank_inputs(cfg, CPU)
        out[name] = (live, embedding_kept_bytes(cfg, sh, loc), output.nbytes(),
                     loc.tokens * residual_elems_per_token(cfg, sh, CPU, loc) * loc.bpe)
    return out


@pytest.mark.slow
def test_gpt_embedding_keeps_what_the_memory_model_counts():
    """Two gloo ranks (3 s): tp 2 keeps 9 bytes per token (masked ids and mask) in fp32 and bf16 and with sequence
    parallelism (the whole sequence: the embedding runs before the scatter); tp 1 none; the output is the residual
    stream's size. Failed before: the model had no embedding term (576 B per rank at 64 tokens uncounted), and the
    sequence-parallel output of one sample held the whole [1, S, d] (16,384 B where its chunk is 8,192)."""
    for rank_out in run_ranks(_embedding_counts, 2, args=(CASES,), timeout=180):
        for name, (live, kept, output, stream) in rank_out.items():
            assert live == kept, (name, live, kept)
            assert output == stream, (name, output, stream)
        assert rank_out["tp2"][1] == 64 * 9 and rank_out["tp2_sp_two_samples"][1] == 2 * 64 * 9
        assert rank_out["dp2"][1] == 0


@pytest.mark.parametrize("parallel", [{"tp": 2}, {"tp": 2, "pp": 2}, {"pp": 2}], ids=["tp2", "tp2_pp2", "pp2"])
def test_the_embedding_term_is_on_the_first_stage_per_micro_batch_in_flight(parallel):
    """``memory_model`` adds ``embedding_kept_bytes`` × the micro-batches in flight to the activations of the rank
    holding the embedding, and nothing elsewhere; under a pipeline that rank also holds the step's int64 token ids
    (the pipeline engine hands its first stage the whole batch: 8 B per token of every micro-batch)."""
    cfg = config_from_dict({"model": {"kind": "gpt", "d_model": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 96},
                            "data": {"seq_len": 64}, "parallel": dict(parallel),
                            "train": {"global_batch": 4, "micro_batch": 1}})
    sh, loc = rank_inputs(cfg, CPU)
    for load in loc.loads:
        without = dataclasses.replace(load, embedding=False)
        grown = (memory_model(cfg, sh, CPU, loc, load)["activations"]
                 - memory_model(cfg, sh, CPU, loc, without)["activations"])
        want = embedding_kept_bytes(cfg, sh, loc) * load.in_flight if load.embedding else 0.0
        if load.embedding and cfg.parallel.pp > 1:
            want += 8 * 64 * 4  # the ids of the step's 4 micro-batches of 64 tokens
        assert grown == want, (load, grown, want)
    assert embedding_kept_bytes(cfg, sh, loc) == (64 * 9 if cfg.parallel.tp == 2 else 0)

"""Tensor / pipeline / ZeRO data parallelism on real gloo ranks against the single-rank run.

Every case: the first 3 losses and the step-1 gradient norm equal the single-rank run (same seed,
same global batch) within 1e-4 relative in fp32, on every rank; the dp3, ZeRO-3 dp3 and cp3 cases also
the validation loss after step 3 (the evaluation's loss-sum and count all-reduces, uneven per cp rank).
The tp model is also checked in float64 (forward loss + every gathered gradient) against the tp=1 model.
Cases are grouped per world size (2, 3, 4) so each spawn pays the import cost once.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dist_train.trainer import train
from tests.dist_harness import run_ranks
from tests.trainer_utils import losses_and_valid, rel_close, tiny_gpt_config

RTOL = 1e-4
#: steps per case: step 1 (the gradient norm: the reductions), two updates after it (the optimizer's shards, the
#: weights each layout updated), the last past the 2-step warm-up; 5 steps ran the same code twice more per case
STEPS = 3
EVAL = {"eval_every": STEPS, "eval_steps": 1}  # + the validation loss after the last step (the evaluation all-reduce)
FOUR_LAYERS = {"n_layers": 4}
# tp = 3 needs 3 | heads and 3 | kv heads; vocab 64 is NOT divisible by 3 (exercises vocab padding)
TP3_MODEL = {"d_model": 48, "n_heads": 6, "n_kv_heads": 3, "ffn_hidden": 96}
# head_dim != d_model / n_heads (12 vs 8) and Llama 3.1 RoPE scaling (every frequency band at S = 32)
HEAD_DIM_LLAMA3 = {"head_dim": 12, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}

# (name, model overrides, parallel, train overrides) per world size
CASES = {
    2: [
        ("dp2", {}, {"dp": 2}, {}),
        ("tp2", {}, {"tp": 2}, {}),
        ("tp2_full_ckpt", {}, {"tp": 2}, {"activation_checkpointing": "full"}),
        ("pp2_1f1b", {}, {"pp": 2}, {}),
        ("pp2_gpipe_selective", {}, {"pp": 2, "pp_schedule": "gpipe"}, {"activation_checkpointing": "selective"}),
        ("pp2_interleaved", FOUR_LAYERS, {"pp": 2, "pp_schedule": "interleaved", "microbatches": 4},
         {"micro_batch": 1}),
        ("cp2", {}, {"cp": 2}, {}),
        ("tp2_head_dim_llama3", HEAD_DIM_LLAMA3, {"tp": 2}, {}),
        ("cp2_head_dim_llama3", HEAD_DIM_LLAMA3, {"cp": 2}, {}),
        ("zero0", {}, {"dp": 2, "zero_stage": 0}, {}),
        ("zero1", {}, {"dp": 2, "zero_stage": 1}, {}),
        ("zero2", {}, {"dp": 2, "zero_stage": 2}, {}),
        ("zero3", {}, {"dp": 2, "zero_stage": 3}, {}),
    ],
    3: [
        ("pp3", FOUR_LAYERS, {"pp": 3, "microbatches": 4}, {"micro_batch": 1}),
        ("tp3", TP3_MODEL, {"tp": 3}, {}),
        ("dp3", {}, {"dp": 3}, {"global_batch": 6, **EVAL}),
        # ZeRO-3 partitions every parameter in thirds (uneven, padded); same reference as dp3
        ("dp3_zero3", {}, {"dp": 3, "zero_stage": 3}, {"global_batch": 6, **EVAL}),
        # zigzag cp3 pads S = 32 to 36: the cp ranks hold different real-token counts (training and eval)
        ("cp3_head_dim_llama3", HEAD_DIM_LLAMA3, {"cp": 3}, EVAL),
    ],
    4: [
        ("dp2_tp2", {}, {"dp": 2, "tp": 2}, {}),
        ("tp2_cp2", {}, {"tp": 2, "cp": 2}, {}),
        ("pp2_cp2", {}, {"pp": 2, "cp": 2}, {}),
        ("pp2_tp2", {}, {"pp": 2, "tp": 2}, {}),
        ("dp2_cp2_zero3", {}, {"dp": 2, "cp": 2, "zero_stage": 3}, {}),
        # hybrid cp through the model: Ulysses pairs {0, 1}, {2, 3} and rings {0, 2}, {1, 3}
        ("cp4_hybrid_u2", {}, {"cp": 4, "cp_method": "hybrid", "ulysses_degree": 2}, {}),
    ],
}


def _config(run_dir, model: dict, parallel: dict, train_over: dict):
    return tiny_gpt_config(run_dir, steps=STEPS, model={"kind": "gpt", "d_model": 32, "n_layers": 2, "n_heads": 4,
                                                        "n_kv_heads": 2, "vocab_size": 64, **model},
                           parallel=parallel, train=train_over)


def _train_cases(rank, world, run_dir, cases):
    out = {}
    for name, model, parallel, train_over in cases:
        res = train(_config(f"{run_dir}/{name}", model, parallel, train_over))
        out[name] = (losses_and_valid(res), res.grad_norms)
    if world in (3, 4):
        out["fp64_grads"] = _tp_fp64_gradients(world)
    return out


def _tp_fp64_gradients(world: int) -> float:
    """tp = world (3: padded vocab, 4: 4 KV heads) in float64: the gathered logits and, for a fixed random
    cotangent on them, every gradient (gathered over tp) equal the tp=1 model's to 1e-10; returns the
    largest abs difference. The loss goes through Megatron's vocab-parallel cross-entropy, which computes
    in fp32 by design, so it is compared at fp32 precision."""
    from dist_train.mesh import build_mesh
    from dist_train.models.gpt import build_gpt

    model = dict(TP3_MODEL) if world == 3 else {"n_kv_heads": 4}
    cfg = _config("/tmp/unused", model, {"tp": world}, {})
    ref_cfg = _config("/tmp/unused", model, {}, {})
    dev = torch.device("cpu")
    tp_model = build_gpt(cfg, build_mesh(cfg.parallel, world), dev).double()
    ref = build_gpt(ref_cfg, build_mesh(ref_cfg.parallel, 1), dev).double()
    group, rank = tp_model.tp.group, dist.get_rank(tp_model.tp.group)
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 64, (2, 16), generator=g)
    labels = torch.randint(0, 64, (2, 16), generator=g)
    labels[0, :3] = -100  # ignored tokens take part in neither loss nor count
    cot = torch.randn(2, 16, 64, generator=g, dtype=torch.float64)
    pos = torch.arange(16)

    def gather(t: torch.Tensor, dim: int, full: int) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous(), group=group)
        return torch.cat(parts, dim=dim).narrow(dim, 0, full)  # drop the vocab padding

    local = tp_model.logits(tokens, pos)  # [2, 16, V_pad / tp]
    ref_logits = ref.logits(tokens, pos)
    worst = (gather(local.detach(), -1, 64) - ref_logits.detach()).abs().max().item()
    part = local.shape[-1]
    cot_pad = torch.cat([cot, cot.new_zeros(2, 16, part * world - 64)], dim=-1)
    (local * cot_pad[..., rank * part:(rank + 1) * part]).sum().backward()
    (ref_logits * cot).sum().backward()
    ref_params = dict(ref.named_parameters())
    for name, p in tp_model.named_parameters():
        grad = p.grad
        if getattr(p, "tensor_model_parallel", False):
            grad = gather(grad, p.partition_dim, ref_params[name].shape[p.partition_dim])
        diff = (grad - ref_params[name].grad).abs().max().item()
        assert diff < 1e-10, (name, diff)
        worst = max(worst, diff)
    (loss, count), (ref_loss, ref_count) = tp_model(
        {"tokens": tokens, "labels": labels, "positions": pos}), ref({"tokens": tokens, "labels": labels,
                                                                      "positions": pos})
    assert float(count) == float(ref_count) == 29.0
    assert abs(float(loss) - float(ref_loss)) < 1e-6 * abs(float(ref_loss)), (float(loss), float(ref_loss))
    return worst


def _reference(tmp_path, model, train_over):
    res = train(_config(tmp_path / "ref", model, {}, train_over))
    return losses_and_valid(res), res.grad_norms


def _check_world(tmp_path, world: int) -> None:
    out = run_ranks(_train_cases, world, args=(str(tmp_path), CASES[world]), timeout=240)
    refs: dict = {}
    for name, model, _, train_over in CASES[world]:
        key = repr((model, train_over))
        if key not in refs:
            refs[key] = _reference(tmp_path / name, model, train_over)
        ref_losses, ref_norms = refs[key]
        for rank, per_rank in enumerate(out):
            losses, norms = per_rank[name]
            assert len(losses) == STEPS + ("eval_every" in train_over), (name, rank, losses)
            assert rel_close(losses, ref_losses, RTOL), (name, rank, losses, ref_losses)
            assert rel_close(norms[:1], ref_norms[:1], RTOL), (name, rank, norms[0], ref_norms[0])
    if world == 2:  # ZeRO 1-3 reproduce stage 0 (same DeepSpeed engine, only the sharding differs)
        for z in ("zero1", "zero2", "zero3"):
            assert rel_close(out[0][z][0], out[0]["zero0"][0], 1e-5), (z, out[0][z][0], out[0]["zero0"][0])
    if world in (3, 4):
        assert all(r["fp64_grads"] < 1e-10 for r in out)


def test_two_ranks_dp_tp_pp_cp_and_zero_stages_match_single_rank(tmp_path):
    pytest.importorskip("deepspeed")
    _check_world(tmp_path, 2)


def test_three_ranks_pp3_tp3_padded_vocab_dp3_match_single_rank(tmp_path):
    _check_world(tmp_path, 3)


def test_four_ranks_composed_layouts_match_single_rank(tmp_path):
    _check_world(tmp_path, 4)

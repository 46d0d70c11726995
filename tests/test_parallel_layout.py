"""Dry-run layout without processes: stage balance, rank coordinates, memory formula, invalid combos."""
from __future__ import annotations

import itertools

import pytest
import torch.distributed as dist

from dist_train.config import ConfigError
from dist_train.layout import balanced_layer_counts, estimate_memory, pipeline_stages, rank_layout, stages_of_rank
from dist_train.mesh import rank_coords
from tests.trainer_utils import tiny_gpt_config


def _cfg(**sections):
    return tiny_gpt_config("/tmp/unused", **sections)


def _max_cost(counts):
    return max(c + (s == 0) + (s == len(counts) - 1) for s, c in enumerate(counts))


@pytest.mark.parametrize("n_layers,n_stages", [(L, n) for L in range(1, 10) for n in range(1, 6) if L >= n])
def test_balanced_counts_are_optimal(n_layers, n_stages):
    counts = balanced_layer_counts(n_layers, n_stages)
    assert sum(counts) == n_layers and min(counts) >= 1
    best = min(_max_cost(c) for c in itertools.product(range(1, n_layers + 1), repeat=n_stages)
               if sum(c) == n_layers)
    assert _max_cost(counts) == best, counts


def test_stages_cover_layers_and_interleave_over_ranks():
    cfg = _cfg(model={"n_layers": 8}, parallel={"pp": 2, "pp_schedule": "interleaved", "microbatches": 2},
               train={"micro_batch": 1})
    stages = pipeline_stages(cfg)
    assert [s.rank for s in stages] == [0, 1, 0, 1]
    assert [i for s in stages for i in s.layers] == list(range(8))
    assert stages[0].first and stages[-1].last and not any(s.first or s.last for s in stages[1:-1])
    assert [s.index for s in stages_of_rank(cfg, 1)] == [1, 3]
    with pytest.raises(ConfigError, match="n_layers = 3 < 4 pipeline stages"):
        _cfg(model={"n_layers": 3}, parallel={"pp": 2, "pp_schedule": "interleaved"})


def test_rank_layout_coordinates_and_layers():
    cfg = _cfg(model={"n_layers": 4}, parallel={"pp": 2, "tp": 2, "dp": 2, "microbatches": 2},
               train={"micro_batch": 1})
    rows = rank_layout(cfg)
    assert len(rows) == 8
    for r in rows:
        assert r.coords == rank_coords(r.rank, {"pp": 2, "dp": 2, "wp": 1, "cp": 1, "tp": 2})
        assert r.layers == ([0, 1] if r.coords["pp"] == 0 else [2, 3])  # emb + 2 | 2 + head


def test_memory_formula_by_zero_stage():
    from dist_train.models.gpt import GPT, count_parameters

    base = _cfg(parallel={"dp": 4}, train={"global_batch": 8})
    n = count_parameters(GPT(base.model))
    stage = pipeline_stages(base)
    mem = estimate_memory(base, stage, on_cuda=False)
    assert mem.params == 4 * n and mem.grads == 4 * n and mem.optimizer == 8 * n  # fp32 AdamW: 4 + 4 + 8
    for z, (w, g, o) in {0: (2, 2, 12), 1: (2, 2, 3), 2: (2, 0.5, 3), 3: (0.5, 0.5, 3)}.items():
        cfg = _cfg(parallel={"dp": 4, "zero_stage": z}, train={"global_batch": 8, "precision": "bf16"})
        m = estimate_memory(cfg, stage, on_cuda=True)
        assert (m.params, m.grads, m.optimizer) == (w * n, g * n, o * n), z  # 16 B/param ÷ sharding
    tp2 = estimate_memory(_cfg(parallel={"tp": 2}), pipeline_stages(base), on_cuda=False)
    assert mem.params / 2 < tp2.params < mem.params  # norms are replicated, the rest halves
    full = estimate_memory(_cfg(train={"activation_checkpointing": "full"}), stage, on_cuda=False)
    assert full.activations == 2 * 32 * 2 * 32 * 2 * 2  # 2·s·b·h bytes (16-bit) per layer, fp32 = ×2, 2 layers


def test_dry_run_prints_every_rank_without_a_process_group(tmp_path, capsys):
    from dist_train.entry import dry_run

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("model: {kind: gpt, d_model: 32, n_layers: 4, n_heads: 4, vocab_size: 64}\n"
                        "data: {source: synthetic, seq_len: 32}\n"
                        "train: {global_batch: 8, micro_batch: 2}\n")
    assert dry_run(str(cfg_file), ["parallel.pp=2", "parallel.tp=2", "parallel.dp=2", "parallel.microbatches=2"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [int(r[0]) for r in rows] == list(range(8))
    assert all(r[7] == ("0-1" if r[2] == "0" else "2-3") for r in rows)  # pp coordinate -> layers
    assert not dist.is_initialized()


@pytest.mark.parametrize("parallel,model,message", [
    ({"tp": 4}, {}, r"model.n_kv_heads = 2 is not divisible by parallel.tp = 4"),
    ({"tp": 3}, {}, r"model.n_heads = 4 is not divisible by parallel.tp = 3"),
    ({"pp": 3}, {}, r"model.n_layers = 2 < 3 pipeline stages"),
    ({"pp": 2, "zero_stage": 3}, {}, r"parallel.zero_stage = 3 with parallel.pp = 2 is not supported"),
    ({"pp": 2}, {"tie_embeddings": True}, r"tie_embeddings with parallel.pp = 2"),
    ({"pp": 2, "microbatches": 3}, {}, r"parallel.microbatches = 3"),
    ({"tp": 2}, {"ffn_hidden": 33}, r"FFN hidden size 33 is not divisible by parallel.tp = 2"),
])
def test_invalid_combinations_fail_before_any_process_group(parallel, model, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(parallel=parallel, model=model)
    assert not dist.is_initialized()

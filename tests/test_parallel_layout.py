"""Dry-run layout without processes: stage balance, rank coordinates, per-rank memory (the planner's model on
each rank's exact stages; the planner = the most loaded rank), invalid combos."""
from __future__ import annotations

import dataclasses
import itertools
from types import SimpleNamespace

import pytest
import torch.distributed as dist
from torch.distributed.pipelining.schedules import ScheduleInterleaved1F1B, _ComputationType

from dist_train.config import ConfigError, config_from_dict
from dist_train.cost.layout import (balanced_layer_counts, in_flight_microbatches, load_of, pipeline_stages,
                                    recv_buffers, schedule_peak, stages_of_rank)
from dist_train.cost.memory import estimate_memory, memory_model, residual_elems_per_token, stage_elems_per_token
from dist_train.cost.shape import rank_inputs
from dist_train.cost.predict import predict
from dist_train.dryrun import RankLayout, device_profile, format_layout, rank_layout
from dist_train.mesh import rank_coords
from dist_train.plan.profiles import builtin_profiles, profile_for_device_name
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


@pytest.fixture(scope="module")
def cpu():
    """The built-in (uncalibrated) cpu profile: hand-computed numbers must not depend on this machine."""
    return builtin_profiles()["cpu"]


def test_memory_formula_by_zero_stage(cpu):
    from dist_train.models.gpt import GPT, count_parameters

    base = _cfg(parallel={"dp": 4}, train={"global_batch": 8})
    n = count_parameters(GPT(base.model))
    stage = pipeline_stages(base)
    mem = estimate_memory(base, stage, cpu)
    # fp32 AdamW: 4 + 4 + 8; DDP (zero_stage null, 4 replicas) adds its flat bucket copy: grads 4 + 4
    assert mem.params == 4 * n and mem.grads == 8 * n and mem.optimizer == 8 * n
    # ZeRO >= 1 adds DeepSpeed's gradient bucket to the gradients column: the model's size in bf16, 2 B/param
    # ZeRO-3 keeps tensors of at most stage3_param_persistence_threshold elements whole besides their partition:
    # by default (1e5) every tensor of this small model; with 0 none
    no_persistence = {"deepspeed": {"zero_optimization": {"stage3_param_persistence_threshold": 0}}}
    for z, (w, g, o) in {0: (2, 2, 12), 1: (2, 2 + 2, 3), 2: (2, 0.5 + 2, 3), 3: (0.5 + 2, 0.5 + 2, 3),
                         "3 none whole": (0.5, 0.5 + 2, 3)}.items():
        parallel = {"dp": 4, "zero_stage": 3, **no_persistence} if z == "3 none whole" else {"dp": 4, "zero_stage": z}
        cfg = _cfg(parallel=parallel, train={"global_batch": 8, "precision": "bf16"})
        m = estimate_memory(cfg, stage, device_profile(on_cuda=True)[0])
        assert (m.params, m.grads, m.optimizer) == (w * n, g * n, o * n), z  # 16 B/param ÷ sharding
    tp2 = estimate_memory(_cfg(parallel={"tp": 2}), pipeline_stages(base), cpu)
    one = estimate_memory(_cfg(), pipeline_stages(base), cpu)
    assert one.params / 2 < tp2.params < one.params  # norms are replicated, the rest halves
    full = estimate_memory(_cfg(train={"activation_checkpointing": "full"}), stage, cpu)
    # d=32, q=32, kv=2·8=16, f=32·ceil(8·32/3/32)=96, 4 heads; eager layer (tests/test_gpt_saved_tensors.py) =
    # 4d + 2q + 2kv + 3f + 2 rstd + 4 logsumexp = 128+64+32+288+6 = 518 elements/token; full: L·d layer inputs (64)
    # + one recomputed layer (518) + the stage output (32) + RoPE cos/sin (2·8 per position, 2 samples: 8) = 622;
    # × micro_batch·S = 64 tokens × 4 B
    assert full.activations == 622 * 64 * 4
    # the total is the step's peak phase, not the columns' sum: the loss's chunk, the backward's workspace and
    # the optimizer's transient never coexist (cost/memory.step_phases)
    assert full.total == max(full.phases.values()) < full.params + full.grads + full.optimizer + full.activations + full.other
    assert full.peak_phase == "backward"  # full checkpointing: the last layer's recompute
    assert full.other >= cpu.baseline_bytes



@pytest.mark.parametrize("sections", [
    {},
    {"parallel": {"pp": 2}, "train": {"global_batch": 4}},
    {"parallel": {"pp": 2, "pp_schedule": "interleaved"}, "model": {"n_layers": 4}, "train": {"global_batch": 4}},
    {"parallel": {"dp": 2, "fsdp": True}, "train": {"precision": "bf16"}},
])
def test_the_dry_run_columns_show_every_component_once(sections, cpu):
    """params + grads + optim + acts + other = the sum of memory_model's components, on every rank: no component
    (a pipeline stage's receive buffers included) is missing from the table nor counted in two columns."""
    cfg = _cfg(**sections)
    for r in range(cfg.parallel.pp):
        m = estimate_memory(cfg, stages_of_rank(cfg, r), cpu)
        columns = m.params + m.grads + m.optimizer + m.activations + m.other
        components = sum(v for k, v in m.components.items() if k != "total")
        assert columns == pytest.approx(components, rel=1e-12), (sections, r)

def test_per_stage_params_match_the_real_stage_modules(cpu):
    """Every pipeline rank's weights = the parameters of the GPT holding exactly its stages (tp = 1)."""
    from dist_train.models.gpt import GPT, count_parameters

    for parallel, n_layers in (({"pp": 2}, 4), ({"pp": 3}, 5), ({"pp": 2, "pp_schedule": "interleaved"}, 6)):
        cfg = _cfg(model={"n_layers": n_layers}, parallel={**parallel, "microbatches": parallel["pp"]},
                   train={"micro_batch": 1, "global_batch": 6})
        for r in range(cfg.parallel.pp):
            st = stages_of_rank(cfg, r)
            real = GPT(cfg.model, layer_ids=[i for s in st for i in s.layers], has_embedding=any(s.first for s in st),
                       has_head=any(s.last for s in st))
            assert estimate_memory(cfg, st, cpu).params == 4 * count_parameters(real), (parallel, r)


def test_tp_pads_the_vocabulary(cpu):
    cfg = _cfg(model={"vocab_size": 63}, parallel={"tp": 2})
    mem = estimate_memory(cfg, pipeline_stages(cfg), cpu)
    # per layer: matmuls d·(2q + 2kv) + 3·d·f = 32·96 + 3·32·96 = 12288 ÷ 2, norms 2d = 64 replicated;
    # vocabulary 63 padded to 64: 32 rows of d = 1024 each for embedding and head; final norm 32
    assert mem.params == (2 * (12288 // 2 + 64) + 2 * 1024 + 32) * 4
    # chunked loss, one chunk of all 64 tokens: 32 local rows of fp32 logits and logsumexp's temporary, 30 B of
    # per-token tensors and the final norm's fp32 output h (d = 32) at its peak + the final norm's rstd + fp32 dL/dh
    # and dL/dW (32 local rows)
    assert mem.components["logits"] == 64 * 32 * 8 + 64 * 30 + 64 * 32 * 4 + 64 * 4 + (64 + 32) * 32 * 4


def test_in_flight_microbatches_follow_torch_schedules():
    from torch.distributed.pipelining.schedules import _get_warmup_ops

    # global batch 8 / micro_batch 1 = 8 accumulation micro-batches, run as 4 pipeline micro-batches
    one = dict(model={"n_layers": 8}, train={"micro_batch": 1, "global_batch": 8})
    f1b = _cfg(parallel={"pp": 4, "microbatches": 4}, **{**one, "model": {"n_layers": 4}})  # 1 layer per rank
    assert [in_flight_microbatches(f1b, r) for r in range(4)] == [4, 3, 2, 1]  # min(m, pp - r)
    gpipe = _cfg(parallel={"pp": 4, "microbatches": 4, "pp_schedule": "gpipe"}, **one)
    assert [in_flight_microbatches(gpipe, r) for r in range(4)] == [4] * 4
    for pp, m in ((2, 2), (2, 4), (4, 4), (4, 8)):
        cfg = _cfg(parallel={"pp": pp, "microbatches": m, "pp_schedule": "interleaved"}, **one)
        per_round = m // max(1, m // pp)
        for r in range(pp):
            forwards = min(_get_warmup_ops(r, 2, per_round, pp, m) + 1, 2 * m)  # warm-up, then one 1F before 1B
            assert in_flight_microbatches(cfg, r) == forwards / 2, (pp, m, r)
    # 1F1B, 1 layer per rank, no checkpointing: activations scale exactly with the micro-batches in flight, beside
    # what torch's schedule holds or receives (schedule_peak) and the engine's int64 ids (first) and labels (last)
    cpu = builtin_profiles()["cpu"]
    rows = rank_layout(f1b, profile=cpu)
    acts = {r.coords["pp"]: r.memory.activations for r in rows}
    sh, loc = rank_inputs(f1b, cpu)
    resid = residual_elems_per_token(f1b, sh, cpu, loc) * loc.tokens * loc.bpe
    own = {}
    for r in range(4):
        load = load_of(f1b, stages_of_rank(f1b, r))
        ids = 8 * loc.tokens * 4 * (load.embedding + load.head)  # the step's 4 pipeline micro-batches
        own[r] = acts[r] - (load.held_sends - load.received) * resid - ids
    assert [own[r] / own[3] for r in range(4)] == [4, 3, 2, 1]
    assert rows[0].memory.other < rows[-1].memory.other  # the logits live on the head rank only


def _torch_interleaved_peak(pp: int, m: int, rank: int) -> tuple[int, int, int, int]:
    """Walk torch's own interleaved 1F1B order for ``rank`` (``_calculate_single_rank_operations``): at each backward,
    (pairs in flight, sends held — every backwarded pair's output unless its stage is the last, its input gradient
    unless it is stage 0, as ``send_ops`` keeps them to the step's end —, pairs in flight reading a received input,
    last-stage pairs in flight besides the one being backwarded); the largest, in-flight first."""
    sched = object.__new__(ScheduleInterleaved1F1B)
    rounds = max(1, m // pp)
    sched.pp_group_size, sched.n_local_stages, sched._n_microbatches = pp, 2, m
    sched.number_of_rounds, sched.microbatches_per_round = rounds, m // rounds
    last_stage = 2 * pp - 1
    in_flight, held, moments = set(), 0, []
    for action in sched._calculate_single_rank_operations(rank):
        if action is None:
            continue
        pair = (action.stage_index, action.microbatch_index)
        if action.computation_type == _ComputationType.FORWARD:
            in_flight.add(pair)
            continue
        moments.append((len(in_flight), held, sum(s != 0 for s, _ in in_flight),
                        sum(s == last_stage for s, _ in in_flight) - (pair[0] == last_stage)))
        in_flight.remove(pair)
        held += (pair[0] != last_stage) + (pair[0] != 0)
    return max(moments)


@pytest.mark.parametrize("pp,m", [(2, 2), (2, 4), (2, 6), (4, 4), (4, 8), (4, 12)])
def test_schedule_peak_is_torchs_interleaved_order(pp, m):
    """cost/layout.schedule_peak's closed walk (warm-up, steady state's last backward) equals walking the actions of
    torch's ``ScheduleInterleaved1F1B`` itself, on every rank; the pairs in flight there are in_flight_microbatches'."""
    cfg = _cfg(parallel={"pp": pp, "microbatches": m, "pp_schedule": "interleaved"},
               model={"n_layers": 8}, train={"micro_batch": 1, "global_batch": 24})
    for r in range(pp):
        pairs, held, received, losses = _torch_interleaved_peak(pp, m, r)
        assert pairs == 2 * in_flight_microbatches(cfg, r), (pp, m, r)
        assert schedule_peak(cfg, r) == (held, received, losses), (pp, m, r)


def test_schedule_peak_1f1b_and_gpipe_by_hand():
    """1F1B (pp 4, m 8): rank 0 holds the warm-up's micro-batch 2 output (loop backward 3 ≥ warm-up − 1), no received
    input; middle ranks also their previous backward's input gradient; the last only that gradient; every non-first rank
    reads all its in-flight inputs from receive buffers. GPipe: nothing held at its first backward, every other
    micro-batch's loss pending on the last rank. Receive buffers: m per direction a stage has a neighbour in."""
    one = dict(model={"n_layers": 8}, train={"micro_batch": 1, "global_batch": 8})
    f1b = _cfg(parallel={"pp": 4, "microbatches": 8}, **one)
    assert [schedule_peak(f1b, r) for r in range(4)] == [(1, 0, 0), (2, 3, 0), (2, 2, 0), (1, 1, 0)]
    gpipe = _cfg(parallel={"pp": 4, "microbatches": 8, "pp_schedule": "gpipe"}, **one)
    assert [schedule_peak(gpipe, r) for r in range(4)] == [(0, 0, 0), (0, 8, 0), (0, 8, 0), (0, 8, 7)]
    assert [recv_buffers(f1b, stages_of_rank(f1b, r)) for r in range(4)] == [8, 16, 16, 8]
    inter = _cfg(parallel={"pp": 2, "microbatches": 4, "pp_schedule": "interleaved"}, **one)
    assert [recv_buffers(inter, stages_of_rank(inter, r)) for r in range(2)] == [12, 12]  # (1 + 2) × 4, (2 + 1) × 4


def test_every_virtual_stage_in_flight_keeps_its_stage_output_and_rope():
    """Interleaved: each (virtual stage, micro-batch) in flight keeps its own stage output (torch's PipelineStage caches
    it per stage until that stage's backward) and its RoPE cos/sin (each stage's forward computes them): in_flight
    counts whole-rank micro-batches, so a rank of v stages holds v × in_flight of these. Failed before: counted once
    per whole-rank micro-batch (half the stage-wide bytes at v = 2)."""
    base = dict(model={"n_layers": 4}, train={"micro_batch": 1, "global_batch": 4})
    inter = _cfg(parallel={"pp": 2, "microbatches": 4, "pp_schedule": "interleaved"}, **base)
    cpu = builtin_profiles()["cpu"]
    sh, loc = rank_inputs(inter, cpu)
    stage_bytes = stage_elems_per_token(inter, sh, cpu, loc) * loc.tokens * loc.bpe
    for r in range(2):
        load = load_of(inter, stages_of_rank(inter, r))
        assert load.stages == 2
        one = dataclasses.replace(load, stages=1)
        more = memory_model(inter, sh, cpu, loc, load)["activations"] - memory_model(inter, sh, cpu, loc, one)["activations"]
        assert more == pytest.approx(stage_bytes * in_flight_microbatches(inter, r))


@pytest.mark.parametrize("sections", [
    {},
    {"parallel": {"pp": 2, "dp": 2, "microbatches": 2}, "model": {"n_layers": 4}, "train": {"micro_batch": 1}},
    {"parallel": {"pp": 3, "microbatches": 3}, "model": {"n_layers": 5}, "train": {"global_batch": 6}},
    {"parallel": {"pp": 2, "pp_schedule": "interleaved", "microbatches": 4}, "model": {"n_layers": 4},
     "train": {"micro_batch": 1}},
    {"parallel": {"tp": 2, "cp": 2, "zero_stage": 2}, "model": {"vocab_size": 63},
     "train": {"activation_checkpointing": "selective"}},
    {"parallel": {"pp": 2, "cp": 2, "cp_method": "ulysses", "microbatches": 2}, "model": {"n_layers": 3},
     "train": {"activation_checkpointing": "full", "micro_batch": 1, "precision": "bf16"}},
])
def test_planner_memory_is_the_dry_runs_most_loaded_rank(sections, cpu):
    cfg = _cfg(**sections)
    rows = rank_layout(cfg, profile=cpu)
    worst = max(rows, key=lambda r: r.memory.total).memory
    assert predict(cfg, cpu).memory == worst.components
    assert {r.memory.device for r in rows} == {"cpu"}


def test_swin_dry_run_uses_the_planner_too(cpu):
    cfg = config_from_dict({"model": {"kind": "swin", "d_model": 16, "n_layers": 2, "n_heads": 2, "window": 4,
                                      "in_channels": 2, "out_channels": 2},
                            "data": {"source": "weather", "image": [16, 16]},
                            "train": {"global_batch": 2, "micro_batch": 1}, "parallel": {"wp": [1, 2]}})
    rows = rank_layout(cfg, profile=cpu)
    assert len(rows) == 2 and all(r.memory.components == predict(cfg, cpu).memory for r in rows)
    assert format_layout(cfg, rows).splitlines()[-1].split()[-2:] == [f"{rows[-1].memory.total / 2 ** 30:.3f}", "bwd"]


def test_dry_run_columns_stay_aligned_past_9999_ranks():
    """The 405B projections dry-run 16,384 ranks with layer lists like 59-62,123-125: every value stays under
    its header (right-aligned numbers end where their header ends, left-aligned ones start where it starts)."""
    coords = {"dp": 0, "pp": 0, "cp": 0, "tp": 0, "wp": 0}
    stage = SimpleNamespace(index=15, layers=[59, 60, 61, 62, 123, 124, 125], first=False, last=True)
    rows = [RankLayout(0, coords), RankLayout(16383, {**coords, "dp": 1023, "tp": 7}, [stage])]
    table = format_layout(config_from_dict({}), rows).splitlines()
    header, body = table[2], table[3:]
    for name in ("rank", "dp", "tp", "wp", "emb", "head"):
        end = header.index(name) + len(name)
        assert all(line[end - 1] != " " and line[end:end + 1] in (" ", "") for line in body), (name, table)
    for name in ("stages", "layers"):
        begin = header.index(name)
        assert all(line[begin - 1] == " " and line[begin] != " " for line in body), (name, table)


def test_dry_run_profile_label():
    import torch

    prof, label = device_profile(on_cuda=False)
    assert prof.name == "cpu" and label.startswith("cpu (")
    prof, label = device_profile(on_cuda=True)
    if torch.cuda.is_available():
        assert label.split()[0] == prof.name
        assert prof.name == profile_for_device_name(torch.cuda.get_device_name()) or label.startswith(
            "h100 (assumed: no profile")
    else:
        assert prof.name == "h100" and label == "h100 (assumed: no CUDA device visible on this host)"


def test_dry_run_prints_every_rank_without_a_process_group(tmp_path, capsys):
    from dist_train.entry import dry_run

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("model: {kind: gpt, d_model: 32, n_layers: 4, n_heads: 4, vocab_size: 64}\n"
                        "data: {source: synthetic, seq_len: 32}\n"
                        "train: {global_batch: 8, micro_batch: 2}\n")
    assert dry_run(str(cfg_file), ["parallel.pp=2", "parallel.tp=2", "parallel.dp=2", "parallel.microbatches=2"]) == 0
    out = capsys.readouterr().out
    assert "dist_train/cost/memory.py on device profile cpu (" in out
    header = next(line.split() for line in out.splitlines() if line.split()[:1] == ["rank"])
    assert header[-7:] == ["params", "grads", "optim", "acts", "other", "total", "at"]
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [int(r[0]) for r in rows] == list(range(8))
    assert all(r[7] == ("0-1" if r[2] == "0" else "2-3") for r in rows)  # pp coordinate -> layers
    # the total is the step's peak phase, named in the last column: at most the columns' sum
    assert all(r[-1] in ("loss", "bwd", "optim") and float(r[-2]) <= sum(map(float, r[-7:-2])) + 0.003 for r in rows)
    assert not dist.is_initialized()


@pytest.mark.parametrize("parallel,model,message", [
    ({"tp": 4}, {}, r"model.n_kv_heads = 2 is not divisible by parallel.tp = 4"),
    ({"tp": 3}, {}, r"model.n_heads = 4 is not divisible by parallel.tp = 3: .*use tp in \[1, 2, 4\]"),
    ({"pp": 3}, {}, r"model.n_layers = 2 < 3 pipeline stages"),
    ({"pp": 2, "zero_stage": 3}, {}, r"parallel.zero_stage = 3 with parallel.pp = 2 is not supported"),
    ({"pp": 2}, {"tie_embeddings": True}, r"tie_embeddings with parallel.pp = 2"),
    ({"pp": 2, "microbatches": 3}, {}, r"parallel.microbatches = 3"),
    ({"tp": 2}, {"ffn_hidden": 33}, r"FFN hidden size 33 is not divisible by parallel.tp = 2; .*e.g. 34"),
    ({"cp": 3, "cp_method": "ulysses"}, {}, r"by the Ulysses degree 3 \(parallel.cp\): .*parallel.cp in \[1, 2, 4\], or "
                                            r"parallel.cp_method: ring"),
])
def test_invalid_combinations_fail_before_any_process_group(parallel, model, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(parallel=parallel, model=model)
    assert not dist.is_initialized()

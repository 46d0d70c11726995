"""The planner's host-dispatch model: on a profile whose kernels launch asynchronously (``host_op_us`` > 0) a rank's
compute per micro-batch is max(device time, eager ops × host_op_us), not their sum; the cpu profile keeps its serial
``op_overhead_us``. Profile validation of the field, and what ``plan --explain`` / ``--json`` say about it."""
from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
import yaml

from dist_train.cli import main
from dist_train.config import config_from_dict, load_config, step_micro_batches
from dist_train.cost.predict import predict
from dist_train.cost.shape import rank_inputs
from dist_train.cost.step_time import EAGER_OPS_PER_LAYER, OUTER_OPS, host_bound_seconds, outer_ops
from dist_train.gpucheck.dispatch import OpCounter
from dist_train.models.gpt import GPT
from dist_train.models.swin import build_swin
from dist_train.plan.enumerate import enumerate_layouts, layout_label, rank_layouts
from dist_train.plan.profiles import DEFAULT_HOST_OP_US, builtin_profiles, load_profile_file, profile_to_dict

PROFILES = builtin_profiles()
H100, CPU = PROFILES["h100"], PROFILES["cpu"]
#: the components a rank's compute per step is the sum of (the rest is communication, the bubble, the optimizer)
COMPUTE = ("matmul", "attention", "elementwise", "op_overhead", "host_dispatch_exposed")
TINY = {"model": {"kind": "gpt", "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 100,
                  "ffn_hidden": 128},
        "data": {"source": "synthetic", "seq_len": 64},
        "train": {"global_batch": 4, "micro_batch": 2, "precision": "bf16"}}
#: a Llama-3-8B-shaped layer stack at 8K tokens: every eager op's kernel runs far longer than its launch
BIG = {"model": {"kind": "gpt", "d_model": 4096, "n_layers": 8, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
                 "ffn_hidden": 14336},
       "data": {"source": "synthetic", "seq_len": 8192},
       "train": {"global_batch": 2, "micro_batch": 1, "precision": "bf16"}}


def _cfg(base: dict, *sets: str):
    return config_from_dict(copy.deepcopy(base), list(sets))


def _without_host(prof):
    """The profile as the planner costed it before host dispatch was modelled."""
    return dataclasses.replace(prof, host_op_us=0.0)


def test_every_gpu_profile_assumes_a_host_dispatch_cost_and_the_cpu_none():
    for name, prof in PROFILES.items():
        assert (prof.host_op_us, prof.op_overhead_us) == ((0.0, 12.0) if prof.is_cpu else (20.0, 0.0)), name


def test_host_bound_seconds_is_the_slower_of_device_and_host():
    assert host_bound_seconds(1e-3, 100, H100) == 100 * 20e-6          # 2 ms of launches > 1 ms of kernels
    assert host_bound_seconds(5e-3, 100, H100) == 5e-3                 # the launches hide
    assert host_bound_seconds(1e-9, 10 ** 6, CPU) == 1e-9              # cpu: no host term (op_overhead_us is serial)


@pytest.mark.parametrize("checkpointing", ["none", "full"])
def test_a_small_model_on_a_gpu_is_host_bound_at_ops_times_host_op_us(checkpointing):
    """The tiny GPT's kernels are microseconds: its compute per step is its eager ops × host_op_us exactly (48 per layer
    per micro-batch, each a forward op with its backward, a full recompute's forward adding a third, + the 26 ops
    outside the layers and 30 for its one loss chunk), the device's work hidden under it."""
    c = _cfg(TINY, f"train.activation_checkpointing={checkpointing}")
    p = predict(c, H100)
    again = 4 / 3 if checkpointing == "full" else 1
    ops = (EAGER_OPS_PER_LAYER["gpt"] * c.model.n_layers * again + 26 + 30) * step_micro_batches(c)
    assert p.host_bound and p.host["ops"] == pytest.approx(ops, rel=1e-12) and p.host["host_op_us"] == 20.0
    assert sum(p.time[k] for k in COMPUTE) == pytest.approx(ops * 20e-6, rel=1e-12)
    assert p.host["dispatch_s"] == pytest.approx(ops * 20e-6, rel=1e-12)
    device = sum(p.time[k] for k in COMPUTE if k != "host_dispatch_exposed")
    assert p.host["device_s"] == pytest.approx(device, rel=1e-12) and device < 0.2 * p.host["dispatch_s"]
    # what the device waits is the step's excess over the model without host dispatch, nothing else moved
    before = predict(c, _without_host(H100))
    assert p.step_time_s - before.step_time_s == pytest.approx(p.time["host_dispatch_exposed"], rel=1e-9)
    assert {k: v for k, v in p.time.items() if k not in ("host_dispatch_exposed", "step", "dp_comm_exposed")} == \
           {k: v for k, v in before.time.items() if k not in ("host_dispatch_exposed", "step", "dp_comm_exposed")}


@pytest.mark.parametrize("layout", [[], ["parallel.pp=2", "parallel.microbatches=2"], ["parallel.cp=2"],
                                    ["parallel.tp=2", "parallel.sequence_parallel=true"]],
                         ids=["single", "pp2", "cp2_ring", "tp2_sp"])
def test_a_big_model_where_launches_hide_is_costed_bit_identically(layout):
    """Kernels longer than their launches: every time component and the step are the model's without host dispatch,
    to the bit; the host's share is reported, and the rank is not host-bound."""
    c = _cfg(BIG, *layout)
    p, before = predict(c, H100), predict(c, _without_host(H100))
    assert not p.host_bound and p.time["host_dispatch_exposed"] == 0.0
    assert p.time == before.time and p.step_time_s == before.step_time_s and p.memory == before.memory
    assert 0 < p.host["dispatch_s"] < 0.5 * p.host["device_s"]


def test_the_cpu_profile_keeps_its_serial_op_overhead():
    """On cpu the ops run on the host: op_overhead_us × ops is added to the compute, no host term, no host report."""
    c = _cfg(TINY)
    p = predict(c, CPU)
    ops = EAGER_OPS_PER_LAYER["gpt"] * c.model.n_layers * step_micro_batches(c)
    assert p.time["op_overhead"] == pytest.approx(ops * CPU.op_overhead_us * 1e-6 / CPU.compute_share(1), rel=1e-12)
    assert p.time["host_dispatch_exposed"] == 0.0 and p.host == {} and not p.host_bound
    assert p.to_dict()["host_bound"] is False and p.to_dict()["host"] == {}


def test_small_per_rank_swin_tiles_are_host_bound_and_the_best_layout_is_not():
    """docs/planner.md: the 721×1440 Swin's best layout (dp16 × wp 4×4) runs 0.28 ms of device work per eager op and
    hides its launches; in 4×64 tiles a rank's op is ~19 µs of device work, under the assumed 20 µs dispatch."""
    base = load_config("configs/sweeps/projections/swin_721x1440.yaml", [], derives_layouts=True)

    def layout(*sets):
        return config_from_dict(base.to_dict(), list(sets))

    best = predict(layout("parallel.dp=16", "parallel.wp=[4,4]", "parallel.zero_stage=3"), H100, 256)
    tiles = predict(layout("parallel.wp=[4,64]", "parallel.zero_stage=3"), H100, 256)
    assert not best.host_bound and tiles.host_bound
    layer_ops = tiles.host["ops"] - OUTER_OPS["swin"]
    per_op = tiles.host["device_s"] / layer_ops
    assert 15e-6 < per_op < 20e-6, per_op


def _profile_file(tmp_path, name="custom", **changes):
    d = {**profile_to_dict(H100), **changes}
    d = {k: v for k, v in d.items() if v is not None}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def test_a_custom_profile_without_host_op_us_costs_no_host_dispatch_and_plan_says_so(tmp_path, capsys):
    """A profile written before the field existed (a copy of h100 without it) still loads: host_op_us takes its stated
    default, 0, the old model, and ``plan`` says the host's dispatch is not costed. The built-ins print no such line."""
    path = _profile_file(tmp_path, host_op_us=None)
    assert "host_op_us" not in yaml.safe_load(path.read_text())
    prof = load_profile_file(path)
    assert prof.host_op_us == DEFAULT_HOST_OP_US == 0.0
    assert main(["plan", "configs/gpt_tiny.yaml", "--device", str(path), "--current"]) == 0
    line = "profile custom sets no host_op_us: the host's dispatch is not costed"
    assert line in capsys.readouterr().out
    assert main(["plan", "configs/gpt_tiny.yaml", "--device", "h100", "--current"]) == 0
    assert line not in capsys.readouterr().out


@pytest.mark.parametrize("changes, message", [
    ({"host_op_us": -1}, r"host_op_us -1: must be a number >= 0 \(microseconds per eager op\)"),
    ({"host_op_us": "fast"}, r"host_op_us 'fast': must be a number >= 0"),
    ({"host_op_us": float("nan")}, r"host_op_us nan: must be a number >= 0"),
    ({"op_overhead_us": -2.5}, r"op_overhead_us -2.5: must be a number >= 0"),
    ({"host_op_us": 8, "cores": 4}, r"host_op_us 8 on a cpu profile \(cores set\): its ops run on the host, serially, "
                                    r"so their cost is op_overhead_us"),
])
def test_a_bad_host_op_us_is_refused_with_one_line(tmp_path, capsys, changes, message):
    path = _profile_file(tmp_path, **changes)
    with pytest.raises(ValueError, match=rf"^device profile 'custom' in {path}: {message}"):
        load_profile_file(path)
    assert main(["plan", "configs/gpt_tiny.yaml", "--device", str(path), "--current"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and ("host_op_us" in err or "op_overhead_us" in err), err


def test_plan_explain_and_json_say_which_ranks_are_host_bound(tmp_path, capsys):
    """The ranking marks a host-bound layout, --explain prints the host's dispatch against the device's compute, and
    the JSON carries host_bound, the host figures and the host_dispatch_exposed component."""
    out_json = tmp_path / "plan.json"
    assert main(["plan", "configs/gpt_tiny.yaml", "--device", "h100", "--current", "--explain",
                 "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "best [host-bound]" in out
    assert "host dispatch: 152 eager ops x 20 us = 3.04 ms/step vs device compute" in out and "HOST-BOUND" in out
    row = json.loads(out_json.read_text())["layouts"][0]
    assert row["host_bound"] is True and row["host"]["ops"] == 152 and row["host"]["bound"] is True
    assert row["time_s"]["host_dispatch_exposed"] == pytest.approx(row["host"]["dispatch_s"] - row["host"]["device_s"])
    # a big model: the line says the launches hide, no marker
    big = tmp_path / "big.yaml"
    big.write_text(yaml.safe_dump(BIG))
    assert main(["plan", str(big), "--device", "h100", "--current", "--explain"]) == 0
    out = capsys.readouterr().out
    assert "[host-bound]" not in out and "hidden behind the kernels (host " in out
    # cpu: no host line at all (its op cost is serial, in the op_overhead component)
    assert main(["plan", "configs/gpt_tiny.yaml", "--device", "cpu", "--current", "--explain"]) == 0
    assert "host dispatch" not in capsys.readouterr().out


def test_a_dispatch_limited_layout_no_longer_ranks_first():
    """The issue: without the host term the planner ranked a layout first whose ranks are dispatch-limited. The 32K
    toy GPT (d 128) on 2 h100s: a cp ring with K/V pieces dispatches 14 ops per piece and ring step — without the
    host term it ranked first; with it, its device waits ~4 ms a step for launches, and a layout with fewer ops
    per rank (tp2, itself slightly host-bound) ranks first."""
    c = load_config("configs/gpt_long_context.yaml", [], derives_layouts=True)
    cands = enumerate_layouts(c, 2)
    (old_best, old_cfg), = rank_layouts(cands, _without_host(H100))[:1]
    (new_best, new_cfg), = rank_layouts(cands, H100)[:1]
    ring = predict(old_cfg, H100)
    assert layout_label(old_cfg).startswith("cp2 ring/") and ring.host_bound
    assert layout_label(new_cfg).startswith("tp2 ")
    assert new_best.time["host_dispatch_exposed"] < 0.3 * ring.time["host_dispatch_exposed"]
    assert old_best.step_time_s < new_best.step_time_s < ring.step_time_s  # the old model was too optimistic


def _counted_forward_ops(cfg) -> int:
    """Non-view aten ops of one fp32 forward of ``cfg``'s real model on CPU, after a first one
    (gpucheck.dispatch.OpCounter)."""
    torch.manual_seed(0)
    if cfg.model.kind == "gpt":
        model = GPT(cfg.model, init_seed=0, loss_chunk=cfg.train.loss_chunk)
        s = cfg.data.seq_len
        tokens = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch, s + 1))
        batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "positions": torch.arange(s)}
    else:
        model = build_swin(cfg.model, wp_group=None, grid=(1, 1))
        h, w = cfg.data.image
        batch = {"x": torch.randn(1, h, w, cfg.model.in_channels), "y": torch.randn(1, h, w, cfg.model.out_channels),
                 "image_size": (h, w)}
    model(batch)  # warm: what a training step dispatches (the swin's shifted-window masks are cached after a first call)
    with OpCounter() as counter:
        model(batch)
    return counter.ops


@pytest.mark.parametrize("kind, chunk", [("gpt", "full"), ("gpt", 64), ("gpt", 16), ("swin", None)])
def test_the_ops_outside_the_layers_are_the_real_models(kind, chunk):
    """step_time.outer_ops (embedding, final norm, head, loss; + 30 per chunk of the GPT's chunked loss) is what the
    real model dispatches beside its layers: a forward's non-view aten ops minus its layers' (one more pair of layers
    gives a layer's count), within 15%, as EAGER_OPS_PER_LAYER is (tests/test_gpu_check.py)."""
    if kind == "gpt":
        base = {"model": {**TINY["model"], "vocab_size": 128}, "data": {"source": "synthetic", "seq_len": 64},
                "train": {"global_batch": 1, "micro_batch": 1, "loss_chunk": chunk}}
    else:
        base = {"model": {"kind": "swin", "d_model": 32, "n_layers": 2, "n_heads": 2, "window": 4, "in_channels": 3,
                          "out_channels": 3}, "data": {"source": "weather", "image": [16, 16]},
                "train": {"global_batch": 1, "micro_batch": 1}}
    two, four = _cfg(base), _cfg(base, "model.n_layers=4")
    per_layer = (_counted_forward_ops(four) - _counted_forward_ops(two)) / 2
    counted = _counted_forward_ops(two) - 2 * per_layer
    sh, loc = rank_inputs(two, CPU)
    modelled = outer_ops(two, sh, loc)
    assert abs(counted - modelled) <= 0.15 * modelled, (counted, modelled)

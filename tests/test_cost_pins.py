"""The cost model's figures are pinned: planner predictions (memory, time, MFU), the dry run's per-rank
memory, FLOPs per token / sample / pixel and MFU, against tests/data/cost_pins.json — the values the code
produced on 2026-11-30 before the cost model moved to dist_train/cost/ (issue 18). Equality is exact:
a change here is a behaviour change and must regenerate the file on purpose (``python
tests/test_cost_pins.py > tests/data/cost_pins.json``) and say why in the commit."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

from dist_train.config import config_from_dict, load_config
from dist_train.cost.flops import Throughput, flops_per_token, model_params, train_flops_per_token
from dist_train.cost.layout import stages_of_rank
from dist_train.cost.memory import estimate_memory
from dist_train.cost.predict import predict
from dist_train.cost.shape import shape_of
from dist_train.dryrun import rank_layout
from dist_train.plan.profiles import builtin_profiles

PINS = Path(__file__).parent / "data" / "cost_pins.json"
ROOT = Path(__file__).resolve().parent.parent
GPT = {"model": {"kind": "gpt", "d_model": 64, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 100},
       "data": {"source": "synthetic", "seq_len": 256},
       "train": {"global_batch": 8, "micro_batch": 2}}
VARIANTS = {
    "base": [],
    "tp2_sp": ["parallel.tp=2", "parallel.sequence_parallel=true"],
    "pp2_1f1b": ["parallel.pp=2", "parallel.dp=2"],
    "pp2_interleaved": ["parallel.pp=2", "parallel.pp_schedule=interleaved", "parallel.microbatches=4"],
    "cp4_zigzag_zero1": ["parallel.cp=4", "parallel.cp_layout=zigzag", "parallel.zero_stage=1", "parallel.dp=2"],
    "cp2_ulysses_full": ["parallel.cp=2", "parallel.cp_method=ulysses", "train.activation_checkpointing=full",
                         "model.attention_window=31"],
    "hybrid_selective_bf16": ["parallel.cp=4", "parallel.cp_method=hybrid", "parallel.ulysses_degree=2",
                              "train.activation_checkpointing=selective", "train.precision=bf16",
                              "parallel.cp_kv_piece=16"],
    # ZeRO-3's padded partitions, its temporary gathers under the user's knobs and its all-gathers less the
    # persistent tensors (the norms: at most 1000 elements)
    "zero3_dp2_gathers": ["parallel.dp=2", "parallel.zero_stage=3", "train.precision=bf16",
                          'parallel.deepspeed={"zero_optimization": {"stage3_param_persistence_threshold": 1000, '
                          '"stage3_max_live_parameters": 20000, "stage3_max_reuse_distance": 0}}'],
}


def _prediction(cfg, prof) -> dict:
    p = predict(cfg, prof)
    return {"memory": p.memory, "time": p.time, "step_time_s": p.step_time_s, "tokens_per_s": p.tokens_per_s,
            "mfu": p.mfu, "flops_per_token": p.flops_per_token, "memory_phases": p.memory_phases}


def figures() -> dict:
    prof = builtin_profiles()
    out: dict = {"predict": {}, "dry_run": {}, "flops": {}}
    for name, sets in VARIANTS.items():
        c = config_from_dict(copy.deepcopy(GPT), sets)
        for dev in ("h100", "cpu"):
            out["predict"][f"{name}/{dev}"] = _prediction(c, prof[dev])
        rows = rank_layout(c, profile=prof["h100"])
        out["dry_run"][name] = [[r.rank, [s.index for s in r.stages], r.memory.components, r.memory.phases]
                                for r in rows]
        fps = train_flops_per_token(c) * c.data.seq_len
        out["flops"][name] = {"per_token": flops_per_token(shape_of(c)), "per_sample": fps,
                              "total_params": model_params(c),
                              "mfu_at_0.25s": Throughput(fps * c.train.global_batch, c.train.global_batch * c.data.seq_len,
                                                         c.world_size, 0.5).metrics(0.25)}
    swin_yaml = ROOT / "configs" / "swin_weather.yaml"
    sw = load_config(swin_yaml, ["parallel.wp=1"])
    for dev in ("h100", "cpu"):
        out["predict"][f"swin/{dev}"] = _prediction(sw, prof[dev])
    out["dry_run"]["swin_wp2"] = [[r.rank, [], r.memory.components]
                                  for r in rank_layout(load_config(swin_yaml), profile=prof["h100"])]
    out["flops"]["swin_per_pixel"] = train_flops_per_token(sw)
    sw3 = load_config(swin_yaml, ["parallel.wp=1", "model.window=[4,8]", "model.patch_size=2", "model.ffn_hidden=null"])
    out["flops"]["swin_per_pixel_w48_p2"] = train_flops_per_token(sw3)
    c = config_from_dict(copy.deepcopy(GPT), ["parallel.pp=2", "parallel.dp=2"])
    out["memory_rank1"] = estimate_memory(c, stages_of_rank(c, 1), prof["h100"]).components
    return out


def _diff(a, b, path="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b))
        return [d for k in keys for d in _diff(a.get(k), b.get(k), f"{path}/{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _diff(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: pinned {a!r}, now {b!r}"]


def test_cost_figures_are_bit_identical_to_the_pins():
    # through JSON, as the pins were written (tuples become lists, floats round-trip exactly)
    now = json.loads(json.dumps(figures(), sort_keys=True))
    diffs = _diff(json.loads(PINS.read_text()), now)
    assert not diffs, "\n".join(diffs[:20])


def test_the_cost_model_imports_no_torch():
    """``import dist_train.cost`` is arithmetic on the config: no torch, so no torch.distributed state."""
    code = "import sys, dist_train.cost; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


if __name__ == "__main__":
    json.dump(figures(), sys.stdout, indent=1, sort_keys=True)
    print()

"""DeepSpeed ZeRO-3's persistent parameters, counted by the memory model.

DeepSpeed 0.19.8's ZeRO-3 keeps every parameter of at most ``stage3_param_persistence_threshold`` elements (default
1e5; in module order while their total stays within ``stage3_model_persistence_threshold``) whole on every rank from
its first forward on, besides its 1/dp partition (parameter_offload.py ``mark_persistent_parameters``; the
coordinator never releases it, stage3.py gathers it again after each step); gradients and AdamW state stay
partitioned. ``cost.memory`` counted every weight as 1/dp: for the 1.2M-parameter test GPT at dp2 in fp32, 2,459,136 B
where the engine holds 4,231,680 B. Here: the cost model's parameter tensors are the modules' (GPT and Swin), and the
rule, with the user's keys; the real engine's bytes are pinned in tests/test_zero_buckets.py's spawn.
"""
from __future__ import annotations

import pytest
import torch

from dist_train.bench.cli.ckpt import engine_config
from dist_train.config import DEEPSPEED_PERSISTENCE_THRESHOLD_DEFAULT, config_from_dict, zero3_persistence
from dist_train.cost.memory import parameter_state_bytes, rank_param_tensors, rank_params, zero3_persistent_params
from dist_train.cost.shape import rank_inputs
from dist_train.mesh import build_mesh
from dist_train.plan.profiles import builtin_profiles
from dist_train.trainer import build_model

CPU = builtin_profiles()["cpu"]


def _gpt(parallel: dict, deepspeed: dict | None = None, model: dict | None = None, precision: str = "fp32"):
    d = engine_config({**parallel, **({"deepspeed": deepspeed} if deepspeed else {})}, model)
    d["train"].update(precision=precision, global_batch=parallel.get("dp", 1), micro_batch=1)
    return config_from_dict(d)


def _swin(parallel: dict, d_model: int = 32, heads: int = 4, window=8, image=(32, 32)):
    return config_from_dict({
        "model": {"kind": "swin", "d_model": d_model, "n_layers": 2, "n_heads": heads, "ffn_hidden": 2 * d_model,
                  "window": window, "in_channels": 3, "out_channels": 3, "wrap": [False, True]},
        "data": {"source": "weather", "image": list(image)}, "parallel": parallel,
        "train": {"global_batch": parallel.get("dp", 1), "micro_batch": 1}})


def _deepspeed_rule(tensors: list, threshold: int, cap: int | None) -> int:
    """DeepSpeed 0.19.8's ``mark_persistent_parameters`` over the module's parameter sizes, in order."""
    return sum(_persistent(tensors, threshold, cap))


def _persistent(tensors: list, threshold: int, cap: int | None) -> list:
    """The sizes of the tensors DeepSpeed 0.19.8's ``mark_persistent_parameters`` keeps whole, in order."""
    kept = []
    for n in tensors:
        if cap is not None and n + sum(kept) > cap:
            continue
        if n <= threshold:
            kept.append(n)
    return kept


def _shares(tensors: list, shards: int) -> int:
    """DeepSpeed's ZeRO-3 share of each tensor on ``shards`` ranks, summed: ceil(n / shards)
    (partition_parameters.py ``_aligned_size`` // shards)."""
    return sum(-(-int(n) // shards) for n in tensors)


def _state(cfg) -> tuple[dict, float, object]:
    sh, loc = rank_inputs(cfg, CPU)
    load = loc.loads[0]
    n_local = rank_params(cfg, sh, load)
    return parameter_state_bytes(cfg, sh, loc, load, n_local), n_local, (sh, load)


@pytest.mark.parametrize("cfg", [
    _gpt({}), _gpt({}, model={"tie_embeddings": True}), _gpt({}, model={"n_layers": 3, "d_model": 64}),
    _swin({}), _swin({}, d_model=24, heads=2, window=[4, 6], image=(16, 24))],
    ids=["gpt", "gpt_tied", "gpt_d64", "swin", "swin_4x6"])
def test_the_cost_models_parameter_tensors_are_the_modules(cfg):
    """Tensor by tensor, in module order (what DeepSpeed walks): the cost model's tp-local sizes are the module's
    (at tp > 1: the GPT's in tests/test_zero_buckets.py's spawn, the swin's in tests/test_swin_tp.py's)."""
    model = build_model(cfg, build_mesh(cfg.parallel, 1), torch.device("cpu"))
    sh, loc = rank_inputs(cfg, CPU)
    tensors = rank_param_tensors(cfg, sh, loc.loads[0])
    assert tensors == [p.numel() for p in model.parameters()]
    assert rank_params(cfg, sh, loc.loads[0]) == sum(tensors) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("make", [_gpt, _swin], ids=["gpt", "swin"])
def test_zero3_weights_count_the_persistent_parameters_whole(make):
    """ZeRO-3 at dp2: 1/2 of every weight + the persistent ones whole (DeepSpeed's rule over the module's tensors,
    with the default threshold, the user's, and the user's model cap, which skips a tensor that would pass it and
    goes on); gradients and optimizer state partitioned as before; no persistent extra at one shard (the partition
    is the parameter: tp2 without dp) nor below ZeRO-3."""
    base = make({"dp": 2, "zero_stage": 3})
    sh, loc = rank_inputs(base, CPU)
    tensors = rank_param_tensors(base, sh, loc.loads[0])
    n = sum(tensors)
    default = DEEPSPEED_PERSISTENCE_THRESHOLD_DEFAULT
    for zero, threshold, cap in (({}, default, None), ({"stage3_param_persistence_threshold": 0}, 0, None),
                                 ({"stage3_param_persistence_threshold": 1000}, 1000, None),
                                 ({"stage3_model_persistence_threshold": n // 3}, default, n // 3),
                                 # DeepSpeed's config takes the field names too; YAML reads 1e5 as a string
                                 ({"param_persistence_threshold": 500, "model_persistence_threshold": "1e5"}, 500,
                                  100_000)):
        cfg = make({"dp": 2, "zero_stage": 3, **({"deepspeed": {"zero_optimization": zero}} if zero else {})})
        assert zero3_persistence(cfg) == (threshold, cap), zero
        kept = _deepspeed_rule(tensors, threshold, cap)
        states, n_local, (sh, load) = _state(cfg)
        assert zero3_persistent_params(cfg, sh, load, n_local) == kept, zero
        # each tensor's share padded to ceil(n / 2) (the swin's odd tensors), a persistent one's storage to 2 shares
        part = _shares(tensors, 2)
        assert states["weights"] == 4 * (part + 2 * _shares(_persistent(tensors, threshold, cap), 2)), zero
        # AdamW's moments and the fp32 master clone DeepSpeed's ZeRO steps, partitioned
        assert (states["grads"], states["optimizer"]) == (4 * part, (8 + 4) * part), zero
        assert part == n / 2 if make is _gpt else part > n / 2, zero
    assert 0 < _deepspeed_rule(tensors, default, n // 3) < _deepspeed_rule(tensors, default, None)  # the cap bites
    if make is _gpt:
        one_shard, n_tp = _state(make({"tp": 2, "zero_stage": 3}))[:2]
        assert one_shard["weights"] == 4 * n_tp
    for stage in (1, 2):
        assert _state(make({"dp": 2, "zero_stage": stage}))[0]["weights"] == 4 * n

"""The built-in GPU profiles cost the code dist-train runs: its eager GPT modules, on every device.

dist-train's GPT runs the same modules on CUDA as on CPU (``models/gpt.py``: the RMSNorm and SwiGLU autograd
Functions, one 16-bit cast of each norm output shared by its linears, torch SDPA or the block kernels' flash
attention), so what a layer keeps is the same tensors in the same dtypes. The dtypes depend on the engine and
``train.precision``, not on the device: DDP and the pipeline engine autocast over fp32 parameters (fp32 residual
stream), FSDP2's ``MixedPrecisionPolicy(param_dtype=bf16)`` and DeepSpeed's bf16 module compute with bf16
parameters (bf16 stream) — the same code on both devices (``engines/``; ``engines.autocast_dtype``). The CPU
side is counted to the byte in tests/test_gpt_saved_tensors.py; here a GPU profile's estimate is shown to be the
same function of the element size: every memory component and phase but the baseline equal to the cpu
profile's for the same config, and equal to what the CPU count holds. A GPU profile that went back to the fused
(Transformer-Engine style) convention, or a term costed differently on a GPU without a stated reason, fails.
The stated reason, tested: a swin's LayerNorm statistics under DeepSpeed's bf16 module (CPU's kernel keeps them
in bf16, CUDA's in fp32, ``cost.memory.activation_elems_per_token``). fp32 training with grouped-query heads, where
CUDA's SDPA would run its math kernel, takes the block kernels instead (``models.attention.sdpa_keeps_no_scores``)
and is costed as on CPU.
"""
from __future__ import annotations

import dataclasses

import pytest
import yaml

from dist_train.cli import main
from dist_train.cost.memory import gpt_eager, rank_memory
from dist_train.cost.predict import predict
from dist_train.cost.shape import rank_inputs
from dist_train.cost.step_time import ELEMENTWISE_PASSES
from dist_train.models import attention
from dist_train.plan.profiles import builtin_profiles, profile_to_dict
from tests.test_gpt_saved_tensors import SHAPES, _config, counted_bytes, predicted_bytes
from tests.test_swin_saved_tensors import SHAPES as SWIN_SHAPES
from tests.test_swin_saved_tensors import _config as _swin_config

PROFILES = builtin_profiles()
CPU = PROFILES["cpu"]
GPUS = [name for name, prof in PROFILES.items() if not prof.is_cpu]

# (name, precision, checkpointing, parallel): each engine's dtype rule and each parallel term the CPU tests count
GPT_CASES = [
    # fp32 with grouped-query heads on the path that calls torch SDPA: the last test
    ("fp32_window", "fp32", "none", {"window": 16}),
    ("fp32_cp2_full", "fp32", "full", {"cp": 2}),
    ("ddp_bf16", "bf16", "none", {}),
    ("ddp_bf16_selective", "bf16", "selective", {}),
    ("ddp_bf16_full", "bf16", "full", {}),
    ("two_samples_bf16", "bf16", "none", {"micro_batch": 2}),
    ("deepspeed_bf16", "bf16", "none", {"zero_stage": 1}),
    ("deepspeed_bf16_full", "bf16", "full", {"zero_stage": 3}),
    ("fsdp_bf16", "bf16", "none", {"dp": 2, "fsdp": True}),
    ("fsdp_bf16_selective", "bf16", "selective", {"dp": 2, "fsdp": True}),
    ("tp2_bf16", "bf16", "none", {"tp": 2}),
    ("tp2_sp_bf16", "bf16", "selective", {"tp": 2, "sequence_parallel": True}),
    ("cp2_ring_bf16", "bf16", "none", {"cp": 2}),
    ("cp2_ulysses_bf16", "bf16", "selective", {"cp": 2, "cp_method": "ulysses"}),
    ("pp2_bf16", "bf16", "none", {"pp": 2, "microbatches": 2, "micro_batch": 2}),
    ("pp2_fsdp_bf16", "bf16", "full", {"pp": 2, "dp": 2, "fsdp": True, "microbatches": 2, "micro_batch": 2}),
    ("window_bf16", "bf16", "none", {"window": 16}),
    ("loss_full_bf16", "bf16", "none", {"loss_chunk": "full"}),
]


def _gpt(precision, checkpointing, parallel):
    parallel = dict(parallel)
    micro_batch, window = parallel.pop("micro_batch", 1), parallel.pop("window", None)
    loss_chunk = parallel.pop("loss_chunk", None)
    cfg = _config(*SHAPES[0], activation_checkpointing=checkpointing, micro_batch=micro_batch, window=window,
                  precision=precision, **parallel)
    if loss_chunk is not None:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, loss_chunk=loss_chunk))
    return cfg


def _above_baseline(cfg, prof) -> tuple[dict, dict]:
    """Every pipeline rank's memory components and phases on ``prof``, less the profile's baseline."""
    sh, loc = rank_inputs(cfg, prof)
    comps, phases = [], []
    for load in loc.loads:
        mem, ph = rank_memory(cfg, sh, prof, loc, load)
        c = dict(mem)
        c["total"] -= c.pop("baseline")
        comps.append(c)
        phases.append({k: v - prof.baseline_bytes for k, v in ph.items()})
    return comps, phases


@pytest.mark.parametrize("gpu", GPUS)
def test_builtin_gpu_profiles_cost_the_eager_modules(gpu):
    """Every built-in GPU profile costs this repo's eager GPT, not a fused layer it does not run."""
    prof = PROFILES[gpu]
    assert not prof.fused_kernels
    sh, _ = rank_inputs(_gpt("bf16", "none", {}), prof)
    assert gpt_eager(sh, prof)


@pytest.mark.parametrize("gpu", GPUS)
@pytest.mark.parametrize("case", GPT_CASES, ids=[c[0] for c in GPT_CASES])
def test_gpu_profile_gpt_memory_is_the_cpu_counted_function_of_element_size(gpu, case):
    """Same config, same element size: a GPU profile's components and phases (every pipeline rank's) are the cpu
    profile's to the byte, baseline aside — activations, the loss's chunk and what it keeps, the workspaces, the
    states, FSDP2's gathered weights."""
    _, precision, checkpointing, parallel = case
    cfg = _gpt(precision, checkpointing, parallel)
    assert _above_baseline(cfg, PROFILES[gpu]) == _above_baseline(cfg, CPU)


@pytest.mark.parametrize("gpu", GPUS)
def test_auto_precision_on_a_gpu_profile_is_bf16(gpu):
    """train.precision auto trains bf16 autocast on CUDA (``engines.autocast_dtype``): a GPU profile costs it as the
    cpu profile costs an explicit bf16, and not as fp32."""
    auto, bf16 = _gpt("auto", "none", {}), _gpt("bf16", "none", {})
    assert _above_baseline(auto, PROFILES[gpu]) == _above_baseline(bf16, CPU)
    assert _above_baseline(auto, PROFILES[gpu]) != _above_baseline(_gpt("fp32", "none", {}), CPU)


@pytest.mark.parametrize("checkpointing", ["none", "selective", "full"])
@pytest.mark.parametrize("parallel", [{}, {"zero_stage": 1}], ids=["autocast", "deepspeed_module"])
def test_h100_gpt_activations_are_what_the_cpu_model_keeps(parallel, checkpointing):
    """The direct tie: the h100 profile's predicted activations equal the bytes the real GPT's layers keep in bf16
    (counted live on CPU: autocast over fp32 parameters, and DeepSpeed's bf16 module)."""
    cfg = _config(*SHAPES[0], activation_checkpointing=checkpointing, precision="bf16", **parallel)
    assert counted_bytes(cfg, live=True) == pytest.approx(predicted_bytes(cfg, PROFILES["h100"]), rel=1e-12)


@pytest.mark.parametrize("gpu", GPUS)
def test_gpu_profile_elementwise_traffic_is_the_eager_layers(gpu):
    """The time model's elementwise term reads the same stored bytes on a GPU profile as on the cpu one (4 passes
    over the eager layer's activations, + the logits): equal once each is multiplied by its memory bandwidth. The
    ops term costs the eager op count at the profile's overhead — 0 on the GPU profiles (devices.yaml says why)."""
    cfg = _gpt("bf16", "none", {})
    gpu_t, cpu_t = predict(cfg, PROFILES[gpu]).time, predict(cfg, CPU).time
    assert gpu_t["elementwise"] * PROFILES[gpu].mem_bw_gbs == pytest.approx(cpu_t["elementwise"] * CPU.mem_bw_gbs)
    assert ELEMENTWISE_PASSES == 4 and gpu_t["op_overhead"] == 0.0 and cpu_t["op_overhead"] > 0


@pytest.mark.parametrize("gpu", GPUS)
@pytest.mark.parametrize("parallel", [{}, {"zero_stage": 1}, {"fsdp": True, "wp": 2}],
                         ids=["autocast", "deepspeed_module", "fsdp"])
def test_gpu_profile_swin_memory_differs_only_by_cuda_layernorm_statistics(gpu, parallel):
    """A swin is costed alike on both devices, but for the one kernel difference the model states: under
    DeepSpeed's bf16 module CPU's LayerNorm keeps its mean and rstd in bf16, CUDA's in fp32 — 2 norms × 2
    statistics × 2 more bytes per token and layer."""
    cfg = _swin_config(*SWIN_SHAPES[0], precision="bf16", **parallel)
    gpu_c, gpu_p = _above_baseline(cfg, PROFILES[gpu])
    cpu_c, cpu_p = _above_baseline(cfg, CPU)
    sh, loc = rank_inputs(cfg, CPU)
    stats = 2 * 2 * 2 * loc.tokens * loc.layers if "zero_stage" in parallel else 0.0
    assert gpu_c[0]["activations"] - cpu_c[0]["activations"] == stats
    for g, c in zip(gpu_c + gpu_p, cpu_c + cpu_p):
        assert {k: v for k, v in g.items() if k not in ("activations", "total", "loss", "backward")} == \
               {k: v for k, v in c.items() if k not in ("activations", "total", "loss", "backward")}


def test_plan_says_a_fused_profile_is_a_what_if(tmp_path, capsys):
    """``fused_kernels: true`` in a custom profile still works, and ``dist-train plan`` says it costs a layer dist-train
    does not run; the built-in h100 profile prints no such line."""
    fused = tmp_path / "h100_fused.yaml"
    fused.write_text(yaml.safe_dump({**profile_to_dict(PROFILES["h100"]), "fused_kernels": True}))
    what_if = "has fused_kernels: true — a what-if"
    assert main(["plan", "configs/gpt_tiny.yaml", "--device", str(fused), "--current"]) == 0
    out = capsys.readouterr().out
    assert what_if in out and "dist-train does not run" in out
    assert main(["plan", "configs/gpt_tiny.yaml", "--device", "h100", "--current"]) == 0
    assert what_if not in capsys.readouterr().out


@pytest.mark.parametrize("checkpointing", ["none", "selective", "full"])
@pytest.mark.parametrize("shape", [SHAPES[0], (64, 4, 1, 128, 64)], ids=["gqa2", "mqa"])
def test_fp32_gqa_on_a_gpu_profile_is_costed_as_on_cpu(shape, checkpointing, monkeypatch):
    """fp32 with grouped-query heads: where torch SDPA would run its math kernel (CUDA: flash takes 16-bit inputs
    only, the memory-efficient kernel no ``enable_gqa``), the model runs the block kernels instead
    (``models.attention.sdpa_keeps_no_scores``), which keep what SDPA's flash kernel keeps — counted here with that
    route taken on CPU: the GPU profile costs the same as the cpu profile, no S x S probabilities."""
    cfg = _config(*shape, activation_checkpointing=checkpointing)
    monkeypatch.setattr(attention, "sdpa_keeps_no_scores", lambda q, grouped: not grouped)
    assert predicted_bytes(cfg, PROFILES["h100"]) == pytest.approx(counted_bytes(cfg), rel=1e-12)
    assert predicted_bytes(cfg, PROFILES["h100"]) == predicted_bytes(cfg, CPU)

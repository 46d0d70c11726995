"""A config key that this config's engine, model, data source or settings never read is refused in one line naming
the key and its value (config.validate, exit 2 before any rank starts): each case below was accepted and silently
did nothing before (the audit: which code reads each key, per engine, model kind and data source)."""
import argparse
import copy
from pathlib import Path

import pytest
import yaml
import torch
import torch.distributed as dist

from dist_train.checkpoint.compat import config_differences
from dist_train.config import ConfigError, config_from_dict, load_config, user_zero_optimization
import dist_train.engines.deepspeed as deepspeed_engine
from dist_train.engines.deepspeed import DeepSpeedEngine, DeepSpeedForwardEngine
from dist_train.mesh import build_mesh
from dist_train.models.gpt import build_gpt
from dist_train.plan.cli import _plan_config
from dist_train.plan.enumerate import enumerate_layouts
from dist_train.preflight import check_engine, preflight
from dist_train.zero_keys import DEEPSPEED_STAGE3_FIELD_NAMES, REMOVED_ZERO_KEYS, ZERO_KEYS, zero_key
from tests.trainer_utils import tiny_gpt_config, tiny_swin_config

# (model kind, sections that set the unread key, the key, a phrase of the reason)
UNREAD = [
    ("gpt", {"parallel": {"cp": 2, "cp_method": "ring", "ulysses_degree": 2}}, "parallel.ulysses_degree",
     "cp_method = ring does not read it"),
    ("swin", {"parallel": {"ulysses_degree": 2}}, "parallel.ulysses_degree", "parallel.cp = 1"),
    ("gpt", {"parallel": {"microbatches": 4}}, "parallel.microbatches", "only the pipeline engine reads it"),
    ("swin", {"parallel": {"microbatches": 2}}, "parallel.microbatches", "parallel.pp = 1"),
    ("gpt", {"parallel": {"pp_schedule": "interleaved"}}, "parallel.pp_schedule", "parallel.pp = 1"),
    ("gpt", {"parallel": {"dp": 2, "fsdp_reshard_after_forward": False}}, "parallel.fsdp_reshard_after_forward",
     "only FSDP2 reads it"),
    ("swin", {"parallel": {"attn_kernel": "math"}}, "parallel.attn_kernel", "window attention has its own"),
    ("swin", {"train": {"loss_chunk": 64}}, "train.loss_chunk", "pixel MSE"),
    ("swin", {"data": {"seq_len": 1024}}, "data.seq_len", "a swin sample is one data.image"),
    ("gpt", {"data": {"image": [8, 8]}}, "data.image", "data.source = synthetic does not read it"),
    ("gpt", {"data": {"channels": 3}}, "data.channels", "weather-dataset setting"),
    ("gpt", {"data": {"steps": 10}}, "data.steps", "weather-dataset setting"),
    ("swin", {"data": {"prepare": "python-stdlib"}}, "data.prepare", "only data.source = indexed builds"),
    ("swin", {"data": {"tokenizer": "tok.json"}}, "data.tokenizer", "data.source = weather reads no text"),
    ("gpt", {"data": {"eod_id": 0}}, "data.eod_id", "only the packed-document options read it"),
    ("gpt", {"train": {"max_nonfinite_steps": 5}}, "train.max_nonfinite_steps", "only train.on_nonfinite = skip"),
    ("gpt", {"train": {"spike_window": 50}}, "train.spike_window", "train.spike_factor is null"),
    ("swin", {"train": {"eval_steps": 8}}, "train.eval_steps", "train.eval_every = 0"),
    ("gpt", {"data": {"source": "indexed", "path": "p", "valid_path": "v", "split": "98,2,0"}}, "data.split",
     "holds out 2% of data.path for validation, but data.valid_path is set"),
    ("gpt", {"data": {"source": "indexed", "path": "p", "split": "98,2,0", "valid_overlap_max": 0.01}},
     "data.valid_overlap_max", "validation is off (train.eval_every = 0)"),
    ("gpt", {"data": {"valid_overlap_min_tokens": 8}, "train": {"eval_every": 2}}, "data.valid_overlap_min_tokens",
     "data.source = synthetic"),
    ("gpt", {"profile": {"with_stack": True}}, "profile.with_stack", "profile.steps is null (off)"),
    ("swin", {"profile": {"ranks": [0]}}, "profile.ranks", "profile.steps is null (off)"),
]

# the same keys where they are read (each must still validate)
READ = [
    ("gpt", {"parallel": {"cp": 4, "cp_method": "hybrid", "ulysses_degree": 2}}),
    ("gpt", {"parallel": {"cp": 2, "cp_method": "ulysses", "ulysses_degree": 2}}),
    ("swin", {"parallel": {"cp": 2, "ulysses_degree": 2}}),  # swin's cp is Ulysses whatever cp_method says
    ("gpt", {"model": {"n_layers": 4}, "parallel": {"pp": 2, "microbatches": 4, "pp_schedule": "gpipe"}}),
    ("gpt", {"parallel": {"dp": 2, "fsdp": True, "fsdp_reshard_after_forward": False}}),
    ("gpt", {"parallel": {"attn_kernel": "math"}, "train": {"loss_chunk": 64}}),
    ("gpt", {"data": {"source": "indexed", "path": "p", "prepare": "python-stdlib", "tokenizer": "tok.json"}}),
    ("gpt", {"data": {"tokenizer": "tok.json", "document_mask": True}}),  # the tokenizer's EOD id
    # synthetic data standing in for a real config's (`--set data.source=synthetic`): its indexed keys stay
    ("gpt", {"data": {"path": "data_cache/pystd", "prepare": "python-stdlib", "tokenizer": "tok.json"}}),
    ("gpt", {"data": {"eod_mask_loss": True, "eod_id": 3}}),
    ("gpt", {"data": {"source": "indexed", "path": "p", "valid_path": "v", "split": "95,0,5"}}),
    ("gpt", {"data": {"source": "indexed", "path": "p", "split": "98,2,0", "valid_overlap_max": 0.01,
                      "valid_overlap_min_tokens": 8}, "train": {"eval_every": 2}}),
    ("swin", {"data": {"image": [12, 16], "channels": 2, "steps": 20}}),
    ("gpt", {"train": {"on_nonfinite": "skip", "max_nonfinite_steps": 5, "spike_factor": 3.0, "spike_window": 5,
                       "eval_every": 2, "eval_steps": 8}}),
    ("gpt", {"parallel": {"cp_layout": "striped", "sequence_parallel": True}}),  # size-1 axes: nothing to act on
    ("swin", {"profile": {"steps": [1, 2], "ranks": [0], "memory": True, "record_shapes": True, "with_stack": True}}),
]


def _build(kind, tmp_path, sections):
    if kind == "gpt":
        return tiny_gpt_config(tmp_path, **sections)
    return tiny_swin_config(tmp_path, tmp_path / "w", **sections)


@pytest.mark.parametrize("kind, sections, key, why", UNREAD, ids=[f"{c[0]}-{c[2]}" for c in UNREAD])
def test_a_key_nothing_reads_is_refused_in_one_line(kind, sections, key, why, tmp_path):
    with pytest.raises(ConfigError) as info:
        _build(kind, tmp_path, sections)
    msg = str(info.value)
    section, name = key.split(".")
    value = [v for sec, vals in sections.items() for k, v in vals.items() if sec == section and k == name][0]
    assert msg.startswith(f"{key} = {value!r}: ") and why in msg and "\n" not in msg, msg
    if key == "data.split":
        return  # refused by the split's own check, whose advice ("100,0,0") is a value already
    # a key a config file sets cannot be removed with --set: the line names the value that can (its default)
    default = msg.rsplit(f"--set {key}=", 1)[1].removesuffix(", its default)")
    assert msg.endswith(f"(on the command line: --set {key}={default}, its default)"), msg
    _build(kind, tmp_path, {**sections, section: {**sections[section], name: yaml.safe_load(default)}})


@pytest.mark.parametrize("kind, sections", READ, ids=[f"{c[0]}-{i}" for i, c in enumerate(READ)])
def test_the_same_keys_where_they_are_read_still_validate(kind, sections, tmp_path):
    _build(kind, tmp_path, sections)


@pytest.mark.parametrize("path", sorted(str(p) for p in Path("configs").rglob("*.yaml") if "sweeps/" not in str(p)
                                         or "projections" in str(p)))
def test_shipped_configs_and_their_full_dumps_validate(path):
    """Every shipped config, and its full dump (every key, defaults included: what run.dir/config.yaml records and
    ``dist-train plot`` reloads), passes."""
    cfg = load_config(path)
    assert config_from_dict(cfg.to_dict()) == cfg


def test_the_planner_keeps_layouts_without_a_pipeline_or_fsdp(tmp_path):
    """A base config with pipeline and FSDP2-only keys set: the planner's pp = 1 and non-FSDP layouts take their
    defaults (as they ran before: nothing read them) instead of being dropped as refused."""
    cfg = tiny_gpt_config(tmp_path, model={"n_layers": 4},
                          parallel={"dp": 2, "pp": 2, "microbatches": 2, "pp_schedule": "gpipe", "fsdp": True,
                                    "fsdp_reshard_after_forward": False})
    layouts = enumerate_layouts(cfg, 4, checkpointing=("none",), zero_stages=(None,))
    assert {(c.parallel.pp, c.parallel.fsdp) for c in layouts} == {(1, False), (1, True), (2, False), (2, True),
                                                                    (4, False)}
    for c in layouts:
        p = c.parallel
        assert (p.microbatches, p.pp_schedule) == ((2, "gpipe") if p.pp > 1 else (None, "1f1b"))
        assert p.fsdp_reshard_after_forward == (not p.fsdp)


def test_the_planners_config_may_set_keys_only_some_of_its_layouts_read(tmp_path):
    """`dist-train plan configs/gpt_tiny.yaml --set parallel.microbatches=4` (a pp = 1 base): the pipelined
    candidates read it, so the base is not refused (it was, as unread at the base's pp = 1); each candidate is
    checked as it is (those without a pipeline take the default), and a run config is still refused."""
    args = argparse.Namespace(config="configs/gpt_tiny.yaml", seq_len=None, image=None,
                              set=["parallel.microbatches=4", "parallel.pp_schedule=gpipe"])
    cfg = _plan_config(args)
    assert (cfg.parallel.pp, cfg.parallel.microbatches) == (1, 4)
    layouts = enumerate_layouts(cfg, 4, checkpointing=("none",), zero_stages=(None,))
    assert {c.parallel.pp for c in layouts} >= {1, 2}
    assert all((c.parallel.microbatches, c.parallel.pp_schedule) == ((4, "gpipe") if c.parallel.pp > 1 else
                                                                    (None, "1f1b")) for c in layouts)
    with pytest.raises(ConfigError, match=r"^parallel.microbatches = 4: only the pipeline engine reads it"):
        load_config("configs/gpt_tiny.yaml", ["parallel.microbatches=4"])
    with pytest.raises(ConfigError, match=r"^train.eval_steps = 3: validation is off"):  # not a layout's key
        _plan_config(argparse.Namespace(config="configs/gpt_tiny.yaml", set=["train.eval_steps=3"], seq_len=None,
                                        image=None))


@pytest.mark.parametrize("extra, needle", [
    ({"zero_optimisation": {"stage": 2}}, "parallel.deepspeed.zero_optimisation = {'stage': 2}: DeepSpeed never reads"),
    ({"gradient_predivide_factr": 2.0}, "parallel.deepspeed.gradient_predivide_factr = 2.0: DeepSpeed never reads"),
    ({"zero_optimization": {"overlap_comms": True}}, "parallel.deepspeed: DeepSpeed refuses overlap_comms (Extra"),
    # DeepSpeed's own refusals of its config (a removed feature's block): one line, not a traceback with exit 1
    ({"amp": {"enabled": False}}, "parallel.deepspeed: DeepSpeed refuses it: NVIDIA Apex AMP integration has been removed"),
    ({"communication_data_type": "fp8"}, "parallel.deepspeed: DeepSpeed refuses it: Invalid communication_data_type"),
    ({"zero_optimization": {"stage": 1, "overlap_comm": True}, "communication_data_type": "fp32",
      "bf16": {"immediate_grad_update": True}, "gradient_clipping": 1.0, "train_micro_batch_size_per_gpu": 2}, None),
])
def test_a_deepspeed_key_deepspeed_never_reads_is_refused_before_the_ranks(extra, needle, tmp_path):
    """``parallel.deepspeed`` is merged into the DeepSpeed config as written: DeepSpeed looks up the keys it knows and
    drops the rest, so a misspelt section (``zero_optimisation``) silently trained without it. The pre-flight runs
    DeepSpeed's own config reader and refuses a key it never looks up, or one its sub-configs reject."""
    cfg = tiny_gpt_config(tmp_path / "run", parallel={"dp": 1, "zero_stage": 1, "deepspeed": extra})
    if needle is None:
        preflight(cfg, on_cuda=False)
        return
    with pytest.raises(ConfigError) as info:
        preflight(cfg, on_cuda=False)
    assert str(info.value).startswith(needle) and "\n" not in str(info.value), str(info.value)


@pytest.mark.parametrize("block", ["offload_param", "offload_optimizer"])
def test_nvme_offload_without_deepspeeds_async_io_op_is_refused_before_the_ranks(block, tmp_path, monkeypatch):
    """ZeRO offload to NVMe swaps through DeepSpeed's async_io op (libaio): without it every rank stopped building its
    engine with "Unable to JIT load the async_io op" (as on this machine, which has no libaio). The pre-flight asks
    DeepSpeed whether the op is installed or can be built; here both answers are set, whatever the machine has."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops

    def offloading(device: str):
        offload = {block: {"device": device, "nvme_path": str(tmp_path / "nvme")}}
        return tiny_gpt_config(tmp_path / "run", parallel={"dp": 1, "zero_stage": 3,
                                                           "deepspeed": {"zero_optimization": offload}},
                               checkpoint={"resume": "none"})  # NVMe optimizer offload cannot checkpoint (config.py)
    cfg = offloading("nvme")
    builder = type(get_accelerator().create_op_builder("AsyncIOBuilder"))
    monkeypatch.setitem(installed_ops, "async_io", False)
    monkeypatch.setattr(builder, "is_compatible", lambda self, verbose=False: False)
    with pytest.raises(ConfigError) as info:
        preflight(cfg, on_cuda=False)
    assert str(info.value).startswith(f"parallel.deepspeed.zero_optimization.{block}.device = nvme: DeepSpeed swaps "
                                      "to NVMe through its async_io op") and "\n" not in str(info.value), info.value
    monkeypatch.setattr(builder, "is_compatible", lambda self, verbose=False: True)  # libaio there: the ranks' turn
    preflight(cfg, on_cuda=False)
    monkeypatch.setattr(builder, "is_compatible", lambda self, verbose=False: False)
    preflight(offloading("cpu"), on_cuda=False)  # host offload needs no op


@pytest.mark.parametrize("precision, accumulate", [("bf16", "fp32"), ("fp32", "bfloat16"), ("bf16", "fp16")])
def test_a_stage0_gradient_accumulation_dtype_deepspeed_builds_no_optimizer_for_is_refused_before_the_ranks(
        tmp_path, precision, accumulate):
    """At ZeRO stage 0 DeepSpeed 0.19.8 accumulates gradients only in the weights' dtype: any other
    ``data_types.grad_accum_dtype`` stopped every rank's engine build with a NotImplementedError ("unsupported mix of
    model_dtype and grad_accum_dtype"). The pre-flight refuses it in one line, and a dtype name DeepSpeed does not
    know; the weights' own dtype passes, and so does fp32 accumulation of bf16 weights at ZeRO-1 (DeepSpeed's
    BF16_Optimizer, which trains and checkpoints: tests/test_ckpt_engines.py)."""
    def config(stage: int, grad_accum_dtype: str, train_precision: str = precision):
        return tiny_gpt_config(tmp_path / "run", train={"precision": train_precision},
                               parallel={"zero_stage": stage,
                                         "deepspeed": {"data_types": {"grad_accum_dtype": grad_accum_dtype}}})
    with pytest.raises(ConfigError) as info:
        preflight(config(0, accumulate), on_cuda=False)
    message = str(info.value)
    assert message.startswith(f"parallel.deepspeed.data_types.grad_accum_dtype = '{accumulate}' with "
                              "parallel.zero_stage = 0") and "\n" not in message, message
    preflight(config(0, precision), on_cuda=False)
    preflight(config(1, "fp32", "bf16"), on_cuda=False)
    with pytest.raises(ConfigError, match="grad_accum_dtype = 'float64': not a dtype DeepSpeed knows"):
        preflight(config(0, "float64"), on_cuda=False)


def test_the_engines_nvme_check_reads_zero_optimization_through_the_configs_one_lookup(tmp_path, monkeypatch):
    """``parallel.deepspeed.zero_optimization`` is looked up in one place (config.user_zero_optimization: the block,
    or {} when absent or not a mapping); the engine's NVMe check read it with its own copy of that lookup before.
    Here the check refuses the block the helper returns and nothing else: hiding the block through the helper lets
    the same config pass."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops

    block = {"offload_param": {"device": "nvme", "nvme_path": str(tmp_path / "nvme")}}
    cfg = tiny_gpt_config(tmp_path / "run", checkpoint={"resume": "none"},
                          parallel={"dp": 1, "zero_stage": 3, "deepspeed": {"zero_optimization": block}})
    assert user_zero_optimization(cfg) == block
    assert user_zero_optimization(tiny_gpt_config(tmp_path / "plain", parallel={"dp": 1, "zero_stage": 3})) == {}
    monkeypatch.setitem(installed_ops, "async_io", False)  # no libaio, whatever the machine has
    builder = type(get_accelerator().create_op_builder("AsyncIOBuilder"))
    monkeypatch.setattr(builder, "is_compatible", lambda self, verbose=False: False)
    with pytest.raises(ConfigError, match="offload_param.device = nvme"):
        deepspeed_engine.check_nvme_offload(cfg)
    monkeypatch.setattr(deepspeed_engine, "user_zero_optimization", lambda cfg: {})
    deepspeed_engine.check_nvme_offload(cfg)


class _Built(Exception):
    """Raised in place of the engine's process group: its checks passed."""


@pytest.mark.parametrize("stage", [1, 3])
def test_an_evaluation_refuses_only_the_nvme_offload_its_engine_builds(stage, tmp_path, monkeypatch):
    """``dist-train eval``'s DeepSpeed engine builds no optimizer (DeepSpeedForwardEngine): a training config that
    swaps its optimizer to NVMe evaluates where DeepSpeed's async_io op is missing (eval's pre-flight and the engine
    refused it before), while training still refuses it; ZeRO-3's parameter offload to NVMe, which the evaluation's
    forward swaps through, is refused for both."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops

    monkeypatch.setitem(installed_ops, "async_io", False)  # no libaio, whatever the machine has
    builder = type(get_accelerator().create_op_builder("AsyncIOBuilder"))
    monkeypatch.setattr(builder, "is_compatible", lambda self, verbose=False: False)

    def built() -> None:
        raise _Built

    monkeypatch.setattr(deepspeed_engine, "_ensure_process_group", built)  # what follows the checks: no group made

    def offloading(block: str):
        return tiny_gpt_config(tmp_path / "run", checkpoint={"resume": "none"}, parallel={
            "dp": 1, "zero_stage": stage,
            "deepspeed": {"zero_optimization": {block: {"device": "nvme", "nvme_path": str(tmp_path / "nvme")}}}})

    cfg = offloading("offload_optimizer")
    mesh = build_mesh(cfg.parallel, 1)
    nvme_refused = "^parallel.deepspeed.zero_optimization.offload_optimizer.device = nvme: DeepSpeed swaps"
    check_engine(cfg, on_cuda=False, forward_only=True)
    with pytest.raises(_Built):
        DeepSpeedForwardEngine(cfg, build_gpt(cfg, mesh, torch.device("cpu")), mesh, None)
    with pytest.raises(ConfigError, match=nvme_refused):
        check_engine(cfg, on_cuda=False)
    with pytest.raises(ConfigError, match=nvme_refused):
        DeepSpeedEngine(cfg, build_gpt(cfg, mesh, torch.device("cpu")), mesh, None)
    if stage == 3:
        cfg = offloading("offload_param")
        with pytest.raises(ConfigError, match="^parallel.deepspeed.zero_optimization.offload_param.device = nvme"):
            check_engine(cfg, on_cuda=False, forward_only=True)
        with pytest.raises(ConfigError, match="^parallel.deepspeed.zero_optimization.offload_param.device = nvme"):
            DeepSpeedForwardEngine(cfg, build_gpt(cfg, mesh, torch.device("cpu")), mesh, None)


def test_a_resume_compares_no_key_the_model_never_reads(tmp_path):
    """A checkpoint of an older version may record a key that version accepted unread (a swin's data.seq_len, a
    gpt's model.window): the current config cannot set it (refused), so comparing it would block the resume over a
    value nothing reads. Keys the model reads still differ."""
    swin = tiny_swin_config(tmp_path, tmp_path / "w").to_dict()
    saved = copy.deepcopy(swin)
    saved["data"].update(seq_len=1024, tokenizer="tok.json")
    saved["model"].update(vocab_size=100, attention_window=8)
    assert config_differences(saved, swin) == []
    saved["model"]["window"] = 2
    assert config_differences(saved, swin) == [("model.window", 2, 4)]
    gpt = tiny_gpt_config(tmp_path).to_dict()
    saved = copy.deepcopy(gpt)
    saved["model"]["window"], saved["data"]["seq_len"] = 16, 64
    assert config_differences(saved, gpt) == [("data.seq_len", 64, 32)]


def test_the_deepspeed_engine_itself_refuses_a_key_deepspeed_never_reads(tmp_path, monkeypatch):
    """bench and scale ranks build their engine without the pre-flight: the engine runs the same check."""
    cfg = tiny_gpt_config(tmp_path / "run", parallel={"zero_stage": 1, "deepspeed": {"zero_optimisation": {}}})
    mesh = build_mesh(cfg.parallel, 1)
    # refused before the engine's one-rank group: nothing left for later tests. Asked of the engine, not only of
    # torch.distributed: an earlier test's in-process DeepSpeed engine leaves its group (test_spikes.py's, run first)
    grouped_before = dist.is_initialized()
    made_group = []
    monkeypatch.setattr(deepspeed_engine, "_ensure_process_group", lambda: made_group.append(True))
    with pytest.raises(ConfigError, match=r"^parallel.deepspeed.zero_optimisation = \{\}: DeepSpeed never reads"):
        DeepSpeedEngine(cfg, build_gpt(cfg, mesh, torch.device("cpu")), mesh, None)
    assert not made_group and dist.is_initialized() == grouped_before


@pytest.mark.parametrize("kind, key, ok", [("swin", "model.attention_window", False), ("swin", "data.seq_len", False),
                                           ("gpt", "model.window", False), ("gpt", "model.attention_window", True),
                                           ("swin", "model.window", True), ("swin", "data.path", True)])
def test_allow_config_change_cannot_name_a_key_a_resume_never_compares(kind, key, ok, tmp_path):
    """A key the model never reads is not compared on resume, so allowing its change would be a no-op."""
    if ok:
        _build(kind, tmp_path, {"checkpoint": {"allow_config_change": [key]}})
        return
    with pytest.raises(ConfigError, match=rf"^checkpoint.allow_config_change: '{key}' is not a key a resume compares"):
        _build(kind, tmp_path, {"checkpoint": {"allow_config_change": [key]}})


@pytest.mark.parametrize("stage, zero, needle", [
    (2, {"offload_param": {"device": "cpu"}}, "zero_optimization.offload_param with parallel.zero_stage = 2: only ZeRO stage 3"),
    (1, {"stage3_max_live_parameters": 10}, "zero_optimization.stage3_max_live_parameters with parallel.zero_stage = 1"),
    (2, {"prefetch_bucket_size": 10}, "zero_optimization.prefetch_bucket_size with parallel.zero_stage = 2: only ZeRO stage 3"),
    (3, {"prefetch_bucket_size": 10, "max_live_parameters": 10}, None),
    (0, {"offload_optimizer": {"device": "cpu"}}, "zero_optimization.offload_optimizer with parallel.zero_stage = 0: only ZeRO stage 1-3"),
    (3, {"offload_param": {"device": "cpu"}, "stage3_max_live_parameters": 10}, None),
    (1, {"offload_optimizer": {"device": "cpu"}}, None),
])
def test_a_zero_key_the_configured_stage_never_reads_is_refused(stage, zero, needle, tmp_path):
    """DeepSpeed's config takes ZeRO-3's keys (offload_param, stage3_*) at any stage and offload_optimizer at stage 0,
    and the optimizer of the configured stage never reads them (deepspeed/runtime/engine.py builds them into the
    stage-3 / ZeRO optimizers only): a param offload asked for under ZeRO-2 silently did not happen."""
    build = lambda: tiny_gpt_config(tmp_path, parallel={"zero_stage": stage, "deepspeed": {"zero_optimization": zero}})
    if needle is None:
        build()
        return
    with pytest.raises(ConfigError) as info:
        build()
    assert str(info.value).startswith(f"parallel.deepspeed.{needle}") and "\n" not in str(info.value), str(info.value)


@pytest.mark.parametrize("key, instead", [("activation_checkpointing", "set train.activation_checkpointing"),
                                          ("pipeline", "set parallel.pp"), ("checkpoint", "set checkpoint.*"),
                                          ("dataloader_drop_last", "remove it"), ("sparse_attention", "attn_kernel")])
def test_a_deepspeed_key_only_an_unused_part_of_deepspeed_applies_is_refused(key, instead, tmp_path):
    """DeepSpeed reads these keys but applies them only through parts dist-train does not use (its activation
    checkpointing API, PipelineModule, checkpoint save/load, data loader, sparse attention): they did nothing."""
    with pytest.raises(ConfigError) as info:
        tiny_gpt_config(tmp_path, parallel={"zero_stage": 1, "deepspeed": {key: {}}})
    msg = str(info.value)
    assert msg.startswith(f"parallel.deepspeed.{key}: DeepSpeed applies it only through ") and instead in msg, msg


@pytest.mark.parametrize("stage", [1, 3])
@pytest.mark.parametrize("key", ["stage3_gather_16bit_weights_on_model_save", "gather_16bit_weights_on_model_save"])
def test_a_zero_key_only_deepspeeds_16bit_model_save_reads_is_refused_at_every_stage(key, stage, tmp_path):
    """``stage3_gather_16bit_weights_on_model_save`` (or its field name) is read by DeepSpeed's ``save_16bit_model``
    alone, which dist-train never calls: it did nothing at ZeRO-3 too, where the stage check's advice (set
    parallel.zero_stage: 3) sent a ZeRO-1 user."""
    with pytest.raises(ConfigError) as info:
        tiny_gpt_config(tmp_path, parallel={"zero_stage": stage, "deepspeed": {"zero_optimization": {key: True}}})
    msg = str(info.value)
    assert msg.startswith(f"parallel.deepspeed.zero_optimization.{key}: DeepSpeed applies it only through its "
                          "save_16bit_model") and "any stage" in msg and "\n" not in msg, msg


def test_the_stage3_field_names_are_deepspeeds():
    """The field names refused below ZeRO-3 are exactly those of DeepSpeed's ``stage3_`` aliases: a DeepSpeed that
    adds or renames one shows up here, not as a key silently ignored."""
    zero_config = pytest.importorskip("deepspeed.runtime.zero.config")
    fields = zero_config.DeepSpeedZeroConfig.model_fields
    assert DEEPSPEED_STAGE3_FIELD_NAMES == {name for name, f in fields.items() if (f.alias or "").startswith("stage3_")}


def test_every_deepspeed_zero_optimization_field_is_classified():
    """Each field of DeepSpeed's ``DeepSpeedZeroConfig`` has an entry in zero_keys.ZERO_KEYS (the stages whose
    optimizer reads it, or why it is refused at every stage), and the removed keys there are those DeepSpeed itself
    refuses: a field a new DeepSpeed adds (or renames) fails here instead of passing unread."""
    zero_config = pytest.importorskip("deepspeed.runtime.zero.config")
    ds_config = pytest.importorskip("deepspeed.runtime.config")
    assert set(ZERO_KEYS) - REMOVED_ZERO_KEYS == set(zero_config.DeepSpeedZeroConfig.model_fields)
    assert REMOVED_ZERO_KEYS == set(ds_config._REMOVED_ZERO_CONFIG_KEYS)
    for key, entry in ZERO_KEYS.items():
        assert bool(entry.stages) != (entry.refused is not None), key
        assert set(entry.stages) <= {0, 1, 2, 3}, key


#: (stage, key): refused at every stage (read by nothing dist-train runs, or changing what its checkpoint adapter and
#: memory model assume), each at a stage that reads it where any does
REFUSED_EVERYWHERE = sorted((stage, key) for key, entry in ZERO_KEYS.items() if entry.refused for stage in (1, 3))

#: (stage, key): a key read only by other stages' optimizers
WRONG_STAGE = [(0, "reduce_bucket_size"), (0, "overlap_comm"), (0, "contiguous_gradients"), (0, "reduce_scatter"),
               (3, "allgather_bucket_size"), (3, "use_multi_rank_bucket_allreduce"),
               (2, "sub_group_size"), (1, "memory_efficient_linear"),
               (2, "leaf_module"), (1, "enable_sanity_checks"), (2, "log_trace_cache_warnings"),
               (2, "stage3_module_granularity_threshold"), (1, "allgather_sequential"), (0, "use_multi_rank_bucket_allreduce")]


def _zero_config(tmp_path, stage: int, zero: dict):
    return tiny_gpt_config(tmp_path, parallel={"zero_stage": stage, "deepspeed": {"zero_optimization": zero}})


@pytest.mark.parametrize("stage, key", REFUSED_EVERYWHERE + WRONG_STAGE)
def test_a_zero_key_the_stage_never_reads_or_dist_train_cannot_honour_is_refused_in_one_line(stage, key, tmp_path):
    """Config validation refuses it (exit 2 before any rank) in one line naming the key, and for a key of other
    stages the configured one and the stages that read it; DeepSpeed's config took each of these and went on."""
    with pytest.raises(ConfigError) as info:
        _zero_config(tmp_path, stage, {key: True})
    msg = str(info.value)
    assert msg.startswith(f"parallel.deepspeed.zero_optimization.{key}") and "\n" not in msg, msg
    if zero_key(key).refused is None:
        assert f"with parallel.zero_stage = {stage}: only ZeRO stage" in msg, msg
    else:
        assert "remove it" in msg or "instead" in msg, msg


@pytest.mark.parametrize("stage, key", sorted((s, k) for k, e in ZERO_KEYS.items() for s in e.stages if k != "stage"))
def test_a_zero_key_is_accepted_at_each_stage_that_reads_it_at_deepspeeds_default(stage, key, tmp_path):
    """Every key a stage's optimizer reads passes validation there, at DeepSpeed's own default (``stage3_`` knobs by
    their alias too)."""
    zero_config = pytest.importorskip("deepspeed.runtime.zero.config")
    field = zero_config.DeepSpeedZeroConfig.model_fields[key]
    default = field.get_default(call_default_factory=True)
    value = default.model_dump() if hasattr(default, "model_dump") else default
    _zero_config(tmp_path, stage, {key: value})
    if key in DEEPSPEED_STAGE3_FIELD_NAMES:
        _zero_config(tmp_path, stage, {field.alias: value})


@pytest.mark.parametrize("zero, offload, refused", [
    ({"reduce_bucket_size": 4096}, None, "reduce_bucket_size"), ({"overlap_comm": True}, None, "overlap_comm"),
    ({"allgather_bucket_size": 4096}, None, None), ({"reduce_bucket_size": 4096}, "cpu", None)])
def test_a_zero_key_deepspeeds_bf16_optimizer_ignores_is_refused_before_the_ranks(zero, offload, refused, tmp_path):
    """At ZeRO-1 with bf16 weights and fp32 gradient accumulation DeepSpeed 0.19.8 builds its BF16_Optimizer instead
    of the ZeRO-1 optimizer (unless the optimizer is offloaded to the host), which reads allgather_bucket_size alone:
    the pre-flight refuses the other keys in one line (config validation cannot: train.precision auto is decided on
    the device); an evaluation builds no optimizer and does not refuse them."""
    block = {**zero, **({"offload_optimizer": {"device": offload}} if offload else {})}
    ds = {"zero_optimization": block, "data_types": {"grad_accum_dtype": "fp32"},
          **({"zero_force_ds_cpu_optimizer": False} if offload else {})}
    cfg = tiny_gpt_config(tmp_path / "run", train={"precision": "bf16"},
                          parallel={"dp": 1, "zero_stage": 1, "deepspeed": ds})
    check_engine(cfg, on_cuda=False, forward_only=True)
    if refused is None:
        preflight(cfg, on_cuda=False)
        return
    with pytest.raises(ConfigError) as info:
        preflight(cfg, on_cuda=False)
    msg = str(info.value)
    assert msg.startswith(f"parallel.deepspeed.zero_optimization.{refused} with parallel.zero_stage = 1, bf16 weights "
                          "and data_types.grad_accum_dtype fp32: DeepSpeed builds its BF16_Optimizer") and "\n" not in msg
    fp32 = tiny_gpt_config(tmp_path / "fp32", train={"precision": "fp32"},
                           parallel={"dp": 1, "zero_stage": 1, "deepspeed": {**ds, "data_types": {}}})
    preflight(fp32, on_cuda=False)  # the ZeRO-1 optimizer reads it

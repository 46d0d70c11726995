"""Every key of DeepSpeed 0.19.8's ``zero_optimization`` block, classified by what dist-train's DeepSpeed engine does
with it: read by the optimizer of some ZeRO stages (honoured there, refused at the others), or refused at every stage
(read by nothing dist-train runs, or read but changing what dist-train's checkpoint adapter and memory model assume,
untested). config._validate_deepspeed_keys refuses in one line from this table; tests/test_config_unread.py checks
it against DeepSpeed's ``DeepSpeedZeroConfig`` fields, so a field a new DeepSpeed adds fails a test instead of
passing unread.

Where DeepSpeed reads a key (paths under deepspeed/runtime/, 0.19.8): ``engine._configure_zero_optimizer`` builds
``DeepSpeedZeroOptimizer`` (zero/stage_1_and_2.py) at stages 1-2 and ``DeepSpeedZeroOptimizer_Stage3``
(zero/stage3.py, which partitions the module through zero/parameter_offload.py ``Init(module=...)``) at stage 3,
each from its own list of keys; at stage 0 ``zero_optimization()`` is false and no ZeRO optimizer is built, so no
key but ``stage`` is read. Without dist-train's engine in the picture, DeepSpeed's own ``save_checkpoint`` /
``load_checkpoint`` / ``save_16bit_model`` read some keys: dist-train calls none of them (it writes its own
checkpoints through checkpoint/adapters.py ``DeepSpeedStateAdapter``)."""
from __future__ import annotations

from typing import NamedTuple, Optional

#: DeepSpeed 0.19.8's ZeRO-3-only keys by their field names, which its config takes as well as their ``stage3_``
#: aliases (``populate_by_name``; deepspeed/runtime/zero/config.py): ``prefetch_bucket_size`` under ZeRO-2 is as
#: silently ignored as ``stage3_prefetch_bucket_size`` (tests/test_config_unread.py checks the list against DeepSpeed)
DEEPSPEED_STAGE3_FIELD_NAMES = frozenset({
    "prefetch_bucket_size", "param_persistence_threshold", "model_persistence_threshold", "max_live_parameters",
    "max_reuse_distance", "gather_16bit_weights_on_model_save", "module_granularity_threshold",
    "use_all_reduce_for_fetch_params", "allgather_sequential"})


class ZeroKey(NamedTuple):
    """How dist-train treats one ``zero_optimization`` key: ``stages`` the ZeRO stages whose optimizer reads it (and
    dist-train honours it there), empty when ``refused`` says why it is refused at every stage (the rest of the
    one-line message after ``parallel.deepspeed.zero_optimization.KEY: ``, remedy included)."""
    stages: tuple[int, ...]
    refused: Optional[str] = None


_STAGES_1_2 = (1, 2)
_STAGES_1_3 = (1, 2, 3)
_STAGE_3 = (3,)


def _unread(where: str) -> ZeroKey:
    """A key only a part of DeepSpeed dist-train does not use reads (``where``)."""
    return ZeroKey((), f"DeepSpeed applies it only through {where}, so it would be silently ignored at any stage; "
                       "remove it")


def _untested(what: str) -> ZeroKey:
    """A key DeepSpeed honours but whose effect (``what``) dist-train's checkpoint adapter, memory model or numerical
    contract has not been verified with: refused rather than guessed to work."""
    return ZeroKey((), f"{what}, which dist-train's ZeRO checkpoint adapter (it reads and fills the partitions in "
                       "place) and memory model are not verified with; remove it")


def _removed(feature: str) -> ZeroKey:
    return ZeroKey((), f"{feature} was removed from DeepSpeed (0.19.8 refuses the key: runtime/config.py "
                       "_REMOVED_ZERO_CONFIG_KEYS); remove it")


_SAVE_16BIT = _unread("its save_16bit_model (dist-train writes its own checkpoints; dist-train ckpt converts them)")
_OWN_LOAD = ("its load_checkpoint (engine._load_zero_checkpoint; dist-train loads its own checkpoints, the fp32 "
             "masters restored exactly at any dp)")

#: Every ``DeepSpeedZeroConfig`` field by its field name (its ``stage3_`` alias, if any, is looked up through
#: :func:`zero_key`), and the keys DeepSpeed 0.19.8 removed. The reader each entry cites is DeepSpeed 0.19.8's.
ZERO_KEYS: dict[str, ZeroKey] = {
    # engine._configure_zero_optimizer picks the optimizer class from it; config.validate checks it equals zero_stage
    "stage": ZeroKey((0, 1, 2, 3)),
    # engine._configure_zero_optimizer passes these to both ZeRO optimizers (stage_1_and_2.py and stage3.py)
    "contiguous_gradients": ZeroKey(_STAGES_1_3),
    "reduce_scatter": ZeroKey(_STAGES_1_3),
    "reduce_bucket_size": ZeroKey(_STAGES_1_3),
    "overlap_comm": ZeroKey(_STAGES_1_3),
    "offload_optimizer": ZeroKey(_STAGES_1_3),
    # passed to stage_1_and_2.py only (and allgather_bucket_size to the BF16_Optimizer, engine._configure_bf16_optimizer)
    "use_multi_rank_bucket_allreduce": ZeroKey(_STAGES_1_2),
    "allgather_bucket_size": ZeroKey(_STAGES_1_2),
    # passed to stage3.py only (module_granularity_threshold, log_trace_cache_warnings and the persistence / gather
    # knobs to its DeepSpeedZeRoOffload too); memory_efficient_linear through parameter_offload.py Init(module=...),
    # which swaps torch.nn.functional.linear (partition_parameters.py _enable_mem_efficient_linear); leaf_module is
    # marked on the modules at any stage (engine._configure_distributed_model) but only stage3.py acts on the marks
    "offload_param": ZeroKey(_STAGE_3),
    "sub_group_size": ZeroKey(_STAGE_3),
    "prefetch_bucket_size": ZeroKey(_STAGE_3),
    "param_persistence_threshold": ZeroKey(_STAGE_3),
    "model_persistence_threshold": ZeroKey(_STAGE_3),
    "max_live_parameters": ZeroKey(_STAGE_3),
    "max_reuse_distance": ZeroKey(_STAGE_3),
    "module_granularity_threshold": ZeroKey(_STAGE_3),
    "use_all_reduce_for_fetch_params": ZeroKey(_STAGE_3),
    "allgather_sequential": ZeroKey(_STAGE_3),
    "memory_efficient_linear": ZeroKey(_STAGE_3),
    "log_trace_cache_warnings": ZeroKey(_STAGE_3),
    "enable_sanity_checks": ZeroKey(_STAGE_3),
    "leaf_module": ZeroKey(_STAGE_3),
    # read only by parts of DeepSpeed dist-train does not call
    "gather_16bit_weights_on_model_save": _SAVE_16BIT,  # engine.save_16bit_model
    "stage3_gather_fp16_weights_on_model_save": _SAVE_16BIT,  # its deprecated name, moved onto the field above
    "load_from_fp32_weights": _unread(_OWN_LOAD),
    "pipeline_loading_checkpoint": _unread(_OWN_LOAD),
    # stage_1_and_2.py reads it in its state_dict / load_state_dict, which only DeepSpeed's checkpoints call
    "elastic_checkpoint": _unread("its own ZeRO checkpoints (stage_1_and_2.py state_dict, load_checkpoint; "
                                  "dist-train's load any dp's checkpoint)"),
    # partition_parameters.py patch_init_and_builtins: only while a model is built inside `with deepspeed.zero.Init()`
    "override_module_apply": _unread("deepspeed.zero.Init as a context around building the model, which dist-train "
                                     "does not use (it builds the model first)"),
    # stage3.py reads it only when the optimizer is DeepSpeed's MuonWithAuxAdam; dist-train passes its own
    "save_muon_momentum_buffer_in_memory": _unread("its Muon optimizer (stage3.py, MuonWithAuxAdam; dist-train's "
                                                   "engine passes its own torch optimizer)"),
    # engine._configure_zero_optimizer raises on true at stages 1-3 (removed in DeepSpeed 0.5.9) and reads it nowhere else
    "legacy_stage1": ZeroKey((), "DeepSpeed only refuses it when true (its old stage-1 optimizer left in 0.5.9) and "
                                 "otherwise ignores it at any stage; remove it"),
    # deprecated: DeepSpeed's config moves them onto offload_param / offload_optimizer, which dist-train's checks (NVMe
    # refusal, memory model: config.nvme_optimizer_offload, cost model) read by those names only
    "cpu_offload_param": ZeroKey((), "deprecated: DeepSpeed turns it into offload_param behind the back of "
                                     "dist-train's checks and memory model, which read offload_param; write "
                                     "offload_param: {device: cpu} instead"),
    "cpu_offload": ZeroKey((), "deprecated: DeepSpeed turns it into offload_optimizer behind the back of "
                               "dist-train's checks and memory model, which read offload_optimizer; write "
                               "offload_optimizer: {device: cpu} instead"),
    "cpu_offload_use_pin_memory": ZeroKey((), "deprecated, and nothing in DeepSpeed reads it (runtime/zero/config.py "
                                              "moves it onto no field), so it would be silently ignored at any stage; "
                                              "set offload_param / offload_optimizer.pin_memory instead"),
    # no engine accessor of it has a caller (engine.zero_allgather_partitions): DeepSpeed 0.19.8 never applies it
    "allgather_partitions": ZeroKey((), "nothing in DeepSpeed 0.19.8 reads it (engine.zero_allgather_partitions has "
                                        "no caller), so it would be silently ignored at any stage; remove it"),
    # stage_1_and_2.py complete_grad_norm_calculation_for_cpu_offload alone (ZeRO-1/2 with offload_optimizer cpu)
    "ignore_unused_parameters": ZeroKey((), "DeepSpeed reads it only in ZeRO-1/2's gradient norm under offload_optimizer "
                                            "cpu (stage_1_and_2.py complete_grad_norm_calculation_for_cpu_offload), "
                                            "and silently ignores it everywhere else; remove it"),
    # stage_1_and_2.py step: false drops the norm (get_global_grad_norm None; DeepSpeed refuses false at stages 0 and 3)
    "compute_grad_norm": ZeroKey((), "dist-train reads the gradient norm DeepSpeed computes at every step (it logs it "
                                     "and stops on a non-finite one: trainer._check_step), which false drops, "
                                     "and true is DeepSpeed's default; remove it"),
    # read, but they change what dist-train's adapter reads in place or the memory model counts: not verified
    "round_robin_gradients": _untested("it reorders the parameters across the ZeRO-1/2 partitions "
                                       "(stage_1_and_2.py _round_robin_reorder)"),
    "parameter_alignment": _untested("it pads the ZeRO-1/2 flat partitions between parameters (stage_1_and_2.py)"),
    "zero_hpz_partition_size": _untested("ZeRO++ hpZ keeps a secondary copy of the ZeRO-3 partitions per node group "
                                         "(stage3.py, partition_parameters.py)"),
    "zero_quantized_weights": _untested("ZeRO++ gathers the ZeRO-3 weights quantized, so the forward runs on other "
                                        "weights than the checkpoint's (stage3.py, partition_parameters.py)"),
    "zero_quantized_nontrainable_weights": _untested("ZeRO++ stores the frozen ZeRO-3 partitions quantized "
                                                     "(stage3.py, partition_parameters.py)"),
    "zero_quantized_gradients": _untested("ZeRO++ reduces the ZeRO-3 gradients quantized, through an all-to-all "
                                          "(engine.local_all_to_all_group, stage3.py)"),
    "zenflow": _untested("ZenFlow defers part of each update to an asynchronous CPU step (runtime/zenflow, "
                         "stage_1_and_2.py / stage3.py)"),
    # DeepSpeed 0.19.8 refuses these itself; named here so the refusal is config validation's one line
    "mics_shard_size": _removed("MiCS ZeRO-3 sharding"),
    "mics_hierarchical_params_gather": _removed("MiCS ZeRO-3 sharding"),
    "zeropp_loco_param": _removed("LoCo-Zero++"),
}

#: the keys DeepSpeed 0.19.8 no longer has a field for (ZERO_KEYS holds them besides the fields)
REMOVED_ZERO_KEYS = frozenset({"mics_shard_size", "mics_hierarchical_params_gather", "zeropp_loco_param"})


def zero_key(key: str) -> Optional[ZeroKey]:
    """The entry of ``key`` as the user wrote it (a field name, a ``stage3_`` alias of one, or a removed key); None
    for a key DeepSpeed does not know, which its own config check refuses (engines/deepspeed.check_deepspeed_keys)."""
    if key.startswith("stage3_") and key.removeprefix("stage3_") in DEEPSPEED_STAGE3_FIELD_NAMES:
        key = key.removeprefix("stage3_")
    return ZERO_KEYS.get(key)


def zero_key_refusal(key: str, stage: int) -> Optional[str]:
    """The one-line refusal of ``parallel.deepspeed.zero_optimization.<key>`` under ``parallel.zero_stage = stage``,
    or None when that stage's optimizer reads it (or DeepSpeed does not know it: see :func:`zero_key`)."""
    entry = zero_key(key)
    if entry is None or stage in entry.stages:
        return None
    if entry.refused is not None:
        return f"parallel.deepspeed.zero_optimization.{key}: {entry.refused}"
    stages = entry.stages
    named = str(stages[0]) if len(stages) == 1 else f"{stages[0]}-{stages[-1]}"
    remedy = " or ".join([", ".join(map(str, stages[:-1])), str(stages[-1])] if len(stages) > 1 else [named])
    return (f"parallel.deepspeed.zero_optimization.{key} with parallel.zero_stage = {stage}: only ZeRO stage {named} "
            f"reads it and DeepSpeed would silently ignore it; set parallel.zero_stage: {remedy} or remove it")


#: DeepSpeed's ``DtypeEnum.fp32`` names (deepspeed/runtime/config.py), as ``data_types.grad_accum_dtype`` may spell it
FP32_NAMES = frozenset({"fp32", "float32", "float", "torch.float32"})

#: The keys DeepSpeed 0.19.8's BF16_Optimizer reads, which it builds instead of the ZeRO-1 optimizer for bf16 weights
#: with fp32 gradient accumulation unless the optimizer is offloaded to the host (engine._do_optimizer_sanity_check,
#: engine._configure_bf16_optimizer: allgather_bucket_size alone)
BF16_OPTIMIZER_KEYS = frozenset({"stage", "allgather_bucket_size"})


def bf16_optimizer_refusal(zero: dict, stage: int, bf16: bool, grad_accum_dtype: object) -> Optional[str]:
    """The one-line refusal of a ``zero_optimization`` key (of the user's block ``zero``) that DeepSpeed's
    BF16_Optimizer ignores, when the run builds it: ZeRO stage 1, ``bf16`` weights, ``grad_accum_dtype`` fp32 and no
    ``offload_optimizer.device: cpu`` (which builds the ZeRO-1 optimizer). None when it does not, or reads them all."""
    offload = zero.get("offload_optimizer")
    host_offload = isinstance(offload, dict) and offload.get("device") == "cpu"
    if stage != 1 or not bf16 or str(grad_accum_dtype) not in FP32_NAMES or host_offload:
        return None
    ignored = sorted(k for k in zero if k not in BF16_OPTIMIZER_KEYS)
    if not ignored:
        return None
    return (f"parallel.deepspeed.zero_optimization.{ignored[0]} with parallel.zero_stage = 1, bf16 weights and "
            "data_types.grad_accum_dtype fp32: DeepSpeed builds its BF16_Optimizer for these, which reads only "
            "allgather_bucket_size of zero_optimization, and would silently ignore it; remove it, or accumulate in "
            "bf16, or use zero_stage 2")

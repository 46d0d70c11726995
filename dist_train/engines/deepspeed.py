"""DeepSpeed engine: ZeRO stages 0-3 over the gradient group (dp × cp × wp) of OUR mesh.

* ``deepspeed.initialize(..., dist_init_required=False)`` reuses the already-initialised default group.
* DeepSpeed's ``mpu`` is :class:`MeshMPU`, built from the same DeviceMesh as everything else: its data
  parallel group is the mesh's grad group (every axis over which weights are replicated), its model
  parallel group the tp group. Pipeline parallelism never reaches this engine (config validation
  rejects zero_stage with pp > 1).
* The DeepSpeed config is generated from ours (:func:`deepspeed_config`); ``parallel.deepspeed`` keys
  are merged last, so users can set anything DeepSpeed knows (offload, bucket sizes, …). Under ZeRO the
  gradient bucket (``reduce_bucket_size``, allocated at its full size) is sized to the rank's model unless the user
  sets it: no 2 GB bucket for a small model, the same reductions (``config.zero_reduce_bucket_elements``).
* ``dist-train eval`` builds :class:`DeepSpeedForwardEngine`: the same engine without an optimizer (no fp32 master
  copy, moments, gradient partitions or buckets), the checkpoint's weights loaded into what its forward uses.

Loss / accumulation contract — identical to the DDP engine: every micro-batch backward uses
``loss_sum · grad_size / global_count`` with ``scale_wrt_gas=False`` (no extra 1/GAS: our scaling
already counts every token of every micro-batch), DeepSpeed averages over its ``grad_size`` data-parallel
ranks, so the reduced gradient is d(mean over all real tokens of the global batch). Clipping is
DeepSpeed's ``gradient_clipping`` (same rule as ours: scale by max/(norm + 1e-6) when below 1, with the
norm over the full model: tp-sharded parameters summed over the model-parallel group, replicated ones
once).
"""
from __future__ import annotations

import contextlib
import importlib
import os
import warnings
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from ..checkpoint.adapters import (DeepSpeedStateAdapter, MasterCopyAdapter, ZeRO3WeightsAdapter,
                                   engine_checkpoint_kwargs)
from ..config import (Config, ConfigError, deep_merge, deepspeed_generated, user_zero_optimization,
                      zero_reduce_bucket_elements)
from ..held_stderr import stdout_shown_on_error
from ..megatron_import import compile_as_identity
from ..mesh import Mesh
from ..optim import build_optimizer, build_scheduler
from ..zero_keys import bf16_optimizer_refusal
from .batches import batch_to_device, forward_loss_sum
from .grads import all_reduce_sum, grad_norm_on_device, read_floats


def deepspeed_config(cfg: Config, bf16: bool, trainable_params: Optional[int] = None) -> dict:
    """DeepSpeed's JSON config generated from ours (train_batch_size is left to DeepSpeed: it is
    micro_batch × accumulation × its data-parallel size, which includes cp and wp). With ZeRO and the rank's
    ``trainable_params`` (its module's; None: the pre-flight's view, before any model), the gradient bucket is sized
    to the model (:func:`~dist_train.config.zero_reduce_bucket_elements`) instead of DeepSpeed's 5e8 elements."""
    stage = int(cfg.parallel.zero_stage)
    zero = {"stage": stage}
    if stage >= 1 and trainable_params is not None:
        zero["reduce_bucket_size"] = zero_reduce_bucket_elements(cfg, trainable_params)
    base = {
        **{key: value for key, (_, value) in deepspeed_generated(cfg).items()},
        "zero_optimization": zero,
        "bf16": {"enabled": bool(bf16)},
        "zero_allow_untested_optimizer": True,  # our torch AdamW (decoupled decay on matrices only)
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return deep_merge(base, dict(cfg.parallel.deepspeed or {}))


class _ReadKeys(dict):
    """A config mapping that records every key DeepSpeed looks up (``get``, ``[]``, ``in``); ``copy.copy`` keeps the
    one record (DeepSpeedConfig reads a shallow copy)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.read: set = set()

    def get(self, key, *default):
        self.read.add(key)
        return super().get(key, *default)

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.read.add(key)
        return super().__contains__(key)


def check_deepspeed_keys(cfg: Config, bf16: bool, forward_only: bool = False) -> None:
    """Refuse (ConfigError, one line) a ``parallel.deepspeed`` key that DeepSpeed would silently ignore — a top-level
    key its config never looks up (a typo such as ``zero_optimisation``: DeepSpeed reads known keys and drops the
    rest) — or one its sub-configs reject (``zero_optimization: {overlap_comms: true}``), here before any rank
    starts instead of a traceback from every rank. Runs DeepSpeed's own ``DeepSpeedConfig`` over the generated
    config with no process group (a one-rank view); any other complaint of it is left to the ranks, whose world
    size it may depend on. Then :func:`check_nvme_offload` (``forward_only``: of what an evaluation's engine builds),
    :func:`check_stage0_grad_accum_dtype` and (training only: an evaluation builds no optimizer) the ZeRO keys a
    BF16_Optimizer would ignore (``zero_keys.bf16_optimizer_refusal``: whether it is built depends on the precision,
    which config validation may not know yet: ``train.precision: auto``)."""
    if cfg.parallel.zero_stage is None or not cfg.parallel.deepspeed:
        return  # the generated config alone: nothing of the user's to check, and no deepspeed import
    quiet_deepspeed(on_cpu=not torch.cuda.is_available())
    _check_keys_read(cfg, bf16)
    check_nvme_offload(cfg, forward_only)
    check_stage0_grad_accum_dtype(cfg, bf16)
    if forward_only:
        return
    refusal = bf16_optimizer_refusal(user_zero_optimization(cfg), int(cfg.parallel.zero_stage), bf16,
                                     _user_grad_accum_dtype(cfg))
    if refusal is not None:
        raise ConfigError(refusal)


def _user_grad_accum_dtype(cfg: Config) -> Optional[str]:
    """``parallel.deepspeed.data_types.grad_accum_dtype`` as the user wrote it, or None."""
    data_types = (cfg.parallel.deepspeed or {}).get("data_types")
    return data_types.get("grad_accum_dtype") if isinstance(data_types, dict) else None


def check_stage0_grad_accum_dtype(cfg: Config, bf16: bool) -> None:
    """At ZeRO stage 0 DeepSpeed 0.19.8 builds an optimizer only when gradients accumulate in the model's dtype
    (engine.py ``_do_optimizer_sanity_check``: else "unsupported mix of model_dtype and grad_accum_dtype", a
    NotImplementedError from every rank's engine build); a ``parallel.deepspeed.data_types.grad_accum_dtype`` of
    another dtype is refused here in one line. (ZeRO-1 in bf16 with fp32 accumulation is DeepSpeed's BF16_Optimizer,
    which trains and checkpoints.)"""
    value = _user_grad_accum_dtype(cfg)
    if cfg.parallel.zero_stage != 0 or value is None:
        return
    from deepspeed.runtime.config import DtypeEnum  # deepspeed only where it runs

    try:
        accumulate = DtypeEnum(value).value
    except ValueError:
        raise ConfigError(f"parallel.deepspeed.data_types.grad_accum_dtype = {value!r}: not a dtype DeepSpeed knows "
                          "(fp32, bf16, fp16)") from None
    model = torch.bfloat16 if bf16 else torch.float32
    if accumulate != model:
        raise ConfigError(f"parallel.deepspeed.data_types.grad_accum_dtype = {value!r} with parallel.zero_stage = 0 "
                          f"and {str(model).replace('torch.', '')} weights: DeepSpeed accumulates stage-0 gradients "
                          "only in the weights' dtype and builds no optimizer for this mix; remove it, or use "
                          "zero_stage 1-3")


def _check_keys_read(cfg: Config, bf16: bool) -> None:
    """:func:`check_deepspeed_keys`'s run of DeepSpeed's ``DeepSpeedConfig``."""
    user = dict(cfg.parallel.deepspeed)
    import deepspeed.runtime.config as ds_config
    import pydantic

    generated = _ReadKeys(deepspeed_config(cfg, bf16))
    try:
        ds_config.DeepSpeedConfig(generated)
    except pydantic.ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ()))
        raise ConfigError(f"parallel.deepspeed: DeepSpeed refuses {where or 'a key'} ({first.get('msg')}); see "
                          "DeepSpeed's configuration reference for the valid keys") from None
    except (ds_config.DeepSpeedConfigError, ValueError) as e:
        # a removed feature's block (amp, elasticity, ...) or a value it refuses (communication_data_type,
        # gradient_allreduce_op, ...): its config reader raises these from the config alone, whatever the world size
        raise ConfigError(f"parallel.deepspeed: DeepSpeed refuses it: {str(e).splitlines()[0]}") from None
    except (AssertionError, RuntimeError, TypeError, KeyError):
        return  # DeepSpeed's own checks that may depend on the world size (batch sizes): the ranks run them
    unread = sorted(k for k in user if k not in generated.read)
    if unread:
        raise ConfigError(f"parallel.deepspeed.{unread[0]} = {user[unread[0]]!r}: DeepSpeed never reads this key "
                          "and would silently ignore it (a typo?); see DeepSpeed's configuration reference for the "
                          "valid keys, or remove it")


#: the ZeRO blocks that can offload to NVMe
_OFFLOADS = ("offload_param", "offload_optimizer")


def forward_only_offloads(cfg: Config) -> tuple[str, ...]:
    """The ZeRO offload blocks a forward-only engine (:class:`DeepSpeedForwardEngine`) builds: ZeRO-3's parameter
    offload (``DeepSpeedZeRoOffload`` swaps the partitions its forward gathers); never ``offload_optimizer``, there
    is no optimizer, and ZeRO-1/2 run as stage 0 (:func:`forward_only_config`), which offloads nothing."""
    return ("offload_param",) if int(cfg.parallel.zero_stage or 0) == 3 else ()


def check_nvme_offload(cfg: Config, forward_only: bool = False) -> None:
    """Offload to NVMe (``zero_optimization.offload_param`` or ``offload_optimizer`` with ``device: nvme``) swaps
    through DeepSpeed's async_io op, which needs libaio: where that op is neither installed nor buildable, every rank
    would stop building its engine with a traceback ("Unable to JIT load the async_io op"); refused here in one line.
    (Offload to cpu needs no op: our torch AdamW steps the host partitions, ``zero_force_ds_cpu_optimizer: false``.)
    ``forward_only`` (``dist-train eval``): only the blocks its engine builds (:func:`forward_only_offloads`), so a
    training config that swaps its optimizer to NVMe still evaluates where the op is missing."""
    zero = user_zero_optimization(cfg)
    used = forward_only_offloads(cfg) if forward_only else _OFFLOADS
    nvme = [k for k in used if isinstance(zero.get(k), dict) and zero[k].get("device") == "nvme"]
    if not nvme:
        return
    from deepspeed.accelerator import get_accelerator  # deepspeed only where it runs
    from deepspeed.git_version_info import installed_ops

    if installed_ops.get("async_io") or get_accelerator().create_op_builder("AsyncIOBuilder").is_compatible(False):
        return
    raise ConfigError(f"parallel.deepspeed.zero_optimization.{nvme[0]}.device = nvme: DeepSpeed swaps to NVMe "
                      "through its async_io op, which this DeepSpeed installation neither holds nor can build (it "
                      "needs libaio: install libaio-dev, then reinstall deepspeed with DS_BUILD_AIO=1); offload to "
                      "cpu instead")


def undo_build_step(wrapper) -> None:
    """Undo the optimizer step DeepSpeed's stage-0 bf16 wrapper (FP16_UnfusedOptimizer) takes when it is built.

    Its ``initialize_optimizer_states`` steps the inner AdamW once with zero gradients at the configured lr, to create
    the state: AdamW's decoupled weight decay then shrinks every decayed fp32 master by ``1 - lr·wd`` and its ``step``
    becomes 1, so every real step after it had one more bias-correction step and the masters one more decay than the
    run's config says (and than ZeRO-1/2/3, which create the state without a step). The masters were exact fp32 copies
    of the bf16 weights (``p.clone().float()``), so copying the weights back (DeepSpeed's ``refresh_fp32_params``)
    restores them exactly; the moments of a zero gradient are zero, and ``step`` goes back to 0: the state torch's
    AdamW creates on its own first step. The state is kept (not dropped) so a resume has it to load into."""
    wrapper.refresh_fp32_params()
    with torch.no_grad():
        for state in wrapper.optimizer.state.values():
            for value in state.values():
                if torch.is_tensor(value):
                    value.zero_()


class MeshMPU:
    """DeepSpeed's model-parallel-unit interface over our mesh. Axes of size 1 still need a real
    (single-rank) group, because DeepSpeed all-reduces over whatever it is handed."""

    def __init__(self, mesh: Mesh):
        self.mesh = mesh
        self._grad = mesh.grad_group or self._single("dp")
        self._tp = mesh.tp_group or self._single("tp")

    def _single(self, axis: str) -> dist.ProcessGroup:
        if self.mesh.device_mesh is None:
            return dist.group.WORLD  # a one-rank job
        return self.mesh.device_mesh.get_group(axis)  # the size-1 axis' group (this rank alone)

    # data parallel = every axis over which weights are replicated (dp × wp × cp)
    def get_data_parallel_group(self): return self._grad
    def get_data_parallel_world_size(self): return dist.get_world_size(self._grad)
    def get_data_parallel_rank(self): return dist.get_rank(self._grad)
    def get_data_parallel_group_ranks(self): return dist.get_process_group_ranks(self._grad)

    # model parallel = tensor parallel (pipeline stages never use this engine)
    def get_model_parallel_group(self): return self._tp
    def get_model_parallel_world_size(self): return dist.get_world_size(self._tp)
    def get_model_parallel_rank(self): return dist.get_rank(self._tp)
    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank

    def get_tensor_model_parallel_src_rank(self) -> int:
        return min(dist.get_process_group_ranks(self._tp))

    def get_pipeline_model_parallel_world_size(self) -> int: return 1
    def get_pipeline_model_parallel_rank(self) -> int: return 0


def _ensure_process_group() -> None:
    """DeepSpeed needs torch.distributed even for one rank (an in-process one-rank gloo group then) and
    reads RANK / WORLD_SIZE / LOCAL_RANK from the environment, which spawned test ranks do not set. Both stay until
    ``train()`` or ``evaluate_checkpoint()`` returns, which destroys that group and restores the caller's environment
    (distributed.caller_process_state)."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    os.environ.setdefault("RANK", str(dist.get_rank()))
    os.environ.setdefault("WORLD_SIZE", str(dist.get_world_size()))
    os.environ.setdefault("LOCAL_RANK", "0")


#: FutureWarnings torch 2.13 raises at DeepSpeed's own calls of the collectives it renamed (ZeRO's gathers and
#: reduce-scatters): two per rank and run, about code that is not dist-train's
DEEPSPEED_DEPRECATIONS = (r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                          r"`torch\.distributed\.reduce_scatter_tensor` is deprecated")


def quiet_deepspeed(on_cpu: bool) -> None:
    """Before DeepSpeed is imported: on CPU name its accelerator (``DS_ACCELERATOR=cpu``, unless set) instead of
    letting it warn on every rank that it found no GPU and is "setting accelerator to CPU"; and hold back
    :data:`DEEPSPEED_DEPRECATIONS` (any other warning still shows)."""
    if on_cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for message in DEEPSPEED_DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)


#: imported by DeepSpeed's optimizer check (``is_zero_supported_optimizer``), in every engine's set-up
MUON_MODULE = "deepspeed.runtime.zero.muon.muon_optimizer"


def import_deepspeed_muon_eager() -> None:
    """Import DeepSpeed's Muon optimizer module with ``torch.compile`` as an identity (compile_as_identity).
    DeepSpeed's optimizer check imports it in every engine's set-up, and it wraps its Newton-Schulz kernel in
    ``torch.compile`` at import. That first compile call imports TorchDynamo and Inductor: 2.2 s of each ZeRO
    rank's start-up on this CPU (2026-11-30, measured alone). dist-train never runs Muon (its optimizer is its own
    AdamW), so the kernel stays eager. A DeepSpeed without Muon has nothing to import."""
    with contextlib.suppress(ImportError), compile_as_identity():
        importlib.import_module(MUON_MODULE)


#: DeepSpeed 0.19.8's ZeRO-3 coordinator method cached by a class-level ``functools.lru_cache`` (name-mangled)
ZERO3_RELEASE_CACHED = "_PartitionedParameterCoordinator__params_to_release"


def release_zero3_globals(module: nn.Module) -> None:
    """Drop what DeepSpeed's ZeRO-3 keeps of ``module`` in module-level state that ``engine.destroy()`` leaves:

    * ``parameter_offload.FWD_MODULE_STACK``: the top module is pushed when the ZeRO-3 hooks are set up and never
      popped (and a forward that raised leaves its submodules there too);
    * ``PartitionedParameterCoordinator.__params_to_release``: an ``lru_cache(maxsize=None)`` on the class, keyed by
      (coordinator, submodule, step id).

    Each held the model, whose forward hooks hold the engine: model, partitions, optimizer state and the mesh's
    groups stayed for the life of an in-process caller (measured on one CPU rank, DeepSpeed 0.19.8: a ZeRO-3
    training or evaluation engine is collected once both are dropped, not with either alone). The cache is cleared
    whole, as an lru_cache cannot forget one key: another live ZeRO-3 engine recomputes its entries from its
    coordinator's trace on their next use, the value it cached."""
    from deepspeed.runtime.zero import parameter_offload  # deepspeed only where it runs
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    ours = {id(m) for m in module.modules()}
    parameter_offload.FWD_MODULE_STACK[:] = [m for m in parameter_offload.FWD_MODULE_STACK if id(m) not in ours]
    cached = vars(PartitionedParameterCoordinator).get(ZERO3_RELEASE_CACHED)
    # under DeepSpeed's instrument_w_nvtx wrapper: the lru_cache is the function it closes over
    for cell in getattr(cached, "__closure__", None) or ():
        if hasattr(cell.cell_contents, "cache_clear"):
            cell.cell_contents.cache_clear()


def forward_only_config(ds_config: dict) -> dict:
    """The DeepSpeed config of a forward-only engine (:class:`DeepSpeedForwardEngine`) from a training one: ZeRO-1/2
    become stage 0. They partition only the optimizer's state and the gradients, and their forward is stage 0's (the
    module itself, in DeepSpeed's dtype, under the same ``torch_autocast`` if any); DeepSpeed refuses to build them
    without an optimizer ("zero stage 1 requires an optimizer", engine.py ``_configure_zero_optimizer``), and their
    other ``zero_optimization`` keys (buckets, overlap, optimizer offload) are about the gradients and the optimizer.
    ZeRO-0 and ZeRO-3 are kept as they are: ZeRO-3 without an optimizer is DeepSpeed's ``DeepSpeedZeRoOffload``,
    the partitioned weights and the gathers of its forward, with the user's keys for them (persistence threshold,
    parameter offload, prefetch)."""
    zero = ds_config.get("zero_optimization") or {}
    if int(zero.get("stage", 0)) in (1, 2):
        return {**ds_config, "zero_optimization": {"stage": 0}}
    return ds_config


class DeepSpeedForwardEngine:
    """The DeepSpeed engine's forward-only part, for ``dist-train eval`` (``build_engine(..., evaluation_only=True)``):
    ``module``, ``eval_loss_sum`` and ``checkpoint_kwargs``, built by ``deepspeed.initialize`` without an optimizer
    (:func:`forward_only_config`). The training engine's optimizer holds the fp32 master copy (4 B a parameter, 1/dp
    at ZeRO >= 1; ZeRO-0 in bf16 also AdamW's moments) and ZeRO-3's gradient partitions and bucket, which a ZeRO
    checkpoint loads into; here the checkpoint's fp32 weights load straight into what the forward uses: the module's
    parameters in DeepSpeed's dtype at ZeRO-0/1/2, each rank's ZeRO-3 partitions
    (:class:`~dist_train.checkpoint.adapters.ZeRO3WeightsAdapter`). Cast from fp32 by ``copy_`` as the training engine
    casts its masters after a step, so the forward and its loss are the trained engine's, bit for bit
    (tests/test_eval_command.py). Every ZeRO stage loads without its optimizer (DeepSpeed 0.19.8)."""

    #: builds no optimizer: its checks skip what only an optimizer uses (offload_optimizer to NVMe)
    forward_only = True

    def __init__(self, cfg: Config, model: nn.Module, mesh: Mesh, autocast_dtype: Optional[torch.dtype]):
        quiet_deepspeed(on_cpu=next(model.parameters()).device.type == "cpu")
        import deepspeed

        import_deepspeed_muon_eager()

        # the pre-flight ran this before any rank when one ran (launch, run); bench and scale ranks come here directly.
        # First: a refusal leaves no process group or rank environment behind
        check_deepspeed_keys(cfg, bf16=autocast_dtype == torch.bfloat16, forward_only=self.forward_only)
        _ensure_process_group()
        if next(model.parameters()).device.type == "cpu":
            # DeepSpeed's CPU comm backend JIT-compiles a shared-memory all-reduce (minutes on 2 cores,
            # and only used by its inference collectives); training collectives go through gloo.
            # deepspeed.ops documents edits to this cached dict as persistent.
            import deepspeed.ops

            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        self.mesh = mesh
        self.grad_size = mesh.grad_size
        self.zero_stage = int(cfg.parallel.zero_stage)
        # before initialize, which partitions them under ZeRO-3; parameters() yields a tied one once
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.ds_config = deepspeed_config(cfg, bf16=autocast_dtype == torch.bfloat16, trainable_params=trainable)
        self.engine, self.optimizer, self.scheduler = self._initialize(deepspeed, cfg, model)
        self.module = self.engine.module

    def _initialize(self, deepspeed, cfg: Config, model: nn.Module) -> tuple:
        """``deepspeed.initialize`` -> (engine, optimizer, scheduler): here without an optimizer (None, None).

        Its prints are held back: in bf16 at stage 0 DeepSpeed wraps the missing optimizer in its BF16_Optimizer
        (over a DummyOptim: it allocates nothing), whose build prints its memory use on rank 0 (``see_memory_usage``
        with ``force=True``: six lines of stdout, where ``dist-train eval`` prints its one result line). DeepSpeed's
        logger, which says anything of the user's, writes to the stream it was created with and still shows. When
        the build fails, what it printed is written to stderr before the error goes on (stdout_shown_on_error)."""
        with stdout_shown_on_error():
            engine, _, _, _ = deepspeed.initialize(model=model, mpu=MeshMPU(self.mesh),
                                                   config=forward_only_config(self.ds_config), dist_init_required=False)
        return engine, None, None

    def checkpoint_kwargs(self) -> dict:
        """Extra CheckpointManager arguments: ZeRO-3 an adapter that reads each rank's partitions of the weights in
        place (:class:`~dist_train.checkpoint.adapters.ZeRO3WeightsAdapter`), else none (the module's parameters);
        wrapped for tp > 1."""
        inner = ZeRO3WeightsAdapter(self.engine.optimizer) if self.zero_stage == 3 else None
        return engine_checkpoint_kwargs(self.module, self.mesh, inner)

    def close(self) -> None:
        """Release DeepSpeed's engine; the engine is unusable after (called once, when ``train()`` or
        ``evaluate_checkpoint()`` is done with it, on return or error).

        DeepSpeed's ZeRO optimizers (and ZeRO-3's parameter offload) register hooks on the parameters' gradient
        accumulators and on the modules whose closures hold the optimizer, which holds the engine: cycles through C++
        autograd nodes that Python's gc cannot collect. Left alone, an in-process caller (a notebook, a test) kept the
        model, the fp32 master copy, the optimizer state and the mesh's process groups (a gloo group's listening
        socket and threads) for the life of its process. ``destroy()`` (DeepSpeed 0.19.8, engine.py) removes those
        hooks; ZeRO-3 also leaves the model in two of DeepSpeed's module-level structures, dropped here
        (:func:`release_zero3_globals`), and so are the references of this object. Measured on one CPU rank: ZeRO-1
        and ZeRO-3 training and ZeRO-3 evaluation are then collected with their group's socket
        (tests/test_in_process_train.py)."""
        engine = self.engine
        self.engine = self.optimizer = self.scheduler = self.module = None
        module = engine.module
        engine.destroy()
        release_zero3_globals(module)

    def eval_loss_sum(self, micro: list[dict]) -> float:
        """Forward only through the DeepSpeed engine (ZeRO-3 gathers its partitions as in training) -> the
        loss sum of the whole global batch, for validation."""
        return forward_loss_sum(self.engine, micro, self.engine.device, self.mesh.grad_group)


class DeepSpeedEngine(DeepSpeedForwardEngine):
    """``train_step(micro_batches, global_count) -> (global mean loss, grad norm)`` on a DeepSpeed engine."""

    forward_only = False

    def __init__(self, cfg: Config, model: nn.Module, mesh: Mesh, autocast_dtype: Optional[torch.dtype]):
        super().__init__(cfg, model, mesh, autocast_dtype)
        # DeepSpeed applies its step inside engine.step(): a non-finite step or a loss spike cannot be skipped
        # here, so the trainer stops on it (config refuses train.on_nonfinite = skip with ZeRO)
        self.last_step_skipped = False

    def _initialize(self, deepspeed, cfg: Config, model: nn.Module) -> tuple:
        """``deepspeed.initialize`` with our AdamW and LR schedule -> (engine, its optimizer wrapper, scheduler)."""
        optimizer = build_optimizer(list(model.named_parameters()), cfg.train)
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=lambda opt: build_scheduler(opt, cfg.train),
            mpu=MeshMPU(self.mesh), config=self.ds_config, dist_init_required=False)
        if MasterCopyAdapter.wraps(optimizer):
            undo_build_step(optimizer)
        return engine, optimizer, scheduler

    def checkpoint_kwargs(self) -> dict:
        """Extra CheckpointManager arguments: an adapter that writes and reads each rank's ZeRO partition of the
        fp32 weights and optimizer state in place, in the plain engines' layout (wrapped for tp > 1)."""
        return engine_checkpoint_kwargs(self.module, self.mesh, DeepSpeedStateAdapter(self.optimizer))

    def train_step(self, micro: list[dict], global_count: float,
                   loss_limit: Optional[float] = None) -> tuple[float, float]:
        """``loss_limit`` is not enforced here (the step is already applied); the trainer stops above it."""
        device = self.engine.device
        if len(micro) != self.engine.gradient_accumulation_steps():
            raise ValueError(f"DeepSpeed engine: got {len(micro)} micro-batches, its config says "
                             f"gradient_accumulation_steps = {self.engine.gradient_accumulation_steps()}")
        loss_sum = torch.zeros(1, dtype=torch.float64, device=device)  # on the device: see DDPEngine.train_step
        scale = self.grad_size / global_count
        own_norm = None
        for m, batch in enumerate(micro):
            batch = batch_to_device(batch, device)
            loss, _ = self.engine(batch)
            # at the boundary DeepSpeed all-reduces (stage 0) or reduce-scatters (ZeRO) inside backward
            self.engine.backward(loss * scale, scale_wrt_gas=False)
            if m == len(micro) - 1 and self.zero_stage == 0:
                # stage 0 in fp32 clips without recording the norm: measure the reduced grads ourselves (left on the
                # device: it is read with the loss below)
                own_norm = grad_norm_on_device([p for p in self.module.parameters() if p.grad is not None],
                                               self.mesh.tp_group)
            self.engine.step()  # DeepSpeed clips and steps at the accumulation boundary only
            loss_sum += loss.detach().double()
        norm = self.engine.get_global_grad_norm()
        norm = own_norm if norm is None else norm
        all_reduce_sum(loss_sum, self.mesh.grad_group)
        return self._read_loss_and_norm(loss_sum, norm, global_count)

    @staticmethod
    def _read_loss_and_norm(loss_sum: torch.Tensor, norm, global_count: float) -> tuple[float, float]:
        """(global mean loss, grad norm) on the host. ``norm``: what DeepSpeed recorded (a device tensor from its ZeRO
        and bf16 optimizers, a float when it already read it, such as the ``inf`` of an overflow) or our stage-0 norm
        (a device tensor). A tensor norm comes to the host with the loss in one copy, one wait for the device instead
        of two; each value is what ``float(t.item())`` gave."""
        if torch.is_tensor(norm):
            total, norm = read_floats(loss_sum, norm)
        else:
            total, norm = float(loss_sum.item()), float(norm)
        return total / global_count, norm

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

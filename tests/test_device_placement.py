"""The CUDA paths rehearsed on a CPU machine, on the ``meta`` device.

Meta tensors refuse what a GPU refuses and CPU runs let through: a non-scalar CPU operand ("Tensor on device meta
is not on the expected device cpu", where CUDA says "expected self and mask to be on the same device") and any
read of a value (``.item()``, ``bool(t)``: on a GPU a host-device sync). What meta does not refuse, a blocking copy
of a host tensor to the device (on a GPU a sync as well), :class:`BlockingCopies` records. So each path below,
run on meta, holds no CPU tensor built inside it, waits for no device value and makes no blocking copy: what a GPU
run needs, checked without one. (Values are not checked here: the same code's exactness tests run on CPU.)
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import dist_train.distributed as distributed
import parallelism.context.attention as cp_attention
import parallelism.context.simulate as simulate
import parallelism.context.ulysses as ulysses
import tests.test_gpu_path as gpu_path
from dist_train.config import ModelConfig
from dist_train.engines import grads
from dist_train.engines.deepspeed import DeepSpeedEngine
from dist_train.engines.grads import global_grad_norm_squared
from dist_train.lifecycle import Lifecycle
from dist_train.models.attention import AttentionContext
from dist_train.models.gpt import GPT
from dist_train.models.swin import build_swin
from parallelism.context import local_attention, shard_sequence, unshard_sequence
from parallelism.context.hybrid import SubGroups
from parallelism.context.kernels import CUDA_OPS, CudaSdpaKernel
from parallelism.host_copy import to_device
from parallelism.window import window_parallel_attention
from tests.test_swin_saved_tensors import SHAPES, _config
from tests.trainer_utils import one_rank_engine_and_batches

META = torch.device("meta")


class BlockingCopies(TorchDispatchMode):
    """Records every copy of a host tensor to another device that is not ``non_blocking`` (``.to(device)``,
    ``copy_``, ``torch.tensor(host data, device=...)``, a host index into a device tensor): on a GPU each one waits for
    the device (``set_sync_debug_mode("error")`` refuses it)."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []
        self._factories = {name: getattr(torch, name) for name in ("tensor", "as_tensor")}

    def __enter__(self):
        # torch.tensor(data, device=meta) makes its tensor with no data and no copy, so no op reaches
        # __torch_dispatch__; on CUDA it is a blocking copy from pageable memory. The factories are watched instead.
        for name, factory in self._factories.items():
            setattr(torch, name, self._watched(name, factory))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, factory in self._factories.items():
            setattr(torch, name, factory)
        return super().__exit__(*exc)

    def _watched(self, name: str, factory):
        def make(data, *args, **kwargs):
            device = kwargs.get("device")
            if device is not None and torch.device(device).type != "cpu" and not isinstance(data, torch.Tensor):
                self.seen.append(f"torch.{name}(host data, device={device})")
            return factory(data, *args, **kwargs)
        return make

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default:
            src, dst = args[0].device, kwargs.get("device") or args[0].device
            if src.type == "cpu" and torch.device(dst).type != "cpu" and not kwargs.get("non_blocking"):
                self.seen.append(f"{func}: {tuple(args[0].shape)} {src} -> {dst}")
        elif func is torch.ops.aten.copy_.default:
            dst, src = args[0], args[1]
            if src.device.type == "cpu" and dst.device.type != "cpu" and not (args[2:] and args[2]):
                self.seen.append(f"{func}: {tuple(src.shape)} {src.device} -> {dst.device}")
        else:
            # a host index into a device tensor (x[idx], index_put_): meta accepts it, CUDA copies the index over
            # with a blocking copy inside the op
            tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            host = [t for t in tensors if t.device.type == "cpu" and t.dim() > 0]
            if host and any(t.device.type != "cpu" for t in tensors):
                self.seen.append(f"{func}: host operand {tuple(host[0].shape)}")
        return func(*args, **kwargs)


class HostReads(TorchDispatchMode):
    """Counts every read of a device value to the host (``.item()``, ``float(t)``, ``bool(t)``, ``.cpu()``,
    ``.tolist()``): on a GPU each one waits for all the work queued before it. On meta the value does not exist, so a
    read is answered with ones (a finite loss and norm: the step goes on as an accepted one)."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default and args[0].device.type == "meta":
            self.seen.append(f"item {tuple(args[0].shape)}")
            return 1.0 if args[0].dtype.is_floating_point else 1
        if (func is torch.ops.aten._to_copy.default and args[0].device.type == "meta"
                and torch.device(kwargs.get("device") or META).type == "cpu"):
            self.seen.append(f"to cpu {tuple(args[0].shape)}")
            return torch.ones(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
        if func is torch.ops.aten.copy_.default and args[1].device.type == "meta" and args[0].device.type == "cpu":
            self.seen.append(f"copy to cpu {tuple(args[1].shape)}")
            return args[0].fill_(1)
        return func(*args, **kwargs)


def _run_on_meta(monkeypatch) -> None:
    """The CUDA block kernel for attention, autocast off on meta (it has no meta device)."""
    autocast_on = torch.is_autocast_enabled
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda *a: False if a and str(a[0]) == "meta" else autocast_on(*a))
    monkeypatch.setattr(cp_attention, "get_kernel", lambda name, device, dtype: CudaSdpaKernel(available=CUDA_OPS))


def test_the_detector_sees_a_blocking_copy_and_not_an_asynchronous_one():
    with HostReads() as reads:
        x = torch.ones(3, device=META)
        x.sum().item(), bool(x[0]), x.cpu(), x.tolist(), x.to(META)
    assert len(reads.seen) == 4, reads.seen
    with BlockingCopies() as copies:
        torch.arange(4).to(META)
        torch.empty(4, device=META).copy_(torch.arange(4))
        to_device(torch.arange(4), META)
        torch.tensor([0, 700, 2048], device=META)
        torch.as_tensor(torch.arange(4, device=META), device=META)
        torch.ones(3, device=META)[torch.tensor([0, 2])]
    assert len(copies.seen) == 4, copies.seen
    assert torch.tensor is copies._factories["tensor"]
    t = torch.arange(3)
    assert to_device(t, "cpu") is t


def test_window_parallel_attention_keeps_its_swin_masks_on_the_device():
    """wrap=False with a shift: the region labels mask the wrapped rows. They were built on the host and handed to a
    CUDA masked_fill, which refuses a CPU mask (every shifted Swin window attention on a GPU failed)."""
    q, k, v = (torch.randn(2, 16, 24, 4, 32, device=META, requires_grad=True) for _ in range(3))
    bias = torch.randn(4, 15, 15, device=META, requires_grad=True)
    with BlockingCopies() as copies:
        out = window_parallel_attention(q, k, v, window=8, shift=4, grid=1, group=None, bias=bias)
        out.sum().backward()
    assert out.device == META and q.grad.device == META and bias.grad.device == META
    assert copies.seen == []


@pytest.mark.parametrize("shape", SHAPES, ids=["square", "uneven-window", "padded"])
def test_the_swin_model_trains_on_a_device_other_than_the_host(shape):
    """The Swin model's forward and backward (plain and shifted blocks; region labels, padding mask, relative
    position bias) with its parameters and pixels on the device."""
    cfg = _config(*shape)
    model = build_swin(cfg.model, wp_group=None, grid=(1, 1), init_seed=3).to(META)
    image = tuple(cfg.data.image)
    x, y = (torch.randn(1, *image, 3, device=META) for _ in range(2))
    with BlockingCopies() as copies:
        loss, count = model({"x": x, "y": y, "image_size": torch.tensor(image)})
        (loss / count).backward()
    assert loss.device == META and all(p.grad.device == META for p in model.parameters())
    assert copies.seen == []


@pytest.mark.parametrize("case", ["window", "shared documents", "per-sample documents"])
def test_the_cuda_block_kernel_masks_blocks_without_waiting_for_the_device(monkeypatch, case):
    """Window edges and document cuts are explicit blocks: a mask per block, per call, forward and backward, through
    the CUDA kernel (torch's real attention ops, whose meta functions run anywhere). The masks were built from host
    positions copied to the device, and each block asked whether a row was empty (``bool(empty.any())``): several
    syncs per masked block on a GPU, the host and device taking turns in every windowed or packed step."""
    monkeypatch.setattr(cp_attention, "get_kernel", lambda name, device, dtype: CudaSdpaKernel(available=CUDA_OPS))
    q = torch.randn(2, 2048, 8, 64, device=META, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(2, 2048, 2, 64, device=META, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    kwargs = {"window": {"window": 300}, "shared documents": {"cu_seqlens": [0, 700, 2048]},
              "per-sample documents": {"cu_seqlens": [[0, 700, 2048], [0, 1000, 1500, 2048]]}}[case]
    with BlockingCopies() as copies:
        out = local_attention(q, k, v, causal=True, **kwargs)
        out.sum().backward()
    assert out.device == META and k.grad.device == META
    assert copies.seen == []


def test_the_gpu_tests_own_code_runs_on_the_device(monkeypatch):
    """The gpu tests' bodies (tests/test_gpu_path.py: every context-parallel variant on the simulator through the CUDA
    kernel, window-parallel attention) with DEV = meta: their fp64 references built the causal/window and Swin masks
    on the host and handed them to a device masked_fill, so every one of these tests failed on a GPU in its reference,
    before the code under test ran. (The error values are not computed here: meta tensors have none.)"""
    monkeypatch.setattr(gpu_path, "DEV", "meta")
    monkeypatch.setattr(gpu_path, "max_rel_err", lambda x, ref: 0.0)
    monkeypatch.setattr(simulate, "get_kernel", lambda name, device, dtype: CudaSdpaKernel(available=CUDA_OPS))
    for variant in gpu_path.CP_VARIANTS:  # kv_pieces at P = 2: its 8P sub-rings cost a second each on meta
        assert gpu_path._cp_errors(variant, 2 if variant == "kv_pieces" else 4, S=256) == [0.0] * 4, variant
    recorded = []
    for dtype in (torch.bfloat16, torch.float32):
        gpu_path.test_window_parallel_attention_on_cuda(dtype, 0.0, lambda name, value: recorded.append(name))
    assert recorded == ["errors_out_dq_dk_dv"] * 2


@pytest.mark.parametrize("window, checkpointing", [(None, "none"), (64, "full"), (64, "selective")])
def test_a_gpt_training_step_stays_on_the_device(monkeypatch, window, checkpointing):
    """The GPT's forward (RoPE, grouped-query attention through the CUDA block kernel with a sliding window, the
    chunked loss over a padded vocabulary) and backward, then the gradient norm's partial sums: nothing built on the
    host, no value read, no blocking copy. (fp32: autocast has no meta device, so the autocast query says "off".)"""
    autocast_on = torch.is_autocast_enabled
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda *a: False if a and str(a[0]) == "meta" else autocast_on(*a))
    monkeypatch.setattr(cp_attention, "get_kernel", lambda name, device, dtype: CudaSdpaKernel(available=CUDA_OPS))
    cfg = ModelConfig(kind="gpt", d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128, vocab_size=131)
    model = GPT(cfg, AttentionContext(window=window), init_seed=0, activation_checkpointing=checkpointing,
                loss_chunk=32).to(META)
    tokens = torch.randint(0, cfg.vocab_size, (2, 257)).to(META)
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "positions": torch.arange(256, device=META)}
    with BlockingCopies() as copies:
        loss_sum, count = model(batch)
        (loss_sum / count).backward()
        squared = global_grad_norm_squared(model.parameters())
    assert loss_sum.device == count.device == squared.device == META
    assert copies.seen == []


@pytest.mark.parametrize("model", ["gpt", "gpt, packed documents", "swin"])
def test_a_data_parallel_training_step_reads_the_device_once(monkeypatch, model):
    """Whole steps of the data-parallel engine (the FSDP2 engine's too), 4 micro-batches each, clipping on: the step's
    loss, gradient norm and skip decision come to the host together, once per step, for the skip and the clipping
    coefficient (the trainer then logs them). The engine copied each micro-batch's loss to the host and read the
    norm on its own, and it moved the batch's layout integers to the device where the model read them back: the
    Swin tiling's ``image_size`` (2 reads per micro-batch), the attention plan's ``cu_seqlens`` (1). Each read makes
    the host wait for everything queued, so it could not queue the next micro-batch's kernels."""
    _run_on_meta(monkeypatch)
    engine, micro = one_rank_engine_and_batches(model, META)
    with HostReads() as reads, BlockingCopies() as copies:
        for _ in range(2):
            loss, norm = engine.train_step(micro, 64.0, loss_limit=100.0)
    assert reads.seen == ["to cpu (3,)"] * 2 and copies.seen == []
    assert not engine.last_step_skipped and (loss, norm) == (1.0 / 64.0, 1.0)


class _DeepSpeedStandIn:
    """What our DeepSpeed engine calls of DeepSpeed's (which has no meta device): the forward is a linear layer's loss
    sum, backward and step do nothing, and the norm it recorded is ``recorded_norm`` (None: not recorded, as at stage 0
    in fp32, where our engine measures the gradients itself)."""

    device = META

    def __init__(self, module: torch.nn.Module, recorded_norm):
        self.module, self.recorded_norm = module, recorded_norm

    def __call__(self, batch):
        return self.module(batch["x"]).sum(), None

    def gradient_accumulation_steps(self) -> int:
        return 4

    def backward(self, loss, scale_wrt_gas):
        assert scale_wrt_gas is False

    def step(self):
        """DeepSpeed's optimizer step: nothing the read count looks at."""

    def get_global_grad_norm(self):
        return self.recorded_norm


def _deepspeed_engine_on_meta(recorded_norm) -> DeepSpeedEngine:
    """Our DeepSpeed engine (its step as it is) around :class:`_DeepSpeedStandIn`, every gradient on meta."""
    module = torch.nn.Linear(8, 1).to(META)
    for p in module.parameters():
        p.grad = torch.ones_like(p)
    engine = DeepSpeedEngine.__new__(DeepSpeedEngine)  # (its __init__ starts DeepSpeed)
    engine.engine, engine.module = _DeepSpeedStandIn(module, recorded_norm), module
    engine.mesh, engine.grad_size = SimpleNamespace(grad_group=None, tp_group=None), 1
    engine.zero_stage = 0 if recorded_norm is None else 2
    return engine


@pytest.mark.parametrize("recorded", ["a ZeRO norm on the device", "none (stage 0: our own norm)"])
def test_a_deepspeed_step_reads_its_loss_and_norm_in_one_copy(recorded):
    """The DeepSpeed engine's step (4 micro-batches) adds the loss sums on the device, then read the loss and the
    norm in two copies (``.item()``, then ``float(norm)``; at stage 0 our own norm was read on its own too): two
    waits for the device per step. Now one copy holds both, as in the data-parallel and pipeline engines."""
    norm = torch.ones((), dtype=torch.float32, device=META) if recorded.startswith("a ZeRO") else None
    engine = _deepspeed_engine_on_meta(norm)
    micro = [{"x": torch.randn(2, 8), "count": torch.tensor(2.0)}] * 4
    with HostReads() as reads, BlockingCopies() as copies:
        for _ in range(2):
            loss, norm = engine.train_step(micro, 8.0)
    assert reads.seen == ["to cpu (2,)"] * 2 and copies.seen == []
    assert (loss, norm) == (1.0 / 8.0, 1.0)


def _fake_four_rank_group(monkeypatch) -> None:
    """This process plays rank 1 of a 4-rank context-parallel group: the collectives' results are placeholders (the
    values are not checked here), the code between them is the real one."""
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 4)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(dist, "all_gather", lambda parts, x, group=None: None)


def test_sharding_a_sequence_builds_its_positions_on_the_device(monkeypatch):
    """shard_sequence / unshard_sequence, forward and backward (the step's sharding of its inputs and gathering of its
    outputs): the shard's positions and the gather's order were built on the host and copied with a plain .to(device),
    a wait for the device each, once per step."""
    _fake_four_rank_group(monkeypatch)
    x = torch.randn(2, 64, 8, device=META, requires_grad=True)
    x_local = torch.randn(2, 16, 8, device=META, requires_grad=True)
    with BlockingCopies() as copies:
        shard_sequence(x, dim=1).sum().backward()
        unshard_sequence(x_local, dim=1).sum().backward()
    assert x.grad.device == x_local.grad.device == META
    assert copies.seen == []


def _hybrid_layer_on_meta(monkeypatch):
    """``layer()``: one hybrid context-parallel attention call (Ulysses 2 x ring 2, zigzag: the gathered tokens are
    re-ordered) as rank 1 of a faked 4-rank group on meta, the all-to-alls and the ring replaced by shape-keeping
    stand-ins (the code between them is the real one). The hybrid caches start empty."""
    _fake_four_rank_group(monkeypatch)
    monkeypatch.setattr(cp_attention, "subgroups", lambda group, degree: SubGroups(
        ulysses=None, ulysses_rank=1, ring=None, ring_rank=0, ring_size=2, ulysses_members=(0, 1)))
    monkeypatch.setattr(cp_attention, "seq_to_heads", lambda x, group: torch.cat([x[:, :, :x.shape[2] // 2]] * 2, 1))
    monkeypatch.setattr(cp_attention, "heads_to_seq", lambda x, group: torch.cat(x.chunk(2, 1), 2))
    monkeypatch.setattr(cp_attention, "RingAttention", SimpleNamespace(apply=lambda q, k, v, *rest: q * 2))
    q, k, v = (torch.randn(1, 16, 4, 8, device=META) for _ in range(3))
    ulysses.gathered_permutation.cache_clear()
    ulysses.ring_orders.cache_clear()

    def layer() -> torch.Tensor:
        out = cp_attention.context_parallel_attention(q, k, v, group=None, method="hybrid", ulysses_degree=2)
        assert out.shape == q.shape and out.device == META
        return out
    return layer


def test_a_hybrid_layer_copies_its_permutation_to_the_device_once(monkeypatch):
    """Hybrid context parallelism: every layer call copied the permutation to the device with a plain .to(), a wait
    for the device per layer of every step. It is made once per shape and device now, by an asynchronous copy."""
    layer = _hybrid_layer_on_meta(monkeypatch)
    with BlockingCopies() as copies:
        for _layer in range(3):
            layer()
    assert copies.seen == [] and ulysses.gathered_permutation.cache_info().misses == 1


def test_a_hybrid_layer_builds_its_ring_orders_once(monkeypatch):
    """Every hybrid layer call built the ring's orders on the host again: each ring member's gathered positions (one
    tensor per rank of its Ulysses group), a sort and a walk over every position, per layer of every step. They
    depend only on the shape (sequence length, Ulysses degree, group size, layout) and are made once per shape now:
    after the first call nothing is built."""
    layer = _hybrid_layer_on_meta(monkeypatch)
    built = []
    positions = ulysses.sequence_positions
    monkeypatch.setattr(ulysses, "sequence_positions", lambda *a, **kw: built.append(kw["rank"]) or positions(*a, **kw))
    layer()
    assert sorted(built) == [0, 0, 1, 1, 2, 3]  # both ring members' orders; this rank's (ranks 0, 1) for the permutation
    built.clear()
    for _layer in range(2):
        layer()
    assert built == []
    assert ulysses.ring_orders(64, 2, 4, "zigzag") == tuple(
        ulysses.gathered_order(64, members, 4, "zigzag")[0] for members in ([0, 1], [2, 3]))


def test_the_simulator_moves_its_shard_positions_without_waiting(monkeypatch):
    """The in-process ring simulator (hybrid, so re-ordered shards) put each virtual rank's positions on the device with
    a plain .to(), a wait for the device per rank and call."""
    monkeypatch.setattr(simulate, "get_kernel", lambda name, device, dtype: CudaSdpaKernel(available=CUDA_OPS))
    q, k, v = (torch.randn(1, 256, 4, 32, device=META, requires_grad=True) for _ in range(3))
    with BlockingCopies() as copies:
        simulate.simulate_ring_attention(q, k, v, world_size=4, ulysses_degree=2).sum().backward()
    assert q.grad.device == META and copies.seen == []


def _fake_two_rank_job(monkeypatch) -> None:
    """This process plays one rank of a 2-rank job whose collectives run on meta: an all-reduce leaves the values."""
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "all_reduce", lambda t, op=None, group=None: None)
    monkeypatch.setattr(grads, "collective_device", lambda group: META)
    monkeypatch.setattr(distributed, "collective_device", lambda group: META)


def test_on_two_ranks_the_skip_decision_is_read_with_the_loss_and_the_norm(monkeypatch):
    """On more than one rank a step agrees on its skip decision (a non-finite or spiking loss on any rank). The flag was
    all-reduced after the step's read of loss and norm and read on its own: a second wait for the device per step.
    It is decided and agreed on the device now and comes to the host with the loss and the norm, in the one copy."""
    _run_on_meta(monkeypatch)
    engine, micro = one_rank_engine_and_batches("gpt", META)
    _fake_two_rank_job(monkeypatch)
    agreed = []
    monkeypatch.setattr(dist, "all_reduce", lambda t, op=None, group=None: agreed.append((tuple(t.shape), op)))
    with HostReads() as reads, BlockingCopies() as copies:
        for _ in range(2):
            engine.train_step(micro, 64.0, loss_limit=100.0)
    assert reads.seen == ["to cpu (3,)"] * 2 and copies.seen == []
    assert agreed == [((1,), dist.ReduceOp.MIN)] * 2 and not engine.last_step_skipped


def test_the_stop_agreement_and_the_token_count_read_the_device_once_each(monkeypatch, tmp_path):
    """On more than one rank a step also agrees on a stop (a signal on any rank, sampled after the step: it cannot join
    the skip decision's read) and sums its token count over the ranks (needed on the host before the step). Each read
    is its decision (kept: one per step each); the stop flag was made with torch.tensor([flag], device=cuda), a
    blocking copy before the all-reduce, and the count went to the GPU by a blocking copy."""
    _fake_two_rank_job(monkeypatch)
    lifecycle = Lifecycle(tmp_path, rank=0, install_signals=False)
    with HostReads() as reads, BlockingCopies() as copies:
        stop = lifecycle.stop_agreed()
        count = grads.all_reduce_sum(torch.tensor([6.0, 2.0], dtype=torch.float64), group=object())
    assert copies.seen == []
    assert reads.seen == ["item (1,)", "copy to cpu (2,)"]
    assert stop and count.tolist() == [1.0, 1.0]  # (what HostReads answers for the values)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 1)  # the GPU check's NCCL world of one
    loss_sum, norm = torch.full((1,), 2.0, dtype=torch.float64, device=META), torch.ones(1, device=META)
    with HostReads() as reads:
        assert not lifecycle.stop_agreed() and grads.all_ranks_accept(loss_sum, norm, 1.0).device == META
    assert reads.seen == []

"""Checkpoints of the tensor-parallel, pipeline and DeepSpeed (ZeRO) engines, through the trainer.

Every engine writes the one layout of a tp=1/pp=1 plain-optimizer run, so a checkpoint saved under one
layout resumes under another and training continues with the saving run's losses (1e-5 relative; saved after
step 2 of 5, the warm-up's end):
  tp2 -> tp2 (same shapes: the silent-corruption case), dp2 -> tp2, tp2 -> tp1 (shards not de-duplicated
  away), zero3 dp2 -> plain dp1, dp2 -> zero3 dp2, tp2 -> tp2 with ZeRO-3 (the tp adapter over the
  DeepSpeed one), pp2 -> pp1, and exact resume zero1 dp2 -> zero1 dp2 (2 + 3 steps == 5 straight).
The vocabulary (63) is odd, so tp2 pads it to 64 and the uneven vocab shards (32 + 31 real rows) are
exercised in both directions. The tp2 and ZeRO-3 savers save asynchronously (host staging of DTensors
and of gathered tensors). The 2-rank runs share one spawn; the world-1 resumes run in the test
process (as a new job would).
"""
from __future__ import annotations

import gc
import json
import math
import os
import signal
import weakref
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard

from dist_train import trainer as trainer_module
from dist_train.bench._ckpt_engines import engine_state_tensors, one_step_gpt_engine
from dist_train.bench.attention import peak_tensor_bytes
from dist_train.checkpoint import manifest as mf
from dist_train.checkpoint import adapters
from dist_train.checkpoint.adapters import DeepSpeedStateAdapter, TensorParallelAdapter, TPShard, tp_local_blocks
from dist_train.checkpoint.hf import load_model_tensors
from dist_train.checkpoint.manager import CheckpointManager
from dist_train.checkpoint.rectangles import Rectangles, flat_range_pieces
from dist_train.config import ConfigError, checkpoint_blocker
from dist_train.lifecycle import EXIT_PREEMPTED, FAULT_ENV
from dist_train.models.tensor_parallel import shard_of
from dist_train.trainer import train
from tests.dist_harness import run_ranks
from tests.trainer_utils import rel_close, tiny_gpt_config

#: the reshard cases train STEPS steps and save after SAVED_AT: two steps before the save and three after it show a lost
#: shard, a stale optimizer state or a skipped batch (10 steps saved at 5, and 20 for the exact resume, checked no more).
#: Three, not two: the optimizer's param groups carry the LR they last stepped with, so a resume that restored the
#: optimizer but lost the LR scheduler's position steps its first update right and only its second with a wrong LR,
#: which only the third loss after the save shows (measured on this tiny GPT, one rank: 2 + 2 steps with the scheduler
#: dropped at resume equal the saving run bit for bit; 2 + 3 differ by 8.8e-4 relative at step 5)
STEPS, SAVED_AT = 5, 2
SAVE = {"every": SAVED_AT, "keep_last": 3}
VOCAB = 63  # odd: Megatron pads it to 64 at tp 2


def _cfg(root, name, parallel, checkpoint=SAVE, steps=STEPS, model=None, train_over=None):
    model = {"kind": "gpt", "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": VOCAB,
             **(model or {})}
    return tiny_gpt_config(f"{root}/{name}", steps=steps, model=model, parallel=parallel, checkpoint=checkpoint,
                           train=train_over or {})


def _resume_from(root, name, step=SAVED_AT):
    return {"resume": f"{root}/{name}/checkpoints/step_{step}"}


def _two_rank_cases(rank, world, root):
    """Savers for the world-1 resumes, plus the resumes that need 2 ranks."""
    out = {}
    async_save = {**SAVE, "async_save": True}  # the adapters' state goes through the host stager too
    for name, par, ck in (("dp2", {"dp": 2}, SAVE), ("tp2", {"tp": 2}, async_save),
                          ("zero3", {"dp": 2, "zero_stage": 3}, async_save), ("pp2", {"pp": 2}, SAVE)):
        out[name] = train(_cfg(root, name, par, checkpoint=ck)).losses
    for name, par, src in (("tp2_to_tp2", {"tp": 2}, "tp2"), ("dp2_to_tp2", {"tp": 2}, "dp2"),
                           ("dp2_to_zero3", {"dp": 2, "zero_stage": 3}, "dp2"),
                           ("tp2_to_tp2_zero3", {"tp": 2, "zero_stage": 3}, "tp2")):
        res = train(_cfg(root, name, par, checkpoint=_resume_from(root, src)))
        out[name] = (res.start_step, res.losses)
    zero1 = {"dp": 2, "zero_stage": 1}
    out["zero1_straight"] = train(_cfg(root, "zero1_straight", zero1)).losses
    ck = {"every": 0, "keep_last": 2}
    first = train(_cfg(root, "zero1", zero1, checkpoint=ck, train_over={"exit_interval": SAVED_AT}))
    second = train(_cfg(root, "zero1", zero1, checkpoint=ck))
    out["zero1_resumed"] = (first.losses, second.start_step, second.losses)
    return out


def _check(saved, start_step, losses, what):
    assert start_step == SAVED_AT, (what, start_step)
    assert rel_close(losses, saved[SAVED_AT:], 1e-5), (what, losses, saved[SAVED_AT:])


def _tensor_table(root, name):
    return mf.read_manifest(f"{root}/{name}/checkpoints/step_{SAVED_AT}")["tensors"]


def _value_keys(root, name):
    return set(json.loads((root / name / "checkpoints" / f"step_{SAVED_AT}" / mf.TRAIN_STATE).read_text())["values"])


def test_engines_reshard_through_the_trainer(tmp_path):
    res = run_ranks(_two_rank_cases, 2, args=(str(tmp_path),), timeout=300)
    for r in res:  # every rank reports identical losses
        assert r == res[0]
    r = res[0]
    # every resume continues with its saver's losses; tp2 -> tp2 is the same layout and the same shapes, so
    # without the tp adapter nothing would fail loudly: DCP would keep ONE rank's shard for both ranks
    _check(r["tp2"], *r["tp2_to_tp2"], "tp2 -> tp2")
    _check(r["dp2"], *r["dp2_to_tp2"], "dp2 -> tp2")
    _check(r["dp2"], *r["dp2_to_zero3"], "dp2 -> zero3 dp2")
    _check(r["tp2"], *r["tp2_to_tp2_zero3"], "tp2 -> tp2 x zero3 (both adapters composed)")
    first, start, second = r["zero1_resumed"]
    assert start == SAVED_AT and first + second == r["zero1_straight"], (first + second, r["zero1_straight"])

    # one checkpoint layout for every engine: same keys, full (tp=1) shapes, dtypes and optimizer values
    ref = _tensor_table(tmp_path, "dp2")
    for name in ("tp2", "zero3", "pp2"):
        assert _tensor_table(tmp_path, name) == ref, name
        assert _value_keys(tmp_path, name) == _value_keys(tmp_path, "dp2"), name
    # ... and the same numbers: what `ckpt convert` reads (full tensors, one process) equals the dp2 run's
    # weights to fp32 round-off (the layouts reduce in different orders; under tp the chunked loss is the
    # vocab-parallel one, whose round-off Adam carried to ~2e-6 on near-zero weights in 5 steps) — a
    # de-duplicated tp shard would differ by O(1), a lost ZeRO partition would read as zeros
    ref_weights, _ = load_model_tensors(tmp_path / "dp2" / "checkpoints" / f"step_{SAVED_AT}")
    for name in ("tp2", "zero3", "pp2"):
        weights, _ = load_model_tensors(tmp_path / name / "checkpoints" / f"step_{SAVED_AT}")  # verifies CRCs first
        assert weights.keys() == ref_weights.keys(), name
        for k, w in weights.items():
            assert torch.allclose(w, ref_weights[k], rtol=1e-4, atol=1e-5), (name, k, (w - ref_weights[k]).abs().max())
    # the unpadded vocabulary (63 rows, not Megatron's 64) for the weights and the Adam moments
    for key in ("model.tok_embeddings.weight", "model.output.weight", "optim.state.output.weight.exp_avg",
                "optim.state.tok_embeddings.weight.exp_avg_sq"):
        assert ref[key]["shape"] == [VOCAB, 32], (key, ref[key])
    assert ref["optim.state.layers.0.feed_forward.w2.weight.exp_avg"]["shape"] == [32, 96]

    # world-1 resumes (this process, no process group): tp2 -> tp1, zero3 dp2 -> plain dp1, pp2 -> pp1
    for src in ("tp2", "zero3", "pp2"):
        resumed = train(_cfg(tmp_path, f"{src}_to_1", {}, checkpoint=_resume_from(tmp_path, src)))
        _check(r[src], resumed.start_step, resumed.losses, f"{src} -> world 1")


class _Mesh:
    """The two DeviceMesh methods the adapter's constructor reads (no process group needed)."""

    def __init__(self, size: int, rank: int) -> None:
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def get_local_rank(self) -> int:
        return self._rank


def test_tp_adapter_rejects_shards_that_are_not_ceil_sized():
    ok = TensorParallelAdapter(_Mesh(2, 1), {"output.weight": TPShard(dim=0, local=32, size=63)})
    assert ok._real_rows(ok.shards["output.weight"]) == 31  # rank 1 of 2 holds rows 32..62 (+1 padding row)
    with pytest.raises(ValueError, match=r"'output.weight'.*expected ceil\(63 / 4\) = 16"):
        TensorParallelAdapter(_Mesh(4, 0), {"output.weight": TPShard(dim=0, local=10, size=63)})


def _tp1_tensor(dim: int, size: int, cols: int, stride: int, tp: int) -> tuple[torch.Tensor, TPShard]:
    """A tp=1 tensor of distinct values, ``size`` rows along ``dim`` that tp splits (``cols`` the other dim's; 0: a
    1-D bias), and its Megatron shard spec over ``tp`` (ceil-sized shards, the last padded; ``stride`` parts)."""
    shape = [size] if cols == 0 else ([size, cols] if dim == 0 else [cols, size])
    full = torch.arange(1, 1 + torch.Size(shape).numel(), dtype=torch.float64).reshape(shape)
    return full, TPShard(dim=dim, local=-(-size // tp), size=size, stride=stride)


def _count_blocks(full: torch.Tensor, blocks: list, memory: torch.Tensor, covered: torch.Tensor, where) -> None:
    """Each ``(offsets, view)`` of ``blocks`` is a view of ``memory``'s storage holding ``full`` 's values there;
    adds 1 to ``covered`` (``full`` 's shape) over each block."""
    for at, p in blocks:
        assert p.untyped_storage().data_ptr() == memory.untyped_storage().data_ptr()  # a view, not a copy
        box = tuple(slice(o, o + k) for o, k in zip(at, p.shape))
        assert torch.equal(full[box], p), (where, at)
        covered[box] += 1


#: DCP with ``no_dist`` (one process standing for every rank) says so in a warning
NO_DIST_NOTICE = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _blocks_save_the_tensor(path, full: torch.Tensor, blocks: list) -> None:
    """All ranks' ``blocks`` as one ``Rectangles`` save ``full`` through DCP: read back whole, it is ``full``."""
    dcp.save({"w": Rectangles(full.shape, blocks, full.dtype, torch.device("cpu"))}, checkpoint_id=path,
             no_dist=True)
    whole = torch.zeros_like(full)
    dcp.load({"w": whole}, checkpoint_id=path, no_dist=True)
    assert torch.equal(whole, full)


@pytest.mark.parametrize("dim, size, cols, stride, tp, shards", [
    (0, 63, 5, 1, 2, 2),   # the odd vocabulary: 32 + 31 real rows, FSDP2 chunks of 16
    (0, 61, 3, 1, 4, 3),   # 16-row tp shards, the last one 13 real rows; chunks 6 + 6 + 4: one all padding
    (0, 5, 2, 1, 4, 2),    # a tp rank of padding only: ceil(5 / 4) = 2 rows each, rank 3 holds none
    (0, 24, 4, 3, 2, 3),   # a fused q|k|v over tp 2: 12 local rows, 3 parts of 4; chunks of 4 straddle none
    (0, 36, 2, 3, 2, 4),   # 18 local rows in parts of 6, chunks of 5: chunks straddle q|k and k|v
    (0, 12, 3, 3, 4, 5),   # 3 local rows (1 per part) over 5 shards: 2 empty chunks
    (1, 9, 7, 1, 3, 2),    # row-parallel: tp splits the columns, FSDP2 the (odd) rows
    (0, 7, 0, 1, 2, 3),    # a 1-D bias (cols 0): 4 + 3 real rows
])
@NO_DIST_NOTICE
def test_an_fsdp_chunk_of_a_tp_shard_is_its_blocks_of_the_tp1_tensor(tmp_path, dim, size, cols, stride, tp, shards):
    """FSDP2 × tp checkpoints write each rank's chunk of its tp shard as blocks of the tp=1 tensor (no gather):
    every block is the tp=1 tensor's values there, the padding views are the shard's zero padding, and over all
    (tp rank, FSDP2 rank) the blocks tile the tp=1 tensor exactly once (DCP would reject overlaps, but a hole
    would load zeros). Through DCP (one process standing for every rank): the blocks of every chunk, as one
    ``Rectangles``, save the tp=1 tensor, and each chunk's ``Rectangles`` of views loads its values from a tp=1
    checkpoint in place."""

    full, spec = _tp1_tensor(dim, size, cols, stride, tp)
    covered = torch.zeros(full.shape, dtype=torch.int64)
    every_block, chunks = [], []
    for t in range(tp):
        shard = shard_of(full, dim, spec.local, t, tp, stride)  # Megatron's shard, vocab zero-padded
        chunk = -(-shard.shape[0] // shards)  # FSDP2: dim 0 in chunks of ceil(rows / shards), the last short/empty
        for d in range(shards):
            start = min(d * chunk, shard.shape[0])
            local = shard.narrow(0, start, max(0, min(chunk, shard.shape[0] - start)))
            offset = (start,) + (0,) * (local.dim() - 1)
            pieces, padding = tp_local_blocks(local, offset, spec, t, tp)
            assert sum(p.shape[dim] for _, p in pieces) + sum(p.shape[dim] for p in padding) == local.shape[dim]
            for pad in padding:
                assert pad.numel() and not pad.any()
            _count_blocks(full, pieces, local, covered, (t, d))
            every_block += pieces
            chunks.append((local, offset, t))
    assert bool((covered == 1).all()), covered

    _blocks_save_the_tensor(tmp_path / "blocks", full, every_block)
    dcp.save({"w": full}, checkpoint_id=tmp_path / "full", no_dist=True)
    for local, offset, t in chunks:
        into = torch.full_like(local, -1.0)
        pieces, padding = tp_local_blocks(into, offset, spec, t, tp)
        dcp.load({"w": Rectangles(full.shape, pieces, full.dtype, torch.device("cpu"))},
                 checkpoint_id=tmp_path / "full", no_dist=True)
        for pad in padding:
            pad.zero_()  # what the adapter's set does
        assert torch.equal(into, local), (t, offset)


def test_the_chunk_placement_cache_gives_torchs_placements_and_keeps_no_mesh_alive(monkeypatch):
    """FSDP2 checkpoints look up each DTensor chunk's (local shape, offset) through a cache
    (adapters._chunk_placement); keyed on the DeviceMesh it kept up to 4096 meshes, and their process groups,
    alive after their job. Keyed on the mesh's shape and this rank's coordinate: every rank of a 5-rank and a 2 x 3
    mesh (simulated in one process: torch's ``_rank``, no process group) gets torch's own result (uneven chunks,
    empty ones), a second pass over fresh meshes is all cache hits, and no mesh outlives its last use."""
    cases = {(5,): [((7, 5), (Shard(0),)), ((3, 5), (Shard(1),)), ((2, 9), (Shard(0),)), ((7,), (Replicate(),))],
             (2, 3): [((7, 5), (Replicate(), Shard(0))), ((5, 7), (Shard(1), Shard(0))), ((4, 9), (Shard(0), Shard(1))),
                      ((7, 5), (Shard(0), Shard(0)))]}
    torchs = adapters.compute_local_shape_and_global_offset
    calls = []
    monkeypatch.setattr(adapters, "compute_local_shape_and_global_offset",
                        lambda *args: calls.append(args[0]) or torchs(*args))
    monkeypatch.setattr(adapters, "_PLACEMENTS", {})  # whatever tests before this one looked up
    for repeat in range(2):
        calls.clear()
        alive = []
        for dims, these in cases.items():
            for rank in range(math.prod(dims)):
                mesh = DeviceMesh("cpu", torch.arange(math.prod(dims)).reshape(dims), _init_backend=False, _rank=rank)
                for shape, placements in these:
                    expected = torchs(torch.Size(shape), mesh, list(placements))
                    got = adapters._chunk_placement(shape, mesh, placements)
                    assert got == (tuple(expected[0]), tuple(expected[1])), (dims, rank, shape, placements, got)
                alive.append(weakref.ref(mesh))
        del mesh
        gc.collect()
        assert [m() for m in alive] == [None] * 11, "a mesh outlived its last use"
        assert len(calls) == (0 if repeat else 5 * 4 + 6 * 4), len(calls)


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4), (2, 1, 3, 2), (4, 0), ()])
def test_a_flat_range_of_a_tensor_is_at_most_2n_minus_1_boxes_each_a_view(shape):
    """Every range ``[a, b)`` of the flattened tensor (what a ZeRO partition holds of a parameter): its boxes hold
    exactly those elements, each a contiguous view of the range's memory, and there are at most 2·dim - 1."""
    full = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape)
    n = full.numel()
    for a in range(n + 1):
        for b in range(a, n + 1):
            flat = full.reshape(-1)[a:b].clone()
            covered = torch.zeros(shape, dtype=torch.int64)
            pieces = flat_range_pieces(flat, shape, a)
            assert len(pieces) <= max(1, 2 * len(shape) - 1), (a, b, [o for o, _ in pieces])
            assert all(t.is_contiguous() for _, t in pieces), (a, b)
            _count_blocks(full, pieces, flat, covered, (a, b))
            inside = torch.zeros(n, dtype=torch.int64)
            inside[a:b] = 1
            assert torch.equal(covered.reshape(-1), inside), (a, b)


def _partition_blocks(fragment: torch.Tensor, local_shape, start: int, spec: TPShard, t: int, tp: int
                      ) -> tuple[list, list]:
    """``fragment``: elements ``[start, …)`` of tp rank ``t`` 's flattened shard of shape ``local_shape`` (a ZeRO
    partition's); its boxes (``flat_range_pieces``) mapped to the tp=1 tensor (``tp_local_blocks``): (blocks, padding
    views)."""
    blocks, padding = [], []
    for offset, box in flat_range_pieces(fragment, local_shape, start):
        pieces, pad = tp_local_blocks(box, offset, spec, t, tp)
        blocks += pieces
        padding += pad
    return blocks, padding


@pytest.mark.parametrize("dim, size, cols, stride, tp, dp, lead", [
    (0, 63, 5, 1, 2, 3, 7),  # the odd vocabulary over tp 2 (a padding row), partitions straddling rows
    (0, 61, 3, 1, 4, 2, 0),  # 16-row tp shards, the last 13 real: a partition of padding rows only on tp rank 3
    (0, 36, 2, 3, 2, 4, 5),  # a fused q|k|v (18 local rows in parts of 6): boxes straddle q|k and k|v
    (1, 9, 7, 1, 3, 5, 2),   # row-parallel: tp splits the columns, a partition starts mid-row
    (0, 7, 0, 1, 2, 3, 1),   # a 1-D bias
])
@NO_DIST_NOTICE
def test_a_zero_partition_of_a_tp_shard_is_its_blocks_of_the_tp1_tensor(tmp_path, dim, size, cols, stride, tp, dp,
                                                                         lead):
    """ZeRO × tp checkpoints without a gather: a ZeRO-1/2 partition holds a flat range of each tp rank's shard (here
    after ``lead`` elements of another parameter, so ranges start mid-row), whose boxes (``flat_range_pieces``)
    mapped to the tp=1 tensor (``tp_local_blocks``) are views of the partition holding the tp=1 values, tile the
    tp=1 tensor exactly once over (tp rank, dp rank), and through DCP save it and load it back in place."""
    full, spec = _tp1_tensor(dim, size, cols, stride, tp)
    covered = torch.zeros(full.shape, dtype=torch.int64)
    every_block, parts = [], []
    for t in range(tp):
        shard = shard_of(full, dim, spec.local, t, tp, stride)
        flat = torch.cat([torch.full((lead,), -5.0, dtype=full.dtype), shard.reshape(-1)])
        part = -(-flat.numel() // dp)
        for r in range(dp):  # rank r's partition: elements [r·part, (r+1)·part) of the flat buffer
            a, b = max(lead, r * part), min(flat.numel(), (r + 1) * part)
            if a >= b:
                continue
            fragment = flat[a:b]
            blocks, padding = _partition_blocks(fragment, shard.shape, a - lead, spec, t, tp)
            for pad in padding:
                assert not pad.any()
            _count_blocks(full, blocks, flat, covered, (t, r))
            assert sum(p.numel() for _, p in blocks) + sum(p.numel() for p in padding) == fragment.numel()
            every_block += blocks
            parts.append((fragment, shard.shape, a - lead, t))
    assert bool((covered == 1).all()), covered

    _blocks_save_the_tensor(tmp_path / "blocks", full, every_block)
    for fragment, local_shape, start, t in parts:
        into = torch.full_like(fragment, -1.0)
        blocks, padding = _partition_blocks(into, local_shape, start, spec, t, tp)
        dcp.load({"w": Rectangles(full.shape, blocks, full.dtype, torch.device("cpu"))},
                 checkpoint_id=tmp_path / "blocks", no_dist=True)
        for pad in padding:
            pad.zero_()  # what the tp adapter's set does
        assert torch.equal(into, fragment), (t, start)


def test_zero3_checkpoints_with_the_optimizer_swapped_to_nvme_are_refused_in_one_line():
    """The adapter reads and loads the fp32 partitions and moments in place; with offload_optimizer.device = nvme
    ZeRO-3 swaps them out (``swap_optimizer``), so a save or load would read or fill buffers that are not the state."""

    class SwappingZero3:  # the attributes DeepSpeedStateAdapter reads of a ZeRO-3 optimizer that swaps to NVMe
        fp32_partitioned_groups_flat = [torch.zeros(4)]
        fp16_groups = [[]]
        sub_group_to_group_id = {0: 0}
        swap_optimizer = True

    with pytest.raises(ValueError, match="offload_optimizer.device = nvme") as e:
        DeepSpeedStateAdapter(SwappingZero3()).get(torch.nn.Linear(2, 2), None)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("checkpoint", [{}, {"every": 10, "at_end": False, "resume": "none"},
                                        {"at_end": False, "resume": "auto"}])
def test_an_nvme_optimizer_offload_with_checkpoints_is_refused_before_the_run(tmp_path, checkpoint):
    """... so a run that would save or load one is refused by the config (one line), not at its first save."""
    nvme = {"zero_optimization": {"offload_optimizer": {"device": "nvme", "nvme_path": str(tmp_path)}}}
    with pytest.raises(ConfigError, match="offload_optimizer.device = nvme with checkpoints") as e:
        tiny_gpt_config(tmp_path, parallel={"dp": 2, "zero_stage": 3, "deepspeed": nvme}, checkpoint=checkpoint)
    assert "\n" not in str(e.value)
    off = {"every": 0, "at_end": False, "resume": "none"}
    with pytest.raises(ConfigError, match="offload_optimizer.device = nvme with checkpoints"):  # it saves, then exits
        tiny_gpt_config(tmp_path, parallel={"dp": 2, "zero_stage": 3, "deepspeed": nvme}, checkpoint=off,
                        train={"exit_interval": 5})
    tiny_gpt_config(tmp_path, parallel={"dp": 2, "zero_stage": 3, "deepspeed": nvme},
                    checkpoint=off)  # no checkpoint: accepted



def _nvme_config(tmp_path, **sections):
    nvme = {"zero_optimization": {"offload_optimizer": {"device": "nvme", "nvme_path": str(tmp_path)}}}
    return tiny_gpt_config(tmp_path / "run", parallel={"dp": 2, "zero_stage": 3, "deepspeed": nvme},
                           checkpoint={"every": 0, "at_end": False, "resume": "none"}, **sections)


def test_only_an_nvme_optimizer_offload_blocks_every_checkpoint_and_the_reason_says_what_would_resume(tmp_path):
    """The trainer's decision to skip a preemption's save: from the config alone (the same on every rank)."""
    reason = checkpoint_blocker(_nvme_config(tmp_path))
    assert reason and "offload_optimizer.device = nvme" in reason and "device cpu" in reason, reason
    assert "checkpoint.every" in reason and "\n" not in reason
    cpu = {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}
    assert checkpoint_blocker(tiny_gpt_config(tmp_path, parallel={"dp": 2, "zero_stage": 3, "deepspeed": cpu})) is None
    assert checkpoint_blocker(tiny_gpt_config(tmp_path, parallel={"dp": 2, "zero_stage": 3})) is None
    assert checkpoint_blocker(tiny_gpt_config(tmp_path)) is None


def test_a_preempted_nvme_offload_run_exits_75_with_one_line_and_starts_no_save(tmp_path, monkeypatch, capsys):
    """SIGTERM in a run whose optimizer is offloaded to NVMe (no checkpoints, as validation demands): the forced save
    would raise the ZeRO adapter's refusal as a traceback on every rank and leave a partial directory. It is not
    started: rank 0 says why in one line and the run exits with the preempted status.

    NVMe offload does not run here (DeepSpeed's async_io needs libaio, absent on this CPU machine), so a plain tiny
    GPT runs with the NVMe config's decision, and the adapter's refusal is simulated by any save raising it."""
    reason = checkpoint_blocker(_nvme_config(tmp_path))
    monkeypatch.setattr(trainer_module, "checkpoint_blocker", lambda cfg: reason)

    def refuse(self, *args, **kwargs):  # what DeepSpeedStateAdapter.get raises with swap_optimizer
        raise ValueError("checkpoints of a ZeRO-3 run with offload_optimizer.device = nvme are not supported")

    monkeypatch.setattr(CheckpointManager, "_collect", refuse)
    monkeypatch.setenv(FAULT_ENV, "rank=0,step=2,signal=TERM")
    cfg = tiny_gpt_config(tmp_path / "run", steps=5, checkpoint={"every": 0, "at_end": False, "resume": "none"})
    result = train(cfg)
    assert result.exit_code == EXIT_PREEMPTED and len(result.losses) == 2
    out = capsys.readouterr()
    text = out.out + out.err
    line = (f"preempted (signal {int(signal.SIGTERM)}): no checkpoint written after step 2: {reason}; a restart "
            f"starts from scratch, exiting with status {EXIT_PREEMPTED}")
    assert text.count(line) == 1 and "Traceback" not in text and "checkpoint saved" not in text, text
    assert "preempted, no checkpoint to resume from: loss" in text and "preempted, resumable" not in text, text
    checkpoints = tmp_path / "run" / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == ["checkpoints.lock"]  # the run's own lock: no step dir
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["exit_code"] == EXIT_PREEMPTED


def _preempted_nvme_ranks(rank: int, world: int, root: str) -> dict:
    """One rank of a ZeRO-3 dp-2 run preempted by a SIGTERM to rank 1 only, with the NVMe config's decision and
    the adapter's refusal simulated as in the test above (NVMe offload does not run on this machine)."""
    reason = checkpoint_blocker(_nvme_config(Path(root)))
    trainer_module.checkpoint_blocker = lambda cfg: reason

    def refuse(self, *args, **kwargs):
        raise ValueError("checkpoints of a ZeRO-3 run with offload_optimizer.device = nvme are not supported")

    CheckpointManager._collect = refuse
    os.environ[FAULT_ENV] = "rank=1,step=2,signal=TERM"
    result = train(tiny_gpt_config(f"{root}/run", steps=5, parallel={"dp": 2, "zero_stage": 3},
                                   checkpoint={"every": 0, "at_end": False, "resume": "none"}))
    return {"exit_code": result.exit_code, "steps": len(result.losses)}


@pytest.mark.slow  # ~6 s: two ranks building DeepSpeed ZeRO-3 engines
def test_every_rank_of_a_preempted_nvme_offload_run_stops_at_the_same_step_and_exits_75(tmp_path):
    """Only rank 1 is signalled: both agree to stop after step 2, neither starts a save (a rank that did would wait
    in its collectives for the other: a hang), and both exit with the preempted status."""
    for r in run_ranks(_preempted_nvme_ranks, 2, args=(str(tmp_path),), timeout=120):
        assert r == {"exit_code": EXIT_PREEMPTED, "steps": 2}, r
    # rank 0 saw no signal itself: its line names the cause it knows (was "signal None")
    said = (tmp_path / "run" / "logs" / "rank_0.log").read_text()
    assert "preempted (another rank was signalled): no checkpoint written after step 2: " in said, said
    assert "signal 15" in (tmp_path / "run" / "logs" / "rank_1.log").read_text()
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["checkpoints.lock"]

def _zero_checkpoint_peaks(rank: int, world: int, root: str) -> dict:
    """ZeRO-2 and ZeRO-3 at dp 2 (DeepSpeed, fp32, CPU), after one step: the live-tensor peaks of a synchronous
    checkpoint save and of its load (CheckpointManager as the trainer runs them), the bytes of the full fp32 state
    (12 B per parameter: weights and the two AdamW moments — what the per-parameter gather held on every rank),
    the peak of the working-copy refresh that ends a load (DeepSpeed's own after-step work: at ZeRO-1/2 an
    all-gather of the updated partitions, whose gloo output is a full-model temporary on CPU), and whether the load
    restored every master weight, moment and working copy, all zeroed before it."""
    out = {}
    for stage in (2, 3):
        cfg, engine = one_step_gpt_engine({"dp": 2, "zero_stage": stage}, rank, world)
        model, optimizer = engine.module, engine.optimizer
        ckpt = CheckpointManager(cfg.checkpoint, run_dir=f"{root}/zero{stage}", rank=rank, world_size=world,
                                 io_threads=1, **engine.checkpoint_kwargs())
        adapter = ckpt.adapter
        before = [t.clone() for t in engine_state_tensors(engine)]
        _, refresh = peak_tensor_bytes(adapter._refresh_working_copies)
        _, save = peak_tensor_bytes(lambda: ckpt.save(1, model, optimizer))
        with torch.no_grad():
            for t in engine_state_tensors(engine):
                t.zero_()
        _, load = peak_tensor_bytes(lambda: ckpt.load(ckpt.root / "step_1", model, optimizer))
        numel = sum(int(torch.Size(getattr(p, "ds_shape", p.shape)).numel()) for p in model.parameters())
        out[stage] = {"save": save, "load": load, "refresh": refresh, "full": 12 * numel,
                      "restored": all(torch.equal(a, b) for a, b in zip(before, engine_state_tensors(engine)))}
    return out


@pytest.mark.slow
def test_zero_checkpoint_peak_is_a_small_part_of_the_fp32_state_not_a_gather(tmp_path):
    """DeepSpeed ZeRO checkpoints write and read each rank's own partition (views: checkpoint/adapters.py
    ``DeepSpeedStateAdapter``), so neither a save nor a load of ZeRO-2 or ZeRO-3 allocates more than a small part
    of the model's fp32 state (3 % here) beyond, for a load, DeepSpeed's own refresh of its working copies
    (what it does after every step). Measured: save 0.008-0.010 × the full state (ZeRO-2 and ZeRO-3: DCP's plans;
    0.062 and 0.031 × while the NaN/inf check allocated a bool per element), a load without the refresh at most
    0.036 ×; the refresh 0.33 × (ZeRO-2: gloo's all-gather output) and 0.15 × (ZeRO-3, the
    first after a step). The per-parameter gather this replaced held all of it on every rank: with it, this test
    measured a save at 1.06 × and a load at 1.33 × (ZeRO-2) and 1.06-1.15 × (ZeRO-3) the full state. Ranks forked,
    as the FSDP2 × tp meter's: the meter counts only what is allocated inside its block (fresh-spawned ranks gave
    the same figures)."""
    for peaks in run_ranks(_zero_checkpoint_peaks, 2, args=(str(tmp_path),), timeout=300):
        for stage, p in peaks.items():
            assert p["restored"], (stage, p)
            assert p["save"] <= 0.03 * p["full"], (stage, p)  # DCP's and the manager's plans and reports
            assert p["load"] <= 0.05 * p["full"] + p["refresh"], (stage, p)


def test_a_rectangles_refuses_a_block_that_does_not_fit_and_any_torch_op():
    """Each block must lie inside the global tensor, with its dtype and its number of dims (a block of another rank
    would describe other elements than it holds); and it is no tensor to compute with."""
    cpu = torch.device("cpu")
    r = Rectangles(torch.Size([4, 3]), [((1, 0), torch.zeros(2, 3))], torch.float32, cpu)
    assert [o for o, _ in r.pieces] == [(1, 0)] and r.shape == (4, 3)
    for offsets, block in [((3, 0), torch.zeros(2, 3)), ((0, -1), torch.zeros(1, 3)),
                           ((0, 0), torch.zeros(1, 3, dtype=torch.float64)), ((0,), torch.zeros(3)),
                           ((0, 0), torch.zeros(1, 3, 1)), ((0, 0), torch.zeros(3))]:
        with pytest.raises(ValueError, match="does not fit"):
            Rectangles(torch.Size([4, 3]), [(offsets, block)], torch.float32, cpu)
    with pytest.raises(TypeError, match="operate on its .pieces"):
        r.sum()


def _offload(stage: int) -> dict:
    """ZeRO ``stage`` at dp 2 with the optimizer offloaded to the host; our torch AdamW steps the host partitions
    (``zero_force_ds_cpu_optimizer: false``: no DeepSpeedCPUAdam build)."""
    return {"dp": 2, "zero_stage": stage,
            "deepspeed": {"zero_optimization": {"offload_optimizer": {"device": "cpu"}},
                          "zero_force_ds_cpu_optimizer": False}}


def _param_offload(optimizer: bool) -> dict:
    """ZeRO-3 at dp 2 with the parameters offloaded to the host (``offload_param.device = cpu``: DeepSpeed keeps each
    rank's partition of the working weights in a flat host buffer and gathers it for every forward and backward);
    ``optimizer``: the optimizer too (both together: ZeRO-Infinity on the host)."""
    zero = {"offload_param": {"device": "cpu"}, **({"offload_optimizer": {"device": "cpu"}} if optimizer else {})}
    return {"dp": 2, "zero_stage": 3,
            "deepspeed": {"zero_optimization": zero, **({"zero_force_ds_cpu_optimizer": False} if optimizer else {})}}


#: the two parameter-offload variants: the parameters alone, and with them the optimizer
PARAM_OFFLOADS = {"params": False, "params+optimizer": True}


def _param_offload_resume_ranks(rank: int, world: int, root: str) -> dict:
    """A plain ZeRO-3 run (6 steps' schedule) stopping at step 4, saving at 2 and 4; per :data:`PARAM_OFFLOADS`
    variant, its step-2 checkpoint resumed with offload to step 6, saving at 4; that run's step-4 checkpoint resumed
    with offload and without. The same ``train.steps`` throughout (the learning-rate schedule's length). Records
    whether DeepSpeed took its parameter-offload path (``offload_param`` of the ZeRO-3 optimizer the checkpoint adapter
    wraps), per engine in order."""
    taken, init = [], DeepSpeedStateAdapter.__init__

    def recording(self, zero_optimizer):
        taken.append(getattr(zero_optimizer, "offload_param", None))
        init(self, zero_optimizer)
    DeepSpeedStateAdapter.__init__ = recording
    try:
        plain = {"dp": 2, "zero_stage": 3}
        out = {"plain": train(_cfg(root, "plain", plain, checkpoint={"every": 2, "keep_last": 2}, steps=6,
                                   train_over={"exit_interval": 4})).losses}
        for name, optimizer in PARAM_OFFLOADS.items():
            offload = _param_offload(optimizer)
            res = train(_cfg(root, name, offload, steps=6, checkpoint={"every": 4, **_resume_from(root, "plain", 2)}))
            runs = {"offload_from_plain": (res.start_step, res.losses)}
            for run, parallel in (("offload_from_offload", offload), ("plain_from_offload", plain)):
                res = train(_cfg(root, f"{name}_{run}", parallel, steps=6, checkpoint=_resume_from(root, name, 4)))
                runs[run] = (res.start_step, res.losses)
            out[name] = runs
    finally:
        DeepSpeedStateAdapter.__init__ = init
    return {**out, "offload_param": taken}


@pytest.mark.slow  # seven 2-rank DeepSpeed runs of 2-4 steps in one spawn (engine builds dominate)
def test_zero3_with_cpu_parameter_offload_resumes_exactly_and_to_and_from_no_offload(tmp_path):
    """offload_param.device = cpu keeps ZeRO-3's working weights in host buffers between uses; the checkpoint holds
    the fp32 masters (the common layout), and a load refreshes the offloaded weights from them (the adapter's
    _refresh_working_copies, DeepSpeed's after-step path: a load that skips it for offloaded weights fails here). For
    the parameters offloaded alone and with the optimizer: a checkpoint saved without offload resumes with it within
    1e-5, a resume with offload repeats the run bit for bit, and its checkpoint resumes without offload within 1e-5."""
    for r in run_ranks(_param_offload_resume_ranks, 2, args=(str(tmp_path),), timeout=300):
        assert r["offload_param"] == [False] + [True, True, False] * len(PARAM_OFFLOADS), r["offload_param"]
        plain = r["plain"]
        for name in PARAM_OFFLOADS:
            runs = r[name]
            start, offloaded = runs["offload_from_plain"]
            assert start == 2 and rel_close(offloaded[:2], plain[2:4], 1e-5), (name, offloaded, plain)
            assert runs["offload_from_offload"] == (4, offloaded[2:]), (name, runs)
            start, losses = runs["plain_from_offload"]
            assert start == 4 and rel_close(losses, offloaded[2:], 1e-5), (name, losses, offloaded)


def _offload_resume_ranks(rank: int, world: int, root: str, stage: int) -> dict:
    """ZeRO ``stage`` with the optimizer offloaded to the host: STEPS (5) straight steps; SAVED_AT (2) steps, exit,
    resume to STEPS; and its step-2 checkpoint resumed by the same stage without offload (8 steps exiting at 4 checked
    no more)."""
    straight = train(_cfg(root, "offload_straight", _offload(stage))).losses
    ck = {"every": 0, "keep_last": 2}
    first = train(_cfg(root, "offload", _offload(stage), checkpoint=ck, train_over={"exit_interval": SAVED_AT}))
    second = train(_cfg(root, "offload", _offload(stage), checkpoint=ck))
    plain = train(_cfg(root, "plain_from_offload", {"dp": 2, "zero_stage": stage},
                       checkpoint=_resume_from(root, "offload")))
    return {"straight": straight, "resumed": (first.losses, second.start_step, second.losses),
            "plain": (plain.start_step, plain.losses)}


@pytest.mark.slow  # ~7-25 s per stage: four 2-rank DeepSpeed runs
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_with_cpu_optimizer_offload_resumes_exactly_and_without_offload(tmp_path, stage):
    """offload_optimizer.device = cpu moves the fp32 partitions and the AdamW step to the host (here the host is the
    device, but DeepSpeed takes its offload path: separate fp32 gradient partitions, its own host step): the
    adapter's partition views are those host tensors, so 2 + 3 steps equal 5 straight bit for bit, and the
    checkpoint (the common layout) resumes under the same stage without offload with the same losses (1e-5).
    ZeRO-2 failed here before the adapter kept DeepSpeed's host gradient buffers (``_ensure_state``)."""
    for r in run_ranks(_offload_resume_ranks, 2, args=(str(tmp_path), stage), timeout=300):
        first, start, second = r["resumed"]
        assert start == SAVED_AT and first + second == r["straight"], (first + second, r["straight"])
        start, losses = r["plain"]
        assert start == SAVED_AT and rel_close(losses, r["straight"][SAVED_AT:], 1e-5), (losses, r["straight"])


#: DeepSpeed's optimizer wrappers, one case each: (name, parallel, precision, the wrapper DeepSpeed 0.19.8 builds:
#: engine.py ``_configure_optimizer``), whose state DeepSpeedStateAdapter saves and loads. ZeRO-2 builds ZeRO-1's
#: wrapper (the adapter reads both alike): its bf16 case would add time, not code covered. tp 2 × ZeRO-0 bf16: the
#: tensor-parallel adapter over the master copies (the odd vocabulary's padded shard copied in on load), saved
#: asynchronously (host staging); launch refuses bf16 with tp > 1 on CPU for Megatron's backward, train() runs it
ZERO_PRECISIONS = [
    ("zero0_fp32", {"dp": 2, "zero_stage": 0}, "fp32", "AdamW"),  # ours, handed through: TorchStateAdapter
    ("zero0_bf16", {"dp": 2, "zero_stage": 0}, "bf16", "FP16_UnfusedOptimizer"),  # fp32 masters: MasterCopyAdapter
    ("zero1_bf16", {"dp": 2, "zero_stage": 1}, "bf16", "DeepSpeedZeroOptimizer"),
    ("zero3_bf16", {"dp": 2, "zero_stage": 3}, "bf16", "DeepSpeedZeroOptimizer_Stage3"),
    ("zero1_bf16_fp32_grads", {"dp": 2, "zero_stage": 1, "deepspeed": {"data_types": {"grad_accum_dtype": "fp32"}}},
     "bf16", "BF16_Optimizer"),
    ("tp2_zero0_bf16", {"tp": 2, "zero_stage": 0}, "bf16", "FP16_UnfusedOptimizer"),
]


def _saved_value_keys(step: Path) -> set:
    return set(json.loads((step / mf.TRAIN_STATE).read_text())["values"])


def _zero_precision_ranks(rank: int, world: int, root: str) -> dict:
    """Per :data:`ZERO_PRECISIONS` case: 4 steps saving at 2, and that step-2 checkpoint resumed to 4 by the
    same layout; then the ZeRO-0 bf16 checkpoint resumed at ZeRO-1 and the ZeRO-1 one at ZeRO-0 (the master-copy
    adapter loading another engine's checkpoint). Records the optimizer each engine's adapter wraps, in order."""
    wrappers, init = [], DeepSpeedStateAdapter.__init__

    def recording(self, zero_optimizer):
        wrappers.append(type(zero_optimizer).__name__)
        init(self, zero_optimizer)
    DeepSpeedStateAdapter.__init__ = recording
    out: dict = {}
    try:
        for name, par, precision, _ in ZERO_PRECISIONS:
            over = {"precision": precision}
            save = {"every": 2, "async_save": "tp" in par}
            straight = train(_cfg(root, name, par, steps=4, checkpoint=save, train_over=over)).losses
            resumed = train(_cfg(root, f"{name}_resumed", par, steps=4, train_over=over,
                                 checkpoint=_resume_from(root, name, 2)))
            out[name] = (straight, resumed.start_step, resumed.losses)
        for name, stage, src in (("zero1_from_zero0", 1, "zero0_bf16"), ("zero0_from_zero1", 0, "zero1_bf16")):
            resumed = train(_cfg(root, name, {"dp": 2, "zero_stage": stage}, steps=4, train_over={"precision": "bf16"},
                                 checkpoint=_resume_from(root, src, 2)))
            out[name] = (resumed.start_step, resumed.losses)
    finally:
        DeepSpeedStateAdapter.__init__ = init
    return {**out, "wrappers": wrappers}


@pytest.mark.slow  # 10-20 s (load 3-4): 14 two-rank DeepSpeed runs of 2-4 steps in one spawn, a world-1 resume
def test_every_zero_stage_and_precision_saves_and_resumes_bit_for_bit(tmp_path):
    """Each optimizer wrapper DeepSpeed builds for dist-train's stages and precisions (:data:`ZERO_PRECISIONS`) saves a
    checkpoint, and a resume from it repeats the run bit for bit. ZeRO-0 in bf16 (FP16_UnfusedOptimizer: an fp32
    master copy per parameter) failed at its first save ('FP16_UnfusedOptimizer' object is not iterable), at any tp:
    such a run lost all its work. Every case writes the one layout (same tensors, shapes, dtypes and values); the
    ZeRO-0 bf16 checkpoint resumes at ZeRO-1 and at dp 1 (the masters are replicas: any dp loads them whole), and a
    ZeRO-1 one at ZeRO-0, each with the saving run's losses (1e-5). And ZeRO-0 bf16 trains as ZeRO-1 bf16 does, bit
    for bit: DeepSpeed's wrapper stepped AdamW once when built (one more Adam step and weight decay than the config
    says), which the engine undoes (engines/deepspeed.undo_build_step)."""
    r = run_ranks(_zero_precision_ranks, 2, args=(str(tmp_path),), timeout=300)
    assert r[0] == r[1]
    r = r[0]
    assert r["wrappers"] == [case[-1] for case in ZERO_PRECISIONS for _ in range(2)] + [
        "DeepSpeedZeroOptimizer", "FP16_UnfusedOptimizer"], r["wrappers"]
    for name, *_ in ZERO_PRECISIONS:
        straight, start, losses = r[name]
        assert start == 2 and losses == straight[2:], (name, straight, start, losses)
    # ZeRO-0 bf16 trains as ZeRO-1 bf16 does: DeepSpeed's build-time AdamW step is undone (undo_build_step)
    assert r["zero0_bf16"][0] == r["zero1_bf16"][0], (r["zero0_bf16"][0], r["zero1_bf16"][0])
    ref = tmp_path / "zero0_fp32" / "checkpoints" / "step_2"
    for name, *_ in ZERO_PRECISIONS:  # one layout: tensors (keys, shapes, dtypes) and values
        step = tmp_path / name / "checkpoints" / "step_2"
        assert mf.read_manifest(step)["tensors"] == mf.read_manifest(ref)["tensors"], name
        assert _saved_value_keys(step) == _saved_value_keys(ref), name
    for name, src in (("zero1_from_zero0", "zero0_bf16"), ("zero0_from_zero1", "zero1_bf16")):
        start, losses = r[name]
        assert start == 2 and rel_close(losses, r[src][0][2:], 1e-5), (name, losses, r[src][0])
    dp1 = train(_cfg(tmp_path, "zero0_bf16_dp1", {"zero_stage": 0}, steps=4, train_over={"precision": "bf16"},
                     checkpoint=_resume_from(tmp_path, "zero0_bf16", 2)))
    assert dp1.start_step == 2 and rel_close(dp1.losses, r["zero0_bf16"][0][2:], 1e-5), (dp1.losses, r["zero0_bf16"])


class _MasterCopyWrapper:
    """The attributes DeepSpeedStateAdapter reads of DeepSpeed's stage-0 low-precision wrapper (FP16_UnfusedOptimizer):
    the module's parameters per group, an fp32 copy of each that the inner optimizer steps, and the loss scaler."""

    def __init__(self, model: torch.nn.Module, scales: bool) -> None:
        self.fp16_groups = [list(model.parameters())]
        self.fp32_groups = [[p.detach().clone().float().requires_grad_() for p in self.fp16_groups[0]]]
        self.optimizer = torch.optim.AdamW(self.fp32_groups[0], lr=0.1)
        self.loss_scale_config = type("LossScaleConfig", (), {"use_grad_scaling": scales})()


def test_the_stage0_wrappers_state_round_trips_and_what_it_cannot_save_is_refused_when_the_engine_is_built():
    """DeepSpeedStateAdapter over the stage-0 wrapper presents the fp32 copies and the inner optimizer's state under the
    plain engines' keys, and a load (another run's values) sets the copies, the moments, the step, the hyper-parameters
    and, from the copies, the module's bf16 weights. What it cannot save is refused in one line when the adapter is
    built (the engine's checkpoint_kwargs, before the first step), not at the first save: a wrapper that scales the
    loss (fp16: its scaler's state is not kept), one whose inner optimizer does not step its copies, an unknown one."""
    model = torch.nn.Linear(3, 2).to(torch.bfloat16)
    saver = _MasterCopyWrapper(model, scales=False)
    for master in saver.fp32_groups[0]:
        master.grad = torch.randn_like(master)
    saver.optimizer.step()
    model_sd, optim_sd = DeepSpeedStateAdapter(saver).get(model, saver)
    assert model_sd["weight"] is saver.fp32_groups[0][0] and model_sd["weight"].dtype == torch.float32
    assert set(optim_sd) == {f"{k}.{n}.{s}" for n in ("weight", "bias") for k, s in
                             [("state", "step"), ("state", "exp_avg"), ("state", "exp_avg_sq")] +
                             [("param_groups", h) for h in saver.optimizer.param_groups[0] if h != "params"]}
    fresh_model = torch.nn.Linear(3, 2).to(torch.bfloat16)
    loader = _MasterCopyWrapper(fresh_model, scales=False)
    for master in loader.fp32_groups[0]:  # DeepSpeed's constructor creates the state (a step with zero gradients)
        master.grad = torch.zeros_like(master)
    loader.optimizer.step()
    loader.optimizer.param_groups[0]["lr"] = 0.5
    target_sd, _ = DeepSpeedStateAdapter(loader).get(fresh_model, loader)
    given = {k: v.clone() for k, v in model_sd.items()}  # not the loader's own tensors: copied in
    DeepSpeedStateAdapter(loader).set(fresh_model, loader, given,
                                      {k: v.clone() if torch.is_tensor(v) else v for k, v in optim_sd.items()})
    for mine, theirs in zip(loader.fp32_groups[0], saver.fp32_groups[0]):
        assert torch.equal(mine, theirs)
        for k in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(loader.optimizer.state[mine][k], saver.optimizer.state[theirs][k]), k
    assert loader.optimizer.param_groups[0]["lr"] == 0.1
    assert torch.equal(fresh_model.weight, saver.fp32_groups[0][0].to(torch.bfloat16))  # the working copy refreshed
    assert target_sd["weight"] is loader.fp32_groups[0][0]  # what DCP loads into in place

    with pytest.raises(ValueError, match="scales the loss \\(fp16\\)") as e:
        DeepSpeedStateAdapter(_MasterCopyWrapper(model, scales=True))
    assert "\n" not in str(e.value)
    stray = _MasterCopyWrapper(model, scales=False)
    stray.optimizer = torch.optim.AdamW(model.parameters())  # steps the bf16 weights, not the copies
    with pytest.raises(RuntimeError, match="does not step its fp32 copies"):
        DeepSpeedStateAdapter(stray)
    with pytest.raises(TypeError, match="such a run could not save a checkpoint") as e:
        DeepSpeedStateAdapter(object())
    assert "\n" not in str(e.value)


#: ``zero_optimization.sub_group_size`` small enough that DeepSpeed's ZeRO-3 splits each rank's fp32 partition of
#: the tiny model (d_model 32, 2 layers) into several sub-groups, each stepped (and swapped) on its own
SUB_GROUP = {"dp": 2, "zero_stage": 3, "deepspeed": {"zero_optimization": {"sub_group_size": 2048}}}


def _sub_group_resume_ranks(rank: int, world: int, root: str) -> dict:
    """ZeRO-3 with small sub-groups: 4 straight steps; 2 steps, exit, resume to 4; its step-2 checkpoint resumed with
    DeepSpeed's default sub-groups (one per param group). Records each engine's (sub-groups, param groups)."""
    shapes, init = [], DeepSpeedStateAdapter.__init__

    def recording(self, zero_optimizer):
        shapes.append((len(zero_optimizer.fp16_groups), len(zero_optimizer.optimizer.param_groups)))
        init(self, zero_optimizer)
    DeepSpeedStateAdapter.__init__ = recording
    try:
        straight = train(_cfg(root, "straight", SUB_GROUP, steps=4)).losses
        ck = {"every": 0, "keep_last": 2}
        first = train(_cfg(root, "sub", SUB_GROUP, checkpoint=ck, steps=4, train_over={"exit_interval": 2}))
        second = train(_cfg(root, "sub", SUB_GROUP, checkpoint=ck, steps=4))
        plain = train(_cfg(root, "plain", {"dp": 2, "zero_stage": 3}, steps=4,
                           checkpoint={"resume": f"{root}/sub/checkpoints/step_2"}))
    finally:
        DeepSpeedStateAdapter.__init__ = init
    return {"straight": straight, "resumed": (first.losses, second.start_step, second.losses),
            "plain": (plain.start_step, plain.losses), "groups": shapes}


@pytest.mark.slow  # four 2-rank ZeRO-3 runs of 2-4 steps in one spawn (engine builds dominate)
def test_zero3_sub_groups_resume_bit_for_bit_and_into_default_sub_groups(tmp_path):
    """zero_optimization.sub_group_size (ZeRO-3 only, zero_keys.ZERO_KEYS) splits each rank's fp32 partition into
    sub-groups, each a flat tensor of the inner optimizer; the checkpoint adapter reads them in place through
    DeepSpeed's sub_group_to_group_id: 2 + 2 steps equal 4 straight bit for bit, and the checkpoint (the common
    layout) resumes under DeepSpeed's default sub-groups with the same losses (1e-5)."""
    for r in run_ranks(_sub_group_resume_ranks, 2, args=(str(tmp_path),), timeout=300):
        small, default = r["groups"][0], r["groups"][-1]
        assert small[0] > small[1] and default[0] == default[1], r["groups"]  # the small size made more sub-groups
        straight, (first, start, second), (plain_start, plain) = r["straight"], r["resumed"], r["plain"]
        assert first == straight[:2] and start == 2 and second == straight[2:], r
        assert plain_start == 2 and rel_close(plain, straight[2:], 1e-5), (plain, straight)

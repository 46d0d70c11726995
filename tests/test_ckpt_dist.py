"""Checkpoints on real gloo ranks: exact resume (sync and async) at world 1, 2, 3; resharding dp2 -> 1 and
3; sharded (DTensor) chunks Shard(1)/Shard(0) on 2 ranks -> Shard(0)/Shard(1) on 3 ranks and plain tensors on 1,
read through the raw-shard reader with verification; a rank SIGKILLed mid-save. World 1 runs in the test
process (no process group), the others spawn.

Adding a resharding case (cp2->cp1, dp2->tp2, zero3->zero0, wp 1x2->1x1): save with ``_save_reference`` under
the source layout, load with ``_load_and_compare`` under the target layout, compare ``eval_outputs``.
"""
from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

import json

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from dist_train.checkpoint import CheckpointManager, complete_checkpoints, verify_checkpoint
from dist_train.checkpoint.manifest import MANIFEST, read_latest
from dist_train.checkpoint.storage import CheckpointIOError, ChecksumWriter, SafeReader
from tests.dist_harness import run_ranks
from tests.test_ckpt_common import (CkptCfg, build, eval_outputs, flip_byte, model_config, seed_rank, shard_files,
                                   train_steps)

#: two saves before the resume point (steps 2 and 4; steps 1 and 3 save nothing), the resume from the newer one
STEPS, SAVE_EVERY = 8, 2


def layout(world: int) -> dict:
    return {"dp": world, "tp": 1, "pp": 1, "cp": 1, "wp": [1, 1], "zero_stage": None, "world_size": world}


def manager(cfg: CkptCfg, root: str, rank: int, world: int) -> CheckpointManager:
    return CheckpointManager(cfg, run_dir=Path(root), config=model_config(), layout=layout(world), rank=rank,
                             world_size=world)


def _exact_resume(rank: int, world: int, root: str) -> None:
    """STEPS straight vs half + saves every SAVE_EVERY + fresh objects/RNG + resume + rest: bitwise equal, with a
    synchronous and with an asynchronous save (both against the one straight run: same seed, same steps)."""
    seed_rank(rank)
    model, opt, sched = build()
    straight = train_steps(model, opt, sched, 1, STEPS, rank, world)
    for async_save in (False, True):
        _resume_matches(rank, world, root, async_save, straight)


def _resume_matches(rank: int, world: int, root: str, async_save: bool, straight: list) -> None:
    seed_rank(rank)
    model, opt, sched = build()
    cfg = CkptCfg(every=SAVE_EVERY, async_save=async_save, dir=f"{root}/resume_w{world}_async{int(async_save)}")
    mgr = manager(cfg, root, rank, world)
    assert mgr.resume(model, opt, sched) is None  # empty dir: fresh start
    first = []
    half = STEPS // 2
    for step in range(1, half + 1):
        first += train_steps(model, opt, sched, step, step, rank, world)
        started = mgr.maybe_save(step, model, opt, sched, extra={"step": step, "consumed_samples": 6 * step})
        assert started == (step % SAVE_EVERY == 0)
    mgr.close()
    assert mgr.failed_saves == 0

    seed_rank(rank + 100)  # a restarted process has other RNG states and other initial weights
    model, opt, sched = build(seed=7)
    mgr = manager(cfg, root, rank, world)
    extra = mgr.resume(model, opt, sched)
    assert extra == {"step": half, "consumed_samples": 6 * half}, extra
    rest = train_steps(model, opt, sched, half + 1, STEPS, rank, world)
    mgr.close()
    assert first + rest == straight, (first + rest, straight)


def _save_reference(rank: int, world: int, path: str) -> torch.Tensor:
    """Train a few steps under this layout, save at step 4 into ``path``; return the outputs on the fixed batch."""
    seed_rank(rank)
    model, opt, sched = build()
    train_steps(model, opt, sched, 1, 4, rank, world)
    mgr = manager(CkptCfg(dir=path), path, rank, world)
    mgr.save(4, model, opt, sched, extra={"step": 4, "consumed_samples": 24})
    mgr.close()
    return eval_outputs(model)


def _load_and_compare(rank: int, world: int, path: str, expected: torch.Tensor) -> None:
    seed_rank(rank + 50)
    model, opt, sched = build(seed=11)
    mgr = manager(CkptCfg(resume=path), path, rank, world)
    extra = mgr.resume(model, opt, sched)
    assert extra["step"] == 4 and extra["consumed_samples"] == 24
    assert torch.equal(eval_outputs(model), expected)
    # optimizer state and schedule came along: one more step runs from the saved moments
    assert int(opt.state_dict()["state"][0]["step"]) == 4 and sched.last_epoch == 4
    mgr.close()


def _dtensor_full() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {"a": torch.randn(7, 10, dtype=torch.float64, generator=g), "b": torch.randn(5, 3, generator=g)}


def _dtensor_case(rank: int, world: int, path: str, save: bool) -> None:
    """Save "a" as Shard(1) and "b" as Shard(0) (uneven), or load them as Shard(0) / Shard(1) (plain tensors
    at world 1) with every block verified while reading; every rank checks its shard against the full tensor."""
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    full = _dtensor_full()
    mesh = None
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world,))
    if save:
        state = {"a": distribute_tensor(full["a"], mesh, [Shard(1)]), "b": distribute_tensor(full["b"], mesh, [Shard(0)])}
        writer = ChecksumWriter(path, thread_count=2)
        dcp.save(state, storage_writer=writer)
        records: list = [None] * world
        dist.all_gather_object(records, writer.records)
        if rank == 0:
            Path(path, "records.json").write_text(json.dumps({k: v for r in records for k, v in r.items()}))
        dist.barrier()
        return
    records = json.loads(Path(path, "records.json").read_text())
    if world == 1:
        state = {k: torch.zeros_like(v) for k, v in full.items()}
    else:
        state = {"a": distribute_tensor(torch.zeros(7, 10, dtype=torch.float64), mesh, [Shard(0)]),
                 "b": distribute_tensor(torch.zeros(5, 3), mesh, [Shard(1)])}
    dcp.load(state, storage_reader=SafeReader(path, records=records, threads=2), no_dist=world == 1)
    for key, t in state.items():
        got = t.full_tensor() if isinstance(t, DTensor) else t
        assert torch.equal(got, full[key]), (rank, key)


def _damaged_newest_on_every_rank(rank: int, world: int, root: str) -> None:
    """step_3 damaged (a flipped shard byte): every rank resumes step_2 and names the same last good checkpoint,
    before and after the re-save of step 3 that replaces the damaged one (rank 0 commits it; the others must not
    go on excluding the new step_3 as the damaged one)."""
    seed_rank(rank)
    model, opt, sched = build()
    mgr = manager(CkptCfg(dir=root), root, rank, world)
    for step in (1, 2, 3):
        train_steps(model, opt, sched, step, step, rank, world)
        mgr.save(step, model, opt, sched, extra={"step": step, "consumed_samples": 6 * step})
    dist.barrier()
    if rank == 0:
        flip_byte(shard_files(Path(root) / "step_3")[0])
    dist.barrier()
    model, opt, sched = build(seed=5)
    mgr = manager(CkptCfg(dir=root), root, rank, world)
    assert mgr.resume(model, opt, sched)["step"] == 2
    assert mgr.last_good() == "step_2", (rank, mgr.last_good())
    train_steps(model, opt, sched, 3, 3, rank, world)
    mgr.save(3, model, opt, sched, extra={"step": 3, "consumed_samples": 18})
    assert mgr.last_good() == "step_3", (rank, mgr.last_good())
    _io_error_on_one_rank_stops_every_rank(rank, root)


def _io_error_on_one_rank_stops_every_rank(rank: int, root: str) -> None:
    """Rank 1 alone gets ESTALE reading step_3's manifest (its NFS client; rank 0 reads it fine): every rank raises
    CheckpointIOError together, none falls back to step_2 or calls step_3 damaged (a rank that did would load
    another step than its peers, or wait for them in a collective they never reach)."""
    real = Path.read_text

    def stale(self, *a, **kw):
        if self.name == MANIFEST and self.parent.name == "step_3":
            raise OSError(errno.ESTALE, "Stale file handle", str(self))
        return real(self, *a, **kw)

    model, opt, sched = build(seed=6)
    Path.read_text = stale if rank == 1 else real
    try:
        with pytest.raises(CheckpointIOError, match="Stale file handle" if rank == 1 else "could not be read"):
            manager(CkptCfg(dir=root), root, rank, dist.get_world_size()).resume(model, opt, sched)
    finally:
        Path.read_text = real


def _multi_rank_cases(rank: int, world: int, root: str, reshard_path: str, expected, kill_root) -> torch.Tensor:
    """Exact resume (sync, async); then either save the dp reference (expected None) or load it resharded;
    with ``kill_root`` finally a save during which rank 1 is SIGKILLed (this spawn then fails by design)."""
    _exact_resume(rank, world, root)
    if expected is None:
        _damaged_newest_on_every_rank(rank, world, f"{root}/damaged_w{world}")
        _dtensor_case(rank, world, f"{reshard_path}_dtensor", save=True)
        return _save_reference(rank, world, reshard_path)
    _load_and_compare(rank, world, reshard_path, expected)
    _dtensor_case(rank, world, f"{reshard_path}_dtensor", save=False)
    (Path(root) / f"cases_ok_w{world}_rank{rank}").touch()
    if kill_root is not None:
        _die_mid_save(rank, world, kill_root)
    return expected


def _die_mid_save(rank: int, world: int, root: str) -> None:
    seed_rank(rank)
    model, opt, sched = build()
    mgr = manager(CkptCfg(dir=root), root, rank, world)
    train_steps(model, opt, sched, 1, 2, rank, world)
    mgr.save(2, model, opt, sched, extra={"step": 2, "consumed_samples": 12})
    train_steps(model, opt, sched, 3, 4, rank, world)
    if rank == 1:
        mgr.fault_hook = lambda phase: os.kill(os.getpid(), signal.SIGKILL) if phase == "shards_written" else None
    mgr.save(4, model, opt, sched, extra={"step": 4, "consumed_samples": 24})
    raise AssertionError("unreachable: the other ranks must see rank 1 die, rank 1 is killed")


def test_exact_resume_resharding_and_killed_rank_on_1_2_3_ranks(tmp_path):
    """One spawn per world size (spawning dominates the cost): world 1 in-process, world 2, world 3."""
    root, src, kill_root = str(tmp_path), str(tmp_path / "dp2_source"), tmp_path / "killed"
    _exact_resume(0, 1, root)
    outs = run_ranks(_multi_rank_cases, 2, args=(root, src, None, None), timeout=150)
    assert torch.equal(outs[0], outs[1])
    assert not verify_checkpoint(Path(src) / "step_4")
    _load_and_compare(0, 1, src, outs[0])  # dp2 -> world 1 (no process group at all)
    _dtensor_case(0, 1, f"{src}_dtensor", save=False)

    # world 3: exact resume, dp2 -> dp3 resharded load, then rank 1 dies in the middle of a save
    with pytest.raises(AssertionError) as info:
        run_ranks(_multi_rank_cases, 3, args=(root, src, outs[0], str(kill_root)), timeout=150)
    assert all((tmp_path / f"cases_ok_w3_rank{r}").exists() for r in range(3)), str(info.value)
    assert "CheckpointError" in str(info.value) and "unreachable" not in str(info.value), str(info.value)
    assert (kill_root / "step_4.tmp").is_dir() and not (kill_root / "step_4").exists()
    assert [p.name for _, p in complete_checkpoints(kill_root)] == ["step_2"]
    assert read_latest(kill_root) == "step_2"
    # the surviving checkpoint loads (resharded 3 -> 1); the dead save's shards are ignored
    seed_rank(0)
    model, opt, sched = build(seed=3)
    extra = manager(CkptCfg(dir=str(kill_root)), root, 0, 1).resume(model, opt, sched)
    assert extra == {"step": 2, "consumed_samples": 12}
    # the next successful save removes the stale .tmp of the dead save
    manager(CkptCfg(dir=str(kill_root)), root, 0, 1).save(5, model, opt, sched)
    assert not (kill_root / "step_4.tmp").exists() and read_latest(kill_root) == "step_5"
    with pytest.raises(ValueError, match="no step_N checkpoint there"):
        manager(CkptCfg(resume=str(tmp_path)), root, 0, 1).resume(model, opt, sched)

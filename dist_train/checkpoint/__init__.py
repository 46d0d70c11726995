"""Sharded, async, atomic, reshardable checkpoints on ``torch.distributed.checkpoint``.

    from dist_train.checkpoint import CheckpointManager
    mgr = CheckpointManager(cfg.checkpoint, run_dir=Path(cfg.run.dir), config=cfg.to_dict(), layout=layout,
                            rank=rank, world_size=world)
    extra = mgr.resume(model, optimizer, scheduler)
    mgr.maybe_save(step, model, optimizer, scheduler, extra={"step": step, "consumed_samples": n})
    mgr.close()

See docs/checkpointing.md for the on-disk format, the commit protocol and resharding.
"""
from dist_train.checkpoint.manager import CheckpointManager
from dist_train.checkpoint.manifest import complete_checkpoints, read_manifest, verify_checkpoint
from dist_train.checkpoint.state import StateAdapter, TorchStateAdapter
from dist_train.checkpoint.storage import CheckpointError

__all__ = ["CheckpointManager", "CheckpointError", "StateAdapter", "TorchStateAdapter", "complete_checkpoints",
           "read_manifest", "verify_checkpoint"]

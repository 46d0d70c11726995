"""Multi-rank test harness: ``run_ranks(fn, world_size, args=(), timeout=180)`` spawns gloo ranks with a
file rendezvous in a temp dir, one torch thread each, and runs ``fn(rank, world_size, *args)`` on every
rank (asserts on every rank; any failure or hang fails the test with that rank's traceback).
The implementation is shared with the benchmarks: see dist_train/spawn.py."""
from dist_train.spawn import RankFailure, run_ranks

__all__ = ["RankFailure", "run_ranks"]

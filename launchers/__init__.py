"""Cluster launching: turn a way of starting processes (Ray, MPI/Slurm/PBS, local subprocesses) into the
per-rank environment, then run ``dist-train run`` on every rank; restart on failure, forward preemption.

Modules: ``env`` (launcher detection → RANK/WORLD_SIZE/MASTER_*), ``procs`` (one rank process: output,
signals, kill), ``supervisor`` (restarts, watchdog, preemption), ``local``/``mpi``/``ray_backend``
(backends), ``rankio`` (per-rank I/O wrapper under mpiexec/srun), ``batch`` (Slurm/PBS scripts),
``arguments`` (the flags of ``dist-train launch`` and ``dist-train submit``, torch-free) and ``cli`` (what
runs them). Importing this package imports neither torch nor ray.
"""

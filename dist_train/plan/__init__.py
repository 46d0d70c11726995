"""Measure and predict: ``dist-train scale`` (scaling sweeps) and ``dist-train plan`` (the analytic layout planner).

Modules, one job each: ``profiles`` (device/link data + calibration), ``enumerate`` (valid layouts,
ranking), ``sweep`` (sweep files, running points, resumption), ``report`` (efficiency,
CSV/JSON/markdown/PNG), ``cli`` (the two commands). The analytic memory and time model the planner ranks
with is ``dist_train.cost``; the per-rank measurements the trainer records for sweeps are
``dist_train.rankstats``. See docs/scaling.md and docs/planner.md.
"""

"""Measure and predict: ``dist-train scale`` (scaling sweeps) and ``dist-train plan`` (the analytic layout planner).

Modules, one job each: ``profiles`` (device/link data + calibration), ``model`` (analytic memory and
time), ``enumerate`` (valid layouts, ranking), ``sweep`` (sweep files, running points, resumption),
``report`` (efficiency, CSV/JSON/markdown/PNG), ``rankstats`` (per-rank measurements the trainer
records for sweeps), ``cli`` (the two commands). See docs/scaling.md and docs/planner.md.
"""

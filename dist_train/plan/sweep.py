"""Sweep files: parsing, expansion into points, running each point through the launchers, resumption and
failure recording.

A sweep file (YAML)::

    name: gpt_cp_strong            # output directory name (default: the file's stem)
    base: ../gpt_tiny.yaml         # the config every point starts from (relative to this file)
    mode: strong                   # strong | weak | sequence-weak | grid
    world_sizes: [1, 2]            # strong/weak/sequence-weak: the device counts
    scale: cp                      # the layout axis that absorbs the devices: dp | cp | tp | pp | wp
    axes:                          # optional: dotted config keys → values; each combination is a series
      parallel.cp_layout: [contiguous, zigzag]   # (grid: the cartesian product is the set of points)
    set: [train.global_batch=4]    # overrides for every point
    warmup_steps: 2                # steps excluded from the statistics
    measure_steps: 6
    timeout_s: 300                 # per point
    launcher: local                # local | ray | mpi | torchrun
    threads_per_rank: 1            # OMP/torch threads per rank (a CPU "device" = this many cores)

Modes: strong keeps the problem fixed; weak multiplies train.global_batch by N/N₁; sequence-weak
multiplies data.seq_len by N/N₁ (the scale axis, normally cp, grows with N); grid runs the product of
``axes`` as given.

    spec = load_sweep("configs/sweeps/gpt_cp_strong.yaml")
    points = expand(spec)                          # [Point]
    run_sweep(spec, out_dir, progress=True)        # results.json rows; finished points are skipped
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import yaml
from tqdm import tqdm

from ..atomic_write import write_text_atomic
from ..config import (Config, ConfigError, check_unprofiled, load_config, load_yaml_unique, own_checkpoint_overrides,
                      unread_reset_overrides)

MODES = ("strong", "weak", "sequence-weak", "grid")
SCALE_AXES = ("dp", "cp", "tp", "pp", "wp")
LAUNCHERS = ("local", "ray", "mpi", "torchrun")
_KEYS = {"name", "base", "mode", "world_sizes", "scale", "axes", "set", "warmup_steps", "measure_steps",
         "timeout_s", "launcher", "threads_per_rank", "description", "device"}


@dataclass
class SweepSpec:
    name: str
    path: Path
    base: Path
    mode: str
    world_sizes: list[int]
    scale: str
    axes: dict[str, list]
    overrides: list[str]
    warmup_steps: int = 2
    measure_steps: int = 6
    timeout_s: float = 300.0
    launcher: str = "local"
    threads_per_rank: int = 1
    device: str = "cpu"
    description: str = ""


@dataclass
class Point:
    id: str
    world_size: int
    series: dict[str, Any]          # the extra-axes values (one series per combination)
    overrides: list[str]            # every --set of this point (base set + scaling + axes)
    params: dict[str, Any] = field(default_factory=dict)   # the varied values, for tables


def _err(path: Path, msg: str) -> ValueError:
    return ValueError(f"sweep file '{path}': {msg}")


def _pos_int(path: Path, key: str, v: Any, minimum: int = 1) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise _err(path, f"{key} = {v!r}: expected an integer >= {minimum}")
    return v


def parse_sweep(data: Any, path: Path) -> SweepSpec:
    """Validate a parsed sweep mapping; every problem is one ValueError line naming the key and value."""
    if not isinstance(data, dict):
        raise _err(path, f"expected a mapping of sweep keys, got {type(data).__name__}")
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise _err(path, f"unknown key '{unknown[0]}'; valid keys: {', '.join(sorted(_KEYS))}")
    if "base" not in data or not isinstance(data["base"], str):
        raise _err(path, f"base = {data.get('base')!r}: give the base config file (a path relative to the sweep)")
    base = (path.parent / data["base"]).resolve()
    if not base.is_file():
        raise _err(path, f"base = {data['base']!r}: no such file ({base})")
    mode = data.get("mode", "strong")
    if mode not in MODES:
        raise _err(path, f"mode = {mode!r}: valid modes are {', '.join(MODES)}")
    scale = data.get("scale", "dp")
    if scale not in SCALE_AXES:
        raise _err(path, f"scale = {scale!r}: valid axes are {', '.join(SCALE_AXES)}")
    ws = data.get("world_sizes", [] if mode == "grid" else None)
    if mode != "grid":
        if not isinstance(ws, list) or not ws:
            raise _err(path, f"world_sizes = {ws!r}: mode {mode} needs a non-empty list of device counts, e.g. [1, 2]")
        ws = [_pos_int(path, "world_sizes[]", w) for w in ws]
        if len(set(ws)) != len(ws):
            raise _err(path, f"world_sizes = {ws}: each device count once")
        ws = sorted(ws)
    elif ws:
        raise _err(path, f"world_sizes = {ws!r}: mode grid takes its points from axes (e.g. parallel.dp) only")
    axes = data.get("axes") or {}
    if not isinstance(axes, dict):
        raise _err(path, f"axes = {axes!r}: expected a mapping of dotted config keys to lists of values")
    for k, v in axes.items():
        if not isinstance(k, str) or "." not in k:
            raise _err(path, f"axes key {k!r}: expected a dotted config key such as parallel.cp_layout")
        if not isinstance(v, list) or not v:
            raise _err(path, f"axes.{k} = {v!r}: expected a non-empty list of values")
    if mode == "grid" and not axes:
        raise _err(path, "mode grid needs axes (dotted config keys with lists of values)")
    sets = data.get("set") or []
    if not isinstance(sets, list) or not all(isinstance(s, str) and "=" in s for s in sets):
        raise _err(path, f"set = {sets!r}: expected a list of 'dotted.key=value' strings")
    launcher = data.get("launcher", "local")
    if launcher not in LAUNCHERS:
        raise _err(path, f"launcher = {launcher!r}: valid launchers are {', '.join(LAUNCHERS)}")
    timeout = data.get("timeout_s", 300)
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
        raise _err(path, f"timeout_s = {timeout!r}: expected a positive number of seconds")
    name = data.get("name", path.stem)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise _err(path, f"name = {name!r}: use letters, digits, '_', '-', '.'")
    return SweepSpec(name=name, path=path, base=base, mode=mode, world_sizes=ws or [], scale=scale, axes=axes,
                     overrides=list(sets), warmup_steps=_pos_int(path, "warmup_steps", data.get("warmup_steps", 2), 0),
                     measure_steps=_pos_int(path, "measure_steps", data.get("measure_steps", 6)),
                     timeout_s=float(timeout), launcher=launcher,
                     threads_per_rank=_pos_int(path, "threads_per_rank", data.get("threads_per_rank", 1)),
                     device=str(data.get("device", "cpu")), description=str(data.get("description", "")))


def load_sweep(path) -> SweepSpec:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"sweep file '{path}' not found")
    try:
        data = load_yaml_unique(path.read_text(), f"sweep file '{path}'")
    except yaml.YAMLError as e:
        raise _err(path, f"not valid YAML ({' '.join(str(e).split())})") from None
    spec = parse_sweep(data, path)
    expand(spec)  # every point must be a valid config: fail before running anything
    return spec


def _fmt(v: Any) -> str:
    return json.dumps(v, separators=(",", ":")) if isinstance(v, (list, dict)) else str(v).lower() \
        if isinstance(v, bool) else "null" if v is None else str(v)


def _point_id(world: int, series: dict) -> str:
    parts = [f"n{world}"] + [f"{k.split('.')[-1]}={_fmt(v)}" for k, v in series.items()]
    slug = re.sub(r"[^A-Za-z0-9_.=-]+", "_", "-".join(parts))[:80]
    digest = hashlib.sha1(json.dumps([world, series], sort_keys=True, default=str).encode()).hexdigest()[:6]
    return f"{slug}-{digest}"


def point_config(spec: SweepSpec, point: Point) -> Config:
    return load_config(spec.base, point.overrides)


def expand(spec: SweepSpec) -> list[Point]:
    """The points of a sweep, each validated as a config (ValueError names the point and the problem)."""
    base = load_config(spec.base, spec.overrides, derives_layouts=True)  # each point is checked as it is
    keys = list(spec.axes)
    combos = [dict(zip(keys, vals)) for vals in itertools.product(*(spec.axes[k] for k in keys))] or [{}]
    points: list[Point] = []
    for series in combos:
        axis_sets = [f"{k}={_fmt(v)}" for k, v in series.items()]
        if spec.mode == "grid":
            sets = list(spec.overrides) + unread_reset_overrides(axis_sets) + axis_sets
            cfg = _checked(spec, sets, series)
            points.append(Point(_point_id(cfg.world_size, series), cfg.world_size, series, sets, dict(series)))
            continue
        n1 = spec.world_sizes[0]
        for n in spec.world_sizes:
            point_sets = axis_sets + _scaling_sets(spec, base, n, n1)
            # a point without a pipeline / FSDP2 takes those keys' defaults, not the base's (unread there)
            sets = list(spec.overrides) + unread_reset_overrides(point_sets) + point_sets
            cfg = _checked(spec, sets, {**series, "world_size": n})
            if cfg.world_size != n:
                raise _err(spec.path, f"point world_size={n} {series}: the layout spans {cfg.world_size} devices "
                                      f"(dp*tp*pp*cp*wp); scale = {spec.scale} must absorb the devices")
            params = {"world_size": n, **series}
            if spec.mode == "weak":
                params["train.global_batch"] = cfg.train.global_batch
            if spec.mode == "sequence-weak":
                params["data.seq_len"] = cfg.data.seq_len
            points.append(Point(_point_id(n, series), n, series, sets, params))
    ids = [p.id for p in points]
    if len(set(ids)) != len(ids):
        raise _err(spec.path, "two points have the same parameters (repeated axis values?)")
    return points


def _scaling_sets(spec: SweepSpec, base: Config, n: int, n1: int) -> list[str]:
    p = base.parallel
    others = base.world_size // (_axis_size(base, spec.scale))
    if n % others:
        raise _err(spec.path, f"world_sizes contains {n}, not a multiple of the fixed axes' product {others} "
                              f"(the layout without {spec.scale})")
    k = n // others
    sets = [f"parallel.wp=[1,{k}]" if spec.scale == "wp" else f"parallel.{spec.scale}={k}"]
    if spec.scale == "cp" and p.cp_method == "ulysses":
        sets.append(f"parallel.ulysses_degree={k}")
    if n % n1:
        raise _err(spec.path, f"world_sizes: {n} is not a multiple of the first size {n1}")
    if spec.mode == "weak":
        sets.append(f"train.global_batch={base.train.global_batch * n // n1}")
    if spec.mode == "sequence-weak":
        sets.append(f"data.seq_len={base.data.seq_len * n // n1}")
    return sets


def _axis_size(cfg: Config, axis: str) -> int:
    if axis == "wp":
        gh, gw = cfg.wp_grid
        return gh * gw
    return getattr(cfg.parallel, axis)


def _checked(spec: SweepSpec, sets: list[str], where: dict) -> Config:
    """The point's config (``sets`` over the base); ValueError naming the point on one it cannot measure."""
    try:
        cfg = load_config(spec.base, sets)
        # a traced step's time carries the profiler's overhead into the point's medians (and its efficiency): a
        # sweep measures, a launch traces
        check_unprofiled(cfg, "dist-train scale", "times every measured step (a traced step's time includes the "
                         "profiler's overhead)")
        return cfg
    except ConfigError as e:
        raise _err(spec.path, f"point {where}: {e}") from None


# ---------------------------------------------------------------------------------------------
# Running points
# ---------------------------------------------------------------------------------------------
def launch_command(spec: SweepSpec, point: Point, run_dir: Path) -> list[str]:
    """argv that trains one point (the launchers CLI as a subprocess; torchrun as the fallback)."""
    steps = spec.warmup_steps + spec.measure_steps
    sets = point.overrides + [f"run.dir={run_dir}", f"run.name={point.id}", f"train.steps={steps}",
                              "train.log_every=1", "train.progress=false", "checkpoint.at_end=false",
                              "checkpoint.every=0", f"launch.nproc={point.world_size}",
                              *own_checkpoint_overrides(run_dir)]
    flags = [a for s in sets for a in ("--set", s)]
    py = sys.executable
    if spec.launcher == "torchrun":
        if point.world_size == 1:
            return [py, "-m", "dist_train", "run", str(spec.base)] + flags
        return [py, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={point.world_size}",
                "-m", "dist_train", "run", str(spec.base)] + flags
    return [py, "-m", "dist_train", "launch", str(spec.base), "--backend", spec.launcher,
            "--nproc", str(point.world_size)] + flags


def classify_failure(returncode: Optional[int], output: str, timed_out: bool) -> str:
    """A one-line reason: timeout, oom, invalid config, or the last error line of the crash."""
    if timed_out:
        return "timeout"
    text = output.lower()
    if "out of memory" in text or "memoryerror" in text or "cannot allocate memory" in text or returncode in (
            -signal.SIGKILL, 137):
        return "oom"
    lines = [ln.strip() for ln in output.strip().splitlines() if ln.strip()]
    errs = [ln for ln in lines if re.search(r"(error|exception)\b", ln, re.I)]
    last = (errs or lines or [f"exit status {returncode}"])[-1]
    if returncode == 2:
        return f"invalid: {last[:200]}"
    return f"crash (exit {returncode}): {last[:200]}"


def run_point(spec: SweepSpec, point: Point, point_dir: Path,
              runner: Optional[Callable[[list[str], dict, float, Path], tuple[Optional[int], str, bool]]] = None) -> dict:
    """Train one point; returns its measured record (status ok | failed with a reason)."""
    run_dir = point_dir / "run"
    argv = launch_command(spec, point, run_dir)
    env = dict(os.environ, OMP_NUM_THREADS=str(spec.threads_per_rank), DIST_TRAIN_RANK_STATS="1",
               PYTHONUNBUFFERED="1")
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    point_dir.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    t0 = time.time()
    rc, output, timed_out = (runner or _subprocess_runner)(argv, env, spec.timeout_s, point_dir / "output.log")
    rec: dict[str, Any] = {"id": point.id, "world_size": point.world_size, "varied": point.params,
                           "series": point.series, "command": " ".join(argv), "wall_s": time.time() - t0,
                           "load_avg_1m_before": load, "load_avg_1m_after": os.getloadavg()[0]}
    if rc == 0 and not timed_out:
        try:
            rec.update(collect_measurements(run_dir, spec.warmup_steps))
            rec["status"] = "ok"
        except ValueError as e:
            rec.update(status="failed", reason=f"no measurements: {e}")
    else:
        rec.update(status="failed", reason=classify_failure(rc, output, timed_out), returncode=rc,
                   output_tail=output[-2000:])
    return rec


def _subprocess_runner(argv: list[str], env: dict, timeout: float, log: Path) -> tuple[Optional[int], str, bool]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        timed_out = False
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGTERM)  # the session we started: the launcher and its ranks
            try:
                rc = proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                rc = proc.wait()
    return rc, log.read_text(errors="replace"), timed_out


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def collect_measurements(run_dir: Path, warmup: int) -> dict:
    """Statistics of a finished run from rank_stats/rank_*.json (every rank) and summary.json (rank 0)."""
    files = sorted((run_dir / "rank_stats").glob("rank_*.json"), key=lambda p: int(p.stem.split("_")[1]))
    if not files:
        raise ValueError(f"{run_dir}/rank_stats has no rank_*.json (was the trainer run with DIST_TRAIN_RANK_STATS=1?)")
    ranks = [json.loads(p.read_text()) for p in files]
    per_rank_step, per_rank_busy, comm_frac = [], [], []
    for r in ranks:
        st, cw = r["step_times_s"][warmup:], r["comm_wait_s"][warmup:]
        if not st:
            raise ValueError(f"rank {r['rank']} recorded {len(r['step_times_s'])} steps, none after {warmup} warm-up")
        per_rank_step.append(_median(st))
        per_rank_busy.append(_median([s - c for s, c in zip(st, cw)]))
        comm_frac.append(sum(cw) / sum(st))
    steps0 = ranks[0]["step_times_s"][warmup:]
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    q = statistics.quantiles(steps0, n=4) if len(steps0) >= 2 else [steps0[0]] * 3
    return {
        "step_time_s": _median(steps0), "step_time_min_s": min(steps0), "step_time_max_s": max(steps0),
        "step_time_iqr_s": q[2] - q[0], "measured_steps": len(steps0),
        "per_rank_step_time_s": per_rank_step, "per_rank_busy_s": per_rank_busy,
        "per_rank_peak_mem_bytes": [int(r["peak_mem_bytes"]) for r in ranks],
        "peak_mem_bytes": max(int(r["peak_mem_bytes"]) for r in ranks),
        "exposed_comm_fraction": sum(comm_frac) / len(comm_frac),
        "straggler_spread": max(per_rank_busy) / max(1e-12, min(per_rank_busy)),
        "device_peak_tflops": summary.get("device_peak_tflops"), "final_loss": summary.get("final_loss"),
    }


def point_dir(out: Path, point: Point) -> Path:
    return out / "points" / point.id


def load_result(out: Path, point: Point) -> Optional[dict]:
    f = point_dir(out, point) / "result.json"
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except ValueError:
        return None


def save_result(out: Path, point: Point, rec: dict) -> None:
    d = point_dir(out, point)
    d.mkdir(parents=True, exist_ok=True)
    write_text_atomic(d / "result.json", json.dumps(rec, indent=2, default=str))  # a killed sweep leaves no half result


def run_sweep(spec: SweepSpec, out: Path, *, retry_failed: bool = False, progress: bool = True,
              annotate: Optional[Callable[[Point, dict], dict]] = None, runner=None,
              log: Callable[[str], None] = print) -> list[dict]:
    """Run every point not finished yet (failed ones too with ``retry_failed``); returns all records.

    ``annotate(point, record)`` adds fields (the planner's prediction, derived metrics) before saving.
    """
    points = expand(spec)
    out.mkdir(parents=True, exist_ok=True)
    todo = []
    for p in points:
        prev = load_result(out, p)
        if prev is None or (retry_failed and prev.get("status") != "ok"):
            todo.append(p)
    skipped = len(points) - len(todo)
    if skipped:
        log(f"{skipped} of {len(points)} points already finished in {out} (skipped; delete points/<id> to rerun)")
    bar = None
    if progress and todo:
        bar = tqdm(total=len(todo), desc=f"scale {spec.name}", unit="point", file=sys.stderr, dynamic_ncols=True)
    try:
        for p in todo:
            if bar is not None:
                bar.set_postfix_str(p.id[:40])
            rec = run_point(spec, p, point_dir(out, p), runner=runner)
            if annotate is not None:
                rec = annotate(p, rec)
            save_result(out, p, rec)
            if rec["status"] != "ok":
                log(f"point {p.id} failed: {rec['reason']}")
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return [load_result(out, p) for p in points]

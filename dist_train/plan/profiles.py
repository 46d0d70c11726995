"""Device and link profiles: the data file (``dist_train/profiles/devices.yaml``) and the calibration of
the current machine.

    prof = get_profile("h100")                  # a built-in profile
    prof = get_profile("cpu")                   # the calibrated profile when one exists, else the nominal one
    prof.matmul_tflops_at(k=4096, n=4096)       # sustained TFLOP/s for a matmul [M, K] @ [K, N]
    calibrate(path)                             # measure this machine once (matmul, attention, memory
                                                # bandwidth, op overhead, 2-process gloo all-reduce, RSS baseline)
"""
from __future__ import annotations

import bisect
import functools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional, Union

import yaml

from ..loopback import loopback_environment

DATA_FILE = Path(__file__).resolve().parent.parent / "profiles" / "devices.yaml"
Curve = Union[float, dict]


def cache_dir() -> Path:
    return Path(os.environ.get("DIST_TRAIN_CACHE", Path.home() / ".cache" / "dist-train"))


def default_calibration_path() -> Path:
    return cache_dir() / "profiles" / "cpu.yaml"


@dataclass(frozen=True)
class Link:
    bw_gbs: float  # GB/s per device per direction
    latency_us: float

    def seconds(self, nbytes: float, messages: int = 1) -> float:
        return nbytes / (self.bw_gbs * 1e9) + messages * self.latency_us * 1e-6


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    memory_gib: float
    baseline_gib: float
    peak_tflops: float
    matmul_tflops: Curve
    attention_tflops: Curve
    mem_bw_gbs: float
    op_overhead_us: float
    bytes_per_elem: int
    fused_kernels: bool
    flash_attention: bool
    devices_per_node: int
    overlap: float
    intra: Link
    inter: Link
    cores: Optional[int] = None  # CPU: ranks per node beyond this share cores
    # host dispatch per eager forward op (its backward included) on a device whose kernels launch asynchronously:
    # overlaps the device's work (cost.step_time.host_bound_seconds); 0 on CPU, whose ops cost op_overhead_us serially
    host_op_us: float = 0.0
    source: str = "data file"
    extra: dict = field(default_factory=dict)

    @property
    def is_cpu(self) -> bool:
        return self.cores is not None

    @property
    def memory_bytes(self) -> float:
        return self.memory_gib * 2 ** 30

    @property
    def baseline_bytes(self) -> float:
        return self.baseline_gib * 2 ** 30

    def matmul_tflops_at(self, k: int, n: int) -> float:
        """Sustained TFLOP/s of [M, K] @ [K, N], looked up by sqrt(K·N) (log-linear between table points)."""
        return _lookup(self.matmul_tflops, math.sqrt(max(1, k) * max(1, n)))

    def attention_tflops_at(self, keys: int) -> float:
        """Sustained attention TFLOP/s (FLOP-convention units) for a kernel over ``keys`` keys."""
        return _lookup(self.attention_tflops, keys)

    def link(self, group_span: int) -> Link:
        """The link a group of ``group_span`` consecutive ranks uses: intra-node when it fits on a node."""
        return self.intra if group_span <= self.devices_per_node else self.inter

    def compute_share(self, ranks_per_node: int) -> float:
        """Fraction of a device's throughput one rank gets (CPU oversubscription: ranks > cores)."""
        if self.cores is None or ranks_per_node <= self.cores:
            return 1.0
        return self.cores / ranks_per_node


def _lookup(curve: Curve, x: float) -> float:
    if not isinstance(curve, dict):
        return float(curve)
    pts = sorted((float(k), float(v)) for k, v in curve.items())
    xs = [p[0] for p in pts]
    if x <= xs[0]:
        return pts[0][1]
    if x >= xs[-1]:
        return pts[-1][1]
    i = bisect.bisect_right(xs, x)
    (x0, y0), (x1, y1) = pts[i - 1], pts[i]
    f = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
    return y0 + f * (y1 - y0)


#: the keys a profile mapping may hold: DeviceProfile's fields as profile_to_dict writes them (links nest intra/inter;
#: name: a profile file's own name, what --calibrate writes)
PROFILE_KEYS = frozenset({f.name for f in fields(DeviceProfile)} - {"source", "intra", "inter"} | {"links"})


#: ``host_op_us`` of a profile that does not set it (a custom profile or a calibration written before the field
#: existed): no host dispatch is costed, the device's work alone sets a rank's compute time (the model before it)
DEFAULT_HOST_OP_US = 0.0


def _per_op_us(name: str, d: dict, source: str, key: str, default: Optional[float] = None) -> float:
    """A per-op cost in microseconds: a finite number >= 0 (one line naming the value otherwise)."""
    value = d.get(key, default) if default is not None else d[key]
    try:
        us = float(value)
    except (TypeError, ValueError):
        us = float("nan")
    if not math.isfinite(us) or us < 0:
        raise ValueError(f"device profile '{name}' in {source}: {key} {value!r}: must be a number >= 0 (microseconds "
                         "per eager op)")
    return us


def _host_op_us(name: str, d: dict, source: str) -> float:
    """``host_op_us`` (default :data:`DEFAULT_HOST_OP_US`); refused on a cpu profile (``cores`` set), whose ops run on
    the host, serially: their cost is ``op_overhead_us``."""
    us = _per_op_us(name, d, source, "host_op_us", DEFAULT_HOST_OP_US)
    if us > 0 and d.get("cores") is not None:
        raise ValueError(f"device profile '{name}' in {source}: host_op_us {us:g} on a cpu profile (cores set): its ops "
                         "run on the host, serially, so their cost is op_overhead_us; host_op_us is the dispatch "
                         "cost of a device whose kernels launch asynchronously (a GPU)")
    return us


def profile_from_dict(name: str, d: dict, source: str) -> DeviceProfile:
    unknown = sorted(set(d) - PROFILE_KEYS) if isinstance(d, dict) else []
    if unknown:  # a misspelt optional key (cores, description, extra) would silently keep its default
        raise ValueError(f"device profile '{name}' in {source}: unknown key '{unknown[0]}'; valid keys: "
                         f"{', '.join(sorted(PROFILE_KEYS))}")
    try:
        links = d["links"]
        return DeviceProfile(
            name=name, description=str(d.get("description", name)), memory_gib=float(d["memory_gib"]),
            baseline_gib=float(d["baseline_gib"]), peak_tflops=float(d["peak_tflops"]),
            matmul_tflops=d["matmul_tflops"], attention_tflops=d["attention_tflops"],
            mem_bw_gbs=float(d["mem_bw_gbs"]), op_overhead_us=_per_op_us(name, d, source, "op_overhead_us"),
            bytes_per_elem=int(d["bytes_per_elem"]), fused_kernels=bool(d["fused_kernels"]),
            flash_attention=bool(d["flash_attention"]), devices_per_node=int(d["devices_per_node"]),
            overlap=float(d["overlap"]), intra=Link(**links["intra"]), inter=Link(**links["inter"]),
            cores=int(d["cores"]) if d.get("cores") is not None else None, host_op_us=_host_op_us(name, d, source),
            source=source,
            extra=dict(d.get("extra") or {}))
    except (KeyError, TypeError) as e:
        raise ValueError(f"device profile '{name}' in {source} is missing or has a bad field: {e}") from None


def profile_to_dict(p: DeviceProfile) -> dict:
    d = asdict(p)
    d["links"] = {"intra": d.pop("intra"), "inter": d.pop("inter")}
    for k in ("name", "source"):
        d.pop(k)
    return d


def builtin_profiles() -> dict[str, DeviceProfile]:
    data = yaml.safe_load(DATA_FILE.read_text())
    return {name: profile_from_dict(name, d, str(DATA_FILE)) for name, d in data["devices"].items()}


def profile_for_device_name(device_name: str) -> Optional[str]:
    """The built-in GPU profile for a CUDA device name (``torch.cuda.get_device_name()``): the longest profile name
    the device's name contains, ``-``/``_`` read as spaces ("NVIDIA H100 NVL" is h100-nvl, not h100, as in
    metrics.CUDA_PEAK_TFLOPS); None when none does."""
    def words(text: str) -> str:
        return text.lower().replace("-", " ").replace("_", " ")

    name = words(device_name)
    gpus = sorted((k for k, p in builtin_profiles().items() if not p.is_cpu), key=len, reverse=True)
    return next((k for k in gpus if words(k) in name), None)


def get_profile(name: str, calibration: Optional[Union[str, Path]] = None) -> DeviceProfile:
    """A built-in profile by name, or a profile file by path. ``cpu`` prefers the calibrated profile."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return load_profile_file(p)
    table = builtin_profiles()
    if name not in table:
        raise ValueError(f"--device {name!r}: valid devices are {', '.join(sorted(table))} or a profile .yaml path")
    if name == "cpu":
        cal = Path(calibration) if calibration else default_calibration_path()
        if cal.is_file():
            return load_profile_file(cal)
    return table[name]


def load_profile_file(path: Union[str, Path]) -> DeviceProfile:
    path = Path(path)
    try:
        d = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"profile file '{path}' cannot be read: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"profile file '{path}' must hold a mapping of profile fields")
    return profile_from_dict(str(d.get("name", path.stem)), d, str(path))


# ---------------------------------------------------------------------------------------------
# Calibration (one thread per rank: a CPU "device" is one core)
# ---------------------------------------------------------------------------------------------
def _median_time(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2]


# Calibration (below) measures with torch, imported in each function: this module is read by dist_train.cost and
# the planner, which stay torch-free (`dist-train plan` predicts without it).
def _interleaved_medians(fns: dict, repeats: int) -> dict:
    """Median seconds of each callable, timed round-robin so that load changes on a shared machine hit
    every size alike instead of biasing whichever was measured during a busy moment."""
    for fn in fns.values():
        fn()
    times: dict = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def measure_matmul_curve(sizes=(32, 64, 128, 256, 512, 1024), m: int = 2048, repeats: int = 9) -> dict:
    """{size: TFLOP/s} of fp32 [m, size] @ [size, size] with this process's thread count."""
    import torch

    fns = {}
    for s in sizes:
        a, b = torch.randn(m, s), torch.randn(s, s)
        fns[s] = functools.partial(torch.mm, a, b)
    med = _interleaved_medians(fns, repeats)
    return {s: 2.0 * m * s * s / med[s] / 1e12 for s in sizes}


def measure_attention_curve(lengths=(128, 256, 512, 1024, 2048), heads: int = 4, head_dim: int = 32,
                            repeats: int = 7) -> dict:
    """{seq_len: TFLOP/s} of causal SDPA forward+backward in FLOP-convention units (12·d·S_eff per token)."""
    import torch
    import torch.nn.functional as F

    def step(q, k, v):
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

    fns = {s: functools.partial(step, *(torch.randn(1, heads, s, head_dim, requires_grad=True) for _ in range(3)))
           for s in lengths}
    med = _interleaved_medians(fns, repeats)
    return {s: 12.0 * heads * head_dim * (s + 1) / 2 * s / med[s] / 1e12 for s in lengths}


def measure_mem_bw(numel: int = 8 * 2 ** 20, repeats: int = 5) -> float:
    """GB/s of an out-of-place add (read 2, write 1) on fp32 tensors larger than the caches."""
    import torch

    a, b, c = torch.randn(numel), torch.randn(numel), torch.empty(numel)
    t = _median_time(lambda: torch.add(a, b, out=c), repeats)
    return 3 * 4 * numel / t / 1e9


def measure_op_overhead(n_ops: int = 200, repeats: int = 5) -> float:
    """Microseconds per tiny eager op including its autograd backward."""
    import torch

    x = torch.ones(8, requires_grad=True)

    def chain():
        y = x
        for _ in range(n_ops):
            y = y * 1.0001
        y.sum().backward()

    return _median_time(chain, repeats) / n_ops * 1e6


_ALLREDUCE_WORKER = r"""
import json, os, sys, time
import torch, torch.distributed as dist
torch.set_num_threads(1)
rank, world, init = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
res = {}
for nbytes in (4096, 1 << 20, 8 << 20, 32 << 20):
    t = torch.ones(nbytes // 4)
    dist.all_reduce(t)
    ts = []
    for _ in range(5):
        dist.barrier(); t0 = time.perf_counter(); dist.all_reduce(t); ts.append(time.perf_counter() - t0)
    ts.sort(); res[nbytes] = ts[len(ts) // 2]
if rank == 0:
    print(json.dumps(res))
dist.destroy_process_group()
"""

_BASELINE_WORKER = r"""
import json, resource, sys
import torch
torch.set_num_threads(1)
import torch.distributed, torch.nn.functional as F
import dist_train.trainer, dist_train.models.gpt, parallelism.context
from dist_train.config import ModelConfig
from dist_train.models.gpt import GPT
m = GPT(ModelConfig(d_model=16, n_layers=1, n_heads=2, vocab_size=16))
tok = torch.zeros(1, 8, dtype=torch.long)
loss, _ = m({"tokens": tok, "labels": tok, "positions": torch.arange(8)})
loss.backward()
torch.optim.AdamW(m.parameters(), foreach=False).step()
print(json.dumps({"rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def measure_allreduce(world: int = 2, timeout: float = 120.0) -> dict:
    """{bytes: seconds} of a gloo all-reduce between ``world`` local processes (median of 5)."""
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{Path(tmp) / 'rdzv'}"
        env = dict(os.environ, OMP_NUM_THREADS="1", **loopback_environment())
        procs = [subprocess.Popen([sys.executable, "-c", _ALLREDUCE_WORKER, str(r), str(world), init],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for r in range(world)]
        outs = [p.communicate(timeout=timeout) for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"all-reduce calibration failed: {outs[0][1].strip().splitlines()[-1:]}")
    return {int(k): v for k, v in json.loads(outs[0][0].strip().splitlines()[-1]).items()}


def fit_link(samples: dict, world: int) -> Link:
    """Fit time = 2(P-1)·latency + 2(P-1)/P·bytes/bw (ring all-reduce) to the smallest and largest sizes."""
    sizes = sorted(samples)
    factor = 2 * (world - 1) / world
    small, large = sizes[0], sizes[-1]
    bw = factor * (large - small) / max(1e-9, samples[large] - samples[small])
    lat = max(1e-7, (samples[small] - factor * small / bw) / (2 * (world - 1)))
    return Link(bw_gbs=bw / 1e9, latency_us=lat * 1e6)


def measure_baseline_rss() -> int:
    """Peak RSS of a process that imports the framework and trains a 1-layer toy model for one step."""
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", _BASELINE_WORKER], capture_output=True, text=True, env=env,
                       timeout=180)
    if r.returncode:
        raise RuntimeError(f"baseline RSS calibration failed: {r.stderr.strip().splitlines()[-1:]}")
    return int(json.loads(r.stdout.strip().splitlines()[-1])["rss"])


def calibrate(path: Optional[Union[str, Path]] = None, log=print) -> tuple[Path, DeviceProfile]:
    """Measure this machine (one thread = one device) and store the profile as YAML; returns (path, profile)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        log("calibrating: matmul ...")
        mm = measure_matmul_curve()
        log("calibrating: attention kernel ...")
        att = measure_attention_curve()
        log("calibrating: memory bandwidth, op overhead ...")
        bw = measure_mem_bw()
        ovh = measure_op_overhead()
    finally:
        torch.set_num_threads(threads)
    log("calibrating: gloo all-reduce between 2 processes ...")
    link = fit_link(measure_allreduce(2), 2)
    log("calibrating: framework baseline RSS ...")
    rss = measure_baseline_rss()
    nominal = builtin_profiles()["cpu"]
    cores = os.cpu_count() or 1
    prof = DeviceProfile(
        name="cpu", description=f"calibrated {os.uname().machine} core, fp32, gloo loopback "
                                f"({time.strftime('%Y-%m-%d %H:%M')}, load {os.getloadavg()[0]:.1f})",
        memory_gib=_total_memory_gib() or nominal.memory_gib, baseline_gib=rss / 2 ** 30,
        peak_tflops=max(mm.values()), matmul_tflops={int(k): round(v, 5) for k, v in mm.items()},
        attention_tflops={int(k): round(v, 5) for k, v in att.items()}, mem_bw_gbs=round(bw, 3),
        op_overhead_us=round(ovh, 3), bytes_per_elem=4, fused_kernels=False, flash_attention=True,
        devices_per_node=cores, overlap=nominal.overlap, intra=link, inter=nominal.inter, cores=cores,
        source="calibration", extra={"load_avg_1m": os.getloadavg()[0]})
    out = Path(path) if path else default_calibration_path()
    out.parent.mkdir(parents=True, exist_ok=True)
    d = profile_to_dict(prof)
    d["name"] = "cpu"
    out.write_text(yaml.safe_dump(d, sort_keys=False))
    return out, load_profile_file(out)


def _total_memory_gib() -> Optional[float]:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    except (ValueError, OSError, AttributeError):
        return None


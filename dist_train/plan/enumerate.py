"""Every valid layout of a config on N devices, and their ranking by predicted throughput within memory.

    cands = enumerate_layouts(cfg, 8)                # Configs, each validated like a user config
    ranked = rank_layouts(cands, profile)            # [(Prediction, Config)], fitting and fastest first
    why_slower(pred, best)                           # "41% slower: cp_comm_exposed +12 ms"

A layout is dp × tp × pp × cp (GPT) or dp × tp × pp × cp × wp[gh, gw] (Swin; pp stages of block pairs; its cp is
the Ulysses inside windows it runs) = N, plus the cp method (GPT: ring with each sequence layout, Ulysses, or hybrid
with each Ulysses degree), the ZeRO stage and activation
checkpointing, and the data-parallel engine (DDP, ZeRO 1–3 via DeepSpeed, or FSDP2 — the only sharding that
composes with pp). Validity is the config's own validation plus what the kernels need: the sequence length
divisible by the layout's multiple, at least one window per tile.
"""
from __future__ import annotations

import copy
import itertools
from typing import Iterable, Optional

from ..config import FSDP_ONLY_DEFAULTS, PIPELINE_ONLY_DEFAULTS, Config, ConfigError, validate
from ..cost.predict import Prediction, predict
from ..cost.shape import cp_execution
from .profiles import DeviceProfile

CHECKPOINTING = ("none", "selective", "full")
ZERO_STAGES = (None, 1, 2, 3)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _cp_variants(cp: int, gpt: bool = True) -> list[tuple[str, str, int]]:
    """(method, layout, ulysses_degree) choices for a cp degree (a swin's cp is always Ulysses inside windows)."""
    if cp == 1:
        return [("ring", "zigzag", 1)]
    if not gpt:
        return [("ulysses", "zigzag", cp)]
    out = [("ring", lay, 1) for lay in ("zigzag", "striped", "contiguous")]
    out.append(("ulysses", "zigzag", cp))
    out += [("hybrid", "zigzag", u) for u in divisors(cp) if 1 < u < cp]
    return out


def _seq_multiple(layout: str, cp: int) -> int:
    return 2 * cp if layout == "zigzag" else cp


def _micro_batch(cfg: Config, dp: int) -> Optional[int]:
    """The configured micro-batch if the global batch splits over dp, else the largest one that does."""
    g = cfg.train.global_batch
    if g % dp:
        return None
    per = g // dp
    for mb in range(min(cfg.train.micro_batch, per), 0, -1):
        if per % mb == 0:
            return mb
    return None


def _grids(n: int) -> list[tuple[int, int]]:
    return [(gh, n // gh) for gh in divisors(n)]


def _swin_dp_grids(n: int) -> list[tuple[int, tuple[int, int]]]:
    """(dp, wp grid) with dp · gh · gw = n: a swin's remaining devices split between data parallelism and
    window tiles (AERIS-style dp × wp runs), every dp that divides n with every grid of what it leaves."""
    return [(dp, grid) for dp in divisors(n) for grid in _grids(n // dp)]


def enumerate_layouts(cfg: Config, devices: int, checkpointing: Iterable[str] = CHECKPOINTING,
                      zero_stages: Iterable[Optional[int]] = ZERO_STAGES, fsdp: bool = True) -> list[Config]:
    """All valid layouts of ``cfg``'s model and data on ``devices`` devices (each a full Config).
    ``fsdp``: also the FSDP2 variant of every layout with ranks to shard over (dp·cp·wp > 1)."""
    if devices < 1:
        raise ValueError(f"--devices {devices}: must be a positive integer")
    checkpointing, zero_stages = tuple(checkpointing), tuple(zero_stages)
    out: list[Config] = []
    gpt = cfg.model.kind == "gpt"
    if not gpt and "full" in checkpointing:  # a swin's selective recomputes whole blocks: the full layout again
        checkpointing = tuple(ck for ck in checkpointing if ck != "selective")
    for tp in divisors(devices):  # swin: heads and MLP split (n_heads % tp·cp checked by validate)
        for pp in divisors(devices // tp):  # swin too: stages of (plain, shifted) block pairs
            rest = devices // (tp * pp)
            for cp in divisors(rest):  # swin: n_heads % tp·cp and cp <= token rows of a tile, by validate
                for dp, grid in ([(rest // cp, (1, 1))] if gpt else _swin_dp_grids(rest // cp)):
                    mb = _micro_batch(cfg, dp)
                    if mb is None:
                        continue
                    for (method, lay, u), ck in itertools.product(_cp_variants(cp, gpt), checkpointing):
                        if gpt and cfg.data.seq_len % _seq_multiple(lay, cp // (u if method == "hybrid" else 1)):
                            continue
                        shards = dp * cp * grid[0] * grid[1]
                        engines = [(z, False) for z in (zero_stages if shards > 1 else (None,))]
                        engines += [(None, True)] if fsdp and shards > 1 else []
                        sps = (False, True) if tp > 1 and gpt else (False,)  # swin has no sequence parallelism
                        for (z, sharded), sp in itertools.product(engines, sps):
                            c = copy.deepcopy(cfg)
                            p = c.parallel
                            p.dp, p.tp, p.pp, p.cp, p.wp = dp, tp, pp, cp, list(grid)
                            p.cp_method, p.cp_layout, p.ulysses_degree, p.zero_stage = method, lay, u, z
                            p.fsdp = sharded
                            p.sequence_parallel = sp
                            # keys only a pipeline / FSDP2 reads: the base config's values where this layout has
                            # one, the defaults where it has none (validation refuses them set there, unread)
                            resets = {**(PIPELINE_ONLY_DEFAULTS if pp == 1 else {}),
                                      **(FSDP_ONLY_DEFAULTS if not sharded else {})}
                            for key, default in resets.items():
                                setattr(p, key.split(".")[1], default)
                            c.train.micro_batch, c.train.activation_checkpointing = mb, ck
                            try:
                                validate(c)  # swin: also more wp tiles than windows (_validate_swin_tiling)
                            except (ConfigError, ValueError):
                                continue
                            out.append(c)
    return out


def rank_layouts(cands: list[Config], prof: DeviceProfile) -> list[tuple[Prediction, Config]]:
    """Predictions sorted: layouts that fit first, by predicted tokens/s (ties: less memory)."""
    preds = [(predict(c, prof), c) for c in cands]
    preds.sort(key=lambda pc: (not pc[0].fits, -pc[0].tokens_per_s, pc[0].memory["total"]))
    return preds


def why_slower(pred: Prediction, best: Prediction, memory_limit: float) -> str:
    """One phrase: why ``pred`` ranks below ``best``."""
    gib = 2 ** 30
    if not pred.fits:
        top = max((k for k in pred.memory if k not in ("total", "baseline")), key=lambda k: pred.memory[k])
        return (f"out of memory: {pred.memory['total'] / gib:.1f} GiB > {memory_limit / gib:.1f} GiB "
                f"(largest: {top} {pred.memory[top] / gib:.1f} GiB)")
    slower = pred.step_time_s / best.step_time_s - 1
    diffs = {k: pred.time.get(k, 0.0) - best.time.get(k, 0.0) for k in pred.time if k != "step"}
    worst = max(diffs, key=diffs.get)
    if slower <= 1e-9:
        more = pred.memory["total"] - best.memory["total"]
        return f"as fast as the best; {more / gib:.2f} GiB more memory" if more > 0.005 * gib else \
            "ties with the best (same predicted time and memory)"
    return f"{100 * slower:.0f}% slower: {worst} +{diffs[worst] * 1e3:.3g} ms/step"


def layout_label(cfg: Config) -> str:
    """Compact name of a layout, e.g. 'dp2 cp4 ring/zigzag z1 ck=selective'."""
    p = cfg.parallel
    parts = [f"{a}{getattr(p, a)}" for a in ("dp", "tp", "pp", "cp") if getattr(p, a) > 1]
    if p.sequence_parallel and p.tp > 1:
        parts.append("sp")
    gh, gw = cfg.wp_grid
    if gh * gw > 1:
        parts.append(f"wp{gh}x{gw}")
    if p.cp > 1:  # the cp that runs (a swin's is Ulysses whatever parallel.cp_method says)
        cpx = cp_execution(cfg)
        parts.append({"ring": f"ring/{p.cp_layout}", "ulysses": "ulysses",
                      "hybrid": f"hybrid(u{cpx.ulysses})/{p.cp_layout}"}[cpx.method])
    if p.zero_stage is not None:
        parts.append(f"zero{p.zero_stage}")
    if p.fsdp:
        parts.append("fsdp" if p.fsdp_reshard_after_forward else "fsdp(keep)")
    if cfg.train.activation_checkpointing != "none":
        parts.append(f"ckpt={cfg.train.activation_checkpointing}")
    parts.append(f"mb{cfg.train.micro_batch}")
    return " ".join(parts) if parts else "single"

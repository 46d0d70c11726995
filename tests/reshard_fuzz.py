"""Randomized differential testing of checkpoint save -> resume across parallel layouts ("resharding").

A *draw* is one random case of the promise that a checkpoint saved under one layout resumes under another
without changing the model: a model (a GPT with 2–4 layers, MHA/GQA/MQA, tied or untied embeddings, an odd or
even vocabulary so tp pads it or not, sometimes an odd d_model, seq_len 24/32/48; or the tiny pixel-level Swin
of ``tests.trainer_utils.tiny_swin_config`` with 2 or 4 blocks), a global batch, a *save* layout and a *load*
layout over 1–4 ranks each (dp, tp, pp with 1F1B / GPipe / interleaved virtual stages and micro-batch counts,
cp with its sequence layouts and ring / Ulysses / hybrid methods, DeepSpeed ZeRO 0–3, FSDP2, sequence
parallel, Swin wp tile grids, train.micro_batch), k = 1–3 steps before the save, m = 1–2 after it, and
a synchronous or asynchronous save, at the end of the saving run or in its middle.

A GPT draw may also pack *documents* (``Draw.data``): a random non-empty set of ``data.document_mask`` /
``reset_positions`` / ``eod_mask_loss`` with an EOD id, over a small vocabulary (5–13 tokens) so the synthetic
progression ends a document every few tokens: every sample holds several boundaries, many across the cp shard
edges (contiguous, striped, zigzag, Ulysses, hybrid), each micro-batch sample its own (per-sample ``cu_seqlens``
rows), sometimes none or every token an EOD (a step that shares a factor with the vocabulary), sometimes under a
sliding ``model.attention_window``. Every run of the draw (the reference included) has the same documents, so
the attention mask, the restarted positions and the masked labels must survive the resume on another layout.

Only the combinations the config accepts run: every layout goes through ``config_from_dict`` (the product's
own validation) and a refused draw is counted by the refusal's first words (``--stats``), never run.

A valid draw runs three trainings, all through ``dist_train.trainer.train``:
  * reference: one rank, same dtype (fp32), k + m steps, checkpoints after step k and at the end;
  * save: the save layout trains k steps and saves (``train.exit_interval = k``: save and exit, as a time-sliced
    job), or trains on to k + m after saving at step k (``train_on``: an async save is written while the next
    steps change the weights, and all k + m losses are compared);
  * load: the load layout resumes that step_k checkpoint and trains to k + m, then saves at the end;
and compares each with the reference: the save run's k losses; its step_k checkpoint's tensor table (keys,
full shapes, dtypes), every weight and optimizer tensor (Adam moments and step), and the JSON train state
(step, consumed samples = the data position, the LR scheduler and optimizer hyper-parameters); the load run's
start step and its m losses (the data it reads next and the model it trains); its final checkpoint against
the reference's the same way. Losses must agree within ``LOSS_RTOL``, tensors within ``TENSOR_RTOL`` in
Frobenius norm (different layouts reduce in different orders: round-off, not bugs; a lost
shard, a stale optimizer state or a skipped batch is O(1)).

A draw whose resume is *refused* (a ``ValueError``/``ConfigError`` naming the reason
in one line) is reported as a refusal, not a pass, for a person to judge; any other exception, a hang, a
multi-line refusal or a mismatch is a failure.

    python -m tests.reshard_fuzz --draws 20 --seed 0          # the first 20 valid draws from seed 0 (exit 1 on a failure)
    python -m tests.reshard_fuzz --draws 20 --feature zero3   # only draws with ZeRO-3 on either side (see features())
    python -m tests.reshard_fuzz --draws 20 --feature fsdp-tp # only draws with FSDP2 × tp on either side
    python -m tests.reshard_fuzz --stats --draws 2000         # the draw space only: kinds and refusals, no runs
    python -m tests.reshard_fuzz --one 17 --keep /tmp/d17     # one draw, keeping its run directories

Runs are grouped: every reference in this process, then the save runs and the load runs, up to ``GROUP`` draws
per spawn of their world size (one multi-rank process group at a time).
"""
from __future__ import annotations

import argparse
import collections
import json
import random
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch

from dist_train.checkpoint import manifest as mf
from dist_train.checkpoint.hf import load_checkpoint_tensors
from dist_train.config import DOCUMENT_OPTIONS, Config, ConfigError
from dist_train.trainer import train
from tests.dist_harness import RankFailure, run_ranks
from tests.trainer_utils import tiny_gpt_config, tiny_swin_config

LOSS_RTOL = 1e-5
#: ||a - ref|| / ||ref|| per tensor (Frobenius). Not the largest element: Adam's first steps move each element by
#: about ±lr whatever its gradient's size, so an element whose gradient is round-off small in both runs may step the
#: other way (measured: max-element errors up to 2.5e-3 of the tensor's largest value at equal losses, Frobenius
#: ≤ 1.3e-4 over 30 draws); a lost shard, a zeroed padding row or a stale Adam moment is ≥ 1e-2. An element whose
#: first gradient is about Adam's eps (1e-8) takes a first step g / (|g| + eps) that round-off changes by a tenth:
#: seed 639 (packed documents; one element of layer 0's wv with gradient 2.4e-9 against 1.9e-9 on the other layout)
#: moved that tensor by 3.4e-4 at step 1 and the Adam moments downstream by 1.01e-3 at step 4, at equal losses
TENSOR_RTOL = 3e-3
#: train-state values compared exactly (the rest: floats within LOSS_RTOL)
EXACT_STATE_KEYS = ("step", "extra.step", "extra.consumed_samples", "scheduler.last_epoch")
FAST = {"peak_tflops": 1.0, "progress": False}  # MFU's denominator only: skip the CPU calibration
#: the packed-document options' short names (describe(), features())
DOC_NAMES = {"document_mask": "mask", "reset_positions": "positions", "eod_mask_loss": "eod-loss"}
#: the share of GPT draws that pack documents
DOCUMENTS_SHARE = 0.4


@dataclass(frozen=True)
class Layout:
    """One parallel layout; ``parallel()`` is the config's ``parallel`` section (only the keys it reads)."""

    dp: int = 1
    tp: int = 1
    pp: int = 1
    cp: int = 1
    wp: tuple = (1, 1)
    cp_layout: Optional[str] = None
    cp_method: Optional[str] = None
    ulysses_degree: Optional[int] = None
    zero_stage: Optional[int] = None
    fsdp: bool = False
    pp_schedule: Optional[str] = None
    microbatches: Optional[int] = None
    sequence_parallel: bool = False
    micro_batch: int = 1

    @property
    def world(self) -> int:
        return self.dp * self.tp * self.pp * self.cp * self.wp[0] * self.wp[1]

    def parallel(self) -> dict:
        out = {k: v for k, v in (("dp", self.dp), ("tp", self.tp), ("pp", self.pp), ("cp", self.cp)) if v > 1}
        if self.wp != (1, 1):
            out["wp"] = list(self.wp)
        for k in ("cp_layout", "cp_method", "ulysses_degree", "zero_stage", "pp_schedule", "microbatches"):
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)
        if self.fsdp:
            out["fsdp"] = True
        if self.sequence_parallel:
            out["sequence_parallel"] = True
        return out

    def name(self) -> str:
        """A short name: ``dp2.tp2.zero3``, ``pp2(interleaved,mb4)``, ``cp2(zigzag,hybrid/2)``, ``1``."""
        parts = []
        for k in ("dp", "tp", "pp", "cp"):
            n = getattr(self, k)
            if n > 1:
                extra = []
                if k == "pp":
                    extra = [x for x in (self.pp_schedule, self.microbatches and f"mb{self.microbatches}") if x]
                if k == "cp":
                    extra = [x for x in (self.cp_layout, self.cp_method and (
                        self.cp_method + (f"/{self.ulysses_degree}" if self.ulysses_degree else ""))) if x]
                if k == "tp" and self.sequence_parallel:
                    extra = ["sp"]
                parts.append(f"{k}{n}" + (f"({','.join(map(str, extra))})" if extra else ""))
        if self.wp != (1, 1):
            parts.append(f"wp{self.wp[0]}x{self.wp[1]}")
        if self.zero_stage is not None:
            parts.append(f"zero{self.zero_stage}")
        if self.fsdp:
            parts.append("fsdp")
        return ".".join(parts) or "1"


@dataclass(frozen=True)
class Draw:
    seed: int
    kind: str                       # gpt | swin
    model: dict = field(hash=False)  # the model section's overrides of the tiny config
    seq_len: Optional[int]          # gpt only
    global_batch: int
    save: Layout
    load: Layout
    k: int                          # steps before the save
    m: int                          # steps after the resume
    async_save: bool
    #: the saving run trains on to k + m after its step-k save (checkpoint.every = k) instead of exiting there
    #: (train.exit_interval = k): an async save is then written while the next steps change the weights
    train_on: bool = False
    #: the data section's overrides beyond seq_len, every run of the draw alike: packed documents (gpt only)
    data: dict = field(default_factory=dict, hash=False)

    def call(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in asdict(self).items())

    def describe(self) -> str:
        model = ",".join(f"{k}={v}" for k, v in self.model.items())
        docs = ",".join(DOC_NAMES[k] for k in DOCUMENT_OPTIONS if self.data.get(k))
        docs = f" docs({docs},eod={self.data['eod_id']})" if docs else ""
        return (f"seed={self.seed} {self.kind}({model}{',S=' + str(self.seq_len) if self.seq_len else ''}){docs} "
                f"gb={self.global_batch} {self.save.name()}[mb{self.save.micro_batch}] -> "
                f"{self.load.name()}[mb{self.load.micro_batch}] k={self.k} m={self.m}"
                f"{' async' if self.async_save else ''}{' train-on' if self.train_on else ''}")


# ---------------------------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------------------------
def _draw_layout(rng: random.Random, kind: str) -> Layout:
    """A layout over 1–4 ranks: each prime factor of the world size goes to a random axis, then the options of
    the axes that are > 1 (and ZeRO / FSDP2 at random)."""
    world = rng.choice((1, 2, 2, 3, 4, 4))
    axes = ["dp", "tp", "pp", "cp"] + (["wh", "ww"] if kind == "swin" else [])
    dims = dict.fromkeys(axes, 1)
    for prime in ((2, 2) if world == 4 else (world,) if world > 1 else ()):
        dims[rng.choice(axes)] *= prime
    get = lambda a: dims.get(a, 1)  # noqa: E731
    lay = Layout(dp=get("dp"), tp=get("tp"), pp=get("pp"), cp=get("cp"), wp=(get("wh"), get("ww")))
    opts: dict = {"micro_batch": rng.choice((1, 1, 2))}
    if lay.cp > 1 and rng.random() < 0.8:
        if kind == "gpt":
            opts["cp_layout"] = rng.choice(("contiguous", "striped", "zigzag"))
        opts["cp_method"] = rng.choice(("ring", "ulysses", "hybrid") if kind == "gpt" else ("ulysses",))
        if opts["cp_method"] == "hybrid":
            opts["ulysses_degree"] = rng.choice([u for u in range(2, lay.cp + 1) if lay.cp % u == 0] or [1])
    if lay.pp > 1:
        if rng.random() < 0.7:
            opts["pp_schedule"] = rng.choice(("1f1b", "gpipe", "interleaved", "interleaved"))
        if rng.random() < 0.5:
            opts["microbatches"] = rng.choice((1, 2, 4))
    if lay.tp > 1 and kind == "gpt" and rng.random() < 0.4:
        opts["sequence_parallel"] = True
    r = rng.random()
    if r < 0.3:
        opts["zero_stage"] = rng.choice((0, 1, 2, 3))
    elif r < 0.5:
        opts["fsdp"] = True
    return replace(lay, **opts)


def draw(seed: int) -> Draw:
    """The draw of ``seed`` (deterministic)."""
    rng = random.Random(seed)
    kind = "swin" if rng.random() < 0.25 else "gpt"
    if kind == "gpt":
        heads = rng.choice((4, 4, 6))
        model = {"d_model": 8 * heads, "n_heads": heads, "n_layers": rng.choice((2, 2, 3, 4)),
                 "n_kv_heads": rng.choice([h for h in (1, 2, 3, 4, 6) if heads % h == 0]),
                 "vocab_size": rng.choice((61, 63, 64, 65)), "tie_embeddings": rng.random() < 0.3}
        seq_len = rng.choice((24, 32, 48))
        gb = rng.choice((4, 4, 6, 8, 12))
    else:
        model = {"n_layers": rng.choice((2, 4))}
        seq_len, gb = None, rng.choice((2, 4, 4, 6))
    save, load = _draw_layout(rng, kind), _draw_layout(rng, kind)
    d = Draw(seed, kind, model, seq_len, gb, save, load, k=rng.choice((1, 2, 2, 3)), m=rng.choice((1, 2)),
             async_save=rng.random() < 0.4)
    # drawn last, so earlier seeds keep the fields above: a save in the middle of a run, and an odd GPT d_model
    # (head_dim 8 keeps the heads): no even dp divides a norm or an embedding row, so shards and ZeRO partitions
    # are uneven
    d = replace(d, train_on=rng.random() < 0.5)
    if kind == "gpt" and rng.random() < 0.2:
        d = replace(d, model={**model, "d_model": model["d_model"] + rng.choice((-5, 3)), "head_dim": 8})
    if kind == "gpt":
        d = _draw_documents(random.Random(f"documents {seed}"), d)
    return d


def _draw_documents(rng: random.Random, d: Draw) -> Draw:
    """``d`` packing documents (``DOCUMENTS_SHARE`` of the time), else ``d``. Its own random stream: the draws
    without documents are the ones the seed drew before documents existed.

    The synthetic sample is ``start + step·i mod V`` (step 1–7) with 5% noise, so over a vocabulary V of 5–13 the EOD
    id ends a document every V / gcd(step, V) tokens (seq_len 24–48: several per sample, across the cp shard
    edges), or never when the progression misses it, or at every token when step = V hits it."""
    if rng.random() >= DOCUMENTS_SHARE:
        return d
    on = [k for k in DOCUMENT_OPTIONS if rng.random() < 0.6] or [rng.choice(DOCUMENT_OPTIONS)]
    vocab = rng.choice((5, 7, 8, 9, 11, 13))
    model = {**d.model, "vocab_size": vocab}
    if rng.random() < 0.25:
        model["attention_window"] = rng.choice((3, 8, 16))
    return replace(d, model=model, data={**dict.fromkeys(on, True), "eod_id": rng.randrange(vocab)})


def features(d: Draw) -> set[str]:
    """What a draw exercises (the suite's fixed draws assert they still cover the ones they were chosen for)."""
    f = {f"kind:{d.kind}", f"save_world:{d.save.world}", f"load_world:{d.load.world}",
         "save:" + ("async" if d.async_save else "sync"), "save:" + ("train-on" if d.train_on else "exit")}
    if d.save.world != d.load.world:
        f.add("world-change")
    if d.kind == "gpt":
        f.add("gqa" if d.model["n_kv_heads"] < d.model["n_heads"] else "mha")
        f.add("tied" if d.model["tie_embeddings"] else "untied")
        if d.model["vocab_size"] % 2:
            f.add("odd-vocab")
        if d.model["d_model"] % 2:
            f.add("odd-width")
        if d.model.get("attention_window"):
            f.add("window")
    docs = [k for k in DOCUMENT_OPTIONS if d.data.get(k)]
    if docs:
        f.add("documents")
        f.update(f"doc:{DOC_NAMES[k]}" for k in docs)
    for side, lay in (("save", d.save), ("load", d.load)):
        for axis in ("dp", "tp", "pp", "cp"):
            if getattr(lay, axis) > 1:
                f.add(f"{axis}")
        if lay.wp != (1, 1):
            f.add("wp")
        if lay.zero_stage is not None:
            f.add(f"zero{lay.zero_stage}")
        if lay.fsdp:
            f.add("fsdp")
            if lay.tp > 1:  # FSDP2 shards of tp shards: the checkpoint's blocks (checkpoint/adapters.py)
                f.add("fsdp-tp")
        if lay.pp_schedule:
            f.add(f"pp:{lay.pp_schedule}")
        if lay.cp_method:
            f.add(f"cp:{lay.cp_method}")
        if lay.sequence_parallel:
            f.add("sp")
    return f


# ---------------------------------------------------------------------------------------------------------------
# Configs (the product's validation decides what runs)
# ---------------------------------------------------------------------------------------------------------------
def config(d: Draw, role: str, root: Path) -> Config:
    """The config of one of the draw's runs: ``role`` = ref | save | load (raises ConfigError when refused)."""
    lay = {"ref": Layout(micro_batch=1), "save": d.save, "load": d.load}[role]
    run_dir = root / f"{d.seed}" / role
    steps = d.k + d.m
    train_over = {**FAST, "global_batch": d.global_batch, "micro_batch": lay.micro_batch}
    if role == "ref":
        ckpt = {"every": d.k, "keep_last": 3, "at_end": True}
    elif role == "save" and d.train_on:
        ckpt = {"every": d.k, "keep_last": 3, "at_end": False, "async_save": d.async_save}
    elif role == "save":
        ckpt = {"every": 0, "at_end": False, "async_save": d.async_save}
        train_over["exit_interval"] = d.k  # save after step k and exit, as a time-sliced job
    else:
        ckpt = {"every": 0, "at_end": True, "resume": str(root / f"{d.seed}" / "save" / "checkpoints" / f"step_{d.k}")}
    sections = {"model": dict(d.model), "parallel": lay.parallel(), "train": train_over, "checkpoint": ckpt}
    if d.kind == "gpt":
        sections["data"] = {"seq_len": d.seq_len, **d.data}
        return tiny_gpt_config(run_dir, steps=steps, **sections)
    return tiny_swin_config(run_dir, root / "weather", steps=steps, **sections)


def rejection(d: Draw, root: Path = Path("/nonexistent")) -> Optional[str]:
    """None when both layouts' configs validate, else 'save: <ConfigError line>' / 'load: ...'."""
    for role in ("save", "load"):
        try:
            config(d, role, root)
        except ConfigError as e:
            return f"{role}: {e}"
    return None


def rejection_kind(msg: str) -> str:
    """The refusal's rule, for counting: the message's first words up to a number or '='."""
    body = msg.split(": ", 1)[1]
    words = []
    for w in body.split():
        if any(c.isdigit() for c in w) or w in ("=", "<", ">="):
            break
        words.append(w)
    return " ".join(words[:6])


# ---------------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------------
#: dist-train's own refusals; any other exception (one from torch or DeepSpeed included) is a failure
REFUSALS = (ConfigError, ValueError)


def _run_one(d: Draw, role: str, root: Path) -> dict:
    """Train one run of the draw; the outcome as a plain dict (what a rank sends back)."""
    start = time.perf_counter()
    try:
        res = train(config(d, role, root))
    except REFUSALS as e:
        return {"refused": f"{type(e).__name__}: {e}"}
    except Exception as e:  # noqa: BLE001 - a finding, reported with the draw
        return {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=-6)}
    return {"losses": res.losses, "start_step": res.start_step, "exit_code": res.exit_code,
            "seconds": round(time.perf_counter() - start, 2)}


def _outcome_file(root: Path, d: Draw, role: str, rank: int) -> Path:
    return root / f"{d.seed}" / f"{role}.rank{rank}.json"


def _rank_runs(rank: int, world: int, draws: list[Draw], role: str, root: str) -> None:
    """Run ``draws`` on this rank, writing each outcome to its file as it comes. Anything but a normal end is
    raised, as in a real job whose rank dies: the harness stops the other ranks (which would otherwise wait in a
    collective that this rank left), and :func:`run_role` goes on with the draws after this one in a new spawn."""
    torch.set_num_threads(1)
    for d in draws:
        out = _run_one(d, role, Path(root))
        path = _outcome_file(Path(root), d, role, rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out))
        if "losses" not in out:
            raise RuntimeError(f"seed {d.seed} {role}: {out.get('refused') or out.get('error')}")


#: draws per spawn: a hang costs the spawn's timeout, which grows with the draws in it
GROUP = 8


def run_role(draws: list[Draw], role: str, root: Path, timeout_per_draw: float = 30) -> dict[int, list[dict]]:
    """Every draw's ``role`` run, grouped by world size (world 1 in this process): {seed: per-rank outcomes}.

    A spawn that fails (a rank raised, died or hung) costs only the draw it was running: the draws before it
    have their outcomes, the one without outcomes on every rank gets the failure's first line (a hang: the
    harness's timeout) on the ranks that wrote none, and the draws after it run in a new spawn."""
    out: dict[int, list[dict]] = {}
    by_world = collections.defaultdict(list)
    for d in draws:
        by_world[1 if role == "ref" else getattr(d, role).world].append(d)
    for world in sorted(by_world):
        pending = by_world[world]
        if world == 1:
            for d in pending:
                out[d.seed] = [_run_one(d, role, root)]
            continue
        while pending:
            group, failure = pending[:GROUP], None
            try:
                run_ranks(_rank_runs, world, args=(group, role, str(root)),
                          timeout=45 + timeout_per_draw * len(group))
            except RankFailure as e:
                failure = str(e).strip()
            done = 0
            for d in group:
                files = [_outcome_file(root, d, role, r) for r in range(world)]
                outcomes = [json.loads(f.read_text()) if f.is_file() else None for f in files]
                if all(o is not None and "losses" in o for o in outcomes):
                    out[d.seed] = outcomes
                    done += 1
                    continue
                why = (failure or "the spawn ended without this draw's outcome").splitlines()
                out[d.seed] = [o if o is not None else {"error": f"rank {r}: {why[0]}", "traceback": failure}
                               for r, o in enumerate(outcomes)]
                done += 1
                break
            pending = pending[done:]
    return out


# ---------------------------------------------------------------------------------------------------------------
# Comparing
# ---------------------------------------------------------------------------------------------------------------
def _close(a: list[float], b: list[float], rtol: float) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= rtol * max(abs(x), abs(y), 1e-12) for x, y in zip(a, b))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12)) if b.numel() and b.abs().max() > 0 else \
        float((a - b).abs().max()) if b.numel() else 0.0


def _train_state(ckpt: Path) -> dict:
    """The checkpoint's JSON state: step, ``extra`` (consumed samples = the data position, recent losses, ...), the
    LR scheduler, the optimizer's hyper-parameters (``values``)."""
    return json.loads((ckpt / mf.TRAIN_STATE).read_text())


def _json_diffs(got, ref, path: str = "") -> list[str]:
    """Leaves of two train states that differ: numbers beyond LOSS_RTOL (EXACT_STATE_KEYS exactly), any other
    value or structure at all."""
    if isinstance(ref, dict) and isinstance(got, dict):
        if got.keys() != ref.keys():
            return [f"{path or '.'}: keys {sorted(set(got) ^ set(ref))} differ"]
        return [x for k in ref for x in _json_diffs(got[k], ref[k], f"{path}.{k}" if path else k)]
    if isinstance(ref, list) and isinstance(got, list) and len(ref) == len(got):
        return [x for i, (g, r) in enumerate(zip(got, ref)) for x in _json_diffs(g, r, f"{path}[{i}]")]
    exact = path in EXACT_STATE_KEYS
    if (isinstance(ref, float) or isinstance(got, float)) and not exact and not isinstance(ref, bool):
        if isinstance(got, (int, float)) and isinstance(ref, (int, float)) and _close([got], [ref], LOSS_RTOL):
            return []
    elif got == ref:
        return []
    return [f"{path}: {got!r} != reference {ref!r}"]


def compare_checkpoints(got: Path, ref: Path) -> list[str]:
    """What differs between a checkpoint and the reference's of the same step (empty: nothing)."""
    problems = []
    table, ref_table = mf.read_manifest(got)["tensors"], mf.read_manifest(ref)["tensors"]
    strip = lambda t: {k: (v["shape"], v["dtype"]) for k, v in t.items()}  # noqa: E731
    if strip(table) != strip(ref_table):
        a, b = strip(table), strip(ref_table)
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        problems.append(f"tensor table differs at {len(diff)} keys, e.g. {diff[:3]} "
                        f"({[a.get(k) for k in diff[:3]]} vs reference {[b.get(k) for k in diff[:3]]})")
    tensors, _ = load_checkpoint_tensors(got)
    ref_tensors, _ = load_checkpoint_tensors(ref)
    worst = sorted(((_rel(tensors[k], v), k) for k, v in ref_tensors.items()
                    if k in tensors and tensors[k].shape == v.shape), reverse=True)
    bad = [(e, k) for e, k in worst if not e <= TENSOR_RTOL]
    if bad:
        problems.append(f"{len(bad)} tensors differ from the reference, worst "
                        + ", ".join(f"{k} ({e:.2e})" for e, k in bad[:3]))
    problems += [f"train state {x}" for x in _json_diffs(_train_state(got), _train_state(ref))][:8]
    return problems


def _one_line(msg: str) -> bool:
    return "\n" not in msg.strip()


def _secondary(outcome: dict) -> bool:
    """An error that another rank's exit caused (gloo's closed connection, the harness stopping the rank)."""
    msg = outcome.get("error", "")
    return "Connection closed by peer" in msg or "Connection reset" in msg or msg.startswith("rank ")


def judge(d: Draw, ref: list[dict], save: list[dict], load: list[dict], root: Path) -> tuple[str, str]:
    """(verdict, detail): verdict ok | refused | fail."""
    base = root / f"{d.seed}"
    r = ref[0]
    if "losses" not in r:
        return "fail", f"reference run: {r.get('refused') or r.get('error')}"
    ref_losses = r["losses"]
    for role, outs in (("save", save), ("load", load)):
        # the rank that failed first, not the ones its exit broke ("Connection closed by peer")
        for rank, o in sorted(enumerate(outs), key=lambda ro: _secondary(ro[1])):
            if "error" in o:
                return "fail", f"{role} rank {rank}: {o['error']}\n{o.get('traceback', '')}"
            if "refused" in o:
                verdict = "refused" if _one_line(o["refused"]) else "fail"
                return verdict, f"{role} rank {rank} refused: {o['refused']}"
        if any({k: v for k, v in o.items() if k != "seconds"} != {k: v for k, v in outs[0].items() if k != "seconds"}
               for o in outs):
            return "fail", f"{role}: ranks disagree: {outs}"
    s, lo = save[0], load[0]
    problems = []
    saved_steps = d.k + d.m if d.train_on else d.k
    if not _close(s["losses"], ref_losses[:saved_steps], LOSS_RTOL):
        problems.append(f"save losses {s['losses']} != reference {ref_losses[:saved_steps]}")
    if lo["start_step"] != d.k:
        problems.append(f"load started at step {lo['start_step']}, not {d.k}")
    if not _close(lo["losses"], ref_losses[d.k:], LOSS_RTOL):
        problems.append(f"resumed losses {lo['losses']} != reference {ref_losses[d.k:]}")
    for what, got, want in (("step_k", base / "save" / "checkpoints" / f"step_{d.k}",
                             base / "ref" / "checkpoints" / f"step_{d.k}"),
                            ("final", base / "load" / "checkpoints" / f"step_{d.k + d.m}",
                             base / "ref" / "checkpoints" / f"step_{d.k + d.m}")):
        if not got.is_dir():
            problems.append(f"{what} checkpoint {got} missing")
            continue
        problems += [f"{what} checkpoint: {p}" for p in compare_checkpoints(got, want)]
    return ("fail", "; ".join(problems)) if problems else ("ok", "")


def run_draws(draws: list[Draw], root: Path, log=print) -> dict[int, tuple[str, str]]:
    """Run valid draws (reference, save, load) and judge each: {seed: (verdict, detail)}."""
    refs = run_role(draws, "ref", root)
    ok_ref = [d for d in draws if "losses" in refs[d.seed][0]]
    saves = run_role(ok_ref, "save", root)
    saved = [d for d in ok_ref if all("losses" in o for o in saves[d.seed])]
    loads = run_role(saved, "load", root)
    out = {}
    for d in draws:
        out[d.seed] = judge(d, refs[d.seed], saves.get(d.seed, [{}]), loads.get(d.seed, [{"error": "not run"}]),
                            root)
        if d.seed in saves and d.seed not in loads:  # the save run failed or refused: say that, not "not run"
            out[d.seed] = judge(d, refs[d.seed], saves[d.seed], [], root)
    return out


def valid_draws(first: int, count: int, stats: Optional[collections.Counter] = None,
                rejected: Optional[collections.Counter] = None, max_world: int = 4,
                kind: Optional[str] = None, need: frozenset = frozenset()) -> list[Draw]:
    """The first ``count`` draws from seed ``first`` on that validate (rejections counted into ``rejected``), of
    model ``kind`` and with every feature in ``need`` when given (the rejections counted are those of such draws: the
    refusals that ``--feature documents --stats`` lists are those of document draws)."""
    out, seed = [], first
    while len(out) < count:
        d = draw(seed)
        seed += 1
        if kind and d.kind != kind or max(d.save.world, d.load.world) > max_world or not need <= features(d):
            continue
        why = rejection(d)
        if why is not None:
            if rejected is not None:
                rejected[why.split(":", 1)[0] + ": " + rejection_kind(why)] += 1
            continue
        out.append(d)
        if stats is not None:
            for f in features(d):
                stats[f] += 1
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Fuzz checkpoint resharding: save under one random layout, resume under "
                                             "another, compare with the single-rank run (example: python -m "
                                             "tests.reshard_fuzz --draws 10 --seed 0)")
    ap.add_argument("--draws", type=int, default=10, help="valid draws to run (invalid ones are skipped and counted)")
    ap.add_argument("--seed", type=int, default=0, help="first draw's seed")
    ap.add_argument("--one", type=int, default=None, metavar="SEED", help="run only the draw of SEED")
    ap.add_argument("--kind", choices=("gpt", "swin"), default=None, help="only draws of this model kind")
    ap.add_argument("--max-world", type=int, default=4)
    ap.add_argument("--feature", action="append", default=[],
                    help="only draws with this feature (repeatable), e.g. --feature pp:interleaved --feature zero3")
    ap.add_argument("--stats", action="store_true", help="only draw: print feature and rejection counts, run nothing")
    ap.add_argument("--keep", type=Path, default=None, help="run under this directory and keep it")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    feats, rejected = collections.Counter(), collections.Counter()
    if args.one is not None:
        d = draw(args.one)
        why = rejection(d)
        if why:
            print(f"seed {args.one} is refused by the config: {why}")
            return 0
        draws = [d]
    else:
        draws = valid_draws(args.seed, args.draws, feats, rejected, args.max_world, args.kind,
                             frozenset(args.feature))
    last = draws[-1].seed
    print(f"{len(draws)} valid draws from seeds {args.seed}..{last}; {sum(rejected.values())} refused by the config")
    if args.stats:
        for k, n in sorted(feats.items()):
            print(f"  feature {k}: {n}")
        for k, n in rejected.most_common():
            print(f"  refused {n:4d}  {k}")
        return 0
    root = args.keep or Path(tempfile.mkdtemp(prefix="reshard_fuzz_"))
    root.mkdir(parents=True, exist_ok=True)
    start = time.time()
    try:
        results = run_draws(draws, root)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    counts = collections.Counter(v for v, _ in results.values())
    for d in draws:
        verdict, detail = results[d.seed]
        print(f"{verdict.upper():7s} {d.describe()}" + (f"\n    {detail}" if detail else ""), flush=True)
    by_feature = collections.defaultdict(collections.Counter)
    for d in draws:
        for f in features(d):
            by_feature[f][results[d.seed][0]] += 1
    print("by feature: " + ", ".join(f"{f} {dict(c)}" for f, c in sorted(by_feature.items())))
    print(f"{len(draws)} draws: {dict(counts)}, {time.time() - start:.0f} s")
    return 1 if counts.get("fail") else 0


if __name__ == "__main__":
    sys.exit(main())

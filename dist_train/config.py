"""Typed run configuration: YAML files + ``--set dotted.key=value`` overrides, validated before any
process group exists.

    cfg = load_config("configs/gpt_tiny.yaml", overrides=["parallel.cp=2", "train.steps=10"])
    cfg.parallel.cp          # 2
    cfg.to_dict()            # plain dict, what rank 0 writes as run.dir/config.yaml

Every error is a ``ConfigError`` (a ``ValueError``) whose message is one line naming the key, the value
and what would be valid; the CLI prints it and exits with status 2.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib.util
import math
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

import yaml

from .zero_keys import zero_key_refusal


class ConfigError(ValueError):
    """Invalid user configuration; the message is a single line meant for the user."""


@dataclass
class RunConfig:
    name: str = "run"
    dir: str = "runs/${run.name}"
    seed: int = 1234


@dataclass
class ModelConfig:
    kind: str = "gpt"  # gpt | swin
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # None: = n_heads (MHA); < n_heads: GQA; 1: MQA
    ffn_hidden: Optional[int] = None  # None: SwiGLU default 8/3·d rounded up to 32
    vocab_size: int = 257  # byte tokenizer: 256 bytes + end-of-document
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    attention_window: Optional[int] = None  # sliding-window attention (tokens), None = full causal
    head_dim: Optional[int] = None  # gpt: channels per attention head; None: d_model / n_heads
    # gpt: RoPE frequency scaling; None, or Llama 3.1's {rope_type: llama3, factor, low_freq_factor,
    # high_freq_factor, original_max_position_embeddings}
    rope_scaling: Optional[dict] = None
    # swin (pixel-level encoder-decoder) fields
    patch_size: int = 1
    window: Any = 8  # int or [wh, ww]
    in_channels: int = 0
    out_channels: int = 0
    wrap: list = field(default_factory=lambda: [False, False])  # periodic (torus) image axes [H, W]


def ffn_hidden_size(m: ModelConfig) -> int:
    """The GPT's SwiGLU hidden width: ``model.ffn_hidden``, else 8/3·d rounded up to a multiple of 32 (the
    one definition: the model builds it, validation checks it against tp, the cost model counts it)."""
    if m.ffn_hidden:
        return m.ffn_hidden
    return 32 * math.ceil(8 * m.d_model / 3 / 32)


def swin_ffn_hidden_size(m: ModelConfig) -> int:
    """The Swin block's MLP hidden width: ``model.ffn_hidden``, else 4·d (Swin's MLP ratio 4)."""
    return m.ffn_hidden or 4 * m.d_model


#: DataConfig's packed-document options (each needs the end-of-document id)
DOCUMENT_OPTIONS = ("document_mask", "reset_positions", "eod_mask_loss")


@dataclass
class DataConfig:
    source: str = "indexed"  # indexed | synthetic | weather
    path: Optional[str] = None  # indexed: dataset prefix (PREFIX.bin/.idx); weather: directory
    prepare: Optional[str] = None  # indexed: corpus to build at `path` when missing: "python-stdlib"
    tokenizer: str = "byte"  # byte | path/to/tokenizer.json
    seq_len: int = 256
    image: Optional[list] = None  # weather: [H, W]
    channels: int = 4  # weather: number of fields
    steps: int = 64  # weather: time steps generated
    # packed documents (GPT): a document ends with its EOD token (Megatron's reset_attention_mask,
    # reset_position_ids, eod_mask_loss)
    document_mask: bool = False  # attention stays inside each document
    reset_positions: bool = False  # RoPE positions restart at 0 after every EOD
    eod_mask_loss: bool = False  # no loss on the label that follows an EOD (the next document's first token)
    eod_id: Optional[int] = None  # EOD token id (null: the dataset sidecar's, else the tokenizer's)
    valid_path: Optional[str] = None  # indexed: a held-out dataset prefix (PREFIX.bin/.idx) for validation
    split: Optional[str] = None  # Megatron --split "train,valid,test" weights of data.path, e.g. "98,2,0"
    # indexed held-out data (valid_path, or split's validation share): the fraction of its documents that may also be
    # training documents (exact token-for-token copies; 1: not checked), counting documents of at least
    # valid_overlap_min_tokens tokens (EOD included): short boilerplate repeats legitimately (data/overlap.py)
    valid_overlap_max: float = 0.0
    valid_overlap_min_tokens: int = 64

    @property
    def document_options_on(self) -> list[str]:
        """The packed-document options turned on, by name, in the order of :data:`DOCUMENT_OPTIONS` (empty: none)."""
        return [k for k in DOCUMENT_OPTIONS if getattr(self, k)]


@dataclass
class ParallelConfig:
    dp: int = 1
    tp: int = 1
    pp: int = 1
    cp: int = 1
    wp: Any = field(default_factory=lambda: [1, 1])  # [gh, gw] tile grid (an int n means [1, n])
    cp_layout: str = "zigzag"  # contiguous | striped | zigzag
    cp_method: str = "ring"  # ring | ulysses | hybrid
    ulysses_degree: int = 1
    cp_kv_piece: Optional[int] = None  # ring K/V in pieces of at most this many tokens (null: whole shards)
    zero_stage: Optional[int] = None  # None: plain DDP; 0-3: DeepSpeed engine
    fsdp: bool = False  # FSDP2 (fully_shard, ZeRO-3) over the grad axes dp × wp × cp; composes with pp/tp/cp
    fsdp_reshard_after_forward: bool = True  # free gathered weights after forward (re-gather in backward)
    microbatches: Optional[int] = None  # pipeline micro-batches (default: accumulation steps)
    pp_schedule: str = "1f1b"  # 1f1b | interleaved | gpipe
    sequence_parallel: bool = False
    attn_kernel: str = "auto"  # auto | sdpa | math | flash | cuda
    deepspeed: dict = field(default_factory=dict)  # extra DeepSpeed config keys, merged last


@dataclass
class TrainConfig:
    steps: int = 30
    global_batch: int = 8
    micro_batch: int = 4
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 5
    weight_decay: float = 0.1
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    log_every: int = 1
    activation_checkpointing: str = "none"  # none | full | selective
    loss_chunk: Any = "auto"  # gpt loss: tokens per head+cross-entropy chunk | auto (64 MiB of logits) | full (unchunked)
    peak_tflops: Optional[float] = None  # per-device peak for MFU; None: CUDA table or CPU calibration
    exit_interval: int = 0  # save and exit after every N steps done in this process (time-sliced jobs)
    on_nonfinite: str = "stop"  # non-finite loss/grad norm: stop (exit 3) | skip (the step is not applied)
    max_nonfinite_steps: int = 3  # skip: this many consecutive skipped steps are tolerated, one more stops
    spike_factor: Optional[float] = None  # a loss > this x the median of the last spike_window applied steps is
    spike_window: int = 20                # handled like a non-finite one (on_nonfinite); null: off (spikes.py)
    progress: bool = True
    trackers: Optional[list] = None  # jsonl | tensorboard | wandb (offline); None: jsonl + tensorboard if installed
    eval_every: int = 0  # validation loss every N steps (and at the last step); 0: off
    eval_steps: int = 4  # validation batches (global_batch samples each) per evaluation
    gc_interval: int = 0  # 0: Python's automatic garbage collector; N: it is off, a full collection every N steps


#: train.loss_chunk = auto: one chunk's fp32 logits [chunk, V_local] stay within this many bytes
AUTO_LOSS_CHUNK_BYTES = 64 * 2**20
LOSS_CHUNK_MULTIPLE = 32


def resolve_loss_chunk(setting: Union[str, int], vocab_local: int) -> Optional[int]:
    """``train.loss_chunk`` -> tokens per chunk of the fused head + cross-entropy, None for ``"full"``
    (unchunked [B, S, V] logits). The one definition: the model runs it, the cost model counts it.

    ``"auto"``: the largest multiple of 32 tokens whose fp32 logits over this rank's V_local vocabulary
    rows fit in 64 MiB (at least 32): 2048 tokens at V = 8k, 512 at 32k, 128 at 128k — a fixed byte budget,
    so the loss adds a constant, not a multiple of S. An int is used as given (validated positive)."""
    if setting == "full":
        return None
    if setting == "auto":
        fit = AUTO_LOSS_CHUNK_BYTES // (4 * max(1, vocab_local))
        return max(LOSS_CHUNK_MULTIPLE, fit // LOSS_CHUNK_MULTIPLE * LOSS_CHUNK_MULTIPLE)
    return int(setting)


#: Single keys (beside every ``model.*`` key) a resume compares with the checkpoint's (checkpoint/compat.py):
#: the tokenizer gives token ids their meaning; the rest fix which sample ``consumed_samples`` points at
#: (run.seed orders the samples), so a change would silently repeat or skip data.
RESUME_DATA_ORDER_KEYS = ("run.seed", "data.source", "data.path", "data.seq_len", "data.split")
RESUME_CHECKED_KEYS = ("data.tokenizer",) + RESUME_DATA_ORDER_KEYS


@dataclass
class CheckpointConfig:
    every: int = 0  # save every N steps (0: only at the end when `at_end`)
    keep_last: int = 3
    async_save: bool = False
    resume: str = "auto"  # auto | none | PATH
    dir: Optional[str] = None  # default run.dir/checkpoints
    at_end: bool = True
    on_error: str = "stop"  # stop | continue
    allow_config_change: list = field(default_factory=list)  # model keys a resume may change, e.g. [model.attention_window]
    # set by the launchers on every restart (and every start of a batch job): resume the run's own newest checkpoint
    # once it has one, else what `resume` names (never from scratch when `resume` names an import)
    restart: bool = False


@dataclass
class LaunchConfig:
    backend: str = "ray"  # ray | local | mpi
    nproc: int = 1
    address: Optional[str] = None
    nodes: int = 1
    gpus_per_node: int = 0
    max_restarts: int = 0
    collective_timeout_s: float = 300.0
    watchdog_s: Optional[float] = None  # no step progress for this long = hang (0: off; null: automatic)
    placement_timeout_s: float = 120.0  # ray: how long to wait for every node's bundle before giving up
    bind: Optional[str] = None  # rank 0's rendezvous store: None = MASTER_ADDR's interface (loopback alone
    #                             on one machine); an address/host name, or "all" for every interface


@dataclass
class ProfileConfig:
    """Step profiling (dist_train/profiling.py, docs/metrics.md): torch.profiler traces of chosen global steps."""
    steps: Optional[list] = None  # [first, last]: global steps traced, 1-based as the metric lines count, both included
    ranks: Optional[list] = None  # the ranks that trace (null: every rank)
    memory: bool = False  # CUDA: the allocator's history over those steps, a snapshot per rank (pytorch.org/memory_viz)
    record_shapes: bool = False  # operators' input shapes in the trace and the log's table
    with_stack: bool = False  # Python source lines of each operator in the trace


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # -- derived quantities (one place, so every component agrees) ------------------------------
    @property
    def wp_grid(self) -> tuple[int, int]:
        return _as_grid(self.parallel.wp)

    @property
    def model_parallel_size(self) -> int:
        gh, gw = self.wp_grid
        p = self.parallel
        return p.tp * p.pp * p.cp * gh * gw

    @property
    def world_size(self) -> int:
        return self.parallel.dp * self.model_parallel_size

    @property
    def grad_accum_steps(self) -> int:
        t = self.train
        return t.global_batch // (t.micro_batch * self.parallel.dp)


_CHOICES = {
    "model.kind": ("gpt", "swin"),
    "data.source": ("indexed", "synthetic", "weather"),
    "parallel.cp_layout": ("contiguous", "striped", "zigzag"),
    "parallel.cp_method": ("ring", "ulysses", "hybrid"),
    "parallel.pp_schedule": ("1f1b", "interleaved", "gpipe"),
    "parallel.attn_kernel": ("auto", "sdpa", "math", "flash", "cuda"),
    "train.precision": ("auto", "fp32", "bf16"),
    "train.activation_checkpointing": ("none", "full", "selective"),
    "checkpoint.on_error": ("stop", "continue"),
    "train.on_nonfinite": ("stop", "skip"),
    "launch.backend": ("ray", "local", "mpi"),
}


#: data.prepare: corpora built at data.path when the dataset is missing (None: it must exist)
PREPARE_CORPORA = (None, "python-stdlib")


LLAMA3_ROPE_KEYS = ("rope_type", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def attention_head_dim(m: ModelConfig) -> int:
    """Channels per attention head of a gpt: ``model.head_dim``, default d_model / n_heads."""
    return m.head_dim or m.d_model // m.n_heads


def _as_grid(wp: Any) -> tuple[int, int]:
    if isinstance(wp, int):
        return (1, wp)
    if isinstance(wp, (list, tuple)) and len(wp) == 2 and all(isinstance(v, int) for v in wp):
        return (int(wp[0]), int(wp[1]))
    raise ConfigError(f"parallel.wp = {wp!r}: expected [gh, gw] (two positive integers) or an integer")


# ---------------------------------------------------------------------------------------------
# Building from dicts
# ---------------------------------------------------------------------------------------------
def _type_ok(value: Any, tp: Any) -> tuple[bool, Any]:
    """Check (and gently coerce) ``value`` against a dataclass field annotation."""
    if tp is Any:
        return True, value
    origin = get_origin(tp)
    if origin is Union:
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return True, None
        for a in args:
            ok, v = _type_ok(value, a)
            if ok:
                return True, v
        return False, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        if isinstance(value, str):  # YAML 1.1 reads '1e-3' (no dot) as a string
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if tp is str:
        return isinstance(value, str), value
    if tp in (list, dict):
        return isinstance(value, tp), value
    return True, value


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Union:
        return " or ".join(_type_name(a) for a in get_args(tp))
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _did_you_mean(key: str, valid: list[str], prefix: str) -> str:
    """`` (did you mean train.warmup_steps?)`` for a misspelt key, `` (it is data.seq_len)`` for a key of another
    section (``train.seq_len``), else nothing: the list of valid keys follows either way."""
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.75)
    if close:
        return f" (did you mean {prefix + '.' if prefix else ''}{close[0]}?)"
    if prefix and "." not in prefix:  # a section's key: is it another section's?
        sections = {name: tp for name, tp in get_type_hints(Config).items() if dataclasses.is_dataclass(tp)}
        homes = [name for name, tp in sections.items() if key in {f.name for f in fields(tp)}]
        if homes:
            return f" (it is {' or '.join(f'{h}.{key}' for h in homes)})"
    return ""


def _build(cls: type, data: dict, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {type(data).__name__} {data!r}")
    hints = get_type_hints(cls)
    valid = [f.name for f in fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in valid:
            raise ConfigError(f"unknown config key '{dotted}'{_did_you_mean(str(key), valid, prefix)}; valid keys"
                              f"{' in ' + prefix if prefix else ''}: {', '.join(valid)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value if value is not None else {}, dotted)
            continue
        ok, coerced = _type_ok(value, tp)
        if not ok:
            raise ConfigError(f"{dotted} = {value!r}: expected {_type_name(tp)}")
        kwargs[key] = coerced
    return cls(**kwargs)


def deep_merge(base: dict, extra: dict) -> dict:
    """``base`` with ``extra`` merged over it, dict into dict at every depth (neither is modified)."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """``'parallel.cp=2'`` -> (['parallel', 'cp'], 2); the value is parsed as a YAML scalar/flow value."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected dotted.key=value, e.g. --set train.steps=10")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: expected dotted.key=value, e.g. --set train.steps=10")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item!r}: value is not valid YAML ({str(e).splitlines()[0]})") from None
    return key.split("."), value


def _expand_vars(d: dict, root: dict) -> dict:
    """Expand ``${section.key}`` references in string values (used for run.dir = runs/${run.name})."""
    def lookup(m: "re.Match[str]") -> str:
        node: Any = root
        for part in m.group(1).split("."):
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"config reference ${{{m.group(1)}}} names no key")
            node = node[part]
        return str(node)

    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out[k] = _expand_vars(v, root)
        elif isinstance(v, str) and "${" in v:
            out[k] = re.sub(r"\$\{([A-Za-z0-9_.]+)\}", lookup, v)
        else:
            out[k] = v
    return out


def config_from_dict(data: dict, overrides: Optional[list[str]] = None, derives_layouts: bool = False) -> Config:
    """The validated config of ``data`` with ``overrides`` applied; ``derives_layouts``: see :func:`validate`."""
    data = copy.deepcopy(data or {})  # overrides must never leak into the caller's mapping
    for item in overrides or []:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {item!r}: '{part}' is not a section")
            node = nxt
        node[path[-1]] = value
    defaults = Config().to_dict()
    merged = deep_merge(defaults, data)
    # unknown keys must be reported against the user's dict, not the merged one
    _build(Config, data, "")
    cfg = _build(Config, _expand_vars(merged, merged), "")
    validate(cfg, derives_layouts)
    return cfg


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping: plain YAML keeps the last one
    silently, so a leftover ``n_heads: 4`` above ``n_heads: 8`` would change the model without a word."""

    where = "YAML"

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue  # `<<:` merges may override on purpose; complex keys are left to YAML
                line = key_node.start_mark.line + 1
                if key_node.value in seen:
                    raise ConfigError(f"{self.where}: key '{key_node.value}' is given twice in one mapping (lines "
                                      f"{seen[key_node.value]} and {line}); YAML would silently keep the last: "
                                      f"remove one")
                seen[key_node.value] = line
        return super().construct_mapping(node, deep=deep)


def load_yaml_unique(text: str, where: str) -> Any:
    """``yaml.safe_load(text)`` refusing duplicate keys with a ConfigError naming ``where``, the key and lines."""
    loader = _UniqueKeyLoader(text)
    loader.where = where
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def load_config(path: Union[str, Path], overrides: Optional[list[str]] = None, derives_layouts: bool = False) -> Config:
    """Read a YAML config file, apply ``--set`` overrides and validate (``derives_layouts``: see :func:`validate`)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{p}' not found")
    try:
        data = load_yaml_unique(p.read_text(), f"config file '{p}'")
    except yaml.YAMLError as e:
        first = " ".join(str(e).split())
        raise ConfigError(f"config file '{p}' is not valid YAML: {first}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file '{p}' cannot be read: {e}") from None
    if data is None:  # an empty file would silently train the built-in defaults
        raise ConfigError(f"config file '{p}' is empty: it needs at least a model, data and train section "
                          f"(see configs/gpt_tiny.yaml)")
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{p}' must hold a mapping of sections, got {type(data).__name__}")
    return config_from_dict(data, overrides, derives_layouts)


def own_checkpoint_overrides(run_dir: Union[str, Path]) -> list[str]:
    """Overrides that make a measured run (``bench train``, ``bench launch``, a scale sweep point, each in a run dir
    of its own) checkpoint under ``run_dir``/checkpoints, from scratch: a config's checkpoint.dir outside run.dir
    is a real run's, which the measured run would otherwise resume from and (on an exit_interval or SIGTERM stop,
    a fault run's every-step saves) save into."""
    return ["checkpoint.resume=none", f"checkpoint.dir={Path(run_dir) / 'checkpoints'}"]


def save_config(cfg: Config, path: Union[str, Path]) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# ---------------------------------------------------------------------------------------------
# Validation (no process group needed; world_size is checked separately once it is known)
# ---------------------------------------------------------------------------------------------
def _get(cfg: Config, dotted: str) -> Any:
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


@dataclass(frozen=True)
class Bound:
    """The valid interval of a numeric key; :meth:`text` is what an error message quotes.

    ``null``: when set, null is valid too and means this (quoted in the message)."""

    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False
    null: str = ""

    def contains(self, v: float) -> bool:
        if isinstance(v, float) and math.isnan(v):
            return False
        above = v > self.lo if self.lo_open else v >= self.lo
        below = v < self.hi if self.hi_open else v <= self.hi
        return above and below

    def text(self) -> str:
        def num(x: float) -> str:
            return f"{x:g}" if isinstance(x, float) and not x.is_integer() else str(int(x))

        if self.hi == math.inf:
            rng = f"{'>' if self.lo_open else '>='} {num(self.lo)}" + (" and finite" if self.hi_open else "")
        else:
            rng = f"in {'(' if self.lo_open else '['}{num(self.lo)}, {num(self.hi)}{')' if self.hi_open else ']'}"
        return rng + (f" (or null: {self.null})" if self.null else "")


_POS = Bound(1)  # a count: 1, 2, ...
_NONNEG = Bound(0)
_POSITIVE_REAL = Bound(0, lo_open=True, hi_open=True)  # > 0 and finite
_NONNEG_REAL = Bound(0, hi_open=True)  # >= 0 and finite
#: Largest sizes accepted: far beyond any model that trains anywhere (Llama-3 405B: d 16384, 126 layers,
#: vocab 128k), small enough that a typo (an extra zero or three) is refused here instead of as an
#: out-of-memory traceback on every rank.
MAX_WIDTH, MAX_LAYERS, MAX_VOCAB, MAX_SEQ = 1 << 17, 1 << 12, (1 << 31) - 1, 1 << 30

#: Every numeric key's valid range, in one place (lists, strings and choices are checked per section below).
_BOUNDS: dict[str, Bound] = {
    "run.seed": Bound(0, 2**63 - 1),
    "model.d_model": Bound(1, MAX_WIDTH),
    "model.n_layers": Bound(1, MAX_LAYERS),
    "model.n_heads": Bound(1, MAX_WIDTH),
    "model.n_kv_heads": Bound(1, MAX_WIDTH, null="= n_heads"),
    "model.ffn_hidden": Bound(1, 8 * MAX_WIDTH, null="SwiGLU default 8/3 * d_model rounded up to 32"),
    "model.vocab_size": Bound(2, MAX_VOCAB),
    "model.rope_theta": _POSITIVE_REAL,
    "model.norm_eps": _NONNEG_REAL,
    "model.init_std": _NONNEG_REAL,
    "model.attention_window": Bound(1, null="full causal attention"),
    "model.head_dim": Bound(2, MAX_WIDTH, null="d_model / n_heads"),
    "model.patch_size": Bound(1, 1 << 10),
    "model.in_channels": Bound(0, 1 << 16),
    "model.out_channels": Bound(0, 1 << 16),
    "data.seq_len": Bound(2, MAX_SEQ),
    "data.channels": Bound(1, 1 << 16),
    "data.steps": Bound(2, 1 << 24),
    "data.eod_id": Bound(0, MAX_VOCAB, null="the dataset sidecar's EOD id, else the tokenizer's"),
    "data.valid_overlap_max": Bound(0, 1),
    "data.valid_overlap_min_tokens": Bound(1, MAX_SEQ),
    "parallel.dp": _POS,
    "parallel.tp": _POS,
    "parallel.pp": _POS,
    "parallel.cp": _POS,
    "parallel.ulysses_degree": _POS,
    "parallel.cp_kv_piece": Bound(1, null="whole shards"),
    "parallel.zero_stage": Bound(0, 3, null="plain DDP"),
    "parallel.microbatches": Bound(1, null="the accumulation steps"),
    "train.steps": _POS,
    "train.global_batch": _POS,
    "train.micro_batch": _POS,
    "train.lr": _POSITIVE_REAL,
    "train.min_lr_ratio": Bound(0, 1),
    "train.warmup_steps": _NONNEG,
    "train.weight_decay": _NONNEG_REAL,
    "train.grad_clip": Bound(0, hi_open=True),  # 0: no clipping
    "train.log_every": _POS,
    "train.peak_tflops": Bound(0, lo_open=True, hi_open=True, null="CUDA table or CPU calibration"),
    "train.exit_interval": _NONNEG,  # 0: off
    "train.max_nonfinite_steps": _POS,
    "train.spike_factor": Bound(1, lo_open=True, hi_open=True, null="no loss-spike check"),
    "train.spike_window": _POS,
    "train.eval_every": _NONNEG,  # 0: off
    "train.eval_steps": _POS,
    "train.gc_interval": _NONNEG,  # 0: the automatic collector (dist_train/gc_schedule.py)
    "checkpoint.every": _NONNEG,  # 0: only at the end
    "checkpoint.keep_last": _POS,
    "launch.nproc": _POS,
    "launch.nodes": _POS,
    "launch.gpus_per_node": _NONNEG,
    "launch.max_restarts": _NONNEG,
    "launch.collective_timeout_s": _POSITIVE_REAL,
    "launch.watchdog_s": Bound(0, hi_open=True, null="automatic: 10x the slowest step, within [30 s, "
                                                      "0.8 x collective_timeout_s]"),  # 0: off
    "launch.placement_timeout_s": _POSITIVE_REAL,
}


def _check_bounds(cfg: Config, section: str) -> None:
    for dotted, bound in _BOUNDS.items():
        if dotted.split(".")[0] != section or not hasattr(getattr(cfg, section), dotted.split(".")[1]):
            continue
        v = _get(cfg, dotted)
        if v is None and bound.null:
            continue
        if v is None or not bound.contains(v):
            raise ConfigError(f"{dotted} = {v!r}: must be {bound.text()}")


def _check_text(dotted: str, v: Any, what: str) -> None:
    if not isinstance(v, str) or not v.strip():
        raise ConfigError(f"{dotted} = {v!r}: must be {what}")


def _check_dir_path(dotted: str, v: Any, what: str) -> None:
    """A directory dist-train creates: a leading ``~`` is no home directory here (YAML and ``--set`` keep it as it
    is), so the run would create a folder named ``~`` in the working directory, one ``rm -rf ~`` away from the home."""
    _check_text(dotted, v, what)
    if v.startswith("~"):
        first = v.split("/", 1)[0]
        expanded = os.path.expanduser(v)
        path = (f", e.g. {expanded}" if expanded != v else
                f" in full (there is no home of a user {first[1:]} here)")
        raise ConfigError(f"{dotted} = {v!r}: a leading '~' is not expanded (a folder named {first!r} would be "
                          f"created here); write the path out{path}")


def _check_int_list(dotted: str, v: Any, n: int, lo: int, what: str) -> None:
    ok = isinstance(v, list) and len(v) == n and all(
        isinstance(x, int) and not isinstance(x, bool) and x >= lo for x in v)
    if not ok:
        raise ConfigError(f"{dotted} = {v!r}: expected {what}")


def validate(cfg: Config, derives_layouts: bool = False) -> None:
    """Every key's range and the cross-key rules; raises ConfigError (one line). No process group needed;
    the world size is checked separately once it is known (:func:`check_world_size`). ``derives_layouts``: ``cfg``
    is the base a tool derives other layouts from (the planner's config, a sweep's base): a key only some layouts
    read (:data:`LAYOUT_ONLY_KEYS`: the pipeline's, FSDP2's, the all-to-all's) is not refused here but in each
    derived layout that does not read it (which the tools give the key's default instead)."""
    for dotted, choices in _CHOICES.items():
        v = _get(cfg, dotted)
        if v not in choices:
            raise ConfigError(f"{dotted} = {v!r}: valid values are {', '.join(map(str, choices))}")
    _validate_run(cfg)
    _validate_parallel(cfg)
    _validate_data(cfg)
    _validate_train(cfg)
    _validate_deepspeed_keys(cfg)
    _validate_checkpoint(cfg)
    _validate_launch(cfg)
    _validate_profile(cfg)
    _validate_model(cfg)  # its cross-key rules divide by parallel and train sizes checked above
    # last: the rules above name a wrong combination more precisely
    _refuse_unread_fields(cfg, LAYOUT_ONLY_KEYS if derives_layouts else frozenset())


def _unread_fields(cfg: Config) -> list[tuple[str, bool, str]]:
    """(key, whether this config's code path never reads it, why and what would be valid) for the keys that only some
    engines, models, data sources or settings read (the readers: engines/, models/, data/, trainer.py, spikes.py,
    evaluation.py). Keys that act on nothing at size 1 (cp_layout at cp = 1, sequence_parallel at tp = 1) pass: they
    change nothing a larger layout would read differently."""
    m, d, p, t = cfg.model, cfg.data, cfg.parallel, cfg.train
    swin, docs = m.kind == "swin", d.document_options_on
    no_pipeline = f"only the pipeline engine reads it and parallel.pp = {p.pp}"
    weather = (f"a weather-dataset setting and data.source = {d.source} does not read it; remove it (model.kind = "
               "swin trains on data.source = weather)")
    overlap_unread = ("only the check of indexed held-out documents against the training ones reads it and " +
                      (f"data.source = {d.source}" if d.source != "indexed" else "validation is off (train.eval_every "
                       "= 0)") + "; remove it")
    return [
        ("parallel.ulysses_degree", m.kind == "gpt" and p.cp_method == "ring",
         "parallel.cp_method = ring does not read it (all-to-all runs with cp_method ulysses or hybrid); remove it or "
         "set parallel.cp_method: hybrid"),
        ("parallel.ulysses_degree", swin and p.cp == 1,
         "a swin runs Ulysses inside windows over the whole cp group and parallel.cp = 1; remove it"),
        ("parallel.microbatches", p.pp == 1,
         f"{no_pipeline}: a step runs global_batch / (micro_batch x dp) = {cfg.grad_accum_steps} micro-batches of "
         "train.micro_batch samples; set train.micro_batch instead (or parallel.pp > 1)"),
        ("parallel.pp_schedule", p.pp == 1, f"{no_pipeline}; remove it (or set parallel.pp > 1)"),
        ("parallel.fsdp_reshard_after_forward", not p.fsdp,
         "only FSDP2 reads it and parallel.fsdp = false; remove it (or set parallel.fsdp: true)"),
        ("parallel.attn_kernel", swin,
         "it picks a GPT's attention block kernel; swin's window attention has its own, so remove it"),
        ("train.loss_chunk", swin,
         "it chunks a GPT's head + cross-entropy over the vocabulary; swin's loss is a pixel MSE, so remove it"),
        ("data.seq_len", swin, "a token-sequence length; a swin sample is one data.image, so remove it"),
        ("data.image", d.source != "weather", weather),
        ("data.channels", d.source != "weather", weather),
        ("data.steps", d.source != "weather", weather),
        # data.source = synthetic is the stand-in for a real config's data (`--set data.source=synthetic`, the
        # benchmarks' way): its indexed keys (path, prepare, tokenizer) stay as written, unread, by design
        ("data.prepare", d.source == "weather",
         "only data.source = indexed builds a text corpus at data.path (weather generates its own); remove it"),
        ("data.tokenizer", d.source == "weather", "data.source = weather reads no text; remove it"),
        ("data.eod_id", not docs,
         "only the packed-document options read it (data.document_mask, reset_positions, eod_mask_loss) and all are "
         "off; remove it or turn one on"),
        ("train.max_nonfinite_steps", t.on_nonfinite == "stop",
         "only train.on_nonfinite = skip reads it (stop ends the run at the first non-finite or spiking step); remove "
         "it or set on_nonfinite: skip"),
        ("train.spike_window", t.spike_factor is None,
         "only the loss-spike check reads it and train.spike_factor is null (off); set spike_factor (e.g. 3.0) or "
         "remove it"),
        ("train.eval_steps", t.eval_every == 0,
         "validation is off (train.eval_every = 0), so nothing reads it; set eval_every or remove it"),
        *((key, d.source != "indexed" or t.eval_every == 0, overlap_unread)
          for key in ("data.valid_overlap_max", "data.valid_overlap_min_tokens")),
        *((f"profile.{key}", cfg.profile.steps is None,
           "only a profiled window reads it and profile.steps is null (off); set profile.steps (e.g. [3, 4]) or "
           "remove it") for key in PROFILE_WINDOW_KEYS),
    ]


#: Keys a resume compares (RESUME_CHECKED_KEYS) that a swin never reads: its sample is one data.image, it reads no text.
SWIN_UNREAD_RESUME_KEYS = ("data.seq_len", "data.tokenizer")


def resume_unread_keys(kind: str) -> frozenset:
    """The keys a resume would compare that a model of ``kind`` never reads (the other kind's model fields, a swin's
    token keys): validation refuses them set, so a resume does not compare them (checkpoint/compat.py) and
    ``checkpoint.allow_config_change`` cannot name them."""
    other = {f"model.{name}" for k, names in KIND_FIELDS.items() if k != kind for name in names}
    return frozenset(other | (set(SWIN_UNREAD_RESUME_KEYS) if kind == "swin" else set()))


#: Keys only a pipeline (pp > 1) reads and keys only FSDP2 reads, with their defaults: a layout a tool derives without
#: one (a planner candidate, a sweep point, a benchmark's baseline) takes these, since validation refuses them set there.
PIPELINE_ONLY_DEFAULTS = {f"parallel.{k}": getattr(ParallelConfig, k) for k in ("microbatches", "pp_schedule")}
FSDP_ONLY_DEFAULTS = {"parallel.fsdp_reshard_after_forward": ParallelConfig.fsdp_reshard_after_forward}
#: The all-to-all degree, which a GPT's ring (cp_method ring) and any model at cp = 1 never read (or, a GPT's hybrid at
#: cp = 1, refuse): likewise for a layout set to the ring or to cp = 1 (a strong-scaling sweep's one-rank point).
ALL_TO_ALL_ONLY_DEFAULTS = {"parallel.ulysses_degree": ParallelConfig.ulysses_degree}
#: The keys only some layouts read (see validate's ``derives_layouts``)
LAYOUT_ONLY_KEYS = frozenset({**PIPELINE_ONLY_DEFAULTS, **FSDP_ONLY_DEFAULTS, **ALL_TO_ALL_ONLY_DEFAULTS})
#: (override key, the value that leaves nothing to read some keys, those keys' defaults) for unread_reset_overrides
_UNREAD_RESETS = (("parallel.pp", 1, PIPELINE_ONLY_DEFAULTS), ("parallel.fsdp", False, FSDP_ONLY_DEFAULTS),
                  ("parallel.cp_method", "ring", ALL_TO_ALL_ONLY_DEFAULTS),
                  ("parallel.cp", 1, ALL_TO_ALL_ONLY_DEFAULTS))


def unread_reset_overrides(overrides: list[str]) -> list[str]:
    """``--set`` items to apply just before ``overrides`` (a sweep point's, a benchmark baseline's): when those take
    the pipeline away (``parallel.pp=1``), FSDP2 (``parallel.fsdp=false``) or the all-to-all
    (``parallel.cp_method=ring`` or ``parallel.cp=1``), the keys only that reads go back to their defaults
    (:data:`PIPELINE_ONLY_DEFAULTS`, :data:`FSDP_ONLY_DEFAULTS`, :data:`ALL_TO_ALL_ONLY_DEFAULTS`) instead of being
    inherited from what came before (``--set parallel.pp_schedule=gpipe`` of the run) and refused as unread;
    ``overrides`` that set such a key themselves still win, coming after."""
    given = {".".join(path): value for path, value in map(parse_override, overrides)}
    keys = {k: v for key, value, defaults in _UNREAD_RESETS
            if key in given and given[key] == value and type(given[key]) is type(value) for k, v in defaults.items()}
    return [f"{k}={yaml.safe_dump(v, default_flow_style=True).splitlines()[0]}" for k, v in keys.items()]


def _refuse_unread_fields(cfg: Config, allowed: frozenset = frozenset()) -> None:
    """A key set away from its default that this config's code path never reads is refused (one line naming it): the
    run would silently do other than its config, and every checkpoint's recorded config, says. ``allowed``: keys
    not refused here (a base of derived layouts, :func:`validate`)."""
    defaults = Config()
    for key, unread, why in _unread_fields(cfg):
        value = _get(cfg, key)
        if unread and key not in allowed and value != _get(defaults, key):
            # "remove it" from a config file; from the command line (a config that sets it) only a value can be given
            default = yaml.safe_dump(_get(defaults, key), default_flow_style=True).splitlines()[0]
            raise ConfigError(f"{key} = {value!r}: {why} (on the command line: --set {key}={default}, its default)")


def _validate_run(cfg: Config) -> None:
    _check_bounds(cfg, "run")
    _check_text("run.name", cfg.run.name, "a non-empty name")
    _check_dir_path("run.dir", cfg.run.dir, "a directory path")


def _validate_model(cfg: Config) -> None:
    _check_bounds(cfg, "model")
    m = cfg.model
    if isinstance(m.window, bool) or not (isinstance(m.window, int) and m.window >= 1):
        _check_int_list("model.window", m.window, 2, 1, "a positive integer or [wh, ww] (two positive integers)")
    if not (isinstance(m.wrap, list) and len(m.wrap) == 2 and all(isinstance(v, bool) for v in m.wrap)):
        raise ConfigError(f"model.wrap = {m.wrap!r}: expected [bool, bool] (periodic H, periodic W)")
    _validate_model_kind_fields(m)
    if cfg.model.kind == "gpt":
        _validate_gpt(cfg)
    else:
        _validate_swin(cfg)


#: model fields only one kind builds (the rest: d_model, n_layers, n_heads, ffn_hidden, norm_eps, init_std, both)
KIND_FIELDS = {"gpt": ("n_kv_heads", "vocab_size", "rope_theta", "tie_embeddings", "attention_window", "head_dim",
                       "rope_scaling"),
               "swin": ("patch_size", "window", "in_channels", "out_channels", "wrap")}


def _validate_model_kind_fields(m: ModelConfig) -> None:
    """A field only the other kind builds must keep its default: the model would silently not have it (e.g. a GPT's
    ``model.window: 16`` meant as its sliding window, which is model.attention_window)."""
    defaults = ModelConfig()
    for kind, names in KIND_FIELDS.items():
        if kind == m.kind:
            continue
        for name in names:
            value = getattr(m, name)
            if value != getattr(defaults, name):
                hint = "; a GPT's sliding window is model.attention_window" if name == "window" else ""
                raise ConfigError(f"model.{name} = {value!r} is a {kind} field: model.kind = {m.kind} does not build "
                                  f"it; remove it{hint}")


def _validate_data(cfg: Config) -> None:
    _check_bounds(cfg, "data")
    d = cfg.data
    if d.path is not None:
        _check_text("data.path", d.path, "a dataset path or null")
    _check_text("data.tokenizer", d.tokenizer, "byte or the path of a tokenizer.json")
    if d.prepare not in PREPARE_CORPORA:
        raise ConfigError(f"data.prepare = {d.prepare!r}: valid values are null (the dataset must exist) or "
                          f"{', '.join(c for c in PREPARE_CORPORA if c)}")
    if d.image is not None:
        _check_int_list("data.image", d.image, 2, 1, "[H, W] (two positive integers) or null")
    docs = d.document_options_on
    if docs and cfg.model.kind != "gpt":
        raise ConfigError(f"data.{docs[0]} = true with model.kind = {cfg.model.kind}: packed documents apply to "
                          "token sequences (model.kind = gpt); Swin windows have no documents")


def _validate_parallel(cfg: Config) -> None:
    _check_bounds(cfg, "parallel")
    p = cfg.parallel
    gh, gw = cfg.wp_grid
    if gh < 1 or gw < 1:
        raise ConfigError(f"parallel.wp = {p.wp!r}: expected [gh, gw] (two positive integers) or an integer")
    if p.fsdp:
        _validate_fsdp(cfg)


#: parallel.deepspeed keys that dist-train's own fields set (engines/deepspeed.deepspeed_config, or what it passes to
#: deepspeed.initialize): the field to set instead
_DEEPSPEED_OWNED = {"bf16": "train.precision", "fp16": "train.precision (fp16 is not supported)",
                    "optimizer": "train.lr, train.betas, train.weight_decay (dist-train passes its AdamW)",
                    "scheduler": "train.warmup_steps, train.min_lr_ratio (dist-train passes its schedule)",
                    "train_batch_size": "train.global_batch (DeepSpeed derives it)"}


#: parallel.deepspeed keys DeepSpeed applies only through a part of it dist-train does not use (the part, and what
#: dist-train reads instead): DeepSpeed's config takes them and nothing acts on them
_DEEPSPEED_INERT = {
    "activation_checkpointing": ("deepspeed.checkpointing, which dist-train's models do not call",
                                 "set train.activation_checkpointing"),
    "pipeline": ("its PipelineModule / pipeline engine", "set parallel.pp, parallel.pp_schedule, parallel.microbatches"),
    "checkpoint": ("its save_checkpoint / load_checkpoint (dist-train writes its own)", "set checkpoint.*"),
    "dataloader_drop_last": ("its own data loader (dist-train feeds its own batches)", "remove it"),
    "sparse_attention": ("its sparse-attention modules (dist-train's attention is its own)",
                         "set parallel.attn_kernel or model.attention_window"),
}


def deepspeed_generated(cfg: Config) -> dict[str, tuple[str, Any]]:
    """The DeepSpeed config keys generated from dist-train's own fields (``engines/deepspeed.deepspeed_config``
    writes these values; validation refuses a ``parallel.deepspeed`` key that contradicts one): key -> (the
    field(s) it comes from, its value)."""
    t = cfg.train
    return {"train_micro_batch_size_per_gpu": ("train.micro_batch", t.micro_batch),
            "gradient_accumulation_steps": ("train.global_batch / (train.micro_batch x parallel.dp)",
                                            cfg.grad_accum_steps),
            "gradient_clipping": ("train.grad_clip", float(t.grad_clip or 0.0))}


#: DeepSpeed 0.19.8's default ``zero_optimization.reduce_bucket_size``, in elements (deepspeed/runtime/zero/config.py)
DEEPSPEED_REDUCE_BUCKET_DEFAULT = 500_000_000


def user_zero_optimization(cfg: Config) -> dict:
    """``parallel.deepspeed.zero_optimization`` as the user wrote it ({} when absent or not a mapping: DeepSpeed's own
    config check refuses a non-mapping block; every reader here then sees no key). The one place that lookup lives:
    the memory model, validation and the engine's NVMe check read the block through it."""
    zero = (cfg.parallel.deepspeed or {}).get("zero_optimization")
    return zero if isinstance(zero, dict) else {}


def zero_reduce_bucket_elements(cfg: Config, trainable_params: float) -> int:
    """Elements of each gradient bucket DeepSpeed's ZeRO optimizer allocates (``zero_optimization.reduce_bucket_size``)
    on a rank whose module holds ``trainable_params`` parameters (tp-local, each tied one once): the user's value when
    ``parallel.deepspeed`` sets one, else ``min(DeepSpeed's default, trainable_params)``.

    Why: DeepSpeed allocates the bucket at its full size whatever the model (ZeRO-3 when the engine is built, ZeRO-1/2
    at each backward), 2.0 GB in fp32 for its default of 5e8 elements. A bucket collects parameters' full gradients
    before they are reduced (ZeRO-3: reduce-scattered), so ``trainable_params`` elements hold every gradient of a
    backward: one bucket, as the default gives any model below 5e8 parameters, hence the same reductions in the same
    order (bit-identical), and above 5e8 parameters the default itself."""
    user = _user_zero_int(cfg, "reduce_bucket_size")
    if user is not None:
        return user
    return int(min(DEEPSPEED_REDUCE_BUCKET_DEFAULT, max(1, trainable_params)))


#: DeepSpeed 0.19.8's default ``zero_optimization.stage3_param_persistence_threshold``, in elements
#: (deepspeed/runtime/zero/config.py)
DEEPSPEED_PERSISTENCE_THRESHOLD_DEFAULT = 100_000


def _user_zero_int(cfg: Config, alias: str, name: Optional[str] = None) -> Optional[int]:
    """A ZeRO key of ``parallel.deepspeed.zero_optimization`` as an integer, by its alias (``stage3_…``) or its field
    name (DeepSpeed's config takes either: ``populate_by_name``); None when the user sets neither. A value that is no
    number of elements is refused in one line here: the memory model (the launch pre-flight's first check) reads it
    before DeepSpeed's own config check could refuse it."""
    zero = user_zero_optimization(cfg)
    key = alias if alias in zero or name is None else name
    value = zero.get(key)
    if value is None:
        return None
    try:
        elements = int(float(value))
    except (TypeError, ValueError, OverflowError):
        elements = -1
    if elements < 0:
        raise ConfigError(f"parallel.deepspeed.zero_optimization.{key} = {value!r}: not a number of elements "
                          "(a whole number >= 0)")
    return elements


def zero3_persistence(cfg: Config) -> tuple[int, Optional[int]]:
    """(param threshold, model cap) of DeepSpeed 0.19.8's ZeRO-3 persistent parameters: every parameter of at most
    ``stage3_param_persistence_threshold`` elements (default :data:`DEEPSPEED_PERSISTENCE_THRESHOLD_DEFAULT`), taken
    in module order while their running total stays within ``stage3_model_persistence_threshold`` (None: no cap,
    DeepSpeed's default), stays whole on every rank after its first use (parameter_offload.py
    ``mark_persistent_parameters``; the coordinator never releases it, stage3.py gathers it again after each step),
    on top of its partition. The user's values when ``parallel.deepspeed`` sets them."""
    threshold = _user_zero_int(cfg, "stage3_param_persistence_threshold", "param_persistence_threshold")
    cap = _user_zero_int(cfg, "stage3_model_persistence_threshold", "model_persistence_threshold")
    return (DEEPSPEED_PERSISTENCE_THRESHOLD_DEFAULT if threshold is None else threshold), cap


#: DeepSpeed 0.19.8's defaults of the ZeRO-3 gather knobs, in elements (deepspeed/runtime/zero/config.py):
#: ``stage3_prefetch_bucket_size``, ``stage3_max_live_parameters``, ``stage3_max_reuse_distance``
DEEPSPEED_PREFETCH_BUCKET_DEFAULT = 50_000_000
DEEPSPEED_MAX_LIVE_DEFAULT = 1_000_000_000
DEEPSPEED_MAX_REUSE_DEFAULT = 1_000_000_000


@dataclass(frozen=True)
class Zero3Gathers:
    """DeepSpeed 0.19.8's ZeRO-3 gather knobs, in elements (partitioned_param_coordinator.py): ``prefetch_bucket``
    caps each prefetch's all-gather, ``max_live`` the gathered parameters a prefetch may bring the total to,
    ``max_reuse`` how far ahead (in parameter elements of the traced modules) a released module's parameters may be
    used again and so stay gathered."""
    prefetch_bucket: int
    max_live: int
    max_reuse: int

    @property
    def prefetches(self) -> bool:
        """Whether the coordinator prefetches at all: a prefetch gathers ``min(max_live - live, prefetch_bucket)``."""
        return self.prefetch_bucket > 0 and self.max_live > 0


def zero3_gathers(cfg: Config) -> Zero3Gathers:
    """The ZeRO-3 gather knobs a DeepSpeed engine of ``cfg`` runs with: the user's values when
    ``parallel.deepspeed.zero_optimization`` sets them (by alias or field name), else DeepSpeed's defaults."""
    def knob(alias: str, default: int) -> int:
        value = _user_zero_int(cfg, alias, alias.removeprefix("stage3_"))
        return default if value is None else value
    return Zero3Gathers(knob("stage3_prefetch_bucket_size", DEEPSPEED_PREFETCH_BUCKET_DEFAULT),
                        knob("stage3_max_live_parameters", DEEPSPEED_MAX_LIVE_DEFAULT),
                        knob("stage3_max_reuse_distance", DEEPSPEED_MAX_REUSE_DEFAULT))


def zero_bucket_buffers(cfg: Config) -> int:
    """How many gradient buckets of :func:`zero_reduce_bucket_elements` DeepSpeed 0.19.8's ZeRO optimizer allocates
    (one set per communication dtype; dist-train's engine has one, the model's): none without
    ``contiguous_gradients`` (on by default); ZeRO-1/2 two with ``overlap_comm`` (a double buffer; off by default
    below stage 3), else one (stage_1_and_2.py ``setup_buckets``); ZeRO-3 one (stage3.py). None without ZeRO."""
    stage = cfg.parallel.zero_stage
    zero = user_zero_optimization(cfg)
    if not stage or not zero.get("contiguous_gradients", True):
        return 0
    return 2 if stage < 3 and zero.get("overlap_comm", False) else 1


def nvme_optimizer_offload(cfg: Config) -> bool:
    """True when DeepSpeed offloads the optimizer state to NVMe (``parallel.deepspeed.zero_optimization.
    offload_optimizer.device = nvme``): it swaps the state out, where the ZeRO checkpoint adapter, which reads and
    fills the partitions in place, cannot reach it (checkpoint/adapters.py ``DeepSpeedStateAdapter``)."""
    offload = user_zero_optimization(cfg).get("offload_optimizer") if cfg.parallel.zero_stage is not None else None
    return isinstance(offload, dict) and offload.get("device") == "nvme"


def checkpoint_blocker(cfg: Config) -> Optional[str]:
    """Why this run can write no checkpoint at all, as one clause naming the key and what would make the run
    resumable (None: it can). Validation accepts such a run only when it never saves on its own; the one save left
    is a preemption's, which the trainer skips for it rather than start a save (collective) known to fail."""
    if nvme_optimizer_offload(cfg):
        return ("parallel.deepspeed.zero_optimization.offload_optimizer.device = nvme swaps the optimizer state out, "
                "where a checkpoint cannot read it (to make the run resumable: device cpu or none, and "
                "checkpoint.every > 0)")
    return None


def _validate_deepspeed_keys(cfg: Config) -> None:
    """``parallel.deepspeed`` is merged over the DeepSpeed config generated from dist-train's own fields: a key
    there that differs would silently override them (the run would do other than its config, and every
    checkpoint's recorded config, says: e.g. gradient_clipping 1e-6 under train.grad_clip 1.0), and without
    ZeRO nothing reads it. Equal values, and keys dist-train does not generate, pass."""
    ds, p = cfg.parallel.deepspeed or {}, cfg.parallel
    if not ds:
        return
    if p.zero_stage is None:
        raise ConfigError(f"parallel.deepspeed is set but parallel.zero_stage is null: the DDP engine runs and "
                          f"ignores it ({', '.join(sorted(ds))}); set parallel.zero_stage (0-3) or remove it")
    zero = user_zero_optimization(cfg)
    for key, (field_name, value) in deepspeed_generated(cfg).items():
        if key in ds and ds[key] != value:
            raise ConfigError(f"parallel.deepspeed.{key} = {ds[key]!r} contradicts {field_name} = {value!r}, which "
                              "dist-train generates it from; set that instead")
    if "stage" in zero and zero["stage"] != p.zero_stage:
        raise ConfigError(f"parallel.deepspeed.zero_optimization.stage = {zero['stage']!r} contradicts "
                          f"parallel.zero_stage = {p.zero_stage}; set parallel.zero_stage instead")
    # each key the configured stage's optimizer never reads, or dist-train cannot honour (zero_keys.ZERO_KEYS: where
    # DeepSpeed reads it), before the NVMe check: DeepSpeed's config takes any of them at any stage
    for key in sorted(zero):
        refusal = zero_key_refusal(key, p.zero_stage)
        if refusal is not None:
            raise ConfigError(refusal)
    if zero:
        ck = cfg.checkpoint
        if nvme_optimizer_offload(cfg) and (ck.every or ck.at_end or ck.resume != "none" or cfg.train.exit_interval):
            # checkpoint/adapters.py DeepSpeedStateAdapter: saves and loads read and fill the partitions in place
            raise ConfigError("parallel.deepspeed.zero_optimization.offload_optimizer.device = nvme with checkpoints: "
                              "dist-train saves and loads the optimizer state in place, which NVMe offload swaps out; "
                              "use device cpu, or checkpoint.every 0, checkpoint.at_end false, checkpoint.resume none "
                              "and train.exit_interval 0 (it saves before it exits)")
    for key, field_name in _DEEPSPEED_OWNED.items():
        value = ds.get(key)
        if key == "bf16" and not (isinstance(value, dict) and "enabled" in value):
            continue  # bf16 sub-options other than enabled are DeepSpeed's own
        if key in ds:
            what = f"{key}.enabled" if key == "bf16" else key
            raise ConfigError(f"parallel.deepspeed.{what}: set {field_name} instead; dist-train sets it")
    for key, (through, instead) in _DEEPSPEED_INERT.items():
        if key in ds:
            raise ConfigError(f"parallel.deepspeed.{key}: DeepSpeed applies it only through {through}, so it would be "
                              f"silently ignored; {instead}")


def _validate_train(cfg: Config) -> None:
    _check_bounds(cfg, "train")
    t, p = cfg.train, cfg.parallel
    if not (isinstance(t.betas, list) and len(t.betas) == 2 and all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in t.betas)):
        raise ConfigError(f"train.betas = {t.betas!r}: expected two numbers in [0, 1), e.g. [0.9, 0.95]")
    lc = t.loss_chunk
    if lc not in ("auto", "full") and (not isinstance(lc, int) or isinstance(lc, bool) or not 1 <= lc <= MAX_SEQ):
        raise ConfigError(f"train.loss_chunk = {lc!r}: must be a positive number of tokens (e.g. 2048), auto "
                          "(chunks of 64 MiB of logits) or full (unchunked [B, S, V] logits)")
    if t.global_batch % (t.micro_batch * p.dp):
        raise ConfigError(
            f"train.global_batch = {t.global_batch} is not a multiple of micro_batch * dp = "
            f"{t.micro_batch} * {p.dp} = {t.micro_batch * p.dp}; e.g. global_batch = "
            f"{max(1, round(t.global_batch / (t.micro_batch * p.dp))) * t.micro_batch * p.dp}")
    _validate_trackers(t.trackers)
    _validate_validation(cfg)
    if t.on_nonfinite == "skip" and p.zero_stage is not None:
        raise ConfigError(f"train.on_nonfinite = skip with parallel.zero_stage = {p.zero_stage}: DeepSpeed applies "
                          "its optimizer step itself; use on_nonfinite: stop (or zero_stage: null)")


TRACKERS = ("jsonl", "tensorboard", "wandb")
#: the Python package each tracker needs (jsonl: none)
TRACKER_PACKAGES = {"jsonl": None, "tensorboard": "tensorboard", "wandb": "wandb"}


def default_trackers() -> list[str]:
    """``train.trackers: null``: metrics.jsonl, plus TensorBoard event files when tensorboard is installed."""
    return ["jsonl"] + (["tensorboard"] if importlib.util.find_spec("tensorboard") is not None else [])


def _validate_trackers(trackers: Any) -> None:
    if trackers is None:
        return
    if not isinstance(trackers, list) or any(t not in TRACKERS for t in trackers) or len(set(trackers)) != len(trackers):
        raise ConfigError(f"train.trackers = {trackers!r}: expected a list of distinct names from "
                          f"{', '.join(TRACKERS)} (or null: jsonl + tensorboard when installed)")
    for t in trackers:
        pkg = TRACKER_PACKAGES[t]
        if pkg is not None and importlib.util.find_spec(pkg) is None:
            raise ConfigError(f"train.trackers: {t} is configured but the {pkg} package is not installed "
                              f"(pip install {pkg}, or remove {t} from train.trackers)")


def parse_split(split: str) -> tuple[float, float, float]:
    """Megatron's ``--split``: "98,2,0" (or "98,2", "0.9,0.1") -> normalised (train, valid, test) fractions."""
    try:
        w = [float(x) for x in str(split).replace("/", ",").split(",")]
    except ValueError:
        w = []
    if not 1 <= len(w) <= 3 or any(not math.isfinite(x) or x < 0 for x in w) or sum(w) <= 0:
        raise ConfigError(f"data.split = {split!r}: expected train,valid[,test] weights >= 0, e.g. \"98,2,0\"")
    w += [0.0] * (3 - len(w))
    return (w[0] / sum(w), w[1] / sum(w), w[2] / sum(w))


def _validate_validation(cfg: Config) -> None:
    d, t = cfg.data, cfg.train
    if d.valid_path is not None:
        _check_text("data.valid_path", d.valid_path, "a dataset prefix or null")
        if d.source != "indexed":
            raise ConfigError(f"data.valid_path is set with data.source = {d.source}: a held-out dataset file is "
                              "read by the indexed source; use data.split for weather, nothing for synthetic")
    if d.split is not None:
        if d.source == "synthetic":
            raise ConfigError("data.split with data.source = synthetic: synthetic data validates on a held-out "
                              "seed; remove data.split")
        train_frac, valid_frac, _ = parse_split(d.split)
        if train_frac <= 0:
            raise ConfigError(f"data.split = {d.split!r}: the training share is 0")
        if d.valid_path is not None and valid_frac > 0:
            raise ConfigError(f"data.split = {d.split!r}: holds out {100 * valid_frac:g}% of data.path for validation, but "
                              "data.valid_path is set and validation reads only it, so that share would never be read; "
                              "give the split no validation share (e.g. \"100,0,0\") or remove data.valid_path")
        if t.eval_every and d.valid_path is None and valid_frac <= 0:
            raise ConfigError(f"data.split = {d.split!r} has no validation share but train.eval_every = "
                              f"{t.eval_every}: give it one, e.g. \"98,2,0\"")
    if t.eval_every and d.source == "weather" and d.split is None:
        raise ConfigError(f"train.eval_every = {t.eval_every} needs held-out data: set data.split (e.g. \"90,10,0\": "
                          "the last 10% of the weather time steps held out; data.valid_path is for indexed token data)")
    if t.eval_every and d.source != "synthetic" and d.valid_path is None and d.split is None:
        raise ConfigError(f"train.eval_every = {t.eval_every} needs held-out data: set data.valid_path (an indexed "
                          "dataset prefix) or data.split (e.g. \"98,2,0\")")


def _validate_checkpoint(cfg: Config) -> None:
    _check_bounds(cfg, "checkpoint")
    c = cfg.checkpoint
    unread = resume_unread_keys(cfg.model.kind)
    resumable = [k for k in [f"model.{f.name}" for f in fields(ModelConfig)] + list(RESUME_CHECKED_KEYS)
                 if k not in unread]  # checkpoint/compat.py compares these
    for key in c.allow_config_change:
        if key not in resumable:
            raise ConfigError(f"checkpoint.allow_config_change: {key!r} is not a key a resume compares; valid: "
                              f"{', '.join(resumable)}")
    _check_text("checkpoint.resume", c.resume, "auto, none or the path of a checkpoint")
    if c.dir is not None:
        _check_dir_path("checkpoint.dir", c.dir, "a directory path or null (run.dir/checkpoints)")


def _validate_launch(cfg: Config) -> None:
    _check_bounds(cfg, "launch")
    if cfg.launch.address is not None:
        _check_text("launch.address", cfg.launch.address, "a Ray cluster address (host:port, auto) or null")
    if cfg.launch.bind is not None:
        _check_text("launch.bind", cfg.launch.bind, "an address or host name of rank 0's node, 'all', or null "
                                                  "(MASTER_ADDR's interface)")


def check_unprofiled(cfg: Config, command: str, why: str, label: str = "") -> None:
    """Refuse (ConfigError, one line) a profiled config (``profile.steps`` set) in ``command``, which times its steps
    or trains in run directories it deletes (``why`` says which; ``label`` goes first, e.g. ``baseline: ``): the traces
    would be lost or the timings carry the profiler's overhead. ``dist-train bench train``, ``bench launch`` and
    ``scale`` share this one check; torch-free (bench launch checks its arguments before importing torch)."""
    if cfg.profile.steps is not None:
        raise ConfigError(f"{label}profile.steps = {cfg.profile.steps}: {command} {why}; trace steps with dist-train "
                          "launch (run.dir/profile/)")


#: profile keys that act on a profiled window only (refused, as unread, without profile.steps)
PROFILE_WINDOW_KEYS = ("ranks", "memory", "record_shapes", "with_stack")


def _validate_profile(cfg: Config) -> None:
    """``profile.steps``: [first, last] global steps of this run, both traced; ``profile.ranks``: distinct ranks (each
    below the world size: ``profiling.check_profile``, the training pre-flight's, since ``dist-train eval`` loads a
    training config at any world size)."""
    pr, n = cfg.profile, cfg.train.steps
    if pr.steps is not None:
        _check_int_list("profile.steps", pr.steps, 2, 1, f"[first, last]: global steps 1 <= first <= last <= "
                        f"train.steps = {n}, both traced (e.g. [3, 4]), or null (off)")
        first, last = pr.steps
        if first > last:
            raise ConfigError(f"profile.steps = {pr.steps!r}: first > last; [first, last] are both traced, e.g. "
                              f"[{last}, {first}] (one step: [{first}, {first}])")
        if last > n:
            raise ConfigError(f"profile.steps = {pr.steps!r}: step {last} is after the run's last step (train.steps = "
                              f"{n}); trace steps within 1..{n}")
    if pr.ranks is not None and not (isinstance(pr.ranks, list) and pr.ranks and all(
            isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in pr.ranks)
            and len(set(pr.ranks)) == len(pr.ranks)):
        raise ConfigError(f"profile.ranks = {pr.ranks!r}: expected a list of distinct ranks >= 0 (e.g. [0]), or null "
                          "(every rank)")


def _validate_fsdp(cfg: Config) -> None:
    """FSDP2 shards over the grad axes (dp × wp × cp) and replaces DDP / DeepSpeed as the data-parallel engine."""
    p = cfg.parallel
    gh, gw = cfg.wp_grid
    if p.zero_stage is not None:
        raise ConfigError(f"parallel.fsdp with parallel.zero_stage = {p.zero_stage}: two data-parallel engines; "
                          "FSDP2 already shards parameters, gradients and optimizer state (ZeRO-3), set "
                          "zero_stage: null (or fsdp: false to use DeepSpeed)")
    if p.dp * p.cp * gh * gw == 1:
        raise ConfigError("parallel.fsdp needs ranks to shard over: dp × cp × wp = 1; set parallel.dp >= 2 "
                          "(or fsdp: false)")


def _validate_gpt(cfg: Config) -> None:
    m, p, d = cfg.model, cfg.parallel, cfg.data
    if d.source == "weather":
        raise ConfigError("data.source = 'weather' needs model.kind = swin; a gpt trains on indexed or synthetic")
    if d.eod_id is not None and d.eod_id >= m.vocab_size:
        raise ConfigError(f"data.eod_id = {d.eod_id} is outside model.vocab_size = {m.vocab_size} (valid ids 0.."
                          f"{m.vocab_size - 1})")
    if cfg.wp_grid != (1, 1):
        raise ConfigError(f"parallel.wp = {list(cfg.wp_grid)}: window parallelism needs model.kind = swin")
    kv = m.n_kv_heads or m.n_heads
    if m.head_dim is None and m.d_model % m.n_heads:
        raise ConfigError(f"model.d_model = {m.d_model} is not divisible by model.n_heads = {m.n_heads} (or set "
                          "model.head_dim)")
    if m.n_heads % kv:
        raise ConfigError(f"model.n_heads = {m.n_heads} is not divisible by model.n_kv_heads = {kv}")
    if m.head_dim is not None and m.head_dim % 2:
        raise ConfigError(f"model.head_dim = {m.head_dim}: must be even for RoPE (or null: d_model / n_heads)")
    if attention_head_dim(m) % 2:
        raise ConfigError(f"head dim d_model/n_heads = {attention_head_dim(m)} must be even for RoPE (or set an even "
                          "model.head_dim)")
    validate_rope_scaling(m.rope_scaling)
    if m.n_heads % p.tp:
        raise ConfigError(f"model.n_heads = {m.n_heads} is not divisible by parallel.tp = {p.tp}: heads are split "
                          f"over tp; use tp in {divisors(m.n_heads)}")
    if kv % p.tp:
        raise ConfigError(f"model.n_kv_heads = {kv} is not divisible by parallel.tp = {p.tp}: KV heads are split "
                          f"over tp, not replicated; use tp in {divisors(kv)}")
    ffn = ffn_hidden_size(m)
    if ffn % p.tp:
        raise ConfigError(f"FFN hidden size {ffn} is not divisible by parallel.tp = {p.tp}; set model.ffn_hidden to a "
                          f"multiple of {p.tp}, e.g. {-(-ffn // p.tp) * p.tp}")
    if p.sequence_parallel and p.tp > 1:
        # the residual stream is split over tp along the (cp-local, padded) sequence
        mult = 1 if p.cp == 1 else (2 * p.cp if p.cp_layout == "zigzag" else p.cp)
        s_local = -(-d.seq_len // mult) * mult // p.cp
        if s_local % p.tp:
            raise ConfigError(f"parallel.sequence_parallel: per-cp-rank sequence length {s_local} (data.seq_len = "
                              f"{d.seq_len}, cp = {p.cp}) is not divisible by parallel.tp = {p.tp}; use a "
                              f"data.seq_len that is a multiple of {mult * p.tp}")
    n_stages = p.pp * virtual_stages(cfg)
    if m.n_layers < n_stages:
        raise ConfigError(f"model.n_layers = {m.n_layers} < {n_stages} pipeline stages (pp = {p.pp}, schedule "
                          f"{p.pp_schedule}): each stage needs a layer")
    if p.pp > 1:
        _validate_pipeline(cfg)
        if m.tie_embeddings:
            raise ConfigError(f"model.tie_embeddings with parallel.pp = {p.pp} is not supported (embedding and "
                              "head live on different stages)")
    if p.cp_method == "ulysses" and p.ulysses_degree not in (1, p.cp):
        raise ConfigError(f"parallel.ulysses_degree = {p.ulysses_degree} with cp_method = ulysses must equal "
                          f"parallel.cp = {p.cp}")
    if p.cp_method == "hybrid" and (p.cp % p.ulysses_degree):
        raise ConfigError(f"parallel.cp = {p.cp} is not divisible by parallel.ulysses_degree = {p.ulysses_degree}")
    if p.cp_method in ("ulysses", "hybrid"):
        deg = p.cp if p.cp_method == "ulysses" else p.ulysses_degree
        heads_local = m.n_heads // p.tp
        if heads_local % deg:
            what = "parallel.cp" if p.cp_method == "ulysses" else "parallel.ulysses_degree"
            raise ConfigError(f"model.n_heads / tp = {heads_local} is not divisible by the Ulysses degree {deg} "
                              f"({what}): all-to-all splits the heads; use {what} in {divisors(heads_local)}, or "
                              "parallel.cp_method: ring")


def divisors(n: int) -> list[int]:
    """Every positive divisor of ``n``, ascending: the valid degrees of a parallelism that splits ``n`` things."""
    return [k for k in range(1, n + 1) if n % k == 0]


def validate_rope_scaling(scaling: Optional[dict]) -> None:
    """model.rope_scaling: null or a complete llama3 mapping (other scalings are not implemented)."""
    if scaling is None:
        return
    example = ("e.g. {rope_type: llama3, factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, "
               "original_max_position_embeddings: 8192}")
    if scaling.get("rope_type") != "llama3":
        raise ConfigError(f"model.rope_scaling.rope_type = {scaling.get('rope_type')!r}: the only implemented "
                          f"scaling is llama3 (or model.rope_scaling: null); {example}")
    if sorted(scaling) != sorted(LLAMA3_ROPE_KEYS):
        raise ConfigError(f"model.rope_scaling = {scaling!r}: a llama3 scaling has exactly the keys "
                          f"{', '.join(LLAMA3_ROPE_KEYS)}; {example}")
    nums = {k: scaling[k] for k in LLAMA3_ROPE_KEYS[1:]}
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 for v in nums.values()):
        raise ConfigError(f"model.rope_scaling = {scaling!r}: factor, low_freq_factor, high_freq_factor and "
                          "original_max_position_embeddings must be positive numbers")
    if not nums["high_freq_factor"] > nums["low_freq_factor"]:
        raise ConfigError(f"model.rope_scaling: high_freq_factor = {nums['high_freq_factor']} must be greater than "
                          f"low_freq_factor = {nums['low_freq_factor']}")


VIRTUAL_STAGES_INTERLEAVED = 2


def virtual_stages(cfg: Config) -> int:
    """Stages per pipeline rank: 2 for the interleaved schedule, else 1 (validation and the cost model)."""
    return VIRTUAL_STAGES_INTERLEAVED if cfg.parallel.pp > 1 and cfg.parallel.pp_schedule == "interleaved" else 1


def pipeline_microbatches(cfg: Config) -> int:
    """Micro-batches one pipelined step runs through the schedule: ``parallel.microbatches``, by default the
    accumulation count (the pipeline engine splits the rank's local batch into as many)."""
    return cfg.parallel.microbatches or cfg.grad_accum_steps


def step_micro_batches(cfg: Config) -> int:
    """Forward + backward passes one optimizer step runs on a rank: under a pipeline its micro-batches
    (:func:`pipeline_microbatches`: the engine splits the rank's local batch into as many), else the accumulation
    count of ``train.micro_batch``-sample micro-batches."""
    return pipeline_microbatches(cfg) if cfg.parallel.pp > 1 else cfg.grad_accum_steps


def micro_batch_samples(cfg: Config) -> int:
    """Samples in one of :func:`step_micro_batches`: ``train.micro_batch``, but under a pipeline the rank's local
    batch (global_batch / dp) divided by ``parallel.microbatches`` (micro_batch itself only when that is the
    accumulation count, its default)."""
    if cfg.parallel.pp > 1:
        return cfg.train.global_batch // cfg.parallel.dp // pipeline_microbatches(cfg)
    return cfg.train.micro_batch


def _validate_pipeline(cfg: Config) -> None:
    """pp > 1, any model: micro-batches that the schedule can run, no ZeRO."""
    p = cfg.parallel
    n_micro, local = pipeline_microbatches(cfg), cfg.train.global_batch // p.dp
    if n_micro < 1 or local % n_micro or (p.pp_schedule != "gpipe" and n_micro < p.pp) or (
            p.pp_schedule == "interleaved" and n_micro % p.pp):
        raise ConfigError(f"parallel.microbatches = {n_micro} (pp = {p.pp}, {p.pp_schedule}): must divide the "
                          f"{local} samples per dp rank, be >= pp for 1f1b/interleaved and a multiple of pp "
                          "for interleaved")
    if p.zero_stage is not None:
        raise ConfigError(f"parallel.zero_stage = {p.zero_stage} with parallel.pp = {p.pp} is not supported: "
                          "the pipeline engine reduces gradients itself; set zero_stage: null")


def _validate_swin(cfg: Config) -> None:
    m, d, p = cfg.model, cfg.data, cfg.parallel
    if d.source != "weather":
        raise ConfigError(f"data.source = {d.source!r}: model.kind = swin trains on data.source = weather")
    if not d.image or d.image[0] < 2 or d.image[1] < 4:
        raise ConfigError(f"data.image = {d.image!r}: the weather source needs [H, W] with H >= 2 and W >= 4")
    if m.in_channels < 1 or m.out_channels < 1:
        raise ConfigError(f"model.in_channels = {m.in_channels}, model.out_channels = {m.out_channels}: "
                          "a swin model needs both >= 1")
    if m.d_model % m.n_heads:
        raise ConfigError(f"model.d_model = {m.d_model} is not divisible by model.n_heads = {m.n_heads}")
    if p.sequence_parallel:
        raise ConfigError("parallel.sequence_parallel: not implemented for model.kind = swin (its tp regions keep "
                          "the whole tile on every tp rank); set sequence_parallel: false")
    ffn = swin_ffn_hidden_size(m)
    if ffn % p.tp:
        raise ConfigError(f"swin MLP hidden size {ffn} (model.ffn_hidden, default 4·d_model) is not divisible by "
                          f"parallel.tp = {p.tp}")
    n_stages = p.pp * virtual_stages(cfg)
    pairs = -(-m.n_layers // 2)
    if pairs < n_stages:
        raise ConfigError(f"parallel.pp = {p.pp} ({p.pp_schedule}): {n_stages} pipeline stages but model.n_layers = "
                          f"{m.n_layers} has {pairs} swin block pair(s); each stage needs a (plain, shifted) pair: "
                          f"use at most {pairs} stages")
    if p.pp > 1:
        _validate_pipeline(cfg)
        if p.fsdp:
            raise ConfigError(f"parallel.fsdp with parallel.pp = {p.pp} is not tested for model.kind = swin; use "
                              "fsdp: false (the pipeline engine reduces gradients itself) or pp = 1")
    _validate_swin_tiling(cfg)
    _validate_swin_cp_fields(p)
    if m.n_heads % (p.tp * p.cp):
        valid = [c for c in range(1, m.n_heads + 1) if m.n_heads % c == 0]
        raise ConfigError(f"model.n_heads = {m.n_heads} is not divisible by parallel.tp·cp = {p.tp}·{p.cp}: swin splits "
                          f"heads over tp and runs Ulysses inside windows over cp (n_heads/(tp·cp) heads per rank); "
                          f"tp·cp must be one of {valid}")


def _validate_swin_cp_fields(p: ParallelConfig) -> None:
    """Swin's cp is always Ulysses inside windows over the whole cp group (no ring, no sequence layout): a
    ring/hybrid setting would be silently ignored, so one that differs from its default is refused. ``ulysses``
    (what runs) and the defaults (``ring``, ``zigzag``, degree 1, whole shards) are accepted."""
    if p.cp == 1:
        return
    ignored = [f"{k} = {v!r}" for k, v, ok in (
        ("cp_method", p.cp_method, p.cp_method in ("ring", "ulysses")),
        ("ulysses_degree", p.ulysses_degree, p.ulysses_degree in (1, p.cp)),
        ("cp_layout", p.cp_layout, p.cp_layout == "zigzag"),
        ("cp_kv_piece", p.cp_kv_piece, p.cp_kv_piece is None)) if not ok]
    if ignored:
        raise ConfigError(f"parallel.{ignored[0]} with model.kind = swin and cp = {p.cp}: swin's cp is Ulysses inside "
                          f"windows over the whole cp group (bands of tile rows, no ring), so this would be ignored; "
                          f"remove it (docs/window_parallel.md)")


def _validate_swin_tiling(cfg: Config) -> None:
    """The tiling rules every swin rank applies when it builds its tile (``models/swin.SwinModel.layout``,
    ``parallelism.window.TileLayout.build``, ``share_rows``), here before any rank starts: they depend on the
    config alone. Arithmetic only: importing ``parallelism.window`` would import torch into the config."""
    m, p = cfg.model, cfg.parallel
    wh, ww = (m.window, m.window) if isinstance(m.window, int) else m.window
    gh, gw = cfg.wp_grid
    image = f"data.image = {list(cfg.data.image)} at model.patch_size = {m.patch_size}"
    grid_windows = []
    for axis, size, win, periodic in (("H", cfg.data.image[0], wh, m.wrap[0]), ("W", cfg.data.image[1], ww, m.wrap[1])):
        tokens = -(-size // m.patch_size)
        if periodic and tokens % win:
            raise ConfigError(f"model.wrap is periodic along {axis} but {image} gives {tokens} tokens along {axis}, "
                              f"not a multiple of the window {win}: make {axis} a multiple of patch_size·window = "
                              f"{m.patch_size * win} (or wrap {axis} false: the model then pads it)")
        grid_windows.append(-(-tokens // win))
    nh, nw = grid_windows
    if nh < gh or nw < gw:
        raise ConfigError(f"parallel.wp = [{gh}, {gw}]: {image} has {nh}×{nw} windows of {wh}×{ww}, and every tile "
                          f"needs at least one window row and column: use wp at most [{nh}, {nw}]")
    shortest = (nh // gh) * wh  # token rows of the shortest tile (earlier tiles take the extra window rows)
    if shortest < p.cp:
        raise ConfigError(f"parallel.cp = {p.cp} splits each tile's token rows over the cp ranks, but with "
                          f"parallel.wp = [{gh}, {gw}] the shortest tile has {shortest} rows: use cp <= {shortest}, "
                          f"or fewer wp grid rows")


def check_world_size(cfg: Config, world_size: int, where: str = "were launched") -> None:
    """The launched world must equal dp × tp × pp × cp × wp; ``where``: how the refusal says where the
    ``world_size`` ranks are (``dist-train submit``: "in the batch script")."""
    p = cfg.parallel
    gh, gw = cfg.wp_grid
    if cfg.world_size != world_size:
        parts = f"dp*tp*pp*cp*wp = {p.dp}*{p.tp}*{p.pp}*{p.cp}*{gh * gw} = {cfg.world_size}"
        raise ConfigError(f"parallel: {parts} but {world_size} ranks {where}")


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))

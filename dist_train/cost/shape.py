"""What a configuration looks like to the cost model: the model's shape (one sample) and one rank's share.

    sh = shape_of(cfg)                   # layers, widths, heads, vocabulary, tokens per sample, keys per query
    sh, loc = rank_inputs(cfg, prof)     # + per-rank quantities (tokens, ÷tp widths, pipeline loads, bytes/elem)
    cpx = cp_execution(cfg)              # how cp really runs: method, ring size, Ulysses degree, all-to-alls

Pure arithmetic on the typed config (no torch): the models build themselves from the same definitions
(``config.ffn_hidden_size``, :func:`token_grid`), so a shape counted here is the shape that trains.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from ..config import (Config, ConfigError, ModelConfig, attention_head_dim, ffn_hidden_size, micro_batch_samples,
                      swin_ffn_hidden_size)
from ..plan.profiles import DeviceProfile
from .layout import RankLoad, rank_loads


def mean_keys_per_query(seq_len: int, window: Optional[int], causal: bool = True) -> float:
    """Average number of keys each query attends to (the S_eff of the FLOP convention)."""
    if not causal:
        return float(seq_len)
    if window is None or window + 1 >= seq_len:
        return (seq_len + 1) / 2.0
    w = window + 1  # keys i-w..i inclusive
    # queries 0..w-1 see i+1 keys; the rest see w
    total = w * (w + 1) / 2 + (seq_len - w) * w
    return total / seq_len


def window_hw(m: ModelConfig) -> tuple[int, int]:
    """``model.window`` as (wh, ww): an int is a square window (the rule of
    ``parallelism.window.layout.as_pair``, which the swin model applies to the same value)."""
    w = m.window
    if isinstance(w, int):
        return (w, w)
    if isinstance(w, (list, tuple)) and len(w) == 2 and all(isinstance(v, int) for v in w):
        return (int(w[0]), int(w[1]))
    raise ConfigError(f"model.window = {w!r}: expected an int or a pair of ints [wh, ww]")


def token_grid(image_hw: tuple[int, int], patch: int, window: tuple[int, int]) -> tuple[int, int, int, int]:
    """(real token rows, real token cols, padded token rows, padded token cols) of an H×W image."""
    th, tw = -(-image_hw[0] // patch), -(-image_hw[1] // patch)
    return th, tw, -(-th // window[0]) * window[0], -(-tw // window[1]) * window[1]


@dataclass(frozen=True)
class Shape:
    """What the model looks like to the cost model (one sample)."""

    kind: str
    layers: int
    d: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int            # gpt: vocabulary; swin: outputs per token of the head (cout·p²)
    embed_in: int         # swin: inputs per token of the patch embedding (cin·p²); gpt: 0 (lookup)
    tokens: int           # tokens per sample (sequence length, or padded token grid)
    keys_per_query: float  # S_eff of the FLOP convention
    span: int             # keys a query's kernel spans (throughput lookup, s² memory)
    grid: tuple[int, int] = (0, 0)   # swin padded token grid
    window: tuple[int, int] = (0, 0)

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def layer_params(self) -> int:
        return int(sum(self.layer_tensors()))

    def layer_tensors(self, tp: int = 1) -> list[float]:
        """Elements of each parameter tensor of one layer on a tp rank, in module order (``named_parameters``). GPT
        (``models/gpt.Block``): attention_norm, wq, wk, wv, wo, ffn_norm, w1, w3, w2 — the norms replicated, the
        matmuls ÷tp. Swin (``models/swin.WindowBlock``): the relative position bias table (÷tp: by head), norm1's
        weight and bias, qkv's weight and bias (÷tp), proj's weight (÷tp) and bias, norm2's weight and bias, fc1's
        weight and bias (÷tp), fc2's weight (÷tp) and bias — the row-parallel biases (proj, fc2) replicated."""
        d, f = self.d, self.ffn
        if self.kind == "gpt":
            q, kv = self.q_dim * d / tp, self.kv_dim * d / tp
            return [d, q, kv, kv, q, d, f * d / tp, f * d / tp, f * d / tp]
        wh, ww = self.window
        table = self.heads * (2 * wh - 1) * (2 * ww - 1) / tp
        return [table, d, d, 3 * d * d / tp, 3 * d / tp, d * d / tp, d, d, d, f * d / tp, f / tp, d * f / tp, d]

    def embed_tensors(self, tp: int = 1) -> list[int]:
        """Elements of each parameter tensor of the input embedding on a tp rank: gpt the (padded) vocabulary's rows
        ÷tp; swin the patch embedding's weight and bias (replicated)."""
        return [self.vocab_rows(tp) * self.d] if self.kind == "gpt" else [self.embed_in * self.d, self.d]

    def final_norm_tensors(self) -> list[int]:
        """Elements of each parameter tensor of the final norm: gpt an RMSNorm's weight, swin a LayerNorm's weight
        and bias (replicated)."""
        return [self.d] if self.kind == "gpt" else [self.d, self.d]

    def head_tensors(self, tp: int = 1) -> list[int]:
        """Elements of each parameter tensor of the output head on a tp rank (an untied gpt's; a tied one has none of
        its own): gpt the (padded) vocabulary's rows ÷tp; swin the pixel head's weight and bias (replicated)."""
        return [self.vocab_rows(tp) * self.d] if self.kind == "gpt" else [self.vocab * self.d, self.vocab]

    def layer_replicated_params(self) -> int:
        """Parameters of one layer that tensor parallelism does not split: the norms (gpt: two RMSNorm
        weights; swin: two LayerNorms with bias, plus the biases of its two row-parallel linears, proj and
        fc2, which are added once after the tp sum)."""
        return 2 * self.d if self.kind == "gpt" else 6 * self.d

    def vocab_rows(self, tp: int = 1) -> int:
        """Output rows per tp rank: the vocabulary padded up to a multiple of tp, split (Megatron's
        vocab-parallel embedding/head, ``padded_vocab_size``); the swin's pixel head is replicated over tp."""
        return -(-self.vocab // tp) if self.kind == "gpt" else self.vocab

    def embed_params(self, tp: int = 1) -> int:
        return sum(self.embed_tensors(tp))

    def head_params(self, tp: int = 1) -> int:
        return sum(self.head_tensors(tp))

    def final_norm_params(self) -> int:
        return sum(self.final_norm_tensors())

    def params(self, tied: bool = False) -> int:
        return (self.layers * self.layer_params() + self.embed_params() + (0 if tied else self.head_params())
                + self.final_norm_params())


def shape_of(cfg: Config) -> Shape:
    """The model of ``cfg`` as the cost model sees it (swin needs ``data.image`` for its token grid)."""
    m = cfg.model
    if m.kind == "gpt":
        s = cfg.data.seq_len
        kv = m.n_kv_heads or m.n_heads
        w = m.attention_window
        return Shape("gpt", m.n_layers, m.d_model, m.n_heads, kv, attention_head_dim(m), ffn_hidden_size(m),
                     m.vocab_size, 0, s, mean_keys_per_query(s, w), min(s, (w or s) + 1))
    if not cfg.data.image:
        raise ValueError("data.image is not set: a swin plan needs the image size (--image H W)")
    win = window_hw(m)
    _, _, ph, pw = token_grid(tuple(cfg.data.image), m.patch_size, win)
    area = win[0] * win[1]
    p2 = m.patch_size ** 2
    return Shape("swin", m.n_layers, m.d_model, m.n_heads, m.n_heads, m.d_model // m.n_heads,
                 swin_ffn_hidden_size(m), m.out_channels * p2, m.in_channels * p2, ph * pw, float(area), area,
                 (ph, pw), win)


# ---------------------------------------------------------------------------------------------
def element_bytes(cfg: Config, prof: DeviceProfile) -> int:
    """Bytes per weight / activation element: train.precision when set (bf16 2, fp32 4), else (auto)
    the profile's (bf16 on the GPU profiles, fp32 on cpu) — what the trainer's autocast picks."""
    return {"bf16": 2, "fp32": 4}.get(cfg.train.precision, prof.bytes_per_elem)


@dataclass(frozen=True)
class RankShape:
    """Per-rank quantities of a layout (one micro-batch)."""

    tokens: float       # tokens this rank processes per micro-batch
    layers: int         # layers on the most loaded pipeline rank (all its stages)
    q: float            # local attention width (÷tp)
    kv: float
    f: float
    heads: float
    vocab: float        # output rows on this rank (padded vocabulary ÷ tp)
    grad_shards: int    # ranks holding replicas of the weights (dp·cp·wp): ZeRO shard factor
    bpe: int            # bytes per element (:func:`element_bytes`)
    loads: tuple[RankLoad, ...]  # what each pipeline rank holds, in pp order


def rank_inputs(cfg: Config, prof: DeviceProfile) -> tuple[Shape, RankShape]:
    """(shape, per-rank quantities) of ``cfg`` on ``prof``: the inputs of :func:`~dist_train.cost.memory.memory_model`."""
    sh = shape_of(cfg)
    return sh, rank_shape(cfg, sh, prof)


def rank_shape(cfg: Config, sh: Shape, prof: DeviceProfile) -> RankShape:
    """One micro-batch on one rank of ``cfg``'s layout (the most loaded pipeline rank's layers)."""
    p = cfg.parallel
    gh, gw = cfg.wp_grid
    tp = p.tp
    if sh.kind == "swin":
        ph, pw = sh.grid
        wh, ww = sh.window
        # tiles are window-aligned: the largest tile has ceil(windows / grid) windows per axis
        tile = math.ceil(ph // wh / gh) * wh * math.ceil(pw // ww / gw) * ww
        tokens = micro_batch_samples(cfg) * tile / p.cp
    else:
        tokens = micro_batch_samples(cfg) * sh.tokens / p.cp
    kv_heads_local = max(1.0, sh.kv_heads / tp)
    loads = tuple(rank_loads(cfg))
    return RankShape(tokens=tokens, layers=max(ld.layers for ld in loads), q=sh.q_dim / tp,
                     kv=kv_heads_local * sh.head_dim, f=sh.ffn / tp, heads=sh.heads / tp, vocab=sh.vocab_rows(tp),
                     grad_shards=p.dp * p.cp * gh * gw, bpe=element_bytes(cfg, prof), loads=loads)


@dataclass(frozen=True)
class CpExecution:
    """How context parallelism runs for a config — what the model executes, which is not always what
    ``parallel.cp_method`` says (a swin runs Ulysses whatever it says)."""

    method: str        # "none" (cp = 1), "ring", "ulysses" or "hybrid"
    ring: int          # ranks of one K/V ring (1: no ring)
    ulysses: int       # ranks of one all-to-all (1: no all-to-all)
    all_to_alls: int   # all-to-alls per layer and pass (the backward runs their adjoints, as many)
    kv_repeat: int = 1  # K/V heads repeated so each Ulysses rank gets whole groups (``ulysses.kv_replication``)


def cp_execution(cfg: Config) -> CpExecution:
    """The one definition of what ``cfg``'s cp runs, for every cost-model site.

    * swin (``models/swin.py``): Ulysses inside windows over the whole cp group, whatever
      ``parallel.cp_method`` says (the config accepts only its default ``ring`` and ``ulysses`` there):
      per block and pass one all-to-all of q|k|v (the three travel together) and one of the output;
    * gpt (``parallelism/context/attention.py``): ``ring`` over all cp ranks; ``ulysses`` over all of them
      (``ulysses_degree`` 1 means cp); ``hybrid``: all-to-alls inside groups of ``ulysses_degree``, a ring of
      cp / ulysses_degree across them (degree 1: the plain ring); an all-to-all each for q, k, v and one for
      the output; the K/V heads of this tp rank repeated when the Ulysses degree does not divide them
      (``parallelism.context.ulysses.kv_replication``: 1 when it does, u/Hkv when Hkv divides u, else Hq/Hkv)."""
    p = cfg.parallel
    if p.cp == 1:
        return CpExecution("none", 1, 1, 0)
    if cfg.model.kind == "swin":
        return CpExecution("ulysses", 1, p.cp, 2)
    if p.cp_method == "ulysses":
        ring, u = 1, p.cp
    elif p.cp_method == "hybrid" and p.ulysses_degree > 1:
        ring, u = p.cp // p.ulysses_degree, p.ulysses_degree
    else:
        return CpExecution("ring", p.cp, 1, 0)
    hq, hkv = cfg.model.n_heads // p.tp, max(1, (cfg.model.n_kv_heads or cfg.model.n_heads) // p.tp)
    repeat = 1 if hkv % u == 0 else u // hkv if u % hkv == 0 else hq // hkv
    return CpExecution(p.cp_method, ring, u, 4, repeat)


def recompute_scope(cfg: Config) -> str:
    """What activation checkpointing re-runs in the backward, as the model does it: "none"; "attention" (a
    GPT's selective: the attention core, with its cp exchanges); "layer" (a GPT's full, and a swin's full AND
    selective: ``SwinModel.run_blocks`` recomputes whole blocks, all-to-alls and halo rolls included)."""
    ck = cfg.train.activation_checkpointing
    if ck == "none":
        return "none"
    return "layer" if ck == "full" or cfg.model.kind == "swin" else "attention"


def recompute_runs_last_matmul(cfg: Config) -> bool:
    """Whether a layer's recompute re-runs its last matmul (the MLP's down projection, w2 / fc2). torch's
    non-reentrant checkpoint stops once the last tensor the backward needs is back (early stop). An aten matmul
    (``nn.Linear``, tp = 1) saves its inputs before its kernel runs, so the stop comes before w2 / fc2, whose
    output nothing saves; Megatron's row-parallel linear (tp > 1) is an autograd Function whose saved tensors are
    packed after its forward ran, so w2 / fc2's matmul runs again (the all-reduce after it does not). Under
    sequence parallelism the row-parallel layer is ``F.linear`` + a reduce-scatter
    (``models.tensor_parallel._sp_row``): cut again."""
    p = cfg.parallel
    return recompute_scope(cfg) == "layer" and p.tp > 1 and not p.sequence_parallel


def ring_piece_tokens(cfg: Config, loc: RankShape) -> float:
    """Tokens of one ring message: the rank's whole shard, or ``parallel.cp_kv_piece`` per sequence."""
    piece = cfg.parallel.cp_kv_piece
    return loc.tokens if piece is None else min(loc.tokens, micro_batch_samples(cfg) * piece)

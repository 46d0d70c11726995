"""FLOPs under the one convention, and the throughput accounting (tokens/s, TFLOP/s per device, MFU).

FLOP convention (stated wherever a number is printed; docs/metrics.md):
    training FLOPs per token = 6·N + 12·L·d_attn·S_eff
    N      = parameters that take part in matmuls (all Linear weights + the LM head; the input
             embedding lookup and norms are excluded)
    d_attn = n_heads · head_dim
    S_eff  = S/2 for causal attention (Megatron's halving of the score/value matmuls), min(w, S/2)-ish
             for a sliding window w (exactly: the mean number of keys a query sees), S for full attention.
PaLM/TorchTitan use S_eff = S for causal; our MFU is therefore the *lower*, useful-work figure.
With packed documents (data.document_mask) a query sees only its own document: S_eff is then the
step's Σᵢ Lᵢ·S_eff(Lᵢ) / Σᵢ Lᵢ over its documents (≈ Σ Lᵢ² / 2S causal), measured per step.

    fpt = train_flops_per_token(cfg)                    # what the trainer's MFU counts (per token / pixel token)
    thr = Throughput(fpt * tokens_per_sample * global_batch, tokens_per_step, world_size, peak_tflops)
    thr.metrics(step_time_s)                            # {"tokens_per_s", "tflops_per_device", "mfu"}
    flops_per_token(shape_of(cfg))                      # the planner's count (same as the trainer's for GPT)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

from ..config import Config
from .shape import Shape, mean_keys_per_query, shape_of

FLOP_CONVENTION = "6N + 12*L*d_attn*S_eff (causal S_eff = mean keys per query ~ S/2, Megatron halving)"
#: the same count for a Swin: its window attention is not causal, every query sees the whole window
SWIN_FLOP_CONVENTION = "6N + 12*L*d_attn*S_eff (swin: S_eff = window area wh*ww, non-causal window attention)"


def flop_convention(kind: str) -> str:
    """The convention line printed beside a model's FLOP numbers: ``FLOP_CONVENTION`` for a GPT (causal), the
    window-area reading of the same formula for a Swin (``model.kind``)."""
    return SWIN_FLOP_CONVENTION if kind == "swin" else FLOP_CONVENTION


def param_count(n: float) -> str:
    """A parameter count a person reads at a glance: 19,652 -> "19.7k", 124,475,904 -> "124M", 8.03e9 ->
    "8.03B" (three significant digits; a tiny model is not "0.0M"). The unit is chosen after rounding: 999,999 is
    "1M", not "1e+03k"."""
    n = float(f"{n:.3g}")
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.0f}"


def matmul_params(sh: Shape) -> int:
    """Parameters in matmuls (the 6N of the FLOP convention): every Linear weight and the head."""
    d, f = sh.d, sh.ffn
    if sh.kind == "gpt":
        return sh.layers * (d * (2 * sh.q_dim + 2 * sh.kv_dim) + 3 * d * f) + sh.vocab * d
    return sh.layers * (4 * d * d + 2 * d * f) + sh.embed_in * d + sh.vocab * d


def flops_per_token(sh: Shape) -> float:
    """Training FLOPs per token: 6·N_matmul + 12·L·d_attn·S_eff (S_eff: causal mean keys, or window area)."""
    return 6.0 * matmul_params(sh) + 12.0 * sh.layers * sh.q_dim * sh.keys_per_query


def recompute_flops_per_token(sh: Shape, scope: str, last_matmul: bool = False) -> float:
    """Forward FLOPs per token that activation checkpointing runs a second time in the backward (not useful work:
    the FLOP convention and MFU leave them out; the time model pays them), by
    :func:`~dist_train.cost.shape.recompute_scope`:

    * "none": 0;
    * "attention" (a GPT's selective, ``models/gpt.Attention``: ``checkpoint(attention, q, k, v, …)``): the
      attention core's forward, QKᵀ and PV over the keys each query sees — 4·L·d_attn·S_eff, a third of the
      convention's 12·L·d_attn·S_eff; the q/k/v/o projections and RoPE stay outside the checkpoint, no matmul
      of them runs again;
    * "layer" (full, ``checkpoint(layer, …)``): every matmul of the layers once more but the last, the MLP's down
      projection (w2 / fc2: torch's non-reentrant recompute stops early, once the tensors the backward needs
      are back, and nothing saves that matmul's output) — 2·(their matmul parameters − L·f·d) — + the core;
      ``last_matmul`` (:func:`~dist_train.cost.shape.recompute_runs_last_matmul`: Megatron's tp linears) with
      w2 / fc2 too."""
    if scope == "none":
        return 0.0
    core = 4.0 * sh.layers * sh.q_dim * sh.keys_per_query
    if scope == "attention":
        return core
    cut = 0 if last_matmul else sh.layers * sh.ffn * sh.d
    return 2.0 * (matmul_params(sh) - layerless_matmul_params(sh) - cut) + core


def layerless_matmul_params(sh: Shape) -> int:
    """Matmul parameters outside the layers: the head (and a swin's patch embedding)."""
    return sh.vocab * sh.d + (sh.embed_in * sh.d if sh.kind == "swin" else 0)


def attention_flops_per_key(sh: Shape) -> float:
    """Training FLOPs per token per attended key (the 12·L·d_attn of the convention)."""
    return 12.0 * sh.layers * sh.q_dim


def document_keys(cu_seqlens: Sequence[Sequence[int]], seq_len: int, window: Optional[int]) -> tuple[float, int]:
    """(keys attended summed over every query, tokens) of packed samples: each row holds one sample's
    document boundaries [0, …, S]; tokens past ``seq_len`` (layout padding) are not counted."""
    keys, tokens = 0.0, 0
    for row in cu_seqlens:
        for a, b in zip(row, row[1:]):
            n = min(b, seq_len) - a
            if n > 0:
                keys += n * mean_keys_per_query(n, window)
                tokens += n
    return keys, tokens


def model_params(cfg: Config) -> int:
    """Every parameter of the full (unsharded) model: matmul weights, the input embedding when untied, norms
    (swin: biases and relative-position tables too)."""
    tied = cfg.model.tie_embeddings if cfg.model.kind == "gpt" else False
    return shape_of(cfg).params(tied)


def train_flops_per_token(cfg: Config) -> float:
    """Training FLOPs per token (GPT) or per pixel token (swin) as the trainer's MFU counts them: the
    convention above for GPT; for swin 6·(every parameter) + 12·L·d·window area (PaLM's count, no halving).
    The planner counts swin with matmul parameters only (:func:`flops_per_token`); the two differ by the
    biases, norms and position tables (7% on configs/swin_weather.yaml, whose model is tiny)."""
    sh = shape_of(cfg)
    if sh.kind == "gpt":
        return flops_per_token(sh)
    return 6 * sh.params() + 12 * sh.layers * sh.d * math.prod(sh.window)


@dataclass
class Throughput:
    """Per-step accounting under FLOP_CONVENTION: model FLOPs and tokens of one global batch."""
    flops_step: float
    tokens_step: float
    world_size: int
    peak_tflops: float
    flops_per_key: float = 0.0      # attention FLOPs per token per key (attention_flops_per_key)
    keys_per_query: float = 0.0     # the S_eff inside flops_step

    def tflops_per_device(self, step_time_s: float, keys_per_query: Optional[float] = None) -> float:
        flops = self.flops_step
        if keys_per_query is not None:      # packed documents: this step's S_eff replaces the default
            flops += self.tokens_step * self.flops_per_key * (keys_per_query - self.keys_per_query)
        return flops / step_time_s / self.world_size / 1e12

    def metrics(self, step_time_s: float, keys_per_query: Optional[float] = None) -> dict:
        tflops = self.tflops_per_device(step_time_s, keys_per_query)
        return {"tokens_per_s": self.tokens_step / step_time_s, "tflops_per_device": tflops,
                "mfu": tflops / self.peak_tflops}

"""Llama-style decoder: RMSNorm, RoPE with explicit (global) position ids, SwiGLU, grouped-query attention.

Parameter names follow Meta's Llama checkpoints (``tok_embeddings``, ``layers.i.attention.wq``, …) and
RoPE uses the HuggingFace *rotate-half* convention, so conversion to ``LlamaForCausalLM`` is a renaming.

    model = GPT(cfg.model, attn_ctx)
    loss_sum, count = model({"tokens": [B, S], "labels": [B, S], "positions": [S]})
    # packed documents (data.document_mask / reset_positions): "cu_seqlens": [B, N+1], "positions": [B, S]

Tensor parallelism (``tp``: a :class:`~dist_train.models.tensor_parallel.TensorParallel`) swaps the
projections for Megatron-core column/row-parallel linears, the embedding for a vocab-parallel one and
the loss for the vocab-parallel cross-entropy; parameter NAMES stay the same (shapes are this rank's
shard). Pipeline parallelism builds only this rank's layers (``layer_ids``; ``layers.<global index>``
keeps the tp=1/pp=1 names) and the embedding / head when this rank holds the first / last stage.
Sequence parallelism (``tp.sequence_parallel``): the residual stream and the RMSNorms hold [B, S/tp, d]
(this tp rank's contiguous chunk): the embedding output is scattered, each attention / FFN block
all-gathers its normed input into its column-parallel linears (``column_outputs``: one all-gather per
group, only the local chunk kept for backward, gathered again there) and its row-parallel output
reduce-scatters back, and the final norm output is gathered before the vocab-parallel head, so the loss
is the tp=1 loss.
Every parameter is initialised from its own generator seeded by (seed, name) as the full tp=1 tensor,
then sliced, so any tp/pp layout starts from exactly the same weights as the single-rank model.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..config import ModelConfig, attention_head_dim, ffn_hidden_size, resolve_loss_chunk
from ..cost.layout import stages_of_rank
from .attention import AttentionContext, attention
from .chunked_loss import chunked_cross_entropy
from .init import normal_full
from .lean_autograd import at_least_fp32, rms_norm, swiglu
from .tensor_parallel import (TensorParallel, column_outputs, copy_shard_, padded_vocab_size, parallel_linear,
                              unsharded_shape)

IGNORE_INDEX = -100


class RMSNorm(nn.Module):
    """x [..., dim] -> normalised x * weight, keeping only x and rstd [..., 1] (fp32) for backward
    (:func:`~dist_train.models.lean_autograd.rms_norm`). Under sequence parallelism (``tp``) x holds this rank's
    S/tp tokens and the weight gradient is summed over tp (``tp.replicated_weight``)."""

    def __init__(self, dim: int, eps: float, tp: Optional[TensorParallel] = None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight if self.tp is None else self.tp.replicated_weight(self.weight)
        return rms_norm(x, w, self.eps)


def rope_inv_freq(head_dim: int, theta: float, scaling: Optional[dict] = None,
                  device: Optional[torch.device] = None) -> torch.Tensor:
    """RoPE inverse frequencies [D/2] (fp32). scaling: None or a llama3 ``model.rope_scaling``, which
    divides the low frequencies (wavelength > original context / low_freq_factor) by ``factor``, keeps
    the high ones (wavelength < original context / high_freq_factor) and interpolates smoothly between."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    if scaling is None:
        return inv
    factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > context / lo, inv / factor, inv)
    smooth = (context / wavelen - lo) / (hi - lo)
    medium = (wavelen >= context / hi) & (wavelen <= context / lo)
    return torch.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype,
                 scaling: Optional[dict] = None):
    """positions: [S] or [B, S] global ids -> cos, sin broadcastable to [B, S, H, D]."""
    inv = rope_inv_freq(head_dim, theta, scaling, positions.device)
    ang = positions.float()[..., None] * inv  # [..., S, D/2]
    emb = torch.cat([ang, ang], dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    if positions.dim() == 1:
        return cos[None, :, None, :], sin[None, :, None, :]
    return cos[:, :, None, :], sin[:, :, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, S, H, D]; rotate-half convention (HF Llama)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    """Heads (query and KV) split over tp: wq/wk/wv column-parallel, wo row-parallel (config validation
    guarantees tp divides both head counts)."""

    def __init__(self, cfg: ModelConfig, ctx: AttentionContext, tp: Optional[TensorParallel] = None):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv = cfg.n_kv_heads or cfg.n_heads
        self.head_dim = attention_head_dim(cfg)
        self.ctx = ctx
        self.wq = parallel_linear(tp, cfg.d_model, self.n_heads * self.head_dim, "col")
        self.wk = parallel_linear(tp, cfg.d_model, self.n_kv * self.head_dim, "col")
        self.wv = parallel_linear(tp, cfg.d_model, self.n_kv * self.head_dim, "col")
        self.wo = parallel_linear(tp, self.n_heads * self.head_dim, cfg.d_model, "row")
        self.selective_checkpoint = False
        self.tp = tp

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: [B, S, d] ([B, S/tp, d] under sequence parallelism; the output has x's shape);
        cu_seqlens: packed document boundaries [B, N+1] (None: one document)."""
        # under sequence parallelism the three share one all-gather and keep only x's local chunk
        q, k, v = column_outputs(self.tp, x, (self.wq, self.wk, self.wv))
        b, s = q.shape[:2]
        q = apply_rope(q.view(b, s, -1, self.head_dim), cos, sin)
        k = apply_rope(k.view(b, s, -1, self.head_dim), cos, sin)
        v = v.view(b, s, -1, self.head_dim)
        if self.selective_checkpoint:
            # recompute only the attention core (its S×S-sized intermediates) in backward
            o = checkpoint(attention, q, k, v, self.ctx, cu_seqlens, use_reentrant=False)
        else:
            o = attention(q, k, v, self.ctx, cu_seqlens)
        return self.wo(o.reshape(b, s, -1))


class FeedForward(nn.Module):
    """SwiGLU (:func:`~dist_train.models.lean_autograd.swiglu`); w1/w3 column-parallel, w2 row-parallel under tp (one
    all-reduce per MLP)."""

    def __init__(self, cfg: ModelConfig, tp: Optional[TensorParallel] = None):
        super().__init__()
        hidden = ffn_hidden_size(cfg)
        self.w1 = parallel_linear(tp, cfg.d_model, hidden, "col")
        self.w3 = parallel_linear(tp, cfg.d_model, hidden, "col")
        self.w2 = parallel_linear(tp, hidden, cfg.d_model, "row")
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, S, d] ([B, S/tp, d] under sequence parallelism; the output has x's shape)."""
        gate, up = column_outputs(self.tp, x, (self.w1, self.w3))
        # keeps gate and up, recomputing silu(gate) in backward: with w2's input 3f per token, not 4f
        return self.w2(swiglu(gate, up))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: AttentionContext, tp: Optional[TensorParallel] = None):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps, tp)
        self.attention = Attention(cfg, ctx, tp)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, tp)
        self.feed_forward = FeedForward(cfg, tp)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, cu_seqlens)
        return x + self.feed_forward(self.ffn_norm(x))


class GPT(nn.Module):
    """Decoder-only LM. ``forward(batch) -> (loss_sum, count)`` over this rank's tokens.

    tp: tensor-parallel context (None: tp=1). layer_ids: global indices of the layers this rank holds
    (None: all). has_embedding / has_head: whether the token embedding / final norm + output head live
    here (pipeline first / last stage). init_seed: base seed of the per-parameter init (None: the
    current torch seed). loss_chunk: ``train.loss_chunk`` (tokens per chunk of the fused head +
    cross-entropy, "auto" or "full"; see :mod:`~dist_train.models.chunked_loss`).
    """

    def __init__(self, cfg: ModelConfig, ctx: Optional[AttentionContext] = None, activation_checkpointing: str = "none",
                 *, tp: Optional[TensorParallel] = None, layer_ids: Optional[Sequence[int]] = None,
                 has_embedding: bool = True, has_head: bool = True, init_seed: Optional[int] = None,
                 loss_chunk: Union[str, int] = "auto"):
        super().__init__()
        self.cfg = cfg
        self.loss_chunk = loss_chunk
        self.tp = tp
        ctx = ctx or AttentionContext(window=cfg.attention_window)
        self.head_dim = attention_head_dim(cfg)
        self.layer_ids = list(range(cfg.n_layers) if layer_ids is None else layer_ids)
        self.has_embedding, self.has_head = has_embedding, has_head
        if cfg.tie_embeddings and has_head != has_embedding:
            raise ValueError("model.tie_embeddings needs the embedding and the head on the same pipeline stage "
                             f"(has_embedding={has_embedding}, has_head={has_head})")
        if has_embedding:
            self.tok_embeddings = (nn.Embedding(cfg.vocab_size, cfg.d_model) if tp is None
                                   else tp.embedding(cfg.vocab_size, cfg.d_model))
        # ModuleDict keyed by the global index: names are layers.<i>.… exactly as with a ModuleList
        self.layers = nn.ModuleDict({str(i): Block(cfg, ctx, tp) for i in self.layer_ids})
        if has_head:
            self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, tp)
            vocab = cfg.vocab_size if tp is None else padded_vocab_size(cfg.vocab_size, tp.size)
            self.output = None if cfg.tie_embeddings else parallel_linear(tp, cfg.d_model, vocab, "col")
        self.activation_checkpointing = activation_checkpointing
        for layer in self.layers.values():
            layer.attention.selective_checkpoint = activation_checkpointing == "selective"
        self.init_seed = torch.initial_seed() if init_seed is None else init_seed
        self.reset_parameters()

    def full_shape(self, name: str, p: torch.Tensor) -> tuple[int, ...]:
        """Shape of parameter ``name`` in the tp=1 model (vocab unpadded)."""
        shape = unsharded_shape(p, 1 if self.tp is None else self.tp.size)
        if name in ("tok_embeddings.weight", "output.weight"):
            shape[0] = self.cfg.vocab_size
        return tuple(shape)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Each parameter from its own generator seeded by (init_seed, name): identical full tensors
        whatever the tp/pp layout, then this rank's shard copied in."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)  # residual-branch outputs (GPT-2 / Megatron)
        tp_rank, tp_size = (0, 1) if self.tp is None else (self.tp.rank, self.tp.size)
        for name, p in self.named_parameters():
            shape = self.full_shape(name, p)
            if p.dim() == 1:
                full = torch.ones(shape)
            else:
                scale = out_std if name.endswith(("wo.weight", "w2.weight")) else std
                full = normal_full(shape, self.init_seed, name, scale)
            copy_shard_(p, full, tp_rank, tp_size)

    # -- pieces (the pipeline stages call these) ------------------------------------------------
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: [B, S_local] -> [B, S_local, d] ([B, S_local/tp, d] under sequence parallelism)."""
        x = self.tok_embeddings(tokens)
        return x if self.tp is None else self.tp.scatter(x)

    def run_layers(self, x: torch.Tensor, positions: torch.Tensor,
                   layer_ids: Optional[Sequence[int]] = None,
                   cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: [B, S_local, d] ([B, S_local/tp, d] under sequence parallelism); positions: [S_local] global
        ids, or [B, S_local] with ``data.reset_positions`` (RoPE is applied after the sequence all-gather, on all
        S_local tokens); runs ``layer_ids`` (default: all held); cu_seqlens: packed documents [B, N+1]
        (``data.document_mask``; None: one document per sample)."""
        cos, sin = rope_cos_sin(positions, self.head_dim, self.cfg.rope_theta, x.dtype, self.cfg.rope_scaling)
        if cu_seqlens is not None:  # read by every layer's attention plan: one device->host copy, not one per layer
            cu_seqlens = cu_seqlens.cpu()
        for i in (self.layer_ids if layer_ids is None else layer_ids):
            layer = self.layers[str(i)]
            if self.activation_checkpointing == "full" and self.training:
                x = checkpoint(layer, x, cos, sin, cu_seqlens, use_reentrant=False)
            else:
                x = layer(x, cos, sin, cu_seqlens)
        return x

    def head_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm + output projection: [B, S, d] ([B, S/tp, d] under sequence parallelism) -> logits
        [B, S, V] (tp: this rank's V_pad/tp slice)."""
        h = self.norm(x)
        if self.tp is not None and self.tp.sequence_parallel:
            # gather the sequence (the column-parallel head needs all tokens), keeping only the local chunk
            head = self.output if self.output is not None else self.tok_embeddings
            return self.tp.gathered_linears(h, [head])[0]
        if self.output is not None:
            return self.output(h)
        if self.tp is not None:
            h = self.tp.copy_to_region(h)
        return F.linear(h, self.tok_embeddings.weight)

    def head_weight(self) -> torch.Tensor:
        """The output matrix [V (tp: V_pad/tp rows of this rank), d]: the head's or, tied, the embedding's."""
        return self.output.weight if self.output is not None else self.tok_embeddings.weight

    def loss(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: last hidden [B, S, d] ([B, S/tp, d] under sequence parallelism); labels [B, S] -> (sum of token
        losses (>= fp32), real-token count). Chunked (``loss_chunk``): no [B, S, V] logits exist; "full":
        the unchunked reference."""
        count = (labels != IGNORE_INDEX).sum().to(torch.float32)
        weight = self.head_weight()
        chunk = resolve_loss_chunk(self.loss_chunk, weight.shape[0])
        if chunk is None:
            return self._full_loss(x, labels), count
        h = self.norm(x)
        tp_args = {}
        if self.tp is not None:
            tp_args = {"vocab_start": self.tp.rank * weight.shape[0], "group": self.tp.group,
                       "sequence_parallel": self.tp.sequence_parallel}
            if not self.tp.sequence_parallel:
                # the tp region mapping the column-parallel head applies: its backward sums dL/dh over tp (under
                # SP the loss gathers h and reduce-scatters dL/dh itself, keeping only the local chunk of it)
                h = self.tp.copy_to_region(h)
        loss_sum = chunked_cross_entropy(h, weight, labels, chunk, vocab_size=self.cfg.vocab_size,
                                         ignore_index=IGNORE_INDEX, **tp_args)
        return loss_sum, count

    def _full_loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Unchunked: [B, S, V] logits (at least fp32) and their gradient; the reference for the chunked loss."""
        logits = self.head_logits(x)
        if self.tp is None:
            return F.cross_entropy(logits.to(at_least_fp32(logits.dtype)).flatten(0, 1), labels.flatten(),
                                   ignore_index=IGNORE_INDEX, reduction="sum")
        return self.tp.cross_entropy(logits, labels, self.cfg.vocab_size, IGNORE_INDEX).sum()

    # -- whole model ----------------------------------------------------------------------------
    def hidden(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens: [B, S_local]; positions: [S_local] global ids -> final hidden [B, S_local, d]."""
        h = self.norm(self.run_layers(self.embed(tokens), positions))
        if self.tp is not None and self.tp.sequence_parallel:
            h = self.tp.gather(h)
        return h

    def logits(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.head_logits(self.run_layers(self.embed(tokens), positions))

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if not (self.has_embedding and self.has_head and len(self.layer_ids) == self.cfg.n_layers):
            raise RuntimeError("this GPT holds one pipeline stage; run it through the pipeline engine")
        x = self.run_layers(self.embed(batch["tokens"]), batch["positions"], cu_seqlens=batch.get("cu_seqlens"))
        return self.loss(x, batch["labels"])


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_gpt(cfg, mesh, device: torch.device) -> GPT:
    """The GPT for this rank of ``mesh`` (``cfg``: the full Config): this rank's tp shard and, with
    pp > 1, only the layers of its pipeline stage(s) (``model.pipeline_stages``: list of
    :class:`~dist_train.cost.layout.Stage` held here, in schedule order)."""
    p = cfg.parallel
    ctx = AttentionContext(cp_group=mesh.cp_group, layout=p.cp_layout, method=p.cp_method,
                           ulysses_degree=p.ulysses_degree if p.cp_method != "ulysses" else p.cp,
                           window=cfg.model.attention_window, kernel=p.attn_kernel, kv_piece=p.cp_kv_piece)
    tp = TensorParallel.from_mesh(mesh, cfg.run.seed, device, sequence_parallel=p.sequence_parallel)
    stages = stages_of_rank(cfg, mesh.coord("pp"))
    model = GPT(cfg.model, ctx, activation_checkpointing=cfg.train.activation_checkpointing, tp=tp,
                layer_ids=[i for st in stages for i in st.layers], has_embedding=any(st.first for st in stages),
                has_head=any(st.last for st in stages), init_seed=cfg.run.seed, loss_chunk=cfg.train.loss_chunk)
    model.pipeline_stages = stages
    return model.to(device)

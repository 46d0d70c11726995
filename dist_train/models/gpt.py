"""Llama-style decoder: RMSNorm, RoPE with explicit (global) position ids, SwiGLU, grouped-query attention.

Parameter names follow Meta's Llama checkpoints (``tok_embeddings``, ``layers.i.attention.wq``, …) and
RoPE uses the HuggingFace *rotate-half* convention, so conversion to ``LlamaForCausalLM`` is a renaming.

    model = GPT(cfg.model, attn_ctx)
    loss_sum, count = model({"tokens": [B, S], "labels": [B, S], "positions": [S]})
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..config import ModelConfig
from .attention import AttentionContext, attention

IGNORE_INDEX = -100


def ffn_hidden_size(cfg: ModelConfig) -> int:
    if cfg.ffn_hidden:
        return cfg.ffn_hidden
    return 32 * math.ceil(8 * cfg.d_model / 3 / 32)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """positions: [S] or [B, S] global ids -> cos, sin broadcastable to [B, S, H, D]."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
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
    def __init__(self, cfg: ModelConfig, ctx: AttentionContext):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv = cfg.n_kv_heads or cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.ctx = ctx
        self.wq = nn.Linear(cfg.d_model, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, self.n_kv * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, self.n_kv * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, cfg.d_model, bias=False)
        self.selective_checkpoint = False

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = apply_rope(self.wq(x).view(b, s, -1, self.head_dim), cos, sin)
        k = apply_rope(self.wk(x).view(b, s, -1, self.head_dim), cos, sin)
        v = self.wv(x).view(b, s, -1, self.head_dim)
        if self.selective_checkpoint:
            # recompute only the attention core (its S×S-sized intermediates) in backward
            o = checkpoint(attention, q, k, v, self.ctx, use_reentrant=False)
        else:
            o = attention(q, k, v, self.ctx)
        return self.wo(o.reshape(b, s, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = ffn_hidden_size(cfg)
        self.w1 = nn.Linear(cfg.d_model, hidden, bias=False)
        self.w3 = nn.Linear(cfg.d_model, hidden, bias=False)
        self.w2 = nn.Linear(hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: AttentionContext):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attention = Attention(cfg, ctx)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.feed_forward(self.ffn_norm(x))


class GPT(nn.Module):
    """Decoder-only LM. ``forward(batch) -> (loss_sum, count)`` over this rank's tokens."""

    def __init__(self, cfg: ModelConfig, ctx: Optional[AttentionContext] = None, activation_checkpointing: str = "none"):
        super().__init__()
        self.cfg = cfg
        ctx = ctx or AttentionContext(window=cfg.attention_window)
        self.head_dim = cfg.d_model // cfg.n_heads
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, ctx) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.activation_checkpointing = activation_checkpointing
        for layer in self.layers:
            layer.attention.selective_checkpoint = activation_checkpointing == "selective"
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)  # residual-branch outputs (GPT-2 / Megatron)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, std=out_std)
            else:
                nn.init.normal_(p, std=std)

    def hidden(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens: [B, S_local]; positions: [S_local] global ids -> final hidden [B, S_local, d]."""
        x = self.tok_embeddings(tokens)
        cos, sin = rope_cos_sin(positions, self.head_dim, self.cfg.rope_theta, x.dtype)
        for layer in self.layers:
            if self.activation_checkpointing == "full" and self.training:
                x = checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin)
        return self.norm(x)

    def logits(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = self.hidden(tokens, positions)
        w = self.tok_embeddings.weight if self.output is None else self.output.weight
        return F.linear(h, w)

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.logits(batch["tokens"], batch["positions"])
        labels = batch["labels"]
        loss_sum = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                                   reduction="sum")
        count = (labels != IGNORE_INDEX).sum().to(torch.float32)
        return loss_sum, count


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_gpt(cfg, mesh, device: torch.device) -> GPT:
    """The GPT for this rank of ``mesh`` (``cfg``: the full Config)."""
    p = cfg.parallel
    ctx = AttentionContext(cp_group=mesh.cp_group, layout=p.cp_layout, method=p.cp_method,
                           ulysses_degree=p.ulysses_degree if p.cp_method != "ulysses" else p.cp,
                           window=cfg.model.attention_window, kernel=p.attn_kernel)
    return GPT(cfg.model, ctx, activation_checkpointing=cfg.train.activation_checkpointing).to(device)

"""AdamW with decoupled weight decay on matrices only, and a linear-warmup + cosine LR schedule."""
from __future__ import annotations

import math

import torch

from .config import TrainConfig


def build_optimizer(params: list[tuple[str, torch.nn.Parameter]], cfg: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for _, p in params if p.requires_grad and p.dim() >= 2]
    no_decay = [p for _, p in params if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=1e-8, foreach=False)


def lr_lambda(cfg: TrainConfig):
    """Multiplier of cfg.lr at optimizer step ``s`` (0-based): linear warmup, then cosine to min_lr_ratio."""
    warm, total, floor = cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio

    def f(s: int) -> float:
        if warm and s < warm:
            return (s + 1) / warm
        progress = min(1.0, (s - warm) / max(1, total - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))

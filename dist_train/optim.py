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


#: Training hyper-parameters a resume takes from the current config (the checkpoint's optimizer and schedule
#: state would otherwise keep the saved ones: LambdaLR restores its base LRs, AdamW its param groups).
RESUME_APPLIED = ("lr", "min_lr_ratio", "warmup_steps", "steps", "weight_decay", "betas")


def apply_changed_hyperparameters(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                                  cfg: TrainConfig, saved: dict) -> list[str]:
    """After a resume: make the current config's LR, schedule, weight decay and betas hold from the resume
    step on, when they differ from ``saved`` (the checkpoint's ``train`` section). The schedule is the
    current config's, evaluated at the optimizer steps already taken (``scheduler.last_epoch``): e.g. a
    longer ``train.steps`` stretches the remaining cosine, a new ``train.lr`` rescales it. Returns
    ``["train.lr 0.003 -> 0.001", ...]`` (empty: nothing differs and nothing is touched, so an unchanged
    resume stays bitwise exact)."""
    changed = [f"train.{k} {saved[k]!r} -> {getattr(cfg, k)!r}" for k in RESUME_APPLIED
               if k in saved and saved[k] != getattr(cfg, k)]
    if not changed:
        return []
    mult = lr_lambda(cfg)(scheduler.last_epoch)
    scheduler.base_lrs = [cfg.lr for _ in optimizer.param_groups]
    for i, group in enumerate(optimizer.param_groups):
        group["initial_lr"] = cfg.lr
        group["lr"] = cfg.lr * mult
        group["betas"] = tuple(cfg.betas)
        if i == 0:  # build_optimizer: group 0 decays (matrices), group 1 never does
            group["weight_decay"] = cfg.weight_decay
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    return changed

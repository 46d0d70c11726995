"""Log-sum-exp merge of partial attention results (DESIGN.md §2).

Running state per query row: o [B, S, H, D] and l [B, H, S], both in float32 (float64 for float64
inputs). Merging a block (o_b, l_b):

    l' = logaddexp(l, l_b)
    o' = o + sigmoid(l_b − l) · (o_b − o)          (= o·e^{l−l'} + o_b·e^{l_b−l'})

The sigmoid form never exponentiates a large positive number, and the error of o stays a convex
combination of the blocks' errors, so it does not grow with the number of blocks (ring size).
Rows where l_b = −inf (nothing allowed in the block) keep o unchanged; rows still empty stay −inf.
"""
from __future__ import annotations

import torch


def merge_(o: torch.Tensor, lse: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor) -> None:
    """In place: fold block (o_b [B, S, H, D], lse_b [B, H, S]) into the running (o, lse)."""
    neg_inf = torch.isneginf(lse_b)
    diff = torch.where(neg_inf, lse_b, lse_b - lse)       # −inf when the block is empty: weight 0
    weight = torch.sigmoid(diff).transpose(1, 2).unsqueeze(-1).to(o.dtype)   # [B, S, H, 1]
    o.lerp_(o_b.to(o.dtype), weight)       # o + w·(o_b − o) in one pass, no o-sized temporaries
    lse.copy_(torch.logaddexp(lse, lse_b.to(lse.dtype)))


def init_state(q: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty running state for queries q [B, S, H, D]: o = 0, lse = −inf."""
    b, s, h, d = q.shape
    return (torch.zeros(b, s, h, d, dtype=dtype, device=q.device),
            torch.full((b, h, s), float("-inf"), dtype=dtype, device=q.device))

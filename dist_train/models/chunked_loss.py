"""Chunked (fused head + cross-entropy) loss: the output projection and the cross-entropy over token
chunks, so no [N, V] logits tensor ever exists.

    loss_sum = chunked_cross_entropy(h, weight, labels, chunk=2048)           # tp = 1
    loss_sum = chunked_cross_entropy(h, w_shard, labels, chunk=2048,          # vocab-parallel
                                     vocab_size=V, vocab_start=r * V_pad // tp, group=tp_group)

h: [N, d] final (normed) hidden states, the same on every tp rank; weight: [V_local, d] this rank's rows
of the (padded) output matrix; labels: [N] global token ids or ``ignore_index``. Returns the sum of the
per-token losses over real tokens (dtype: at least fp32), identical on every tp rank.

Memory: one chunk's logits are formed (``chunk × V_local`` in at-least-fp32, plus their low-precision
matmul output for 16-bit models), their log-sum-exp is reduced over tp, and the gradient w.r.t. those
logits is contracted into ``dL/dh`` ([N, d], the size of h) and ``dL/dW`` ([V_local, d], the size of the
weight) in the same pass, then the chunk is freed. Backward therefore only scales the two stored
gradients by the incoming scalar: the head matmul runs three times per token (forward, dh, dW), exactly
as the unchunked loss, instead of four with a recompute-in-backward scheme, and the extra memory is
O(chunk·V_local + N·d) instead of O(N·V_local). When no gradient is needed (eval, ``torch.no_grad``)
only the loss is computed. The two gradients are held from this loss's forward to its backward: a
schedule that runs several loss forwards before their backwards (GPipe, and the warm-up of interleaved
1F1B, on the last stage) holds one weight-sized dL/dW per micro-batch in flight, where a
recompute-in-backward loss would hold one [N, d] input each; 1F1B on the last stage and every
non-pipeline engine run each loss's backward right after its forward.

Tensor parallelism: each rank holds V_pad/tp columns; the per-token log-sum-exp and the target logit are
all-reduced over ``group`` once per chunk (two all-reduces of [chunk] floats). The gradient w.r.t. h is
this rank's partial sum over its vocabulary slice: without sequence parallelism the caller feeds h through
the tp region mapping (``copy_to_region``), whose backward sums it over tp, exactly as for the column-parallel
head. Sequence parallelism (``sequence_parallel=True``): h is this rank's chunk [B, S/tp, d] of the sequence
(dim 1) and labels the whole [B, S]; the forward all-gathers h (transient) and reduce-scatters the partial
dL/dh along the sequence as soon as it is formed, so the forward keeps this rank's [B, S/tp, d] of the tp-sum
(not [B, S, d]) and backward hands it straight to the local chunk: the same sum an all-gather's backward
(reduce-scatter) would form, before the incoming scalar scales it instead of after. Padded vocabulary columns
(global id >= ``vocab_size``) get -inf, so the softmax is over the real vocabulary only (identical to tp = 1).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .lean_autograd import at_least_fp32
from .tensor_parallel import sequence_all_gather, sequence_reduce_scatter


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """See the module docstring; forward returns the scalar loss sum, backward the stored gradients
    scaled by the incoming gradient."""

    @staticmethod
    def forward(ctx, h_in: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int, vocab_size: int,
                vocab_start: int, group: Optional[dist.ProcessGroup], ignore_index: int,
                need_grad: bool, sequence_parallel: bool) -> torch.Tensor:
        # h_in: [..., d]; sequence parallel: [B, S/tp, d], gathered to [B, S, d] for this forward only
        h_seq = sequence_all_gather(h_in, group) if sequence_parallel else h_in
        h = h_seq.reshape(-1, h_seq.shape[-1])
        n, v_local = h.shape[0], weight.shape[0]
        acc = at_least_fp32(h.dtype)
        n_real = max(0, min(v_local, vocab_size - vocab_start))  # columns of real (unpadded) vocabulary
        total = torch.zeros((), dtype=acc, device=h.device)
        grad_h = torch.empty_like(h) if need_grad else None
        grad_w = torch.zeros(weight.shape, dtype=at_least_fp32(weight.dtype), device=weight.device) if need_grad else None
        for s in range(0, n, chunk):
            h_c, lab = h[s:s + chunk], labels[s:s + chunk]
            logits = F.linear(h_c, weight).to(acc)                       # [c, V_local]
            if n_real < v_local:
                logits[:, n_real:] = float("-inf")
            valid = lab != ignore_index
            local = lab - vocab_start
            mine = valid & (local >= 0) & (local < n_real)
            idx = torch.where(mine, local, torch.zeros_like(local))
            target = torch.where(mine, logits.gather(1, idx[:, None]).squeeze(1), 0.0)
            lse = torch.logsumexp(logits, dim=1)                         # [c], -inf on an all-padding shard
            if group is not None:
                top = lse.clone()
                dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
                top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
                both = torch.stack([torch.exp(lse - top), target])
                dist.all_reduce(both, op=dist.ReduceOp.SUM, group=group)
                lse, target = top + torch.log(both[0]), both[1]
            total += torch.where(valid, lse - target, 0.0).sum()
            if need_grad:
                # dL/dlogits = softmax - onehot(target), zero on ignored tokens; formed in place of the logits
                probs = logits.sub_(lse[:, None]).exp_()
                # scatter, not probs[mine.nonzero(), ...]: nonzero waits for the GPU once per chunk. Rows that are
                # not this rank's target add 0.0 to column 0 (probs >= 0: unchanged bit for bit)
                probs.scatter_add_(1, idx[:, None], mine[:, None].to(acc).neg_())
                probs.mul_(valid[:, None].to(acc))
                g = probs.to(h.dtype)
                grad_h[s:s + chunk] = g @ weight
                grad_w.addmm_(g.t().to(grad_w.dtype), h_c.to(grad_w.dtype))
            del logits
        if need_grad:
            grad_h = grad_h.view(h_seq.shape)
            if sequence_parallel:  # the tp-sum of the partial dL/dh, this rank's sequence chunk only
                grad_h = sequence_reduce_scatter(grad_h, group, owned=True)  # grad_h: this forward's buffer
            ctx.grads = (grad_h, grad_w.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if getattr(ctx, "grads", None) is None:
            raise RuntimeError("chunked_cross_entropy: backward needs the gradients formed in forward (the loss "
                               "was computed without grad, or backward ran twice)")
        grad_h, grad_w = ctx.grads
        ctx.grads = None  # the stored gradients are handed out (scaled in place) exactly once
        return (grad_h.mul_(grad_out.to(grad_h.dtype)), grad_w.mul_(grad_out.to(grad_w.dtype)),
                None, None, None, None, None, None, None, None)


def chunked_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int, *,
                          vocab_size: Optional[int] = None, vocab_start: int = 0,
                          group: Optional[dist.ProcessGroup] = None, ignore_index: int = -100,
                          sequence_parallel: bool = False) -> torch.Tensor:
    """Sum over real tokens of cross_entropy(h @ weight.T, labels), computed ``chunk`` tokens at a time.

    h: [N, d] (or [B, S, d]); weight: [V_local, d]; labels: [N] (or [B, S]). ``vocab_size``: the real
    vocabulary (default: all of weight's rows at tp = 1); ``vocab_start``: global id of this rank's first row;
    ``group``: the tp group (None: tp = 1). ``sequence_parallel``: h is this rank's chunk [B, S/tp, d] of the
    sequence over ``group`` and labels [B, S] (see the module docstring). Returns a scalar (at least fp32)."""
    if chunk < 1:
        raise ValueError(f"chunked_cross_entropy: chunk = {chunk}: must be a positive number of tokens")
    if sequence_parallel and (group is None or h.dim() != 3):
        raise ValueError(f"chunked_cross_entropy: sequence_parallel needs the tp group and h [B, S/tp, d]; "
                         f"got group {group}, h of shape {tuple(h.shape)}")
    lab = labels.reshape(-1)
    tokens = h[..., 0].numel() * (dist.get_world_size(group) if sequence_parallel else 1)
    if tokens != lab.shape[0]:
        raise ValueError(f"chunked_cross_entropy: {tokens} hidden states but {lab.shape[0]} labels")
    vocab = weight.shape[0] if vocab_size is None else vocab_size
    need_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    return _ChunkedLinearCrossEntropy.apply(h, weight, lab, int(chunk), vocab, vocab_start, group, ignore_index,
                                            need_grad, sequence_parallel)

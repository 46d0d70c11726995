"""The one memory model: bytes per device of one pipeline rank of a layout, by component.

    sh, loc = rank_inputs(cfg, prof)                    # dist_train.cost.shape
    mem = memory_model(cfg, sh, prof, loc)              # the most loaded pipeline rank (what decides "fits")
    mem = memory_model(cfg, sh, prof, loc, load)        # one pipeline rank's exact RankLoad
    mem, phases = rank_memory(cfg, sh, prof, loc)       # + {"loss", "backward", "optimizer"}: the max is mem["total"]
    est = estimate_memory(cfg, stages_of_rank(cfg, r), prof)   # grouped as the dry run's table columns

``dist-train plan``, the predictions beside each ``dist-train scale`` point and ``dist-train launch
--dry-run`` all print these numbers, so they can never disagree.

Components (bytes):
    baseline            framework resident set / CUDA context (profile.baseline_gib)
    weights, grads      parameters on this rank (matmul weights and vocabulary rows ÷tp — the vocabulary
                        padded to a multiple of tp; norms replicated; only this rank's layers, embedding
                        and head; ÷ZeRO-3 shards, each tensor's partition padded to a whole share:
                        :func:`zero3_partition_elems`, but ZeRO-3's persistent parameters — tensors of at most
                        stage3_param_persistence_threshold elements, default 1e5 — whole besides their partition:
                        :func:`zero3_persistent_params`) × element size (train.precision; auto: the profile's)
    optimizer           AdamW m, v (+ fp32 master copy in 16-bit training, and under DeepSpeed ZeRO ≥ 1 in fp32
                        too: :func:`fp32_master_bytes`), ÷ shards for ZeRO ≥ 1
    ddp_buckets         DDP's flat gradient buckets (a second gradient copy) when gradients are reduced
    zero_buckets        DeepSpeed ZeRO's gradient bucket(s) (:func:`zero_bucket_bytes`): ZeRO-3's from the engine's
                        build on, ZeRO-1/2's through each backward only
    zero_gathered       DeepSpeed ZeRO-3's temporary gathers through the forward and backward
                        (:func:`zero3_gathered_bytes`): the full parameters its coordinator gathers before use, keeps
                        for reuse and prefetches (bounded by stage3_max_reuse_distance, stage3_max_live_parameters,
                        stage3_prefetch_bucket_size), and the coalesced all-gather buffers a prefetch holds
    fsdp_unsharded      FSDP2 (parallel.fsdp): weights, gradients and AdamW live as fp32 shards (÷ shards,
                        the shards are the master weights), plus the gathered compute-precision copies
                        (:func:`fsdp_unsharded_bytes`)
    activations         per layer per token, what autograd keeps (counted with saved-tensor hooks:
                        tests/test_gpt_saved_tensors.py, tests/test_swin_saved_tensors.py): replicated
                        part (norm inputs, ÷tp only with sequence parallel) + the norm outputs the tp
                        matmuls keep (÷tp under sequence parallel: only the local chunk, gathered again in
                        backward, ``TensorParallel.gathered_linears``) + tensor-parallel
                        part (÷tp) + small fp32 statistics; + 2·heads·span scores without flash attention
                        (a swin: heads·window area, the probabilities, + its masks); tokens per rank =
                        samples per micro-batch·S / (cp·wp) (``config.micro_batch_samples``: under a pipeline the
                        local batch ÷ parallel.microbatches); full checkpointing keeps the layer input (d per token)
                        per layer + one layer being recomputed; selective keeps all but the attention
                        core's insides; a GPT's Ulysses keeps wo's copy of the output and any repeated
                        K/V heads (a swin's head-sharded q, k, v replace its qkv output); × micro-batches
                        in flight; + per micro-batch the stage output and a GPT's RoPE cos/sin; + in
                        16-bit training autocast's copies of the layer weights (a swin's: and biases)
                        (:func:`autocast_weight_bytes`); + on the first stage what the embedding keeps
                        per micro-batch (:func:`embedding_kept_bytes`: Megatron's masked ids and mask; a
                        swin's input patches); with a pipeline, what torch's schedule adds at the peak
                        (:func:`~dist_train.cost.layout.schedule_peak`): the stage outputs and input
                        gradients its sends still hold, less the inputs it reads from receive buffers, the
                        pending losses' kept gradients, and a GPT's int64 token ids / labels of the batch
    logits              head rank only (:func:`loss_bytes`), one micro-batch: chunked (train.loss_chunk)
                        c·V_pad/tp × (fp32 logits/their gradient in place + the 16-bit matmul output and
                        gradient copy) with c = min(chunk, tokens), + what the forward keeps
                        (:func:`loss_kept_bytes`: dL/dh, dL/dW, the eager GPT's final-norm insides);
                        full: tokens·V_pad/tp × (logits + fp32 log-softmax + its gradient)
    comm_buffers        ring double buffers for K/V and dK/dV, all-to-all outputs — of the cp that runs
                        (:func:`~dist_train.cost.shape.cp_execution`: a swin's is Ulysses whatever
                        parallel.cp_method says)
    workspace           what the backward creates above the activations it frees (:func:`backward_workspaces`:
                        counted for the eager GPT; one layer's activation gradients otherwise); on a pipeline's
                        last stage + the stage output, which ``PipelineStage`` keeps through its backward
    pp_buffers          ``PipelineStage``'s receive buffers, one [tokens, d] per micro-batch and direction a
                        stage has a neighbour in (:func:`~dist_train.cost.layout.recv_buffers`), kept across steps
    total               the step's PEAK: the largest of its phases (:func:`step_phases`: the loss at the end
                        of the forward, the first layer's backward, the optimizer step), each the components
                        alive then — not their sum: the loss's chunk, the backward's workspace
                        and the optimizer's transient never coexist
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..config import (Config, micro_batch_samples, resolve_loss_chunk, step_micro_batches, zero3_gathers,
                      zero3_persistence, zero_bucket_buffers, zero_reduce_bucket_elements)
from ..plan.profiles import DeviceProfile
from .layout import RankLoad, Stage, load_of
from .shape import (RankShape, Shape, cp_execution, rank_inputs, recompute_scope, ring_piece_tokens,
                    token_grid)


def sequence_split(cfg: Config) -> int:
    """How many ways the residual stream's sequence is split over tp: tp under sequence parallelism, else 1."""
    p = cfg.parallel
    return p.tp if (p.sequence_parallel and p.tp > 1) else 1


def activation_elems_per_token(cfg: Config, sh: Shape, prof: DeviceProfile, loc: RankShape) -> dict:
    """Stored activation elements per token per layer, in elements of ``loc.bpe`` bytes: {"replicated",
    "gathered", "parallel", "scores", "ulysses", "small", "logsumexp"} ("replicated": ÷tp under sequence parallelism;
    "gathered": the norm outputs the column-parallel matmuls keep, ÷tp under sequence parallelism too (their local
    chunk); "parallel": already ÷tp; "small": the fp32
    norm statistics, boolean masks and index tensors; "logsumexp": the attention's fp32 row statistics, which
    a GPT's selective checkpointing drops with the scores and Ulysses' copies). A GPT's stage-wide terms
    (RoPE's cos/sin, the stage output) are :func:`stage_elems_per_token`'s."""
    d = sh.d
    small = lse = gathered = 0.0
    tp_sp = sequence_split(cfg)
    if sh.kind == "swin":
        # what autograd saves in a WindowBlock (counted with saved_tensors_hooks, tests/test_swin_saved_tensors.py):
        # x and norm1's output, the attention output (proj's input), x after attention and norm2's output — 4d;
        # q, k, v as window_attention's matmuls keep them (the qkv linear's output itself is not kept) and the
        # attention output — 4q; fc1's output and gelu's — 2f; one scores-sized tensor, the softmax probabilities
        # (the raw scores are not kept: the scale, bias and mask ops save no input) — heads·N. Small: LayerNorm
        # mean and rstd (2 norms × 2 values: fp32 — but in bf16 for DeepSpeed's bf16 module on CPU, whose
        # LayerNorm kernel keeps them in the input's dtype unless the weight's differs; CUDA's keeps fp32), and the
        # attention masks, N bools per token of the whole tile (cp·N per rank token under cp, where attention runs
        # on the whole tile) in the blocks of a (plain, shifted) pair that hold one (:func:`swin_masked_blocks`).
        rep, par = 4 * d, 4 * loc.q + 2 * loc.f
        scores = loc.heads * sh.span
        stat_bytes = loc.bpe if module_in_16_bits(cfg, loc) and prof.is_cpu else 4
        small = (2 * 2 * stat_bytes + cfg.parallel.cp * sh.span * swin_masked_blocks(cfg, sh) / 2) / loc.bpe
        rep /= tp_sp
    elif prof.fused_kernels:  # a what-if profile's Transformer-Engine style layer (no built-in profile: devices.yaml)
        rep, par = 4 * d, 2 * loc.q + 2 * loc.kv + 3 * loc.f
        scores = 0.0 if prof.flash_attention else 2 * loc.heads * sh.span
        rep /= tp_sp
    else:
        rep, gathered, par, small = gpt_eager_elems(cfg, sh, loc)
        lse = 4 * loc.heads / loc.bpe
        scores = 0.0 if prof.flash_attention else 2 * loc.heads * sh.span
    # a GPT's attention core keeps q, k, v, its output and the logsumexp, never scores, with any attn_kernel:
    # the block kernels (cp, windows, attn_kernel math) run inside RingAttention, which saves no scores, and
    # without cp or a window the model calls torch SDPA, which keeps none when it is flash (where SDPA would run its
    # math kernel — CUDA fp32 with grouped-query heads — the model runs the block kernels: models/attention.py)
    uly = 0.0
    if cp_execution(cfg).ulysses > 1 and sh.kind == "gpt":
        uly = gpt_ulysses_elems(cfg, sh, loc)
    return {"replicated": rep, "gathered": gathered, "parallel": par, "scores": scores, "ulysses": uly,
            "small": small, "logsumexp": lse}


def swin_masked_blocks(cfg: Config, sh: Shape) -> int:
    """How many blocks of a (plain, shifted) swin pair keep an attention mask (N bools per tile token,
    ``parallelism.window.windows.window_attention``) on the tile that holds the most: the shifted block when its roll
    wraps a non-periodic axis (the far tile along it: the region mask) or the image is padded; the plain block when
    the image is padded (the last tiles' key-padding mask). Nearer tiles may hold fewer."""
    th, tw, ph, pw = token_grid(tuple(cfg.data.image), cfg.model.patch_size, sh.window)
    padded = (th, tw) != (ph, pw)
    wraps_open_axis = any(not periodic and win // 2 > 0 for periodic, win in zip(cfg.model.wrap, sh.window))
    return int(padded) + int(padded or wraps_open_axis)


def gpt_eager_elems(cfg: Config, sh: Shape, loc: RankShape) -> tuple[float, float, float, float]:
    """(replicated, gathered, parallel, small) elements of ``loc.bpe`` bytes one eager GPT layer keeps per
    token (``models/gpt.Block``; counted with saved_tensors_hooks in tests/test_gpt_saved_tensors.py).

    The residual stream and RMSNorm's insides are fp32 whatever train.precision says (the parameters are
    fp32; 16-bit training is autocast) — but where the forward computes with 16-bit parameters
    (:func:`parameters_in_16_bits`: DeepSpeed's bf16 module, FSDP2) —, the matmul outputs are in the compute dtype
    (``loc.bpe``):

    * replicated (÷tp under sequence parallelism): each RMSNorm keeps only its input x, fp32, and recomputes
      x·rstd in backward (``models/lean_autograd.rms_norm``; autograd's composition kept x·rstd too) — 2 norms × d;
    * gathered: the norm output as the linears keep it — under sequence parallelism only this rank's [S/tp, d]
      chunk, which ``TensorParallel.gathered_linears`` all-gathers again in backward (Megatron-LM's rule; the
      all-gathered [S, d] was kept before), so ÷tp. One tensor per norm, shared by its linears, in the compute
      dtype: under autocast the norm output is cast once before its linears (``models/autocast_input.py``; each
      torch linear kept its own 16-bit cast before, and Megatron's tp linears and the sequence-parallel
      Function their fp32 input);
    * parallel (÷tp): RoPE keeps only cos/sin (no q/k copies); the attention keeps q, k, v and its output
      (wo's input is a view of it); SwiGLU keeps w1's and w3's outputs and w2 the product, silu(gate) being
      recomputed in backward (``models/lean_autograd.swiglu``; autograd's composition kept it too) — 2q + 2kv +
      3f;
    * small: the rstd of the 2 norms (fp32, ÷tp under sequence parallelism); the attention's fp32
      logsumexp (heads per token) is the caller's "logsumexp"."""
    d, f32, tp_sp = sh.d, 4 / loc.bpe, sequence_split(cfg)
    # each norm keeps its input x as it comes, in the stream's dtype (:func:`gpt_stream_bytes`): 16-bit where the
    # parameters are (DeepSpeed's bf16 module, FSDP2), else fp32
    rep = 2 * d * (1 if parameters_in_16_bits(cfg, loc) else f32) / tp_sp
    gathered = 2 * d
    par = 2 * loc.q + 2 * loc.kv + 3 * loc.f
    small = 2 * 4 / tp_sp / loc.bpe
    return rep, gathered / tp_sp, par, small


def module_in_16_bits(cfg: Config, loc: RankShape) -> bool:
    """Whether 16-bit training holds the module itself in 16 bits instead of autocasting fp32 parameters:
    DeepSpeed (zero_stage without a pipeline or FSDP2) casts the parameters to bf16 (its bf16 mode), so the
    residual stream, RoPE's cos/sin and every matmul input are bf16 and no weight is copied."""
    p = cfg.parallel
    return loc.bpe < 4 and p.zero_stage is not None and p.pp == 1 and not p.fsdp


def parameters_in_16_bits(cfg: Config, loc: RankShape) -> bool:
    """Whether a GPT's forward computes with 16-bit parameters, so its residual stream (the embedding output and
    every residual add), RoPE's cos/sin and each norm's input are 16-bit, as the matmul inputs: DeepSpeed's bf16
    module (:func:`module_in_16_bits`) and FSDP2, whose mixed precision gathers each block's parameters in bf16
    (``param_dtype``) and casts the block's inputs to it (counted on a real FSDP2 engine's GPT,
    tests/test_gpt_saved_tensors.py). Under plain autocast the parameters, hence the stream, stay fp32."""
    return module_in_16_bits(cfg, loc) or (loc.bpe < 4 and cfg.parallel.fsdp)


def gpt_stream_bytes(cfg: Config, loc: RankShape) -> int:
    """Bytes of an element in the eager GPT's parameter dtype, which its residual stream, RoPE's cos/sin, the final
    norm's output and the chunked loss's dL/dh and dL/dW take: ``loc.bpe`` with 16-bit parameters
    (:func:`parameters_in_16_bits`), else 4 (fp32 parameters, under autocast too)."""
    return loc.bpe if parameters_in_16_bits(cfg, loc) else 4


def autocast_over_fp32(cfg: Config, loc: RankShape) -> bool:
    """Whether 16-bit training runs as torch.autocast over fp32 parameters (the DDP and pipeline engines): 16-bit,
    but not with 16-bit parameters (:func:`parameters_in_16_bits`). Only then does autocast cache 16-bit copies of
    the weights (:func:`autocast_weight_bytes`, the head's in :func:`loss_kept_bytes`) while the residual stream,
    RoPE's cos/sin (so q and k entering the attention core) stay fp32."""
    return loc.bpe < 4 and not parameters_in_16_bits(cfg, loc)


def gpt_ulysses_elems(cfg: Config, sh: Shape, loc: RankShape) -> float:
    """Elements (of ``loc.bpe`` bytes) per token a GPT layer keeps under Ulysses besides what it keeps without
    cp (``parallelism.context.attention._ulysses_ring``): the attention keeps the head-sharded q, k, v and
    output INSTEAD of the sequence-sharded ones (same size), but wo keeps the output back in the sequence
    layout too (+q); K/V heads repeated so each of the u ranks gets whole groups are kept repeated
    (``ulysses.kv_replication``). The gathered order's permutation is not a layer's:
    :func:`ulysses_permutation_bytes`."""
    cpx = cp_execution(cfg)
    return loc.q + 2 * loc.kv * (cpx.kv_repeat - 1)


def ulysses_permutation_bytes(cfg: Config, sh: Shape) -> float:
    """Bytes of a hybrid GPT layer's gathered-order permutation and its inverse where that order is permuted
    (``ulysses.gathered_order``: zigzag always, striped when the Ulysses group is the whole cp group): u·S/cp int64
    each. ``ulysses.gathered_permutation`` makes them once per shape and keeps them, so every layer and micro-batch
    saves the same two tensors for its backward: one copy per rank, not one per layer."""
    cpx = cp_execution(cfg)
    layout = cfg.parallel.cp_layout
    permuted = layout == "zigzag" or (layout == "striped" and cpx.ring == 1)
    if sh.kind != "gpt" or cpx.ulysses <= 1 or not permuted:
        return 0.0
    return 2 * 8 * cpx.ulysses * sh.tokens / cfg.parallel.cp


def residual_elems_per_token(cfg: Config, sh: Shape, prof: DeviceProfile, loc: RankShape) -> float:
    """Elements (of ``loc.bpe`` bytes) per token of the residual stream (a layer's input): [S/tp, d] under
    sequence parallelism; fp32 in the eager GPT (fp32 parameters: the embedding output and every residual add
    stay fp32 under autocast), in the compute dtype otherwise (a fused what-if profile's, Transformer-Engine style,
    convention, and the swin, whose patch embedding is a matmul)."""
    d_stream = sh.d / sequence_split(cfg)
    return d_stream * 4 / loc.bpe if gpt_eager(sh, prof) and not parameters_in_16_bits(cfg, loc) else d_stream


def gpt_eager(sh: Shape, prof: DeviceProfile) -> bool:
    """Whether ``sh`` is costed as this repo's eager GPT modules (:func:`gpt_eager_elems`): on every built-in
    profile, GPU and CPU (the GPT runs these modules on every device); not on a custom profile with
    ``fused_kernels: true``, the what-if of a fused layer dist-train does not run."""
    return sh.kind == "gpt" and not prof.fused_kernels


def stage_elems_per_token(cfg: Config, sh: Shape, prof: DeviceProfile, loc: RankShape) -> float:
    """Elements (of ``loc.bpe`` bytes) per token one micro-batch keeps on a pipeline stage besides its
    layers': the stage output (:func:`residual_elems_per_token`; on the last stage the final norm's input,
    elsewhere what the pipeline engine keeps for the backward it receives) and the eager GPT's RoPE cos/sin
    (``models/gpt.rope_cos_sin``: computed once per micro-batch, kept by every layer, fp32; one row per
    position of the rank's sequence, per sample only with ``data.reset_positions``)."""
    out = residual_elems_per_token(cfg, sh, prof, loc)
    if not gpt_eager(sh, prof):
        return out
    per_position = 1 if cfg.data.reset_positions else micro_batch_samples(cfg)
    # cos/sin in the residual stream's dtype
    return out + 2 * sh.head_dim * gpt_stream_bytes(cfg, loc) / per_position / loc.bpe


def autocast_weight_bytes(cfg: Config, sh: Shape, loc: RankShape, load: RankLoad) -> float:
    """Bytes of the 16-bit copies autocast makes of a rank's fp32 layer parameters: torch.autocast casts each
    weight (and bias) once per autocast region and caches the copy until the region ends (CPU as CUDA), and each
    linear keeps its weight's copy for its input gradient. The DDP engine opens a region per micro-batch (its
    forward; the graph keeps the copies until that micro-batch's backward, one micro-batch in flight), the
    pipeline engine one region around the whole schedule (every micro-batch shares the copies until the step
    ends): either way one copy of every layer of the rank, whatever the checkpointing (under full checkpointing
    the cache still holds them at the end of the forward). None in fp32, under FSDP2 (its mixed-precision policy
    gathers the weights in bf16 already) and with DeepSpeed (it keeps the module in bf16: no autocast).

    * GPT: the matmul weights (÷tp). Under tp only torch's own linears keep one — the sequence-parallel row
      linears, wo and w2 (``tensor_parallel._sp_row``); Megatron's column- and row-parallel linears cast inside
      their autograd Function (the transposed weight, a view autocast does not cache) and keep the fp32 weight.
    * swin: the weights and biases of its four linears (:func:`swin_linear_params`; the relative position bias
      table is indexed, not cast), at tp 1; under tp its linears are Megatron's, which keep none (their bias is
      cast per call and added, ``tensor_parallel._plain_output``). On the first stage the patch embedding's weight
      and bias (a torch Linear whatever tp is). The head's copy on the last stage is not counted here.

    Counted in tests/test_gpt_saved_tensors.py and tests/test_swin_saved_tensors.py."""
    p = cfg.parallel
    if not autocast_over_fp32(cfg, loc):
        return 0.0
    if sh.kind == "swin":
        matmul = swin_linear_params(sh) if p.tp == 1 else 0
        embed = sh.embed_params() if load.embedding else 0
        return (load.layers * matmul / p.tp + embed) * loc.bpe
    if p.tp == 1:
        matmul = sh.layer_params() - sh.layer_replicated_params()
    else:
        matmul = (sh.q_dim + sh.ffn) * sh.d if p.sequence_parallel else 0
    return load.layers * matmul / p.tp * loc.bpe


def swin_linear_params(sh: Shape) -> int:
    """Weights and biases of one swin block's linears (``models/swin.WindowBlock``): qkv 3d·d + 3d, proj d·d + d,
    fc1 d·f + f, fc2 f·d + d."""
    d, f = sh.d, sh.ffn
    return 4 * d * d + 2 * d * f + 5 * d + f


def embedding_kept_bytes(cfg: Config, sh: Shape, loc: RankShape) -> float:
    """Bytes one micro-batch's token embedding keeps for its backward on the first pipeline stage, besides its output
    (the first layer's input). Megatron's vocab-parallel embedding (a GPT with tp > 1, ``VocabParallelEmbedding``)
    keeps its masked ids (int64: the ids less this rank's vocabulary start, 0 outside its rows), which the
    embedding's backward reads, and the out-of-range mask (bool) that zeroed those rows: 9 bytes per token of the
    rank's sequence — the whole of it, the embedding runs before sequence parallelism's scatter. A plain
    ``nn.Embedding`` keeps the batch's token ids themselves, which the batch holds anyway: none. Counted in
    tests/test_gpt_embedding_memory.py. A swin's patch embedding (a Linear, replicated over tp) keeps its input
    patches for its weight gradient, p²·in_channels per token of the rank's tile (or cp share, padding included) in
    the compute dtype (autocast's cast; its weight's copy is :func:`autocast_weight_bytes`'); counted in
    tests/test_swin_saved_tensors.py."""
    if sh.kind == "swin":
        return loc.tokens * sh.embed_in * loc.bpe
    if cfg.parallel.tp == 1:
        return 0.0
    return loc.tokens * (8 + 1)


def loss_bytes(cfg: Config, sh: Shape, loc: RankShape, prof: DeviceProfile) -> float:
    """Bytes the head + loss of one micro-batch adds on the last pipeline stage (dist_train/models/
    chunked_loss.py; the last stage runs its loss and backward before the next forward): the transient chunk
    (:func:`loss_chunk_bytes`) + what the forward leaves for the backward (:func:`loss_kept_bytes`)."""
    return loss_chunk_bytes(cfg, sh, loc, prof) + loss_kept_bytes(cfg, sh, loc, prof)


#: bytes per token of a chunk the chunked loss's per-token tensors take at its peak (torch.logsumexp):
#: the valid mask (1), the local ids (int64, 8), this rank's mask (1), the gather index (int64, 8), the target
#: logit gathered and masked (2 × fp32) and the log-sum-exp (fp32) — counted at tp 1
LOSS_TOKEN_BYTES = 1 + 8 + 1 + 8 + 4 + 4 + 4


def loss_chunk_bytes(cfg: Config, sh: Shape, loc: RankShape, prof: DeviceProfile) -> float:
    """The loss's transient at its peak. This repo's eager GPT (``prof`` not fused; measured, the op at the
    forward's peak is the chunk's ``torch.logsumexp``: tests/test_gpt_saved_tensors.py): the chunk's fp32 logits
    and logsumexp's ``exp(logits - max)`` of the same size, :data:`LOSS_TOKEN_BYTES` per chunk token, and the
    final norm's output h ([tokens, d] in the stream's dtype, not kept past the loss); under sequence
    parallelism h is this rank's chunk plus its all-gather, and dL/dh is formed whole ([tokens, d]) before its
    reduce-scatter. Otherwise (a fused what-if profile's convention): one chunk's logits and their gradient in
    place (+ in 16-bit training the matmul output before the fp32 cast and the gradient's cast). The unchunked
    loss (and the swin's pixel head): the whole logits, fp32 log-softmax and gradient."""
    bpe = loc.bpe
    chunk = resolve_loss_chunk(cfg.train.loss_chunk, int(loc.vocab)) if sh.kind == "gpt" else None
    if chunk is None:
        return loc.tokens * loc.vocab * (bpe + 4 + 4)
    c = min(chunk, loc.tokens)
    if gpt_eager(sh, prof):
        h = loc.tokens * sh.d * gpt_stream_bytes(cfg, loc)
        if sequence_split(cfg) > 1:
            h *= 2  # the gathered h and dL/dh before its reduce-scatter; the local h is dL/dh's kept chunk's size
        return c * loc.vocab * (4 + 4) + c * LOSS_TOKEN_BYTES + h
    low = bpe if bpe < 4 else 0
    return c * loc.vocab * (4 + 2 * low)


def loss_kept_bytes(cfg: Config, sh: Shape, loc: RankShape, prof: DeviceProfile) -> float:
    """What the chunked loss's forward leaves for its backward: dL/dh ([tokens, d]; ÷tp under sequence parallelism,
    which reduce-scatters it to the rank's sequence chunk in the forward) and dL/dW ([V_pad/tp, d]), computed in
    the forward (``chunked_loss.py``). For this repo's eager GPT (``prof`` not fused), counted live at the end of
    the loss's forward (tests/test_gpt_saved_tensors.py): the final norm's rstd (fp32, ÷tp under sequence
    parallelism; its x is the stage output); dL/dh and dL/dW fp32 (h is the fp32 norm output, dL/dW accumulates in
    fp32 and the fp32 weight keeps it so) — 16-bit where the parameters are (:func:`gpt_stream_bytes`: DeepSpeed's
    bf16 module, FSDP2); under autocast over fp32 parameters the weight's bf16 copy autocast caches. Otherwise (a
    fused what-if profile's convention): dL/dh in the compute dtype, dL/dW fp32 in 16-bit training only. None for
    the unchunked loss, whose logits :func:`loss_chunk_bytes` holds whole."""
    bpe = loc.bpe
    chunk = resolve_loss_chunk(cfg.train.loss_chunk, int(loc.vocab)) if sh.kind == "gpt" else None
    if chunk is None:
        return 0.0
    tokens_sp = loc.tokens / sequence_split(cfg)  # the rank's sequence chunk
    if not gpt_eager(sh, prof):
        return tokens_sp * sh.d * bpe + (loc.vocab * sh.d * 4 if bpe < 4 else 0.0)
    grads = gpt_stream_bytes(cfg, loc)   # dL/dh in h's dtype, dL/dW in the weight's
    norm = tokens_sp * 4  # rstd; the norm's input x is the stage output, counted with the activations
    copy = loc.vocab * sh.d * bpe if autocast_over_fp32(cfg, loc) else 0.0
    return norm + (tokens_sp + loc.vocab) * sh.d * grads + copy


def fsdp_layer_params(cfg: Config, sh: Shape) -> float:
    """Parameters of one FSDP2 unit (a transformer / Swin block) on one tp rank: the sum of its tensors' tp-local
    elements (:meth:`Shape.layer_tensors`), the same sum :func:`rank_params` counts each of the rank's layers with,
    so that the root :func:`fsdp_unsharded_bytes` keeps (the rank's parameters less its blocks) is exactly the
    embedding, final norm and head."""
    return float(sum(sh.layer_tensors(cfg.parallel.tp)))


def fsdp_unsharded_bytes(cfg: Config, sh: Shape, loc: RankShape, load: RankLoad, n_local: float) -> float:
    """Peak bytes of FSDP2's gathered (compute-precision) weights and not-yet-reduced gradients on one rank
    holding ``n_local`` parameters (engines/fsdp.py):

    * pp > 1: torch's ``PipelineStage`` keeps a stage gathered from its first backward to the last and
      accumulates unsharded gradients across micro-batches (reduce-scatter once per step): the whole stage's
      weights and gradients, 2 · n_local · bpe;
    * pp = 1: the root (embedding, final norm, head) stays gathered; two blocks in flight (the one computing,
      the one prefetched) — or every block when ``fsdp_reshard_after_forward`` is false (kept from forward
      to backward) — plus one block's unsharded gradient and its fp32 reduce-scatter buffer."""
    p, bpe = cfg.parallel, loc.bpe
    if p.pp > 1:
        return 2.0 * n_local * bpe
    unit = fsdp_layer_params(cfg, sh)
    root = n_local - load.layers * unit
    blocks = load.layers * unit if not p.fsdp_reshard_after_forward else min(2, load.layers) * unit
    return (root + blocks) * bpe + fsdp_grad_bytes(cfg, sh, loc)


def fsdp_grad_bytes(cfg: Config, sh: Shape, loc: RankShape) -> float:
    """FSDP2 without a pipeline: one block's unsharded gradient and its fp32 reduce-scatter buffer (backward only)."""
    return fsdp_layer_params(cfg, sh) * (loc.bpe + 4)


def memory_model(cfg: Config, sh: Shape, prof: DeviceProfile, loc: RankShape,
                 load: Optional[RankLoad] = None) -> dict:
    """Bytes by component + "total" of the pipeline rank holding ``load``; None: the most loaded of
    ``loc.loads`` (every pp rank's exact stages), the rank that decides whether a layout fits. "total" is the
    step's peak, the largest of its phases (:func:`rank_memory`) — not the components' sum: they never all coexist."""
    return rank_memory(cfg, sh, prof, loc, load)[0]


def rank_memory(cfg: Config, sh: Shape, prof: DeviceProfile, loc: RankShape,
                load: Optional[RankLoad] = None) -> tuple[dict, dict]:
    """(:func:`memory_model`'s components + "total", the bytes alive at each phase of one training step: {"loss",
    "backward", "optimizer"}, :func:`step_phases`; "total" is the largest of them) of the rank holding ``load``
    (None: the pipeline rank with the largest peak). Call it once where both are needed."""
    if load is None:
        return max((rank_memory(cfg, sh, prof, loc, ld) for ld in loc.loads), key=lambda m: m[0]["total"])
    p = cfg.parallel
    bpe = loc.bpe
    n_local = rank_params(cfg, sh, load)
    states = parameter_state_bytes(cfg, sh, loc, load, n_local)

    el = activation_elems_per_token(cfg, sh, prof, loc)
    per_layer_tok = sum(el.values())
    layer_input = residual_elems_per_token(cfg, sh, prof, loc)
    scope = recompute_scope(cfg)
    if scope == "layer":
        # every in-flight micro-batch keeps its layer inputs; one layer is recomputed at a time
        stored_tok = load.layers * layer_input * load.in_flight + per_layer_tok
    else:
        if scope == "attention":
            # a GPT's checkpointed attention core keeps its inputs (q, k, v) and wo its output: what is not kept
            # is what the core saves inside — the logsumexp, the scores without flash, Ulysses' head-sharded copies
            per_layer_tok -= el["logsumexp"] + el["scores"] + el["ulysses"]
            if gpt_eager(sh, prof) and autocast_over_fp32(cfg, loc):
                # under autocast the core's inputs q and k are RoPE's fp32 outputs (cos/sin are fp32), cast
                # to 16 bits inside the core: the checkpoint keeps them at 4 bytes
                per_layer_tok += (loc.q + loc.kv) * (4 / bpe - 1)
        stored_tok = load.layers * per_layer_tok * load.in_flight
    # every (stage, micro-batch) in flight keeps its own stage output and RoPE cos/sin (each virtual stage's forward
    # computes them); in_flight counts whole-rank micro-batches, so an interleaved rank holds ``stages`` times as many
    stored_tok += stage_elems_per_token(cfg, sh, prof, loc) * load.in_flight * load.stages
    # torch's schedule (cost/layout.schedule_peak): its sends still hold stage outputs / input gradients of pairs
    # already backwarded; a pair whose stage input was received reads it from a persistent receive buffer
    # (``pp_buffers`` below), not a tensor of its own
    stored_tok += layer_input * (load.held_sends - load.received)
    copies = autocast_weight_bytes(cfg, sh, loc, load)
    acts = stored_tok * loc.tokens * bpe + copies + ulysses_permutation_bytes(cfg, sh)
    if load.embedding:
        acts += embedding_kept_bytes(cfg, sh, loc) * load.in_flight
    logits = loss_bytes(cfg, sh, loc, prof) if load.head else 0.0
    if load.head:  # the last stage's micro-batches in flight, not being backwarded, keep their loss's gradients
        acts += loss_kept_bytes(cfg, sh, loc, prof) * load.losses
    if p.pp > 1 and sh.kind == "gpt":
        # the pipeline engine hands the schedule the rank's whole batch at once: the token ids (first stage) and
        # labels (last stage), int64, live through the step (the swin's pixel inputs are not counted)
        acts += 8 * loc.tokens * step_micro_batches(cfg) * (load.embedding + load.head)
    # PipelineStage's receive buffers (cost/layout.recv_buffers): allocated at the first step, kept across steps
    pp_buffers = load.recv_buffers * layer_input * loc.tokens * bpe
    norm_ws, layer_ws = backward_workspaces(cfg, sh, prof, loc, load)
    out = {"baseline": prof.baseline_bytes, **states, "activations": acts, "logits": logits,
           "comm_buffers": comm_buffer_bytes(cfg, loc), "workspace": max(norm_ws, layer_ws), "pp_buffers": pp_buffers}
    # what the backward holds of the activations: under full checkpointing (eager GPT) the layer being
    # recomputed keeps its input as the checkpoint's (one layer input less), and outside a pipeline (the DDP
    # engine's autocast region closes with the forward) only that layer's autocast weight copies (the
    # recompute's own region makes them)
    acts_bwd = acts_loss = acts
    if scope == "layer":
        acts_loss -= per_layer_tok * loc.tokens * bpe  # the forward recomputes nothing
    if scope == "layer" and gpt_eager(sh, prof):
        acts_bwd -= layer_input * loc.tokens * bpe
        if p.pp == 1 and load.layers:
            acts_bwd -= copies * (1 - 1 / load.layers)
    # the backward peaks at the final norm (the activations as the loss left them) or at the first layer
    bwd_live = max(acts_loss + norm_ws, acts_bwd + layer_ws)
    unsharded = states["fsdp_unsharded"]
    phases = step_phases(cfg, out, acts_loss, bwd_live, optimizer_step_bytes(cfg, sh, loc, load, n_local),
                         fsdp_forward=unsharded - fsdp_grad_bytes(cfg, sh, loc) if p.fsdp and p.pp == 1 else unsharded)
    out["total"] = max(phases.values())
    return out, phases


def peak_load(cfg: Config, sh: Shape, prof: DeviceProfile, loc: RankShape) -> RankLoad:
    """The pipeline rank's load (of ``loc.loads``) with the largest peak: the one :func:`rank_memory` reports when
    given none (the first of equal ones), for a caller that needs the load too (the time model's parameters)."""
    return max(loc.loads, key=lambda ld: rank_memory(cfg, sh, prof, loc, ld)[0]["total"])


def rank_tensor_parts(cfg: Config, sh: Shape, load: RankLoad) -> tuple[list, list, list]:
    """Elements of each parameter tensor the rank holding ``load`` keeps (÷tp where tensor parallelism splits them),
    in module order, as (before its layers: the embedding on the first stage; one of its ``load.layers`` layers;
    after them: the final norm and an untied head on the last)."""
    tp = cfg.parallel.tp
    tied = cfg.model.tie_embeddings if sh.kind == "gpt" else False
    first = sh.embed_tensors(tp) if load.embedding else []
    last = sh.final_norm_tensors() + ([] if tied else sh.head_tensors(tp)) if load.head else []
    return first, sh.layer_tensors(tp), last


def rank_param_tensors(cfg: Config, sh: Shape, load: RankLoad) -> list:
    """Elements of each parameter tensor the rank holding ``load`` keeps, in module order (``named_parameters``):
    :func:`rank_tensor_parts` laid out."""
    first, layer, last = rank_tensor_parts(cfg, sh, load)
    return first + layer * load.layers + last


def rank_params(cfg: Config, sh: Shape, load: RankLoad) -> float:
    """Parameters the rank holding ``load`` keeps (÷tp where tensor parallelism splits them): its layers, the
    embedding on the first stage, the final norm and (untied) head on the last (:func:`rank_tensor_parts`)."""
    first, layer, last = rank_tensor_parts(cfg, sh, load)
    return float(sum(first) + load.layers * sum(layer) + sum(last))


def zero3_persistent_params(cfg: Config, sh: Shape, load: RankLoad, n_local: float, shards: int = 1) -> float:
    """Parameters of the rank holding ``load`` (``n_local`` in all) that DeepSpeed's ZeRO-3 keeps whole
    (:func:`~dist_train.config.zero3_persistence`): its tensors (:func:`rank_param_tensors`, tp-local, module order)
    of at most the threshold's elements, while their running total stays within the model cap. The default
    threshold, 1e5 elements, keeps every norm and bias whole, and in a small model most matrices too (the
    1.2M-parameter test GPT of tests/test_zero_buckets.py: 443,136 of its parameters). Each counted padded up to a
    multiple of ``shards``: the elements its storage holds on ZeRO-3's ``shards`` ranks, whose all-gather buffer
    is the padded shares' (partition_parameters.py ``_allgather_params_coalesced``; the parameter is a view of it)."""
    threshold, cap = zero3_persistence(cfg)
    if cap is None or cap >= n_local:  # the cap cannot bite: count each part once
        first, layer, last = (_shares([n for n in part if n <= threshold], shards) * shards
                              for part in rank_tensor_parts(cfg, sh, load))
        return first + load.layers * layer + last
    tensors = rank_param_tensors(cfg, sh, load)
    return _shares([n for n, whole in zip(tensors, zero3_persistent_flags(cfg, tensors)) if whole], shards) * shards


def zero3_persistent_flags(cfg: Config, tensors: list) -> list[bool]:
    """Whether DeepSpeed's ZeRO-3 keeps each of ``tensors`` (elements, module order) whole: at most the threshold's
    elements, while the running total of those kept stays within the model cap (parameter_offload.py
    ``mark_persistent_parameters`` skips a tensor that would pass the cap, and goes on)."""
    threshold, cap = zero3_persistence(cfg)
    kept, flags = 0.0, []
    for n in tensors:
        whole = n <= threshold and (cap is None or kept + n <= cap)
        kept += n if whole else 0.0
        flags.append(whole)
    return flags


def zero3_partition_elems(cfg: Config, sh: Shape, load: RankLoad, shards: int) -> float:
    """Elements of the ZeRO-3 partition of the rank holding ``load`` over ``shards`` ranks: each tensor is partitioned
    on its own, padded up to a multiple of the shards (partition_parameters.py ``_aligned_size``: every rank's share
    of a tensor is ceil(n / shards), the last rank's padded), so the partition is the sum of the shares, n_local /
    shards only when every tensor divides. The weights' partitions, the gradient partition buffer and the fp32 /
    AdamW flat partitions are all laid out from those shares (stage3.py ``partition_numel``)."""
    first, layer, last = rank_tensor_parts(cfg, sh, load)
    return float(_shares(first, shards) + load.layers * _shares(layer, shards) + _shares(last, shards))


def _shares(tensors: list, shards: int) -> float:
    """Elements of ``shards`` ranks' padded shares of each of ``tensors``: ceil(n / shards) each."""
    return sum(-(-n // shards) for n in tensors)


def rank_param_modules(cfg: Config, sh: Shape, load: RankLoad) -> list[list]:
    """The rank's parameter tensors (:func:`rank_param_tensors`) grouped by the module that owns them, in module order:
    what ZeRO-3 gathers at once when the module runs. The GPT's modules own one tensor each (norms, linears, the
    embedding); the swin's own a weight and a bias each (its linears and LayerNorms), but for the relative position
    bias table, the ``WindowBlock``'s own parameter (:func:`zero3_gathered_bytes` holds it through the block)."""
    first, layer, last = rank_tensor_parts(cfg, sh, load)
    if sh.kind == "gpt":
        return [[n] for n in first + layer * load.layers + last]

    def pairs(tensors: list) -> list[list]:
        return [tensors[i:i + 2] for i in range(0, len(tensors), 2)]
    return pairs(first) + ([layer[:1]] + pairs(layer[1:])) * load.layers + pairs(last)


def zero3_gathered_bytes(cfg: Config, sh: Shape, loc: RankShape, load: RankLoad) -> float:
    """Peak bytes of DeepSpeed ZeRO-3's temporary gathers in a training step's forward and backward, on the rank
    holding ``load`` (0 below ZeRO-3 and at one shard, where a partition is its parameter).

    DeepSpeed 0.19.8 (partitioned_param_coordinator.py) all-gathers a module's partitioned parameters when it runs
    and, once the step's module trace is recorded (from the second step on), also prefetches the next modules'
    parameters, ``min(stage3_max_live_parameters − live, stage3_prefetch_bucket_size)`` elements at a time (the last
    tensor may pass it); after a module runs it releases its parameters unless the trace uses them again within
    ``stage3_max_reuse_distance`` elements. Persistent parameters (:func:`zero3_persistent_params`) stay whole after
    their first gather (counted with the weights), never gathered again. Each gathered tensor holds its padded size (:func:`zero3_partition_elems`: ceil(n / shards) · shards;
    the coalesced gather's copies hold n, so padding is an upper bound there), in the module's dtype (``loc.bpe``).
    Counted here, of the rank's G gathered-tensor elements, in elements of ``loc.bpe`` bytes:

    * the parameters: min(G, W + max(max_reuse, max_live when prefetching)) — W the largest module's gather plus what
      a module holds across others' (the GPT's output matrix, which the loss reads outside its module, so DeepSpeed
      gathers it as the model's external parameter and keeps it to the end of the backward; a swin block's relative
      position bias table, its own parameter, through its children);
    * the coalesced all-gather buffers of a prefetch (several tensors gathered in one flat [Σ shares · shards]
      buffer, which the handle keeps until the last of them is used): min(G, max_live + the largest module's gather)
      when prefetching.

    Measured with real engines (3 gloo ranks, the live gathered storages at every fetch and release of the second
    step: tests/test_zero3_gathers.py): with DeepSpeed's defaults a small model keeps every gathered tensor from its
    forward to its backward and the first prefetch's buffer holds all of them, 2 G — equal but for the coalesced
    copies' padding (equal at 2 ranks, where the test GPT's tensors divide); without reuse or prefetch the largest
    module and the external head — equal; a reuse distance or a live cap in between below this bound (1.1-1.7x the measured).
    The first step (no trace yet: no prefetch, each module released after it runs) peaks lower. Not modelled: a
    module's parameters held while its children run beyond the two above (none in this repo's models)."""
    p, shards = cfg.parallel, loc.grad_shards
    if p.zero_stage != 3 or p.fsdp or shards <= 1:
        return 0.0
    modules = rank_param_modules(cfg, sh, load)
    tensors = [n for module in modules for n in module]
    padded = [0.0 if whole else -(-n // shards) * shards
              for n, whole in zip(tensors, zero3_persistent_flags(cfg, tensors))]
    fetches, start = [], 0
    for module in modules:   # each module's gather: its tensors that are not persistent
        fetches.append(sum(padded[start:start + len(module)]))
        start += len(module)
    gathered = sum(fetches)
    if sh.kind == "gpt":
        # the output matrix (tied: the embedding's, the first module), read by the loss outside its module
        head = (0 if load.embedding else None) if cfg.model.tie_embeddings else (-1 if load.head else None)
        held = fetches.pop(head) if load.head and head is not None else 0.0
    else:
        # each block's relative position bias table: the swin's only module of one tensor
        held = max((f for module, f in zip(modules, fetches) if len(module) == 1), default=0.0)
        fetches = [f for module, f in zip(modules, fetches) if len(module) != 1]
    knobs = zero3_gathers(cfg)
    largest = max(fetches, default=0.0)
    params = min(gathered, held + largest + max(knobs.max_reuse, knobs.max_live if knobs.prefetches else 0))
    flat = min(gathered, knobs.max_live + largest) if knobs.prefetches else 0.0
    return (params + flat) * loc.bpe


def zero_bucket_bytes(cfg: Config, loc: RankShape, n_local: float) -> float:
    """Bytes of the gradient buckets DeepSpeed's ZeRO optimizer allocates on a rank of ``n_local`` parameters:
    :func:`~dist_train.config.zero_bucket_buffers` buckets of :func:`~dist_train.config.zero_reduce_bucket_elements`
    elements in the model's dtype (``loc.bpe``: DeepSpeed's bf16 mode casts the parameters, and its buckets hold
    their gradients) — ``n_local`` elements each as the engine sizes them, the user's ``reduce_bucket_size`` when
    set (DeepSpeed's own default: 2 GB in fp32, whatever the model). Measured against a real engine's buckets and
    its allocator meter: tests/test_zero_buckets.py."""
    if cfg.parallel.zero_stage is None or cfg.parallel.fsdp:
        return 0.0
    return float(zero_bucket_buffers(cfg) * zero_reduce_bucket_elements(cfg, n_local) * loc.bpe)


def zero_buckets_resident(cfg: Config) -> bool:
    """Whether ZeRO's gradient buckets live through the whole run (ZeRO-3: allocated when the engine is built,
    stage3.py) rather than through each backward only (ZeRO-1/2: allocated at its first gradient, released at
    its end, stage_1_and_2.py ``setup_buckets`` / ``_release_ipg_buffers``)."""
    return cfg.parallel.zero_stage == 3


def fp32_master_bytes(cfg: Config, loc: RankShape) -> int:
    """Bytes per parameter of the fp32 master copy the optimizer steps (before ZeRO's sharding): 4 in 16-bit training;
    in fp32 4 under DeepSpeed ZeRO-1/2/3 too, else 0 (ZeRO-0, DDP and FSDP2 step the parameters themselves). ZeRO-1/2
    clone their partition of the weights whatever its dtype (stage_1_and_2.py ``single_partition_of_fp32_groups``:
    ``.detach().clone()``); ZeRO-3 would step its fp32 weight partition itself, but its test compares the partition's
    torch.device with the accelerator's device name, a str, which never equal (stage3.py ``_create_fp32_partitions``),
    so it clones too. Measured on real engines (CPU): tests/test_zero_buckets.py."""
    p = cfg.parallel
    if loc.bpe < 4 or (p.zero_stage is not None and p.zero_stage >= 1 and not p.fsdp):
        return 4
    return 0


def parameter_state_bytes(cfg: Config, sh: Shape, loc: RankShape, load: RankLoad, n_local: float) -> dict:
    """{"weights", "grads", "optimizer", "ddp_buckets", "zero_buckets", "zero_gathered", "fsdp_unsharded"}: bytes of
    the rank's ``n_local`` parameters' states. 16-bit weights and gradients with an fp32 master copy (also in fp32 at
    ZeRO ≥ 1: :func:`fp32_master_bytes`) and fp32 AdamW moments, sharded over ``loc.grad_shards`` by the ZeRO stage
    (1: optimizer, 2: + gradients, 3: + weights — ZeRO-3's shares padded per tensor, :func:`zero3_partition_elems`,
    and its persistent parameters (:func:`zero3_persistent_params`) whole on every rank from their first forward on,
    on top of their partition; their gradients and AdamW state are partitioned like the rest: measured on a real
    engine, tests/test_zero_buckets.py); DDP's flat buckets, a second copy of the gradients; DeepSpeed ZeRO's
    gradient buckets (:func:`zero_bucket_bytes`) and ZeRO-3's temporary gathers (:func:`zero3_gathered_bytes`);
    FSDP2: fp32 shards of everything (mixed precision gathers 16-bit copies)
    and its gathered weights and unsharded gradients (:func:`fsdp_unsharded_bytes`)."""
    p, bpe = cfg.parallel, loc.bpe
    z = p.zero_stage
    shards = loc.grad_shards
    master = fp32_master_bytes(cfg, loc)
    weights = n_local * bpe / (shards if z == 3 else 1)
    grads = n_local * bpe / (shards if z is not None and z >= 2 else 1)
    optim = n_local * (8 + master) / (shards if z is not None and z >= 1 else 1)
    if z == 3 and shards > 1 and not p.fsdp:
        # ZeRO-3 partitions each tensor on its own, padded to a whole share (the weights', the gradients' and the
        # optimizer's flat partitions are laid out from those shares); the persistent parameters are whole besides
        # their partition (one shard: the partition is the parameter)
        part = zero3_partition_elems(cfg, sh, load, shards)
        weights = (part + zero3_persistent_params(cfg, sh, load, n_local, shards)) * bpe
        grads, optim = part * bpe, part * (8 + master)
    ddp = n_local * bpe if (z is None and shards > 1) else 0.0
    unsharded = 0.0
    if p.fsdp:
        weights, grads, optim, ddp = n_local * 4 / shards, n_local * 4 / shards, n_local * 8 / shards, 0.0
        unsharded = fsdp_unsharded_bytes(cfg, sh, loc, load, n_local)
    return {"weights": weights, "grads": grads, "optimizer": optim, "ddp_buckets": ddp,
            "zero_buckets": zero_bucket_bytes(cfg, loc, n_local),
            "zero_gathered": zero3_gathered_bytes(cfg, sh, loc, load), "fsdp_unsharded": unsharded}


def evaluation_state_bytes(cfg: Config, sh: Shape, loc: RankShape) -> float:
    """Bytes of parameter state a rank of ``dist-train eval`` holds (dist_train/checkpoint_eval.py: the engine
    built forward-only, the checkpoint's weights loaded, no optimizer state read), on its most loaded pipeline rank:

    * DeepSpeed (``parallel.zero_stage``): its engine is built without an optimizer (engines/deepspeed.py
      ``DeepSpeedForwardEngine``): the weights in DeepSpeed's dtype (``loc.bpe``), whole at ZeRO-0/1/2, ZeRO-3's
      partition (its padded shares, :func:`zero3_partition_elems`) and its persistent parameters whole
      (:func:`parameter_state_bytes`' weights; ZeRO-3 gathers those for good from its second forward on, the first
      records its module trace); no fp32 master copy, AdamW moments, gradient partitions or buckets. Measured (live tensors after the build and two eval forwards, 1.2M-parameter
      GPT, dp2, ZeRO-0/1/2/3 in fp32 and bf16: tests/test_eval_command.py): within 128 B.
    * the torch engines: the fp32 parameters (autocast computes over them), FSDP2's shards of them over
      ``loc.grad_shards``; torch's AdamW allocates its moments at the first step, which never comes, and the
      forward-only engine has no DDP buckets (``engines.ForwardEngine``)."""
    z = cfg.parallel.zero_stage

    def held(load: RankLoad) -> float:
        n_local = rank_params(cfg, sh, load)
        if z is None:
            return n_local * 4 / (loc.grad_shards if cfg.parallel.fsdp else 1)
        return parameter_state_bytes(cfg, sh, loc, load, n_local)["weights"]
    return max(held(load) for load in loc.loads)


def comm_buffer_bytes(cfg: Config, loc: RankShape) -> float:
    """Bytes of the cp that runs (:func:`~dist_train.cost.shape.cp_execution`): the ring's K/V double buffer and
    dK/dV accumulators (per K/V piece when the ring is pieced; hybrid: of the repeated heads), the all-to-all's
    output of q, k, v (swin: q|k|v in one)."""
    comm = 0.0
    cpx = cp_execution(cfg)
    if cpx.ring > 1:
        comm += 4 * ring_piece_tokens(cfg, loc) * loc.kv * cpx.kv_repeat * loc.bpe * 2
    if cpx.ulysses > 1:
        comm += loc.tokens * (loc.q + 2 * loc.kv * cpx.kv_repeat) * loc.bpe
    return comm


def step_phases(cfg: Config, comp: dict, acts_loss: float, bwd_live: float, optimizer_step: float,
                fsdp_forward: float) -> dict:
    """Bytes alive at each phase of one training step (``comp``: :func:`memory_model`'s components):

    * "loss": the end of the forward through the loss's backward — the activations of the micro-batches in
      flight (``acts_loss``: under full checkpointing no layer is being recomputed yet), the loss's transient
      chunk and what it keeps (``logits``); the gradients only where an earlier
      micro-batch made them (accumulation, a pipeline, DeepSpeed's persistent gradient buffers: the DDP and
      FSDP2 engines set them to None after each step); FSDP2's gathered weights, not its gradient buffers; ZeRO-3's
      temporary gathers (``zero_gathered``, in the backward too; released by the optimizer step);
    * "backward": its peak (``bwd_live``: activations + workspace at the final norm's backward or at the first
      layer's, where the stage output's gradient takes the place of the stage output), the cp buffers
      (conservative: they live inside the attention's backward, when a layer's MLP activations are already
      freed), every gradient and FSDP2's buffers (conservative: at the first layer only the head's and that
      layer's gradients exist yet); the chunked loss's two gradients are handed on in place before any layer's
      backward;
    * "optimizer": gradients, optimizer state and the update's transient (:func:`optimizer_step_bytes`).

    No checkpoint phase: every engine saves and loads its own shards in place (FSDP2 × tp too: each rank's blocks of
    the tp=1 tensors, checkpoint/adapters.py ``fsdp_rectangles``; DeepSpeed ZeRO: each rank's boxes of its fp32
    partition, ``DeepSpeedStateAdapter``), nothing is gathered onto the device; an async save's staging copies go to
    host memory.

    Baseline, weights, optimizer state, DDP's buckets, ZeRO-3's gradient bucket and a pipeline stage's receive
    buffers live through all phases; ZeRO-1/2's gradient buckets through the backward only. Measured on one CPU
    rank (tests/test_gpt_saved_tensors.py, tests/test_swin_saved_tensors.py: the live-tensor peak per phase; the
    ZeRO buckets on two: tests/test_zero_buckets.py)."""
    p = cfg.parallel
    resident = comp["baseline"] + comp["weights"] + comp["optimizer"] + comp["ddp_buckets"] + comp["pp_buffers"]
    in_backward = 0.0
    if zero_buckets_resident(cfg):
        resident += comp["zero_buckets"]
    else:
        in_backward = comp["zero_buckets"]
    grads_early = p.pp > 1 or cfg.grad_accum_steps > 1 or (p.zero_stage is not None and not p.fsdp)
    gathered = comp["zero_gathered"]  # ZeRO-3 releases every gather by the step's end
    loss = resident + (comp["grads"] if grads_early else 0.0) + fsdp_forward + acts_loss + comp["logits"] + gathered
    backward = (resident + comp["grads"] + comp["fsdp_unsharded"] + bwd_live + comp["comm_buffers"] + in_backward
                + gathered)
    optimizer = resident + comp["grads"] + optimizer_step
    if p.fsdp and p.pp > 1:
        optimizer += comp["fsdp_unsharded"]  # conservative: the stage stays gathered until its reduce-scatter
    return {"loss": loss, "backward": backward, "optimizer": optimizer}


def backward_workspaces(cfg: Config, sh: Shape, prof: DeviceProfile, loc: RankShape,
                        load: RankLoad) -> tuple[float, float]:
    """(final norm, layer): bytes the backward creates above the activations it frees, at its two candidate
    peaks — the final norm's backward on the head stage (before any layer is recomputed) and the first
    layer's. The eager GPT (``models/lean_autograd``; measured with torch.profiler's allocator events, the op at
    the backward's peak: tests/test_gpt_saved_tensors.py): the final RMSNorm's backward holds 6 fp32
    [tokens, d] at once (the incoming dL/dh, the recomputed x·rstd, the normed gradient, and the three terms
    of x's gradient: ``grad_normed * rstd + grad_sq * (2.0 * xf)``) and 16 B per token (its kept rstd and three
    [tokens, 1] fp32 gradients); SwiGLU's backward holds the product's gradient, up's, the gradient into silu
    and gate's (4f of the matmul outputs' dtype) while w2's input (f) is freed: 3f per token; the attention's
    backward stays below both (its dq, dk, dv and output gradient, 2q + 2kv, come after the MLP's activations
    are freed). Otherwise (the swin, a fused what-if profile) no final norm term and the convention of one layer's
    activation gradients, 2·(d + f) per token. On a pipeline's last stage the layer's + the stage output, which
    ``PipelineStage`` keeps through its backward."""
    if not gpt_eager(sh, prof):
        norm_ws, layer_ws = 0.0, 2 * loc.tokens * (sh.d + loc.f) * loc.bpe
    else:
        norm = (6 * sh.d * 4 + 16) / sequence_split(cfg) if load.head else 0.0
        mlp = 3 * loc.f * loc.bpe if load.layers else 0.0
        norm_ws, layer_ws = loc.tokens * norm, loc.tokens * mlp
    if load.head and cfg.parallel.pp > 1:
        # PipelineStage.backward_one_chunk keeps the stage output (popped from its cache into locals) through the
        # whole backward: the final norm's gradient into the last layer does not take its place
        layer_ws += residual_elems_per_token(cfg, sh, prof, loc) * loc.tokens * loc.bpe
    return norm_ws, layer_ws


def optimizer_step_bytes(cfg: Config, sh: Shape, loc: RankShape, load: RankLoad, n_local: float) -> float:
    """The transient of AdamW's step (``optim.build_optimizer``: torch's single-tensor AdamW, foreach off), one
    parameter at a time in the optimizer's order (the matrices in module order, then the vectors): fp32
    ``exp_avg_sq.sqrt()`` and its division by the bias correction, two tensors of the parameter's size, while
    the previous parameter's ``denom`` is still bound — the largest ``previous + 2 · current`` over the rank's
    consecutive matrices (measured with the allocator meter, tests/test_gpt_saved_tensors.py; ÷ shards under
    FSDP2). DeepSpeed's ZeRO hands AdamW its flat fp32 partition, one tensor: two partition-sized temporaries
    by the same rule (not measured). The swin by the same rule over its block's matrices (not measured)."""
    p = cfg.parallel
    if p.zero_stage is not None and not p.fsdp:
        return 2 * 4 * n_local / loc.grad_shards
    d = sh.d
    if sh.kind == "gpt":
        layer = [d * x / p.tp for x in (sh.q_dim, sh.kv_dim, sh.kv_dim, sh.q_dim, sh.ffn, sh.ffn, sh.ffn)]
        embed = head = sh.vocab_rows(p.tp) * d
        if cfg.model.tie_embeddings:
            head = 0
    else:
        layer = [3 * d * d, d * d, d * sh.ffn, d * sh.ffn]
        embed, head = sh.embed_in * d, sh.vocab * d
    order = ([embed] if load.embedding else []) + layer * min(2, load.layers) + ([head] if load.head and head else [])
    worst = max(2 * cur + prev for prev, cur in zip([0.0] + order, order)) if order else 0.0
    return 4 * worst / (loc.grad_shards if p.fsdp else 1)


#: the phases of :func:`step_phases`, as the dry run's table names them
PHASE_LABELS = {"loss": "loss", "backward": "bwd", "optimizer": "optim"}


def peak_phase(phases: dict) -> str:
    """The phase (a key of :func:`rank_memory`'s phases) with the most bytes: where the step peaks."""
    return max(phases, key=phases.get)


@dataclass(frozen=True)
class MemoryEstimate:
    """One rank's memory, bytes by :func:`memory_model`'s components (its dict, with "total", the step's peak)
    and its phases (:func:`rank_memory`), grouped into the dry-run table's columns."""

    components: dict
    device: str         # the device profile the numbers come from, as the table header states it
    phases: dict        # bytes alive at each phase (:func:`step_phases`): components["total"] is the largest

    @property
    def params(self) -> float:
        return self.components["weights"]

    @property
    def grads(self) -> float:
        # DDP's flat buckets are a second copy of the gradients; ZeRO's buckets hold gradients before their reduction
        return self.components["grads"] + self.components["ddp_buckets"] + self.components["zero_buckets"]

    @property
    def optimizer(self) -> float:
        return self.components["optimizer"]

    @property
    def activations(self) -> float:
        return self.components["activations"]

    @property
    def total(self) -> float:
        """The step's peak (the largest phase), below the components' sum where they do not coexist."""
        return self.components["total"]

    @property
    def peak_phase(self) -> str:
        return peak_phase(self.phases)

    @property
    def other(self) -> float:
        """Baseline (CUDA context / framework RSS), logits, communication buffers, workspace, FSDP2's
        gathered weights and unsharded gradients, ZeRO-3's temporary gathers, a pipeline stage's receive buffers:
        every component the other columns do not show."""
        c = self.components
        return (c["baseline"] + c["logits"] + c["comm_buffers"] + c["workspace"] + c["fsdp_unsharded"]
                + c["zero_gathered"] + c["pp_buffers"])


def estimate_memory(cfg: Config, stages: list[Stage], profile: DeviceProfile,
                    label: Optional[str] = None) -> MemoryEstimate:
    """Bytes one rank holding ``stages`` (all on one pipeline rank: :func:`~dist_train.cost.layout.stages_of_rank`)
    uses on ``profile`` devices, by :func:`memory_model`; ``label`` names the profile in the dry run's header."""
    sh, loc = rank_inputs(cfg, profile)
    comp, phases = rank_memory(cfg, sh, profile, loc, load_of(cfg, stages))
    return MemoryEstimate(comp, label or profile.name, phases)

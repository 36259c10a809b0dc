"""What a training step holds in memory on one rank, predicted from shapes (`camex-flops --memory`): parameters,
gradients and optimizer states split by ZeRO stage and by expert vs non-expert groups, activations, the CAMEx
layers' own transients, DeepSpeed's communication buffers, the peak, and the largest micro-batch that fits.

    from camex_ds.analysis.memory import memory, largest_micro_batch
    m = memory(cfg, micro_batch=8, world_size=8, zero_stage=2, bf16=True)
    m["peak"], m["parts"]["optimizer_states"], m["groups"]["expert"]
    largest_micro_batch(cfg, 80 * 2**30, world_size=8, zero_stage=2, bf16=True)

The terms follow what the code and DeepSpeed 0.19 allocate (`camex_ds.analysis.measured_memory` measures them;
docs/memory.md compares): expert parameters are replicated over the expert-data-parallel group of
`world/ep` ranks, so ZeRO 1/2 partition the expert groups' master weights, Adam moments (and, at stage 2,
gradients) over that group and the non-expert groups over all `world` ranks. The peak is the larger of two
moments: the start of the backward (model states, every micro-batch's saved activations, the loss's
`[tokens, vocab]` gradients, the CAMEx per-step values) and the optimizer step (model states, gradients, the
fp32 gradient partition the optimizer reads). Activation checkpointing (`checkpoint_every=k`: every k-th block
recomputed) keeps only those blocks' inputs, plus one block's activations during its recompute. The `smoe`
baseline's token dispatch buffers are not modelled (its experts count as parameters, its FFN as a dense one's).
"""
from __future__ import annotations

import math
from typing import Optional

from ..config import ConfigError, ModelConfig
from ..moe.ffn import matrix_shapes
from ..moe.functional import MERGE_CHUNK_ELEMENTS, MERGE_CHUNK_ELEMENTS_GPU, kron_factor_shape
from ..moe.plan import Evaluation, evaluations
from .flops import CfgLike, param_counts, resolve_config

FP32 = 4
ADAM_STATES = 2  # exp_avg, exp_avg_sq (fp32)
DEFAULT_BUCKET = 500_000_000  # DeepSpeed's reduce_bucket_size and allgather_bucket_size (elements)
PARTS = ("parameters", "gradients", "optimizer_states", "activations", "camex_transients", "communication")


def _expert_elements(cfg: ModelConfig) -> int:
    """Elements of the experts (and their curvature factors) one rank stores: the expert parameter groups."""
    moe = cfg.moe
    if moe is None:
        return 0
    shapes = matrix_shapes(cfg.d_model, cfg.ffn_hidden_size, cfg.activation)
    p = sum(o * i for o, i in shapes.values())
    if moe.method == "smoe":
        return len(cfg.moe_layers) * moe.num_experts // moe.ep_size * p
    factors = moe.curvature_rank * sum(sum(k * k for k in kron_factor_shape(o) + kron_factor_shape(i))
                                       for o, i in shapes.values()) if moe.curved else 0
    return len(cfg.moe_layers) * moe.stored_experts // moe.ep_size * (p + factors)


def model_states(cfg: CfgLike, *, world_size: int = 1, zero_stage: int = 0, bf16: bool = False,
                 offload: bool = False, reduce_bucket_size: int = DEFAULT_BUCKET, overlap_comm: bool = False) -> dict:
    """Bytes of parameters, gradients, optimizer states and gradient-reduction buffers on one rank, each split into
    the `expert` and `non_expert` parameter groups. With `offload` the fp32 master, its gradient and the Adam
    moments live on the CPU (`cpu_optimizer_states`), not on the device."""
    cfg = resolve_config(cfg)
    ep = cfg.moe.ep_size if cfg.moe is not None else 1
    if world_size % ep:
        raise ConfigError(f"world_size={world_size} is not a multiple of ep_size={ep}")
    if zero_stage not in (0, 1, 2):
        raise ConfigError(f"zero_stage={zero_stage!r} is invalid: expected 0, 1 or 2")
    width = 2 if bf16 else FP32
    expert = _expert_elements(cfg)
    groups = {"expert": (expert, world_size // ep), "non_expert": (param_counts(cfg)["per_rank"] - expert, world_size)}
    out = {}
    for name, (elements, dp) in groups.items():
        shard = math.ceil(elements / dp) if zero_stage else elements
        master = shard if (zero_stage or bf16) else 0  # ZeRO keeps an fp32 partition; bf16 at stage 0 a full copy
        grads = elements * width
        if zero_stage == 2:
            grads = shard * width  # each rank keeps its partition's reduced gradients only
        # the fp32 gradient the optimizer steps the master with: on the CPU with the master when offloaded
        fp32_grads = shard * FP32 if (zero_stage or bf16) else 0
        states = (master + ADAM_STATES * shard) * FP32
        out[name] = {"elements": elements, "parameters": elements * width,
                     "gradients": grads + (0 if offload else fp32_grads),
                     "optimizer_states": 0 if offload else states,
                     "cpu_optimizer_states": states + fp32_grads if offload else 0}
    buffers = 2 if overlap_comm else 1
    out["communication"] = buffers * reduce_bucket_size * (FP32 if zero_stage == 1 else width) if zero_stage else 0
    return out


def _block_activation_elements(cfg: ModelConfig) -> int:
    """Elements one block saves for its backward per token: the block input and the two norms' outputs, the fused
    q/k/v output SDPA reads, its output and the projection's contiguous input, the residual after attention, and
    the FFN's hidden activations (gelu: its input and output; swiglu: gate, silu, up and their product)."""
    d, qkv = cfg.d_model, cfg.d_model + 2 * cfg.kv_heads * cfg.head_dim
    hidden = (4 if cfg.activation == "swiglu" else 2) * cfg.ffn_hidden_size
    rotary = 2 * d if cfg.architecture == "llama" else 0  # rotated q and k copies
    return 6 * d + qkv + hidden + rotary


def _merge_chunk(cfg: ModelConfig, segments: int, gpu: bool) -> int:
    """Segments `_MergedLinear` merges at once for the largest matrix (`functional.segment_chunk`)."""
    largest = max(o * i for o, i in matrix_shapes(cfg.d_model, cfg.ffn_hidden_size, cfg.activation).values())
    limit = MERGE_CHUNK_ELEMENTS_GPU if gpu else MERGE_CHUNK_ELEMENTS
    return max(1, min(segments, limit // largest)) * largest


def _dynamic_layers(cfg: ModelConfig, segments: int, accumulation: int) -> tuple[int, int]:
    """Elements the dynamic chain's layers save (per matrix, as the layer's plan evaluates it: `moe.plan.evaluations`,
    the choice `analysis.flops` counts too) and the most items one curvature application works on at once (its
    buffers).

    Chain start: the gathered task vectors `n·P` and the per-segment weights `S·P` the FFN's batched GEMMs read.
    Through the span of size K: the images `n·(K+1)·P` and the curvature's contiguous input `n·K·P`. Segment by
    segment: each expert's term `S·P` (kept for its gate's gradient), and the weights `S·P`."""
    moe = cfg.moe
    n = moe.routed_experts
    saved, items = 0, moe.routed_experts // moe.ep_size
    shapes = matrix_shapes(cfg.d_model, cfg.ffn_hidden_size, cfg.activation)
    spans: dict = {}
    for chain_start in cfg.chain_starts:
        chosen = evaluations(moe, shapes, chain_start, spans, segments, accumulation)
        for name, (evaluation, _) in chosen.items():
            (o, i), size = shapes[name], spans.get(name)
            if evaluation is Evaluation.START:
                saved += (n + segments) * o * i
            elif evaluation is Evaluation.SPAN:
                saved += (n * (size + 1) + (n * size if moe.curved else 0) + segments) * o * i
                items = max(items, n * size)
            else:
                saved += (n + 1) * segments * o * i
                items = max(items, segments)
        spans = {name: size for name, (_, size) in chosen.items() if size is not None}
    return saved, items


def camex_transients(cfg: ModelConfig, tokens: int, accumulation: int, width: int, gpu: bool) -> dict:
    """Bytes the merge layers hold beyond the blocks' activations, for `tokens` tokens per micro-batch:
    `gathered` (static layers: every expert's curved task vectors, `N·P` per layer, saved with the base as the
    merge GEMM's `[N+1, P]` operand; dynamic layers: `_dynamic_layers`), `local` (the raw task vectors `N/ep·P`
    the curvature saves), `per_step` (with accumulation > 1 the per-step values kept across micro-batches and
    their fp32 gradient sums) and `scratch` (the merge's chunked merged-weight buffers and the curvature's work
    buffers, reused but live)."""
    moe = cfg.moe
    out = {"gathered": 0, "local": 0, "per_step": 0, "scratch": 0}
    if moe is None or moe.method == "smoe":
        return out
    shapes = matrix_shapes(cfg.d_model, cfg.ffn_hidden_size, cfg.activation)
    p = sum(o * i for o, i in shapes.values())
    largest = max(o * i for o, i in shapes.values())
    n, local = moe.routed_experts, moe.routed_experts // moe.ep_size
    segments = tokens // moe.segment_len_for(cfg.seq_len)
    layers = len(cfg.moe_layers)
    out["local"] = layers * local * p if moe.curved else 0
    out["per_step"] = layers * n * p * (1 + FP32 / width) if accumulation > 1 else 0
    if moe.dynamic:
        out["gathered"], items = _dynamic_layers(cfg, segments, accumulation)
        out["scratch"] = 5 * items * largest if moe.curved else 0
    else:
        out["gathered"] = layers * (n + 1) * p
        out["scratch"] = 2 * _merge_chunk(cfg, segments, gpu) + (5 * local * largest if moe.curved else 0)
    return {k: v * width for k, v in out.items()}


def activations(cfg: ModelConfig, tokens: int, width: int, checkpoint_every: Optional[int] = None,
                accumulation: int = 1) -> dict:
    """Bytes saved for the backward of one micro-batch of `tokens` tokens: `blocks` (all blocks, or with
    `checkpoint_every=k` the inputs of every block plus the saved activations of the blocks not recomputed and
    one recomputed block at a time), `head` (the final norm's output, the logits and their fp32 log-softmax),
    `loss_backward` (the fp32 gradients of the log-softmax and the logits at the start of the backward) and
    `previous_logits` (with accumulation > 1, the trainer holds the previous micro-batch's output, its logits,
    until the next forward returns)."""
    per_block = _block_activation_elements(cfg)
    layers = cfg.n_layers
    if checkpoint_every:
        recomputed = layers // checkpoint_every
        blocks = tokens * (recomputed * cfg.d_model + (layers - recomputed + 1) * per_block)
    else:
        blocks = tokens * layers * per_block
    vocab = cfg.vocab_size
    head = tokens * (cfg.d_model * width + vocab * width + vocab * FP32)
    return {"blocks": blocks * width, "head": head, "loss_backward": 2 * tokens * vocab * FP32,
            "previous_logits": tokens * vocab * width if accumulation > 1 else 0}


def memory(cfg: CfgLike, *, micro_batch: int, world_size: int = 1, zero_stage: int = 0, bf16: bool = False,
           offload: bool = False, accumulation: int = 1, checkpoint_every: Optional[int] = None,
           reduce_bucket_size: int = DEFAULT_BUCKET, overlap_comm: bool = False, gpu: bool = True,
           vocab_size: Optional[int] = None) -> dict:
    """Per-rank bytes of one training step (see the module's docstring). `gpu=False` sizes the CAMEx merge chunks as
    on a CPU. Returns `parts` (`PARTS` -> bytes, which add up to `total`), `groups` (expert and non-expert model
    states), `activations` and `camex` (their terms), `peak` (the larger of `backward_start` and
    `optimizer_step`) and the inputs."""
    cfg = resolve_config(cfg)
    if vocab_size is not None:
        cfg = cfg.replace(vocab_size=vocab_size)
    for name, value in (("micro_batch", micro_batch), ("accumulation", accumulation), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name}={value!r} is invalid: expected an integer >= 1")
    if checkpoint_every is not None and not 1 <= checkpoint_every <= cfg.n_layers:
        raise ConfigError(f"checkpoint_every={checkpoint_every!r} is invalid: expected 1..n_layers={cfg.n_layers}")
    width = 2 if bf16 else FP32
    tokens = micro_batch * cfg.seq_len
    states = model_states(cfg, world_size=world_size, zero_stage=zero_stage, bf16=bf16, offload=offload,
                          reduce_bucket_size=reduce_bucket_size, overlap_comm=overlap_comm)
    groups = {k: states[k] for k in ("expert", "non_expert")}
    acts = activations(cfg, tokens, width, checkpoint_every, accumulation)
    camex = camex_transients(cfg, tokens, accumulation, width, gpu)
    total_of = lambda key: sum(g[key] for g in groups.values())  # noqa: E731
    parts = {"parameters": total_of("parameters"), "gradients": total_of("gradients"),
             "optimizer_states": total_of("optimizer_states"), "activations": sum(acts.values()),
             "camex_transients": sum(camex.values()), "communication": states["communication"]}
    params, optim = parts["parameters"], parts["optimizer_states"]
    backward_start = params + optim + parts["communication"] + parts["activations"] + parts["camex_transients"]
    optimizer_step = params + optim + parts["communication"] + parts["gradients"] + camex["scratch"]
    return {"parts": parts, "total": sum(parts.values()), "groups": groups, "activations": acts, "camex": camex,
            "backward_start": backward_start, "optimizer_step": optimizer_step,
            "peak": max(backward_start, optimizer_step),
            "cpu_optimizer_states": total_of("cpu_optimizer_states"),
            "inputs": {"micro_batch": micro_batch, "world_size": world_size, "ep_size": cfg.moe.ep_size if cfg.moe
                       else 1, "zero_stage": zero_stage, "bf16": bf16, "offload": offload,
                       "accumulation": accumulation, "checkpoint_every": checkpoint_every,
                       "reduce_bucket_size": reduce_bucket_size, "gpu": gpu}}


def largest_micro_batch(cfg: CfgLike, memory_bytes: float, *, limit: int = 1 << 16, **options) -> int:
    """The largest micro-batch whose predicted peak fits in `memory_bytes` (0 if not even one sequence fits);
    `options` are `memory`'s. The peak grows with the micro-batch, so a binary search finds it."""
    fits = lambda mb: memory(cfg, micro_batch=mb, **options)["peak"] <= memory_bytes  # noqa: E731
    if not fits(1):
        return 0
    low, high = 1, 2
    while high <= limit and fits(high):
        low, high = high, high * 2
    high = min(high, limit + 1)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


__all__ = ["PARTS", "memory", "model_states", "activations", "camex_transients", "largest_micro_batch"]

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
gradients) over that group and the non-expert groups over all `world` ranks. The peak is the largest of four
moments: the start of the backward (model states, every micro-batch's saved activations, the loss's
`[tokens, vocab]` gradients, the merge layers' plans and saved tensors); with activation checkpointing
(`checkpoint_every=k`: every k-th block recomputed, which keeps only its inputs) a recomputed block's backward
(the first or the last one: the saved tensors or the gradients so far, the logits, and the block's activations and
merge terms again with its backward's gradients); the last merge layer's plan backward, which at accumulation 1
runs right after its block's (`moe.StepPlans`) while the blocks below still hold what they saved; and the
optimizer step (model states, gradients, the largest group's fp32 gradient partition and AdamW temporaries). The
`smoe` baseline's token dispatch buffers are not modelled (its experts count as parameters, its FFN as a dense
one's).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

from ..config import ConfigError, ModelConfig
from ..model.gpt import recomputed_block
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
    the `expert` and `non_expert` parameter groups, and per group `optimizer_step`: what stepping it allocates for
    the step's length (DeepSpeed steps one group at a time). With `offload` the fp32 master, its gradient and the
    Adam moments live on the CPU (`cpu_optimizer_states`), not on the device."""
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
        # the fp32 gradient the optimizer steps the master with: on the CPU with the master when offloaded; ZeRO
        # flattens it from the partition's gradients when it steps the group, bf16 at stage 0 keeps it
        fp32_grads = shard * FP32 if (zero_stage or bf16) else 0
        kept = fp32_grads if not zero_stage else 0
        # torch's AdamW on a flattened partition: sqrt(v) and its quotient, two fp32 temporaries of the partition
        stepping = fp32_grads - kept + (2 * shard * FP32 if master else 0)
        states = (master + ADAM_STATES * shard) * FP32
        out[name] = {"elements": elements, "parameters": elements * width,
                     "gradients": grads + (0 if offload else kept),
                     "optimizer_states": 0 if offload else states,
                     "optimizer_step": 0 if offload else stepping,
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


class LayerTerms(NamedTuple):
    """Elements one merge layer holds for its backward: `plan` (its step plan's tensors, outside its block), `block`
    (what its block saves beyond the dense activations) and `kept` (the part of `block` still saved when the block
    is recomputed: a dynamic layer's per-segment weights, which are the next block's input)."""

    plan: int
    block: int
    kept: int = 0


def _static_layer(cfg: ModelConfig) -> LayerTerms:
    """A static layer: its plan's curved task vectors `N·P`, and the `[N+1, P]` operand (base and task vectors) each
    merge GEMM saves in the block."""
    n = cfg.moe.routed_experts
    p = sum(o * i for o, i in matrix_shapes(cfg.d_model, cfg.ffn_hidden_size, cfg.activation).values())
    return LayerTerms(plan=n * p, block=(n + 1) * p)


def _dynamic_layers(cfg: ModelConfig, segments: int, accumulation: int) -> tuple[list[LayerTerms], int]:
    """Each dynamic layer's terms (per matrix, as the layer's plan evaluates it: `moe.plan.evaluations`, the choice
    `analysis.flops` counts too) and the most items one curvature application works on at once (its buffers).

    Chain start: the plan's gathered task vectors `n·P`; the block's per-segment weights `S·P` the FFN's batched
    GEMMs read. Through the span of size K: the plan's images `n·(K+1)·P` and the curvature's contiguous input
    `n·K·P`; the weights `S·P`. Segment by segment: the plan's gathered curved experts `n·P`; each expert's term
    `S·P` (kept for its gate's gradient), and the weights `S·P`. The weights are the block's output, so they stay
    when the block is recomputed."""
    moe = cfg.moe
    n = moe.routed_experts
    terms, items = [], moe.routed_experts // moe.ep_size
    shapes = matrix_shapes(cfg.d_model, cfg.ffn_hidden_size, cfg.activation)
    spans: dict = {}
    for chain_start in cfg.chain_starts:
        chosen = evaluations(moe, shapes, chain_start, spans, segments, accumulation)
        plan = block = 0
        for name, (evaluation, _) in chosen.items():
            (o, i), size = shapes[name], spans.get(name)
            if evaluation is Evaluation.START:
                plan += n * o * i
            elif evaluation is Evaluation.SPAN:
                plan += (n * (size + 1) + (n * size if moe.curved else 0)) * o * i
                items = max(items, n * size)
            else:
                plan += n * o * i
                block += n * segments * o * i
                items = max(items, segments)
        weights = segments * sum(o * i for o, i in shapes.values())
        terms.append(LayerTerms(plan=plan, block=block + weights, kept=weights))
        spans = {name: size for name, (_, size) in chosen.items() if size is not None}
    return terms, items


def _layer_terms(cfg: ModelConfig, segments: int, accumulation: int) -> tuple[list[LayerTerms], int]:
    """Each merge layer's terms, and the most items one curvature application works on at once."""
    moe = cfg.moe
    if moe.dynamic:
        return _dynamic_layers(cfg, segments, accumulation)
    return [_static_layer(cfg)] * len(cfg.moe_layers), moe.routed_experts // moe.ep_size


def _recomputed_layers(cfg: ModelConfig, checkpoint_every: Optional[int]) -> list[bool]:
    """Per MoE layer, whether its block is recomputed (`GPT.set_activation_checkpointing`: every k-th block)."""
    return [recomputed_block(i, checkpoint_every) for i in cfg.moe_layers]


def camex_transients(cfg: ModelConfig, tokens: int, accumulation: int, width: int, gpu: bool,
                     checkpoint_every: Optional[int] = None) -> dict:
    """Bytes the merge layers hold beyond the blocks' activations, for `tokens` tokens per micro-batch
    (`LayerTerms`): `plans` (the step plans' tensors, held until the step ends), `saved` and `saved_below` (what
    the blocks save, a recomputed block only what outlives its recomputation; `saved_below`: the blocks before the
    last recomputed one, `checkpoint_every=k`: the first k-1), `per_step` (with accumulation > 1, the fp32 sums of the
    gradients the micro-batches send the plans' tensors), `scratch` (the merge's chunked merged-weight buffers and
    the curvature's work buffers, reused but live) and `recompute` (with checkpointing: what one recomputed layer's
    block saves again while its backward runs, its per-segment weights included, and that backward's gradient of
    its largest matrix's merge operand or per-segment weights; not part of the other moments). The curvature's
    input, the raw task vectors, is rebuilt in its backward (`moe.saved`), not kept."""
    moe = cfg.moe
    out = {"plans": 0, "saved": 0, "saved_below": 0, "per_step": 0, "scratch": 0, "recompute": 0}
    if moe is None or moe.method == "smoe":
        return out
    shapes = matrix_shapes(cfg.d_model, cfg.ffn_hidden_size, cfg.activation)
    largest = max(o * i for o, i in shapes.values())
    segments = tokens // moe.segment_len_for(cfg.seq_len)
    layers = len(cfg.moe_layers)
    terms, items = _layer_terms(cfg, segments, accumulation)
    out["scratch"] = 5 * items * largest if moe.curved else 0
    if moe.dynamic:
        gradient = segments * largest  # the gradient of the layer's per-segment weights
    else:
        gradient = (moe.routed_experts + 1) * largest  # the gradient of the merge operand
        out["scratch"] += 2 * _merge_chunk(cfg, segments, gpu)
    out["plans"] = sum(t.plan for t in terms)
    out["per_step"] = out["plans"] * FP32 // width if accumulation > 1 else 0
    recomputed = _recomputed_layers(cfg, checkpoint_every)
    below = [i < checkpoint_every - 1 for i in cfg.moe_layers] if checkpoint_every else [False] * layers
    out["saved_below"] = sum(t.block for t, under in zip(terms, below) if under)
    out["saved"] = sum(t.kept if again else t.block for t, again, under in zip(terms, recomputed, below) if not under)
    out["recompute"] = max((t.block + gradient for t, again in zip(terms, recomputed) if again), default=0)
    return {k: v * width for k, v in out.items()}


def activations(cfg: ModelConfig, tokens: int, width: int, checkpoint_every: Optional[int] = None,
                accumulation: int = 1) -> dict:
    """Bytes saved for the backward of one micro-batch of `tokens` tokens: `blocks` (all blocks, or with
    `checkpoint_every=k` the inputs of the recomputed blocks and the other blocks' activations; `blocks_below`: the
    part of them the first k-1 blocks and the k-th's input hold, still saved when the last recomputed block's
    backward runs), `head` (the final norm's output, the logits and their fp32 log-softmax), `loss_backward` (the
    fp32 gradients of the log-softmax and the logits at the start of the backward), `previous_logits` (with
    accumulation > 1, the trainer holds the previous micro-batch's output, its logits, until the next forward
    returns) and `recompute` (with checkpointing: one recomputed block's activations while its backward runs, and
    that backward's gradient of the FFN's hidden activations; not part of the backward's start)."""
    per_block = _block_activation_elements(cfg)
    layers = cfg.n_layers
    recomputed = layers // checkpoint_every if checkpoint_every else 0
    hidden_gradient = (2 if cfg.activation == "swiglu" else 1) * cfg.ffn_hidden_size
    vocab = cfg.vocab_size
    below = tokens * ((checkpoint_every - 1) * per_block + cfg.d_model) * width if recomputed else 0
    return {"blocks": tokens * (recomputed * cfg.d_model + (layers - recomputed) * per_block) * width - below,
            "blocks_below": below,
            "head": tokens * (cfg.d_model * width + vocab * width + vocab * FP32),
            "loss_backward": 2 * tokens * vocab * FP32,
            "previous_logits": tokens * vocab * width if accumulation > 1 else 0,
            "recompute": tokens * (per_block + hidden_gradient) * width if recomputed else 0}


def _plan_backward(cfg: ModelConfig, tokens: int, width: int, checkpoint_every: Optional[int],
                   accumulation: int) -> tuple[int, int]:
    """The last merge layer's plan backward, which at accumulation 1 runs right after its block's (`moe.StepPlans`)
    while the blocks below still hold what they saved (a lower layer's finds fewer): the bytes it adds (the
    gradients of the plan's tensors, and the curvature backward's contiguous gradient and input gradient) and the
    bytes gone by then (that block's saved activations and merge terms). At accumulation > 1 the plans' backward
    runs after every block's, when the activations are gone: (0, 0)."""
    moe = cfg.moe
    if moe is None or moe.method == "smoe" or accumulation > 1:
        return 0, 0
    terms, items = _layer_terms(cfg, tokens // moe.segment_len_for(cfg.seq_len), accumulation)
    top, again = terms[-1], _recomputed_layers(cfg, checkpoint_every)[-1]
    largest = max(o * i for o, i in matrix_shapes(cfg.d_model, cfg.ffn_hidden_size, cfg.activation).values())
    added = top.plan + (2 * items * largest if moe.curved else 0)
    gone = tokens * (cfg.d_model if again else _block_activation_elements(cfg)) + (top.kept if again else top.block)
    return added * width, gone * width


def _moments(parts: dict, acts: dict, camex: dict, logits: int, stepping: int, zero_stage: int, behind: float,
             plan_backward: tuple[int, int]) -> dict:
    """The moments of a step one of which is its peak, each what is live then: `backward_start` (every saved
    activation, the head's and the loss's gradients, the merge layers' plans and saved tensors), `recompute` (with
    checkpointing: a recomputed block's backward, the head gone but its logits still referenced by the step's
    output, the previous micro-batch's logits gone), `plan_backward` (`_plan_backward`, the head gone too) and
    `optimizer_step` (every gradient, the plans and their gradient sums, which the trainer holds until the step
    ends, and the largest group's `stepping` bytes).

    A recompute is the larger of the first recomputed block's (every saved tensor, few gradients: at ZeRO 2 the
    partition's buffer, allocated at the first bucket reduced, early in the backward) and the last one's (only the
    tensors the blocks before it save, but the gradients of the `behind` share of the blocks after it)."""
    states = parts["parameters"] + parts["optimizer_states"] + parts["communication"]
    held = camex["plans"] + camex["per_step"] + camex["scratch"]
    below = acts["blocks_below"] + camex["saved_below"] + held
    saved = below + acts["blocks"] + camex["saved"]
    partition = parts["gradients"] if zero_stage == 2 else 0
    added, gone = plan_backward
    moments = {"backward_start": states + saved + acts["head"] + acts["loss_backward"] + acts["previous_logits"],
               "optimizer_step": states + parts["gradients"] + stepping + held, "recompute": 0,
               "plan_backward": states + partition + saved - gone + logits + added if added else 0}
    if acts["recompute"]:
        recomputing = states + logits + acts["recompute"] + camex["recompute"]
        moments["recompute"] = recomputing + max(saved + partition, below + max(partition, behind * parts["gradients"]))
    return moments


def memory(cfg: CfgLike, *, micro_batch: int, world_size: int = 1, zero_stage: int = 0, bf16: bool = False,
           offload: bool = False, accumulation: int = 1, checkpoint_every: Optional[int] = None,
           reduce_bucket_size: int = DEFAULT_BUCKET, overlap_comm: bool = False, gpu: bool = True,
           vocab_size: Optional[int] = None) -> dict:
    """Per-rank bytes of one training step (see the module's docstring). `gpu=False` sizes the CAMEx merge chunks as
    on a CPU. Returns `parts` (`PARTS` -> bytes, which add up to `total`), `groups` (expert and non-expert model
    states), `activations` and `camex` (their terms), the moments `backward_start`, `recompute` (0 without
    checkpointing), `plan_backward` (0 without merge plans, or at accumulation > 1) and `optimizer_step`
    (`_moments`), `peak` (the largest of them) and the inputs."""
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
    camex = camex_transients(cfg, tokens, accumulation, width, gpu, checkpoint_every)
    total_of = lambda key: sum(g[key] for g in groups.values())  # noqa: E731
    parts = {"parameters": total_of("parameters"), "gradients": total_of("gradients"),
             "optimizer_states": total_of("optimizer_states"), "activations": sum(acts.values()),
             "camex_transients": sum(camex.values()), "communication": states["communication"]}
    stepping = max(g["optimizer_step"] for g in groups.values())
    behind = 1 - checkpoint_every / cfg.n_layers if checkpoint_every else 0
    plan_backward = _plan_backward(cfg, tokens, width, checkpoint_every, accumulation)
    moments = _moments(parts, acts, camex, tokens * cfg.vocab_size * width, stepping, zero_stage, behind,
                       plan_backward)
    return {"parts": parts, "total": sum(parts.values()), "groups": groups, "activations": acts, "camex": camex,
            **moments, "peak": max(moments.values()),
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

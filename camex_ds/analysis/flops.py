"""What a model costs, counted: matmul FLOPs per token, parameters, EP bytes, the same FLOPs measured with
`FlopCounterMode` on the real model (`camex_ds.analysis.measured`), and MFU, for the GPT models of `camex_ds.model` (spec §8). The hardware's
peak FLOP/s that MFU divides by is `camex_ds.analysis.hardware`'s.

Convention (spec §8, the one of `torch.utils.flop_counter.FlopCounterMode`): count matrix-multiply FLOPs,
`2·m·n·k` per GEMM; elementwise work (activations, masks, norms, softmax, the dynamic chain's
elementwise merge) and embedding look-ups count 0. The analytic numbers below follow what the code
really executes, op by op, so `FlopCounterMode` on the real model agrees with them (see
`tests/unit/analysis/test_flops.py`); `docs/flops.md` derives every term.

    from camex_ds.analysis.flops import flops_per_token, param_counts, mfu
    from camex_ds.analysis.hardware import peak_flops
    f = flops_per_token(cfg, micro_batch_tokens=8 * cfg.seq_len, accumulation=4)  # 8 sequences, 4 micro-batches
    f["forward"], f["train"], f["components"]["curvature"]["train"]
    mfu(tokens_per_s, f["train"], peak_flops(dtype="bf16"))

`micro_batch_tokens` is the number of tokens one rank runs through one forward pass (micro-batch × seq_len); it
sets the per-forward terms and DeepSpeed's SMoE capacity. `accumulation` is DeepSpeed's
`gradient_accumulation_steps`: in training, merge layers compute what depends on parameters alone (the
curvature, the dynamic chain's span images) once per optimizer step (`camex_ds.moe.plan`), so those
terms are shared by `micro_batch_tokens × accumulation` tokens. The eval `forward` computes them every forward.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from ..config import ConfigError, ModelConfig, MoEConfig
from ..moe.comm import ep_bytes_per_layer
from ..moe.ffn import matrix_shapes
from ..moe.functional import curvature_backward_flops, curvature_flops, kron_factor_shape
from ..moe.plan import Evaluation, evaluations
from ..moe.token_moe import SMOE_MIN_CAPACITY, resolve_backend

# FlopCounterMode's fused-attention backward formula: scores recomputed + 2 GEMMs for dV, dP + 2 for dQ, dK,
# against 2 GEMMs forward.
SDPA_BACKWARD_MULTIPLIER = 2.5

CfgLike = Union[dict, ModelConfig]


def _as_config(cfg: CfgLike) -> ModelConfig:
    if isinstance(cfg, ModelConfig):
        return cfg
    if isinstance(cfg, dict):
        return ModelConfig.from_dict(cfg)
    raise ConfigError(f"model config must be a dict or a ModelConfig, got {type(cfg).__name__}")


def _with_seq_len(cfg: ModelConfig, seq_len: Optional[int]) -> ModelConfig:
    if seq_len is None or seq_len == cfg.seq_len:
        return cfg
    return cfg.replace(seq_len=seq_len)  # re-validates (segment_len must divide it)


def resolve_config(cfg: CfgLike, seq_len: Optional[int] = None) -> ModelConfig:
    """`cfg` as a validated `ModelConfig` (a dict is parsed), at `seq_len` when given."""
    return _with_seq_len(_as_config(cfg), seq_len)


def _vocab(cfg: ModelConfig, vocab_size: Optional[int]) -> int:
    v = vocab_size if vocab_size is not None else cfg.vocab_size
    if v is None:
        raise ConfigError("vocab_size is not set in the model config: pass vocab_size (the tokenizer's) "
                          "to count the LM head")
    if isinstance(v, bool) or not isinstance(v, int) or v < 2:
        raise ConfigError(f"vocab_size={v!r} is invalid: expected an integer >= 2")
    return v


def _ffn_elements(cfg: ModelConfig) -> int:
    """P: elements of one expert FFN (2·d·h for gelu, 3·d·h for swiglu)."""
    return sum(o * i for o, i in _matrices(cfg).values())


def _matrices(cfg: ModelConfig) -> dict:
    return matrix_shapes(cfg.d_model, cfg.ffn_hidden_size, cfg.activation)


def curvature_flops_per_expert(cfg: ModelConfig) -> int:
    """`2·R·Σ_mat (o1+o2+i1+i2)·out·in`: one application of `M_i` to one expert's matrices (§3)."""
    return sum(curvature_flops(o, i, cfg.moe.curvature_rank) for o, i in _matrices(cfg).values())


def curvature_backward_flops_per_expert(cfg: ModelConfig) -> int:
    """The backward of one `M_i` application to one expert's matrices (`_Curvature.backward`)."""
    return sum(curvature_backward_flops(o, i, cfg.moe.curvature_rank) for o, i in _matrices(cfg).values())


def _factor_elements_per_expert(cfg: ModelConfig) -> int:
    r = cfg.moe.curvature_rank
    return r * sum(sum(k * k for k in kron_factor_shape(o) + kron_factor_shape(i))
                   for o, i in _matrices(cfg).values())


def smoe_backend(cfg: ModelConfig, backend: Optional[str] = None) -> str:
    """The SMoE implementation the model would build: 'deepspeed' or 'megablocks' ('auto' resolved here)."""
    return resolve_backend(backend or cfg.moe.backend, cfg.moe.ep_size, ffn_bias=cfg.ffn_bias)


def smoe_capacity(cfg: ModelConfig, tokens: int) -> int:
    """DeepSpeed's expert capacity C for one forward call of `tokens` tokens per rank (`_capacity` in
    deepspeed/moe/sharded_moe.py: `max(ceil(tokens/N · capacity_factor·k), min_capacity)`, float32 as there)."""
    moe = cfg.moe
    factor = torch.tensor(moe.capacity_factor * moe.k)
    cap = int(torch.ceil((tokens / moe.num_experts) * factor).to(torch.int64))
    return max(cap, SMOE_MIN_CAPACITY)


COMPONENTS = ("attention", "dense_ffn", "experts", "router", "merge", "curvature", "dynamic", "lm_head", "embeddings")


class _Components:
    def __init__(self):
        self.rows: dict[str, dict[str, float]] = {
            name: {"forward": 0.0, "forward_train": 0.0, "backward": 0.0} for name in COMPONENTS}

    def add(self, name: str, forward: float, backward_multiplier: Optional[float] = None, *,
            backward: Optional[float] = None, train_forward: Optional[float] = None):
        """`forward` is the eval forward; `train_forward` the training-mode forward (router noise), default
        equal; the backward is `backward_multiplier × train_forward`, or `backward` given directly."""
        ft = forward if train_forward is None else train_forward
        row = self.rows.setdefault(name, {"forward": 0.0, "forward_train": 0.0, "backward": 0.0})
        row["forward"] += forward
        row["forward_train"] += ft
        row["backward"] += backward if backward is not None else backward_multiplier * ft

    def result(self) -> dict:
        out = {}
        for name, row in self.rows.items():
            row = dict(row)
            row["train"] = row["forward_train"] + row["backward"]
            out[name] = row
        return out


def flops_per_token(cfg: CfgLike, seq_len: Optional[int] = None, micro_batch_tokens: Optional[int] = None, *,
                    accumulation: int = 1, vocab_size: Optional[int] = None, backend: Optional[str] = None) -> dict:
    """Matmul FLOPs per token of the GPT model `cfg` describes, forward and training step.

    - `seq_len`: the length of the sequences (default `cfg.seq_len`); sets the attention-score cost.
    - `micro_batch_tokens`: tokens one rank processes in one forward pass, micro-batch × seq_len (default:
      one sequence, `seq_len`). DeepSpeed's SMoE capacity and the number of segments come from it.
    - `accumulation`: micro-batches per optimizer step. In training, the curvature transform (each rank for its
      N/ep experts) and the dynamic chain's span images are computed once per optimizer step, so they are
      divided by `micro_batch_tokens × accumulation`; the eval forward divides them by `micro_batch_tokens`.
    - `backend`: override `moe.backend` for smoe ('deepspeed' or 'megablocks').

    Returns `forward` (eval-mode forward), `forward_train` (training-mode forward: adds the router's
    noise GEMM when `noisy_gating`), `backward`, `train` (= forward_train + backward),
    `backward_multiplier` (backward / forward_train), `components` (`name -> {forward, forward_train,
    backward, train}` for every name in `COMPONENTS`, zero where the method has none), each component's
    eval forward also as a top-level key, `elementwise` (notable
    arithmetic done elementwise, excluded from the totals by the convention) and `notes`.
    """
    cfg = _with_seq_len(_as_config(cfg), seq_len)
    length = cfg.seq_len
    tokens = length if micro_batch_tokens is None else micro_batch_tokens
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < length or tokens % length:
        raise ConfigError(f"micro_batch_tokens={tokens!r} is invalid: expected a positive multiple of "
                          f"seq_len={length} (micro-batch × seq_len tokens per rank per forward)")
    if isinstance(accumulation, bool) or not isinstance(accumulation, int) or accumulation < 1:
        raise ConfigError(f"accumulation={accumulation!r} is invalid: expected an integer >= 1 "
                          "(DeepSpeed's gradient_accumulation_steps)")
    vocab = _vocab(cfg, vocab_size)
    d, n_layers = cfg.d_model, cfg.n_layers
    p = _ffn_elements(cfg)
    c = _Components()
    notes: list[str] = []
    elementwise: dict[str, float] = {}

    # Attention: qkv and proj GEMMs (8d² without grouped-query attention), backward 2×; SDPA's QKᵀ and AV over
    # the full L×L (FlopCounterMode does not discount the causal mask, and counts query heads under GQA),
    # backward 2.5× (flash-style recompute).
    c.add("attention", n_layers * _attention_projection_flops(cfg), 2.0)
    c.add("attention", n_layers * 4 * length * d, SDPA_BACKWARD_MULTIPLIER)
    c.add("lm_head", 2 * d * vocab, 2.0)
    # Embeddings (token and position look-ups) are not matmuls: 0; the LM head (tied or not) is counted above.

    moe_layers = cfg.moe_layers
    dense_layers = n_layers - len(moe_layers)
    c.add("dense_ffn", dense_layers * 2 * p, 2.0)

    if moe_layers:
        moe: MoEConfig = cfg.moe
        if moe.method == "smoe":
            _smoe_components(cfg, c, tokens, len(moe_layers), backend, notes)
        else:
            _merge_components(cfg, c, tokens, accumulation, moe_layers, notes, elementwise)

    comps = c.result()
    forward = sum(r["forward"] for r in comps.values())
    forward_train = sum(r["forward_train"] for r in comps.values())
    backward = sum(r["backward"] for r in comps.values())
    result = {
        "forward": forward,
        "forward_train": forward_train,
        "backward": backward,
        "train": forward_train + backward,
        "backward_multiplier": backward / forward_train if forward_train else 0.0,
        "components": comps,
        "elementwise": elementwise,
        "notes": notes,
        "seq_len": length,
        "micro_batch_tokens": tokens,
        "accumulation": accumulation,
        "method": cfg.method,
    }
    for name, row in comps.items():
        result[name] = row["forward"]
    return result


def _smoe_components(cfg: ModelConfig, c: _Components, tokens: int, layers: int, backend: Optional[str],
                     notes: list) -> None:
    moe = cfg.moe
    d, n, p = cfg.d_model, moe.num_experts, _ffn_elements(cfg)
    which = smoe_backend(cfg, backend)
    # Gate: logits = x w_gᵀ (2·d·N), backward 2× (grad x and grad w_g).
    c.add("router", layers * 2 * d * n, 2.0)
    if which == "megablocks":
        c.add("experts", layers * moe.k * 2 * p, 2.0)
        notes.append("smoe on MegaBlocks (dropless): experts = top_k · 2P per token; not checked on CPU")
        return
    if moe.k == 2:
        # top2gating normalises with two einsums 'se,se->s' (bmm, 2·N each); backward: grad of gates only.
        c.add("router", layers * 2 * 2 * n, 1.0)
    cap = smoe_capacity(cfg, tokens)
    # Every local expert runs on its full capacity buffer: N·C tokens per rank per forward (padded slots
    # included), whatever the routing; backward 2× (grad input and grad weights).
    c.add("experts", layers * n * cap * 2 * p / tokens, 2.0)
    notes.append(f"smoe on DeepSpeed: capacity C={cap} per expert for {tokens} tokens per forward "
                 f"(k={moe.k}, capacity_factor={moe.capacity_factor}); experts = N·C·2P / tokens = "
                 f"{n * cap / tokens:.3f} · 2P per token (top_k={moe.k} unpadded); dispatch/combine are "
                 "gathers (index_select) in this DeepSpeed, no einsum GEMMs")


def _merge_components(cfg: ModelConfig, c: _Components, tokens: int, accumulation: int, moe_layers: list,
                      notes: list, elementwise: dict) -> None:
    moe = cfg.moe
    d, p = cfg.d_model, _ffn_elements(cfg)
    seg = cfg.moe.segment_len_for(cfg.seq_len)
    n = moe.routed_experts  # N, or N-1 in a dynamic chain
    curve = curvature_flops_per_expert(cfg) if moe.curved else 0
    curve_back = curvature_backward_flops_per_expert(cfg) if moe.curved else 0
    noise = 2.0 if moe.noisy_gating else 1.0
    step_tokens = tokens * accumulation  # what a per-step term is shared by in training
    # The dynamic chain's span size per matrix, for the eval forward (one forward per step) and for training.
    spans = {plan: {} for plan in ("eval", "train")}
    for chain_start in cfg.chain_starts:
        # Router on segment means: summary w_g (2·d·N per segment); training adds summary w_noise.
        c.add("router", 2 * d * n / seg, 2.0, train_forward=noise * 2 * d * n / seg)
        # The merged FFN applied to every token: 2P; backward grad x + grad W (2×).
        c.add("experts", 2 * p, 2.0)
        # Curvature M_i for this rank's N/ep experts, once per forward in eval and once per optimizer step in
        # training (4 mode-product GEMMs per matrix); backward: see curvature_backward_flops.
        if curve:
            local = n // moe.ep_size
            c.add("curvature", local * curve / tokens, train_forward=local * curve / step_tokens,
                  backward=local * curve_back / step_tokens)
        if not moe.dynamic:
            # _MergedLinear folds the base into the merge GEMM: W = [α g, 1] · [τ̃; B], (S×(N+1))·((N+1)×P)
            # forward. Backward: the same GEMM recomputed, [α g, 1]ᵀ · G for the task and base gradients
            # ((N+1)×S·S×P) and G · τ̃ᵀ for the gate gradients (S×P·P×N).
            c.add("merge", 2 * (n + 1) * p / seg, backward=(2 * (n + 1) + 2 * (n + 1) + 2 * n) * p / seg)
        elif chain_start:
            # Chain start: merge_rows (addmm of N rows, base as the bias) under plain autograd: backward 2×.
            c.add("merge", 2 * n * p / seg, 2.0)
            _chain_layer(cfg, c, tokens, accumulation, spans, elementwise, chain_start=True)
        else:
            _chain_layer(cfg, c, tokens, accumulation, spans, elementwise, chain_start=False)
    if moe.mask != "none":
        notes.append(f"{moe.mask} masks are elementwise: 0 matmul FLOPs")
    if moe.dynamic and len(moe_layers) > 1:
        notes.append("dynamic layers l>1 take, per matrix, the cheaper exact evaluation of M(Ŵ^{l-1}_s) "
                     "(camex_ds.moe.chain): through the chain's span (per-step images + one merge GEMM) or "
                     "segment by segment (4 GEMMs per segment and expert, elementwise merge)")


def _chain_layer(cfg: ModelConfig, c: _Components, tokens: int, accumulation: int, spans: dict,
                 elementwise: dict, chain_start: bool) -> None:
    """A dynamic layer (§4), each matrix as the layer's plan evaluates it (`moe.plan.evaluations`, the function
    `CAMExMoE.plan` decides with), for the eval forward (one micro-batch per step) and for training (`accumulation`
    of them); updates `spans` (the span sizes per matrix) for the next layer. A chain's first layer is counted by
    the caller; it only hands its span on."""
    moe = cfg.moe
    n, seg, rank = moe.routed_experts, cfg.moe.segment_len_for(cfg.seq_len), moe.curvature_rank
    shapes = _matrices(cfg)
    rows = {}  # plan -> component -> [forward, backward] per token
    for plan, acc in (("eval", 1), ("train", accumulation)):
        rows[plan] = {"dynamic": [0.0, 0.0], "merge": [0.0, 0.0]}
        chosen = evaluations(moe, shapes, chain_start, spans[plan], tokens // seg, acc)
        for name, (evaluation, size_out) in chosen.items():
            o, i = shapes[name]
            fwd, back = (curvature_flops(o, i, rank), curvature_backward_flops(o, i, rank)) if moe.curved else (0, 0)
            if evaluation is Evaluation.SPAN:
                size = spans[plan][name]
                # n·K images once per step; the merge GEMM [S, n(K+1)]·[n(K+1), P] and its two backward GEMMs.
                rows[plan]["dynamic"][0] += n * size * fwd / (tokens * acc)
                rows[plan]["dynamic"][1] += n * size * back / (tokens * acc)
                rows[plan]["merge"][0] += 2 * n * (size + 1) * o * i / seg
                rows[plan]["merge"][1] += 4 * n * (size + 1) * o * i / seg
            elif evaluation is Evaluation.SEGMENT:
                # M_i(Ŵ^{l-1}_s): 4 GEMMs per segment and expert; the merge itself is elementwise.
                rows[plan]["dynamic"][0] += n * fwd / seg
                rows[plan]["dynamic"][1] += n * back / seg
                if plan == "train":
                    elementwise["dynamic_merge"] = elementwise.get("dynamic_merge", 0.0) + 2 * n * o * i / seg
        spans[plan] = {name: size for name, (_, size) in chosen.items() if size is not None}
    if chain_start:
        return
    for component in ("dynamic", "merge"):
        c.add(component, rows["eval"][component][0], train_forward=rows["train"][component][0],
              backward=rows["train"][component][1])


# ---------------------------------------------------------------------------------------------------------
# The blocks' shapes in both families (gpt, llama): grouped-query attention, norms, biases, untied LM head.
# Norms, biases and rotary embeddings are elementwise, 0 FLOPs; they only count as parameters.


def _attention_projection_flops(cfg: ModelConfig) -> int:
    """Forward GEMM FLOPs per token of one block's attention projections: the fused q/k/v projection
    (d -> d + 2·kv_heads·head_dim) and the output projection (d -> d); 8d² without grouped-query attention."""
    d = cfg.d_model
    return 2 * d * (d + 2 * cfg.kv_heads * cfg.head_dim) + 2 * d * d


def _norm_params(cfg: ModelConfig) -> int:
    return 2 * cfg.d_model if cfg.architecture == "gpt" else cfg.d_model  # LayerNorm: weight and bias; RMSNorm


def _block_params(cfg: ModelConfig) -> int:
    """One block outside its FFN: two norms, the attention projections and their biases."""
    d, qkv = cfg.d_model, cfg.d_model + 2 * cfg.kv_heads * cfg.head_dim
    biases = (qkv if cfg.bias != "none" else 0) + (d if cfg.bias == "all" else 0)
    return 2 * _norm_params(cfg) + d * qkv + d * d + biases


def _embedding_params(cfg: ModelConfig, vocab: int) -> int:
    """wte, the gpt family's learned positions wpe, and an untied lm_head."""
    positions = cfg.seq_len * cfg.d_model if cfg.architecture == "gpt" else 0
    return vocab * cfg.d_model * (1 if cfg.tie_embeddings else 2) + positions


def _ffn_bias_elements(cfg: ModelConfig) -> int:
    """An FFN's biases (bias='all'): one per matrix output."""
    shapes = matrix_shapes(cfg.d_model, cfg.ffn_hidden_size, cfg.activation)
    return sum(o for o, _ in shapes.values()) if cfg.ffn_bias else 0


def param_counts(cfg: CfgLike, *, vocab_size: Optional[int] = None, backend: Optional[str] = None) -> dict:
    """Parameters of the model: `total` (the whole model, as `GPT.num_parameters()` at ep_size=1),
    `active` (those a token's computation uses: everything but the expert storage, plus per MoE layer
    one merged FFN (P) for merge methods or top_k experts (k·P) for smoe), `per_rank` (experts and their
    factors divided by ep), and the same without the embeddings (`*_non_embedding`: wte, wpe, an untied
    lm_head)."""
    cfg = _as_config(cfg)
    vocab = _vocab(cfg, vocab_size)
    d, p, fb = cfg.d_model, _ffn_elements(cfg), _ffn_bias_elements(cfg)
    embed = _embedding_params(cfg, vocab)
    shared = embed + cfg.n_layers * _block_params(cfg) + _norm_params(cfg)  # + ln_f
    moe_layers = cfg.moe_layers
    shared += (cfg.n_layers - len(moe_layers)) * (p + fb)
    total = active = per_rank = shared
    if moe_layers:
        moe = cfg.moe
        if moe.method == "smoe":
            router = d * moe.num_experts  # DeepSpeed's wg (bias-free) or MegaBlocks' router
            experts = moe.num_experts * (p + fb)
            total += len(moe_layers) * (router + experts)
            per_rank += len(moe_layers) * (router + experts // moe.ep_size)
            active += len(moe_layers) * (router + moe.k * (p + fb))
        else:
            n = moe.stored_experts
            router = d * n * (2 if moe.noisy_gating else 1)
            expert = p + (_factor_elements_per_expert(cfg) if moe.curved else 0)
            for chain_start in cfg.chain_starts:
                base = p if chain_start else 0
                total += router + base + fb + n * expert  # fb: the layer's shared FFN biases
                per_rank += router + base + fb + (n // moe.ep_size) * expert
                active += router + p + fb
    return {"total": total, "active": active, "per_rank": per_rank,
            "total_non_embedding": total - embed, "active_non_embedding": active - embed}


def ep_bytes_per_step(cfg: CfgLike, micro_batch_tokens: Optional[int] = None, bytes_per_element: int = 4,
                      gloo: bool = False, accumulation: int = 1) -> int:
    """Expert-parallel bytes one rank sends (≈ receives) per optimizer step, summed over MoE layers.

    Merge methods: `camex_ds.moe.comm.ep_bytes_per_layer`, once per optimizer step whatever the accumulation
    (the gathered task vectors are reused by every micro-batch). smoe (DeepSpeed): four all-to-alls
    (dispatch and combine, forward and backward) of the `[N, C, d]` capacity buffer, `(ep-1)/ep` of it each,
    every micro-batch.
    """
    cfg = _as_config(cfg)
    if cfg.moe is None or cfg.moe.ep_size == 1:
        return 0
    moe = cfg.moe
    tokens = cfg.seq_len if micro_batch_tokens is None else micro_batch_tokens
    if moe.method == "smoe":
        cap = smoe_capacity(cfg, tokens)
        share = (moe.ep_size - 1) / moe.ep_size
        return int(round(accumulation * len(cfg.moe_layers) * 4 * share * moe.num_experts * cap * cfg.d_model
                         * bytes_per_element))
    total = 0
    for chain_start in cfg.chain_starts:
        total += ep_bytes_per_layer(num_experts=moe.stored_experts, ep_size=moe.ep_size, matrix_shapes=_matrices(cfg),
                                    curvature_rank=moe.curvature_rank, curved=moe.curved, mask=moe.mask,
                                    dynamic=moe.dynamic, chain_start=chain_start, bytes_per_element=bytes_per_element,
                                    backend_reduce_scatter=not gloo)["total"]
    return total


# ---------------------------------------------------------------------------------------------------------
# MFU

def mfu(tokens_per_s: float, flops_per_token_train: float, peak: float) -> float:
    """Model FLOPs utilisation: achieved `tokens/s × FLOPs/token` over the peak FLOP/s (a fraction)."""
    if peak <= 0:
        raise ValueError(f"peak={peak!r} must be positive FLOP/s")
    return tokens_per_s * flops_per_token_train / peak


def achieved_flops(tokens_per_s: float, flops_per_token_train: float) -> float:
    return tokens_per_s * flops_per_token_train


__all__ = ["COMPONENTS", "flops_per_token", "param_counts", "ep_bytes_per_step", "curvature_flops_per_expert",
           "curvature_backward_flops_per_expert", "smoe_capacity", "resolve_config", "mfu", "achieved_flops"]

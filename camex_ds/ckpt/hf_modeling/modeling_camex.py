"""`CamexForCausalLM`: a camex_ds decoder for Hugging Face `transformers` (load with `trust_remote_code=True`).

It computes what camex_ds's evaluation forward computes; the section numbers (§) refer to the specification
camex_ds implements (`design/camex.md`, beside the camex_ds repository). Parameter names are camex_ds's own, so
the two can be compared line by line.

A merge layer splits the sequence into segments of `segment_len` tokens. Segment j's FFN has the weights

    W_j = B + alpha * sum_i g_{j,i} task_i                                                        (§3)

with gates `g_j` from the mean of segment j-1's layer inputs (causal routing, §2; segment 0 has uniform gates;
the other routings take a segment's own mean). The stored `task_i` are each expert's task vector with its
curvature already applied (and, for TIES, its mask): in evaluation they depend on the parameters only, so
camex_ds computed them once at export and nothing about curvature is left to compute here. A dynamic chain (§4)
merges onto the previous layer's per-segment weights instead of a fixed base:

    W^l_j = W^{l-1}_j + alpha * sum_i g_{j,i} m_{j,i} * (M_i(E_i) - M_i(W^{l-1}_j))

`M_i(E_i)` is stored; the curvature of the per-segment `W^{l-1}_j` is applied here (`curve`).

An smoe layer (`TokenMoE`) routes each token to its top-k experts instead.

Under causal routing segment j's weights depend only on earlier segments, so decoding token by token is exact:
the cache (`CamexCache`) keeps, per merge layer, the sum of the current segment's inputs so far and the current
segment's merged weights; a layer merges once per segment, when the previous segment is complete.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_camex import CamexConfig


def kron_factor_shape(n: int) -> tuple:
    """`(a, n // a)` with `a` the largest divisor of `n` not above `sqrt(n)` (§3)."""
    a = math.isqrt(n)
    while n % a:
        a -= 1
    return a, n // a


def expert_matrices(config: CamexConfig) -> dict:
    """`name -> (out, in)` of the FFN's matrices (§1): each maps the width to the FFN width but the last."""
    d, h = config.hidden_size, config.intermediate_size
    if config.activation == "swiglu":
        return {"w_gate": (h, d), "w_up": (h, d), "w_down": (d, h)}
    return {"w_in": (h, d), "w_out": (d, h)}


def ffn(x: torch.Tensor, linear, activation: str) -> torch.Tensor:
    """The expert FFN (§1), `linear(name, x)` applying the matrix `name`."""
    if activation == "swiglu":
        return linear("w_down", F.silu(linear("w_gate", x)) * linear("w_up", x))
    return linear("w_out", F.gelu(linear("w_in", x), approximate="tanh" if activation == "gelu_tanh" else "none"))


def topk_softmax(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Softmax over the `k` largest logits, zero elsewhere (§2)."""
    if k == logits.shape[-1]:
        return torch.softmax(logits, dim=-1)
    values, index = logits.topk(k, dim=-1)
    return torch.zeros_like(logits).scatter(-1, index, torch.softmax(values, dim=-1))


def curve(x: torch.Tensor, a, b, c, d) -> torch.Tensor:
    """The curvature operator `M(x)` (§3) of one expert on matrices `x [S, out, in]`, factors `[R, k, k]`:
    `x` viewed as `[o1, o2, i1, i2]`, one factor per mode, averaged over the R terms."""
    rows, (o1, o2, i1, i2) = x.shape[0], (f.shape[-1] for f in (a, b, c, d))
    y = x.reshape(rows, o1, o2, i1, i2)
    y = torch.einsum("rpa,sabce->rspbce", a, y)
    y = torch.einsum("rqb,rspbce->rspqce", b, y)
    y = torch.einsum("rtc,rspqce->rspqte", c, y)
    y = torch.einsum("rue,rspqte->rspqtu", d, y)
    return y.mean(0).reshape(x.shape)


def inverse_frequencies(config: CamexConfig, device=None) -> torch.Tensor:
    """Rotary frequencies `theta^(-2i/head_dim)`, with Llama 3's frequency-dependent scaling when configured."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rotary_base ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    scaling = config.rotary_scaling
    if scaling is None:
        return inv_freq
    original = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = original / scaling["low_freq_factor"], original / scaling["high_freq_factor"]
    wavelen = 2 * torch.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling["factor"], inv_freq)
    smooth = (original / wavelen - scaling["low_freq_factor"]) / (scaling["high_freq_factor"] -
                                                                   scaling["low_freq_factor"])
    smoothed = (1 - smooth) * scaled / scaling["factor"] + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rotary_tables(config: CamexConfig, start: int, length: int, dtype, device) -> tuple:
    """`(cos, sin)` `[length, head_dim]` of the positions `start .. start + length - 1`."""
    positions = torch.arange(start, start + length, device=device).float()
    angles = positions[:, None] * inverse_frequencies(config, device)[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


class SegmentState:
    """Where a merge layer is in the sequence: `position` tokens seen, `summed` the sum of the current segment's
    inputs so far `[B, d]`, `weights` the current segment's merged matrices (`name -> [B, out, in]`)."""

    def __init__(self):
        self.position = 0
        self.summed = 0.0
        self.weights = None

    def select(self, rows: torch.Tensor) -> None:
        """Keep the batch rows `rows` (beam search reorders its beams)."""
        if isinstance(self.summed, torch.Tensor):
            self.summed = self.summed.index_select(0, rows)
        self.weights = {name: w.index_select(0, rows) for name, w in self.weights.items()}


class CamexCache(DynamicCache):
    """The attention keys and values, and each merge layer's `SegmentState`."""

    def __init__(self):
        super().__init__()
        self.segments = {}  # layer index -> SegmentState

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        for state in self.segments.values():
            state.select(beam_idx)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a merge layer's segment state cannot be rewound: generate without an assistant")


class Attention(nn.Module):
    """Causal self-attention with one fused q/k/v projection (rows: q, k, v) and `num_key_value_heads` heads."""

    def __init__(self, config: CamexConfig):
        super().__init__()
        d, self.heads, self.kv_heads, self.head_dim = (config.hidden_size, config.num_attention_heads,
                                                       config.num_key_value_heads, config.head_dim)
        self.qkv = nn.Linear(d, d + 2 * self.kv_heads * self.head_dim, bias=config.bias != "none")
        self.proj = nn.Linear(d, d, bias=config.bias == "all")

    def forward(self, x, rotary, cache: Optional[CamexCache], layer_idx: int) -> torch.Tensor:
        bsz, length, d = x.shape
        kv = self.kv_heads * self.head_dim
        q, k, v = (t.view(bsz, length, -1, self.head_dim).transpose(1, 2) for t in self.qkv(x).split([d, kv, kv], -1))
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if cache is not None:
            k, v = cache.update(k, v, layer_idx)
        gqa = self.kv_heads != self.heads
        if k.shape[2] == length:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:  # new queries after cached keys: each sees the cache and the new keys up to itself
            mask = torch.ones(length, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - length)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.proj(y.transpose(1, 2).reshape(bsz, length, d))


class DenseFFN(nn.Module):
    def __init__(self, config: CamexConfig):
        super().__init__()
        self.activation = config.activation
        shapes = expert_matrices(config)
        for name, shape in shapes.items():
            setattr(self, name, nn.Parameter(torch.empty(shape)))
        self.bias = nn.ParameterDict({name: nn.Parameter(torch.empty(s[0])) for name, s in shapes.items()}) \
            if config.bias == "all" else None

    def forward(self, x):
        def linear(name, inp):
            return F.linear(inp, getattr(self, name), None if self.bias is None else self.bias[name])

        return ffn(x, linear, self.activation)


class Router(nn.Module):
    """`gates = topk_softmax(mean of a segment's inputs @ w_gate)` (§2, no noise in evaluation)."""

    def __init__(self, config: CamexConfig):
        super().__init__()
        self.top_k = config.router_top_k
        self.w_gate = nn.Parameter(torch.empty(config.hidden_size, config.num_experts))

    def forward(self, summary: torch.Tensor) -> torch.Tensor:
        return topk_softmax(summary @ self.w_gate, self.top_k)


class KronFactors(nn.Module):
    """One matrix's curvature factors of every expert: `a [n,R,o1,o1]`, `b [n,R,o2,o2]`, `c [n,R,i1,i1]`,
    `d [n,R,i2,i2]` (§3)."""

    def __init__(self, experts: int, rank: int, out_features: int, in_features: int):
        super().__init__()
        dims = kron_factor_shape(out_features) + kron_factor_shape(in_features)
        for name, k in zip("abcd", dims):
            setattr(self, name, nn.Parameter(torch.empty(experts, rank, k, k)))

    def of(self, i: int) -> tuple:
        return self.a[i], self.b[i], self.c[i], self.d[i]


class MergeLayer(nn.Module):
    """A merge layer in evaluation form (§3, §4). A layer that owns a base (every static layer, and the first layer
    of a dynamic chain) stores `base` and `task` (`m_i * M_i(E_i - B)`, `[n, out, in]`). A layer that continues a
    dynamic chain stores `curved_experts` (`M_i(E_i)`), the curvature factors (`camex*` methods) and, for TIES, the
    raw `experts` from which each segment elects its signs."""

    def __init__(self, config: CamexConfig, chain_start: bool):
        super().__init__()
        self.activation, self.alpha, self.segment_len = config.activation, config.alpha, config.segment_len
        self.routing, self.first_segment = config.routing, config.first_segment
        self.ties = config.method.endswith("ties")
        self.router = Router(config)
        shapes = expert_matrices(config)
        n = config.num_experts

        def stack(count):
            return nn.ParameterDict({name: nn.Parameter(torch.empty(count, *s)) for name, s in shapes.items()})

        self.base = self.task = self.curved_experts = self.curvature = self.experts = None
        if chain_start or not config.dynamic:
            self.base = nn.ParameterDict({name: nn.Parameter(torch.empty(s)) for name, s in shapes.items()})
            self.task = stack(n)
        else:
            self.curved_experts = stack(n)
            if config.method.startswith("camex"):
                self.curvature = nn.ModuleDict({name: KronFactors(n, config.curvature_rank, *s)
                                                for name, s in shapes.items()})
            if self.ties:
                self.experts = stack(n)
        self.bias = nn.ParameterDict({name: nn.Parameter(torch.empty(s[0])) for name, s in shapes.items()}) \
            if config.bias == "all" else None

    def merge(self, gates: torch.Tensor, previous: Optional[dict]) -> dict:
        """One segment's merged matrices `name -> [B, out, in]` for gates `[B, n]`; `previous` holds the previous
        chain layer's matrices of the same segment (a layer continuing a dynamic chain)."""
        if self.base is not None:
            return {name: self.base[name] + self.alpha * torch.einsum("bn,noi->boi", gates, self.task[name])
                    for name in self.base}
        return {name: self.merge_onto(name, previous[name], gates) for name in self.curved_experts}

    def merge_onto(self, name: str, w: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """`W + alpha * sum_i g_i m_i * (M_i(E_i) - M_i(W))` for the previous layer's `W [B, out, in]` (§4)."""
        curved = self.curved_experts[name]
        if self.ties:  # the signs are elected per segment from the raw task vectors E_i - W
            raw = self.experts[name]
            elected = torch.sign(raw.sum(0) - raw.shape[0] * w)
        merged = torch.zeros_like(w)
        for i in range(curved.shape[0]):
            term = curved[i] - (w if self.curvature is None else curve(w, *self.curvature[name].of(i)))
            if self.ties:
                term = term * (torch.sign(raw[i] - w) == elected).to(w.dtype)
            merged = merged + gates[:, i, None, None] * term
        return w + self.alpha * merged

    @property
    def streams(self) -> bool:
        """Whether segment j's gates come from earlier segments only (causal routing, uniform first segment), so
        the layer can run token by token; otherwise a segment's gates see its own tokens."""
        return self.routing == "causal" and self.first_segment == "uniform"

    def apply_merged(self, x: torch.Tensor, weights: dict) -> torch.Tensor:
        """The FFN with one segment's merged matrices `name -> [B, out, in]` on its tokens `x [B, t, d]`."""
        def linear(name, inp):
            out = inp @ weights[name].transpose(1, 2)
            return out if self.bias is None else out + self.bias[name]

        return ffn(x, linear, self.activation)

    def forward_whole(self, x: torch.Tensor, previous: Optional[dict]) -> tuple:
        """A layer that does not stream (`segment` or `sequence` routing, or a `self-detached` first segment, §2),
        on whole segments from position 0: each segment's gates from its own mean (segment 0's under causal
        routing, whose later segments take the previous segment's)."""
        length = x.shape[1]
        segment_len = length if self.routing == "sequence" else self.segment_len
        if length % segment_len:
            raise ValueError(f"routing={self.routing!r} lets a segment's gates see its own tokens, so the input must "
                             f"hold whole segments: length {length} is not a multiple of segment_len {segment_len}")
        gates = self.router(x.unflatten(1, (-1, segment_len)).mean(2))  # [B, S, n]
        if self.routing == "causal":
            gates = torch.cat([gates[:, :1], gates[:, :-1]], dim=1)
        built = {j: self.merge(gates[:, j], None if previous is None else previous[j]) for j in range(gates.shape[1])}
        outputs = [self.apply_merged(x[:, j * segment_len:(j + 1) * segment_len], w) for j, w in built.items()]
        return torch.cat(outputs, 1), built

    def forward(self, x: torch.Tensor, state: SegmentState, previous: Optional[dict]) -> tuple:
        """`x [B, L, d]` continuing at `state.position` -> (output, the merged matrices built here by segment
        index, which the next layer of a dynamic chain merges onto). `previous`: the previous chain layer's."""
        if not self.streams:
            return self.forward_whole(x, previous)
        built, outputs, start, length = {}, [], 0, x.shape[1]
        experts = self.router.w_gate.shape[1]
        if state.weights is None:  # segment 0: uniform gates
            state.weights = built[0] = self.merge(x.new_full((x.shape[0], experts), 1.0 / experts),
                                                  None if previous is None else previous[0])
        while start < length:
            stop = min(length, start + self.segment_len - state.position % self.segment_len)
            piece = x[:, start:stop]
            outputs.append(self.apply_merged(piece, state.weights))
            state.summed = state.summed + piece.sum(1)
            state.position += stop - start
            if state.position % self.segment_len == 0:  # a segment is complete: it routes the next one
                following = state.position // self.segment_len
                gates = self.router(state.summed / self.segment_len)
                state.weights = built[following] = self.merge(gates, None if previous is None else previous[following])
                state.summed = 0.0
            start = stop
        return torch.cat(outputs, 1), built


class TokenMoE(nn.Module):
    """smoe, the token-routing baseline (DeepSpeed's top-k gate): each token's FFN output is the weighted sum of
    its top-k experts' outputs, weighed by their softmax probabilities (top-1: the probability itself; top-2: the
    two renormalised to sum to 1). The gate runs in fp32, as DeepSpeed's does. DeepSpeed also drops tokens beyond
    an expert's capacity and, for top-2, draws the second expert with Gumbel noise; neither is done here."""

    def __init__(self, config: CamexConfig, chain_start: bool = True):
        super().__init__()
        self.activation, self.top_k = config.activation, config.router_top_k
        shapes, n = expert_matrices(config), config.num_experts
        self.gate = nn.Linear(config.hidden_size, n, bias=False)
        self.experts = nn.ParameterDict({name: nn.Parameter(torch.empty(n, *s)) for name, s in shapes.items()})
        self.expert_biases = nn.ParameterDict({name: nn.Parameter(torch.empty(n, s[0]))
                                               for name, s in shapes.items()}) if config.bias == "all" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(F.linear(x.float(), self.gate.weight.float()), dim=-1)
        top, chosen = probs.topk(self.top_k, dim=-1)
        weights = top if self.top_k == 1 else top / top.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for e in range(probs.shape[-1]):
            routed = chosen == e  # [B, L, k]
            tokens = routed.any(-1)
            if not tokens.any():
                continue

            def linear(name, inp):
                bias = None if self.expert_biases is None else self.expert_biases[name][e]
                return F.linear(inp, self.experts[name][e], bias)

            weight = (weights * routed).sum(-1)[tokens]
            out[tokens] += weight[:, None].to(x.dtype) * ffn(x[tokens], linear, self.activation)
        return out


class Block(nn.Module):
    def __init__(self, config: CamexConfig, ffn_module: nn.Module):
        super().__init__()
        norm = nn.LayerNorm if config.architecture == "gpt" else nn.RMSNorm
        self.ln_attn = norm(config.hidden_size, eps=config.norm_eps)
        self.attn = Attention(config)
        self.ln_ffn = norm(config.hidden_size, eps=config.norm_eps)
        self.ffn = ffn_module

    def forward(self, x, rotary, cache: Optional[CamexCache], index: int, chain: Optional[dict]) -> tuple:
        """Pre-norm attention and FFN -> (output, the merged matrices a dynamic chain carries on from here)."""
        x = x + self.attn(self.ln_attn(x), rotary, cache, index)
        h = self.ln_ffn(x)
        if not isinstance(self.ffn, MergeLayer):  # a dense FFN or smoe: token by token, nothing to carry
            return x + self.ffn(h), chain
        state = SegmentState() if cache is None else cache.segments.setdefault(index, SegmentState())
        out, built = self.ffn(h, state, None if self.ffn.base is not None else chain)
        return x + out, built


class CamexPreTrainedModel(PreTrainedModel):
    config_class = CamexConfig
    base_model_prefix = "camex"
    _supports_sdpa = True

    def _init_weights(self, module):
        """Every weight comes from the exported file; a fresh model (`from_config`) gets small random ones."""
        for p in module.parameters(recurse=False):
            nn.init.normal_(p, 0.0, 0.02)


class CamexForCausalLM(CamexPreTrainedModel, GenerationMixin):
    """`forward(input_ids, cache=None, use_cache=None, labels=None)`; the input embeddings are tied to the output
    unless `tie_word_embeddings` is false (then `lm_head`). Batches must be unpadded (no zeros in `attention_mask`)."""

    def __init__(self, config: CamexConfig):
        super().__init__(config)
        d = config.hidden_size
        self.wte = nn.Embedding(config.vocab_size, d)
        self.wpe = nn.Embedding(config.max_position_embeddings, d) if config.architecture == "gpt" else None
        starts = dict(zip(config.moe_layers, config.chain_starts))
        moe = TokenMoE if config.method == "smoe" else MergeLayer
        self.blocks = nn.ModuleList(
            Block(config, moe(config, starts[i]) if i in starts else DenseFFN(config))
            for i in range(config.num_hidden_layers))
        norm = nn.LayerNorm if config.architecture == "gpt" else nn.RMSNorm
        self.ln_f = norm(d, eps=config.norm_eps)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(d, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # forward makes its own CamexCache: it holds the merge layers' segment states too

    def forward(self, input_ids: torch.LongTensor, cache: Optional[CamexCache] = None, use_cache: Optional[bool] = None,
                labels: Optional[torch.LongTensor] = None, attention_mask: Optional[torch.Tensor] = None,
                **kwargs) -> CausalLMOutputWithPast:
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("attention_mask has zeros, but padded batches are not supported (a merge layer's "
                             "segments count every position); if generate() took a prompt token equal to "
                             "pad_token_id for padding, pass attention_mask=torch.ones_like(input_ids)")
        if cache is None and use_cache:
            cache = CamexCache()
        if cache is not None and not all(b.ffn.streams for b in self.blocks if isinstance(b.ffn, MergeLayer)):
            raise ValueError(f"routing={self.config.routing!r} with first_segment={self.config.first_segment!r} lets "
                             "a segment's gates see its own later tokens, so the model cannot decode token by token: "
                             "no cache, whole segments (use_cache=False)")
        start = 0 if cache is None else cache.get_seq_length()
        bsz, length = input_ids.shape
        if start + length > self.config.max_position_embeddings:
            raise ValueError(f"positions up to {start + length} exceed max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        x = self.wte(input_ids)
        rotary = None
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(start, start + length, device=x.device))
        else:
            rotary = rotary_tables(self.config, start, length, x.dtype, x.device)
        chain = None  # the merged matrices the previous layer of a dynamic chain built, by segment
        for i, block in enumerate(self.blocks):
            x, chain = block(x, rotary, cache, i, chain)
        logits = F.linear(self.ln_f(x), self.wte.weight if self.lm_head is None else self.lm_head.weight)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)

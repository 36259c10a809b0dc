"""A decoder whose FFN in every `moe.every`-th layer is a MoE layer of any method, in two families.

Pre-norm blocks and causal self-attention in both. `gpt` (nanoGPT's shape, GPT-2's with `bias='all'` and
`gelu_tanh`): LayerNorm, learned positions. `llama` (Llama, Mistral, Qwen2): RMSNorm, rotary positions,
SwiGLU, grouped-query attention. The input and output embeddings are tied unless `tie_embeddings` is false.
`build_model(cfg)` takes a dict or a `ModelConfig`; `model(input_ids, labels=None)` returns `.logits`,
`.loss` (mean next-token cross-entropy, None without labels) and `.aux_loss` (the MoE load-balancing losses
summed over layers; train on `loss + aux_loss`). `set_activation_checkpointing(k)` recomputes every k-th block in
the backward instead of keeping its activations.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Iterable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..config import ConfigError, ModelConfig, MoEConfig
from ..moe import CAMExMoE, MergeChain, MergePlan, MoELayer, StepPlans
from ..moe.ffn import FFN
from ..moe.token_moe import MegaBlocksMoE, TokenMoE, resolve_backend
from .rope import apply_rotary, rotary_tables


@dataclass
class ModelOutput:
    logits: Tensor
    loss: Optional[Tensor]
    aux_loss: Tensor


class CausalSelfAttention(nn.Module):
    """One fused q/k/v projection (rows: q, then k, then v), with `kv_heads` key/value heads shared by groups of
    query heads (grouped-query attention when fewer than `n_heads`); rotary positions when given tables."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        kv_dim = self.kv_heads * self.head_dim
        self.qkv = nn.Linear(cfg.d_model, cfg.d_model + 2 * kv_dim, bias=cfg.bias != "none")
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias == "all")

    def forward(self, x: Tensor, rotary: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
        bsz, length, dim = x.shape
        kv_dim = self.kv_heads * self.head_dim
        q, k, v = (t.view(bsz, length, -1, self.head_dim).transpose(1, 2)
                   for t in self.qkv(x).split([dim, kv_dim, kv_dim], dim=-1))
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.kv_heads != self.n_heads)
        return self.proj(y.transpose(1, 2).reshape(bsz, length, dim))


def build_norm(cfg: ModelConfig) -> nn.Module:
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps) if cfg.architecture == "gpt" else \
        nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)


def build_moe_layer(cfg: ModelConfig, chain_start: bool) -> nn.Module:
    """The MoE layer the config asks for: a merge layer, or a token-routing `smoe` baseline."""
    moe: MoEConfig = cfg.moe
    d, h = cfg.d_model, cfg.ffn_hidden_size
    if moe.method != "smoe":
        return CAMExMoE(d, h, moe=moe, activation=cfg.activation, chain_start=chain_start, init_std=cfg.init_std,
                        bias=cfg.ffn_bias)
    if resolve_backend(moe.backend, moe.ep_size, ffn_bias=cfg.ffn_bias) == "megablocks":
        return MegaBlocksMoE(d, h, moe, activation=cfg.activation, init_std=cfg.init_std)
    return TokenMoE(d, h, moe, activation=cfg.activation, init_std=cfg.init_std, bias=cfg.ffn_bias)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, ffn: nn.Module):
        super().__init__()
        self.ln_attn = build_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.ln_ffn = build_norm(cfg)
        self.ffn = ffn
        self.is_moe = isinstance(ffn, MoELayer)

    def forward(self, x: Tensor, chain: Optional[MergeChain], plan: Optional[MergePlan] = None,
                rotary=None) -> tuple[Tensor, Optional[Tensor], Optional[MergeChain]]:
        """`(x, aux loss or None, the chain for the next block)`: a dense block hands the chain on unchanged."""
        x = x + self.attn(self.ln_attn(x), rotary)
        h = self.ln_ffn(x)
        if not self.is_moe:
            return x + self.ffn(h), None, chain
        out, aux, _, chain = self.ffn(h, chain, plan)
        return x + out, aux, chain


def recomputed_block(index: int, interval: Optional[int]) -> bool:
    """Whether activation checkpointing every `interval`-th block (0 or None: none) recomputes block `index`: the
    k-th, 2k-th, ... (`GPT.set_activation_checkpointing`; the memory model counts the same blocks)."""
    return bool(interval) and (index + 1) % interval == 0


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size is None:
            raise ConfigError("vocab_size is not set: give it in the config or take it from the tokenizer")
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.d_model) if cfg.architecture == "gpt" else None
        starts = dict(zip(cfg.moe_layers, cfg.chain_starts))
        self.blocks = nn.ModuleList(
            Block(cfg, build_moe_layer(cfg, chain_start=starts[i]) if i in starts
                  else FFN(cfg.d_model, cfg.ffn_hidden_size, cfg.activation, cfg.init_std, cfg.ffn_bias))
            for i in range(cfg.n_layers))
        self.ln_f = build_norm(cfg)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.checkpoint_interval = 0  # `set_activation_checkpointing`
        self._init_dense_weights()

    @torch.no_grad()
    def _init_dense_weights(self) -> None:
        """GPT-2 init; residual projections scaled by 1/sqrt(2·layers). MoE layers initialise themselves."""
        std = self.config.init_std
        for embedding in (self.wte, self.wpe, self.lm_head):
            if embedding is not None:
                nn.init.normal_(embedding.weight, 0.0, std)
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, 0.0, std)
            nn.init.normal_(block.attn.proj.weight, 0.0, std / math.sqrt(2 * self.config.n_layers))
            for linear in (block.attn.qkv, block.attn.proj):
                if linear.bias is not None:
                    nn.init.zeros_(linear.bias)

    def merge_plans(self, batch: int, length: int, accumulation: int = 1) -> StepPlans:
        """Every MoE layer's plan for one optimizer step of `accumulation` micro-batches of `[batch, length]`
        tokens, each built when the forward first reaches its layer (the trainer asks at the step's first
        micro-batch, then passes each micro-batch `for_micro_batch(last)`; `StepPlans`)."""
        moe = self.config.moe
        segments = 0 if moe is None else batch * (length // moe.segment_len_for(length))
        return StepPlans([layer for _, layer in self.moe_layers()], segments, accumulation)

    def forward(self, input_ids: Tensor, labels: Optional[Tensor] = None,
                plans: Optional[Iterable[Optional[MergePlan]]] = None) -> ModelOutput:
        """`plans`: one per MoE layer in order, this micro-batch's view of the step's plans (`merge_plans`, then
        `for_micro_batch`); without them, this call's own (one micro-batch per step). Either way each plan is built
        outside its block, so a recomputed block reuses it."""
        bsz, length = input_ids.shape
        if length > self.config.seq_len:
            raise ValueError(f"input length {length} exceeds the model's seq_len={self.config.seq_len}")
        x = self.wte(input_ids)
        rotary = None
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(length, device=input_ids.device))
        else:
            rotary = rotary_tables(self.config, length, x.dtype, input_ids.device)
        chain, aux_loss = None, x.new_zeros(())
        if plans is None:
            plans = self.merge_plans(bsz, length).for_micro_batch(last=True)
        layer_plans = iter(plans)
        for i, block in enumerate(self.blocks):
            plan = next(layer_plans) if block.is_moe else None
            if self._recomputed(i):
                x, aux, chain = checkpoint(block, x, chain, plan, rotary, use_reentrant=False)
            else:
                x, aux, chain = block(x, chain, plan, rotary)
            if aux is not None:
                aux_loss = aux_loss + aux
        logits, loss = self.head(x, labels)
        return ModelOutput(logits=logits, loss=loss, aux_loss=aux_loss)

    def head(self, x: Tensor, labels: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
        """The last block's output to `(logits, loss or None)`: never recomputed, so its logits and their fp32
        log-softmax are activations that checkpointing leaves as they are."""
        logits = F.linear(self.ln_f(x), self.wte.weight if self.lm_head is None else self.lm_head.weight)
        if labels is None:
            return logits, None
        return logits, F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.reshape(-1))

    def set_activation_checkpointing(self, interval: int = 1) -> None:
        """Recompute every `interval`-th block (the k-th, 2k-th, ... of the n_layers; 0: none) in the backward
        instead of keeping its activations (`torch.utils.checkpoint`, non-reentrant, RNG replayed: router noise
        draws the same). A block's merge plan is one of its inputs, so the recomputed forward reuses the step's
        curvature work and its collectives instead of repeating them. A token-routing layer's all-to-all is repeated
        in the recomputation: the same collectives in the same order on every rank."""
        layers = self.config.n_layers
        if isinstance(interval, bool) or not isinstance(interval, int) or not 0 <= interval <= layers:
            raise ConfigError(f"activation_checkpointing_interval={interval!r} is invalid: expected an integer in "
                              f"0..n_layers={layers} (0: off, 1: every block, k: every k-th block)")
        self.checkpoint_interval = interval

    def _recomputed(self, index: int) -> bool:
        """Whether block `index` is recomputed in this forward: only where a backward can follow."""
        return recomputed_block(index, self.checkpoint_interval) and torch.is_grad_enabled()

    def compile_blocks(self, **kwargs) -> None:
        """`torch.compile` every block in place: parameter and checkpoint names stay those of the eager model.
        Merge layers trace whole (no host synchronisation); their plans come in as inputs, built outside."""
        for block in self.blocks:
            block.compile(**kwargs)

    def moe_layers(self) -> list[tuple[int, nn.Module]]:
        return [(i, b.ffn) for i, b in enumerate(self.blocks) if b.is_moe]

    def ep_bytes_sent(self) -> int:
        """Bytes this rank has sent through the merge layers' expert-parallel collectives so far (each layer
        counts its own, `CAMExMoE.traffic`); the trainer logs the growth per step."""
        return sum(layer.traffic.bytes_sent for _, layer in self.moe_layers() if isinstance(layer, CAMExMoE))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_model(cfg: Union[dict, ModelConfig]) -> GPT:
    if isinstance(cfg, dict):
        cfg = ModelConfig.from_dict(cfg)
    return GPT(cfg)


def save_config(cfg: ModelConfig, path: Union[str, os.PathLike]) -> None:
    with open(path, "w") as f:
        json.dump(cfg.to_dict(), f, indent=2)

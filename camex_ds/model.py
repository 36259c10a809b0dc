"""A GPT-style decoder whose FFN in every `moe.every`-th layer is a MoE layer of any method.

Pre-norm blocks, causal self-attention, learned positions, tied input/output embeddings (nanoGPT's
shape). `build_model(cfg)` takes a dict or a `ModelConfig`; `model(input_ids, labels=None)` returns
`.logits`, `.loss` (mean next-token cross-entropy, None without labels) and `.aux_loss` (the MoE
load-balancing losses summed over layers; train on `loss + aux_loss`).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ConfigError, ModelConfig, MoEConfig
from .moe import CAMExMoE, MergeChain, MicroBatch
from .moe.ffn import FFN
from .moe.token_moe import MegaBlocksMoE, TokenMoE, resolve_backend


@dataclass
class ModelOutput:
    logits: Tensor
    loss: Optional[Tensor]
    aux_loss: Tensor


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        bsz, length, dim = x.shape
        q, k, v = self.qkv(x).view(bsz, length, 3, self.n_heads, dim // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(bsz, length, dim))


def build_moe_layer(cfg: ModelConfig, chain_start: bool) -> nn.Module:
    """The MoE layer the config asks for: a merge layer, or a token-routing `smoe` baseline."""
    moe: MoEConfig = cfg.moe
    d, h = cfg.d_model, cfg.ffn_hidden_size
    if moe.method != "smoe":
        return CAMExMoE(d, h, moe.num_experts, method=moe.method, ep_size=moe.ep_size, segment_len=moe.segment_len,
                        routing=moe.routing, first_segment=moe.first_segment, top_k=moe.top_k,
                        curvature_rank=moe.curvature_rank, alpha=moe.alpha, activation=cfg.activation,
                        noisy_gating=moe.noisy_gating, aux_loss_coef=moe.aux_loss_coef, dare_p=moe.dare_p,
                        dynamic=moe.dynamic, chain_start=chain_start, init_std=cfg.init_std)
    if resolve_backend(moe.backend, moe.ep_size) == "megablocks":
        return MegaBlocksMoE(d, h, moe.num_experts, top_k=moe.k, activation=cfg.activation,
                             aux_loss_coef=moe.aux_loss_coef, init_std=cfg.init_std)
    return TokenMoE(d, h, moe.num_experts, top_k=moe.k, ep_size=moe.ep_size, activation=cfg.activation,
                    capacity_factor=moe.capacity_factor, aux_loss_coef=moe.aux_loss_coef, init_std=cfg.init_std)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, ffn: nn.Module):
        super().__init__()
        self.ln_attn = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln_ffn = nn.LayerNorm(cfg.d_model)
        self.ffn = ffn
        self.is_moe = not isinstance(ffn, FFN)

    def forward(self, x: Tensor, chain: MergeChain,
                micro_batch: Optional[MicroBatch] = None) -> tuple[Tensor, Optional[Tensor]]:
        x = x + self.attn(self.ln_attn(x))
        h = self.ln_ffn(x)
        if not self.is_moe:
            return x + self.ffn(h), None
        out, aux, _ = self.ffn(h, chain, micro_batch)
        return x + out, aux


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size is None:
            raise ConfigError("vocab_size is not set: give it in the config or take it from the tokenizer")
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.d_model)
        starts = dict(zip(cfg.moe_layers, cfg.chain_starts))
        self.blocks = nn.ModuleList(
            Block(cfg, build_moe_layer(cfg, chain_start=starts[i]) if i in starts
                  else FFN(cfg.d_model, cfg.ffn_hidden_size, cfg.activation, cfg.init_std))
            for i in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self._init_dense_weights()

    @torch.no_grad()
    def _init_dense_weights(self) -> None:
        """GPT-2 init; residual projections scaled by 1/sqrt(2·layers). MoE layers initialise themselves."""
        std = self.config.init_std
        nn.init.normal_(self.wte.weight, 0.0, std)
        nn.init.normal_(self.wpe.weight, 0.0, std)
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, 0.0, std)
            nn.init.normal_(block.attn.proj.weight, 0.0, std / math.sqrt(2 * self.config.n_layers))

    def forward(self, input_ids: Tensor, labels: Optional[Tensor] = None,
                micro_batch: Optional[MicroBatch] = None) -> ModelOutput:
        """`micro_batch`: where a training forward sits in its optimizer step (the trainer passes it, from
        DeepSpeed's engine), so merge layers do their per-step work once per optimizer step."""
        bsz, length = input_ids.shape
        if length > self.config.seq_len:
            raise ValueError(f"input length {length} exceeds the model's seq_len={self.config.seq_len}")
        pos = torch.arange(length, device=input_ids.device)
        x = self.wte(input_ids) + self.wpe(pos)
        chain = MergeChain()
        aux_loss = x.new_zeros(())
        for block in self.blocks:
            x, aux = block(x, chain, micro_batch)
            if aux is not None:
                aux_loss = aux_loss + aux
        logits = F.linear(self.ln_f(x), self.wte.weight)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.reshape(-1))
        return ModelOutput(logits=logits, loss=loss, aux_loss=aux_loss)

    def compile_blocks(self, **kwargs) -> None:
        """`torch.compile` every block in place: parameter and checkpoint names stay those of the eager model.
        Merge layers trace whole (no host synchronisation); their per-step reuse bookkeeping stays eager."""
        for block in self.blocks:
            block.compile(**kwargs)

    def moe_layers(self) -> list[tuple[int, nn.Module]]:
        return [(i, b.ffn) for i, b in enumerate(self.blocks) if b.is_moe]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_model(cfg: Union[dict, ModelConfig]) -> GPT:
    if isinstance(cfg, dict):
        cfg = ModelConfig.from_dict(cfg)
    return GPT(cfg)


def save_config(cfg: ModelConfig, path: Union[str, os.PathLike]) -> None:
    with open(path, "w") as f:
        json.dump(cfg.to_dict(), f, indent=2)
from .pretrained import load_pretrained  # noqa: E402,F401

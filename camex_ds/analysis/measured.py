"""The FLOPs of `camex_ds.analysis.flops`, measured instead of counted: `FlopCounterMode` on the real model,
with the formulas torch's registry lacks, so tests can hold the analytic counts to what the code executes."""
from __future__ import annotations

from typing import Optional

import torch
from torch.utils import flop_counter as fc

from ..model import build_model
from .flops import CfgLike, resolve_config


def flop_counter_mapping() -> dict:
    """Extra formulas for `FlopCounterMode(custom_mapping=...)` covering two gaps of torch's registry:
    SDPA's CPU kernel (`_scaled_dot_product_flash_attention_for_cpu` and its backward; only the CUDA
    kernels are registered, the CPU one counts 0), mapped to the same formulas so a CPU count equals a GPU
    count; and the in-place GEMMs `addmm_`/`baddbmm_` (only the out-of-place ops are registered), which
    `_MergedLinear`'s backward uses for the task-vector gradient."""
    aten = torch.ops.aten
    mapping = {}
    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)

    def forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_flop_count(query_shape, key_shape, value_shape)

    def backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)

    def addmm_(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]

    def baddbmm_(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]

    mapping[aten.addmm_] = addmm_
    mapping[aten.baddbmm_] = baddbmm_
    if fwd is not None:
        mapping[fwd] = forward
    if bwd is not None:
        mapping[bwd] = backward
    return mapping


def measure_flops_per_token(cfg: CfgLike, batch: int = 1, seq_len: Optional[int] = None, *, train: bool = False,
                            accumulation: int = 1, model: Optional[torch.nn.Module] = None, seed: int = 0) -> dict:
    """FlopCounterMode's count per token on the real model (`build_model`), eval forward or, with `train`, one
    optimizer step's training-mode forwards and backwards of `loss + aux_loss`: `accumulation` micro-batches of
    `batch` sequences, each told its place in the step as DeepSpeed's trainer tells it. Returns `forward`,
    `backward`, `train` (when `train`) and `by_op`. Analytic counterpart:
    `flops_per_token(cfg, seq_len, batch·seq_len, accumulation=accumulation)`."""
    cfg = resolve_config(cfg, seq_len)
    if model is None:
        torch.manual_seed(seed)
        model = build_model(cfg)
    model.train(train)
    vocab = cfg.vocab_size
    gen = torch.Generator().manual_seed(seed)
    tokens = batch * cfg.seq_len
    mapping = flop_counter_mapping()
    if train:
        model.zero_grad(set_to_none=True)
        f = b = 0
        by_op: dict = {}
        plans = None
        for i in range(accumulation):
            ids = torch.randint(0, vocab, (batch, cfg.seq_len), generator=gen)
            with fc.FlopCounterMode(display=False, custom_mapping=mapping) as fwd:
                if plans is None:  # the step's plans count in its first forward
                    plans = model.merge_plans(batch, cfg.seq_len, accumulation)
                out = model(ids, labels=ids, plans=plans.for_micro_batch(last=i == accumulation - 1))
                loss = out.loss + out.aux_loss
            with fc.FlopCounterMode(display=False, custom_mapping=mapping) as bwd:
                loss.backward()
            f, b = f + fwd.get_total_flops(), b + bwd.get_total_flops()
            for k, v in fwd.get_flop_counts()["Global"].items():
                by_op[str(k)] = by_op.get(str(k), 0) + v
        step_tokens = tokens * accumulation
        return {"forward": f / step_tokens, "backward": b / step_tokens, "train": (f + b) / step_tokens,
                "by_op": by_op}
    ids = torch.randint(0, vocab, (batch, cfg.seq_len), generator=gen)
    with torch.no_grad(), fc.FlopCounterMode(display=False, custom_mapping=mapping) as fwd:
        model(ids)
    by_op = {str(k): v for k, v in fwd.get_flop_counts()["Global"].items()}
    return {"forward": fwd.get_total_flops() / tokens, "by_op": by_op}


__all__ = ["flop_counter_mapping", "measure_flops_per_token"]

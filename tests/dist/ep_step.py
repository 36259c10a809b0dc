"""One DeepSpeed optimizer step per (method, ZeRO stage, layout); writes every parameter by global name.

A module run from the repository root: under `deepspeed --num_gpus 2 --module tests.dist.ep_step` (layouts ep2
and dp2, each rank on its half of a fixed global batch) or as `python -m tests.dist.ep_step` (layout ref: one
rank, ep_size 1, the whole batch). With `--accum K` each rank's part of the batch goes through K micro-batches
of DeepSpeed's gradient accumulation. With `--checkpointing 0,1` each step also runs with every block recomputed
(activation checkpointing, keys suffixed `-ckpt1`), and the files hold the step's gradients too.
tests/integration/test_expert_parallel.py, tests/integration/test_accumulation.py and
tests/integration/test_checkpointing.py compare the files. Curvature factors are moved away from identity by a seed
that depends only on the global expert id, so every layout starts from the same model. `camex-dynamic` is a
dynamic chain of camex layers.
"""
import argparse
import itertools
import json
import os
from typing import Optional

import torch

from camex_ds import deepspeed_adapter as ds
from camex_ds import parallel
from camex_ds.model import build_model
from camex_ds.moe import CAMExMoE
from camex_ds.moe.token_moe import TokenMoE

GLOBAL_BATCH, SEQ, VOCAB = 8, 32, 64


def model_config(method: str, ep_size: int) -> dict:
    dynamic = method.endswith("-dynamic")
    return {"vocab_size": VOCAB, "d_model": 32, "n_layers": 2, "n_heads": 2, "ffn_hidden_size": 64, "seq_len": SEQ,
            "moe": {"method": method.removesuffix("-dynamic"), "num_experts": 5 if dynamic else 4, "every": 1,
                    "segment_len": 8, "ep_size": ep_size, "curvature_rank": 2, "noisy_gating": False,
                    "aux_loss_coef": 0.0, "alpha": 0.5, "dynamic": dynamic}}


def ds_config(zero: int, bf16: bool, accum: int = 1) -> dict:
    return {"train_micro_batch_size_per_gpu": GLOBAL_BATCH // (parallel.world_size() * accum),
            "gradient_accumulation_steps": accum,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "eps": 1e-6, "weight_decay": 0.0, "torch_adam": True}},
            "zero_optimization": {"stage": zero}, "bf16": {"enabled": bf16}, "steps_per_print": 10 ** 9}


@torch.no_grad()
def curve_factors(model) -> None:
    for layer_index, (_, layer) in enumerate(model.moe_layers()):
        if not isinstance(layer, CAMExMoE) or not layer.args.curved:
            continue
        for j, expert in enumerate(layer.local_experts):
            gen = torch.Generator().manual_seed(1000 * layer_index + layer.ep_rank * layer.num_local_experts + j)
            for name in sorted(expert.curvature):
                for f in expert.curvature[name].tensors():
                    f.add_(0.1 * torch.randn(f.shape, generator=gen))


def global_state(model, of=lambda p: p) -> dict:
    """This rank's parameters (or what `of` reads of each, e.g. its gradient; None: left out), experts renamed to
    their global ids (float32 copies)."""
    named = {}
    for layer_name, layer in model.named_modules():
        if isinstance(layer, (CAMExMoE, TokenMoE)):
            ep_rank = parallel.expert_parallel_rank(layer.ep_size)
            for j, expert in enumerate(ds.local_experts(layer)):
                gid = ep_rank * layer.num_local_experts + j
                for n, p in expert.named_parameters():
                    named[f"{layer_name}.expert{gid}.{n}"] = p
    named.update((n, p) for n, p in model.named_parameters() if "deepspeed_experts" not in n)
    values = {n: of(p) for n, p in named.items()}
    return {n: v.detach().float().clone() for n, v in values.items() if v is not None}


def one_step(method: str, zero: int, ep_size: int, bf16: bool, save_dir=None, accum: int = 1,
             compile_blocks: bool = False, checkpoint_interval: Optional[int] = None) -> dict:
    import deepspeed
    from deepspeed.utils import safe_get_full_grad
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    torch.manual_seed(0)
    model = build_model(model_config(method, ep_size))
    curve_factors(model)
    before = global_state(model)
    if compile_blocks:
        model.compile_blocks()
    model.set_activation_checkpointing(checkpoint_interval or 0)
    groups = split_params_into_different_moe_groups_for_optimizer({"params": list(model.parameters()), "name": "p"})
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config(zero, bf16, accum))
    data = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
    per_rank = GLOBAL_BATCH // parallel.world_size()
    local = data[parallel.rank() * per_rank:(parallel.rank() + 1) * per_rank]
    sent, losses, grads = model.ep_bytes_sent(), [], None
    plans = model.merge_plans(per_rank // accum, SEQ, accum)
    for micro in local.chunk(accum):
        view = plans.for_micro_batch(engine.is_gradient_accumulation_boundary())
        out = engine(micro[:, :-1], labels=micro[:, 1:], plans=view)
        engine.backward(out.loss)
        if checkpoint_interval is not None and engine.is_gradient_accumulation_boundary():
            grads = global_state(model, safe_get_full_grad)  # every rank: ZeRO assembles partitioned gradients
        engine.step()
        losses.append(out.loss.detach().item())
    if save_dir:
        engine.save_checkpoint(save_dir, tag="step1")
    return {"before": before, "after": global_state(model), "loss": sum(losses) / accum,
            "ep_bytes": model.ep_bytes_sent() - sent, "grads": grads}


def load_into_ep1(method: str, zero: int, ckpt: str) -> dict:
    """An ep_size=1 model loading a checkpoint saved at another ep_size (parameters only)."""
    import deepspeed

    torch.manual_seed(123)  # a different init: everything must come from the checkpoint
    model = build_model(model_config(method, 1))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()),
                                      config=ds_config(zero, False))
    engine.load_checkpoint(ckpt, tag="step1", load_optimizer_states=False, load_lr_scheduler_states=False)
    return {"after": global_state(model)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--layouts", required=True, help="comma list of ref, ep2, dp2, load")
    ap.add_argument("--ckpt", help="checkpoint folder: ep2 saves its first run there, load reads it")
    ap.add_argument("--methods", default="camex-ties,euclid")
    ap.add_argument("--zero", default="0,1,2")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--accum", type=int, default=1, help="gradient accumulation steps (micro-batches per step)")
    ap.add_argument("--compile", action="store_true", help="torch.compile every block (files get a _compiled suffix)")
    ap.add_argument("--checkpointing", help="comma list of activation-checkpointing intervals to run each step with "
                                            "(0: none; keys get a -ckpt<K> suffix for K > 0); records gradients")
    ap.add_argument("--local_rank", type=int, default=0)
    args = ap.parse_args()
    parallel.init_distributed()
    try:
        run_layouts(args)
    finally:
        parallel.shutdown()


def run_layouts(args) -> None:
    """One result file per (layout, rank), for every method, ZeRO stage and checkpointing interval asked for."""
    intervals = [None] if args.checkpointing is None else [int(k) for k in args.checkpointing.split(",")]
    for layout in args.layouts.split(","):
        results = {}
        for method in args.methods.split(","):
            for zero, interval in itertools.product(map(int, args.zero.split(",")), intervals):
                key = f"{method}-zero{zero}" + (f"-ckpt{interval}" if interval else "")
                if layout == "load":
                    results[key] = load_into_ep1(method, zero, os.path.join(args.ckpt, key))
                    continue
                save = os.path.join(args.ckpt, key) if layout == "ep2" and args.ckpt else None
                results[key] = one_step(method, zero, 2 if layout == "ep2" else 1, args.bf16, save, args.accum,
                                        args.compile, interval)
        suffix = ("" if args.accum == 1 else f"_accum{args.accum}") + ("_compiled" if args.compile else "")
        torch.save(results, os.path.join(args.out, f"{layout}{suffix}_rank{parallel.rank()}.pt"))
        if parallel.rank() == 0:
            print(json.dumps({layout: {k: v.get("loss") for k, v in results.items()}}))


if __name__ == "__main__":
    main()

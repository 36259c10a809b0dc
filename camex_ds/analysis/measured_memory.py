"""The memory of `camex_ds.analysis.memory`, measured instead of predicted: the peak bytes of live tensors in
DeepSpeed training steps of the real model, by allocation accounting (torch's profiler reports every allocation
and free of the CPU allocator with its running total), not by process RSS, so allocator caching hides nothing.

The engine is built inside the measurement (so every tensor it holds was counted when allocated), but the peak is
taken over the training steps only: `deepspeed.initialize`'s own transient (flattening the parameters) is not a
training cost. Run it in a fresh process per configuration (the merge layers' CPU work buffers outlive a run, and a
second measurement in the same process would find them allocated, uncounted), on every rank of a job for ep > 1
(`tools/bench_memory.py` does both). CPU tensors only: on a GPU compare `torch.cuda.max_memory_allocated`.
"""
from __future__ import annotations

import copy

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from ..model import build_model, param_groups
from .flops import CfgLike, resolve_config

STEPS = "camex_ds.train_steps"  # the profiler range around the measured steps


def _allocations(prof) -> tuple[int, list]:
    """The running total of live bytes before the profiled code's first allocation, and the running totals after
    each allocation or free inside the `STEPS` range."""
    from torch._C._profiler import _EventType

    def walk(events):
        for e in events:
            yield e
            yield from walk(e.children)

    tree = prof.profiler.kineto_results.experimental_event_tree()
    allocations = sorted((e for e in walk(tree) if e.tag == _EventType.Allocation), key=lambda e: e.start_time_ns)
    first = allocations[0].extra_fields
    steps = next(e for e in walk(tree) if e.name == STEPS)
    inside = [e.extra_fields.total_allocated for e in walk([steps]) if e.tag == _EventType.Allocation]
    return first.total_allocated - first.alloc_size, inside


def _optimizer_step(engine, batches: list) -> None:
    """One optimizer step, the trainer's own (`train.loop.optimizer_step`): the step's merge plans, and a
    micro-batch's output (its logits) referenced until the next micro-batch's forward returns."""
    from ..train.loop import optimizer_step

    optimizer_step(engine, iter([(ids, ids) for ids in batches]), len(batches))


def measure_train_memory(cfg: CfgLike, ds_config: dict, *, checkpoint_every: int = 0, steps: int = 2,
                         seed: int = 0) -> dict:
    """Peak live tensor bytes on this rank over `steps` optimizer steps of the engine `deepspeed.initialize` builds
    from `ds_config` (its micro-batch and accumulation; ZeRO 0-2, fp32 or bf16) for the model `cfg` (its ep_size;
    call on every rank of a job of `world` ranks for ep > 1), every `checkpoint_every`-th block recomputed in the
    backward (0: none; `GPT.set_activation_checkpointing`, as the launcher sets it). Returns `peak` (bytes above
    what was live before the model was built) and `before_steps` (the model and engine's bytes when the steps
    start)."""
    import deepspeed

    from ..parallel import init_distributed

    cfg = resolve_config(cfg)
    init_distributed()
    micro = ds_config["train_micro_batch_size_per_gpu"]
    accumulation = ds_config.get("gradient_accumulation_steps", 1)
    gen = torch.Generator().manual_seed(seed)
    batches = [torch.randint(0, cfg.vocab_size, (micro, cfg.seq_len), generator=gen)
               for _ in range(steps * accumulation)]
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        torch.manual_seed(seed)
        model = build_model(cfg)
        model.set_activation_checkpointing(checkpoint_every)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model),
                                          config=copy.deepcopy(ds_config))
        del model
        with record_function(STEPS):
            for step in range(steps):
                _optimizer_step(engine, batches[step * accumulation:(step + 1) * accumulation])
    base, inside = _allocations(prof)
    return {"peak": max(inside) - base, "before_steps": inside[0] - base}


__all__ = ["measure_train_memory"]

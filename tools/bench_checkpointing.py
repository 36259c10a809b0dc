#!/usr/bin/env python
"""What activation checkpointing costs and saves: one training step's peak memory and time, with and without it,
side by side in one process (issue 27: "Its cost").

One step is the trainer's: forward (each merge plan built just before its block), backward, then AdamW. Gradients and
AdamW's states are allocated before the measured step (gradients zeroed in place, not freed), so what the step adds
above them is the activation memory: the blocks' saved tensors, the head's logits and their gradients, and the
transients of the backward. On CPU the peak is counted from the storages the step's ops create and free
(`LiveBytes`: live tensor storages, not process RSS, so allocator caching hides nothing); on CUDA it is
`torch.cuda.max_memory_allocated`. The step's merge plans (the curved task vectors, parameter-sized: the same with
and without checkpointing and at any micro-batch; all alive at the backward's start) are counted in the activations
and reported apart. Memory is measured in a first round (the merge layers' reused CPU work buffers,
a few MiB, are counted in its first configuration only), then step times, as medians over `--repeats` interleaved
rounds without the tracker.

    python tools/bench_checkpointing.py                                  # gpt2_small_camex, micro-batch 8, fp32
    python tools/bench_checkpointing.py --seq_len 256 --repeats 3        # a shorter sequence, three timed rounds
    python tools/bench_checkpointing.py --device cuda --bf16             # on a GPU
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from camex_ds.analysis.live_bytes import LiveBytes
from camex_ds.config import DEFAULT_VOCAB_SIZE, ModelConfig
from camex_ds.model import GPT

ROOT = Path(__file__).resolve().parent.parent
MIB = 2 ** 20


def build(args) -> GPT:
    raw = json.loads(Path(args.model).read_text())
    cfg = ModelConfig.from_dict({"vocab_size": DEFAULT_VOCAB_SIZE, **raw, **({"vocab_size": args.vocab_size}
                                                                             if args.vocab_size else {})})
    if args.seq_len:
        cfg = cfg.replace(seq_len=args.seq_len)
    if cfg.moe is not None:
        cfg = cfg.with_moe(ep_size=1)  # one process: every expert here
    torch.manual_seed(0)
    model = GPT(cfg).to(args.device, torch.bfloat16 if args.bf16 else torch.float32).train()
    for p in model.parameters():  # held through the step, as an engine holds its gradient buffers
        p.grad = torch.zeros_like(p)
    return model


def forward_backward(model: GPT, ids: torch.Tensor) -> None:
    """What checkpointing changes: forward (each merge plan built before its block), backward into the held
    gradients."""
    out = model(ids[:, :-1], labels=ids[:, 1:])
    (out.loss + out.aux_loss).backward()


def live_peak(run, device: str) -> int:
    """Peak bytes of live tensors while `run()` runs, above those live when it starts."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    with LiveBytes() as tracker:
        run()
    return tracker.peak


def head_bytes(model: GPT, ids: torch.Tensor) -> int:
    """The head's activation peak alone (`GPT.head`'s forward and backward from the last block's output): the part
    of the step's activations that checkpointing the blocks cannot remove."""
    x = torch.randn(ids.shape[0], ids.shape[1] - 1, model.config.d_model, dtype=model.wte.weight.dtype,
                    device=ids.device, requires_grad=True)
    return live_peak(lambda: model.head(x, ids[:, 1:])[1].backward(), ids.device.type)


def plan_bytes(model: GPT, ids: torch.Tensor) -> int:
    """What the step's merge plans hold once built (parameter-sized: the curved task vectors and what their graphs
    keep), the same with and without checkpointing, and whatever the micro-batch."""
    with LiveBytes() as tracker:
        plans = list(model.merge_plans(ids.shape[0], ids.shape[1] - 1))
        held = tracker.live
    del plans
    return held


def timed(run, device: str) -> tuple[float, float]:
    """`(wall seconds, this process's CPU seconds)` of `run()`: on a shared machine the CPU time is the steadier."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "ds_configs" / "models" / "gpt2_small_camex.json"))
    ap.add_argument("--micro_batch", type=int, default=8)
    ap.add_argument("--seq_len", type=int, help="shorter sequences than the model's seq_len (default: its own)")
    ap.add_argument("--vocab_size", type=int, help="default: the model's, else the default tokenizer's "
                                                   f"{DEFAULT_VOCAB_SIZE} (GPT-2's tokenizer: 50304)")
    ap.add_argument("--interval", type=int, default=1, help="checkpointing: every K-th block recomputed (%(default)s)")
    ap.add_argument("--repeats", type=int, default=1, help="timed rounds, interleaved (%(default)s)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true", help="bf16 parameters and activations (default fp32)")
    args = ap.parse_args(argv)

    model = build(args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    optimizer.step()  # AdamW's states, allocated before the measured steps (zero gradients: no change but decay)
    length = model.config.seq_len
    ids = torch.randint(0, model.config.vocab_size, (args.micro_batch, length + 1),
                        generator=torch.Generator().manual_seed(1)).to(args.device)
    settings = {"off": 0, f"every {args.interval}": args.interval}
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    held = 2 * parameter_bytes + sum(t.numel() * t.element_size() for state in optimizer.state.values()
                                     for t in state.values() if torch.is_tensor(t))  # + gradients, AdamW

    def step(interval: int, measure=timed):
        """What `measure` says of one training step: plans, forward, backward into the held gradients, AdamW."""
        model.set_activation_checkpointing(interval)
        optimizer.zero_grad(set_to_none=False)
        return measure(lambda: (forward_backward(model, ids), optimizer.step()), args.device)

    memory = {name: step(interval, live_peak) for name, interval in settings.items()}
    plans = plan_bytes(model, ids) if args.device == "cpu" else 0
    head = head_bytes(model, ids)
    times = {name: [] for name in settings}
    for _ in range(args.repeats):
        for name, interval in settings.items():
            times[name].append(step(interval))
    rows = {name: {"activation_mib": memory[name] / MIB, "blocks_mib": (memory[name] - head) / MIB,
                   "without_plans_mib": (memory[name] - plans) / MIB,
                   "peak_mib": (held + memory[name]) / MIB,
                   "step_s": statistics.median(t[0] for t in times[name]),
                   "step_cpu_s": statistics.median(t[1] for t in times[name])} for name in settings}
    off, on = rows["off"], rows[f"every {args.interval}"]
    result = {"model": Path(args.model).name, "micro_batch": args.micro_batch, "seq_len": length,
              "dtype": "bf16" if args.bf16 else "fp32", "device": args.device, "threads": torch.get_num_threads(),
              "params_grads_adam_mib": held / MIB, "plans_mib": plans / MIB, "head_mib": head / MIB, "rows": rows,
              "activation_ratio": off["activation_mib"] / on["activation_mib"],
              "blocks_ratio": off["blocks_mib"] / on["blocks_mib"],
              "without_plans_ratio": off["without_plans_mib"] / on["without_plans_mib"],
              "step_time_ratio": on["step_s"] / off["step_s"],
              "step_cpu_time_ratio": on["step_cpu_s"] / off["step_cpu_s"]}
    print(f"{result['model']}  micro-batch {args.micro_batch} x {length} tokens  {result['dtype']}  {args.device}  "
          f"parameters+gradients+AdamW {held / MIB:.0f} MiB, merge plans {plans / MIB:.0f} MiB (within activations)")
    print(f"the head alone (logits, fp32 log-softmax, their gradients) {head / MIB:.0f} MiB")
    print(f"{'checkpointing':>14} {'activations MiB':>16} {'without head':>13} {'peak MiB':>10} {'step s':>8} "
          f"{'CPU s':>8}")
    for name, row in rows.items():
        print(f"{name:>14} {row['activation_mib']:16.0f} {row['blocks_mib']:13.0f} {row['peak_mib']:10.0f} "
              f"{row['step_s']:8.2f} {row['step_cpu_s']:8.2f}")
    print(f"activation memory / {result['activation_ratio']:.2f} (without the head / {result['blocks_ratio']:.2f}, "
          f"without the merge plans / {result['without_plans_ratio']:.2f}), "
          f"step time x {result['step_time_ratio']:.2f} (CPU time x {result['step_cpu_time_ratio']:.2f})")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

"""`camex-flops`: FLOPs per token and parameters of a model config against its dense, SMoE, Euclidean-merge and
dynamic variants at equal width (spec §8; formulas in docs/flops.md, library in camex_ds.analysis.flops).

    python tools/flops.py --model_config cfg.json
    python tools/flops.py --model_config cfg.json --seq_len 1024 --micro_batch_tokens 8192 --accumulation 4 --json
    python tools/flops.py --model_config '{"d_model": 768, ...}' --sweep N=4,8,16 --sweep R=1,2,4
    camex-flops --memory --model_config cfg.json --deepspeed_config ds.json --world_size 8 --ep_size 8 \
        --micro_batch 8 --memory_gib 80

With `--memory`: per-rank memory of a training step instead (camex_ds.analysis.memory, docs/memory.md): its
parts, the peak, and with `--memory_gib` the largest micro-batch that fits.

Variants: the config itself; `dense` (no MoE); `smoe top-2` (DeepSpeed token routing, same N and
layers); `euclid` (static soft merging, same N, T, layers); `dynamic` (the config's merge method, or
camex, as a dynamic chain). FLOPs are matmul FLOPs per token (FlopCounterMode's convention), `train` =
forward + backward of a training step. Percentages are of the dense variant's train FLOPs per token.
`micro_batch_tokens` = tokens one rank runs through one forward pass (micro-batch × seq_len); `accumulation` =
DeepSpeed's gradient_accumulation_steps: training computes the curvature (and the dynamic chain's span images)
once per optimizer step, so it is shared by micro_batch_tokens × accumulation tokens.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import sys
from pathlib import Path

from . import ArgumentParser

# DeepSpeed logs its accelerator choice to stdout on import, through a handler bound to the stdout of that
# moment: bind it to a buffer, so --json output stays clean and errors stay one line.
with contextlib.redirect_stdout(io.StringIO()):
    from ..analysis.flops import ep_bytes_per_step, flops_per_token, param_counts
    from ..analysis.memory import DEFAULT_BUCKET, largest_micro_batch, memory
    from ..config import DEFAULT_VOCAB_SIZE, MERGE_METHODS, ConfigError, ModelConfig, MoEConfig, read_json_object
    from ..data.tokenizer import Tokenizer

PROG = "flops.py"
DEFAULT_VOCAB = DEFAULT_VOCAB_SIZE  # the launcher's default tokenizer size, for configs that leave vocab_size out
SWEEP_KEYS = {"N": "num_experts", "R": "curvature_rank", "T": "segment_len", "ep": "ep_size",
              "tokens": "micro_batch_tokens", "accum": "accumulation"}
OVERHEAD_PARTS = ("router", "merge", "curvature", "dynamic")


def load_config(text: str) -> ModelConfig:
    """A path to a JSON model config, or the JSON object itself."""
    if text.lstrip().startswith("{"):
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--model_config is not valid JSON: {e}") from None
        return ModelConfig.from_dict(raw)
    path = Path(text)
    if not path.is_file():
        raise ConfigError(f"--model_config {text}: no such file")
    return ModelConfig.load(str(path))


def _largest_divisor_at_most(n: int, at_most: int) -> int:
    return max(k for k in range(1, min(n, at_most) + 1) if n % k == 0)


def _base_moe(cfg: ModelConfig) -> MoEConfig:
    if cfg.moe is not None:
        return cfg.moe
    seg = 64 if cfg.seq_len % 64 == 0 else cfg.seq_len
    return MoEConfig(segment_len=seg, every=min(2, cfg.n_layers))


def variants(cfg: ModelConfig) -> list[tuple[str, ModelConfig, str]]:
    """(label, config, note) for the config and its equal-width dense / smoe / euclid / dynamic variants."""
    moe = _base_moe(cfg)
    rows = [(f"config ({cfg.method}{', dynamic' if cfg.moe and cfg.moe.dynamic else ''})", cfg, ""),
            ("dense", cfg.replace(moe=None), "")]
    smoe_k = min(2, moe.num_experts)
    rows.append((f"smoe top-{smoe_k}", cfg.replace(moe=dataclasses.replace(
        moe, method="smoe", top_k=smoe_k, dynamic=False, backend="deepspeed")), ""))
    top_k = moe.top_k if moe.method != "smoe" and moe.top_k is not None and moe.top_k <= moe.num_experts else None
    rows.append(("euclid", cfg.replace(moe=dataclasses.replace(
        moe, method="euclid", dynamic=False, top_k=top_k, backend="auto")), ""))
    if moe.num_experts >= 2:
        method = moe.method if moe.method in MERGE_METHODS else "camex"
        ep = _largest_divisor_at_most(moe.num_experts - 1, moe.ep_size)
        dyn_k = top_k if top_k is not None and top_k <= moe.num_experts - 1 else None
        note = f"ep_size {moe.ep_size} -> {ep} (must divide N-1={moe.num_experts - 1})" if ep != moe.ep_size else ""
        rows.append((f"dynamic {method}", cfg.replace(moe=dataclasses.replace(
            moe, method=method, dynamic=True, top_k=dyn_k, ep_size=ep, backend="auto")), note))
    return rows


def row_for(label: str, cfg: ModelConfig, dense_train: float, tokens: int, accumulation: int, vocab,
            bytes_per_element: int, note: str = "") -> dict:
    f = flops_per_token(cfg, micro_batch_tokens=tokens, accumulation=accumulation, vocab_size=vocab, backend="deepspeed"
                        if cfg.moe is not None and cfg.moe.method == "smoe" else None)
    p = param_counts(cfg, vocab_size=vocab)
    comps = f["components"]
    row = {"variant": label, "method": cfg.method, "params_total": p["total"], "params_active": p["active"],
           "forward": f["forward"], "train": f["train"], "backward_multiplier": f["backward_multiplier"],
           "overhead_pct": 100.0 * (f["train"] - dense_train) / dense_train,
           "ep_size": cfg.moe.ep_size if cfg.moe else 1,
           "ep_bytes_per_step": ep_bytes_per_step(cfg, tokens, bytes_per_element, accumulation=accumulation),
           "components_train": {k: v["train"] for k, v in comps.items()}, "note": note}
    for part in OVERHEAD_PARTS:
        row[f"{part}_pct"] = 100.0 * comps.get(part, {"train": 0.0})["train"] / dense_train
    if cfg.moe is not None:
        row.update(N=cfg.moe.num_experts, R=cfg.moe.curvature_rank, T=cfg.moe.segment_len)
    return row


def _fmt_count(n: float) -> str:
    if n < 1e6:
        return f"{n / 1e3:,.1f}K"
    return f"{n / 1e6:,.1f}M" if n < 1e9 else f"{n / 1e9:,.2f}B"


def _fmt_flops(n: float) -> str:
    return f"{n / 1e6:,.1f}" if n >= 1e7 else f"{n / 1e6:,.4f}"


def _fmt_bytes(n: float) -> str:
    return "0" if n == 0 else f"{n / 2 ** 20:,.1f}"


def markdown_table(header: list, rows: list) -> str:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def comparison(cfg: ModelConfig, tokens: int, accumulation: int, vocab, bytes_per_element: int) -> list[dict]:
    dense_train = flops_per_token(cfg.replace(moe=None), micro_batch_tokens=tokens, vocab_size=vocab)["train"]
    return [row_for(label, c, dense_train, tokens, accumulation, vocab, bytes_per_element, note)
            for label, c, note in variants(cfg)]


def comparison_table(rows: list[dict]) -> str:
    header = ["variant", "params total", "active", "fwd MFLOP/tok", "train MFLOP/tok", "vs dense",
              "router", "merge", "curvature", "dynamic", "EP MiB/step"]
    body = []
    for r in rows:
        body.append([r["variant"] + (f" [{r['note']}]" if r["note"] else ""), _fmt_count(r["params_total"]),
                     _fmt_count(r["params_active"]), _fmt_flops(r["forward"]), _fmt_flops(r["train"]),
                     f"{r['overhead_pct']:+.1f}%", *(f"{r[p + '_pct']:.2f}%" for p in OVERHEAD_PARTS),
                     _fmt_bytes(r["ep_bytes_per_step"])])
    return markdown_table(header, body)


def parse_sweep(spec: str) -> tuple[str, list[int]]:
    key, _, values = spec.partition("=")
    if key not in SWEEP_KEYS or not values:
        raise ConfigError(f"--sweep {spec!r} is invalid: expected KEY=v1,v2,... with KEY one of "
                          f"{', '.join(SWEEP_KEYS)}")
    try:
        vals = [int(v) for v in values.split(",")]
    except ValueError:
        raise ConfigError(f"--sweep {spec!r} is invalid: values must be integers") from None
    return key, vals


def sweep(cfg: ModelConfig, key: str, values: list[int], tokens: int, accumulation: int, vocab,
          bytes_per_element: int) -> list[dict]:
    """One row per value of `key`: the static merge variant (the config's merge method, or camex) and its
    dynamic twin, with their router/merge/curvature/dynamic costs as % of the dense train FLOPs."""
    moe = _base_moe(cfg)
    method = moe.method if moe.method in MERGE_METHODS else "camex"
    rows = []
    dense_train = None
    for value in values:
        toks, accum, changes = tokens, accumulation, {}
        if key == "tokens":
            toks = value
        elif key == "accum":
            accum = value
        else:
            changes[SWEEP_KEYS[key]] = value
        dense = flops_per_token(cfg.replace(moe=None), micro_batch_tokens=toks, vocab_size=vocab)["train"]
        row = {key: value}
        for tag, dyn in (("static", False), ("dynamic", True)):
            try:
                c = cfg.replace(moe=dataclasses.replace(moe, method=method, dynamic=dyn, backend="auto",
                                                        top_k=None, **changes))
                row[tag] = row_for(tag, c, dense, toks, accum, vocab, bytes_per_element)
            except ConfigError as e:
                row[tag] = {"error": str(e)}
        rows.append(row)
        dense_train = dense
    return rows, method, dense_train


def sweep_table(rows: list[dict], key: str) -> str:
    header = [key, "static: merge", "curv", "total vs dense", "dynamic: merge", "curv", "dyn", "total vs dense",
              "EP MiB/step static / dyn"]
    body = []
    for row in rows:
        cells = [row[key]]
        for tag, parts in (("static", ("merge", "curvature")), ("dynamic", ("merge", "curvature", "dynamic"))):
            r = row[tag]
            if "error" in r:
                cells += ["n/a"] * (len(parts) + 1)
            else:
                cells += [f"{r[p + '_pct']:.2f}%" for p in parts] + [f"{r['overhead_pct']:+.2f}%"]
        eps = [("n/a" if "error" in row[t] else _fmt_bytes(row[t]["ep_bytes_per_step"])) for t in ("static", "dynamic")]
        cells.append(" / ".join(eps))
        body.append(cells)
    return markdown_table(header, body)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_config", required=True,
                   help="model config: a JSON file (as launcher/pretrain.py takes) or the JSON object inline")
    p.add_argument("--seq_len", type=int, default=None, help="sequence length (default: the config's seq_len)")
    p.add_argument("--micro_batch_tokens", type=int, default=None,
                   help="tokens one rank runs through one forward pass, micro-batch x seq_len (default: seq_len, "
                        "one sequence); sets the SMoE capacity and the segments per forward")
    p.add_argument("--accumulation", type=int, default=1,
                   help="gradient_accumulation_steps: training computes the curvature once per optimizer step, "
                        "over micro_batch_tokens x accumulation tokens (default: %(default)s)")
    p.add_argument("--vocab_size", type=int, default=None,
                   help="vocabulary size (the LM head's FLOPs and the embeddings); overrides the config's. Without "
                        f"it, --tokenizer or a vocab_size in the config, {DEFAULT_VOCAB} (launcher/pretrain.py's "
                        "default tokenizer) is used and said so")
    p.add_argument("--tokenizer", default=None, help="take vocab_size from this tokenizer (SentencePiece model, or "
                                                      "a Hugging Face tokenizer.json or its folder)")
    p.add_argument("--bytes_per_element", type=int, default=4, help="bytes per element for EP traffic (default 4)")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=v1,v2,...",
                   help="also tabulate merge/curvature/dynamic costs while varying one of "
                        + ", ".join(f"{k} ({v})" for k, v in SWEEP_KEYS.items()) + "; repeatable")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    m = p.add_argument_group("memory (--memory)")
    m.add_argument("--memory", action="store_true", help="predict per-rank memory instead of FLOPs")
    m.add_argument("--deepspeed_config", default=None,
                   help="DeepSpeed JSON: its ZeRO stage, bf16, offload_optimizer, reduce_bucket_size, overlap_comm, "
                        "micro-batch and accumulation (the flags below override)")
    m.add_argument("--micro_batch", type=int, default=None, help="sequences per rank per forward (default 1)")
    m.add_argument("--world_size", type=int, default=1, help="ranks in the job (default 1)")
    m.add_argument("--ep_size", type=int, default=None, help="expert-parallel size (default: the config's)")
    m.add_argument("--zero_stage", type=int, choices=(0, 1, 2), default=None)
    m.add_argument("--bf16", action="store_true", default=None)
    m.add_argument("--offload", action="store_true", default=None, help="optimizer offloaded to the CPU")
    m.add_argument("--checkpoint_every", type=int, default=None,
                   help="activation checkpointing: every k-th block recomputed (default: none)")
    m.add_argument("--memory_gib", type=float, default=None, help="also find the largest micro-batch that fits")
    m.add_argument("--cpu", action="store_true", help="size the merge chunks as on a CPU (default: a GPU)")
    return p


def memory_options(args) -> dict:
    """`analysis.memory.memory`'s options from --deepspeed_config, overridden by the flags."""
    ds = read_json_object(args.deepspeed_config, "--deepspeed_config") if args.deepspeed_config else {}
    zero = ds.get("zero_optimization", {})
    options = {"zero_stage": zero.get("stage", 0), "bf16": bool(ds.get("bf16", {}).get("enabled")),
               "offload": zero.get("offload_optimizer", {}).get("device", "none") != "none",
               "reduce_bucket_size": int(zero.get("reduce_bucket_size", DEFAULT_BUCKET)),
               "overlap_comm": bool(zero.get("overlap_comm", False)),
               "micro_batch": ds.get("train_micro_batch_size_per_gpu", 1),
               "accumulation": ds.get("gradient_accumulation_steps", args.accumulation)}
    for name in ("zero_stage", "bf16", "offload", "micro_batch"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    options.update(world_size=args.world_size, checkpoint_every=args.checkpoint_every, gpu=not args.cpu)
    return options


def memory_report(cfg: ModelConfig, args) -> int:
    """`--memory`: the parts and peak of `analysis.memory.memory`, as a table or JSON."""
    if args.ep_size is not None:
        cfg = cfg.with_moe(ep_size=args.ep_size)
    options = memory_options(args)
    result = memory(cfg, **options)
    if args.memory_gib is not None:
        options.pop("micro_batch")
        result["largest_micro_batch"] = largest_micro_batch(cfg, args.memory_gib * 2 ** 30, **options)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    rows = [[name, _fmt_bytes(value)] for name, value in result["parts"].items()]
    rows += [["peak", _fmt_bytes(result["peak"])]]
    print(markdown_table(["per rank", "MiB"], rows))
    if result["cpu_optimizer_states"]:
        print(f"optimizer states on the CPU: {_fmt_bytes(result['cpu_optimizer_states'])}")
    if "largest_micro_batch" in result:
        print(f"largest micro-batch in {args.memory_gib} GiB: {result['largest_micro_batch']}")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.model_config)
        if args.seq_len is not None:
            if args.seq_len < 1:
                raise ConfigError(f"--seq_len={args.seq_len} is invalid: expected an integer >= 1")
            cfg = cfg.replace(seq_len=args.seq_len)
        vocab_note = ""
        if args.tokenizer is not None:
            try:
                cfg = cfg.replace(vocab_size=Tokenizer.load(args.tokenizer).vocab_size)
            except ValueError as e:  # DataError
                raise ConfigError(f"--tokenizer: {e}") from None
        if args.vocab_size is not None:
            cfg = cfg.replace(vocab_size=args.vocab_size)
        if cfg.vocab_size is None:
            cfg = cfg.replace(vocab_size=DEFAULT_VOCAB)
            vocab_note = f" (not in the config: launcher default {DEFAULT_VOCAB}; set --vocab_size)"
        if args.memory:
            return memory_report(cfg, args)
        tokens = args.micro_batch_tokens if args.micro_batch_tokens is not None else cfg.seq_len
        sweeps = [parse_sweep(s) for s in args.sweep]
        rows = comparison(cfg, tokens, args.accumulation, None, args.bytes_per_element)
        sweep_results = [(key, *sweep(cfg, key, vals, tokens, args.accumulation, None, args.bytes_per_element))
                         for key, vals in sweeps]
    except ConfigError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        out = {"config": cfg.to_dict(), "seq_len": cfg.seq_len, "micro_batch_tokens": tokens,
               "accumulation": args.accumulation,
               "vocab_size_assumed": bool(vocab_note), "variants": rows,
               "sweeps": [{"key": key, "method": method, "rows": srows} for key, srows, method, _ in sweep_results]}
        print(json.dumps(out, indent=2))
        return 0
    moe = _base_moe(cfg)
    print(f"d_model={cfg.d_model} n_layers={cfg.n_layers} ffn_hidden={cfg.ffn_hidden_size} "
          f"activation={cfg.activation} vocab={cfg.vocab_size}{vocab_note} seq_len={cfg.seq_len} micro_batch_tokens={tokens} "
          f"accumulation={args.accumulation} "
          f"| MoE: N={moe.num_experts} every={moe.every} T={moe.segment_len} R={moe.curvature_rank} "
          f"ep={moe.ep_size}")
    print()
    print(comparison_table(rows))
    print()
    print("FLOPs: matmul FLOPs per token (2mnk). router/merge/curvature/dynamic: that component's train FLOPs "
          "as % of the dense variant's train FLOPs. EP: bytes one rank sends per optimizer step.")
    for key, srows, method, _ in sweep_results:
        print()
        print(f"Sweep over {key} ({SWEEP_KEYS[key]}), method {method}:")
        print()
        print(sweep_table(srows, key))
    return 0

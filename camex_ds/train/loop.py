"""The pretraining job: data, model, DeepSpeed engine, loop, evaluation, checkpoints, metrics.

`run(TrainArgs)` is what `launcher/pretrain.py` calls, on every rank. Inputs are validated before any
process group exists, so bad input fails fast with one line; after that every rank does the same work.
"""
from __future__ import annotations

import copy
import json
import math
import os
import signal
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch

from .. import parallel
from ..config import ConfigError, ModelConfig, TrainArgs
from ..flops import flops_per_token, peak_flops
from ..data import BatchLoader, DataError, bits_per_byte, prepare_data, validation_batches
from ..model import GPT, save_config
from ..moe import MicroBatch
from ..moe.comm import TRAFFIC
from ..moe.token_moe import resolve_backend
from . import checkpoint
from .checkpoint import CheckpointError
from .metrics import MetricsLogger, layer_stats

DEFAULT_MODEL = {
    "d_model": 128, "n_layers": 4, "n_heads": 4, "ffn_hidden_size": 512, "seq_len": 256, "activation": "gelu",
    "moe": {"method": "camex", "num_experts": 4, "every": 2, "segment_len": 64, "routing": "causal",
            "curvature_rank": 1, "alpha": 1.0, "ep_size": 1, "dynamic": False},
}


def load_model_config(args: TrainArgs) -> ModelConfig:
    """--model_config, else the --init_from model's own config, else the small default CAMEx model."""
    if args.model_config is None and args.init_from:
        from ..pretrained import read_config

        cfg = read_config(args.init_from)[0]
    else:
        raw = DEFAULT_MODEL if args.model_config is None else _read_json(args.model_config, "--model_config")
        cfg = ModelConfig.from_dict(copy.deepcopy(raw))
    if args.ep_size is not None:
        if cfg.moe is None:
            raise ConfigError(f"--ep_size={args.ep_size} given, but the model is dense (moe is null)")
        cfg = cfg.with_moe(ep_size=args.ep_size)
    return cfg


def _read_json(path: str, flag: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"{flag}: file '{path}' does not exist")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{flag}: '{path}' is not valid JSON ({e})") from None


def deepspeed_config(args: TrainArgs) -> dict:
    """The user's DeepSpeed JSON with our run's facts filled in where it says "auto"."""
    ds = _read_json(args.deepspeed_config, "--deepspeed_config")
    zero = ds.get("zero_optimization", {}).get("stage", 0)
    if zero not in (0, 1, 2):
        raise ConfigError(f"zero_optimization.stage={zero} is not supported: MoE merge layers need ZeRO stage 0, "
                          "1 or 2 (stage 3 partitions the expert parameters the merge reads whole)")
    if ds.get("fp16", {}).get("enabled"):
        raise ConfigError("fp16 is not supported: use bf16 (\"bf16\": {\"enabled\": true}) or fp32")
    sched = ds.get("scheduler", {}).get("params", {})
    if sched.get("total_num_steps") == "auto":
        sched["total_num_steps"] = args.max_steps
    if sched.get("warmup_num_steps") == "auto":
        sched["warmup_num_steps"] = max(1, min(100, args.max_steps // 10))
    tb = ds.get("tensorboard")
    if tb and tb.get("output_path") in (None, "auto"):
        tb["output_path"] = str(Path(args.output_dir) / "tensorboard")
    ds.setdefault("steps_per_print", 10 ** 9)
    return ds


def validate(args: TrainArgs) -> tuple[ModelConfig, dict]:
    """Everything checkable before processes talk: configs, flags, the resume point."""
    for name in ("max_steps", "eval_interval", "save_interval", "log_interval", "eval_batches"):
        value = getattr(args, name)
        if value < 1:
            raise ConfigError(f"--{name}={value} is invalid: expected an integer >= 1")
    if not args.dist_timeout > 0:
        raise ConfigError(f"--dist_timeout={args.dist_timeout} is invalid: expected a number of seconds > 0")
    cfg = load_model_config(args)
    ds = deepspeed_config(args)
    if cfg.method == "smoe":  # settled here, from the run's precision, and recorded in model_config.json
        bf16 = bool(ds.get("bf16", {}).get("enabled"))
        cfg = cfg.with_moe(backend=resolve_backend(cfg.moe.backend, cfg.moe.ep_size, bf16, cfg.ffn_bias))
    if args.resume and checkpoint.latest_tag(Path(args.output_dir) / "checkpoints") is None:
        raise CheckpointError(f"--resume: no checkpoint in {Path(args.output_dir) / 'checkpoints'} "
                              "(no complete 'latest'); run without --resume to start fresh")
    return cfg, ds


def _param_groups(model: torch.nn.Module) -> list:
    """Weight decay on matrices only: not on norms, and not on curvature factors (it would pull them to 0, not I)."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and ".curvature." not in name else no_decay).append(p)
    groups = [{"params": decay, "name": "decay"}, {"params": no_decay, "name": "no_decay", "weight_decay": 0.0}]
    return split_params_into_different_moe_groups_for_optimizer(groups)


def micro_batch_of(engine) -> MicroBatch:
    """Where the engine's next forward sits in its optimizer step, by DeepSpeed's own accumulation counters."""
    return MicroBatch(step=engine.global_steps, last=engine.is_gradient_accumulation_boundary(),
                      accumulation=engine.gradient_accumulation_steps())


class _StopFlag:
    """SIGTERM/SIGINT ask for a checkpoint at the next step boundary instead of losing the work."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.requested = True

    def agreed(self) -> bool:
        return parallel.all_reduce_mean([float(self.requested)])[0] > 0


def _peak(args: TrainArgs, ds_config: dict) -> Optional[float]:
    """Peak FLOP/s for MFU: --peak_tflops, else the GPU datasheet table, else a CPU matmul probe."""
    dtype = "bf16" if ds_config.get("bf16", {}).get("enabled") else "fp32"
    override = None if args.peak_tflops is None else args.peak_tflops * 1e12
    try:
        return peak_flops(dtype=dtype, override=override)
    except ValueError as e:
        print(f"warning: no MFU reported ({e})")
        return None


def _flops_row(tokens: int, tokens_per_s: float, flops_per_token_train: float, peak: Optional[float]) -> dict:
    """Cumulative training FLOPs, achieved FLOP/s of the whole job, and MFU against every rank's peak."""
    row = {"train_flops": tokens * flops_per_token_train, "flops_per_token": flops_per_token_train,
           "achieved_flops_per_s": tokens_per_s * flops_per_token_train}
    if peak:
        row["mfu"] = row["achieved_flops_per_s"] / (peak * parallel.world_size())
    return row


def _inject_fault(step: int) -> None:
    """Crash-safety tests: `CAMEX_DS_KILL_AFTER_SAVE=<step>` SIGKILLs this process right after that checkpoint."""
    if os.environ.get("CAMEX_DS_KILL_AFTER_SAVE") == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


@torch.no_grad()
def evaluate(model, val, seq_len: int, batch_size: int, max_batches: Optional[int], device="cpu") -> dict:
    """Mean next-token loss over a fixed set of validation windows, sharded over ranks, exact in total.

    `model` is a DeepSpeed engine or a plain `GPT`; `max_batches=None` evaluates the whole split.
    """
    was_training = model.training
    model.eval()
    batches = list(validation_batches(val, seq_len, batch_size, max_batches))
    if not batches:
        raise DataError(f"the validation split ({val.num_tokens} tokens) is shorter than one sequence of "
                        f"{seq_len + 1} tokens: use more data or a smaller seq_len")
    world, rank = parallel.world_size(), parallel.rank()
    loss_sum, tokens = 0.0, 0
    # Every rank runs the same number of forwards (expert-parallel layers communicate in each one);
    # a rank past the end repeats batch 0 and does not count it.
    for j in range(math.ceil(len(batches) / world)):
        index = j * world + rank
        x, y = batches[index if index < len(batches) else 0]
        out = model(x.to(device), labels=y.to(device))
        if index < len(batches):
            loss_sum += float(out.loss) * y.numel()
            tokens += y.numel()
    model.train(was_training)
    loss_sum, tokens = (v * parallel.world_size() for v in parallel.all_reduce_mean([loss_sum, float(tokens)]))
    loss = loss_sum / tokens
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)),
            "val_bpb": bits_per_byte(loss, val.num_tokens, val.num_bytes)}


def run(args: TrainArgs) -> dict:
    import deepspeed

    cfg, ds_config = validate(args)
    out_dir, ckpt_dir = Path(args.output_dir), Path(args.output_dir) / "checkpoints"
    parallel.init_distributed(args.dist_timeout)
    rank, world = parallel.rank(), parallel.world_size()
    is_main = rank == 0
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    cache = args.cache_dir or os.environ.get("CAMEX_DS_CACHE", str(Path.home() / ".cache" / "camex_ds"))
    tokenizer = args.tokenizer
    if tokenizer is None and args.init_from:  # a pretrained model continues on its own token ids
        from ..pretrained import find_tokenizer

        tokenizer = find_tokenizer(args.init_from)
    prepared = prepare_data(args.data, tokenizer, cache, vocab_size=args.vocab_size,
                            progress=is_main and args.progress)
    if cfg.vocab_size is None:
        cfg = cfg.replace(vocab_size=prepared.vocab_size)
    elif cfg.vocab_size < prepared.vocab_size:
        raise ConfigError(f"vocab_size={cfg.vocab_size} is smaller than the tokenizer's {prepared.vocab_size}")

    torch.manual_seed(args.seed)  # the same initial model on every rank, whatever the EP layout
    model = GPT(cfg)
    if args.compile:
        model.compile_blocks()
    if args.init_from and not args.resume:
        from ..pretrained import load_state_into

        load_state_into(model, args.init_from)  # each EP rank takes its own experts
    engine, _, _, scheduler = deepspeed.initialize(model=model, model_parameters=_param_groups(model),
                                                   config=ds_config)
    torch.manual_seed(args.seed + 1000 * rank)  # routing noise and DARE masks differ across ranks
    micro, accum = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
    loader = BatchLoader(prepared.split("train"), cfg.seq_len, micro, rank, world, seed=args.data_seed)
    val = prepared.split("validation")
    step = 0
    if args.resume:
        client = checkpoint.load(engine, ckpt_dir)
        step = int(client["step"])
        loader.load_state_dict(client["data"])
    if is_main:
        save_config(cfg, out_dir / "model_config.json")
        (out_dir / "train_args.json").write_text(json.dumps({**asdict(args), "prepared_data": str(prepared.path)},
                                                            indent=2))
        (out_dir / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=2))

    tokens_per_step = micro * accum * world * cfg.seq_len
    train_flops_per_token = flops_per_token(cfg, cfg.seq_len, micro * cfg.seq_len, accumulation=accum)["train"]
    peak = _peak(args, ds_config) if is_main else None
    logger = MetricsLogger(out_dir, engine, is_main, is_main and args.progress, args.max_steps, step)
    stop = _StopFlag()
    window_loss, window_aux, window_steps = 0.0, 0.0, 0
    window_start, window_bytes = time.perf_counter(), TRAFFIC["bytes_sent"]
    run_tokens, run_time = 0, 0.0
    last_train_loss, last_eval = float("nan"), None

    def save():
        checkpoint.save(engine, ckpt_dir, step, {"step": step, "data": loader.state_dict(),
                                                 "model_config": cfg.to_dict()})

    while step < args.max_steps:
        for _ in range(accum):
            x, y = next(loader)
            out = engine(x.to(engine.device), labels=y.to(engine.device), micro_batch=micro_batch_of(engine))
            engine.backward(out.loss + out.aux_loss)
            engine.step()
            # summed on the device: reading a loss every micro-batch would stall the host on the GPU each time
            window_loss = window_loss + out.loss.detach().float() / accum
            window_aux = window_aux + out.aux_loss.detach().float() / accum
        step += 1
        window_steps += 1
        if step % args.log_interval == 0 or step == args.max_steps:
            elapsed = time.perf_counter() - window_start
            loss, aux = parallel.all_reduce_mean([float(window_loss) / window_steps, float(window_aux) / window_steps])
            tokens_per_s = tokens_per_step * window_steps / elapsed
            run_tokens, run_time = run_tokens + tokens_per_step * window_steps, run_time + elapsed
            last_train_loss = loss
            row = {"step": step, "loss": loss, "aux_loss": aux, "lr": scheduler.get_last_lr()[0]
                   if scheduler else engine.get_lr()[0], "tokens_per_s": tokens_per_s, "tokens": step * tokens_per_step,
                   "step_time_s": elapsed / window_steps,
                   "ep_bytes_sent_per_step": (TRAFFIC["bytes_sent"] - window_bytes) / window_steps,
                   **_flops_row(step * tokens_per_step, tokens_per_s, train_flops_per_token, peak)}
            logger.log(row, {"perplexity": math.exp(min(loss, 50.0)), **layer_stats(model)})
            logger.advance(step, {"loss": f"{loss:.3f}", "tok/s": f"{tokens_per_s:.0f}"})
            window_loss, window_aux, window_steps = 0.0, 0.0, 0
            window_start, window_bytes = time.perf_counter(), TRAFFIC["bytes_sent"]
        if step % args.eval_interval == 0 or step == args.max_steps:
            last_eval = evaluate(engine, val, cfg.seq_len, micro, args.eval_batches, engine.device)
            logger.log({"step": step, **last_eval, "tokens": step * tokens_per_step,
                        "train_flops": step * tokens_per_step * train_flops_per_token})
            window_start, window_bytes = time.perf_counter(), TRAFFIC["bytes_sent"]
        if step % args.save_interval == 0 or step == args.max_steps:
            save()
            _inject_fault(step)
            window_start, window_bytes = time.perf_counter(), TRAFFIC["bytes_sent"]
        if step == args.stop_at_step and step < args.max_steps:
            if step % args.save_interval:
                save()
            logger.close()
            return {"step": step, "stopped": True, "rank": rank}
        # every rank must agree, which is a collective and a host sync: asked at log steps only
        if step % args.log_interval == 0 and stop.agreed() and step < args.max_steps:
            save()
            logger.close()
            raise KeyboardInterrupt(f"stopped by signal at step {step}; checkpoint saved, resume with --resume")

    run_tokens_per_s = run_tokens / run_time if run_time else float("nan")
    final = {"step": step, "train_loss": last_train_loss, **(last_eval or {}), "tokens_per_s": run_tokens_per_s,
             **_flops_row(step * tokens_per_step, run_tokens_per_s, train_flops_per_token, peak),
             "parameters": sum(p.numel() for p in model.parameters()), "method": cfg.method, "world_size": world,
             "rank": rank}
    logger.close()
    if is_main:
        (out_dir / "final_metrics.json").write_text(json.dumps(final, indent=2))
    return final

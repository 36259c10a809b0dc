"""The pretraining job: data, model, DeepSpeed engine, the step loop, evaluation, checkpoints and metrics.

`run(TrainArgs)` is what `launcher/pretrain.py` calls, on every rank. Flags and configs are validated
before any process group exists (`configs`); what needs the job (the world size, DeepSpeed's reading of its
config, the data, the resume point) is checked before the first step; `run_dir` keeps the output folder to this
one run. Every check fails on every rank alike, with one line that says what to change; after that every rank
does the same work. A step whose loss or gradient norm is NaN or Inf never changes the weights or the optimizer
state (`guard`).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .. import parallel
from ..config import ConfigError, ModelConfig
from ..run_args import TrainArgs
from ..analysis.flops import flops_per_token
from ..data import BatchLoader
from ..model import GPT, apply_lr_scales, param_groups, save_config
from . import checkpoint, peers, run_dir
from .configs import deepspeed_batch, reason, validate
from .evaluate import evaluate
from .guard import StopFlag, agree_bad_step, held, stop_or_skip
from .metrics import MetricsLogger, flops_row, layer_means, layer_stats, mfu_peak
from .splits import check_same_run, prepare_splits


def optimizer_step(engine, loader, accum: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """One optimizer step of `accum` micro-batches: its mean loss and aux loss (on the device), and whether it was
    bad on any rank (kept from changing the weights, see `guard`)."""
    skipped_before = engine.skipped_steps
    # summed on the device: reading a loss every micro-batch would stall the host on the GPU each time
    step_loss = step_aux = torch.zeros((), device=engine.device)
    plans = None
    for _ in range(accum):
        x, y = next(loader)
        if plans is None:  # the step's first micro-batch: its work from parameters alone, once for the step
            plans = engine.module.merge_plans(*x.shape, accum)
        view = plans.for_micro_batch(last=engine.is_gradient_accumulation_boundary())  # DeepSpeed's own counter
        out = engine(x.to(engine.device), labels=y.to(engine.device), plans=view)
        step_loss = step_loss + out.loss.detach().float() / accum
        step_aux = step_aux + out.aux_loss.detach().float() / accum
        engine.backward(out.loss + out.aux_loss)
        # one host read per optimizer step: whether any rank's step is bad (NaN/Inf propagates through the sums)
        bad = engine.is_gradient_accumulation_boundary() and agree_bad_step(
            engine, ~torch.isfinite(step_loss + step_aux))
        with held(engine.optimizer, bad):
            engine.step()
    return step_loss, step_aux, bad or engine.skipped_steps > skipped_before


class _Window:
    """What the loop sums between two log rows: the good steps' losses, the steps, wall time and EP bytes sent."""

    def __init__(self, model: GPT):
        self.model = model
        self.reset()

    def reset(self) -> None:
        self.loss, self.aux, self.good, self.steps = 0.0, 0.0, 0, 0
        self.restart_clock()

    def mean_losses(self) -> tuple[float, float]:
        """The good steps' mean loss and aux loss, averaged over ranks (NaN if every step was skipped)."""
        if not self.good:
            return float("nan"), float("nan")
        loss, aux = parallel.all_reduce_mean([float(self.loss) / self.good, float(self.aux) / self.good])
        return loss, aux

    def restart_clock(self) -> None:
        """Evaluation and saving are not training: their time and traffic stay out of the next row."""
        self.start, self.bytes = time.perf_counter(), self.model.ep_bytes_sent()


def run(args: TrainArgs) -> dict:
    cfg, ds_config = validate(args)
    parallel.init_distributed(args.dist_timeout)
    with run_dir.claimed(args) as run_id:  # --output_dir is this run's until it ends, however it ends
        return _train(args, cfg, ds_config, run_id)


def _train(args: TrainArgs, cfg: ModelConfig, ds_config: dict, run_id: str) -> dict:
    import deepspeed

    out_dir, ckpt_dir = Path(args.output_dir), Path(args.output_dir) / "checkpoints"
    rank, world = parallel.rank(), parallel.world_size()
    is_main = rank == 0
    if cfg.moe is not None and world % cfg.moe.ep_size:
        raise ConfigError(f"moe.ep_size={cfg.moe.ep_size} does not divide the world size {world}: start a multiple of "
                          f"{cfg.moe.ep_size} ranks (deepspeed --num_gpus {cfg.moe.ep_size} launcher/pretrain.py ...) "
                          "or lower --ep_size")
    micro, accum = deepspeed_batch(args, ds_config)
    prepared, train_split, val, val_windows, data_record = prepare_splits(args, cfg, micro, micro * accum * world,
                                                                          is_main)
    if cfg.vocab_size is None:
        cfg = cfg.replace(vocab_size=prepared.vocab_size)
    elif cfg.vocab_size < prepared.vocab_size:
        raise ConfigError(f"vocab_size={cfg.vocab_size} is smaller than the tokenizer's {prepared.vocab_size}: raise "
                          "it in the model config (or leave it out to take the tokenizer's)")
    run_record = {"model_config": cfg.to_dict(), "data": data_record}

    torch.manual_seed(args.seed)  # the same initial model on every rank, whatever the EP layout
    model = GPT(cfg)
    model.set_activation_checkpointing(args.checkpoint_interval)
    if args.compile:
        model.compile_blocks()
    if args.init_from and not args.resume:
        from ..ckpt.format import load_state_into

        load_state_into(model, args.init_from)  # each EP rank takes its own experts
    try:
        engine, _, _, scheduler = deepspeed.initialize(model=model, model_parameters=param_groups(model),
                                                       config=ds_config)
    except (ValueError, TypeError, KeyError, AssertionError, AttributeError, NotImplementedError) as e:
        raise ConfigError(f"DeepSpeed cannot start with --deepspeed_config '{args.deepspeed_config}': "
                          f"{reason(e)}") from None
    apply_lr_scales(engine.optimizer)  # moe.curvature_lr_scale, whatever the scheduler writes
    peers.record()
    torch.manual_seed(args.seed + 1000 * rank)  # routing noise and DARE masks differ across ranks
    loader = BatchLoader(train_split, cfg.seq_len, micro, rank, world, seed=args.data_seed)
    step, skipped = 0, 0
    if args.resume:
        tag, recorded = checkpoint.resume_tag(ckpt_dir)
        run_id, recorded = run_dir.continued(recorded, run_id)
        if recorded is not None:
            check_same_run(recorded, run_record, tag)
        client = checkpoint.load(engine, ckpt_dir, tag)
        step, skipped = int(client["step"]), int(client.get("skipped_nonfinite", 0))
        loader.load_state_dict(client["data"])
    run_record[run_dir.RUN_ID] = run_id  # after the resume check, which compares model and data only
    if is_main:
        save_config(cfg, out_dir / "model_config.json")
        (out_dir / "train_args.json").write_text(json.dumps({**asdict(args), "prepared_data": str(prepared.path)},
                                                            indent=2))
        (out_dir / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=2))

    tokens_per_step = micro * accum * world * cfg.seq_len
    train_flops_per_token = flops_per_token(cfg, cfg.seq_len, micro * cfg.seq_len, accumulation=accum)["train"]
    peak = mfu_peak(args, ds_config) if is_main else None
    logger = MetricsLogger(out_dir, engine, is_main, is_main and args.progress, args.max_steps, step)
    stop = StopFlag()
    window = _Window(model)
    run_tokens, run_time = 0, 0.0
    last_train_loss, last_eval, diagnostics = float("nan"), None, {}

    def save():
        checkpoint.save(engine, ckpt_dir, step, {"step": step, "data": loader.state_dict(),
                                                 "model_config": cfg.to_dict(), "skipped_nonfinite": skipped},
                        run_record, args.keep_checkpoints)

    try:
        while step < args.max_steps:
            step_loss, step_aux, bad = optimizer_step(engine, loader, accum)
            step += 1
            window.steps += 1
            if bad:
                skipped += 1
                stop_or_skip(step, float(step_loss), skipped, args.skip_nonfinite, ckpt_dir)
            else:
                window.loss, window.aux, window.good = window.loss + step_loss, window.aux + step_aux, window.good + 1
            if step % args.log_interval == 0 or step == args.max_steps:
                elapsed = time.perf_counter() - window.start
                loss, aux = window.mean_losses()
                tokens_per_s = tokens_per_step * window.steps / elapsed
                run_tokens, run_time = run_tokens + tokens_per_step * window.steps, run_time + elapsed
                last_train_loss = loss
                stats = layer_stats(model)  # every rank: averaged over them
                diagnostics = layer_means(stats)
                row = {"step": step, "loss": loss, "aux_loss": aux, "lr": scheduler.get_last_lr()[0]
                       if scheduler else engine.get_lr()[0], "tokens_per_s": tokens_per_s,
                       "tokens": step * tokens_per_step, "step_time_s": elapsed / window.steps,
                       "ep_bytes_sent_per_step": (model.ep_bytes_sent() - window.bytes) / window.steps,
                       "skipped_steps": skipped, **diagnostics,
                       **flops_row(step * tokens_per_step, tokens_per_s, train_flops_per_token, peak),
                       **stats}  # per-layer router and curvature values: the report's curves
                logger.log(row, {"perplexity": math.exp(min(loss, 50.0))})
                logger.advance(step, {"loss": f"{loss:.3f}", "tok/s": f"{tokens_per_s:.0f}"})
                window.reset()
            if step % args.eval_interval == 0 or step == args.max_steps:
                last_eval = evaluate(engine, val, cfg.seq_len, micro, val_windows, engine.device)
                logger.log({"step": step, **last_eval, "tokens": step * tokens_per_step,
                            "train_flops": step * tokens_per_step * train_flops_per_token})
                window.restart_clock()
            if step % args.save_interval == 0 or step == args.max_steps:
                save()
                window.restart_clock()
            if step == args.stop_at_step and step < args.max_steps:
                if step % args.save_interval:
                    save()
                return {"step": step, "stopped": True, "rank": rank}
            # every rank must agree, which is a collective and a host sync: asked at log steps only
            if step % args.log_interval == 0 and stop.agreed() and step < args.max_steps:
                save()
                raise KeyboardInterrupt(f"stopped by signal at step {step}; checkpoint saved, resume with --resume")
    finally:
        stop.restore()
        logger.close()

    run_tokens_per_s = run_tokens / run_time if run_time else float("nan")
    final = {"step": step, "train_loss": last_train_loss, **(last_eval or {}), "tokens_per_s": run_tokens_per_s,
             **flops_row(step * tokens_per_step, run_tokens_per_s, train_flops_per_token, peak),
             "parameters": sum(p.numel() for p in model.parameters()), "method": cfg.method, "world_size": world,
             "skipped_steps": skipped, **diagnostics, "rank": rank}
    if is_main:
        (out_dir / "final_metrics.json").write_text(json.dumps(final, indent=2))
    return final

"""The pretraining job: data, model, DeepSpeed engine, loop, evaluation, checkpoints, metrics.

`run(TrainArgs)` is what `launcher/pretrain.py` calls, on every rank. Flags and configs are validated
before any process group exists; what needs the job (the world size, DeepSpeed's reading of its config,
the data, the resume point) is checked before the first step. Every check fails on every rank alike, with
one line that says what to change; after that every rank does the same work.

A step whose loss or gradient norm is NaN or Inf never changes the weights or the optimizer state
(`_agree_bad_step`, `_held`); it stops the run, or is skipped while `--skip_nonfinite` allows.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import signal
import socket
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch

from .. import parallel
from ..config import ConfigError, ModelConfig, TrainArgs, default_model
from ..analysis.flops import flops_per_token
from ..analysis.hardware import peak_flops
from ..data import BatchLoader, DataError, bits_per_byte, prepare_data, validation_batches
from ..model import GPT, param_groups, save_config
from ..moe import MicroBatch
from ..moe.comm import TRAFFIC
from ..moe.token_moe import resolve_backend
from . import checkpoint, manifest, peers
from .checkpoint import CheckpointError
from .metrics import MetricsLogger, layer_stats

class NonFiniteError(RuntimeError):
    """A step's loss or gradient norm was NaN or Inf, and no more such steps may be skipped."""


def load_model_config(args: TrainArgs) -> ModelConfig:
    """--model_config, else the --init_from model's own config, else the small default CAMEx model."""
    if args.model_config is None and args.init_from:
        from ..pretrained import read_config

        cfg = read_config(args.init_from)[0]
    else:
        raw = default_model() if args.model_config is None else _read_json(args.model_config, "--model_config")
        cfg = ModelConfig.from_dict(raw)
    if args.ep_size is not None:
        if cfg.moe is None:
            raise ConfigError(f"--ep_size={args.ep_size} given, but the model is dense (moe is null)")
        cfg = cfg.with_moe(ep_size=args.ep_size)
    return cfg


def _read_json(path: str, flag: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"{flag}: file '{path}' does not exist")
    with open(path, "rb") as f:
        try:
            return json.loads(f.read())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{flag}: '{path}' is not valid JSON ({e})") from None


# Fields DeepSpeed reads without checking their types (it would fail later, or with a message about Python)
_DS_COUNTS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "steps_per_print")
_DS_SECTIONS = ("optimizer", "scheduler", "zero_optimization", "bf16", "fp16", "tensorboard")


def _ds_section(ds: dict, name: str) -> dict:
    section = ds.get(name, {})
    if not isinstance(section, dict):
        raise ConfigError(f"--deepspeed_config: {name}={section!r} is invalid: expected a JSON object")
    return section


def deepspeed_config(args: TrainArgs) -> dict:
    """The user's DeepSpeed JSON with our run's facts filled in where it says "auto"."""
    ds = _read_json(args.deepspeed_config, "--deepspeed_config")
    if not isinstance(ds, dict):
        raise ConfigError(f"--deepspeed_config: '{args.deepspeed_config}' must hold a JSON object")
    for name in _DS_COUNTS:
        value = ds.get(name, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"--deepspeed_config: {name}={value!r} is invalid: expected an integer >= 1")
    clip = ds.get("gradient_clipping", 0.0)
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not 0 <= clip < math.inf:
        raise ConfigError(f"--deepspeed_config: gradient_clipping={clip!r} is invalid: expected a number >= 0")
    for name in _DS_SECTIONS:
        _ds_section(ds, name)
    for name in ("optimizer", "scheduler"):
        section = _ds_section(ds, name)
        if section and not isinstance(section.get("type"), str):
            raise ConfigError(f"--deepspeed_config: {name}.type={section.get('type')!r} is invalid: expected a name "
                              "such as " + ("\"AdamW\"" if name == "optimizer" else "\"WarmupCosineLR\""))
        if not isinstance(section.get("params", {}), dict):
            raise ConfigError(f"--deepspeed_config: {name}.params={section['params']!r} is invalid: expected a JSON "
                              "object")
    zero = _ds_section(ds, "zero_optimization").get("stage", 0)
    if zero not in (0, 1, 2) or isinstance(zero, bool):
        raise ConfigError(f"zero_optimization.stage={zero!r} is not supported: MoE merge layers need ZeRO stage 0, "
                          "1 or 2 (stage 3 partitions the expert parameters the merge reads whole)")
    if _ds_section(ds, "fp16").get("enabled"):
        raise ConfigError("fp16 is not supported: use bf16 (\"bf16\": {\"enabled\": true}) or fp32")
    sched = _ds_section(ds, "scheduler").get("params", {})
    if sched.get("total_num_steps") == "auto":
        sched["total_num_steps"] = args.max_steps
    if sched.get("warmup_num_steps") == "auto":
        sched["warmup_num_steps"] = max(1, min(100, args.max_steps // 10))
    tb = ds.get("tensorboard")
    if tb and tb.get("output_path", "auto") in (None, "auto"):
        tb["output_path"] = str(Path(args.output_dir) / "tensorboard")
    ds.setdefault("steps_per_print", 10 ** 9)
    return ds


def validate(args: TrainArgs) -> tuple[ModelConfig, dict]:
    """Everything checkable before processes talk: flags, configs, the output folder."""
    for name in ("max_steps", "eval_interval", "save_interval", "log_interval", "eval_batches", "stop_at_step",
                 "keep_checkpoints"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name}={value} is invalid: expected an integer >= 1")
    for name in ("seed", "data_seed", "skip_nonfinite"):
        value = getattr(args, name)
        if not 0 <= value < 2 ** 63:
            raise ConfigError(f"--{name}={value} is invalid: expected an integer >= 0")
    if not 0 < args.dist_timeout < math.inf:
        raise ConfigError(f"--dist_timeout={args.dist_timeout} is invalid: expected a number of seconds > 0")
    cfg = load_model_config(args)
    ds = deepspeed_config(args)
    if cfg.method == "smoe":  # settled here, from the run's precision, and recorded in model_config.json
        bf16 = bool(ds.get("bf16", {}).get("enabled"))
        cfg = cfg.with_moe(backend=resolve_backend(cfg.moe.backend, cfg.moe.ep_size, bf16, cfg.ffn_bias))
    _check_writable(Path(args.output_dir))
    if args.resume and not checkpoint.tags(Path(args.output_dir) / "checkpoints"):
        raise CheckpointError(f"--resume: no checkpoint in {Path(args.output_dir) / 'checkpoints'}; run without "
                              "--resume to start fresh")
    return cfg, ds


def _check_writable(out_dir: Path) -> None:
    """Every rank writes checkpoint files: each checks, before any work, that it can."""
    probe = out_dir / f".write-test-{socket.gethostname()}-{os.getpid()}"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--output_dir '{out_dir}' is not writable ({e.strerror or e}): choose another folder") \
            from None


def _reason(e: BaseException) -> str:
    """One line from a library's exception: pydantic's first error with its field, else the first line."""
    if hasattr(e, "errors") and callable(e.errors):
        first = e.errors()[0]
        field = ".".join(map(str, first.get("loc", ()))) or "value"
        return f"{field}: {first.get('msg')} (got {first.get('input')!r})"
    return ((str(e).strip().splitlines() or [type(e).__name__])[0])[:300]


def deepspeed_batch(args: TrainArgs, ds_config: dict) -> tuple[int, int]:
    """`(micro batch, accumulation steps)` as DeepSpeed reads the config for this job's world size.

    Constructing DeepSpeed's own config object validates it (batch sizes against the world size, field
    types), so a bad config fails here, on every rank, before any model is built.
    """
    from deepspeed.runtime.config import DeepSpeedConfig

    try:
        ds = DeepSpeedConfig(copy.deepcopy(ds_config))
    except Exception as e:  # only the user's JSON is read here: whatever fails is about it
        raise ConfigError(f"--deepspeed_config '{args.deepspeed_config}' is not valid for DeepSpeed: {_reason(e)}") \
            from None
    return ds.train_micro_batch_size_per_gpu, ds.gradient_accumulation_steps


def prepare_splits(args: TrainArgs, cfg: ModelConfig, micro: int, is_main: bool) -> tuple:
    """`(prepared data, train split, validation split, data record)`, checked against seq_len and --eval_batches.

    With --val_data the training data are all trained on and the validation split is all of --val_data,
    tokenized with the training data's tokenizer.
    """
    cache = args.cache_dir or os.environ.get("CAMEX_DS_CACHE", str(Path.home() / ".cache" / "camex_ds"))
    tokenizer = args.tokenizer
    if tokenizer is None and args.init_from:  # a pretrained model continues on its own token ids
        from ..pretrained import find_tokenizer

        tokenizer = find_tokenizer(args.init_from)
    prepared = prepare_data(args.data, tokenizer, cache, vocab_size=args.vocab_size,
                            progress=is_main and args.progress, val_percent=0 if args.val_data else 5)
    held_out = prepared if not args.val_data else prepare_data(args.val_data, prepared.tokenizer_path, cache,
                                                               progress=is_main and args.progress, val_percent=100)
    train, val = prepared.split("train"), held_out.split("validation")
    need = cfg.seq_len + 1
    if train.num_windows(cfg.seq_len) == 0:
        raise DataError(f"the training split of '{train.path}' has {train.num_tokens} tokens, fewer than seq_len + 1 "
                        f"= {need}: give more text, or a smaller seq_len")
    windows, wanted = val.num_windows(cfg.seq_len), args.eval_batches * micro
    if windows < wanted:
        fix = (f"lower --eval_batches to {windows // micro} or less, or" if windows >= micro else
               "give a separate validation text (--val_data),")
        raise DataError(f"the validation split of '{val.path}' has {val.num_tokens} tokens, {windows} windows of "
                        f"seq_len + 1 = {need}, fewer than --eval_batches {args.eval_batches} x micro batch {micro} = "
                        f"{wanted}: {fix} give more text, or a smaller seq_len")
    record = {"tokenizer_sha256": prepared.index["tokenizer_sha256"], "data_seed": args.data_seed,
              "train": _split_record(prepared, "train"), "validation": _split_record(held_out, "validation")}
    return prepared, train, val, record


def _split_record(prepared, split: str) -> dict:
    info = prepared.index["splits"][split]
    return {"tokens": info["tokens"], "sha256": info.get("sha256")}


def _check_same_run(recorded: dict, run: dict, tag: str) -> None:
    """A resume must continue the run its checkpoint belongs to: same model config, same data."""
    diff = manifest.differences(recorded, run)
    if diff:
        raise CheckpointError(f"--resume: this run differs from checkpoint {tag}'s in {', '.join(diff)}: resume with "
                              "the settings it was saved with, or start a new --output_dir")


def micro_batch_of(engine) -> MicroBatch:
    """Where the engine's next forward sits in its optimizer step, by DeepSpeed's own accumulation counters."""
    return MicroBatch(step=engine.global_steps, last=engine.is_gradient_accumulation_boundary(),
                      accumulation=engine.gradient_accumulation_steps())


class _StopFlag:
    """SIGTERM/SIGINT ask for a checkpoint at the next step boundary instead of losing the work."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self.previous = {sig: signal.signal(sig, self._handler) for sig in self.SIGNALS}

    def _handler(self, signum, frame):
        self.requested = True

    def agreed(self) -> bool:
        return parallel.all_reduce_mean([float(self.requested)])[0] > 0

    def restore(self) -> None:
        """Give the handlers back (a caller running several jobs in one process keeps its own)."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _plain(optimizer) -> bool:
    """A plain torch optimizer (ZeRO 0, fp32): DeepSpeed's engine finds no `overflow` flag on it, so nothing
    in DeepSpeed checks its gradients. Its own optimizers (ZeRO 1/2, bf16) check the gradient norm and skip a
    non-finite step themselves, counting it in `engine.skipped_steps`."""
    return not hasattr(optimizer, "overflow")


def _agree_bad_step(engine, bad: torch.Tensor) -> bool:
    """At an accumulation boundary, before `engine.step()`: is this step bad on any rank? Bad (`bad`, on the
    device): a non-finite loss in the window, or, for a plain torch optimizer, non-finite gradients (DeepSpeed
    checks the others)."""
    if _plain(engine.optimizer):
        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
        if grads:
            bad = bad | ~torch.nn.utils.get_total_norm(grads).isfinite()
    return parallel.all_reduce_mean([float(bad)])[0] > 0


@contextlib.contextmanager
def _held(optimizer, bad: bool):
    """Around `engine.step()`: a bad step must change nothing. A plain torch optimizer's `step` does nothing for
    this call (the engine drops the gradients after it); DeepSpeed's own optimizers skip it themselves. Either
    way `engine.step()` runs, so DeepSpeed's micro-step and step counters stay in order."""
    if not (bad and _plain(optimizer)):
        yield
        return
    optimizer.step = lambda closure=None: None  # shadows the method for this one call
    try:
        yield
    finally:
        del optimizer.step


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
    if cfg.moe is not None and world % cfg.moe.ep_size:
        raise ConfigError(f"moe.ep_size={cfg.moe.ep_size} does not divide the world size {world}: start a multiple of "
                          f"{cfg.moe.ep_size} ranks (deepspeed --num_gpus {cfg.moe.ep_size} launcher/pretrain.py ...) "
                          "or lower --ep_size")
    micro, accum = deepspeed_batch(args, ds_config)
    prepared, train_split, val, data_record = prepare_splits(args, cfg, micro, is_main)
    if cfg.vocab_size is None:
        cfg = cfg.replace(vocab_size=prepared.vocab_size)
    elif cfg.vocab_size < prepared.vocab_size:
        raise ConfigError(f"vocab_size={cfg.vocab_size} is smaller than the tokenizer's {prepared.vocab_size}: raise "
                          "it in the model config (or leave it out to take the tokenizer's)")
    run_record = {"model_config": cfg.to_dict(), "data": data_record}

    torch.manual_seed(args.seed)  # the same initial model on every rank, whatever the EP layout
    model = GPT(cfg)
    if args.compile:
        model.compile_blocks()
    if args.init_from and not args.resume:
        from ..pretrained import load_state_into

        load_state_into(model, args.init_from)  # each EP rank takes its own experts
    try:
        engine, _, _, scheduler = deepspeed.initialize(model=model, model_parameters=param_groups(model),
                                                       config=ds_config)
    except (ValueError, TypeError, KeyError, AssertionError, AttributeError, NotImplementedError) as e:
        raise ConfigError(f"DeepSpeed cannot start with --deepspeed_config '{args.deepspeed_config}': "
                          f"{_reason(e)}") from None
    peers.record()
    torch.manual_seed(args.seed + 1000 * rank)  # routing noise and DARE masks differ across ranks
    loader = BatchLoader(train_split, cfg.seq_len, micro, rank, world, seed=args.data_seed)
    step, skipped = 0, 0
    if args.resume:
        tag, recorded = checkpoint.resume_tag(ckpt_dir)
        if recorded is not None:
            _check_same_run(recorded, run_record, tag)
        client = checkpoint.load(engine, ckpt_dir, tag)
        step, skipped = int(client["step"]), int(client.get("skipped_nonfinite", 0))
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
    window_loss, window_aux, window_good, window_steps = 0.0, 0.0, 0, 0
    window_start, window_bytes = time.perf_counter(), TRAFFIC["bytes_sent"]
    run_tokens, run_time = 0, 0.0
    last_train_loss, last_eval = float("nan"), None

    def save():
        checkpoint.save(engine, ckpt_dir, step, {"step": step, "data": loader.state_dict(),
                                                 "model_config": cfg.to_dict(), "skipped_nonfinite": skipped},
                        run_record, args.keep_checkpoints)

    try:
        while step < args.max_steps:
            skipped_before = engine.skipped_steps
            # summed on the device: reading a loss every micro-batch would stall the host on the GPU each time
            step_loss = step_aux = torch.zeros((), device=engine.device)
            for _ in range(accum):
                x, y = next(loader)
                out = engine(x.to(engine.device), labels=y.to(engine.device), micro_batch=micro_batch_of(engine))
                step_loss = step_loss + out.loss.detach().float() / accum
                step_aux = step_aux + out.aux_loss.detach().float() / accum
                engine.backward(out.loss + out.aux_loss)
                # one host read per optimizer step: whether any rank's step is bad (NaN/Inf propagates through the sums)
                bad = engine.is_gradient_accumulation_boundary() and _agree_bad_step(
                    engine, ~torch.isfinite(step_loss + step_aux))
                with _held(engine.optimizer, bad):
                    engine.step()
            step += 1
            window_steps += 1
            if bad or engine.skipped_steps > skipped_before:
                skipped += 1
                _nonfinite(step, float(step_loss), skipped, args.skip_nonfinite, ckpt_dir)
            else:
                window_loss, window_aux, window_good = window_loss + step_loss, window_aux + step_aux, window_good + 1
            if step % args.log_interval == 0 or step == args.max_steps:
                elapsed = time.perf_counter() - window_start
                loss, aux = (parallel.all_reduce_mean([float(window_loss) / window_good, float(window_aux) / window_good])
                             if window_good else (float("nan"), float("nan")))
                tokens_per_s = tokens_per_step * window_steps / elapsed
                run_tokens, run_time = run_tokens + tokens_per_step * window_steps, run_time + elapsed
                last_train_loss = loss
                row = {"step": step, "loss": loss, "aux_loss": aux, "lr": scheduler.get_last_lr()[0]
                       if scheduler else engine.get_lr()[0], "tokens_per_s": tokens_per_s,
                       "tokens": step * tokens_per_step, "step_time_s": elapsed / window_steps,
                       "ep_bytes_sent_per_step": (TRAFFIC["bytes_sent"] - window_bytes) / window_steps,
                       "skipped_steps": skipped,
                       **_flops_row(step * tokens_per_step, tokens_per_s, train_flops_per_token, peak)}
                logger.log(row, {"perplexity": math.exp(min(loss, 50.0)), **layer_stats(model)})
                logger.advance(step, {"loss": f"{loss:.3f}", "tok/s": f"{tokens_per_s:.0f}"})
                window_loss, window_aux, window_good, window_steps = 0.0, 0.0, 0, 0
                window_start, window_bytes = time.perf_counter(), TRAFFIC["bytes_sent"]
            if step % args.eval_interval == 0 or step == args.max_steps:
                last_eval = evaluate(engine, val, cfg.seq_len, micro, args.eval_batches, engine.device)
                logger.log({"step": step, **last_eval, "tokens": step * tokens_per_step,
                            "train_flops": step * tokens_per_step * train_flops_per_token})
                window_start, window_bytes = time.perf_counter(), TRAFFIC["bytes_sent"]
            if step % args.save_interval == 0 or step == args.max_steps:
                save()
                window_start, window_bytes = time.perf_counter(), TRAFFIC["bytes_sent"]
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
             **_flops_row(step * tokens_per_step, run_tokens_per_s, train_flops_per_token, peak),
             "parameters": sum(p.numel() for p in model.parameters()), "method": cfg.method, "world_size": world,
             "skipped_steps": skipped, "rank": rank}
    if is_main:
        (out_dir / "final_metrics.json").write_text(json.dumps(final, indent=2))
    return final


def _nonfinite(step: int, loss: float, count: int, allowed: int, ckpt_dir: Path) -> None:
    """A bad step (already kept from changing the weights): stop, or say it was skipped."""
    loss = parallel.all_reduce_mean([loss])[0]
    if count > allowed:
        kept = checkpoint.latest_tag(ckpt_dir) or "none yet"
        raise NonFiniteError(f"step {step}: the loss or gradient norm is not finite (mean loss {loss}); stopped "
                             f"without applying it or saving (newest checkpoint: {kept}): lower the learning rate, "
                             f"or skip up to K such steps with --skip_nonfinite K (now {allowed})")
    if parallel.rank() == 0:
        print(f"warning: step {step}: the loss or gradient norm is not finite (mean loss {loss}); step skipped "
              f"({count} of --skip_nonfinite {allowed})", file=sys.stderr, flush=True)

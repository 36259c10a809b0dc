"""The run's data: the training and validation splits, checked against the model and the evaluation flags, how
many validation windows each evaluation covers, and the record of them that a resume must match."""
from __future__ import annotations

from ..config import ModelConfig
from ..run_args import TrainArgs
from ..data import DataError, cache_dir, prepare_data
from . import manifest
from .checkpoint import CheckpointError


# The default validation set is the whole split, capped so that an evaluation costs at most this share of the
# training between two evaluations. A forward is about a third of a training step's compute (backward: two).
EVAL_TIME_SHARE = 0.1
FORWARD_SHARE = 1 / 3


def prepare_splits(args: TrainArgs, cfg: ModelConfig, micro: int, windows_per_step: int, is_main: bool) -> tuple:
    """`(prepared data, train split, validation split, validation windows, data record)`, checked against
    seq_len and the evaluation flags.

    With --val_data the training data are all trained on and the validation split is all of --val_data,
    tokenized with the training data's tokenizer. `windows_per_step` is the windows one optimizer step trains on
    (micro batch x accumulation x ranks), which sets the default validation cap.
    """
    cache = cache_dir(args.cache_dir)
    tokenizer = args.tokenizer
    if tokenizer is None and args.init_from:  # a pretrained model continues on its own token ids
        from ..ckpt.format import find_tokenizer

        tokenizer = find_tokenizer(args.init_from)
    prepared = prepare_data(args.data, tokenizer, cache, vocab_size=args.vocab_size,
                            progress=is_main and args.progress, val_percent=0 if args.val_data else 5)
    held_out = prepared if not args.val_data else prepare_data(args.val_data, prepared.tokenizer_path, cache,
                                                               progress=is_main and args.progress, val_percent=100)
    train, val = prepared.split("train"), held_out.split("validation")
    if train.num_windows(cfg.seq_len) == 0:
        raise DataError(f"the training split of '{train.path}' has {train.num_tokens} tokens, fewer than seq_len + 1 "
                        f"= {cfg.seq_len + 1}: give more text, or a smaller seq_len")
    windows = eval_windows(args, val, cfg.seq_len, micro, windows_per_step)
    if is_main and args.eval_windows is None and args.eval_batches is None:
        available = val.num_windows(cfg.seq_len)
        which = f"all {windows}" if windows == available else \
            f"the first {windows} of {available} (about {EVAL_TIME_SHARE:.0%} of training time)"
        print(f"validation: {which} windows of the validation split, {windows * cfg.seq_len} tokens, at every "
              "evaluation; --eval_windows sets another number", flush=True)
    record = {"tokenizer_sha256": prepared.index["tokenizer_sha256"], "data_seed": args.data_seed,
              "train": split_record(prepared, "train"), "validation": split_record(held_out, "validation")}
    return prepared, train, val, windows, record


def eval_windows(args: TrainArgs, val, seq_len: int, micro: int, windows_per_step: int) -> int:
    """How many windows of the validation split each evaluation covers: --eval_windows, or --eval_batches x micro
    batch, or by default the whole split up to the cap that keeps an evaluation near `EVAL_TIME_SHARE` of the
    training between two (`eval_interval` steps, or all `max_steps` of a shorter run). The default depends on the tokens per step, not on how they are
    split into micro batches, so runs that differ only in micro batch and accumulation evaluate the same windows.
    An explicit number the split cannot fill is an error naming the number that fits."""
    available, need = val.num_windows(seq_len), seq_len + 1
    where = f"the validation split of '{val.path}' has {val.num_tokens} tokens, {available} windows of seq_len + 1 " \
            f"= {need}"
    if available == 0:
        raise DataError(f"{where}: give a separate validation text (--val_data), give more text, or a smaller seq_len")
    if args.eval_windows is not None:
        if available < args.eval_windows:
            raise DataError(f"{where}, fewer than --eval_windows {args.eval_windows}: lower --eval_windows to "
                            f"{available} or less (or leave it out to evaluate the whole split), give more text, "
                            "or a smaller seq_len")
        return args.eval_windows
    if args.eval_batches is not None:
        wanted = args.eval_batches * micro
        if available < wanted:
            fix = (f"lower --eval_batches to {available // micro} or less, or" if available >= micro else
                   "give a separate validation text (--val_data),")
            raise DataError(f"{where}, fewer than --eval_batches {args.eval_batches} x micro batch {micro} = "
                            f"{wanted}: {fix} leave it out to evaluate the whole split, give more text, or a smaller "
                            "seq_len")
        return wanted
    steps_between = min(args.eval_interval, args.max_steps)
    cap = max(1, round(EVAL_TIME_SHARE / FORWARD_SHARE * steps_between * windows_per_step))
    return min(available, cap)


def split_record(prepared, split: str) -> dict:
    info = prepared.index["splits"][split]
    return {"tokens": info["tokens"], "sha256": info.get("sha256")}


def check_same_run(recorded: dict, run: dict, tag: str) -> None:
    """A resume must continue the run its checkpoint belongs to: same model config, same data."""
    diff = manifest.differences(recorded, run)
    if diff:
        raise CheckpointError(f"--resume: this run differs from checkpoint {tag}'s in {', '.join(diff)}: resume with "
                              "the settings it was saved with, or start a new --output_dir")

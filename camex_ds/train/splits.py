"""The run's data: the training and validation splits, checked against the model and --eval_batches, and the
record of them that a resume must match."""
from __future__ import annotations

from ..config import ModelConfig, TrainArgs
from ..data import DataError, cache_dir, prepare_data
from . import manifest
from .checkpoint import CheckpointError


def prepare_splits(args: TrainArgs, cfg: ModelConfig, micro: int, is_main: bool) -> tuple:
    """`(prepared data, train split, validation split, data record)`, checked against seq_len and --eval_batches.

    With --val_data the training data are all trained on and the validation split is all of --val_data,
    tokenized with the training data's tokenizer.
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
              "train": split_record(prepared, "train"), "validation": split_record(held_out, "validation")}
    return prepared, train, val, record


def split_record(prepared, split: str) -> dict:
    info = prepared.index["splits"][split]
    return {"tokens": info["tokens"], "sha256": info.get("sha256")}


def check_same_run(recorded: dict, run: dict, tag: str) -> None:
    """A resume must continue the run its checkpoint belongs to: same model config, same data."""
    diff = manifest.differences(recorded, run)
    if diff:
        raise CheckpointError(f"--resume: this run differs from checkpoint {tag}'s in {', '.join(diff)}: resume with "
                              "the settings it was saved with, or start a new --output_dir")

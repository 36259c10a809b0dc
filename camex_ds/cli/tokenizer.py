"""Train a SentencePiece tokenizer on the train split of a corpus and write PREFIX.model.

    camex-train-tokenizer                               # default corpus, 4096 pieces -> out/tokenizer.model
    camex-train-tokenizer --data corpus/ --vocab_size 8192 --output out/tok8k
"""
from __future__ import annotations

import argparse
import sys
import time

from camex_ds.config import DEFAULT_VOCAB_SIZE
from camex_ds.data import DATA_HELP, DEFAULT_VAL_PERCENT, DataError, resolve_source, train_texts, train_tokenizer
from camex_ds.data.tokenizer import DEFAULT_INPUT_SENTENCE_SIZE
from camex_ds.cli import run_cli


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train a SentencePiece tokenizer (BPE, byte fallback, exact round trip, deterministic) on the "
        "documents of --data that fall in the train split, so validation text stays unseen.",
    )
    parser.add_argument("--data", metavar="PATH", default=None, help=DATA_HELP)
    parser.add_argument(
        "--vocab_size", metavar="N", type=int, default=DEFAULT_VOCAB_SIZE, help="pieces, 256 byte pieces included (%(default)s)"
    )
    parser.add_argument("--output", metavar="PREFIX", default="out/tokenizer", help="writes PREFIX.model (%(default)s)")
    parser.add_argument(
        "--model_type", choices=("bpe", "unigram"), default="bpe", help="unigram trains ~15x slower (%(default)s)"
    )
    parser.add_argument(
        "--val_percent",
        metavar="P",
        type=int,
        default=DEFAULT_VAL_PERCENT,
        help="percent of documents held out for validation; use the same value when preprocessing (%(default)s)",
    )
    parser.add_argument(
        "--input_sentence_size",
        metavar="N",
        type=int,
        default=DEFAULT_INPUT_SENTENCE_SIZE,
        help="train on at most N lines, sampled deterministically (%(default)s)",
    )
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: _train(args), (DataError, OSError))


def _train(args) -> int:
    start = time.perf_counter()
    source = resolve_source(args.data)
    tokenizer = train_tokenizer(
        train_texts(source, args.val_percent),
        args.vocab_size,
        args.output,
        model_type=args.model_type,
        input_sentence_size=args.input_sentence_size,
        progress=not args.no_progress,
    )
    seconds = time.perf_counter() - start
    print(f"wrote {tokenizer.path}: {tokenizer.vocab_size} pieces from {source.description} in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Tokenize a corpus into a self-contained preprocessed dataset folder (train/validation token shards).

    camex-preprocess                                        # default corpus -> out/data
    camex-preprocess --data corpus.jsonl --tokenizer out/tokenizer.model --output out/corpus

Training accepts the output folder as its --data. The format and the split rule are documented in
camex_ds/data/dataset.py.
"""
from __future__ import annotations

import argparse
import sys
import time

from camex_ds.config import DEFAULT_VOCAB_SIZE
from camex_ds.data import DATA_HELP, DEFAULT_VAL_PERCENT, DataError, build_dataset, resolve_source
from camex_ds.cli import run_cli


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Tokenize --data into --output: train.bin and validation.bin (flat token ids, EOS after every "
        "document), a copy of the tokenizer, and index.json with token and UTF-8 byte counts per split (for bits "
        "per byte). A document goes to validation iff crc32(its key) % 100 < --val_percent. The folder appears "
        "only once complete.",
    )
    parser.add_argument("--data", metavar="PATH", default=None, help=DATA_HELP)
    parser.add_argument(
        "--tokenizer",
        metavar="TOKENIZER",
        default=None,
        help="SentencePiece model (from tools/train_tokenizer.py), or a Hugging Face tokenizer.json or the folder "
        "holding it; default: train one on the train split first",
    )
    parser.add_argument(
        "--vocab_size", metavar="N", type=int, default=DEFAULT_VOCAB_SIZE, help="pieces of a tokenizer trained here (%(default)s)"
    )
    parser.add_argument(
        "--output", metavar="DIR", default="out/data", help="dataset folder to create; must not exist (%(default)s)"
    )
    parser.add_argument(
        "--val_percent", metavar="P", type=int, default=DEFAULT_VAL_PERCENT, help="percent of documents to validate on (%(default)s)"
    )
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: _preprocess(args), (DataError, OSError))


def _preprocess(args) -> int:
    start = time.perf_counter()
    prepared = build_dataset(
        resolve_source(args.data),
        args.output,
        args.tokenizer,
        vocab_size=args.vocab_size,
        val_percent=args.val_percent,
        progress=not args.no_progress,
    )
    seconds = time.perf_counter() - start
    print(f"wrote {prepared.path} in {seconds:.1f} s ({prepared.index['source']})")
    for split, info in prepared.index["splits"].items():
        print(f"  {split:<10} {info['documents']:>8} documents {info['tokens']:>12} tokens {info['bytes']:>13} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())

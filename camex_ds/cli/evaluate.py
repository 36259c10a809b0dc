"""Perplexity and bits per byte of a consolidated model (tools/convert_checkpoint.py consolidate).

    camex-evaluate --model out/model                  # the validation split of the training data
    camex-evaluate --model out/model --data corpus/ --max_windows 128
    camex-evaluate --model out/model --data default   # the launcher's default corpus
    camex-evaluate --model out/model --val_data corpus/valid.txt   # all of a separate validation text
    camex-evaluate --model out/model --val_data corpus/valid.jsonl --stride 256   # lm-eval's rolling perplexity

The data are tokenized with the model's own tokenizer through `camex_ds.data.prepare_data` (cached),
so the validation split is the one `launcher/pretrain.py` evaluates on, and the loss is computed by
the launcher's `evaluate` over the same windows: `--max_windows` N covers the first N windows, as the launcher's
--eval_windows does (its final_metrics.json records val_windows); `--batch_size` only groups them. The last stdout
line is a JSON object with val_loss, val_ppl, val_bpb, val_windows and val_tokens.

`--stride S` scores the documents of `--val_data` instead as lm-evaluation-harness's wikitext task does
(camex_ds/train/rolling.py): every token once, in windows of the model's seq_len, each later window scoring
the next S tokens; S = seq_len is lm-eval's own setting, and its numbers. A text file is one document here, a
.jsonl file one per line. The JSON line then has token_perplexity, word_perplexity, byte_perplexity,
bits_per_byte and what they covered.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from camex_ds.cli import add_model_arguments, run_cli
from camex_ds.data import DATA_HELP


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(ap)
    ap.add_argument("--data", help="a preprocessed dataset folder (made with this tokenizer), " + DATA_HELP
                    + "; default: the dataset the model was trained on, which consolidate records (required "
                      "when none is recorded; pass --data default for the launcher's default corpus)")
    ap.add_argument("--val_data", help="evaluate on all of this text instead (a corpus's valid.txt; the forms of "
                                       "--data; the launcher's --val_data), tokenized with the model's tokenizer")
    ap.add_argument("--stride", type=int,
                    help="rolling perplexity over the documents of --val_data, as lm-eval's wikitext task: windows of "
                         "seq_len tokens, each later one scoring the next STRIDE tokens (seq_len: lm-eval's windows)")
    ap.add_argument("--split", choices=("validation", "train"), default="validation", help="(%(default)s)")
    ap.add_argument("--batch_size", type=int, default=8, help="windows per batch (%(default)s)")
    ap.add_argument("--max_windows", type=int,
                    help="evaluate the first N windows only, like the launcher's --eval_windows (default: all)")
    ap.add_argument("--max_batches", type=int,
                    help="or: the first K batches of --batch_size windows, like the launcher's --eval_batches")
    ap.add_argument("--cache_dir", help="where prepared datasets are cached (default: $CAMEX_DS_CACHE or "
                                        "~/.cache/camex_ds)")
    return ap.parse_args(argv)


def recorded_dataset(model_dir):
    """The prepared dataset consolidate recorded for the model (None if none, or if it is gone)."""
    from camex_ds.data import is_prepared_dataset
    from camex_ds.ckpt.format import read_config

    from camex_ds.config import ConfigError

    _, raw = read_config(model_dir)
    dataset = (raw.get("conversion") or {}).get("dataset")
    if isinstance(dataset, str) and is_prepared_dataset(dataset):
        return dataset
    why = f"its training dataset '{dataset}' no longer exists" if dataset else "it records no training dataset"
    raise ConfigError(f"--data is required for '{model_dir}': {why}")


def main(argv=None) -> int:
    args = parse_args(argv)
    from camex_ds.config import ConfigError
    from camex_ds.data import DataError
    from camex_ds.ckpt.format import PretrainedError

    return run_cli(lambda: _evaluate(args), (ConfigError, DataError, PretrainedError))


def _evaluate(args) -> int:
    from camex_ds.config import ConfigError
    from camex_ds.data import DataError, cache_dir, prepare_data
    from camex_ds.ckpt.format import load_pretrained, tokenizer_path
    from camex_ds.train.evaluate import evaluate

    for name in ("batch_size", "max_windows", "max_batches"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name}={value} is invalid: expected an integer >= 1")
    if args.max_windows is not None and args.max_batches is not None:
        raise ConfigError("--max_windows and --max_batches both set the windows: give one of them")
    if args.stride is not None:
        return _evaluate_documents(args)
    max_windows = args.max_windows if args.max_batches is None else args.max_batches * args.batch_size
    model = load_pretrained(args.model, dtype=args.dtype, device=args.device)
    tok = tokenizer_path(args.model)
    cache = cache_dir(args.cache_dir)
    if args.val_data is not None:
        if args.data is not None or args.split != "validation":
            raise ConfigError("--val_data is evaluated whole: it takes neither --data nor --split")
        prepared = prepare_data(args.val_data, tok, cache, val_percent=100)
    else:
        data = args.data if args.data is not None else recorded_dataset(args.model)
        prepared = prepare_data(None if data == "default" else data, tok, cache)
    if prepared.vocab_size > model.config.vocab_size:
        raise DataError(f"the data's vocabulary ({prepared.vocab_size}) exceeds the model's "
                        f"vocab_size {model.config.vocab_size}")
    split = prepared.split(args.split)
    start = time.perf_counter()
    result = evaluate(model, split, model.config.seq_len, args.batch_size, max_windows, args.device)
    result = {"split": args.split, **result, "seconds": round(time.perf_counter() - start, 3),
              "model": str(args.model), "data": str(prepared.path)}
    print(f"{args.split}: loss {result['val_loss']:.4f}  ppl {result['val_ppl']:.3f}  bpb {result['val_bpb']:.4f}",
          file=sys.stderr)
    print(json.dumps(result))
    return 0


def _evaluate_documents(args) -> int:
    """`--stride`: lm-eval's rolling metrics over the whole documents of --val_data."""
    from camex_ds.ckpt.format import load_pretrained, tokenizer_path
    from camex_ds.cli.generate import padding_plan
    from camex_ds.config import ConfigError
    from camex_ds.data import DataError, Tokenizer, resolve_source
    from camex_ds.train.rolling import evaluate_documents

    if args.val_data is None or args.data is not None or args.split != "validation":
        raise ConfigError("--stride scores the documents of --val_data: give --val_data, without --data or --split")
    if args.max_windows is not None or args.max_batches is not None:
        raise ConfigError("--stride scores every token of --val_data: it takes neither --max_windows nor --max_batches")
    model = load_pretrained(args.model, dtype=args.dtype, device=args.device)
    multiple, exact = padding_plan(model.config)
    if not exact:
        moe = model.config.moe
        raise ConfigError(f"--stride needs causal routing and a uniform first segment: with routing={moe.routing!r} "
                          f"and first_segment={moe.first_segment!r} a segment's gates see its own later tokens, so a "
                          "short window padded to whole segments would change its scores")
    tokenizer = Tokenizer.load(tokenizer_path(args.model))
    if tokenizer.vocab_size > model.config.vocab_size:
        raise DataError(f"the tokenizer's vocabulary ({tokenizer.vocab_size}) exceeds the model's "
                        f"vocab_size {model.config.vocab_size}")
    texts = (document.text for document in resolve_source(args.val_data, whole_files=True).documents())
    start = time.perf_counter()
    result = evaluate_documents(model, tokenizer, texts, args.stride, args.batch_size, multiple, args.device)
    result = {**result, "seconds": round(time.perf_counter() - start, 3), "model": str(args.model),
              "data": str(args.val_data)}
    print(f"{result['documents']} documents: token ppl {result['token_perplexity']:.3f}  word ppl "
          f"{result['word_perplexity']:.3f}  bpb {result['bits_per_byte']:.4f}", file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

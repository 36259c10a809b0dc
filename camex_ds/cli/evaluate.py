"""Perplexity and bits per byte of a consolidated model (tools/convert_checkpoint.py consolidate).

    camex-evaluate --model out/model                  # the validation split of the training data
    camex-evaluate --model out/model --data corpus/ --max_windows 128
    camex-evaluate --model out/model --data default   # the launcher's default corpus
    camex-evaluate --model out/model --val_data corpus/valid.txt   # all of a separate validation text

The data are tokenized with the model's own tokenizer through `camex_ds.data.prepare_data` (cached),
so the validation split is the one `launcher/pretrain.py` evaluates on, and the loss is computed by
the launcher's `evaluate` over the same windows: `--max_windows` N covers the first N windows, as the launcher's
--eval_windows does (its final_metrics.json records val_windows); `--batch_size` only groups them. The last stdout
line is a JSON object with val_loss, val_ppl, val_bpb, val_windows and val_tokens.
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


if __name__ == "__main__":
    sys.exit(main())

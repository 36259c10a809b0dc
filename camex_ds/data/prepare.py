"""From a ``--data`` value to a ready preprocessed dataset, cached and safe to call from every rank.

``prepare_data(data, tokenizer, cache_dir)``:

* a preprocessed dataset folder (one with ``index.json``) is used as it is;
* anything else ``resolve_source`` accepts is tokenized into ``cache_dir/NAME-KEY``, where KEY hashes
  the source identity (paths, sizes and mtimes, or the hub fingerprint), the tokenizer (its file
  hash, or vocab_size and the training settings when one is trained here), val_percent and the
  format version. A later call with the same inputs opens that folder without reading the data;
* without a tokenizer, one with ``vocab_size`` pieces is trained on the source's train split
  (deterministically) and stored in the dataset folder.

Concurrency: a caller holds an exclusive ``fcntl.flock`` on ``cache_dir/NAME-KEY.lock`` while it
checks and builds the cache entry, so when all ranks call ``prepare_data`` at once the first one
builds the dataset and the others block on the lock, then find it ready. Hidden work folders left
by a killed build are removed by the next one. The lock works between
processes of one host, and across hosts on a shared filesystem that supports flock (NFSv4 does);
with node-local cache dirs each node builds its own, identical, copy.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator, Optional

from ..config import DEFAULT_VOCAB_SIZE
from .corpus import DataError, Source, resolve_source
from .dataset import (
    DEFAULT_VAL_PERCENT,
    FORMAT_VERSION,
    PreparedDataset,
    check_val_percent,
    file_sha256,
    is_prepared_dataset,
    split_of,
    write_dataset,
)
from .tokenizer import DEFAULT_INPUT_SENTENCE_SIZE, Tokenizer, train_tokenizer

# How prepare_data trains a tokenizer when none is given; part of the cache key.
TOKENIZER_SETTINGS = {"model_type": "bpe", "input_sentence_size": DEFAULT_INPUT_SENTENCE_SIZE, "seed": 0}


def cache_dir(given: Optional[str] = None) -> str:
    """Where prepared datasets are cached: `given` (a --cache_dir), else $CAMEX_DS_CACHE, else ~/.cache/camex_ds."""
    return given or os.environ.get("CAMEX_DS_CACHE", str(Path.home() / ".cache" / "camex_ds"))


def train_texts(source: Source, val_percent: int) -> Iterator[str]:
    """Texts of the train split, small-corpus guards included: what a tokenizer is trained on.

    The most recent train document is held back until another arrives, because the validation guard
    may still move it to validation.
    """
    if val_percent == 100:
        raise DataError("val_percent 100 puts every document in validation: there is no text to train a tokenizer "
                        "on; give the tokenizer of the training data")
    held_back = last_validation = None
    train_count = validation_count = 0
    for doc in source.documents():
        if split_of(doc.key, val_percent) == "validation":
            validation_count += 1
            last_validation = doc.text
            continue
        train_count += 1
        if held_back is not None:
            yield held_back
        held_back = doc.text
    if train_count + validation_count == 0:
        raise DataError(f"no documents found in {source.description}")
    if train_count == 0:
        yield last_validation  # the train guard moves it to train
    elif validation_count > 0 or train_count == 1 or val_percent == 0:
        yield held_back  # otherwise the validation guard moves it to validation


def build_dataset(
    source: Source,
    output_dir: str | os.PathLike,
    tokenizer: str | os.PathLike | None = None,
    *,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    val_percent: int = DEFAULT_VAL_PERCENT,
    progress: bool = False,
) -> PreparedDataset:
    """Tokenize ``source`` into ``output_dir``, first training a tokenizer on its train split if none is given."""
    check_val_percent(val_percent)
    if tokenizer is not None:
        return write_dataset(source, Tokenizer.load(tokenizer), output_dir, val_percent=val_percent, progress=progress)
    Path(output_dir).parent.mkdir(parents=True, exist_ok=True)
    output_dir = Path(output_dir)
    with tempfile.TemporaryDirectory(dir=output_dir.parent, prefix=f".{output_dir.name}.tokenizer-") as scratch:
        texts = train_texts(source, val_percent)
        trained = train_tokenizer(texts, vocab_size, Path(scratch, "tok"), progress=progress, **TOKENIZER_SETTINGS)
        return write_dataset(source, trained, output_dir, val_percent=val_percent, progress=progress)


def prepare_data(
    data: str | os.PathLike | None,
    tokenizer: str | os.PathLike | None,
    cache_dir: str | os.PathLike,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    progress: bool = False,
    *,
    val_percent: int = DEFAULT_VAL_PERCENT,
) -> PreparedDataset:
    """Resolve ``data`` (None: the default corpus) to a preprocessed dataset, building and caching it if needed.

    ``vocab_size`` only matters when no tokenizer is given. For a preprocessed folder ``vocab_size``
    and ``val_percent`` are ignored, and a given tokenizer must be the one the folder was made with.
    Every folder is verified (``PreparedDataset.verify``) before it is used: a damaged preprocessed folder
    is an error naming the file, a damaged cache entry is rebuilt from its source.
    """
    tokenizer_hash = file_sha256(Tokenizer.load(tokenizer).path) if tokenizer is not None else None
    if data is not None and is_prepared_dataset(data):
        prepared = PreparedDataset.open(data)
        prepared.verify()
        if tokenizer_hash not in (None, prepared.index["tokenizer_sha256"]):
            raise DataError(f"dataset '{data}' was made with a different tokenizer than '{tokenizer}'")
        return prepared

    check_val_percent(val_percent)
    source = resolve_source(data)
    tokenizer_id = tokenizer_hash or {"vocab_size": vocab_size, **TOKENIZER_SETTINGS}
    key = json.dumps([FORMAT_VERSION, source.identity(), tokenizer_id, val_percent])
    name = f"{re.sub(r'[^A-Za-z0-9._-]+', '_', source.name)}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if is_prepared_dataset(cache_dir / name):
            try:
                prepared = PreparedDataset.open(cache_dir / name)
                prepared.verify()
                return prepared
            except DataError as e:  # the source is still there: build the entry again
                print(f"warning: the cached dataset is damaged ({e}); rebuilding it from {source.description}",
                      file=sys.stderr)
                shutil.rmtree(cache_dir / name)
        for leftover in cache_dir.glob(f".{name}.*"):  # hidden work folders of a build that was killed
            shutil.rmtree(leftover)
        return build_dataset(
            source, cache_dir / name, tokenizer, vocab_size=vocab_size, val_percent=val_percent, progress=progress
        )

"""Data pipeline: text sources, SentencePiece tokenizer, preprocessed token datasets and batch loaders.

Typical use in a training script::

    prepared = prepare_data(args.data, args.tokenizer, cache_dir, vocab_size=DEFAULT_VOCAB_SIZE, progress=rank == 0)
    train = BatchLoader(prepared.split("train"), seq_len, micro_batch, dp_rank, dp_world_size, seed)
    x, y = next(train)                        # LongTensors [micro_batch, seq_len]; y is x shifted by one
    checkpoint["data"] = train.state_dict()   # identical on every rank; train.load_state_dict() resumes
    val = prepared.split("validation")
    for x, y in validation_batches(val, seq_len, batch_size): ...
    bpb = bits_per_byte(mean_loss_nats, val.num_tokens, val.num_bytes)
"""
from .corpus import DATA_HELP, DEFAULT_CORPUS_MAX_BYTES, DataError, Document, Source, default_corpus, resolve_source
from .dataset import (
    DEFAULT_VAL_PERCENT,
    BatchLoader,
    PreparedDataset,
    TokenDataset,
    bits_per_byte,
    is_prepared_dataset,
    split_of,
    validation_batches,
    write_dataset,
)
from .prepare import build_dataset, cache_dir, prepare_data, train_texts
from .tokenizer import Tokenizer, train_tokenizer

__all__ = [
    "DATA_HELP",
    "DEFAULT_CORPUS_MAX_BYTES",
    "DEFAULT_VAL_PERCENT",
    "BatchLoader",
    "DataError",
    "Document",
    "PreparedDataset",
    "Source",
    "TokenDataset",
    "Tokenizer",
    "bits_per_byte",
    "build_dataset",
    "cache_dir",
    "default_corpus",
    "is_prepared_dataset",
    "prepare_data",
    "resolve_source",
    "split_of",
    "train_texts",
    "train_tokenizer",
    "validation_batches",
    "write_dataset",
]

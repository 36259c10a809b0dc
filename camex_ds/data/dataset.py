"""Preprocessed token datasets: on-disk format, atomic writer, memory-mapped reader and batch loaders.

Format (``FORMAT_VERSION`` 1), one folder:

* ``train.bin``, ``validation.bin``: flat token ids, every document followed by EOS, numpy ``uint16``
  when ``vocab_size <= 65536`` else ``uint32``;
* ``tokenizer.model`` (or ``tokenizer.json``): a copy of the tokenizer used, so the folder is self-contained;
* ``index.json``: format and version, source description, tokenizer file and hash, vocab_size,
  eos_id, dtype, val_percent, and per split its file, token count, UTF-8 byte count, document count
  and the file's sha256 (``verify_dataset`` checks sizes and hashes; folders written before the hash
  was recorded are checked by size only).

Validation split rule: a document goes to validation iff
``zlib.crc32(key.encode("utf-8")) % 100 < val_percent`` (default 5), where ``key`` is the document's
source key (relative path, ``path:LINE`` or ``path:LINE:BYTE`` for a piece of a text file, ``path:LINE`` for
JSONL, ``path#ROW`` for Parquet/hub rows; see corpus.py).
It depends on nothing but the key, so adding documents never moves existing ones between splits.
``val_percent`` 0 puts everything in train and 100 everything in validation: a source that is only
trained on, or only validated on (``--val_data``). Between them, two guards for small corpora,
applied after all documents are read: if train is empty, the last validation document (in source
order) moves to train; then, if validation is empty and there are at least 2 documents, the last
train document moves to validation.

Atomic write: everything is written into a hidden ``.NAME.partial-*`` sibling folder, index last,
and renamed to NAME at the end; on any error the partial folder is removed. A folder with an
``index.json`` is therefore always complete (a hard kill can only leave a hidden partial folder).

Bits per byte: a split's byte count is the UTF-8 size of its documents (EOS tokens add no bytes), so
``bits_per_byte(loss, split.num_tokens, split.num_bytes) = loss * tokens / bytes / ln 2`` for a mean
loss in nats per token over the split's tokens.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import uuid
import zlib
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from tqdm import tqdm

from .corpus import INDEX_FILE, DataError, Source
from .tokenizer import Tokenizer

#: Percent of documents a dataset validates on unless told otherwise (the split rule is `split_of`).
DEFAULT_VAL_PERCENT = 5

FORMAT = "camex_ds-tokens"
FORMAT_VERSION = 1
SPLITS = ("train", "validation")
INDEX_KEYS = ("tokenizer", "tokenizer_sha256", "vocab_size", "eos_id", "dtype", "splits")


def split_of(key: str, val_percent: int) -> str:
    """The split of the document with this key, before the small-corpus guards (module docstring)."""
    return "validation" if zlib.crc32(key.encode("utf-8")) % 100 < val_percent else "train"


def check_val_percent(val_percent: int) -> None:
    if isinstance(val_percent, bool) or not isinstance(val_percent, int) or not 0 <= val_percent <= 100:
        raise DataError(f"val_percent {val_percent!r} must be an integer from 0 (all train) to 100 (all validation)")


def is_prepared_dataset(path: str | os.PathLike) -> bool:
    return (Path(path) / INDEX_FILE).is_file()


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):  # 16 MB at a time: token files can be larger than memory
            digest.update(chunk)
    return digest.hexdigest()


class _SplitWriter:
    """Appends documents to one split file, remembering the last one so a guard can move it."""

    def __init__(self, path: Path, dtype):
        self.path = path
        self.file = open(path, "wb")
        self.dtype = dtype
        self.tokens = self.bytes = self.documents = 0
        self.last: tuple[np.ndarray, int] | None = None

    def append(self, ids: np.ndarray, nbytes: int) -> None:
        self.file.write(ids.tobytes())
        self.tokens += len(ids)
        self.bytes += nbytes
        self.documents += 1
        self.last = (ids, nbytes)

    def pop_last(self) -> tuple[np.ndarray, int]:
        ids, nbytes = self.last
        self.tokens -= len(ids)
        self.bytes -= nbytes
        self.documents -= 1
        self.file.seek(self.tokens * self.dtype.itemsize)
        self.file.truncate()
        self.last = None  # only one document is ever moved out of a split
        return ids, nbytes

    def close(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()


def write_dataset(
    source: Source,
    tokenizer: Tokenizer,
    output_dir: str | os.PathLike,
    *,
    val_percent: int = DEFAULT_VAL_PERCENT,
    progress: bool = False,
) -> "PreparedDataset":
    """Tokenize every document of ``source`` into a new dataset folder ``output_dir`` (atomically)."""
    check_val_percent(val_percent)
    output_dir = Path(output_dir)
    if output_dir.exists():
        raise DataError(f"output '{output_dir}' already exists; remove it or choose another")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = output_dir.with_name(f".{output_dir.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    partial.mkdir()
    try:
        shutil.copyfile(tokenizer.path, partial / tokenizer.file_name)
        dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32)
        splits = _write_splits(partial, source, tokenizer, dtype, val_percent, progress)
        index = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "source": source.description,
            "tokenizer": tokenizer.file_name,
            "tokenizer_sha256": file_sha256(tokenizer.path),
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
            "dtype": dtype.name,
            "val_percent": val_percent,
            "splits": splits,
        }
        with open(partial / INDEX_FILE, "w") as f:
            json.dump(index, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.rename(partial, output_dir)
        except OSError:
            raise DataError(f"output '{output_dir}' already exists; remove it or choose another") from None
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return PreparedDataset.open(output_dir)


def _write_splits(folder: Path, source: Source, tokenizer: Tokenizer, dtype, val_percent: int, progress: bool):
    """Tokenize the documents into ``folder/{split}.bin``, apply the split guards, return the counts."""
    writers = {split: _SplitWriter(folder / f"{split}.bin", dtype) for split in SPLITS}
    try:
        eos = np.array([tokenizer.eos_id], dtype)
        docs = tqdm(source.documents(), desc="tokenizing", unit="doc", total=source.num_documents, disable=not progress)
        for doc in docs:
            ids = np.concatenate([np.asarray(tokenizer.encode(doc.text), dtype), eos])
            writers[split_of(doc.key, val_percent)].append(ids, len(doc.text.encode("utf-8")))
        train, validation = writers["train"], writers["validation"]
        if train.documents + validation.documents == 0:
            raise DataError(f"no documents found in {source.description}")
        if 0 < val_percent < 100 and train.documents == 0:
            train.append(*validation.pop_last())
        if 0 < val_percent < 100 and validation.documents == 0 and train.documents >= 2:
            validation.append(*train.pop_last())
    finally:
        for writer in writers.values():
            writer.close()
    return {
        split: {"file": f"{split}.bin", "tokens": w.tokens, "bytes": w.bytes, "documents": w.documents,
                "sha256": file_sha256(w.path)}
        for split, w in writers.items()
    }


class PreparedDataset:
    """A complete preprocessed dataset folder; ``.split(name)`` gives its TokenDatasets."""

    def __init__(self, path: Path, index: dict):
        self.path = path
        self.index = index
        self.vocab_size: int = index["vocab_size"]
        self.eos_id: int = index["eos_id"]
        self.tokenizer_path = path / index["tokenizer"]

    @classmethod
    def open(cls, path: str | os.PathLike) -> "PreparedDataset":
        path = Path(path)
        if not path.exists():
            raise DataError(f"data path '{path}' does not exist")
        try:
            index = json.loads((path / INDEX_FILE).read_text())
        except FileNotFoundError:
            raise DataError(f"'{path}' is not a preprocessed dataset (no {INDEX_FILE})") from None
        except json.JSONDecodeError as e:
            raise DataError(f"'{path / INDEX_FILE}' is not valid JSON ({e.msg})") from None
        if not isinstance(index, dict) or index.get("format") != FORMAT or index.get("version") != FORMAT_VERSION:
            found = f"{index.get('format')} v{index.get('version')}" if isinstance(index, dict) else "unknown"
            raise DataError(f"'{path}' has dataset format {found}; this code reads {FORMAT} v{FORMAT_VERSION}")
        missing = [k for k in INDEX_KEYS if k not in index]
        splits = index.get("splits")
        if missing or not isinstance(splits, dict) or any(not isinstance(splits.get(s), dict) for s in SPLITS):
            raise DataError(f"'{path / INDEX_FILE}' is incomplete (missing {', '.join(missing) or 'a split'})")
        return cls(path, index)

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.load(self.tokenizer_path)

    def verify(self) -> None:
        """Raise a DataError naming the first file of the folder that is missing, truncated or changed."""
        for split in SPLITS:
            info = self.index["splits"][split]
            file = self.path / info["file"]
            expected = info["tokens"] * np.dtype(self.index["dtype"]).itemsize
            if not file.is_file():
                raise DataError(f"dataset file '{file}' is missing")
            if file.stat().st_size != expected:
                raise DataError(f"dataset file '{file}' has {file.stat().st_size} bytes, the index says {expected} "
                                "(truncated or replaced)")
            if info.get("sha256") and file_sha256(file) != info["sha256"]:
                raise DataError(f"dataset file '{file}' does not match the sha256 in its {INDEX_FILE} (damaged)")
        digest = self.index["tokenizer_sha256"]
        if digest and (not self.tokenizer_path.is_file() or file_sha256(self.tokenizer_path) != digest):
            raise DataError(f"tokenizer '{self.tokenizer_path}' is missing or does not match the sha256 in its "
                            f"{INDEX_FILE} (damaged)")

    def split(self, name: str) -> "TokenDataset":
        return TokenDataset(self.path, name)

    def __repr__(self) -> str:
        counts = ", ".join(f"{s}={v['tokens']} tokens" for s, v in self.index["splits"].items())
        return f"PreparedDataset('{self.path}', vocab_size={self.vocab_size}, {counts})"


class TokenDataset:
    """One split of a preprocessed dataset as a read-only memory-mapped token array."""

    def __init__(self, path: str | os.PathLike, split: str = "train"):
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        prepared = PreparedDataset.open(path)
        info = prepared.index["splits"][split]
        self.path, self.split = prepared.path, split
        self.vocab_size, self.eos_id = prepared.vocab_size, prepared.eos_id
        self.num_tokens: int = info["tokens"]
        self.num_bytes: int = info["bytes"]
        self.num_documents: int = info["documents"]
        dtype = np.dtype(prepared.index["dtype"])
        file = self.path / info["file"]
        if not file.is_file():
            raise DataError(f"dataset file '{file}' is missing")
        size = file.stat().st_size
        if size != self.num_tokens * dtype.itemsize:
            raise DataError(f"'{file}' has {size} bytes but the index says {self.num_tokens} {dtype.name} tokens")
        # np.memmap cannot map an empty file.
        self.tokens = np.memmap(file, dtype, mode="r") if self.num_tokens else np.zeros(0, dtype)

    def __len__(self) -> int:
        return self.num_tokens

    def num_windows(self, seq_len: int) -> int:
        """How many windows of seq_len + 1 tokens, seq_len apart, fit (each token is a label once)."""
        if seq_len < 1:
            raise DataError(f"seq_len {seq_len} must be at least 1")
        return max(self.num_tokens - 1, 0) // seq_len

    def windows(self, starts: Sequence[int], seq_len: int):
        """(input_ids, labels) int64 tensors [len(starts), seq_len] for windows starting at ``starts``."""
        import torch  # lazily, so that the preprocessing tools start without loading torch

        rows = np.stack([self.tokens[s : s + seq_len + 1] for s in starts]).astype(np.int64)
        rows = torch.from_numpy(rows)
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def __repr__(self) -> str:
        return f"TokenDataset('{self.path}', {self.split!r}, {self.num_tokens} tokens)"


def _require_windows(dataset: TokenDataset, seq_len: int) -> int:
    n = dataset.num_windows(seq_len)
    if n == 0:
        raise DataError(
            f"the {dataset.split} split of '{dataset.path}' has {dataset.num_tokens} tokens, "
            f"fewer than seq_len + 1 = {seq_len + 1}"
        )
    return n


class BatchLoader:
    """Infinite, deterministic, resumable stream of ``(input_ids, labels)`` micro-batches for one DP rank.

    The split is cut into ``num_windows`` windows of ``seq_len + 1`` tokens (window i starts at
    ``i * seq_len``). Epoch e visits them in the order ``np.random.default_rng([seed, e]).permutation``;
    the epochs, concatenated, form one global sample sequence. Each batch consumes the next
    ``micro_batch_size * dp_world_size`` global samples, of which rank r takes offsets r, r + W,
    r + 2W, ... So a step's samples do not depend on how they are spread over ranks (1 rank with
    micro batch 2b sees exactly what 2 ranks with b see), ranks never overlap within an epoch, and
    the whole state is the count of consumed global samples: the same on every rank, so one rank's
    ``state_dict()`` resumes them all, even under a different world size.
    """

    def __init__(
        self,
        dataset: TokenDataset,
        seq_len: int,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_world_size: int = 1,
        seed: int = 0,
    ):
        if micro_batch_size < 1:
            raise DataError(f"micro_batch_size {micro_batch_size} must be at least 1")
        if not 0 <= dp_rank < dp_world_size:
            raise DataError(f"dp_rank {dp_rank} is outside dp_world_size {dp_world_size}")
        self.dataset, self.seq_len, self.micro_batch_size = dataset, seq_len, micro_batch_size
        self.dp_rank, self.dp_world_size, self.seed = dp_rank, dp_world_size, seed
        self.num_windows = _require_windows(dataset, seq_len)
        self.samples_consumed = 0  # global samples, over all ranks and epochs
        self._order_epoch, self._order = -1, np.zeros(0, np.int64)  # the current epoch's permutation

    @property
    def epoch(self) -> int:
        return self.samples_consumed // self.num_windows

    def __iter__(self) -> "BatchLoader":
        return self

    def __next__(self):
        offsets = self.dp_rank + self.dp_world_size * np.arange(self.micro_batch_size)
        starts = [self._window(self.samples_consumed + int(o)) * self.seq_len for o in offsets]
        self.samples_consumed += self.micro_batch_size * self.dp_world_size
        return self.dataset.windows(starts, self.seq_len)

    def _window(self, sample: int) -> int:
        epoch, position = divmod(sample, self.num_windows)
        if epoch != self._order_epoch:  # samples are drawn in increasing order: one epoch's order at a time
            self._order_epoch = epoch
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
        return int(self._order[position])

    def state_dict(self) -> dict:
        return {
            "samples_consumed": self.samples_consumed,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "num_windows": self.num_windows,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "seq_len", "num_windows"):
            if state.get(key) != getattr(self, key):
                raise DataError(f"loader state has {key} {state.get(key)!r}, this loader has {getattr(self, key)!r}")
        self.samples_consumed = int(state["samples_consumed"])


def validation_batches(
    dataset: TokenDataset, seq_len: int, batch_size: int, max_windows: int | None = None
) -> Iterator:
    """The split's first ``max_windows`` windows (default: all) in order, without shuffling or overlap, as
    ``(input_ids, labels)`` batches of ``batch_size``.

    The last batch may be smaller. The windows do not depend on ``batch_size``, so evaluations at any batch size
    are comparable.
    """
    if batch_size < 1:
        raise DataError(f"batch_size {batch_size} must be at least 1")
    n = _require_windows(dataset, seq_len)
    if max_windows is not None:
        n = min(n, max_windows)
    return (
        dataset.windows(np.arange(i, min(i + batch_size, n)) * seq_len, seq_len) for i in range(0, n, batch_size)
    )


def bits_per_byte(loss_nats_per_token: float, num_tokens: int, num_bytes: int) -> float:
    """Convert a mean loss (nats per token) into bits per UTF-8 byte of text: the tokenizer-free metric."""
    return loss_nats_per_token * num_tokens / num_bytes / math.log(2)

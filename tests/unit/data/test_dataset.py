"""`camex_ds.data.dataset`: the split rule and its small-corpus guards, the preprocessed folder (self-contained,
written atomically), the loaders (shifted windows, deterministic and resumable, ranks, validation order) and bits
per byte."""
from __future__ import annotations

import json
import random
import zlib

import numpy as np
import pytest
import torch

from camex_ds.data import (BatchLoader, DataError, TokenDataset, bits_per_byte, resolve_source, split_of, train_texts,
                           validation_batches, write_dataset)
from tests.unit.data.corpora import (VOCAB, arange_dataset, corpus, names_in, prepared,  # noqa: F401 (fixtures)
                                     synthetic_text, tokenizer, write_corpus)


def test_one_text_file_gives_both_splits_and_val_percent_0_or_100_gives_one(tmp_path, tokenizer):
    rng = random.Random(4)
    (tmp_path / "train.txt").write_text("\n".join(synthetic_text(rng, lines=20) for _ in range(200)))
    source = resolve_source(tmp_path / "train.txt")
    ds = write_dataset(source, tokenizer, tmp_path / "both")
    assert ds.split("train").num_documents > 20 and ds.split("validation").num_documents > 0
    only_train = write_dataset(source, tokenizer, tmp_path / "train_only", val_percent=0)
    only_val = write_dataset(source, tokenizer, tmp_path / "val_only", val_percent=100)
    total = ds.split("train").num_tokens + ds.split("validation").num_tokens
    assert (only_train.split("train").num_tokens, only_train.split("validation").num_tokens) == (total, 0)
    assert (only_val.split("train").num_tokens, only_val.split("validation").num_tokens) == (0, total)
    with pytest.raises(DataError, match="val_percent 100 puts every document in validation"):
        list(train_texts(source, 100))


def test_split_rule_is_crc32_of_the_key():
    keys = [f"dir/file{i}.txt" for i in range(4000)] + [f"data.jsonl:{i}" for i in range(4000)]
    splits = [split_of(k, 5) for k in keys]
    assert splits == ["validation" if zlib.crc32(k.encode()) % 100 < 5 else "train" for k in keys]
    assert 0.04 < splits.count("validation") / len(keys) < 0.06
    assert splits == [split_of(k, 5) for k in keys]


def test_small_corpus_guards_keep_both_splits_non_empty(tmp_path, tokenizer):
    train_only = tmp_path / "train_only"
    train_only.mkdir()
    texts = write_corpus(train_only, names_in("train", 3))
    source = resolve_source(train_only)
    ds = write_dataset(source, tokenizer, tmp_path / "a")
    val = ds.split("validation")
    last = sorted(texts)[-1]
    assert (val.num_documents, ds.split("train").num_documents) == (1, 2)
    assert tokenizer.decode(val.tokens[:-1]) == texts[last] and val.tokens[-1] == tokenizer.eos_id
    assert list(train_texts(source, 5)) == [texts[n] for n in sorted(texts)[:-1]]  # tokenizer never sees it

    validation_only = tmp_path / "validation_only"
    validation_only.mkdir()
    texts = write_corpus(validation_only, names_in("validation", 2))
    source = resolve_source(validation_only)
    ds = write_dataset(source, tokenizer, tmp_path / "b")
    assert (ds.split("train").num_documents, ds.split("validation").num_documents) == (1, 1)
    assert list(train_texts(source, 5)) == [texts[sorted(texts)[-1]]]


def test_dataset_folder_is_self_contained_and_counts_tokens_and_bytes(corpus, prepared, tokenizer):
    index = json.loads((prepared.path / "index.json").read_text())
    assert index["dtype"] == "uint16" and index["vocab_size"] == VOCAB
    assert (prepared.path / "tokenizer.model").read_bytes() == tokenizer.path.read_bytes()
    texts = {d.key: d.text for d in resolve_source(corpus).documents()}
    for split in ("train", "validation"):
        ds = prepared.split(split)
        keys = [k for k in texts if split_of(k, 5) == split]
        assert ds.num_documents == len(keys) > 0
        assert ds.num_bytes == sum(len(texts[k].encode()) for k in keys)
        assert ds.num_tokens == len(ds.tokens) == sum(len(tokenizer.encode(texts[k])) + 1 for k in keys)
        docs = np.split(np.asarray(ds.tokens), np.flatnonzero(ds.tokens == tokenizer.eos_id) + 1)[:-1]
        assert [tokenizer.decode(d[:-1]) for d in docs] == [texts[k] for k in keys]


def test_write_is_atomic(corpus, tokenizer, tmp_path, monkeypatch):
    calls = []

    def failing_encode(text):
        calls.append(text)
        if len(calls) == 5:
            raise RuntimeError("disk on fire")
        return [2, 3]

    monkeypatch.setattr(tokenizer, "encode", failing_encode)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_dataset(resolve_source(corpus), tokenizer, tmp_path / "data")
    assert list(tmp_path.iterdir()) == []  # neither the dataset nor its partial folder
    monkeypatch.undo()
    write_dataset(resolve_source(corpus), tokenizer, tmp_path / "data")
    with pytest.raises(DataError, match=r"output '.*data' already exists"):
        write_dataset(resolve_source(corpus), tokenizer, tmp_path / "data")


def take(loader, n):
    return [next(loader) for _ in range(n)]


def test_batches_are_shifted_windows_of_the_token_stream(tmp_path):
    ds = TokenDataset(arange_dataset(tmp_path, train_tokens=1000), "train")
    x, y = next(BatchLoader(ds, seq_len=16, micro_batch_size=3, seed=1))
    assert x.shape == y.shape == (3, 16) and x.dtype == y.dtype == torch.int64
    assert (x[:, 0] % 16 == 0).all() and (x == x[:, :1] + torch.arange(16)).all() and (y == x + 1).all()


def test_loader_is_deterministic_and_resumable(prepared):
    ds = prepared.split("train")
    same = [take(BatchLoader(ds, 16, 2, seed=3), 10) for _ in range(2)]
    assert all((a[0] == b[0]).all() for a, b in zip(*same))
    assert not all((a[0] == b[0]).all() for a, b in zip(same[0], take(BatchLoader(ds, 16, 2, seed=4), 10)))

    loader = BatchLoader(ds, 16, 2, seed=3)
    take(loader, 5)
    state = json.loads(json.dumps(loader.state_dict()))
    expected = take(loader, 5)
    resumed = BatchLoader(ds, 16, 2, seed=3)
    resumed.load_state_dict(state)
    assert all((a[0] == b[0]).all() and (a[1] == b[1]).all() for a, b in zip(expected, take(resumed, 5)))
    with pytest.raises(DataError, match="loader state has seq_len 16, this loader has 32"):
        BatchLoader(ds, 32, 2, seed=3).load_state_dict(state)


def test_ranks_split_the_global_sequence_and_reshuffle_each_epoch(tmp_path):
    ds = TokenDataset(arange_dataset(tmp_path, train_tokens=10 * 8 + 1), "train")  # 10 windows of 8 + 1
    single = BatchLoader(ds, 8, micro_batch_size=4, seed=0)
    ranks = [BatchLoader(ds, 8, micro_batch_size=2, dp_rank=r, dp_world_size=2, seed=0) for r in range(2)]
    starts = []
    for _ in range(7):  # 28 samples: crosses two epoch boundaries mid-batch
        x, _ = next(single)
        (x0, _), (x1, _) = next(ranks[0]), next(ranks[1])
        assert (x[0::2] == x0).all() and (x[1::2] == x1).all()
        starts += (x[:, 0] // 8).tolist()
    assert sorted(starts[:10]) == sorted(starts[10:20]) == list(range(10))  # each epoch visits every window once
    assert starts[:10] != starts[10:20]
    assert [s.state_dict() for s in ranks] == [single.state_dict()] * 2

    # A single-rank state resumes a two-rank job on the same global sequence.
    resumed = BatchLoader(ds, 8, micro_batch_size=4, dp_rank=1, dp_world_size=2, seed=0)
    resumed.load_state_dict(single.state_dict())
    x, _ = next(single)
    x_a, _ = next(single)
    assert (next(resumed)[0] == torch.cat([x, x_a])[1::2]).all()


def test_validation_batches_cover_the_split_in_order(tmp_path):
    ds = TokenDataset(arange_dataset(tmp_path, train_tokens=50, validation_tokens=95), "validation")
    batches = list(validation_batches(ds, seq_len=10, batch_size=4))
    assert [x[:, 0].tolist() for x, _ in batches] == [[0, 10, 20, 30], [40, 50, 60, 70], [80]]
    assert all((y == x + 1).all() for x, y in batches)
    assert [len(x) for x, _ in validation_batches(ds, 10, 4, max_windows=6)] == [4, 2]
    with pytest.raises(DataError, match=r"validation split of .* has 95 tokens, fewer than seq_len \+ 1 = 101"):
        validation_batches(ds, 100, 4)


def test_bits_per_byte():
    assert bits_per_byte(np.log(2), num_tokens=100, num_bytes=100) == pytest.approx(1.0)
    assert bits_per_byte(np.log(2), num_tokens=100, num_bytes=300) == pytest.approx(1 / 3)

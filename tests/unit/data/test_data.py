"""Data pipeline: sources, split rule, tokenizer, atomic preprocessing, caching, loaders and CLIs."""
from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from camex_ds.data import (
    BatchLoader,
    DataError,
    TokenDataset,
    Tokenizer,
    bits_per_byte,
    default_corpus,
    prepare_data,
    resolve_source,
    split_of,
    train_texts,
    train_tokenizer,
    validation_batches,
    write_dataset,
)
from camex_ds.data import prepare as prepare_module
from camex_ds.data.corpus import PIECE_BYTES
from camex_ds.data.dataset import FORMAT, FORMAT_VERSION

REPO = Path(__file__).resolve().parents[3]
VOCAB = 320  # small enough for the synthetic corpora below


def synthetic_text(rng: random.Random, lines: int = 30) -> str:
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "pa", "qu", "ex"]
    words = ["".join(rng.choices(syllables, k=rng.randint(1, 3))) for _ in range(60)]
    return "\n".join(
        " ".join(rng.choices(words, k=rng.randint(4, 12))) + rng.choice([".", "!", "?", ",", ";"]) for _ in range(lines)
    ) + "\n"


def write_corpus(folder: Path, names, seed: int = 0) -> dict[str, str]:
    rng = random.Random(seed)
    texts = {}
    for name in names:
        texts[name] = synthetic_text(rng)
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(texts[name])
    return texts


def names_in(split: str, count: int, val_percent: int = 5) -> list[str]:
    """File names that the split rule puts in ``split``."""
    return [n for n in (f"doc{i:04d}.txt" for i in range(10_000)) if split_of(n, val_percent) == split][:count]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    write_corpus(folder, [f"doc{i:04d}.txt" for i in range(60)])
    return folder


@pytest.fixture(scope="module")
def tokenizer(corpus, tmp_path_factory) -> Tokenizer:
    return train_tokenizer(train_texts(resolve_source(corpus), 5), VOCAB, tmp_path_factory.mktemp("tok") / "tok")


@pytest.fixture(scope="module")
def prepared(corpus, tokenizer, tmp_path_factory):
    return write_dataset(resolve_source(corpus), tokenizer, tmp_path_factory.mktemp("ds") / "data")


def arange_dataset(folder: Path, train_tokens: int, validation_tokens: int = 0) -> Path:
    """A dataset whose token i is i, so every window is identified by its first token."""
    splits = {}
    for split, n in (("train", train_tokens), ("validation", validation_tokens)):
        np.arange(n, dtype=np.uint32).tofile(folder / f"{split}.bin")
        splits[split] = {"file": f"{split}.bin", "tokens": n, "bytes": 3 * n, "documents": 1}
    index = {"format": FORMAT, "version": FORMAT_VERSION, "source": "test", "tokenizer": "tokenizer.model",
             "tokenizer_sha256": "", "vocab_size": 1 << 20, "eos_id": 1, "dtype": "uint32", "val_percent": 5,
             "splits": splits}
    (folder / "index.json").write_text(json.dumps(index))
    return folder


# -- sources --------------------------------------------------------------------------------------


def test_folder_source_reads_text_like_files_in_sorted_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2.txt").write_text("two")
    (tmp_path / "a.md").write_text("one")
    (tmp_path / "c.jsonl").write_text('{"text": "three"}\n\n{"text": "four", "id": 7}\n{"text": ""}\n')
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / ".hidden.txt").write_text("hidden")
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "x.py").write_text("cached")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\xff")
    docs = list(resolve_source(tmp_path).documents())
    expected = [("a.md", "one"), ("b/2.txt", "two"), ("c.jsonl:1", "three"), ("c.jsonl:3", "four")]
    assert [(d.key, d.text) for d in docs] == expected


def test_a_long_text_file_is_cut_into_pieces_keyed_by_their_first_line(tmp_path):
    """Paragraphs are joined while they fit in PIECE_BYTES, longer ones cut at line ends; the pieces are the
    file exactly, each keyed `path:LINE`. A file that fits stays one document keyed by its path."""
    rng = random.Random(3)
    paragraphs = [synthetic_text(rng, lines=rng.choice([2, 8, 200])) for _ in range(40)]
    text = "\n".join(paragraphs)  # synthetic_text ends its lines with \n: a blank line between paragraphs
    (tmp_path / "corpus.txt").write_text(text)
    docs = list(resolve_source(tmp_path / "corpus.txt").documents())
    assert "".join(d.text for d in docs) == text and len(docs) > 10
    lines = text.split("\n")
    for d in docs:
        name, line = d.key.rsplit(":", 1)
        assert name == "corpus.txt" and lines[int(line) - 1] == d.text.split("\n")[0]
        assert len(d.text.encode()) <= PIECE_BYTES
    assert any(not d.text.endswith("\n\n") for d in docs[:-1])  # a paragraph longer than a piece, cut at a line end
    (tmp_path / "short.txt").write_text(paragraphs[0])
    assert [d.key for d in resolve_source(tmp_path / "short.txt").documents()] == ["short.txt"]


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


def test_damaged_files_are_found_and_a_damaged_cache_entry_is_rebuilt(corpus, tmp_path, capsys):
    cache = tmp_path / "cache"
    built = prepare_data(str(corpus), None, cache, vocab_size=VOCAB)
    good = {f: (built.path / f).read_bytes() for f in ("train.bin", "validation.bin", "tokenizer.model")}
    for name, damage in (("train.bin", "truncate"), ("validation.bin", "flip"), ("tokenizer.model", "flip")):
        data = bytearray(good[name])
        if damage == "truncate":
            data = data[:-2]
        else:
            data[len(data) // 2] ^= 0xFF
        (built.path / name).write_bytes(bytes(data))
        with pytest.raises(DataError, match=name.replace(".", r"\.")):
            built.verify()
        again = prepare_data(str(corpus), None, cache, vocab_size=VOCAB)
        assert "warning: the cached dataset is damaged" in capsys.readouterr().err
        assert again.path == built.path and all((built.path / f).read_bytes() == good[f] for f in good)
    (built.path / "index.json").write_text("{")
    assert prepare_data(str(corpus), None, cache, vocab_size=VOCAB).path == built.path
    built.verify()
    (built.path / "train.bin").write_bytes(good["train.bin"][:-2])
    with pytest.raises(DataError, match=r"dataset file '.*train\.bin' has \d+ bytes, the index says \d+"):
        prepare_data(str(built.path), None, cache)  # a preprocessed folder given as --data: no source to rebuild


def test_parquet_source_reads_text_column(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))  # keep ~/.cache clean
    path = tmp_path / "rows.parquet"
    datasets.Dataset.from_dict({"text": ["first", "", "third"], "n": [1, 2, 3]}).to_parquet(str(path))
    docs = [(d.key, d.text) for d in resolve_source(path).documents()]
    assert docs == [("rows.parquet#0", "first"), ("rows.parquet#2", "third")]


def test_hub_source_loads_the_train_split_lazily(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        if name == "missing/set":
            raise FileNotFoundError("Dataset 'missing/set' doesn't exist on the Hub\nmore detail")
        return datasets.Dataset.from_dict({"text": ["a row", "another row"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    source = resolve_source("hf:owner/set:small")
    assert calls == [] and source.description == "hub dataset owner/set (small)"
    assert [(d.key, d.text) for d in source.documents()] == [("owner/set#0", "a row"), ("owner/set#1", "another row")]
    assert calls == [("owner/set", "small", "train")] and source.num_documents == 2
    with pytest.raises(DataError, match=r"^cannot load hub dataset missing/set: Dataset 'missing/set' doesn't exist"):
        list(resolve_source("hf:missing/set").documents())
    with pytest.raises(DataError, match=r"hub dataset 'hf:' has no name"):
        resolve_source("hf:")


def test_bad_inputs_give_one_line_errors_naming_them(tmp_path):
    with pytest.raises(DataError, match=r"^data path 'nope/x.txt' does not exist"):
        resolve_source("nope/x.txt")
    with pytest.raises(DataError, match=r"data path '.*missing' does not exist"):
        prepare_data(str(tmp_path / "missing"), None, tmp_path / "cache")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: invalid JSON"):
        list(resolve_source(bad).documents())
    bad.write_text('{"body": "no text field"}\n')
    with pytest.raises(DataError, match=r'bad.jsonl:1: expected an object with a string "text" field'):
        list(resolve_source(bad).documents())
    latin = tmp_path / "latin.txt"
    latin.write_bytes("café".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin.txt is not UTF-8 text"):
        list(resolve_source(latin).documents())
    with pytest.raises(DataError, match=r"val_percent 101 must be an integer from 0 \(all train\) to 100"):
        prepare_data(str(latin), None, tmp_path / "cache", val_percent=101)


def test_empty_corpus_is_an_error_naming_the_source(tmp_path, tokenizer):
    empty_folder = tmp_path / "empty"
    empty_folder.mkdir()
    with pytest.raises(DataError, match=r"no documents found in folder '.*empty'"):
        resolve_source(empty_folder)
    (empty_folder / "blank.txt").write_text("")
    with pytest.raises(DataError, match=r"no documents found in folder .*empty"):
        prepare_data(str(empty_folder), None, tmp_path / "cache")
    empty_jsonl = tmp_path / "empty.jsonl"
    empty_jsonl.write_text("\n")
    with pytest.raises(DataError, match=r"no documents found in file .*empty.jsonl"):
        write_dataset(resolve_source(empty_jsonl), tokenizer, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_default_corpus_is_the_sorted_stdlib_prefix():
    source = default_corpus(max_bytes=200_000)
    assert source.files == sorted(source.files) and source.files
    assert all(f.endswith(".py") and "site-packages" not in f and "__pycache__" not in f for f in source.files)
    assert sum((source.root / f).stat().st_size for f in source.files) <= 200_000
    assert [d.key for d in source.documents()] == source.files
    assert source.identity() == default_corpus(max_bytes=200_000).identity()


# -- split rule -----------------------------------------------------------------------------------


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


# -- tokenizer ------------------------------------------------------------------------------------


def test_tokenizer_is_deterministic_and_round_trips_any_text(corpus, tokenizer, tmp_path):
    again = train_tokenizer(train_texts(resolve_source(corpus), 5), VOCAB, tmp_path / "again")
    assert again.path.read_bytes() == tokenizer.path.read_bytes()
    assert (tokenizer.vocab_size, tokenizer.eos_id) == (VOCAB, 1)
    text = "kalo mine  rusa\n\tdef f(x):\n        return x  # naïve 日本語 🎉\r\n"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert 0 not in ids  # byte fallback: nothing becomes <unk>
    assert Tokenizer.load(tokenizer.path).encode(text) == ids


def test_tokenizer_errors(tmp_path):
    with pytest.raises(DataError, match=r"vocab_size 100 is too small"):
        train_tokenizer(["some text"], 100, tmp_path / "t")
    with pytest.raises(DataError, match=r"cannot train a 5000-piece tokenizer on this text: Vocabulary size too high"):
        train_tokenizer(["a tiny corpus", "of two lines"], 5000, tmp_path / "t")
    with pytest.raises(DataError, match=r"tokenizer file '.*nope.model' does not exist"):
        Tokenizer.load(tmp_path / "nope.model")
    (tmp_path / "junk.model").write_text("junk")
    with pytest.raises(DataError, match=r"is not a SentencePiece model"):
        Tokenizer.load(tmp_path / "junk.model")
    assert [p.name for p in tmp_path.iterdir()] == ["junk.model"]


# -- preprocessed format --------------------------------------------------------------------------


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


def test_prepare_data_caches_and_builds_once_under_concurrent_ranks(corpus, tmp_path, monkeypatch):
    builds = []
    real_build = prepare_module.build_dataset
    monkeypatch.setattr(prepare_module, "build_dataset", lambda *a, **k: builds.append(1) or real_build(*a, **k))
    cache = tmp_path / "cache"
    results = [None] * 4

    def rank(i):
        results[i] = prepare_data(str(corpus), None, cache, vocab_size=VOCAB)

    threads = [threading.Thread(target=rank, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and len({r.path for r in results}) == 1
    assert prepare_data(str(corpus), None, cache, vocab_size=VOCAB).path == results[0].path and len(builds) == 1
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == [results[0].path.name]

    # A preprocessed folder is used as it is; a different tokenizer for it is refused.
    assert prepare_data(str(results[0].path), None, cache).path == results[0].path
    other = prepare_data(str(corpus), None, cache, vocab_size=VOCAB + 16)
    assert len(builds) == 2 and other.vocab_size == VOCAB + 16
    with pytest.raises(DataError, match="different tokenizer"):
        prepare_data(str(results[0].path), str(other.tokenizer_path), cache)


def test_prepare_data_rebuilds_when_the_source_changes(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    write_corpus(folder, names_in("train", 4) + names_in("validation", 1))
    first = prepare_data(str(folder), None, tmp_path / "cache", vocab_size=VOCAB)
    shutil.rmtree(first.path)  # as if killed mid-build: no dataset, a partial folder
    (tmp_path / "cache" / f".{first.path.name}.partial-123-dead").mkdir()
    assert prepare_data(str(folder), None, tmp_path / "cache", vocab_size=VOCAB).path == first.path
    assert not list((tmp_path / "cache").glob(".*"))
    (folder / "new.txt").write_text("a new document\n")
    second = prepare_data(str(folder), str(first.tokenizer_path), tmp_path / "cache")
    assert second.path != first.path
    assert sum(second.split(s).num_documents for s in ("train", "validation")) == 6


# -- loaders --------------------------------------------------------------------------------------


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


# -- command-line tools ---------------------------------------------------------------------------


def run_tool(*args, cwd=None):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize("tool", ["tools/train_tokenizer.py", "tools/preprocess_data.py"])
def test_cli_help(tool):
    result = run_tool(str(REPO / tool), "--help")
    assert result.returncode == 0 and "--data PATH" in result.stdout and "hf:NAME" in result.stdout


def test_cli_errors_exit_2_with_one_line(tmp_path):
    for tool in ("tools/train_tokenizer.py", "tools/preprocess_data.py"):
        result = run_tool(str(REPO / tool), "--data", str(tmp_path / "missing"), "--no_progress", cwd=tmp_path)
        assert result.returncode == 2
        missing = tmp_path / "missing"
        assert result.stderr == f"error: data path '{missing}' does not exist (a hub dataset is written hf:NAME)\n"


def test_cli_train_then_preprocess(corpus, tmp_path):
    result = run_tool(str(REPO / "tools/train_tokenizer.py"), "--data", str(corpus), "--vocab_size", str(VOCAB),
                      "--output", str(tmp_path / "tok"), "--no_progress")
    assert result.returncode == 0, result.stderr
    result = run_tool(str(REPO / "tools/preprocess_data.py"), "--data", str(corpus), "--tokenizer",
                      str(tmp_path / "tok.model"), "--output", str(tmp_path / "data"), "--no_progress")
    assert result.returncode == 0, result.stderr
    assert "validation" in result.stdout
    assert TokenDataset(tmp_path / "data", "validation").num_tokens > 0

"""`camex_ds.data.corpus`: sources (folders, text files cut into pieces, one-line files cut at whitespace,
parquet, the hub), their one-line errors, the default corpus; and a ~3 MB file without a line break through the
launcher."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from camex_ds.data import DataError, PreparedDataset, default_corpus, prepare_data, resolve_source, write_dataset
from camex_ds.data.corpus import PIECE_BYTES, cut_line
from tests.launch import TINY, launch
from tests.unit.data.corpora import corpus, one_line, synthetic_text, tokenizer  # noqa: F401 (fixtures)


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


def test_cut_line_cuts_at_whitespace_else_at_a_character_boundary():
    rng = random.Random(0)
    text = one_line(rng, 50_000)
    parts = cut_line(text, 1000)
    assert "".join(p for _, p in parts) == text and len(parts) > 50
    data, offset = text.encode(), 0
    for start, part in parts:
        assert start == offset and data[start:].decode().startswith(part)
        assert 0 < len(part.encode()) <= 1000
        offset += len(part.encode())
    assert all(p.endswith(" ") and p.count(" ") > 1 for _, p in parts[:-1])  # at the last space that fits
    # no whitespace at all: cut at the byte limit, backed off to a character start (2-, 3- and 4-byte characters)
    stretch = "".join(rng.choice(["é", "日本", "🎉", "x"]) for _ in range(20_000))
    mixed = text[:3000] + stretch + " " + text[:3000]
    parts = cut_line(mixed, 1000)
    assert "".join(p for _, p in parts) == mixed
    sizes = [len(p.encode()) for _, p in parts]
    assert max(sizes) <= 1000 and sum(997 <= s < 1000 for s in sizes) > 10  # cut inside the stretch, short of 1000
    assert cut_line(text[:100], 1000) == [(0, text[:100])]
    with pytest.raises(ValueError, match="max_bytes 3"):
        cut_line(text, 3)


def test_a_one_line_file_is_cut_into_pieces_keyed_by_their_byte_offset(tmp_path):
    """The first piece keeps the line key `path:1`; the others start inside line 1: `path:1:BYTE`."""
    text = one_line(random.Random(1), 30 * PIECE_BYTES) + "\nshort last line\n"
    (tmp_path / "one.txt").write_text(text)
    docs = list(resolve_source(tmp_path / "one.txt").documents())
    assert "".join(d.text for d in docs) == text and len(docs) > 20
    assert docs[0].key == "one.txt:1" and all(len(d.text.encode()) <= PIECE_BYTES for d in docs)
    data = text.encode()
    for d in docs[1:]:
        name, line, offset = d.key.split(":")
        assert (name, line) == ("one.txt", "1") and data[int(offset):].decode().startswith(d.text)
    assert docs[-1].text.endswith("\nshort last line\n")  # the short line joins the tail of the long one


def test_a_3mb_file_without_line_breaks_trains_through_the_launcher(tmp_path, text_files):
    words = " ".join(Path(f).read_text() for f in text_files).replace("\n", " ")
    data = tmp_path / "one_line.txt"
    data.write_text(" ".join([words] * (3_000_000 // len(words) + 1)))
    assert data.stat().st_size >= 3_000_000 and b"\n" not in data.read_bytes()
    (tmp_path / "tiny.json").write_text(json.dumps(TINY))
    run = tmp_path / "run"
    code, err, _ = launch(["--model_config", tmp_path / "tiny.json", "--data", data, "--vocab_size", 512,
                           "--cache_dir", tmp_path / "cache", "--output_dir", run, "--max_steps", 2,
                           "--eval_interval", 2, "--eval_batches", 1, "--log_interval", 1, "--no_progress"])
    assert code == 0, err[-3000:]
    prepared = PreparedDataset.open(json.loads((run / "train_args.json").read_text())["prepared_data"])
    splits = prepared.index["splits"]
    assert splits["train"]["documents"] > 500 and splits["validation"]["documents"] > 10
    assert splits["train"]["bytes"] + splits["validation"]["bytes"] == data.stat().st_size

"""Issue 23 item 3: text with no line break (minified or exported) is cut at whitespace and trains like any other.

Beside tests/test_data.py (which is near the 500-line limit): `cut_line`, the document split of a one-line
file, the tokenizer on it, and a ~3 MB one-line file through the launcher.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from camex_ds.data import DataError, PreparedDataset, resolve_source, train_tokenizer
from camex_ds.data.corpus import PIECE_BYTES, cut_line
from camex_ds.data.tokenizer import MAX_LINE_BYTES
from tests.launch import TINY, launch


def one_line(rng: random.Random, size: int) -> str:
    """Words and punctuation separated by spaces, no newline, at least ``size`` characters."""
    words = ["".join(rng.choices("abcdefghijklmnoprstuvwyzé", k=rng.randint(1, 9))) for _ in range(100)]
    text, length = [], 0
    while length < size:
        text.append(rng.choice(words) + rng.choice(["", "", "", ",", "."]))
        length += len(text[-1]) + 1
    return " ".join(text)


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


def test_tokenizer_trains_on_text_without_line_breaks(tmp_path):
    text = one_line(random.Random(2), 8 * MAX_LINE_BYTES)
    tokenizer = train_tokenizer([text], 400, tmp_path / "tok")
    sample = text[:2000]
    ids = tokenizer.encode(sample)
    assert tokenizer.decode(ids) == sample and len(ids) < 0.75 * len(sample)  # merges learned from the long line
    with pytest.raises(DataError, match=r"^cannot train a tokenizer: the documents have no non-blank lines$"):
        train_tokenizer([" " * (3 * MAX_LINE_BYTES), "\n\t\n"], 400, tmp_path / "blank")


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

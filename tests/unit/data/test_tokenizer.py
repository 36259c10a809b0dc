"""`camex_ds.data.tokenizer`: deterministic, round-trips any text, trains on text without line breaks, clear
errors."""
from __future__ import annotations

import random

import pytest

from camex_ds.data import DataError, Tokenizer, resolve_source, train_texts, train_tokenizer
from camex_ds.data.tokenizer import MAX_LINE_BYTES
from tests.unit.data.corpora import VOCAB, corpus, one_line, tokenizer  # noqa: F401 (fixtures)


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


def test_tokenizer_trains_on_text_without_line_breaks(tmp_path):
    text = one_line(random.Random(2), 8 * MAX_LINE_BYTES)
    tokenizer = train_tokenizer([text], 400, tmp_path / "tok")
    sample = text[:2000]
    ids = tokenizer.encode(sample)
    assert tokenizer.decode(ids) == sample and len(ids) < 0.75 * len(sample)  # merges learned from the long line
    with pytest.raises(DataError, match=r"^cannot train a tokenizer: the documents have no non-blank lines$"):
        train_tokenizer([" " * (3 * MAX_LINE_BYTES), "\n\t\n"], 400, tmp_path / "blank")

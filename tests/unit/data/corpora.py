"""What the data tests share: synthetic corpora and file names on either side of the split rule, a tokenizer
and a prepared dataset made once per test module (fixtures: import them), and arange and one-line data."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from camex_ds.data import Tokenizer, resolve_source, split_of, train_texts, train_tokenizer, write_dataset
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


def one_line(rng: random.Random, size: int) -> str:
    """Words and punctuation separated by spaces, no newline, at least ``size`` characters."""
    words = ["".join(rng.choices("abcdefghijklmnoprstuvwyzé", k=rng.randint(1, 9))) for _ in range(100)]
    text, length = [], 0
    while length < size:
        text.append(rng.choice(words) + rng.choice(["", "", "", ",", "."]))
        length += len(text[-1]) + 1
    return " ".join(text)

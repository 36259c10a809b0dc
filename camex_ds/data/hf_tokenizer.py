"""A Hugging Face `tokenizer.json` (the `tokenizers` library) behind the small interface of `Tokenizer`.

An imported model continues training on text tokenized its own way: `--tokenizer` takes a model folder
or its `tokenizer.json`. Documents are encoded without special tokens and separated by the end-of-document
token, as with SentencePiece. That token is read from the file alone, so every copy of it (a dataset
folder, a consolidated model) agrees: the first of `EOS_TOKENS` the vocabulary has. It is the end of
text of every base model of the supported families (Llama 1-2, Mistral and TinyLlama `</s>`, GPT-2 and
Qwen2 `<|endoftext|>`, Llama 3 `<|end_of_text|>`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from .corpus import DataError

FILE_NAME = "tokenizer.json"
EOS_TOKENS = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")


def is_hf_tokenizer(path: str | os.PathLike) -> bool:
    """A folder (holding `tokenizer.json`) or a `.json` file: not a SentencePiece model."""
    path = Path(path)
    return path.is_dir() or path.suffix == ".json"


class HFTokenizer:
    """A loaded `tokenizer.json`; build one with `HFTokenizer.load(path)` (a file or the folder holding it)."""

    file_name = FILE_NAME

    def __init__(self, path: Path, tokenizer, eos_id: int):
        self.path = path
        self._tok = tokenizer
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        self.eos_id = eos_id

    @classmethod
    def load(cls, path: str | os.PathLike) -> "HFTokenizer":
        path = Path(path)
        if path.is_dir():
            path = path / FILE_NAME
        if not path.is_file():
            raise DataError(f"tokenizer file '{path}' does not exist")
        try:
            from tokenizers import Tokenizer as RustTokenizer
        except ImportError:
            raise DataError(f"reading '{path}' needs the `tokenizers` package: pip install 'camex_ds[hf]'") from None
        try:
            tokenizer = RustTokenizer.from_file(str(path))
        except Exception:  # the Rust side raises a bare Exception on any malformed file
            raise DataError(f"'{path}' is not a Hugging Face tokenizer.json") from None
        eos = next((tokenizer.token_to_id(t) for t in EOS_TOKENS if tokenizer.token_to_id(t) is not None), None)
        if eos is None:
            raise DataError(f"tokenizer '{path}' has no end-of-document token (one of {', '.join(EOS_TOKENS)}), "
                            "which separates documents")
        return cls(path, tokenizer, eos)

    @property
    def eos_token(self) -> str:
        return self._tok.id_to_token(self.eos_id)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"HFTokenizer('{self.path}', vocab_size={self.vocab_size})"

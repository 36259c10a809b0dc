"""A second, English-prose corpus present on every machine with Python: the docstrings of its standard library.

The default corpus is code (`corpus.default_corpus`); a model pretrained on it and fine-tuned on prose sees a real
change of domain, with no download. The tests use the same text as plain text nobody here wrote.
"""
from __future__ import annotations

import ast
import sysconfig
from pathlib import Path

#: Docstrings shorter than this are mostly one-line summaries: left out, so the text is paragraphs of prose.
MIN_DOCSTRING_CHARS = 200
#: Every VALID_EVERY-th docstring goes to valid.txt, the others to train.txt.
VALID_EVERY = 8


def write_prose_corpus(folder: Path, train_bytes: int = 300_000, valid_bytes: int = 40_000) -> tuple[Path, Path]:
    """`(train.txt, valid.txt)` in `folder`: the docstrings (of modules, classes and functions, at least
    `MIN_DOCSTRING_CHARS` long) of the `.py` files at the top of this Python's standard library
    (`sysconfig.get_paths()["stdlib"]`, sorted by name), every `VALID_EVERY`-th to validation, until both files
    reach their sizes (about 600 KB and 90 KB exist on Python 3.11). Paragraphs are separated by blank lines.
    A file that already holds the same text is left as it is: the data cache keys a file by its modification time
    too, so a rewrite would prepare the same text again."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    train, valid, sizes = [], [], [0, 0]
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= MIN_DOCSTRING_CHARS:
                    which = int((len(train) + len(valid)) % VALID_EVERY == VALID_EVERY - 1)
                    (valid if which else train).append(doc)
                    sizes[which] += len(doc)
        if sizes[0] >= train_bytes and sizes[1] >= valid_bytes:
            break
    for name, docs in (("train.txt", train), ("valid.txt", valid)):
        text = "\n\n".join(docs) + "\n"
        path = folder / name
        if not (path.is_file() and path.read_text(encoding="utf-8") == text):
            path.write_text(text, encoding="utf-8")
    return folder / "train.txt", folder / "valid.txt"

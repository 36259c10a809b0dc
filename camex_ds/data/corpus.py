"""Text sources: what a ``--data`` value names, read as a deterministic stream of documents.

``resolve_source(data)`` accepts:

* ``None``: the default corpus (below);
* a ``.jsonl`` file: one JSON object per line, its ``"text"`` field is a document;
* a ``.parquet`` file: read through ``datasets``, each row's ``text`` column is a document;
* any other file: plain UTF-8 text. A file of up to ``PIECE_BYTES`` is one document; a longer one is cut
  into documents of at most ``PIECE_BYTES``: consecutive paragraphs (separated by blank lines) are joined
  while they fit, a longer paragraph is cut at line ends, and a longer line at whitespace (``cut_line``).
  The pieces concatenate to the file exactly. So a single text file (a corpus's ``train.txt``) gives both
  splits, even when it has no line break at all;
* a folder: every file below it whose suffix is in ``TEXT_SUFFIXES`` (hidden entries and
  ``__pycache__`` skipped), in sorted relative-path order, each read as above;
* ``hf:NAME`` or ``hf:NAME:CONFIG``: the ``train`` split of a Hugging Face hub dataset (needs a
  network), each row's ``text`` is a document. The prefix keeps a mistyped path from turning into a
  network request.

``resolve_source(data, whole_files=True)`` keeps every plain text file one document however long: what an
evaluation over whole documents (lm-evaluation-harness's rolling loglikelihood, ``camex-evaluate --stride``) reads.

Every document carries a stable key: its relative path (a whole text file), ``path:LINE`` for a piece of a
text file that starts a line (the 1-based line) or for a JSONL line, ``path:LINE:BYTE`` for a piece of a text
file that starts inside a long line (BYTE: its 0-based UTF-8 byte offset in that line), ``path#ROW`` for a
Parquet or hub row (0-based). The key alone decides the document's split (see ``dataset.py``), so it must
not depend on anything but the document's place in the source.
Empty documents are skipped.

Default corpus: the running interpreter's standard-library ``.py`` files
(``sysconfig.get_paths()["stdlib"]`` without ``site-packages``/``dist-packages``/``__pycache__``),
sorted by relative path, taken while their total size stays within ``DEFAULT_CORPUS_MAX_BYTES``.
It is real text present on every machine with Python. The cap keeps preparation to seconds: the
whole stdlib is ~31 MB (3.11), while the 8 MB prefix (691 files, ``__future__.py`` .. ``lib2to3/``)
gives 2.63 M tokens with a 4096-piece BPE vocabulary, prepared in ~3.5 s on 2 cores (tokenizer 1.3 s,
tokenization 1.7 s); one epoch is 9.5 k training windows of 256 tokens.
The default corpus skips files that are not valid UTF-8 (a few encoding tests under ``test/``,
beyond the cap in 3.11) instead of failing. Its files stay whole documents (its 691 files already give both
splits, and the figures above and in docs/results.md were measured that way).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

DEFAULT_CORPUS_MAX_BYTES = 8_000_000
PIECE_BYTES = 4096  # longer plain text files are cut into documents of at most this size (UTF-8 bytes)
WHITESPACE_BYTES = b" \t\n\r\x0b\x0c"  # where cut_line prefers to cut (ASCII whitespace)
TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst", ".py", ".jsonl", ".parquet")
TEXT_FIELD = "text"
INDEX_FILE = "index.json"  # marks a preprocessed dataset folder (see dataset.py)
HUB_PREFIX = "hf:"
# Help text for a --data option (training tools can put "a preprocessed dataset folder, " in front).
DATA_HELP = (
    'a text file (one document), a .jsonl file (a "text" field per line), a .parquet file (a "text" column), '
    "a folder of such files (read recursively in sorted order), or hf:NAME[:CONFIG] for a Hugging Face hub "
    f"dataset; default: the first {DEFAULT_CORPUS_MAX_BYTES // 10**6} MB of this Python's standard-library sources"
)


class DataError(ValueError):
    """A problem with the user's data or data settings; its message is one line naming the bad value."""


@dataclass(frozen=True)
class Document:
    key: str
    text: str


class Source:
    """A resolved ``--data`` value: a description, a cache identity and a document stream."""

    description: str  # human readable, stored in the dataset index
    name: str  # short label for cache folder names
    num_documents: int | None = None  # known in advance only for some sources (progress bars)

    def identity(self) -> str:
        """A string that changes whenever the documents may have changed (cache key input)."""
        raise NotImplementedError

    def documents(self) -> Iterator[Document]:
        raise NotImplementedError


class FileSource(Source):
    """Files under ``root`` (relative paths, already sorted), each read according to its suffix.

    Plain text files longer than ``piece_bytes`` are cut into pieces (module docstring); ``None`` keeps
    every file whole.
    """

    def __init__(self, root: Path, files: list[str], description: str, name: str, skip_undecodable=False,
                 piece_bytes: int | None = PIECE_BYTES):
        self.root, self.files, self.description, self.name = root, files, description, name
        self.skip_undecodable, self.piece_bytes = skip_undecodable, piece_bytes
        if piece_bytes is None and not any(f.endswith((".jsonl", ".parquet")) for f in files):
            self.num_documents = len(files)

    def identity(self) -> str:
        stats = []
        for rel in self.files:
            st = (self.root / rel).stat()
            stats.append((rel, st.st_size, st.st_mtime_ns))
        payload = json.dumps([str(self.root.resolve()), self.skip_undecodable, self.piece_bytes, stats])
        return hashlib.sha256(payload.encode()).hexdigest()

    def documents(self) -> Iterator[Document]:
        for rel in self.files:
            path = self.root / rel
            if rel.endswith(".jsonl"):
                yield from _jsonl_documents(path, rel)
            elif rel.endswith(".parquet"):
                yield from _dataset_documents(_load_parquet(path), rel, str(path))
            else:
                try:
                    text = path.read_bytes().decode("utf-8")
                except UnicodeDecodeError as e:
                    if self.skip_undecodable:
                        continue
                    raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
                if self.piece_bytes is None or len(text.encode("utf-8")) <= self.piece_bytes:
                    if text:
                        yield Document(rel, text)
                    continue
                for line, offset, piece in text_pieces(text, self.piece_bytes):
                    yield Document(f"{rel}:{line}:{offset}" if offset else f"{rel}:{line}", piece)


class HubSource(Source):
    """The ``train`` split of a Hugging Face hub dataset, loaded on first use."""

    def __init__(self, name: str, config: str | None):
        self.hub_name, self.config = name, config
        self.description = f"hub dataset {name}" + (f" ({config})" if config else "")
        self.name = (name + ("-" + config if config else "")).replace("/", "-")
        self._dataset = None

    def _load(self):
        if self._dataset is None:
            import datasets  # heavy import, only needed here

            try:
                self._dataset = datasets.load_dataset(self.hub_name, self.config, split="train")
            except Exception as e:  # network, auth, missing dataset...: all the user's to fix
                first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise DataError(f"cannot load {self.description}: {first_line}") from None
            self.num_documents = len(self._dataset)
        return self._dataset

    def identity(self) -> str:
        # datasets' own content fingerprint: changes with the dataset revision.
        return f"{self.hub_name}|{self.config}|{self._load()._fingerprint}"

    def documents(self) -> Iterator[Document]:
        yield from _dataset_documents(self._load(), self.hub_name, self.description)


def resolve_source(data: str | os.PathLike | None, whole_files: bool = False) -> Source:
    """Turn a ``--data`` value into a Source (see the module docstring for what is accepted); ``whole_files``
    keeps long plain text files whole instead of cutting them into pieces."""
    if data is None:
        return default_corpus()
    spec = str(data)
    if spec.startswith(HUB_PREFIX):
        name, _, config = spec[len(HUB_PREFIX):].partition(":")
        if not name:
            raise DataError(f"hub dataset {spec!r} has no name; write hf:NAME or hf:NAME:CONFIG")
        return HubSource(name, config or None)
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"data path {spec!r} does not exist (a hub dataset is written hf:NAME)")
    piece_bytes = None if whole_files else PIECE_BYTES
    if path.is_file():
        return FileSource(path.parent, [path.name], f"file {path}", path.name, piece_bytes=piece_bytes)
    if (path / INDEX_FILE).is_file():
        raise DataError(f"{spec!r} is already a preprocessed dataset; pass it to training as it is")
    files = sorted(
        p.relative_to(path).as_posix()
        for p in _walk(path)
        if p.suffix in TEXT_SUFFIXES
    )
    if not files:
        raise DataError(f"no documents found in folder {spec!r} (looked for {', '.join(TEXT_SUFFIXES)} files)")
    return FileSource(path, files, f"folder {path} ({len(files)} files)", path.resolve().name or "root",
                      piece_bytes=piece_bytes)


def default_corpus(max_bytes: int = DEFAULT_CORPUS_MAX_BYTES) -> Source:
    """The first ``max_bytes`` of this interpreter's standard-library ``.py`` files, in sorted order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for rel in sorted(
        p.relative_to(root).as_posix()
        for p in _walk(root, skip=("site-packages", "dist-packages"))
        if p.suffix == ".py"
    ):
        size = (root / rel).stat().st_size
        if total + size > max_bytes:
            break
        files.append(rel)
        total += size
    version = "{}.{}".format(*sys.version_info[:2])
    description = f"default corpus: first {len(files)} .py files ({total} bytes) of the Python {version} stdlib {root}"
    return FileSource(root, files, description, f"python{version}-stdlib", skip_undecodable=True, piece_bytes=None)


def text_pieces(text: str, max_bytes: int = PIECE_BYTES) -> list[tuple[int, int, str]]:
    """``(first line, byte offset in it, piece)`` of a plain text cut into pieces of at most ``max_bytes``
    UTF-8 bytes.

    Paragraphs (a run of non-blank lines and the blank lines after it) are joined while they fit; a
    paragraph longer than ``max_bytes`` is cut at line ends, and a longer line by ``cut_line``. The pieces
    concatenate to ``text``, and each is keyed by where it starts (line, and byte offset for a piece that
    starts inside a line), so a piece's key depends only on the text before it.
    """
    pieces = []  # [first line, byte offset, parts, bytes]
    for start, paragraph in _paragraphs(_lines(text)):
        whole = "".join(paragraph)
        if len(whole.encode("utf-8")) <= max_bytes:
            units = [(start, 0, whole)]
        else:
            units = [(line, offset, part) for line, full in enumerate(paragraph, start)
                     for offset, part in cut_line(full, max_bytes)]
        for line, offset, part in units:
            size = len(part.encode("utf-8"))
            if not pieces or pieces[-1][3] + size > max_bytes:
                pieces.append([line, offset, [], 0])
            pieces[-1][2].append(part)
            pieces[-1][3] += size
    return [(line, offset, "".join(parts)) for line, offset, parts, _ in pieces]


def cut_line(line: str, max_bytes: int) -> list[tuple[int, str]]:
    """``(byte offset, part)`` of ``line`` cut into parts of at most ``max_bytes`` UTF-8 bytes.

    Needed because text can come as one huge line (minified or exported), which SentencePiece would skip
    and the document split would keep whole. Each part ends after the last ASCII whitespace that fits, or,
    in a stretch without whitespace, at the last UTF-8 character boundary that fits. The parts concatenate
    to ``line``; a line that fits is one part.
    """
    if max_bytes < 4:
        raise ValueError(f"max_bytes {max_bytes} cannot hold every UTF-8 character; use 4 or more")
    data = line.encode("utf-8")
    if len(data) <= max_bytes:
        return [(0, line)]
    parts, start = [], 0
    while len(data) - start > max_bytes:
        limit = start + max_bytes
        end = max(data.rfind(byte, start, limit) for byte in WHITESPACE_BYTES) + 1
        if end <= start:  # no whitespace: back off continuation bytes (10xxxxxx) to a character start
            end = limit
            while data[end] & 0xC0 == 0x80:
                end -= 1
        parts.append((start, data[start:end].decode("utf-8")))
        start = end
    parts.append((start, data[start:].decode("utf-8")))
    return parts


def _lines(text: str) -> list[str]:
    """The lines of ``text`` with their ``\\n`` (only ``\\n`` ends a line, as in editors and ``grep -n``)."""
    lines = text.split("\n")
    return [line + "\n" for line in lines[:-1]] + ([lines[-1]] if lines[-1] else [])


def _paragraphs(lines: list[str]) -> Iterator[tuple[int, list[str]]]:
    """``(first line number, lines)`` of each paragraph: non-blank lines, then the blank lines after them."""
    start, current = 1, []
    for number, line in enumerate(lines, 1):
        if line.strip() and current and not current[-1].strip():  # a non-blank line after blank ones
            yield start, current
            start, current = number, []
        current.append(line)
    if current:
        yield start, current


def _walk(root: Path, skip=()) -> Iterator[Path]:
    """Regular files below root, skipping hidden entries, ``__pycache__`` and the ``skip`` folder names."""
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if not d.startswith(".") and d != "__pycache__" and d not in skip]
        for name in names:
            if not name.startswith("."):
                yield Path(folder, name)


def _jsonl_documents(path: Path, rel: str) -> Iterator[Document]:
    with open(path, encoding="utf-8") as f:
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
                text = record.get(TEXT_FIELD) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise DataError(f'{path}:{lineno}: expected an object with a string "{TEXT_FIELD}" field')
                if text:
                    yield Document(f"{rel}:{lineno}", text)
        except UnicodeDecodeError as e:
            raise DataError(f"{path} is not UTF-8 text ({e.reason})") from None


def _load_parquet(path: Path):
    import datasets  # heavy import, only needed here

    return datasets.load_dataset("parquet", data_files=str(path), split="train")


def _dataset_documents(dataset, key_prefix: str, what: str) -> Iterator[Document]:
    if TEXT_FIELD not in dataset.column_names:
        raise DataError(f"{what} has no {TEXT_FIELD!r} column (columns: {', '.join(dataset.column_names)})")
    row = 0
    for batch in dataset.select_columns([TEXT_FIELD]).iter(batch_size=1024):
        for text in batch[TEXT_FIELD]:
            if text:
                yield Document(f"{key_prefix}#{row}", text)
            row += 1

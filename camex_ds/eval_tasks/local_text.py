"""The documents of a local file as the dataset of the `camex_local_text` lm-eval task (its `custom_dataset`).

lm-eval calls `load_documents` with the task's metadata, where `--metadata '{"text_file": PATH}'` puts the
path, so one task definition evaluates any file without editing it. The documents are those
`camex-evaluate --stride` scores (`resolve_source(path, whole_files=True)`): a text file is one document, a
.jsonl file one per line ("text"), a folder its files.
"""
from __future__ import annotations


def load_documents(text_file=None, **_metadata):
    """A `datasets.DatasetDict` whose "test" split has one row per document, its text in "text"."""
    import datasets

    from camex_ds.data import resolve_source

    if text_file is None:
        raise ValueError("the camex_local_text task reads a local file: pass --metadata '{\"text_file\": \"PATH\"}'")
    texts = [document.text for document in resolve_source(text_file, whole_files=True).documents()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": texts})})

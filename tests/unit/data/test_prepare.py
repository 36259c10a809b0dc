"""`camex_ds.data.prepare`: the dataset cache (built once under concurrent ranks, rebuilt when the source changes
or an entry is damaged)."""
from __future__ import annotations

import shutil
import threading

import pytest

from camex_ds.data import DataError, prepare_data
from camex_ds.data import prepare as prepare_module
from tests.unit.data.corpora import VOCAB, corpus, names_in, write_corpus  # noqa: F401 (fixtures)


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

"""The validation set a run evaluates on (camex_ds.train.splits): the whole split by default, capped by training
time, the same windows at any micro batch, and a clear error only for an explicit number the split cannot fill."""
import json
from types import SimpleNamespace

import pytest

from camex_ds.data import DataError
from camex_ds.data.prose import write_prose_corpus
from camex_ds.train.splits import eval_windows

from tests.launch import TINY, launch


def _args(eval_windows=None, eval_batches=None, eval_interval=100, max_steps=1000):
    return SimpleNamespace(eval_windows=eval_windows, eval_batches=eval_batches, eval_interval=eval_interval,
                           max_steps=max_steps)


def _split(windows, seq_len=32):
    return SimpleNamespace(num_windows=lambda s: windows if s == seq_len else None, num_tokens=windows * (seq_len + 1),
                           path="val")


def test_default_is_the_whole_split_up_to_a_cap_set_by_the_tokens_per_step():
    assert eval_windows(_args(), _split(60), 32, micro=8, windows_per_step=8) == 60
    # 10% of the training time between evaluations: 0.1 x 3 forwards x 100 steps x 8 windows per step
    assert eval_windows(_args(), _split(10_000), 32, micro=8, windows_per_step=8) == 240
    # micro 8 x accumulation 1 and micro 2 x accumulation 4 train on the same windows per step: the same set
    assert eval_windows(_args(), _split(10_000), 32, micro=2, windows_per_step=8) == 240
    # a run shorter than one interval: 10% of all its training, 0.1 x 3 x 2 steps x 8 windows
    assert eval_windows(_args(max_steps=2), _split(10_000), 32, micro=8, windows_per_step=8) == 5


def test_explicit_numbers_are_kept_and_checked():
    assert eval_windows(_args(eval_windows=7), _split(60), 32, micro=8, windows_per_step=8) == 7
    assert eval_windows(_args(eval_batches=2), _split(60), 32, micro=8, windows_per_step=8) == 16
    with pytest.raises(DataError, match=r"60 windows .* fewer than --eval_windows 61: lower --eval_windows to 60"):
        eval_windows(_args(eval_windows=61), _split(60), 32, micro=8, windows_per_step=8)
    with pytest.raises(DataError, match=r"fewer than --eval_batches 16 x micro batch 8 = 128: lower --eval_batches "
                                         r"to 7 or less"):
        eval_windows(_args(eval_batches=16), _split(60), 32, micro=8, windows_per_step=8)
    with pytest.raises(DataError, match=r"0 windows .*: give a separate validation text \(--val_data\)"):
        eval_windows(_args(), _split(0), 32, micro=8, windows_per_step=8)


def _final(out):
    return json.loads((out / "final_metrics.json").read_text())


def test_the_default_trains_and_evaluates_on_a_1_mb_text(tmp_path):
    """A typical corpus's validation file (1 MB) as --data with the default model and flags: it has fewer
    validation windows than the old fixed 16 x 8, and the run evaluates on all it has up to the cap (30 steps: 72
    windows, more than the split has)."""
    train, valid = write_prose_corpus(tmp_path / "text", train_bytes=1_000_000, valid_bytes=100_000)
    text = train.read_text() + valid.read_text()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text * (1_100_000 // len(text) + 1))  # the stdlib's top-level docstrings are ~0.7 MB
    assert corpus.stat().st_size > 1e6
    out = tmp_path / "run"
    code, err, stdout = launch(["--data", corpus, "--cache_dir", tmp_path / "cache", "--output_dir", out,
                                "--max_steps", 30, "--no_progress"])
    assert code == 0, err
    final = _final(out)
    assert 0 < final["val_windows"] < 16 * 8 and final["val_tokens"] == final["val_windows"] * 256
    assert f"validation: all {final['val_windows']} windows of the validation split" in stdout
    assert final["val_loss"] > 0


def test_micro_batch_and_accumulation_do_not_change_the_validation_windows(tmp_path, text_files):
    """8 x 1 and 2 x 4: the same windows, so the same validation loss for the same weights (lr 0 keeps the
    initial ones); --eval_batches would have given them 16 x 8 and 16 x 2 windows."""
    from camex_ds.config import read_json_object
    from camex_ds.run_args import DEFAULT_DEEPSPEED_CONFIG

    model = tmp_path / "tiny.json"
    model.write_text(json.dumps(TINY))
    finals = {}
    for micro, accum in ((8, 1), (2, 4)):
        ds = read_json_object(DEFAULT_DEEPSPEED_CONFIG, "ds")
        ds.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum)
        ds["optimizer"]["params"]["lr"] = 0.0
        ds_path = tmp_path / f"ds_{micro}x{accum}.json"
        ds_path.write_text(json.dumps(ds))
        out = tmp_path / f"run_{micro}x{accum}"
        code, err, _ = launch(["--model_config", model, "--deepspeed_config", ds_path, "--data", text_files[0],
                               "--val_data", text_files[1], "--vocab_size", 512, "--cache_dir", tmp_path / "cache",
                               "--output_dir", out, "--max_steps", 1, "--no_progress"])
        assert code == 0, err
        finals[micro] = _final(out)
    assert finals[8]["val_windows"] == finals[2]["val_windows"] == 2  # the cap: 0.1 x 3 x 1 step x 8, rounded
    assert finals[8]["val_tokens"] == finals[2]["val_tokens"]
    assert finals[8]["val_loss"] == pytest.approx(finals[2]["val_loss"], rel=1e-6)

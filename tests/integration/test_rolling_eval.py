"""Issue 25: `camex-evaluate --stride` scores whole documents as lm-evaluation-harness's wikitext task does, and
lm-eval itself, run offline on our exported model through the repository's local-file task, gets the same numbers.

Tiny camex models (tests/integration/test_hf_export.py's) with a character-level tokenizer.json, or with a SentencePiece
model as our pipeline trains it, are consolidated and exported; the documents are longer and shorter than the
32-token window, and some hold characters outside the vocabulary (bytes and tokens differ).
"""
from __future__ import annotations

import json
import math
import string
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from camex_ds.ckpt.format import load_pretrained, save_pretrained  # noqa: E402
from camex_ds.ckpt.hf import export_hf  # noqa: E402
from camex_ds.cli import evaluate as evaluate_cli  # noqa: E402
from camex_ds.model import GPT  # noqa: E402
from camex_ds.train.rolling import rolling_windows  # noqa: E402
from tests.integration.test_hf_export import CASES, SEGMENT, SEQ_LEN, _model  # noqa: E402

TASKS = Path(__file__).resolve().parents[2] / "camex_ds" / "eval_tasks"
DOCUMENTS = ["the quick brown fox jumps over the lazy dog.\n" * 4,  # 180 tokens, 37 words: 6 windows
             "a short one,\nin a café.",  # 23 tokens, 24 bytes (é is <unk>), 6 words: 1 window
             "words  and\tmore   words " * 3]  # 75 tokens, 13 words: 3 windows


def _export(root: Path, model, tokenizer: Path, documents: list) -> dict:
    """The consolidated model (`src`, with the tokenizer), its export (`hf`) and the documents (`jsonl`)."""
    (root / "src").mkdir()
    save_pretrained(root / "src", model.state_dict(), model.config, tokenizer)
    export_hf(root / "src", root / "hf")
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    return {"src": root / "src", "hf": root / "hf", "jsonl": root / "docs.jsonl"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    """A camex model with a character-level tokenizer.json that, like Llama's, adds BOS when asked for special
    tokens (as lm-eval asks unless `add_bos_token=False`), on DOCUMENTS."""
    from tokenizers import Tokenizer, models, processors

    root = tmp_path_factory.mktemp("rolling")
    chars = string.ascii_lowercase + " \n\t.,"
    vocab = {"</s>": 0, "<unk>": 1, "<s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    tokenizer.save(str(root / "tokenizer.json"))
    return _export(root, _model("llama", CASES["camex"]), root / "tokenizer.json", DOCUMENTS)


@pytest.fixture(scope="module")
def sentencepiece_folders(tmp_path_factory) -> dict:
    """The tokenizer our pipeline trains (SentencePiece, byte fallback), which the export copies as
    tokenizer.model for transformers to convert; documents with indentation and characters it never saw."""
    from camex_ds.data import train_tokenizer

    root = tmp_path_factory.mktemp("rolling-sp")
    documents = DOCUMENTS + ["def f(x):\n    return x  # naïve ✓ 12345\n", "ünïcödé — ⟨text⟩ " * 5]
    tokenizer = train_tokenizer(DOCUMENTS * 10, 300, root / "tok")
    torch.manual_seed(0)
    return _export(root, GPT(_model("gpt", CASES["dynamic-camex"]).config.replace(vocab_size=300)).eval(),
                   tokenizer.path, documents)


def _camex_evaluate(capsys, *args) -> tuple[int, str, str]:
    code = evaluate_cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("length", [1, 5, SEQ_LEN, SEQ_LEN + 1, 100])
@pytest.mark.parametrize("stride", [1, 7, SEQ_LEN])
def test_rolling_windows_score_every_token_once_with_the_context_before_it(length, stride):
    tokens, prefix = list(range(100, 100 + length)), 0
    windows = rolling_windows(tokens, prefix, SEQ_LEN, stride)
    assert [t for _, targets in windows for t in targets] == tokens
    stream = [prefix] + tokens
    for ids, targets in windows:
        assert len(ids) == min(SEQ_LEN, length)
        end = stream.index(targets[-1])  # the input is the stream just before the last target
        assert ids == stream[end - len(ids):end]
    assert all(len(targets) == stride for _, targets in windows[1:-1])


def test_whole_files_keep_a_long_text_one_document(tmp_path):
    """Training cuts a long text file into 4 KB pieces; rolling evaluation keeps it one document, as lm-eval would."""
    from camex_ds.data import resolve_source

    text = "a line of text\n\n" * 1000
    (tmp_path / "long.txt").write_text(text)
    assert len(list(resolve_source(tmp_path / "long.txt").documents())) > 1
    assert [d.text for d in resolve_source(tmp_path / "long.txt", whole_files=True).documents()] == [text]
    assert [d.text for d in resolve_source(tmp_path, whole_files=True).documents()] == [text]


def test_stride_scores_each_token_given_what_precedes_it(folders, capsys, single_thread):
    """A document shorter than the window: one forward of EOS and its tokens; smaller strides add context and
    cover the same tokens, words and bytes."""
    text = DOCUMENTS[1]
    code, out, _ = _camex_evaluate(capsys, "--model", folders["src"], "--val_data", folders["jsonl"],
                                   "--stride", SEQ_LEN)
    assert code == 0
    result = json.loads(out.splitlines()[-1])
    assert (result["documents"], result["windows"], result["words"]) == (3, 6 + 1 + 3, 37 + 6 + 13)
    assert result["bytes"] == sum(len(d.encode()) for d in DOCUMENTS) == result["tokens"] + 1
    from camex_ds.data import Tokenizer

    ids = Tokenizer.load(folders["src"] / "tokenizer.json").encode(text)
    model = load_pretrained(folders["src"])
    padded = [0] + ids[:-1] + [0] * (-len(ids) % SEGMENT)
    with torch.no_grad():
        logprobs = F.log_softmax(model(torch.tensor([padded])).logits[0, :len(ids)], -1)
    alone = float(logprobs.gather(-1, torch.tensor(ids)[:, None]).sum())
    (folders["src"].parent / "one.txt").write_text(text)
    code, out, _ = _camex_evaluate(capsys, "--model", folders["src"], "--val_data", folders["src"].parent / "one.txt",
                                   "--stride", SEQ_LEN)
    assert math.isclose(json.loads(out.splitlines()[-1])["loglikelihood"], alone, rel_tol=1e-6)
    code, out, _ = _camex_evaluate(capsys, "--model", folders["src"], "--val_data", folders["jsonl"], "--stride", 5)
    strided = json.loads(out.splitlines()[-1])
    assert {k: strided[k] for k in ("tokens", "words", "bytes")} == {k: result[k] for k in ("tokens", "words", "bytes")}
    assert strided["windows"] > result["windows"] and strided["loglikelihood"] != result["loglikelihood"]


@pytest.mark.parametrize("args,message", [
    (["--stride", "0"], "--stride=0 is invalid: expected an integer from 1 to 32, the window (the model's seq_len)"),
    (["--stride", "33"], "--stride=33 is invalid: expected an integer from 1 to 32"),
    (["--stride", "8", "--max_windows", "2"], "it takes neither --max_windows nor --max_batches"),
    (["--stride", "8", "--data", "default"], "give --val_data, without --data or --split"),
])
def test_bad_stride_is_one_line(folders, capsys, args, message):
    code, _, err = _camex_evaluate(capsys, "--model", folders["src"], "--val_data", folders["jsonl"], *args)
    assert code == 2 and err.count("\n") == 1 and message in err, err


def test_routing_whose_gates_see_their_segment_is_refused_in_one_line(folders, tmp_path, capsys):
    model = _model("gpt", {"method": "camex", "routing": "segment"})
    save_pretrained(tmp_path, model.state_dict(), model.config, folders["src"] / "tokenizer.json")
    code, _, err = _camex_evaluate(capsys, "--model", tmp_path, "--val_data", folders["jsonl"], "--stride", "8")
    assert code == 2 and err.count("\n") == 1 and "routing='segment'" in err, err


@pytest.mark.parametrize("tokenizer", ["tokenizer.json", "sentencepiece"])
def test_lm_eval_on_the_export_gives_our_bits_per_byte(tokenizer, request, capsys, monkeypatch, single_thread):
    """lm-eval 0.4's `hf` model with trust_remote_code, offline, on the repository's local-file task."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install -e '.[lm_eval]'")
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    tokens = list(range(100, 170))
    for stride in (1, 7, SEQ_LEN):  # our windows are lm-eval's, at its context_len = window - stride + 1
        theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, 0, SEQ_LEN, SEQ_LEN - stride + 1)]
        ours = rolling_windows(tokens, 0, SEQ_LEN, stride)
        assert [(ids[:len(ids) - len(t) + 1], t) for ids, t in ours] == theirs

    folders = request.getfixturevalue("folders" if tokenizer == "tokenizer.json" else "sentencepiece_folders")
    code, out, _ = _camex_evaluate(capsys, "--model", folders["src"], "--val_data", folders["jsonl"],
                                   "--stride", SEQ_LEN, "--batch_size", 3)
    ours = json.loads(out.splitlines()[-1])
    tasks = TaskManager(include_path=str(TASKS), metadata={"text_file": str(folders["jsonl"])})
    model_args = {"pretrained": str(folders["hf"]), "trust_remote_code": True, "dtype": "float32",
                  "add_bos_token": False}  # docs/hf.md's command
    result = lm_eval.simple_evaluate(model="hf", model_args=model_args, tasks=["camex_local_text"], task_manager=tasks,
                                     batch_size=4, device="cpu", log_samples=False)
    theirs = result["results"]["camex_local_text"]
    for metric in ("bits_per_byte", "word_perplexity", "byte_perplexity"):
        assert abs(theirs[f"{metric},none"] / ours[metric] - 1) < 1e-3, (metric, theirs, ours)

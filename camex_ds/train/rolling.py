"""Perplexity over whole documents as lm-evaluation-harness's wikitext task computes it, with a stride.

lm-eval's `loglikelihood_rolling` scores each document's tokens exactly once, in windows of the model's
`max_length` tokens (`lm_eval.utils.get_rolling_token_windows` and `make_disjoint_window`, v0.4.13): the first
window feeds a prefix token (BOS, else EOS: ours is EOS, which ends every document in our training stream)
and then the document's first `max_length - 1` tokens, and scores all `max_length` of them; each later
window scores the next `stride` tokens given the `window - stride` tokens before them (the last window
scores what remains with a full window of context). lm-eval always runs `stride = window` (its
`context_len = 1`); `--stride S` is its `context_len = window - S + 1`, and a smaller stride gives each scored
token more context at the cost of more forwards.

The metrics are lm-eval's aggregations (`lm_eval/api/metrics.py`) of the summed log-likelihood `LL` over all
documents, with words and bytes counted on each document's text as its task counts them
(`len(re.split(r"\\s+", text))`, UTF-8 bytes): word and byte perplexity `exp(-LL / units)`, bits per byte
`-LL / (bytes ln 2)`, and token perplexity `exp(-LL / tokens)`.
"""
from __future__ import annotations

import math
import re
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from ..config import ConfigError
from ..data import DataError, bits_per_byte


def count_words(text: str) -> int:
    """lm-eval's word count for perplexity tasks (`Task.count_words`): empty strings at the ends count too."""
    return len(re.split(r"\s+", text))


def count_bytes(text: str) -> int:
    """lm-eval's byte count (`Task.count_bytes`): UTF-8 bytes, the unit of bits per byte whatever the tokenizer."""
    return len(text.encode("utf-8"))


def check_stride(stride: int, window: int) -> None:
    """A window scores at most its own length and at least one new token (0 would never advance)."""
    if not 1 <= stride <= window:
        raise ConfigError(f"--stride={stride} is invalid: expected an integer from 1 to {window}, the window "
                          "(the model's seq_len)")


def rolling_windows(tokens: Sequence[int], prefix: int, window: int, stride: int) -> list[tuple[list, list]]:
    """`(input_ids, targets)` per window: the logits at the last `len(targets)` positions of `input_ids` predict
    `targets`, and the targets of all windows are `tokens`, each once (lm-eval's windows for `stride = window`)."""
    check_stride(stride, window)
    tokens = list(tokens)
    if not tokens:
        return []
    first = min(window, len(tokens))
    windows = [([prefix] + tokens[:first - 1], tokens[:first])]
    done = first
    while done < len(tokens):
        end = min(len(tokens), done + stride)
        windows.append((tokens[end - window - 1:end - 1], tokens[done:end]))
        done = end
    return windows


def text_metrics(loglikelihood: float, tokens: int, words: int, num_bytes: int) -> dict:
    """lm-eval's perplexity metrics of a summed log-likelihood (nats), and token perplexity."""
    nll = -loglikelihood
    return {"token_perplexity": math.exp(nll / tokens), "word_perplexity": math.exp(nll / words),
            "byte_perplexity": math.exp(nll / num_bytes),
            "bits_per_byte": bits_per_byte(nll / tokens, tokens, num_bytes)}


@torch.no_grad()
def windows_loglikelihood(model, windows: list[tuple[list, list]], batch_size: int, pad_id: int, multiple: int,
                          device="cpu") -> float:
    """Summed log-probability of every window's targets. A batch is right-padded to its longest window, rounded
    up to `multiple` (whole segments): exact for a causal model, whose logits never see later positions."""
    total = 0.0
    for start in range(0, len(windows), batch_size):
        batch = windows[start:start + batch_size]
        length = max(len(ids) for ids, _ in batch)
        length += -length % multiple
        x = torch.tensor([ids + [pad_id] * (length - len(ids)) for ids, _ in batch], device=device)
        logprobs = F.log_softmax(model(x).logits.float(), dim=-1)
        for row, (ids, targets) in enumerate(batch):
            scored = logprobs[row, len(ids) - len(targets):len(ids)]
            total += float(scored.gather(-1, torch.tensor(targets, device=device)[:, None]).sum())
    return total


def evaluate_documents(model, tokenizer, texts: Iterable[str], stride: int, batch_size: int, multiple: int,
                       device="cpu") -> dict:
    """lm-eval's rolling perplexity metrics of the documents under `model` (a `GPT` in eval mode), windows of
    its `seq_len` advancing by `stride`, and what they covered."""
    window = model.config.seq_len
    check_stride(stride, window)  # before any document: an empty text must not hide a bad stride
    windows, tokens, words, num_bytes, documents = [], 0, 0, 0, 0
    for text in texts:
        ids = tokenizer.encode(text)
        windows += rolling_windows(ids, tokenizer.eos_id, window, stride)
        documents += 1
        tokens += len(ids)
        words += count_words(text)
        num_bytes += count_bytes(text)
    if not tokens:
        raise DataError("the documents hold no tokens: nothing to evaluate")
    loglikelihood = windows_loglikelihood(model, windows, batch_size, tokenizer.eos_id, multiple, device)
    return {**text_metrics(loglikelihood, tokens, words, num_bytes), "loglikelihood": loglikelihood,
            "documents": documents, "windows": len(windows), "tokens": tokens, "words": words, "bytes": num_bytes,
            "window": window, "stride": stride}

"""Validation loss, perplexity and bits per byte over a fixed set of windows, sharded over ranks."""
from __future__ import annotations

import math
from typing import Optional

import torch

from .. import parallel
from ..data import DataError, bits_per_byte, validation_batches


@torch.no_grad()
def evaluate(model, val, seq_len: int, batch_size: int, max_windows: Optional[int], device="cpu") -> dict:
    """Mean next-token loss over the split's first `max_windows` windows (None: all), sharded over ranks, exact
    in total, with the number of windows and tokens it covered.

    `model` is a DeepSpeed engine or a plain `GPT`. `batch_size` only groups the windows: which windows are
    evaluated, and so the loss for given weights, does not depend on it.
    """
    was_training = model.training
    model.eval()
    batches = list(validation_batches(val, seq_len, batch_size, max_windows))
    if not batches:
        raise DataError(f"the validation split ({val.num_tokens} tokens) is shorter than one sequence of "
                        f"{seq_len + 1} tokens: use more data or a smaller seq_len")
    world, rank = parallel.world_size(), parallel.rank()
    loss_sum, tokens = 0.0, 0
    # Every rank runs the same number of forwards (expert-parallel layers communicate in each one);
    # a rank past the end repeats batch 0 and does not count it.
    for j in range(math.ceil(len(batches) / world)):
        index = j * world + rank
        x, y = batches[index if index < len(batches) else 0]
        out = model(x.to(device), labels=y.to(device))
        if index < len(batches):
            loss_sum += float(out.loss) * y.numel()
            tokens += y.numel()
    model.train(was_training)
    loss_sum, tokens = (v * parallel.world_size() for v in parallel.all_reduce_mean([loss_sum, float(tokens)]))
    loss = loss_sum / tokens
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)),
            "val_bpb": bits_per_byte(loss, val.num_tokens, val.num_bytes),
            "val_windows": sum(len(x) for x, _ in batches), "val_tokens": round(tokens)}

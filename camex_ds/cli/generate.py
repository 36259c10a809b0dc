"""Generate text with a consolidated model (tools/convert_checkpoint.py consolidate).

    camex-generate --model out/model --prompt "def main(" --max_new_tokens 64
    camex-generate --model out/model --prompt "import " --temperature 0.8 --top_p 0.95 --seed 1

Greedy with --temperature 0 (the default), else temperature / nucleus (top-p) sampling. Every new token
runs the full forward pass on the text so far, left-truncated to the model's seq_len. Merge layers
need a length that is a multiple of the segment length, so the window is right-padded: with causal
segment routing (segment j uses the gates of segment j-1, the first segment uniform gates) the padding
cannot reach the prediction at the last real position, which lies in a segment whose gates come from
real tokens only, so the padded forward is exact. With non-causal routing ('segment', 'sequence', or a
'self-detached' first segment) the gates of the last segment see the padding, as they saw later
tokens in training: the output is then only an approximation, and a warning says so. Token-routing
(smoe) and dense models need no padding. Stops early at the end-of-document token.
"""
from __future__ import annotations

import argparse
import json
import sys

from camex_ds.cli import add_model_arguments, run_cli


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(ap)
    ap.add_argument("--prompt", required=True, help="text to continue")
    ap.add_argument("--tokenizer", help="SentencePiece model, or a Hugging Face tokenizer.json or the folder holding it "
                                        "(default: the model folder's own)")
    ap.add_argument("--max_new_tokens", type=int, default=64, help="(%(default)s)")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (%(default)s)")
    ap.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1] (%(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (%(default)s)")
    ap.add_argument("--json", action="store_true", help="print a JSON object (prompt, completion, token ids) "
                                                        "instead of the text")
    return ap.parse_args(argv)


def padding_plan(cfg) -> tuple[int, bool]:
    """`(multiple, exact)`: windows are right-padded to a multiple of this; `exact` tells whether that is exact."""
    moe = cfg.moe
    if moe is None or moe.method == "smoe":
        return 1, True
    # exact only where a segment's gates come from earlier segments; under `sequence` routing (T = L) only full
    # windows are valid inputs and the gates see the padding
    return moe.segment_len_for(cfg.seq_len), moe.routing == "causal" and moe.first_segment == "uniform"


def next_token_logits(model, ids: list, pad_id: int, multiple: int, device):
    import torch

    window = ids[-model.config.seq_len:]
    length = len(window)
    padded = window + [pad_id] * ((-length) % multiple)
    x = torch.tensor([padded], dtype=torch.long, device=device)
    with torch.no_grad():
        logits = model(x).logits
    return logits[0, length - 1].float()


def sample(logits, temperature: float, top_p: float, generator) -> int:
    import torch

    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < top_p  # smallest prefix with mass >= top_p
        keep[0] = True
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        probs = probs / probs.sum()
    return int(torch.multinomial(probs, 1, generator=generator))


def generate(model, tokenizer, prompt: str, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0, device="cpu") -> tuple[list, list, bool]:
    """`(prompt ids, new ids, exact)`."""
    import torch

    ids = tokenizer.encode(prompt)
    if not ids:
        ids = [tokenizer.eos_id]  # an empty prompt starts a new document
    multiple, exact = padding_plan(model.config)
    generator = torch.Generator().manual_seed(seed)
    new = []
    for _ in range(max_new_tokens):
        token = sample(next_token_logits(model, ids + new, tokenizer.eos_id, multiple, device), temperature, top_p,
                       generator)
        if token == tokenizer.eos_id:
            break
        new.append(token)
    return ids, new, exact


def main(argv=None) -> int:
    args = parse_args(argv)
    from camex_ds.config import ConfigError
    from camex_ds.data import DataError
    from camex_ds.ckpt.format import PretrainedError

    return run_cli(lambda: _generate(args), (ConfigError, DataError, PretrainedError))


def _generate(args) -> int:
    from camex_ds.config import ConfigError
    from camex_ds.data import Tokenizer
    from camex_ds.ckpt.format import load_pretrained, tokenizer_path

    if args.max_new_tokens < 0:
        raise ConfigError(f"--max_new_tokens={args.max_new_tokens} is invalid: expected an integer >= 0")
    if args.temperature < 0:
        raise ConfigError(f"--temperature={args.temperature} is invalid: expected a number >= 0")
    if not 0 < args.top_p <= 1:
        raise ConfigError(f"--top_p={args.top_p} is invalid: expected a number in (0, 1]")
    model = load_pretrained(args.model, dtype=args.dtype, device=args.device)
    tokenizer = Tokenizer.load(args.tokenizer or tokenizer_path(args.model))
    prompt_ids, new, exact = generate(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature,
                                      args.top_p, args.seed, args.device)
    if not exact:
        moe = model.config.moe
        print(f"warning: routing '{moe.routing}' (first segment '{moe.first_segment}') is not causal: the last "
              "segment's gates see right-padding, so generation only approximates the model", file=sys.stderr)
    completion = tokenizer.decode(new)
    if args.json:
        print(json.dumps({"prompt": args.prompt, "completion": completion, "prompt_ids": prompt_ids,
                          "new_ids": new, "exact": exact}))
    else:
        print(args.prompt + completion)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Convert camex_ds checkpoints (`camex-convert`, or `python tools/convert_checkpoint.py`; library: camex_ds.ckpt).

    # DeepSpeed checkpoint (ZeRO 0-2, any ep_size) -> one folder: model.safetensors, config.json, tokenizer.model
    camex-convert consolidate --checkpoint runs/default --output out/model
    # the same checkpoint for another expert-parallel degree, optimizer state included
    camex-convert reshard --checkpoint runs/ep2 --ep_size 1 --output runs/ep1/checkpoints
    # dense consolidated model -> MoE model computing the same function
    camex-convert upcycle --input out/dense --moe_config moe.json --output out/upcycled
    # camex* model -> Euclidean twin with the curvature folded into the experts (same outputs, smaller)
    camex-convert fold --input out/model --output out/folded
    # Hugging Face Llama / Mistral / Qwen2 / GPT-2 folder -> consolidated dense model; any consolidated model
    # -> Hugging Face folder (its own modeling code where no stock architecture computes it; docs/hf.md)
    camex-convert import-hf --input hf/TinyLlama --output out/tinyllama --seq_len 2048
    camex-convert export-hf --input out/tinyllama --output hf/tinyllama-again

Every subcommand checks its inputs and fails with one line (exit 2) naming the file, tensor or value at
fault; outputs appear only once complete (written into a hidden folder next to them, then renamed).
On success the last stdout line is a JSON summary.
"""
from __future__ import annotations

import argparse
import json
import sys

from . import run_cli


NEW_FOLDER = "folder to create (must not exist)"


def _add_checkpoint(p: argparse.ArgumentParser) -> None:
    """`--checkpoint` and `--tag`: the DeepSpeed checkpoint that consolidate and reshard read."""
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="the run's output dir, its checkpoints/ dir, or a tag folder")
    p.add_argument("--tag", help="checkpoint tag, e.g. global_step300 (default: the one 'latest' names)")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("consolidate", help="DeepSpeed checkpoint -> consolidated model folder")
    _add_checkpoint(p)
    p.add_argument("--output", required=True, metavar="OUT", help=NEW_FOLDER)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="weights dtype; fp32 from a bf16 run uses the fp32 master weights (%(default)s)")
    p.add_argument("--tokenizer", metavar="TOK.model",
                   help="the run's SentencePiece model (default: found through the run's train_args.json)")

    p = sub.add_parser("reshard", help="DeepSpeed checkpoint -> the same for another ep_size")
    _add_checkpoint(p)
    p.add_argument("--ep_size", required=True, type=int, help="target expert-parallel degree")
    p.add_argument("--world_size", type=int,
                   help="target number of ranks (ZeRO 1/2 partitions depend on it; default: --ep_size)")
    p.add_argument("--output", required=True, metavar="CKPT_DIR",
                   help="checkpoints folder to create: resume with --output_dir set to its parent, which must "
                        "name it 'checkpoints'")

    p = sub.add_parser("upcycle", help="consolidated dense model -> MoE model with the same function")
    p.add_argument("--input", required=True, metavar="DENSE_OUT", help="consolidated dense model folder")
    p.add_argument("--moe_config", required=True, metavar="MOE_JSON",
                   help="JSON object of MoE options (method, num_experts, every, ...) or a model config with 'moe'")
    p.add_argument("--output", required=True, metavar="OUT", help=NEW_FOLDER)
    p.add_argument("--noise", type=float, default=0.0,
                   help="std of Gaussian noise added to each expert copy (symmetry breaking; default 0: exact)")
    p.add_argument("--seed", type=int, default=0, help="seed for the routers and the noise (%(default)s)")

    p = sub.add_parser("fold", help="camex* model -> Euclidean twin with the curvature folded in")
    p.add_argument("--input", required=True, metavar="OUT", help="consolidated camex, camex-ties or camex-dare model")
    p.add_argument("--output", required=True, metavar="OUT2", help=NEW_FOLDER)

    p = sub.add_parser("import-hf", help="Hugging Face Llama/Mistral/Qwen2/GPT-2 folder, or our own export, -> "
                                        "consolidated model")
    p.add_argument("--input", required=True, metavar="HF_DIR",
                   help="folder with config.json and safetensors weights (sharded with their index, or not)")
    p.add_argument("--output", required=True, metavar="OUT", help=NEW_FOLDER)
    p.add_argument("--seq_len", type=int,
                   help="the model's training length (default: the config's max_position_embeddings / n_positions)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), help="weights dtype (default: bf16 if stored so, else fp32)")
    p.add_argument("--allow_pickle", action="store_true",
                   help="also read pytorch_model.bin (a pickle: it can run code) through torch.load(weights_only=True)")

    p = sub.add_parser("export-hf", help="consolidated model -> Hugging Face folder (GPT-2, Llama or Qwen2 where one "
                                        "computes the model, else its own modeling code: trust_remote_code=True)")
    p.add_argument("--input", required=True, metavar="OUT",
                   help="consolidated model of any method (dense, smoe or a merge model)")
    p.add_argument("--output", required=True, metavar="HF_DIR", help=NEW_FOLDER)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    # the library is imported after parsing, so that --help answers at once
    from ..ckpt.format import ConvertError, PretrainedError
    from ..config import ConfigError
    from ..data import DataError
    from ..deepspeed_adapter import warn_if_untested

    warn_if_untested()

    def body() -> int:
        try:
            result = _run(args)
        except OSError as e:  # disk full, permissions: still one line, still nothing partial left behind
            print(f"error: {e.strerror or e} ({e.filename})" if e.filename else f"error: {e}", file=sys.stderr)
            return 2
        for note in result.get("notes", []):
            print(f"note: {note}", file=sys.stderr)
        print(json.dumps(result))
        return 0

    return run_cli(body, (ConvertError, PretrainedError, ConfigError, DataError))


def _run(args: argparse.Namespace) -> dict:
    """The summary of the subcommand `args` names."""
    if args.command in ("consolidate", "reshard"):
        from ..ckpt.convert import consolidate, reshard

        if args.command == "consolidate":
            return consolidate(args.checkpoint, args.output, tag=args.tag, dtype=args.dtype, tokenizer=args.tokenizer)
        return reshard(args.checkpoint, args.ep_size, args.output, tag=args.tag, world_size=args.world_size)
    if args.command in ("upcycle", "fold"):
        from ..ckpt.upcycle import fold, upcycle

        if args.command == "upcycle":
            return upcycle(args.input, args.moe_config, args.output, noise=args.noise, seed=args.seed)
        return fold(args.input, args.output)
    from ..ckpt.hf import export_hf, import_hf

    if args.command == "import-hf":
        return import_hf(args.input, args.output, seq_len=args.seq_len, allow_pickle=args.allow_pickle,
                         dtype=args.dtype)
    return export_hf(args.input, args.output)

#!/usr/bin/env python
"""Convert camex_ds checkpoints (logic in camex_ds/convert.py, format in camex_ds/pretrained.py).

    # DeepSpeed checkpoint (ZeRO 0-2, any ep_size) -> one folder: model.safetensors, config.json, tokenizer.model
    python tools/convert_checkpoint.py consolidate --checkpoint runs/default --output out/model
    # the same checkpoint for another expert-parallel degree, optimizer state included
    python tools/convert_checkpoint.py reshard --checkpoint runs/ep2 --ep_size 1 --output runs/ep1/checkpoints
    # dense consolidated model -> MoE model computing the same function
    python tools/convert_checkpoint.py upcycle --input out/dense --moe_config moe.json --output out/upcycled
    # camex* model -> Euclidean twin with the curvature folded into the experts (same outputs, smaller)
    python tools/convert_checkpoint.py fold --input out/model --output out/folded
    # Hugging Face Llama / Mistral / Qwen2 / GPT-2 folder -> consolidated dense model (and back: docs/hf.md)
    python tools/convert_checkpoint.py import-hf --input hf/TinyLlama --output out/tinyllama --seq_len 2048
    python tools/convert_checkpoint.py export-hf --input out/tinyllama --output hf/tinyllama-again

Every subcommand checks its inputs and fails with one line (exit 2) naming the file, tensor or value at
fault; outputs appear only once complete (written into a hidden folder next to them, then renamed).
On success the last stdout line is a JSON summary.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO_ROOT))


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("consolidate", help="DeepSpeed checkpoint -> consolidated model folder")
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="the run's output dir, its checkpoints/ dir, or a tag folder")
    p.add_argument("--tag", help="checkpoint tag, e.g. global_step300 (default: the one 'latest' names)")
    p.add_argument("--output", required=True, metavar="OUT", help="folder to create (must not exist)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="weights dtype; fp32 from a bf16 run uses the fp32 master weights (%(default)s)")
    p.add_argument("--tokenizer", metavar="TOK.model",
                   help="the run's SentencePiece model (default: found through the run's train_args.json)")

    p = sub.add_parser("reshard", help="DeepSpeed checkpoint -> the same for another ep_size")
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="the run's output dir, its checkpoints/ dir, or a tag folder")
    p.add_argument("--tag", help="checkpoint tag (default: the one 'latest' names)")
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
    p.add_argument("--output", required=True, metavar="OUT", help="folder to create (must not exist)")
    p.add_argument("--noise", type=float, default=0.0,
                   help="std of Gaussian noise added to each expert copy (symmetry breaking; default 0: exact)")
    p.add_argument("--seed", type=int, default=0, help="seed for the routers and the noise (%(default)s)")

    p = sub.add_parser("fold", help="camex* model -> Euclidean twin with the curvature folded in")
    p.add_argument("--input", required=True, metavar="OUT", help="consolidated camex, camex-ties or camex-dare model")
    p.add_argument("--output", required=True, metavar="OUT2", help="folder to create (must not exist)")

    p = sub.add_parser("import-hf", help="Hugging Face Llama/Mistral/Qwen2/GPT-2 folder -> consolidated dense model")
    p.add_argument("--input", required=True, metavar="HF_DIR",
                   help="folder with config.json and safetensors weights (sharded with their index, or not)")
    p.add_argument("--output", required=True, metavar="OUT", help="folder to create (must not exist)")
    p.add_argument("--seq_len", type=int,
                   help="the model's training length (default: the config's max_position_embeddings / n_positions)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), help="weights dtype (default: bf16 if stored so, else fp32)")
    p.add_argument("--allow_pickle", action="store_true",
                   help="also read pytorch_model.bin (a pickle: it can run code) through torch.load(weights_only=True)")

    p = sub.add_parser("export-hf", help="consolidated dense model -> Hugging Face folder (GPT-2, Llama or Qwen2)")
    p.add_argument("--input", required=True, metavar="OUT",
                   help="consolidated dense model, or a MoE model whose experts all equal their base")
    p.add_argument("--output", required=True, metavar="HF_DIR", help="folder to create (must not exist)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from camex_ds.config import ConfigError
    from camex_ds.convert import ConvertError, consolidate, fold, reshard, upcycle
    from camex_ds.data import DataError
    from camex_ds.pretrained import PretrainedError

    try:
        if args.command == "consolidate":
            result = consolidate(args.checkpoint, args.output, tag=args.tag, dtype=args.dtype, tokenizer=args.tokenizer)
        elif args.command == "reshard":
            result = reshard(args.checkpoint, args.ep_size, args.output, tag=args.tag, world_size=args.world_size)
        elif args.command == "upcycle":
            result = upcycle(args.input, args.moe_config, args.output, noise=args.noise, seed=args.seed)
        elif args.command == "fold":
            result = fold(args.input, args.output)
        elif args.command == "import-hf":
            from camex_ds.hf import import_hf

            result = import_hf(args.input, args.output, seq_len=args.seq_len, allow_pickle=args.allow_pickle,
                               dtype=args.dtype)
        else:
            from camex_ds.hf import export_hf

            result = export_hf(args.input, args.output)
    except (ConvertError, PretrainedError, ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permissions: still one line, still nothing partial left behind
        print(f"error: {e.strerror or e} ({e.filename})" if e.filename else f"error: {e}", file=sys.stderr)
        return 2
    for note in result.get("notes", []):
        print(f"note: {note}", file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

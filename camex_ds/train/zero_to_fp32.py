#!/usr/bin/env python
"""zero_to_fp32.py for camex_ds checkpoints: DeepSpeed's command line and output files, our checkpoint reader.

DeepSpeed drops a zero_to_fp32.py beside the tag folders of every ZeRO checkpoint; it cannot read
expert-parallel MoE checkpoints (each expert in its own file, ZeRO partitions per expert group), so
camex_ds writes this file there instead, at every save:

    python checkpoints/zero_to_fp32.py checkpoints/ out/ [--safe_serialization] [--max_shard_size 5GB] [-t TAG]

It writes what DeepSpeed's script writes (out/pytorch_model.bin, or model.safetensors, sharded with an
index file above --max_shard_size): the fp32 weights of the whole model with every expert under its
global id, the state dict of the model at ep_size 1, read by `camex_ds.ckpt.convert.fp32_weights`.
DeepSpeed's zero_to_torch.py, which imports this file, works through it too. For a folder that the camex_ds
tools load (config and tokenizer included), use `camex-convert consolidate`.
"""
import argparse
import os
import sys

CAMEX_DS_ROOT = None  # the checkout that wrote the checkpoint: set in the copy, used if camex_ds is not installed

try:
    import camex_ds  # noqa: F401
except ImportError:
    # Not installed here: run again with the checkout that wrote the checkpoint on PYTHONPATH (once).
    if CAMEX_DS_ROOT is None or os.environ.get("CAMEX_DS_ROOT_TRIED") == CAMEX_DS_ROOT:
        print("error: the camex_ds package is not importable: install it (pip install -e <camex_ds checkout>)"
              + (f"; its recorded checkout {CAMEX_DS_ROOT} did not provide it" if CAMEX_DS_ROOT else ""), file=sys.stderr)
        sys.exit(2)
    path = os.pathsep.join(p for p in (CAMEX_DS_ROOT, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONPATH=path, CAMEX_DS_ROOT_TRIED=CAMEX_DS_ROOT)
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)

from camex_ds.deepspeed_adapter import deepspeed_zero_to_fp32, warn_if_untested  # noqa: E402

debug = 0


def get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=None, exclude_frozen_parameters=False,
                                             lazy_mode=False):
    """DeepSpeed's function of this name, for camex_ds checkpoints (no frozen parameters; always materialised)."""
    from camex_ds.ckpt.convert import fp32_weights

    return fp32_weights(checkpoint_dir, tag)


# DeepSpeed's writers, now reading our checkpoints; and what zero_to_torch.py uses from its sibling zero_to_fp32.py
_deepspeed = deepspeed_zero_to_fp32(get_fp32_state_dict_from_zero_checkpoint)
OUTPUT_DTYPE_NAMES = _deepspeed.OUTPUT_DTYPE_NAMES
convert_zero_checkpoint_to_fp32_state_dict = _deepspeed.convert_zero_checkpoint_to_fp32_state_dict
convert_zero_checkpoint_to_state_dict = _deepspeed.convert_zero_checkpoint_to_state_dict


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint_dir", help="the folder holding 'latest' and the tag folders, e.g. run/checkpoints")
    ap.add_argument("output_dir", help="folder for pytorch_model.bin (or model.safetensors)")
    ap.add_argument("--max_shard_size", default="5GB", help="shard the output above this size (%(default)s)")
    ap.add_argument("--safe_serialization", action="store_true", help="write safetensors instead of pickle")
    ap.add_argument("-t", "--tag", help="checkpoint tag, e.g. global_step100 (default: the one 'latest' names)")
    ap.add_argument("--exclude_frozen_parameters", action="store_true", help="accepted; there are none")
    ap.add_argument("-d", "--debug", action="store_true", help="accepted for DeepSpeed's command line")
    args = ap.parse_args(argv)
    warn_if_untested()
    from camex_ds.cli import run_cli
    from camex_ds.ckpt.format import ConvertError

    def body() -> int:
        convert_zero_checkpoint_to_fp32_state_dict(args.checkpoint_dir, args.output_dir,
                                                   max_shard_size=args.max_shard_size,
                                                   safe_serialization=args.safe_serialization, tag=args.tag)
        return 0

    return run_cli(body, (ConvertError,))


if __name__ == "__main__":
    sys.exit(main())

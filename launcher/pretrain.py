#!/usr/bin/env python
"""Pretrain a CAMEx mixture-of-experts GPT with DeepSpeed.

With no flags: a small CAMEx model on the default corpus (this Python's standard-library sources),
a few minutes on 2 CPU cores. Runs as plain `python` (one rank) or under the DeepSpeed launcher:

    python launcher/pretrain.py
    deepspeed --num_gpus 2 launcher/pretrain.py --ep_size 2
    deepspeed --hostfile ds_configs/hostfile --num_nodes 2 launcher/pretrain.py --deepspeed_config ds_configs/gpu_zero2_bf16.json

Writes to --output_dir: metrics.jsonl, final_metrics.json, tensorboard/, checkpoints/ (resume with --resume).
Every checkpoint is verified (sizes and sha256) before a resume loads it; `python checkpoints/zero_to_fp32.py
checkpoints/ out/` extracts the fp32 weights as DeepSpeed's script does. Exit codes: 0 done, 1 a lost rank or a
NaN/Inf step, 2 bad input (one `error:` line), 130 interrupted.
"""
import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from camex_ds.data import DATA_HELP  # noqa: E402
from camex_ds.config import DEFAULT_DEEPSPEED_CONFIG, DEFAULT_TIMEOUT_S  # noqa: E402


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other error of the launcher
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv=None) -> argparse.Namespace:
    ap = _Parser(prog=Path(__file__).name, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--deepspeed_config", default=DEFAULT_DEEPSPEED_CONFIG,
                    help="DeepSpeed JSON (batch size, optimizer, scheduler, ZeRO stage, bf16, TensorBoard); "
                         "'auto' values are filled from this run (default: %(default)s)")
    ap.add_argument("--model_config", help="model JSON (see README: config reference); default: a small CAMEx model")
    ap.add_argument("--data", help="a preprocessed dataset folder, " + DATA_HELP)
    ap.add_argument("--val_data", help="a separate validation text (a corpus's valid.txt; any --data form, a "
                                       "preprocessed folder gives its validation split): --data is then all trained on")
    ap.add_argument("--tokenizer", help="SentencePiece .model, or a Hugging Face tokenizer.json or the folder holding "
                                        "it; default: the --init_from model's own, else train one on the data (cached)")
    ap.add_argument("--vocab_size", type=int, default=4096, help="vocabulary of a tokenizer trained here (%(default)s)")
    ap.add_argument("--cache_dir", help="where prepared datasets are cached (default: $CAMEX_DS_CACHE or "
                                        "~/.cache/camex_ds)")
    ap.add_argument("--output_dir", default="runs/default", help="metrics, TensorBoard, checkpoints (%(default)s)")
    ap.add_argument("--max_steps", type=int, default=300, help="optimizer steps in total (%(default)s)")
    ap.add_argument("--eval_interval", type=int, default=100, help="validate every N steps and at the end (%(default)s)")
    ap.add_argument("--eval_batches", type=int, default=16, help="validation batches per evaluation (%(default)s)")
    ap.add_argument("--save_interval", type=int, default=100, help="checkpoint every N steps and at the end (%(default)s)")
    ap.add_argument("--keep_checkpoints", type=int, metavar="K", help="keep only the newest K checkpoints, deleting "
                                                                      "older ones once a new one is complete (default: all)")
    ap.add_argument("--log_interval", type=int, default=10, help="log training metrics every N steps (%(default)s)")
    ap.add_argument("--ep_size", type=int, help="expert-parallel degree; overrides moe.ep_size of the model config")
    ap.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoints/latest exactly "
                                                          "(model, optimizer, scheduler, data position, RNG)")
    ap.add_argument("--init_from", help="start from a consolidated/upcycled model folder (tools/convert_checkpoint.py) "
                                        "instead of a random init (its config is the model config unless --model_config is given)")
    ap.add_argument("--stop_at_step", type=int, help="checkpoint and exit after this step without changing the "
                                                     "schedule of --max_steps (time-sliced jobs; continue with --resume)")
    ap.add_argument("--seed", type=int, default=1234, help="initialisation and routing-noise seed (%(default)s)")
    ap.add_argument("--data_seed", type=int, default=1234, help="data-order seed, independent of --seed (%(default)s)")
    ap.add_argument("--peak_tflops", type=float, help="peak TFLOP/s per rank for MFU (default: known-GPU table, or a "
                                                       "CPU matmul probe)")
    ap.add_argument("--skip_nonfinite", type=int, default=0, metavar="K",
                    help="skip up to K steps whose loss or gradient norm is NaN/Inf (counted as skipped_steps in the "
                         "metrics) instead of stopping at the first; a bad step never changes the weights (%(default)s)")
    ap.add_argument("--dist_timeout", type=float, default=DEFAULT_TIMEOUT_S,
                    help="seconds a collective waits for a lost or stopped rank before the job fails, instead of "
                         "torch's 30 minutes (%(default)s)")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile every transformer block (inductor). Off by default: not faster on CPUs, "
                         "not yet measured on GPUs")
    ap.add_argument("--no_progress", action="store_true", help="no progress bar")
    ap.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from camex_ds.cli import run_cli
    from camex_ds.config import ConfigError
    from camex_ds.data import DataError
    from camex_ds.ckpt.format import PretrainedError
    from camex_ds.train import CheckpointError, TrainArgs

    train_args = TrainArgs(**{k: v for k, v in vars(args).items() if k not in ("local_rank", "no_progress")},
                           progress=not args.no_progress)
    return run_cli(lambda: _train(train_args), (ConfigError, DataError, CheckpointError, PretrainedError, OSError))


def _train(train_args) -> int:
    from camex_ds import parallel
    from camex_ds.train import NonFiniteError, run
    from camex_ds.train.peers import describe, is_communication_error

    try:
        final = run(train_args)
    except NonFiniteError as e:  # a fault, not bad input: one line, exit 1
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    except RuntimeError as e:
        if not is_communication_error(e):
            raise
        print(f"error: {describe(e)}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)  # the group is broken: tearing it down can abort in gloo's destructors (SIGABRT, 1 run in 4)
    finally:
        parallel.shutdown()
    if final.get("rank") == 0 and "val_ppl" in final:
        print(f"done: step {final['step']}  train loss {final['train_loss']:.4f}  val loss {final['val_loss']:.4f}  "
              f"val ppl {final['val_ppl']:.2f}  val bpb {final['val_bpb']:.4f}  {final['tokens_per_s']:.0f} tok/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

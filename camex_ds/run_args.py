"""A pretraining run's flags as one frozen dataclass that validates itself (`TrainArgs`), and the defaults a run
takes when not told: the DeepSpeed and model configs shipped inside the package, so that a wheel has them too.

`camex_ds.cli.pretrain` builds the command line from `TrainArgs`'s fields; `camex_ds.train.configs.validate`
checks, once per run, what needs files (the configs and the output folder).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .config import DEFAULT_TIMEOUT_S, DEFAULT_VOCAB_SIZE, ConfigError, check_int, read_json_object

#: The DeepSpeed and model configs shipped inside the package (package data, so a wheel has them too; a checkout's
#: `ds_configs/` is a link to this folder): the defaults below and the examples users copy.
CONFIGS_DIR = Path(__file__).resolve().parent / "configs"

# The DeepSpeed config a run uses when none is given: one CPU rank, fp32, ZeRO 0, no accumulation.
DEFAULT_DEEPSPEED_CONFIG = str(CONFIGS_DIR / "cpu.json")
# The model a run trains when none is given: the small CAMEx model, the same file users find and copy.
DEFAULT_MODEL_CONFIG = str(CONFIGS_DIR / "models" / "camex_small.json")


def default_model() -> dict:
    """The raw dict of `DEFAULT_MODEL_CONFIG` (a fresh copy: callers edit it)."""
    return read_json_object(Path(DEFAULT_MODEL_CONFIG), "the default model config")


def _flag(default: Any, help: str, **argparse_options) -> Any:
    """A `TrainArgs` field and the text of its command-line flag (`camex_ds.cli.pretrain` builds the parser from
    these), so that each default is written once. `argparse_options` are `metavar`, and `flag` for a flag named
    otherwise than the field (`--no_progress` clears `progress`)."""
    return dataclasses.field(default=default, metadata={"help": help, **argparse_options})


#: TrainArgs fields that count something (steps, windows, batches, checkpoints): an integer >= 1 when given.
_COUNTS = ("max_steps", "eval_interval", "save_interval", "log_interval", "eval_windows", "eval_batches",
           "stop_at_step", "keep_checkpoints", "activation_checkpointing_interval")
#: TrainArgs fields that are seeds or allowances: an integer in [0, 2**63).
_NON_NEGATIVE = ("seed", "data_seed", "skip_nonfinite")


@dataclass(frozen=True)
class TrainArgs:
    """A pretraining run's arguments, each with its flag of `camex-pretrain` (`python -m camex_ds.cli.pretrain`),
    in the order `--help` lists them. Like the model configs, an object that exists is valid in itself (its flags
    alone); `camex_ds.train.configs.validate` checks what needs files: the configs and the output folder. Change
    one with `dataclasses.replace`, which validates the copy."""

    deepspeed_config: str = _flag(
        DEFAULT_DEEPSPEED_CONFIG, "DeepSpeed JSON (batch size, optimizer, scheduler, ZeRO stage, bf16, TensorBoard); "
        "'auto' values are filled from this run (default: %(default)s)")
    model_config: Optional[str] = _flag(None, "model JSON (see README: config reference); default: a small CAMEx model")
    # the CLI appends the forms a --data value takes (camex_ds.data.DATA_HELP, whose home is the data package)
    data: Optional[str] = _flag(None, "a preprocessed dataset folder, ", data_forms=True)
    val_data: Optional[str] = _flag(
        None, "a separate validation text (a corpus's valid.txt; any --data form, a preprocessed folder gives its "
        "validation split): --data is then all trained on")
    tokenizer: Optional[str] = _flag(
        None, "SentencePiece .model, or a Hugging Face tokenizer.json or the folder holding it; default: the "
        "--init_from model's own, else train one on the data (cached)")
    vocab_size: int = _flag(DEFAULT_VOCAB_SIZE, "vocabulary of a tokenizer trained here (%(default)s)")
    cache_dir: Optional[str] = _flag(None, "where prepared datasets are cached (default: $CAMEX_DS_CACHE or "
                                           "~/.cache/camex_ds)")
    output_dir: str = _flag("runs/default", "metrics, TensorBoard, checkpoints (%(default)s)")
    max_steps: int = _flag(300, "optimizer steps in total (%(default)s)")
    eval_interval: int = _flag(100, "validate every N steps and at the end (%(default)s)")
    eval_windows: Optional[int] = _flag(
        None, "validation windows (seq_len + 1 tokens each) per evaluation, the same at any micro batch; default: "
        "the whole validation split, up to a cap that keeps evaluation near 10%% of training time (logged, and "
        "recorded as val_windows and val_tokens)", metavar="N")
    eval_batches: Optional[int] = _flag(
        None, "or: validation batches of the micro batch size per evaluation (K x micro batch windows, so they "
        "change with the micro batch)", metavar="K")
    save_interval: int = _flag(100, "checkpoint every N steps and at the end (%(default)s)")
    keep_checkpoints: Optional[int] = _flag(
        None, "keep only the newest K checkpoints, deleting older ones once a new one is complete (default: all)",
        metavar="K")
    log_interval: int = _flag(10, "log training metrics every N steps (%(default)s)")
    ep_size: Optional[int] = _flag(None, "expert-parallel degree; overrides moe.ep_size of the model config")
    resume: bool = _flag(False, "continue from OUTPUT_DIR/checkpoints/latest exactly (model, optimizer, scheduler, "
                                "data position, RNG)")
    overwrite_output_dir: bool = _flag(
        False, "start afresh in an --output_dir that holds an earlier run: its files are moved into "
        "OUTPUT_DIR/replaced-<time>/, nothing is deleted (without it such a run is refused)")
    init_from: Optional[str] = _flag(
        None, "start from a consolidated/upcycled model folder (tools/convert_checkpoint.py) instead of a random "
        "init (its config is the model config unless --model_config is given)")
    stop_at_step: Optional[int] = _flag(
        None, "checkpoint and exit after this step without changing the schedule of --max_steps (time-sliced jobs; "
        "continue with --resume)")
    seed: int = _flag(1234, "initialisation and routing-noise seed (%(default)s)")
    data_seed: int = _flag(1234, "data-order seed, independent of --seed (%(default)s)")
    peak_tflops: Optional[float] = _flag(None, "peak TFLOP/s per rank for MFU (default: known-GPU table, or a CPU "
                                               "matmul probe)")
    skip_nonfinite: int = _flag(
        0, "skip up to K steps whose loss or gradient norm is NaN/Inf (counted as skipped_steps in the metrics) "
        "instead of stopping at the first; a bad step never changes the weights (%(default)s)", metavar="K")
    dist_timeout: float = _flag(
        DEFAULT_TIMEOUT_S, "seconds a collective waits for a lost or stopped rank before the job fails, instead of "
        "torch's 30 minutes (%(default)s)")
    compile: bool = _flag(False, "torch.compile every transformer block (inductor). Off by default: not faster on "
                                 "CPUs, not yet measured on GPUs")
    activation_checkpointing: bool = _flag(
        False, "recompute transformer blocks in the backward instead of keeping their activations: less memory for "
        "about one more forward per step; exact (router noise and DARE masks replay, the step's curvature work is "
        "reused)")
    activation_checkpointing_interval: Optional[int] = _flag(
        None, "with --activation_checkpointing: recompute every K-th block only (the K-th, 2K-th, ...; default 1: "
        "every block)", metavar="K")
    progress: bool = _flag(True, "no progress bar", flag="--no_progress")

    def __post_init__(self) -> None:
        for name in _COUNTS:
            value = getattr(self, name)
            if value is not None:
                check_int(f"--{name}", value)
        if self.eval_windows is not None and self.eval_batches is not None:
            raise ConfigError(f"--eval_windows={self.eval_windows} and --eval_batches={self.eval_batches} both set "
                              "the validation windows: give one of them")
        for name in _NON_NEGATIVE:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2 ** 63:
                raise ConfigError(f"--{name}={value!r} is invalid: expected an integer >= 0")
        if isinstance(self.dist_timeout, bool) or not isinstance(self.dist_timeout, (int, float)) \
                or not 0 < self.dist_timeout < math.inf:
            raise ConfigError(f"--dist_timeout={self.dist_timeout} is invalid: expected a number of seconds > 0")
        if self.activation_checkpointing_interval is not None and not self.activation_checkpointing:
            raise ConfigError(f"--activation_checkpointing_interval={self.activation_checkpointing_interval} given "
                              "without --activation_checkpointing: add --activation_checkpointing, or drop the "
                              "interval")
        if self.resume and self.overwrite_output_dir:
            raise ConfigError("--resume and --overwrite_output_dir contradict each other: --resume continues the run "
                              "in --output_dir, --overwrite_output_dir moves it aside to start afresh; give one")

    @property
    def checkpoint_interval(self) -> int:
        """Every how many blocks one is recomputed in the backward (`GPT.set_activation_checkpointing`); 0: none."""
        if not self.activation_checkpointing:
            return 0
        return self.activation_checkpointing_interval or 1

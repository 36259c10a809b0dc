"""`camex_ds.run_args`: `TrainArgs` is frozen and validates itself like the model configs; the command line is
built from its fields, so every default exists once."""
import dataclasses

import pytest

from camex_ds.cli.pretrain import parse_args
from camex_ds.config import ConfigError
from camex_ds.run_args import TrainArgs
from tests.launch import one_error, run_main


def test_train_args_are_frozen_and_replace_validates():
    args = TrainArgs(max_steps=5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        args.max_steps = 6
    assert dataclasses.replace(args, max_steps=6).max_steps == 6
    with pytest.raises(ConfigError, match=r"^--max_steps=0 is invalid: expected an integer >= 1$"):
        dataclasses.replace(args, max_steps=0)


@pytest.mark.parametrize("changes,message", [
    ({"max_steps": 0}, "--max_steps=0 is invalid: expected an integer >= 1"),
    ({"keep_checkpoints": -1}, "--keep_checkpoints=-1 is invalid: expected an integer >= 1"),
    ({"eval_interval": "5"}, "--eval_interval='5' is invalid: expected an integer >= 1"),
    ({"eval_windows": 4, "eval_batches": 2}, "--eval_windows=4 and --eval_batches=2 both set the validation windows"),
    ({"seed": -1}, "--seed=-1 is invalid: expected an integer >= 0"),
    ({"data_seed": 2 ** 63}, f"--data_seed={2 ** 63} is invalid: expected an integer >= 0"),
    ({"dist_timeout": float("nan")}, "--dist_timeout=nan is invalid: expected a number of seconds > 0"),
    ({"resume": True, "overwrite_output_dir": True}, "--resume and --overwrite_output_dir contradict each other"),
    ({"activation_checkpointing": True, "activation_checkpointing_interval": 0},
     "--activation_checkpointing_interval=0 is invalid: expected an integer >= 1"),
    ({"activation_checkpointing_interval": 2}, "--activation_checkpointing_interval=2 given without "
                                               "--activation_checkpointing"),
])
def test_train_args_refuse_bad_flags(changes, message):
    with pytest.raises(ConfigError) as e:
        TrainArgs(**changes)
    assert str(e.value).startswith(message), str(e.value)


def test_command_line_defaults_are_the_dataclass_defaults():
    """Every default is written once, in the dataclass: the parser without flags gives `TrainArgs()`."""
    assert parse_args([]) == TrainArgs()
    assert parse_args(["--no_progress", "--max_steps", "7"]) == TrainArgs(progress=False, max_steps=7)


@pytest.mark.parametrize("flags,interval", [([], 0), (["--activation_checkpointing"], 1),
                                            (["--activation_checkpointing", "--activation_checkpointing_interval",
                                              "3"], 3)])
def test_activation_checkpointing_flags_give_the_recomputed_blocks_interval(flags, interval):
    args = parse_args(flags)
    assert args.checkpoint_interval == interval
    assert dataclasses.asdict(args)["activation_checkpointing"] == bool(interval)  # recorded in train_args.json


def test_a_bad_flag_value_is_one_error_line():
    proc = run_main("pretrain", ["--max_steps", "0"])
    one_error((proc.returncode, proc.stderr, proc.stdout), 2, "--max_steps=0 is invalid")
    assert proc.stderr.startswith("error: ")

"""Issue 26, one config style: `TrainArgs` is frozen and validates itself like the model configs, a typed view
reads the DeepSpeed JSON, `MoEConfig` holds no UI field and one set of defaults, and options that a method
does not read are neither required nor checked."""
import dataclasses
import json

import pytest

from camex_ds.cli.pretrain import parse_args
from camex_ds.config import ConfigError, ModelConfig, MoEConfig
from camex_ds.ds_config import DeepSpeedSettings
from camex_ds.moe import CAMExMoE
from camex_ds.run_args import DEFAULT_DEEPSPEED_CONFIG, TrainArgs
from tests.launch import one_error, run_main

# =========================================================================== TrainArgs


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
])
def test_train_args_refuse_bad_flags(changes, message):
    with pytest.raises(ConfigError) as e:
        TrainArgs(**changes)
    assert str(e.value).startswith(message), str(e.value)


def test_command_line_defaults_are_the_dataclass_defaults():
    """Every default is written once, in the dataclass: the parser without flags gives `TrainArgs()`."""
    assert parse_args([]) == TrainArgs()
    assert parse_args(["--no_progress", "--max_steps", "7"]) == TrainArgs(progress=False, max_steps=7)


def test_a_bad_flag_value_is_one_error_line():
    proc = run_main("pretrain", ["--max_steps", "0"])
    one_error((proc.returncode, proc.stderr, proc.stdout), 2, "--max_steps=0 is invalid")
    assert proc.stderr.startswith("error: ")


# =========================================================================== the DeepSpeed view


def test_deepspeed_view_of_the_default_config():
    with open(DEFAULT_DEEPSPEED_CONFIG) as f:
        ds = DeepSpeedSettings.from_dict(json.load(f))
    assert ds.zero_stage == 0 and not ds.bf16 and not ds.fp16 and ds.offload_optimizer == "none"
    assert ds.optimizer.type == "AdamW" and ds.scheduler.type == "WarmupCosineLR"
    with pytest.raises(TypeError):
        ds.optimizer.params["lr"] = 1.0  # read-only: the run hands DeepSpeed the dict, not this view


def test_deepspeed_view_reads_offload_and_precision():
    ds = DeepSpeedSettings.from_dict({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
                                      "bf16": {"enabled": True}, "gradient_clipping": 1,
                                      "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}})
    assert (ds.micro_batch, ds.accumulation, ds.train_batch_size) == (4, 2, None)
    assert ds.bf16 and ds.zero_stage == 2 and ds.offload_optimizer == "cpu" and ds.gradient_clipping == 1.0
    assert ds.optimizer is None and ds.scheduler is None and not ds.tensorboard


@pytest.mark.parametrize("raw,message", [
    ({"train_micro_batch_size_per_gpu": 0},
     "--deepspeed_config: train_micro_batch_size_per_gpu=0 is invalid: expected an integer >= 1"),
    ({"gradient_clipping": -1.0}, "--deepspeed_config: gradient_clipping=-1.0 is invalid: expected a number >= 0"),
    ({"bf16": "on"}, "--deepspeed_config: bf16='on' is invalid: expected a JSON object"),
    ({"optimizer": {"type": 5}}, "--deepspeed_config: optimizer.type=5 is invalid: expected a name such as \"AdamW\""),
    ({"scheduler": {"type": "WarmupLR", "params": "fast"}},
     "--deepspeed_config: scheduler.params='fast' is invalid: expected a JSON object"),
    ({"zero_optimization": {"stage": 3}}, "zero_optimization.stage=3 is not supported"),
    ({"fp16": {"enabled": True}}, "fp16 is not supported: use bf16"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "gpu"}}},
     "--deepspeed_config: zero_optimization.offload_optimizer.device='gpu' is invalid: expected one of none, cpu"),
])
def test_deepspeed_view_refuses_what_we_cannot_read(raw, message):
    with pytest.raises(ConfigError) as e:
        DeepSpeedSettings.from_dict(raw)
    assert str(e.value).startswith(message), str(e.value)


# =========================================================================== MoEConfig


def test_moe_config_has_no_ui_field_and_the_layer_defaults_have_one_home():
    assert "prefix" not in {f.name for f in dataclasses.fields(MoEConfig)}
    assert MoEConfig.for_layer(4).segment_len == 256 and MoEConfig().segment_len == 64
    assert CAMExMoE(8, 16, 4).args == MoEConfig.for_layer(4)
    assert MoEConfig.for_layer(4, segment_len=8, method="euclid") == MoEConfig(num_experts=4, segment_len=8,
                                                                                 method="euclid")


def test_errors_name_the_field_as_their_caller_knows_it():
    with pytest.raises(ConfigError, match=r"^moe\.ep_size=3 is invalid"):
        MoEConfig(num_experts=4, ep_size=3)
    with pytest.raises(ConfigError, match=r"^CAMExMoE\.ep_size=3 is invalid"):
        CAMExMoE(8, 16, 4, ep_size=3)
    with pytest.raises(ConfigError, match=r"^moe\.method='smoe' is invalid"):  # the model's block, passed whole
        CAMExMoE(8, 16, moe=MoEConfig(method="smoe"))


# =========================================================================== options a method does not read


def test_smoe_is_not_held_to_the_unused_segment_len():
    """The issue's case: `segment_len` (default 64) does not divide seq_len 32, and smoe never segments."""
    cfg = ModelConfig(seq_len=32, n_layers=2, moe=MoEConfig(method="smoe"))
    assert cfg.moe.segment_len == 64
    with pytest.raises(ConfigError, match=r"moe\.segment_len=64 is invalid: expected a divisor of seq_len=32"):
        ModelConfig(seq_len=32, n_layers=2, moe=MoEConfig(method="camex"))


@pytest.mark.parametrize("option,value,ignored_by,read_by", [
    ("segment_len", 0, "smoe", "euclid"),
    ("routing", "token", "smoe", "camex"),
    ("noisy_gating", "no", "smoe", "ties"),
    ("curvature_rank", 0, "euclid", "camex"),
    ("curvature_lr_scale", -1.0, "ties", "camex-ties"),
    ("dare_p", 1.5, "camex", "camex-dare"),
    ("capacity_factor", 0.0, "camex", "smoe"),
    ("backend", "x", "euclid", "smoe"),
])
def test_an_option_is_checked_only_where_the_method_reads_it(option, value, ignored_by, read_by):
    moe = MoEConfig(method=ignored_by, **{option: value})
    assert not moe.applies(option) and getattr(moe, option) == value
    with pytest.raises(ConfigError, match=rf"^moe\.{option}={value!r} is invalid"):
        MoEConfig(method=read_by, **{option: value})


def test_megablocks_with_biases_is_refused_only_for_smoe():
    with pytest.raises(ConfigError, match=r"moe\.backend='megablocks' is invalid"):
        ModelConfig(bias="all", n_layers=2, moe=MoEConfig(method="smoe", backend="megablocks"))
    assert ModelConfig(bias="all", n_layers=2, moe=MoEConfig(method="camex", backend="megablocks")).moe.curved

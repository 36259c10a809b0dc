"""`camex_ds.config`: a model config's options are checked once, each bad value refused in one line naming it,
and a config without the newer keys is the gpt family as before. (The launcher's bad input, config and data
together, is refused in one line too: tests/integration/test_pretrain.py, tests/system/test_fuzz.py.)"""
from __future__ import annotations

import dataclasses
import json

import pytest

from camex_ds.config import ConfigError, ModelConfig, MoEConfig
from camex_ds.model import build_model
from camex_ds.moe import CAMExMoE
from tests.distributed import ROOT

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}


@pytest.mark.parametrize("change, expected", [
    (dict(architecture="llama", activation="gelu"), "activation='gelu' is invalid: expected 'swiglu' for "
                                                    "architecture 'llama'"),
    (dict(architecture="llama", activation="swiglu", n_kv_heads=3), "n_kv_heads=3 is invalid: expected a divisor"),
    (dict(n_kv_heads=2), "n_kv_heads=2 is invalid: expected null for architecture 'gpt'"),
    (dict(rope_theta=5e5), "rope_theta=500000.0 is invalid: expected null for architecture 'gpt'"),
    (dict(architecture="gpt3"), "architecture='gpt3' is invalid: expected one of gpt, llama"),
    (dict(bias="some"), "bias='some' is invalid: expected one of none, qkv, all"),
    (dict(norm_eps=0), "norm_eps=0 is invalid"),
    (dict(tie_embeddings="yes"), "tie_embeddings='yes' is invalid: expected true or false"),
    (dict(architecture="llama", activation="swiglu", rope_scaling=dict(LLAMA3_ROPE, rope_type="yarn")),
     "rope_scaling.rope_type='yarn' is invalid: expected one of llama3"),
    (dict(architecture="llama", activation="swiglu", rope_scaling={"factor": 8.0}), "rope_scaling lacks"),
    (dict(bias="all", moe=dict(method="smoe", backend="megablocks")), "moe.backend='megablocks' is invalid"),
])
def test_family_options_are_validated_once(change, expected):
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dict(dict(d_model=32, n_heads=4, **change))
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_gpt_defaults_and_old_configs_are_unchanged():
    """A config without the new keys is the gpt family as before: same parameter names, shapes and numbers."""
    raw = json.loads((ROOT / "ds_configs" / "models" / "camex_small.json").read_text())
    cfg = ModelConfig.from_dict(dict(raw, vocab_size=100))
    assert (cfg.architecture, cfg.bias, cfg.norm_eps, cfg.tie_embeddings, cfg.kv_heads) == ("gpt", "none", 1e-5,
                                                                                             True, 4)
    names = list(build_model(cfg).state_dict())
    assert names[:2] == ["wte.weight", "wpe.weight"] and "lm_head.weight" not in names
    assert not any(n.endswith(".bias") and ".attn." in n for n in names)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


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

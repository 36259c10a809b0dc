"""`camex_ds.ds_config`: a typed, frozen view of the DeepSpeed JSON fields the run reads."""
import json

import pytest

from camex_ds.config import ConfigError
from camex_ds.ds_config import DeepSpeedSettings
from camex_ds.run_args import DEFAULT_DEEPSPEED_CONFIG


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

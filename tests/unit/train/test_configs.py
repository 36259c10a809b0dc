"""`camex_ds.train.configs`: what the flags alone cannot check is refused before the job starts, in one line."""
import json

import pytest

from camex_ds.config import ConfigError
from camex_ds.run_args import TrainArgs
from camex_ds.train.configs import validate

TWO_LAYERS = {"vocab_size": 64, "d_model": 32, "n_layers": 2, "n_heads": 2, "ffn_hidden_size": 64, "seq_len": 32}


@pytest.mark.parametrize("interval,error", [(2, None), (3, "--activation_checkpointing_interval=3 is invalid: "
                                                           "expected 1..2, the model's n_layers")])
def test_checkpointing_interval_is_checked_against_the_models_blocks(tmp_path, interval, error):
    (tmp_path / "model.json").write_text(json.dumps(TWO_LAYERS))
    args = TrainArgs(model_config=str(tmp_path / "model.json"), output_dir=str(tmp_path / "out"),
                     activation_checkpointing=True, activation_checkpointing_interval=interval)
    if error is None:
        assert validate(args)[0].n_layers == 2
        return
    with pytest.raises(ConfigError) as e:
        validate(args)
    assert str(e.value).startswith(error), str(e.value)

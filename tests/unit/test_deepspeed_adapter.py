"""`camex_ds.deepspeed_adapter`: the tested-version warning, the MoE layer as DeepSpeed's engine sees it, and the
checkpoint layout's names read back as written."""
from __future__ import annotations

import fnmatch
import subprocess
import sys

import deepspeed
import pytest
import torch
from torch import nn

from camex_ds import deepspeed_adapter as ds
from camex_ds.cli import convert, pretrain
from camex_ds.moe.layer import CAMExMoE
from camex_ds.train import zero_to_fp32

RANGE = ",".join(ds.TESTED_DEEPSPEED)


@pytest.mark.parametrize("version", ["0.20.1", "0.19.7", "0.18.0", "not-a-version"])
def test_an_untested_deepspeed_gives_one_line_naming_it_and_the_tested_range(monkeypatch, capsys, version):
    monkeypatch.setattr(deepspeed, "__version__", version)
    monkeypatch.delenv("RANK", raising=False)
    ds.warn_if_untested()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: ")
    assert f"DeepSpeed {version} is installed" in lines[0] and RANGE in lines[0]


@pytest.mark.parametrize("version", ["0.19.8", "0.19.9"])
def test_a_tested_deepspeed_says_nothing(monkeypatch, capsys, version):
    monkeypatch.setattr(deepspeed, "__version__", version)
    ds.warn_if_untested()
    assert capsys.readouterr().err == ""


def test_only_the_first_rank_of_a_job_warns(monkeypatch, capsys):
    monkeypatch.setattr(deepspeed, "__version__", "0.20.1")
    monkeypatch.setenv("RANK", "1")
    ds.warn_if_untested()
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("main, argv", [
    (convert.main, ["consolidate", "--checkpoint", "/nonexistent/run", "--output", "/nonexistent/out"]),
    (pretrain.main, ["--deepspeed_config", "/nonexistent/ds.json"]),
    (zero_to_fp32.main, ["/nonexistent/checkpoints", "/nonexistent/out"]),
])
def test_the_command_lines_warn_once_before_they_start(monkeypatch, capsys, main, argv):
    monkeypatch.setattr(deepspeed, "__version__", "0.20.1")
    monkeypatch.delenv("RANK", raising=False)
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("warning: DeepSpeed 0.20.1") and sum("DeepSpeed 0.20.1" in line for line in err) == 1


def test_importing_the_package_says_nothing():
    code = ("import deepspeed; deepspeed.__version__ = '0.20.1'; "
            "import camex_ds.deepspeed_adapter, camex_ds.model, camex_ds.ckpt.convert, camex_ds.train")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "DeepSpeed 0.20.1" not in done.stderr, done.stderr


def test_a_merge_layer_carries_the_engine_attributes_deepspeeds_own_moe_sets():
    ours = CAMExMoE(8, 16, 4, method="camex", segment_len=4)
    theirs = ds.MoE(8, nn.Linear(8, 8), num_experts=4)
    names = ("ep_size", "expert_group_name", "num_experts", "num_local_experts", "use_residual",
             "enable_expert_tensor_parallelism")
    assert isinstance(ours, ds.MoE)
    assert {n: getattr(ours, n) for n in names} == {n: getattr(theirs, n) for n in names}
    assert len(ds.local_experts(ours)) == len(ds.local_experts(theirs)) == 4
    assert ds.expert_group(ours) is None and ds.expert_group(theirs) is None


def test_moe_layers_are_named_in_module_order_and_sliced_to_one_rank():
    model = nn.Sequential(nn.Linear(8, 8), CAMExMoE(8, 16, 4, method="euclid", segment_len=4),
                          CAMExMoE(8, 16, 4, method="euclid", segment_len=4))
    assert ds.moe_layer_names(model) == ["1", "2"]
    ds.keep_local_experts(model[1], 2)
    assert len(ds.local_experts(model[1])) == 2
    assert {p.group_name for p in model[1].deepspeed_moe.experts.parameters()} == {ds.expert_group_name(2)}


def test_file_names_match_the_patterns_that_find_them():
    name = ds.expert_file_name(3, 12)
    assert fnmatch.fnmatch(name, ds.EXPERT_FILES) and fnmatch.fnmatch(name, ds.EXPERT_FILES_ANY_MP)
    m = ds.EXPERT_FILE_RE.fullmatch(name)
    assert (int(m["layer"]), int(m["expert"])) == (3, 12)
    assert ds.zero_file_name(1, True) == "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    assert ds.zero_file_name(1, False) == "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    assert ds.expp_file_name(2) == "expp_rank_2_mp_rank_00_optim_states.pt"


def test_optimizer_states_read_back_as_written():
    torch_state, groups = {"state": {}, "param_groups": []}, [[torch.ones(2)]]
    assert ds.fp16_optimizer_parts(ds.fp16_optimizer_state(torch_state, groups, {"loss_scaler": 1})) == \
        (torch_state, groups, {"loss_scaler": 1})
    assert ds.fp16_optimizer_parts({"state": {}}) is None
    zero = ds.ZeroPartitions([torch.zeros(4)], [{"w": ds.fragment_address(numel=4, start=0)}],
                             {"state": {}, "param_groups": []},
                             {"loss_scaler": None, "dynamic_loss_scale": False, "overflow": False, "clip_grad": 1.0,
                              "zero_stage": 2, "ds_version": "0.19.8"}, {"ds_config": {}})
    content = ds.zero_file_content(zero, [0], [[0]], [1])
    assert ds.read_zero_partitions(content) == zero
    assert ds.read_zero_partitions({"optimizer_state_dict": {}}) is None


def test_zero_to_fp32_runs_deepspeeds_writers_with_our_reader():
    from deepspeed.utils import zero_to_fp32 as theirs

    assert theirs.get_fp32_state_dict_from_zero_checkpoint is zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint
    assert zero_to_fp32.convert_zero_checkpoint_to_state_dict is theirs.convert_zero_checkpoint_to_state_dict
    assert zero_to_fp32.OUTPUT_DTYPE_NAMES is theirs.OUTPUT_DTYPE_NAMES

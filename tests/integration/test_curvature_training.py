"""Issue 24 through DeepSpeed and the training job: `moe.curvature_lr_scale` reaches the optimizer through every
DeepSpeed scheduler and ZeRO stage and survives a save and resume, and a checkpoint whose curvature rank terms are
all equal (saved before they started apart, spec §3) resumes with one warning. Engines are built in this process
(a world of one); runs use the launcher in this process (`launch.launch`), and write the layers' diagnostics
(router entropy, curvature, task vectors) to metrics.jsonl and final_metrics.json. Resharding and expert
parallelism: tests/unit/ckpt/test_convert.py."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from tests.launch import DIST_ENV, TINY, launch, tiny_ds_config, write_json
from camex_ds import parallel
from camex_ds.ckpt.format import EXPERT_RE
from camex_ds.config import ModelConfig
from camex_ds.run_args import TrainArgs
from camex_ds.model import GPT, apply_lr_scales, param_groups
from camex_ds.model.optim import LR_SCALE
from camex_ds.moe.factors import factor_shapes
from camex_ds.train import manifest
from camex_ds.train.configs import deepspeed_config

MODEL = {**TINY, "moe": {**TINY["moe"], "curvature_rank": 2}}
SCALE = 3.0
SCALED = {**TINY, "moe": {**TINY["moe"], "curvature_rank": 2, "curvature_lr_scale": SCALE}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, text_files):
    root = tmp_path_factory.mktemp("curvature")
    return {"root": root, "train": text_files[0], "cache": root / "cache", "ds": tiny_ds_config(root / "ds.json")}


def _args(s, out, model: dict, *extra) -> list:
    return ["--model_config", write_json(out.parent / f"{out.name}.json", model), "--deepspeed_config",
            s["ds"], "--data", s["train"], "--vocab_size", 512, "--cache_dir", s["cache"], "--output_dir", out,
            "--log_interval", 1, "--eval_batches", 1, "--no_progress", *extra]


def _ok(result) -> str:
    code, err, _ = result
    assert code == 0, err[-3000:]
    return err


def _warnings(err: str) -> list:
    return [line for line in err.splitlines() if line.startswith("warning:")]


def _make_old(tag: Path) -> None:
    """Rewrite a checkpoint as this code wrote it before issue 24: every rank term of every curvature factor the
    identity, and a recorded model config without the options added since."""
    for file in tag.glob("layer_*_expert_*_model_states.pt"):
        state = torch.load(file, weights_only=False)
        for key in [k for k in state if k.endswith(".flat")]:
            m = EXPERT_RE.match(key)
            matrix = state[f"{m['layer']}.deepspeed_moe.experts.deepspeed_experts.{m['id']}.{m['rest'].split('.')[1]}"]
            shapes = factor_shapes(2, *matrix.shape)
            state[key] = torch.cat([torch.eye(k).expand(r, k, k).flatten() for r, k, _ in shapes])
        torch.save(state, file)
    states = torch.load(tag / "mp_rank_00_model_states.pt", weights_only=False)
    run = manifest.read(tag)["run"]
    for moe in (states["model_config"]["moe"], run["model_config"]["moe"]):
        del moe["curvature_init_std"], moe["curvature_lr_scale"]
    torch.save(states, tag / "mp_rank_00_model_states.pt")
    manifest.write(tag, run)


def test_a_checkpoint_with_equal_rank_terms_resumes_with_one_warning(setup):
    """`--resume` of a checkpoint saved before §3's start: its recorded config lacks the new options (read with their
    defaults) and its rank terms are equal, which one warning line says; training goes on."""
    run = setup["root"] / "old"
    err = _ok(launch(_args(setup, run, MODEL, "--max_steps", 2, "--save_interval", 2, "--eval_interval", 2)))
    assert _warnings(err) == []
    _make_old(run / "checkpoints" / "global_step2")
    err = _ok(launch(_args(setup, run, MODEL, "--max_steps", 3, "--save_interval", 3, "--eval_interval", 3,
                           "--resume")))
    warnings = _warnings(err)
    assert len(warnings) == 1 and "curvature_rank is 2" in warnings[0], warnings
    assert "rank 2 then equals rank 1" in warnings[0]
    assert json.loads((run / "final_metrics.json").read_text())["step"] == 3


# ------------------------------------------------------------------------------------------------ lr scale


def _model(raw: dict, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig.from_dict({**raw, "vocab_size": 64}))


def _is_curvature_group(group, names) -> bool:
    kinds = {".curvature." in names[id(p)] for p in group["params"]}
    assert len(kinds) == 1, f"group {group['name']} mixes curvature factors and other parameters"
    return kinds.pop()


@pytest.mark.parametrize("method", ["camex", "euclid"])
def test_curvature_factors_have_their_own_expert_groups(method):
    """The factors (expert parameters, all of them) form their own groups with the scale and no decay, expert and
    non-expert parameters stay apart as DeepSpeed's MoE needs; the layout is the one before the option existed."""
    from deepspeed.moe.utils import is_moe_param

    model = _model({**SCALED, "moe": {**SCALED["moe"], "method": method}})
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups(model)
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(names)
    for g in groups:
        assert len({is_moe_param(p) for p in g["params"]}) == 1 and bool(g.get("moe")) == is_moe_param(g["params"][0])
        curved = _is_curvature_group(g, names)
        assert g.get(LR_SCALE) == (SCALE if curved else None)
        assert not curved or (g["moe"] and g["weight_decay"] == 0.0)
    assert any(LR_SCALE in g for g in groups) == (method == "camex")
    # the groups before the option existed (the factors in the no-decay groups): the same parameters, in order,
    # so checkpoints saved then keep their optimizer layout
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and ".curvature." not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and ".curvature." not in n)]
    before = split_params_into_different_moe_groups_for_optimizer([{"params": decay, "name": "decay"},
                                                                   {"params": no_decay, "name": "no_decay"}])
    assert [[names[id(p)] for p in g["params"]] for g in before if g["params"]] == \
        [[names[id(p)] for p in g["params"]] for g in groups]


@pytest.fixture
def world_of_one():
    """A process group of one rank in this process (DeepSpeed's engine needs one), torn down afterwards."""
    saved = {k: os.environ.get(k) for k in DIST_ENV}
    parallel.init_distributed()
    yield
    parallel.shutdown()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


SCHEDULERS = {
    "default": None,  # the repo's ds_configs/cpu.json: WarmupCosineLR
    "WarmupLR": {"warmup_min_lr": 1e-4, "warmup_max_lr": 2e-3, "warmup_num_steps": 3},
    "WarmupDecayLR": {"warmup_min_lr": 1e-4, "warmup_max_lr": 2e-3, "warmup_num_steps": 2, "total_num_steps": 6},
    "OneCycle": {"cycle_min_lr": 1e-4, "cycle_max_lr": 2e-3, "cycle_first_step_size": 2},
    "constant": {},  # no scheduler: the optimizer's lr
}


def _engine(tmp_path, raw: dict, scheduler: str, zero: int, seed: int = 0):
    import deepspeed

    ds = deepspeed_config(TrainArgs(max_steps=6, output_dir=str(tmp_path)))
    ds.update(tensorboard={"enabled": False}, zero_optimization={"stage": zero})
    if SCHEDULERS[scheduler] == {}:
        del ds["scheduler"]
    elif SCHEDULERS[scheduler] is not None:
        ds["scheduler"] = {"type": scheduler, "params": SCHEDULERS[scheduler]}
    model = _model(raw, seed)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model), config=ds)
    apply_lr_scales(engine.optimizer)
    return engine


def _step_lrs(engine, steps: int, data_seed: int = 0) -> list:
    """Train `steps` steps; per step, each param group's `(lr_scale, lr)` as the torch optimizer stepped with it."""
    from deepspeed.runtime.lr_schedules import get_torch_optimizer

    seen = []
    hook = get_torch_optimizer(engine.optimizer).register_step_pre_hook(
        lambda opt, args, kwargs: seen.extend((g.get(LR_SCALE), g["lr"]) for g in opt.param_groups))
    data = torch.randint(0, 64, (steps, 2, TINY["seq_len"] + 1), generator=torch.Generator().manual_seed(data_seed))
    out = []
    for batch in data:
        loss = engine(batch[:, :-1], labels=batch[:, 1:]).loss
        engine.backward(loss)
        engine.step()
        out.append(list(seen))
        seen.clear()
    hook.remove()
    return out


def _assert_scaled(lrs: list) -> None:
    for step in lrs:
        plain = {lr for scale, lr in step if scale is None}
        assert len(plain) == 1, step
        assert [lr for scale, lr in step if scale is not None] == pytest.approx([SCALE * plain.pop()]), step


@pytest.mark.parametrize("scheduler,zero", [("default", 0), ("default", 1), ("default", 2), ("WarmupLR", 0),
                                            ("WarmupDecayLR", 1), ("OneCycle", 2), ("constant", 0)])
def test_curvature_lr_scale_survives_deepspeed_schedulers(world_of_one, tmp_path, scheduler, zero):
    """Through `deepspeed.initialize`: every step the factors' groups step with scale x the lr the scheduler set for
    all groups (DeepSpeed's schedulers overwrite every group's lr with one value); the groups keep the scheduler's
    own value between steps. Without a scheduler, Adam's first update (lr · g/|g|) shows the scaled lr."""
    engine = _engine(tmp_path, SCALED, scheduler, zero)
    before = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    lrs = _step_lrs(engine, 4 if scheduler != "constant" else 1)
    _assert_scaled(lrs)
    if scheduler != "constant":
        assert len({step[0][1] for step in lrs}) > 1, "the schedule must change the lr"
    else:
        lr = lrs[0][0][1]
        moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in engine.module.named_parameters()}
        assert max(v for n, v in moved.items() if ".curvature." in n) == pytest.approx(SCALE * lr, rel=1e-3)
        assert max(v for n, v in moved.items() if ".ln_" in n) == pytest.approx(lr, rel=1e-3)
    assert len(set(engine.get_lr())) == 1  # what the scheduler (and the logged lr) hold: unscaled


def test_curvature_lr_scale_survives_a_checkpoint_and_resume(world_of_one, tmp_path):
    """ZeRO 1: save after 2 steps, load into a fresh engine (another init), step on: the factors still step with
    the scaled lr, and the weights are those of the engine that went on without stopping."""
    from camex_ds.train import checkpoint

    engine = _engine(tmp_path, SCALED, "default", 1)
    _step_lrs(engine, 2)
    checkpoint.save(engine, tmp_path / "ck", 2, {"step": 2}, {})
    _assert_scaled(_step_lrs(engine, 1, data_seed=9))
    resumed = _engine(tmp_path, SCALED, "default", 1, seed=5)
    checkpoint.load(resumed, tmp_path / "ck", "global_step2")
    _assert_scaled(_step_lrs(resumed, 1, data_seed=9))
    for (name, p), q in zip(engine.module.named_parameters(), resumed.module.parameters()):
        assert torch.equal(p, q), name


# ------------------------------------------------------------------------------------------------ diagnostics

DIAGNOSTICS = {"router_entropy", "router_max_load", "curvature_dev_from_identity", "task_vector_rel_norm"}


def test_layer_means_average_each_statistic_over_the_layers_reporting_it():
    from camex_ds.train.metrics import layer_means

    stats = {"router/layer1/entropy": 1.0, "router/layer3/entropy": 2.0, "curvature/layer3/dev_from_identity": 0.5,
             "task_vector/layer1/rel_norm": 0.25}
    assert layer_means(stats) == {"router_entropy": 1.5, "curvature_dev_from_identity": 0.5,
                                  "task_vector_rel_norm": 0.25}


def test_a_run_writes_its_diagnostics_to_metrics_and_final_metrics(setup):
    """A dynamic camex chain of two layers: every training row of metrics.jsonl carries the layer-averaged
    diagnostics, and final_metrics.json the last row's (the chain's second layer measured against its base)."""
    run = setup["root"] / "diagnostics"
    model = {**MODEL, "moe": {**MODEL["moe"], "dynamic": True, "num_experts": 3}}
    _ok(launch(_args(setup, run, model, "--max_steps", 2, "--save_interval", 2, "--eval_interval", 2)))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    assert len(train) == 2 and all(DIAGNOSTICS <= set(r) for r in train)
    final = json.loads((run / "final_metrics.json").read_text())
    assert {k: final[k] for k in DIAGNOSTICS} == {k: train[-1][k] for k in DIAGNOSTICS}
    assert 0 < final["router_entropy"] <= math.log(2) + 1e-6  # 2 routed experts
    assert 0 < final["curvature_dev_from_identity"] < 1 and 0 < final["task_vector_rel_norm"]

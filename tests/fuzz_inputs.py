"""A seeded generator of odd and broken launcher inputs (issue 15).

`cases(seed, n)` gives `n` cases, each a base that trains (a tiny model, one step) with 1 to 3 mutations:
(a flag's value None: the flag without a value; "MISSING" and "VALID_TEXT": paths the test fills in)
wrong types, out-of-range values, missing and unknown keys and incompatible combinations, in the model
config, its `moe` block, the DeepSpeed config and the launcher's flags. A case must either train its step
or exit 2 with one `error:` line and no traceback (tests/system/test_fuzz.py).

A value drawn here is either invalid, or valid and small: sizes are never made large (they are bounded by
memory, not by validation), and nothing selects an optimizer that DeepSpeed would first compile.
"""
from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field

DELETE = object()  # a mutation that removes the key
WRONG = ["abc", 1.5, [], {}, None, True, "1", -1, 0]  # wrong types and the usual bad numbers

MODEL = {"d_model": 32, "n_layers": 2, "n_heads": 2, "ffn_hidden_size": 64, "seq_len": 32, "activation": "gelu",
         "moe": {"method": "camex", "num_experts": 4, "every": 1, "segment_len": 16}}
DEEPSPEED = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
             "optimizer": {"type": "AdamW", "params": {"lr": 2e-3, "betas": [0.9, 0.95], "eps": 1e-8,
                                                      "weight_decay": 0.1, "torch_adam": True}},
             "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": "auto",
                                                                "warmup_num_steps": "auto"}},
             "zero_optimization": {"stage": 0}, "bf16": {"enabled": False}, "tensorboard": {"enabled": False}}
FLAGS = {"--max_steps": 1, "--eval_interval": 1, "--save_interval": 1, "--log_interval": 1, "--eval_batches": 1}

# Values worth trying per key: valid small alternatives first, then invalid ones (WRONG is added to all).
MODEL_VALUES = {
    "d_model": [16, 24, 48, 33], "n_layers": [1, 3, 6], "n_heads": [1, 4, 3, 5], "ffn_hidden_size": [16, 48],
    "seq_len": [16, 48, 64, 24], "activation": ["swiglu", "relu", "GELU"], "vocab_size": [600, 300, 2, 1],
    "init_std": [0.01, 1.0, 0.0, 11.0, float("nan")],
}
MOE_VALUES = {
    "method": ["dense", "smoe", "euclid", "ties", "dare", "camex-ties", "camex-dare", "camx", "CAMEX"],
    "num_experts": [1, 2, 3, 5, 8], "top_k": [None, 1, 2, 3, 5], "every": [2, 3], "segment_len": [8, 32, 12, 64],
    "routing": ["segment", "sequence", "token"], "first_segment": ["self-detached", "first"],
    "curvature_rank": [2, 4], "curvature_init_std": [0.0, 0.1, -0.1, float("nan")],
    "curvature_lr_scale": [0.5, 10.0, 0.0, -1.0, float("inf")], "alpha": [0.0, 0.5, 2.0, -0.5, float("inf")],
    "ep_size": [2, 3], "dynamic": [True, "yes"], "noisy_gating": [False, "no"], "aux_loss_coef": [0.0, 2e3],
    "dare_p": [0.0, 0.5, 1.0, 1.5], "capacity_factor": [0.5, 2.0, 0.0], "backend": ["deepspeed", "megablocks", "x"],
}
DS_VALUES = {
    "train_micro_batch_size_per_gpu": [1, 3], "gradient_accumulation_steps": [2, 3], "train_batch_size": [2, 4, 5],
    "gradient_clipping": [0.0, 0.5, -1.0, float("inf")], "steps_per_print": [1, 10 ** 6],
    "zero_optimization": [{"stage": 1}, {"stage": 2}, {"stage": 3}, {"stage": "2"}, {"stage": -1}, 2],
    "bf16": [{"enabled": True}, {"enabled": "maybe"}, "on"], "fp16": [{"enabled": True}, {"enabled": False}],
    "optimizer": [{"type": "SGD", "params": {"lr": 0.01}}, {"type": "Nope", "params": {}}, {"type": 5},
                  {"type": "AdamW", "params": "fast"}, {"type": "SGD", "params": {"lr": -1.0}}],
    "scheduler": [{"type": "WarmupLR", "params": {"warmup_num_steps": 1}}, {"type": "OneCycle", "params": {}},
                  {"type": "Nope", "params": {}}, {"type": "WarmupCosineLR", "params": {}}, None],
    "tensorboard": [{"enabled": True}, "yes"],
}
OPTIMIZER_PARAMS = {"lr": [1e-4, -1e-3, "fast"], "betas": [[0.8, 0.99], [0.9], [2.0, 0.9]], "eps": [0.0, -1.0],
                    "weight_decay": [0.0, -0.1]}
FLAG_VALUES = {
    "--max_steps": [2, 0, -3, "x", 1.5, None], "--eval_interval": [2, 0, "x"], "--eval_batches": [2, 0, 10 ** 6],
    "--save_interval": [3, 0, -1], "--log_interval": [5, 0], "--seed": [0, 7, -1, "x"], "--data_seed": [3, -2],
    "--ep_size": [1, 2, 0, 3], "--vocab_size": [300, 100, "x"], "--dist_timeout": [60, 0, -5, "nan", "inf"],
    "--keep_checkpoints": [1, 0, -1], "--skip_nonfinite": [1, -1], "--stop_at_step": [1, 0, 5],
    "--peak_tflops": [1.0, -1.0, 0.0], "--init_from": ["MISSING"], "--tokenizer": ["MISSING"],
    "--data": ["MISSING", "VALID_TEXT"], "--val_data": ["VALID_TEXT", "MISSING"], "--resume": [None],
    "--unknown_flag": [1],
}


@dataclass
class Case:
    name: str
    model: dict = field(default_factory=lambda: copy.deepcopy(MODEL))
    deepspeed: dict = field(default_factory=lambda: copy.deepcopy(DEEPSPEED))
    flags: dict = field(default_factory=lambda: dict(FLAGS))


def _set(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        if not isinstance(tree.get(key), dict):
            tree[key] = {}
        tree = tree[key]
    if value is DELETE:
        tree.pop(path[-1], None)
    else:
        tree[path[-1]] = copy.deepcopy(value)


def _pick(rng: random.Random, values: list):
    return rng.choice(values + WRONG) if rng.random() < 0.5 else rng.choice(values)


def _mutate(rng: random.Random, case: Case) -> str:
    """Apply one mutation; return its description."""
    kind = rng.choices(["model", "moe", "deepspeed", "optimizer", "flag", "unknown", "missing"],
                       weights=[4, 6, 5, 2, 6, 1, 2])[0]
    if kind == "model":
        key = rng.choice(sorted(MODEL_VALUES))
        value = _pick(rng, MODEL_VALUES[key])
        _set(case.model, (key,), value)
    elif kind == "moe":
        key = rng.choice(sorted(MOE_VALUES))
        value = _pick(rng, MOE_VALUES[key])
        if isinstance(case.model.get("moe"), dict):
            _set(case.model, ("moe", key), value)
        else:
            case.model["moe"] = {key: value} if rng.random() < 0.5 else value  # a block from scratch, or junk
    elif kind == "deepspeed":
        key = rng.choice(sorted(DS_VALUES))
        value = _pick(rng, DS_VALUES[key])
        _set(case.deepspeed, (key,), value)
    elif kind == "optimizer":
        key = rng.choice(sorted(OPTIMIZER_PARAMS))
        value = rng.choice(OPTIMIZER_PARAMS[key])
        if isinstance(case.deepspeed.get("optimizer"), dict) and isinstance(case.deepspeed["optimizer"].get("params"),
                                                                            dict):
            _set(case.deepspeed, ("optimizer", "params", key), value)
        key = f"optimizer.params.{key}"
    elif kind == "flag":
        key = rng.choice(sorted(FLAG_VALUES))
        value = rng.choice(FLAG_VALUES[key])
        case.flags[key] = value
    elif kind == "unknown":
        target = rng.choice(["model", "moe", "deepspeed"])
        key, value = f"unknown_{rng.randrange(100)}", rng.choice([1, "x", None])
        if target == "model":
            case.model[key] = value
        elif target == "moe" and isinstance(case.model.get("moe"), dict):
            case.model["moe"][key] = value
        else:
            case.deepspeed[key] = value  # DeepSpeed ignores unknown keys: such a case trains
    else:  # a required-looking key removed: defaults apply, or DeepSpeed complains
        target = rng.choice(["model", "moe", "deepspeed"])
        tree = {"model": case.model, "moe": case.model.get("moe"), "deepspeed": case.deepspeed}[target]
        if not isinstance(tree, dict) or not tree:
            return "missing: nothing to remove"
        key = rng.choice(sorted(k for k in tree if k not in ("optimizer",)))  # no optimizer: DeepSpeed would compile
        value = DELETE
        tree.pop(key)
    return f"{kind}:{key}={'<deleted>' if value is DELETE else repr(value)}"


def cases(seed: int, n: int) -> list:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        case = Case(name="")
        case.name = f"#{i} " + "; ".join(_mutate(rng, case) for _ in range(rng.choice([1, 1, 2, 3])))
        out.append(case)
    return out

"""New consolidated models from old ones, computing the same function: `upcycle` (dense -> MoE) and `fold`
(camex* -> its Euclidean twin with the curvature folded into the experts, `config.FOLD_TARGET`)."""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from ..config import FOLD_TARGET, ConfigError, ModelConfig, read_json_object
from ..model import GPT
from ..moe import functional as Fn
from ..moe.ffn import expert_matrix_names
from ..moe.factors import factor_shapes, split_factors, upgrade_factor_keys
from .format import (
    EXPERT_RE,
    EXPERTS,
    ConvertError,
    PathLike,
    atomic_output_dir,
    dtype_name,
    expert_key,
    find_tokenizer,
    read_consolidated,
    reference_shapes,
    save_pretrained,
)


def upcycle(input_dir: PathLike, moe_config: PathLike, output: PathLike, noise: float = 0.0, seed: int = 0) -> dict:
    """Dense consolidated model -> MoE model whose experts and bases are copies of each layer's dense FFN.

    With all experts equal to the base every task vector is exactly zero, so merge layers compute the
    dense FFN whatever their gates (dynamic chains too, when alpha = 1: Ŵ^l = Ŵ^{l-1} + Σ g (FFN_l − Ŵ^{l-1})
    with gates summing to 1). Routers and curvature factors start as the model built from `seed` has them (random
    gate, zero noise weights; factors with `M_i = I` and their rank terms apart, spec §3: the layer's own start).
    `noise > 0` adds N(0, noise²) to every expert copy (symmetry breaking; then the function is no longer exactly
    the dense one).
    """
    cfg, raw_cfg, dense = read_consolidated(input_dir)
    if cfg.moe is not None:
        raise ConvertError(f"'{input_dir}' is a {cfg.method} model: upcycle starts from a dense model (moe null)")
    path = Path(moe_config)
    if not path.is_file():
        raise ConvertError(f"MoE config '{path}' does not exist")
    raw = read_json_object(path, "MoE config", ConvertError)
    if "moe" in raw:  # a whole model config: its dimensions must be the dense model's
        for key, value in raw.items():
            if key != "moe" and key in cfg.to_dict() and value is not None and cfg.to_dict()[key] != value:
                raise ConvertError(f"MoE config '{path}' sets {key}={value!r} but the dense model has "
                                   f"{cfg.to_dict()[key]!r}")
        raw = raw["moe"]
    if not isinstance(raw, dict) or raw.get("method") in (None, "dense"):
        raise ConvertError(f"MoE config '{path}' must give a MoE 'method' (one of smoe, euclid, ties, dare, camex, "
                           "camex-ties, camex-dare)")
    raw = {**raw, "ep_size": 1}
    try:
        new_cfg = ModelConfig.from_dict({**cfg.to_dict(), "moe": raw})
    except ConfigError as e:
        raise ConvertError(f"MoE config '{path}': {e}") from None
    if not (isinstance(noise, (int, float)) and noise >= 0 and math.isfinite(noise)):
        raise ConvertError(f"--noise {noise!r} is invalid: expected a number >= 0")
    moe = new_cfg.moe
    if moe.dynamic and moe.alpha != 1.0 and noise == 0:
        raise ConvertError(f"a dynamic chain with alpha={moe.alpha} cannot reproduce the dense model "
                           "(Ŵ^l = (1-α)Ŵ^(l-1) + α FFN_l): use alpha 1.0")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = GPT(new_cfg)  # fresh routers and curvature factors, everything else overwritten below
    state = model.state_dict()
    dtype = next(v.dtype for v in dense.values() if v.is_floating_point())
    matrices = expert_matrix_names(cfg.activation)
    out, fresh = {}, []
    for name, value in state.items():
        if name in dense:
            out[name] = dense[name].clone()
            continue
        # an expert's matrix or bias (smoe experts own GPT-2's FFN biases; merge layers share the dense ones)
        m = re.match(r"^blocks\.(\d+)\.ffn(?:\.base\.|" + re.escape(EXPERTS) + r"(\d+)\.)((?:bias\.)?(\w+))$", name)
        if m and m[4] in matrices:
            src = dense.get(f"blocks.{m[1]}.ffn.{m[3]}")
            if src is None:
                raise ConvertError(f"'{input_dir}' lacks the dense FFN 'blocks.{m[1]}.ffn.{m[3]}' needed for '{name}'")
            copy_ = src.clone()
            if m[2] is not None and noise > 0:
                copy_ = (copy_.float() + noise * torch.randn(copy_.shape, generator=gen)).to(copy_.dtype)
            out[name] = copy_
            continue
        if ".router." in name or ".curvature." in name or ".gate.wg." in name:
            out[name] = value.to(dtype)
            fresh.append(name)
            continue
        raise ConvertError(f"cannot initialise '{name}' from the dense model '{input_dir}'")
    notes = []
    if moe.method == "smoe":
        notes.append("smoe: token routing with top-1 gate scaling or capacity drops does not reproduce the dense "
                     "model exactly")
    info = {"command": "upcycle", "source": str(Path(input_dir).resolve()), "dataset": _dataset_of(raw_cfg),
            "noise": noise, "seed": seed, "fresh": len(fresh), "notes": notes}
    with atomic_output_dir(output) as work:
        save_pretrained(work, out, new_cfg, find_tokenizer(input_dir), dtype=dtype_name(dtype),
                        conversion=info)
    return {"output": str(output), "method": moe.method, "moe_layers": new_cfg.moe_layers, **info}


def _dataset_of(raw_cfg: dict):
    """The training dataset a consolidated model's config.json records (carried over by upcycle and fold)."""
    conversion = raw_cfg.get("conversion")
    return conversion.get("dataset") if isinstance(conversion, dict) else None


def _curvature_factors(state: dict, key: str, rank: int, shape) -> tuple:
    """One expert matrix's four factors (float64) from a state dict, in the flat layout (`key.flat`) or the
    older one (`key.a` ... `key.d`, made flat here as the layer does when it loads them)."""
    upgrade_factor_keys(state, key + ".")
    return split_factors(state[key + ".flat"].double(), factor_shapes(rank, *shape))


def fold(input_dir: PathLike, output: PathLike) -> dict:
    """Fold each expert's (constant) curvature into its task vector: E'_i = B + m_i ⊙ M_i(E_i − B).

    camex -> euclid and camex-dare -> dare (DARE's eval mask is 1) exactly. camex-ties -> euclid with
    the TIES mask folded in: TIES elects its mask from the raw task vectors, which the folded model no
    longer has (re-electing from M(τ) would change the function), and the mask is constant after
    training, so it goes into the experts and the model merges plainly. Dynamic chains are refused:
    there M_i applies to E_i − Ŵ_s, which depends on the segment.
    """
    cfg, raw_cfg, state = read_consolidated(input_dir)
    if cfg.moe is None or not cfg.moe.method.startswith("camex"):
        raise ConvertError(f"'{input_dir}' is a {cfg.method} model: only camex, camex-ties and camex-dare models have "
                           "curvature to fold")
    if cfg.moe.dynamic:
        raise ConvertError(f"'{input_dir}' is a dynamic chain: its curvature acts on E - Ŵ_s, which depends on the "
                           "segment, so it cannot be folded into the experts")
    twin = FOLD_TARGET[cfg.moe.method]
    new_cfg = cfg.with_moe(method=twin)
    shapes = reference_shapes(new_cfg)
    out = {k: v for k, v in state.items() if ".curvature." not in k}
    for prefix, count in _moe_layers(state).items():
        for mat in expert_matrix_names(cfg.activation):
            base = state[f"{prefix}.base.{mat}"].double()
            experts = torch.stack([state[expert_key(prefix, e, mat)].double() for e in range(count)])
            factors = [torch.stack(fs, dim=1) for fs in zip(*(
                _curvature_factors(state, expert_key(prefix, e, f"curvature.{mat}"), cfg.moe.curvature_rank,
                                   base.shape) for e in range(count)))]
            tau = experts - base
            curved = Fn.apply_curvature(tau, factors)
            if cfg.moe.mask == "ties":
                curved = curved * Fn.ties_mask(tau)
            folded = base + curved
            dtype = state[f"{prefix}.base.{mat}"].dtype
            for e in range(count):
                out[expert_key(prefix, e, mat)] = folded[e].to(dtype)
    missing = [k for k in shapes if k not in out]
    if missing:
        raise ConvertError(f"folding '{input_dir}' left tensor '{missing[0]}' undefined")
    info = {"command": "fold", "source": str(Path(input_dir).resolve()), "dataset": _dataset_of(raw_cfg),
            "folded_from": cfg.moe.method,
            "mask": "ties mask folded into the experts" if cfg.moe.mask == "ties" else cfg.moe.mask}
    with atomic_output_dir(output) as work:
        dtype = next(v.dtype for v in state.values() if v.is_floating_point())
        save_pretrained(work, out, new_cfg, find_tokenizer(input_dir), dtype=dtype_name(dtype),
                        conversion=info)
    return {"output": str(output), "method": twin, **info}


def _moe_layers(state: dict) -> dict:
    """Merge-layer prefix -> number of stored experts, from the state dict's names."""
    counts = {}
    for name in state:
        m = EXPERT_RE.match(name)
        if m:
            counts[m["layer"]] = max(counts.get(m["layer"], 0), int(m["id"]) + 1)
    return counts

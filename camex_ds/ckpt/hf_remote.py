"""Models no stock architecture computes, as Hugging Face folders with their own modeling code (model_type `camex`).

`write_folder` writes `config.json` (with `auto_map`), the two files of `camex_ds/ckpt/hf_modeling/` (copied:
they have one home, there), `model.safetensors` with the tensors the Hugging Face model computes with,
`camex_ds.safetensors` with the tensors only training needs, and a README.md saying which is which.
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` loads it. `camex_state` reads such a
folder back into our state dict, exactly the one exported (`import-hf`).

In evaluation a merge layer's curvature and mask depend on the parameters only, so the export stores, per merge
layer that owns a base, each expert's curved, masked task vector `m_i ⊙ M_i(E_i − B)`, computed by
`camex_ds.moe.functional` as our evaluation forward computes it: the exported layer is a Euclidean merge of
stored tensors. A layer that continues a dynamic chain merges onto per-segment weights, so it stores `M_i(E_i)`
and the factors, which the modeling code applies to those weights. An smoe layer stores its gate and its
experts stacked (`SMOE_NOTE` says where DeepSpeed's gate differs).
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from ..config import ConfigError, ModelConfig
from ..deepspeed_adapter import TOKEN_GATE
from ..moe import functional as Fn
from ..moe.ffn import expert_matrix_names, matrix_shapes
from ..moe.factors import factor_shapes, split_factors
from .format import EXPERT_RE, ConvertError, PathLike, expert_key

MODEL_TYPE = "camex"
MODELING_FILES = ("configuration_camex.py", "modeling_camex.py")
TEMPLATES = Path(__file__).resolve().parent / "hf_modeling"
WEIGHTS, TRAINING_WEIGHTS = "model.safetensors", "camex_ds.safetensors"
AUTO_MAP = {"AutoConfig": "configuration_camex.CamexConfig", "AutoModelForCausalLM": "modeling_camex.CamexForCausalLM"}
# The tensors the export computes from the experts (the Hugging Face model's own), never read back.
DERIVED = re.compile(r"\.ffn\.(task|curved_experts|experts|curvature|gate|expert_biases)\.")
SMOE_NOTE = ("smoe is exported as DeepSpeed's top-k gate computes it without dropping tokens and, for top-2, with the "
             "second expert chosen by its probability: our evaluation drops the tokens beyond an expert's capacity "
             "(a batch's token count times capacity_factor over the experts, at least 4) and draws a top-2 second "
             "expert with Gumbel noise, so the two agree when no token is dropped and (top-2) the noise is off")


def export_notes(cfg: ModelConfig) -> list:
    """The notes the export of `cfg` comes with: where the exported model differs from ours, or cannot do what a
    decoder usually does."""
    moe = cfg.moe
    if moe is None:
        return []
    if moe.method == "smoe":
        return [SMOE_NOTE]
    if moe.routing != "causal" or moe.first_segment != "uniform":
        return [f"routing={moe.routing!r} with first_segment={moe.first_segment!r} lets a segment's gates see its own "
                "later tokens: the exported model scores whole segments (use_cache=False) and cannot decode token by "
                "token, as camex-generate only approximates it"]
    return []


def _factors(state: dict, prefix: str, count: int, name: str, rank: int, shape) -> list:
    """A matrix's curvature factors of every expert, `[R, n, k, k]` each (the functional core's layout)."""
    per_expert = [split_factors(state[expert_key(prefix, e, f"curvature.{name}.flat")], factor_shapes(rank, *shape))
                  for e in range(count)]
    return [torch.stack(f, dim=1) for f in zip(*per_expert)]


def token_moe_tensors(state: dict, cfg: ModelConfig) -> dict:
    """smoe layers: the gate's weights and each matrix's (and bias's) experts stacked `[N, ...]`."""
    out = {}
    for layer in cfg.moe_layers:
        prefix = f"blocks.{layer}.ffn"
        out[f"{prefix}.gate.weight"] = state[f"{prefix}{TOKEN_GATE}wg.weight"]
        for name in expert_matrix_names(cfg.activation):
            for stacked, rest in (("experts", name), ("expert_biases", f"bias.{name}")):
                if expert_key(prefix, 0, rest) in state:
                    out[f"{prefix}.{stacked}.{name}"] = torch.stack(
                        [state[expert_key(prefix, e, rest)] for e in range(cfg.moe.num_experts)])
    return out


@torch.no_grad()
def merge_layer_tensors(state: dict, cfg: ModelConfig) -> dict:
    """Merge layers: what the module docstring says, computed in the stored dtype by the functional core as our
    evaluation forward computes it."""
    moe, out = cfg.moe, {}
    for (layer, start) in zip(cfg.moe_layers, cfg.chain_starts):
        prefix = f"blocks.{layer}.ffn"
        for name, shape in matrix_shapes(cfg.d_model, cfg.ffn_hidden_size, cfg.activation).items():
            experts = [state[expert_key(prefix, e, name)] for e in range(moe.stored_experts)]
            factors = _factors(state, prefix, len(experts), name, moe.curvature_rank, shape) if moe.curved else None
            if start or not moe.dynamic:
                tau = Fn.task_vectors(state[f"{prefix}.base.{name}"], experts)
                # DARE evaluates without a drop: no multipliers
                out[f"{prefix}.task.{name}"] = Fn.curved_task_vectors(tau, factors, moe.mask)
                continue
            stacked = torch.stack(experts)
            out[f"{prefix}.curved_experts.{name}"] = stacked if factors is None else Fn.apply_curvature(stacked,
                                                                                                       factors)
            if moe.mask == "ties":
                out[f"{prefix}.experts.{name}"] = stacked
            for letter, f in zip("abcd", factors or ()):
                out[f"{prefix}.curvature.{name}.{letter}"] = f.transpose(0, 1)  # [n, R, k, k]
    return out


def derived_tensors(state: dict, cfg: ModelConfig) -> dict:
    """The tensors of the MoE layers that the Hugging Face model computes with and our model derives from its
    own (`DERIVED`)."""
    out = token_moe_tensors(state, cfg) if cfg.moe.method == "smoe" else merge_layer_tensors(state, cfg)
    return {k: v.contiguous() for k, v in out.items()}


def training_only(name: str) -> bool:
    """Our tensors the Hugging Face model does not read as they are: the experts (it reads what they give), the
    router's noise weights, and smoe's gate (it reads it under its own name)."""
    return EXPERT_RE.match(name) is not None or name.endswith(".router.w_noise") or TOKEN_GATE in name


def hf_remote_config(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    """config.json of the exported folder: `CamexConfig`'s fields, `auto_map`, and our config (`camex_ds_config`)."""
    moe = cfg.moe
    merge = {} if moe is None else {
        "method": moe.method, "moe_layers": cfg.moe_layers, "chain_starts": cfg.chain_starts,
        "num_experts": moe.routed_experts, "router_top_k": moe.k, "segment_len": moe.segment_len,
        "routing": moe.routing, "first_segment": moe.first_segment, "alpha": moe.alpha,
        "dynamic": moe.dynamic, "curvature_rank": moe.curvature_rank}
    scaling = cfg.to_dict()["rope_scaling"]
    return {"architectures": ["CamexForCausalLM"], "model_type": MODEL_TYPE, "auto_map": AUTO_MAP,
            "architecture": cfg.architecture, "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
            "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.kv_heads, "intermediate_size": cfg.ffn_hidden_size,
            "max_position_embeddings": cfg.seq_len, "activation": cfg.activation, "bias": cfg.bias,
            "norm_eps": cfg.norm_eps, "rotary_base": cfg.rope_base, "rotary_scaling": scaling,
            "tie_word_embeddings": cfg.tie_embeddings, **merge,
            "torch_dtype": "bfloat16" if dtype == torch.bfloat16 else "float32", "camex_ds_config": cfg.to_dict()}


def readme(cfg: ModelConfig) -> str:
    """The exported folder's README.md: what it is, how to load it, which tensors are stored and why."""
    moe = cfg.moe
    if moe is None:
        what = "a dense model"
    elif moe.method == "smoe":
        what = f"an `smoe` model: each token goes to its top-{moe.k} of {moe.num_experts} experts in layers " \
               f"{cfg.moe_layers}. {SMOE_NOTE[0].upper()}{SMOE_NOTE[1:]}"
    else:
        what = f"a `{moe.method}` model{' with dynamic chains' if moe.dynamic else ''}: {moe.routed_experts} " \
               f"experts merged per segment of {moe.segment_len} tokens in layers {cfg.moe_layers}"
    return f"""# camex_ds model ({cfg.architecture} family), exported by `camex-convert export-hf`

This is {what}. No stock `transformers` architecture computes it, so the folder carries its own modeling code
(`configuration_camex.py`, `modeling_camex.py`; they import only torch and transformers):

```python
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("path/to/this/folder", trust_remote_code=True)
out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=64, do_sample=False)
```

## Which tensors are stored, and why

`model.safetensors` holds what the Hugging Face model computes with, under camex_ds's own names:
- embeddings, attention, norms and dense FFNs as trained;
- per merge layer, the router's `w_gate` and, when the FFN has biases, `bias.*` (shared by all experts);
- per merge layer that owns a base (every static layer, the first layer of each dynamic chain): `base.*` and
  `task.*` `[n, out, in]`, each expert's task vector with its curvature applied and, for TIES, its mask:
  `m_i * M_i(E_i - B)`. In evaluation these depend on the parameters only (DARE's evaluation mask is 1, TIES
  elects its signs from the parameters), so camex_ds computed them once, with its own functional code, and the
  exported layer merges them with its router's gates: `W_j = B + alpha * sum_i g_(j,i) task_i`. Nothing of the
  curvature is computed at inference.
- per layer that continues a dynamic chain: `curved_experts.*` `M_i(E_i)`, and for `camex*` methods the
  curvature factors `curvature.<matrix>.a|b|c|d` `[n, R, k, k]`: such a layer merges onto the previous layer's
  per-segment weights `W`, whose curvature `M_i(W)` depends on the segment and is applied at inference; for TIES
  also the raw `experts.*`, from which each segment elects its signs;
- per smoe layer: the gate `gate.weight` and the experts stacked, `experts.*` `[N, out, in]` (and
  `expert_biases.*`).

`camex_ds.safetensors` holds what only training needs, or holds under our own layout: each expert's own
weights and curvature factors, the router's noise weights, smoe's gate. The curved task vectors do not give
them back (the curvature factors and the experts are not recoverable from `M_i(E_i - B)`), so
`camex-convert import-hf` reads this file to rebuild the trainable camex_ds model exactly, with the full config
under `camex_ds_config` in config.json. The Hugging Face model never reads it.

## Generation

Under causal routing with a uniform first segment (other routings score whole segments only, without a cache:
a segment's gates see its own later tokens), segment j's merged FFN depends only on segment j-1, so decoding
with the cache is exact:
the cache keeps each merge layer's running segment sum and its current segment's merged weights, and a layer
merges once per segment (smoe routes each token by itself). Batches must not be padded; pass the all-ones
`attention_mask`, or `generate()` takes a prompt token equal to `pad_token_id` for padding.
"""


def write_folder(work: Path, cfg: ModelConfig, state: dict, generation: dict) -> dict:
    """Write the folder's config.json (with the `generation` keys, e.g. `eos_token_id`), modeling code, weights and
    README into `work`; returns its config.json."""
    from safetensors.torch import save_file

    dtype = next(v.dtype for v in state.values() if v.is_floating_point())
    model = {k: v.contiguous() for k, v in state.items() if not training_only(k)}
    if cfg.moe is not None:
        model.update(derived_tensors(state, cfg))
    training = {k: v.contiguous() for k, v in state.items() if training_only(k)}
    save_file(model, str(work / WEIGHTS), metadata={"format": "pt"})
    if training:
        save_file(training, str(work / TRAINING_WEIGHTS), metadata={"format": "pt"})
    config = {**hf_remote_config(cfg, dtype), **generation}
    (work / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in MODELING_FILES:
        shutil.copyfile(TEMPLATES / name, work / name)
    (work / "README.md").write_text(readme(cfg))
    return config


def camex_state(folder: PathLike, hf: dict) -> tuple:
    """`(ModelConfig, state dict)` of a folder `write_folder` wrote: its tensors but the derived ones, and the
    training-only ones from `camex_ds.safetensors`. The derived tensors must still be what the experts give (a
    folder fine-tuned as a Hugging Face model is refused: its experts cannot be recovered from merged tensors)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    raw = hf.get("camex_ds_config")
    if not isinstance(raw, dict):
        raise ConvertError(f"'{folder}/config.json' has model_type {MODEL_TYPE!r} but no camex_ds_config object: "
                           "it was not written by camex-convert export-hf")
    try:
        cfg = ModelConfig.from_dict(raw)
    except ConfigError as e:
        raise ConvertError(f"the camex_ds_config of '{folder}/config.json' is invalid: {e}") from None
    state, derived = {}, {}
    for file in (WEIGHTS, TRAINING_WEIGHTS):
        if not (folder / file).is_file():
            if file == TRAINING_WEIGHTS and cfg.moe is None:
                continue
            raise ConvertError(f"'{folder}' lacks {file}, which camex-convert export-hf writes")
        try:
            tensors = load_file(str(folder / file))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ConvertError(f"'{folder / file}' is unreadable or truncated ({str(e).splitlines()[0]})") from None
        for name, tensor in tensors.items():
            (derived if DERIVED.search(name) else state)[name] = tensor
    try:
        expected = derived_tensors(state, cfg) if cfg.moe is not None else {}
    except KeyError as e:
        raise ConvertError(f"'{folder}' lacks tensor {e} of the camex_ds model its config.json describes") from None
    changed = sorted(k for k in set(expected) | set(derived)
                     if k not in expected or k not in derived or not torch.equal(expected[k], derived[k]))
    if changed:
        raise ConvertError(f"tensor '{changed[0]}' of '{folder}/{WEIGHTS}' is not what the experts in "
                           f"{TRAINING_WEIGHTS} give: the folder changed after export (fine-tuned?), and the experts "
                           "cannot be recovered from merged tensors")
    return cfg, state


__all__ = ["MODEL_TYPE", "camex_state", "derived_tensors", "export_notes", "hf_remote_config", "readme",
           "write_folder"]

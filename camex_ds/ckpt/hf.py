"""Hugging Face models <-> the consolidated format: `import_hf` and `export_hf`.

Covered: `LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM` (the `llama` family) and
`GPT2LMHeadModel` (the `gpt` family with `bias='all'`, `gelu_tanh`). A Hugging Face folder is read
from its `config.json` and safetensors weights (`model.safetensors`, or shards listed in
`model.safetensors.index.json`); pickle weights (`pytorch_model.bin`, sharded or not) only with
`allow_pickle`, through `torch.load(weights_only=True)`, because unpickling can run code.

The mapping is exact or refused: a `model_type`, activation, rope scaling, sliding window, head size or
bias layout this code cannot reproduce is a one-line `ConvertError` naming it, and so is any weight the
model has no place for. Layout differences are pure re-arrangements: our fused q/k/v projection is the
row-wise concatenation of q_proj, k_proj and v_proj, and GPT-2's `Conv1D` stores its matrices as
[in, out], transposed from ours. Only `transformers`' config.json and tensor names are used; the package
itself is not needed.

Export writes a stock architecture where one computes exactly our function: a dense model in the layout and
`config.json` of its family (`gpt` -> GPT-2, `llama` -> Llama, Qwen2 with q/k/v biases), and a MoE model that is
a dense model in disguise (every expert of every static merge layer equals its base: an upcycled model, or its
fold, before training; every merged FFN is then the base whatever the gates). Every other model, a trained merge
model for one, gets its own modeling code (`hf_remote`); `import_hf` reads such a folder back exactly.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..config import ConfigError, ModelConfig, read_json_object
from .format import (
    EXPERT_RE,
    FORMAT,
    ConvertError,
    PathLike,
    atomic_output_dir,
    dtype_name,
    find_tokenizer,
    read_consolidated,
    reference_shapes,
    save_pretrained,
)
from .hf_remote import MODEL_TYPE as REMOTE_MODEL_TYPE
from .hf_remote import camex_state, export_notes, write_folder

MODEL_TYPES = ("llama", "mistral", "qwen2", "gpt2")
HF_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "gpt2": "GPT2LMHeadModel"}
SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
PICKLE, PICKLE_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
# Hugging Face activations for our FFNs: GPT-2's "gelu_new" and "gelu_pytorch_tanh" are the tanh GELU.
GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
LLAMA_ACTIVATIONS = ("silu", "swish")
# Buffers older checkpoints carry: derived from the config, never weights.
IGNORED = re.compile(r"(\.rotary_emb\.inv_freq|\.attn\.bias|\.attn\.masked_bias)$")


# ================================================================================================================
# the name mapping


@dataclass(frozen=True)
class Rule:
    """Our tensor `ours` is the row-wise concatenation of Hugging Face's `theirs` (q, k, v: three; else one),
    each transposed first when `conv1d` (GPT-2 stores its matrices as [in, out])."""

    ours: str
    theirs: tuple
    conv1d: bool = False


LLAMA_BLOCK = {
    "ln_attn.weight": ("input_layernorm.weight",),
    "attn.qkv.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "attn.qkv.bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    "attn.proj.weight": ("self_attn.o_proj.weight",),
    "attn.proj.bias": ("self_attn.o_proj.bias",),
    "ln_ffn.weight": ("post_attention_layernorm.weight",),
    "ffn.w_gate": ("mlp.gate_proj.weight",),
    "ffn.w_up": ("mlp.up_proj.weight",),
    "ffn.w_down": ("mlp.down_proj.weight",),
    "ffn.bias.w_gate": ("mlp.gate_proj.bias",),
    "ffn.bias.w_up": ("mlp.up_proj.bias",),
    "ffn.bias.w_down": ("mlp.down_proj.bias",),
}
LLAMA_TOP = {"wte.weight": "model.embed_tokens.weight", "ln_f.weight": "model.norm.weight",
             "lm_head.weight": "lm_head.weight"}
GPT2_BLOCK = {
    "ln_attn.weight": ("ln_1.weight",),
    "ln_attn.bias": ("ln_1.bias",),
    "attn.qkv.weight": ("attn.c_attn.weight",),
    "attn.qkv.bias": ("attn.c_attn.bias",),
    "attn.proj.weight": ("attn.c_proj.weight",),
    "attn.proj.bias": ("attn.c_proj.bias",),
    "ln_ffn.weight": ("ln_2.weight",),
    "ln_ffn.bias": ("ln_2.bias",),
    "ffn.w_in": ("mlp.c_fc.weight",),
    "ffn.w_out": ("mlp.c_proj.weight",),
    "ffn.bias.w_in": ("mlp.c_fc.bias",),
    "ffn.bias.w_out": ("mlp.c_proj.bias",),
}
GPT2_TOP = {"wte.weight": "transformer.wte.weight", "wpe.weight": "transformer.wpe.weight",
            "ln_f.weight": "transformer.ln_f.weight", "ln_f.bias": "transformer.ln_f.bias",
            "lm_head.weight": "lm_head.weight"}


def rules(cfg: ModelConfig) -> list:
    """One `Rule` per tensor of the dense model `cfg` describes, in its state-dict order."""
    gpt = cfg.architecture == "gpt"
    block, top, prefix = (GPT2_BLOCK, GPT2_TOP, "transformer.h") if gpt else (LLAMA_BLOCK, LLAMA_TOP, "model.layers")
    out = []
    for name, shape in reference_shapes(cfg.replace(moe=None)).items():
        m = re.match(r"^blocks\.(\d+)\.(.+)$", name)
        if m is None:
            out.append(Rule(name, (top[name],)))
            continue
        theirs = tuple(f"{prefix}.{m[1]}.{t}" for t in block[m[2]])
        out.append(Rule(name, theirs, conv1d=gpt and len(shape) == 2))
    return out


def _split_sizes(cfg: ModelConfig, rule: Rule) -> list:
    """Row counts of `theirs` in our concatenated tensor: q, k, v for the fused projection, else all of it."""
    if len(rule.theirs) == 1:
        return [-1]
    kv = cfg.kv_heads * cfg.head_dim
    return [cfg.d_model, kv, kv]


# ================================================================================================================
# reading a Hugging Face folder


def read_hf_config(folder: PathLike) -> dict:
    folder = Path(folder)
    if not folder.is_dir():
        raise ConvertError(f"Hugging Face model folder '{folder}' does not exist")
    if not (folder / "config.json").is_file():
        raise ConvertError(f"'{folder}' is not a Hugging Face model folder: config.json is missing")
    hf = read_json_object(folder / "config.json", "config", ConvertError)
    if hf.get("format") == FORMAT:
        raise ConvertError(f"'{folder}' is already a consolidated camex_ds model, not a Hugging Face one")
    if hf.get("model_type") not in MODEL_TYPES + (REMOTE_MODEL_TYPE,):
        raise ConvertError(f"model_type {hf.get('model_type')!r} of '{folder}' is not supported: expected one of "
                           f"{', '.join(MODEL_TYPES)} or {REMOTE_MODEL_TYPE} (a camex_ds export)")
    return hf


def _weight_files(folder: Path, allow_pickle: bool) -> tuple:
    """`(files, pickled)`: the weight files to read, from the index when sharded, safetensors first."""
    for index, single, pickled in ((SAFETENSORS_INDEX, SAFETENSORS, False), (PICKLE_INDEX, PICKLE, True)):
        if pickled and ((folder / index).is_file() or (folder / single).is_file()) and not allow_pickle:
            raise ConvertError(f"'{folder}' has only pickle weights ({single}): loading a pickle can run arbitrary "
                               "code, so it is read only with --allow_pickle (then through "
                               "torch.load(weights_only=True))")
        if (folder / index).is_file():
            weight_map = read_json_object(folder / index, "weight index", ConvertError).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ConvertError(f"weight index '{folder / index}' has no 'weight_map'")
            return [folder / f for f in dict.fromkeys(weight_map.values())], pickled
        if (folder / single).is_file():
            return [folder / single], pickled
    raise ConvertError(f"'{folder}' has no weights: expected {SAFETENSORS}, {SAFETENSORS_INDEX} (sharded), or with "
                       f"--allow_pickle {PICKLE}")


def read_hf_weights(folder: PathLike, allow_pickle: bool = False) -> dict:
    """Every tensor of a Hugging Face folder, from all its shards."""
    from safetensors.torch import load_file

    folder = Path(folder)
    files, pickled = _weight_files(folder, allow_pickle)
    state = {}
    for file in files:
        if not file.is_file():
            raise ConvertError(f"weight shard '{file}' named by the index is missing")
        try:
            part = torch.load(file, map_location="cpu", weights_only=True) if pickled else load_file(str(file))
        except Exception as e:  # truncated, corrupt, or a pickle that is more than tensors: one line each
            detail = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConvertError(f"weight file '{file}' is unreadable or truncated ({detail[:160]})")
        if not isinstance(part, dict) or not all(torch.is_tensor(v) for v in part.values()):
            raise ConvertError(f"weight file '{file}' does not hold a flat dict of tensors")
        state.update(part)
    return state


def _rope(hf: dict) -> tuple:
    """`(rope_theta, rope_scaling)` from a config.json of either layout: transformers 4 (`rope_theta`,
    `rope_scaling`) or 5 (`rope_parameters`)."""
    params = hf.get("rope_parameters")
    if params:
        if "rope_type" not in params:
            raise ConvertError("per-layer rope_parameters are not supported: one rotary setting for all layers is "
                               "expected")
        theta, scaling = params.get("rope_theta", hf.get("rope_theta", 10000.0)), params
    else:
        theta, scaling = hf.get("rope_theta", 10000.0), hf.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind != "llama3":
        raise ConvertError(f"rope scaling type {kind!r} is not supported: expected none (default) or 'llama3'")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keys if k not in scaling]
    if missing:
        raise ConvertError(f"the llama3 rope scaling lacks {', '.join(missing)}")
    return float(theta), {"rope_type": "llama3", **{k: scaling[k] for k in keys}}


def _llama_config(hf: dict, seq_len: Optional[int]) -> dict:
    model_type = hf["model_type"]
    act = hf.get("hidden_act", "silu")
    if act not in LLAMA_ACTIVATIONS:
        raise ConvertError(f"hidden_act {act!r} is not supported for {model_type}: expected silu (SwiGLU)")
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or d // heads
    if head_dim * heads != d:
        raise ConvertError(f"head_dim={head_dim} with {heads} heads is not hidden_size={d}: only head_dim = "
                           "hidden_size / num_attention_heads is supported")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConvertError(f"partial_rotary_factor={hf['partial_rotary_factor']} is not supported: rotary embeddings "
                           "over the whole head are expected")
    if model_type == "qwen2":
        bias = "qkv"
    elif model_type == "mistral":
        bias = "none"
    else:
        attention_bias, mlp_bias = bool(hf.get("attention_bias")), bool(hf.get("mlp_bias"))
        if attention_bias != mlp_bias:
            raise ConvertError(f"attention_bias={attention_bias} with mlp_bias={mlp_bias} is not supported: biases "
                               "everywhere or nowhere (or Qwen2's q/k/v biases)")
        bias = "all" if attention_bias else "none"
    seq_len = seq_len or hf.get("max_position_embeddings", 2048)
    window = hf.get("sliding_window")
    sliding = model_type == "mistral" or (hf.get("use_sliding_window") and "sliding_attention" in
                                          hf.get("layer_types", ["sliding_attention"]))
    if sliding and window is not None and window < seq_len:
        raise ConvertError(f"sliding_window={window} is shorter than seq_len={seq_len}: sliding-window attention is "
                           f"not implemented; use --seq_len {window} or less, where it attends to every earlier token "
                           "anyway")
    theta, scaling = _rope(hf)
    return {"architecture": "llama", "d_model": d, "n_layers": hf["num_hidden_layers"], "n_heads": heads,
            "n_kv_heads": hf.get("num_key_value_heads") or heads, "ffn_hidden_size": hf["intermediate_size"],
            "seq_len": seq_len, "activation": "swiglu", "vocab_size": hf["vocab_size"], "bias": bias,
            "norm_eps": hf.get("rms_norm_eps", 1e-6), "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
            "rope_theta": theta, "rope_scaling": scaling, "init_std": hf.get("initializer_range", 0.02)}


def _gpt2_config(hf: dict, seq_len: Optional[int]) -> dict:
    act = hf.get("activation_function", "gelu_new")
    if act not in GPT2_ACTIVATIONS:
        raise ConvertError(f"activation_function {act!r} is not supported for gpt2: expected one of "
                           f"{', '.join(GPT2_ACTIVATIONS)}")
    for key, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                    ("add_cross_attention", False)):
        if hf.get(key, ok) != ok:
            raise ConvertError(f"{key}={hf[key]} is not supported for gpt2: expected {str(ok).lower()}")
    positions = hf.get("n_positions", 1024)
    seq_len = seq_len or positions
    if seq_len > positions:
        raise ConvertError(f"--seq_len {seq_len} exceeds the {positions} learned positions of this GPT-2")
    d = hf.get("n_embd", 768)
    return {"architecture": "gpt", "d_model": d, "n_layers": hf.get("n_layer", 12), "n_heads": hf.get("n_head", 12),
            "ffn_hidden_size": hf.get("n_inner") or 4 * d, "seq_len": seq_len, "activation": GPT2_ACTIVATIONS[act],
            "vocab_size": hf.get("vocab_size", 50257), "bias": "all", "norm_eps": hf.get("layer_norm_epsilon", 1e-5),
            "tie_embeddings": bool(hf.get("tie_word_embeddings", True)), "init_std": hf.get("initializer_range", 0.02)}


def model_config_from_hf(hf: dict, seq_len: Optional[int] = None) -> ModelConfig:
    """Our dense `ModelConfig` for a Hugging Face config.json, or a one-line `ConvertError`."""
    try:
        raw = _gpt2_config(hf, seq_len) if hf["model_type"] == "gpt2" else _llama_config(hf, seq_len)
    except KeyError as e:
        raise ConvertError(f"the {hf['model_type']} config.json lacks {e}")
    try:
        return ModelConfig.from_dict(raw)
    except (ConfigError, TypeError) as e:
        raise ConvertError(f"the {hf['model_type']} config.json cannot be expressed: {e}")


def _normalise_names(hf_state: dict, model_type: str) -> dict:
    """GPT-2 checkpoints saved from `GPT2Model` lack the `transformer.` prefix; drop derived buffers."""
    out = {}
    for name, tensor in hf_state.items():
        if IGNORED.search(name):
            continue
        if model_type == "gpt2" and not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name
        out[name] = tensor
    return out


def state_from_hf(hf_state: dict, cfg: ModelConfig, model_type: str, source: str) -> dict:
    """Our state dict from Hugging Face tensors, every tensor used exactly once (or refused)."""
    hf_state = _normalise_names(hf_state, model_type)
    shapes = reference_shapes(cfg)
    used, state = set(), {}
    for rule in rules(cfg):
        parts = []
        for name in rule.theirs:
            if name not in hf_state:
                raise ConvertError(f"'{source}' lacks tensor '{name}' that a {model_type} with this config.json has")
            parts.append(hf_state[name].t() if rule.conv1d else hf_state[name])
            used.add(name)
        value = torch.cat(parts) if len(parts) > 1 else parts[0]
        if rule.ours == "wpe.weight":
            value = value[:cfg.seq_len]  # positions beyond seq_len are never used
        if tuple(value.shape) != shapes[rule.ours]:
            raise ConvertError(f"tensor {' + '.join(rule.theirs)} of '{source}' has shape {list(value.shape)}, but "
                               f"its config.json implies {list(shapes[rule.ours])}")
        state[rule.ours] = value.contiguous()
    tied = cfg.tie_embeddings and "lm_head.weight" in hf_state
    if tied and not torch.equal(hf_state["lm_head.weight"], state["wte.weight"]):
        raise ConvertError(f"'{source}' has tie_word_embeddings but an lm_head.weight different from the input "
                           "embeddings")
    extra = [n for n in hf_state if n not in used and not (tied and n == "lm_head.weight")]
    if extra:
        raise ConvertError(f"tensor '{extra[0]}' of '{source}' has no place in a {model_type} model with this "
                           "config.json" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    return state


def import_hf(input_dir: PathLike, output: PathLike, seq_len: Optional[int] = None, allow_pickle: bool = False,
              dtype: Optional[str] = None) -> dict:
    """Hugging Face folder -> consolidated dense model (safetensors, config.json, its tokenizer)."""
    from ..data import DataError, Tokenizer

    folder = Path(input_dir)
    hf = read_hf_config(folder)
    if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1):
        raise ConvertError(f"--seq_len {seq_len!r} is invalid: expected an integer >= 1")
    if hf["model_type"] == REMOTE_MODEL_TYPE:
        cfg, state = camex_state(folder, hf)
        if seq_len is not None and seq_len != cfg.seq_len:
            raise ConvertError(f"--seq_len {seq_len} differs from the seq_len={cfg.seq_len} of the camex_ds model "
                               f"'{folder}' exports: leave it out")
    else:
        cfg = model_config_from_hf(hf, seq_len)
        state = state_from_hf(read_hf_weights(folder, allow_pickle), cfg, hf["model_type"], str(folder))
    floats = {v.dtype for v in state.values() if v.is_floating_point()}
    if dtype is None:  # keep bf16; fp16 (and anything mixed) widens to fp32, which holds it exactly
        dtype = "bf16" if floats == {torch.bfloat16} else "fp32"
    if dtype not in ("fp32", "bf16"):
        raise ConvertError(f"--dtype {dtype!r} is invalid: expected fp32 or bf16")
    tokenizer = find_tokenizer(folder)  # tokenizer.json (or a SentencePiece tokenizer.model), if it has one
    notes = []
    if tokenizer is None:
        notes.append(f"'{folder}' has no tokenizer.json or tokenizer.model: pass --tokenizer when training on text")
    else:
        try:
            tok = Tokenizer.load(tokenizer)
        except DataError as e:
            raise ConvertError(f"the tokenizer of '{folder}' is unusable: {e}")
        if tok.vocab_size > cfg.vocab_size:
            raise ConvertError(f"tokenizer '{tokenizer}' has {tok.vocab_size} tokens, more than the model's vocab_size "
                               f"{cfg.vocab_size}")
    info = {"command": "import-hf", "source": str(folder.resolve()), "hf_model_type": hf["model_type"],
            "hf_architecture": (hf.get("architectures") or [HF_CLASSES[hf["model_type"]]])[0],
            "notes": notes}
    with atomic_output_dir(output) as work:
        save_pretrained(work, state, cfg, tokenizer, dtype=dtype, conversion=info)
    return {"output": str(output), "architecture": cfg.architecture, "seq_len": cfg.seq_len,
            "parameters": sum(v.numel() for v in state.values()), "dtype": dtype, **info}


# ================================================================================================================
# export


def dense_state(state: dict, cfg: ModelConfig) -> Optional[dict]:
    """The dense model's state dict when `cfg` is dense or a MoE model equal to one (every expert of every static
    merge layer equals its base), else None."""
    moe = cfg.moe
    if moe is None:
        return state
    if moe.method == "smoe" or moe.dynamic:
        return None
    out = {}
    for name, value in state.items():
        m = EXPERT_RE.match(name)
        if m is not None:
            if ".curvature." not in name and not torch.equal(value, state[f"{m['layer']}.base.{m['rest']}"]):
                return None
            continue
        if ".router." in name:
            continue
        out[name.replace(".ffn.base.", ".ffn.")] = value
    return out


def hf_config(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    """The config.json of the stock architecture of `cfg`'s family (keys every transformers version reads)."""
    common = {"vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings,
              "initializer_range": cfg.init_std, "torch_dtype": "bfloat16" if dtype == torch.bfloat16 else "float32"}
    if cfg.architecture == "gpt":
        if cfg.activation == "swiglu":
            raise ConvertError("a gpt-family model with swiglu FFNs has no GPT-2 equivalent (GPT-2's MLP is not gated)")
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": cfg.d_model,
                "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": cfg.ffn_hidden_size,
                "n_positions": cfg.seq_len, "n_ctx": cfg.seq_len,
                "activation_function": "gelu_new" if cfg.activation == "gelu_tanh" else "gelu",
                "layer_norm_epsilon": cfg.norm_eps, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
                "scale_attn_weights": True, **common}
    model_type = "qwen2" if cfg.bias == "qkv" else "llama"
    out = {"architectures": [HF_CLASSES[model_type]], "model_type": model_type, "hidden_size": cfg.d_model,
           "intermediate_size": cfg.ffn_hidden_size, "num_hidden_layers": cfg.n_layers,
           "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
           "hidden_act": "silu", "max_position_embeddings": cfg.seq_len, "rms_norm_eps": cfg.norm_eps,
           "rope_theta": cfg.rope_base, "rope_scaling": cfg.to_dict()["rope_scaling"], "attention_dropout": 0.0,
           **common}
    if model_type == "llama":
        out.update(attention_bias=cfg.bias == "all", mlp_bias=cfg.bias == "all")
    else:
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers)
    return out


def state_to_hf(state: dict, cfg: ModelConfig) -> dict:
    """Hugging Face tensors from a dense state dict; GPT-2 gets zero biases where our model has none."""
    out = {}
    for rule in rules(cfg):
        value = state[rule.ours]
        for name, part in zip(rule.theirs, value.split(_split_sizes(cfg, rule)) if len(rule.theirs) > 1
                              else [value]):
            out[name] = (part.t() if rule.conv1d else part).contiguous()
    if cfg.architecture == "gpt":  # GPT-2 has every bias: the ones a bias='none' or 'qkv' model lacks are zero
        floats = next(v for v in state.values() if v.is_floating_point())
        full = cfg.replace(bias="all", moe=None)
        for rule in rules(full):
            for name in rule.theirs:
                if name not in out:
                    out[name] = torch.zeros(reference_shapes(full)[rule.ours], dtype=floats.dtype)
    if cfg.tie_embeddings:
        out.pop("lm_head.weight", None)
    return out


def _write_tokenizer(work: Path, tokenizer: Optional[Path]) -> Optional[int]:
    """Copy the tokenizer into an exported folder, with the `tokenizer_config.json` AutoTokenizer needs beside a
    tokenizer.json; returns its end-of-document id (None without a tokenizer), where `generate()` stops as
    camex-generate does."""
    if tokenizer is None:
        return None
    from ..data import Tokenizer

    tok = Tokenizer.load(tokenizer)
    (work / tokenizer.name).write_bytes(tokenizer.read_bytes())
    if tokenizer.name == "tokenizer.json":
        (work / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": tok.eos_token}, indent=2) + "\n")
    return tok.eos_id


def export_hf(input_dir: PathLike, output: PathLike) -> dict:
    """Consolidated model -> Hugging Face folder loadable with `transformers.AutoModelForCausalLM.from_pretrained`:
    a stock architecture where one computes our function, else our own modeling code (`trust_remote_code=True`)."""
    from safetensors.torch import save_file

    cfg, _, state = read_consolidated(input_dir)
    notes, method = [], cfg.method
    dense = dense_state(state, cfg)
    stock = dense is not None and not (cfg.architecture == "gpt" and cfg.activation == "swiglu")
    dtype = next(v.dtype for v in state.values() if v.is_floating_point())
    if stock:
        if cfg.moe is not None:
            notes.append(f"every {cfg.method} expert equals its base: exported as the dense model it computes")
        cfg = cfg.replace(moe=None)
        config, tensors = hf_config(cfg, dtype), state_to_hf(dense, cfg)
    else:
        notes.extend(export_notes(cfg))
        notes.append(f"no stock architecture computes this {method} model: exported with its own modeling code, "
                     "load it with trust_remote_code=True")
    tokenizer = find_tokenizer(input_dir)
    with atomic_output_dir(output) as work:
        eos = {} if tokenizer is None else {"eos_token_id": _write_tokenizer(work, tokenizer)}
        if stock:
            save_file(tensors, str(work / SAFETENSORS), metadata={"format": "pt"})
            (work / "config.json").write_text(json.dumps({**config, **eos}, indent=2) + "\n")
        else:
            config = write_folder(work, cfg, state, eos)
    return {"output": str(output), "model_type": config["model_type"], "architecture": config["architectures"][0],
            "source": str(Path(input_dir).resolve()), "source_method": method,
            "dtype": dtype_name(dtype), "notes": notes}


__all__ = ["MODEL_TYPES", "dense_state", "export_hf", "hf_config", "import_hf",
           "model_config_from_hf", "read_hf_config", "read_hf_weights", "rules", "state_from_hf", "state_to_hf"]

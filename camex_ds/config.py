"""One typed configuration for models and MoE layers, validated once at the edge.

`MoEConfig` carries every MoE option (the MegaBlocks `Arguments` idea); `ModelConfig` wraps it for
the GPT model. Both validate in `__post_init__`, so an object that exists is a valid one, and every
error names the offending field, its value and what would be valid.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

MERGE_METHODS = ("euclid", "ties", "dare", "camex", "camex-ties", "camex-dare")
METHODS = ("dense", "smoe") + MERGE_METHODS
#: Each curvature-aware method and the Euclidean merge it adds curvature to: the pairs a comparison tests.
EUCLIDEAN_TWIN = {"camex": "euclid", "camex-ties": "ties", "camex-dare": "dare"}
#: What `fold` turns a trained curvature-aware model into. TIES elects its mask from the raw task vectors, which
#: a folded model no longer has, so the (constant, trained) mask goes into the experts and camex-ties folds to euclid.
FOLD_TARGET = {"camex": "euclid", "camex-ties": "euclid", "camex-dare": "dare"}
#: The methods `compare` runs unless told otherwise.
COMPARED_METHODS = ("dense", "smoe", "euclid", "ties", "camex", "camex-ties")
ROUTINGS = ("causal", "segment", "sequence")
FIRST_SEGMENT = ("uniform", "self-detached")
ACTIVATIONS = ("gelu", "gelu_tanh", "swiglu")
ARCHITECTURES = ("gpt", "llama")
BIASES = ("none", "qkv", "all")
ROPE_SCALINGS = ("llama3",)
SMOE_BACKENDS = ("auto", "deepspeed", "megablocks")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""

    def relabel(self, prefix: str, new_prefix: str) -> "ConfigError":
        """This error with the leading `prefix` of the field it names (e.g. 'moe.') written `new_prefix`: for a
        caller whose users know the options under another name (the standalone layer's 'CAMExMoE.')."""
        text = str(self)
        return ConfigError(new_prefix + text[len(prefix):] if text.startswith(prefix) else text)


def _fail(field_name: str, value: Any, expected: str) -> None:
    raise ConfigError(f"{field_name}={value!r} is invalid: expected {expected}")


def check_choice(field_name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        _fail(field_name, value, "one of " + ", ".join(map(str, choices)))


def check_int(field_name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(field_name, value, f"an integer >= {minimum}")


def check_number(field_name: str, value: Any, low: float, high: float = math.inf, *, open_low: bool = False) -> None:
    """A finite int or float in `[low, high]` (`(low, high]` with `open_low`); no `high`: any finite number above."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if open_low else value >= low) and value <= high
    if not ok:
        bound = f"a finite number {'>' if open_low else '>='} {low}" if high == math.inf else \
            f"a number in {'(' if open_low else '['}{low}, {high}]"
        _fail(field_name, value, bound)


def method_mask(method: str) -> str:
    """The mask a merging method uses: 'none', 'ties' or 'dare'."""
    return method.split("-")[-1] if method.endswith(("ties", "dare")) else "none"


def method_is_curved(method: str) -> bool:
    return method.startswith("camex")


#: The MoE options each kind of method reads, beyond those every method reads (`method`, `num_experts`, `top_k`,
#: `every`, `ep_size`, `dynamic`, `aux_loss_coef`): an option a method does not read is neither checked nor used.
MERGE_OPTIONS = ("segment_len", "routing", "first_segment", "alpha", "noisy_gating", "chain_length")
CURVATURE_OPTIONS = ("curvature_rank", "curvature_init_std", "curvature_lr_scale")
DARE_OPTIONS = ("dare_p",)
TOKEN_ROUTING_OPTIONS = ("capacity_factor", "backend")


@dataclass(frozen=True)
class MoEConfig:
    """Every option of a MoE layer. `top_k=None` means N for merging methods (full soft merging), 2 for smoe.

    Errors name a field as the model config does (`moe.<field>`); a caller with another name for the block
    relabels them (`ConfigError.relabel`). Options the method does not read (`applies`) are not checked.
    """

    method: str = "camex"
    num_experts: int = 4
    top_k: Optional[int] = None
    every: int = 2
    segment_len: int = 64
    routing: str = "causal"
    first_segment: str = "uniform"
    curvature_rank: int = 1
    curvature_init_std: float = 0.02
    curvature_lr_scale: float = 1.0
    alpha: float = 1.0
    ep_size: int = 1
    dynamic: bool = False
    chain_length: Optional[int] = None
    noisy_gating: bool = True
    aux_loss_coef: float = 1e-2
    dare_p: float = 0.1
    capacity_factor: float = 1.0
    backend: str = "auto"

    @classmethod
    def for_layer(cls, num_experts: Optional[int], **options) -> "MoEConfig":
        """The config of a `CAMExMoE` built on its own from spec §6's keyword options, with §6's defaults: a model
        config's, but segment_len 256 (a model's sequences are short by default, and its segments with them)."""
        return cls(num_experts=num_experts, **{"segment_len": 256, **options})

    def applies(self, option: str) -> bool:
        """Whether this config's method reads `option`: merge options are the merging methods', curvature options
        the curvature-aware ones', `dare_p` the DARE masks', capacity and backend the token-routing smoe's."""
        smoe = self.method == "smoe"
        if option in MERGE_OPTIONS:
            return not smoe
        if option in CURVATURE_OPTIONS:
            return self.curved
        if option in DARE_OPTIONS:
            return self.mask == "dare"
        if option in TOKEN_ROUTING_OPTIONS:
            return smoe
        return True

    def __post_init__(self) -> None:
        check_choice("moe.method", self.method, METHODS[1:])
        if not isinstance(self.dynamic, bool):
            _fail("moe.dynamic", self.dynamic, "true or false")
        check_int("moe.num_experts", self.num_experts, 2 if self.dynamic else 1)
        check_int("moe.every", self.every)
        check_int("moe.ep_size", self.ep_size)
        check_number("moe.aux_loss_coef", self.aux_loss_coef, 0.0, 1e3)
        if self.dynamic and self.method == "smoe":
            _fail("moe.dynamic", self.dynamic, "false for method 'smoe' (dynamic merging needs a merging method)")
        n = self.stored_experts
        if n % self.ep_size:
            valid = [k for k in range(1, n + 1) if n % k == 0]
            what = f"{n} stored experts (num_experts - 1 in dynamic layers)" if self.dynamic else f"{n} experts"
            _fail("moe.ep_size", self.ep_size, f"a divisor of {what}: one of {valid}")
        if self.top_k is not None:
            check_int("moe.top_k", self.top_k)
            if self.top_k > self.routed_experts:
                _fail("moe.top_k", self.top_k, f"at most the {self.routed_experts} routed experts")
            if self.method == "smoe" and self.top_k not in (1, 2):
                _fail("moe.top_k", self.top_k, "1 or 2 for method 'smoe' (DeepSpeed's gate)")
        for check in (self._check_merge, self._check_curvature, self._check_dare, self._check_token_routing):
            check()

    def _check_merge(self) -> None:
        if not self.applies("segment_len"):
            return
        check_int("moe.segment_len", self.segment_len)
        check_choice("moe.routing", self.routing, ROUTINGS)
        check_choice("moe.first_segment", self.first_segment, FIRST_SEGMENT)
        check_number("moe.alpha", self.alpha, 0.0, 1e6)
        if not isinstance(self.noisy_gating, bool):
            _fail("moe.noisy_gating", self.noisy_gating, "true or false")
        if self.chain_length is not None:
            check_int("moe.chain_length", self.chain_length)
            if not self.dynamic:
                _fail("moe.chain_length", self.chain_length,
                      "null unless dynamic is true (it sets the dynamic chains' length)")

    def _check_curvature(self) -> None:
        if self.applies("curvature_rank"):
            check_int("moe.curvature_rank", self.curvature_rank)
            check_number("moe.curvature_init_std", self.curvature_init_std, 0.0)
            check_number("moe.curvature_lr_scale", self.curvature_lr_scale, 0.0, open_low=True)

    def _check_dare(self) -> None:
        if self.applies("dare_p"):
            check_number("moe.dare_p", self.dare_p, 0.0, 1.0 - 1e-6)

    def _check_token_routing(self) -> None:
        if not self.applies("backend"):
            return
        check_number("moe.capacity_factor", self.capacity_factor, 0.0, 1e3, open_low=True)
        check_choice("moe.backend", self.backend, SMOE_BACKENDS)
        if self.backend == "megablocks" and self.ep_size != 1:
            _fail("moe.backend", self.backend, "'megablocks' only with method 'smoe' and ep_size 1")

    def segment_len_for(self, seq_len: int) -> int:
        """T, the tokens per routed segment: the whole sequence under `sequence` routing."""
        return seq_len if self.routing == "sequence" else self.segment_len

    @property
    def stored_experts(self) -> int:
        """Experts a layer stores: dynamic layers keep N-1 (the base plays the N-th), §4."""
        return self.num_experts - 1 if self.dynamic else self.num_experts

    @property
    def routed_experts(self) -> int:
        return self.stored_experts

    @property
    def k(self) -> int:
        if self.top_k is not None:
            return self.top_k
        return min(2, self.num_experts) if self.method == "smoe" else self.routed_experts

    @property
    def mask(self) -> str:
        return method_mask(self.method)

    @property
    def curved(self) -> bool:
        return method_is_curved(self.method)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3's frequency-dependent rotary scaling: the `rope_scaling` of a Llama 3.1+ config.json."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int
    rope_type: str = "llama3"

    def __post_init__(self) -> None:
        p = "rope_scaling."
        check_choice(p + "rope_type", self.rope_type, ROPE_SCALINGS)
        check_number(p + "factor", self.factor, 0.0, 1e6, open_low=True)
        check_number(p + "low_freq_factor", self.low_freq_factor, 0.0, 1e6, open_low=True)
        check_number(p + "high_freq_factor", self.high_freq_factor, 0.0, 1e6, open_low=True)
        if self.high_freq_factor <= self.low_freq_factor:
            _fail(p + "high_freq_factor", self.high_freq_factor, f"more than low_freq_factor={self.low_freq_factor}")
        check_int(p + "original_max_position_embeddings", self.original_max_position_embeddings)

    @classmethod
    def from_dict(cls, raw) -> "RopeScaling":
        if not isinstance(raw, dict):
            _fail("rope_scaling", raw, "null or a JSON object")
        _check_keys("rope_scaling.", raw, cls)
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in raw and f.name != "rope_type"]
        if missing:
            raise ConfigError(f"rope_scaling lacks {', '.join(missing)}: a llama3 scaling needs factor, "
                              "low_freq_factor, high_freq_factor and original_max_position_embeddings")
        return cls(**raw)


@dataclass(frozen=True)
class ModelConfig:
    """A decoder of one of two families; every `moe.every`-th FFN (1-based: layers every-1, 2*every-1, ...) is a
    MoE layer.

    `gpt`: LayerNorm, learned positions (GPT-2's shape). `llama`: RMSNorm, rotary positions, SwiGLU,
    grouped-query attention (`n_kv_heads`). Both take `bias` (`qkv`: Qwen2's q/k/v biases; `all`: every
    linear layer, GPT-2), `norm_eps` and `tie_embeddings`.
    """

    architecture: str = "gpt"
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    ffn_hidden_size: int = 512
    seq_len: int = 256
    activation: str = "gelu"
    vocab_size: Optional[int] = None
    moe: Optional[MoEConfig] = None
    init_std: float = 0.02
    n_kv_heads: Optional[int] = None
    bias: str = "none"
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    rope_theta: Optional[float] = None
    rope_scaling: Optional[RopeScaling] = None

    def __post_init__(self) -> None:
        check_choice("architecture", self.architecture, ARCHITECTURES)
        for name in ("d_model", "n_layers", "n_heads", "ffn_hidden_size", "seq_len"):
            check_int(name, getattr(self, name))
        if self.vocab_size is not None:
            check_int("vocab_size", self.vocab_size, 2)
        check_choice("activation", self.activation, ACTIVATIONS)
        check_number("init_std", self.init_std, 0.0, 10.0, open_low=True)
        if self.d_model % self.n_heads:
            _fail("n_heads", self.n_heads, f"a divisor of d_model={self.d_model}")
        check_choice("bias", self.bias, BIASES)
        check_number("norm_eps", self.norm_eps, 0.0, 1.0, open_low=True)
        if not isinstance(self.tie_embeddings, bool):
            _fail("tie_embeddings", self.tie_embeddings, "true or false")
        self._check_family()
        if self.moe is not None:
            seg = self.moe.segment_len_for(self.seq_len)
            if self.moe.applies("segment_len") and self.seq_len % seg:
                _fail("moe.segment_len", seg, f"a divisor of seq_len={self.seq_len} (L must be a multiple of T)")
            if self.moe.every > self.n_layers:
                _fail("moe.every", self.moe.every, f"at most n_layers={self.n_layers}, or no layer would be MoE")
            if self.ffn_bias and self.moe.applies("backend") and self.moe.backend == "megablocks":
                _fail("moe.backend", self.moe.backend, "'deepspeed' or 'auto' for bias='all' (MegaBlocks experts "
                      "have no biases)")

    def _check_family(self) -> None:
        """The options only one family has: rotary positions, grouped-query attention and SwiGLU are llama's."""
        if self.architecture == "gpt":
            for name in ("n_kv_heads", "rope_theta", "rope_scaling"):
                if getattr(self, name) is not None:
                    _fail(name, getattr(self, name), "null for architecture 'gpt' (a llama-family option)")
            return
        if self.activation != "swiglu":
            _fail("activation", self.activation, "'swiglu' for architecture 'llama'")
        if self.n_kv_heads is not None:
            check_int("n_kv_heads", self.n_kv_heads)
            if self.n_heads % self.n_kv_heads:
                _fail("n_kv_heads", self.n_kv_heads, f"a divisor of n_heads={self.n_heads}")
        if self.rope_theta is not None:
            check_number("rope_theta", self.rope_theta, 0.0, 1e12, open_low=True)
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            _fail("rope_scaling", self.rope_scaling, "a RopeScaling (from_dict parses the JSON object)")
        if (self.d_model // self.n_heads) % 2:
            _fail("n_heads", self.n_heads, f"a divisor of d_model={self.d_model} giving an even head size "
                  "(rotary embeddings rotate pairs)")

    @property
    def kv_heads(self) -> int:
        """Key/value heads: `n_kv_heads`, or one per query head (plain multi-head attention)."""
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def rope_base(self) -> float:
        """The rotary base θ (llama family): `rope_theta`, 10000 by default as in Llama 1 and 2."""
        return 10000.0 if self.rope_theta is None else float(self.rope_theta)

    @property
    def ffn_bias(self) -> bool:
        """Biases in the FFN matrices (bias='all'): dense FFNs and smoe experts own them, merge layers share one
        per matrix outside the merge."""
        return self.bias == "all"

    @property
    def moe_layers(self) -> list[int]:
        if self.moe is None:
            return []
        return [i for i in range(self.n_layers) if (i + 1) % self.moe.every == 0]

    @property
    def chain_starts(self) -> list[bool]:
        """For each MoE layer, whether it starts a dynamic chain (owns a base): the first one, and with
        `moe.chain_length` every `chain_length`-th one; all of them in static models."""
        moe = self.moe
        length = (moe.chain_length or len(self.moe_layers)) if moe is not None and moe.dynamic else 1
        return [idx % length == 0 for idx in range(len(self.moe_layers))]

    @classmethod
    def from_dict(cls, raw: dict) -> "ModelConfig":
        if not isinstance(raw, dict):
            raise ConfigError(f"model config must be a JSON object, got {type(raw).__name__}")
        raw = dict(raw)
        moe_raw = raw.pop("moe", None)
        _check_keys("", raw, cls, exclude={"moe"})
        if raw.get("rope_scaling") is not None:
            raw["rope_scaling"] = RopeScaling.from_dict(raw["rope_scaling"])
        moe = None
        if moe_raw is not None:
            if not isinstance(moe_raw, dict):
                raise ConfigError(f"moe={moe_raw!r} is invalid: expected null or a JSON object")
            if moe_raw.get("method") == "dense":
                moe_raw = None
            else:
                _check_keys("moe.", moe_raw, MoEConfig)
                moe = MoEConfig(**moe_raw)
        return cls(**raw, moe=moe)

    @classmethod
    def load(cls, path: str) -> "ModelConfig":
        with open(path) as f:
            try:
                raw = json.load(f)
            except json.JSONDecodeError as e:
                raise ConfigError(f"model config {path} is not valid JSON: {e}") from None
        return cls.from_dict(raw)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "moe"}
        d["moe"] = self.moe.to_dict() if self.moe else None
        d["rope_scaling"] = dataclasses.asdict(self.rope_scaling) if self.rope_scaling else None
        return d

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def with_moe(self, **changes) -> "ModelConfig":
        if self.moe is None:
            raise ConfigError("moe is null (a dense model): there are no MoE options to change")
        return dataclasses.replace(self, moe=dataclasses.replace(self.moe, **changes))

    @property
    def method(self) -> str:
        return "dense" if self.moe is None else self.moe.method


# ---------------------------------------------------------------------------------------------------------
# Defaults shared by the run and the tools (the run's own flags: camex_ds.run_args)

# How long a collective (or the set-up's rendezvous) waits for a peer before failing. torch's default is
# 30 minutes: a rank that died or stopped would hold every other rank, and the job's GPUs, that long.
DEFAULT_TIMEOUT_S = 300.0

#: Pieces of the SentencePiece tokenizer trained when none is given (launcher, preprocess, train-tokenizer, data).
DEFAULT_VOCAB_SIZE = 4096


def read_json_object(path: Path, what: str, error: type = ConfigError) -> dict:
    """The JSON object in the file `path` (a `what`: a flag, or e.g. 'MoE config'); a missing file, bad JSON or
    another JSON value raises `error` naming it. Every config, manifest and model file is read through here."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what}: file '{path}' does not exist")
    try:
        raw = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{what} '{path}' is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise error(f"{what} '{path}' must hold a JSON object")
    return raw


def _check_keys(prefix: str, raw: dict, cls, exclude=frozenset()) -> None:
    known = {f.name for f in dataclasses.fields(cls)} - set(exclude)
    for key in raw:
        if key not in known:
            raise ConfigError(f"unknown config key {prefix}{key!r}: valid keys are {', '.join(sorted(known))}")


__all__ = ["ConfigError", "MoEConfig", "ModelConfig", "RopeScaling", "METHODS", "MERGE_METHODS",
           "ROUTINGS", "ACTIVATIONS", "ARCHITECTURES", "BIASES"]

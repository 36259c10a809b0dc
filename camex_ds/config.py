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


@dataclass(frozen=True)
class MoEConfig:
    """Every option of a MoE layer. `top_k=None` means N for merging methods (full soft merging), 2 for smoe."""

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
    prefix: str = "moe"

    def __post_init__(self) -> None:
        p = self.prefix + "."
        check_choice(p + "method", self.method, METHODS[1:])
        check_int(p + "num_experts", self.num_experts, 2 if self.dynamic else 1)
        check_int(p + "every", self.every)
        check_int(p + "segment_len", self.segment_len)
        check_choice(p + "routing", self.routing, ROUTINGS)
        check_choice(p + "first_segment", self.first_segment, FIRST_SEGMENT)
        check_int(p + "curvature_rank", self.curvature_rank)
        check_number(p + "curvature_init_std", self.curvature_init_std, 0.0)
        check_number(p + "curvature_lr_scale", self.curvature_lr_scale, 0.0, open_low=True)
        check_number(p + "alpha", self.alpha, 0.0, 1e6)
        check_int(p + "ep_size", self.ep_size)
        if not isinstance(self.dynamic, bool):
            _fail(p + "dynamic", self.dynamic, "true or false")
        if not isinstance(self.noisy_gating, bool):
            _fail(p + "noisy_gating", self.noisy_gating, "true or false")
        check_number(p + "aux_loss_coef", self.aux_loss_coef, 0.0, 1e3)
        check_number(p + "dare_p", self.dare_p, 0.0, 1.0 - 1e-6)
        check_number(p + "capacity_factor", self.capacity_factor, 0.0, 1e3, open_low=True)
        check_choice(p + "backend", self.backend, SMOE_BACKENDS)
        if self.backend == "megablocks" and (self.method != "smoe" or self.ep_size != 1):
            _fail(p + "backend", self.backend, "'megablocks' only with method 'smoe' and ep_size 1")
        if self.chain_length is not None:
            check_int(p + "chain_length", self.chain_length)
            if not self.dynamic:
                _fail(p + "chain_length", self.chain_length,
                      "null unless dynamic is true (it sets the dynamic chains' length)")
        if self.dynamic and self.method == "smoe":
            _fail(p + "dynamic", self.dynamic, "false for method 'smoe' (dynamic merging needs a merging method)")
        n = self.stored_experts
        if n % self.ep_size:
            valid = [k for k in range(1, n + 1) if n % k == 0]
            what = f"{n} stored experts (num_experts - 1 in dynamic layers)" if self.dynamic else f"{n} experts"
            _fail(p + "ep_size", self.ep_size, f"a divisor of {what}: one of {valid}")
        if self.top_k is not None:
            check_int(p + "top_k", self.top_k)
            if self.top_k > self.routed_experts:
                _fail(p + "top_k", self.top_k, f"at most the {self.routed_experts} routed experts")
            if self.method == "smoe" and self.top_k not in (1, 2):
                _fail(p + "top_k", self.top_k, "1 or 2 for method 'smoe' (DeepSpeed's gate)")

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
        d = dataclasses.asdict(self)
        d.pop("prefix")
        return d


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
            if self.seq_len % seg:
                _fail("moe.segment_len", seg, f"a divisor of seq_len={self.seq_len} (L must be a multiple of T)")
            if self.moe.every > self.n_layers:
                _fail("moe.every", self.moe.every, f"at most n_layers={self.n_layers}, or no layer would be MoE")
            if self.ffn_bias and self.moe.backend == "megablocks":
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
                _check_keys("moe.", moe_raw, MoEConfig, exclude={"prefix"})
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
# The pretraining run

# How long a collective (or the set-up's rendezvous) waits for a peer before failing. torch's default is
# 30 minutes: a rank that died or stopped would hold every other rank, and the job's GPUs, that long.
DEFAULT_TIMEOUT_S = 300.0

# The checkout the package runs from (an editable install): ds_configs/ and launcher/ live there.
REPO_ROOT = Path(__file__).resolve().parents[1]

#: Pieces of the SentencePiece tokenizer trained when none is given (launcher, preprocess, train-tokenizer, data).
DEFAULT_VOCAB_SIZE = 4096

# The DeepSpeed config a run uses when none is given: one CPU rank, fp32, ZeRO 0, no accumulation.
DEFAULT_DEEPSPEED_CONFIG = str(REPO_ROOT / "ds_configs" / "cpu.json")
# The model a run trains when none is given: the small CAMEx model, the same file users find and copy.
DEFAULT_MODEL_CONFIG = str(REPO_ROOT / "ds_configs" / "models" / "camex_small.json")


def default_model() -> dict:
    """The raw dict of `DEFAULT_MODEL_CONFIG` (a fresh copy: callers edit it)."""
    return read_json_object(Path(DEFAULT_MODEL_CONFIG), "the default model config")


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


def _flag(default: Any, help: str, **argparse_options) -> Any:
    """A `TrainArgs` field and the text of its command-line flag (`camex_ds.cli.pretrain` builds the parser from
    these), so that each default is written once. `argparse_options` are `metavar`, and `flag` for a flag named
    otherwise than the field (`--no_progress` clears `progress`)."""
    return dataclasses.field(default=default, metadata={"help": help, **argparse_options})


@dataclass
class TrainArgs:
    """A pretraining run's arguments, each with its flag of `launcher/pretrain.py` (`camex-pretrain`), in the
    order `--help` lists them; `camex_ds.train.run` validates them."""

    deepspeed_config: str = _flag(
        DEFAULT_DEEPSPEED_CONFIG, "DeepSpeed JSON (batch size, optimizer, scheduler, ZeRO stage, bf16, TensorBoard); "
        "'auto' values are filled from this run (default: %(default)s)")
    model_config: Optional[str] = _flag(None, "model JSON (see README: config reference); default: a small CAMEx model")
    # the CLI appends the forms a --data value takes (camex_ds.data.DATA_HELP, whose home is the data package)
    data: Optional[str] = _flag(None, "a preprocessed dataset folder, ", data_forms=True)
    val_data: Optional[str] = _flag(
        None, "a separate validation text (a corpus's valid.txt; any --data form, a preprocessed folder gives its "
        "validation split): --data is then all trained on")
    tokenizer: Optional[str] = _flag(
        None, "SentencePiece .model, or a Hugging Face tokenizer.json or the folder holding it; default: the "
        "--init_from model's own, else train one on the data (cached)")
    vocab_size: int = _flag(DEFAULT_VOCAB_SIZE, "vocabulary of a tokenizer trained here (%(default)s)")
    cache_dir: Optional[str] = _flag(None, "where prepared datasets are cached (default: $CAMEX_DS_CACHE or "
                                           "~/.cache/camex_ds)")
    output_dir: str = _flag("runs/default", "metrics, TensorBoard, checkpoints (%(default)s)")
    max_steps: int = _flag(300, "optimizer steps in total (%(default)s)")
    eval_interval: int = _flag(100, "validate every N steps and at the end (%(default)s)")
    eval_windows: Optional[int] = _flag(
        None, "validation windows (seq_len + 1 tokens each) per evaluation, the same at any micro batch; default: "
        "the whole validation split, up to a cap that keeps evaluation near 10%% of training time (logged, and "
        "recorded as val_windows and val_tokens)", metavar="N")
    eval_batches: Optional[int] = _flag(
        None, "or: validation batches of the micro batch size per evaluation (K x micro batch windows, so they "
        "change with the micro batch)", metavar="K")
    save_interval: int = _flag(100, "checkpoint every N steps and at the end (%(default)s)")
    keep_checkpoints: Optional[int] = _flag(
        None, "keep only the newest K checkpoints, deleting older ones once a new one is complete (default: all)",
        metavar="K")
    log_interval: int = _flag(10, "log training metrics every N steps (%(default)s)")
    ep_size: Optional[int] = _flag(None, "expert-parallel degree; overrides moe.ep_size of the model config")
    resume: bool = _flag(False, "continue from OUTPUT_DIR/checkpoints/latest exactly (model, optimizer, scheduler, "
                                "data position, RNG)")
    overwrite_output_dir: bool = _flag(
        False, "start afresh in an --output_dir that holds an earlier run: its files are moved into "
        "OUTPUT_DIR/replaced-<time>/, nothing is deleted (without it such a run is refused)")
    init_from: Optional[str] = _flag(
        None, "start from a consolidated/upcycled model folder (tools/convert_checkpoint.py) instead of a random "
        "init (its config is the model config unless --model_config is given)")
    stop_at_step: Optional[int] = _flag(
        None, "checkpoint and exit after this step without changing the schedule of --max_steps (time-sliced jobs; "
        "continue with --resume)")
    seed: int = _flag(1234, "initialisation and routing-noise seed (%(default)s)")
    data_seed: int = _flag(1234, "data-order seed, independent of --seed (%(default)s)")
    peak_tflops: Optional[float] = _flag(None, "peak TFLOP/s per rank for MFU (default: known-GPU table, or a CPU "
                                               "matmul probe)")
    skip_nonfinite: int = _flag(
        0, "skip up to K steps whose loss or gradient norm is NaN/Inf (counted as skipped_steps in the metrics) "
        "instead of stopping at the first; a bad step never changes the weights (%(default)s)", metavar="K")
    dist_timeout: float = _flag(
        DEFAULT_TIMEOUT_S, "seconds a collective waits for a lost or stopped rank before the job fails, instead of "
        "torch's 30 minutes (%(default)s)")
    compile: bool = _flag(False, "torch.compile every transformer block (inductor). Off by default: not faster on "
                                 "CPUs, not yet measured on GPUs")
    progress: bool = _flag(True, "no progress bar", flag="--no_progress")


def _check_keys(prefix: str, raw: dict, cls, exclude=frozenset()) -> None:
    known = {f.name for f in dataclasses.fields(cls)} - set(exclude)
    for key in raw:
        if key not in known:
            raise ConfigError(f"unknown config key {prefix}{key!r}: valid keys are {', '.join(sorted(known))}")


__all__ = ["ConfigError", "MoEConfig", "ModelConfig", "TrainArgs", "RopeScaling", "METHODS", "MERGE_METHODS",
           "ROUTINGS", "ACTIVATIONS", "ARCHITECTURES", "BIASES"]

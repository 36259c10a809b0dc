"""The consolidated ("pretrained") model format: one folder, independent of how the model was trained.

Layout of a folder written by `save_pretrained` (format ``camex_ds-pretrained``, version 1)::

    model.safetensors   the state dict of the model built with ep_size=1: every expert of a MoE
                        layer under `deepspeed_experts.<global id>` (0..N-1), fp32 or bf16
    config.json         the ModelConfig dict (moe.ep_size = 1) plus the reserved keys
                        `format`, `format_version` and `conversion` (provenance, free form)
    tokenizer.model     the SentencePiece model the token ids refer to (or tokenizer.json, a Hugging Face one)

`load_pretrained(path)` returns the model in eval mode; `load_state_into(model, path)` copies the
weights into an existing model of any expert-parallel layout (each rank takes its own experts), which
is how a training job starts from a consolidated or upcycled model. Every reader checks what it reads
and raises `PretrainedError` with a one-line message naming the file or tensor.

Expert tensor names have their one home here: `expert_key` builds
`<layer>.deepspeed_moe.experts.deepspeed_experts.<id>.<rest>`, `EXPERT_RE` takes it apart, and
`global_expert_name` renumbers an EP rank's local experts (`parallel.global_expert`).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Union

import torch

from .. import deepspeed_adapter as ds
from .. import parallel
from ..config import ConfigError, ModelConfig, read_json_object
from ..model import GPT
from ..moe.layer import warn_degenerate_rank

FORMAT = "camex_ds-pretrained"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")  # SentencePiece, or Hugging Face's (an imported model's)
RESERVED_KEYS = ("format", "format_version", "conversion")
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}

EXPERTS = ds.EXPERT_PARAMS  # between a MoE layer's name and an expert's id
EXPERT_RE = re.compile(r"^(?P<layer>.+)" + re.escape(EXPERTS) + r"(?P<id>\d+)\.(?P<rest>.+)$")

PathLike = Union[str, os.PathLike]


class PretrainedError(ValueError):
    """A consolidated model folder (or what is written into one) is unusable; the message names it."""


class ConvertError(ValueError):
    """An input of a conversion (`ckpt.convert`, `ckpt.upcycle`, `ckpt.hf`) is missing or unusable; the message is
    one line naming it."""


def expert_key(layer: str, expert: int, rest: str = "") -> str:
    """The state-dict name of `rest` (e.g. `w_in`) of expert `expert` of the MoE layer `layer`."""
    return f"{layer}{EXPERTS}{expert}.{rest}"


def torch_dtype(name: str) -> torch.dtype:
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if name not in table:
        raise PretrainedError(f"dtype {name!r} is not supported: expected fp32 or bf16")
    return table[name]


def dtype_name(dtype: torch.dtype) -> str:
    """'bf16' or 'fp32': the `dtype` argument of `save_pretrained` that keeps tensors of `dtype` as they are."""
    return "bf16" if dtype == torch.bfloat16 else "fp32"


# ----------------------------------------------------------------------------------------------------------------
# atomic output folders


@contextmanager
def atomic_output_dir(output: PathLike) -> Iterator[Path]:
    """Yield a hidden work folder next to `output`; rename it to `output` only if the body succeeds.

    `output` must not exist yet (or be an empty folder): nothing is ever overwritten, and a failure
    or a kill leaves at most a hidden `.NAME.partial-*` folder, never a half-written `output`.
    """
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise PretrainedError(f"output '{output}' already exists; remove it or choose another")
    parent = output.parent if str(output.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PretrainedError(f"cannot create the parent folder of output '{output}' ({e.strerror})") from None
    work = parent / f".{output.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    work.mkdir()
    try:
        yield work
        if output.is_dir():
            output.rmdir()  # the empty folder allowed above
        os.rename(work, output)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------------------------------------------
# reference state dicts


def model_config(raw_or_cfg):
    """A `ModelConfig` from a dict (reserved keys of config.json ignored) or a `ModelConfig`."""
    if isinstance(raw_or_cfg, ModelConfig):
        return raw_or_cfg
    raw = {k: v for k, v in dict(raw_or_cfg).items() if k not in RESERVED_KEYS}
    try:
        return ModelConfig.from_dict(raw)
    except ConfigError as e:
        raise PretrainedError(f"invalid model config: {e}") from None


def single_rank_config(cfg):
    """The same model with ep_size=1 (the layout-free form every consolidated file uses)."""
    return cfg.with_moe(ep_size=1) if cfg.moe is not None else cfg


def meta_model(cfg):
    """The model of `cfg` (ep_size must be 1) on the meta device: names and shapes, no memory."""
    if cfg.moe is not None and cfg.moe.ep_size != 1:
        raise ValueError("meta_model needs an ep_size=1 config")
    if cfg.vocab_size is None:
        raise PretrainedError("the model config has no vocab_size")
    with torch.device("meta"):
        return GPT(cfg)


def reference_shapes(cfg) -> "dict[str, tuple]":
    """`name -> shape` of the ep_size=1 model's state dict, in state-dict order."""
    model = meta_model(single_rank_config(cfg))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_state_dict(state: dict, cfg, what: str) -> None:
    """Every tensor of the ep_size=1 model present with its shape, nothing else; raise naming the first problem."""
    expected = reference_shapes(cfg)
    for name, shape in expected.items():
        if name not in state:
            raise PretrainedError(f"{what}: tensor '{name}' is missing (the config expects it with shape "
                                  f"{list(shape)})")
        got = tuple(state[name].shape)
        if got != shape:
            raise PretrainedError(f"{what}: tensor '{name}' has shape {list(got)} but the config implies "
                                  f"{list(shape)}")
    for name in state:
        if name not in expected:
            raise PretrainedError(f"{what}: tensor '{name}' is not part of the model the config describes")


# ----------------------------------------------------------------------------------------------------------------
# writing


def save_pretrained(work_dir: PathLike, state: dict, cfg, tokenizer: Optional[PathLike] = None, *,
                    dtype: str = "fp32", conversion: Optional[dict] = None) -> None:
    """Write `state` (ep_size=1 names), `cfg` and the tokenizer into `work_dir` (see the module docstring).

    Call it inside `atomic_output_dir`; the state is checked against the config first.
    """
    from safetensors.torch import save_file

    cfg = single_rank_config(model_config(cfg))
    check_state_dict(state, cfg, "model to save")
    target = torch_dtype(dtype)
    tensors = {}
    for name, t in state.items():
        t = t.detach().to("cpu")
        if t.is_floating_point():
            t = t.to(target)
        tensors[name] = t.contiguous().clone()  # safetensors refuses shared or strided storage
    work_dir = Path(work_dir)
    save_file(tensors, str(work_dir / WEIGHTS_FILE), metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(work_dir / WEIGHTS_FILE, 0o666 & ~umask)  # safetensors creates it private; make it like the others
    raw = cfg.to_dict()
    raw.update(format=FORMAT, format_version=FORMAT_VERSION,
               conversion={"dtype": DTYPES.get(dtype, dtype), **(conversion or {})})
    (work_dir / CONFIG_FILE).write_text(json.dumps(raw, indent=2) + "\n")
    if tokenizer is not None:
        from ..data import Tokenizer

        tok = Tokenizer.load(tokenizer)  # a file or a Hugging Face folder; checked before it is copied
        shutil.copyfile(tok.path, work_dir / tok.file_name)


# ----------------------------------------------------------------------------------------------------------------
# reading


def read_config(path: PathLike) -> tuple:
    """`(ModelConfig, raw dict)` of a consolidated folder, checked."""
    path = Path(path)
    if not path.is_dir():
        raise PretrainedError(f"model folder '{path}' does not exist")
    file = path / CONFIG_FILE
    if not file.is_file():
        raise PretrainedError(f"'{path}' is not a consolidated model: {CONFIG_FILE} is missing")
    raw = read_json_object(file, "model config", PretrainedError)
    if raw.get("format") != FORMAT:
        raise PretrainedError(f"'{file}' has format {raw.get('format')!r}, expected {FORMAT!r}")
    if raw.get("format_version") != FORMAT_VERSION:
        raise PretrainedError(f"'{file}' has format_version {raw.get('format_version')!r}; this code reads "
                              f"version {FORMAT_VERSION}")
    try:
        cfg = model_config(raw)
    except PretrainedError as e:
        raise PretrainedError(f"'{file}': {str(e)}") from None
    if cfg.moe is not None and cfg.moe.ep_size != 1:
        raise PretrainedError(f"'{file}' has moe.ep_size={cfg.moe.ep_size}; consolidated models use ep_size 1")
    if cfg.vocab_size is None:
        raise PretrainedError(f"'{file}' has no vocab_size")
    return cfg, raw


def read_weights(path: PathLike, cfg=None) -> dict:
    """The state dict of a consolidated folder, every tensor checked against the config."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if cfg is None:
        cfg, _ = read_config(path)
    file = path / WEIGHTS_FILE
    if not file.is_file():
        raise PretrainedError(f"'{path}' is not a consolidated model: {WEIGHTS_FILE} is missing")
    try:
        state = load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise PretrainedError(f"'{file}' is unreadable or truncated ({str(e).splitlines()[0] if str(e) else type(e).__name__})") \
            from None
    check_state_dict(state, cfg, f"'{file}'")
    return state


def read_consolidated(path: PathLike) -> tuple:
    """`(ModelConfig, raw config dict, state dict)` of a consolidated folder that a conversion starts from; what is
    wrong with it is a `ConvertError`."""
    try:
        cfg, raw = read_config(path)
        return cfg, raw, read_weights(path, cfg)
    except PretrainedError as e:
        raise ConvertError(str(e)) from None


def find_tokenizer(path: PathLike) -> Optional[Path]:
    """The tokenizer file of a consolidated folder, or None if it has none."""
    return next((Path(path) / name for name in TOKENIZER_FILES if (Path(path) / name).is_file()), None)


def tokenizer_path(path: PathLike) -> Path:
    file = find_tokenizer(path)
    if file is None:
        raise PretrainedError(f"'{path}' has no {' or '.join(TOKENIZER_FILES)}")
    return file


def load_pretrained(path: PathLike, dtype: Optional[str] = None, device="cpu"):
    """The consolidated model at `path` as a `GPT` in eval mode (ep_size 1), in its stored dtype unless
    `dtype` ('fp32' or 'bf16') is given."""
    cfg, _ = read_config(path)
    state = read_weights(path, cfg)
    if dtype is not None:
        target = torch_dtype(dtype)
        state = {k: v.to(target) if v.is_floating_point() else v for k, v in state.items()}
    with torch.device("meta"):
        model = GPT(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
        # a buffer outside the state dict (non-persistent) stayed on meta: build for real and copy instead
        stored = next(v.dtype for v in state.values() if v.is_floating_point())
        model = GPT(cfg).to(stored)
        model.load_state_dict(state, strict=True)
    return model.to(device).eval()


def global_expert_name(local_name: str, ep_rank: int, local_count: int) -> str:
    """`...deepspeed_experts.<local>.w` on EP rank `ep_rank` -> the name with the global expert id."""
    m = EXPERT_RE.match(local_name)
    if m is None:
        return local_name
    return expert_key(m["layer"], parallel.global_expert(ep_rank, local_count, int(m["id"])), m["rest"])


def load_state_into(model, path: PathLike, strict: bool = True) -> None:
    """Copy a consolidated model's weights into `model` in place, whatever its expert-parallel layout.

    Each MoE layer takes the experts its EP rank owns (`parallel.global_expert`). In-place copies keep
    DeepSpeed's attributes on the parameters, so call this before `deepspeed.initialize`. A model whose curvature
    rank terms are all equal (saved before they started apart) loads with a warning (`warn_degenerate_rank`).
    """
    cfg, _ = read_config(path)
    state = read_weights(path, cfg)
    layers = {prefix: model.get_submodule(prefix) for prefix in ds.moe_layer_names(model)}
    own = model.state_dict()
    missing = []
    with torch.no_grad():
        for name, tensor in own.items():
            source = name
            m = EXPERT_RE.match(name)
            if m is not None:
                module = layers[m["layer"]]
                # our layers record their EP rank; DeepSpeed's own MoE layers follow the default rule
                ep_rank = getattr(module, "ep_rank", None)
                if ep_rank is None:
                    ep_rank = parallel.expert_parallel_rank(module.ep_size)
                source = global_expert_name(name, ep_rank, module.num_local_experts)
            if source not in state:
                missing.append(source)
                continue
            value = state[source]
            if tuple(value.shape) != tuple(tensor.shape):
                raise PretrainedError(f"'{path}': tensor '{source}' has shape {list(value.shape)}, the model's "
                                      f"'{name}' has {list(tensor.shape)}")
            tensor.copy_(value)
    if strict and missing:
        raise PretrainedError(f"'{path}' lacks tensor '{missing[0]}' that the model needs"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    warn_degenerate_rank(model)


__all__ = ["FORMAT", "FORMAT_VERSION", "ConvertError", "PretrainedError", "atomic_output_dir", "expert_key",
           "find_tokenizer", "global_expert_name", "load_pretrained", "load_state_into", "read_config", "read_consolidated",
           "read_weights", "save_pretrained", "tokenizer_path"]

"""A DeepSpeed checkpoint's optimizer state by parameter name, read from and written to its per-rank files.

ZeRO 0 keeps one torch optimizer state dict per expert-parallel rank (wrapped in DeepSpeed's FP16_Optimizer
state for bf16); ZeRO 1/2 keeps per data-parallel rank one flat fp32 partition per parameter group. Reading
fills a `Universal` (every fp32 master and optimizer tensor in its parameter's shape, under its global
name); writing lays it out again for any expert-parallel degree and world size (`deepspeed.Layout`).
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch

from .. import deepspeed_adapter as ds
from ..parallel import expert_parallel_rank
from .deepspeed import (
    CheckpointRef,
    GroupSpec,
    Layout,
    Universal,
    expp_file,
    torch_load,
    zero_file,
)
from ..deepspeed_adapter import DS_CONFIG_KEY, MODEL_STATES, OPTIMIZER_KEY, ZeroPartitions
from .format import ConvertError

# ================================================================================================================
# reading


def _optimizer_files_torch(ref: CheckpointRef, uni: Universal, layout: Layout) -> list:
    if uni.cfg.moe is None:
        return [(0, ref.tag_dir / MODEL_STATES, uni.states)]
    out = []
    for e in range(layout.ep):
        file = expp_file(ref.tag_dir, e)
        out.append((e, file, torch_load(file, "optimizer states file")))
    return out


def read_torch_optimizer(ref: CheckpointRef, uni: Universal, layout: Layout) -> None:
    """ZeRO 0: per EP rank a torch optimizer state dict (fp32), or DeepSpeed's FP16_Optimizer state (bf16)."""
    masters = {} if uni.kind == "fp16opt" else None
    for e, file, content in _optimizer_files_torch(ref, uni, layout):
        opt = content.get(OPTIMIZER_KEY) if isinstance(content, dict) else None
        if not isinstance(opt, dict):
            raise ConvertError(f"'{file}' has no optimizer state (was the checkpoint saved without its optimizer?)")
        if uni.kind == "fp16opt":
            parts = ds.fp16_optimizer_parts(opt)
            if parts is None:
                raise ConvertError(f"'{file}' is not a bf16 FP16_Optimizer state (keys: {', '.join(map(str, opt))})")
            torch_sd, fp32_groups, wrapper = parts
            if e == 0:
                uni.extra["fp16opt"] = wrapper
        else:
            torch_sd, fp32_groups = opt, None
            if "state" not in torch_sd or "param_groups" not in torch_sd:
                raise ConvertError(f"'{file}' holds no torch optimizer state dict")
        pgroups = torch_sd["param_groups"]
        sizes = [len(g["params"]) for g in pgroups]
        want = [len(g.local_names) for g in layout.groups]
        if sizes != want:
            raise ConvertError(f"'{file}': optimizer param groups have {sizes} parameters but the model config with "
                               f"ep_size {layout.ep} implies {want} (config and checkpoint do not match)")
        for gi, (spec, pg) in enumerate(zip(layout.groups, pgroups)):
            if e > 0 and not spec.moe:
                continue  # replicated: taken from EP rank 0
            hp = {k: v for k, v in pg.items() if k != "params"}
            for j, (local, idx) in enumerate(zip(spec.local_names, pg["params"])):
                name = layout.to_global(local, e)
                shape = layout.shapes[name]
                uni.hparams[name] = hp
                st = torch_sd["state"].get(idx)
                if st is not None:
                    uni.opt_state[name] = {k: _shaped(v, shape, f"'{file}' state of '{name}' ({k})")
                                           for k, v in st.items()}
                if fp32_groups is not None:
                    master = fp32_groups[gi][j]
                    masters[name] = _shaped(master, shape, f"'{file}' fp32 copy of '{name}'")
    uni.masters = masters
    _check_complete(uni, layout, ref)


def _shaped(value, shape: tuple, what: str):
    """Per-parameter optimizer tensors to the parameter's shape; scalars (step) as they are."""
    if not torch.is_tensor(value) or value.dim() == 0:
        return value
    if value.numel() != math.prod(shape):
        raise ConvertError(f"{what} has {value.numel()} elements, the parameter has {math.prod(shape)} "
                           f"(shape {list(shape)})")
    return value.reshape(shape)


def _check_complete(uni: Universal, layout: Layout, ref: CheckpointRef) -> None:
    missing = [n for n in layout.shapes if n not in uni.hparams]
    if missing:
        raise ConvertError(f"the optimizer state in '{ref.tag_dir}' does not cover parameter '{missing[0]}'")


def read_zero_optimizer(ref: CheckpointRef, uni: Universal, layout: Layout) -> None:
    """ZeRO 1/2: reassemble every parameter's fp32 master and optimizer state from the ranks' flat partitions."""
    ep = layout.ep
    fragments = {}  # name -> list of (rank, fp32 fragment, {key: fragment})
    scalars, key_order = {}, {}
    for r in range(uni.world):
        file = zero_file(ref.tag_dir, r, uni.bf16)
        zero = ds.read_zero_partitions(torch_load(file, "ZeRO optimizer states file"))
        if zero is None:
            raise ConvertError(f"'{file}' is not a ZeRO stage 1/2 optimizer state")
        if r == 0:
            uni.extra["zero"], uni.extra["file"] = zero.scalars, zero.file_extra
        partitions, mappings, base = zero.partitions, zero.mappings, zero.base
        if mappings is None:
            raise ConvertError(f"'{file}' has no param_slice_mappings (saved by a DeepSpeed too old to reshard)")
        if len(partitions) != len(layout.groups) or len(mappings) != len(layout.groups):
            raise ConvertError(f"'{file}' has {len(partitions)} param groups but the config with ep_size {ep} implies "
                               f"{len(layout.groups)} (config and checkpoint do not match)")
        if not isinstance(base, dict):
            raise ConvertError(f"'{file}' uses the elastic ZeRO checkpoint format, which does not record the "
                               "optimizer hyperparameters per group: not supported (save with elastic_checkpoint "
                               "false, the default)")
        for gi, spec in enumerate(layout.groups):
            pg = base["param_groups"][gi]  # rigid format: a torch state dict with one flat parameter per group
            gstate = base["state"].get(pg["params"][0], {})
            hp = {k: v for k, v in pg.items() if k != "params"}
            partition = partitions[gi]
            local = set(spec.local_names)
            for local_name, addr in mappings[gi].items():
                if local_name not in local:
                    raise ConvertError(f"'{file}' holds parameter '{local_name}' in group {gi}, which the config "
                                       "does not put there (config and checkpoint do not match)")
                name = layout.to_global(local_name, expert_parallel_rank(ep, r)) if spec.moe else local_name
                start, numel = int(addr.start), int(addr.numel)
                if start + numel > partition.numel():
                    raise ConvertError(f"'{file}': fragment of '{local_name}' [{start}, {start + numel}) lies "
                                       f"outside its partition of {partition.numel()} elements")
                states = {}
                for k, v in gstate.items():
                    if torch.is_tensor(v) and v.dim() > 0:
                        states[k] = v.narrow(0, start, numel)
                    else:
                        scalars.setdefault(name, {})[k] = v
                fragments.setdefault(name, []).append((r, partition.narrow(0, start, numel), states))
                key_order.setdefault(name, list(gstate.keys()))
                uni.hparams.setdefault(name, hp)
    masters = {}
    for name, shape in layout.shapes.items():
        parts = fragments.get(name)
        if not parts:
            raise ConvertError(f"no ZeRO partition in '{ref.tag_dir}' holds parameter '{name}'")
        flat = torch.cat([p[1] for p in parts])
        if flat.numel() != math.prod(shape):
            raise ConvertError(f"the ZeRO partitions in '{ref.tag_dir}' hold {flat.numel()} elements of '{name}', "
                               f"its shape {list(shape)} has {math.prod(shape)}")
        masters[name] = flat.reshape(shape).clone()
        st = {}
        for k in key_order.get(name, ()):  # the optimizer's own key order
            if k in parts[0][2]:
                st[k] = torch.cat([p[2][k] for p in parts]).reshape(shape).clone()
            else:
                st[k] = scalars[name][k]
        uni.opt_state[name] = st
    uni.masters = masters



# ================================================================================================================
# writing


def _group_hparams(uni: Universal, spec: GroupSpec, names: list) -> dict:
    hp = dict(uni.hparams[names[0]]) if names else {}
    hp["name"] = spec.name
    if spec.moe:
        hp["moe"] = True
    else:
        hp.pop("moe", None)
    return hp


def torch_optimizer_state(uni: Universal, layout: Layout, ep_rank: int) -> dict:
    """ZeRO 0 target: a torch optimizer state dict for EP rank `ep_rank` (wrapped for bf16)."""
    state, groups, idx = {}, [], 0
    fp32_groups = []
    for spec in layout.groups:
        names = layout.group_names(spec, ep_rank)
        params = []
        masters = []
        for name in names:
            st = uni.opt_state.get(name)
            if st is not None:
                state[idx] = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()}
            params.append(idx)
            idx += 1
            if uni.kind == "fp16opt":
                masters.append(uni.masters[name].clone())
        groups.append({**_group_hparams(uni, spec, names), "params": params})
        fp32_groups.append(masters)
    torch_sd = {"state": state, "param_groups": groups}
    if uni.kind != "fp16opt":
        return torch_sd
    return ds.fp16_optimizer_state(torch_sd, fp32_groups, uni.extra.get("fp16opt", {}))


def zero_partition_state(uni: Universal, layout: Layout, rank: int, world: int) -> tuple:
    """ZeRO 1/2 target: `(the file DeepSpeed's stage 1/2 optimizer saves on `rank` (rigid format), the model
    states' param shapes of `rank`)`.

    Mirrors `DeepSpeedZeroOptimizer.__init__`: per group the parameters are flattened in group order
    (with per-parameter padding when `parameter_alignment` is on), padded to a multiple of
    2 x the group's data-parallel size, and cut into equal partitions.
    """
    ep = layout.ep
    ds_config = uni.states.get(DS_CONFIG_KEY) or {}
    aligned = bool((ds_config.get("zero_optimization") or {}).get("parameter_alignment", False))
    element_size = 2 if uni.bf16 else 4
    param_alignment = 16 // math.gcd(16, element_size) if aligned else 1
    partitions, base_state, pgroups, paddings, param_paddings, counts, mappings, shapes0 = [], {}, [], [], [], [], [], []
    for gi, spec in enumerate(layout.groups):
        dp = world // ep if spec.moe else world
        pid = rank // ep if spec.moe else rank
        names = layout.group_names(spec, expert_parallel_rank(ep, rank)) if spec.moe else list(spec.local_names)
        pads, offsets, offset = [], [], 0
        for j, name in enumerate(names):
            offsets.append(offset)
            numel = uni.masters[name].numel()
            offset += numel
            pad = 0 if j == len(names) - 1 else (-offset) % param_alignment
            pads.append(pad)
            offset += pad
        padded = offset
        alignment = 2 * dp
        total = int(math.ceil(padded / alignment)) * alignment
        size = total // dp
        left = pid * size
        if padded <= left:
            group_pad = size
        elif padded < left + size:
            group_pad = left + size - padded
        else:
            group_pad = 0

        def flat_partition(get) -> torch.Tensor:
            out = torch.zeros(size, dtype=torch.float32)
            for name, off in zip(names, offsets):
                lo, hi = max(off, left), min(off + uni.masters[name].numel(), left + size)
                if lo < hi:
                    out[lo - left:hi - left] = get(name).reshape(-1)[lo - off:hi - off].float()
            return out

        fp32 = flat_partition(lambda n: uni.masters[n])
        partitions.append(fp32[:size - group_pad].clone())
        st0 = uni.opt_state.get(names[0], {}) if names else {}
        gstate = {}
        for k, v in st0.items():
            if torch.is_tensor(v) and v.dim() > 0:
                gstate[k] = flat_partition(lambda n, k=k: uni.opt_state[n][k])
            else:
                gstate[k] = v.clone() if torch.is_tensor(v) else v
        if gstate:
            base_state[gi] = gstate
        pgroups.append({**_group_hparams(uni, spec, names), "params": [gi]})
        paddings.append(group_pad)
        param_paddings.append(pads)
        counts.append(dp)
        mapping = OrderedDict()
        for local, name, off in zip(spec.local_names, names, offsets):
            lo, hi = max(off, left), min(off + uni.masters[name].numel(), left + size)
            if lo < hi:
                mapping[local] = ds.fragment_address(numel=hi - lo, start=lo - left)
        mappings.append(mapping)
        shapes0.append(OrderedDict((local, torch.Size(layout.shapes[name])) for local, name in zip(spec.local_names, names)))
    zero = ZeroPartitions(partitions, mappings, {"state": base_state, "param_groups": pgroups},
                          uni.extra.get("zero", {}), uni.extra.get("file", {}))
    return ds.zero_file_content(zero, paddings, param_paddings, counts), shapes0


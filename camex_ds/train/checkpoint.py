"""Checkpoints through DeepSpeed's engine, made crash-safe, verifiable and exactly resumable.

DeepSpeed writes model, optimizer, scheduler and per-expert files under `<dir>/<tag>/`. We add each
rank's RNG state (the client state carries the data-loader position), then, once every rank has
finished writing, a manifest of every file's size and sha256 (`manifest.py`), and only then move
`latest`, atomically. So a crash mid-save leaves `latest` at the previous complete checkpoint, and a
resume can check every byte before it loads: it takes the newest checkpoint that verifies.

A save that fails (a full disk, a permission error) removes its partial folder, leaves `latest` and the
earlier checkpoints alone and raises one line naming the folder and what is needed; the rank that failed
exits, and the launcher ends the ranks that wait for it (or they time out). `keep` prunes
older checkpoints once a newer one is complete. Each save also puts our `zero_to_fp32.py` beside the
tag folders, in place of DeepSpeed's copy, which cannot read expert-parallel checkpoints.
"""
from __future__ import annotations

import errno
import os
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .. import parallel
from ..ckpt.deepspeed import LATEST, rng_file
from ..config import ModelConfig
from ..moe.layer import warn_degenerate_rank
from . import manifest
from .peers import is_communication_error

TAG_RE = re.compile(r"global_step(\d+)")


class CheckpointError(RuntimeError):
    """A checkpoint is missing or unusable, or cannot be written; the message names the path."""


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _warn(message: str) -> None:
    if parallel.rank() == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)


def latest_tag(ckpt_dir: os.PathLike) -> Optional[str]:
    """The tag `latest` points at, or None when there is no such checkpoint folder."""
    path = Path(ckpt_dir) / LATEST
    if not path.is_file():
        return None
    tag = path.read_text(errors="replace").strip()
    return tag if tag and "/" not in tag and (Path(ckpt_dir) / tag).is_dir() else None


def tags(ckpt_dir: os.PathLike) -> list:
    """The `global_step<N>` folders, newest first."""
    ckpt_dir = Path(ckpt_dir)
    found = [(int(m[1]), p.name) for p in ckpt_dir.iterdir() if p.is_dir() and (m := TAG_RE.fullmatch(p.name))] \
        if ckpt_dir.is_dir() else []
    return [tag for _, tag in sorted(found, reverse=True)]


def save(engine, ckpt_dir: os.PathLike, step: int, client_state: dict, run: dict, keep: Optional[int] = None) -> str:
    """Every rank calls this. Returns the tag (`global_step<N>`); raises CheckpointError if it cannot be written."""
    ckpt_dir = Path(ckpt_dir)
    tag = f"global_step{step}"
    tag_dir = ckpt_dir / tag
    if parallel.rank() == 0 and tag_dir.exists():
        shutil.rmtree(tag_dir)  # a save at this step that never completed, or one that failed to verify
    parallel.barrier()
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
        torch.save(_rng_state(), rng_file(tag_dir, parallel.rank()))
        parallel.barrier()
        manifest.write(tag_dir, run)
        if parallel.rank() == 0:
            _install_zero_to_fp32(ckpt_dir)
            manifest.atomic_write(ckpt_dir / LATEST, tag)
    except (OSError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and (is_communication_error(e) or not _is_write_error(e)):
            raise
        raise _failed_save(engine, ckpt_dir, tag_dir, e) from None
    if parallel.rank() == 0 and keep:
        _prune(ckpt_dir, keep, step)
    parallel.barrier()
    return tag


def _is_write_error(e: RuntimeError) -> bool:
    """torch.save reports a failed write (a full disk, a vanished folder) as its zip writer's RuntimeError."""
    return "inline_container" in str(e) or "PytorchStreamWriter" in str(e)


def _failed_save(engine, ckpt_dir: Path, tag_dir: Path, e: BaseException) -> CheckpointError:
    """Remove what the failed save wrote and say, in one line, why it failed and what is left."""
    shutil.rmtree(tag_dir, ignore_errors=True)
    kept = latest_tag(ckpt_dir)
    kept = f"'latest' still names {kept}" if kept else "there is no earlier checkpoint"
    needed = _bytes_needed(engine, ckpt_dir)
    free = shutil.disk_usage(ckpt_dir).free if ckpt_dir.exists() else 0
    if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or (not isinstance(e, OSError) and free < needed):
        why = (f"the disk is full: a checkpoint needs about {needed / 1e6:.1f} MB ({needed} bytes), "
               f"{free / 1e6:.1f} MB are free")
        hint = "free some space (or keep fewer checkpoints with --keep_checkpoints), then continue with --resume"
    else:
        why = getattr(e, "strerror", None) or (str(e).strip().splitlines() or [type(e).__name__])[0]
        hint = "fix that, then continue with --resume"
    return CheckpointError(f"cannot save checkpoint '{tag_dir}': {why}; its partial folder was removed and {kept}: "
                           f"{hint}")


def _bytes_needed(engine, ckpt_dir: Path) -> int:
    """The size of the newest complete checkpoint (the same model and optimizer), else the in-memory estimate."""
    for tag in tags(ckpt_dir):
        size = manifest.total_bytes(ckpt_dir / tag)
        if size:
            return size
    local = _tensor_bytes(engine.module.state_dict()) + _tensor_bytes(engine.optimizer.state_dict())
    return local * parallel.world_size()


def _tensor_bytes(obj) -> int:
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _prune(ckpt_dir: Path, keep: int, step: int) -> None:
    """Keep the newest `keep` complete checkpoints up to `step`; drop older ones and older incomplete folders.

    Folders past `step` (left by a run that resumed from an earlier checkpoint) are replaced when it gets there.
    """
    steps = [(int(TAG_RE.fullmatch(t)[1]), t) for t in tags(ckpt_dir)]
    complete = [s for s, t in steps if s <= step and (ckpt_dir / t / manifest.MANIFEST).is_file()]
    if len(complete) < keep:
        return
    for s, tag in steps:
        if s < complete[keep - 1]:
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)


def _install_zero_to_fp32(ckpt_dir: Path) -> None:
    """Our zero_to_fp32.py (DeepSpeed's command line, our reader) where DeepSpeed puts its own."""
    # the folder this camex_ds is imported from (a checkout, or site-packages): the script's fallback import path
    root = str(Path(__file__).resolve().parents[2])
    text = Path(__file__).with_name("zero_to_fp32.py").read_text()  # the script; importing it would patch DeepSpeed
    text = text.replace("CAMEX_DS_ROOT = None", f"CAMEX_DS_ROOT = {root!r}", 1)
    manifest.atomic_write(ckpt_dir / "zero_to_fp32.py", text)
    os.chmod(ckpt_dir / "zero_to_fp32.py", 0o755)


def resume_tag(ckpt_dir: os.PathLike) -> tuple:
    """`(tag, run record)` of the newest checkpoint that verifies; every rank calls this.

    A checkpoint that fails is named with its first bad file, and the next newest is tried. A run whose
    checkpoints all predate manifests resumes from `latest` unverified (run record None).
    """
    ckpt_dir = Path(ckpt_dir)
    complete = [t for t in tags(ckpt_dir) if (ckpt_dir / t / manifest.MANIFEST).is_file()]
    if not complete and latest_tag(ckpt_dir) is not None:
        _warn(f"checkpoint {latest_tag(ckpt_dir)} has no manifest (saved by an older version): resuming unverified")
        return latest_tag(ckpt_dir), None
    first_problem = None
    for tag in complete:
        problem = manifest.verify(ckpt_dir / tag)
        if problem is None:
            if first_problem:
                _warn(f"resuming from {tag}, the newest checkpoint that verifies")
            return tag, _with_defaults(manifest.read(ckpt_dir / tag).get("run"))
        _warn(f"checkpoint {tag} does not verify: {problem}")
        first_problem = first_problem or f"{tag}: {problem}"
    why = f"none verifies (newest: {first_problem})" if first_problem else "there is no complete checkpoint"
    raise CheckpointError(f"--resume: cannot resume from {ckpt_dir}: {why}; restore the files, or start without "
                          "--resume")


def _with_defaults(run):
    """A recorded run whose model config predates some option reads with that option's default, as the
    checkpoint's own config does (`ModelConfig.from_dict`), so that adding an option does not refuse old resumes."""
    if not isinstance(run, dict) or not isinstance(run.get("model_config"), dict):
        return run
    try:
        return {**run, "model_config": ModelConfig.from_dict(run["model_config"]).to_dict()}
    except ValueError:  # not a config of this version at all: the comparison names what differs
        return run


def load(engine, ckpt_dir: os.PathLike, tag: str) -> dict:
    """Restore model, optimizer, scheduler and this rank's RNG; returns the client state (step, data)."""
    ckpt_dir = Path(ckpt_dir)
    try:
        path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    except Exception as e:  # a verified checkpoint DeepSpeed still refuses: e.g. another ZeRO layout
        if is_communication_error(e):
            raise
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"DeepSpeed cannot load checkpoint '{ckpt_dir / tag}': {detail[:300]}") from None
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    rng_path = rng_file(ckpt_dir / tag, parallel.rank())
    if rng_path.is_file():
        _set_rng_state(torch.load(rng_path, weights_only=False))
    warn_degenerate_rank(engine.module)
    return client_state or {}

"""Checkpoints through DeepSpeed's engine, made crash-safe and exactly resumable.

DeepSpeed writes model, optimizer, scheduler and per-expert files under `<dir>/<tag>/`. We add each
rank's RNG state and the data-loader position, and write `latest` ourselves, atomically, only after
every rank has finished writing: a crash mid-save leaves `latest` at the previous complete checkpoint.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .. import parallel

LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint is missing or unusable; the message names the path."""


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


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def latest_tag(ckpt_dir: os.PathLike) -> Optional[str]:
    """The tag `latest` points at, or None when there is no complete checkpoint."""
    path = Path(ckpt_dir) / LATEST
    if not path.is_file():
        return None
    tag = path.read_text().strip()
    return tag if tag and (Path(ckpt_dir) / tag).is_dir() else None


def save(engine, ckpt_dir: os.PathLike, step: int, client_state: dict) -> str:
    """Every rank calls this. Returns the tag (`global_step<N>`)."""
    ckpt_dir = Path(ckpt_dir)
    tag = f"global_step{step}"
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    torch.save(_rng_state(), ckpt_dir / tag / f"rng_state_rank{parallel.rank()}.pt")
    parallel.barrier()
    if parallel.rank() == 0:
        _atomic_write(ckpt_dir / LATEST, tag)
    parallel.barrier()
    return tag


def load(engine, ckpt_dir: os.PathLike, tag: Optional[str] = None) -> dict:
    """Restore model, optimizer, scheduler and this rank's RNG; returns the client state (step, data)."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag or latest_tag(ckpt_dir)
    if tag is None:
        raise CheckpointError(f"no checkpoint to resume from in {ckpt_dir} (no complete '{LATEST}')")
    if not (ckpt_dir / tag).is_dir():
        raise CheckpointError(f"checkpoint tag '{tag}' does not exist in {ckpt_dir}")
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    rng_file = ckpt_dir / tag / f"rng_state_rank{parallel.rank()}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state or {}

"""Checkpoint manifests: each file of a checkpoint with its size and sha256, written before `latest` moves.

`write` runs once every rank has finished writing the tag folder, so a folder without `manifest.json` is
a save that never completed, and `verify` re-reads every file, so a truncated or damaged one is found (and
named) before DeepSpeed tries to load it. Both share the hashing: rank r hashes files r, r + W, r + 2W, ...
of the folder's sorted listing. The manifest also records the run the checkpoint belongs to (model config,
data), so that a resume mixing two runs can be refused with the keys that differ.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

from .. import parallel
from ..config import read_json_object

MANIFEST = "manifest.json"
VERSION = 1


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def write(tag_dir: os.PathLike, run: dict) -> None:
    """Every rank calls this after its writes (and a barrier); rank 0 writes the manifest atomically."""
    tag_dir = Path(tag_dir)
    listing = sorted(p.relative_to(tag_dir).as_posix() for p in tag_dir.rglob("*")
                     if p.is_file() and p.name != MANIFEST and not p.name.endswith(".tmp"))
    listing = parallel.all_gather_object(listing)[0]  # rank 0's view of the folder is the one recorded
    mine = {rel: {"bytes": (tag_dir / rel).stat().st_size, "sha256": _sha256(tag_dir / rel)}
            for rel in listing[parallel.rank()::parallel.world_size()]}
    files = {}
    for part in parallel.all_gather_object(mine):
        files.update(part)
    if parallel.rank() == 0:
        atomic_write(tag_dir / MANIFEST, json.dumps({"version": VERSION, "run": run, "files": files}, indent=1))


def read(tag_dir: os.PathLike) -> dict:
    """The manifest of a tag folder; raises ValueError naming it when it is missing or unreadable."""
    path = Path(tag_dir) / MANIFEST
    if not path.is_file():
        raise ValueError(f"'{path}' is missing (the save did not complete)")
    manifest = read_json_object(path, "checkpoint manifest", ValueError)
    if not isinstance(manifest.get("files"), dict):
        raise ValueError(f"'{path}' is not a checkpoint manifest")
    return manifest


def verify(tag_dir: os.PathLike) -> Optional[str]:
    """None if every file of the checkpoint is as its manifest says, else one line naming the first bad file.

    Every rank calls this (it hashes its share of the files); all of them get the same answer.
    """
    tag_dir = Path(tag_dir)
    try:
        files = read(tag_dir)["files"]
    except ValueError as e:  # the same file on every rank: every rank returns here
        return str(e)
    names = sorted(files)
    mine = [problem for rel in names[parallel.rank()::parallel.world_size()]
            if (problem := _check(tag_dir / rel, files[rel])) is not None]
    problems = sorted(p for part in parallel.all_gather_object(mine) for p in part)
    return problems[0] if problems else None


def _check(path: Path, entry: dict) -> Optional[str]:
    if not path.is_file():
        return f"'{path}' is missing"
    size = path.stat().st_size
    if size != entry.get("bytes"):
        return f"'{path}' has {size} bytes, its manifest says {entry.get('bytes')} (truncated or replaced)"
    if _sha256(path) != entry.get("sha256"):
        return f"'{path}' does not match the sha256 in its manifest (damaged)"
    return None


def total_bytes(tag_dir: os.PathLike) -> Optional[int]:
    """The size of a complete checkpoint, from its manifest (None when it has none)."""
    try:
        return sum(int(entry["bytes"]) for entry in read(tag_dir)["files"].values())
    except (ValueError, KeyError, TypeError):
        return None


def differences(recorded: dict, current: dict, prefix: str = "") -> list:
    """`key (recorded -> current)` for every leaf of two nested dicts that differs, keys joined with '.'."""
    out = []
    for key in sorted(set(recorded) | set(current), key=str):
        a, b, name = recorded.get(key), current.get(key), f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, name + ".")
        elif a != b:
            out.append(f"{name} ({_short(a)} -> {_short(b)})")
    return out


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 24 else text[:21] + "..."


def atomic_write(path: Path, text: str) -> None:
    """Write a small file so that readers see the old or the new content, never a part."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)

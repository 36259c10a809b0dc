"""The starting models of a grid that fine-tunes a dense model (`--init_from`): each variant's upcycled copy, made
once by `camex_ds.ckpt.upcycle.upcycle` (what `camex-convert upcycle` runs) and reused while its content key (the
dense model, the variant's model config and the router seed) is unchanged."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..config import read_json_object

#: The folder of a grid's output that holds the upcycled models, one `<method>-<key>` folder each.
UPCYCLED_DIR = "upcycled"


def dense_fingerprint(folder: Path) -> str:
    """What identifies a consolidated model folder's content cheaply: its config and its weights' size and time."""
    folder = Path(folder)
    stats = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file())
    payload = json.dumps({"config": read_json_object(folder / "config.json", "--init_from model config"),
                          "files": stats}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def upcycle_key(dense: str, config: dict, seed: int) -> str:
    """The content key of one upcycled model: the dense model's fingerprint, the model config and the router seed."""
    payload = json.dumps({"dense": dense, "config": config, "seed": seed}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def upcycled_path(output: Path, method: str, key: str) -> Path:
    return Path(output) / UPCYCLED_DIR / f"{method}-{key}"


def ensure_upcycled(dense: Path, config_file: Path, target: Path, seed: int) -> bool:
    """Upcycle `dense` with the model config in `config_file` into `target` unless it is there already (upcycle
    writes a folder only once complete, so one that exists is whole); whether it was made now."""
    if target.is_dir():
        return False
    from ..ckpt.upcycle import upcycle  # torch loads only when a model is made

    upcycle(dense, config_file, target, seed=seed)
    return True

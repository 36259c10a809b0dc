"""The MoE settings a grid gives every method (`--moe`, `--moe_set`) and the arms it sweeps (`--sweep`), each key
checked against `MoEConfig`'s fields, and each method's variant in an arm: the arm's settings that act on it.

A variant is what one set of runs trains: `runs/<method>/seed<k>` when no swept key acts on the method,
`runs/<method>/<key>=<value>[,...]/seed<k>` otherwise. Keys named `curvature_*` act only on the curvature-aware
methods, and no MoE key acts on `dense`, so arms that differ only there share those methods' runs (a sweep of
the curvature rank trains `euclid` once, not once per rank).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple

from ..config import MoEConfig, method_is_curved

#: MoE keys with this prefix change only what the curvature-aware methods compute.
CURVATURE_PREFIX = "curvature_"
#: Set per method by the grid (--methods): not a grid-wide MoE setting.
RESERVED_KEYS = ("method",)


class SettingsError(ValueError):
    """A MoE setting or sweep the user gave is wrong; the message is one line naming it and what is valid."""


def moe_keys() -> List[str]:
    """The MoE keys a grid may set or sweep: every `MoEConfig` field but the method."""
    return [f.name for f in dataclasses.fields(MoEConfig) if f.name not in RESERVED_KEYS]


def check_key(key: str, flag: str) -> None:
    if key == "method":
        raise SettingsError(f"{flag}: 'method' is chosen per run by --methods, not a MoE setting")
    if key not in moe_keys():
        raise SettingsError(f"{flag}: unknown MoE key {key!r}; valid keys: {', '.join(moe_keys())}")


def parse_value(text: str) -> Any:
    """A setting's value: JSON (`8`, `0.5`, `null`, `true`), else the text itself (`segment`)."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def format_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def parse_assignment(text: str, flag: str) -> Tuple[str, str]:
    key, eq, value = text.partition("=")
    key = key.strip()
    if not eq or not key or not value.strip():
        raise SettingsError(f"{flag} {text!r} is invalid: expected KEY=VALUE, a MoE key from: {', '.join(moe_keys())}")
    check_key(key, flag)
    return key, value.strip()


def moe_settings(moe_file: dict, assignments: Sequence[str]) -> Dict[str, Any]:
    """The grid-wide MoE settings: the object of `--moe MOE.json`, then each `--moe_set KEY=VALUE` over it."""
    out: Dict[str, Any] = {}
    for key, value in moe_file.items():
        check_key(key, "--moe")
        out[key] = value
    for text in assignments:
        key, value = parse_assignment(text, "--moe_set")
        out[key] = parse_value(value)
    return out


@dataclass(frozen=True)
class Arm:
    """One point of the sweep: `settings` are (key, value) pairs in sweep order; no sweep is one empty arm."""

    settings: Tuple[Tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        return label_of(self.settings)

    def acting_on(self, method: str) -> Tuple[Tuple[str, Any], ...]:
        """The settings of this arm that change what `method` trains (module docstring)."""
        if method == "dense":
            return ()
        curved = method_is_curved(method)
        return tuple((k, v) for k, v in self.settings if curved or not k.startswith(CURVATURE_PREFIX))


def label_of(settings: Sequence[Tuple[str, Any]]) -> str:
    return ",".join(f"{k}={format_value(v)}" for k, v in settings)


def parse_sweeps(texts: Sequence[str]) -> List[Arm]:
    """The arms of `--sweep KEY=V1,V2,...` (repeatable): the product of every swept key's values, in the given
    order; one empty arm without a sweep."""
    axes: List[List[Tuple[str, Any]]] = []
    seen = set()
    for text in texts:
        key, values = parse_assignment(text, "--sweep")
        if key in seen:
            raise SettingsError(f"--sweep {key} is given twice: give all its values in one --sweep {key}=V1,V2,...")
        seen.add(key)
        parsed = [parse_value(v.strip()) for v in values.split(",")]
        if any(isinstance(v, str) and not v for v in parsed):
            raise SettingsError(f"--sweep {text!r} has an empty value: expected {key}=V1,V2,...")
        if len({json.dumps(v) for v in parsed}) != len(parsed):
            raise SettingsError(f"--sweep {text!r} repeats a value")
        axes.append([(key, v) for v in parsed])
    return [Arm(tuple(point)) for point in itertools.product(*axes)]


def variant_name(method: str, arm: Arm) -> str:
    """The run folder below `runs/` of `method` in `arm` (module docstring)."""
    acting = arm.acting_on(method)
    return f"{method}/{label_of(acting)}" if acting else method

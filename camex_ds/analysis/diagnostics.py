"""What moved in a MoE run: the curvature factors' distance from identity, the task vectors' size, the routers'
entropy. A comparison that finds no effect must show whether the curvature had a chance to act.

End values come from a run's `final_metrics.json` (`DIAGNOSTIC_KEYS`); where a run has none, from the last
training row of its `metrics.jsonl` that holds per-layer values. Per-layer values are read generically: any key
`<group>/layer<i>/<name>` of a training row (the trainer's `layer_stats` naming) is the diagnostic `<group>_<name>`,
averaged over layers, and its mean over seeds is drawn against the step.
"""
from __future__ import annotations

import math
import re
from typing import Dict, List, Mapping, Sequence

from .stats import summarize

#: The end-of-run diagnostics a run's final_metrics.json holds; each is reported, as n/a when absent.
DIAGNOSTIC_KEYS = ("curvature_dev_from_identity", "task_vector_rel_norm", "router_entropy")
LAYER_KEY = re.compile(r"^(?P<group>[^/]+)/layer(?P<layer>\d+)/(?P<name>.+)$")


def layer_means(row: Mapping[str, object]) -> Dict[str, float]:
    """`{<group>_<name>: mean over layers}` of the per-layer values in one metrics row."""
    values: Dict[str, List[float]] = {}
    for key, value in row.items():
        m = LAYER_KEY.match(key)
        if m and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            values.setdefault(f"{m['group']}_{m['name']}", []).append(float(value))
    return {k: sum(v) / len(v) for k, v in values.items()}


def layer_rows(train_rows: Sequence[Mapping[str, object]]) -> List[dict]:
    """`{"step", <diagnostic>: layer mean, ...}` of every training row that holds per-layer values."""
    out = []
    for row in train_rows:
        means = layer_means(row)
        if means:
            out.append({"step": row["step"], **means})
    return out


def end_values(final: Mapping[str, object], rows: Sequence[Mapping[str, object]]) -> Dict[str, float]:
    """Each diagnostic at the end of a run: final_metrics.json's, else the last per-layer row's, else nan."""
    last = rows[-1] if rows else {}
    keys = list(DIAGNOSTIC_KEYS) + sorted(k for k in last if k != "step" and k not in DIAGNOSTIC_KEYS)
    out = {}
    for k in keys:
        v = final.get(k, last.get(k))
        out[k] = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan
    return out


def summarize_ends(per_seed: Mapping[object, Mapping[str, float]]) -> Dict[str, dict]:
    """Mean and sample std over seeds of each diagnostic any seed reported (n/a ones included, as nan)."""
    keys = list(DIAGNOSTIC_KEYS)
    for ends in per_seed.values():
        keys += [k for k in ends if k not in keys]
    return {k: summarize(ends.get(k, math.nan) for ends in per_seed.values()) for k in keys}

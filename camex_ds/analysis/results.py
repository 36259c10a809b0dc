"""Read the run folders of a (method x seed) grid of pretraining runs and aggregate them into one results
dict (summaries, paired statistics, mean curves), written as ``results.json``.

Layout read (written by ``launcher/pretrain.py``, one folder per run)::

    OUTPUT/runs/<method>/seed<k>/metrics.jsonl       # training + evaluation rows
    OUTPUT/runs/<method>/seed<k>/final_metrics.json  # only once the run completed

Training rows carry ``step, loss, lr, tokens_per_s, tokens, train_flops``;
evaluation rows carry ``step, val_loss, val_ppl, val_bpb, tokens, train_flops``
and are recognised by the presence of ``val_loss``.  A run counts as finished
(and enters tables, statistics and curves) only when ``final_metrics.json``
exists.

All functions are pure apart from the explicit file reads/writes, so they can be
tested on synthetic folders.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .diagnostics import end_values, layer_rows, summarize_ends
from .stats import method_pairs, paired_comparison, summarize

__all__ = ["FINAL_KEYS", "PAIR_METRICS", "PathLike", "run_dir", "read_metrics", "read_final", "as_number",
           "aggregate_curve", "value_at", "collect_results", "json_safe", "write_json", "write_results_json"]

PathLike = Union[str, os.PathLike]

#: Final metrics reported per seed (with mean/std per method).
FINAL_KEYS: Tuple[str, ...] = ("val_loss", "val_ppl", "val_bpb", "tokens_per_s", "flops_per_token")
#: Metrics compared between methods with paired statistics.
PAIR_METRICS: Tuple[str, ...] = ("val_bpb", "val_loss")


def run_dir(output_dir: PathLike, variant: str, seed: int) -> Path:
    """Folder of one run: ``OUTPUT/runs/<variant>/seed<seed>`` (a variant is a method, or ``<method>/<arm>``)."""
    return Path(output_dir) / "runs" / variant / f"seed{seed}"


# --------------------------------------------------------------------------- reading


def read_metrics(path: PathLike) -> Dict[str, List[dict]]:
    """Read ``metrics.jsonl`` (a run folder or the file itself).

    Returns ``{"train": [...], "eval": [...]}``, each sorted by step.  Rows
    with ``val_loss`` are evaluation rows.  Lines that are not valid JSON (e.g.
    a line cut short by a crash) are skipped.  When a step appears more than
    once (a resumed run re-logs the steps after its last checkpoint) the last
    occurrence wins.  A missing file gives empty lists.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    train: Dict[int, dict] = {}
    evals: Dict[int, dict] = {}
    if not p.exists():
        return {"train": [], "eval": []}
    with open(p, "r", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if not isinstance(row, dict) or "step" not in row:
                continue
            try:
                step = int(row["step"])
            except (TypeError, ValueError):
                continue
            (evals if "val_loss" in row else train)[step] = row
    return {
        "train": [train[s] for s in sorted(train)],
        "eval": [evals[s] for s in sorted(evals)],
    }


def read_final(path: PathLike) -> Optional[dict]:
    """``final_metrics.json`` of a run folder (or the file itself), or ``None``
    when it is missing or unreadable."""
    p = Path(path)
    if p.is_dir():
        p = p / "final_metrics.json"
    try:
        with open(p, "r", encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def as_number(x) -> float:
    """``x`` as a float; ``nan`` for ``None`` and what is not a number."""
    if x is None:
        return math.nan
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


# --------------------------------------------------------------------------- curves


def aggregate_curve(eval_rows_by_seed: Mapping[object, Sequence[dict]], key: str = "val_bpb") -> Dict[str, np.ndarray]:
    """Mean/min/max/std of ``key`` across seeds at each evaluation step.

    Uses the steps every seed has evaluated (falls back to all steps seen when
    that intersection is empty, e.g. runs with different budgets), so the mean
    is not distorted by seeds dropping in and out.  The x position in FLOPs is
    the mean ``train_flops`` of the seeds at that step (``nan`` if unknown).

    Returns arrays ``step, flops, mean, min, max, std, n`` (empty if no data).
    """
    per_seed: List[Dict[int, Tuple[float, float]]] = []
    for rows in eval_rows_by_seed.values():
        d: Dict[int, Tuple[float, float]] = {}
        for r in rows:
            v = as_number(r.get(key))
            if math.isfinite(v):
                d[int(r["step"])] = (v, as_number(r.get("train_flops")))
        if d:
            per_seed.append(d)
    empty = {k: np.array([]) for k in ("step", "flops", "mean", "min", "max", "std", "n")}
    if not per_seed:
        return empty
    steps = set(per_seed[0])
    for d in per_seed[1:]:
        steps &= set(d)
    if not steps:
        steps = set().union(*per_seed)
    steps_sorted = sorted(steps)
    out = {k: [] for k in ("step", "flops", "mean", "min", "max", "std", "n")}
    for s in steps_sorted:
        vals = np.array([d[s][0] for d in per_seed if s in d])
        fl = np.array([d[s][1] for d in per_seed if s in d])
        fl = fl[np.isfinite(fl)]
        out["step"].append(s)
        out["flops"].append(float(fl.mean()) if fl.size else math.nan)
        out["mean"].append(float(vals.mean()))
        out["min"].append(float(vals.min()))
        out["max"].append(float(vals.max()))
        out["std"].append(float(vals.std(ddof=1)) if vals.size > 1 else 0.0)
        out["n"].append(int(vals.size))
    return {k: np.asarray(v, dtype=float) for k, v in out.items()}


def value_at(rows: Sequence[dict], x_key: str, x: float, key: str = "val_bpb") -> float:
    """``key`` at ``x_key == x`` on one run's evaluation rows, linear between the two evaluations around ``x``;
    ``nan`` outside the evaluated range."""
    points = sorted((as_number(r.get(x_key)), as_number(r.get(key))) for r in rows)
    points = [(px, py) for px, py in points if math.isfinite(px) and math.isfinite(py)]
    if not points or not (points[0][0] <= x <= points[-1][0]):
        return math.nan
    xs, ys = zip(*points)
    return float(np.interp(x, xs, ys))


def _at_equal(evals_a: Mapping[int, Sequence[dict]], evals_b: Mapping[int, Sequence[dict]], x_key: str):
    """``(a, b)`` per seed: each run's val_bpb where the shorter of the pair ended in ``x_key`` (steps or training
    FLOPs), or ``None`` when the pair ended at the same ``x_key`` on every seed (the final values already compare
    them there)."""
    a, b, differ = {}, {}, False
    for s in set(evals_a) & set(evals_b):
        end_a = max((as_number(r.get(x_key)) for r in evals_a[s]), default=math.nan)
        end_b = max((as_number(r.get(x_key)) for r in evals_b[s]), default=math.nan)
        x = min(end_a, end_b)
        differ = differ or not math.isclose(end_a, end_b, rel_tol=1e-9)
        a[s], b[s] = value_at(evals_a[s], x_key, x), value_at(evals_b[s], x_key, x)
    return (a, b) if differ else None


# --------------------------------------------------------------------------- results


def collect_results(
    output_dir: PathLike,
    methods: Sequence[str],
    seeds: Sequence[int],
    meta: Optional[Mapping[str, object]] = None,
    max_steps: Optional[Mapping[str, int]] = None,
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    bootstrap_seed: int = 0,
    folders: Optional[Mapping[str, str]] = None,
) -> dict:
    """Read every run folder of the grid (``runs/<folders[m]>/seed<k>``, ``folders[m]`` the method's variant,
    the method itself by default) and compute summaries, paired stats and diagnostics.

    Returns a JSON-serialisable dict (non-finite numbers are kept as ``nan``
    here; :func:`write_results_json` turns them into ``null``)::

        {"meta": {...}, "methods_order": [...], "seeds": [...],
         "final_keys": [...],
         "methods": {m: {"max_steps", "seeds": {"<seed>": {val_loss, val_ppl,
                          val_bpb, tokens_per_s, flops_per_token, step,
                          train_loss}},
                         "finished_seeds", "missing_seeds",
                         "summary": {key: {n, mean, std, min, max, n_dropped}}}},
         "pairs": [{"a", "b", "relation", "n", "seeds", "flops_ratio",
                    "val_bpb": paired_comparison(...),
                    "val_loss": paired_comparison(...),
                    "val_bpb_equal_steps": paired_comparison(...) or None,
                    "val_bpb_equal_flops": paired_comparison(...) or None}],
         "curves": {m: {"step": [...], "flops": [...], "mean": [...], ...}},
         "diagnostics": {m: {"end": {key: summary}, "curves": {key: {"step": [...], "mean": [...], ...}}}},
         "variants": {m: folder}}

    Paired differences are ``a - b``: negative means ``a`` reached a lower
    (better) loss / bits-per-byte. The final values compare the pair where the grid's budget put them (equal
    steps, or equal FLOPs); ``val_bpb_equal_steps`` / ``_flops`` compare it where the shorter run of each seed
    ended in steps / training FLOPs, the longer one read off its evaluations (linear between two of them), and
    are ``None`` when both runs ended there already. ``flops_ratio`` is a's training FLOPs per token over b's.
    """
    methods = list(dict.fromkeys(methods))
    seeds = list(seeds)
    folders = {m: (folders or {}).get(m, m) for m in methods}
    res: dict = {
        "meta": dict(meta or {}),
        "methods_order": methods,
        "seeds": seeds,
        "final_keys": list(FINAL_KEYS),
        "methods": {},
        "pairs": [],
        "curves": {},
        "diagnostics": {},
        "variants": folders,
    }
    per_method_values: Dict[str, Dict[str, Dict[int, float]]] = {}
    per_method_evals: Dict[str, Dict[int, List[dict]]] = {}
    for m in methods:
        seed_rows: Dict[str, dict] = {}
        finished: List[int] = []
        missing: List[int] = []
        evals_by_seed: Dict[int, List[dict]] = {}
        diag_rows: Dict[int, List[dict]] = {}
        diag_ends: Dict[int, Dict[str, float]] = {}
        values: Dict[str, Dict[int, float]] = {k: {} for k in FINAL_KEYS}
        for s in seeds:
            rd = run_dir(output_dir, folders[m], s)
            final = read_final(rd)
            if final is None:
                missing.append(s)
                continue
            finished.append(s)
            metrics = read_metrics(rd)
            last_eval = metrics["eval"][-1] if metrics["eval"] else {}
            row = {}
            for k in FINAL_KEYS:
                v = final.get(k)
                if v is None:  # fall back to the last evaluation row
                    v = last_eval.get(k)
                row[k] = as_number(v)
                values[k][s] = row[k]
            row["step"] = final.get("step")
            row["train_loss"] = as_number(final.get("train_loss"))
            seed_rows[str(s)] = row
            evals_by_seed[s] = metrics["eval"]
            diag_rows[s] = layer_rows(metrics["train"])
            diag_ends[s] = end_values(final, diag_rows[s])
        per_method_values[m] = values
        per_method_evals[m] = evals_by_seed
        res["methods"][m] = {
            "max_steps": (max_steps or {}).get(m),
            "seeds": seed_rows,
            "finished_seeds": finished,
            "missing_seeds": missing,
            "summary": {k: summarize(values[k][s] for s in finished) for k in FINAL_KEYS},
        }
        curve = aggregate_curve(evals_by_seed, "val_bpb")
        res["curves"][m] = {k: v.tolist() for k, v in curve.items()}
        ends = summarize_ends(diag_ends)
        res["diagnostics"][m] = {
            "end": ends,
            "curves": {k: {c: v.tolist() for c, v in aggregate_curve(diag_rows, k).items()} for k in ends},
        }
    for a, b, rel in method_pairs(methods):
        fpt = [res["methods"][x]["summary"]["flops_per_token"]["mean"] for x in (a, b)]
        entry = {"a": a, "b": b, "relation": rel, "flops_ratio": fpt[0] / fpt[1] if fpt[1] else math.nan}
        for k in PAIR_METRICS:
            entry[k] = paired_comparison(
                per_method_values[a][k],
                per_method_values[b][k],
                confidence=confidence,
                n_resamples=n_resamples,
                seed=bootstrap_seed,
            )
        for name, x_key in (("val_bpb_equal_steps", "step"), ("val_bpb_equal_flops", "train_flops")):
            at = _at_equal(per_method_evals[a], per_method_evals[b], x_key)
            entry[name] = None if at is None else paired_comparison(
                at[0], at[1], confidence=confidence, n_resamples=n_resamples, seed=bootstrap_seed)
        entry["n"] = entry[PAIR_METRICS[0]]["n"]
        entry["seeds"] = entry[PAIR_METRICS[0]]["seeds"]
        res["pairs"].append(entry)
    return res


def json_safe(obj):
    """``obj`` with numpy scalars and arrays as Python values and non-finite floats as ``None`` (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (np.floating,)):
        return json_safe(float(obj))
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return [json_safe(x) for x in obj.tolist()]
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(x) for x in obj]
    return obj


def write_json(path: PathLike, obj) -> Path:
    """Write ``obj`` as indented JSON, atomically (a reader never sees half a file), creating the folder."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, p)
    return p


def write_results_json(results: dict, path: PathLike) -> Path:
    """Write ``results`` as strict JSON (``nan``/``inf`` become ``null``)."""
    return write_json(path, json_safe(results))

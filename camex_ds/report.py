"""Collect the results of a (method x seed) grid of pretraining runs and write
``results.json``, ``results.md`` and ``curves.png``.

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
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from camex_ds.stats import method_pairs, paired_comparison, summarize

__all__ = [
    "FINAL_KEYS",
    "PAIR_METRICS",
    "run_dir",
    "read_metrics",
    "read_final",
    "aggregate_curve",
    "collect_results",
    "write_results_json",
    "write_results_md",
    "plot_curves",
    "write_report",
]

PathLike = Union[str, os.PathLike]

#: Final metrics reported per seed (with mean/std per method).
FINAL_KEYS: Tuple[str, ...] = ("val_loss", "val_ppl", "val_bpb", "tokens_per_s", "flops_per_token")
#: Metrics compared between methods with paired statistics.
PAIR_METRICS: Tuple[str, ...] = ("val_bpb", "val_loss")


def run_dir(output_dir: PathLike, method: str, seed: int) -> Path:
    """Folder of one run: ``OUTPUT/runs/<method>/seed<seed>``."""
    return Path(output_dir) / "runs" / method / f"seed{seed}"


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


def _num(x) -> float:
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
            v = _num(r.get(key))
            if math.isfinite(v):
                d[int(r["step"])] = (v, _num(r.get("train_flops")))
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
) -> dict:
    """Read every run folder of the grid and compute summaries and paired stats.

    Returns a JSON-serialisable dict (non-finite numbers are kept as ``nan``
    here; :func:`write_results_json` turns them into ``null``)::

        {"meta": {...}, "methods_order": [...], "seeds": [...],
         "final_keys": [...],
         "methods": {m: {"max_steps", "seeds": {"<seed>": {val_loss, val_ppl,
                          val_bpb, tokens_per_s, flops_per_token, step,
                          train_loss}},
                         "finished_seeds", "missing_seeds",
                         "summary": {key: {n, mean, std, min, max, n_dropped}}}},
         "pairs": [{"a", "b", "relation", "n", "seeds",
                    "val_bpb": paired_comparison(...),
                    "val_loss": paired_comparison(...)}],
         "curves": {m: {"step": [...], "flops": [...], "mean": [...], ...}}}

    Paired differences are ``a - b``: negative means ``a`` reached a lower
    (better) loss / bits-per-byte.
    """
    methods = list(dict.fromkeys(methods))
    seeds = list(seeds)
    res: dict = {
        "meta": dict(meta or {}),
        "methods_order": methods,
        "seeds": seeds,
        "final_keys": list(FINAL_KEYS),
        "methods": {},
        "pairs": [],
        "curves": {},
    }
    per_method_values: Dict[str, Dict[str, Dict[int, float]]] = {}
    for m in methods:
        seed_rows: Dict[str, dict] = {}
        finished: List[int] = []
        missing: List[int] = []
        evals_by_seed: Dict[int, List[dict]] = {}
        values: Dict[str, Dict[int, float]] = {k: {} for k in FINAL_KEYS}
        for s in seeds:
            rd = run_dir(output_dir, m, s)
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
                row[k] = _num(v)
                values[k][s] = row[k]
            row["step"] = final.get("step")
            row["train_loss"] = _num(final.get("train_loss"))
            seed_rows[str(s)] = row
            evals_by_seed[s] = metrics["eval"]
        per_method_values[m] = values
        res["methods"][m] = {
            "max_steps": (max_steps or {}).get(m),
            "seeds": seed_rows,
            "finished_seeds": finished,
            "missing_seeds": missing,
            "summary": {k: summarize(values[k][s] for s in finished) for k in FINAL_KEYS},
        }
        curve = aggregate_curve(evals_by_seed, "val_bpb")
        res["curves"][m] = {k: v.tolist() for k, v in curve.items()}
    for a, b, rel in method_pairs(methods):
        entry = {"a": a, "b": b, "relation": rel}
        for k in PAIR_METRICS:
            entry[k] = paired_comparison(
                per_method_values[a][k],
                per_method_values[b][k],
                confidence=confidence,
                n_resamples=n_resamples,
                seed=bootstrap_seed,
            )
        entry["n"] = entry[PAIR_METRICS[0]]["n"]
        entry["seeds"] = entry[PAIR_METRICS[0]]["seeds"]
        res["pairs"].append(entry)
    return res


def _json_safe(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (np.floating,)):
        return _json_safe(float(obj))
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return [_json_safe(x) for x in obj.tolist()]
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(x) for x in obj]
    return obj


def write_results_json(results: dict, path: PathLike) -> Path:
    """Write ``results`` as strict JSON (``nan``/``inf`` become ``null``)."""
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(_json_safe(results), fh, indent=2, allow_nan=False)
        fh.write("\n")
    os.replace(tmp, p)
    return p


# --------------------------------------------------------------------------- markdown


def _fmt(x, spec: str) -> str:
    v = _num(x)
    if not math.isfinite(v):
        return "n/a"
    return format(v, spec)


_KEY_FMT = {
    "val_bpb": ".4f",
    "val_loss": ".4f",
    "val_ppl": ".2f",
    "tokens_per_s": ".0f",
    "flops_per_token": ".3e",
}
_KEY_TITLE = {
    "val_bpb": "val bpb",
    "val_loss": "val loss",
    "val_ppl": "val ppl",
    "tokens_per_s": "tokens/s",
    "flops_per_token": "FLOPs/token",
}


def _mean_std(summary: Mapping[str, float], spec: str) -> str:
    mean = _fmt(summary.get("mean"), spec)
    if mean == "n/a":
        return mean
    std = _num(summary.get("std"))
    return f"{mean} ± {format(std, spec)}" if math.isfinite(std) else mean


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return lines


def write_results_md(results: dict, path: PathLike) -> Path:
    """Write the tables of ``results`` (from :func:`collect_results`) as Markdown."""
    meta = results.get("meta", {})
    methods = results.get("methods_order", list(results.get("methods", {})))
    lines: List[str] = ["# Method comparison", ""]
    if meta:
        lines += ["## Settings", ""]
        lines += _table(["setting", "value"], ([k, f"`{json.dumps(_json_safe(v))}`"] for k, v in meta.items()))
        lines.append("")

    lines += ["## Final validation metrics (mean ± sample std over seeds)", ""]
    header = ["method", "seeds", "max_steps"] + [_KEY_TITLE[k] for k in FINAL_KEYS]
    rows = []
    for m in methods:
        info = results["methods"][m]
        n = len(info["finished_seeds"])
        total = n + len(info["missing_seeds"])
        row = [f"`{m}`", f"{n}/{total}", "n/a" if info.get("max_steps") is None else str(info["max_steps"])]
        row += [_mean_std(info["summary"][k], _KEY_FMT[k]) for k in FINAL_KEYS]
        rows.append(row)
    lines += _table(header, rows)
    lines.append("")

    lines += ["## Per-seed results", ""]
    header = ["method", "seed", "step"] + [_KEY_TITLE[k] for k in FINAL_KEYS]
    rows = []
    for m in methods:
        info = results["methods"][m]
        for s in info["finished_seeds"]:
            r = info["seeds"][str(s)]
            rows.append([f"`{m}`", str(s), str(r.get("step"))] + [_fmt(r.get(k), _KEY_FMT[k]) for k in FINAL_KEYS])
        for s in info["missing_seeds"]:
            rows.append([f"`{m}`", str(s), "not finished"] + ["n/a"] * len(FINAL_KEYS))
    lines += _table(header, rows)
    lines.append("")

    pairs = results.get("pairs", [])
    lines += ["## Paired comparisons", ""]
    if not pairs:
        lines += ["No pairs to compare (needs a curvature-aware method together with its Euclidean twin, or `euclid`).", ""]
    else:
        conf = pairs[0][PAIR_METRICS[0]].get("confidence", 0.95)
        nres = pairs[0][PAIR_METRICS[0]].get("n_resamples")
        lines += [
            f"Δ = A − B per seed over the seeds both finished; negative Δ means A is better. "
            f"CI: {conf:.0%} percentile bootstrap of the mean Δ ({nres} resamples); "
            f"p: two-sided paired t-test.",
            "",
        ]
        header = ["A", "B", "relation", "n"]
        for k in PAIR_METRICS:
            header += [f"Δ {_KEY_TITLE[k]}", f"{conf:.0%} CI", "p"]
        rows = []
        notes: Dict[str, int] = {}
        for p in pairs:
            row = [f"`{p['a']}`", f"`{p['b']}`", p["relation"], str(p["n"])]
            for k in PAIR_METRICS:
                c = p[k]
                pv = _fmt(c["p_value"], ".3g")
                if c.get("p_value_reason"):
                    idx = notes.setdefault(c["p_value_reason"], len(notes) + 1)
                    pv += f" [{idx}]"
                row += [
                    _fmt(c["mean_diff"], "+.4f"),
                    f"[{_fmt(c['ci_low'], '+.4f')}, {_fmt(c['ci_high'], '+.4f')}]",
                    pv,
                ]
            rows.append(row)
        lines += _table(header, rows)
        lines.append("")
        for reason, idx in notes.items():
            lines.append(f"[{idx}] {reason}")
        if notes:
            lines.append("")
    p = Path(path)
    p.write_text("\n".join(lines), encoding="utf-8")
    return p


# --------------------------------------------------------------------------- plot

# Twins share a colour; curvature-aware = solid, Euclidean = dashed.
_STYLE = {
    "dense": ("#444444", ":"),
    "smoe": ("#9467bd", "-."),
    "euclid": ("#1f77b4", "--"),
    "camex": ("#1f77b4", "-"),
    "ties": ("#ff7f0e", "--"),
    "camex-ties": ("#ff7f0e", "-"),
    "dare": ("#2ca02c", "--"),
    "camex-dare": ("#2ca02c", "-"),
}
_EXTRA_COLORS = ["#d62728", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"]


def _style(method: str, i: int) -> Tuple[str, str]:
    return _STYLE.get(method, (_EXTRA_COLORS[i % len(_EXTRA_COLORS)], "-"))


def plot_curves(results: dict, path: PathLike, band: str = "minmax", title: Optional[str] = None) -> Path:
    """Two panels: validation bpb vs step and vs cumulative training FLOPs.

    One line per method (mean across finished seeds) with a shaded band
    (``band="minmax"``: min–max across seeds; ``"std"``: ± sample std).
    Uses the non-interactive Agg backend.
    """
    if band not in ("minmax", "std"):
        raise ValueError(f"band must be 'minmax' or 'std', got {band!r}")
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    curves = results.get("curves", {})
    methods = results.get("methods_order", list(curves))
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), constrained_layout=True)
    ax_step, ax_flops = axes
    drawn = 0
    y_focus: List[float] = []
    no_flops: List[str] = []
    for i, m in enumerate(methods):
        c = curves.get(m)
        if not c or not c.get("step"):
            continue
        color, ls = _style(m, i)
        step = np.asarray(c["step"], dtype=float)
        flops = np.asarray(c["flops"], dtype=float)
        mean = np.asarray(c["mean"], dtype=float)
        if band == "minmax":
            lo, hi = np.asarray(c["min"], dtype=float), np.asarray(c["max"], dtype=float)
        else:
            sd = np.asarray(c["std"], dtype=float)
            lo, hi = mean - sd, mean + sd
        n_seeds = int(max(c["n"])) if c.get("n") else 0
        label = f"{m} (n={n_seeds})"
        marker = "o" if step.size <= 12 else None
        ax_step.plot(step, mean, color=color, ls=ls, lw=2, marker=marker, ms=4, label=label)
        ax_step.fill_between(step, lo, hi, color=color, alpha=0.15, lw=0)
        ok = np.isfinite(flops)
        if ok.any():
            ax_flops.plot(flops[ok], mean[ok], color=color, ls=ls, lw=2, marker=marker, ms=4, label=label)
            ax_flops.fill_between(flops[ok], lo[ok], hi[ok], color=color, alpha=0.15, lw=0)
        else:
            no_flops.append(m)
        drawn += 1
        # ignore the very first evaluation (often ~random init) when choosing the y range
        tail = slice(1, None) if mean.size >= 4 else slice(None)
        y_focus += list(lo[tail]) + list(hi[tail])
    band_txt = "min–max over seeds" if band == "minmax" else "± 1 std over seeds"
    ax_step.set_title("Validation bits per byte vs training step")
    ax_step.set_xlabel("training step")
    ax_flops.set_title("Validation bits per byte vs training compute")
    ax_flops.set_xlabel("cumulative training FLOPs")
    ax_flops.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
    for ax in axes:
        ax.set_ylabel("validation bits per byte (lower is better)")
        ax.grid(True, alpha=0.3)
    if drawn:
        y = np.asarray([v for v in y_focus if math.isfinite(v)])
        if y.size:
            lo_y, hi_y = float(y.min()), float(y.max())
            pad = 0.05 * (hi_y - lo_y) if hi_y > lo_y else 0.05 * max(abs(hi_y), 1e-3)
            for ax in axes:
                ax.set_ylim(lo_y - pad, hi_y + pad)
        ax_step.legend(loc="upper right", fontsize=9, handlelength=3.5,
                       title=f"mean, band = {band_txt}", title_fontsize=8)
        if no_flops:
            ax_flops.text(
                0.02, 0.02, "no train_flops logged for: " + ", ".join(no_flops),
                transform=ax_flops.transAxes, fontsize=8, color="0.4",
            )
        if ax_flops.lines:
            ax_flops.legend(loc="upper right", fontsize=9, handlelength=3.5)
    else:
        for ax in axes:
            ax.text(0.5, 0.5, "no evaluation rows found", ha="center", va="center", transform=ax.transAxes)
    if title:
        fig.suptitle(title)
    p = Path(path)
    fig.savefig(p, dpi=120)
    plt.close(fig)
    return p


def write_report(
    output_dir: PathLike,
    methods: Sequence[str],
    seeds: Sequence[int],
    meta: Optional[Mapping[str, object]] = None,
    max_steps: Optional[Mapping[str, int]] = None,
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    bootstrap_seed: int = 0,
    band: str = "minmax",
) -> Dict[str, Path]:
    """Collect the grid under ``output_dir`` and write ``results.json``,
    ``results.md`` and ``curves.png`` there.  Returns their paths and the
    results dict under ``"results"``."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = collect_results(
        out, methods, seeds, meta=meta, max_steps=max_steps,
        n_resamples=n_resamples, confidence=confidence, bootstrap_seed=bootstrap_seed,
    )
    n_seeds = len(list(seeds))
    title = f"{', '.join(results['methods_order'])}  ·  {n_seeds} seed{'s' if n_seeds != 1 else ''}"
    paths = {
        "json": write_results_json(results, out / "results.json"),
        "md": write_results_md(results, out / "results.md"),
        "png": plot_curves(results, out / "curves.png", band=band, title=title),
    }
    paths["results"] = results  # type: ignore[assignment]
    return paths

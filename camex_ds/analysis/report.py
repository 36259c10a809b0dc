"""Write a grid's report: collect the runs (`results`), then ``results.json``, ``results.md`` (the Markdown
tables, built here) and ``curves.png`` (`plots`)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Sequence

from .plots import plot_curves
from .results import FINAL_KEYS, PAIR_METRICS, PathLike, as_number, collect_results, json_safe, write_results_json

__all__ = ["write_results_md", "write_report"]


def _fmt(x, spec: str) -> str:
    v = as_number(x)
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
    std = as_number(summary.get("std"))
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
        lines += _table(["setting", "value"], ([k, f"`{json.dumps(json_safe(v))}`"] for k, v in meta.items()))
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


def write_report(output_dir: PathLike, methods: Sequence[str], seeds: Sequence[int], band: str = "minmax",
                 **options) -> Dict[str, Path]:
    """Collect the grid under ``output_dir`` (`collect_results`, which takes ``options``: meta, max_steps,
    n_resamples, confidence, bootstrap_seed) and write ``results.json``, ``results.md`` and ``curves.png``
    there (``band``: `plot_curves`'s).  Returns their paths and the results dict under ``"results"``."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = collect_results(out, methods, seeds, **options)
    n_seeds = len(list(seeds))
    title = f"{', '.join(results['methods_order'])}  ·  {n_seeds} seed{'s' if n_seeds != 1 else ''}"
    paths = {
        "json": write_results_json(results, out / "results.json"),
        "md": write_results_md(results, out / "results.md"),
        "png": plot_curves(results, out / "curves.png", band=band, title=title),
    }
    paths["results"] = results  # type: ignore[assignment]
    return paths

"""Write a grid's report: collect the runs of each arm (`results`), then ``results.json``, ``results.md`` (the
Markdown tables, built here) and the figures (`plots`): validation curves and diagnostics, one pair per arm."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

from .plots import plot_curves, plot_diagnostics
from .results import FINAL_KEYS, PAIR_METRICS, PathLike, as_number, collect_results, json_safe, write_results_json

__all__ = ["results_markdown", "write_results_md", "write_report"]


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
#: The columns of the equal-compute table: a pair entry's key and its title.
_EQUAL = (("val_bpb_equal_flops", "at equal FLOPs"), ("val_bpb_equal_steps", "at equal steps"))


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


def _diff_cells(c: Optional[Mapping], notes: Dict[str, int]) -> List[str]:
    """Δ, CI and p of one paired comparison (three n/a cells without one); a degenerate p gets a footnote."""
    if not c:
        return ["n/a"] * 3
    pv = _fmt(c["p_value"], ".3g")
    if c.get("p_value_reason"):
        pv += f" [{notes.setdefault(c['p_value_reason'], len(notes) + 1)}]"
    return [_fmt(c["mean_diff"], "+.4f"), f"[{_fmt(c['ci_low'], '+.4f')}, {_fmt(c['ci_high'], '+.4f')}]", pv]


def _methods_tables(results: dict, h: str) -> List[str]:
    methods = results.get("methods_order", list(results.get("methods", {})))
    lines = [f"{h} Final validation metrics (mean ± sample std over seeds)", ""]
    rows = []
    for m in methods:
        info = results["methods"][m]
        n = len(info["finished_seeds"])
        row = [f"`{m}`", f"{n}/{n + len(info['missing_seeds'])}",
               "n/a" if info.get("max_steps") is None else str(info["max_steps"])]
        rows.append(row + [_mean_std(info["summary"][k], _KEY_FMT[k]) for k in FINAL_KEYS])
    lines += _table(["method", "seeds", "max_steps"] + [_KEY_TITLE[k] for k in FINAL_KEYS], rows) + [""]
    lines += [f"{h} Per-seed results", ""]
    rows = []
    for m in methods:
        info = results["methods"][m]
        for s in info["finished_seeds"]:
            r = info["seeds"][str(s)]
            rows.append([f"`{m}`", str(s), str(r.get("step"))] + [_fmt(r.get(k), _KEY_FMT[k]) for k in FINAL_KEYS])
        for s in info["missing_seeds"]:
            rows.append([f"`{m}`", str(s), "not finished"] + ["n/a"] * len(FINAL_KEYS))
    return lines + _table(["method", "seed", "step"] + [_KEY_TITLE[k] for k in FINAL_KEYS], rows) + [""]


def _pairs_tables(results: dict, h: str) -> List[str]:
    pairs = results.get("pairs", [])
    lines = [f"{h} Paired comparisons", ""]
    if not pairs:
        return lines + ["No pairs to compare (needs a curvature-aware method together with its Euclidean twin, "
                        "or `euclid`, or `dense`).", ""]
    conf = pairs[0][PAIR_METRICS[0]].get("confidence", 0.95)
    nres = pairs[0][PAIR_METRICS[0]].get("n_resamples")
    lines += [f"Δ = A − B per seed over the seeds both finished, at the end of the runs (the grid's budget: equal "
              f"steps or equal FLOPs); negative Δ means A is better. bpb: mean ± sample std over each method's "
              f"seeds. CI: {conf:.0%} percentile bootstrap of the mean Δ ({nres} resamples); p: two-sided paired "
              "t-test.", ""]
    header = ["A", "B", "relation", "n", "bpb A", "bpb B"]
    for k in PAIR_METRICS:
        header += [f"Δ {_KEY_TITLE[k]}", f"{conf:.0%} CI", "p"]
    notes: Dict[str, int] = {}
    rows = []
    for p in pairs:
        row = [f"`{p['a']}`", f"`{p['b']}`", p["relation"], str(p["n"])]
        row += [_mean_std(results["methods"][x]["summary"]["val_bpb"], ".4f") for x in (p["a"], p["b"])]
        for k in PAIR_METRICS:
            row += _diff_cells(p[k], notes)
        rows.append(row)
    lines += _table(header, rows) + [""]
    lines += [f"{h} Equal compute", "",
              "FLOPs ratio: A's training FLOPs per token over B's. Where a pair's runs ended at different training "
              "FLOPs (or steps), Δ val bpb is also taken where the shorter run of each seed ended, the longer one's "
              "value read off its evaluations (linear between two); n/a: both ended there already.", ""]
    header = ["A", "B", "FLOPs ratio"]
    for _, title in _EQUAL:
        header += [f"Δ val bpb {title}", f"{conf:.0%} CI", "p"]
    rows = []
    for p in pairs:
        row = [f"`{p['a']}`", f"`{p['b']}`", _fmt(p.get("flops_ratio"), ".4f")]
        for key, _ in _EQUAL:
            row += _diff_cells(p.get(key), notes)
        rows.append(row)
    lines += _table(header, rows) + [""]
    lines += [f"[{idx}] {reason}" for reason, idx in notes.items()]
    return lines + ([""] if notes else [])


def _diagnostics_table(results: dict, h: str, figure: Optional[str]) -> List[str]:
    diags = results.get("diagnostics", {})
    methods = [m for m in results.get("methods_order", []) if m in diags]
    keys: List[str] = []
    for m in methods:
        keys += [k for k in diags[m]["end"] if k not in keys]
    lines = [f"{h} Diagnostics at the end of training (mean ± sample std over seeds)", "",
             "Whether the curvature factors, the experts and the routers moved: a comparison that finds no effect "
             "reads these first. n/a: the runs did not report it.", ""]
    rows = [[f"`{m}`"] + [_mean_std(diags[m]["end"].get(k, {}), ".4g") for k in keys] for m in methods]
    lines += _table(["method"] + keys, rows) + [""]
    if figure:
        lines += [f"![diagnostics against training step]({figure})", ""]
    else:
        lines += ["No per-layer values in the runs' metrics.jsonl: no diagnostic curves.", ""]
    return lines


def results_markdown(results: dict, level: int = 1, figures: Optional[Mapping[str, Mapping[str, str]]] = None,
                     title: str = "Method comparison") -> List[str]:
    """The report's Markdown lines, its title at heading ``level``; ``figures[arm label]`` holds the ``curves`` and
    ``diagnostics`` image links of each arm (a grid without a sweep has the one arm ``""``)."""
    h = "#" * level
    lines: List[str] = [f"{h} {title}", ""]
    meta = results.get("meta", {})
    if meta:
        lines += [f"{h}# Settings", ""]
        lines += _table(["setting", "value"], ([k, f"`{json.dumps(json_safe(v))}`"] for k, v in meta.items()))
        lines.append("")
    arms = results["arms"] if "arms" in results else {"": results}
    for label, arm in arms.items():
        sub = h + ("##" if label else "#")
        if label:
            lines += [f"{h}# Arm `{label}`", ""]
        fig = (figures or {}).get(label, {})
        if fig.get("curves"):
            lines += [f"![validation bits per byte against step and training FLOPs]({fig['curves']})", ""]
        lines += _methods_tables(arm, sub) + _pairs_tables(arm, sub)
        lines += _diagnostics_table(arm, sub, fig.get("diagnostics"))
    return lines


def write_results_md(results: dict, path: PathLike, figures: Optional[Mapping[str, Mapping[str, str]]] = None) -> Path:
    """Write the tables of ``results`` (from :func:`collect_results`, or per arm) as Markdown."""
    p = Path(path)
    p.write_text("\n".join(results_markdown(results, figures=figures)), encoding="utf-8")
    return p


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", label)


def write_report(output_dir: PathLike, methods: Sequence[str], seeds: Sequence[int], band: str = "minmax",
                 arms: Optional[Mapping[str, Mapping[str, str]]] = None,
                 arm_seeds: Optional[Mapping[str, Sequence[int]]] = None, **options) -> Dict[str, Path]:
    """Collect the grid under ``output_dir`` and write ``results.json``, ``results.md`` and the figures there.

    ``arms[label][method]`` is the variant (run folder below ``runs/``) each method trains in each arm (default:
    one arm, ``""``, each method its own folder), ``arm_seeds[label]`` the seeds that arm reports (default: all
    of ``seeds``); ``options`` go to `collect_results` (meta, max_steps keyed by
    variant, n_resamples, confidence, bootstrap_seed), ``band`` to `plot_curves`. A grid with several arms keeps
    its settings in ``meta`` and each arm's results under ``arms``. Returns the paths (``png``: the first arm's
    curves, ``figures``: every figure, ``links``: `results_markdown`'s figure names per arm) and the results dict
    under ``"results"``."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    arms = dict(arms or {"": {m: m for m in methods}})
    meta, steps = options.pop("meta", None), options.pop("max_steps", None) or {}
    per_arm, figures, files = {}, {}, []
    for label, folders in arms.items():
        arm = list((arm_seeds or {}).get(label, seeds))
        n_seeds = len(arm)
        res = collect_results(out, methods, arm, meta=None if len(arms) > 1 else meta, folders=folders,
                              max_steps={m: steps.get(v) for m, v in folders.items()}, **options)
        per_arm[label] = res
        suffix = f"-{_slug(label)}" if label else ""
        title = f"{', '.join(res['methods_order'])}  ·  {n_seeds} seed{'s' if n_seeds != 1 else ''}"
        curves = plot_curves(res, out / f"curves{suffix}.png", band=band, title=f"{label}  ·  {title}" if label
                             else title)
        diag = plot_diagnostics(res, out / f"diagnostics{suffix}.png", title=label or None)
        figures[label] = {"curves": curves.name, "diagnostics": diag.name if diag else None}
        files += [curves] + ([diag] if diag else [])
    results = per_arm[""] if list(arms) == [""] else {"meta": dict(meta or {}), "arms_order": list(arms),
                                                      "arms": per_arm}
    paths = {
        "json": write_results_json(results, out / "results.json"),
        "md": write_results_md(results, out / "results.md", figures),
        "png": files[0],
        "figures": files,
        "links": figures,
    }
    paths["results"] = results  # type: ignore[assignment]
    return paths

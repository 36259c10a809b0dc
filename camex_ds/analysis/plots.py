"""Draw a grid's figures: ``curves.png``, validation bits per byte against training step and against training
FLOPs, one line per method (mean over seeds) with a band across seeds; ``diagnostics.png``, each per-layer
diagnostic (mean over layers and seeds) against the step."""
from __future__ import annotations

import math
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from .results import PathLike

__all__ = ["plot_curves", "plot_diagnostics"]

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


def _pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_curves(results: dict, path: PathLike, band: str = "minmax", title: Optional[str] = None) -> Path:
    """Two panels: validation bpb vs step and vs cumulative training FLOPs.

    One line per method (mean across finished seeds) with a shaded band
    (``band="minmax"``: min–max across seeds; ``"std"``: ± sample std).
    Uses the non-interactive Agg backend.
    """
    if band not in ("minmax", "std"):
        raise ValueError(f"band must be 'minmax' or 'std', got {band!r}")
    plt = _pyplot()
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


def plot_diagnostics(results: dict, path: PathLike, title: Optional[str] = None) -> Optional[Path]:
    """One panel per diagnostic with a curve (`diagnostics`: per-layer values in the runs' metrics.jsonl), one line
    per method (mean over seeds, min-max band); ``None`` and no file when no run logged any."""
    diags = results.get("diagnostics", {})
    methods = [m for m in results.get("methods_order", list(diags)) if m in diags]
    keys: List[str] = []
    for m in methods:
        keys += [k for k, c in diags[m]["curves"].items() if c.get("step") and k not in keys]
    if not keys:
        return None
    plt = _pyplot()
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), constrained_layout=True, squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for i, m in enumerate(methods):
            c = diags[m]["curves"].get(key, {})
            if not c.get("step"):
                continue
            color, ls = _style(m, i)
            step = np.asarray(c["step"], dtype=float)
            ax.plot(step, np.asarray(c["mean"], dtype=float), color=color, ls=ls, lw=2, label=m,
                    marker="o" if step.size <= 12 else None, ms=4)
            ax.fill_between(step, np.asarray(c["min"], dtype=float), np.asarray(c["max"], dtype=float),
                            color=color, alpha=0.15, lw=0)
        ax.set_title(key.replace("_", " "))
        ax.set_xlabel("training step")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(("diagnostics (mean over layers; mean and min-max over seeds)" +
                  (f"  ·  {title}" if title else "")))
    p = Path(path)
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p

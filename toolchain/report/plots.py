"""The report's plots (matplotlib, Agg backend: no display needed), each written as a PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: CI and servers have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from toolchain.atomic import atomic_write_bytes  # noqa: E402


def _save(fig, path: Path) -> Path:
    try:
        atomic_write_bytes(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    finally:
        plt.close(fig)
    return path


def budget_bars(budgets: Sequence[Mapping], path: Path) -> Path:
    """One horizontal bar per budget: value / limit; the line at 1.0 is the limit."""
    names, ratios = [], []
    for b in budgets:
        value, limit = b.get("value"), b.get("limit")
        if b.get("compare") == ">=":  # a minimum: plot limit / value, so <= 1 still passes
            names.append(f"{b['name']} (min)")
            ratios.append(float(limit) / float(value) if value else 0.0)
        else:
            names.append(str(b["name"]))
            ratios.append(float(value) / float(limit) if (limit and value is not None) else 0.0)
    colors = ["tab:green" if b.get("passed") else "tab:red" for b in budgets]
    fig, ax = plt.subplots(figsize=(7, 0.45 * max(len(names), 2) + 1))
    y = np.arange(len(names))
    ax.barh(y, ratios, color=colors)
    ax.axvline(1.0, color="black", linestyle="--", linewidth=1)
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlabel("value / limit (<= 1 passes)")
    ax.set_title("Budgets")
    for yi, r in zip(y, ratios):
        ax.text(r, yi, f" {r:.2f}", va="center", fontsize=8)
    ax.set_xlim(0, max([1.1, *[r * 1.15 for r in ratios]]))
    return _save(fig, path)


def parity_scatter(scores: Mapping[str, Mapping], path: Path) -> Path:
    """Float score (x) against each artifact's score (y) on the same inputs; y = x is perfect parity."""
    fig, ax = plt.subplots(figsize=(6, 6))
    lo, hi = np.inf, -np.inf
    for name, s in scores.items():
        x = np.asarray(s["float"], dtype=float)
        y = np.asarray(s["artifact"], dtype=float)
        if x.size == 0:
            continue
        ax.scatter(x, y, s=6, alpha=0.5, label=name)
        lo, hi = min(lo, x.min(), y.min()), max(hi, x.max(), y.max())
    if np.isfinite(lo):
        ax.plot([lo, hi], [lo, hi], color="black", linewidth=1, linestyle="--")
    ax.set_xlabel("float model score")
    ax.set_ylabel("artifact score (its runtime)")
    ax.set_title("Parity: float vs artifact")
    if scores:
        ax.legend(fontsize=7, markerscale=2)
    return _save(fig, path)


def roc_curves(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: Path) -> Path:
    """ROC (FPR, TPR) per scorer: the float model and each artifact, on the same pairs."""
    fig, ax = plt.subplots(figsize=(6, 5))
    for name, (fpr, tpr) in curves.items():
        # float drawn dashed on top: artifacts at parity lie right under it
        style = ({"linewidth": 1.6, "color": "black", "linestyle": "--", "zorder": 3}
                 if name.startswith("float") else {"linewidth": 1.2})
        ax.plot(fpr, tpr, label=name, **style)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("false accept rate")
    ax.set_ylabel("true accept rate")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_title("ROC: float against each artifact")
    if curves:
        ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def int8_sensitivity(layers: Sequence[Mapping], all_int8: float, kept: Sequence[str], path: Path,
                     top: int = 25) -> Path:
    """One bar per layer (the `top` most sensitive): the mean embedding cosine to float with that
    layer alone in float; the dashed line is all int8, layers the fallback kept in float are orange."""
    rows = list(layers)[:top]
    names = [r["layer"] for r in rows]
    values = [1.0 - float(r["cosine_mean"]) for r in rows]
    colors = ["tab:orange" if r["layer"] in kept else "tab:blue" for r in rows]
    fig, ax = plt.subplots(figsize=(7, 0.3 * max(len(names), 2) + 1.2))
    y = np.arange(len(names))
    ax.barh(y, values, color=colors)
    ax.axvline(1.0 - float(all_int8), color="black", linestyle="--", linewidth=1, label="all layers int8")
    ax.set_yticks(y, names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("1 - mean embedding cosine to float, with only this layer in float (lower is better)")
    ax.set_title("int8 sensitivity per layer")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def seed_agreement(summary: Mapping, bound: float | None, path: Path) -> Path:
    """Decision agreement of each artifact (one row each), one dot per seed and a bar at their
    mean (toolchain.report.seeds); the dashed line is the recipe's bound."""
    files = list(summary["artifacts"])
    fig, ax = plt.subplots(figsize=(7, 0.5 * max(len(files), 2) + 1.2))
    y = np.arange(len(files))
    for yi, f in zip(y, files):
        stats = summary["artifacts"][f]["agreement"]
        values = [v for v in stats["values"] if v is not None]
        ax.scatter(values, [yi] * len(values), color="tab:blue", zorder=3)
        if stats["mean"] is not None:
            ax.plot([stats["mean"]] * 2, [yi - 0.3, yi + 0.3], color="black", linewidth=2)
    if bound is not None:
        ax.axvline(bound, color="tab:red", linestyle="--", linewidth=1, label=f"bound {bound:g}%")
        ax.legend(loc="lower left", fontsize=8)
    ax.set_yticks(y, files, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("decision agreement with the float model (%): one dot per seed, bar at the mean")
    ax.set_title(f"{summary['recipe']}: {len(summary['seeds'])} seeds")
    return _save(fig, path)

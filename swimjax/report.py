"""Sweep reports: accuracy-vs-NWC plot (as in SWIM's figures) and a Markdown summary.

Both take the rows of a results file (see :mod:`swimjax.results`): dicts with at
least ``method``, ``budget``, ``nwc``, ``acc_mean``, ``acc_std``, ``acc_sem``,
``acc_p5`` and ``clean_acc``; accuracies are fractions in [0, 1].
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

Row = Mapping[str, Any]


def _by_method(rows: Sequence[Row]) -> dict[str, list[Row]]:
    out: dict[str, list[Row]] = {}
    for r in rows:
        out.setdefault(r["method"], []).append(r)
    for m in out:
        out[m].sort(key=lambda r: (r["nwc"], r["budget"]))
    return out


def reference_levels(rows: Sequence[Row]) -> dict[str, float]:
    """Mean accuracy with no write-verify (budget 0), with full write-verify
    (budget 1), and clean, averaged over the methods that have those points.
    Missing levels are NaN."""
    def mean_of(rs: list[Row], key: str) -> float:
        return float(np.mean([r[key] for r in rs])) if rs else float("nan")

    return {
        "no_wv": mean_of([r for r in rows if r["budget"] == 0.0], "acc_mean"),
        "full_wv": mean_of([r for r in rows if r["budget"] == 1.0], "acc_mean"),
        "clean": mean_of(list(rows), "clean_acc"),
    }


def nwc_to_reach(points: Sequence[Row], target: float) -> tuple[float, float]:
    """The NWC a method needs for ``acc_mean >= target``.

    Returns ``(grid, interpolated)``: the smallest swept NWC that reaches the
    target, and the linear interpolation of the first crossing between swept
    points (equal to ``grid`` when the first point already reaches it). Both
    are NaN when no swept point reaches the target.
    """
    pts = sorted(points, key=lambda r: r["nwc"])
    prev = None
    for r in pts:
        if r["acc_mean"] >= target:
            x1, y1 = float(r["nwc"]), float(r["acc_mean"])
            if prev is None or y1 == prev[1]:
                return x1, x1
            x0, y0 = prev
            return x1, float(x0 + (target - y0) * (x1 - x0) / (y1 - y0))
        prev = (float(r["nwc"]), float(r["acc_mean"]))
    return float("nan"), float("nan")


def plot_accuracy_vs_nwc(rows: Sequence[Row], path: str | os.PathLike, title: str = "") -> None:
    """Writes a PNG: accuracy (mean, +-std band, 5th percentile dashed) vs NWC
    per method, with the no-write-verify, full-write-verify and clean levels."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for i, (method, pts) in enumerate(sorted(_by_method(rows).items())):
        color = f"C{i}"
        x = np.array([r["nwc"] for r in pts])
        mean = 100 * np.array([r["acc_mean"] for r in pts])
        std = 100 * np.array([r["acc_std"] for r in pts])
        p5 = 100 * np.array([r["acc_p5"] for r in pts])
        ax.plot(x, mean, "o-", color=color, label=f"{method} (mean)", ms=3)
        ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.15, lw=0)
        ax.plot(x, p5, "--", color=color, lw=1, label=f"{method} (5th pct)")
    levels = reference_levels(rows)
    styles = {"clean": ("k", ":"), "full_wv": ("tab:green", "-."), "no_wv": ("tab:red", "-.")}
    names = {"clean": "clean (no variation)", "full_wv": "full write-verify",
             "no_wv": "no write-verify"}
    for k, (c, ls) in styles.items():
        if np.isfinite(levels[k]):
            ax.axhline(100 * levels[k], color=c, ls=ls, lw=1, label=names[k])
    ax.set_xlabel("normalized write cycles (NWC)")
    ax.set_ylabel("accuracy (%)")
    ax.set_xlim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right", ncol=2)
    fig.tight_layout()
    tmp = os.fspath(path) + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def summary_markdown(rows: Sequence[Row], title: str = "SWIM sweep", tolerance: float = 0.01) -> str:
    """A Markdown table of the points and, per method, the NWC needed to come
    within ``tolerance`` (a fraction: 0.01 = 1 point) of full write-verify."""
    levels = reference_levels(rows)
    lines = [f"# {title}", ""]
    lines.append(
        f"clean accuracy {100 * levels['clean']:.2f}%, no write-verify "
        f"{100 * levels['no_wv']:.2f}%, full write-verify {100 * levels['full_wv']:.2f}%")
    lines += ["", "| method | budget | NWC | NWC (cycles) | speed-up | acc mean (%) | std | sem | "
              "p1 | p5 | min | runs |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for method, pts in sorted(_by_method(rows).items()):
        for r in pts:
            cyc = r.get("nwc_cycles")
            cyc_s = f"{cyc:.4f}" if isinstance(cyc, (int, float)) else "-"
            sp = r.get("speedup")
            sp_s = f"{sp:.1f}" if isinstance(sp, (int, float)) else "inf"
            lines.append(
                f"| {method} | {r['budget']:g} | {r['nwc']:.4f} | {cyc_s} | {sp_s} | "
                f"{100 * r['acc_mean']:.2f} | {100 * r['acc_std']:.2f} | {100 * r['acc_sem']:.2f} | "
                f"{100 * r['acc_p1']:.2f} | {100 * r['acc_p5']:.2f} | {100 * r['acc_min']:.2f} | "
                f"{r['mc_runs']} |")
    target = levels["full_wv"] - tolerance
    lines += ["", f"## NWC needed to come within {100 * tolerance:g} point(s) of full write-verify "
              f"({100 * target:.2f}%)", "",
              "| method | smallest swept NWC | interpolated NWC | speed-up (interp.) |",
              "|---|---|---|---|"]
    for method, pts in sorted(_by_method(rows).items()):
        grid, interp = nwc_to_reach(pts, target) if np.isfinite(target) else (np.nan, np.nan)
        sp = 1.0 / interp if np.isfinite(interp) and interp > 0 else float("nan")
        fmt = (lambda x: f"{x:.4f}" if np.isfinite(x) else "not reached")
        lines.append(f"| {method} | {fmt(grid)} | {fmt(interp)} | "
                     f"{sp:.1f} |" if np.isfinite(sp) else f"| {method} | {fmt(grid)} | "
                     f"{fmt(interp)} | - |")
    return "\n".join(lines) + "\n"

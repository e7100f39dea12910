"""Reports of the experiments: plots and Markdown summaries.

Every function takes the rows of a results file (see :mod:`swimjax.results`);
accuracies are fractions in [0, 1]. The SWIM sweep
(:func:`plot_accuracy_vs_nwc`, as in SWIM's figures, and
:func:`summary_markdown`: rows with at least ``method``, ``budget``, ``nwc``,
``acc_mean``, ``acc_std``, ``acc_sem``, ``acc_p5`` and ``clean_acc``), beyond
SWIM (:func:`plot_beyond`), D-NAT (:func:`plot_dnat`,
:func:`dnat_summary_markdown`, :func:`dnat_seeds_markdown`), drift and faults
(:func:`plot_accuracy_vs_time`, :func:`plot_accuracy_vs_faults` and their
summaries) and the worst case (:func:`plot_worstcase`,
:func:`worstcase_summary_markdown`). Plots are written atomically.
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
    fig, ax = _figure((6.4, 4.4))
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
    ax.set_xlim(-0.02, 1.02)
    _finish(fig, ax, path, title, title_size=9, fontsize=7, loc="lower right", ncol=2)


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


# ----------------------------------------------------------------------------
# D-NAT: accuracy of each trained model on the ideal macro and under the
# error model (rows of swimjax.dnat: training, gradient, quantizer, clean_acc,
# acc_mean, acc_sem, acc_p5, float_acc)
# ----------------------------------------------------------------------------

def _dnat_label(r: Row) -> str:
    parts = [r["training"]]
    if r["gradient"] != "-":
        parts.append(r["gradient"])
    parts.append(r["quantizer"])
    return " / ".join(parts)


def plot_dnat(rows: Sequence[Row], path: str | os.PathLike, title: str = "") -> None:
    """Bars per trained model: ideal-macro accuracy and the mean (with its
    standard error) and 5th percentile under the error model."""
    rows = list(rows)
    fig, ax = _figure((max(6.0, 1.2 * len(rows) + 2), 4.5))
    xs = np.arange(len(rows))
    ax.bar(xs - 0.2, [100 * r["clean_acc"] for r in rows], 0.4, label="ideal macro")
    ax.bar(xs + 0.2, [100 * r["acc_mean"] for r in rows], 0.4,
           yerr=[100 * r["acc_sem"] for r in rows], label="under the error model (mean)")
    ax.plot(xs + 0.2, [100 * r["acc_p5"] for r in rows], "k_", ms=14,
            label="under the error model (5th pct)")
    if rows:
        ax.axhline(100 * rows[0]["float_acc"], color="gray", ls=":", label="floating point")
    ax.set_xticks(xs, [_dnat_label(r) for r in rows], rotation=20, ha="right")
    ax.set_ylim(0, 100)
    _finish(fig, ax, path, title, title_size=9, ylabel="test accuracy (%)", fontsize=8,
            loc="lower right")


def plot_beyond(rows: Sequence[Row], path: str | os.PathLike, title: str = "") -> None:
    """Beyond SWIM: accuracy (mean with +-sem bars; 1st percentile dotted)
    against NWC, log x, one curve per ``training/method`` combination; budget 0
    is drawn at a quarter of the smallest positive NWC."""
    pos = [r["nwc"] for r in rows if r["nwc"] > 0]
    floor = 0.25 * min(pos) if pos else 1e-3
    fig, ax = _figure((7.0, 4.6))
    groups: dict[str, list[Row]] = {}
    for r in rows:
        groups.setdefault(f"{r['training']}/{r['method']}", []).append(r)
    for i, (name, rs) in enumerate(sorted(groups.items())):
        rs = sorted(rs, key=lambda r: r["nwc"])
        x = np.array([max(r["nwc"], floor) for r in rs])
        ax.errorbar(x, [100 * r["acc_mean"] for r in rs], yerr=[100 * r["acc_sem"] for r in rs],
                    color=f"C{i}", marker="o", ms=3, label=name)
        ax.plot(x, [100 * r["acc_p1"] for r in rs], color=f"C{i}", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("NWC (fraction of weights write-verified; 0 at the left edge)")
    _finish(fig, ax, path, title, ylabel="accuracy (%) (dotted: 1st percentile)", fontsize=7)


def dnat_summary_markdown(rows: Sequence[Row], title: str = "D-NAT") -> str:
    """A Markdown table of the trained models, and the gaps the paper reports:
    each model's drop under the error model, and how far it stays from the
    quantization-aware model's ideal accuracy."""
    rows = list(rows)
    lines = [f"# {title}", ""]
    if rows:
        lines.append(f"floating-point accuracy {100 * rows[0]['float_acc']:.2f}%")
    qat = [r for r in rows if r["training"] == "qat"]
    upper = qat[0]["clean_acc"] if qat else None
    if upper is not None:
        lines.append(f"quantization-aware model on the ideal macro (the upper bound): "
                     f"{100 * upper:.2f}%")
    lines += ["", "| training | gradient | DAC bounds | ideal macro (%) | under the error model "
              "(%) | sem | p1 | p5 | gap to the upper bound (points) | training s |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gap = "-" if upper is None else f"{100 * (upper - r['acc_mean']):.2f}"
        lines.append(f"| {r['training']} | {r['gradient']} | {r['quantizer']} | "
                     f"{100 * r['clean_acc']:.2f} | {100 * r['acc_mean']:.2f} | "
                     f"{100 * r['acc_sem']:.2f} | {100 * r['acc_p1']:.2f} | "
                     f"{100 * r['acc_p5']:.2f} | {gap} | {r.get('train_seconds', 0):.1f} |")
    return "\n".join(lines) + "\n"


def _mean_se(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error (``std(ddof=1) / sqrt(n)``; 0 for one value)."""
    a = np.asarray(xs, np.float64)
    return float(a.mean()), float(a.std(ddof=1) / np.sqrt(a.size)) if a.size > 1 else 0.0


def dnat_seeds_markdown(rows: Sequence[Row], title: str = "D-NAT over seeds") -> str:
    """Rows of several seeds (each a full run: float model, table, training):
    per trained model the mean over seeds of the ideal-macro accuracy and of
    the accuracy under the error model, with standard errors over seeds, and
    the paired differences (same seed) the D-NAT paper compares: the
    statistical gradient against straight-through, E-PACT against fixed and
    one-sided PACT bounds, D-NAT against A-NAT and QAT, QAT's drop."""
    rows = list(rows)
    by: dict[tuple[str, str, str], dict[int, Row]] = {}
    for r in rows:
        by.setdefault((r["training"], r["gradient"], r["quantizer"]), {})[int(r["seed"])] = r
    seeds = sorted({int(r["seed"]) for r in rows})
    lines = [f"# {title}", "", f"seeds {seeds}; mean +- standard error over seeds (each "
             f"seed's accuracy under the error model is itself a Monte-Carlo mean)", "",
             "| training | gradient | DAC bounds | seeds | ideal macro (%) | under the error "
             "model (%) |", "|---|---|---|---|---|---|"]
    for (t, g, q), per in by.items():
        cm, cs = _mean_se([100 * r["clean_acc"] for r in per.values()])
        am, as_ = _mean_se([100 * r["acc_mean"] for r in per.values()])
        lines.append(f"| {t} | {g} | {q} | {len(per)} | {cm:.2f} +- {cs:.2f} | "
                     f"{am:.2f} +- {as_:.2f} |")
    qat = [k for k in by if k[0] == "qat"]
    dn = [k for k in by if k[0] == "dnat"]
    q0 = qat[0][2] if qat else (dn[0][2] if dn else None)
    g0 = dn[0][1] if dn else None
    pairs: list[tuple[str, tuple, str, tuple, str]] = []
    if qat:
        pairs.append(("QAT under the error model - QAT on the ideal macro (the drop)",
                      qat[0], "acc_mean", qat[0], "clean_acc"))
    pairs.append(("D-NAT statistical - straight-through", ("dnat", "statistical", q0),
                  "acc_mean", ("dnat", "ste", q0), "acc_mean"))
    for q in ("fixed", "pact"):
        if q != q0:
            pairs.append((f"D-NAT {q0} - {q} bounds", ("dnat", g0, q0), "acc_mean",
                          ("dnat", g0, q), "acc_mean"))
    pairs.append(("D-NAT - A-NAT (under the error model)", ("dnat", g0, q0), "acc_mean",
                  ("anat", g0, q0), "acc_mean"))
    if qat:
        pairs.append(("D-NAT under the error model - QAT on the ideal macro",
                      ("dnat", g0, q0), "acc_mean", qat[0], "clean_acc"))
    lines += ["", "| paired difference (same seeds) | seeds | points |", "|---|---|---|"]
    for label, a, fa, b, fb in pairs:
        common = sorted(set(by.get(a, {})) & set(by.get(b, {})))
        if not common:
            continue
        m, se = _mean_se([100 * (by[a][s][fa] - by[b][s][fb]) for s in common])
        lines.append(f"| {label} | {len(common)} | {m:+.2f} +- {se:.2f} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------
# Reliability experiments (swimjax.reliability): drift over time, stuck-at faults
# ----------------------------------------------------------------------------

_SCHEME_NAMES = {"none": "no write-verify", "swim": "SWIM", "full": "full write-verify"}


def _scheme_label(r: Row) -> str:
    name = _SCHEME_NAMES.get(r["scheme"], r["scheme"])
    if r["scheme"] == "swim":
        name += f" {100 * r['budget']:g} %"
    return name


def _figure(size: tuple[float, float]) -> tuple[Any, Any]:
    """A new off-screen figure of ``size`` inches (at 120 dpi) and its axes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt.subplots(figsize=size, dpi=120)


def _save(fig: Any, path: str | os.PathLike) -> None:
    """Writes the figure atomically (a temporary file, then a rename) and closes it."""
    import matplotlib.pyplot as plt
    tmp = os.fspath(path) + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def _finish(fig: Any, ax: Any, path: str | os.PathLike, title: str, *, title_size: float = 8,
            ylabel: str = "accuracy (%)", **legend: Any) -> None:
    """Accuracy axis label, grid, optional title and legend, then :func:`_save`."""
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=title_size)
    ax.legend(**legend)
    fig.tight_layout()
    _save(fig, path)


def _curves(rows: Sequence[Row], x_field: str, split_field: str | None
            ) -> dict[tuple[str, Any], list[Row]]:
    out: dict[tuple[str, Any], list[Row]] = {}
    for r in rows:
        out.setdefault((r["scheme"], r.get(split_field) if split_field else None), []).append(r)
    for k in out:
        out[k].sort(key=lambda r: r[x_field])
    order = {"none": 0, "swim": 1, "full": 2}
    return dict(sorted(out.items(), key=lambda kv: (order.get(kv[0][0], 9), str(kv[0][1]))))


def plot_accuracy_vs_time(rows: Sequence[Row], path: str | os.PathLike, title: str = "") -> None:
    """Writes a PNG: accuracy (mean solid with a +-std band, 1st percentile
    dotted) against the time after programming (log axis), one colour per
    write-verify scheme, compensated (thick) and uncompensated (thin, dashed)."""
    fig, ax = _figure((6.8, 4.6))
    colors = {"none": "tab:red", "swim": "tab:blue", "full": "tab:green"}
    for (scheme, comp), pts in _curves(rows, "t_seconds", "compensated").items():
        c = colors.get(scheme, "k")
        x = np.array([max(r["t_seconds"], 1e-3) for r in pts])
        mean = 100 * np.array([r["acc_mean"] for r in pts])
        std = 100 * np.array([r["acc_std"] for r in pts])
        p1 = 100 * np.array([r["acc_p1"] for r in pts])
        label = f"{_scheme_label(pts[0])}, {'compensated' if comp else 'uncompensated'}"
        ax.plot(x, mean, "o-" if comp else "s--", color=c, lw=1.8 if comp else 1.0, ms=3,
                label=label)
        ax.fill_between(x, mean - std, mean + std, color=c, alpha=0.10, lw=0)
        ax.plot(x, p1, ":", color=c, lw=0.8)
    ticks = [(1.0, "1 s"), (60.0, "1 min"), (3600.0, "1 h"), (86400.0, "1 day"),
             (2592000.0, "1 month"), (31536000.0, "1 year"), (315360000.0, "10 y")]
    ax.set_xscale("log")
    ax.set_xticks([t for t, _ in ticks], [n for _, n in ticks], fontsize=7)
    ax.set_xlabel("time after programming (dotted: 1st percentile)")
    _finish(fig, ax, path, title, fontsize=6.5, loc="lower left")


def plot_accuracy_vs_faults(rows: Sequence[Row], path: str | os.PathLike, title: str = ""
                            ) -> None:
    """Writes a PNG: accuracy (mean with a +-std band, 1st percentile dotted)
    against the percentage of stuck devices, one line per write-verify scheme."""
    fig, ax = _figure((6.4, 4.4))
    colors = {"none": "tab:red", "swim": "tab:blue", "full": "tab:green"}
    for (scheme, _), pts in _curves(rows, "p_stuck", None).items():
        c = colors.get(scheme, "k")
        x = 100 * np.array([r["p_stuck"] for r in pts])
        mean = 100 * np.array([r["acc_mean"] for r in pts])
        std = 100 * np.array([r["acc_std"] for r in pts])
        p1 = 100 * np.array([r["acc_p1"] for r in pts])
        ax.plot(x, mean, "o-", color=c, ms=3, label=_scheme_label(pts[0]))
        ax.fill_between(x, mean - std, mean + std, color=c, alpha=0.12, lw=0)
        ax.plot(x, p1, ":", color=c, lw=0.9)
    ax.set_xscale("symlog", linthresh=0.1)
    ax.set_xlabel("stuck devices (%; half at g_min, half at g_max; dotted: 1st percentile)")
    _finish(fig, ax, path, title, fontsize=7, loc="lower left")


def _pct(x: Any) -> str:
    return f"{100 * x:.2f}" if isinstance(x, (int, float)) else "-"


def _tail_header(rows: Sequence[Row]) -> tuple[str, str]:
    k = next((r.get("kpp") for r in rows if r.get("kpp") is not None), 1.0)
    thr = next((r.get("threshold") for r in rows if r.get("threshold") is not None), None)
    return f"KPP{k:g}", ("P(acc < " + (_pct(thr) + "%)" if thr is not None else "thr.)"))


def drift_summary_markdown(rows: Sequence[Row], title: str = "Drift",
                           preset_markdown: str = "") -> str:
    """A Markdown summary of a drift experiment: accuracy (mean, p1, p5, KPP,
    probability below the threshold) per scheme, compensation and time, and a
    compact table of the mean at every time."""
    kname, pname = _tail_header(rows)
    lines = [f"# {title}", ""]
    if rows:
        lines.append(f"clean accuracy {_pct(rows[0]['clean_acc'])}%")
    lines += ["", "| scheme | compensated | time | acc mean (%) | std | sem | p1 | p5 | "
              f"{kname} | {pname} | runs |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    curves = _curves(rows, "t_seconds", "compensated")
    for (_, comp), pts in curves.items():
        for r in pts:
            pb = r.get("p_below_threshold")
            lines.append(
                f"| {_scheme_label(r)} | {'yes' if comp else 'no'} | {r['t_label']} | "
                f"{_pct(r['acc_mean'])} | {_pct(r['acc_std'])} | {_pct(r['acc_sem'])} | "
                f"{_pct(r['acc_p1'])} | {_pct(r['acc_p5'])} | {_pct(r.get('acc_kpp'))} | "
                f"{'-' if pb is None else f'{pb:.2f}'} | {r['mc_runs']} |")
    times = sorted({r["t_seconds"] for r in rows})
    labels = {r["t_seconds"]: r["t_label"] for r in rows}
    lines += ["", "## Mean accuracy (%) against time (1st percentile in brackets)", "",
              "| scheme | compensated | " + " | ".join(labels[t] for t in times) + " |",
              "|---|---|" + "---|" * len(times)]
    for (_, comp), pts in curves.items():
        by_t = {r["t_seconds"]: r for r in pts}
        cells = [f"{_pct(by_t[t]['acc_mean'])} ({_pct(by_t[t]['acc_p1'])})" if t in by_t
                 else "-" for t in times]
        lines.append(f"| {_scheme_label(pts[0])} | {'yes' if comp else 'no'} | "
                      + " | ".join(cells) + " |")
    if preset_markdown:
        lines += ["", preset_markdown.rstrip()]
    return "\n".join(lines) + "\n"


def faults_summary_markdown(rows: Sequence[Row], title: str = "Stuck-at faults",
                            preset_markdown: str = "") -> str:
    """A Markdown summary of a stuck-at experiment: accuracy (mean, p1, p5,
    KPP, probability below the threshold), stuck and failed devices and
    measured write cycles per scheme and fault rate."""
    kname, pname = _tail_header(rows)
    lines = [f"# {title}", ""]
    if rows:
        r0 = rows[0]
        lines.append(f"clean accuracy {_pct(r0['clean_acc'])}%; explicit write-verify: "
                     f"tolerance {r0.get('wv_tolerance', float('nan')):.4f}, budget "
                     f"{r0.get('wv_max_pulses')} pulses; counts from one programming pass "
                     f"per point")
    lines += ["", "| scheme | stuck (%) | acc mean (%) | std | sem | p1 | p5 | "
              f"{kname} | {pname} | stuck devices | verified devices | failed devices | "
              "write cycles | NWC (cycles) | runs |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for _, pts in _curves(rows, "p_stuck", None).items():
        for r in pts:
            pb = r.get("p_below_threshold")
            nwc = r.get("nwc_cycles")
            lines.append(
                f"| {_scheme_label(r)} | {100 * r['p_stuck']:g} | {_pct(r['acc_mean'])} | "
                f"{_pct(r['acc_std'])} | {_pct(r['acc_sem'])} | {_pct(r['acc_p1'])} | "
                f"{_pct(r['acc_p5'])} | {_pct(r.get('acc_kpp'))} | "
                f"{'-' if pb is None else f'{pb:.2f}'} | {r.get('stuck_devices', '-')} | "
                f"{r.get('verified_devices', '-')} | {r.get('failed_devices', '-')} | "
                f"{r.get('total_cycles', '-')} | "
                f"{'-' if nwc is None else f'{nwc:.4f}'} | {r['mc_runs']} |")
    if preset_markdown:
        lines += ["", preset_markdown.rstrip()]
    return "\n".join(lines) + "\n"


def plot_worstcase(rows: Sequence[Row], path: str | os.PathLike, title: str = "") -> None:
    """Writes a PNG: accuracy against eps per mask -- the worst case, the best
    random corner, and the Monte-Carlo mean and 1st percentile at the matching
    sigma (rows of :func:`swimjax.worstcase.run_experiment`)."""
    fig, ax = _figure((6.4, 4.4))
    for i, m in enumerate(dict.fromkeys(r["mask"] for r in rows)):
        rs = [r for r in rows if r["mask"] == m]
        e = [r["eps"] for r in rs]
        label = "no write-verify" if m == "none" else f"SWIM {100 * rs[0]['budget']:g}% verified"
        col = f"C{i}"
        ax.plot(e, [100 * r["worst_acc"] for r in rs], "o-", color=col,
                label=f"worst case, {label}")
        ax.plot(e, [100 * r["mc_acc_p1"] for r in rs], "s--", color=col, ms=3,
                label=f"MC 1st pct, {label}")
        ax.plot(e, [100 * r["mc_acc_mean"] for r in rs], ":", color=col,
                label=f"MC mean, {label}")
        ax.plot(e, [100 * r["random_acc_min"] for r in rs], "x", color=col,
                label=f"best random corner, {label}")
    ax.set_xlabel("eps (bound on |dW| / max|W_layer|)")
    ax.set_ylim(-2, 102)
    _finish(fig, ax, path, title, fontsize=6, loc="lower left")


def worstcase_summary_markdown(rows: Sequence[Row], title: str, *, eps_verified: float,
                               tolerance: float, search: str) -> str:
    """A Markdown table of a worst-case experiment's rows.

    Args:
      eps_verified: the bound (fraction of max|W_layer|) on verified weights.
      tolerance: the write-verify tolerance (fraction of full scale) it comes from.
      search: a description of the search (method and its settings).
    """
    lines = [f"# {title}", "",
             f"Box |dW_i| <= eps_i max|W_layer|; verified weights (SWIM mask) bounded by "
             f"min(eps, {eps_verified:.4g}) (write-verify tolerance {tolerance:.4g} of full "
             f"scale). Monte-Carlo at the matching sigma: weight-error std = eps max|W| "
             f"(sigma_d = eps / c(N, m)); verified weights min(sigma_wv, sigma_d). "
             f"Search: {search}.", "",
             "| mask | eps | worst-case acc (%) | best random corner (%) | MC mean (%) | MC sem | "
             "MC p1 (%) | MC min (%) | clean (%) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['mask']} | {r['eps']:g} | {_pct(r['worst_acc'])} | "
            f"{_pct(r['random_acc_min'])} | {_pct(r['mc_acc_mean'])} | "
            f"{_pct(r['mc_acc_sem'])} | {_pct(r['mc_acc_p1'])} | "
            f"{_pct(r['mc_acc_min'])} | {_pct(r['clean_acc'])} |")
    return "\n".join(lines) + "\n"

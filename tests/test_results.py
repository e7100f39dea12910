"""Resumable results files and sweep reports."""

import json
import math
import os

import numpy as np
import pytest

from swimjax import report, results

KEYS = ("method", "budget", "sigma_d")


def _row(method, budget, acc, nwc=None, sigma_d=0.1):
    return dict(method=method, budget=budget, sigma_d=sigma_d, nwc=budget if nwc is None else nwc,
                speedup=(1 / budget if budget else None), mc_runs=10, acc_mean=acc, acc_std=0.01,
                acc_sem=0.003, acc_p1=acc - 0.03, acc_p5=acc - 0.02, acc_min=acc - 0.04,
                clean_acc=0.98)


def test_append_is_durable_and_resumable(tmp_path):
    path = tmp_path / "sub" / "results.jsonl"
    f = results.ResultsFile(path, KEYS)
    f.append(_row("swim", 0.1, 0.9))
    f.append(_row("swim", 0.2, 0.95))
    # A second writer (the rerun) sees both points, in order, and skips them.
    g = results.ResultsFile(path, KEYS)
    assert [r["budget"] for r in g.rows] == [0.1, 0.2]
    assert g.has(dict(method="swim", budget=0.1, sigma_d=0.1))
    # Float keys compare after canonicalization (0.1 + 0.2 vs 0.3).
    g.append(_row("swim", 0.1 + 0.2, 0.96))
    assert results.ResultsFile(path, KEYS).has(dict(method="swim", budget=0.3, sigma_d=0.1))
    # Another sigma is another point.
    assert not g.has(dict(method="swim", budget=0.1, sigma_d=0.2))
    with pytest.raises(ValueError, match="already"):
        g.append(_row("swim", 0.2, 0.5))


def test_torn_last_line_is_dropped_and_repaired(tmp_path):
    path = tmp_path / "results.jsonl"
    f = results.ResultsFile(path, KEYS)
    f.append(_row("swim", 0.1, 0.9))
    with open(path, "a") as fh:
        fh.write('{"method": "swim", "budget": 0.2, "acc_')  # killed mid-write
    g = results.ResultsFile(path, KEYS)
    assert len(g.rows) == 1
    g.append(_row("swim", 0.2, 0.95))
    lines = open(path).read().splitlines()
    assert len(lines) == 2 and all(json.loads(line) for line in lines)


def test_corrupt_middle_line_raises(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"method": "a", "budget": 0, "sigma_d": 0.1}\nnot json\n'
                    '{"method": "b", "budget": 0, "sigma_d": 0.1}\n')
    with pytest.raises(ValueError, match="line 2"):
        results.ResultsFile(path, KEYS)


def test_nan_becomes_null(tmp_path):
    path = tmp_path / "r.jsonl"
    f = results.ResultsFile(path, KEYS)
    f.append(dict(_row("swim", 0.0, 0.5), speedup=float("inf")))
    assert json.loads(path.read_text())["speedup"] is None


def test_missing_key_field():
    with pytest.raises(ValueError, match="budget"):
        results.point_key({"method": "swim"}, KEYS)


def test_nwc_to_reach_grid_and_interpolation():
    pts = [_row("m", b, a) for b, a in [(0.0, 0.80), (0.1, 0.90), (0.2, 0.96), (1.0, 0.97)]]
    grid, interp = report.nwc_to_reach(pts, 0.93)
    assert grid == 0.2
    assert math.isclose(interp, 0.1 + (0.93 - 0.90) / (0.96 - 0.90) * 0.1)
    assert report.nwc_to_reach(pts, 0.80) == (0.0, 0.0)
    assert all(np.isnan(report.nwc_to_reach(pts, 0.99)))


def test_summary_and_plot(tmp_path):
    rows = [_row(m, b, a) for m in ("swim", "magnitude")
            for b, a in [(0.0, 0.80), (0.1, 0.90 if m == "swim" else 0.85), (1.0, 0.97)]]
    md = report.summary_markdown(rows)
    assert "| swim | 0.1 |" in md and "full write-verify 97.00%" in md
    # swim reaches 96% (within 1 point of 97%) only at NWC 1 on this grid.
    assert "| swim | 1.0000 |" in md
    png = tmp_path / "acc.png"
    report.plot_accuracy_vs_nwc(rows, png, title="test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and os.path.getsize(png) > 10_000


def _is_png(path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) > 10_000


def test_reliability_worstcase_beyond_and_dnat_plots_and_tables(tmp_path):
    base = dict(acc_std=0.01, acc_p1=0.85, acc_sem=0.001, acc_p5=0.86, mc_runs=10)
    drift = [dict(base, scheme=s, budget=0.1, t_seconds=t, compensated=c, acc_mean=a)
             for s in ("none", "swim", "full") for c in (False, True)
             for t, a in [(1.0, 0.95), (3600.0, 0.9), (3e7, 0.8)]]
    faults = [dict(base, scheme=s, budget=0.1, p_stuck=p, acc_mean=0.9 - p)
              for s in ("none", "swim", "full") for p in (0.0, 0.001, 0.01)]
    worst = [dict(mask=m, budget=0.1, eps=e, worst_acc=0.9 - 5 * e, random_acc_min=0.95 - e,
                  mc_acc_mean=0.97 - e, mc_acc_sem=0.001, mc_acc_p1=0.96 - 2 * e,
                  mc_acc_min=0.95 - 3 * e, clean_acc=0.98)
             for m in ("none", "swim") for e in (0.0, 0.01, 0.03)]
    beyond = [dict(base, training=t, method="swim", nwc=n, acc_mean=0.9 + n / 20)
              for t in ("plain", "plain+sa") for n in (0.0, 0.02, 0.05, 1.0)]
    dnat = [dict(base, training=t, gradient=g, quantizer="epact", clean_acc=0.95,
                 acc_mean=0.5, float_acc=0.96) for t, g in (("qat", "-"), ("dnat", "ste"))]
    for plot, rows in [(report.plot_accuracy_vs_time, drift),
                       (report.plot_accuracy_vs_faults, faults),
                       (report.plot_worstcase, worst),
                       (report.plot_beyond, beyond),
                       (report.plot_dnat, dnat)]:
        png = tmp_path / f"{plot.__name__}.png"
        plot(rows, png, title="test")
        assert _is_png(png), plot.__name__
    assert not list(tmp_path.glob("*.tmp.png"))
    md = report.worstcase_summary_markdown(worst, "wc", eps_verified=0.0123, tolerance=0.01,
                                           search="pgd")
    assert "min(eps, 0.0123)" in md and "Search: pgd." in md
    assert "| swim | 0.03 | 75.00 | 92.00 | 94.00 | 0.10 | 90.00 | 86.00 | 98.00 |" in md

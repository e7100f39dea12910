"""The examples run: the scripts in examples/ and the README's library snippet."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--n_train", "400", "--n_test", "200", "--steps", "150", "--mc_runs", "20"]


def _run(script: str) -> str:
    out = subprocess.run([sys.executable, os.path.join(REPO, "examples", script), *SMALL],
                         cwd=REPO, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stdout


def _table(stdout: str) -> list[list[str]]:
    """The rows of the printed table that end in two accuracies (mean, p5)."""
    rows = []
    for line in stdout.splitlines():
        f = line.split()
        if len(f) >= 4 and all(re.fullmatch(r"[01]\.\d{4}", x) for x in f[-2:]):
            rows.append(f)
    return rows


@pytest.mark.slow
def test_flax_linen_example():
    rows = _table(_run("flax_linen.py"))
    assert len(rows) == 10  # 2 methods x 5 budgets
    acc = {(r[0], float(r[1])): (float(r[-2]), float(r[-1])) for r in rows}
    for mean, p5 in acc.values():
        assert 0.0 <= p5 <= mean <= 1.0
    # Budget 0 is the same state for both methods, and so is budget 1.
    assert acc["swim", 0.0] == acc["magnitude", 0.0]
    assert acc["swim", 1.0] == acc["magnitude", 1.0]
    # Write-verifying 10 % of the weights chosen by SWIM helps.
    assert acc["swim", 0.1][0] > acc["swim", 0.0][0]


@pytest.mark.slow
def test_plain_jax_example():
    rows = _table(_run("plain_jax.py"))
    assert len(rows) == 6  # 3 sigmas x (none, 10 %)
    means = [float(r[-2]) for r in rows]
    assert all(0.0 <= m <= 1.0 for m in means)
    # More device variation hurts; at the largest sigma a 10 % SWIM mask helps.
    assert means[4] < means[0]
    assert means[5] > means[4]


def _readme_snippet() -> str:
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        text = f.read()
    section = text[text.index("## The library"):]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert blocks, "README's 'The library' section has no python example"
    return blocks[0]


def test_readme_snippet_runs():
    """The README's snippet, as written, on a small flax linen model."""
    import flax.linen as nn
    import jax

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(10)(nn.relu(nn.Dense(32)(x.reshape((x.shape[0], -1)))))

    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 8, 8, 1)).astype(np.float32)
    y = rng.integers(0, 10, size=300)
    model = Model()
    params = model.init(jax.random.key(0), x[:1])["params"]
    code = _readme_snippet().replace("n_runs=1000", "n_runs=20")
    assert "n_runs=20" in code
    ns = {"model": model, "params": params, "x_train": x[:200], "y_train": y[:200],
          "x_test": x[200:], "y_test": y[200:]}
    exec(compile(code, "README.md", "exec"), ns)  # noqa: S102
    summary = ns["result"].summary
    assert summary.n_runs == 20
    assert 0.0 <= summary.p5 <= summary.mean <= 1.0
    # 10 % of the mapped weights are verified.
    mask_leaves = jax.tree.leaves(ns["mask"])
    n_mapped = sum(m.size for m in mask_leaves if m.ndim >= 2)
    assert abs(sum(int(m.sum()) for m in mask_leaves) - round(0.1 * n_mapped)) == 0

"""Tests of swimjax.selection: budgets, ties, structure, and the quadratic loss model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from swimjax import selection as sel
from swimjax import sensitivity as sens


def tree(seed, ints=False):
    """Two mapped kernels, one unmapped bias; integer-valued scores make many ties."""
    r = np.random.default_rng(seed)
    f = (lambda *s: r.integers(0, 4, s).astype(np.float32)) if ints else \
        (lambda *s: r.standard_normal(s).astype(np.float32))
    return {"conv": {"kernel": jnp.asarray(f(3, 3, 2, 4)), "bias": jnp.asarray(f(4))},
            "dense": {"kernel": jnp.asarray(f(10, 7))}}


N_MAPPED = 3 * 3 * 2 * 4 + 10 * 7  # 142


def count(mask):
    return sum(int(np.sum(m)) for m in jax.tree_util.tree_leaves(mask))


@pytest.mark.parametrize("budget,want", [(0.0, 0), (0.1, 14), (0.25, 36), (0.5, 71),
                                         (0.999, 142), (1.0, 142)])
def test_exact_counts_and_structure(budget, want):
    scores, params = tree(0, ints=True), tree(1)
    mask = sel.select(scores, budget, params=params)
    assert jax.tree_util.tree_structure(mask) == jax.tree_util.tree_structure(params)
    for m, p in zip(jax.tree_util.tree_leaves(mask), jax.tree_util.tree_leaves(params)):
        assert m.dtype == jnp.bool_ and m.shape == p.shape
    assert not np.any(mask["conv"]["bias"])            # unmapped: never verified
    assert count(mask) == want == int(np.floor(budget * N_MAPPED + 0.5))


def test_per_layer_budgets():
    scores, params = tree(2, ints=True), tree(3)
    mask = sel.select(scores, 0.3, params=params, per_layer=True)
    assert int(np.sum(mask["conv"]["kernel"])) == round(0.3 * 72)   # 21.6 -> 22
    assert int(np.sum(mask["dense"]["kernel"])) == 21                 # 21.0
    assert not np.any(mask["conv"]["bias"])
    # within each leaf the chosen weights are that leaf's most important
    for name in ("conv", "dense"):
        s, m = np.ravel(scores[name]["kernel"]), np.ravel(mask[name]["kernel"])
        assert s[m].min() >= s[~m].max()


def _reference_mask(imp, mag, k):
    order = np.lexsort((np.arange(imp.size), -mag, -imp))   # last key sorts first
    out = np.zeros(imp.size, bool)
    out[order[:k]] = True
    return out


@pytest.mark.parametrize("seed", [4, 5])
def test_global_threshold_and_tie_breaking_match_reference(seed):
    scores, params = tree(seed, ints=True), tree(seed + 10, ints=True)   # ties in both keys
    r = np.random.default_rng(seed)
    su = jax.tree_util.tree_map(lambda a: jnp.asarray(r.uniform(0.5, 1.5, a.shape),
                                                      jnp.float32), scores)
    sv = jax.tree_util.tree_map(lambda a: 0.3 * a, su)
    mask = sel.select(scores, 0.4, sigma_unverified=su, sigma_verified=sv, params=params)
    again = sel.select(scores, 0.4, sigma_unverified=su, sigma_verified=sv, params=params)
    keys = [("conv", "kernel"), ("dense", "kernel")]
    cat = lambda t: np.concatenate([np.ravel(np.asarray(t[a][b])) for a, b in keys])  # noqa
    imp = cat(scores) * (cat(su) ** 2 - cat(sv) ** 2)
    want = _reference_mask(imp.astype(np.float32), np.abs(cat(params)), round(0.4 * N_MAPPED))
    np.testing.assert_array_equal(cat(mask), want)
    np.testing.assert_array_equal(cat(mask), cat(again))


def test_ties_go_to_magnitude_then_index():
    scores = {"a": jnp.ones((2, 3)), "b": jnp.ones((2, 2))}
    params = {"a": jnp.array([[0.1, -0.9, 0.5], [0.3, 0.9, 0.2]]),
              "b": jnp.array([[0.9, 0.0], [0.4, -0.4]])}
    m = sel.select(scores, 0.3, params=params)   # 3 of 10: the three |w| = 0.9
    np.testing.assert_array_equal(m["a"], [[False, True, False], [False, True, False]])
    np.testing.assert_array_equal(m["b"], [[True, False], [False, False]])
    m = sel.select(scores, 0.2, params=params)   # 2 of 10: -0.9 (a[0,1]) and 0.9 (a[1,1])
    np.testing.assert_array_equal(m["a"], [[False, True, False], [False, True, False]])
    assert not np.any(m["b"])
    m = sel.select(scores, 0.3)                  # no params: lowest flat index
    np.testing.assert_array_equal(m["a"], [[True, True, True], [False, False, False]])
    # equal importance, -0.0 and +0.0 scores tie as well
    z = {"a": jnp.array([[0.0, -0.0, 0.0]]), "b": jnp.array([[-0.0, 0.0]])}
    m = sel.select(z, 0.4)
    np.testing.assert_array_equal(m["a"], [[True, True, False]])


def test_sigmas_change_the_choice():
    scores = {"a": jnp.full((4, 4), 2.0), "b": jnp.full((4, 4), 1.0)}
    m = sel.select(scores, 0.5)
    assert np.all(m["a"]) and not np.any(m["b"])
    # b's weights are 3x noisier: 1 * 9 > 2 * 1
    su = {"a": jnp.ones((4, 4)), "b": jnp.full((4, 4), 3.0)}
    m = sel.select(scores, 0.5, sigma_unverified=su)
    assert np.all(m["b"]) and not np.any(m["a"])
    # verifying does not help where sigma_verified == sigma_unverified
    m = sel.select(scores, 0.5, sigma_unverified=su, sigma_verified={"a": jnp.ones((4, 4)),
                                                                      "b": jnp.zeros((4, 4))})
    assert np.all(m["b"])


def test_selected_controls_the_mapped_leaves():
    scores = tree(6)
    selected = {"conv": {"kernel": False, "bias": True}, "dense": {"kernel": True}}
    m = sel.select(scores, 1.0, selected=selected)
    assert not np.any(m["conv"]["kernel"])
    assert np.all(m["conv"]["bias"]) and np.all(m["dense"]["kernel"])
    assert count(m) == 4 + 70


def test_predicted_loss_increase_formula_and_optimality():
    scores, params = tree(7), tree(8)
    scores = jax.tree_util.tree_map(jnp.abs, scores)
    su, sv = 0.2, 0.05
    mask = sel.select(scores, 0.3, sigma_unverified=su, sigma_verified=sv, params=params)
    got = float(sel.predicted_loss_increase(scores, mask, su, sv))
    want = 0.0
    for name in ("conv", "dense"):
        h, m = np.asarray(scores[name]["kernel"], np.float64), np.asarray(mask[name]["kernel"])
        want += 0.5 * np.sum(h * np.where(m, sv, su) ** 2)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # the selected mask has the smallest predicted increase of all masks of its size
    r = np.random.default_rng(0)
    k = count(mask)
    for _ in range(20):
        flat = np.zeros(N_MAPPED, bool)
        flat[r.choice(N_MAPPED, k, replace=False)] = True
        rand = {"conv": {"kernel": jnp.asarray(flat[:72].reshape(3, 3, 2, 4)),
                         "bias": jnp.zeros(4, bool)},
                "dense": {"kernel": jnp.asarray(flat[72:].reshape(10, 7))}}
        assert float(sel.predicted_loss_increase(scores, rand, su, sv)) >= got - 1e-6


def test_predicted_loss_ranks_masks_like_monte_carlo():
    """E[dL] ~ 1/2 sum h_ii sigma_i^2 orders masks as Monte-Carlo does on a small MLP."""
    r = np.random.default_rng(9)
    d, hdim, c, n = 6, 10, 4, 64
    params = {"w1": jnp.asarray(r.standard_normal((d, hdim)) / np.sqrt(d), jnp.float32),
              "b1": jnp.asarray(0.1 * r.standard_normal(hdim), jnp.float32),
              "w2": jnp.asarray(r.standard_normal((hdim, c)) / np.sqrt(hdim), jnp.float32),
              "b2": jnp.asarray(0.1 * r.standard_normal(c), jnp.float32)}
    x = jnp.asarray(r.standard_normal((n, d)), jnp.float32)
    y = jnp.asarray(r.integers(0, c, n), jnp.int32)

    def apply_fn(p, xx):
        return jnp.tanh(xx @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

    h = sens.hessian_diag(None, apply_fn, params, (x[None], y[None]))
    # weight-unit sigmas: 10% / 3% of each kernel's max |w|, biases exact
    scale = {k: float(jnp.max(jnp.abs(a))) if a.ndim >= 2 else 0.0 for k, a in params.items()}
    su = {k: jnp.full(a.shape, 0.1 * scale[k]) for k, a in params.items()}
    sv = {k: jnp.full(a.shape, 0.03 * scale[k]) for k, a in params.items()}

    masks = []
    for _ in range(10):   # random masks with random per-layer budgets
        masks.append({k: jnp.asarray(r.uniform(size=a.shape) < r.uniform(0.0, 1.0))
                      if a.ndim >= 2 else jnp.zeros(a.shape, bool) for k, a in params.items()})
    predicted = [float(sel.predicted_loss_increase(h, m, su, sv)) for m in masks]

    def mean_loss(p):
        return jnp.mean(sens.softmax_cross_entropy(apply_fn(p, x), y))

    n_mc = 4000
    eps = {k: jnp.asarray(r.standard_normal((n_mc,) + a.shape), jnp.float32)
           for k, a in params.items()}

    @jax.jit
    def mc(mask):
        sig = {k: jnp.where(mask[k], sv[k], su[k]) for k in params}

        def one(e):   # antithetic pair: cancels the first-order term exactly
            dp = {k: sig[k] * e[k] for k in params}
            plus = mean_loss({k: params[k] + dp[k] for k in params})
            minus = mean_loss({k: params[k] - dp[k] for k in params})
            return 0.5 * (plus + minus) - mean_loss(params)

        vals = jax.vmap(one)(eps)
        return jnp.mean(vals), jnp.std(vals) / np.sqrt(n_mc)

    out = [mc(m) for m in masks]   # common random numbers across masks
    measured = [float(o[0]) for o in out]
    rho = stats.spearmanr(predicted, measured).statistic
    assert rho >= 0.8, (rho, predicted, measured)
    # and the absolute level agrees: small sigma, quadratic regime
    np.testing.assert_allclose(measured, predicted, rtol=0.25)


@pytest.mark.parametrize("scale", ["per_tensor", "per_channel"])
def test_magnitude_baseline_selects_swims_relative_magnitudes(scale):
    """SWIM's magnitude baseline: rank |w| / max|W_layer| globally (the reference
    normalizes every layer, then takes one threshold over all of them)."""
    r = np.random.default_rng(11)
    params = {"big": {"kernel": jnp.asarray(100.0 * r.standard_normal((8, 6)), jnp.float32),
                      "bias": jnp.asarray(r.standard_normal(6), jnp.float32)},
              "small": {"kernel": jnp.asarray(0.01 * r.standard_normal((6, 5)), jnp.float32)}}
    kernels = [np.asarray(params[k]["kernel"], np.float64) for k in ("big", "small")]
    axes = lambda w: tuple(range(w.ndim - 1)) if scale == "per_channel" else None  # noqa: E731
    rel = np.concatenate([(np.abs(w) / np.abs(w).max(axis=axes(w), keepdims=True)).ravel()
                          for w in kernels])
    n = rel.size                                           # 78
    scores = sens.magnitude(params=params, scale=scale)
    for budget in (0.2, 0.5, 0.8):   # cuts outside the tied block of per-channel maxima (1.0)
        k = int(np.floor(budget * n + 0.5))
        want = np.zeros(n, bool)
        want[np.argsort(-rel, kind="stable")[:k]] = True
        mask = sel.select(scores, budget, params=params)   # baselines: sigma 1 and 0
        got = np.concatenate([np.ravel(mask[k2]["kernel"]) for k2 in ("big", "small")])
        np.testing.assert_array_equal(got, want, err_msg=str(budget))
        assert 0 < np.sum(mask["small"]["kernel"]) < mask["small"]["kernel"].size
    # raw |w| across layers: the large-scale layer takes the whole budget
    raw = sel.select(sens.magnitude_raw(params=params), 0.5, params=params)
    assert not np.any(raw["small"]["kernel"]) and int(np.sum(raw["big"]["kernel"])) == 39


def test_negative_scores_rank_last_and_are_not_folded():
    # signed estimators (hutchinson) may give h < 0: ranked as is, lowest last
    scores = {"a": jnp.asarray([[-5.0, 1.0], [0.5, -0.1]]), "b": jnp.asarray([[2.0, -3.0]])}
    m = sel.select(scores, 0.5)                    # 3 of 6
    np.testing.assert_array_equal(m["a"], [[False, True], [True, False]])
    np.testing.assert_array_equal(m["b"], [[True, False]])
    m = sel.select(scores, 5 / 6)                  # then -0.1, then -3.0; -5.0 last
    np.testing.assert_array_equal(m["a"], [[False, True], [True, True]])
    np.testing.assert_array_equal(m["b"], [[True, True]])


@pytest.mark.parametrize("budget", [-0.01, 1.01, float("nan"), "half", "0.5", True,
                                    np.bool_(False), [0.5]])
def test_budget_outside_range_raises(budget):
    with pytest.raises(ValueError, match=r"budget must be"):
        sel.select(tree(0), budget)


def test_bad_structures_raise():
    scores, params = tree(0), tree(1)
    with pytest.raises(ValueError, match="scores must have the same pytree structure"):
        sel.select({"conv": scores["conv"]}, 0.5, params=params)
    with pytest.raises(ValueError, match=r"scores\['dense'\]\['kernel'\] must have shape"):
        sel.select({**scores, "dense": {"kernel": jnp.ones((7, 10))}}, 0.5, params=params)
    with pytest.raises(ValueError, match="sigma_unverified must be"):
        sel.select(scores, 0.5, sigma_unverified=-1.0)
    for bad in (float("nan"), float("inf"), True, np.bool_(True), "0.1"):
        with pytest.raises(ValueError, match="sigma_unverified must be"):
            sel.select(scores, 0.5, sigma_unverified=bad)
    with pytest.raises(ValueError, match=r"sigma_verified\['dense'\]\['kernel'\] must be finite"):
        sel.select(scores, 0.5, sigma_verified={"conv": {"kernel": jnp.ones((3, 3, 2, 4)),
                                                         "bias": jnp.ones(4)},
                                                "dense": {"kernel": jnp.full((10, 7), jnp.nan,
                                                                             jnp.bfloat16)}})
    with pytest.raises(ValueError, match=r"sigma_unverified\['conv'\]\['bias'\] must be real"):
        sel.select(scores, 0.5, sigma_unverified=sel.select(scores, 0.5))   # a mask, by mistake
    with pytest.raises(ValueError, match="sigma_verified"):
        sel.select(scores, 0.5, sigma_verified={"conv": scores["conv"]})
    with pytest.raises(ValueError, match="selected"):
        sel.select(scores, 0.5, selected={"conv": {"kernel": 1, "bias": 0},
                                          "dense": {"kernel": True}})
    with pytest.raises(ValueError, match="must be finite"):
        sel.select({**scores, "dense": {"kernel": jnp.full((10, 7), jnp.nan)}}, 0.5)
    with pytest.raises(ValueError, match="mask"):
        sel.predicted_loss_increase(scores, {"conv": scores["conv"]}, 1.0, 0.0)

"""Tests for swimjax.perturbation: SWIM's weight-error model.

The statistical tests compare the empirical std of dW over >= 1e5 draws with
``s c(N, m) sigma`` within 6 standard errors of a sample std, ``sd / sqrt(2 n)``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from swimjax import mapping
from swimjax import perturbation as pt
from swimjax.perturbation import VariationConfig

import _rand  # jax.random draws made flat: the same values, compiled fast

Z = 6.0
N_DRAWS = 200_000


# ---------------------------------------------------------------------------
# std_factor and config
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("n, m, norm, expected", [
    (8, 1, "levels", 0.5796), (8, 2, "levels", 0.7776),
    (8, 1, "swim", 0.5773), (8, 2, "swim", 0.7746),
])
def test_std_factor_published_values(n, m, norm, expected):
    assert pt.std_factor(n, m, norm) == pytest.approx(expected, abs=5e-5)


@pytest.mark.parametrize("n, m", [(8, 1), (8, 2), (7, 2), (5, 3), (6, 6), (12, 5)])
def test_std_factor_closed_forms(n, m):
    k = math.ceil(n / m)
    lv = (2 ** m - 1) * math.sqrt(sum(4 ** (m * j) for j in range(k))) / (2 ** n - 1)
    sw = (2 ** m - 1) * math.sqrt(sum(4.0 ** (-i * m) for i in range(1, k + 1)))
    assert pt.std_factor(n, m) == pytest.approx(lv, rel=1e-12)
    assert pt.std_factor(n, m, "swim") == pytest.approx(sw, rel=1e-12)
    # the two differ only by the read-out grid: (2^N - 1) / 2^{mK}
    assert sw / lv == pytest.approx((2 ** n - 1) / 2 ** (m * k), rel=1e-12)
    # m = N: one device holds the weight; its full scale is the weight's
    assert pt.std_factor(m, m) == pytest.approx(1.0)


def test_std_factor_swim_is_levels_limit():
    assert pt.std_factor(24, 1) == pytest.approx(1 / math.sqrt(3), rel=1e-6)


@pytest.mark.parametrize("args, name", [
    ((0, 1), "weight_bits"), ((8, 0), "device_bits"), ((4, 5), "device_bits"),
    ((8.0, 1), "weight_bits"),
])
def test_std_factor_rejects_bits(args, name):
    with pytest.raises(ValueError, match=name):
        pt.std_factor(*args)
    with pytest.raises(ValueError, match="normalization"):
        pt.std_factor(8, 1, "aihwkit")


@pytest.mark.parametrize("kwargs, name", [
    (dict(sigma_d=-0.1), "sigma_d"),
    (dict(sigma_d=float("nan")), "sigma_d"),
    (dict(sigma_wv=-0.03), "sigma_wv"),
    (dict(sigma_wv=float("nan")), "sigma_wv"),
    (dict(sigma_d=float("inf")), "sigma_d"),
    (dict(weight_bits=0), "weight_bits"),
    (dict(weight_bits=4, device_bits=5), "device_bits"),
    (dict(device_bits=0), "device_bits"),
    (dict(normalization="exact"), "normalization"),
    (dict(scale="per_row"), "scale"),
    (dict(quantize="yes"), "quantize"),
    (dict(nonuniform_factor=0.0), "nonuniform_factor"),
    (dict(nonuniform_factor=float("nan")), "nonuniform_factor"),
    (dict(nonuniform_band=(0.75, 0.25)), "nonuniform_band"),
    (dict(nonuniform_band=(-0.1, 0.5)), r"nonuniform_band\[0\]"),
    (dict(nonuniform_weight=1.5), "nonuniform_weight"),
])
def test_variation_config_rejects(kwargs, name):
    with pytest.raises(ValueError, match=name):
        VariationConfig(**kwargs)


def test_variation_config_defaults():
    cfg = VariationConfig()
    assert (cfg.sigma_d, cfg.sigma_wv, cfg.weight_bits, cfg.device_bits) == (0.1, 0.03, 8, 1)
    assert cfg.normalization == "levels" and cfg.std_factor == pytest.approx(0.5796, abs=5e-5)
    assert cfg.nonuniform_renorm == 1.0
    assert VariationConfig(nonuniform_factor=4.0).nonuniform_renorm == pytest.approx(
        1 / math.sqrt(0.4 * 16 + 0.6))
    hash(cfg)


# ---------------------------------------------------------------------------
# weight_sigmas
# ---------------------------------------------------------------------------

def _params():
    k = jax.random.split(jax.random.key(0), 3)
    return {"conv": {"kernel": _rand.normal(k[0], (3, 3, 2, 4)), "bias": jnp.ones((4,))},
            "dense": {"kernel": 2.0 * jax.random.normal(k[1], (10, 5)), "bias": jnp.zeros((5,))}}


def test_weight_sigmas_values():
    p = _params()
    cfg = VariationConfig(sigma_d=0.2, sigma_wv=0.02, weight_bits=8, device_bits=2)
    su, sv = pt.weight_sigmas(p, cfg)
    c = pt.std_factor(8, 2)
    for name in ("conv", "dense"):
        s = float(jnp.abs(p[name]["kernel"]).max())
        np.testing.assert_allclose(np.asarray(su[name]["kernel"]), 0.2 * s * c, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(sv[name]["kernel"]), 0.02 * s * c, rtol=1e-6)
        assert np.all(np.asarray(su[name]["bias"]) == 0.0)
        assert np.all(np.asarray(sv[name]["bias"]) == 0.0)
        assert su[name]["kernel"].shape == p[name]["kernel"].shape


def test_weight_sigmas_per_channel():
    w = jnp.array([[1.0, -0.5], [-2.0, 0.25]])
    su, _ = pt.weight_sigmas({"k": w}, VariationConfig(scale="per_channel"))
    c = pt.std_factor(8, 1)
    np.testing.assert_allclose(np.asarray(su["k"]), 0.1 * c * np.array([[2.0, 0.5], [2.0, 0.5]]),
                               rtol=1e-6)


def test_weight_sigmas_nonuniform_band():
    w = jnp.array([[1.0, 0.8, 0.75, 0.5], [0.3, 0.25, 0.1, -0.6]])   # s = 1
    cfg = VariationConfig(nonuniform_factor=4.0)
    su, _ = pt.weight_sigmas({"k": w}, cfg)
    r = 1 / math.sqrt(0.4 * 16 + 0.6)
    band = np.array([[0, 0, 0, 1], [1, 0, 0, 1]], bool)               # 0.25 < |w| < 0.75
    expected = 0.1 * pt.std_factor(8, 1) * np.where(band, 4.0 * r, r)
    np.testing.assert_allclose(np.asarray(su["k"]), expected, rtol=1e-6)


def test_weight_sigmas_custom_selection_and_zero_tensor():
    p = {"a": jnp.zeros((4, 4)), "b": jnp.ones((3, 3))}
    su, _ = pt.weight_sigmas(p, VariationConfig(), {"a": True, "b": False})
    assert np.all(np.asarray(su["a"]) == 0.0) and not np.any(np.isnan(np.asarray(su["a"])))
    assert np.all(np.asarray(su["b"]) == 0.0)


# ---------------------------------------------------------------------------
# Statistics of dW: model path and device path against s c sigma
# ---------------------------------------------------------------------------

def _std_ok(dw, expected, n):
    dw = np.asarray(dw, np.float64).ravel()
    assert abs(dw.mean()) <= Z * expected / math.sqrt(n), (dw.mean(), expected)
    assert abs(dw.std() - expected) <= Z * expected / math.sqrt(2 * n), (dw.std(), expected)


CASES = [
    (8, 1, 0.1, "levels"), (8, 2, 0.3, "levels"), (7, 2, 0.05, "levels"),   # 7 not divisible by 2
    (6, 4, 0.2, "levels"), (8, 1, 0.1, "swim"), (5, 2, 0.2, "swim"),
]


@pytest.mark.parametrize("n, m, sigma, norm", CASES)
def test_dw_std_matches_closed_form_both_paths(n, m, sigma, norm):
    cfg = VariationConfig(sigma_d=sigma, sigma_wv=sigma / 10, weight_bits=n, device_bits=m,
                          normalization=norm)
    w = jax.random.uniform(jax.random.key(1), (N_DRAWS // 100, 100), minval=-1.5, maxval=1.5)
    s = float(jnp.abs(w).max())
    half = jnp.arange(w.shape[0])[:, None] < w.shape[0] // 2
    mask = {"k": jnp.broadcast_to(half, w.shape)}
    params = {"k": w}
    c = pt.std_factor(n, m, norm)
    n_half = w.size // 2
    model = np.asarray(pt.perturb(jax.random.key(2), params, mask, cfg)["k"] - w)
    ref = np.asarray(pt.perturb_via_devices(jax.random.key(3), params, mask, cfg)["k"]
                     - mapping.quantize(w, cfg.mapping_config))
    for dw in (model, ref):
        verified, unverified = dw[: w.shape[0] // 2], dw[w.shape[0] // 2:]
        _std_ok(unverified, s * c * sigma, n_half)
        _std_ok(verified, s * c * sigma / 10, n_half)


def test_dw_std_nonuniform_both_paths():
    cfg = VariationConfig(sigma_d=0.2, weight_bits=8, device_bits=2, nonuniform_factor=6.0)
    w = jax.random.uniform(jax.random.key(4), (N_DRAWS,), minval=-1.0, maxval=1.0)
    w = w.at[0].set(1.0).reshape(1000, -1)                           # s = 1
    in_band = np.asarray((jnp.abs(w) > 0.25) & (jnp.abs(w) < 0.75))
    base = 0.2 * pt.std_factor(8, 2) / math.sqrt(0.4 * 36 + 0.6)
    model = np.asarray(pt.perturb(jax.random.key(5), {"k": w}, None, cfg)["k"] - w)
    ref = np.asarray(pt.perturb_via_devices(jax.random.key(6), {"k": w}, None, cfg)["k"]
                     - mapping.quantize(w, cfg.mapping_config))
    for dw in (model, ref):
        _std_ok(dw[in_band], 6.0 * base, int(in_band.sum()))
        _std_ok(dw[~in_band], base, int((~in_band).sum()))


def test_dw_std_per_channel():
    cfg = VariationConfig(sigma_d=0.1, device_bits=2, scale="per_channel")
    scales = jnp.array([0.5, 1.0, 4.0, 10.0])
    w = jax.random.uniform(jax.random.key(7), (50_000, 4), minval=-1.0, maxval=1.0) * scales
    dw = np.asarray(pt.perturb(jax.random.key(8), {"k": w}, None, cfg)["k"] - w)
    s = np.asarray(jnp.abs(w).max(axis=0))
    for j in range(4):
        _std_ok(dw[:, j], s[j] * pt.std_factor(8, 2) * 0.1, w.shape[0])


# ---------------------------------------------------------------------------
# Behaviour: unmapped leaves, quantization, keys, jit/vmap
# ---------------------------------------------------------------------------

def test_unmapped_leaves_untouched_and_dtypes_kept():
    p = _params()
    p["count"] = jnp.arange(6, dtype=jnp.int32).reshape(2, 3)      # int leaf, rank 2: digital
    out = pt.perturb(jax.random.key(9), p, None, VariationConfig())
    assert out["conv"]["bias"] is p["conv"]["bias"]
    assert out["count"] is p["count"]
    assert out["dense"]["kernel"].dtype == p["dense"]["kernel"].dtype
    assert not np.array_equal(np.asarray(out["dense"]["kernel"]), np.asarray(p["dense"]["kernel"]))


def test_quantize_first():
    p = _params()
    cfg = VariationConfig(sigma_d=0.0, sigma_wv=0.0, weight_bits=4, device_bits=2, quantize=True)
    out = pt.perturb(jax.random.key(10), p, None, cfg)
    q = mapping.quantize_params(p, cfg.mapping_config)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(q)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # with quantize=False and zero sigma the weights come back unchanged
    out2 = pt.perturb(jax.random.key(10), p, None, VariationConfig(sigma_d=0.0, sigma_wv=0.0))
    for a, b in zip(jax.tree.leaves(out2), jax.tree.leaves(p)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_per_leaf_keys_independent_of_other_leaves():
    p = _params()
    cfg = VariationConfig()
    m0 = jax.tree.map(lambda x: jnp.zeros(x.shape, bool), p)
    m1 = dict(m0, conv=dict(m0["conv"], kernel=jnp.ones(p["conv"]["kernel"].shape, bool)))
    a = pt.perturb(jax.random.key(11), p, m0, cfg)
    b = pt.perturb(jax.random.key(11), p, m1, cfg)

    def dense(tree):
        return np.asarray(tree["dense"]["kernel"])

    def conv(tree):
        return np.asarray(tree["conv"]["kernel"])

    # changing the conv mask (or its values) leaves the dense noise untouched
    np.testing.assert_array_equal(dense(a), dense(b))
    p2 = dict(p, conv=dict(p["conv"], kernel=p["conv"]["kernel"] * 3))
    np.testing.assert_array_equal(dense(a), dense(pt.perturb(jax.random.key(11), p2, m0, cfg)))
    # same key -> same result; another key -> another
    np.testing.assert_array_equal(conv(a), conv(pt.perturb(jax.random.key(11), p, m0, cfg)))
    assert not np.array_equal(conv(a), conv(pt.perturb(jax.random.key(12), p, m0, cfg)))
    # verified weights (same eps) are scaled by sigma_wv / sigma_d
    dw_a = np.asarray(a["conv"]["kernel"] - p["conv"]["kernel"])
    dw_b = np.asarray(b["conv"]["kernel"] - p["conv"]["kernel"])
    np.testing.assert_allclose(dw_b, dw_a * 0.3, rtol=1e-4, atol=1e-7)


def test_statistical_perturbation_jit_vmap():
    """init/apply give what perturb gives; apply jits and vmaps over keys and
    over stacked states (masks and sigmas as data)."""
    p = _params()
    cfg = VariationConfig(sigma_d=0.2, device_bits=2)
    mask = jax.tree.map(lambda x: _rand.bernoulli(jax.random.key(13), 0.3, x.shape), p)
    pert = pt.statistical(cfg)
    state = pert.init(p, mask)
    assert isinstance(state, pt.VariationState)
    key = jax.random.key(14)
    direct = pt.perturb(key, p, mask, cfg)
    jitted = jax.jit(pert.apply)(key, p, state)
    for a, b in zip(jax.tree.leaves(direct), jax.tree.leaves(jitted)):  # jit: ulps (FMA)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    keys = jax.random.split(jax.random.key(15), 4)
    batch = jax.jit(jax.vmap(pert.apply, in_axes=(0, None, None)))(keys, p, state)
    assert batch["dense"]["kernel"].shape == (4,) + p["dense"]["kernel"].shape
    one = jax.jit(pert.apply)(keys[2], p, state)
    np.testing.assert_array_equal(np.asarray(batch["dense"]["kernel"][2]),
                                  np.asarray(one["dense"]["kernel"]))
    # a sigma sweep as stacked states: each equals perturb with that sigma
    sigmas = (0.1, 0.3)
    stacked = jax.tree.map(lambda *a: jnp.stack(a),
                           *[pert.init(p, mask, sigma_d=s) for s in sigmas])
    swept = jax.jit(jax.vmap(pert.apply, in_axes=(None, None, 0)))(key, p, stacked)
    for i, s in enumerate(sigmas):
        ref = pt.perturb(key, p, mask, dataclasses.replace(cfg, sigma_d=s))
        np.testing.assert_allclose(np.asarray(swept["conv"]["kernel"][i]),
                                   np.asarray(ref["conv"]["kernel"]), rtol=1e-6, atol=1e-7)
    # no mask = nothing verified
    np.testing.assert_array_equal(
        np.asarray(pert.apply(key, p, pert.init(p))["conv"]["kernel"]),
        np.asarray(pt.perturb(key, p, None, cfg)["conv"]["kernel"]))


def test_gaussian_perturbation_matches_statistical_with_its_sigmas():
    p = _params()
    cfg = VariationConfig(sigma_d=0.2, sigma_wv=0.05)
    mask = jax.tree.map(lambda x: _rand.bernoulli(jax.random.key(3), 0.5, x.shape), p)
    su, sv = pt.weight_sigmas(p, cfg)
    sig = jax.tree.map(lambda m, a, b: jnp.where(m, b, a), mask, su, sv)
    g = pt.gaussian()
    key = jax.random.key(4)
    out = g.apply(key, p, g.init(p, sig))
    ref = pt.perturb(key, p, mask, cfg)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    bad = jax.tree.map(lambda s: -s, sig)
    bad["dense"]["bias"] = sig["dense"]["bias"]
    with pytest.raises(ValueError, match=r"sigmas\['conv'\]\['kernel'\] must be >= 0"):
        g.init(p, bad)
    with pytest.raises(ValueError, match="sigmas"):
        g.init(p, {"conv": sig["conv"]})


def test_statistical_state_checked():
    p = _params()
    pert = pt.statistical(VariationConfig())
    with pytest.raises(ValueError, match="sigma_d must be"):
        pert.init(p, sigma_d=-0.1)
    with pytest.raises(ValueError, match="sigma_wv must be"):
        pert.init(p, sigma_wv=float("nan"))
    with pytest.raises(ValueError, match="sigma_d must be a scalar"):
        pert.init(p, sigma_d=np.ones(3))
    with pytest.raises(ValueError, match="state must be the VariationState"):
        pert.apply(jax.random.key(0), p, {"mask": None})
    with pytest.raises(ValueError, match="cfg"):
        pt.statistical(mapping.MappingConfig())


def test_bfloat16_leaf_dtype_kept():
    p = {"k": jax.random.normal(jax.random.key(16), (8, 8)).astype(jnp.bfloat16)}
    out = pt.perturb(jax.random.key(17), p, None, VariationConfig())
    assert out["k"].dtype == jnp.bfloat16
    ref = pt.perturb_via_devices(jax.random.key(17), p, None, VariationConfig())
    assert ref["k"].dtype == jnp.bfloat16


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------

def test_mask_structure_mismatch_rejected():
    p = _params()
    bad = {"conv": {"kernel": jnp.ones((3, 3, 2, 4), bool)},
           "dense": {"kernel": jnp.ones((10, 5), bool), "bias": jnp.ones((5,), bool)}}
    for f in (lambda: pt.perturb(jax.random.key(0), p, bad, VariationConfig()),
              lambda: pt.perturb_via_devices(jax.random.key(0), p, bad, VariationConfig()),
              lambda: pt.statistical(VariationConfig()).init(p, bad)):
        with pytest.raises(ValueError, match="mask"):
            f()


def test_mask_shape_mismatch_rejected():
    p = _params()
    bad = jax.tree.map(lambda x: jnp.ones(x.shape, bool), p)
    bad["dense"]["kernel"] = jnp.ones((5, 10), bool)
    with pytest.raises(ValueError, match=r"mask\['dense'\]\['kernel'\] must have shape \(10, 5\)"):
        pt.perturb(jax.random.key(0), p, bad, VariationConfig())
    pert = pt.statistical(VariationConfig())
    state = pert.init(p)._replace(mask=bad)
    with pytest.raises(ValueError, match="mask"):
        jax.jit(pert.apply)(jax.random.key(0), p, state)


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_rejected(bad_value):
    p = _params()
    p["dense"]["kernel"] = p["dense"]["kernel"].at[2, 3].set(bad_value)
    with pytest.raises(ValueError, match=r"params\['dense'\]\['kernel'\] must be finite"):
        pt.perturb(jax.random.key(0), p, None, VariationConfig())
    with pytest.raises(ValueError, match="finite"):
        pt.statistical(VariationConfig()).init(p)
    with pytest.raises(ValueError, match="finite"):
        pt.validate(p, None, VariationConfig())


def test_bad_config_and_selection_rejected():
    p = _params()
    with pytest.raises(ValueError, match="cfg"):
        pt.perturb(jax.random.key(0), p, None, {"sigma_d": 0.1})
    with pytest.raises(ValueError, match="selected"):
        pt.perturb(jax.random.key(0), p, None, VariationConfig(), {"conv": True})
    with pytest.raises(ValueError, match="selected"):
        pt.weight_sigmas(p, VariationConfig(), {"conv": True})

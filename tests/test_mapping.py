"""Tests for swimjax.mapping: quantization, bit slicing, exact round trip."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st, HealthCheck

from swimjax import mapping
from swimjax.mapping import MappingConfig, MappedTensor

import _rand  # jax.random draws made flat: the same values, compiled fast


# ---------------------------------------------------------------------------
# Config validation
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, name", [
    (dict(weight_bits=0), "weight_bits"),
    (dict(weight_bits=-3), "weight_bits"),
    (dict(weight_bits=25), "weight_bits"),
    (dict(weight_bits=8.0), "weight_bits"),
    (dict(weight_bits=True), "weight_bits"),
    (dict(device_bits=0), "device_bits"),
    (dict(weight_bits=4, device_bits=5), "device_bits"),
    (dict(weight_bits=20, device_bits=17), "device_bits"),
    (dict(scale="per_row"), "scale"),
    (dict(sign="twos_complement"), "sign"),
])
def test_config_rejects_bad_values(kwargs, name):
    with pytest.raises(ValueError, match=name):
        MappingConfig(**kwargs)


def test_config_range_in_message():
    with pytest.raises(ValueError, match=r"device_bits.*\[1, 4\]"):
        MappingConfig(weight_bits=4, device_bits=5)


@pytest.mark.parametrize("n, m, k", [(8, 1, 8), (8, 2, 4), (8, 3, 3), (7, 2, 4), (5, 5, 1),
                                     (1, 1, 1), (24, 7, 4), (24, 16, 2)])
def test_n_slices(n, m, k):
    cfg = MappingConfig(weight_bits=n, device_bits=m, sign="differential")
    assert cfg.n_slices == k == math.ceil(n / m)
    assert cfg.devices_per_weight == 2 * k
    assert MappingConfig(n, m, sign="sign_bit").devices_per_weight == k


def test_defaults_are_swims_reference_mapping():
    # N = 8, m = 1, sign bit: the mapping of perturbation.VariationConfig's
    # defaults, so device paths and the statistical model describe one array.
    from swimjax import perturbation
    cfg = MappingConfig()
    assert (cfg.weight_bits, cfg.device_bits, cfg.scale, cfg.sign) == (
        8, 1, "per_tensor", "sign_bit")
    assert cfg == perturbation.VariationConfig().mapping_config
    assert cfg.devices_per_weight == 8


def test_config_is_frozen_and_hashable():
    cfg = MappingConfig()
    with pytest.raises(Exception):
        cfg.weight_bits = 4  # type: ignore[misc]
    assert hash(cfg) == hash(MappingConfig())


# ---------------------------------------------------------------------------
# Worked example
# ---------------------------------------------------------------------------

def test_worked_example_differential():
    # N=4, m=2 -> K=2; s=1; q = round(15 |w|) = 15, 8 (7.5 rounds half to even), 4, 0
    w = jnp.array([[1.0, -0.5], [0.25, 0.0]])
    cfg = MappingConfig(weight_bits=4, device_bits=2, sign="differential")
    mt = mapping.to_conductances(w, cfg)
    assert mt.g.shape == (2, 2, 2, 2)
    assert mt.sign is None
    levels = np.rint(np.asarray(mt.g) * 3).astype(int)
    # positive device: w[0,0]=1 -> 15 = 3*4+3 ; w[1,0]=0.25 -> 4 = 1*4+0
    np.testing.assert_array_equal(levels[0, :, 0, 0], [3, 3])
    np.testing.assert_array_equal(levels[0, :, 1, 0], [1, 0])
    # negative device: w[0,1]=-0.5 -> 8 = 2*4+0
    np.testing.assert_array_equal(levels[1, :, 0, 1], [2, 0])
    # idle devices at zero
    assert levels[1, :, 0, 0].sum() == 0 and levels[0, :, 0, 1].sum() == 0
    assert levels[:, :, 1, 1].sum() == 0
    np.testing.assert_array_equal(np.asarray(mapping.from_conductances(mt, cfg)),
                                  np.array([[1.0, -8 / 15], [4 / 15, 0.0]], np.float32))


def test_worked_example_sign_bit_uneven_slices():
    # N=5, m=2 -> K=3; top slice only holds 1 bit
    w = jnp.array([-1.0, 0.0, 0.5])
    cfg = MappingConfig(weight_bits=5, device_bits=2, sign="sign_bit")
    mt = mapping.to_conductances(w, cfg)
    assert mt.g.shape == (3, 3)
    np.testing.assert_array_equal(np.asarray(mt.sign), [-1, 1, 1])
    levels = np.rint(np.asarray(mt.g) * 3).astype(int)
    np.testing.assert_array_equal(levels[:, 0], [1, 3, 3])      # 31 = 1*16 + 3*4 + 3
    np.testing.assert_array_equal(levels[:, 2], [1, 0, 0])      # round(15.5) = 16
    assert levels[0].max() <= 1


# ---------------------------------------------------------------------------
# Property: exact round trip and quantization error
# ---------------------------------------------------------------------------

_SHAPES = [(), (7,), (3, 5), (2, 3, 4), (3, 3, 2, 4)]


@st.composite
def _case(draw):
    n = draw(st.integers(1, 24))
    m = draw(st.integers(1, min(n, 16)))
    shape = draw(st.sampled_from(_SHAPES))
    log_scale = draw(st.floats(-6, 6))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    sign = draw(st.sampled_from(["differential", "sign_bit"]))
    scale = draw(st.sampled_from(["per_tensor", "per_channel"]))
    special = draw(st.sampled_from(["none", "zeros", "ties", "zero_channel"]))
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape) * 10.0 ** log_scale
    if special == "zeros":
        w = np.zeros(shape)
    elif special == "ties" and w.size:
        # values on half steps of the grid: round-half ties
        k = rng.integers(0, 2 ** n - 1, size=shape)
        w = (k + 0.5) / (2 ** n - 1) * np.sign(rng.standard_normal(shape))
        w.flat[0] = 1.0
    elif special == "zero_channel" and w.ndim >= 1:
        w[..., 0] = 0.0
    return MappingConfig(n, m, scale, sign), np.asarray(w, np.float32)


_jit_to = jax.jit(mapping.to_conductances, static_argnums=1)
_jit_from = jax.jit(mapping.from_conductances, static_argnums=1)
_jit_quantize = jax.jit(mapping.quantize, static_argnums=1)
_jit_round_trip = jax.jit(
    lambda w, cfg: mapping.from_conductances(mapping.to_conductances(w, cfg), cfg),
    static_argnums=1)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_case())
def test_round_trip_exact_and_error_bound(case):
    """unmap(map(w)) == quantize(w) bit for bit, whether the two sides are compiled
    separately (map, unmap, quantize as three programs) or fused into one."""
    cfg, w_np = case
    w = jnp.asarray(w_np)
    mt = _jit_to(w, cfg)
    k = cfg.n_slices
    expected_shape = ((2, k) if cfg.sign == "differential" else (k,)) + w.shape
    assert mt.g.shape == expected_shape
    g = np.asarray(mt.g)
    assert np.all(np.isfinite(g)) and g.min() >= 0.0 and g.max() <= 1.0
    lv = g * cfg.max_level
    np.testing.assert_array_equal(lv, np.rint(lv))                  # integer levels
    top_bits = cfg.weight_bits - cfg.device_bits * (k - 1)
    top = lv[0] if cfg.sign == "sign_bit" else lv[:, 0]
    assert top.max(initial=0) <= 2 ** top_bits - 1
    if cfg.sign == "differential":
        assert np.all((g[0] == 0) | (g[1] == 0))                    # one device of the pair idle

    wq = np.asarray(_jit_quantize(w, cfg))
    back = _jit_from(mt, cfg)
    assert back.dtype == w.dtype and back.shape == w.shape
    np.testing.assert_array_equal(np.asarray(back), wq)             # bit-exact
    np.testing.assert_array_equal(np.asarray(_jit_round_trip(w, cfg)), wq)

    s = np.asarray(mapping.compute_scale(w, cfg.scale), np.float64)
    err = np.abs(wq.astype(np.float64) - w_np.astype(np.float64))
    bound = s / (2 * cfg.max_q) + 4 * np.finfo(np.float32).eps * s
    assert np.all(err <= bound)
    assert np.all(np.isfinite(wq))


@pytest.mark.parametrize("cfg", [MappingConfig(8, 1, sign="differential"),
                                 MappingConfig(7, 3, "per_channel", "sign_bit"),
                                 MappingConfig(24, 16, "per_channel", "differential"),
                                 MappingConfig(5, 2, "per_tensor", "sign_bit")])
def test_round_trip_exact_eager(cfg):
    """Op by op (no jit, no fusion) the round trip is exact too, and agrees with jit."""
    w = jax.random.normal(jax.random.key(7), (6, 5)) * 3.0
    wq = mapping.quantize(w, cfg)
    back = mapping.from_conductances(mapping.to_conductances(w, cfg), cfg)
    np.testing.assert_array_equal(np.asarray(back), np.asarray(wq))
    np.testing.assert_array_equal(np.asarray(_jit_round_trip(w, cfg)), np.asarray(wq))


@pytest.mark.parametrize("sign", ["differential", "sign_bit"])
def test_round_trip_under_jit_and_vmap(sign):
    cfg = MappingConfig(8, 3, "per_channel", sign)
    w = _rand.normal(jax.random.key(0), (4, 16, 8))
    f = jax.jit(lambda x: mapping.from_conductances(mapping.to_conductances(x, cfg), cfg))
    np.testing.assert_array_equal(np.asarray(f(w)), np.asarray(mapping.quantize(w, cfg)))
    vf = jax.vmap(lambda x: mapping.from_conductances(mapping.to_conductances(x, cfg), cfg))
    vq = jax.vmap(lambda x: mapping.quantize(x, cfg))
    np.testing.assert_array_equal(np.asarray(vf(w)), np.asarray(vq(w)))
    eager = mapping.to_conductances(w, cfg)
    jitted = jax.jit(mapping.to_conductances, static_argnums=1)(w, cfg)
    np.testing.assert_array_equal(np.asarray(eager.g), np.asarray(jitted.g))


def test_per_channel_scale_on_last_axis():
    w = jnp.array([[0.5, -4.0, 0.0], [-1.0, 2.0, 0.0]])
    s = mapping.compute_scale(w, "per_channel")
    assert s.shape == (1, 3)
    np.testing.assert_array_equal(np.asarray(s), [[1.0, 4.0, 0.0]])
    assert float(mapping.compute_scale(w, "per_tensor")) == 4.0
    wq = mapping.quantize(w, MappingConfig(8, 2, "per_channel"))
    # the max of every channel is reproduced exactly, the zero channel stays zero
    np.testing.assert_array_equal(np.asarray(wq)[:, 2], [0.0, 0.0])
    assert float(wq[1, 0]) == -1.0 and float(wq[0, 1]) == -4.0


def test_zero_tensor_gives_no_nan():
    for sign in ("differential", "sign_bit"):
        cfg = MappingConfig(8, 2, "per_tensor", sign)
        mt = mapping.to_conductances(jnp.zeros((3, 4)), cfg)
        assert not np.any(np.isnan(np.asarray(mt.g))) and float(jnp.abs(mt.g).max()) == 0.0
        out = mapping.from_conductances(mt, cfg)
        assert np.all(np.asarray(out) == 0.0)


# ---------------------------------------------------------------------------
# Linear read-out of noisy conductances
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("sign", ["differential", "sign_bit"])
def test_from_conductances_is_linear(sign):
    cfg = MappingConfig(7, 2, "per_tensor", sign)
    k1, k2 = jax.random.split(jax.random.key(1))
    w = jax.random.normal(k1, (32, 16))
    mt = mapping.to_conductances(w, cfg)
    noise = 0.05 * _rand.normal(k2, mt.g.shape)
    noisy = mt._replace(g=mt.g + noise)
    got = np.asarray(mapping.from_conductances(noisy, cfg), np.float64)
    # reference in float64: W = s * sum_i (2^m-1) 2^{m(K-i)} g_i / (2^N-1) (x sign / pos-neg)
    wts = cfg.slice_weights()
    g = np.asarray(noisy.g, np.float64)
    s = float(mt.scale)
    if sign == "differential":
        ref = s * (np.tensordot(wts, g[0], 1) - np.tensordot(wts, g[1], 1)) / cfg.max_q
    else:
        ref = s * np.asarray(mt.sign) * np.tensordot(wts, g, 1) / cfg.max_q
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6 * s)
    # the MSB slice moves a weight by s (2^m-1) 2^{m(K-1)} / (2^N-1) per unit conductance
    one = jnp.zeros_like(mt.g).at[(0,) * (mt.g.ndim - w.ndim)].set(1.0)
    delta = mapping.from_conductances(mt._replace(g=mt.g + one), cfg) - \
        mapping.from_conductances(mt, cfg)
    expected = s * wts[0] / cfg.max_q
    if sign == "sign_bit":
        expected = expected * np.asarray(mt.sign)
    np.testing.assert_allclose(np.asarray(delta), expected * np.ones(w.shape), rtol=1e-5)


def test_from_conductances_sign_bit_requires_sign():
    cfg = MappingConfig(8, 2, sign="sign_bit")
    mt = mapping.to_conductances(jnp.ones((2, 2)), cfg)
    with pytest.raises(ValueError, match="sign"):
        mapping.from_conductances(mt._replace(sign=None), cfg)


def test_bfloat16_weights_keep_dtype_and_round_trip():
    cfg = MappingConfig(6, 2, sign="differential")
    w = jax.random.normal(jax.random.key(3), (8, 8)).astype(jnp.bfloat16)
    back = mapping.from_conductances(mapping.to_conductances(w, cfg), cfg)
    assert back.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(back, np.float32),
                                  np.asarray(mapping.quantize(w, cfg), np.float32))


# ---------------------------------------------------------------------------
# Pytrees
# ---------------------------------------------------------------------------

def _params():
    k = jax.random.split(jax.random.key(2), 4)
    return {
        "Conv_0": {"kernel": _rand.normal(k[0], (3, 3, 1, 4)), "bias": jnp.ones((4,))},
        "Dense_0": {"kernel": jax.random.normal(k[1], (36, 10)), "bias": jnp.zeros((10,))},
        "BatchNorm_0": {"scale": jnp.ones((4,)), "count": jnp.zeros((2, 2), jnp.int32)},
    }


def test_mapped_leaves_default_and_filter():
    p = _params()
    sel = mapping.mapped_leaves(p)
    assert sel == {"Conv_0": {"kernel": True, "bias": False},
                   "Dense_0": {"kernel": True, "bias": False},
                   "BatchNorm_0": {"scale": False, "count": False}}
    only_dense = mapping.mapped_leaves(
        p, lambda path, x: "Dense" in jax.tree_util.keystr(path) and np.ndim(x) >= 2)
    assert only_dense["Dense_0"]["kernel"] is True
    assert only_dense["Conv_0"]["kernel"] is False


def test_describe_selection_reports_paths_and_totals():
    p = _params()
    text = mapping.describe_selection(p, mapping.mapped_leaves(p))
    assert "['Conv_0']['kernel']" in text and "(3, 3, 1, 4)" in text
    assert "['Dense_0']['bias']" in text and "digital" in text
    assert "mapped:  2 leaves, 396 weights" in text           # 36 + 360
    assert "digital: 4 leaves, 22 parameters" in text         # 4 + 10 + 4 + 4


@pytest.mark.parametrize("sign", ["differential", "sign_bit"])
def test_map_unmap_params(sign):
    p = _params()
    cfg = MappingConfig(8, 2, "per_channel", sign)
    mp = mapping.map_params(p, cfg)
    assert isinstance(mp["Dense_0"]["kernel"], MappedTensor)
    assert mp["Dense_0"]["bias"] is p["Dense_0"]["bias"]
    back = mapping.unmap_params(mp, cfg)
    assert jax.tree.structure(back) == jax.tree.structure(p)
    expected = mapping.quantize_params(p, cfg)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # unmapped leaves are untouched (exact, same dtype)
    np.testing.assert_array_equal(np.asarray(back["BatchNorm_0"]["count"]),
                                  np.asarray(p["BatchNorm_0"]["count"]))
    # jittable end to end
    sel = mapping.mapped_leaves(p)
    f = jax.jit(lambda q: mapping.unmap_params(mapping.map_params(q, cfg, sel), cfg))
    for a, b in zip(jax.tree.leaves(f(p)), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert mapping.n_devices(p, cfg) == 396 * cfg.devices_per_weight


def test_bad_selection_structure_rejected():
    p = _params()
    bad = {"Conv_0": {"kernel": True, "bias": False}, "Dense_0": {"kernel": True}}
    with pytest.raises(ValueError, match="selected"):
        mapping.map_params(p, MappingConfig(), bad)
    with pytest.raises(ValueError, match="selected"):
        mapping.describe_selection(p, bad)
    arr_sel = jax.tree.map(lambda x: jnp.ones(np.shape(x), bool), p)
    with pytest.raises(ValueError, match="Python bool"):
        mapping.map_params(p, MappingConfig(), arr_sel)

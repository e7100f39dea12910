"""Tests of swimjax.programming: the map -> write-verify -> unmap pipeline."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from swimjax import devices, mapping, programming
from swimjax import write_verify as wv

KEY = jax.random.key(7)
MAP = mapping.MappingConfig(weight_bits=8, device_bits=2,
                            sign="differential")  # K = 4, differential: 8 devices
MAP_SB = mapping.MappingConfig(weight_bits=8, device_bits=2, sign="sign_bit")


def _params(seed: int = 0):
    # NumPy draws: XLA:CPU compiles rank-4 jax.random draws very slowly.
    rng = np.random.default_rng(seed)
    f = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    return {"conv": {"kernel": f(3, 3, 4, 8), "bias": f(8)},
            "dense": {"kernel": f(64, 10), "bias": f(10)}}


def _mask(params, p: float, seed: int = 1):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.random(x.shape) < p), params)


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


@pytest.mark.parametrize("cfg", [MAP, MAP_SB], ids=["differential", "sign_bit"])
def test_ideal_device_returns_quantized_weights(cfg):
    params = _params()
    ideal = devices.DeviceConfig(sigma_program=0.0)
    res = programming.program_params(KEY, params, _mask(params, 0.5), cfg, ideal,
                                     wv.WriteVerifyConfig(tolerance=1e-3))
    expected = mapping.quantize_params(params, cfg)
    for a, b in zip(_leaves(res.params), _leaves(expected)):
        np.testing.assert_array_equal(a, b)
    # Kernels: one cycle per device; biases digital, exact, no cycles.
    assert np.all(np.asarray(res.cycles["conv"]["kernel"]) == cfg.devices_per_weight)
    assert np.all(np.asarray(res.cycles["dense"]["bias"]) == 0)
    np.testing.assert_array_equal(np.asarray(res.params["conv"]["bias"]),
                                  np.asarray(params["conv"]["bias"]))
    assert res.n_failed == 0
    n_kernel = 3 * 3 * 4 * 8 + 64 * 10
    assert res.total_cycles == n_kernel * cfg.devices_per_weight


def test_pipeline_equals_explicit_on_concatenated_devices():
    params = _params(2)
    mask = _mask(params, 0.4, 3)
    dev = devices.DeviceConfig(sigma_program=0.1, sigma_pulse=0.02, sigma_read=0.005)
    cfg = wv.WriteVerifyConfig(tolerance=0.01, max_pulses=10)
    res = programming.program_params(KEY, params, mask, MAP, dev, cfg)
    # The same loop run by hand: kernels in flattening order, weight mask
    # broadcast over the (2, K) devices of each weight.
    names = [("conv", "kernel"), ("dense", "kernel")]
    mts = [mapping.to_conductances(params[a][b], MAP) for a, b in names]
    target = jnp.concatenate([m.g.ravel() for m in mts])
    vmask = jnp.concatenate([jnp.broadcast_to(mask[a][b], m.g.shape).ravel()
                             for (a, b), m in zip(names, mts)])
    ref = wv.explicit(dev, cfg)(KEY, target, vmask)
    off = 0
    for (a, b), m in zip(names, mts):
        n = m.g.size
        g = ref.g[off:off + n].reshape(m.g.shape)
        cyc = np.asarray(ref.cycles[off:off + n]).reshape(m.g.shape)
        fail = np.asarray(ref.failed[off:off + n]).reshape(m.g.shape)
        off += n
        np.testing.assert_array_equal(np.asarray(res.cycles[a][b]), cyc.sum(axis=(0, 1)))
        np.testing.assert_array_equal(np.asarray(res.failed[a][b]), fail.any(axis=(0, 1)))
        np.testing.assert_allclose(
            np.asarray(res.params[a][b]),
            np.asarray(mapping.from_conductances(m._replace(g=g), MAP)), rtol=1e-6, atol=1e-6)
        # Unverified weights: one write per device; verified: at least one.
        mk = np.asarray(mask[a][b])
        assert np.all(np.asarray(res.cycles[a][b])[~mk] == MAP.devices_per_weight)
        assert np.all(np.asarray(res.cycles[a][b])[mk] >= MAP.devices_per_weight)
    assert res.total_cycles == int(np.sum(np.asarray(ref.cycles, np.int64)))
    # Device-level residual of the verified devices, failed ones included.
    vm = np.asarray(vmask)
    err = np.asarray(ref.g, np.float64) - np.asarray(target, np.float64)
    assert int(res.n_verified_devices) == vm.sum()
    assert int(res.n_failed_devices) == np.asarray(ref.failed).sum()
    assert res.residual_std == pytest.approx(math.sqrt(np.mean(err[vm] ** 2)), rel=1e-5)
    assert res.failure_fraction == np.asarray(ref.failed).sum() / vm.sum()


def test_verified_weights_error_bound_without_read_noise():
    # Without read noise every verified device ends within tol of its target,
    # so a verified weight is within s * tol * 2 * sum_i w_i / (2^N - 1) of its
    # quantized value (both devices of the pair).
    params = _params(4)
    mask = _mask(params, 0.5, 5)
    dev = devices.DeviceConfig(sigma_program=0.1, sigma_pulse=0.01, sigma_read=0.0)
    cfg = wv.WriteVerifyConfig(tolerance=0.01, max_pulses=100)
    res = programming.program_params(KEY, params, mask, MAP, dev, cfg)
    assert res.n_failed == 0
    q = mapping.quantize_params(params, MAP)
    for name in ("conv", "dense"):
        w = np.asarray(params[name]["kernel"])
        s = np.abs(w).max()
        bound = s * cfg.tolerance * 2 * MAP.slice_weights().sum() / MAP.max_q
        err = np.abs(np.asarray(res.params[name]["kernel"]) - np.asarray(q[name]["kernel"]))
        mk = np.asarray(mask[name]["kernel"])
        assert np.all(err[mk] <= bound * (1 + 1e-5))
        assert err[~mk].max() > bound  # unverified weights do not enjoy it


def test_measured_nwc_matches_fraction_model():
    # Verified weights cost as much as under full write-verify (same
    # distribution); unverified cost one write per device. So
    # NWC ~ (p c + (1 - p) D) / c, c = mean cycles per weight under full WV.
    params = {"k": jnp.asarray(np.random.default_rng(9).standard_normal((100, 100)),
                            jnp.float32)}
    dev = devices.DeviceConfig(sigma_program=0.1, sigma_pulse=0.02, sigma_read=0.005)
    cfg = wv.WriteVerifyConfig(tolerance=0.01, max_pulses=20)
    full = programming.cycles_full_write_verify(KEY, params, MAP, dev, cfg)
    p = 0.2
    mask = _mask(params, p, 10)
    sel = programming.program_params(jax.random.key(11), params, mask, MAP, dev, cfg)
    c_full = np.asarray(full.cycles["k"], np.float64)
    c_sel = np.asarray(sel.cycles["k"], np.float64)
    mk = np.asarray(mask["k"])
    frac = mk.mean()
    d = MAP.devices_per_weight
    c = c_full.mean()
    expected = wv.nwc_analytic(frac, c, d)
    measured = wv.nwc(sel.cycles, full.cycles)
    # Sampling error of the verified weights' mean cycles, both runs.
    se = math.sqrt(c_full.var() / c_full.size + c_sel[mk].var() / mk.sum()) * frac / c
    assert abs(measured - expected) < 6 * se + 1e-12, (measured, expected, se)
    assert np.all(c_sel[~mk] == d)


def test_residual_stats_without_verification_and_under_vmap():
    params = _params(20)
    dev = devices.DeviceConfig(sigma_program=0.1, sigma_pulse=0.02)
    cfg = wv.WriteVerifyConfig(tolerance=0.01, max_pulses=10)
    none = jax.tree.map(lambda x: jnp.zeros(x.shape, bool), params)
    res = programming.program_params(KEY, params, none, MAP_SB, dev, cfg)
    assert int(res.n_verified_devices) == 0 and int(res.n_failed_devices) == 0
    assert math.isnan(res.residual_std) and res.failure_fraction == 0.0
    # The scalars are arrays, so the result batches like any pytree.
    mask = _mask(params, 0.5, 21)
    keys = jax.random.split(KEY, 2)
    batched = jax.vmap(lambda k: programming.program_params(k, params, mask, MAP_SB, dev, cfg))(
        keys)
    one = programming.program_params(keys[1], params, mask, MAP_SB, dev, cfg)
    assert batched.residual_sq_sum.shape == (2,)
    np.testing.assert_allclose(np.asarray(batched.residual_sq_sum)[1],
                               np.asarray(one.residual_sq_sum), rtol=1e-5)
    assert int(batched.n_verified_devices[1]) == int(one.n_verified_devices)


@pytest.mark.parametrize("cfg", [MAP, MAP_SB], ids=["differential", "sign_bit"])
def test_open_loop_weight_error_moments_from_device_moments(cfg):
    # An independent NumPy read-out of the per-device moments: levels of each
    # slice from the integer magnitudes, idle device of the pair at level 0.
    w = np.random.default_rng(22).standard_normal((30, 20)).astype(np.float32)
    dev = devices.DeviceConfig(sigma_program=0.15, clip=True)
    mean, std = programming.open_loop_weight_error_moments(jnp.asarray(w), cfg, dev)
    q = np.asarray(mapping.quantize_levels(jnp.asarray(w), cfg)[0])
    k, m = cfg.n_slices, cfg.device_bits
    levels = [(q >> (m * (k - i))) & cfg.max_level for i in range(1, k + 1)]
    wts = cfg.slice_weights() / cfg.max_q
    exp_mean = np.zeros(w.shape)
    exp_var = np.zeros(w.shape)
    for wt, lv in zip(wts, levels):
        mu, sd = (np.asarray(x, np.float64) for x in devices.write_error_moments(
            jnp.asarray(lv / cfg.max_level, jnp.float32), dev))
        exp_mean += wt * mu
        exp_var += wt ** 2 * sd ** 2
        if cfg.sign == "differential":
            mu0, sd0 = (float(x) for x in devices.write_error_moments(jnp.zeros(()), dev))
            exp_mean -= wt * mu0
            exp_var += wt ** 2 * sd0 ** 2
    np.testing.assert_allclose(np.asarray(mean), exp_mean, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(std), np.sqrt(exp_var), rtol=1e-5)
    summary = programming.open_loop_weight_error(jnp.asarray(w), cfg, dev)
    assert summary.bias == pytest.approx(exp_mean.mean(), rel=1e-5)
    assert summary.std == pytest.approx(math.sqrt(exp_var.mean() + exp_mean.var()), rel=1e-5)


def test_open_loop_weight_error_rejects_bad_input():
    w = jnp.ones((3, 3))
    dev = devices.DeviceConfig()
    with pytest.raises(ValueError, match="mapping_cfg"):
        programming.open_loop_weight_error(w, {"weight_bits": 8}, dev)
    with pytest.raises(ValueError, match="device"):
        programming.open_loop_weight_error(w, MAP, None)
    with pytest.raises(ValueError, match="w must be a floating"):
        programming.open_loop_weight_error(jnp.ones((3, 3), jnp.int32), MAP, dev)
    with pytest.raises(ValueError, match="w must hold"):
        programming.open_loop_weight_error(jnp.ones((0, 3)), MAP, dev)
    with pytest.raises(ValueError, match="w"):
        programming.open_loop_weight_error(w.at[0, 0].set(jnp.inf), MAP, dev)


def test_failed_pytree_and_budget():
    params = _params(12)
    dev = devices.DeviceConfig(sigma_program=0.1, sigma_pulse=0.2, sigma_read=0.0)
    cfg = wv.WriteVerifyConfig(tolerance=0.002, max_pulses=2)
    mask = _mask(params, 1.0)
    res = programming.program_params(KEY, params, mask, MAP, dev, cfg)
    for name in ("conv", "dense"):
        cyc = np.asarray(res.cycles[name]["kernel"])
        assert cyc.max() <= MAP.devices_per_weight * (1 + cfg.max_pulses)
        assert np.asarray(res.failed[name]["kernel"]).mean() > 0.5
        assert not np.any(np.asarray(res.failed[name]["bias"]))
    assert res.n_failed > 0


def test_deterministic():
    params = _params(13)
    mask = _mask(params, 0.3)
    dev = devices.DeviceConfig(sigma_program=0.1, sigma_pulse=0.02, sigma_read=0.005)
    cfg = wv.WriteVerifyConfig(tolerance=0.01, max_pulses=10)
    a = programming.program_params(KEY, params, mask, MAP, dev, cfg)
    b = programming.program_params(KEY, params, mask, MAP, dev, cfg)
    for x, y in zip(_leaves(a), _leaves(b)):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("cfg,pair", [(MAP, math.sqrt(2)), (MAP_SB, 1.0)],
                         ids=["differential", "sign_bit"])
def test_statistical_weight_error_matches_closed_form(cfg, pair):
    # Device errors sigma on every slice give a weight error of std
    # s * sigma * sqrt(sum_i w_i^2) / (2^N - 1), times sqrt(2) for a pair.
    params = {"k": jnp.asarray(np.random.default_rng(14).standard_normal((400, 500)),
                            jnp.float32)}
    sigma_u, sigma_v = 0.1, 0.03
    mask = {"k": jnp.arange(500)[None, :] % 2 == jnp.zeros((400, 1), int)}
    out = programming.program_params_statistical(KEY, params, mask, cfg, sigma_u, sigma_v)
    q = np.asarray(mapping.quantize(params["k"], cfg), np.float64)
    err = np.asarray(out["k"], np.float64) - q
    s = float(np.abs(np.asarray(params["k"])).max())
    c_levels = math.sqrt((cfg.slice_weights() ** 2).sum()) / cfg.max_q
    mk = np.asarray(mask["k"])
    for sel, sigma in ((mk, sigma_v), (~mk, sigma_u)):
        expected = pair * s * c_levels * sigma
        assert abs(err[sel].std() - expected) < 6 * expected / math.sqrt(2 * sel.sum())
    zero = programming.program_params_statistical(KEY, params, mask, cfg, 0.0, 0.0)
    np.testing.assert_array_equal(np.asarray(zero["k"]), np.asarray(q, np.float32))


def test_statistical_truncation_bounds_verified_weights():
    params = _params(15)
    mask = _mask(params, 0.5, 16)
    tol = 0.01
    out = programming.program_params_statistical(KEY, params, mask, MAP, 0.2, 0.05,
                                                 truncate=tol)
    q = mapping.quantize_params(params, MAP)
    for name in ("conv", "dense"):
        s = float(np.abs(np.asarray(params[name]["kernel"])).max())
        bound = s * tol * 2 * MAP.slice_weights().sum() / MAP.max_q
        err = np.abs(np.asarray(out[name]["kernel"]) - np.asarray(q[name]["kernel"]))
        mk = np.asarray(mask[name]["kernel"])
        assert np.all(err[mk] <= bound * (1 + 1e-5))
        np.testing.assert_array_equal(np.asarray(out[name]["bias"]),
                                      np.asarray(params[name]["bias"]))


def test_bad_inputs_raise():
    params = _params()
    dev = devices.DeviceConfig()
    cfg = wv.WriteVerifyConfig()
    good = _mask(params, 0.5)
    with pytest.raises(ValueError, match="mask"):
        programming.program_params(KEY, params, {"conv": good["conv"]}, MAP, dev, cfg)
    bad_shape = jax.tree.map(lambda m: m, good)
    bad_shape["dense"]["kernel"] = jnp.ones((10, 64), bool)
    with pytest.raises(ValueError, match="mask"):
        programming.program_params(KEY, params, bad_shape, MAP, dev, cfg)
    bad_dtype = jax.tree.map(lambda m: m.astype(jnp.float32), good)
    with pytest.raises(ValueError, match="mask"):
        programming.program_params(KEY, params, bad_dtype, MAP, dev, cfg)
    nan = jax.tree.map(lambda x: x, params)
    nan["dense"]["kernel"] = nan["dense"]["kernel"].at[0, 0].set(jnp.nan)
    with pytest.raises(ValueError, match="params"):
        programming.program_params(KEY, nan, good, MAP, dev, cfg)
    with pytest.raises(ValueError, match="wv_config"):
        programming.program_params(KEY, params, good, MAP, dev, {"tolerance": 0.01})
    with pytest.raises(ValueError, match="sigma_unverified"):
        programming.program_params_statistical(KEY, params, good, MAP, -0.1, 0.03)
    with pytest.raises(ValueError, match="mask"):
        programming.program_params_statistical(KEY, params, bad_shape, MAP, 0.1, 0.03)


def test_explicit_perturbation_programs_with_the_mask_as_state():
    """programming.explicit is program_params as a Perturbation: the mask is the
    state, so the jitted apply compiles once for every mask."""
    params = _params()
    dev = devices.DeviceConfig(sigma_program=0.2, sigma_pulse=0.2)
    wvc = wv.WriteVerifyConfig(tolerance=0.05, max_pulses=30)
    pert = programming.explicit(MAP_SB, dev, wvc)
    apply = jax.jit(pert.apply)
    for p in (0.0, 0.3, 1.0):
        mask = _mask(params, p)
        got = apply(KEY, params, pert.init(params, mask))
        want = programming.program_params(KEY, params, mask, MAP_SB, dev, wvc).params
        for a, b in zip(_leaves(got), _leaves(want)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert apply._cache_size() == 1
    none = pert.init(params)  # no mask: nothing verified
    assert not any(np.any(m) for m in _leaves(none.mask))
    with pytest.raises(ValueError, match="mask"):
        pert.init(params, {"conv": None})
    with pytest.raises(ValueError, match="state must be the ExplicitState"):
        pert.apply(KEY, params, _mask(params, 0.5))
    with pytest.raises(ValueError, match="device"):
        programming.explicit(MAP_SB, wvc, wvc)

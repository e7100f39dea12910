"""Statistical tests of swimjax.devices against closed forms.

Tolerances come from the sample size: 6 standard errors, with the standard
error of a mean ``sd / sqrt(n)`` and of a sample std ``sd / sqrt(2 n)`` (Gaussian)
or, for non-Gaussian samples, from the sample's own fourth moment.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from swimjax import devices as dv
from swimjax.devices import DeviceConfig, DriftConfig, SpatialConfig, StuckAtConfig

N = 200_000
Z = 6.0


def _mean_std_ok(x, mean, std, n=None):
    x = np.asarray(x, np.float64).ravel()
    n = x.size if n is None else n
    assert abs(x.mean() - mean) <= Z * std / math.sqrt(n) + 1e-7, (x.mean(), mean)
    assert abs(x.std() - std) <= Z * std / math.sqrt(2 * n) + 1e-7, (x.std(), std)


def _var_se(x):
    """Standard error of the sample variance from the sample's 4th moment."""
    x = np.asarray(x, np.float64)
    c = x - x.mean()
    m2, m4 = np.mean(c ** 2), np.mean(c ** 4)
    return math.sqrt(max(m4 - m2 ** 2, 0.0) / x.size)


# ---------------------------------------------------------------------------
# Config validation
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, name", [
    (dict(sigma_program=-0.1), "sigma_program"),
    (dict(sigma_program=float("nan")), "sigma_program"),
    (dict(sigma_pulse=-1.0), "sigma_pulse"),
    (dict(sigma_read=float("nan")), "sigma_read"),
    (dict(sigma_read=float("inf")), "sigma_read"),
    (dict(variation="relative"), "variation"),
    (dict(pulse_variation="polynomial"), "pulse_variation"),
    (dict(variation="polynomial"), "sigma_poly"),
    (dict(variation="polynomial", sigma_poly=(0.1, float("nan"))), r"sigma_poly\[1\]"),
    (dict(sigma_poly=(0.1,)), "sigma_poly"),
    (dict(variation="polynomial", sigma_poly=0.1), "sigma_poly"),
    (dict(g_min_us=5.0, g_max_us=5.0), "g_max_us"),
])
def test_device_config_rejects(kwargs, name):
    with pytest.raises(ValueError, match=name):
        DeviceConfig(**kwargs)


def test_device_config_poly_list_becomes_hashable_tuple():
    d = DeviceConfig(variation="polynomial", sigma_poly=[0.01, 0.02])
    assert d.sigma_poly == (0.01, 0.02)
    hash(d)


@pytest.mark.parametrize("cls, kwargs, name", [
    (DriftConfig, dict(nu_mean=-0.1), "nu_mean"),
    (DriftConfig, dict(nu_std=float("nan")), "nu_std"),
    (DriftConfig, dict(t0=0.0), "t0"),
    (DriftConfig, dict(model="rram"), "model"),
    (StuckAtConfig, dict(p_stuck_min=-0.01), "p_stuck_min"),
    (StuckAtConfig, dict(p_stuck_max=float("nan")), "p_stuck_max"),
    (StuckAtConfig, dict(p_stuck_min=0.6, p_stuck_max=0.5), "p_stuck_min \\+ p_stuck_max"),
    (SpatialConfig, dict(rows=0), "rows"),
    (SpatialConfig, dict(rows=100, cols=100), "cols"),
    (SpatialConfig, dict(theta=-1.0), "theta"),
    (SpatialConfig, dict(systematic_ratio=1.5), "systematic_ratio"),
    (SpatialConfig, dict(systematic_ratio=float("nan")), "systematic_ratio"),
])
def test_other_configs_reject(cls, kwargs, name):
    with pytest.raises(ValueError, match=name):
        cls(**kwargs)


# ---------------------------------------------------------------------------
# program / read / pulse
# ---------------------------------------------------------------------------

def test_program_absolute_mean_std():
    d = DeviceConfig(sigma_program=0.2, clip=False)
    g = dv.program(jax.random.key(0), jnp.full((N,), 0.4), d)
    _mean_std_ok(g, 0.4, 0.2)


@pytest.mark.parametrize("target", [0.25, 0.5, 1.0])
def test_program_proportional(target):
    d = DeviceConfig(sigma_program=0.1, variation="proportional", clip=False)
    g = dv.program(jax.random.key(1), jnp.full((N,), target), d)
    _mean_std_ok(g, target, 0.1 * target)


def test_program_polynomial_state_dependent():
    poly = (0.01, 0.08, -0.05)
    d = DeviceConfig(variation="polynomial", sigma_poly=poly, clip=False)
    xs = np.array([0.0, 0.3, 0.7, 1.0])
    target = jnp.repeat(jnp.asarray(xs, jnp.float32), N // 4)
    g = np.asarray(dv.program(jax.random.key(2), target, d)).reshape(4, -1)
    for x, row in zip(xs, g):
        _mean_std_ok(row, x, poly[0] + poly[1] * x + poly[2] * x * x)


def test_program_polynomial_clipped_at_zero():
    d = DeviceConfig(variation="polynomial", sigma_poly=(0.05, -0.1))   # negative above x=0.5
    std = dv.program_std(jnp.array([0.0, 0.5, 0.9]), d)
    np.testing.assert_allclose(np.asarray(std), [0.05, 0.0, 0.0], atol=1e-7)


def test_program_clipping_closed_form():
    # target 0, sigma s: clipped to [0, 1]: P(g == 0) = 1/2, E[g] = s / sqrt(2 pi)
    s = 0.1
    g = np.asarray(dv.program(jax.random.key(3), jnp.zeros((N,)),
                              DeviceConfig(sigma_program=s, clip=True)), np.float64)
    assert g.min() >= 0.0 and g.max() <= 1.0
    frac0 = np.mean(g == 0.0)
    assert abs(frac0 - 0.5) <= Z * math.sqrt(0.25 / N)
    e = s / math.sqrt(2 * math.pi)
    sd = s * math.sqrt(0.5 - 1 / (2 * math.pi))
    assert abs(g.mean() - e) <= Z * sd / math.sqrt(N)


def test_default_device_is_swims_unclipped_gaussian():
    assert not DeviceConfig().clip
    with pytest.raises(ValueError, match="clip"):
        DeviceConfig(clip=1)
    g = dv.program(jax.random.key(30), jnp.zeros((N,)), DeviceConfig(sigma_program=0.1))
    _mean_std_ok(g, 0.0, 0.1)            # zero mean at g_min: no one-sided error


def test_physical_presets_clip_and_swim_does_not():
    for name, p in dv.PRESETS.items():
        assert p.device.clip == (name != "swim"), name


def _truncated_reference(t, sd):
    """Moments of clip(t + sd Z, 0, 1) - t by quadrature (scipy, float64)."""
    mean = stats.norm.expect(lambda z: np.clip(t + sd * z, 0, 1) - t)
    m2 = stats.norm.expect(lambda z: (np.clip(t + sd * z, 0, 1) - t) ** 2)
    return mean, math.sqrt(m2 - mean ** 2)


@pytest.mark.parametrize("device", [
    DeviceConfig(sigma_program=0.1, clip=True),
    DeviceConfig(sigma_program=0.8, clip=True),                        # both ends bind
    DeviceConfig(sigma_program=0.2, variation="proportional", clip=True),
    DeviceConfig(variation="polynomial", sigma_poly=(0.02, 0.05), clip=True),
])
def test_write_error_moments_closed_form_and_sampled(device):
    targets = np.array([0.0, 1 / 3, 2 / 3, 1.0, 0.03], np.float32)
    mean, std = (np.asarray(x, np.float64) for x in dv.write_error_moments(targets, device))
    sds = np.asarray(dv.program_std(jnp.asarray(targets), device), np.float64)
    for t, m, s, sd in zip(targets, mean, std, sds):
        ref_m, ref_s = _truncated_reference(float(t), sd)
        assert m == pytest.approx(ref_m, abs=2e-6) and s == pytest.approx(ref_s, abs=2e-6)
    # Sampled: n draws per target; mean within 6 SE (sd / sqrt n), std within
    # 6 SE of a sample variance from the sample's fourth moment.
    n = 100_000
    g = dv.program(jax.random.key(31), jnp.tile(jnp.asarray(targets)[:, None], (1, n)), device)
    err = np.asarray(g, np.float64) - targets[:, None].astype(np.float64)
    for row, m, s in zip(err, mean, std):
        assert abs(row.mean() - m) <= Z * s / math.sqrt(n) + 1e-7
        assert abs(row.var() - s * s) <= Z * _var_se(row) + 1e-9


def test_write_error_moments_closed_form_at_g_min_and_unclipped():
    s = 0.1
    m, sd = dv.write_error_moments(jnp.zeros(()), DeviceConfig(sigma_program=s, clip=True))
    assert float(m) == pytest.approx(s / math.sqrt(2 * math.pi), rel=1e-5)
    assert float(sd) == pytest.approx(s * math.sqrt(0.5 - 1 / (2 * math.pi)), rel=1e-5)
    m, sd = dv.write_error_moments(jnp.array([0.0, 0.5]), DeviceConfig(sigma_program=s))
    np.testing.assert_array_equal(np.asarray(m), 0.0)
    np.testing.assert_allclose(np.asarray(sd), s)
    # sigma = 0 (proportional at level 0): exact write, no error.
    m, sd = dv.write_error_moments(jnp.zeros(()), DeviceConfig(
        sigma_program=0.3, variation="proportional", clip=True))
    assert float(m) == 0.0 and float(sd) == 0.0


def test_read_noise_not_clipped_and_identity_at_zero():
    d = DeviceConfig(sigma_read=0.05)
    r = dv.read(jax.random.key(4), jnp.zeros((N,)), d)
    _mean_std_ok(r, 0.0, 0.05)
    assert float(r.min()) < 0.0
    g = jnp.linspace(0, 1, 11)
    assert dv.read(jax.random.key(4), g, DeviceConfig(sigma_read=0.0)) is g


@pytest.mark.parametrize("variation, expected_std",
                         [("absolute", 0.02), ("proportional", 0.02 * 0.1)])
def test_pulse_mean_std(variation, expected_std):
    d = DeviceConfig(sigma_pulse=0.02, pulse_variation=variation, clip=False)
    g = dv.pulse(jax.random.key(5), jnp.full((N,), 0.5), jnp.full((N,), -0.1), d)
    _mean_std_ok(g, 0.4, expected_std)


def test_program_jit_vmap_deterministic():
    d = DeviceConfig(sigma_program=0.1)
    t = jnp.linspace(0, 1, 64)
    f = jax.jit(dv.program, static_argnums=2)
    a = dv.program(jax.random.key(6), t, d)
    b = f(jax.random.key(6), t, d)
    # same key -> same numbers (compiled vs op-by-op may differ in the last ulp)
    np.testing.assert_array_equal(np.asarray(b), np.asarray(f(jax.random.key(6), t, d)))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    keys = jax.random.split(jax.random.key(7), 3)
    batch = jax.vmap(lambda k: dv.program(k, t, d))(keys)
    np.testing.assert_allclose(np.asarray(batch[1]), np.asarray(dv.program(keys[1], t, d)),
                               rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------
# Drift
# ---------------------------------------------------------------------------

def _rectified_moments(mu, sd):
    a = mu / sd
    m1 = mu * stats.norm.cdf(a) + sd * stats.norm.pdf(a)
    m2 = (mu ** 2 + sd ** 2) * stats.norm.cdf(a) + mu * sd * stats.norm.pdf(a)
    return m1, m2 - m1 ** 2


def _folded_moments(mu, sd):
    m1 = sd * math.sqrt(2 / math.pi) * math.exp(-mu ** 2 / (2 * sd ** 2)) + \
        mu * (1 - 2 * stats.norm.cdf(-mu / sd))
    return m1, mu ** 2 + sd ** 2 - m1 ** 2


@pytest.mark.parametrize("nu_mean, nu_std", [(0.1, 0.05), (0.02, 0.05)])
def test_drift_log_ratio_constant_model(nu_mean, nu_std):
    cfg = DriftConfig(nu_mean=nu_mean, nu_std=nu_std, t0=20.0)
    g0 = jnp.full((N,), 0.7)
    nu = dv.sample_nu(jax.random.key(8), g0, cfg)
    assert float(nu.min()) >= 0.0
    t = 20.0 * 1e4
    lr = np.log(np.asarray(dv.apply_drift(g0, nu, t, cfg), np.float64) / 0.7)
    m1, var = _rectified_moments(nu_mean, nu_std)
    L = math.log(t / cfg.t0)
    assert abs(lr.mean() - (-m1 * L)) <= Z * math.sqrt(var) * L / math.sqrt(N)
    assert abs(lr.var() - var * L ** 2) <= Z * _var_se(lr)
    # fraction clipped to nu = 0 is Phi(-mu/sigma)
    p0 = stats.norm.cdf(-nu_mean / nu_std)
    assert abs(np.mean(np.asarray(nu) == 0.0) - p0) <= Z * math.sqrt(p0 * (1 - p0) / N)


def test_no_drift_before_t0_and_time_validation():
    cfg = DriftConfig()
    g0 = jnp.linspace(0.0, 1.0, 11)
    nu = jnp.full_like(g0, 0.1)
    np.testing.assert_array_equal(np.asarray(dv.apply_drift(g0, nu, 5.0, cfg)), np.asarray(g0))
    np.testing.assert_array_equal(np.asarray(dv.apply_drift(g0, nu, cfg.t0, cfg)), np.asarray(g0))
    np.testing.assert_allclose(np.asarray(dv.apply_drift(g0, nu, 2000.0, cfg)),
                               np.asarray(g0) * 100.0 ** -0.1, rtol=1e-6)
    with pytest.raises(ValueError, match="t "):
        dv.apply_drift(g0, nu, -1.0, cfg)
    with pytest.raises(ValueError, match="t "):
        dv.apply_drift(g0, nu, float("nan"), cfg)


@pytest.mark.parametrize("x", [0.5, 0.1, 0.01])
def test_drift_pcm_state_dependent(x):
    cfg = DriftConfig(model="pcm")
    mu, sd = dv.nu_stats(jnp.array([x]), cfg)
    mu_ref = min(max(-0.0155 * math.log(x) + 0.0244, 0.049), 0.1)
    sd_ref = min(max(-0.0125 * math.log(x) - 0.0059, 0.008), 0.045)
    np.testing.assert_allclose([float(mu[0]), float(sd[0])], [mu_ref, sd_ref], rtol=1e-5)
    nu = np.asarray(dv.sample_nu(jax.random.key(9), jnp.full((N,), x), cfg), np.float64)
    m1, var = _folded_moments(mu_ref, sd_ref)
    assert nu.min() >= 0.0
    assert abs(nu.mean() - m1) <= Z * math.sqrt(var) / math.sqrt(N)
    assert abs(nu.var() - var) <= Z * _var_se(nu)


def test_pcm_read_noise():
    # aihwkit: about 3.7 % of g at x = 1, one second after programming (t = 1 s + t0)
    sd = float(dv.pcm_read_noise_std(jnp.array(1.0), 21.0))
    assert sd == pytest.approx(0.0088 * math.sqrt(math.log((21 + 250e-9) / 500e-9)), rel=1e-5)
    assert 0.036 < sd < 0.038
    x = 0.3
    q_s = min(0.0088 / x ** 0.65, 0.2)
    expected = x * q_s * math.sqrt(math.log((100.0 + 250e-9) / 500e-9))
    r = dv.pcm_read_noise(jax.random.key(10), jnp.full((N,), x), 100.0)
    _mean_std_ok(r, x, expected)


# ---------------------------------------------------------------------------
# Stuck-at faults
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("p_min, p_max", [(0.0175, 0.0904), (0.3, 0.0), (0.0, 0.0)])
def test_stuck_fractions_binomial(p_min, p_max):
    faults = StuckAtConfig(p_min, p_max)
    st = dv.sample_stuck(jax.random.key(11), (N,), faults)
    a, b = np.asarray(st.at_min), np.asarray(st.at_max)
    assert not np.any(a & b)
    for frac, p in ((a.mean(), p_min), (b.mean(), p_max)):
        assert abs(frac - p) <= Z * math.sqrt(p * (1 - p) / N) + 1e-12
    g = jnp.full((N,), 0.5)
    out = np.asarray(dv.apply_stuck(g, st))
    assert np.all(out[a] == 0.0) and np.all(out[b] == 1.0) and np.all(out[~(a | b)] == 0.5)
    # the effect draws the same map from the same key
    eff = dv.stuck_at(faults)
    np.testing.assert_array_equal(np.asarray(eff(jax.random.key(3), g)),
                                  np.asarray(eff(jax.random.key(3), g)))


# ---------------------------------------------------------------------------
# Finite levels
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [1, 2, 4])
def test_snap_to_levels(bits):
    g = jax.random.uniform(jax.random.key(12), (10_000,), minval=-0.2, maxval=1.2)
    s = np.asarray(dv.snap_to_levels(g, bits))
    L = 2 ** bits - 1
    levels = dv.level_table(bits)
    assert np.all(np.isin(s, levels))
    inside = (np.asarray(g) >= 0) & (np.asarray(g) <= 1)
    assert np.all(np.abs(s[inside] - np.asarray(g)[inside]) <= 0.5 / L + 1e-6)
    assert np.all(s[np.asarray(g) < 0] == 0.0) and np.all(s[np.asarray(g) > 1] == 1.0)
    np.testing.assert_array_equal(np.asarray(dv.snap_to_levels(jnp.asarray(s), bits)), s)
    np.testing.assert_array_equal(levels * L, np.arange(L + 1))    # exact levels


def test_snap_bits_validation():
    for bad in (0, 17, 2.0):
        with pytest.raises(ValueError, match="bits"):
            dv.snap_to_levels(jnp.zeros(3), bad)


# ---------------------------------------------------------------------------
# Spatial correlation
# ---------------------------------------------------------------------------

def test_spherical_correlation_values():
    d = np.array([0.0, 1.0, 3.0, 6.0, 9.0])
    rho = dv.spherical_correlation(d, 6.0)
    np.testing.assert_allclose(rho, [1.0, 1 - 0.25 + 0.5 / 216, 1 - 0.75 + 0.0625, 0.0, 0.0])
    cfg = SpatialConfig(rows=8, cols=8, theta=4.0)
    f = dv.spatial_factor(cfg).astype(np.float64)
    c = dv.spherical_correlation(dv.grid_distances(8, 8), 4.0)
    np.testing.assert_allclose(f @ f.T, c, atol=1e-5)


def test_spatial_field_correlation_at_distances():
    cfg = SpatialConfig(rows=16, cols=16, theta=6.0, systematic_ratio=0.6)
    n_fields = 3000
    f = np.asarray(dv.spatial_field(jax.random.key(13), cfg, (n_fields,)), np.float64)
    assert f.shape == (n_fields, 16, 16)
    # unit variance at every site
    site_var = np.mean(f ** 2, axis=0)
    assert abs(site_var.mean() - 1.0) <= Z * math.sqrt(2.0 / f.size) * 4   # sites correlated: x4
    # correlation at distance d along rows, and diagonally, vs r * rho(d)
    for (dr, dc) in [(0, 1), (0, 2), (0, 4), (3, 4), (0, 7), (0, 10)]:
        prod = f[:, : 16 - dr, : 16 - dc] * f[:, dr:, dc:]
        per_field = prod.reshape(n_fields, -1).mean(axis=1)    # fields are independent
        est, se = per_field.mean(), per_field.std() / math.sqrt(n_fields)
        d = math.hypot(dr, dc)
        expected = 0.6 * float(dv.spherical_correlation(np.array(d), 6.0))
        assert abs(est - expected) <= Z * se, (d, est, expected, se)


def test_tiled_field_shape_and_independent_tiles():
    cfg = SpatialConfig(rows=4, cols=4, theta=8.0, systematic_ratio=1.0)
    f = np.asarray(dv.tiled_spatial_field(jax.random.key(14), (2000, 6, 8), cfg), np.float64)
    assert f.shape == (2000, 6, 8)
    # within a tile, adjacent columns are correlated rho(1); across the tile edge (cols 3|4)
    # they are independent
    within = np.mean(f[:, :4, 2] * f[:, :4, 3])
    across = np.mean(f[:, :4, 3] * f[:, :4, 4])
    se = 1.0 / math.sqrt(2000)
    assert abs(within - float(dv.spherical_correlation(np.array(1.0), 8.0))) <= Z * 2 * se
    assert abs(across) <= Z * 2 * se
    assert dv.tiled_spatial_field(jax.random.key(0), (5,), cfg).shape == (5,)


def test_spatial_variation_effect_std():
    cfg = SpatialConfig(rows=8, cols=8, theta=3.0, systematic_ratio=0.5)
    g = jnp.full((500, 8, 8), 0.5)
    out = np.asarray(dv.spatial_variation(cfg, 0.05)(jax.random.key(15), g))
    # variance 0.05^2 at every device; 500 independent arrays
    per_array = ((out - 0.5) ** 2).reshape(500, -1).mean(axis=1)
    assert abs(per_array.mean() - 0.0025) <= Z * per_array.std() / math.sqrt(500)
    with pytest.raises(ValueError, match="sigma"):
        dv.spatial_variation(cfg, -0.1)


# ---------------------------------------------------------------------------
# Effects and presets
# ---------------------------------------------------------------------------

def test_chain_composes_in_order_with_folded_keys():
    d = DeviceConfig(sigma_program=0.05, sigma_read=0.01)
    drift = DriftConfig()
    sim = dv.chain(dv.programming(d), dv.drifting(drift, 3600.0), dv.finite_levels(3),
                   dv.reading(d))
    key = jax.random.key(16)
    g = jnp.linspace(0.0, 1.0, 100)
    out = sim(key, g)
    manual = dv.program(jax.random.fold_in(key, 0), g, d)
    manual = dv.apply_drift(manual, dv.sample_nu(jax.random.fold_in(key, 1), manual, drift),
                            3600.0, drift)
    manual = dv.snap_to_levels(manual, 3)
    manual = dv.read(jax.random.fold_in(key, 3), manual, d)
    np.testing.assert_allclose(np.asarray(out), np.asarray(manual), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(jax.jit(sim)(key, g)),
                                  np.asarray(jax.jit(sim)(key, g)))
    assert not np.array_equal(np.asarray(sim(jax.random.key(17), g)), np.asarray(out))


def _poly_us(coeffs, G):
    return sum(c * G ** i for i, c in enumerate(coeffs))


@pytest.mark.parametrize("name, coeffs, variable", [
    ("pcm", (0.26348, 1.9650, -1.1731), "g_over_gmax"),
    ("pcm_crosssim", (0.28638599, 0.07585724, -0.00178767), "g_us"),
    ("rram", (0.0112185391, 0.01129027418), "g_us"),
    ("rram_fine", (0.00081107, 0.00106879), "g_us"),
    ("rram_neurram", (0.348, 16.030, -43.853, 45.393, -16.815), "g_over_gmax"),
    ("rram_milo", (4.782321, -0.009107), "g_us"),
])
def test_presets_reproduce_published_fits(name, coeffs, variable):
    p = dv.preset(name)
    d = p.device
    assert d.variation == "polynomial" and p.source
    span = d.g_max_us - d.g_min_us
    x = np.linspace(0.0, 1.0, 9)
    G = d.g_min_us + x * span
    arg = G if variable == "g_us" else G / d.g_max_us
    expected = np.maximum(_poly_us(coeffs, arg), 0.0) / span
    got = np.asarray(dv.program_std(jnp.asarray(x, jnp.float32), d), np.float64)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-8)


def test_preset_catalogue():
    assert {"rram", "pcm", "fefet", "stt_mram", "swim"} <= set(dv.PRESETS)
    pcm = dv.preset("pcm")
    assert pcm.drift is not None and pcm.drift.model == "pcm"
    # aihwkit PCM: about 1 % of g_max at x = 0 and 4.2 % at x = 1
    s = np.asarray(dv.program_std(jnp.array([0.0, 1.0]), pcm.device))
    np.testing.assert_allclose(s, [0.26348 / 25, (0.26348 + 1.9650 - 1.1731) / 25], rtol=1e-5)
    fe = dv.preset("fefet").device
    assert fe.g_max_us == pytest.approx(1e6 / 240e3)
    assert fe.g_max_us / fe.g_min_us == pytest.approx(100)
    mr = dv.preset("stt_mram").device
    assert mr.g_max_us / mr.g_min_us == pytest.approx(2.8)
    sw = dv.preset("swim").device
    assert sw.sigma_program == 0.1 and not sw.clip
    with pytest.raises(ValueError, match="name"):
        dv.preset("flash")
    assert dv.STUCK_AT_CHEN2015.p_stuck_min == 0.0175


# ---------------------------------------------------------------------------
# Drift of the physical conductance, compensation, stuck rates as data
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("t_after", [1.0, 3600.0, 86400.0, 31536000.0, 315360000.0])
@pytest.mark.parametrize("drift_cfg, g_min_us, g_max_us, x_norm", [
    (DriftConfig(model="pcm"), 0.0, 25.0, 0.6),
    (DriftConfig(model="pcm"), 0.0, 25.0, 0.05),
    (DriftConfig(nu_mean=0.05, nu_std=0.05), 8.0, 90.0, 0.3),   # g_min > 0, nu clipped at 0
])
def test_drift_mean_and_std_against_closed_form(t_after, drift_cfg, g_min_us, g_max_us,
                                                x_norm):
    device = DeviceConfig(g_min_us=g_min_us, g_max_us=g_max_us)
    g = jnp.full((N,), x_norm)
    nu = dv.sample_nu_physical(jax.random.key(21), g, drift_cfg, device)
    g_t = np.asarray(dv.drift_conductance(g, nu, t_after, drift_cfg, device), np.float64)
    G_t = g_min_us + g_t * (g_max_us - g_min_us)        # microsiemens, g_min included
    G0 = g_min_us + x_norm * (g_max_us - g_min_us)
    mean, std = dv.drift_moments(G0, t_after, drift_cfg, g_max_us)
    assert abs(G_t.mean() - mean) <= Z * std / math.sqrt(N) + 1e-6 * G0
    assert abs(G_t.var() - std ** 2) <= Z * _var_se(G_t) + 1e-9
    # the level of the PCM model is the physical G / g_max
    mu, _ = dv.nu_stats(jnp.array([G0 / g_max_us]), drift_cfg)
    mu2, _ = dv.nu_stats(jnp.array([x_norm]), drift_cfg)
    if g_min_us == 0.0:
        assert float(mu[0]) == float(mu2[0])


def test_drift_acts_on_physical_conductance_with_g_min():
    device = DeviceConfig(g_min_us=10.0, g_max_us=50.0)
    cfg = DriftConfig(nu_mean=0.1, nu_std=0.0)
    g = jnp.array([0.0, 0.5, 1.0])
    nu = dv.sample_nu_physical(jax.random.key(0), g, cfg, device)
    t = 20.0 * (1e4 - 1.0)                       # (t + t0) / t0 = 1e4
    got = np.asarray(dv.drift_conductance(g, nu, t, cfg, device))
    G = 10.0 + np.array([0.0, 0.5, 1.0]) * 40.0
    np.testing.assert_allclose(got, (G * 1e4 ** -0.1 - 10.0) / 40.0, rtol=1e-5)
    assert got[0] < 0.0            # a device at g_min drifts below it
    np.testing.assert_array_equal(np.asarray(dv.drift_conductance(g, nu, 0.0, cfg, device)),
                                  np.asarray(g))
    with pytest.raises(ValueError, match="t_after"):
        dv.drift_conductance(g, nu, -1.0, cfg, device)


def test_compensation_exact_for_uniform_drift():
    device = DeviceConfig(g_min_us=5.0, g_max_us=45.0)
    cfg = DriftConfig(nu_mean=0.07, nu_std=0.0)
    g_pos = jax.random.uniform(jax.random.key(1), (4, 300))
    g_neg = jax.random.uniform(jax.random.key(2), (4, 300))
    out = []
    for g in (g_pos, g_neg):
        nu = dv.sample_nu_physical(jax.random.key(3), g, cfg, device)
        out.append(dv.drift_conductance(g, nu, 3.0e7, cfg, device))
    alpha = dv.drift_compensation(jnp.stack([g_pos, g_neg]), jnp.stack(out), device)
    assert float(alpha) == pytest.approx(((3.0e7 + 20.0) / 20.0) ** 0.07, rel=1e-5)
    # a differential pair reads G+ - G-: g_min cancels and the compensated read is exact
    w0 = np.asarray(g_pos - g_neg)
    w_t = np.asarray(out[0] - out[1]) * float(alpha)
    np.testing.assert_allclose(w_t, w0, rtol=1e-4, atol=1e-5)


def test_stuck_from_uniform_matches_sample_stuck_and_nests():
    u = jax.random.uniform(jax.random.key(11), (N,))
    st = dv.stuck_from_uniform(u, 0.0175, 0.0904)
    ref = dv.sample_stuck(jax.random.key(11), (N,), StuckAtConfig(0.0175, 0.0904))
    np.testing.assert_array_equal(np.asarray(st.at_min), np.asarray(ref.at_min))
    np.testing.assert_array_equal(np.asarray(st.at_max), np.asarray(ref.at_max))
    rates = jnp.array([0.001, 0.01, 0.05])
    maps = jax.vmap(lambda p: dv.stuck_from_uniform(u, p / 2, p / 2))(rates)
    stuck = np.asarray(maps.at_min | maps.at_max)
    for i, p in enumerate(np.asarray(rates)):
        assert abs(stuck[i].mean() - p) <= Z * math.sqrt(p * (1 - p) / N)
        assert abs(np.asarray(maps.at_min[i]).mean() - p / 2) <= Z * math.sqrt(p / 2 / N)
    assert np.all(stuck[0] <= stuck[1]) and np.all(stuck[1] <= stuck[2])   # nested


# ---------------------------------------------------------------------------
# Preset files
# ---------------------------------------------------------------------------

def _write(tmp_path, obj, name="dev.json"):
    import json
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(path)


def test_load_preset_round_trip_and_names(tmp_path):
    path = _write(tmp_path, {
        "name": "my_rram", "source": "lab chip 7",
        "device": {"sigma_program": 0.05, "clip": True, "g_min_us": 5, "g_max_us": 50},
        "drift": {"nu_mean": 0.02, "nu_std": 0.01},
        "faults": {"p_stuck_min": 0.0175, "p_stuck_max": 0.0904}})
    p = dv.load_preset(path)
    assert p.device == DeviceConfig(sigma_program=0.05, clip=True, g_min_us=5.0, g_max_us=50.0,
                                    name="my_rram")
    assert p.drift == DriftConfig(nu_mean=0.02, nu_std=0.01)
    assert p.faults == dv.STUCK_AT_CHEN2015 and p.source == "lab chip 7"
    assert dv.resolve_preset(path) == p
    # every preset's dict loads back to the same preset
    for name in dv.preset_names():
        d = dv.preset_to_dict(dv.PRESETS[name])
        assert dv.load_preset(_write(tmp_path, d, f"{name}.json")) == dv.PRESETS[name]
    assert set(dv.preset_names()) >= {"pcm", "rram", "fefet", "stt_mram", "swim"}
    md = dv.describe_preset(p)
    assert "my_rram" in md and "lab chip 7" in md and "5 to 50 uS" in md and "1.75 %" in md
    # a published fit in microsiemens is normalized
    q = dv.load_preset(_write(tmp_path, {"device": {
        "sigma_poly_us": [0.0112185391, 0.01129027418], "g_min_us": 8, "g_max_us": 90,
        "clip": True}}, "fit.json"))
    assert q.device.sigma_poly == pytest.approx(dv.preset("rram").device.sigma_poly)
    assert q.device.name == "fit" and q.drift is None


@pytest.mark.parametrize("obj, match", [
    ({"device": {"sigma_program": -0.1}}, r"dev\.json: device: sigma_program"),
    ({"device": {"sigma_read": -1}}, "sigma_read"),
    ({"device": {"g_min_us": 10, "g_max_us": 10}}, "g_max_us must be > g_min_us"),
    ({"device": {"g_min_us": 20, "g_max_us": 10}}, "g_max_us must be > g_min_us"),
    ({"device": {"sigma_program": 0.1, "sigma_prog": 0.1}}, r"unknown key device\.sigma_prog"),
    ({"device": {}, "drift": {"nu": 0.1}}, r"unknown key drift\.nu"),
    ({"device": {}, "colour": "red"}, "unknown key 'colour'"),
    ({"device": {}, "drift": {"nu_std": -0.01}}, "nu_std"),
    ({"device": {}, "faults": {"p_stuck_min": 0.7, "p_stuck_max": 0.6}}, "p_stuck_min"),
    ({"drift": {}}, "missing key 'device'"),
    ("[1, 2]", "one JSON object"),
    ("{not json", "not a JSON preset file"),
])
def test_load_preset_rejects(tmp_path, obj, match):
    path = _write(tmp_path, obj)
    with pytest.raises(ValueError, match=match) as err:
        dv.load_preset(path)
    assert str(err.value).startswith(path)


def test_resolve_preset_names_and_errors(tmp_path):
    assert dv.resolve_preset("pcm") is dv.PRESETS["pcm"]
    with pytest.raises(ValueError, match="one of"):
        dv.resolve_preset("flash")
    with pytest.raises(OSError):
        dv.resolve_preset(str(tmp_path / "missing.json"))

"""Tests of swimjax.mac_error: tables, files, synthetic models and the sampler.

Statistics are tested as statistics at fixed seeds: the sampler's empirical
distribution against the table by chi-square (expected counts below 5 merged,
degrees of freedom = bins - 1, critical value at p = 1e-3 from scipy), means
and frequencies within 6 standard errors of the sample size.
"""

from __future__ import annotations

import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from swimjax import mac_error as me

P_VALUE = 1e-3
Z = 6.0

HAND = np.array([[0.7, 0.2, 0.1, 0.0],
                 [0.1, 0.8, 0.1, 0.0],
                 [0.0, 0.25, 0.5, 0.25],
                 [0.0, 0.0, 0.3, 0.7]])


@pytest.fixture(scope="module")
def dnat128():
    return me.synthetic(jax.random.key(0), 128, "dnat_like")


@pytest.fixture(scope="module")
def banked16():
    return me.synthetic(jax.random.key(1), 16, "severe", n_banks=3)


def _chi_square(observed: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """Chi-square statistic and degrees of freedom of counts against known
    probabilities, bins with expected count < 5 pooled (the pool merged into
    the smallest remaining bin when it is itself below 5)."""
    n = observed.sum()
    assert observed[probs == 0].sum() == 0, "a readout of probability 0 was drawn"
    exp = probs * n
    big = exp >= 5
    obs_b, exp_b = list(observed[big]), list(exp[big])
    rest_o, rest_e = observed[~big & (probs > 0)].sum(), exp[~big].sum()
    if rest_e > 0:
        if rest_e >= 5 or not exp_b:
            obs_b.append(rest_o)
            exp_b.append(rest_e)
        else:
            i = int(np.argmin(exp_b))
            obs_b[i] += rest_o
            exp_b[i] += rest_e
    o, e = np.asarray(obs_b, float), np.asarray(exp_b, float)
    return float(np.sum((o - e) ** 2 / e)), len(e) - 1


def _assert_rows_fit(table: np.ndarray, counts: np.ndarray) -> None:
    """Every row passes at p = P_VALUE / rows (Bonferroni) and all rows together at P_VALUE."""
    stat_all, df_all = 0.0, 0
    for r in range(table.shape[0]):
        stat, df = _chi_square(counts[r], table[r])
        if df:
            crit = stats.chi2.ppf(1 - P_VALUE / table.shape[0], df)
            assert stat <= crit, (r, stat, crit, df)
        stat_all, df_all = stat_all + stat, df_all + df
    assert df_all > 0
    assert stat_all <= stats.chi2.ppf(1 - P_VALUE, df_all), (stat_all, df_all)


def _row_moments(t) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (centered) variance of every row of a table or count matrix."""
    t = np.asarray(t, np.float64)
    t = t / t.sum(-1, keepdims=True)
    k = np.arange(t.shape[-1])
    mean = t @ k
    return mean, np.sum(t * (k - mean[..., None]) ** 2, axis=-1)


def _draw_counts(model, n_per_row, key, bank=None):
    n_c = model.n_codes
    codes = jnp.repeat(jnp.arange(n_c, dtype=jnp.float32), n_per_row)
    read = np.asarray(jax.jit(lambda k, c: me.sample(k, c, model, bank=bank))(key, codes))
    idx = np.repeat(np.arange(n_c), n_per_row) * n_c + read.astype(np.int64)
    return np.bincount(idx, minlength=n_c * n_c).reshape(n_c, n_c)


# ---------------------------------------------------------------------------
# The sampler's distribution
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["synthetic", "hand"])
def test_sampler_matches_table_chi_square(which, dnat128):
    model = dnat128 if which == "synthetic" else me.from_table(HAND)
    counts = _draw_counts(model, 20_000, jax.random.key(7))
    _assert_rows_fit(np.asarray(model.table, np.float64), counts)


def test_sampler_uses_each_banks_table(banked16):
    n_c, n_per = 16, 20_000
    codes = jnp.tile(jnp.repeat(jnp.arange(n_c, dtype=jnp.float32), n_per), (3, 1))
    bank = jnp.arange(3)[:, None]
    read = np.asarray(me.sample(jax.random.key(3), codes, banked16, bank=bank))
    for b in range(3):
        idx = np.repeat(np.arange(n_c), n_per) * n_c + read[b].astype(np.int64)
        counts = np.bincount(idx, minlength=n_c * n_c).reshape(n_c, n_c)
        _assert_rows_fit(np.asarray(banked16.table[b], np.float64), counts)
    assert not np.allclose(banked16.table[0], banked16.table[1])


def test_alias_tables_reproduce_the_rows_exactly(dnat128, banked16):
    for model in (dnat128, me.from_table(HAND), banked16):
        n_c = model.n_codes
        scale = 2.0 ** (32 - int(math.log2(n_c)))
        keep = np.asarray(model.threshold, np.float64) / scale
        implied = keep / n_c
        rows = np.indices(keep.shape)[:-1]
        np.add.at(implied, (*rows, np.asarray(model.alias)), (1 - keep) / n_c)
        # threshold rounding: at most half a unit per cell, C cells per row
        np.testing.assert_allclose(implied, np.asarray(model.table, np.float64),
                                   rtol=0, atol=0.5 / scale + 1e-7)


def test_forward_mean_is_expected_readout(dnat128):
    n_per = 20_000
    counts = _draw_counts(dnat128, n_per, jax.random.key(11))
    mean, var = _row_moments(counts)
    mu = np.asarray(dnat128.table, np.float64) @ np.arange(128)
    np.testing.assert_array_less(np.abs(mean - mu), Z * np.sqrt(var / n_per) + 1e-9)
    np.testing.assert_allclose(me.expected_readout(dnat128), mu, rtol=0, atol=1e-4)


def test_identity_table_reads_exactly():
    for model in (me.from_table(np.eye(64)), me.synthetic(jax.random.key(0), 64, "ideal")):
        np.testing.assert_array_equal(model.table, np.eye(64))
        codes = jnp.asarray(np.random.default_rng(0).integers(0, 64, (5, 1000)), jnp.float32)
        np.testing.assert_array_equal(me.sample(jax.random.key(1), codes, model), codes)
        np.testing.assert_array_equal(me.readout_slope(model), np.ones(64))


def test_codes_are_rounded_and_clipped_nan_propagates():
    model = me.from_table(np.eye(8))
    codes = jnp.asarray([2.4, 2.6, -3.0, 1e9, -jnp.inf, jnp.inf, jnp.nan, 7.0])
    out = np.asarray(me.sample(jax.random.key(0), codes, model))
    np.testing.assert_array_equal(out[:6], [2, 3, 0, 7, 0, 7])
    assert np.isnan(out[6]) and out[7] == 7
    ints = me.sample(jax.random.key(0), jnp.arange(8), model)   # integer codes -> float32
    assert ints.dtype == jnp.float32
    np.testing.assert_array_equal(ints, np.arange(8))


# ---------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------

def _fd_slope(table: np.ndarray) -> np.ndarray:
    mu = np.asarray(table, np.float64) @ np.arange(table.shape[-1])
    inner = (mu[2:] - mu[:-2]) / 2
    return np.concatenate([[mu[1] - mu[0]], inner, [mu[-1] - mu[-2]]])


def test_statistical_gradient_is_finite_difference_of_expected_readout(dnat128):
    codes = jnp.arange(128, dtype=jnp.float32)
    grad = jax.grad(lambda c: me.sample(jax.random.key(2), c, dnat128).sum())(codes)
    fd = _fd_slope(dnat128.table)
    np.testing.assert_allclose(grad, fd, rtol=0, atol=2e-4)
    np.testing.assert_allclose(me.readout_slope(dnat128), fd, rtol=0, atol=2e-4)
    # a value-dependent table: the slope is not the straight-through 1
    assert np.max(np.abs(fd - 1.0)) > 0.02


def test_statistical_gradient_scales_a_cotangent_per_element():
    model = me.from_table(HAND)
    codes = jnp.asarray([[0.0, 1.0], [2.0, 3.0]])
    g = jnp.asarray([[1.0, -2.0], [0.5, 3.0]])
    _, vjp = jax.vjp(lambda c: me.sample(jax.random.key(0), c, model), codes)
    fd = _fd_slope(HAND)
    np.testing.assert_allclose(vjp(g)[0], g * fd[np.asarray(codes, int)], rtol=1e-6)


def test_ste_passes_the_cotangent(dnat128):
    codes = jnp.asarray(np.random.default_rng(1).integers(0, 128, (4, 50)), jnp.float32)
    g = jax.random.normal(jax.random.key(4), codes.shape)
    _, vjp = jax.vjp(lambda c: me.sample(jax.random.key(0), c, dnat128, gradient="ste"), codes)
    np.testing.assert_array_equal(vjp(g)[0], g)


def test_gradient_choice_does_not_change_the_forward(dnat128):
    codes = jnp.arange(128, dtype=jnp.float32)
    a = me.sample(jax.random.key(5), codes, dnat128, gradient="ste")
    b = me.sample(jax.random.key(5), codes, dnat128, gradient="statistical")
    np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------
# jit / vmap / grad and determinism
# ---------------------------------------------------------------------------

def test_jit_vmap_grad_and_determinism(dnat128):
    codes = jnp.asarray(np.random.default_rng(2).integers(0, 128, (6, 3, 40)), jnp.float32)
    keys = jax.random.split(jax.random.key(9), 6)
    eager = me.sample(keys[0], codes[0], dnat128)
    np.testing.assert_array_equal(eager, me.sample(keys[0], codes[0], dnat128))
    one = jax.jit(me.sample, static_argnames=("gradient",))
    np.testing.assert_array_equal(one(keys[0], codes[0], dnat128), eager)
    batched = jax.vmap(lambda k, c: me.sample(k, c, dnat128))(keys, codes)
    looped = np.stack([one(k, c, dnat128) for k, c in zip(keys, codes)])
    np.testing.assert_array_equal(batched, looped)
    # per-example keys: an example's readouts do not depend on the batch it is in
    half = jax.vmap(lambda k, c: me.sample(k, c, dnat128))(keys[:3], codes[:3])
    np.testing.assert_array_equal(half, looped[:3])

    def loss(c, k):
        return jnp.sum(me.sample(k, c, dnat128) ** 2)
    g = jax.jit(jax.vmap(jax.grad(loss)))(codes, keys)
    expect = 2 * looped * _fd_slope(dnat128.table)[np.asarray(codes, int)]
    np.testing.assert_allclose(g, expect, rtol=1e-5, atol=1e-3)


def test_traced_bank_and_model_under_jit(banked16):
    codes = jnp.arange(16, dtype=jnp.float32)
    f = jax.jit(lambda m, b: me.sample(jax.random.key(0), codes, m, bank=b))
    for b in range(3):
        np.testing.assert_array_equal(f(banked16, jnp.int32(b)),
                                      me.sample(jax.random.key(0), codes, banked16, bank=b))


# ---------------------------------------------------------------------------
# Building tables
# ---------------------------------------------------------------------------

def test_from_pairs_recovers_a_known_table():
    rng = np.random.default_rng(0)
    n_per = 50_000
    ideal = np.repeat(np.arange(4), n_per)
    readout = np.concatenate([rng.choice(4, n_per, p=row) for row in HAND])
    perm = rng.permutation(ideal.size)
    model = me.from_pairs(ideal[perm], readout[perm].astype(np.float32), 4)
    se = np.sqrt(HAND * (1 - HAND) / n_per)
    assert np.all(np.abs(np.asarray(model.table) - HAND) <= Z * se + 1e-7)
    assert np.all(np.asarray(model.table)[HAND == 0] == 0)


def test_from_pairs_smoothing_and_unobserved_rows():
    # code 0: readouts 0, 0, 1; code 3: readout 3; codes 1 and 2 never observed
    ideal, readout = [0, 0, 0, 3], [0, 0, 1, 3]
    t = np.asarray(me.from_pairs([0], [3], 4).table)       # rows 1..3: row 0 shifted up, piled on 3
    np.testing.assert_array_equal(t, np.tile([0, 0, 0, 1], (4, 1)))
    t = np.asarray(me.from_pairs(ideal, readout, 4).table)
    np.testing.assert_allclose(t[0], [2 / 3, 1 / 3, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(t[1], [0, 2 / 3, 1 / 3, 0], rtol=1e-6)   # nearest: 0, shifted 1
    np.testing.assert_allclose(t[2], [0, 0, 1, 0], atol=1e-7)          # nearest: 3, shifted -1
    np.testing.assert_allclose(t[3], [0, 0, 0, 1], atol=1e-7)
    s = np.asarray(me.from_pairs(ideal, readout, 4, smoothing=1.0).table)
    np.testing.assert_allclose(s[0], np.array([3, 2, 1, 1]) / 7, rtol=1e-6)
    np.testing.assert_allclose(s[3], np.array([1, 1, 1, 2]) / 5, rtol=1e-6)


def test_from_pairs_per_bank():
    m = me.from_pairs([0, 1, 0, 1], [0, 1, 1, 0], 2, bank=[0, 0, 1, 1], n_banks=2)
    assert m.n_banks == 2
    np.testing.assert_array_equal(m.table, [np.eye(2), [[0, 1], [1, 0]]])


@pytest.mark.parametrize("kwargs, match", [
    (dict(ideal=[0, 4], readout=[0, 1], n_codes=4),
     r"ideal must hold integer codes in \[0, 3\], found 4 at index 1"),
    (dict(ideal=[0, 1], readout=[0, -1], n_codes=4), r"readout .* found -1 at index 1"),
    (dict(ideal=[0, 1.5], readout=[0, 1], n_codes=4), r"ideal .* found 1.5"),
    (dict(ideal=[0, np.nan], readout=[0, 1], n_codes=4), r"ideal .* found nan"),
    (dict(ideal=[0, 1], readout=[0], n_codes=4), "one shape"),
    (dict(ideal=[], readout=[], n_codes=4), "at least one"),
    (dict(ideal=[0], readout=[0], n_codes=6), "power of two"),
    (dict(ideal=[0], readout=[0], n_codes=4, smoothing=-1), "smoothing"),
    (dict(ideal=[0], readout=[0], n_codes=4, bank=[0]), "n_banks"),
    (dict(ideal=[0], readout=[0], n_codes=4, bank=[2], n_banks=2), r"bank .* \[0, 1\]"),
    (dict(ideal=[0, 1], readout=[0, 1], n_codes=4, bank=[0, 0], n_banks=2), "in bank 1"),
])
def test_from_pairs_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        me.from_pairs(**kwargs)


def test_synthetic_is_deterministic_and_value_dependent(dnat128):
    again = me.synthetic(jax.random.key(0), 128, "dnat_like")
    other = me.synthetic(jax.random.key(1), 128, "dnat_like")
    np.testing.assert_array_equal(again.table, dnat128.table)
    assert not np.array_equal(other.table, dnat128.table)
    t = np.asarray(dnat128.table, np.float64)
    k = np.arange(128)
    mu, var = _row_moments(t)
    sd = np.sqrt(var)
    # distortion grows with the value: spread and |mu - c| larger at high codes
    assert sd[90:100].mean() > 2 * sd[10:20].mean()
    assert np.abs(mu - k)[90:100].mean() > np.abs(mu - k)[10:20].mean()
    # rare large jumps: mass 8 codes away from the mean at a low code
    assert 1e-4 < t[40, 48:52].sum() + t[40, 28:32].sum() < 1e-2


def test_synthetic_components_alone():
    key = jax.random.key(0)
    k = np.arange(32)
    t = np.asarray(me.synthetic(key, 32, "ideal", offset=2.0).table)
    np.testing.assert_array_equal(t.argmax(1), np.clip(k + 2, 0, 31))
    mu, var = _row_moments(me.synthetic(key, 32, "ideal", spread=1.0).table)
    np.testing.assert_allclose(mu[8:24], k[8:24], atol=1e-5)       # symmetric: no bias inside
    # binned to integers: Sheppard's correction, variance 1 + 1/12
    np.testing.assert_allclose(var[8:24], 1 + 1 / 12, rtol=0, atol=1e-5)
    t = np.asarray(me.synthetic(key, 32, "ideal", inl=3.0).table)
    assert t.argmax(1)[16] == 19 and t.argmax(1)[0] == 0 and t.argmax(1)[31] == 31
    t = np.asarray(me.synthetic(key, 32, "ideal", jump_prob=0.1, jump_size=4.0).table)
    np.testing.assert_allclose(t[10, [6, 10, 14]], [0.05, 0.9, 0.05], atol=1e-7)
    b = me.synthetic(key, 32, "ideal", offset_std=1.0, n_banks=4)
    assert b.n_banks == 4 and len({np.asarray(b.table[i]).tobytes() for i in range(4)}) > 1


def test_synthetic_compression_is_the_quadratic_transfer_curve():
    """compression a: every ideal code c reads the nearest code to c (1 - a c / (C-1))."""
    k = np.arange(64.0)
    for a in (0.25, 0.5):
        t = np.asarray(me.synthetic(jax.random.key(0), 64, "ideal", compression=a).table)
        np.testing.assert_array_equal(t.argmax(1), np.floor(k * (1 - a * k / 63) + 0.5))
        assert t.max() == 1.0                                  # no spread: point masses
    # the statistical gradient sees the compression: slope 1 - 2 a x
    m = me.synthetic(jax.random.key(0), 256, "ideal", compression=0.5, spread=2.0)
    slope = np.asarray(me.readout_slope(m))
    np.testing.assert_allclose(slope[32:224], 1 - np.arange(32, 224) / 255, atol=0.02)


def test_synthetic_gain_std_draws_one_gain_per_bank():
    """Per-bank gains: the slope of each bank's mean readout is 1 + g_b, and
    the g_b have std gain_std (64 banks: the sample std is within 4 of its
    standard errors, sigma / sqrt(2 (n - 1)), of the parameter)."""
    n_b, gain_std = 64, 0.05
    m = me.synthetic(jax.random.key(3), 256, "ideal", gain_std=gain_std, n_banks=n_b)
    mu = np.asarray(m.mu, np.float64)
    g = (mu[:, 120] - mu[:, 8]) / 112 - 1.0                  # rounding: <= 1/112 per bank
    se = gain_std / np.sqrt(2 * (n_b - 1))
    assert abs(g.std(ddof=1) - gain_std) < 4 * se + 1 / 112
    assert abs(g.mean()) < 4 * gain_std / np.sqrt(n_b) + 1 / 112
    # shared table: no gain draw; the offsets and DNL of an unchanged key stay as they were
    same = me.synthetic(jax.random.key(3), 256, "dnat_like", gain_std=0.0)
    np.testing.assert_array_equal(same.table, me.synthetic(jax.random.key(3), 256,
                                                           "dnat_like").table)


def test_readout_slope_at_indexes_each_banks_slope(banked16):
    codes = jnp.asarray([[0.0, 5.4, 15.0], [300.0, -2.0, 8.0]])
    bank = jnp.asarray([[0, 1, 2], [2, 2, 1]])
    got = me.readout_slope_at(codes, banked16, bank)
    slope = np.asarray(me.readout_slope(banked16))
    want = slope[np.asarray(bank), np.clip(np.round(np.asarray(codes)), 0, 15).astype(int)]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)  # float32 slopes vs from the table
    with pytest.raises(ValueError, match="bank"):
        me.readout_slope_at(codes, banked16)


@pytest.mark.parametrize("kwargs, match", [
    (dict(offset=float("nan")), "offset"),
    (dict(offset=-float("inf")), r"offset must be in \(-inf, inf\)"),
    (dict(gain_error=-1.0), "gain_error"),
    (dict(gain_error=float("inf")), "gain_error"),
    (dict(inl=float("inf")), "inl"),
    (dict(spread=-0.1), "spread"),
    (dict(spread_growth=-1e-3), "spread_growth"),
    (dict(jump_prob=1.5), "jump_prob"),
    (dict(jump_size=-1.0), "jump_size"),
    (dict(jump_size=float("inf")), "jump_size must be finite"),
    (dict(dnl=float("nan")), "dnl"),
    (dict(offset_std=-1.0), "offset_std"),
    (dict(compression=0.6), "compression"),
    (dict(compression=-0.1), "compression"),
    (dict(gain_std=-0.01), "gain_std"),
    (dict(n_banks=0), "n_banks"),
    (dict(preset="strong"), "preset"),
])
def test_synthetic_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        me.synthetic(jax.random.key(0), 128, **kwargs)


@pytest.mark.parametrize("n_codes", [1, 0, 100, 2 ** 13, 4.0, True])
def test_synthetic_rejects_code_counts(n_codes):
    with pytest.raises(ValueError, match="n_codes"):
        me.synthetic(jax.random.key(0), n_codes)


def test_presets_are_valid_and_ordered():
    sds = []
    for name in ("ideal", "mild", "dnat_like", "severe"):
        sds.append(np.sqrt(_row_moments(me.synthetic(jax.random.key(0), 128, name).table)[1][64]))
    assert sds == sorted(sds) and sds[0] == 0


def test_macro_like_is_mostly_systematic():
    """The documented intent of "macro_like": across 16 ADCs the mean readout
    of a code differs (offset and gain mismatch) by more than one readout's
    random std, and the curve compresses by about 25 % at the top."""
    m = me.synthetic(jax.random.key(0), 128, "macro_like", n_banks=16)
    mu, var = _row_moments(m.table)
    between = mu.std(axis=0, ddof=1)[16:120]
    within = np.sqrt(var).mean(axis=0)[16:120]
    assert np.all(between > within)
    top = np.median(mu[:, 120]) - 1.0                     # less the 1 LSB mean offset
    assert 0.6 * 120 < top < 0.9 * 120                      # 120 (1 - 0.25 * 120/127) = 91.7


def test_gaussian_like_matches_mean_and_variance(dnat128, banked16):
    g = me.gaussian_like(dnat128)
    t, tg = np.asarray(dnat128.table, np.float64), np.asarray(g.table, np.float64)
    (mean, var), (gmean, gvar) = _row_moments(t), _row_moments(tg)
    interior = (t[:, 0] < 1e-6) & (t[:, -1] < 1e-6) & (tg[:, 0] < 1e-6) & (tg[:, -1] < 1e-6)
    assert interior.sum() >= 64
    # float32 storage of the table bounds the agreement
    np.testing.assert_allclose(gmean[interior], mean[interior], rtol=0, atol=2e-4)
    np.testing.assert_allclose(gvar[interior], var[interior], rtol=0, atol=2e-3)
    # near the ends clipping limits a discretized Gaussian: close, not equal
    np.testing.assert_allclose(gmean, mean, rtol=0, atol=0.05)
    # the same moments but a different shape: no heavy jump tails
    assert tg[40, 48:].sum() < t[40, 48:].sum()
    gb = me.gaussian_like(banked16)
    assert gb.n_banks == 3
    np.testing.assert_array_equal(me.gaussian_like(me.from_table(np.eye(8))).table, np.eye(8))


# ---------------------------------------------------------------------------
# Validation of tables
# ---------------------------------------------------------------------------

def _bad(table, i, j, value):
    t = np.array(table, dtype=np.float64)
    t[i, j] = value
    return t


@pytest.mark.parametrize("table, kwargs, match", [
    (_bad(HAND, 2, 1, np.nan), {}, r"row 2 must be finite, found nan at readout 1"),
    (_bad(HAND, 1, 3, np.inf), {}, r"row 1 must be finite"),
    (_bad(_bad(HAND, 3, 2, -0.1), 3, 3, 1.1), {},
     r"row 3 must have probabilities >= 0, found -0.1"),
    (_bad(HAND, 1, 1, 0.7), {}, r"row 1 must sum to 1 .* sums to 0.9"),
    (np.stack([HAND, _bad(HAND, 2, 2, 0.6)]), {}, r"bank 1, row 2 must sum to 1 .* 1.1"),
    (np.stack([HAND, _bad(HAND, 0, 0, np.nan)]), {}, r"bank 1, row 0 must be finite"),
    (np.ones((4, 3)) / 3, {}, "square"),
    (np.eye(6), {}, "power of two"),
    (np.eye(1), {}, r"\[2, 4096\]"),
    (np.ones(4) / 4, {}, "2 dims"),
    (np.ones((1, 2, 4, 4)) / 4, {}, "2 dims"),
    (np.zeros((0, 4, 4)), {}, "at least one bank"),
    (np.eye(4), dict(n_codes=8), "table has 4 codes .* n_codes=8"),
    (np.eye(4), dict(n_codes=5), "n_codes must be a power of two"),
    (np.eye(4), dict(atol=-1.0), "atol"),
    ([["a", "b"], ["c", "d"]], {}, "real numbers"),
])
def test_from_table_rejects(table, kwargs, match):
    with pytest.raises(ValueError, match=match):
        me.from_table(table, **kwargs)


def test_from_table_renormalizes_within_tolerance():
    t = HAND * (1 + 5e-5)
    m = me.from_table(t)
    np.testing.assert_allclose(np.asarray(m.table).sum(1), 1, atol=1e-6)
    with pytest.raises(ValueError, match="row 0"):
        me.from_table(t, atol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(gradient="straight"), "gradient must be one of"),
    (dict(bank=0), "shared table"),
])
def test_sample_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        me.sample(jax.random.key(0), jnp.zeros(3), me.from_table(HAND), **kwargs)


@pytest.mark.parametrize("bank, match", [
    (None, "pass bank="), (3, r"bank must be an integer in \[0, 2\]"),
    (np.array([0, 5, 1]), r"bank must be in \[0, 2\] .* found 5"),
    (np.array([0.0, 1.0, 1.0]), "integer bank indices"), (np.zeros(4, int), "broadcast"),
])
def test_sample_rejects_bad_banks(bank, match, banked16):
    with pytest.raises(ValueError, match=match):
        me.sample(jax.random.key(0), jnp.zeros(3), banked16, bank=bank)


def test_sample_rejects_a_raw_array():
    with pytest.raises(ValueError, match="ErrorModel"):
        me.sample(jax.random.key(0), jnp.zeros(3), jnp.eye(4))


# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".npz", ".csv"])
def test_save_load_round_trip(tmp_path, suffix, dnat128, banked16):
    for name, model in (("shared", dnat128), ("banked", banked16)):
        path = tmp_path / (name + suffix)
        me.save(path, model)
        back = me.load(path, n_codes=model.n_codes)
        assert back.n_banks == model.n_banks
        np.testing.assert_allclose(back.table, model.table, rtol=2e-7, atol=1e-12)
        np.testing.assert_array_equal(back.table == 0, np.asarray(model.table) == 0)
    assert sorted(os.listdir(tmp_path)) == sorted(["shared" + suffix, "banked" + suffix])


def test_load_csv_layouts(tmp_path):
    p = tmp_path / "probs.csv"
    p.write_text("# measured at 25 C\nreadout, ideal ,probability\n\n0,0,1\n1,1,0.5\n0,1,0.5\n")
    np.testing.assert_array_equal(me.load(p).table, [[1, 0], [0.5, 0.5]])
    c = tmp_path / "counts.csv"
    c.write_text("bank,ideal,readout,count\n0,0,0,3\n0,0,1,1\n0,0,0,4\n1,1,1,2\n")
    m = me.load(c, n_codes=2)
    np.testing.assert_allclose(m.table, [[[7 / 8, 1 / 8], [0, 1]], [[1, 0], [0, 1]]])
    ms = me.load(c, n_codes=2, smoothing=1.0)
    np.testing.assert_allclose(ms.table[0, 0], [8 / 10, 2 / 10], rtol=1e-6)
    top = tmp_path / "top.csv"
    top.write_text("ideal,readout,probability\n0,0,1\n1,1,1\n2,2,1\n3,3,1\n")
    np.testing.assert_array_equal(me.load(top).table, np.eye(4))


def _write(path, text):
    path.write_text(text)
    return path


H = "ideal,readout,probability\n"


@pytest.mark.parametrize("name, content, kwargs, match", [
    ("a.csv", "", {}, "is empty"),
    ("a.csv", "ideal,readout,p\n0,0,1\n", {}, "line 1: header"),
    ("a.csv", "ideal,readout,probability,count\n0,0,1,1\n", {}, "header"),
    ("a.csv", H + "", {}, "no entries"),
    ("a.csv", H + "0,0,1\n1,x,1\n", {}, "line 3: readout must be an integer"),
    ("a.csv", H + "0,0,1\n1,1\n", {}, "line 3: expected 3 fields"),
    ("a.csv", H + "0,0,1\n-1,1,1\n", {}, "line 3: ideal must be >= 0"),
    ("a.csv", H + "0,0,1\n1,1,-0.5\n", {}, "line 3: probability must be finite and >= 0"),
    ("a.csv", H + "0,0,1\n1,1,nan\n", {}, "line 3: probability must be finite"),
    ("a.csv", H + "0,0,1\n1,1,abc\n", {}, "line 3: probability must be a number"),
    ("a.csv", H + "0,0,1\n1,1,1\n0,0,1\n", {}, "line 4: entry .* repeated"),
    ("a.csv", H + "0,0,1\n1,1,1\n2,2,1\n", {}, "power of two"),
    ("a.csv", H + "0,0,1\n1,1,1\n3,3,1\n", {}, r"row 2 must sum to 1 .* sums to 0$"),
    ("a.csv", H + "0,0,1\n1,1,1\n4,4,1\n", dict(n_codes=4),
     r"line 4: code 4 out of range \[0, 3\]"),
    ("a.csv", H + "0,0,0.9\n1,1,1\n", {}, r"row 0 must sum to 1"),
    ("a.csv", H + "0,0,1\n1,1,1\n", dict(n_codes=8), "row 2 must sum to 1"),
    ("a.csv", "ideal,readout,count\n0,0,0\n1,1,0\n", {}, "no counts observed"),
    ("a.csv", b"\xff\xfe\x00garbage", {}, "not a text CSV"),
    ("a.npz", b"not a zip file", {}, "cannot read as NPZ"),
    ("a.npz", None, {}, r"has no 'table' array; keys found: \['tables'\]"),
    ("a.npz", "eye6", {}, "power of two"),
    ("a.npz", "eye4", dict(n_codes=8), "n_codes=8"),
    ("a.txt", "0,0,1", {}, "must end in .npz or .csv"),
])
def test_load_rejects_bad_files(tmp_path, name, content, kwargs, match):
    path = tmp_path / name
    if content is None:
        np.savez(path, tables=np.eye(4))
    elif content in ("eye6", "eye4"):
        np.savez(path, table=np.eye(int(content[-1])))
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(ValueError, match=match) as info:
        me.load(path, **kwargs)
    assert str(path) in str(info.value)


def test_load_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        me.load(tmp_path / "nope.npz")


def test_save_rejects(tmp_path, dnat128):
    with pytest.raises(ValueError, match="must end in .npz or .csv"):
        me.save(tmp_path / "t.json", dnat128)
    with pytest.raises(ValueError, match="ErrorModel"):
        me.save(tmp_path / "t.npz", np.eye(4))
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------
# Speed (reported, not asserted)
# ---------------------------------------------------------------------------

def test_draw_speed_report(dnat128, capsys):
    codes = jnp.asarray(np.random.default_rng(0).integers(0, 128, 1_000_000), jnp.float32)
    f = jax.jit(lambda k, c: me.sample(k, c, dnat128))
    f(jax.random.key(0), codes).block_until_ready()
    best = math.inf
    for i in range(3):
        t = time.perf_counter()
        f(jax.random.key(i), codes).block_until_ready()
        best = min(best, time.perf_counter() - t)
    with capsys.disabled():
        print(f"\nmac_error.sample: C=128, 1e6 codes: {1e6 / best:.3g} draws/s "
              f"({best * 1e3:.1f} ms)")

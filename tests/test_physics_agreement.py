"""The three physics paths agree under the defaults.

SWIM's statistical model (:func:`swimjax.perturbation.perturb`), its
device-level reference (:func:`swimjax.perturbation.perturb_via_devices`) and
the hardware pipeline (:func:`swimjax.programming.program_params`: map, program
every device, read out) must give the same weight error ``dW / s`` under the
library's defaults: ``VariationConfig()``, ``MappingConfig()`` (its mapping:
``N = 8``, ``m = 1``, sign bit) and ``DeviceConfig()`` (unclipped Gaussian):
zero mean and std ``c(N, m) sigma``, with ``sigma = sigma_d`` unverified and
``sigma_wv`` verified (the explicit loop configured by
:func:`swimjax.write_verify.config_for_sigma`).

``dW`` is taken against each path's noise-free output: ``W`` itself for
``perturb`` (which does not quantize by default), ``quantize(W)`` for the two
device paths (the mapping quantizes).

Tolerances are ``Z = 5`` standard errors from the sample size ``n`` (fixed
seeds): the SE of a sample mean is ``sd / sqrt(n)``; the SE of a sample std is
``sd / sqrt(2 n)`` for Gaussian samples and ``sd sqrt((kurtosis - 1) / (4 n))``
in general (kurtosis from the sample).

The clipped differential configuration (a physical preset's device on a
differential pair) is biased towards zero; a second group of tests checks the
bias that :func:`swimjax.programming.open_loop_weight_error` predicts against
a measurement.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from swimjax import devices, mapping, perturbation, programming
from swimjax import write_verify as wv

Z = 5.0
SHAPE = (256, 256)                       # n = 65,536 weights
VCFG = perturbation.VariationConfig()    # sigma_d 0.1, sigma_wv 0.03, N 8, m 1
MCFG = mapping.MappingConfig()
#: The default device at SWIM's sigma_d; corrective pulses as noisy as the
#: open-loop write (the sweep's explicit model).
DEV = devices.DeviceConfig(sigma_program=VCFG.sigma_d, sigma_pulse=VCFG.sigma_d)


def _params() -> dict:
    w = np.random.default_rng(12).standard_normal(SHAPE).astype(np.float32)
    return {"k": jnp.asarray(w)}


def _mask(params, verified: bool) -> dict:
    return jax.tree.map(lambda x: jnp.full(x.shape, verified), params)


def _r(out, ref, params, cfg=MCFG, signed=False) -> np.ndarray:
    """``dW / s`` (times the weight's sign bit if ``signed``), float64, flat."""
    w = np.asarray(params["k"], np.float64)
    s = np.abs(w).max()
    r = (np.asarray(out["k"], np.float64) - np.asarray(ref, np.float64)) / s
    if signed:
        r = r * np.where(w < 0, -1.0, 1.0)
    return r.ravel()


def _std_se(x: np.ndarray) -> float:
    """SE of the sample std from the sample's kurtosis."""
    kurt = max(stats.kurtosis(x, fisher=False), 1.0)
    return x.std() * math.sqrt((kurt - 1.0) / (4.0 * x.size))


def _paths(verified: bool) -> dict[str, np.ndarray]:
    params = _params()
    mask = _mask(params, verified)
    q = mapping.quantize(params["k"], MCFG)
    sigma = VCFG.sigma_wv if verified else VCFG.sigma_d
    wv_cfg = wv.config_for_sigma(VCFG.sigma_wv, DEV)
    prog = programming.program_params(jax.random.key(3), params, mask, MCFG, DEV, wv_cfg)
    if verified:  # the device-level residual is what the loop was configured for
        assert prog.residual_std == pytest.approx(VCFG.sigma_wv, rel=0.02)
        assert prog.failure_fraction < 2e-3
    return {
        "perturb": _r(perturbation.perturb(jax.random.key(1), params, mask, VCFG),
                      params["k"], params),
        "perturb_via_devices": _r(perturbation.perturb_via_devices(
            jax.random.key(2), params, mask, VCFG), q, params),
        "program_params": _r(prog.params, q, params),
    }, VCFG.std_factor * sigma


def test_defaults_describe_one_array():
    assert MCFG == VCFG.mapping_config
    assert not devices.DeviceConfig().clip
    assert VCFG.std_factor == pytest.approx(perturbation.std_factor(8, 1))
    # The exact moments of the device path are SWIM's model.
    err = programming.open_loop_weight_error(_params()["k"], MCFG, DEV)
    assert err.bias == 0.0
    assert err.std == pytest.approx(VCFG.std_factor * VCFG.sigma_d, rel=1e-6)


@pytest.mark.parametrize("verified", [False, True], ids=["unverified", "verified"])
def test_three_paths_agree_in_mean_and_std(verified):
    paths, sd = _paths(verified)
    for name, r in paths.items():
        n = r.size
        # Each path against the closed form: mean 0, std c(N, m) sigma.
        assert abs(r.mean()) < Z * sd / math.sqrt(n), (name, r.mean(), sd)
        assert abs(r.std() - sd) < Z * _std_se(r), (name, r.std(), sd)
    # And against each other (independent draws: the SEs add in quadrature).
    names = list(paths)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            ra, rb = paths[a], paths[b]
            se_mean = math.sqrt(ra.var() / ra.size + rb.var() / rb.size)
            se_std = math.hypot(_std_se(ra), _std_se(rb))
            assert abs(ra.mean() - rb.mean()) < Z * se_mean, (a, b)
            assert abs(ra.std() - rb.std()) < Z * se_std, (a, b)


def test_unverified_gaussian_paths_have_gaussian_std_se():
    # Without verification every path is exactly Gaussian: the tighter
    # Gaussian SE of a std, sd / sqrt(2 n), holds.
    paths, sd = _paths(False)
    for name, r in paths.items():
        assert abs(r.std() - sd) < Z * sd / math.sqrt(2 * r.size), name


CLIPPED = devices.DeviceConfig(sigma_program=0.1, clip=True)


@pytest.mark.parametrize("cfg", [
    mapping.MappingConfig(8, 1, sign="differential"),
    mapping.MappingConfig(8, 2, sign="differential"),
    mapping.MappingConfig(8, 1, sign="sign_bit"),
], ids=["differential-m1", "differential-m2", "sign_bit-m1"])
def test_clipped_device_bias_predicted_and_measured(cfg):
    params = _params()
    pred = programming.open_loop_weight_error(params["k"], cfg, CLIPPED)
    prog = programming.program_params(jax.random.key(4), params, _mask(params, False), cfg,
                                      CLIPPED, wv.WriteVerifyConfig())
    r = _r(prog.params, mapping.quantize(params["k"], cfg), params, cfg, signed=True)
    # The predicted pooled std also holds the spread of the per-weight means,
    # so pred.std / sqrt(n) bounds the SE of the sample mean from above.
    assert abs(r.mean() - pred.bias) < Z * pred.std / math.sqrt(r.size), (r.mean(), pred)
    assert abs(r.std() - pred.std) < Z * _std_se(r), (r.std(), pred)
    # The bias is real, far outside the sampling noise: the model's zero mean
    # does not hold on this hardware.
    assert abs(pred.bias) > 20 * pred.std / math.sqrt(r.size)


def test_clipped_bias_documented_figures():
    # The figures quoted in the docs, for a 128 x 128 Gaussian kernel at sigma
    # 0.1 on a clipping device: a differential pair pulls weights towards zero
    # by about 0.016 s (m = 1) and 0.018 s (m = 2); the sign-bit mapping pushes
    # them away from zero by about 0.024 s (its level-0 slices err upwards).
    w = jnp.asarray(np.random.default_rng(0).standard_normal((128, 128)), jnp.float32)

    def bias(m, sign, device=CLIPPED):
        return programming.open_loop_weight_error(
            w, mapping.MappingConfig(8, m, sign=sign), device)

    assert -0.017 < bias(1, "differential").bias < -0.015
    assert -0.0195 < bias(2, "differential").bias < -0.0175
    assert 0.022 < bias(1, "sign_bit").bias < 0.026
    # Unclipped, the same differential pair is unbiased, with std sqrt(2) c sigma.
    flat = bias(1, "differential", dataclasses.replace(CLIPPED, clip=False))
    assert flat.bias == 0.0
    assert flat.std == pytest.approx(math.sqrt(2) * perturbation.std_factor(8, 1) * 0.1,
                                     rel=1e-6)

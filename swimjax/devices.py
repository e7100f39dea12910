"""Non-volatile device models: programming, corrective pulses and reads.

Conductances are *normalized*: ``0`` is the device's ``g_min`` and ``1`` its
``g_max`` (physical values in microsiemens are carried by the config only for
reporting). Every standard deviation here is in units of that full scale,
``g_max - g_min``, unless the config says it is proportional to the level.

All functions are pure and take a PRNG key first; configs are frozen
dataclasses (hashable, so they can be static arguments of ``jax.jit``).

Shapes: ``target`` and ``g`` are arrays of any shape (typically
``(K, *weight_shape)`` or ``(2, K, *weight_shape)`` from :mod:`swimjax.mapping`);
outputs have the same shape and dtype.

Non-idealities are small pure functions, each selectable on its own, and each
also available as an *effect* ``fn(key, g) -> g`` that :func:`chain` composes in
the order given (the way ``optax.chain`` composes gradient transformations):

* programming variation (:func:`program`; absolute, proportional to the level,
  or a state-dependent polynomial ``sigma(x)`` fitted to hardware; unclipped
  by default, as SWIM's model, clipped to ``[0, 1]`` with ``clip=True``, whose
  error moments :func:`write_error_moments` gives exactly), cycle-to-cycle
  variation of corrective pulses (:func:`pulse`), read noise (:func:`read`);
* conductance drift ``g(t) = g0 (t / t0)^-nu`` with ``nu`` drawn per device at
  programming time (:func:`sample_nu`, :func:`apply_drift`; a state-independent
  Gaussian or IBM aihwkit's state-dependent PCM model) and PCM 1/f read noise
  (:func:`pcm_read_noise`);
* stuck-at faults (:func:`sample_stuck`, :func:`apply_stuck`). **Naming
  convention**: "stuck at g_min" (``p_stuck_min``) is a device frozen at the
  lowest conductance, normalized 0 (high-resistance state, "open"); "stuck at
  g_max" (``p_stuck_max``) one frozen at normalized 1 (low-resistance state,
  "short"). We avoid "SA0/SA1" because tools disagree on whether 0 refers to
  the conductance or the resistance; C.-Y. Chen et al. (IEEE TC 2015) report
  1.75 % stuck at the high-resistance state (g_min) and 9.04 % stuck at the
  low-resistance state (g_max) on an HfO2 RRAM chip;
* finite programmable levels (:func:`snap_to_levels`);
* spatially correlated variation across a crossbar (:func:`spatial_field`):
  a systematic part with a spherical correlation ``rho(d)`` over the array
  plus an independent part.

Device presets (:data:`PRESETS`, :func:`preset`) carry their sources.

Example::

    sim = chain(programming(dev), stuck_at(faults), drift(DriftConfig(), t=3600.0),
                reading(dev))
    g_read = sim(key, g_target)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Callable, Literal, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from swimjax import _random
from swimjax import _validation as v

__all__ = [
    'DeviceConfig', 'DevicePreset', 'DriftConfig', 'DriftModel', 'Effect', 'MAX_LEVEL_BITS',
    'MAX_SPATIAL_SITES', 'PRESETS', 'PulseVariation', 'STUCK_AT_CHEN2015', 'SpatialConfig',
    'StuckAtConfig', 'StuckFaults', 'Variation', 'apply_drift', 'apply_stuck', 'chain',
    'describe_preset', 'drift_compensation', 'drift_conductance', 'drift_moments', 'drifting',
    'finite_levels', 'load_preset', 'preset_names', 'preset_to_dict', 'resolve_preset',
    'sample_nu_physical', 'stuck_from_uniform', 'to_normalized', 'to_physical', 'grid_distances', 'level_table', 'normalize_sigma_poly',
    'nu_stats', 'pcm_read_noise', 'pcm_read_noise_std', 'polyval', 'preset', 'program',
    'program_std', 'programming', 'pulse', 'read', 'reading', 'sample_nu', 'sample_stuck',
    'snap_to_levels', 'spatial_factor', 'spatial_field', 'spatial_variation',
    'spherical_correlation', 'stuck_at', 'tiled_spatial_field', 'write_error_moments'
]

Variation = Literal["absolute", "proportional", "polynomial"]
PulseVariation = Literal["absolute", "proportional"]


@dataclasses.dataclass(frozen=True)
class DeviceConfig:
    """Statistical model of one kind of non-volatile device.

    Attributes:
      sigma_program: device-to-device programming variation of one open-loop
        write (std of the programmed conductance), in units of the full scale
        (``variation="absolute"``) or as a fraction of the target level
        (``variation="proportional"``). SWIM: 0.1 to 0.3. Not used with
        ``variation="polynomial"``.
      variation: ``"absolute"``, ``"proportional"`` (see ``sigma_program``) or
        ``"polynomial"`` (state-dependent: see ``sigma_poly``).
      sigma_pulse: cycle-to-cycle variation of one corrective write pulse
        (std, full-scale units, or a fraction of the pulse's intended step
        when ``pulse_variation="proportional"``).
      pulse_variation: ``"absolute"`` or ``"proportional"`` (to the step).
      sigma_read: read noise of one read (std, full-scale units).
      clip: clip conductances to the physical range ``[0, 1]`` after every
        write. Off by default: the unclipped Gaussian is SWIM's statistical
        model (:mod:`swimjax.perturbation`), whose weight error has zero mean.
        A physical device cannot go below ``g_min`` or above ``g_max``, so the
        physical presets (:data:`PRESETS`) clip; then a device at level 0 (or
        at the top level) only errs upwards (downwards) and the weight error
        has a bias towards zero: :func:`write_error_moments` gives it per
        device, :func:`swimjax.programming.open_loop_weight_error` per weight.
      g_min_us, g_max_us: physical conductance range in microsiemens (for
        reporting and presets; the simulation is normalized).
      name: a label for tables and plots.
      sigma_poly: coefficients ``(c0, c1, ...)`` of the state-dependent
        programming std ``sigma(x) = max(c0 + c1 x + c2 x^2 + ..., 0)`` in
        full-scale units, ``x`` the target level clipped to ``[0, 1]``; used
        (and required) only with ``variation="polynomial"``. See
        :func:`normalize_sigma_poly` to convert a fit in microsiemens.
    """

    sigma_program: float = 0.1
    variation: Variation = "absolute"
    sigma_pulse: float = 0.0
    pulse_variation: PulseVariation = "absolute"
    sigma_read: float = 0.0
    clip: bool = False
    g_min_us: float = 0.0
    g_max_us: float = 1.0
    name: str = "generic"
    sigma_poly: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        v.check_nonnegative("sigma_program", self.sigma_program)
        v.check_nonnegative("sigma_pulse", self.sigma_pulse)
        v.check_nonnegative("sigma_read", self.sigma_read)
        if not isinstance(self.clip, (bool, np.bool_)):
            raise ValueError(f"clip must be a bool, got {self.clip!r}")
        v.check_choice("variation", self.variation, ("absolute", "proportional", "polynomial"))
        try:
            poly = tuple(self.sigma_poly)
        except TypeError:
            raise ValueError(f"sigma_poly must be a sequence of coefficients, "
                             f"got {self.sigma_poly!r}") from None
        for i, c in enumerate(poly):
            if not math.isfinite(v.check_real(f"sigma_poly[{i}]", c)):
                raise ValueError(f"sigma_poly[{i}] must be finite, got {c!r}")
        object.__setattr__(self, "sigma_poly", tuple(float(c) for c in poly))
        if self.variation == "polynomial" and not poly:
            raise ValueError("sigma_poly must hold at least one coefficient when "
                             "variation='polynomial', got ()")
        if self.variation != "polynomial" and poly:
            raise ValueError(f"sigma_poly is only used with variation='polynomial' "
                             f"(variation={self.variation!r}), got {poly!r}")
        v.check_choice("pulse_variation", self.pulse_variation, ("absolute", "proportional"))
        v.check_nonnegative("g_min_us", self.g_min_us)
        if not v.check_real("g_max_us", self.g_max_us) > self.g_min_us:
            raise ValueError(
                f"g_max_us must be > g_min_us ({self.g_min_us}), got {self.g_max_us!r}")


def _clip(g: jax.Array, device: DeviceConfig) -> jax.Array:
    return jnp.clip(g, 0.0, 1.0) if device.clip else g


def polyval(coeffs: Sequence[float], x: jax.Array) -> jax.Array:
    """``c0 + c1 x + c2 x^2 + ...`` (Horner; ascending coefficients)."""
    out = jnp.zeros_like(x) + coeffs[-1]
    for c in reversed(coeffs[:-1]):
        out = out * x + c
    return out


def program_std(target: jax.Array, device: DeviceConfig) -> jax.Array:
    """Std of one open-loop write towards ``target`` (same shape as ``target``)."""
    if device.variation == "proportional":
        return device.sigma_program * jnp.abs(target)
    if device.variation == "polynomial":
        x = jnp.clip(target, 0.0, 1.0)
        return jnp.maximum(polyval(device.sigma_poly, x), 0.0)
    return jnp.full_like(target, device.sigma_program)


def program(key: jax.Array, target: jax.Array, device: DeviceConfig) -> jax.Array:
    """One open-loop write of every device towards ``target`` (normalized).

    Returns ``target + sigma * eps`` with device-to-device variation, clipped to
    ``[0, 1]`` when ``device.clip``.
    """
    eps = _random.normal(key, jnp.shape(target), jnp.result_type(target, jnp.float32))
    return _clip(target + program_std(target, device) * eps, device)


def write_error_moments(target: jax.Array, device: DeviceConfig
                        ) -> tuple[jax.Array, jax.Array]:
    """Exact mean and std of one open-loop write's error ``program(key, target,
    device) - target`` (full-scale units; two arrays of ``target``'s shape).

    Without clipping the error is ``N(0, sigma^2)`` (``sigma`` =
    :func:`program_std`): mean 0, std ``sigma``. With ``device.clip`` it is the
    Gaussian clipped to ``[-t, 1 - t]`` (``t`` the target): with ``a = -t /
    sigma``, ``b = (1 - t) / sigma``, ``Phi``/``phi`` the standard normal cdf/pdf,

    * ``E[e]   = -t Phi(a) + (1 - t) Phi(-b) + sigma (phi(a) - phi(b))``,
    * ``E[e^2] = t^2 Phi(a) + (1 - t)^2 Phi(-b)
      + sigma^2 (Phi(b) - Phi(a) + a phi(a) - b phi(b))``.

    At ``t = 0`` the mean is ``sigma / sqrt(2 pi)`` (for ``sigma << 1``): the
    one-sided error of a device at ``g_min``.
    """
    t = jnp.asarray(target)
    t = t.astype(jnp.result_type(t, jnp.float32))
    sd = program_std(t, device)
    if not device.clip:
        return jnp.zeros_like(t), sd
    positive = sd > 0
    safe = jnp.where(positive, sd, jnp.ones_like(sd))
    lo, hi = -t, 1.0 - t
    a, b = lo / safe, hi / safe
    cdf_a, sf_b = jax.scipy.special.ndtr(a), jax.scipy.special.ndtr(-b)
    pdf_a, pdf_b = jax.scipy.stats.norm.pdf(a), jax.scipy.stats.norm.pdf(b)
    m1 = lo * cdf_a + hi * sf_b + safe * (pdf_a - pdf_b)
    inner = (1.0 - cdf_a - sf_b) + a * pdf_a - b * pdf_b
    m2 = lo * lo * cdf_a + hi * hi * sf_b + safe * safe * inner
    std = jnp.sqrt(jnp.maximum(m2 - m1 * m1, 0.0))
    # sigma = 0: a deterministic write to the clipped target.
    mean = jnp.where(positive, m1, jnp.clip(t, 0.0, 1.0) - t)
    return mean, jnp.where(positive, std, jnp.zeros_like(std))


def pulse(key: jax.Array, g: jax.Array, step: jax.Array, device: DeviceConfig) -> jax.Array:
    """One corrective write pulse that aims to move every device by ``step``.

    The achieved change is ``step + sigma_pulse * eps`` (cycle-to-cycle
    variation; proportional to ``|step|`` if ``pulse_variation`` says so).
    """
    eps = _random.normal(key, jnp.shape(g), jnp.result_type(g, jnp.float32))
    if device.pulse_variation == "proportional":
        noise = device.sigma_pulse * jnp.abs(step) * eps
    else:
        noise = device.sigma_pulse * eps
    return _clip(g + step + noise, device)


def read(key: jax.Array, g: jax.Array, device: DeviceConfig) -> jax.Array:
    """One read of every device: ``g + sigma_read * eps`` (not clipped: a read
    is a measurement, and a noisy measurement can fall outside the range)."""
    if device.sigma_read == 0.0:
        return g
    eps = _random.normal(key, jnp.shape(g), jnp.result_type(g, jnp.float32))
    return g + device.sigma_read * eps


# ----------------------------------------------------------------------------
# State-dependent sigma polynomials: from published fits to normalized units
# ----------------------------------------------------------------------------

def normalize_sigma_poly(coeffs_us: Sequence[float], g_min_us: float, g_max_us: float,
                         variable: Literal["g_us", "g_over_gmax"] = "g_us"
                         ) -> tuple[float, ...]:
    """Converts a published programming-std fit into normalized units.

    Args:
      coeffs_us: ascending coefficients of ``sigma`` in microsiemens, as a
        polynomial of ``G`` in microsiemens (``variable="g_us"``, e.g. CrossSim,
        aihwkit's CMO RRAM) or of ``G / g_max`` (``variable="g_over_gmax"``,
        e.g. aihwkit's PCM and NeuRRAM fits).
      g_min_us, g_max_us: the conductance range the device is used over.

    Returns:
      Ascending coefficients ``c`` such that ``sigma / (g_max - g_min) =
      sum_k c_k x^k`` with ``x = (G - g_min) / (g_max - g_min)``, the
      normalized conductance of :class:`DeviceConfig` (``sigma_poly``).
    """
    lo = v.check_nonnegative("g_min_us", g_min_us)
    hi = v.check_real("g_max_us", g_max_us)
    if not hi > lo:
        raise ValueError(f"g_max_us must be > g_min_us ({lo}), got {g_max_us!r}")
    v.check_choice("variable", variable, ("g_us", "g_over_gmax"))
    span = hi - lo
    poly = np.polynomial.Polynomial(np.asarray(coeffs_us, np.float64))
    if variable == "g_us":
        inner = np.polynomial.Polynomial([lo, span])
    else:
        inner = np.polynomial.Polynomial([lo / hi, span / hi])
    return tuple(float(c) for c in poly(inner).coef / span)


# ----------------------------------------------------------------------------
# Conductance drift
# ----------------------------------------------------------------------------

DriftModel = Literal["constant", "pcm"]

#: aihwkit clips ``g / g_max`` at this value before taking its log.
_PCM_X_MIN = 1e-7


@dataclasses.dataclass(frozen=True)
class DriftConfig:
    """Power-law conductance drift ``g(t) = g0 (t / t0)^-nu``.

    ``nu`` is drawn once per device at programming time (:func:`sample_nu`) and
    kept; :func:`apply_drift` then gives the conductance at any time ``t``.

    Attributes:
      model: ``"constant"`` (state-independent ``nu ~ N(nu_mean, nu_std)``,
        clipped at 0) or ``"pcm"`` (IBM aihwkit ``PCMLikeNoiseModel``, fitted to
        PCM data: ``mu_nu = clip(-0.0155 ln x + 0.0244, 0.049, 0.1)``,
        ``sigma_nu = clip(-0.0125 ln x - 0.0059, 0.008, 0.045)``,
        ``nu = |N(mu_nu, sigma_nu)|``, ``x = g / g_max`` at programming time;
        ``nu_mean``/``nu_std`` are not used).
      nu_mean, nu_std: state-independent drift exponent, default ``0.1 +- 0.05``
        (aihwkit's generic state-independent default, DEVICE_DATA.md).
      t0: reference time in seconds at which ``g = g0`` (aihwkit: 20 s). For
        ``t <= t0`` there is no drift. (aihwkit's ``t_inference`` counts from the
        end of programming and corresponds to ``t = t_inference + t0`` here.)
    """

    model: DriftModel = "constant"
    nu_mean: float = 0.1
    nu_std: float = 0.05
    t0: float = 20.0

    def __post_init__(self) -> None:
        v.check_choice("model", self.model, ("constant", "pcm"))
        v.check_nonnegative("nu_mean", self.nu_mean)
        v.check_nonnegative("nu_std", self.nu_std)
        v.check_positive("t0", self.t0)


def nu_stats(g: jax.Array, drift_cfg: DriftConfig) -> tuple[jax.Array, jax.Array]:
    """Mean and std of the Gaussian that ``nu`` is drawn from, per device
    (shape of ``g``; ``g`` is the normalized conductance at programming time)."""
    g = jnp.asarray(g, jnp.result_type(g, jnp.float32))
    if drift_cfg.model == "pcm":
        lx = jnp.log(jnp.maximum(jnp.abs(g), _PCM_X_MIN))
        mu = jnp.clip(-0.0155 * lx + 0.0244, 0.049, 0.1)
        sd = jnp.clip(-0.0125 * lx - 0.0059, 0.008, 0.045)
        return mu, sd
    return jnp.full_like(g, drift_cfg.nu_mean), jnp.full_like(g, drift_cfg.nu_std)


def sample_nu(key: jax.Array, g: jax.Array, drift_cfg: DriftConfig) -> jax.Array:
    """Draws the drift exponent ``nu >= 0`` of every device (shape of ``g``).

    ``"constant"``: ``max(N(nu_mean, nu_std), 0)``; ``"pcm"``:
    ``|N(mu_nu(x), sigma_nu(x))|`` as aihwkit does.
    """
    mu, sd = nu_stats(g, drift_cfg)
    nu = mu + sd * _random.normal(key, mu.shape, mu.dtype)
    return jnp.abs(nu) if drift_cfg.model == "pcm" else jnp.maximum(nu, 0.0)


def _check_time(name: str, t: object) -> None:
    if not isinstance(t, jax.core.Tracer) and np.ndim(t) == 0:
        v.check_nonnegative(name, t)


def apply_drift(g: jax.Array, nu: jax.Array, t: float | jax.Array,
                drift_cfg: DriftConfig) -> jax.Array:
    """Conductance at time ``t`` (seconds): ``g (max(t, t0) / t0)^-nu``.

    Drift acts on the normalized conductance (the part above ``g_min``);
    ``log(g(t) / g) = -nu log(t / t0)`` for ``t >= t0``.
    """
    _check_time("t", t)
    t = jnp.asarray(t, jnp.result_type(g, jnp.float32))
    ratio = jnp.maximum(t, drift_cfg.t0) / drift_cfg.t0
    return g * jnp.power(ratio, -nu)


def pcm_read_noise_std(g: jax.Array, t: float | jax.Array, g_prog: jax.Array | None = None,
                       t_read: float = 250e-9) -> jax.Array:
    """Std of PCM 1/f read noise accumulated up to time ``t`` (aihwkit
    ``PCMLikeNoiseModel``): ``|g| Q_s sqrt(ln((t + t_read) / (2 t_read)))``,
    ``Q_s = min(0.0088 / max(x^0.65, 1e-3), 0.2)``, ``x = |g_prog|`` (normalized,
    the level at programming; default ``g``). Full-scale units, shape of ``g``.
    About 3.7 % of ``g`` at ``x = 1`` after 1 s."""
    _check_time("t", t)
    v.check_positive("t_read", t_read)
    g = jnp.asarray(g, jnp.result_type(g, jnp.float32))
    x = jnp.abs(g if g_prog is None else jnp.asarray(g_prog, g.dtype))
    q_s = jnp.minimum(0.0088 / jnp.maximum(jnp.power(x, 0.65), 1e-3), 0.2)
    t = jnp.asarray(t, g.dtype)
    log_term = jnp.maximum(jnp.log((t + t_read) / (2.0 * t_read)), 0.0)
    return jnp.abs(g) * q_s * jnp.sqrt(log_term)


def pcm_read_noise(key: jax.Array, g: jax.Array, t: float | jax.Array,
                   g_prog: jax.Array | None = None, t_read: float = 250e-9) -> jax.Array:
    """One read with PCM 1/f noise (:func:`pcm_read_noise_std`), not clipped."""
    sd = pcm_read_noise_std(g, t, g_prog, t_read)
    return g + sd * _random.normal(key, sd.shape, sd.dtype)


# ----------------------------------------------------------------------------
# Drift of the physical conductance
# ----------------------------------------------------------------------------

def to_physical(g: jax.Array, device: DeviceConfig) -> jax.Array:
    """Normalized conductance -> microsiemens: ``g_min + g (g_max - g_min)``."""
    return device.g_min_us + jnp.asarray(g) * (device.g_max_us - device.g_min_us)


def to_normalized(g_us: jax.Array, device: DeviceConfig) -> jax.Array:
    """Microsiemens -> normalized conductance: ``(G - g_min) / (g_max - g_min)``."""
    return (jnp.asarray(g_us) - device.g_min_us) / (device.g_max_us - device.g_min_us)


def sample_nu_physical(key: jax.Array, g: jax.Array, drift_cfg: DriftConfig,
                       device: DeviceConfig) -> jax.Array:
    """:func:`sample_nu` with the level taken from the physical conductance:
    ``x = G / g_max`` (``G`` the programmed conductance, ``g_min`` included),
    as the published PCM model defines it. ``g`` is normalized; shape of ``g``.
    Equal to :func:`sample_nu` when ``g_min = 0``."""
    g = jnp.asarray(g, jnp.result_type(g, jnp.float32))
    x = to_physical(g, device) / device.g_max_us
    return sample_nu(key, x.astype(g.dtype), drift_cfg)


def drift_conductance(g: jax.Array, nu: jax.Array, t_after: float | jax.Array,
                      drift_cfg: DriftConfig, device: DeviceConfig) -> jax.Array:
    """Normalized conductance ``t_after`` seconds after programming.

    Drift acts on the physical conductance, ``g_min`` included:
    ``G(t) = G_prog ((t_after + t0) / t0)^-nu`` (the time counted from the end
    of programming, as aihwkit's ``t_inference``; no drift at ``t_after = 0``),
    returned in normalized units ``(G(t) - g_min) / (g_max - g_min)``, which
    falls below 0 when a device drifts under ``g_min`` (a differential pair
    reads ``G+ - G-``, where ``g_min`` cancels). Shape of ``g``.
    """
    _check_time("t_after", t_after)
    g = jnp.asarray(g, jnp.result_type(g, jnp.float32))
    t = jnp.asarray(t_after, g.dtype) + drift_cfg.t0
    g_us = apply_drift(to_physical(g, device), nu, t, drift_cfg)
    return to_normalized(g_us, device).astype(g.dtype)


def drift_moments(g0_us: float, t_after: float, drift_cfg: DriftConfig,
                  g_max_us: float = 1.0) -> tuple[float, float]:
    """Closed-form mean and std of ``G(t)`` (microsiemens) of a device
    programmed exactly to ``g0_us``, over the draw of ``nu`` (float64, eager).

    With ``L = ln((t_after + t0) / t0)`` and ``nu`` drawn from ``N(mu, sd)``
    (:func:`nu_stats` at level ``x = g0_us / g_max_us``), ``E[exp(-k L nu')]`` is, for ``nu' = max(nu, 0)``
    (``"constant"``), ``Phi(-mu/sd) + exp(-k L mu + (k L sd)^2 / 2)
    Phi((mu - k L sd^2) / sd)`` and, for ``nu' = |nu|`` (``"pcm"``), the same
    second term plus ``exp(k L mu + (k L sd)^2 / 2) Phi(-(mu + k L sd^2) / sd)``;
    ``k = 1`` gives the mean, ``k = 2`` the second moment.
    """
    from scipy import stats
    _check_time("t_after", t_after)
    level = g0_us / g_max_us
    mu, sd = (float(a) for a in nu_stats(jnp.asarray(level, jnp.float32), drift_cfg))
    big_l = math.log((t_after + drift_cfg.t0) / drift_cfg.t0)

    def moment(k: float) -> float:
        a = k * big_l
        if sd == 0.0:
            return math.exp(-a * (abs(mu) if drift_cfg.model == "pcm" else max(mu, 0.0)))
        pos = math.exp(-a * mu + 0.5 * (a * sd) ** 2) * stats.norm.cdf((mu - a * sd * sd) / sd)
        if drift_cfg.model == "pcm":
            return pos + math.exp(a * mu + 0.5 * (a * sd) ** 2) * stats.norm.cdf(
                -(mu + a * sd * sd) / sd)
        return pos + stats.norm.cdf(-mu / sd)

    m1, m2 = moment(1.0), moment(2.0)
    return float(g0_us * m1), float(g0_us * math.sqrt(max(m2 - m1 * m1, 0.0)))


def drift_compensation(g_ref: jax.Array, g_t: jax.Array, device: DeviceConfig,
                       axis: int | Sequence[int] | None = None) -> jax.Array:
    """Global drift compensation (as aihwkit's ``GlobalDriftCompensation``):
    the factor ``alpha = sum G_ref / sum G(t)`` by which the digital periphery
    multiplies a layer's outputs, from two calibration reads of the whole
    array: ``g_ref`` right after programming, ``g_t`` at inference time
    (normalized; the sums are of physical conductances, ``g_min`` included).
    Exact when every device drifts by the same factor. Summed over ``axis``
    (default all)."""
    ref = jnp.sum(to_physical(g_ref, device), axis=axis)
    now = jnp.sum(to_physical(g_t, device), axis=axis)
    tiny = jnp.finfo(jnp.result_type(now, jnp.float32)).tiny
    return ref / jnp.maximum(now, tiny)


# ----------------------------------------------------------------------------
# Stuck-at faults
# ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class StuckAtConfig:
    """Probabilities that a device is stuck (drawn once per device).

    Attributes:
      p_stuck_min: probability of a device stuck at ``g_min`` (normalized 0;
        high-resistance state).
      p_stuck_max: probability of a device stuck at ``g_max`` (normalized 1;
        low-resistance state). The two are exclusive: ``p_stuck_min +
        p_stuck_max <= 1``.
    """

    p_stuck_min: float = 0.0
    p_stuck_max: float = 0.0

    def __post_init__(self) -> None:
        v.check_range("p_stuck_min", self.p_stuck_min, 0.0, 1.0)
        v.check_range("p_stuck_max", self.p_stuck_max, 0.0, 1.0)
        if self.p_stuck_min + self.p_stuck_max > 1.0:
            raise ValueError(
                f"p_stuck_min + p_stuck_max must be in [0, 1], got "
                f"{self.p_stuck_min} + {self.p_stuck_max}")


#: HfO2 RRAM test chip (C.-Y. Chen et al., IEEE TC 2015, as cited by L. Chen et
#: al., DATE 2017): 1.75 % stuck in the high-resistance state (at g_min), 9.04 %
#: in the low-resistance state (at g_max).
STUCK_AT_CHEN2015 = StuckAtConfig(p_stuck_min=0.0175, p_stuck_max=0.0904)


class StuckFaults(NamedTuple):
    """Per-device fault map (bool arrays of one shape; never both True)."""

    at_min: jax.Array
    at_max: jax.Array


def sample_stuck(key: jax.Array, shape: Sequence[int], faults: StuckAtConfig) -> StuckFaults:
    """Draws which devices are stuck: one uniform per device, ``u < p_min`` ->
    at ``g_min``, ``p_min <= u < p_min + p_max`` -> at ``g_max``."""
    u = jax.random.uniform(key, tuple(shape))
    at_min = u < faults.p_stuck_min
    at_max = (u >= faults.p_stuck_min) & (u < faults.p_stuck_min + faults.p_stuck_max)
    return StuckFaults(at_min, at_max)


def apply_stuck(g: jax.Array, stuck: StuckFaults) -> jax.Array:
    """Forces stuck devices to 0 (``at_min``) or 1 (``at_max``); shape of ``g``."""
    g = jnp.asarray(g)
    return jnp.where(stuck.at_min, jnp.zeros_like(g), jnp.where(stuck.at_max, jnp.ones_like(g), g))


def stuck_from_uniform(u: jax.Array, p_stuck_min: float | jax.Array,
                       p_stuck_max: float | jax.Array) -> StuckFaults:
    """The fault map of :func:`sample_stuck` from given uniforms ``u`` in
    ``[0, 1)``, with rates that may be traced (a rate in a Monte-Carlo state):
    ``u < p_min`` at ``g_min``, ``p_min <= u < p_min + p_max`` at ``g_max``. The
    same ``u`` at growing rates gives nested fault sets."""
    at_min = u < p_stuck_min
    at_max = (u >= p_stuck_min) & (u < p_stuck_min + p_stuck_max)
    return StuckFaults(at_min, at_max)


# ----------------------------------------------------------------------------
# Finite levels
# ----------------------------------------------------------------------------

MAX_LEVEL_BITS = 16


@functools.lru_cache(maxsize=64)
def level_table(bits: int, dtype_name: str = "float32") -> np.ndarray:
    """The ``2^bits`` programmable levels ``l / (2^bits - 1)``, ``l = 0..2^bits-1``,
    correctly rounded by NumPy (XLA's float division is not always correctly
    rounded, so levels are looked up rather than divided)."""
    v.check_int("bits", bits, 1, MAX_LEVEL_BITS)
    dt = np.dtype(dtype_name)
    n = 2 ** bits
    return (np.arange(n, dtype=dt) / dt.type(n - 1)).astype(dt)


def snap_to_levels(g: jax.Array, bits: int) -> jax.Array:
    """Snaps conductances to the nearest of ``2^bits`` evenly spaced levels in
    ``[0, 1]`` (values outside are clipped first). Shape and dtype of ``g``."""
    v.check_int("bits", bits, 1, MAX_LEVEL_BITS)
    g = jnp.asarray(g)
    dt = jnp.result_type(g, jnp.float32)
    top = 2 ** bits - 1
    idx = jnp.round(jnp.clip(g.astype(dt), 0.0, 1.0) * top).astype(jnp.int32)
    table = jnp.asarray(level_table(bits, np.dtype(dt).name))
    return table[idx].astype(g.dtype) if jnp.issubdtype(g.dtype, jnp.floating) else table[idx]


# ----------------------------------------------------------------------------
# Spatially correlated variation
# ----------------------------------------------------------------------------

#: Largest crossbar (rows * cols) whose correlation is factorized (an n x n
#: eigen-decomposition).
MAX_SPATIAL_SITES = 4096


@dataclasses.dataclass(frozen=True)
class SpatialConfig:
    """Spatially correlated variation over a ``rows x cols`` crossbar.

    The unit-variance field is ``sqrt(r) S + sqrt(1 - r) E``: ``S`` a
    multivariate normal over the array with the spherical correlation
    ``rho(d) = 1 - 1.5 d/theta + 0.5 (d/theta)^3`` for ``d < theta`` and 0 beyond
    (``d`` the Euclidean distance in device pitches), ``E`` independent per device,
    ``r = systematic_ratio`` the systematic share of the variance. The
    correlation between two devices at distance ``d > 0`` is ``r rho(d)``.

    Attributes:
      rows, cols: crossbar size (``rows * cols <= 4096``).
      theta: correlation range in device pitches (> 0).
      systematic_ratio: ``r`` in ``[0, 1]``.
    """

    rows: int = 32
    cols: int = 32
    theta: float = 8.0
    systematic_ratio: float = 0.5

    def __post_init__(self) -> None:
        v.check_int("rows", self.rows, 1, MAX_SPATIAL_SITES)
        v.check_int("cols", self.cols, 1, MAX_SPATIAL_SITES // self.rows)
        v.check_positive("theta", self.theta)
        v.check_range("systematic_ratio", self.systematic_ratio, 0.0, 1.0)


def spherical_correlation(d: np.ndarray | jax.Array, theta: float) -> np.ndarray | jax.Array:
    """``rho(d) = 1 - 1.5 h + 0.5 h^3`` for ``h = d / theta < 1``, else 0."""
    xp = jnp if isinstance(d, jax.Array) else np
    h = xp.abs(d) / theta
    return xp.where(h < 1.0, 1.0 - 1.5 * h + 0.5 * h ** 3, 0.0)


def grid_distances(rows: int, cols: int) -> np.ndarray:
    """Euclidean distances (device pitches) between all sites of a ``rows x cols``
    grid, row-major, shape ``(rows*cols, rows*cols)``."""
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    pts = np.stack([r.ravel(), c.ravel()], axis=1).astype(np.float64)
    return np.sqrt(((pts[:, None, :] - pts[None, :, :]) ** 2).sum(-1))


@functools.lru_cache(maxsize=16)
def spatial_factor(spatial: SpatialConfig) -> np.ndarray:
    """A factor ``F`` (float32, ``(n, n)``, ``n = rows * cols``) with
    ``F F^T = C``, ``C`` the spherical correlation over the grid, from a
    symmetric eigen-decomposition (tiny negative eigenvalues from round-off are
    set to 0). Cached per config."""
    corr = spherical_correlation(grid_distances(spatial.rows, spatial.cols), spatial.theta)
    w, q = np.linalg.eigh(corr)
    return (q * np.sqrt(np.clip(w, 0.0, None))[None, :]).astype(np.float32)


def spatial_field(key: jax.Array, spatial: SpatialConfig,
                  batch_shape: Sequence[int] = ()) -> jax.Array:
    """Unit-variance correlated fields, shape ``(*batch_shape, rows, cols)``
    (independent across the batch: one per crossbar)."""
    k_sys, k_ind = jax.random.split(key)
    n = spatial.rows * spatial.cols
    batch_shape = tuple(batch_shape)
    factor = jnp.asarray(spatial_factor(spatial))
    z = _random.normal(k_sys, batch_shape + (n,))
    systematic = jnp.einsum("ij,...j->...i", factor, z, precision=jax.lax.Precision.HIGHEST)
    independent = _random.normal(k_ind, batch_shape + (n,))
    r = spatial.systematic_ratio
    field = math.sqrt(r) * systematic + math.sqrt(1.0 - r) * independent
    return field.reshape(batch_shape + (spatial.rows, spatial.cols))


def tiled_spatial_field(key: jax.Array, shape: Sequence[int], spatial: SpatialConfig) -> jax.Array:
    """A unit-variance correlated field of any ``shape``.

    The last two axes are the crossbar's rows and columns (a ``(in, out)``
    kernel; reshape conv kernels to ``(..., kh*kw*cin, cout)`` first), tiled by
    independent ``rows x cols`` crossbars and cropped; leading axes (slices,
    pair members) are independent crossbars. 0-d and 1-d shapes are laid out as
    a single row.
    """
    shape = tuple(int(d) for d in shape)
    if len(shape) < 2:
        flat = tiled_spatial_field(key, (1, int(np.prod(shape, dtype=np.int64))), spatial)
        return flat.reshape(shape)
    *batch, big_r, big_c = shape
    tr = -(-big_r // spatial.rows)
    tc = -(-big_c // spatial.cols)
    f = spatial_field(key, spatial, tuple(batch) + (tr, tc))       # (*b, tr, tc, rows, cols)
    nb = len(batch)
    f = jnp.moveaxis(f, nb + 1, nb + 2)                              # (*b, tr, rows, tc, cols)
    f = f.reshape(tuple(batch) + (tr * spatial.rows, tc * spatial.cols))
    return f[..., :big_r, :big_c]


# ----------------------------------------------------------------------------
# Effects: fn(key, g) -> g, composed with chain()
# ----------------------------------------------------------------------------

Effect = Callable[[jax.Array, jax.Array], jax.Array]


def chain(*effects: Effect) -> Effect:
    """Composes effects left to right; effect ``i`` gets ``fold_in(key, i)``."""
    def apply(key: jax.Array, g: jax.Array) -> jax.Array:
        for i, effect in enumerate(effects):
            g = effect(jax.random.fold_in(key, i), g)
        return g
    return apply


def programming(device: DeviceConfig) -> Effect:
    """Effect: one open-loop write towards ``g`` (:func:`program`)."""
    return lambda key, g: program(key, g, device)


def reading(device: DeviceConfig) -> Effect:
    """Effect: one read with the device's read noise (:func:`read`)."""
    return lambda key, g: read(key, g, device)


def drifting(drift_cfg: DriftConfig, t: float) -> Effect:
    """Effect: draw ``nu`` from the incoming (programmed) ``g`` and drift to ``t``."""
    _check_time("t", t)
    return lambda key, g: apply_drift(g, sample_nu(key, g, drift_cfg), t, drift_cfg)


def stuck_at(faults: StuckAtConfig) -> Effect:
    """Effect: draw a fault map and force stuck devices."""
    return lambda key, g: apply_stuck(g, sample_stuck(key, jnp.shape(g), faults))


def finite_levels(bits: int) -> Effect:
    """Effect: snap to ``2^bits`` levels (deterministic; the key is unused)."""
    v.check_int("bits", bits, 1, MAX_LEVEL_BITS)
    return lambda key, g: snap_to_levels(g, bits)


def spatial_variation(spatial: SpatialConfig, sigma: float) -> Effect:
    """Effect: add ``sigma`` (full-scale units) times a correlated field
    (:func:`tiled_spatial_field`), not clipped."""
    v.check_nonnegative("sigma", sigma)
    return lambda key, g: g + sigma * tiled_spatial_field(key, jnp.shape(g), spatial).astype(
        jnp.result_type(g, jnp.float32))


# ----------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DevicePreset:
    """A device model with its drift and faults, and where the figures come from.

    The state-dependent presets (``variation="polynomial"``) carry the spread
    *left after* the hardware's own closed-loop programming, as the cited
    simulators use it: :func:`program` with them models a programmed device in
    one step. For an explicit write-verify loop give the device a pulse and read
    noise (``dataclasses.replace(p.device, sigma_pulse=..., sigma_read=...)``).

    The physical presets clip conductances to ``[0, 1]`` (``clip=True``: a
    device cannot leave its range), so devices at ``g_min`` or ``g_max`` err
    one way only and the weight error has a bias: for a 128 x 128 Gaussian
    kernel at ``sigma = 0.1``, -0.016 ``s`` (towards zero) on differential
    1-bit devices, whose idle device errs upwards, and +0.024 ``s`` (away from
    zero) on the default sign-bit mapping, whose level-0 slices err upwards.
    :func:`swimjax.programming.open_loop_weight_error` computes it for any
    weights, mapping and device. The ``"swim"`` preset is SWIM's unclipped,
    zero-mean Gaussian.
    """

    device: DeviceConfig
    drift: DriftConfig | None = None
    faults: StuckAtConfig | None = None
    source: str = ""


def _poly_device(name: str, coeffs_us: Sequence[float], g_min_us: float, g_max_us: float,
                 variable: Literal["g_us", "g_over_gmax"]) -> DeviceConfig:
    poly = normalize_sigma_poly(coeffs_us, g_min_us, g_max_us, variable)
    return DeviceConfig(sigma_program=0.0, variation="polynomial", sigma_poly=poly, clip=True,
                        g_min_us=g_min_us, g_max_us=g_max_us, name=name)


def _ron_onoff(r_on_ohm: float, on_off: float) -> tuple[float, float]:
    """``(g_min, g_max)`` in microsiemens from ``R_on`` and the on/off ratio."""
    g_max = 1e6 / r_on_ohm
    return g_max / on_off, g_max


def _build_presets() -> dict[str, DevicePreset]:
    p: dict[str, DevicePreset] = {}
    # PCM, 1 M devices (Joshi et al., Nat. Commun. 2020; Nandakumar 2019) as fitted
    # in IBM aihwkit inference/noise/pcm.py (PCMLikeNoiseModel): sigma = 0.26348 +
    # 1.9650 x - 1.1731 x^2 uS, x = g/g_max, g_max = 25 uS (g_min 0); drift
    # mu_nu/sigma_nu(x) with t0 = 20 s from the same model.
    p["pcm"] = DevicePreset(
        _poly_device("pcm", (0.26348, 1.9650, -1.1731), 0.0, 25.0, "g_over_gmax"),
        drift=DriftConfig(model="pcm", t0=20.0),
        source="IBM aihwkit PCMLikeNoiseModel (Joshi et al., Nat. Commun. 2020)")
    # Same PCM data, Sandia CrossSim simulator/devices/custom/PCM_Joshi.py:
    # sigma = -0.00178767 G^2 + 0.07585724 G + 0.28638599 uS, 0.25-25 uS (on/off 100).
    p["pcm_crosssim"] = DevicePreset(
        _poly_device("pcm_crosssim", (0.28638599, 0.07585724, -0.00178767), 0.25, 25.0, "g_us"),
        source="Sandia CrossSim PCM_Joshi (Joshi et al., Nat. Commun. 2020)")
    # HfOx/CMO RRAM, identical-pulse loop with a 2 % acceptance band: IBM aihwkit
    # inference/noise/reram.py (ReRamCMONoiseModel): sigma = 0.0112185391 +
    # 0.01129027418 G uS over 8-90 uS (DEVICE_DATA.md).
    p["rram"] = DevicePreset(
        _poly_device("rram", (0.0112185391, 0.01129027418), 8.0, 90.0, "g_us"),
        source="IBM aihwkit ReRamCMONoiseModel, 2% acceptance band")
    # Same device, 0.2 % acceptance band: sigma = 0.00081107 + 0.00106879 G uS.
    p["rram_fine"] = DevicePreset(
        _poly_device("rram_fine", (0.00081107, 0.00106879), 8.0, 90.0, "g_us"),
        source="IBM aihwkit ReRamCMONoiseModel, 0.2% acceptance band")
    # NeuRRAM (Wan et al., Nature 2022) as fitted in aihwkit reram.py
    # (ReRamWan2022NoiseModel), t = 1 s: 0.348 + 16.030 x - 43.853 x^2 + 45.393 x^3
    # - 16.815 x^4 uS, x = g/g_max, g_max = 40 uS.
    p["rram_neurram"] = DevicePreset(
        _poly_device("rram_neurram", (0.348, 16.030, -43.853, 45.393, -16.815), 0.0, 40.0,
                     "g_over_gmax"),
        source="IBM aihwkit ReRamWan2022NoiseModel (Wan et al., Nature 2022), t = 1 s")
    # RRAM, gate-voltage incremental programming (Milo et al., IRPS 2021), Sandia
    # CrossSim RRAM_Milo.py: sigma = max(-0.009107 G + 4.782321, 0) uS, 50-225 uS.
    p["rram_milo"] = DevicePreset(
        _poly_device("rram_milo", (4.782321, -0.009107), 50.0, 225.0, "g_us"),
        source="Sandia CrossSim RRAM_Milo (Milo et al., IRPS 2021)")
    # FeFET 22 nm (GlobalFoundries): R_on 240 kOhm, on/off 100 (NeuroSim V1.3 manual,
    # Table IV). DEVICE_DATA.md has no programming-variation figure for it: the
    # sigma_program of 0.1 full scale is SWIM's lower sigma_d, a placeholder to
    # replace with measured data.
    lo, hi = _ron_onoff(240e3, 100.0)
    p["fefet"] = DevicePreset(
        DeviceConfig(sigma_program=0.1, clip=True, g_min_us=lo, g_max_us=hi, name="fefet"),
        source="NeuroSim V1.3 Table IV (range); sigma_program placeholder 0.1 (SWIM)")
    # STT-MRAM 22 nm (Intel): R_on 1.4 kOhm, on/off 2.8 (NeuroSim V1.3 Table IV);
    # binary device (use device_bits=1). Same sigma placeholder as FeFET.
    lo, hi = _ron_onoff(1.4e3, 2.8)
    p["stt_mram"] = DevicePreset(
        DeviceConfig(sigma_program=0.1, clip=True, g_min_us=lo, g_max_us=hi,
                     name="stt_mram"),
        source="NeuroSim V1.3 Table IV (range); sigma_program placeholder 0.1 (SWIM)")
    # SWIM (Yan, Hu, Shi, DAC 2022, reference code): sigma_d = 0.1 (to 0.3) of full
    # scale before write-verify, unclipped Gaussian; sigma_wv = 0.03 after it (a
    # write-verify figure, see swimjax.write_verify.statistical); 8-bit weights on
    # 1-bit devices.
    p["swim"] = DevicePreset(
        DeviceConfig(sigma_program=0.1, clip=False, name="swim"),
        source="SWIM (Yan, Hu, Shi, DAC 2022): sigma_d 0.1-0.3, sigma_wv 0.03")
    return p


#: Device presets by name; each carries its source (see comments in the code).
PRESETS: dict[str, DevicePreset] = _build_presets()


def preset(name: str) -> DevicePreset:
    """The preset called ``name`` (one of :data:`PRESETS`)."""
    v.check_choice("name", name, tuple(PRESETS))
    return PRESETS[name]


# ----------------------------------------------------------------------------
# Preset files and names
# ----------------------------------------------------------------------------

_PRESET_KEYS = ("name", "source", "device", "drift", "faults")
#: Keys of a preset file's ``device`` object beyond the DeviceConfig fields: a
#: published fit in microsiemens, converted with :func:`normalize_sigma_poly`.
_POLY_US_KEYS = ("sigma_poly_us", "sigma_poly_variable")


def preset_names() -> tuple[str, ...]:
    """The names of the built-in presets (:data:`PRESETS`), sorted."""
    return tuple(sorted(PRESETS))


def _section(path: str, name: str, value: Any, cls: type) -> Any:
    """One object of a preset file as ``cls``; errors name the file and key."""
    if not isinstance(value, dict):
        raise ValueError(f"{path}: {name} must be a JSON object of {cls.__name__} fields, "
                         f"got {value!r}")
    fields = {f.name for f in dataclasses.fields(cls)}
    allowed = fields | (set(_POLY_US_KEYS) if cls is DeviceConfig else set())
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise ValueError(f"{path}: unknown key {name}.{unknown[0]} (allowed in {name}: "
                         f"{sorted(allowed)})")
    kwargs = dict(value)
    if cls is DeviceConfig and "sigma_poly_us" in kwargs:
        if "sigma_poly" in kwargs:
            raise ValueError(f"{path}: give device.sigma_poly or device.sigma_poly_us, not both")
        coeffs = kwargs.pop("sigma_poly_us")
        variable = kwargs.pop("sigma_poly_variable", "g_us")
        try:
            kwargs["sigma_poly"] = normalize_sigma_poly(
                coeffs, kwargs.get("g_min_us", 0.0), kwargs.get("g_max_us", 1.0), variable)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path}: device.sigma_poly_us: {err}") from None
        kwargs.setdefault("variation", "polynomial")
        kwargs.setdefault("sigma_program", 0.0)
    elif cls is DeviceConfig and "sigma_poly_variable" in kwargs:
        raise ValueError(f"{path}: device.sigma_poly_variable needs device.sigma_poly_us")
    if cls is DeviceConfig and isinstance(kwargs.get("sigma_poly"), list):
        kwargs["sigma_poly"] = tuple(kwargs["sigma_poly"])
    for k, val in kwargs.items():
        if isinstance(val, list):
            kwargs[k] = tuple(val)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path}: {name}: {err}") from None


def load_preset(path: str | os.PathLike) -> DevicePreset:
    """A :class:`DevicePreset` from a user's JSON file, validated.

    The file holds one object::

        {"name": "my_rram", "source": "where the figures come from",
         "device": {"sigma_program": 0.05, "clip": true, "g_min_us": 5, "g_max_us": 50},
         "drift": {"model": "constant", "nu_mean": 0.02, "nu_std": 0.01, "t0": 20},
         "faults": {"p_stuck_min": 0.0175, "p_stuck_max": 0.0904}}

    ``device`` (required) takes the fields of :class:`DeviceConfig`, or a
    published fit in microsiemens as ``sigma_poly_us`` (ascending
    coefficients) with ``sigma_poly_variable`` ``"g_us"`` (default) or
    ``"g_over_gmax"`` (converted by :func:`normalize_sigma_poly`); ``drift``
    and ``faults`` (optional, ``null`` for none) the fields of
    :class:`DriftConfig` and :class:`StuckAtConfig`. ``name`` defaults to the
    file's stem.

    Raises:
      ValueError: not JSON, unknown keys (named, with the file), a negative
        sigma or rate, ``g_min_us >= g_max_us``, any value a config rejects;
        every message starts with the file's path.
      OSError: the file cannot be read.
    """
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        raw = json.loads(text)
    except ValueError as err:
        raise ValueError(f"{path}: not a JSON preset file: {err}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a preset file holds one JSON object, got "
                         f"{type(raw).__name__}")
    unknown = sorted(set(raw) - set(_PRESET_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown key {unknown[0]!r} (allowed: {list(_PRESET_KEYS)})")
    if "device" not in raw:
        raise ValueError(f"{path}: missing key 'device' (the DeviceConfig fields)")
    name = raw.get("name", os.path.splitext(os.path.basename(path))[0])
    source = raw.get("source", f"user preset file {os.path.basename(path)}")
    for key, val in (("name", name), ("source", source)):
        if not isinstance(val, str):
            raise ValueError(f"{path}: {key} must be a string, got {val!r}")
    dev = dict(raw["device"]) if isinstance(raw["device"], dict) else raw["device"]
    if isinstance(dev, dict):
        dev.setdefault("name", name)
    device = _section(path, "device", dev, DeviceConfig)
    drift = None if raw.get("drift") is None else _section(path, "drift", raw["drift"],
                                                           DriftConfig)
    faults = None if raw.get("faults") is None else _section(path, "faults", raw["faults"],
                                                             StuckAtConfig)
    return DevicePreset(device, drift=drift, faults=faults, source=source)


def resolve_preset(name_or_path: str) -> DevicePreset:
    """A built-in preset by name (:func:`preset_names`) or a preset file
    (:func:`load_preset`: a path ending in ``.json``)."""
    if not isinstance(name_or_path, str) or not name_or_path:
        raise ValueError(f"device must be a preset name {list(preset_names())} or a .json "
                         f"preset file, got {name_or_path!r}")
    if name_or_path.endswith(".json") or os.sep in name_or_path:
        return load_preset(name_or_path)
    if name_or_path not in PRESETS:
        raise ValueError(f"device must be one of {list(preset_names())} or a .json preset "
                         f"file, got {name_or_path!r}")
    return PRESETS[name_or_path]


def preset_to_dict(p: DevicePreset) -> dict[str, Any]:
    """A preset's every value as JSON-able data (the format :func:`load_preset`
    reads, with ``sigma_poly`` in normalized units): a results row's identity."""
    def obj(x: Any) -> Any:
        return None if x is None else {k: (list(val) if isinstance(val, tuple) else val)
                                       for k, val in dataclasses.asdict(x).items()}
    return {"name": p.device.name, "source": p.source, "device": obj(p.device),
            "drift": obj(p.drift), "faults": obj(p.faults)}


def describe_preset(p: DevicePreset) -> str:
    """A Markdown block of a preset's values and sources (for ``summary.md``)."""
    d = p.device
    lines = [f"### Device preset `{d.name}`", "", f"source: {p.source or 'not given'}", "",
             "| quantity | value |", "|---|---|",
             f"| conductance range | {d.g_min_us:.4g} to {d.g_max_us:.4g} uS |",
             f"| clipped to range | {'yes' if d.clip else 'no'} |"]
    if d.variation == "polynomial":
        poly = " + ".join(f"{c:.4g} x^{i}" if i else f"{c:.4g}"
                          for i, c in enumerate(d.sigma_poly))
        lines.append(f"| programming sigma (full scale, x = level) | max({poly}, 0) |")
    else:
        lines.append(f"| programming sigma ({d.variation}) | {d.sigma_program:g} |")
    lines.append(f"| pulse sigma ({d.pulse_variation}) | {d.sigma_pulse:g} |")
    lines.append(f"| read sigma | {d.sigma_read:g} |")
    if p.drift is None:
        lines.append("| drift | none |")
    elif p.drift.model == "pcm":
        lines.append(f"| drift | PCM, nu = abs(N(mu_nu(x), sigma_nu(x))), "
                     f"mu_nu = clip(-0.0155 ln x + 0.0244, 0.049, 0.1), "
                     f"sigma_nu = clip(-0.0125 ln x - 0.0059, 0.008, 0.045), "
                     f"x = G/g_max, t0 = {p.drift.t0:g} s |")
    else:
        lines.append(f"| drift | nu = max(N({p.drift.nu_mean:g}, {p.drift.nu_std:g}), 0), "
                     f"t0 = {p.drift.t0:g} s |")
    if p.faults is None:
        lines.append("| stuck-at faults | none in the preset |")
    else:
        lines.append(f"| stuck-at faults | {100 * p.faults.p_stuck_min:g} % at g_min, "
                     f"{100 * p.faults.p_stuck_max:g} % at g_max |")
    return "\n".join(lines) + "\n"

"""Write-verify programming: an explicit closed loop, SWIM's statistical
shortcut, and the normalized-write-cycle (NWC) cost metric.

Conductances are normalized (``0`` = ``g_min``, ``1`` = ``g_max``, see
:mod:`swimjax.devices`); tolerances and stds are in units of that full scale.

Explicit write-verify model
---------------------------
Every device is first written open-loop towards its target
(:func:`swimjax.devices.program`, device-to-device variation): **1 write
cycle**. An unverified device stops there. A verified device then enters a
closed loop; in each iteration it is

1. read once (:func:`swimjax.devices.read`, read noise), giving ``r``;
   ``e = r - target``;
2. if ``|e| <= tolerance`` it *passes* and is never touched again (a real
   verify does not re-read a passed cell, so a later noisy read cannot undo a
   pass, and the final spread is set by the read noise, as observed by
   Nminibapiel et al., IEEE EDL 2017);
3. else, if it has already received ``max_pulses`` corrective pulses, it
   *fails* (kept as it is, flagged in ``failed``);
4. else it receives one corrective pulse (:func:`swimjax.devices.pulse`,
   cycle-to-cycle variation) aiming at ``step = -gain(e) * e``: **1 more write
   cycle**.

So a device's cycle count is ``1 + pulses`` (at most ``1 + max_pulses``), and
the number of reads of a verified device equals its cycle count. The step rule
selects the scheme:

* ``"naive"`` — the identical-pulse closed loop (aihwkit's CMO-RRAM model,
  MemTorch's naive loop): every pulse aims straight at the target from the read
  value, ``gain = gain`` (1 by default: ``step = -(r - target)``).
* ``"two_step"`` — the two-step write-verify of Shim, Seo & Yu (Semicond. Sci.
  Technol. 2020): a *coarse* phase with large steps while the device is
  outside a wide band (``|e| > coarse_tolerance``: ``gain = gain``), then a
  *fine* phase with small steps inside it (``tolerance < |e| <=
  coarse_tolerance``: ``gain = fine_gain < gain``). The fine phase pays off
  when the pulse variation grows with the step
  (``DeviceConfig(pulse_variation="proportional")``): small steps are
  precise, large steps are fast.

Key schedule (part of the contract, so results can be reproduced and
audited): the open-loop write uses ``fold_in(key, 0)``; loop iteration ``i``
(1-based) uses ``split(fold_in(key, i))`` as ``(read_key, pulse_key)``, each
drawing noise for the whole array at once (see :func:`iteration_keys`).

Reaching a target residual
--------------------------
For the naive scheme with gain 1 and level-independent noise every corrective
pulse is a fresh draw around the target, so residual std, failure rate and
mean cycles have a closed form (:func:`naive_loop_stats`, exact without read
noise). :func:`config_for_sigma` uses it to pick the tolerance and pulse
budget that leave verified devices with SWIM's ``sigma_wv`` at a small failure
rate; the uniform-band rule ``tolerance = sqrt(3) sigma_wv`` misses it (0.036
instead of 0.030, 0.8 % failed, at ``sigma_pulse = 0.2`` and 20 pulses) because
failed devices keep the pulse's full spread.

Statistical model
-----------------
SWIM's shortcut: ``g = target + sigma * eps`` with ``sigma = sigma_unverified``
for unverified and ``sigma_verified`` for verified devices, the verified
residual optionally truncated at ``+-truncate`` (e.g. the verify tolerance).

NWC
---
``NWC = total write cycles of a scheme / total write cycles of full
write-verify``; ``speedup = 1 / NWC``. Measured from the explicit loop's cycle
counts (:func:`nwc`) or analytically from the fraction ``p`` of verified
weights when a verified device costs ``c`` cycles and an unverified one
``c_u`` (:func:`nwc_analytic`, :func:`nwc_fraction`):
``NWC = (p * c + (1 - p) * c_u) / c``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from swimjax import _random
from swimjax import _validation as v
from swimjax import devices

__all__ = [
    'pin_stuck',
    'LoopStats', 'MAX_CONFIG_PULSES', 'Scheme', 'WriteVerifyConfig', 'WriteVerifyResult',
    'config_for_sigma', 'explicit', 'fraction_verified', 'iteration_keys', 'naive_loop_stats',
    'nwc', 'nwc_analytic', 'nwc_fraction', 'program_key', 'speedup', 'statistical'
]

Scheme = Literal["naive", "two_step"]

# Per-device loop state is packed into one int32: ``(cycles << 2) | status``.
# One array instead of three keeps the loop body's memory traffic low.
_ACTIVE = 0  # verified, still in the loop
_PASSED = 1  # verified, within tolerance on its last read
_FAILED = 2  # verified, pulse budget spent while outside tolerance
_UNVERIFIED = 3  # written once, never verified
_STATUS_BITS = 2
_STATUS_MASK = (1 << _STATUS_BITS) - 1
_MAX_PULSES_LIMIT = (1 << (31 - _STATUS_BITS)) - 2


@dataclasses.dataclass(frozen=True)
class WriteVerifyConfig:
    """Explicit write-verify scheme (see the module docstring for the model).

    Attributes:
      tolerance: acceptance band: a verified device passes when
        ``|read - target| <= tolerance`` (normalized full-scale units, > 0).
      max_pulses: budget of corrective pulses per device (>= 1), not counting
        the initial open-loop write; a device costs at most ``1 + max_pulses``
        write cycles.
      scheme: ``"naive"`` (identical-pulse closed loop) or ``"two_step"``
        (coarse then fine, Shim, Seo & Yu 2020).
      gain: step gain of the naive loop and of the coarse phase,
        ``step = -gain * (read - target)``; in ``(0, 2)`` (a noiseless loop
        converges for any such gain; 1 aims exactly at the target).
      coarse_tolerance: ``two_step`` only: half-width of the band, in
        full-scale units, inside which the fine phase is used; must be
        ``> tolerance``. ``None`` means ``4 * tolerance``.
      fine_gain: ``two_step`` only: step gain of the fine phase, in
        ``(0, gain]``.
    """

    tolerance: float = 0.01
    max_pulses: int = 20
    scheme: Scheme = "naive"
    gain: float = 1.0
    coarse_tolerance: float | None = None
    fine_gain: float = 0.5

    def __post_init__(self) -> None:
        v.check_positive("tolerance", self.tolerance)
        v.check_int("max_pulses", self.max_pulses, 1, _MAX_PULSES_LIMIT)
        v.check_choice("scheme", self.scheme, ("naive", "two_step"))
        v.check_range("gain", self.gain, 0.0, 2.0, low_inclusive=False, high_inclusive=False)
        # The fine gain matters only for two_step, where it must not exceed the coarse one.
        v.check_range("fine_gain", self.fine_gain, 0.0,
                      self.gain if self.scheme == "two_step" else 2.0,
                      low_inclusive=False, high_inclusive=self.scheme == "two_step")
        if self.coarse_tolerance is not None:
            v.check_positive("coarse_tolerance", self.coarse_tolerance)
            if not self.coarse_tolerance > self.tolerance:
                raise ValueError(
                    f"coarse_tolerance must be > tolerance ({self.tolerance}), "
                    f"got {self.coarse_tolerance!r}")

    @property
    def coarse_band(self) -> float:
        """Half-width of the band where the fine gain applies (= ``tolerance``
        for the naive scheme, which has no fine phase)."""
        if self.scheme == "naive":
            return float(self.tolerance)
        if self.coarse_tolerance is None:
            return 4.0 * float(self.tolerance)
        return float(self.coarse_tolerance)

    @property
    def fine_step_gain(self) -> float:
        """Gain used inside ``coarse_band`` (= ``gain`` for the naive scheme)."""
        return float(self.gain if self.scheme == "naive" else self.fine_gain)


class WriteVerifyResult(NamedTuple):
    """Outcome of programming an array of devices.

    Attributes:
      g: programmed (true) normalized conductances, shape and dtype of target.
      cycles: int32 write cycles per device (``1`` open-loop write plus the
        corrective pulses), shape of target.
      failed: bool per device: verified, pulse budget spent, still outside
        tolerance on its last read.
    """

    g: jax.Array
    cycles: jax.Array
    failed: jax.Array


def iteration_keys(key: jax.Array, iteration: int | jax.Array) -> tuple[jax.Array, jax.Array]:
    """The ``(read_key, pulse_key)`` used by loop iteration ``iteration`` (>= 1)."""
    k_read, k_pulse = jax.random.split(jax.random.fold_in(key, iteration))
    return k_read, k_pulse


def program_key(key: jax.Array) -> jax.Array:
    """The key of the initial open-loop write."""
    return jax.random.fold_in(key, 0)


def _pack(cycles: jax.Array, status: jax.Array | int) -> jax.Array:
    return (cycles << _STATUS_BITS) | status


def _explicit_impl(key: jax.Array, target: jax.Array, verify_mask: jax.Array,
                   device: devices.DeviceConfig, config: WriteVerifyConfig) -> WriteVerifyResult:
    # Work on flat arrays: the same random numbers (threefry counters are the
    # row-major index), and XLA:CPU compiles rank >= 4 random draws very slowly.
    shape = target.shape
    target = target.reshape(-1)
    tol = jnp.asarray(config.tolerance, target.dtype)
    band = jnp.asarray(config.coarse_band, target.dtype)
    coarse_gain = jnp.asarray(config.gain, target.dtype)
    fine_gain = jnp.asarray(config.fine_step_gain, target.dtype)
    max_pulses = config.max_pulses

    g0 = devices.program(program_key(key), target, device)
    mask = jnp.broadcast_to(verify_mask, shape).reshape(-1)
    state0 = jnp.where(mask, _pack(1, _ACTIVE), _pack(1, _UNVERIFIED)).astype(jnp.int32)

    def cond(carry):
        _, _, state = carry
        return jnp.any((state & _STATUS_MASK) == _ACTIVE)

    def body(carry):
        it, g, state = carry
        k_read, k_pulse = iteration_keys(key, it)
        err = devices.read(k_read, g, device) - target
        abs_err = jnp.abs(err)
        status = state & _STATUS_MASK
        cycles = state >> _STATUS_BITS
        active = status == _ACTIVE
        inside = abs_err <= tol
        budget_left = cycles <= max_pulses  # pulses = cycles - 1 < max_pulses
        do_pulse = active & ~inside & budget_left
        new_status = jnp.where(
            active, jnp.where(inside, _PASSED, jnp.where(budget_left, _ACTIVE, _FAILED)), status)
        step = -jnp.where(abs_err > band, coarse_gain, fine_gain) * err
        g_new = jnp.where(do_pulse, devices.pulse(k_pulse, g, step, device), g)
        state_new = _pack(cycles + do_pulse.astype(jnp.int32), new_status)
        return it + 1, g_new, state_new

    _, g, state = jax.lax.while_loop(cond, body, (jnp.int32(1), g0, state0))
    return WriteVerifyResult(
        g=g.reshape(shape),
        cycles=(state >> _STATUS_BITS).reshape(shape),
        failed=((state & _STATUS_MASK) == _FAILED).reshape(shape),
    )


@functools.lru_cache(maxsize=64)
def _jitted(device: devices.DeviceConfig, config: WriteVerifyConfig) -> Callable[..., Any]:
    return jax.jit(functools.partial(_explicit_impl, device=device, config=config))


def _check_target(target: Any) -> jax.Array:
    if not hasattr(target, "dtype") or not hasattr(target, "shape"):
        target = jnp.asarray(target, jnp.float32)
    if not jnp.issubdtype(target.dtype, jnp.floating):
        raise ValueError(f"target must be a floating-point array, got dtype {target.dtype}")
    return target


def _check_mask(verify_mask: Any, target: jax.Array) -> Any:
    if verify_mask is None:
        return jnp.ones((), bool)
    if not hasattr(verify_mask, "dtype"):
        verify_mask = np.asarray(verify_mask)
    shape = np.shape(verify_mask)
    try:
        out = np.broadcast_shapes(shape, target.shape)
    except ValueError:
        out = None
    if out != tuple(target.shape):
        raise ValueError(
            f"verify_mask must have a shape broadcastable to target's {tuple(target.shape)}, "
            f"got {shape}")
    if verify_mask.dtype != jnp.bool_:
        raise ValueError(f"verify_mask must be a bool array, got dtype {verify_mask.dtype}")
    return verify_mask


def explicit(device: devices.DeviceConfig, config: WriteVerifyConfig
             ) -> Callable[[jax.Array, jax.Array, jax.Array | None], WriteVerifyResult]:
    """Returns ``fn(key, target, verify_mask=None) -> WriteVerifyResult``.

    ``fn`` runs the explicit write-verify of the module docstring on every
    device at once, in a single ``jax.lax.while_loop`` whose body is one
    elementwise pass over the arrays (plus the ``any`` of the loop condition).
    It is jitted (and can itself be used under ``jit``/``vmap``). Per-device
    loop state is packed into one int32 (cycles and status), so an iteration
    reads ``target``, ``g`` and that state, draws two normals per device (read
    and pulse noise) and writes ``g`` and the state; the loop runs as many
    iterations as its slowest verified device has reads (``max(cycles)``).
    ``benchmarks/write_verify.py`` measures an iteration against one plain
    elementwise pass over the same arrays.

    Args of ``fn``:
      key: PRNG key.
      target: normalized target conductances, any shape, floating dtype.
      verify_mask: bool array broadcastable to ``target.shape`` (so a
        weight-shaped mask broadcasts over the leading device axes of a
        ``(2, K, *w.shape)`` target); ``True`` = write-verify this device.
        ``None`` verifies every device.
    """
    if not isinstance(device, devices.DeviceConfig):
        raise ValueError(f"device must be a DeviceConfig, got {type(device).__name__}")
    if not isinstance(config, WriteVerifyConfig):
        raise ValueError(f"config must be a WriteVerifyConfig, got {type(config).__name__}")
    jitted = _jitted(device, config)

    def fn(key: jax.Array, target: jax.Array,
           verify_mask: jax.Array | None = None) -> WriteVerifyResult:
        target = _check_target(target)
        return jitted(key, target, _check_mask(verify_mask, target))

    fn.__doc__ = explicit.__doc__
    return fn


def _check_sigma(name: str, sigma: Any, shape: tuple[int, ...]) -> None:
    if isinstance(sigma, jax.core.Tracer):
        if np.broadcast_shapes(np.shape(sigma), shape) != shape:
            raise ValueError(f"{name} must broadcast to target's shape {shape}, "
                             f"got {np.shape(sigma)}")
        return
    arr = np.asarray(sigma, dtype=float)
    try:
        ok_shape = np.broadcast_shapes(arr.shape, shape) == shape
    except ValueError:
        ok_shape = False
    if not ok_shape:
        raise ValueError(f"{name} must broadcast to target's shape {shape}, got {arr.shape}")
    if not np.all(np.isfinite(arr) & (arr >= 0)):
        raise ValueError(f"{name} must be finite and >= 0, got {sigma!r}")


def statistical(key: jax.Array, target: jax.Array, verify_mask: jax.Array | None,
                sigma_unverified: float | jax.Array, sigma_verified: float | jax.Array,
                truncate: float | None = None) -> jax.Array:
    """SWIM's statistical write-verify: programmed conductances in one draw.

    ``g = target + sigma * eps``: ``sigma = sigma_unverified`` (open-loop
    write) where ``verify_mask`` is False and ``sigma_verified`` where it is
    True; for verified devices ``eps`` is a standard normal truncated to
    ``|sigma_verified * eps| < truncate`` when ``truncate`` is given (the
    verify tolerance), so the residual never exceeds it. No clipping to
    ``[0, 1]``: this is the error model, not the device.

    Args:
      key: PRNG key.
      target: normalized targets, any shape.
      verify_mask: bool, broadcastable to ``target`` (``None``: all verified).
      sigma_unverified, sigma_verified: stds in full-scale units (>= 0),
        scalars or arrays broadcastable to ``target``.
      truncate: optional bound (> 0, full-scale units) on the verified residual.

    Returns:
      Array of ``target``'s shape and dtype.
    """
    target = _check_target(target)
    mask = _check_mask(verify_mask, target)
    shape = tuple(target.shape)
    _check_sigma("sigma_unverified", sigma_unverified, shape)
    _check_sigma("sigma_verified", sigma_verified, shape)
    if truncate is not None:
        v.check_positive("truncate", truncate)
    return _statistical_impl(key, target, mask, sigma_unverified, sigma_verified, truncate)


@functools.partial(jax.jit, static_argnames=("truncate",))
def _statistical_impl(key, target, mask, sigma_unverified, sigma_verified, truncate):
    # Draws are flat (same numbers, much faster XLA:CPU compiles), then reshaped.
    dtype, shape, n = target.dtype, target.shape, target.size
    s_u = jnp.asarray(sigma_unverified, dtype)
    s_v = jnp.asarray(sigma_verified, dtype)
    if truncate is None:
        eps = _random.normal(key, shape, dtype)
        return target + jnp.where(mask, s_v, s_u) * eps
    k_u, k_v = jax.random.split(key)
    bound = jnp.asarray(truncate, dtype)
    # eps_v in (-truncate/s_v, truncate/s_v); s_v == 0 gives a zero residual.
    z = jnp.where(s_v > 0, bound / jnp.where(s_v > 0, s_v, 1), 1)
    z = jnp.broadcast_to(z, shape).reshape(-1)
    eps_v = jax.random.truncated_normal(k_v, -z, z, (n,), dtype).reshape(shape)
    res_v = jnp.clip(s_v * eps_v, -bound, bound)
    res_u = s_u * _random.normal(k_u, shape, dtype)
    return target + jnp.where(mask, res_v, res_u)


def _total(tree: Any) -> float:
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        raise ValueError("cycle counts must contain at least one array")
    return float(sum(np.sum(np.asarray(x, dtype=np.float64)) for x in leaves))


def nwc(cycles_scheme: Any, cycles_full: Any) -> float:
    """Normalized write cycles: ``total(cycles_scheme) / total(cycles_full)``.

    Both arguments are arrays or pytrees of arrays of per-device (or
    per-weight) cycle counts, or scalar totals; sums are taken in float64.
    """
    num = _total(cycles_scheme)
    den = _total(cycles_full)
    if not den > 0:
        raise ValueError(f"cycles_full must have a positive total, got {den}")
    if num < 0:
        raise ValueError(f"cycles_scheme must have a non-negative total, got {num}")
    return num / den


def speedup(cycles_scheme: Any, cycles_full: Any) -> float:
    """Programming speed-up over full write-verify: ``1 / nwc``."""
    return 1.0 / nwc(cycles_scheme, cycles_full)


def nwc_analytic(fraction_verified: float, cycles_verified: float,
                 cycles_unverified: float = 1.0) -> float:
    """NWC of verifying a fraction ``p`` of the devices:
    ``(p * c + (1 - p) * c_u) / c`` with ``c = cycles_verified`` the cycles
    of a verified device (also what every device costs under full
    write-verify) and ``c_u = cycles_unverified`` (1 open-loop write)."""
    p = v.check_range("fraction_verified", fraction_verified, 0.0, 1.0)
    c = v.check_range("cycles_verified", cycles_verified, 1.0, None)
    c_u = v.check_range("cycles_unverified", cycles_unverified, 0.0, None)
    return (p * c + (1.0 - p) * c_u) / c


def fraction_verified(mask: Any) -> float:
    """Fraction of ``True`` entries over all leaves of a mask pytree."""
    leaves = jax.tree_util.tree_leaves(mask)
    n = sum(int(np.size(x)) for x in leaves)
    if n == 0:
        raise ValueError("mask must contain at least one entry")
    return sum(int(np.count_nonzero(np.asarray(x))) for x in leaves) / n


def nwc_fraction(mask: Any, cycles_verified: float, cycles_unverified: float = 1.0) -> float:
    """Analytic NWC of a mask pytree: :func:`nwc_analytic` at
    ``p = fraction_verified(mask)`` (every weight counted once; restrict the
    mask to the mapped leaves before calling if some leaves stay digital)."""
    return nwc_analytic(fraction_verified(mask), cycles_verified, cycles_unverified)


# ----------------------------------------------------------------------------
# The naive loop in closed form, and a configuration that reaches sigma_wv
# ----------------------------------------------------------------------------

#: Largest pulse budget :func:`config_for_sigma` considers.
MAX_CONFIG_PULSES = 1000


class LoopStats(NamedTuple):
    """What the explicit loop does to a verified device, on average.

    Attributes:
      residual_std: root mean square of ``g - target`` over verified devices,
        failed ones included (full-scale units): the std of the zero-mean
        residual, SWIM's ``sigma_wv``.
      failure: fraction of verified devices that spend the pulse budget
        outside tolerance.
      mean_cycles: mean write cycles per verified device (1 open-loop write
        plus the corrective pulses).
    """

    residual_std: float
    failure: float
    mean_cycles: float


def _check_closed_form(device: devices.DeviceConfig) -> None:
    """The closed form needs an absolute open-loop and pulse variation."""
    if not isinstance(device, devices.DeviceConfig):
        raise ValueError(f"device must be a DeviceConfig, got {type(device).__name__}")
    if device.variation != "absolute":
        raise ValueError(f"device.variation must be 'absolute' for the closed-form loop "
                         f"model, got {device.variation!r}")
    if device.pulse_variation != "absolute":
        raise ValueError(f"device.pulse_variation must be 'absolute' for the closed-form loop "
                         f"model, got {device.pulse_variation!r}")


def _read_phase(tol: float, var_err: float, var_read: float) -> tuple[float, float, float]:
    """One verify read of a device whose true error is ``e ~ N(0, var_err)``,
    read as ``x = e + n``, ``n ~ N(0, var_read)``.

    Returns ``(P(|x| <= tol), E[e^2; |x| <= tol], E[e^2; |x| > tol])`` (the
    last two unconditional: ``E[e^2 1{...}]``). With ``v = var_err +
    var_read``, ``a = tol / sqrt(v)``: ``P = erf(a / sqrt 2)``,
    ``E[x^2; pass] = v (P - 2 a phi(a))``; ``e | x ~ N(beta x, c)`` with
    ``beta = var_err / v``, ``c = var_err var_read / v``.
    """
    v_tot = var_err + var_read
    if v_tot == 0.0:
        return 1.0, 0.0, 0.0
    a = tol / math.sqrt(v_tot)
    p = math.erf(a / math.sqrt(2.0))
    tail = 2.0 * a * math.exp(-0.5 * a * a) / math.sqrt(2.0 * math.pi)
    inside = v_tot * (p - tail)
    outside = v_tot * (math.erfc(a / math.sqrt(2.0)) + tail)
    beta, c = var_err / v_tot, var_err * var_read / v_tot
    return p, beta * beta * inside + c * p, beta * beta * outside + c * (1.0 - p)


def _loop_moments(tol: float, max_pulses: int, var_program: float, var_pulse: float,
                  var_read: float) -> LoopStats:
    """:class:`LoopStats` of the naive gain-1 loop (see :func:`naive_loop_stats`)."""
    p0, pass0, _ = _read_phase(tol, var_program, var_read)
    p1, pass1, fail1 = _read_phase(tol, var_pulse + var_read, var_read)
    q = 1.0 - p1
    # sum_{k=0}^{M-1} q^k: devices still in the loop before pulse k + 1.
    if p1 >= 1.0:
        geo = 1.0
    elif p1 <= 0.0:
        geo = float(max_pulses)
    else:
        geo = -math.expm1(max_pulses * math.log1p(-p1)) / p1
    left = 1.0 - p0
    m2 = pass0 + left * geo * pass1 + left * q ** (max_pulses - 1) * fail1
    return LoopStats(residual_std=math.sqrt(max(m2, 0.0)), failure=left * q ** max_pulses,
                     mean_cycles=1.0 + left * geo)


def naive_loop_stats(device: devices.DeviceConfig, config: WriteVerifyConfig) -> LoopStats:
    """Residual std, failure rate and mean cycles of :func:`explicit`, in closed form.

    For the naive scheme with ``gain = 1`` and absolute (level-independent)
    open-loop and pulse variation, every corrective pulse aims exactly at the
    target from the read value, so after pulse ``k`` the true error is a fresh
    ``N(0, sigma_pulse^2 + sigma_read^2)``, whatever came before; the open-loop
    write's error is ``N(0, sigma_program^2)``. A verify read sees the error
    plus ``N(0, sigma_read^2)``. With ``p0``, ``p`` the probabilities that the
    read after the open-loop write, and after a pulse, is within ``tolerance``,
    and ``M = max_pulses``:

    * ``failure = (1 - p0) (1 - p)^M``;
    * ``mean_cycles = 1 + (1 - p0) (1 - (1 - p)^M) / p``;
    * ``residual_std^2 = E0[e^2; pass] + (1 - p0) (1 - (1 - p)^M) / p E1[e^2; pass]
      + (1 - p0) (1 - p)^(M - 1) E1[e^2; fail]``, each term a moment of a
      Gaussian cut at ``+-tolerance`` (see ``_read_phase``).

    This is exact without read noise and without clipping (SWIM's Gaussian
    device, the sweep's explicit model). With read noise it neglects that the
    read noise of a failed read is conditioned on the failure (a small
    correction while ``sigma_read << sigma_pulse``). With ``device.clip`` and
    no read noise it is an upper bound on ``residual_std`` and ``failure``:
    clipping only ever moves a device towards its target's range, so with the
    same draws every device passes no later and ends no farther away.

    Raises:
      ValueError: the device's variation or pulse variation is not
        ``"absolute"``, or the config is not the naive scheme with gain 1.
    """
    _check_closed_form(device)
    if not isinstance(config, WriteVerifyConfig):
        raise ValueError(f"config must be a WriteVerifyConfig, got {type(config).__name__}")
    if config.scheme != "naive":
        raise ValueError(f"config.scheme must be 'naive' for the closed-form loop model, "
                         f"got {config.scheme!r}")
    if config.gain != 1.0:
        raise ValueError(f"config.gain must be 1.0 for the closed-form loop model, "
                         f"got {config.gain!r}")
    return _loop_moments(float(config.tolerance), int(config.max_pulses),
                         device.sigma_program ** 2, device.sigma_pulse ** 2,
                         device.sigma_read ** 2)


def _largest_tolerance(sigma_wv: float, max_pulses: int, var_program: float,
                       var_pulse: float, var_read: float) -> float | None:
    """Largest tolerance whose loop reaches ``residual_std <= sigma_wv`` within
    ``max_pulses`` (``None`` if none does): a log grid, then bisection on the
    last crossing from feasible to infeasible."""
    target = sigma_wv * sigma_wv

    def m2(tol: float) -> float:
        return _loop_moments(tol, max_pulses, var_program, var_pulse, var_read).residual_std ** 2

    top = 10.0 * math.sqrt(max(var_program, var_pulse + var_read)) + sigma_wv
    grid = np.geomspace(sigma_wv * 1e-3, top, 400)
    ok = [m2(float(t)) <= target for t in grid]
    if not any(ok):
        return None
    i = max(j for j, good in enumerate(ok) if good)
    if i == len(grid) - 1:
        return float(grid[-1])
    lo, hi = float(grid[i]), float(grid[i + 1])
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if m2(mid) <= target:
            lo = mid
        else:
            hi = mid
    return lo


def config_for_sigma(sigma_wv: float, device: devices.DeviceConfig, *,
                     max_failure: float = 1e-3) -> WriteVerifyConfig:
    """The naive write-verify that leaves verified devices with std ``sigma_wv``.

    Returns the :class:`WriteVerifyConfig` (naive scheme, gain 1) with the
    smallest pulse budget ``max_pulses`` whose failure rate is at most
    ``max_failure`` and, for that budget, the widest ``tolerance`` at which
    the residual std of verified devices, failed ones included, is
    ``sigma_wv`` (by :func:`naive_loop_stats`: exact for the unclipped
    Gaussian device without read noise; see there otherwise). A wider band
    costs fewer pulses; a narrower one would overshoot the target.

    Why not ``tolerance = sqrt(3) sigma_wv`` with 20 pulses (the uniform-band
    rule): with pulses as noisy as the open-loop write (``sigma_pulse =
    sigma_program = 0.2``) every pulse is a fresh draw that lands in the band
    with probability ``erf(tol / (sqrt 2 sigma_pulse)) = 0.205`` only, so 0.8 %
    of devices fail after 20 pulses and keep an error of std ~0.2, which lifts
    the residual std to 0.036 against 0.030. Measured with :func:`explicit` on
    10^6 devices at levels 0 and 1 (fixed seed), ``sigma_wv = 0.03``, that
    device (predicted by :func:`naive_loop_stats` in brackets):

    ========================================  ===============  ===============  ===========
    config                                    residual std     failure          mean cycles
    ========================================  ===============  ===============  ===========
    tol 0.0520, 20 pulses (before)            0.0358 (0.0359)  0.80 % (0.81 %)  4.83 (4.84)
    this function: tol 0.0508, 30 pulses      0.0300 (0.0300)  0.10 % (0.10 %)  4.98 (4.98)
    same, ``sigma_read`` 0.01: 0.0481, 33     0.0299 (0.0300)  0.07 % (0.08 %)  5.27 (5.27)
    ========================================  ===============  ===============  ===========

    A larger budget is not dearer on average: ``max_failure = 1e-4`` gives
    ``tolerance = 0.0521``, 40 pulses and 4.87 mean cycles (the band can be
    wider when fewer devices fail), at the price of a longer worst case.

    The two-step scheme does not help here: its fine, small steps pay off only
    when the pulse noise shrinks with the step (``pulse_variation="proportional"``); with an
    absolute pulse noise larger than the band every pulse is a fresh draw,
    whatever its gain, and the budget is what bounds the failures.

    Args:
      sigma_wv: target residual std of verified devices (full-scale units),
        in ``(0, device.sigma_program)``.
      device: the device (absolute open-loop and pulse variation).
      max_failure: largest acceptable fraction of failed verified devices, in
        ``(0, 1)``.

    Raises:
      ValueError: bad arguments (naming the parameter and its range), or no
        budget up to :data:`MAX_CONFIG_PULSES` reaches ``sigma_wv`` (read
        noise too large for it).
    """
    _check_closed_form(device)
    sigma_wv = v.check_range("sigma_wv", sigma_wv, 0.0, device.sigma_program,
                             low_inclusive=False, high_inclusive=False)
    max_failure = v.check_range("max_failure", max_failure, 0.0, 1.0,
                                low_inclusive=False, high_inclusive=False)
    var = (device.sigma_program ** 2, device.sigma_pulse ** 2, device.sigma_read ** 2)

    def feasible(max_pulses: int) -> float | None:
        tol = _largest_tolerance(sigma_wv, max_pulses, *var)
        if tol is not None and _loop_moments(tol, max_pulses, *var).failure <= max_failure:
            return tol
        return None

    if feasible(MAX_CONFIG_PULSES) is not None:
        for max_pulses in range(1, MAX_CONFIG_PULSES + 1):
            tol = feasible(max_pulses)
            if tol is not None:
                return WriteVerifyConfig(tolerance=tol, max_pulses=max_pulses)
    raise ValueError(
        f"sigma_wv={sigma_wv} is not reachable with failure <= {max_failure} within "
        f"{MAX_CONFIG_PULSES} pulses (sigma_read={device.sigma_read}, "
        f"sigma_pulse={device.sigma_pulse}): raise sigma_wv or max_failure")


def pin_stuck(key: jax.Array, result: WriteVerifyResult, target: jax.Array,
              verify_mask: jax.Array, stuck: devices.StuckFaults,
              device: devices.DeviceConfig, config: WriteVerifyConfig
              ) -> WriteVerifyResult:
    """The outcome of :func:`explicit` (``result``, run
    with ``key`` on flat ``target``) had the stuck devices been pinned at
    their stuck value after the open-loop write and after every pulse.

    Devices are independent in the loop (each draws its own noise from the
    iteration's keys), so the other devices are unchanged and a stuck one is
    replayed exactly: it reads ``value + read noise`` (the loop's read keys,
    :func:`iteration_keys`), passes on the first read
    within tolerance (cycles = that read's index) and otherwise spends the
    budget (``1 + max_pulses`` cycles) and fails. Unverified stuck devices
    cost their one write. All arrays flat, of ``target``'s shape.
    """
    value = jnp.where(stuck.at_min, 0.0, 1.0).astype(target.dtype)
    is_stuck = stuck.at_min | stuck.at_max
    verified = jnp.broadcast_to(verify_mask, target.shape)
    n_reads = config.max_pulses + 1
    tol = jnp.asarray(config.tolerance, target.dtype)
    if device.sigma_read == 0.0:
        passed = jnp.abs(value - target) <= tol
        first = jnp.ones(target.shape, jnp.int32)
    else:
        def body(i, carry):
            first, passed = carry
            k_read, _ = iteration_keys(key, i)
            r = devices.read(k_read, value, device)
            hit = ~passed & (jnp.abs(r - target) <= tol)
            return jnp.where(hit, i, first), passed | hit
        first, passed = jax.lax.fori_loop(
            1, n_reads + 1, body,
            (jnp.full(target.shape, n_reads, jnp.int32), jnp.zeros(target.shape, bool)))
    cycles = jnp.where(verified, jnp.where(passed, first, n_reads), 1).astype(jnp.int32)
    failed = verified & ~passed
    return WriteVerifyResult(
        g=jnp.where(is_stuck, value, result.g),
        cycles=jnp.where(is_stuck, cycles, result.cycles),
        failed=jnp.where(is_stuck, failed, result.failed))

"""Input (DAC) activation quantizers with learned clipping bounds: fixed, PACT, E-PACT.

A CiM macro drives its rows with ``k``-bit DACs, so every input activation of a
layer mapped onto the macro is turned into an integer code first. With the
layer's bounds ``lo < hi`` and ``n = 2^k - 1``::

    step = (hi - lo) / n                                   # input units per code
    code = round(clip((x - lo) * (n / (hi - lo)), 0, n))   # integer in [0, n]
    x   ~= lo + step * code                                # dequantize()

so the macro computes ``sum_i w_i x_i ~= lo * sum_i w_i + step * sum_i w_i code_i``
on integer codes, and a plain quantization-aware forward pass uses
``lo + step * code`` (:func:`fake_quantize`). :func:`quantize` returns the three
pieces, :class:`QuantizedInput` ``(code, step, lo)``; ``code`` has the shape of
``x`` (broadcast with the bounds), ``step`` and ``lo`` the shape of the bounds.

**Rounding** is half to even (``jnp.round``, IEEE ``roundTiesToEven``), the
default of NumPy and JAX: a code exactly half-way between two levels goes to
the even one (``u = 0.5 -> 0``, ``1.5 -> 2``, ``2.5 -> 2``).

**Kinds** (:class:`QuantizerConfig` ``kind``), i.e. which bounds learn:

* ``"fixed"``: neither; both bounds are constants (``stop_gradient``), e.g. set
  once by :func:`calibrate`.
* ``"pact"`` (Choi et al. 2018): the upper bound ``hi`` learns; ``lo`` is fixed
  at ``0`` for an unsigned input, and tied to ``-hi`` (one learned symmetric
  bound) for a signed input.
* ``"epact"`` (D-NAT, Lin et al. 2022): both ``lo`` and ``hi`` learn.

**Signed inputs.** A layer whose input is not after a ReLU (the first layer, a
residual sum) sees negative values. The DAC stays unsigned (codes in
``[0, n]``); the sign is carried by the offset ``lo < 0``, which the macro adds
digitally as ``lo * sum_i w_i``. ``signed=True`` only changes the defaults and
the checks: ``lo_init`` defaults to ``-hi_init`` (``0`` when unsigned) and may
be negative; PACT ties ``lo = -hi``.

**Gradients** (two-sided PACT, quantlib's ``PACTQuantFunc``), per element,
with ``g`` the cotangent of the quantized input ``y = lo + step * code``::

    dL/dx  = g        if lo <= x < hi, else 0        (straight-through round)
    dL/dhi = sum of g over x >= hi
    dL/dlo = sum of g over x <  lo

and nothing else: an element inside ``[lo, hi)`` contributes exactly ``0`` to
the bounds. The whole gradient flows through ``code``: ``step`` and ``lo`` in
:class:`QuantizedInput` are constants for differentiation
(``stop_gradient``), and the vector-Jacobian product of ``code`` is defined as
(inside = ``lo <= x < hi``, below = ``x < lo``, above = ``x >= hi``)::

    dcode/dx = inside / step,  dcode/dlo = below / step,  dcode/dhi = above / step

so ``step * dcode = dy`` gives the formulas above for any caller that uses the
pieces linearly, ``lo + step * code`` or the macro's
``lo * sum w + step * sum w code`` (the cotangent of ``code_i`` is then
``step * w_i * g_out``, and ``hi`` gets ``sum of w_i g_out over x_i >= hi``).

Why not differentiate the decomposition as it stands, with a plain
straight-through round of ``u = (clip(x, lo, hi) - lo) / step``: (1) it gives
the interior an extra quantization-error term through ``step``'s own
dependence on the bounds (as in LSQ), ``dL/dhi += g * (code - u) / n`` and
``dL/dlo -= g * (code - u) / n``, which PACT and E-PACT do not have; (2)
``jnp.clip`` splits the gradient of an input exactly on a bound half and half;
(3) even where the terms cancel in arithmetic (when ``step`` is differentiated
and the code's VJP compensates), they cancel only up to float rounding, and an
optimizer that normalizes the update (Adam) turns that ~1e-7 residual into
full-size steps: a post-ReLU layer's ``lo``, whose true gradient is 0, moved
from 0 to -1.1 in 50 Adam steps at learning rate 0.05. Routing the gradient
through the codes alone keeps those zeros exact.

PACT with a signed input (``lo = -hi``) gives
``dL/dhi = sum of g over x >= hi - sum of g over x < -hi``. ``"fixed"`` gives
no bound gradient and PACT none to ``lo``; the input gradient is the same
straight-through mask for every kind.

**Keeping hi > lo.** A learned ``hi`` may cross ``lo`` during training. The
width used is ``max(hi - lo, min_width)`` (``QuantizerConfig.min_width``,
absolute, in input units), so ``step > 0`` and nothing turns NaN; the clamp is
straight-through (inputs at or above ``lo + min_width`` still send their
gradient to ``hi``), so bounds that crossed keep learning and can recover
instead of freezing.

**Granularity.** Bounds are scalars (per layer, as in the paper) or any shape
that broadcasts against ``x`` (e.g. ``(C,)`` per channel on the last axis).
The macro can factor ``step`` and ``lo`` out of its sum only when they are the
same along the contraction axis, so per-channel bounds over a layer's input
channels serve the fake-quantized forward pass, not the macro.

Everything on arrays is jittable and differentiable with the config static
(frozen, hashable dataclass); :func:`calibrate` and :func:`init_bounds` run on
concrete values.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from swimjax import _validation as v

__all__ = [
    "Kind", "KINDS", "MAX_BITS", "QuantizerConfig", "Bounds", "QuantizedInput",
    "init_bounds", "calibrate", "quantize", "dequantize", "fake_quantize",
]

Kind = Literal["fixed", "pact", "epact"]
#: The quantizer kinds, in order of learned bounds (none, upper, both).
KINDS: tuple[str, ...] = ("fixed", "pact", "epact")
#: Largest supported ``bits``: the codes ``[0, 2^16 - 1]`` are exact in float32.
MAX_BITS = 16


@dataclasses.dataclass(frozen=True)
class QuantizerConfig:
    """How one layer's input activations are quantized by the DAC.

    Attributes:
      kind: ``"fixed"`` (no learned bound), ``"pact"`` (learned ``hi``; ``lo``
        is ``0``, or ``-hi`` when signed) or ``"epact"`` (learned ``lo`` and
        ``hi``).
      bits: ``k``, DAC bits, in ``[1, 16]``; codes are integers in
        ``[0, 2^k - 1]``. Default 7, the D-NAT macro's DACs.
      hi_init: initial upper bound (input units); finite, ``> lo_init``.
      lo_init: initial lower bound (input units). ``None`` (default) resolves
        to ``0`` (unsigned) or ``-hi_init`` (signed). Unsigned: must be
        ``>= 0``; PACT unsigned: must be ``0``; PACT signed: must be
        ``-hi_init``.
      signed: whether the input can be negative (not after a ReLU); see the
        module docstring. Default ``False``.
      min_width: smallest ``hi - lo`` used by :func:`quantize`, in input
        units, in ``[1e-30, 1e30]``; a guard against crossed learned bounds,
        not a setting to tune. ``hi_init - lo_init`` must be at least this.
    """

    kind: Kind = "epact"
    bits: int = 7
    hi_init: float = 1.0
    lo_init: float | None = None
    signed: bool = False
    min_width: float = 1e-6

    def __post_init__(self) -> None:
        v.check_choice("kind", self.kind, KINDS)
        v.check_int("bits", self.bits, 1, MAX_BITS)
        if not isinstance(self.signed, (bool, np.bool_)):
            raise ValueError(f"signed must be a bool, got {self.signed!r}")
        min_width = v.check_range("min_width", self.min_width, 1e-30, 1e30)
        hi = _check_finite("hi_init", self.hi_init)
        if self.lo_init is None:
            lo = -hi if self.signed else 0.0
        else:
            lo = _check_finite("lo_init", self.lo_init)
        if not self.signed and lo < 0.0:
            raise ValueError(f"lo_init must be >= 0 for an unsigned input (signed=False), "
                             f"got {lo!r}; set signed=True for inputs that can be negative")
        if self.kind == "pact" and lo != (-hi if self.signed else 0.0):
            tied = "-hi_init" if self.signed else "0"
            raise ValueError(f"lo_init must be {tied} for kind='pact' with signed={self.signed} "
                             f"(PACT learns one bound), got {lo!r}; leave it None or use "
                             f"kind='epact' or 'fixed'")
        if not hi - lo >= min_width:
            raise ValueError(f"hi_init must be > lo_init by at least min_width={min_width!r}, "
                             f"got lo_init={lo!r}, hi_init={hi!r}")
        object.__setattr__(self, "hi_init", hi)
        object.__setattr__(self, "lo_init", lo)
        object.__setattr__(self, "min_width", min_width)
        object.__setattr__(self, "signed", bool(self.signed))

    @property
    def max_code(self) -> int:
        """``n = 2^k - 1``, the largest code."""
        return 2 ** self.bits - 1

    @property
    def learns_lo(self) -> bool:
        """Whether ``Bounds.lo`` receives a gradient (E-PACT only)."""
        return self.kind == "epact"

    @property
    def learns_hi(self) -> bool:
        """Whether ``Bounds.hi`` receives a gradient (PACT and E-PACT)."""
        return self.kind != "fixed"


class Bounds(NamedTuple):
    """A layer's clipping bounds, a pytree to train with optax like any parameter.

    Attributes:
      lo: lower bound, input units; float32, shape ``()`` (per layer) or any
        shape broadcastable against the input. Unused (tied to ``-hi``) by
        signed PACT.
      hi: upper bound, same units and shape as ``lo``.
    """

    lo: jax.Array
    hi: jax.Array


class QuantizedInput(NamedTuple):
    """An input split as the macro uses it: ``x ~= lo + step * code``.

    Attributes:
      code: integer-valued floats in ``[0, 2^k - 1]``, the shape of ``x``
        broadcast with the bounds; the DAC codes.
      step: ``width / (2^k - 1) > 0``, input units per code; the shape of the
        bounds; no gradient (it flows through ``code``).
      lo: the lower bound actually used (``0`` for unsigned PACT, ``-hi`` for
        signed PACT), input units; the shape of the bounds; no gradient.
    """

    code: jax.Array
    step: jax.Array
    lo: jax.Array


def _check_finite(name: str, value: Any) -> float:
    out = v.check_real(name, value)
    if not np.isfinite(out):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return out


def init_bounds(cfg: QuantizerConfig, shape: tuple[int, ...] = ()) -> Bounds:
    """The config's initial bounds, filled to ``shape``.

    Args:
      cfg: the quantizer.
      shape: shape of each bound: ``()`` per layer (the paper), ``(C,)`` per
        channel on the input's last axis, or any shape broadcastable against
        the input.

    Returns:
      ``Bounds(lo, hi)``, float32 arrays of ``shape``.
    """
    shape = tuple(v.check_int(f"shape[{i}]", d, 1) for i, d in enumerate(shape))
    return Bounds(jnp.full(shape, cfg.lo_init, jnp.float32),
                  jnp.full(shape, cfg.hi_init, jnp.float32))


def calibrate(
    cfg: QuantizerConfig,
    x_samples: Any,
    *,
    method: Literal["percentile", "max"] = "percentile",
    percentile: float = 99.9,
    per_channel: bool = False,
) -> Bounds:
    """Initial bounds from activation statistics of a sample of a layer's inputs.

    With ``p = percentile`` (``method="percentile"``) or ``p = 100``
    (``method="max"``), ``P_q`` the ``q``-th percentile (linear interpolation)
    over the reduced axes:

    * unsigned: ``lo = 0``, ``hi = P_p(x)`` (negative samples are clipped by
      the quantizer anyway);
    * signed PACT (``lo = -hi``): ``hi = P_p(|x|)``, ``lo = -hi``;
    * signed fixed / E-PACT: ``lo = P_{100-p}(x)``, ``hi = P_p(x)``.

    A calibrated range narrower than ``cfg.min_width`` (a constant or dead
    input, e.g. a channel that is always 0 after its ReLU) falls back to the
    config's ``(lo_init, hi_init)`` for that layer or channel.

    Args:
      cfg: the quantizer (its ``signed``, ``kind``, ``min_width`` and inits).
      x_samples: inputs of the layer, any shape, finite, non-empty (e.g. a
        batch of activations, ``(B, ..., C)``).
      method: ``"percentile"`` (robust to outliers) or ``"max"``.
      percentile: ``p`` in ``[50, 100]`` for ``method="percentile"``.
      per_channel: reduce over every axis but the last (bounds of shape
        ``(C,)``) instead of all axes (scalar bounds).

    Returns:
      ``Bounds(lo, hi)``, float32, shape ``()`` or ``(C,)``.
    """
    v.check_choice("method", method, ("percentile", "max"))
    p = 100.0 if method == "max" else v.check_range("percentile", percentile, 50.0, 100.0)
    x = np.asarray(x_samples, dtype=np.float64)
    if x.size == 0:
        raise ValueError(f"x_samples must be non-empty, got shape {x.shape}")
    v.check_finite_tree("x_samples", x)
    if per_channel and x.ndim < 1:
        raise ValueError("x_samples must have at least 1 axis (channels last) for per_channel=True")
    axis = tuple(range(x.ndim - 1)) if per_channel else None
    if cfg.kind == "pact" and cfg.signed:
        hi = np.percentile(np.abs(x), p, axis=axis)
        lo = -hi
    else:
        hi = np.percentile(x, p, axis=axis)
        lo = np.percentile(x, 100.0 - p, axis=axis) if cfg.signed else np.zeros_like(hi)
    narrow = ~(hi - lo >= cfg.min_width)
    lo = np.where(narrow, cfg.lo_init, lo)
    hi = np.where(narrow, cfg.hi_init, hi)
    return Bounds(jnp.asarray(lo, jnp.float32), jnp.asarray(hi, jnp.float32))


def _width(lo: jax.Array, hi: jax.Array, min_width: float) -> jax.Array:
    """``max(hi - lo, min_width)``: the range actually quantized, ``> 0``."""
    return jnp.maximum(hi - lo, min_width)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _codes(x: jax.Array, lo: jax.Array, hi: jax.Array, width: jax.Array, scale: jax.Array,
           n: int) -> jax.Array:
    """``round(clip((x - lo) * scale, 0, n))``; all arrays one shape.

    ``width = _width(lo, hi)`` and ``scale = n / width`` (codes per input
    unit) are computed by the caller at the bounds' shape, so the one division
    happens per layer (or channel) and the codes do not depend on how the
    compiler fuses the elementwise work (a division inside a fused loop may
    differ from a standalone one by an ulp; a product does not).
    Its VJP carries the whole gradient of ``y = lo + step * code`` (module
    docstring): ``g / step`` to ``x`` inside ``[lo, lo + width)``, to ``lo``
    below it, to ``hi`` at or above it (so the clamp to ``min_width`` is
    straight-through for ``hi``); ``width`` and ``scale`` get none (they are
    functions of ``lo`` and ``hi``, which already have theirs).
    """
    return _codes_fwd(x, lo, hi, width, scale, n)[0]


def _codes_fwd(x, lo, hi, width, scale, n):
    del hi   # only its gradient slot is used
    code = jnp.round(jnp.clip((x - lo) * scale, 0, n))
    below, above = x < lo, x >= lo + width
    return code, (below, above, width * (1.0 / n))


def _codes_bwd(n, res, g):
    del n
    below, above, step = res
    g = g / step
    zero = jnp.zeros_like(g)
    return (jnp.where(below | above, zero, g), jnp.where(below, g, zero),
            jnp.where(above, g, zero), zero, zero)


_codes.defvjp(_codes_fwd, _codes_bwd)


def _used_bounds(bounds: Bounds, cfg: QuantizerConfig) -> tuple[jax.Array, jax.Array]:
    """``(lo, hi)`` as ``cfg.kind`` uses them, gradients blocked where not learned."""
    lo, hi = jnp.asarray(bounds.lo), jnp.asarray(bounds.hi)
    if cfg.kind == "fixed":
        return jax.lax.stop_gradient(lo), jax.lax.stop_gradient(hi)
    if cfg.kind == "pact":
        return (-hi if cfg.signed else jax.lax.stop_gradient(lo)), hi
    return lo, hi


def quantize(x: jax.Array, bounds: Bounds, cfg: QuantizerConfig) -> QuantizedInput:
    """Quantizes inputs to DAC codes: ``x ~= lo + step * code``.

    Args:
      x: the layer's input activations, any shape, input units.
      bounds: ``Bounds(lo, hi)``, scalars or broadcastable against ``x``
        (from :func:`init_bounds` / :func:`calibrate`, then trained). Which
        ones are used and learned depends on ``cfg.kind`` (module docstring).
      cfg: the quantizer (static under ``jit``).

    Returns:
      ``QuantizedInput(code, step, lo)``: ``code`` integer-valued in
      ``[0, 2^k - 1]`` with the broadcast shape of ``x`` and the bounds (dtype
      float32, or wider if ``x`` or the bounds are); ``step`` and ``lo`` with
      the bounds' shape. ``step = max(hi - lo, min_width) / (2^k - 1)``,
      computed as ``width * (1 / n)``, and the codes as
      ``(x - lo) * (n / width)``: products on the inputs, one division per
      bound, so jitted and eager results agree bit for bit.
      ``step`` and ``lo`` carry no gradient; through ``code``: straight-through
      for ``x`` inside ``[lo, hi)``, two-sided PACT for the bounds (module
      docstring), provided the caller uses the pieces linearly
      (``lo + step * code``).
    """
    x = jnp.asarray(x)
    lo, hi = _used_bounds(bounds, cfg)
    dtype = jnp.result_type(jnp.float32, x.dtype, lo.dtype, hi.dtype)
    x, lo, hi = x.astype(dtype), lo.astype(dtype), hi.astype(dtype)
    n = cfg.max_code
    width = _width(lo, hi, cfg.min_width)
    scale = n / width
    shape = jnp.broadcast_shapes(x.shape, width.shape)
    code = _codes(*(jnp.broadcast_to(a, shape) for a in (x, lo, hi, width, scale)), n)
    step = width * (1.0 / n)
    return QuantizedInput(code, jax.lax.stop_gradient(step), jax.lax.stop_gradient(lo))


def dequantize(q: QuantizedInput) -> jax.Array:
    """``lo + step * code``: the quantized input in input units, shape of ``q.code``."""
    return q.lo + q.step * q.code


def fake_quantize(x: jax.Array, bounds: Bounds, cfg: QuantizerConfig) -> jax.Array:
    """``dequantize(quantize(x, bounds, cfg))``: the quantization-aware forward pass."""
    return dequantize(quantize(x, bounds, cfg))

"""SWIM's weight-error model: per-weight sigmas and perturbed weights.

A weight is quantized to ``N`` magnitude bits plus sign and sliced over
``K = ceil(N / m)`` devices of ``m`` bits (:mod:`swimjax.mapping`). Every device
gets an independent programming error ``sigma * eps_i`` in units of its full
scale (``sigma = sigma_d`` before write-verify, ``sigma_wv`` after it). Read
through the mapping, the weight error is Gaussian::

    dW = s * c(N, m) * sigma * eps,   eps ~ N(0, 1),   s = max|W| (per tensor/channel)

with the *std factor* ``c(N, m)`` (:func:`std_factor`):

* ``"levels"`` (the default): ``c = (2^m - 1) sqrt(sum_{j=0}^{K-1} 4^{m j}) /
  (2^N - 1)``. This is exactly what :func:`swimjax.mapping.from_conductances`
  does to device errors: slice ``i`` is worth ``(2^m - 1) 2^{m (K - i)}``
  quantization steps of ``s / (2^N - 1)``. It is therefore consistent with the
  mapping's quantization grid (``s`` maps to ``2^N - 1`` steps, so the largest
  weight is representable) and with the device-level simulation
  (:func:`perturb_via_devices`, :mod:`swimjax.programming`). It gives 0.7776 for
  ``N = 8, m = 2``, the 0.778 of the group's later work (U-SWIM / NeFT, whose
  code computes exactly this), and 0.5796 for ``N = 8, m = 1``.
* ``"swim"``: ``c = (2^m - 1) sqrt(sum_{i=1}^{K} 4^{-i m})``, SWIM's published
  formula ``dW = s sum_i 2^{-i m} sigma eps_i`` (with ``2^m - 1`` levels per
  device): 0.5773 for ``m = 1`` and 0.7746 for ``m = 2``. It is the same sum of
  device errors read through a grid where ``s`` maps to ``2^{mK}`` steps instead
  of ``2^N - 1`` (so ``c_swim / c_levels = (2^N - 1) / 2^{mK}``); SWIM's 0.577
  is the ``N -> inf`` limit of the levels factor for ``m = 1``. Choose it to
  reproduce SWIM's numbers exactly.

**Non-uniform variation** (U-SWIM / NeFT, code YifanQin-ND/NF_Training): weights
with ``0.25 < |W| / s < 0.75`` (the middle levels of a 2-bit device) get
``sigma * f``, all others ``sigma``, and every sigma is renormalised by
``1 / sqrt(0.4 f^2 + 0.6)``; ``f`` in ``{1, 2, 4, 6}`` are the presets
``RRAM1, FeFET2, RRAM4, FeFET6`` (:data:`NONUNIFORM_PRESETS`).

Write-verify masks follow the library convention: a pytree shaped like
``params`` with one bool per weight, ``True`` = verified. Unmapped leaves
(biases, norms; :func:`swimjax.mapping.mapped_leaves`) stay exact.

**Perturbations as data.** :func:`statistical` returns a :class:`Perturbation`,
a pair of pure functions ``init(params, mask=None, *, sigma_d, sigma_wv) ->
state`` and ``apply(key, params, state) -> params``. The mask and the sigmas
live in the state (a :class:`VariationState` pytree), not in the function, so
one compiled Monte-Carlo program serves every mask and every sigma of a sweep,
and stacked states are evaluated in one call
(:func:`swimjax.montecarlo.evaluate_many`). :func:`gaussian` is the same with
arbitrary per-weight sigmas as the state.

Validation (structure and shapes of the mask, finite weights, the config)
happens outside ``jit``, in ``init`` and in :func:`perturb`; ``apply`` only
re-checks pytree structure (static, free under ``jit``). Noise is drawn
with one normal per weight from ``fold_in(key, leaf_index)``, so a result
depends on nothing but the key (not on batch size, chunking or other leaves).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from swimjax import _random
from swimjax import _validation as v
from swimjax import mapping

__all__ = [
    'perturb_traced',
    'NONUNIFORM_PRESETS', 'Normalization', 'Perturbation', 'VariationConfig', 'VariationState',
    'gaussian', 'perturb', 'perturb_via_devices', 'statistical', 'std_factor', 'validate',
    'weight_sigmas'
]

Normalization = Literal["levels", "swim"]

#: Non-uniform variation presets of U-SWIM / NeFT: name -> factor ``f`` applied to
#: the sigma of weights in the middle band (``0.25 < |W|/s < 0.75``).
NONUNIFORM_PRESETS: dict[str, float] = {"RRAM1": 1.0, "FeFET2": 2.0, "RRAM4": 4.0, "FeFET6": 6.0}


def _check_bits(weight_bits: Any, device_bits: Any) -> tuple[int, int]:
    n = v.check_int("weight_bits", weight_bits, 1, mapping.MAX_WEIGHT_BITS)
    m = v.check_int("device_bits", device_bits, 1, min(n, mapping.MAX_DEVICE_BITS))
    return n, m


def std_factor(weight_bits: int, device_bits: int,
               normalization: Normalization = "levels") -> float:
    """``c(N, m)``: std of the weight error per unit device sigma, per unit ``s``.

    ``"levels"``: ``(2^m - 1) sqrt(sum_{j=0}^{K-1} 4^{m j}) / (2^N - 1)``;
    ``"swim"``: ``(2^m - 1) sqrt(sum_{i=1}^{K} 4^{-i m})``; ``K = ceil(N/m)``.
    """
    n, m = _check_bits(weight_bits, device_bits)
    v.check_choice("normalization", normalization, ("levels", "swim"))
    k = -(-n // m)
    levels = 2 ** m - 1
    if normalization == "levels":
        return levels * math.sqrt(math.fsum(4.0 ** (m * j) for j in range(k))) / (2 ** n - 1)
    return levels * math.sqrt(math.fsum(4.0 ** (-i * m) for i in range(1, k + 1)))


@dataclasses.dataclass(frozen=True)
class VariationConfig:
    """SWIM's weight-error model.

    Attributes:
      sigma_d: device programming std before write-verify (full-scale units);
        SWIM: 0.1 to 0.3.
      sigma_wv: device std after write-verify (full-scale units); SWIM: 0.03.
      weight_bits: ``N``, magnitude bits per weight, in ``[1, 24]``.
      device_bits: ``m``, bits per device, in ``[1, min(N, 16)]``.
      normalization: ``"levels"`` (default, consistent with the mapping) or
        ``"swim"`` (SWIM's formula); see the module docstring.
      scale: ``"per_tensor"`` or ``"per_channel"`` (last axis) ``s = max|W|``.
      quantize: quantize the weights to ``N`` bits before adding the error
        (:func:`swimjax.mapping.quantize`); SWIM's model does not.
      nonuniform_factor: ``f > 0`` for weights in ``nonuniform_band`` (1 =
        uniform variation).
      nonuniform_band: ``(lo, hi)``, ``0 <= lo < hi <= 1``: the open band of
        ``|W| / s`` that gets ``sigma * f``.
      nonuniform_weight: share of the variance budget the band is assumed to
        hold in the renormalisation ``1 / sqrt(w f^2 + (1 - w))``; NeFT: 0.4.
    """

    sigma_d: float = 0.1
    sigma_wv: float = 0.03
    weight_bits: int = 8
    device_bits: int = 1
    normalization: Normalization = "levels"
    scale: mapping.Scale = "per_tensor"
    quantize: bool = False
    nonuniform_factor: float = 1.0
    nonuniform_band: tuple[float, float] = (0.25, 0.75)
    nonuniform_weight: float = 0.4

    def __post_init__(self) -> None:
        v.check_nonnegative("sigma_d", self.sigma_d)
        v.check_nonnegative("sigma_wv", self.sigma_wv)
        _check_bits(self.weight_bits, self.device_bits)
        v.check_choice("normalization", self.normalization, ("levels", "swim"))
        v.check_choice("scale", self.scale, ("per_tensor", "per_channel"))
        if not isinstance(self.quantize, (bool, np.bool_)):
            raise ValueError(f"quantize must be a bool, got {self.quantize!r}")
        v.check_positive("nonuniform_factor", self.nonuniform_factor)
        band = tuple(self.nonuniform_band)
        if len(band) != 2:
            raise ValueError(
                f"nonuniform_band must be a pair (lo, hi), got {self.nonuniform_band!r}")
        lo = v.check_range("nonuniform_band[0]", band[0], 0.0, 1.0)
        hi = v.check_range("nonuniform_band[1]", band[1], 0.0, 1.0)
        if not lo < hi:
            raise ValueError(f"nonuniform_band must satisfy 0 <= lo < hi <= 1, got {band!r}")
        object.__setattr__(self, "nonuniform_band", (lo, hi))
        v.check_range("nonuniform_weight", self.nonuniform_weight, 0.0, 1.0)

    @property
    def std_factor(self) -> float:
        """``c(N, m)`` under this config's normalization."""
        return std_factor(self.weight_bits, self.device_bits, self.normalization)

    @property
    def n_slices(self) -> int:
        """``K = ceil(N / m)``."""
        return -(-self.weight_bits // self.device_bits)

    @property
    def mapping_config(self) -> mapping.MappingConfig:
        """The mapping this model describes (sign bit: ``K`` devices per weight)."""
        return mapping.MappingConfig(self.weight_bits, self.device_bits, self.scale, "sign_bit")

    @property
    def nonuniform_renorm(self) -> float:
        """``1 / sqrt(w f^2 + (1 - w))`` (1 for uniform variation)."""
        f, w = self.nonuniform_factor, self.nonuniform_weight
        return 1.0 / math.sqrt(w * f * f + (1.0 - w))


# ----------------------------------------------------------------------------
# Validation (outside jit)
# ----------------------------------------------------------------------------

def _resolve_selected(params: Any, selected: Any | None) -> Any:
    if selected is None:
        return mapping.mapped_leaves(params)
    mapping.check_selected(selected, params)
    return selected


def validate(params: Any, mask: Any | None, cfg: VariationConfig, selected: Any | None = None,
             *, check_values: bool = True) -> Any:
    """Checks the inputs of :func:`perturb`; returns the resolved ``selected``.

    Raises ``ValueError`` if ``cfg`` is not a :class:`VariationConfig`, if
    ``mask`` (unless ``None``) does not have the pytree structure and leaf shapes
    of ``params``, if ``selected`` does not match ``params``, or (with
    ``check_values``, concrete leaves only) if a weight is NaN or Inf.
    """
    if not isinstance(cfg, VariationConfig):
        raise ValueError(f"cfg must be a VariationConfig, got {type(cfg).__name__}")
    if mask is not None:
        v.check_same_structure("mask", mask, params)
    sel = _resolve_selected(params, selected)
    if check_values:
        v.check_finite_tree("params", params)
    return sel


# ----------------------------------------------------------------------------
# Per-weight sigmas
# ----------------------------------------------------------------------------

def _float_dtype(x: Any) -> np.dtype:
    """The float dtype computations on leaf ``x`` run in (float32 or wider)."""
    return np.dtype(jnp.promote_types(jnp.result_type(x), jnp.float32))


def _nonuniform_mult(w: jax.Array, s: jax.Array, cfg: VariationConfig) -> jax.Array | float:
    """Per-weight sigma multiplier of the non-uniform model (``f`` in the band,
    1 outside, times the renormalisation); the float 1.0 when uniform."""
    if cfg.nonuniform_factor == 1.0:
        return 1.0
    lo, hi = cfg.nonuniform_band
    r = jnp.abs(w) / jnp.where(s > 0, s, jnp.ones_like(s))
    in_band = (r > lo) & (r < hi)
    return (jnp.where(in_band, cfg.nonuniform_factor, 1.0) * cfg.nonuniform_renorm).astype(w.dtype)


def _base_sigma(w: jax.Array, cfg: VariationConfig) -> jax.Array:
    """``s * c * m_i`` per weight: std of dW per unit device sigma (weight units;
    float32 or wider; shape of ``w``)."""
    dt = _float_dtype(w)
    w = jnp.asarray(w).astype(dt)
    s = mapping.compute_scale(w, cfg.scale)
    base = jnp.broadcast_to(s * dt.type(cfg.std_factor), w.shape)
    return base * _nonuniform_mult(w, s, cfg)


def weight_sigmas(params: Any, cfg: VariationConfig, selected: Any | None = None
                  ) -> tuple[Any, Any]:
    """Per-weight std of ``dW`` in weight units, unverified and verified.

    Returns:
      ``(sigma_unverified, sigma_verified)``: pytrees shaped like ``params``
      (float32 or wider) with ``sigma_d * s * c * m_i`` and ``sigma_wv * s * c *
      m_i`` (``m_i`` the non-uniform multiplier, 1 for uniform variation) on
      mapped leaves and zeros on unmapped ones. The scale and the non-uniform
      band use the weights as given (before any quantization).
    """
    sel = _resolve_selected(params, selected)

    def leaf(w: Any, s: bool) -> tuple[jax.Array, jax.Array]:
        if not s:
            z = jnp.zeros(np.shape(w), _float_dtype(w))
            return z, z
        base = _base_sigma(w, cfg)
        return cfg.sigma_d * base, cfg.sigma_wv * base

    pairs = jax.tree.map(leaf, params, sel)
    treedef = jax.tree.structure(params)
    flat = treedef.flatten_up_to(pairs)
    return (treedef.unflatten([p[0] for p in flat]), treedef.unflatten([p[1] for p in flat]))


# ----------------------------------------------------------------------------
# Perturbation
# ----------------------------------------------------------------------------

def _leaf_sigma(w: jax.Array, m: Any, sigma_d: Any, sigma_wv: Any,
                cfg: VariationConfig) -> jax.Array:
    base = _base_sigma(w, cfg)
    sd = jnp.asarray(sigma_d).astype(base.dtype)
    if m is None:
        return sd * base
    verified = jnp.asarray(m).astype(bool)
    return jnp.where(verified, jnp.asarray(sigma_wv).astype(base.dtype), sd) * base


def _perturb(key: jax.Array, params: Any, mask: Any | None, sigma_d: Any, sigma_wv: Any,
             cfg: VariationConfig, selected: Any, tau: Any = None) -> Any:
    """The model's weights; ``tau`` (None: none) right-censors the noise,
    ``eps = min(eps, tau)`` (TRICE's training noise)."""
    leaves, treedef = jax.tree.flatten(params)
    sel = treedef.flatten_up_to(selected)
    masks = [None] * len(leaves) if mask is None else treedef.flatten_up_to(mask)
    qcfg = cfg.mapping_config
    out = []
    for i, (w, s, m) in enumerate(zip(leaves, sel, masks)):
        if not s:
            out.append(w)
            continue
        w = jnp.asarray(w)
        sigma = _leaf_sigma(w, m, sigma_d, sigma_wv, cfg)
        w0 = mapping.quantize(w, qcfg) if cfg.quantize else w
        eps = _random.normal(jax.random.fold_in(key, i), w.shape, sigma.dtype)
        if tau is not None:
            eps = jnp.minimum(eps, jnp.asarray(tau).astype(sigma.dtype))
        out.append((w0.astype(sigma.dtype) + sigma * eps).astype(w.dtype))
    return treedef.unflatten(out)


def perturb_traced(key: jax.Array, params: Any, mask: Any, sigma_d: Any, sigma_wv: Any,
                   cfg: VariationConfig, selected: Any | None = None, *,
                   tau: Any = None) -> Any:
    """:func:`perturb` with the sigmas (and ``tau``, a right-censoring of the
    noise: ``eps = min(eps, tau)``) as arrays that may be traced, for
    perturbations built on SWIM's model (training noise); only the pytree
    structure is checked (free under ``jit``)."""
    sel = validate(params, mask, cfg, selected, check_values=False)
    return _perturb(key, params, mask, sigma_d, sigma_wv, cfg, sel, tau)


class Perturbation(NamedTuple):
    """A weight perturbation as a pair of pure functions, in the style of
    optax's ``init``/``update`` transformations.

    Attributes:
      init: ``init(params, mask=None, **settings) -> state``: validates the
        (concrete) inputs and returns the perturbation's *state*, an ordinary
        pytree of arrays (the write-verify mask, sigmas, ...). A new mask or a
        new sigma is a new state, not a new function, so a compiled Monte-Carlo
        program is reused for all of them, and states can be stacked and
        swept in one call (:func:`swimjax.montecarlo.evaluate_many`).
      apply: ``apply(key, params, state) -> params``: pure, jittable and
        vmappable over ``key`` (and over ``state``); the weights the hardware
        computes with in one variation instance.
    """

    init: Callable[..., Any]
    apply: Callable[[jax.Array, Any, Any], Any]


class VariationState(NamedTuple):
    """The data of SWIM's statistical model (:func:`statistical`).

    Attributes:
      mask: write-verify mask, a pytree shaped like ``params`` with one bool per
        weight (``True`` = verified); entries on unmapped leaves are ignored.
      sigma_d: device sigma without write-verify (full-scale units), a float32
        scalar array.
      sigma_wv: device sigma after write-verify (full-scale units), a float32
        scalar array.
    """

    mask: Any
    sigma_d: jax.Array
    sigma_wv: jax.Array


def _check_sigma(name: str, value: Any) -> jax.Array:
    """A concrete sigma as a float32 scalar; tracers pass unchecked."""
    if isinstance(value, jax.core.Tracer):
        return value
    if np.ndim(value) != 0:
        raise ValueError(f"{name} must be a scalar, got shape {np.shape(value)}")
    return jnp.asarray(v.check_nonnegative(name, float(value)), jnp.float32)


def statistical(cfg: VariationConfig, selected: Any | None = None) -> Perturbation:
    """SWIM's statistical weight-error model as a :class:`Perturbation`.

    ``state = init(params, mask=None, *, sigma_d=cfg.sigma_d,
    sigma_wv=cfg.sigma_wv)`` (a :class:`VariationState`; ``mask=None`` means
    nothing verified) and ``apply(key, params, state)`` gives ``W + s c
    sigma_i eps_i`` on the mapped leaves (``sigma_i = sigma_wv`` where the mask
    is set, ``sigma_d`` elsewhere, times the non-uniform multiplier), unmapped
    leaves unchanged, leaf dtypes kept. The static part of the model (bits,
    normalization, scale, non-uniform band) is ``cfg``; the mask and the two
    sigmas are data. ``apply`` draws exactly what :func:`perturb` draws for the
    same key.

    Args:
      cfg: the model (its ``sigma_d``/``sigma_wv`` are ``init``'s defaults).
      selected: which leaves are on devices (pytree of Python bools); default
        :func:`swimjax.mapping.mapped_leaves` of the params ``init``/``apply``
        get.
    """
    if not isinstance(cfg, VariationConfig):
        raise ValueError(f"cfg must be a VariationConfig, got {type(cfg).__name__}")

    def init(params: Any, mask: Any | None = None, *, sigma_d: Any = None,
             sigma_wv: Any = None) -> VariationState:
        validate(params, mask, cfg, selected)
        if mask is None:
            mask = jax.tree.map(lambda w: np.zeros(np.shape(w), bool), params)
        else:
            mask = jax.tree.map(lambda m: jnp.asarray(m).astype(bool), mask)
        return VariationState(
            mask=mask,
            sigma_d=_check_sigma("sigma_d", cfg.sigma_d if sigma_d is None else sigma_d),
            sigma_wv=_check_sigma("sigma_wv", cfg.sigma_wv if sigma_wv is None else sigma_wv))

    def apply(key: jax.Array, params: Any, state: VariationState) -> Any:
        if not isinstance(state, VariationState):
            raise ValueError(f"state must be the VariationState of init(), got "
                             f"{type(state).__name__}")
        sel = validate(params, state.mask, cfg, selected, check_values=False)
        return _perturb(key, params, state.mask, state.sigma_d, state.sigma_wv, cfg, sel)

    return Perturbation(init, apply)


def gaussian(selected: Any | None = None) -> Perturbation:
    """Additive Gaussian weight noise with per-weight sigmas, as a
    :class:`Perturbation`: ``apply(key, params, sigmas) = W + sigmas * eps``.

    The state is the pytree of per-weight standard deviations in weight units
    (e.g. from :func:`weight_sigmas`, or any non-uniform model of the user's),
    shaped like ``params``; ``init(params, sigmas)`` validates it (finite, >=
    0, matching shapes). Leaves not ``selected`` (default: unmapped leaves)
    are returned unchanged. Draws use the same ``fold_in(key, leaf_index)``
    streams as :func:`statistical`, so the two agree for the same key when
    ``sigmas`` equal the statistical model's per-weight sigmas.
    """

    def init(params: Any, sigmas: Any) -> Any:
        v.check_same_structure("sigmas", sigmas, params)
        _resolve_selected(params, selected)
        v.check_finite_tree("params", params)
        v.check_finite_tree("sigmas", sigmas)
        for path, s in jax.tree_util.tree_leaves_with_path(sigmas):
            if np.size(s) and float(np.min(np.asarray(s, np.float32))) < 0:
                raise ValueError(f"sigmas{jax.tree_util.keystr(path)} must be >= 0")
        return jax.tree.map(lambda s: jnp.asarray(s, _float_dtype(s)), sigmas)

    def apply(key: jax.Array, params: Any, sigmas: Any) -> Any:
        v.check_same_structure("sigmas", sigmas, params)
        leaves, treedef = jax.tree.flatten(params)
        sel = treedef.flatten_up_to(_resolve_selected(params, selected))
        out = []
        for i, (w, s, sd) in enumerate(zip(leaves, sel, treedef.flatten_up_to(sigmas))):
            if not s:
                out.append(w)
                continue
            w = jnp.asarray(w)
            sd = jnp.asarray(sd)
            eps = _random.normal(jax.random.fold_in(key, i), w.shape, sd.dtype)
            out.append((w.astype(sd.dtype) + sd * eps).astype(w.dtype))
        return treedef.unflatten(out)

    return Perturbation(init, apply)


def perturb(key: jax.Array, params: Any, mask: Any | None, cfg: VariationConfig,
            selected: Any | None = None) -> Any:
    """The weights the hardware computes with under SWIM's model (one call:
    ``statistical(cfg, selected)`` initialized with ``mask`` and applied).

    Args:
      key: PRNG key (one variation instance).
      params: parameter pytree.
      mask: write-verify mask (pytree of bool arrays shaped like ``params``;
        ``True`` = verified, sigma ``sigma_wv``) or ``None`` (nothing verified).
      cfg: the model.
      selected: which leaves are on devices (pytree of Python bools); default
        :func:`swimjax.mapping.mapped_leaves`.

    Returns:
      ``params`` with ``W + s c sigma_i eps_i`` (``W`` quantized first if
      ``cfg.quantize``) on mapped leaves; unmapped leaves are returned as is.
      Leaf dtypes are kept.
    """
    sel = validate(params, mask, cfg, selected)
    return _perturb(key, params, mask, cfg.sigma_d, cfg.sigma_wv, cfg, sel)


def perturb_via_devices(key: jax.Array, params: Any, mask: Any | None, cfg: VariationConfig,
                        selected: Any | None = None) -> Any:
    """Device-level reference of :func:`perturb` (for tests and cross-checks).

    Each mapped weight is really mapped onto ``K`` devices
    (:func:`swimjax.mapping.to_conductances`, sign bit, ``cfg.scale``), every
    device gets ``sigma_dev * eps`` (no clipping; ``sigma_dev = sigma_wv`` if
    verified else ``sigma_d``, times the non-uniform multiplier of its weight),
    and the conductances are read back with
    :func:`swimjax.mapping.from_conductances`. For ``normalization="swim"`` the
    device sigma is scaled by ``(2^N - 1) / 2^{mK}`` (SWIM's read-out grid). The
    result is always quantized (the mapping quantizes): ``dW`` relative to
    :func:`swimjax.mapping.quantize` has std ``s c(N, m) sigma``.
    """
    sel = validate(params, mask, cfg, selected)
    leaves, treedef = jax.tree.flatten(params)
    flat_sel = treedef.flatten_up_to(sel)
    masks = [None] * len(leaves) if mask is None else treedef.flatten_up_to(mask)
    mcfg = cfg.mapping_config
    grid = 1.0 if cfg.normalization == "levels" else \
        (2 ** cfg.weight_bits - 1) / 2.0 ** (cfg.device_bits * cfg.n_slices)
    out = []
    for i, (w, s, m) in enumerate(zip(leaves, flat_sel, masks)):
        if not s:
            out.append(w)
            continue
        dt = _float_dtype(w)
        w = jnp.asarray(w)
        wf = w.astype(dt)
        mt = mapping.to_conductances(wf, mcfg)
        mult = _nonuniform_mult(wf, mapping.compute_scale(wf, cfg.scale), cfg)
        if m is None:
            dev_sigma = jnp.full(w.shape, cfg.sigma_d, dt)
        else:
            dev_sigma = jnp.where(jnp.asarray(m).astype(bool), cfg.sigma_wv, cfg.sigma_d).astype(dt)
        dev_sigma = dev_sigma * mult * dt.type(grid)
        eps = _random.normal(jax.random.fold_in(key, i), mt.g.shape, dt)
        noisy = mt._replace(g=mt.g + dev_sigma[None] * eps)
        out.append(mapping.from_conductances(noisy, mcfg).astype(w.dtype))
    return treedef.unflatten(out)

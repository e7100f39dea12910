"""Weights <-> quantized, bit-sliced, normalized device conductances.

A weight tensor ``W`` is mapped onto devices in three steps:

1. **Scale.** ``s = max|W|`` over the whole tensor (``scale="per_tensor"``) or
   over every axis but the last (``scale="per_channel"``: flax kernels keep the
   output channel on the last axis). A tensor (or channel) that is all zeros
   gets ``s = 0`` and maps to all-zero conductances, never to NaN.
2. **Quantize** the magnitude to ``N = weight_bits`` bits:
   ``q = round(|W| / s * (2^N - 1))``, an integer in ``[0, 2^N - 1]``.
3. **Bit-slice** ``q`` over ``K = ceil(N / m)`` devices of ``m = device_bits``
   bits, most significant first:
   ``q = sum_{i=1..K} l_i 2^{m (K - i)}``, ``l_i`` in ``[0, 2^m - 1]``; device
   ``i`` holds the normalized conductance ``g_i = l_i / (2^m - 1)`` in
   ``[0, 1]`` (``0`` = ``g_min``, ``1`` = ``g_max``). When ``m`` does not divide
   ``N`` the most significant device only ever uses its lowest
   ``N - m (K - 1)`` bits.

The sign is carried either by a **differential pair** (``sign="differential"``:
conductances of shape ``(2, K, *W.shape)``; index 0 is the positive device,
which holds the levels of ``|W|`` where ``W > 0``, index 1 the negative device,
which holds them where ``W < 0``; the idle device of each pair sits at
``g = 0``) or by a **digital sign bit** (``sign="sign_bit"``: conductances of
shape ``(K, *W.shape)`` plus a ``+1/-1`` sign array; a zero weight has sign
``+1``). The default :class:`MappingConfig` is SWIM's reference: ``N = 8``,
``m = 1``, sign bit.

The read-out :func:`from_conductances` is *linear* in ``g`` (it never rounds),
so it also turns noisy, programmed conductances into the weights the hardware
computes with: ``W = s * sum_i (2^m - 1) 2^{m (K - i)} g_i / (2^N - 1)``
(times the sign, or positive minus negative device). With noise-free
conductances it returns :func:`quantize` exactly, bit for bit.

Which leaves of a parameter pytree are mapped is a pytree of Python bools
(:func:`mapped_leaves`; by default every floating leaf of rank >= 2, i.e. the
kernels; biases and normalization parameters stay digital and exact), and
:func:`describe_selection` reports it.

Everything on arrays is jittable with the config static (configs are frozen,
hashable dataclasses).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from swimjax import _validation as v
from swimjax import devices

__all__ = [
    'LeafFilter', 'MAX_DEVICE_BITS', 'MAX_WEIGHT_BITS', 'MappedTensor', 'MappingConfig',
    'Scale', 'Sign', 'check_selected', 'compute_scale', 'default_leaf_filter',
    'describe_selection', 'from_conductances', 'map_params', 'mapped_leaves', 'n_devices',
    'quantize', 'quantize_levels', 'quantize_params', 'slice_levels', 'to_conductances',
    'unmap_params',
]

Scale = Literal["per_tensor", "per_channel"]
Sign = Literal["differential", "sign_bit"]

#: Largest supported ``weight_bits``: integer levels must stay exact in float32.
MAX_WEIGHT_BITS = 24
#: Largest supported ``device_bits`` (a table of the ``2^m`` conductances is built).
MAX_DEVICE_BITS = devices.MAX_LEVEL_BITS


@dataclasses.dataclass(frozen=True)
class MappingConfig:
    """How weights are quantized and sliced over devices.

    The defaults are SWIM's reference mapping (``N = 8``, ``m = 1``, one device
    per slice with a digital sign bit), the mapping of
    :class:`swimjax.perturbation.VariationConfig`'s defaults, so the device
    paths (:func:`swimjax.programming.program_params`) and the statistical model
    (:func:`swimjax.perturbation.perturb`) describe the same hardware.

    Attributes:
      weight_bits: ``N``, magnitude bits per weight (sign not counted), in
        ``[1, 24]``.
      device_bits: ``m``, bits stored per device, in ``[1, min(weight_bits, 16)]``.
      scale: ``"per_tensor"`` (``s = max|W|``) or ``"per_channel"`` (one ``s``
        per output channel, the last axis).
      sign: ``"sign_bit"`` (one device per slice plus a digital sign) or
        ``"differential"`` (a pair of devices per slice; the idle device of the
        pair sits at ``g_min``, so with a clipping device,
        ``DeviceConfig(clip=True)``, its error is one-sided and every weight is
        pulled towards zero; with the sign bit, level-0 slices push the other
        way: see :func:`swimjax.programming.open_loop_weight_error`).
    """

    weight_bits: int = 8
    device_bits: int = 1
    scale: Scale = "per_tensor"
    sign: Sign = "sign_bit"

    def __post_init__(self) -> None:
        v.check_int("weight_bits", self.weight_bits, 1, MAX_WEIGHT_BITS)
        v.check_int("device_bits", self.device_bits, 1, min(self.weight_bits, MAX_DEVICE_BITS))
        v.check_choice("scale", self.scale, ("per_tensor", "per_channel"))
        v.check_choice("sign", self.sign, ("differential", "sign_bit"))

    @property
    def n_slices(self) -> int:
        """``K = ceil(N / m)``, devices (slices) per weight magnitude."""
        return -(-self.weight_bits // self.device_bits)

    @property
    def max_level(self) -> int:
        """``2^m - 1``, the top level of one device."""
        return 2 ** self.device_bits - 1

    @property
    def max_q(self) -> int:
        """``2^N - 1``, the top quantized weight magnitude."""
        return 2 ** self.weight_bits - 1

    @property
    def devices_per_weight(self) -> int:
        """Devices that hold one weight: ``2 K`` (differential) or ``K``."""
        return self.n_slices * (2 if self.sign == "differential" else 1)

    def slice_weights(self) -> np.ndarray:
        """``(2^m - 1) 2^{m (K - i)}`` for ``i = 1..K`` (float64, shape ``(K,)``):
        the value, in quantization steps, of a full-scale conductance on slice i."""
        k = self.n_slices
        m = self.device_bits
        return np.array([self.max_level * 2.0 ** (m * (k - i)) for i in range(1, k + 1)])


class MappedTensor(NamedTuple):
    """One weight tensor on devices (a pytree).

    Attributes:
      g: normalized conductances, shape ``(2, K, *w.shape)`` (differential; index
        0 positive, 1 negative device) or ``(K, *w.shape)`` (sign bit); slice 0 is
        the most significant.
      scale: ``s``, the weight that full scale maps to, in weight units; shape
        ``()`` (per tensor) or ``(1, ..., 1, C)`` (per channel, broadcastable
        against ``w``). Dtype of ``w``.
      sign: ``+1/-1`` array of ``w.shape`` (sign bit), or ``None``
        (differential: the sign is in the pair).
    """

    g: jax.Array
    scale: jax.Array
    sign: jax.Array | None


def _compute_dtype(dtype: Any) -> Any:
    return jnp.promote_types(dtype, jnp.float32)


def compute_scale(w: jax.Array, scale: Scale = "per_tensor") -> jax.Array:
    """``s = max|w|`` per tensor (shape ``()``) or per output channel (last axis,
    shape ``(1, ..., 1, C)``). Dtype of ``w``. A 0-d ``w`` is always per tensor."""
    w = jnp.asarray(w)
    a = jnp.abs(w)
    if scale == "per_channel" and w.ndim >= 1:
        return jnp.max(a, axis=tuple(range(w.ndim - 1)), keepdims=True)
    return jnp.max(a)


def quantize_levels(w: jax.Array, cfg: MappingConfig,
                    scale: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Integer magnitudes ``q = round(|w| / s (2^N - 1))`` (int32, shape of ``w``)
    and the scale ``s`` used (computed from ``w`` unless given)."""
    w = jnp.asarray(w)
    s = compute_scale(w, cfg.scale) if scale is None else jnp.asarray(scale, w.dtype)
    cd = _compute_dtype(w.dtype)
    s_c = s.astype(cd)
    safe = jnp.where(s_c > 0, s_c, jnp.ones_like(s_c))
    x = jnp.abs(w.astype(cd)) / safe * cd.type(cfg.max_q)
    q = jnp.clip(jnp.round(x), 0, cfg.max_q).astype(jnp.int32)
    return q, s


def _dequantize(q_signed: jax.Array, scale: jax.Array, cfg: MappingConfig) -> jax.Array:
    """The one place that turns signed quantization steps into weights (shared by
    :func:`quantize` and :func:`from_conductances`, so both agree bit for bit).

    ``W = q * step`` with ``step = s * fl(1 / (2^N - 1))``: one multiply by a
    per-tensor (per-channel) step, computed first. Written this way XLA has
    nothing to re-associate (it rewrites ``(q * c) * s`` into ``q * (c * s)`` when
    it fuses, but not when it does not, which would break bit-exactness between
    jitted and eager code), and no float division is involved.
    """
    cd = np.dtype(q_signed.dtype)
    inv = cd.type(1.0) / cd.type(cfg.max_q)
    step = scale.astype(cd) * inv
    return (q_signed * step).astype(scale.dtype)


def _sign(w: jax.Array) -> jax.Array:
    """Digital sign bit as ``+1/-1`` (zero counts as positive)."""
    return jnp.where(w < 0, -1, 1).astype(w.dtype)


def quantize(w: jax.Array, cfg: MappingConfig) -> jax.Array:
    """The quantized weights ``sign(w) * s * q / (2^N - 1)`` (shape, dtype of ``w``).

    ``|quantize(w) - w| <= s / (2 (2^N - 1))`` (up to float rounding).
    """
    w = jnp.asarray(w)
    q, s = quantize_levels(w, cfg)
    cd = _compute_dtype(w.dtype)
    q_signed = jnp.where(w < 0, -q, q).astype(cd)
    return _dequantize(q_signed, s, cfg)


def slice_levels(q: jax.Array, cfg: MappingConfig) -> jax.Array:
    """Integer device levels ``l_i`` (int32, shape ``(K, *q.shape)``), MSB first."""
    m, k = cfg.device_bits, cfg.n_slices
    shifts = jnp.array([m * (k - i) for i in range(1, k + 1)], jnp.int32)
    shifts = shifts.reshape((k,) + (1,) * q.ndim)
    return jnp.right_shift(q[None], shifts) & cfg.max_level


def to_conductances(w: jax.Array, cfg: MappingConfig) -> MappedTensor:
    """Maps a weight tensor to normalized device conductances.

    Args:
      w: weights, any shape (floating).
      cfg: the mapping.

    Returns:
      ``MappedTensor(g, scale, sign)``; ``g`` has shape ``(2, K, *w.shape)``
      (differential) or ``(K, *w.shape)`` (sign bit), values in ``{l / (2^m - 1)}``.
    """
    w = jnp.asarray(w)
    q, s = quantize_levels(w, cfg)
    cd = _compute_dtype(w.dtype)
    # Looked up, not divided: XLA's float division is not always correctly
    # rounded (on CPU 3 / 7 * 7 != 3 in float32); with correctly rounded g,
    # g * (2^m - 1) gives the integer level back exactly, which the exact round
    # trip relies on.
    table = jnp.asarray(devices.level_table(cfg.device_bits, np.dtype(cd).name))
    g = table[slice_levels(q, cfg)]
    if cfg.sign == "differential":
        zero = jnp.zeros_like(g)
        pos = jnp.where(w > 0, g, zero)
        neg = jnp.where(w < 0, g, zero)
        return MappedTensor(jnp.stack([pos, neg]), s, None)
    return MappedTensor(g, s, _sign(w))


def _read_slices(g: jax.Array, cfg: MappingConfig) -> jax.Array:
    """``sum_i (2^m - 1) 2^{m (K - i)} g_i`` over the leading slice axis (linear;
    elementwise multiply-add, never a matmul, so it stays exact in float32)."""
    wts = cfg.slice_weights()
    out = g[0] * g.dtype.type(wts[0])
    for i in range(1, cfg.n_slices):
        out = out + g[i] * g.dtype.type(wts[i])
    return out


def from_conductances(mapped: MappedTensor, cfg: MappingConfig) -> jax.Array:
    """Linear read-out of (possibly noisy) conductances back to weights.

    Args:
      mapped: ``MappedTensor`` as returned by :func:`to_conductances`; ``g`` may
        be any float values (programmed, drifted, read with noise).
      cfg: the mapping used to build it.

    Returns:
      Weights of ``g.shape[2:]`` (differential) or ``g.shape[1:]`` (sign bit),
      in the dtype of ``mapped.scale``; equal to ``quantize(w)`` exactly when
      ``g`` is the noise-free ``to_conductances(w).g``.
    """
    g, s, sign = mapped
    g = jnp.asarray(g)
    cd = _compute_dtype(jnp.result_type(g, s))
    g = g.astype(cd)
    if cfg.sign == "differential":
        q_signed = _read_slices(g[0], cfg) - _read_slices(g[1], cfg)
    else:
        if sign is None:
            raise ValueError("mapped.sign must be a +1/-1 array for sign='sign_bit', got None")
        q_signed = sign.astype(cd) * _read_slices(g, cfg)
    return _dequantize(q_signed, jnp.asarray(s), cfg)


# ----------------------------------------------------------------------------
# Pytrees
# ----------------------------------------------------------------------------

LeafFilter = Callable[[tuple, Any], bool]


def default_leaf_filter(path: tuple, leaf: Any) -> bool:
    """Maps every floating leaf of rank >= 2 (kernels); biases, norm scales and
    integer leaves stay digital."""
    del path
    return np.ndim(leaf) >= 2 and jnp.issubdtype(jnp.result_type(leaf), jnp.floating)


def mapped_leaves(params: Any, leaf_filter: LeafFilter | None = None) -> Any:
    """Which leaves go onto devices: a pytree of Python bools shaped like ``params``.

    Args:
      params: any pytree of arrays.
      leaf_filter: ``f(path, leaf) -> bool`` with ``path`` the JAX key path
        (``jax.tree_util.keystr(path)`` gives e.g. ``"['Dense_0']['kernel']"``);
        default :func:`default_leaf_filter` (floating, ``ndim >= 2``).
    """
    f = default_leaf_filter if leaf_filter is None else leaf_filter
    return jax.tree_util.tree_map_with_path(lambda p, x: bool(f(p, x)), params)


def check_selected(selected: Any, params: Any) -> None:
    """Raises ``ValueError`` unless ``selected`` is a pytree of Python bools with
    the structure of ``params``."""
    v.check_same_structure("selected", selected, params, check_shapes=False)
    for path, s in jax.tree_util.tree_leaves_with_path(selected):
        if not isinstance(s, (bool, np.bool_)):
            raise ValueError(
                f"selected{jax.tree_util.keystr(path)} must be a Python bool, got {s!r}")


def describe_selection(params: Any, selected: Any | None = None) -> str:
    """A human-readable table of mapped (device) and digital leaves.

    One line per leaf (path, shape, element count, ``mapped``/``digital``), then
    totals of mapped and digital parameters and the mapped fraction.
    """
    if selected is None:
        selected = mapped_leaves(params)
    check_selected(selected, params)
    rows = []
    n_map = n_dig = l_map = l_dig = 0
    for (path, leaf), sel in zip(jax.tree_util.tree_leaves_with_path(params),
                                 jax.tree_util.tree_leaves(selected)):
        n = int(np.size(leaf))
        rows.append((jax.tree_util.keystr(path) or "<root>", str(tuple(np.shape(leaf))), n,
                     "mapped" if sel else "digital"))
        if sel:
            n_map += n
            l_map += 1
        else:
            n_dig += n
            l_dig += 1
    w_path = max([len(r[0]) for r in rows] + [4])
    w_shape = max([len(r[1]) for r in rows] + [5])
    lines = [f"{'leaf':<{w_path}}  {'shape':<{w_shape}}  {'count':>12}  where"]
    lines += [f"{p:<{w_path}}  {s:<{w_shape}}  {n:>12,d}  {k}" for p, s, n, k in rows]
    total = n_map + n_dig
    frac = n_map / total if total else 0.0
    lines.append(f"mapped:  {l_map} leaves, {n_map:,d} weights ({100 * frac:.2f}%)")
    lines.append(f"digital: {l_dig} leaves, {n_dig:,d} parameters")
    return "\n".join(lines)


def _is_mapped(x: Any) -> bool:
    return isinstance(x, MappedTensor)


def map_params(params: Any, cfg: MappingConfig, selected: Any | None = None) -> Any:
    """Maps the selected leaves of ``params`` to :class:`MappedTensor`\\ s.

    Unselected leaves pass through unchanged. ``selected`` defaults to
    :func:`mapped_leaves` ``(params)``. Jittable with ``cfg`` and ``selected``
    static (``selected`` is a pytree of Python bools).
    """
    if selected is None:
        selected = mapped_leaves(params)
    check_selected(selected, params)
    return jax.tree.map(lambda w, s: to_conductances(w, cfg) if s else w, params, selected)


def unmap_params(mapped_params: Any, cfg: MappingConfig) -> Any:
    """Inverse of :func:`map_params`: every :class:`MappedTensor` node is read out
    with :func:`from_conductances`; other leaves pass through."""
    return jax.tree.map(lambda x: from_conductances(x, cfg) if _is_mapped(x) else x,
                        mapped_params, is_leaf=_is_mapped)


def quantize_params(params: Any, cfg: MappingConfig, selected: Any | None = None) -> Any:
    """:func:`quantize` on the selected leaves; others pass through."""
    if selected is None:
        selected = mapped_leaves(params)
    check_selected(selected, params)
    return jax.tree.map(lambda w, s: quantize(w, cfg) if s else w, params, selected)


def n_devices(params: Any, cfg: MappingConfig, selected: Any | None = None) -> int:
    """Total devices the selected leaves occupy (``devices_per_weight`` each)."""
    if selected is None:
        selected = mapped_leaves(params)
    check_selected(selected, params)
    sizes = [int(np.size(w)) for w, s in zip(jax.tree_util.tree_leaves(params),
                                             jax.tree_util.tree_leaves(selected)) if s]
    return int(math.fsum(sizes)) * cfg.devices_per_weight

"""The CiM macro's multiply-accumulate, as the hardware computes it, applied
to any ``apply_fn`` (D-NAT, Lin et al., IEEE JETCAS 2022; the periphery as
CrossSim and DNN+NeuroSim model it).

:func:`transform` takes a model's ``apply_fn(params, x) -> logits`` and returns
``macro_apply(params, bounds, x, keys=None) -> logits`` that computes the
selected layers' ``dot_general`` / ``conv_general_dilated`` on the macro, by
interpreting the jaxpr of ``apply_fn`` (:func:`swimjax._jaxpr.interpret`; no
model rewrite). A layer is selected by the parameter path of its kernel; the
first and last layers stay digital by default. For a selected layer with input
``x`` and kernel ``W`` (a convolution is first cut into im2col patches, so both
become ``x (M, K) @ W (K, O)``):

1. **DAC.** ``x`` is quantized to ``k`` bits with learned or fixed bounds
   (:mod:`swimjax.quantizers`): ``x ~= lo + step * code``, ``code`` in ``[0,
   2^k - 1]``. With ``bit_serial`` the codes enter one bit per cycle.
2. **Weights.** ``W`` is quantized to ``N`` magnitude bits per tensor
   (:func:`swimjax.mapping.quantize_levels`) and split over ``S = ceil(N/m)``
   cells of ``m`` bits (:func:`swimjax.mapping.slice_levels`, MSB first),
   positive and negative weights on separate columns (a differential pair).
3. **Arrays.** The contraction axis ``K`` is cut into ``T = ceil(K / R)``
   arrays of ``R`` rows, the last one zero-padded as hardware does. Each array,
   cell column, sign and input bit gives one partial sum ``P = sum_r code_r
   * level_r``, an integer in ``[0, P_max]``, ``P_max = R (2^k - 1)(2^m - 1)``
   (``R (2^m - 1)`` bit-serial).
4. **ADC.** Each partial sum is digitized by a ``b``-bit ADC spanning
   ``[0, adc_range * P_max]``: ``c = clip(round(P / lsb), 0, 2^b - 1)``,
   ``lsb = adc_range P_max / (2^b - 1)`` (saturating). ``adc_bits=None`` is an
   ideal periphery (no ADC).
5. **Error model.** Optionally every code is replaced by a readout drawn from
   a data-driven table ``P(readout | ideal code)`` (:mod:`swimjax.mac_error`),
   with per-example keys (so the numbers do not depend on the batch size) and
   a straight-through or statistical gradient.
6. **Shift and add.** ``y = s / (2^N - 1) * step * sum (+/-) 2^(bit) 2^(m
   slice) lsb c + lo * sum_k W_q[k, :]`` (the offset of signed inputs is a
   digital term).

**Gradients.** Everything is differentiable for training (D-NAT): input
codes carry the straight-through / PACT gradients of
:func:`swimjax.quantizers.quantize`; the ADC's rounding is straight-through
inside its range and zero where it saturates; the error model's gradient is
the sampler's (``"ste"`` or ``"statistical"``: the slope of the expected
readout). The integer cell levels and input bits are not differentiable, so
each carries a straight-through share of its weight's (input's) gradient,
proportional to its significance (``2^j / sum_i 4^i`` for bit ``j``): with an
ideal periphery the gradients equal those of the quantized layer ``x_q @
W_q`` with straight-through quantizers exactly, and each partial sum's ADC and
error-model slope weighs in with its significance.

Shapes: ``x`` whatever ``apply_fn`` takes, batch first; ``keys`` ``(B,)``
per-example PRNG keys (required with an error model); ``bounds`` a dict
``{layer path: quantizers.Bounds}`` (:func:`init_bounds`).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from swimjax import _jaxpr
from swimjax import _validation as v
from swimjax import mac_error, mapping, quantizers

__all__ = [
    "MacroConfig", "PRESETS", "preset", "Layer", "layers", "init_bounds", "calibrate_bounds",
    "transform", "macro_matmul", "MacroApply", "DEFAULT", "column_banks",
]

Array = jax.Array
#: ``layers`` value that selects every matrix product with a kernel but the
#: first and the last (they stay digital, as in D-NAT and most CiM papers).
DEFAULT = "all_but_first_and_last"
# Primitives through which a kernel keeps its identity (layout and dtype only).
_LAYOUT = frozenset({"convert_element_type", "reshape", "transpose", "copy", "copy_p",
                     "squeeze", "expand_dims", "reduce_precision"})


@dataclasses.dataclass(frozen=True)
class MacroConfig:
    """A CiM macro's periphery and array geometry.

    Attributes:
      rows: ``R``, rows summed into one partial sum (one array's height), >= 1.
      dac_bits: ``k``, input DAC bits in ``[1, 16]`` (the activation
        quantizer's ``bits``).
      bit_serial: feed the input codes one bit per cycle (a partial sum per
        input bit, shifted and added digitally) instead of a multi-bit DAC.
      weight_bits: ``N``, weight magnitude bits (sign separate), in ``[1, 24]``.
      cell_bits: ``m``, bits per cell, in ``[1, min(N, 16)]``; ``S = ceil(N/m)``
        cell columns per weight and sign.
      adc_bits: ``b``, ADC bits in ``[1, 24]``, or None for an ideal periphery.
      adc_range: the ADC's full scale as a fraction of the largest possible
        partial sum ``P_max``, in ``(0, 1]`` (a calibrated range: partial sums
        rarely reach ``P_max``).
      scale: weight scale ``s = max|W|`` ``"per_tensor"`` or ``"per_channel"``.
      name: a label for tables.
    """

    rows: int = 64
    dac_bits: int = 7
    bit_serial: bool = False
    weight_bits: int = 4
    cell_bits: int = 1
    adc_bits: int | None = 7
    adc_range: float = 1.0
    scale: mapping.Scale = "per_tensor"
    name: str = "generic"

    def __post_init__(self) -> None:
        v.check_int("rows", self.rows, 1, None)
        v.check_int("dac_bits", self.dac_bits, 1, quantizers.MAX_BITS)
        if not isinstance(self.bit_serial, (bool, np.bool_)):
            raise ValueError(f"bit_serial must be a bool, got {self.bit_serial!r}")
        v.check_int("weight_bits", self.weight_bits, 1, mapping.MAX_WEIGHT_BITS)
        v.check_int("cell_bits", self.cell_bits, 1,
                    min(self.weight_bits, mapping.MAX_DEVICE_BITS))
        if self.adc_bits is not None:
            v.check_int("adc_bits", self.adc_bits, 1, 24)
        v.check_range("adc_range", self.adc_range, 0.0, 1.0, low_inclusive=False)
        v.check_choice("scale", self.scale, ("per_tensor", "per_channel"))

    @property
    def mapping_config(self) -> mapping.MappingConfig:
        return mapping.MappingConfig(self.weight_bits, self.cell_bits, self.scale, "differential")

    @property
    def n_slices(self) -> int:
        """``S = ceil(N / m)`` cell columns per weight and sign."""
        return -(-self.weight_bits // self.cell_bits)

    @property
    def max_psum(self) -> int:
        """``P_max``: the largest partial sum of one array."""
        x_max = 1 if self.bit_serial else 2 ** self.dac_bits - 1
        return self.rows * x_max * (2 ** self.cell_bits - 1)

    @property
    def n_codes(self) -> int | None:
        """``2^b``, the ADC's codes (None for an ideal periphery)."""
        return None if self.adc_bits is None else 2 ** self.adc_bits

    @property
    def lsb(self) -> float | None:
        """Partial-sum units per ADC code (None for an ideal periphery)."""
        if self.adc_bits is None:
            return None
        return self.adc_range * self.max_psum / (2 ** self.adc_bits - 1)


#: Macro presets. ``dnat``: the fabricated SRAM macro of D-NAT (64 rows per
#: readout, 7-bit current-steering DACs, 1-bit weight cells, 7-bit ADCs;
#: weight bits not published: 4, inferred; the ADC's full scale not published:
#: half the largest possible partial sum, which inputs and weights all at
#: their maximum alone would exceed). ``rram``: a generic RRAM crossbar
#: (128 rows, 2-bit cells, 8-bit weights, 8-bit DAC, 6-bit ADC over a
#: calibrated quarter of the full range, as CrossSim/NeuroSim-style studies
#: use). ``rram_bit_serial``: the same array fed bit-serially with 5-bit ADCs.
PRESETS: dict[str, MacroConfig] = {
    "dnat": MacroConfig(rows=64, dac_bits=7, weight_bits=4, cell_bits=1, adc_bits=7,
                        adc_range=0.5, name="dnat"),
    "rram": MacroConfig(rows=128, dac_bits=8, weight_bits=8, cell_bits=2, adc_bits=6,
                        adc_range=0.25, name="rram"),
    "rram_bit_serial": MacroConfig(rows=128, dac_bits=8, bit_serial=True, weight_bits=8,
                                   cell_bits=2, adc_bits=5, adc_range=0.5,
                                   name="rram_bit_serial"),
}


def preset(name: str) -> MacroConfig:
    """A :data:`PRESETS` entry by name."""
    v.check_choice("preset", name, tuple(PRESETS))
    return PRESETS[name]


# ----------------------------------------------------------------------------
# The macro's matrix product
# ----------------------------------------------------------------------------

def _significance_shares(n: int, base_bits: int) -> np.ndarray:
    """Straight-through shares ``2^(b j) / sum_i 4^(b i)`` of ``n`` digits of
    ``base_bits`` bits, LSB first: ``sum_j 2^(b j) share_j = 1``."""
    w = 2.0 ** (base_bits * np.arange(n))
    return w / np.sum(w * w)


def _ste_digits(digits: Array, value: Array, shares: np.ndarray, axis: int) -> Array:
    """``digits`` (integer-valued) in the forward pass; in the backward pass each
    digit gets ``share_j`` of ``value``'s gradient (digits stacked on ``axis``)."""
    shape = [1] * digits.ndim
    shape[axis] = len(shares)
    delta = value - lax.stop_gradient(value)
    return lax.stop_gradient(digits) + jnp.asarray(shares, digits.dtype).reshape(shape) * \
        jnp.expand_dims(delta, axis)


def _round_ste(x: Array) -> Array:
    return x + lax.stop_gradient(jnp.round(x) - x)


def _weight_levels(w: Array, cfg: MacroConfig) -> tuple[Array, Array, Array]:
    """``(levels (2, S, K, O), s, w_q)``: the cell levels of the positive and
    negative columns (MSB first, integer-valued float32 with straight-through
    gradients), the scale and the quantized weights (straight-through)."""
    mcfg = cfg.mapping_config
    q, s = mapping.quantize_levels(lax.stop_gradient(w), mcfg)
    s = lax.stop_gradient(s).astype(jnp.float32)
    lev = mapping.slice_levels(q, mcfg).astype(jnp.float32)          # (S, K, O), MSB first
    u = w.astype(jnp.float32) * (mcfg.max_q / jnp.where(s > 0, s, 1.0))
    shares = _significance_shares(cfg.n_slices, cfg.cell_bits)[::-1]  # MSB first
    pos = _ste_digits(jnp.where(w > 0, lev, 0.0), jax.nn.relu(u), shares, 0)
    neg = _ste_digits(jnp.where(w < 0, lev, 0.0), jax.nn.relu(-u), shares, 0)
    w_q = mapping.quantize(lax.stop_gradient(w), mcfg).astype(jnp.float32)
    w_q = w.astype(jnp.float32) + lax.stop_gradient(w_q - w.astype(jnp.float32))
    return jnp.stack([pos, neg]), s, w_q


def _input_planes(code: Array, cfg: MacroConfig) -> tuple[Array, np.ndarray]:
    """``(planes (P, M, K), weights (P,))``: the input codes as the array sees
    them: one plane of codes, or one per bit (LSB first) when bit-serial."""
    if not cfg.bit_serial:
        return code[None], np.ones(1)
    bits = np.arange(cfg.dac_bits)
    c = lax.stop_gradient(code)
    planes = jnp.stack([jnp.floor(c / 2.0 ** b) % 2 for b in bits])
    return _ste_digits(planes, code, _significance_shares(cfg.dac_bits, 1), 0), 2.0 ** bits


def macro_matmul(x: Array, w: Array, bounds: quantizers.Bounds, cfg: MacroConfig,
                 qcfg: quantizers.QuantizerConfig, *, error_model: Any = None,
                 gradient: str = "statistical", keys: Array | None = None,
                 batch: int | None = None) -> Array:
    """``x (M, K) @ w (K, O)`` computed by the macro (see the module docstring).

    Args:
      x: inputs, rows ``M = batch * positions`` (example-major).
      w: the kernel as a matrix.
      bounds: the layer's DAC bounds.
      cfg: the macro; qcfg: the DAC quantizer (``qcfg.bits == cfg.dac_bits``).
      error_model: a :class:`swimjax.mac_error.ErrorModel` over the ADC's
        ``2^b`` codes, or None.
      gradient: the error model's gradient, ``"statistical"`` or ``"ste"``.
      keys: ``(batch,)`` per-example keys (required with an error model).
      batch: examples in ``x`` (``M`` must be a multiple).

    Returns:
      ``(M, O)`` float32 outputs.
    """
    m_rows, k = x.shape
    o = w.shape[1]
    q = quantizers.quantize(x, bounds, qcfg)
    levels, s, w_q = _weight_levels(w, cfg)
    planes, plane_w = _input_planes(q.code, cfg)
    r = cfg.rows
    t = -(-k // r)
    pad = t * r - k
    slice_w = 2.0 ** (cfg.cell_bits * np.arange(cfg.n_slices)[::-1])
    weights = (plane_w[:, None, None] * np.array([1.0, -1.0])[None, :, None]
               * slice_w[None, None, :]).astype(np.float32)              # (P, 2, S)
    if cfg.adc_bits is None:
        if error_model is not None:
            raise ValueError("an error model needs an ADC: set MacroConfig.adc_bits")
        # no ADC: the shift-and-add is linear, so the partial sums need not exist
        combined = jnp.einsum("ziko,pzi->pko", levels, jnp.asarray(weights),
                              precision=lax.Precision.HIGHEST)            # (P, K, O)
        y_int = jnp.einsum("pmk,pko->mo", planes, combined, precision=lax.Precision.HIGHEST)
    else:
        planes = jnp.pad(planes, ((0, 0), (0, 0), (0, pad))).reshape(len(plane_w), m_rows, t, r)
        levels = jnp.pad(levels, ((0, 0), (0, 0), (0, pad), (0, 0)))
        levels = levels.reshape(2, cfg.n_slices, t, r, o)
        if error_model is not None and keys is None:
            raise ValueError("keys (one PRNG key per example) are required with an error model")
        adc = _Adc(float(cfg.lsb), 2 ** cfg.adc_bits, gradient if error_model is not None
                   else "ste", int(batch if batch is not None else m_rows), weights.tobytes())
        y_int = _adc_shift_add(adc, planes, levels, error_model, keys)
    y = y_int * (q.step * (s / cfg.mapping_config.max_q))  # s: () or (1, O)
    return y + q.lo * jnp.sum(w_q, axis=0)[None, :]


class _Adc(NamedTuple):
    """The static part of :func:`_adc_shift_add` (hashable): the ADC's LSB in
    partial-sum units, its code count, the error model's gradient, the
    examples in a call and the ``(P, 2, S)`` float32 shift-and-add weights
    as bytes."""

    lsb: float
    n_codes: int
    gradient: str
    batch: int
    weights: bytes

    def weight_array(self, n_planes: int, n_slices: int) -> Array:
        return jnp.asarray(np.frombuffer(self.weights, np.float32).reshape(n_planes, 2, n_slices))


def _partial_sums(planes: Array, levels: Array) -> Array:
    """One partial sum per input plane, row, array, sign, cell column and output:
    ``planes (P, M, T, R)`` x ``levels (2, S, T, R, O)`` -> ``(P, M, T, 2, S, O)``."""
    return jnp.einsum("pmtr,zitro->pmtzio", planes, levels, precision=lax.Precision.HIGHEST)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _adc_shift_add(adc: _Adc, planes: Array, levels: Array, model: Any, keys: Any) -> Array:
    """Partial sums, ADC codes, error-model readouts, shift-and-add: ``(M, O)``.

    Every partial sum ``P`` is digitized to ``c = clip(round(P / lsb), 0, C -
    1)``, replaced by a readout drawn from ``model`` (if not None, one key per
    example) and weighed back ``lsb * sum (+/-) 2^(bit) 2^(m slice) c``.

    Backward (the derivative of every readout with respect to its partial
    sum): the error model's slope at the ideal code (``mu'(c)`` for the
    statistical gradient, 1 for straight-through or without a model) where
    the ADC does not saturate, ``-0.5 <= P / lsb < C - 0.5``, and 0 where it
    does. The partial sums are recomputed from ``planes`` and ``levels``
    instead of kept: the backward pass needs only the ideal codes, and the
    ``(P, M, T, 2, S, O)`` tensors are ``2 S T / R`` times the layer's
    inputs (memory of one layer's activations, not of every partial sum of
    every layer); the readouts are not redrawn.
    """
    return _adc_shift_add_fwd(adc, planes, levels, model, keys)[0]


def _adc_shift_add_fwd(adc, planes, levels, model, keys):
    psum = _partial_sums(planes, levels)
    code = jnp.clip(jnp.round(psum / adc.lsb), 0.0, adc.n_codes - 1)
    if model is not None:
        bank = column_banks(model, levels.shape[1], levels.shape[-1])
        code = lax.stop_gradient(_sample_per_example(code, model, keys, adc.batch, bank))
    w = adc.weight_array(planes.shape[0], levels.shape[1])
    y = jnp.einsum("pmtzio,pzi->mo", code, w, precision=lax.Precision.HIGHEST) * adc.lsb
    return y, (planes, levels, model)


def _adc_shift_add_bwd(adc, res, g):
    planes, levels, model = res
    psum = _partial_sums(planes, levels)
    r = jnp.round(psum / adc.lsb)
    factor = ((r >= 0) & (r <= adc.n_codes - 1)).astype(psum.dtype)
    if model is not None and adc.gradient == "statistical":
        bank = column_banks(model, levels.shape[1], levels.shape[-1])
        factor = factor * mac_error.readout_slope_at(r, model, bank)
    w = adc.weight_array(planes.shape[0], levels.shape[1])
    g_psum = factor * jnp.einsum("mo,pzi->pmzio", g, w)[:, :, None]   # d y / d psum
    g_planes = jnp.einsum("pmtzio,zitro->pmtr", g_psum, levels, precision=lax.Precision.HIGHEST)
    g_levels = jnp.einsum("pmtzio,pmtr->zitro", g_psum, planes, precision=lax.Precision.HIGHEST)
    return g_planes, g_levels, None, None


_adc_shift_add.defvjp(_adc_shift_add_fwd, _adc_shift_add_bwd)


def column_banks(model: Any, n_slices: int, outputs: int) -> np.ndarray | None:
    """The ADC (bank) of every cell column of a macro layer, ``(2, S, O)``
    int32 (sign, slice MSB first, output), or None for a shared table.

    A layer's physical columns are numbered output-major, ``j = (o * 2 +
    sign) * S + slice`` (the positive then the negative columns of output
    ``o``), and column ``j`` is read by ADC ``j mod n_banks`` (D-NAT's macro
    time-shares 16 ADCs over its columns); the same ADC reads the column in
    every array ``T``. A per-bank error model thus gives each ADC its own
    distortion, and a differential pair's two columns are read by two ADCs
    whenever ``n_banks >= 2``.
    """
    n_banks = model.n_banks
    if n_banks is None:
        return None
    j = (np.arange(outputs)[None, None, :] * 2 + np.arange(2)[:, None, None]) * n_slices \
        + np.arange(n_slices)[None, :, None]
    return (j % n_banks).astype(np.int32)


def _sample_per_example(code: Array, model: Any, keys: Array | None, batch: int | None,
                        bank: np.ndarray | None = None) -> Array:
    """Error-model readouts of ``code (P, M, ...)`` with one key per example
    (rows of ``M`` example-major), so a draw depends on its example only;
    ``bank`` (broadcast to ``code``'s trailing axes) picks each code's table."""
    if keys is None:
        raise ValueError("keys (one PRNG key per example) are required with an error model")
    p, m = code.shape[:2]
    b = int(batch if batch is not None else m)
    per = code.reshape(p, b, m // b, *code.shape[2:])
    per = jnp.moveaxis(per, 1, 0)
    out = jax.vmap(lambda kk, c: mac_error.sample(kk, c, model, gradient="ste", bank=bank)
                   )(keys, per)
    return jnp.moveaxis(out, 0, 1).reshape(code.shape)


# ----------------------------------------------------------------------------
# Layers of a model
# ----------------------------------------------------------------------------

class Layer(NamedTuple):
    """A matrix product of ``apply_fn`` whose kernel is a parameter leaf.

    Attributes:
      path: the kernel's parameter path, ``"params/Conv_0/kernel"`` style.
      kind: ``"dense"`` (``dot_general``) or ``"conv"``.
      contraction: ``K``, the rows a column sums over (``taps * C_in`` for a
        convolution).
      outputs: ``O``, the columns.
      index: order of execution among the model's matrix products.
    """

    path: str
    kind: str
    contraction: int
    outputs: int
    index: int


def _path_str(path: Any) -> str:
    parts = []
    for p in path:
        for attr in ("key", "name", "idx"):
            if hasattr(p, attr):
                parts.append(str(getattr(p, attr)))
                break
        else:
            parts.append(str(p))
    return "/".join(parts)


@dataclasses.dataclass(frozen=True)
class _Val:
    """A value during interpretation: the array and, if it is a parameter leaf
    (up to layout and dtype), the leaf's path."""

    array: Any
    leaf: str | None = None


def _kernel_matrix_dot(eqn: Any, vals: Sequence[_Val]) -> tuple[int, int] | None:
    """``(kernel operand index, contraction size)`` of a dot_general with one
    parameter-leaf operand and no batch dimensions, else None."""
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    if lb or rb:
        return None
    leaf_ops = [i for i, val in enumerate(vals) if val.leaf is not None]
    if len(leaf_ops) != 1:
        return None
    i = leaf_ops[0]
    contracting = (lc, rc)[i]
    shape = np.shape(vals[i].array)
    return i, int(np.prod([shape[d] for d in contracting]))


def _as_matrices_dot(eqn: Any, vals: Sequence[_Val], ki: int) -> tuple[Array, Array, Callable]:
    """``(x (M, K), w (K, O), back)`` of a dot_general with kernel operand
    ``ki``; ``back(y (M, O))`` restores the dot_general's output layout."""
    (lc, rc), _ = eqn.params["dimension_numbers"]
    xi = 1 - ki
    x, w = vals[xi].array, vals[ki].array
    xc, wc = (lc, rc)[xi], (lc, rc)[ki]
    x_free = [d for d in range(x.ndim) if d not in xc]
    w_free = [d for d in range(w.ndim) if d not in wc]
    x2 = jnp.transpose(x, x_free + list(xc)).reshape(-1, int(np.prod([x.shape[d] for d in xc])))
    w2 = jnp.transpose(w, list(wc) + w_free).reshape(x2.shape[1], -1)
    x_out = [x.shape[d] for d in x_free]
    w_out = [w.shape[d] for d in w_free]

    def back(y: Array) -> Array:
        y = y.reshape(x_out + w_out)
        if ki == 0:  # dot_general puts lhs (the kernel) free dims first
            y = jnp.transpose(y, list(range(len(x_out), len(x_out) + len(w_out)))
                              + list(range(len(x_out))))
        return y

    return x2, w2, back


def _as_matrices_conv(eqn: Any, vals: Sequence[_Val]) -> tuple[Array, Array, Callable]:
    """``(patches (M, K), w (K, O), back)`` of a convolution: im2col patches
    (channel-major, as :func:`jax.lax.conv_general_dilated_patches` orders
    them) and the kernel as a matrix in the same order."""
    p = eqn.params
    if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
        raise ValueError("grouped convolutions are not supported on the macro "
                         f"(feature_group_count={p['feature_group_count']}); keep the layer "
                         "digital with the layers= pattern")
    x, w = vals[0].array, vals[1].array
    dn = p["dimension_numbers"]
    lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
    spatial = [w.shape[d] for d in rhs_spec[2:]]
    patches = lax.conv_general_dilated_patches(
        x, filter_shape=spatial, window_strides=p["window_strides"], padding=p["padding"],
        lhs_dilation=p["lhs_dilation"], rhs_dilation=p["rhs_dilation"],
        dimension_numbers=dn, precision=lax.Precision.HIGHEST)
    # patches in the output layout with features at out_spec[1]: to (N, spatial..., K)
    order = [out_spec[0]] + list(out_spec[2:]) + [out_spec[1]]
    pt = jnp.transpose(patches, order)
    out_shape = pt.shape[:-1]
    x2 = pt.reshape(-1, pt.shape[-1])
    w2 = jnp.transpose(w, [rhs_spec[1]] + list(rhs_spec[2:]) + [rhs_spec[0]])
    w2 = w2.reshape(-1, w.shape[rhs_spec[0]])
    del lhs_spec

    def back(y: Array) -> Array:
        y = y.reshape(*out_shape, y.shape[-1])            # (N, spatial..., O)
        inv = np.argsort(order)
        return jnp.transpose(y, inv)

    return x2, w2, back


def _matmul_site(eqn: Any, vals: Sequence[_Val]) -> tuple[str, int] | None:
    """``(kernel path, kernel operand index)`` if ``eqn`` is a matrix product
    of a parameter-leaf kernel the macro can compute, else None."""
    name = eqn.primitive.name
    if name == "dot_general":
        found = _kernel_matrix_dot(eqn, vals)
        if found is not None and np.ndim(vals[found[0]].array) >= 2:
            return vals[found[0]].leaf, found[0]
    elif name == "conv_general_dilated" and vals[1].leaf is not None and vals[0].leaf is None:
        return vals[1].leaf, 1
    return None


def _interpret(fn: Callable, params: Any, x: Any, on_matmul: Callable) -> Any:
    """Evaluates ``fn(params, x)`` with ``on_matmul(eqn, vals, path, ki)``
    deciding every kernel matrix product (returning the outputs, or None to
    compute it as is)."""
    leaves_p, p_def = jax.tree_util.tree_flatten_with_path(params)
    leaves_x, x_def = jax.tree.flatten(x)
    paths = [_path_str(pth) for pth, _ in leaves_p]
    arrays = [a for _, a in leaves_p]
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(
        jax.tree.unflatten(p_def, arrays), jax.tree.unflatten(x_def, leaves_x))

    def eval_eqn(eqn, vals: list[_Val], inner) -> list[_Val]:
        if inner is not None:
            return _jaxpr.interpret(inner[0], [_Val(c) for c in inner[1]], vals, eval_eqn,
                                    literal=_Val)
        site = _matmul_site(eqn, vals)
        if site is not None:
            out = on_matmul(eqn, vals, *site)
            if out is not None:
                return [_Val(out)]
        outs = _jaxpr.bind(eqn, [val.array for val in vals])
        leaf = None
        if eqn.primitive.name in _LAYOUT and len(vals) == 1:
            leaf = vals[0].leaf
        return [_Val(o, leaf) for o in outs]

    args = [_Val(a, pth) for a, pth in zip(arrays, paths)] + [_Val(a) for a in leaves_x]
    outs = _jaxpr.interpret(closed.jaxpr, [_Val(c) for c in closed.consts], args, eval_eqn,
                            literal=_Val)
    return jax.tree.unflatten(jax.tree.structure(out_shape), [o.array for o in outs])


def _matrices(eqn: Any, vals: Sequence[_Val], ki: int) -> tuple[Array, Array, Callable]:
    if eqn.primitive.name == "conv_general_dilated":
        return _as_matrices_conv(eqn, vals)
    return _as_matrices_dot(eqn, vals, ki)


def layers(apply_fn: Callable, params: Any, x: Any) -> list[Layer]:
    """Every matrix product of ``apply_fn(params, x)`` whose kernel is a
    parameter leaf, in execution order (shapes only; nothing is computed)."""
    found: list[Layer] = []

    def record(eqn, vals, path, ki):
        w = vals[ki].array
        if eqn.primitive.name == "conv_general_dilated":
            rhs = eqn.params["dimension_numbers"].rhs_spec
            k = int(np.prod([w.shape[d] for d in rhs[1:]]))
            o = int(w.shape[rhs[0]])
            kind = "conv"
        else:
            k = _kernel_matrix_dot(eqn, vals)[1]
            o = int(np.prod(w.shape)) // k
            kind = "dense"
        found.append(Layer(path, kind, k, o, len(found)))
        return None

    jax.eval_shape(lambda p, xx: _interpret(apply_fn, p, xx, record), params, x)
    return found


def _select(all_layers: Sequence[Layer], pattern: str | None) -> tuple[str, ...]:
    if pattern is None or pattern == DEFAULT:
        return tuple(layer.path for layer in all_layers[1:-1])
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise ValueError(f"layers must be a regular expression over parameter paths or "
                         f"{DEFAULT!r}, got {pattern!r}: {e}") from None
    chosen = tuple(layer.path for layer in all_layers if rx.search(layer.path))
    if not chosen:
        raise ValueError(f"layers pattern {pattern!r} matches no kernel; the model's are "
                         f"{[layer.path for layer in all_layers]}")
    return chosen


def calibrate_bounds(apply_fn: Callable, params: Any, x: Any, paths: Sequence[str],
                     qcfg: quantizers.QuantizerConfig, **calibrate_kw: Any
                     ) -> dict[str, quantizers.Bounds]:
    """DAC bounds ``{path: Bounds}`` calibrated on the inputs each macro layer
    sees when ``apply_fn(params, x)`` runs in floating point
    (:func:`swimjax.quantizers.calibrate` with ``calibrate_kw``, e.g.
    ``percentile=99.9``); a better start than fixed inits for training."""
    seen: dict[str, Any] = {}
    wanted = frozenset(paths)

    def record(eqn, vals, path, ki):
        if path in wanted:
            seen[path] = np.asarray(_matrices(eqn, vals, ki)[0])
        return None

    _interpret(apply_fn, params, x, record)
    missing = [p for p in paths if p not in seen]
    if missing:
        raise ValueError(f"paths {missing} are not kernel matrix products of apply_fn")
    return {p: quantizers.calibrate(qcfg, seen[p], **calibrate_kw) for p in paths}


def init_bounds(paths: Sequence[str], qcfg: quantizers.QuantizerConfig
                ) -> dict[str, quantizers.Bounds]:
    """Initial DAC bounds ``{path: Bounds}`` of the macro layers ``paths``
    (see :func:`transform`'s ``.paths``); train them with the parameters."""
    return {p: quantizers.init_bounds(qcfg) for p in paths}


class MacroApply(NamedTuple):
    """The transformed model: ``fn(params, bounds, x, keys=None) -> logits``
    and the kernel paths computed on the macro, in execution order."""

    fn: Callable[..., Any]
    paths: tuple[str, ...]


def transform(apply_fn: Callable, params: Any, x_example: Any, cfg: MacroConfig,
              qcfg: quantizers.QuantizerConfig, *, error_model: Any = None,
              gradient: str = "statistical", layers_pattern: str | None = DEFAULT
              ) -> MacroApply:
    """``apply_fn`` with the selected layers computed on the macro.

    Args:
      apply_fn: ``apply_fn(params, x) -> logits``, any JAX function.
      params: example parameters (shapes and structure: layer discovery).
      x_example: an example batch (shapes only).
      cfg: the macro; qcfg: the DAC quantizer of every macro layer.
      error_model: a :class:`swimjax.mac_error.ErrorModel` with ``2^b`` codes,
        or None (an exact ADC).
      gradient: ``"statistical"`` or ``"ste"`` through the error model.
      layers_pattern: :data:`DEFAULT` (all but the first and the last kernel
        matrix products) or a regular expression searched in the kernels'
        parameter paths (``"params/Conv_1/kernel"`` style; see :func:`layers`).

    Returns:
      :class:`MacroApply`: ``fn(params, bounds, x, keys=None)`` with
      ``bounds`` a dict ``{path: quantizers.Bounds}`` for every path in
      ``.paths`` (:func:`init_bounds`) and ``keys`` ``(B,)`` per-example keys
      (required with an error model).

    Raises:
      ValueError: a mismatch between ``qcfg.bits`` and ``cfg.dac_bits``, an
        error model whose code count is not the ADC's, an unknown gradient, a
        pattern that selects nothing.
    """
    if not isinstance(cfg, MacroConfig):
        raise ValueError(f"cfg must be a MacroConfig, got {type(cfg).__name__}")
    if qcfg.bits != cfg.dac_bits:
        raise ValueError(f"the quantizer's bits ({qcfg.bits}) must equal the macro's dac_bits "
                         f"({cfg.dac_bits})")
    v.check_choice("gradient", gradient, ("statistical", "ste"))
    if error_model is not None:
        if cfg.adc_bits is None:
            raise ValueError("an error model needs an ADC: MacroConfig.adc_bits is None")
        n = int(np.shape(error_model.table)[-1])
        if n != cfg.n_codes:
            raise ValueError(f"the error model has {n} codes but the {cfg.adc_bits}-bit ADC "
                             f"has {cfg.n_codes}")
    paths = _select(layers(apply_fn, params, x_example), layers_pattern)
    selected = frozenset(paths)

    def fn(params: Any, bounds: dict, x: Any, keys: Array | None = None) -> Any:
        missing = [p for p in paths if p not in bounds]
        if missing:
            raise ValueError(f"bounds must hold the DAC bounds of every macro layer; missing "
                             f"{missing}")
        if error_model is not None and keys is None:
            raise ValueError("keys (one PRNG key per example) are required with an error model")
        batch = int(np.shape(jax.tree.leaves(x)[0])[0])
        order = {p: i for i, p in enumerate(paths)}

        def on_matmul(eqn, vals, path, ki):
            if path not in selected:
                return None
            x2, w2, back = _matrices(eqn, vals, ki)
            lk = None if keys is None else jax.vmap(
                lambda kk: jax.random.fold_in(kk, order[path]))(keys)
            y = macro_matmul(x2, w2, bounds[path], cfg, qcfg, error_model=error_model,
                             gradient=gradient, keys=lk, batch=batch)
            dtype = eqn.outvars[0].aval.dtype
            return back(y).astype(dtype)

        return _interpret(apply_fn, params, x, on_matmul)

    return MacroApply(fn, paths)

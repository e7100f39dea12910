"""D-MAC-EM: data-driven error models of a CiM macro's digitized partial sums.

A b-bit ADC turns every partial sum into an integer code ``c`` in
``[0, C - 1]``, ``C = 2^b`` (codes are non-negative; signs are carried by
separate positive/negative arrays or a sign bit). A measured macro does not
return ``c`` but a readout ``k`` drawn from a discrete distribution that
depends on ``c`` (D-NAT, Lin et al., IEEE JETCAS 2022): the error model is the
table::

    T[c, k] = P(readout = k | ideal code = c),   every row sums to 1,

shared by every ADC (``table`` of shape ``(C, C)``) or one per ADC / bank
(``(n_banks, C, C)``). Every code, offset, spread and jump here is in **LSB of
the ADC** (one code step).

What the module gives:

* :class:`ErrorModel` (a NamedTuple, hence a pytree that ``jit``/``vmap`` take
  as an argument) built and validated by :func:`from_table`; :func:`load` /
  :func:`save` (formats below); :func:`from_pairs` (measured
  ``(ideal, readout)`` pairs: counts with additive smoothing);
  :func:`synthetic` (macro-like tables without silicon, :data:`PRESETS`);
  :func:`gaussian_like` (A-MAC-EM: the discretized Gaussian with each row's
  mean and variance, for D-NAT's A-NAT comparison).
* :func:`expected_readout` ``mu(c) = sum_k k T[c, k]`` and its slope
  :func:`readout_slope`.
* :func:`sample`: readouts drawn from the table (Walker's alias method, O(1)
  per draw) with a selectable backward pass through ``jax.custom_vjp``:
  ``"ste"`` (straight-through: the cotangent passes unchanged) or
  ``"statistical"`` (the cotangent times ``mu'(c)`` at the ideal code, the
  gradient estimated from the measured distribution).

File formats
------------
**NPZ** (``.npz``, read with ``allow_pickle=False``): one array under the key
``table``, float, shape ``(C, C)`` (one table for every ADC) or
``(n_banks, C, C)`` (axis 0 the bank), rows indexed by the ideal code and
columns by the readout code. Other keys are ignored.

**CSV** (``.csv``), long format, one line per non-zero entry, a header line
first; blank lines and lines starting with ``#`` are skipped::

    ideal,readout,probability          # or: ideal,readout,count
    0,0,0.97
    0,1,0.03
    ...

Columns are found by name, in any order; an optional ``bank`` column makes a
``(n_banks, C, C)`` table (banks ``0..max``). Codes and banks are
non-negative integers; entries not listed are 0. ``C`` is ``n_codes`` when
given to :func:`load`, else the largest code listed plus one (which must then
be a power of two). With ``probability`` each ``(bank, ideal, readout)``
appears at most once and the rows must sum to 1 (within ``atol``); with
``count`` repeated lines add up and each row is normalized as
:func:`from_pairs` does (``smoothing`` pseudo-counts, unobserved rows filled
from the nearest observed row). :func:`save` writes the probability layout
with ``%.9g`` (float32 round-trips exactly up to the row renormalization).

Speed
-----
:func:`sample` on this project's shared 2-core CPU, ``C = 128``, 10^6 codes in
one call under ``jit``: 6e7 to 9.5e7 draws per second (10.6 to 16 ms; the
test ``test_draw_speed_report`` prints it); an inverse-CDF draw (a uniform
against the row's cumulative sums, by comparison or by ``searchsorted``)
took about 0.2 s for the same draws, some 20x slower, hence the alias method.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import tempfile
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from swimjax import _validation as v

__all__ = [
    'DEFAULT_ATOL', 'ErrorModel', 'GRADIENTS', 'Gradient', 'MAX_ADC_BITS', 'PRESETS',
    'SyntheticParams', 'expected_readout', 'from_pairs', 'from_table', 'gaussian_like', 'load',
    'readout_slope', 'readout_slope_at', 'sample', 'save', 'synthetic',
]

Gradient = Literal["statistical", "ste"]
#: The backward passes :func:`sample` offers.
GRADIENTS: tuple[str, ...] = ("statistical", "ste")
#: Largest ADC resolution a table may have (``C = 2^12``: a 64 MiB float32 table).
MAX_ADC_BITS = 12
#: Default tolerance on each row's sum in :func:`from_table` and :func:`load`.
DEFAULT_ATOL = 1e-4


# ----------------------------------------------------------------------------
# The table type
# ----------------------------------------------------------------------------

class ErrorModel(NamedTuple):
    """A validated MAC error table plus what sampling and gradients need.

    Build it with :func:`from_table` (or :func:`load`, :func:`from_pairs`,
    :func:`synthetic`, :func:`gaussian_like`), which validate and precompute;
    the raw constructor checks nothing. ``B...`` below is ``()`` for a shared
    table and ``(n_banks,)`` for one table per bank.

    Attributes:
      table: ``(*B, C, C)`` float32, ``table[..., c, k] = P(readout k | ideal c)``;
        rows renormalized to sum to 1.
      threshold: ``(*B, C, C)`` uint32, Walker alias acceptance thresholds: cell
        ``j`` of row ``c`` returns ``j`` when a uniform ``(32 - b)``-bit integer
        is below ``threshold[..., c, j]``, else ``alias[..., c, j]``.
      alias: ``(*B, C, C)`` int32, the alias codes.
      mu: ``(*B, C)`` float32, expected readout ``mu(c)`` in LSB.
      slope: ``(*B, C)`` float32, ``mu'(c)`` (dimensionless, LSB per LSB; see
        :func:`readout_slope`).
    """

    table: jax.Array
    threshold: jax.Array
    alias: jax.Array
    mu: jax.Array
    slope: jax.Array

    @property
    def n_codes(self) -> int:
        """``C``, the number of ADC codes."""
        return int(self.table.shape[-1])

    @property
    def n_banks(self) -> int | None:
        """Number of per-bank tables, or ``None`` for one shared table."""
        return int(self.table.shape[0]) if self.table.ndim == 3 else None

    def __repr__(self) -> str:
        return f"ErrorModel(n_codes={self.n_codes}, n_banks={self.n_banks})"


def _where(bank: int | None, row: int) -> str:
    """Names a row for error messages: ``row 5`` or ``bank 2, row 5``."""
    return f"row {row}" if bank is None else f"bank {bank}, row {row}"


def _check_n_codes(name: str, n_codes: Any) -> int:
    c = v.check_int(name, n_codes, 2, 2 ** MAX_ADC_BITS)
    if c & (c - 1):
        raise ValueError(f"{name} must be a power of two (2^b codes of a b-bit ADC) in "
                         f"[2, {2 ** MAX_ADC_BITS}], got {c}")
    return c


def _validate(table: Any, n_codes: int | None, atol: float) -> tuple[np.ndarray, bool]:
    """Checks a table; returns it as float64 ``(B, C, C)``, rows normalized, and
    whether it had a bank axis.

    Raises ValueError naming the first offending bank/row.
    """
    try:
        t = np.array(table, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"table must be an array of real numbers, got {type(table).__name__}: "
                         f"{e}") from None
    if t.ndim not in (2, 3):
        raise ValueError(f"table must have 2 dims (C, C) or 3 dims (n_banks, C, C), "
                         f"got shape {t.shape}")
    if t.shape[-1] != t.shape[-2]:
        raise ValueError(f"table's last two axes (ideal, readout) must be square, "
                         f"got shape {t.shape}")
    if t.shape[0] == 0:
        raise ValueError(f"table must hold at least one bank, got shape {t.shape}")
    c = _check_n_codes("table's code count C (its last axis)", t.shape[-1])
    if n_codes is not None and c != _check_n_codes("n_codes", n_codes):
        raise ValueError(f"table has {c} codes (shape {t.shape}) but the ADC has n_codes="
                         f"{n_codes} codes")
    banked = t.ndim == 3
    t3 = t if banked else t[None]
    atol = v.check_range("atol", atol, 0.0, 1.0)

    def first(mask: np.ndarray) -> tuple[int | None, int, int]:
        b, r, k = (int(i) for i in np.argwhere(mask)[0])
        return (b if banked else None), r, k

    if not np.all(np.isfinite(t3)):
        b, r, k = first(~np.isfinite(t3))
        raise ValueError(f"table {_where(b, r)} must be finite, found "
                         f"{t3[b or 0, r, k].item()} at readout {k}")
    if np.any(t3 < 0):
        b, r, k = first(t3 < 0)
        raise ValueError(f"table {_where(b, r)} must have probabilities >= 0, found "
                         f"{t3[b or 0, r, k].item()} at readout {k}")
    sums = t3.sum(-1)
    bad = np.abs(sums - 1.0) > atol
    if np.any(bad):
        b, r = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"table {_where(b if banked else None, r)} must sum to 1 "
                         f"(within atol={atol}), sums to {sums[b, r]:.9g}")
    return t3 / sums[..., None], banked


def _alias_tables(t3: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Walker/Vose alias tables of every row of a normalized ``(B, C, C)`` table.

    Returns ``(threshold uint32, alias int32)``, both ``(B, C, C)``; cell ``j``
    keeps ``j`` with probability ``threshold / 2^(32 - b)``, else gives
    ``alias``. The implied distribution equals the row within ``2^-(33 - b)``
    per readout (the threshold's rounding).
    """
    n_b, n_c, _ = t3.shape
    scale = float(2 ** (32 - (n_c.bit_length() - 1)))
    keep = np.ones((n_b, n_c, n_c))
    alias = np.broadcast_to(np.arange(n_c, dtype=np.int32), t3.shape).copy()
    for b in range(n_b):
        for r in range(n_c):
            q = t3[b, r] * n_c
            small = [int(i) for i in np.flatnonzero(q < 1.0)]
            large = [int(i) for i in np.flatnonzero(q >= 1.0)]
            while small and large:
                s, big = small.pop(), large.pop()
                keep[b, r, s] = q[s]
                alias[b, r, s] = big
                q[big] -= 1.0 - q[s]
                (small if q[big] < 1.0 else large).append(big)
            # Leftovers are 1 up to rounding: they keep their own cell.
    threshold = np.clip(np.rint(keep * scale), 0, scale).astype(np.uint32)
    return threshold, alias


def _mean_and_slope(table: Any, xp: Any) -> tuple[Any, Any]:
    """``mu (..., C)`` and its slope for a NumPy (``xp=np``) or JAX table."""
    n_c = table.shape[-1]
    mu = (table * xp.arange(n_c, dtype=table.dtype)).sum(-1)
    d = mu[..., 1:] - mu[..., :-1]                       # forward differences, (..., C-1)
    inner = (d[..., 1:] + d[..., :-1]) / 2               # central differences, (..., C-2)
    return mu, xp.concatenate([d[..., :1], inner, d[..., -1:]], axis=-1)


def _build(t3: np.ndarray, banked: bool) -> ErrorModel:
    """An ErrorModel from a validated, normalized float64 ``(B, C, C)`` table."""
    threshold, alias = _alias_tables(t3)
    mu, slope = _mean_and_slope(t3, np)
    squeeze = (lambda a: a) if banked else (lambda a: a[0])
    return ErrorModel(
        table=jnp.asarray(squeeze(t3), jnp.float32),
        threshold=jnp.asarray(squeeze(threshold)),
        alias=jnp.asarray(squeeze(alias)),
        mu=jnp.asarray(squeeze(mu), jnp.float32),
        slope=jnp.asarray(squeeze(slope), jnp.float32),
    )


def from_table(table: Any, *, n_codes: int | None = None,
               atol: float = DEFAULT_ATOL) -> ErrorModel:
    """Validates a probability table and precomputes sampling and gradient arrays.

    Args:
      table: ``(C, C)`` (shared) or ``(n_banks, C, C)`` probabilities
        ``P(readout | ideal)``, ideal code on the second-to-last axis.
      n_codes: the ADC's code count ``2^b``; when given the table must match it.
      atol: tolerance on each row's sum; rows within it are renormalized.

    Raises:
      ValueError: more than 3 or fewer than 2 dims, non-square last axes, ``C``
        not a power of two in ``[2, 2^MAX_ADC_BITS]`` or not ``n_codes``, a NaN
        or Inf, a negative entry, or a row not summing to 1; the message names
        the first offending bank and row (and the row's sum).
    """
    return _build(*_validate(table, n_codes, atol))


def expected_readout(model: ErrorModel) -> jax.Array:
    """``mu(c) = sum_k k T[c, k]``: the mean readout of each ideal code, LSB.

    Computed from ``model.table`` (works on traced models too); shape
    ``(*B, C)``, float32.
    """
    return _mean_and_slope(jnp.asarray(model.table), jnp)[0]


def readout_slope(model: ErrorModel) -> jax.Array:
    """``mu'(c)``, the slope of :func:`expected_readout`, shape ``(*B, C)``.

    Central differences ``(mu[c+1] - mu[c-1]) / 2`` inside; one-sided at the
    ends, ``mu[1] - mu[0]`` and ``mu[C-1] - mu[C-2]`` (the only neighbours a
    saturating ADC has). An ideal table gives 1 everywhere.
    """
    return _mean_and_slope(jnp.asarray(model.table), jnp)[1]


def readout_slope_at(codes: jax.Array, model: ErrorModel, bank: Any = None) -> jax.Array:
    """:func:`readout_slope` at every ideal code of ``codes`` (any shape,
    rounded and clipped to ``[0, C - 1]``): the factor the statistical
    gradient multiplies a readout's cotangent by. ``bank`` as in
    :func:`sample` (required for a per-bank model, forbidden otherwise)."""
    x = jnp.asarray(codes)
    dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
    return model.slope.reshape(-1)[_rows(x, model, bank)].astype(dtype)


def _rows(x: jax.Array, model: ErrorModel, bank: Any) -> jax.Array:
    """Flat row index ``bank * C + round(clip(x))`` of every code (NaN: row 0)."""
    n_c = model.table.shape[-1]
    row = jnp.clip(jnp.round(jnp.where(jnp.isnan(x), 0.0, x)), 0, n_c - 1).astype(jnp.int32)
    if model.table.ndim == 3:
        if bank is None:
            raise ValueError(f"model has {model.table.shape[0]} banks: pass bank= (the bank "
                             f"of each code)")
        return row + _bank_index(bank, model.table.shape[0], x.shape) * n_c
    if bank is not None:
        raise ValueError("bank was given but the model has one shared table (n_banks=None)")
    return row


# ----------------------------------------------------------------------------
# Tables from counts: measured pairs and count files
# ----------------------------------------------------------------------------

def _shift_row(p: np.ndarray, d: int) -> np.ndarray:
    """Row ``p`` moved by ``d`` codes; mass pushed past an end piles on it."""
    out = np.zeros_like(p)
    np.add.at(out, np.clip(np.arange(p.size) + d, 0, p.size - 1), p)
    return out


def _from_counts(counts: np.ndarray, smoothing: float, banked: bool) -> np.ndarray:
    """Normalized ``(B, C, C)`` table from non-negative counts (see :func:`from_pairs`)."""
    n_b, n_c, _ = counts.shape
    totals = counts.sum(-1)
    denom = totals + smoothing * n_c
    out = (counts + smoothing) / np.where(denom > 0, denom, 1.0)[..., None]
    for b in range(n_b):
        seen = np.flatnonzero(totals[b] > 0)
        if seen.size == 0:
            raise ValueError(f"no counts observed{'' if not banked else f' in bank {b}'}: "
                             f"cannot build a table")
        for r in np.flatnonzero(totals[b] == 0):
            src = int(seen[np.argmin(np.abs(seen - r))])   # nearest; ties to the lower code
            out[b, r] = _shift_row(out[b, src], int(r) - src)
    return out


def _check_codes(name: str, x: Any, n: int, what: str = "code") -> np.ndarray:
    """Integer-valued array in ``[0, n-1]`` as int64 (flattened)."""
    a = np.asarray(x)
    if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)) \
            or a.dtype == np.bool_:
        raise ValueError(f"{name} must hold integer {what}s, got dtype {a.dtype}")
    a = a.ravel()
    bad = ~np.isfinite(a) | (a != np.round(a)) | (a < 0) | (a > n - 1) \
        if np.issubdtype(a.dtype, np.floating) else (a < 0) | (a > n - 1)
    if np.any(bad):
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{name} must hold integer {what}s in [0, {n - 1}], found "
                         f"{a[i].item()!r} at index {i}")
    return a.astype(np.int64)


def from_pairs(ideal: Any, readout: Any, n_codes: int, *, smoothing: float = 0.0,
               bank: Any = None, n_banks: int | None = None) -> ErrorModel:
    """Builds a table from measured ``(ideal, readout)`` code pairs.

    Each pair ``i`` is one measurement: the macro should have returned
    ``ideal[i]`` and returned ``readout[i]``. For an observed ideal code with
    ``N_c`` measurements and ``n[c, k]`` of them reading ``k``::

        T[c, k] = (n[c, k] + smoothing) / (N_c + smoothing * C)

    (additive smoothing: ``smoothing`` pseudo-counts on every readout; 0 keeps
    the empirical frequencies, which is what a simulation wants; a positive
    value gives every readout a non-zero probability). An ideal code never
    observed takes the row of the nearest observed code (ties: the lower one)
    shifted by the distance, mass pushed past code 0 or ``C-1`` piling there
    (the error's shape is assumed to vary slowly with the code).

    Args:
      ideal, readout: integer codes in ``[0, n_codes - 1]`` (integer-valued
        floats accepted), same shape (any; flattened).
      n_codes: ``C = 2^b``.
      smoothing: pseudo-count per readout, finite and >= 0.
      bank: optional bank index in ``[0, n_banks - 1]`` per pair (same shape);
        gives an ``(n_banks, C, C)`` table, each bank built as above.
      n_banks: number of banks (required with ``bank``).

    Raises:
      ValueError: shapes differ, a code or bank is out of range or not an
        integer (naming the first such index), no pair at all (in a bank).
    """
    n_c = _check_n_codes("n_codes", n_codes)
    smoothing = v.check_nonnegative("smoothing", smoothing)
    shapes = {"ideal": np.shape(ideal), "readout": np.shape(readout)}
    if bank is not None:
        shapes["bank"] = np.shape(bank)
    if len(set(shapes.values())) != 1:
        raise ValueError(f"ideal, readout (and bank) must have one shape, got {shapes}")
    ci = _check_codes("ideal", ideal, n_c)
    cr = _check_codes("readout", readout, n_c)
    if ci.size == 0:
        raise ValueError("from_pairs needs at least one (ideal, readout) pair, got none")
    if (bank is None) != (n_banks is None):
        raise ValueError("bank and n_banks must be given together (per-bank tables) or "
                         "both left None (one shared table)")
    if bank is None:
        n_b, cb = 1, np.zeros_like(ci)
    else:
        n_b = v.check_int("n_banks", n_banks, 1)
        cb = _check_codes("bank", bank, n_b, "bank index")
    counts = np.bincount((cb * n_c + ci) * n_c + cr, minlength=n_b * n_c * n_c)
    t3 = _from_counts(counts.reshape(n_b, n_c, n_c).astype(np.float64), smoothing,
                      bank is not None)
    return _build(t3, bank is not None)


# ----------------------------------------------------------------------------
# Synthetic macro-like tables
# ----------------------------------------------------------------------------

def _finite(name: str, value: Any) -> float:
    return v.check_range(name, value, -math.inf, math.inf,
                         low_inclusive=False, high_inclusive=False)


@dataclasses.dataclass(frozen=True)
class SyntheticParams:
    """Parameters of a synthetic macro-like table (every unit: ADC LSB).

    The readout of ideal code ``c`` (``x = c / (C - 1)`` in ``[0, 1]``) has mean::

        m(c) = offset + o_t + (1 + gain_error + g_t) c - compression * c x
               + inl * 4 x (1 - x) + d_t[c]

    and std ``s(c) = spread + spread_growth * c``; it is a Gaussian of that
    mean and std discretized to the nearest code, the tails beyond code 0 and
    ``C - 1`` piling on them (the ADC saturates), mixed with rare jumps:
    probability ``jump_prob`` of the same Gaussian moved by ``+jump_size`` or
    ``-jump_size`` (half each). ``o_t ~ N(0, offset_std)`` and ``g_t ~ N(0,
    gain_std)`` per table (per bank: one ADC's offset and gain mismatch)
    and ``d_t[c] ~ N(0, dnl)`` per code and table are drawn from the key.
    All zero gives the identity table. With ``gain_error`` and
    ``spread_growth`` the distortion grows with the value, as D-NAT measured.

    Attributes:
      offset: constant shift, LSB (any sign).
      gain_error: relative gain error, in ``(-1, 1)``: ``-0.05`` compresses the
        top code by 5 % of full scale.
      compression: ``a`` in ``[0, 0.5]``, a compressive transfer curve
        ``c (1 - a x)``: the top code reads ``(1 - a)(C - 1)`` and the slope
        falls linearly from 1 at code 0 to ``1 - 2a`` at the top (0 at
        ``a = 0.5``: the analog sum saturates exactly at full scale; larger
        ``a`` would make the curve fold back, which no summing node does).
        Physics: each conducting cell's current falls in proportion to the
        summing line's voltage (finite output resistance of the current
        sources, IR drop), and that voltage grows with the sum itself, so
        the sum reads ``c (1 - lambda c)``: a distortion that grows with the
        value and is the same on every readout (systematic, learnable).
      inl: integral non-linearity, a smooth bow, its peak (at mid-scale) in LSB
        (any sign).
      spread: readout std at code 0, LSB, >= 0.
      spread_growth: increase of the std per code, LSB per LSB, >= 0.
      jump_prob: probability of a large jump, in ``[0, 1]``.
      jump_size: size of a jump, LSB, >= 0.
      dnl: std of the random per-code mean shift, LSB, >= 0.
      offset_std: std of the random offset of each table (bank), LSB, >= 0.
      gain_std: std of the random relative gain error of each table (bank),
        dimensionless, in ``[0, 0.5]`` (a reference or bias current
        mismatched between ADCs).
    """

    offset: float = 0.0
    gain_error: float = 0.0
    compression: float = 0.0
    inl: float = 0.0
    spread: float = 0.0
    spread_growth: float = 0.0
    jump_prob: float = 0.0
    jump_size: float = 0.0
    dnl: float = 0.0
    offset_std: float = 0.0
    gain_std: float = 0.0

    def __post_init__(self) -> None:
        _finite("offset", self.offset)
        v.check_range("gain_error", self.gain_error, -1.0, 1.0,
                      low_inclusive=False, high_inclusive=False)
        v.check_range("compression", self.compression, 0.0, 0.5)
        _finite("inl", self.inl)
        for name in ("spread", "spread_growth", "jump_size", "dnl", "offset_std"):
            v.check_nonnegative(name, getattr(self, name))
        v.check_range("jump_prob", self.jump_prob, 0.0, 1.0)
        v.check_range("gain_std", self.gain_std, 0.0, 0.5)


#: Strengths of synthetic tables. Illustrative values for a 7-bit ADC chosen
#: by us (no measured D-MAC-EM table is public): "ideal" is the identity;
#: "mild" a well-calibrated ADC (std 0.3 LSB at code 0, 0.9 at 127);
#: "dnat_like" the kind of value-dependent distortion D-NAT reports (std 0.5
#: LSB at code 0 growing to 3 LSB at 127, 3 % gain compression, a 1.5 LSB
#: bow, 0.2 % jumps of 8 LSB); "severe" a poorly matched macro (std 1 to
#: 7.4 LSB, 8 % compression, a 4 LSB bow, 1 % jumps of 16 LSB). Their
#: distortion is mostly random spread, which no training removes (measured
#: on the D-NAT default, LeNet / digits, full-range ADC: a QAT model falls
#: from 95.6 % to 53.0 % under "severe", to 52.5 % under its spread alone
#: and to 82.6 % under its mean readout alone).
#:
#: "macro_like" is a macro whose distortion is mostly systematic, as D-NAT's
#: chip must have been (a conventionally trained model fell to 14 % on it and
#: the model trained with the measured table reached the ideal accuracy: a
#: random error would not be learnable). Meant as one table per ADC
#: (``n_banks``, e.g. D-NAT's 16 ADCs, :func:`swimjax.crossbar.column_banks`):
#: each ADC's own offset (std 4 LSB: an uncalibrated comparator's offset of a
#: few LSB; a negative one makes small partial sums read 0) and gain (std 5
#: %: mismatched reference currents) on a 1 LSB mean offset; a compressive
#: transfer curve (``compression`` 0.25: the top code reads 25 % low, the
#: summing line's IR drop / finite output resistance), so the distortion
#: grows with the value as D-NAT measured; a realistic random part: std 0.5
#: LSB at code 0 growing to 1.5 LSB at 127 (thermal noise plus the mismatch
#: of more conducting cells), DNL 0.3 LSB, 0.1 % jumps of 8 LSB.
PRESETS: dict[str, SyntheticParams] = {
    "ideal": SyntheticParams(),
    "mild": SyntheticParams(offset=0.25, gain_error=-0.01, inl=0.5, spread=0.3,
                            spread_growth=0.005, jump_prob=5e-4, jump_size=4.0, dnl=0.1,
                            offset_std=0.1),
    "dnat_like": SyntheticParams(offset=0.5, gain_error=-0.03, inl=1.5, spread=0.5,
                                 spread_growth=0.02, jump_prob=2e-3, jump_size=8.0, dnl=0.2,
                                 offset_std=0.25),
    "severe": SyntheticParams(offset=1.0, gain_error=-0.08, inl=4.0, spread=1.0,
                              spread_growth=0.05, jump_prob=1e-2, jump_size=16.0, dnl=0.5,
                              offset_std=0.5),
    "macro_like": SyntheticParams(offset=1.0, offset_std=4.0, gain_std=0.05, compression=0.25,
                                  spread=0.5, spread_growth=0.008, dnl=0.3, jump_prob=1e-3,
                                  jump_size=8.0),
}


def _erf(x: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf, otypes=[np.float64])(x)


def _discretized_gaussian(m: np.ndarray, s: np.ndarray, n_c: int) -> np.ndarray:
    """Rows ``(..., C)``: N(m, s^2) binned to the nearest code, tails piled on the ends.

    ``s = 0`` gives a point mass at the nearest code (halves round up).
    """
    m, s = np.asarray(m, np.float64)[..., None], np.asarray(s, np.float64)[..., None]
    edges = np.arange(n_c - 1) + 0.5                     # between code k and k+1
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (edges - m) / np.where(s > 0, s, 1.0)
    cdf = np.where(s > 0, 0.5 * (1.0 + _erf(z / math.sqrt(2.0))), (edges > m).astype(float))
    zeros, ones = np.zeros(cdf.shape[:-1] + (1,)), np.ones(cdf.shape[:-1] + (1,))
    return np.diff(np.concatenate([zeros, cdf, ones], axis=-1), axis=-1)


def synthetic(key: jax.Array, n_codes: int, preset: str | SyntheticParams = "dnat_like", *,
              n_banks: int | None = None, offset: float | None = None,
              gain_error: float | None = None, compression: float | None = None,
              inl: float | None = None,
              spread: float | None = None, spread_growth: float | None = None,
              jump_prob: float | None = None, jump_size: float | None = None,
              dnl: float | None = None, offset_std: float | None = None,
              gain_std: float | None = None) -> ErrorModel:
    """A macro-like table generated without silicon (see :class:`SyntheticParams`).

    Args:
      key: PRNG key for the random per-table offsets and per-code DNL; the same
        key and arguments give the same table.
      n_codes: ``C = 2^b``.
      preset: a name in :data:`PRESETS` or a :class:`SyntheticParams`.
      n_banks: ``None`` for one shared ``(C, C)`` table, else
        ``(n_banks, C, C)``, each bank with its own random offset and DNL.
      offset, gain_error, compression, inl, spread, spread_growth, jump_prob,
        jump_size, dnl, offset_std, gain_std: override the preset's value (units and ranges in
        :class:`SyntheticParams`; the values are in LSB whatever ``n_codes``,
        and what lands beyond code 0 or ``C - 1`` piles there).

    Returns:
      A validated :class:`ErrorModel`.
    """
    n_c = _check_n_codes("n_codes", n_codes)
    if isinstance(preset, str):
        v.check_choice("preset", preset, tuple(PRESETS))
        base = PRESETS[preset]
    elif isinstance(preset, SyntheticParams):
        base = preset
    else:
        raise ValueError(f"preset must be one of {sorted(PRESETS)} or a SyntheticParams, "
                         f"got {preset!r}")
    overrides = dict(offset=offset, gain_error=gain_error, compression=compression, inl=inl,
                     spread=spread, spread_growth=spread_growth, jump_prob=jump_prob,
                     jump_size=jump_size, dnl=dnl, offset_std=offset_std, gain_std=gain_std)
    p = dataclasses.replace(base, **{k: x for k, x in overrides.items() if x is not None})
    n_b = 1 if n_banks is None else v.check_int("n_banks", n_banks, 1)

    k_off, k_dnl = jax.random.split(key)
    o_t = p.offset_std * np.asarray(jax.random.normal(k_off, (n_b,)), np.float64)
    d_t = p.dnl * np.asarray(jax.random.normal(k_dnl, (n_b * n_c,)), np.float64)
    g_t = p.gain_std * np.asarray(jax.random.normal(jax.random.fold_in(key, 2), (n_b,)),
                                  np.float64)
    c = np.arange(n_c, dtype=np.float64)
    x = c / (n_c - 1)
    m = (p.offset + o_t[:, None] + (1.0 + p.gain_error + g_t[:, None]) * c
         - p.compression * c * x
         + p.inl * 4.0 * x * (1.0 - x) + d_t.reshape(n_b, n_c))
    s = np.broadcast_to(p.spread + p.spread_growth * c, m.shape)
    rows = ((1.0 - p.jump_prob) * _discretized_gaussian(m, s, n_c)
            + 0.5 * p.jump_prob * (_discretized_gaussian(m + p.jump_size, s, n_c)
                                   + _discretized_gaussian(m - p.jump_size, s, n_c)))
    t3, _ = _validate(rows, n_c, DEFAULT_ATOL)
    return _build(t3, n_banks is not None)


# ----------------------------------------------------------------------------
# A-MAC-EM: the Gaussian of the same moments
# ----------------------------------------------------------------------------

def _moments(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    k = np.arange(rows.shape[-1], dtype=np.float64)
    mean = rows @ k
    return mean, rows @ (k * k) - mean * mean


def gaussian_like(model: ErrorModel, *, iterations: int = 200) -> ErrorModel:
    """A-MAC-EM: per ideal code, a discretized Gaussian with the row's mean and variance.

    Each row becomes N(m, s^2) binned to the nearest code with the tails piled
    on codes 0 and ``C - 1`` (the same discretization as :func:`synthetic`);
    ``m`` and ``s`` are found by a fixed-point iteration (``m += mean error``,
    ``s^2 += variance error``) so that the *discretized* row has the original
    row's mean and variance, not merely the continuous Gaussian. Away from the
    ends and for variances above about 0.05 LSB^2 this matches both moments to
    better than 1e-6 LSB (resp. LSB^2); a row whose mass sits against code 0 or
    ``C - 1`` (where clipping bounds what a discretized Gaussian can reach) or
    whose variance is below what any Gaussian binned to integers gives for its
    mean gets the closest iterate found. Identity rows stay identity rows.

    Args:
      model: the measured (or synthetic) model.
      iterations: fixed-point iterations (>= 1).

    Returns:
      An :class:`ErrorModel` with the same shape (banks kept).
    """
    iterations = v.check_int("iterations", iterations, 1)
    t = np.asarray(model.table, np.float64)
    t = t / t.sum(-1, keepdims=True)
    n_c = t.shape[-1]
    mean, var = _moments(t)
    m, s2 = mean.copy(), var.copy()
    best = _discretized_gaussian(m, np.sqrt(s2), n_c)
    best_err = np.full(mean.shape, np.inf)
    for _ in range(iterations):
        rows = _discretized_gaussian(m, np.sqrt(s2), n_c)
        gm, gv = _moments(rows)
        err = np.abs(gm - mean) + np.abs(gv - var)
        better = err < best_err
        best = np.where(better[..., None], rows, best)
        best_err = np.where(better, err, best_err)
        if np.all(best_err < 1e-9):
            break
        m = m + (mean - gm)
        s2 = np.maximum(s2 + (var - gv), 0.0)
    return _build(*_validate(best, n_c, DEFAULT_ATOL))


# ----------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------

_CSV_VALUE_COLUMNS = ("probability", "count")


def _suffix(path: str | os.PathLike) -> str:
    s = os.path.splitext(os.fspath(path))[1].lower()
    if s not in (".npz", ".csv"):
        raise ValueError(f"error model file {os.fspath(path)!r} must end in .npz or .csv, "
                         f"got {s or 'no suffix'!r}")
    return s


def _read_npz(path: str) -> np.ndarray:
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as e:  # not a zip archive, pickled objects, I/O errors
        raise ValueError(f"cannot read as NPZ: {type(e).__name__}: {e}") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError("cannot read as NPZ: it holds a single .npy array, not an archive "
                         "with a 'table' key")
    with data:
        if "table" not in data.files:
            raise ValueError(f"has no 'table' array; keys found: {sorted(data.files)}")
        try:
            return np.asarray(data["table"])
        except Exception as e:
            raise ValueError(f"cannot read the 'table' array: {type(e).__name__}: {e}") from None


def _csv_int(text: str, column: str, line: int) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError(f"line {line}: {column} must be an integer, got {text!r}") from None
    if value < 0:
        raise ValueError(f"line {line}: {column} must be >= 0, got {value}")
    return value


def _read_csv(path: str, n_codes: int | None, smoothing: float) -> tuple[np.ndarray, bool]:
    """Returns ``((B, C, C) normalized-or-raw table, banked)``; see the module docstring."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            numbered = [(i, ln) for i, ln in enumerate(f, 1)
                        if ln.strip() and not ln.lstrip().startswith("#")]
    except UnicodeDecodeError as e:
        raise ValueError(f"not a text CSV file: {e}") from None
    if not numbered:
        raise ValueError("is empty: expected a header line 'ideal,readout,probability' "
                         "(or count) and one line per entry")
    rows = list(csv.reader(ln for _, ln in numbered))
    header = [h.strip().lower() for h in rows[0]]
    values = [h for h in header if h in _CSV_VALUE_COLUMNS]
    expected = {"ideal", "readout"} | ({"bank"} if "bank" in header else set())
    if len(values) != 1 or set(header) != expected | set(values) or len(header) != len(set(header)):
        raise ValueError(f"line {numbered[0][0]}: header must name the columns ideal, readout "
                         f"and one of probability/count (optionally bank), got {rows[0]}")
    kind, col = values[0], {name: header.index(name) for name in header}
    entries: list[tuple[int, int, int, float, int]] = []
    for (line, _), row in zip(numbered[1:], rows[1:]):
        if len(row) != len(header):
            raise ValueError(f"line {line}: expected {len(header)} fields, got {len(row)}")
        b = _csv_int(row[col["bank"]], "bank", line) if "bank" in col else 0
        i = _csv_int(row[col["ideal"]], "ideal", line)
        r = _csv_int(row[col["readout"]], "readout", line)
        try:
            p = float(row[col[kind]])
        except ValueError:
            raise ValueError(f"line {line}: {kind} must be a number, "
                             f"got {row[col[kind]]!r}") from None
        if not (math.isfinite(p) and p >= 0.0):
            raise ValueError(f"line {line}: {kind} must be finite and >= 0, got {p!r}")
        entries.append((b, i, r, p, line))
    if not entries:
        raise ValueError("has a header but no entries")
    top = max(max(e[1], e[2]) for e in entries)
    n_c = _check_n_codes("n_codes", n_codes) if n_codes is not None else top + 1
    if top >= n_c:
        e = next(e for e in entries if max(e[1], e[2]) >= n_c)
        raise ValueError(f"line {e[4]}: code {max(e[1], e[2])} out of range [0, {n_c - 1}] "
                         f"for n_codes={n_c}")
    if n_codes is None:
        _check_n_codes(f"the code count (largest code listed + 1 = {n_c}; pass n_codes= "
                       f"if the top codes are missing)", n_c)
    n_b = max(e[0] for e in entries) + 1
    t = np.zeros((n_b, n_c, n_c))
    for b, i, r, p, line in entries:
        if kind == "probability" and t[b, i, r] != 0.0:
            raise ValueError(f"line {line}: entry (bank {b}, ideal {i}, readout {r}) repeated")
        t[b, i, r] += p
    banked = "bank" in col
    if kind == "count":
        t = _from_counts(t, smoothing, banked)
    return (t if banked else t[0]), banked


def load(path: str | os.PathLike, *, n_codes: int | None = None,
         atol: float = DEFAULT_ATOL, smoothing: float = 0.0) -> ErrorModel:
    """Loads and validates an error model from ``.npz`` or ``.csv`` (module docstring).

    Args:
      path: the file; its suffix picks the format.
      n_codes: the ADC's code count; the table must match it (for CSV it also
        sets ``C`` when the top codes are not listed).
      atol: tolerance on each row's sum (probability tables).
      smoothing: pseudo-counts per readout for a CSV of counts (as
        :func:`from_pairs`).

    Raises:
      FileNotFoundError: no such file.
      ValueError: unknown suffix, unreadable file, missing ``table`` key, bad
        header or line, or an invalid table; every message starts with the file.
    """
    name = os.fspath(path)
    suffix = _suffix(name)
    if not os.path.isfile(name):
        raise FileNotFoundError(f"error model file {name!r} does not exist")
    smoothing = v.check_nonnegative("smoothing", smoothing)
    try:
        if suffix == ".npz":
            table = _read_npz(name)
        else:
            table, _ = _read_csv(name, n_codes, smoothing)
        return from_table(table, n_codes=n_codes, atol=atol)
    except ValueError as e:
        raise ValueError(f"error model file {name!r}: {e}") from None
    except OSError as e:
        raise ValueError(f"error model file {name!r} cannot be read: {e}") from None


def _csv_text(table: np.ndarray) -> str:
    """The CSV probability layout of a ``(C, C)`` or ``(n_banks, C, C)`` table."""
    banked = table.ndim == 3
    t3 = table if banked else table[None]
    lines = [("bank," if banked else "") + "ideal,readout,probability"]
    for b, i, r in np.argwhere(t3 > 0):
        lines.append((f"{b}," if banked else "") + f"{i},{r},{t3[b, i, r]:.9g}")
    return "\n".join(lines) + "\n"


def save(path: str | os.PathLike, model: ErrorModel) -> None:
    """Writes ``model.table`` to ``.npz`` (key ``table``) or ``.csv`` (probability
    layout, ``bank`` column for per-bank models), atomically (a temporary file
    in the same folder, then renamed)."""
    name = os.fspath(path)
    suffix = _suffix(name)
    if not isinstance(model, ErrorModel):
        raise ValueError(f"model must be an ErrorModel, got {type(model).__name__}")
    table = np.asarray(model.table, np.float32)
    folder = os.path.dirname(os.path.abspath(name))
    fd, tmp = tempfile.mkstemp(suffix=suffix, dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            if suffix == ".npz":
                np.savez(f, table=table)
            else:
                f.write(_csv_text(table).encode("utf-8"))
        os.replace(tmp, name)
    except BaseException:
        os.unlink(tmp)
        raise


# ----------------------------------------------------------------------------
# Sampling with a selectable gradient
# ----------------------------------------------------------------------------

@jax.custom_vjp
def _pass_gradient(x: jax.Array, y: jax.Array, slope: jax.Array) -> jax.Array:
    """Returns ``y``; the backward pass gives ``x`` the cotangent times ``slope``."""
    return y


def _pass_gradient_fwd(x, y, slope):
    return y, slope


def _pass_gradient_bwd(slope, g):
    return g * slope, jnp.zeros_like(g), jnp.zeros_like(slope)


_pass_gradient.defvjp(_pass_gradient_fwd, _pass_gradient_bwd)


def _bank_index(bank: Any, n_b: int, shape: tuple[int, ...]) -> jax.Array:
    """Bank indices broadcast to ``shape`` (int32, clipped to ``[0, n_b - 1]``)."""
    if isinstance(bank, (int, np.integer)) and not isinstance(bank, bool):
        v.check_int("bank", bank, 0, n_b - 1)
    b = jnp.asarray(bank)
    if not jnp.issubdtype(b.dtype, jnp.integer):
        raise ValueError(f"bank must hold integer bank indices, got dtype {b.dtype}")
    if not isinstance(b, jax.core.Tracer):
        a = np.asarray(b)
        if a.size and (a.min() < 0 or a.max() > n_b - 1):
            raise ValueError(f"bank must be in [0, {n_b - 1}] (the model's banks), found "
                             f"{int(a.min() if a.min() < 0 else a.max())}")
    try:
        return jnp.broadcast_to(jnp.clip(b, 0, n_b - 1).astype(jnp.int32), shape)
    except ValueError:
        raise ValueError(f"bank of shape {b.shape} does not broadcast to the codes' shape "
                         f"{shape}") from None


def sample(key: jax.Array, codes: Any, model: ErrorModel, *,
           gradient: Gradient = "statistical", bank: Any = None) -> jax.Array:
    """Draws a readout code for every ideal code from the table.

    Forward: ``readout ~ T[bank, c, :]`` independently per element, by Walker's
    alias method (one 32-bit random word per element: its top ``b`` bits pick
    a cell, the rest decide between the cell's code and its alias). Codes are
    rounded to the nearest integer and clipped to ``[0, C - 1]`` first (an
    ADC saturates); NaN codes give NaN readouts (never a silent code). Same
    key and codes give the same readouts; ``vmap`` over keys gives what a loop
    gives, so a caller that splits one key per example gets numbers that do
    not depend on the batch size.

    Backward (``jax.custom_vjp``; reverse mode only): ``"ste"`` passes the
    cotangent unchanged; ``"statistical"`` multiplies it by ``mu'(c)``
    (:func:`readout_slope`) at the rounded, clipped ideal code, the slope of
    the expected readout of the measured distribution. ``key``, ``model`` and
    ``bank`` get no gradient.

    Args:
      key: PRNG key.
      codes: ideal codes, any shape, float (integer-valued) or integer.
      model: an :class:`ErrorModel`.
      gradient: ``"statistical"`` or ``"ste"`` (static).
      bank: required for a per-bank model, forbidden for a shared one: an int
        or an integer array broadcastable to ``codes.shape``, each in
        ``[0, n_banks - 1]`` (checked when concrete, clipped when traced).

    Returns:
      Readout codes, the shape of ``codes``, its dtype if floating else float32.
    """
    v.check_choice("gradient", gradient, GRADIENTS)
    if not isinstance(model, ErrorModel):
        raise ValueError(f"model must be an ErrorModel, got {type(model).__name__}")
    x = jnp.asarray(codes)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    n_c = model.table.shape[-1]
    bits_per_cell = 32 - (n_c.bit_length() - 1)
    nan = jnp.isnan(x)
    row = _rows(x, model, bank)
    word = jax.random.bits(key, (x.size,), jnp.uint32).reshape(x.shape)
    cell_code = (word >> bits_per_cell).astype(jnp.int32)
    uniform = word & jnp.uint32((1 << bits_per_cell) - 1)
    cell = row * n_c + cell_code
    keep = uniform < model.threshold.reshape(-1)[cell]
    read = jnp.where(keep, cell_code, model.alias.reshape(-1)[cell]).astype(x.dtype)
    read = jnp.where(nan, jnp.nan, read)
    if gradient == "ste":
        slope = jnp.ones_like(x)
    else:
        slope = model.slope.reshape(-1)[row].astype(x.dtype)
    return _pass_gradient(x, read, slope)

"""Input checks shared by every module.

Each check raises ``ValueError`` whose message names the offending parameter
and the allowed range, so a user sees "sigma_d must be finite and >= 0, got
-0.1" instead of a NaN accuracy or a deep XLA traceback. The checks run on
concrete Python/NumPy values at configuration time (outside ``jit``); they are
deliberately not traced.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _is_bool(value: Any) -> bool:
    """Python bools, NumPy bools and boolean arrays (NumPy or JAX)."""
    if isinstance(value, (bool, np.bool_)):
        return True
    try:
        return np.dtype(getattr(value, "dtype", None) or "O") == np.bool_
    except TypeError:   # a dtype attribute NumPy does not know
        return False


def check_real(name: str, value: Any) -> float:
    """Returns ``value`` as a Python float, or raises if it is not one real number.

    Accepts Python and NumPy reals and 0-d real arrays (NumPy or JAX); rejects
    bools (``True`` is not a sigma), strings (``"0.1"`` is not parsed),
    complex numbers, arrays with more than one element and traced values.
    NaN and Inf are returned as they are (the range checks reject them).
    """
    if _is_bool(value):
        raise ValueError(f"{name} must be a real number, got bool {value!r}")
    try:
        if (not _is_concrete(value) or isinstance(value, (str, bytes))
                or np.ndim(value) != 0 or np.iscomplexobj(value)):
            raise TypeError
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number, got {value!r}") from None


def check_range(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> float:
    """Checks ``low <= value <= high`` (bounds optional, inclusivity selectable).

    NaN always fails. Returns the value as a float.
    """
    v = check_real(name, value)
    lo_br = "[" if low_inclusive else "("
    hi_br = "]" if high_inclusive else ")"
    rng = f"{lo_br}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi_br}"
    ok = not math.isnan(v)
    if ok and low is not None:
        ok = v >= low if low_inclusive else v > low
    if ok and high is not None:
        ok = v <= high if high_inclusive else v < high
    if not ok:
        raise ValueError(f"{name} must be in {rng}, got {value!r}")
    return v


def _check_finite_bound(name: str, value: Any, *, strict: bool) -> float:
    v = check_real(name, value)
    if not math.isfinite(v) or (v <= 0.0 if strict else v < 0.0):
        raise ValueError(f"{name} must be finite and {'>' if strict else '>='} 0, got {value!r}")
    return v


def check_nonnegative(name: str, value: Any) -> float:
    """Checks a finite value >= 0 (a standard deviation, a probability mass...)."""
    return _check_finite_bound(name, value, strict=False)


def check_positive(name: str, value: Any) -> float:
    """Checks a finite value > 0 (a tolerance, a time constant...)."""
    return _check_finite_bound(name, value, strict=True)


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """Checks an integer in ``[low, high]``; returns it as a Python int.

    Accepts Python and NumPy integers and 0-d integer arrays (NumPy or JAX);
    rejects bools, floats (even ``3.0``) and everything else.
    """
    out = None
    if not _is_bool(value) and _is_concrete(value):
        try:
            out = operator.index(value)
        except TypeError:
            pass
    if out is None:
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if (low is not None and out < low) or (high is not None and out > high):
        rng = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
        raise ValueError(f"{name} must be an integer in {rng}, got {out}")
    return out


def check_choice(name: str, value: Any, choices: tuple[str, ...] | list[str]) -> str:
    """Checks that ``value`` is one of the strings ``choices``; returns it."""
    if not (isinstance(value, str) and value in choices):
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")
    return value


def check_finite_tree(name: str, tree: Any) -> None:
    """Raises if any inexact leaf of ``tree`` holds NaN or Inf (concrete leaves only).

    Every floating dtype counts (float16, bfloat16, the float8 types, float32,
    float64) and complex ones (a NaN/Inf real or imaginary part). Integer and
    bool leaves, traced leaves and leaves that are not numbers (strings,
    objects) are skipped. Python and NumPy scalars are checked like arrays.
    """
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if not _is_concrete(leaf):
            continue
        try:
            arr = np.asarray(leaf)
        except (TypeError, ValueError):
            continue
        # jnp.issubdtype knows the ml_dtypes types (bfloat16, float8...), which
        # NumPy's own hierarchy does not place under np.floating.
        if not jnp.issubdtype(arr.dtype, jnp.inexact):
            continue
        finite = np.isfinite(arr)
        if not np.all(finite):
            n_bad = int(arr.size - np.count_nonzero(finite))
            raise ValueError(
                f"{name}{jax.tree_util.keystr(path)} must be finite, "
                f"found {n_bad} NaN/Inf value(s) of {arr.size}"
            )


def check_same_structure(name: str, tree: Any, reference: Any, reference_name: str = "params",
                         *, check_shapes: bool = True) -> None:
    """Raises if ``tree`` does not have the structure (and leaf shapes) of ``reference``.

    ``None`` leaves are not allowed in either tree. Shapes are compared with
    ``np.shape`` so scalars, NumPy and JAX arrays all work.
    """
    s_tree = jax.tree_util.tree_structure(tree)
    s_ref = jax.tree_util.tree_structure(reference)
    if s_tree != s_ref:
        raise ValueError(
            f"{name} must have the same pytree structure as {reference_name}; "
            f"got {s_tree}, expected {s_ref}"
        )
    if check_shapes:
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(tree),
                                jax.tree_util.tree_leaves(reference)):
            if np.shape(a) != np.shape(b):
                raise ValueError(
                    f"{name}{jax.tree_util.keystr(path)} must have shape {np.shape(b)} "
                    f"(as in {reference_name}), got {np.shape(a)}"
                )

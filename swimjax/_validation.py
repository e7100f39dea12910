"""Input checks shared by every module.

Each check raises ``ValueError`` whose message names the offending parameter
and the allowed range, so a user sees "sigma_d must be finite and >= 0, got
-0.1" instead of a NaN accuracy or a deep XLA traceback. The checks run on
concrete Python/NumPy values at configuration time (outside ``jit``); they are
deliberately not traced.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_real(name: str, value: Any) -> float:
    """Returns ``value`` as a float, or raises if it is not a real number."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a real number, got bool {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number, got {value!r}") from None
    return out


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


def check_nonnegative(name: str, value: Any) -> float:
    """Checks a finite value >= 0 (a standard deviation, a probability mass...)."""
    v = check_range(name, value, 0.0, None)
    if math.isinf(v):
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
    return v


def check_positive(name: str, value: Any) -> float:
    """Checks a finite value > 0 (a tolerance, a time constant...)."""
    v = check_range(name, value, 0.0, None, low_inclusive=False)
    if math.isinf(v):
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    return v


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """Checks an integer in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    v = int(value)
    if (low is not None and v < low) or (high is not None and v > high):
        rng = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
        raise ValueError(f"{name} must be an integer in {rng}, got {value!r}")
    return v


def check_choice(name: str, value: Any, choices: tuple[str, ...] | list[str]) -> str:
    """Checks that ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")
    return value


def check_finite_tree(name: str, tree: Any) -> None:
    """Raises if any floating leaf of ``tree`` holds NaN or Inf (concrete leaves only)."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    for path, leaf in leaves:
        if not _is_concrete(leaf):
            continue
        arr = np.asarray(leaf)
        if np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.complexfloating):
            if not np.all(np.isfinite(arr)):
                n_bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
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

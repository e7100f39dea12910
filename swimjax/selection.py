"""Budgeted choice of the weights to write-verify, and the quadratic loss model.

Second-order Taylor expansion with independent zero-mean weight errors of std
``sigma_i``: ``E[dL] ~ 1/2 sum_i h_ii sigma_i^2``. Write-verifying weight ``i``
lowers its std from ``sigma_unverified,i`` to ``sigma_verified,i`` and so
removes ``1/2 h_ii (sigma_unverified,i^2 - sigma_verified,i^2)`` from the
expected loss increase; :func:`select` verifies the weights with the largest
``importance_i = h_ii (sigma_unverified,i^2 - sigma_verified,i^2)``.

``h`` (``scores``) and the sigmas must be in matching units: curvature w.r.t.
the weights (every :mod:`swimjax.sensitivity` estimator by default) with
sigmas in weight units (``perturbation.weight_sigmas``), or SWIM's normalized
curvature (``sensitivity.swim(normalize=True)``, w.r.t. ``w / max|W|``) with
sigmas relative to each layer's scale (e.g. scalars). ``sensitivity.swim_grad``
(SWIM's score with its first-order term) is in weight units as well: with
weight-unit sigmas of the same ``scale`` it selects exactly the weights SWIM's
reference code selects. Baselines (``sensitivity.BASELINE_METHODS``, e.g.
SWIM's ``magnitude`` ``|w| / max|W_layer|``) are not curvatures: select them
with ``sigma_unverified=1, sigma_verified=0`` (the defaults), i.e. by the
score itself.

Scores may be negative (Hutchinson's estimate, or any user score): the
importance is ranked as is, never by its absolute value, so negative values
rank last (the least negative first once the budget exceeds the positive
ones).

Only *mapped* leaves (``selected``; default
:func:`swimjax.mapping.mapped_leaves`, kernels with ``ndim >= 2``) compete for
the budget; unmapped leaves are exact digital weights, never selected.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from swimjax import _validation as v
from swimjax.mapping import mapped_leaves

Array = jax.Array
PyTree = Any

__all__ = ["importance", "predicted_loss_increase", "select"]


def _flags(scores: PyTree, selected: PyTree | None) -> list[bool]:
    if selected is None:
        selected = mapped_leaves(scores)
    v.check_same_structure("selected", selected, scores, "scores", check_shapes=False)
    flags = jax.tree_util.tree_leaves(selected)
    for path, f in jax.tree_util.tree_leaves_with_path(selected):
        if not isinstance(f, (bool, np.bool_)):
            raise ValueError(
                f"selected{jax.tree_util.keystr(path)} must be a Python bool, got {f!r}")
    return [bool(f) for f in flags]


def _sigma_leaves(name: str, sigma: Any, scores: PyTree) -> list[Any]:
    """One sigma per score leaf: a scalar broadcast, or a pytree like ``scores``."""
    n = len(jax.tree_util.tree_leaves(scores))
    if jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(sigma)) and np.ndim(sigma) == 0:
        s = v.check_nonnegative(name, sigma)
        return [s] * n
    v.check_same_structure(name, sigma, scores, "scores")
    leaves = jax.tree_util.tree_leaves(sigma)
    for path, leaf in jax.tree_util.tree_leaves_with_path(sigma):
        a = np.asarray(leaf)
        where = f"{name}{jax.tree_util.keystr(path)}"
        if a.dtype == np.bool_ or not (jnp.issubdtype(a.dtype, jnp.floating)
                                       or jnp.issubdtype(a.dtype, jnp.integer)):
            raise ValueError(f"{where} must be real standard deviations, got dtype {a.dtype}")
        if not np.all(np.isfinite(a)) or np.any(a < 0):
            raise ValueError(f"{where} must be finite and >= 0")
    return leaves


def _check_scores(scores: PyTree, params: PyTree | None) -> None:
    if not jax.tree_util.tree_leaves(scores):
        raise ValueError("scores must hold at least one array leaf")
    if params is not None:
        v.check_same_structure("scores", scores, params)
    v.check_finite_tree("scores", scores)


def importance(scores: PyTree, sigma_unverified: Any = 1.0, sigma_verified: Any = 0.0) -> PyTree:
    """``h_ii * (sigma_unverified^2 - sigma_verified^2)`` per weight (pytree like scores)."""
    _check_scores(scores, None)
    su = _sigma_leaves("sigma_unverified", sigma_unverified, scores)
    sv = _sigma_leaves("sigma_verified", sigma_verified, scores)
    leaves, treedef = jax.tree_util.tree_flatten(scores)
    out = [jnp.asarray(h, jnp.float32) * (jnp.square(jnp.asarray(a, jnp.float32))
                                          - jnp.square(jnp.asarray(b, jnp.float32)))
           for h, a, b in zip(leaves, su, sv)]
    return jax.tree_util.tree_unflatten(treedef, out)


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _top_k_mask(imp: np.ndarray, mag: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of the k largest ``imp``; ties by larger ``mag``, then lower index.

    O(n) on the host: a partition finds the k-th largest importance, and only
    the weights tied at that value are sorted (by ``-mag``, then index).
    """
    n = imp.shape[0]
    out = np.zeros(n, bool)
    if k <= 0:
        return out
    if k >= n:
        out[:] = True
        return out
    t = np.partition(imp, n - k)[n - k]          # k-th largest value
    out[imp > t] = True
    ties = np.flatnonzero(imp == t)
    need = k - int(np.count_nonzero(out))
    order = np.lexsort((ties, -mag[ties]))       # last key sorts first
    out[ties[order[:need]]] = True
    return out


def select(scores: PyTree, budget: float, *, sigma_unverified: Any = 1.0,
           sigma_verified: Any = 0.0, params: PyTree | None = None,
           selected: PyTree | None = None, per_layer: bool = False) -> PyTree:
    """The write-verify mask: the ``budget`` fraction of mapped weights that matter most.

    Args:
      scores: curvature ``h_ii`` per weight, a pytree like ``params`` (e.g.
        from :func:`swimjax.sensitivity.score`), or a baseline's score with
        the default sigmas; must be finite; negative values rank last.
      budget: fraction of the MAPPED weights to verify, in ``[0, 1]``. Exactly
        ``round(budget * n_mapped)`` weights are selected (half rounds up);
        with ``per_layer=True``, ``round(budget * n_leaf)`` in every mapped leaf.
      sigma_unverified, sigma_verified: weight-error std without / with
        write-verify: scalars or pytrees like ``scores`` (e.g.
        ``perturbation.weight_sigmas(params, cfg, selected)``), >= 0.
      params: the weights; when given, ties in importance go to the larger
        ``|w|`` (SWIM's magnitude tie breaker), then to the lower flat index
        (leaves in tree order, row-major). Without it, ties go by index.
      selected: pytree of Python bools (one per leaf) marking mapped leaves;
        default :func:`swimjax.mapping.mapped_leaves` (``ndim >= 2``).
      per_layer: one budget per mapped leaf instead of one global threshold.

    Returns:
      Pytree like ``scores`` of bool arrays, ``True`` = write-verify; all
      ``False`` on unmapped leaves.

    Raises:
      ValueError: ``budget`` outside ``[0, 1]``; structures that do not match;
        negative/non-finite sigmas; non-finite scores.
    """
    budget = v.check_range("budget", budget, 0.0, 1.0)
    _check_scores(scores, params)
    flags = _flags(scores, selected)
    imp_leaves = [np.asarray(a, np.float32).ravel() for a in
                  jax.tree_util.tree_leaves(importance(scores, sigma_unverified, sigma_verified))]
    leaves, treedef = jax.tree_util.tree_flatten(scores)
    shapes = [np.shape(h) for h in leaves]
    if params is not None:
        mag_leaves = [np.abs(np.asarray(p, np.float32)).ravel()
                      for p in jax.tree_util.tree_leaves(params)]
    else:
        mag_leaves = [np.zeros(int(np.prod(sh)), np.float32) for sh in shapes]

    masks: list[Any] = [np.zeros(sh, bool) for sh in shapes]
    mapped = [i for i, f in enumerate(flags) if f]
    if per_layer:
        for i in mapped:
            k = _round_half_up(budget * imp_leaves[i].size)
            masks[i] = _top_k_mask(imp_leaves[i], mag_leaves[i], k).reshape(shapes[i])
    elif mapped:
        imp = np.concatenate([imp_leaves[i] for i in mapped])
        mag = np.concatenate([mag_leaves[i] for i in mapped])
        m = _top_k_mask(imp, mag, _round_half_up(budget * imp.size))
        start = 0
        for i in mapped:
            n = imp_leaves[i].size
            masks[i] = m[start:start + n].reshape(shapes[i])
            start += n
    return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(m) for m in masks])


def predicted_loss_increase(h: PyTree, mask: PyTree, sigma_unverified: Any,
                            sigma_verified: Any, *, selected: PyTree | None = None) -> Array:
    """Quadratic-model expected loss increase ``1/2 sum_i h_ii sigma_i^2``.

    ``sigma_i`` is ``sigma_verified`` where ``mask`` is True, else
    ``sigma_unverified`` (scalars or pytrees like ``h``). Only mapped leaves
    (``selected``, default ``ndim >= 2``) carry weight errors; the others are
    exact. Units: those of the loss behind ``h`` (the mean loss for
    :mod:`swimjax.sensitivity`) when ``h`` and sigma units match.

    Returns:
      A float32 scalar.
    """
    _check_scores(h, None)
    v.check_same_structure("mask", mask, h, "h")
    flags = _flags(h, selected)
    su = _sigma_leaves("sigma_unverified", sigma_unverified, h)
    sv = _sigma_leaves("sigma_verified", sigma_verified, h)
    total = jnp.zeros((), jnp.float32)
    for hh, m, a, b, f in zip(jax.tree_util.tree_leaves(h), jax.tree_util.tree_leaves(mask),
                              su, sv, flags):
        if not f:
            continue
        sig = jnp.where(jnp.asarray(m, bool), jnp.asarray(b, jnp.float32),
                        jnp.asarray(a, jnp.float32))
        total = total + 0.5 * jnp.sum(jnp.asarray(hh, jnp.float32) * jnp.square(sig))
    return total

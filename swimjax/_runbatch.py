"""Evaluate one function for many parameter sets ("runs") that share inputs.

``run_batched(fn)`` returns a function equivalent to
``jax.vmap(fn, in_axes=(0, None))`` for ``fn(params, x)`` — params carry a
leading run axis ``R``, ``x`` is shared — but evaluates the jaxpr of ``fn``
with an interpreter that lays the work out for per-run weights:

* **Shared work is done once.** An equation none of whose inputs depends on
  the run is evaluated unbatched (e.g. the patches of the input images).
* **Per-run convolutions become GEMMs.** ``vmap`` turns a convolution whose
  kernel differs per run into a grouped convolution (``feature_group_count =
  R``), which XLA CPU runs at a few GFLOP/s when channels are few. Here it is
  lowered to im2col + one matrix product per run: the patches are built with
  the spatial axes minor (strided slices of the padded input, stacked one
  spatial axis at a time, which XLA fuses into fast copies), then
  ``W (R, O, K) @ P (R, K, M)`` with ``K = taps * C_in`` and ``M = N * output
  positions``; when the convolution's input is shared (the first layer),
  ``W (R*O, K) @ P (K, M)`` is one large GEMM.
* **Layouts are propagated, not restored.** The GEMM leaves its output as
  ``(R, O, N, spatial...)``; rather than transposing back to the model's
  layout (e.g. NHWC), values carry a permutation of their logical axes.
  Elementwise operations (bias, ReLU, ...) and window reductions (pooling)
  work in the permuted layout; anything else gets the logical layout back
  first (one transpose, typically of a pooled, smaller array).
* **Window max/min/sum pooling** is lowered to an elementwise reduction of
  strided slices (XLA CPU's ``reduce_window`` is several times slower).

Every other primitive is batched with ``jax.vmap`` of that primitive alone, and
call primitives (``pjit``, ``custom_jvp_call``, ...) are inlined, so any
function JAX can trace works; only the speed differs. Results equal
``jax.vmap(fn)`` up to float rounding (summation order in the GEMMs).

Shapes: params leaves ``(R, *leaf_shape)``; x as ``fn`` takes it; outputs
``(R, *out_shape)``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from swimjax import _jaxpr

Array = jax.Array

# Window reductions with at most this many taps are lowered to strided slices.
_MAX_POOL_TAPS = 16


@dataclasses.dataclass(frozen=True)
class _Val:
    """A value during interpretation.

    ``array`` is the physical array: ``(R, *phys)`` if ``batched`` else
    ``phys``; ``phys = transpose(logical, perm)`` (``perm=None``: identity).
    """

    array: Any
    batched: bool
    perm: tuple[int, ...] | None = None

    @property
    def ndim(self) -> int:
        """Logical rank (without the run axis)."""
        return np.ndim(self.array) - int(self.batched)


def _lead(v: _Val) -> int:
    return int(v.batched)


def _in_perm(v: _Val, perm: tuple[int, ...] | None) -> Any:
    """The array of ``v`` laid out as ``transpose(logical, perm)``."""
    if v.perm == perm or v.ndim == 0:
        return v.array
    cur = v.perm or tuple(range(v.ndim))
    want = perm or tuple(range(v.ndim))
    axes = tuple(cur.index(d) for d in want)
    lead = _lead(v)
    return lax.transpose(v.array, tuple(range(lead)) + tuple(lead + a for a in axes))


def _logical(v: _Val) -> Any:
    """The array in its logical layout (run axis first if batched)."""
    return _in_perm(v, None)


def _bind(eqn, args: Sequence[Any]) -> list[Any]:
    out = eqn.primitive.bind(*args, **eqn.primitive.get_bind_params(eqn.params))
    return list(out) if eqn.primitive.multiple_results else [out]


def _bind_runs(eqn, arrays: Sequence[Any], batched: Sequence[bool]) -> list[Any]:
    """The primitive on ``arrays``, vmapped over the run axis of the batched ones."""
    if not any(batched):
        return _bind(eqn, arrays)
    if all(np.shape(a)[0] == 1 for a, b in zip(arrays, batched) if b):
        # A single run (see :func:`lowered`): drop the run axis, no vmap.
        outs = _bind(eqn, [a[0] if b else a for a, b in zip(arrays, batched)])
        return [o[None] for o in outs]
    axes = [0 if b else None for b in batched]
    return list(jax.vmap(lambda *a: tuple(_bind(eqn, a)), in_axes=axes)(*arrays))


def _vmap_bind(eqn, vals: Sequence[_Val]) -> list[_Val]:
    """Generic rule: ``jax.vmap`` of the primitive, logical layouts."""
    batched = [v.batched for v in vals]
    outs = _bind_runs(eqn, [_logical(v) for v in vals], batched)
    return [_Val(o, any(batched)) for o in outs]


# ----------------------------------------------------------------------------
# Rules
# ----------------------------------------------------------------------------

def _shared_perm(vals: Sequence[_Val]) -> tuple[int, ...] | None:
    """The layout of the first permuted, run-batched operand of rank > 0."""
    return next((v.perm for v in vals if v.ndim > 0 and v.perm is not None and v.batched),
                None)


def _rule_elementwise(eqn, vals: Sequence[_Val]) -> list[_Val]:
    """Elementwise ops run in the layout of their first permuted operand."""
    perm = _shared_perm(vals)
    if perm is None:
        return _vmap_bind(eqn, vals)
    outs = _bind_runs(eqn, [_in_perm(v, perm) for v in vals], [v.batched for v in vals])
    return [_Val(o, True, perm) for o in outs]


def _shape_free(jaxpr) -> bool:
    """Every equation (nested ones included) is elementwise, a call, or a
    broadcast of a scalar: its result, read in any element order, is the
    result of the same equations on the operands read in that order."""
    for eqn in _jaxpr.iter_eqns(jaxpr):
        name = eqn.primitive.name
        if name in _jaxpr.ELEMENTWISE or name in _jaxpr.CALL_PARAMS:
            continue
        if name == "broadcast_in_dim" and eqn.invars[0].aval.shape == ():
            continue
        return False
    return True


def _elementwise_call(eqn) -> bool:
    """A ``custom_jvp_call`` (e.g. ``jax.nn.relu``) whose function and JVP
    rule are both elementwise, on operands of one shape (or scalars)."""
    if eqn.primitive.name != "custom_jvp_call":
        return False
    shapes = {tuple(var.aval.shape) for var in (*eqn.invars, *eqn.outvars)} - {()}
    if len(shapes) != 1 or not all(jnp.issubdtype(var.aval.dtype, jnp.floating)
                                   for var in eqn.invars):
        return False
    avals = [jax.ShapeDtypeStruct(var.aval.shape, var.aval.dtype) for var in eqn.invars]
    jvp = jax.make_jaxpr(lambda xs, ts: jax.jvp(lambda *a: _bind(eqn, a), xs, ts))
    return _shape_free(jvp(avals, avals).jaxpr)


def _bind_elementwise_call(eqn, vals: Sequence[_Val]) -> list[_Val]:
    """An elementwise custom-derivative call (see :func:`_elementwise_call`)
    bound as it is (its own derivative rule) in the operands' permuted layout:
    the permuted arrays are reshaped (not transposed) to the shapes the call
    was traced for, which is free and, the call being elementwise, exact."""
    perm = _shared_perm(vals)
    if perm is None:
        return _vmap_bind(eqn, vals)
    arrays = []
    for v, var in zip(vals, eqn.invars):
        a = _in_perm(v, perm)
        arrays.append(a.reshape(np.shape(a)[:_lead(v)] + tuple(var.aval.shape)))
    outs = _bind_runs(eqn, arrays, [v.batched for v in vals])
    phys = next(v for v in vals if v.ndim > 0 and v.batched).array.shape
    return [_Val(o.reshape(phys), True, perm) for o in outs]


_POOL_INIT = {"reduce_window_max": "max", "reduce_window_min": "min",
              "reduce_window_sum": "sum"}


def _pool_identity(kind: str, dtype: Any) -> Any:
    if kind == "sum":
        return np.zeros((), dtype)
    if jnp.issubdtype(dtype, jnp.floating):
        return np.array(-np.inf if kind == "max" else np.inf, dtype)
    info = jnp.iinfo(dtype)
    return np.array(info.min if kind == "max" else info.max, dtype)


def _window_geometry(shape: Sequence[int], win: Sequence[int], stride: Sequence[int],
                     wdil: Sequence[int]) -> tuple[list[int], list[tuple[int, ...]]]:
    """Output shape of a VALID window op on ``shape`` and every tap's start."""
    out_shape = [(n - (w - 1) * d - 1) // s + 1
                 for n, w, d, s in zip(shape, win, wdil, stride)]
    starts = [tuple(t * d for t, d in zip(tap, wdil)) for tap in np.ndindex(*win)]
    return out_shape, starts


def _tap(x: Array, start: Sequence[int], out_shape: Sequence[int],
         stride: Sequence[int]) -> Array:
    limit = [b + (o - 1) * s + 1 for b, o, s in zip(start, out_shape, stride)]
    return lax.slice(x, list(start), limit, list(stride))


def _untap(g: Array, start: Sequence[int], shape: Sequence[int],
           stride: Sequence[int]) -> Array:
    """Transpose of :func:`_tap`: ``g`` placed back into zeros of ``shape``."""
    cfg = [(b, n - b - ((o - 1) * s + 1), s - 1)
           for b, n, o, s in zip(start, shape, g.shape, stride)]
    return lax.pad(g, np.zeros((), g.dtype), cfg)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _pool_taps(x: Array, kind: str, win: tuple[int, ...], stride: tuple[int, ...],
               wdil: tuple[int, ...]) -> Array:
    """max/min/sum over windows of ``x`` (already padded), as strided slices."""
    out_shape, starts = _window_geometry(x.shape, win, stride, wdil)
    combine = {"max": lax.max, "min": lax.min, "sum": lax.add}[kind]
    acc = None
    for start in starts:
        piece = _tap(x, start, out_shape, stride)
        acc = piece if acc is None else combine(acc, piece)
    return acc


def _tiles(shape: Sequence[int], win: Sequence[int], stride: Sequence[int],
           wdil: Sequence[int]) -> bool:
    """The windows tile ``shape`` exactly (stride = window, no dilation)."""
    return (all(d == 1 for d in wdil) and tuple(win) == tuple(stride)
            and all(n % w == 0 for n, w in zip(shape, win)))


def _first_tap(x: Array, out: Array, starts: Sequence[Sequence[int]],
               out_shape: Sequence[int], stride: Sequence[int]) -> Array:
    """int32 ``out_shape``: the number of each window's first tap (in
    ``starts`` order) equal to ``out`` (the rule of XLA's select-and-scatter)."""
    first = np.int32(len(starts) - 1)
    for t in reversed(range(len(starts) - 1)):
        first = jnp.where(_tap(x, starts[t], out_shape, stride) == out, np.int32(t), first)
    return first


def _pool_taps_fwd(x, kind, win, stride, wdil):
    out = _pool_taps(x, kind, win, stride, wdil)
    if kind != "sum" and _tiles(x.shape, win, stride, wdil):
        out_shape, starts = _window_geometry(x.shape, win, stride, wdil)
        return out, (_first_tap(x, out, starts, out_shape, stride), None)
    return out, (x, out)


def _tiled_pool_grad(first: Array | None, g: Array, kind: str, win: Sequence[int],
                     shape: Sequence[int]) -> Array:
    """The pooling gradient when the windows tile the input (``shape``): ``g``
    spread over each window by a broadcast (a reshape, no interleaving copy),
    kept (max/min) where the element is its window's ``first`` tap (row-major
    number in the window). ``first``/``g``: ``(..., o_i, ...)``; returns
    ``shape = (..., o_i * w_i, ...)``."""
    nd = len(win)
    spread = tuple(a for o, w in zip(g.shape, win) for a in (o, w))
    dims = tuple(range(0, 2 * nd, 2))
    g_up = lax.broadcast_in_dim(g, spread, dims)
    if kind == "sum":
        return g_up.reshape(shape)
    code = sum(lax.broadcasted_iota(jnp.int32, spread, 2 * i + 1) * math.prod(win[i + 1:])
               for i in range(nd))
    hit = lax.broadcast_in_dim(first, spread, dims) == code
    return jnp.where(hit, g_up, np.zeros((), g.dtype)).reshape(shape)


def _materialized(*arrays: Array) -> tuple[Array, ...]:
    """``arrays`` unchanged, but computed into memory before their users run.

    XLA CPU fuses cheap elementwise producers into every consumer, also into
    consumers that read each element several times (a broadcast) or through
    a pad, recomputing them per read; an optimization barrier does not stop
    it there. A conditional does: its other branch is never taken (no value
    is below its type's lowest), so the values are exact. Other backends (a
    conditional costs a device-to-host transfer on GPU): unchanged."""
    if jax.default_backend() != "cpu":
        return arrays
    first = arrays[0].reshape(-1)[0]
    lowest = (-np.inf if jnp.issubdtype(first.dtype, jnp.floating)
              else jnp.iinfo(first.dtype).min)
    never = first < np.asarray(lowest, first.dtype)
    return tuple(lax.cond(never, lambda a: tuple(x + x for x in a), lambda a: a, arrays))


def _pool_taps_bwd(kind, win, stride, wdil, res, g):
    """Sum: every tap gets ``g``. Max/min: the first tap equal to the result
    gets it (the rule of XLA's select-and-scatter). Windows that tile the
    input: :func:`_tiled_pool_grad` (the first tap's number is the forward's
    residual); others: each tap's share scattered back by a pad."""
    first_or_x, out = res
    if out is None or (kind == "sum" and _tiles(first_or_x.shape, win, stride, wdil)):
        shape = tuple(o * w for o, w in zip(g.shape, win))
        first = None
        if out is None:
            first, g = _materialized(first_or_x, g)
        return (_tiled_pool_grad(first, g, kind, win, shape),)
    x = first_or_x
    out_shape, starts = _window_geometry(x.shape, win, stride, wdil)
    zero = np.zeros((), g.dtype)
    first = None if kind == "sum" else _first_tap(x, out, starts, out_shape, stride)
    dx = None
    for t, start in enumerate(starts):
        piece = g if first is None else jnp.where(first == t, g, zero)
        piece = _untap(piece, start, x.shape, stride)
        dx = piece if dx is None else dx + piece
    return (dx,)


_pool_taps.defvjp(_pool_taps_fwd, _pool_taps_bwd)


def _rule_reduce_window(eqn, vals: Sequence[_Val]) -> list[_Val]:
    """Pooling as an elementwise max/min/sum of strided slices, in the
    operand's own layout (with a gradient that spreads by a broadcast when
    the windows tile the input, else scatters by pads; never
    select-and-scatter)."""
    (v,) = vals
    p = eqn.params
    if (any(d != 1 for d in p["base_dilation"])
            or math.prod(p["window_dimensions"]) > _MAX_POOL_TAPS):
        return _vmap_bind(eqn, vals)
    perm = v.perm or tuple(range(v.ndim))
    lead = _lead(v)
    win = (1,) * lead + tuple(p["window_dimensions"][d] for d in perm)
    stride = (1,) * lead + tuple(p["window_strides"][d] for d in perm)
    wdil = (1,) * lead + tuple(p["window_dilation"][d] for d in perm)
    pad = ((0, 0),) * lead + tuple(tuple(p["padding"][d]) for d in perm)
    kind = _POOL_INIT[eqn.primitive.name]
    x = v.array
    if any(lo or hi for lo, hi in pad):
        x = lax.pad(x, _pool_identity(kind, x.dtype), [(lo, hi, 0) for lo, hi in pad])
    if jnp.issubdtype(x.dtype, jnp.floating):
        out = _pool_taps(x, kind, win, stride, wdil)
    else:
        out = _pool_taps.fun(x, kind, win, stride, wdil)
    return [_Val(out, v.batched, v.perm)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4, 5))
def _conv_patches(x: Array, lead: int, kernel: tuple[int, ...], strides: tuple[int, ...],
                  rhs_dilation: tuple[int, ...], out_spatial: tuple[int, ...]) -> Array:
    """im2col with spatial axes minor.

    ``x (*lead, C, N, *S)`` (already padded) -> ``(*lead, *kernel, C, N,
    *out_spatial)``: one strided slice per tap, stacked one spatial axis at a
    time (a few operands per concatenation keeps XLA on its fast copy path).
    Its gradient (col2im) is the sum of the taps' cotangents padded back into
    place, one fusion.
    """
    d = len(kernel)
    base = x.ndim - d  # first spatial axis
    for i in reversed(range(d)):
        ax = base + i + (d - 1 - i)  # spatial axis i after earlier stacks
        pieces = []
        for t in range(kernel[i]):
            start = [0] * x.ndim
            limit = list(x.shape)
            step = [1] * x.ndim
            start[ax] = t * rhs_dilation[i]
            limit[ax] = start[ax] + (out_spatial[i] - 1) * strides[i] + 1
            step[ax] = strides[i]
            pieces.append(lax.slice(x, start, limit, step))
        x = jnp.stack(pieces, axis=lead)
    return x


def _conv_patches_fwd(x, lead, kernel, strides, rhs_dilation, out_spatial):
    return _conv_patches(x, lead, kernel, strides, rhs_dilation, out_spatial), x.shape


def _conv_patches_bwd(lead, kernel, strides, rhs_dilation, out_spatial, shape, g):
    d = len(kernel)
    full_stride = (1,) * (len(shape) - d) + tuple(strides)
    dx = None
    for tap in np.ndindex(*kernel):
        piece = g[(slice(None),) * lead + tap]
        start = (0,) * (len(shape) - d) + tuple(t * r for t, r in zip(tap, rhs_dilation))
        piece = _untap(piece, start, shape, full_stride)
        dx = piece if dx is None else dx + piece
    return (lax.optimization_barrier(dx),)


_conv_patches.defvjp(_conv_patches_fwd, _conv_patches_bwd)


def _matmul(w: Array, p: Array) -> Array:
    """``w (*R, O, K) @ p (*R, K, M)`` (``R``: an optional leading batch axis
    of both)."""
    if w.ndim == 3:
        return lax.dot_general(w, p, (((2,), (1,)), ((0,), (0,))))
    return lax.dot_general(w, p, (((1,), (0,)), ((), ())))


def _matmul_dw(p: Array, g: Array) -> Array:
    """Gradient of :func:`_matmul` for ``w``, as ``(P g^T)^T``: the long
    contraction with the patches on the left runs 2-3x faster on CPU than
    ``g P^T`` (and XLA's own transposes reorder operands into slow, strided
    forms)."""
    if p.ndim == 3:
        return jnp.swapaxes(lax.dot_general(p, g, (((2,), (2,)), ((0,), (0,)))), 1, 2)
    return lax.dot_general(p, g, (((1,), (1,)), ((), ()))).T


def _matmul_dp(w: Array, g: Array) -> Array:
    """Gradient of :func:`_matmul` for ``p``: ``w^T g``."""
    if w.ndim == 3:
        return lax.dot_general(jnp.swapaxes(w, 1, 2), g, (((2,), (1,)), ((0,), (0,))))
    return lax.dot_general(w.T, g, (((1,), (0,)), ((), ())))


@dataclasses.dataclass(frozen=True)
class _ConvGeometry:
    """A lowered convolution's static shape data.

    ``lead``: 1 if the input carries the run axis; ``padding``: per spatial
    axis ``(lo, hi)``; ``kernel``/``strides``/``rhs_dilation``/``out_spatial``:
    per spatial axis."""

    lead: int
    padding: tuple[tuple[int, int], ...]
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    rhs_dilation: tuple[int, ...]
    out_spatial: tuple[int, ...]

    def patches(self, x: Array) -> Array:
        """``x (*lead, C, N, *S)`` -> GEMM operand ``(*lead, K, M)``."""
        x = lax.pad(x, np.zeros((), x.dtype),
                    [(0, 0, 0)] * (self.lead + 2) + [(lo, hi, 0) for lo, hi in self.padding])
        p = _conv_patches(x, self.lead, self.kernel, self.strides, self.rhs_dilation,
                          self.out_spatial)
        c, n = x.shape[self.lead], x.shape[self.lead + 1]
        return p.reshape(*p.shape[:self.lead], math.prod(self.kernel) * c,
                         n * math.prod(self.out_spatial))

    def grad_pads(self) -> tuple[tuple[int, int], ...] | None:
        """Per spatial axis, the padding of the output gradient after which
        every tap's share of the input gradient is a plain slice of ``W^T g``
        (stride 1 only; else None)."""
        if any(s != 1 for s in self.strides):
            return None
        return tuple(((k - 1) * d - lo, (k - 1) * d - hi)
                     for k, d, (lo, hi) in zip(self.kernel, self.rhs_dilation, self.padding))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_gemm(w: Array, x: Array, geo: _ConvGeometry) -> Array:
    """A convolution as im2col + GEMM: ``w (*R, O, K)`` (``K`` ordered like
    the patches: taps, then input channels) and ``x (*lead, C, N, *S)``
    (unpadded; with ``lead`` both carry the run axis ``R``, else ``w`` is
    ``(R*O, K)``) -> ``(*R, O, N * prod(out_spatial))``.

    Gradient: ``dW`` by :func:`_matmul_dw`; for stride 1, ``dx`` (col2im) as
    the sum over taps of slices of ``W^T pad(g)`` (the output gradient padded
    first, so that no tap needs a pad of its own: one fusion of plain offset
    reads, which XLA can fuse into the next layer's backward without
    conditionals); other strides: each tap's share padded back into place."""
    return _matmul(w, geo.patches(x))


def _conv_gemm_fwd(w, x, geo):
    p = geo.patches(x)
    return _matmul(w, p), (w, p, x.shape)


def _conv_gemm_bwd(geo, res, g):
    w, p, x_shape = res
    dw = _matmul_dw(p, g).astype(w.dtype)
    lead, d = geo.lead, len(geo.kernel)
    c = x_shape[lead]
    g = g.reshape(*g.shape[:-1], x_shape[lead + 1], *geo.out_spatial)  # (*R, O, N, *out)
    pads = geo.grad_pads()
    if pads is None:
        dp = _matmul_dp(w, g.reshape(*g.shape[:-d - 1], -1))
        padded = (*x_shape[:-d],
                  *(n + lo + hi for n, (lo, hi) in zip(x_shape[-d:], geo.padding)))
        dp = dp.reshape(*x_shape[:lead], *geo.kernel, c, x_shape[lead + 1], *geo.out_spatial)
        dx = _conv_patches_bwd(lead, geo.kernel, geo.strides, geo.rhs_dilation,
                               geo.out_spatial, padded, dp)[0]
        dx = lax.slice(dx, [0] * (dx.ndim - d) + [lo for lo, _ in geo.padding],
                       [*x_shape[:-d], *(lo + n for n, (lo, _) in zip(x_shape[-d:], geo.padding))])
        return dw, dx
    (g,) = _materialized(g)
    g = lax.pad(g, np.zeros((), g.dtype),
                [(0, 0, 0)] * (g.ndim - d) + [(lo, hi, 0) for lo, hi in pads])
    grid = g.shape[-d:]
    dp = _matmul_dp(w, g.reshape(*g.shape[:-d - 1], -1))
    dp = dp.reshape(*x_shape[:lead], *geo.kernel, c, x_shape[lead + 1], *grid)
    dx = None
    for tap in np.ndindex(*geo.kernel):
        start = [(k - 1 - t) * r for k, t, r in zip(geo.kernel, tap, geo.rhs_dilation)]
        piece = dp[(slice(None),) * lead + tap]
        piece = lax.slice(piece, [0] * (piece.ndim - d) + start,
                          [*piece.shape[:-d], *(b + n for b, n in zip(start, x_shape[-d:]))])
        dx = piece if dx is None else dx + piece
    return dw, dx


_conv_gemm.defvjp(_conv_gemm_fwd, _conv_gemm_bwd)


def _rule_conv(eqn, vals: Sequence[_Val], max_k: int | None = None) -> list[_Val]:
    """A convolution with a per-run kernel as im2col + GEMM (XLA's own
    convolution when the GEMM's depth ``K = taps * C_in`` exceeds ``max_k``)."""
    lhs, rhs = vals
    p = eqn.params
    dn = p["dimension_numbers"]
    lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
    kshape = eqn.invars[1].aval.shape
    depth = kshape[rhs_spec[1]] * math.prod(kshape[d] for d in rhs_spec[2:])
    if (not rhs.batched or p["feature_group_count"] != 1 or p["batch_group_count"] != 1
            or any(d != 1 for d in p["lhs_dilation"])
            or (max_k is not None and depth > max_k)):
        return _vmap_bind(eqn, vals)
    lead = _lead(lhs)
    # lhs physical (lead, C, N, *S).
    x = _in_perm(lhs, (lhs_spec[1], lhs_spec[0], *lhs_spec[2:]))
    out_aval = eqn.outvars[0].aval
    out_spatial = tuple(out_aval.shape[d] for d in out_spec[2:])
    w = _logical(rhs)
    kernel_logical = w.shape[1:]
    geo = _ConvGeometry(lead, tuple(tuple(pad) for pad in p["padding"]),
                        tuple(kernel_logical[d] for d in rhs_spec[2:]),
                        tuple(p["window_strides"]), tuple(p["rhs_dilation"]), out_spatial)
    n_runs, n = w.shape[0], x.shape[lead + 1]
    c_out = kernel_logical[rhs_spec[0]]
    # Kernel (R, O, *taps, I) -> (R, O, K), K ordered like the patches' (taps, C).
    w = lax.transpose(w, (0, 1 + rhs_spec[0], *(1 + d for d in rhs_spec[2:]), 1 + rhs_spec[1]))
    w = w.reshape(n_runs, c_out, -1)
    if not lead:
        w = w.reshape(n_runs * c_out, -1)
    plain = (p["precision"] is None and p["preferred_element_type"] in (None, w.dtype)
             and w.dtype == x.dtype)
    if plain:
        out = _conv_gemm(w, x, geo)
    else:
        contract = (((w.ndim - 1,), (lead,)), ((0,), (0,)) if lead else ((), ()))
        out = lax.dot_general(w, geo.patches(x), contract, precision=p["precision"],
                              preferred_element_type=p["preferred_element_type"])
    out = out.reshape(n_runs, c_out, n, *out_spatial).astype(out_aval.dtype)
    return [_Val(out, True, (out_spec[1], out_spec[0], *out_spec[2:]))]


_RULES: dict[str, Callable[[Any, Sequence[_Val]], list[_Val]]] = {
    "conv_general_dilated": _rule_conv,
    "reduce_window_max": _rule_reduce_window,
    "reduce_window_min": _rule_reduce_window,
    "reduce_window_sum": _rule_reduce_window,
    **{name: _rule_elementwise for name in _jaxpr.ELEMENTWISE},
}


# ----------------------------------------------------------------------------
# Interpreter
# ----------------------------------------------------------------------------

def _rules(max_gemm_k: int | None) -> dict[str, Callable[[Any, Sequence[_Val]], list[_Val]]]:
    if max_gemm_k is None:
        return _RULES
    return {**_RULES, "conv_general_dilated": functools.partial(_rule_conv, max_k=max_gemm_k)}


_CUSTOM_DERIVATIVES = frozenset({"custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"})
_REWRITTEN = frozenset({"conv_general_dilated", *_POOL_INIT})


def _keeps_own_derivative(eqn, inner) -> bool:
    """A custom-derivative call with nothing to rewrite inside (e.g.
    ``jax.nn.relu``): bound as it is, so that its own derivative rule is used
    (inlined, ``relu``'s ``max(x, 0)`` would give 1/2 at 0)."""
    return (eqn.primitive.name in _CUSTOM_DERIVATIVES
            and not any(e.primitive.name in _REWRITTEN for e in _jaxpr.iter_eqns(inner[0])))


def _eval_jaxpr(jaxpr, consts: Sequence[Any], args: Sequence[_Val],
                rules: dict[str, Callable[[Any, Sequence[_Val]], list[_Val]]] = _RULES,
                differentiable: bool = False) -> list[_Val]:
    def eval_eqn(eqn, vals: list[_Val], inner) -> list[_Val]:
        if not any(v.batched for v in vals):
            return _vmap_bind(eqn, vals)
        if inner is not None and differentiable and _keeps_own_derivative(eqn, inner):
            if _elementwise_call(eqn):
                return _bind_elementwise_call(eqn, vals)
            return _vmap_bind(eqn, vals)
        if inner is not None:
            return _eval_jaxpr(inner[0], inner[1], vals, rules, differentiable)
        return rules.get(eqn.primitive.name, _vmap_bind)(eqn, vals)

    return _jaxpr.interpret(jaxpr, [_Val(c, False) for c in consts], list(args), eval_eqn,
                            literal=lambda value: _Val(value, False))


def run_batched(fn: Callable[..., Any], *, max_gemm_k: int | None = None,
                differentiable: bool = False) -> Callable[..., Any]:
    """``fn(params, x)`` evaluated for ``R`` parameter sets sharing ``x``.

    Args:
      fn: a pure function ``fn(params, x) -> outputs`` (any pytrees).
      max_gemm_k: convolutions whose GEMM depth ``K = kernel taps * input
        channels`` exceeds this keep XLA's convolution (None: all lowered).
      differentiable: keep custom-derivative calls that hold nothing to
        rewrite (e.g. ``relu``) as they are, so that gradients of the result
        use their rules (inlining them is faster but changes derivatives at
        their kinks).

    Returns:
      ``g(params_r, x)`` where every leaf of ``params_r`` has a leading run
      axis ``R``; returns ``fn``'s outputs with a leading axis ``R``, equal to
      ``jax.vmap(fn, in_axes=(0, None))(params_r, x)`` up to float rounding.
    """

    def batched(params_r: Any, x: Any) -> Any:
        p_leaves, p_def = jax.tree.flatten(params_r)
        x_leaves, x_def = jax.tree.flatten(x)
        if not p_leaves:
            raise ValueError("params must have at least one array leaf (with the run axis)")
        n_runs = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in p_leaves}
        if len(n_runs) != 1 or None in n_runs:
            raise ValueError("every params leaf must have the same leading run axis, got "
                             f"shapes {[np.shape(leaf) for leaf in p_leaves]}")
        (r,) = n_runs

        def flat_fn(*leaves):
            ps = jax.tree.unflatten(p_def, leaves[:len(p_leaves)])
            xs = jax.tree.unflatten(x_def, leaves[len(p_leaves):])
            return fn(ps, xs)

        avals = ([jax.ShapeDtypeStruct(np.shape(leaf)[1:], jnp.result_type(leaf))
                  for leaf in p_leaves]
                 + [jax.ShapeDtypeStruct(np.shape(leaf), jnp.result_type(leaf))
                    for leaf in x_leaves])
        closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*avals)
        args = ([_Val(leaf, True) for leaf in p_leaves]
                + [_Val(leaf, False) for leaf in x_leaves])
        outs = _eval_jaxpr(closed.jaxpr, closed.consts, args, _rules(max_gemm_k),
                           differentiable)
        arrays = [_logical(o) if o.batched
                  else jnp.broadcast_to(o.array, (r, *np.shape(o.array))) for o in outs]
        return jax.tree.unflatten(jax.tree.structure(out_shape), arrays)

    return batched


def lowered(fn: Callable[..., Any], *, max_gemm_k: int | None = None) -> Callable[..., Any]:
    """``fn(params, x)`` with its convolutions as im2col GEMMs and its window
    max/min/sum pooling as strided slices: the single-run case of
    :func:`run_batched` (a run axis of size 1, which the interpreter drops
    around every primitive it does not rewrite, so those run as in ``fn``).

    Differentiable: ``jax.grad`` of the result goes through the GEMMs
    (custom gradients keep their matrix products in fast layouts), col2im
    (stride 1: slices of one padded ``W^T g``; else the taps padded back into
    place), the pooling's first-max routing (XLA's select-and-scatter rule:
    the forward's first-maximum tap, spread by a broadcast when the windows
    tile the input, else by pads) and elementwise custom-derivative calls
    (e.g. ``relu``) bound as they are in the GEMM's layout. Equations that do not
    depend on ``params`` (e.g. the input images' patches) are computed as in
    ``fn``. Same numbers as ``fn`` up to float rounding.

    Args:
      fn: a pure function ``fn(params, x) -> outputs`` (any pytrees).
      max_gemm_k: as in :func:`run_batched`.
    """
    batched = run_batched(fn, max_gemm_k=max_gemm_k, differentiable=True)

    def single(params: Any, x: Any) -> Any:
        out = batched(jax.tree.map(lambda a: jnp.asarray(a)[None], params), x)
        return jax.tree.map(lambda a: a[0], out)

    return single

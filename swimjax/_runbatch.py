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
    if v.perm == perm or np.ndim(v.array) == 0:
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

def _rule_elementwise(eqn, vals: Sequence[_Val]) -> list[_Val]:
    """Elementwise ops run in the layout of their first permuted operand."""
    full = [v for v in vals if v.ndim > 0]
    perm = next((v.perm for v in full if v.perm is not None and v.batched), None)
    if perm is None:
        return _vmap_bind(eqn, vals)
    outs = _bind_runs(eqn, [_in_perm(v, perm) for v in vals], [v.batched for v in vals])
    return [_Val(o, True, perm) for o in outs]


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


def _pool_taps_fwd(x, kind, win, stride, wdil):
    out = _pool_taps(x, kind, win, stride, wdil)
    return out, (x, out)


def _pool_taps_bwd(kind, win, stride, wdil, res, g):
    """Sum: every tap gets ``g``. Max/min: the first tap equal to the result
    gets it (the rule of XLA's select-and-scatter). Non-overlapping windows
    interleave the taps' pieces back (stack + reshape); others are scattered
    back by pads. Optimization barriers keep XLA from fusing the forward
    pooling and its consumers into every element of this (it would recompute
    the window maximum once per tap and output element)."""
    x, out, g = lax.optimization_barrier(res + (g,))
    out_shape, starts = _window_geometry(x.shape, win, stride, wdil)
    zero = np.zeros((), g.dtype)
    taken = None
    pieces = []
    for start in starts:
        if kind == "sum":
            pieces.append(g)
            continue
        hit = _tap(x, start, out_shape, stride) == out
        if taken is not None:
            hit = hit & ~taken
        taken = hit if taken is None else taken | hit
        pieces.append(jnp.where(hit, g, zero))
    tiled = (all(d == 1 for d in wdil) and tuple(win) == tuple(stride)
             and all(o * w == n for o, w, n in zip(out_shape, win, x.shape)))
    if tiled:
        # pieces in tap order (row-major over win) -> (..., o_i, w_i, ...) -> x.shape
        arr = jnp.stack(pieces, axis=-1).reshape(*out_shape, *win)
        nd = len(win)
        arr = lax.transpose(arr, tuple(a for i in range(nd) for a in (i, nd + i)))
        return (lax.optimization_barrier(arr.reshape(x.shape)),)
    dx = None
    for start, piece in zip(starts, pieces):
        piece = _untap(piece, start, x.shape, stride)
        dx = piece if dx is None else dx + piece
    return (lax.optimization_barrier(dx),)


_pool_taps.defvjp(_pool_taps_fwd, _pool_taps_bwd)


def _rule_reduce_window(eqn, vals: Sequence[_Val]) -> list[_Val]:
    """Pooling as an elementwise max/min/sum of strided slices, in the
    operand's own layout (with a gradient that scatters by pads, not
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


@jax.custom_vjp
def _gemm(w: Array, p: Array) -> Array:
    """``w (*R, O, K) @ p (*R, K, M)`` (``R``: an optional leading batch axis
    of both), with a gradient whose matrix products keep this layout: XLA's
    own transposes of it reorder operands into slow, strided forms."""
    if w.ndim == 3:
        return lax.dot_general(w, p, (((2,), (1,)), ((0,), (0,))))
    return lax.dot_general(w, p, (((1,), (0,)), ((), ())))


def _gemm_fwd(w, p):
    return _gemm(w, p), (w, p)


def _gemm_bwd(res, g):
    w, p = res
    # dW as (P g^T)^T: the long contraction with the patches on the left runs
    # 2-3x faster on CPU than g P^T.
    if w.ndim == 3:
        dw = jnp.swapaxes(lax.dot_general(p, g, (((2,), (2,)), ((0,), (0,)))), 1, 2)
        dp = lax.dot_general(jnp.swapaxes(w, 1, 2), g, (((2,), (1,)), ((0,), (0,))))
    else:
        dw = lax.dot_general(p, g, (((1,), (1,)), ((), ()))).T
        dp = lax.dot_general(w.T, g, (((1,), (0,)), ((), ())))
    return dw.astype(w.dtype), dp.astype(p.dtype)


_gemm.defvjp(_gemm_fwd, _gemm_bwd)


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
    x = lax.pad(x, np.zeros((), x.dtype),
                [(0, 0, 0)] * (lead + 2) + [(lo, hi, 0) for lo, hi in p["padding"]])
    out_aval = eqn.outvars[0].aval
    out_spatial = [out_aval.shape[d] for d in out_spec[2:]]
    w = _logical(rhs)
    kernel_logical = w.shape[1:]
    kernel = [kernel_logical[d] for d in rhs_spec[2:]]
    patches = _conv_patches(x, lead, tuple(kernel), tuple(p["window_strides"]),
                            tuple(p["rhs_dilation"]), tuple(out_spatial))
    n_runs = w.shape[0]
    c_in, n = x.shape[lead], x.shape[lead + 1]
    c_out = kernel_logical[rhs_spec[0]]
    k = math.prod(kernel) * c_in
    m = n * math.prod(out_spatial)
    # Kernel (R, O, *taps, I) -> (R, O, K), K ordered like the patches' (taps, C).
    w = lax.transpose(w, (0, 1 + rhs_spec[0], *(1 + d for d in rhs_spec[2:]), 1 + rhs_spec[1]))
    w = w.reshape(n_runs, c_out, k)
    if lead:
        w, patches = w, patches.reshape(n_runs, k, m)
    else:
        w, patches = w.reshape(n_runs * c_out, k), patches.reshape(k, m)
    plain = (p["precision"] is None and p["preferred_element_type"] in (None, w.dtype)
             and w.dtype == patches.dtype)
    if plain:
        out = _gemm(w, patches)
    elif lead:
        out = lax.dot_general(w, patches, (((2,), (1,)), ((0,), (0,))),
                              precision=p["precision"],
                              preferred_element_type=p["preferred_element_type"])
    else:
        out = lax.dot_general(w, patches, (((1,), (0,)), ((), ())),
                              precision=p["precision"],
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
    (the patches' taps padded back into place) and the pooling's first-max
    routing (XLA's select-and-scatter rule, by pads). Equations that do not
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

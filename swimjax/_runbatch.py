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
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore

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
    out = eqn.primitive.bind(*args, **eqn.params)
    return list(out) if eqn.primitive.multiple_results else [out]


def _bind_runs(eqn, arrays: Sequence[Any], batched: Sequence[bool]) -> list[Any]:
    """The primitive on ``arrays``, vmapped over the run axis of the batched ones."""
    if not any(batched):
        return _bind(eqn, arrays)
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


def _rule_reduce_window(eqn, vals: Sequence[_Val]) -> list[_Val]:
    """Pooling as an elementwise max/min/sum of strided slices, in the
    operand's own layout."""
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
    out_shape = [(n - (w - 1) * d - 1) // s + 1
                 for n, w, d, s in zip(x.shape, win, wdil, stride)]
    combine = {"max": lax.max, "min": lax.min, "sum": lax.add}[kind]
    acc = None
    for tap in np.ndindex(*win):
        start = [t * d for t, d in zip(tap, wdil)]
        limit = [b + (o - 1) * s + 1 for b, o, s in zip(start, out_shape, stride)]
        piece = lax.slice(x, start, limit, stride)
        acc = piece if acc is None else combine(acc, piece)
    return [_Val(acc, v.batched, v.perm)]


def _conv_patches(x: Array, lead: int, kernel: Sequence[int], strides: Sequence[int],
                  rhs_dilation: Sequence[int], out_spatial: Sequence[int]) -> Array:
    """im2col with spatial axes minor.

    ``x (*lead, C, N, *S)`` (already padded) -> ``(*lead, *kernel, C, N,
    *out_spatial)``: one strided slice per tap, stacked one spatial axis at a
    time (a few operands per concatenation keeps XLA on its fast copy path).
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


def _rule_conv(eqn, vals: Sequence[_Val]) -> list[_Val]:
    """A convolution with a per-run kernel as im2col + GEMM."""
    lhs, rhs = vals
    p = eqn.params
    if (not rhs.batched or p["feature_group_count"] != 1 or p["batch_group_count"] != 1
            or any(d != 1 for d in p["lhs_dilation"])):
        return _vmap_bind(eqn, vals)
    dn = p["dimension_numbers"]
    lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
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
    patches = _conv_patches(x, lead, kernel, p["window_strides"], p["rhs_dilation"],
                            out_spatial)
    n_runs = w.shape[0]
    c_in, n = x.shape[lead], x.shape[lead + 1]
    c_out = kernel_logical[rhs_spec[0]]
    k = math.prod(kernel) * c_in
    m = n * math.prod(out_spatial)
    # Kernel (R, O, *taps, I) -> (R, O, K), K ordered like the patches' (taps, C).
    w = lax.transpose(w, (0, 1 + rhs_spec[0], *(1 + d for d in rhs_spec[2:]), 1 + rhs_spec[1]))
    w = w.reshape(n_runs, c_out, k)
    dot = dict(precision=p["precision"], preferred_element_type=p["preferred_element_type"])
    if lead:
        out = lax.dot_general(w, patches.reshape(n_runs, k, m),
                              (((2,), (1,)), ((0,), (0,))), **dot)
    else:
        out = lax.dot_general(w.reshape(n_runs * c_out, k), patches.reshape(k, m),
                              (((1,), (0,)), ((), ())), **dot)
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

def _eval_jaxpr(jaxpr, consts: Sequence[Any], args: Sequence[_Val]) -> list[_Val]:
    env: dict[Any, _Val] = {}

    def read(var) -> _Val:
        if isinstance(var, jcore.Literal):
            return _Val(var.val, False)
        return env[var]

    for var, c in zip(jaxpr.constvars, consts):
        env[var] = _Val(c, False)
    for var, a in zip(jaxpr.invars, args):
        env[var] = a
    for eqn in jaxpr.eqns:
        vals = [read(x) for x in eqn.invars]
        inner = _jaxpr.inner_closed(eqn)
        if not any(v.batched for v in vals):
            outs = _vmap_bind(eqn, vals)
        elif inner is not None:
            outs = _eval_jaxpr(inner[0], inner[1], vals)
        else:
            outs = _RULES.get(eqn.primitive.name, _vmap_bind)(eqn, vals)
        for var, o in zip(eqn.outvars, outs):
            env[var] = o
    return [read(x) for x in jaxpr.outvars]


def run_batched(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn(params, x)`` evaluated for ``R`` parameter sets sharing ``x``.

    Args:
      fn: a pure function ``fn(params, x) -> outputs`` (any pytrees).

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
        outs = _eval_jaxpr(closed.jaxpr, closed.consts, args)
        arrays = [_logical(o) if o.batched
                  else jnp.broadcast_to(o.array, (r, *np.shape(o.array))) for o in outs]
        return jax.tree.unflatten(jax.tree.structure(out_shape), arrays)

    return batched

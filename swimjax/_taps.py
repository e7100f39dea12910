"""Per-example squared parameter gradients from one batched backward pass.

``per_example_square_sums(apply_fn, params, x, cotangents, weights)`` gives,
for every parameter leaf, ``sum_i sum_k weights[k, i] * (d (cot[k, i] . z_i) /
d theta)^2`` where ``z_i = apply_fn(params, x)[i]`` are example ``i``'s
logits: the per-example squared gradients (e.g. of sampled-class Gauss-Newton
columns) without a per-example backward pass through the whole network.

How: the jaxpr of ``apply_fn`` is evaluated with every value classified as
*data* (depends on ``x``; its axis 0 is the example), *parameter* (a function
of one parameter leaf only, e.g. a reshaped bias) or *constant*. The first
primitive where a parameter meets data is a *tap*: its output gets an added
zero ``delta``, and its data operands are kept. One ordinary batched
backward pass gives ``d loss / d delta``, the per-example output gradients
of every tap (examples do not mix in a network without batch statistics);
then each tap's per-example parameter gradient is the vector-Jacobian product
of that single primitive, per example, and those are squared and summed. The
cost is one forward pass, one backward pass to the taps' outputs, and the
per-example products of the parameter-consuming primitives alone (for a
dense layer, an outer product; for a convolution, its weight gradient).

Only parameter leaves whose every use is a tap on data are covered; a leaf
meeting another leaf before any data (e.g. weight standardisation), or a
parameter inside control flow, raises :class:`UnsupportedModelError`.
Models whose examples interact (batch norm in training mode) are not
per-example and must not be used (inference-mode batch norm is fine).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from swimjax import _jaxpr

__all__ = ["UnsupportedModelError", "per_example_square_sums"]

#: Primitives holding sub-jaxprs that are not inlinable calls (loops, branches).
_CONTROL_FLOW = frozenset({"scan", "while", "cond", "custom_lin"})


class UnsupportedModelError(ValueError):
    """The model uses a parameter in a way the tap interpreter cannot follow."""


@dataclasses.dataclass(frozen=True)
class _Val:
    """A value of the interpretation: its array and its kind.

    ``kind``: ``"data"`` (axis 0 = examples), ``"param"`` (``fn(leaf)`` of
    parameter leaf ``leaf``) or ``"const"``.
    """

    array: Any
    kind: str
    leaf: int = -1
    fn: Callable[[Any], Any] | None = None


@dataclasses.dataclass(frozen=True)
class _Tap:
    """A primitive where parameter ``leaf`` meets data: ``out = f(leaf, data)``."""

    leaf: int
    f: Callable[[Any, list[Any]], Any]
    data: list[Any]
    dense: bool = False   # out = data @ leaf, data (B, n_in): squares by one product


def _const(array: Any) -> _Val:
    return _Val(array, "const")


def _identity(a: Any) -> Any:
    return a


def _is_dense(eqn: Any, vals: list[_Val]) -> bool:
    """``dot_general(data (B, n_in), leaf (n_in, n_out))``, the leaf itself."""
    if eqn.primitive.name != "dot_general" or len(vals) != 2:
        return False
    d, w = vals
    return (d.kind == "data" and w.kind == "param" and w.fn is _identity
            and jnp.ndim(d.array) == 2 and jnp.ndim(w.array) == 2
            and eqn.params["dimension_numbers"] == (((1,), (0,)), ((), ()))
            and eqn.params.get("preferred_element_type") in (None, jnp.result_type(d.array)))


def _bind_call(eqn: Any, values: list[Any]) -> list[Any]:
    """``eqn`` applied to ``values``, call primitives included (their bodies
    and custom derivative rules kept, as ``jax.core.eval_jaxpr`` binds them)."""
    outs = eqn.primitive.bind(*values, **eqn.primitive.get_bind_params(eqn.params))
    return list(outs) if eqn.primitive.multiple_results else [outs]


def _broadcasts_over_examples(eqn: Any, n_examples: int) -> bool:
    """A ``broadcast_in_dim`` of a parameter onto a shape whose axis 0 (not one
    of the operand's) is the examples' axis."""
    if eqn.primitive.name != "broadcast_in_dim":
        return False
    shape = tuple(eqn.params["shape"])
    return bool(shape) and shape[0] == n_examples and 0 not in eqn.params[
        "broadcast_dimensions"]


def _interpret(closed: Any, leaves: list[Any], x: Any, deltas: list[Any] | None
               ) -> tuple[Any, list[_Tap]]:
    """Evaluates ``closed`` (inputs: the parameter leaves, then ``x``); adds
    ``deltas[j]`` to tap ``j``'s output (zeros when None). Returns the output
    array and the taps in order."""
    taps: list[_Tap] = []
    n_examples = x.shape[0]

    def eval_eqn(eqn: Any, vals: list[_Val], inner: Any) -> list[_Val]:
        kinds = {v.kind for v in vals}
        if "param" not in kinds:   # as is (a custom derivative, e.g. relu's, kept)
            outs = _bind_call(eqn, [v.array for v in vals])
            kind = "data" if "data" in kinds else "const"
            return [_Val(o, kind) for o in outs]
        if inner is not None:
            jaxpr, consts = inner
            return _jaxpr.interpret(jaxpr, [_const(c) for c in consts], vals, eval_eqn,
                                    literal=_const)
        name = eqn.primitive.name
        if name in _CONTROL_FLOW or any(True for p in eqn.params.values()
                                        for _ in _jaxpr.sub_jaxprs(p)):
            raise UnsupportedModelError(f"a parameter enters {name!r} (control flow): "
                                        f"per-example taps cannot follow it")
        leaves_in = {v.leaf for v in vals if v.kind == "param"}
        if len(leaves_in) > 1:
            raise UnsupportedModelError(f"{name!r} combines several parameter leaves before "
                                        f"any data: per-example taps cannot separate them")
        leaf = leaves_in.pop()

        def f(leaf_value: Any, data: list[Any], vals: list[_Val] = vals,
              eqn: Any = eqn) -> list[Any]:
            it = iter(data)
            args = [v.fn(leaf_value) if v.kind == "param" else
                    (next(it) if v.kind == "data" else v.array) for v in vals]
            return _jaxpr.bind(eqn, args)

        if "data" not in kinds:   # still a function of one leaf: compose
            outs = f(leaves[leaf], [])
            if _broadcasts_over_examples(eqn, n_examples):
                # per example, the consuming (elementwise) primitive sees one example
                one = dict(eqn.params, shape=(1,) + tuple(eqn.params["shape"][1:]))
                fn = vals[0].fn
                return [_Val(outs[0], "param", leaf, lambda lv, fn=fn, one=one:
                             eqn.primitive.bind(fn(lv), **one))]
            return [_Val(o, "param", leaf, lambda lv, i=i, f=f: f(lv, [])[i])
                    for i, o in enumerate(outs)]
        if eqn.primitive.multiple_results:
            raise UnsupportedModelError(f"{name!r} (several results) meets a parameter and data")
        data = [v.array for v in vals if v.kind == "data"]
        out = f(leaves[leaf], data)[0]
        j = len(taps)
        taps.append(_Tap(leaf, lambda lv, d, f=f: f(lv, d)[0], data, _is_dense(eqn, vals)))
        if deltas is not None:
            out = out + deltas[j]
        return [_Val(out, "data")]

    args = [_Val(a, "param", i, _identity) for i, a in enumerate(leaves)]
    args.append(_Val(x, "data"))
    outs = _jaxpr.interpret(closed.jaxpr, [_const(c) for c in closed.consts], args, eval_eqn,
                            literal=_const)
    if len(outs) != 1 or outs[0].kind != "data":
        raise UnsupportedModelError("apply_fn must return one logits array that depends on x")
    return outs[0].array, taps


def per_example_square_sums(apply_fn: Callable[[Any, Any], Any], params: Any, x: Any,
                            columns: Callable[[Any], tuple[Any, Any]]) -> Any:
    """``sum_i sum_k weights[i, k] * g_ik^2`` for every parameter, ``g_ik = d
    (cotangents[i, k] . z_i) / d params`` (traceable; call it under ``jit``).

    Args:
      apply_fn: ``apply_fn(params, x) -> logits`` of shape ``(B, ...)``.
      params: the parameter pytree.
      x: ``(B, ...)`` inputs.
      columns: ``columns(logits) -> (cotangents, weights)``: K cotangents per
        example, ``(B, K) + logits.shape[1:]``, and the ``(B, K)`` weights of
        their squared gradients (treated as constants).

    Returns:
      A pytree like ``params``: the weighted sums of squared per-example
      gradients; zeros for leaves the output does not depend on.

    Raises:
      UnsupportedModelError: see the module docstring.
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    spec = [jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)) for a in leaves]
    closed = jax.make_jaxpr(lambda ls, xx: apply_fn(jax.tree_util.tree_unflatten(treedef, ls),
                                                    xx))(spec, jax.ShapeDtypeStruct(
                                                        jnp.shape(x), jnp.result_type(x)))
    shapes = jax.eval_shape(lambda ls, xx: [jax.eval_shape(lambda t=t: t.f(ls[t.leaf], t.data))
                                            for t in _interpret(closed, ls, xx, None)[1]],
                            list(leaves), x)
    zeros = [jnp.zeros(sh.shape, sh.dtype) for sh in shapes]
    taps: list[_Tap] = []

    def tapped(deltas: list[Any]) -> tuple[Any, list[list[Any]]]:
        out, found = _interpret(closed, list(leaves), x, deltas)
        taps[:] = found
        return out, [t.data for t in found]

    # one forward pass (tap inputs kept as auxiliary outputs), one backward per column
    logits, vjp, data = jax.vjp(tapped, zeros, has_aux=True)
    cotangents, weights = jax.lax.stop_gradient(columns(logits))
    taps = [dataclasses.replace(t, data=d) for t, d in zip(taps, data)]
    tap_grads = jax.vmap(lambda ct: vjp(ct)[0], in_axes=1, out_axes=1)(
        cotangents.astype(logits.dtype))          # per tap: (B, K) + out shape

    sums = [jnp.zeros(jnp.shape(a), jnp.result_type(a)) for a in leaves]
    by_leaf: dict[int, list[int]] = {}
    for j, t in enumerate(taps):
        by_leaf.setdefault(t.leaf, []).append(j)
    for leaf, js in by_leaf.items():
        if len(js) == 1 and taps[js[0]].dense:
            # sum_i sum_k w_ik (x_i g_ik^T)^2 = sum_i x_i^2 (sum_k w_ik g_ik^2)^T
            x2 = jnp.square(taps[js[0]].data[0])
            g2 = jnp.einsum("bk,bko->bo", weights.astype(x2.dtype), jnp.square(tap_grads[js[0]]))
            sums[leaf] = x2.T @ g2
            continue
        def per_example(data_i: list[list[Any]], g_i: list[Any], leaf: int = leaf,
                        js: list[int] = js) -> Any:
            # example i's parameter gradient for each of its K cotangents, summed over taps
            total = 0.0
            for j, d, g in zip(js, data_i, g_i):
                fj = taps[j].f
                _, pull = jax.vjp(lambda lv: fj(lv, [a[None] for a in d]), leaves[leaf])
                total = total + jax.vmap(lambda gk: pull(gk[None])[0])(g)
            return total                              # (K,) + leaf shape
        grads = jax.vmap(per_example)([taps[j].data for j in js], [tap_grads[j] for j in js])
        sums[leaf] = jnp.tensordot(weights.astype(grads.dtype), jnp.square(grads),
                                   axes=([0, 1], [0, 1]))
    return jax.tree_util.tree_unflatten(treedef, sums)

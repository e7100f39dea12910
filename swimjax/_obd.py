"""Optimal-Brain-Damage second derivatives as a transformation of a jaxpr.

This private module is the engine behind :func:`swimjax.sensitivity.swim`. It
takes the jaxpr of any ``apply_fn(params, x)`` built from ordinary JAX/flax
operations, evaluates it while recording every intermediate value (a *tape*),
and then propagates *diagonal* second derivatives ``S`` backwards in a single
pass, the way LeCun, Denker & Solla's OBD (and SWIM, DAC 2022) do by hand:

* Gauss-Newton: each primitive ``y = f(x_1, ..., x_n)`` passes
  ``S_{x_k} = (J_k ** 2)^T S_y`` to each input, where ``J_k`` is its Jacobian
  with respect to input ``k`` and ``** 2`` squares elementwise. The terms with
  ``f''`` (second derivatives of the primitive) and all off-diagonal terms are
  dropped, exactly as OBD does.
* Linear primitives whose Jacobian has only 0/1 entries (reshape, transpose,
  broadcast, slice, pad, concatenate, reduce_sum, select, gather, max-pool's
  routing to the winner, ...) use their ordinary VJP, since ``J ** 2 == J``.
* Bilinear primitives (``dot_general``, ``conv_general_dilated``) use the
  transpose of the same primitive with the *other* operand squared: for
  ``y = W x``, ``S_W = sum x^2 S_y`` and ``S_x = sum W^2 S_y``.
* Elementwise primitives (including numpy-style broadcasting of size-1 axes)
  use their squared partial derivatives, obtained by ``jax.jvp`` with unit
  tangents; ``max``/``min`` (ReLU) use 0/1 masks with ReLU's convention at
  ties (derivative 0 at the kink when the other operand is a constant).
* ``jit``/``pjit``, ``custom_jvp_call``, ``custom_vjp_call``, ``remat`` and
  ``closed_call`` are inlined (their *primal* computation is used).

Everything here runs at trace time: under ``jax.jit`` the tape is a list of
tracers and the result is one XLA computation (forward + one backward sweep).

Only primitives with a known rule are accepted; one that second derivatives
must cross on their way from the output to a parameter raises
:class:`UnsupportedPrimitiveError` naming it. Primitives that only touch data
or constants (no parameter flows into them) need no rule.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from swimjax import _jaxpr

Array = jax.Array


class UnsupportedPrimitiveError(ValueError):
    """A primitive on a parameter-to-output path has no OBD propagation rule."""


# --------------------------------------------------------------------------
# Primitive tables
# --------------------------------------------------------------------------

_CALL_PARAMS = _jaxpr.CALL_PARAMS

# Linear in their floating operands with Jacobian entries in {0, 1}: the VJP
# itself propagates S (J**2 == J). reduce_window_max/min route to the winner.
_ZERO_ONE_LINEAR = frozenset({
    "reshape", "transpose", "broadcast_in_dim", "squeeze", "expand_dims",
    "slice", "dynamic_slice", "dynamic_update_slice", "pad", "concatenate",
    "reduce_sum", "copy", "copy_p", "rev", "gather", "reduce_window_sum",
    "reduce_window_max", "reduce_window_min", "convert_element_type",
    "reduce_precision", "split", "sharding_constraint", "select_n",
    "optimization_barrier",
})

# Reductions that pick one element (1/count at ties in JAX's derivative).
_CHOOSER_REDUCTIONS = frozenset({"reduce_max", "reduce_min"})

# Bilinear primitives: S of one operand through the transpose of the
# primitive with the other operand squared.
_BILINEAR = frozenset({"dot_general", "conv_general_dilated"})

# Elementwise primitives (numpy-style broadcasting of size-1 / rank-0 operands):
# S_k = sum over broadcast axes of (d y / d x_k)^2 * S_y.
_ELEMENTWISE = _jaxpr.ELEMENTWISE_MATH

# max/min: 0/1 masks (ReLU convention at ties).
_MAXMIN = _jaxpr.MAXMIN

# No derivative flows through these.
_BLOCKING = frozenset({"stop_gradient"})

SUPPORTED_PRIMITIVES: tuple[str, ...] = tuple(sorted(
    set(_CALL_PARAMS) | _ZERO_ONE_LINEAR | _CHOOSER_REDUCTIONS | _BILINEAR
    | _ELEMENTWISE | _MAXMIN | _BLOCKING))


def _is_float(x: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


# --------------------------------------------------------------------------
# Forward pass: evaluate a jaxpr, inlining call primitives, recording a tape.
# --------------------------------------------------------------------------


@dataclass
class _Entry:
    prim: Any
    params: dict
    in_ids: list[int]
    out_ids: list[int]


@dataclass
class Tape:
    """Every value of a forward evaluation and the primitive applications."""

    values: list[Any] = field(default_factory=list)
    active: list[bool] = field(default_factory=list)
    entries: list[_Entry] = field(default_factory=list)

    def add(self, value: Any, active: bool) -> int:
        self.values.append(value)
        self.active.append(bool(active) and _is_float(value))
        return len(self.values) - 1


def _conv_single_input_channel(lhs: Array, rhs: Array, params: dict) -> Array | None:
    """``conv_general_dilated`` with ONE input channel as a sum of shifted,
    broadcast products (an elementwise fusion), or None when not applicable.

    XLA:CPU runs such convolutions (a grayscale first layer) 10-20x slower than
    this form; the result is the same convolution up to summation order.
    """
    dn = params.get("dimension_numbers")
    if (dn is None or params.get("feature_group_count", 1) != 1
            or params.get("batch_group_count", 1) != 1
            or any(d != 1 for d in params.get("lhs_dilation", ()))
            or params.get("preferred_element_type") is not None):
        return None
    lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
    pads = params["padding"]
    if lhs.shape[lhs_spec[1]] != 1 or isinstance(pads, str) or any(
            lo < 0 or hi < 0 for lo, hi in pads):
        return None
    nsp = lhs.ndim - 2
    x = jnp.transpose(lhs, (lhs_spec[0], *lhs_spec[2:], lhs_spec[1]))[..., 0]
    k = jnp.transpose(rhs, (*rhs_spec[2:], rhs_spec[1], rhs_spec[0]))[..., 0, :]
    xp = jnp.pad(x, [(0, 0)] + [tuple(p) for p in pads])
    strides, rdil = params["window_strides"], params.get("rhs_dilation", (1,) * nsp)
    ksz = k.shape[:-1]
    out_sp = [(xp.shape[1 + d] - (ksz[d] - 1) * rdil[d] - 1) // strides[d] + 1 for d in range(nsp)]
    y = None
    for offs in itertools.product(*[range(n) for n in ksz]):
        sl = tuple(slice(o * rdil[d], o * rdil[d] + (out_sp[d] - 1) * strides[d] + 1, strides[d])
                   for d, o in enumerate(offs))
        term = xp[(slice(None),) + sl][..., None] * k[offs]
        y = term if y is None else y + term
    canon = {out_spec[0]: 0, out_spec[1]: nsp + 1}
    canon.update({out_spec[2 + d]: 1 + d for d in range(nsp)})
    return jnp.transpose(y, [canon[a] for a in range(lhs.ndim)]).astype(jnp.result_type(lhs, rhs))


def _eval_primitive(eqn, invals: list[Any]) -> list[Any]:
    if eqn.primitive.name == "conv_general_dilated" and jax.default_backend() == "cpu":
        out = _conv_single_input_channel(*invals, eqn.params)
        if out is not None:
            return [out]
    return _jaxpr.bind(eqn, invals)


def _run(tape: Tape, jaxpr, consts: Sequence[Any], arg_ids: Sequence[int]) -> list[int]:
    def eval_eqn(eqn, in_ids: list[int], inner) -> list[int]:
        if inner is not None:
            return _run(tape, inner[0], inner[1], in_ids)
        outs = _eval_primitive(eqn, [tape.values[i] for i in in_ids])
        is_active = any(tape.active[i] for i in in_ids)
        out_ids = [tape.add(o, is_active) for o in outs]
        if is_active:
            tape.entries.append(_Entry(eqn.primitive, dict(eqn.params), in_ids, out_ids))
        return out_ids

    const_ids = [tape.add(c, False) for c in consts]
    return _jaxpr.interpret(jaxpr, const_ids, list(arg_ids), eval_eqn,
                            literal=lambda value: tape.add(value, False))


def forward(closed_jaxpr, args: Sequence[Any], active: Sequence[bool]) -> tuple[Tape, list[int]]:
    """Evaluates ``closed_jaxpr`` on ``args``; returns the tape and output ids.

    ``active[k]`` says whether argument ``k`` is a variable S is wanted for
    (a parameter) rather than data.
    """
    tape = Tape()
    arg_ids = [tape.add(a, act) for a, act in zip(args, active)]
    out_ids = _run(tape, closed_jaxpr.jaxpr, closed_jaxpr.consts, arg_ids)
    return tape, out_ids


# --------------------------------------------------------------------------
# Backward rules. Each returns a list with one S (or None) per input.
# --------------------------------------------------------------------------


def _bind(prim, params, args):
    out = prim.bind(*args, **params)
    return out


def _sum_to_shape(x: Array, shape: tuple[int, ...]) -> Array:
    """Sums ``x`` over the axes that numpy broadcasting added to ``shape``."""
    if x.shape == tuple(shape):
        return x
    lead = x.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        lead + i for i, s in enumerate(shape) if s == 1 and x.shape[lead + i] != 1)
    out = jnp.sum(x, axis=axes, keepdims=False) if axes else x
    return jnp.reshape(out, shape)


def _rule_zero_one(entry: _Entry, vals, s_outs, act):
    k_act = [k for k, a in enumerate(act) if a]

    def f(*active_vals):
        args = list(vals)
        for k, v in zip(k_act, active_vals):
            args[k] = v
        out = _bind(entry.prim, entry.params, args)
        return list(out) if entry.prim.multiple_results else out

    _, vjp = jax.vjp(f, *[vals[k] for k in k_act])
    cot = list(s_outs) if entry.prim.multiple_results else s_outs[0]
    grads = vjp(cot)
    res: list[Any] = [None] * len(vals)
    for k, g in zip(k_act, grads):
        res[k] = g
    return res


def _rule_chooser_reduction(entry: _Entry, vals, s_outs, act):
    # Each input feeds exactly one output with coefficient c (1/count at
    # ties, else 0/1): S_x = c * vjp(S_y) = c^2 S_y.
    f = lambda x: _bind(entry.prim, entry.params, [x])  # noqa: E731
    y, vjp = jax.vjp(f, vals[0])
    (c,) = vjp(jnp.ones_like(y))
    (g,) = vjp(s_outs[0])
    return [c * g]


def _tiled_window(params, shape) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(window, out shape) when a reduce_window tiles its input without overlap,
    padding or dilation (max-pool with stride == window), else None."""
    win = tuple(params["window_dimensions"])
    if (tuple(params["window_strides"]) != win
            or any(tuple(p) != (0, 0) for p in params["padding"])
            or any(d != 1 for d in params.get("base_dilation", (1,) * len(win)))
            or any(d != 1 for d in params.get("window_dilation", (1,) * len(win)))):
        return None
    return win, tuple(n // w for n, w in zip(shape, win))


def _rule_pool_route(entry: _Entry, vals, s_outs, act):
    """Max/min-pool: S goes to each window's winner (the first one at ties).

    Non-overlapping windows are handled by a reshape and an argmax, much
    faster on CPU than the generic select-and-scatter of the VJP.
    """
    x = vals[0]
    tiled = _tiled_window(entry.params, x.shape)
    if tiled is None:
        return _rule_zero_one(entry, vals, s_outs, act)
    win, out = tiled
    nd = x.ndim
    xc = x[tuple(slice(0, o * w) for o, w in zip(out, win))]
    split = [d for o, w in zip(out, win) for d in (o, w)]
    perm = tuple(range(0, 2 * nd, 2)) + tuple(range(1, 2 * nd, 2))
    xw = jnp.transpose(xc.reshape(split), perm).reshape(out + (-1,))
    pick = jnp.argmax if entry.prim.name == "reduce_window_max" else jnp.argmin
    onehot = jax.nn.one_hot(pick(xw, axis=-1), xw.shape[-1], dtype=s_outs[0].dtype)
    sw = (onehot * s_outs[0][..., None]).reshape(out + win)
    inv = np.argsort(perm)
    s_x = jnp.transpose(sw, inv).reshape(xc.shape)
    s_x = jnp.pad(s_x, [(0, n - c) for n, c in zip(x.shape, xc.shape)])
    return [s_x]


def _rule_bilinear(entry: _Entry, vals, s_outs, act):
    lhs, rhs = vals
    res: list[Any] = [None, None]
    params = entry.params
    if act[0]:
        rhs_sq = jnp.square(rhs)
        f = lambda a: _bind(entry.prim, params, [a, rhs_sq])  # noqa: E731
        (res[0],) = jax.linear_transpose(f, jax.ShapeDtypeStruct(lhs.shape, lhs.dtype))(s_outs[0])
    if act[1]:
        lhs_sq = jnp.square(lhs)
        f = lambda b: _bind(entry.prim, params, [lhs_sq, b])  # noqa: E731
        (res[1],) = jax.linear_transpose(f, jax.ShapeDtypeStruct(rhs.shape, rhs.dtype))(s_outs[0])
    return res


def _rule_elementwise(entry: _Entry, vals, s_outs, act):
    # Operands that are the same value (x * x) are differentiated together, so
    # their exact partial is squared (4 x^2 for x * x), not each path apart.
    s_y = s_outs[0]
    res: list[Any] = [None] * len(vals)
    groups: dict[int, list[int]] = {}
    for k, (i, a) in enumerate(zip(entry.in_ids, act)):
        if a:
            groups.setdefault(i, []).append(k)
    for ks in groups.values():
        x_k = jnp.asarray(vals[ks[0]])

        def f(v, ks=ks):
            args = list(vals)
            for k in ks:
                args[k] = v
            return _bind(entry.prim, entry.params, args)

        _, d = jax.jvp(f, (x_k,), (jnp.ones_like(x_k),))
        res[ks[0]] = _sum_to_shape(jnp.square(d).astype(s_y.dtype) * s_y, x_k.shape)
    return res


def _rule_maxmin(entry: _Entry, vals, s_outs, act):
    a, b = (jnp.asarray(v) for v in vals)
    s_y = s_outs[0]
    better = jnp.greater if entry.prim.name == "max" else jnp.less
    both = act[0] and act[1]
    # ReLU convention: derivative 0 at the kink against a constant; between two
    # active operands ties go to the first one.
    mask_a = jnp.logical_or(better(a, b), jnp.equal(a, b)) if both else better(a, b)
    mask_b = better(b, a)
    res: list[Any] = [None, None]
    if act[0]:
        res[0] = _sum_to_shape(jnp.where(mask_a, s_y, 0), a.shape)
    if act[1]:
        res[1] = _sum_to_shape(jnp.where(mask_b, s_y, 0), b.shape)
    return res


def _rule_for(name: str) -> Callable | None:
    if name in ("reduce_window_max", "reduce_window_min"):
        return _rule_pool_route
    if name in _ZERO_ONE_LINEAR:
        return _rule_zero_one
    if name in _CHOOSER_REDUCTIONS:
        return _rule_chooser_reduction
    if name in _BILINEAR:
        return _rule_bilinear
    if name in _MAXMIN:
        return _rule_maxmin
    if name in _ELEMENTWISE:
        return _rule_elementwise
    return None


def _unsupported(name: str) -> UnsupportedPrimitiveError:
    return UnsupportedPrimitiveError(
        f"swim: apply_fn uses primitive {name!r} on a path from params to the output, "
        f"and it has no Optimal-Brain-Damage propagation rule. Supported primitives: "
        f"{list(SUPPORTED_PRIMITIVES)}. Use an autodiff estimator instead (hutchinson, "
        f"ggn, fisher), which work for any differentiable model.")


def backward(tape: Tape, out_ids: Sequence[int], out_s: Sequence[Array]) -> dict[int, Array]:
    """Propagates diagonal second derivatives from outputs to every active value.

    Returns a dict ``id -> S`` (ids without an entry received no S).
    """
    s: dict[int, Array] = {}

    def acc(i: int, v: Array) -> None:
        s[i] = v if i not in s else s[i] + v

    for i, v in zip(out_ids, out_s):
        if tape.active[i]:
            acc(i, v)

    for entry in reversed(tape.entries):
        if not any(i in s for i in entry.out_ids):
            continue
        name = entry.prim.name
        if name in _BLOCKING:
            continue
        act = [tape.active[i] for i in entry.in_ids]
        if not any(act):
            continue
        vals = [tape.values[i] for i in entry.in_ids]
        s_outs = []
        for i in entry.out_ids:
            if i in s:
                s_outs.append(s.pop(i))
            else:
                o = tape.values[i]
                s_outs.append(jnp.zeros(np.shape(o), jnp.result_type(o)))
        rule = _rule_for(name)
        if rule is None:
            raise _unsupported(name)
        s_ins = rule(entry, vals, s_outs, act)
        for i, a, v in zip(entry.in_ids, act, s_ins):
            if a and v is not None:
                acc(i, v)
    return s

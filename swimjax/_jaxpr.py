"""The jaxpr machinery shared by the modules that interpret jaxprs
(:mod:`swimjax._obd`, :mod:`swimjax._runbatch`, :mod:`swimjax.crossbar`): the
environment walk (:func:`interpret`), which primitives are calls to inline,
and which are elementwise."""

from __future__ import annotations

from typing import Any

from jax.extend import core as jcore

# Call-like primitives whose body is inlined: name -> param holding the body.
CALL_PARAMS: dict[str, str] = {
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
    "remat2": "jaxpr",
    "checkpoint": "jaxpr",
}

# Differentiable elementwise primitives (numpy-style broadcasting of size-1 /
# rank-0 operands), max/min excluded.
ELEMENTWISE_MATH = frozenset({
    "add", "add_any", "sub", "mul", "div", "neg", "exp", "exp2", "log", "log1p",
    "expm1", "tanh", "logistic", "sqrt", "rsqrt", "cbrt", "integer_pow", "pow",
    "square", "abs", "sign", "erf", "erfc", "erf_inv", "sin", "cos", "tan",
    "atan", "atan2", "sinh", "cosh", "asinh", "acosh", "atanh", "asin", "acos",
    "clamp", "floor", "ceil", "round", "rem", "lgamma", "digamma",
})

MAXMIN = frozenset({"max", "min"})

# Every elementwise primitive: the math ones, max/min, comparisons, logic,
# selection and casts. Their result does not depend on the memory order of
# the operands' axes, as long as all operands share it.
ELEMENTWISE = ELEMENTWISE_MATH | MAXMIN | frozenset({
    "select_n", "convert_element_type", "reduce_precision", "stop_gradient",
    "copy", "copy_p", "eq", "ne", "lt", "le", "gt", "ge", "and", "or", "not",
    "xor", "is_finite", "nextafter", "imag", "real", "conj", "population_count",
    "shift_left", "shift_right_logical", "shift_right_arithmetic",
})


def inner_closed(eqn: Any) -> tuple[Any, list[Any]] | None:
    """(open jaxpr, consts) of an inlinable call primitive, else None."""
    key = CALL_PARAMS.get(eqn.primitive.name)
    if key is None or key not in eqn.params:
        return None
    inner = eqn.params[key]
    if isinstance(inner, jcore.ClosedJaxpr):
        return inner.jaxpr, list(inner.consts)
    if isinstance(inner, jcore.Jaxpr):
        return inner, []
    return None


def sub_jaxprs(value: Any):
    """The (open) jaxprs held by an equation parameter value (a jaxpr, a
    closed jaxpr, or a tuple/list of them, e.g. ``cond``'s branches)."""
    if isinstance(value, jcore.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jcore.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from sub_jaxprs(item)


def iter_eqns(jaxpr: Any):
    """Every equation of ``jaxpr`` and, recursively, of the jaxprs its
    equations hold (call, control-flow and custom-derivative bodies)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in sub_jaxprs(value):
                yield from iter_eqns(sub)


def interpret(jaxpr: Any, consts: Any, args: Any, eval_eqn: Any,
              literal: Any = lambda value: value) -> list[Any]:
    """Evaluates an open ``jaxpr`` on ``args`` with a per-equation rule.

    The environment walk every interpreter of this package needs: constants
    and arguments bound to their variables, literals turned into values by
    ``literal(value)``, and every equation evaluated by ``eval_eqn(eqn,
    in_values, inner)``, which returns the list of output values; ``inner`` is
    ``(open jaxpr, consts)`` of an inlinable call primitive (see
    :func:`inner_closed`), else None, so a rule inlines a call by calling
    :func:`interpret` on it. Values are whatever the interpreter uses (arrays,
    tracers, tape ids, wrappers).

    Returns:
      The values of ``jaxpr.outvars``.
    """
    env: dict[Any, Any] = {}

    def read(var: Any) -> Any:
        if isinstance(var, jcore.Literal):
            return literal(var.val)
        return env[var]

    if len(args) != len(jaxpr.invars):
        raise ValueError(f"jaxpr expects {len(jaxpr.invars)} inputs, got {len(args)}")
    for var, c in zip(jaxpr.constvars, consts):
        env[var] = c
    for var, a in zip(jaxpr.invars, args):
        env[var] = a
    for eqn in jaxpr.eqns:
        outs = eval_eqn(eqn, [read(v) for v in eqn.invars], inner_closed(eqn))
        for var, o in zip(eqn.outvars, outs):
            env[var] = o
    return [read(v) for v in jaxpr.outvars]


def bind(eqn: Any, values: Any) -> list[Any]:
    """``eqn``'s primitive applied to ``values``, always as a list of outputs."""
    outs = eqn.primitive.bind(*values, **eqn.params)
    return list(outs) if eqn.primitive.multiple_results else [outs]

"""Tests for swimjax.quantizers: DAC input quantizers with fixed, PACT and E-PACT bounds."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from swimjax import quantizers as q
from swimjax.quantizers import Bounds, QuantizedInput, QuantizerConfig

# A hand-checkable case: bits=2 (n = 3), lo = -1, hi = 2, so step = 1 and
# every number below is exact in float32. X has entries below lo, on lo,
# inside, on hi and above hi; G is a cotangent of 3 times one power of two per
# entry, so every sum of a subset of G is unique, and the backward pass's
# divisions by n = 3 (step = width / n) are exact too: the hand-computed
# gradients below hold bit for bit.
X = np.array([-3.0, -1.0, -0.25, 0.5, 1.5, 2.0, 5.0], np.float32)
G = 3 * np.array([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0], np.float32)
BELOW, INSIDE, ABOVE = X < -1.0, (X >= -1.0) & (X < 2.0), X >= 2.0
CODES = np.array([0, 0, 1, 2, 2, 3, 3], np.float32)   # 1.5 -> 2 (tie to even), 2.5 -> 2
GX_INSIDE = np.where(INSIDE, G, 0)                     # 3 * (0, 2, 4, 8, 16, 0, 0)


def _cfg(kind="epact", bits=2, lo=-1.0, hi=2.0, signed=True, **kw):
    return QuantizerConfig(kind=kind, bits=bits, lo_init=lo, hi_init=hi, signed=signed, **kw)


def _grads(cfg, x=X, g=G, bounds=None):
    """(dL/dx, dL/dbounds) of L = sum(g * fake_quantize(x))."""
    bounds = q.init_bounds(cfg) if bounds is None else bounds
    return jax.grad(lambda x, b: jnp.sum(g * q.fake_quantize(x, b, cfg)), (0, 1))(x, bounds)


def _reference(x, lo, hi, bits):
    """NumPy float32 reference, the same operations in the same order."""
    x, lo, hi = (np.asarray(a, np.float32) for a in (x, lo, hi))
    n = np.float32(2 ** bits - 1)
    width = hi - lo
    step = width * np.float32(1 / n)
    code = np.round(np.clip((x - lo) * (n / width), np.float32(0), n))
    return code, step, lo + step * code


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(kind="lsq"), r"kind must be one of \['epact', 'fixed', 'pact'\]"),
    (dict(bits=0), r"bits must be an integer in \[1, 16\], got 0"),
    (dict(bits=17), r"bits must be an integer in \[1, 16\], got 17"),
    (dict(bits=8.0), r"bits must be an integer"),
    (dict(bits=True), r"bits must be an integer"),
    (dict(hi_init=0.0), r"hi_init must be > lo_init"),
    (dict(hi_init=-1.0), r"hi_init must be > lo_init"),
    (dict(lo_init=0.5, hi_init=0.5), r"hi_init must be > lo_init"),
    (dict(lo_init=0.0, hi_init=1e-7), r"hi_init must be > lo_init by at least min_width"),
    (dict(hi_init=float("nan")), r"hi_init must be finite"),
    (dict(hi_init=float("inf")), r"hi_init must be finite"),
    (dict(lo_init=float("-inf"), signed=True), r"lo_init must be finite"),
    (dict(hi_init="1.0"), r"hi_init must be a real number"),
    (dict(lo_init=-0.5), r"lo_init must be >= 0 for an unsigned input"),
    (dict(kind="pact", lo_init=0.2), r"lo_init must be 0 for kind='pact' with signed=False"),
    (dict(kind="pact", lo_init=-0.5, signed=True),
     r"lo_init must be -hi_init for kind='pact' with signed=True"),
    (dict(signed=1), r"signed must be a bool"),
    (dict(min_width=0.0), r"min_width must be in \[1e-30, 1e\+30\]"),
    (dict(min_width=float("nan")), r"min_width must be in"),
])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantizerConfig(**kwargs)


@pytest.mark.parametrize("kind, signed, lo, learns", [
    ("fixed", False, 0.0, (False, False)),
    ("pact", False, 0.0, (False, True)),
    ("epact", False, 0.0, (True, True)),
    ("fixed", True, -3.0, (False, False)),
    ("pact", True, -3.0, (False, True)),
    ("epact", True, -3.0, (True, True)),
])
def test_config_defaults(kind, signed, lo, learns):
    cfg = QuantizerConfig(kind=kind, bits=4, hi_init=3, signed=signed)
    assert (cfg.lo_init, cfg.hi_init, cfg.max_code) == (lo, 3.0, 15)
    assert isinstance(cfg.hi_init, float) and isinstance(cfg.lo_init, float)
    assert (cfg.learns_lo, cfg.learns_hi) == learns
    assert hash(cfg) == hash(QuantizerConfig(kind=kind, bits=4, hi_init=3.0, signed=signed))
    assert QuantizerConfig().bits == 7 and QuantizerConfig().kind == "epact"


def test_init_bounds_shapes():
    cfg = _cfg(lo=-0.5, hi=1.5)
    b = q.init_bounds(cfg)
    assert isinstance(b, Bounds) and b.lo.shape == b.hi.shape == ()
    assert b.lo.dtype == b.hi.dtype == jnp.float32 and (float(b.lo), float(b.hi)) == (-0.5, 1.5)
    per_channel = q.init_bounds(cfg, (5,))
    np.testing.assert_array_equal(per_channel.hi, np.full(5, 1.5, np.float32))
    with pytest.raises(ValueError, match=r"shape\[1\] must be an integer in \[1, inf\]"):
        q.init_bounds(cfg, (3, 0))


# ---------------------------------------------------------------------------
# Forward values
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [1, 2, 3, 7, 8, 16])
@pytest.mark.parametrize("kind, signed", [("fixed", False), ("pact", False), ("pact", True),
                                          ("epact", True)])
def test_forward_matches_numpy_reference(bits, kind, signed):
    rng = np.random.default_rng(bits)
    x = rng.normal(0.3, 1.5, size=(64, 9)).astype(np.float32)
    hi = np.float32(rng.uniform(0.5, 2.5))
    lo = {("pact", True): -hi, ("pact", False): np.float32(0)}.get(
        (kind, signed), np.float32(-0.7 if signed else 0.1))
    cfg = QuantizerConfig(kind, bits, float(hi), float(lo), signed)
    out = q.quantize(x, q.init_bounds(cfg), cfg)
    code, step, xq = _reference(x, lo, hi, bits)
    assert isinstance(out, QuantizedInput) and out.code.dtype == jnp.float32
    np.testing.assert_array_equal(out.code, code)
    np.testing.assert_array_equal(out.step, step)
    np.testing.assert_array_equal(out.lo, lo)
    np.testing.assert_array_equal(q.dequantize(out), xq)
    np.testing.assert_array_equal(q.fake_quantize(x, q.init_bounds(cfg), cfg), xq)
    assert code.min() == 0 and code.max() == 2 ** bits - 1   # both ends reached


def test_codes_of_the_hand_case_round_half_to_even():
    out = q.quantize(X, q.init_bounds(_cfg()), _cfg())
    np.testing.assert_array_equal(out.code, CODES)
    ties = q.quantize(np.array([-0.5, 0.5, 1.5], np.float32), Bounds(0.0, 3.0), _cfg(lo=0.0))
    np.testing.assert_array_equal(ties.code, [0, 0, 2])   # 0.5 -> 0, 1.5 -> 2 ...
    ties = q.quantize(np.array([2.5], np.float32), Bounds(0.0, 7.0), _cfg(bits=3, lo=0.0))
    np.testing.assert_array_equal(ties.code, [2])         # ... and 2.5 -> 2


def test_bits_1_is_a_threshold_at_the_midpoint():
    cfg = _cfg(bits=1, lo=-1.0, hi=1.0)
    x = np.array([-5.0, -1.0, -0.01, 0.0, 0.01, 1.0, 5.0], np.float32)
    out = q.quantize(x, q.init_bounds(cfg), cfg)
    np.testing.assert_array_equal(out.code, [0, 0, 0, 0, 1, 1, 1])   # 0.0 is a tie: to 0
    assert float(out.step) == 2.0
    np.testing.assert_array_equal(q.dequantize(out), [-1, -1, -1, -1, 1, 1, 1])


def test_bits_16_codes_are_exact_integers_and_error_within_half_a_step():
    cfg = _cfg(kind="pact", bits=16, lo=0.0, hi=1.0, signed=False)
    x = np.linspace(-0.1, 1.1, 100_003, dtype=np.float32)
    out = q.quantize(x, q.init_bounds(cfg), cfg)
    code = np.asarray(out.code)
    np.testing.assert_array_equal(code, np.round(code))
    assert code.min() == 0 and code.max() == 65535
    inside = (x >= 0) & (x <= 1)
    err = np.abs(np.asarray(q.dequantize(out)) - x)[inside]
    # Half a step, plus float32 rounding of x - lo, the division and lo + step * code.
    assert err.max() <= float(out.step) / 2 + 4 * np.finfo(np.float32).eps


def test_per_channel_bounds_broadcast_on_the_last_axis():
    cfg = _cfg()
    bounds = Bounds(jnp.array([-1.0, 0.0, -2.0]), jnp.array([2.0, 1.0, 0.0]))
    x = np.random.default_rng(0).normal(size=(10, 3)).astype(np.float32)
    out = q.quantize(x, bounds, cfg)
    assert out.code.shape == (10, 3) and out.step.shape == out.lo.shape == (3,)
    for c in range(3):
        code, step, _ = _reference(x[:, c], bounds.lo[c], bounds.hi[c], 2)
        np.testing.assert_array_equal(out.code[:, c], code)
        assert float(out.step[c]) == float(step)


def test_low_precision_input_gives_float32_codes():
    cfg = _cfg()
    out = q.quantize(jnp.asarray(X, jnp.bfloat16), q.init_bounds(cfg), cfg)
    assert out.code.dtype == out.step.dtype == jnp.float32
    np.testing.assert_array_equal(out.code, CODES)


# ---------------------------------------------------------------------------
# Gradients (exact, hand-computed on X, G)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", q.KINDS)
def test_input_gradient_is_straight_through_inside_lo_hi(kind):
    lo, hi = (0.0, 2.0) if kind == "pact" else (-1.0, 2.0)
    cfg = _cfg(kind=kind, lo=lo, hi=hi, signed=kind != "pact")
    gx, _ = _grads(cfg, g=np.ones_like(X))
    # 1 on [lo, hi): x == lo passes, x == hi is clipped (its gradient goes to hi).
    np.testing.assert_array_equal(gx, ((X >= lo) & (X < hi)).astype(np.float32))


def test_epact_bound_gradients_hand_computed():
    gx, gb = _grads(_cfg())
    # dL/dlo = sum of G over x < lo  = G[0]          = 3 * 1
    # dL/dhi = sum of G over x >= hi = G[5] + G[6]   = 3 * (32 + 64)
    # dL/dx  = G inside [lo, hi)                     = 3 * (0, 2, 4, 8, 16, 0, 0)
    assert (float(gb.lo), float(gb.hi)) == (3.0, 288.0)
    np.testing.assert_array_equal(gx, GX_INSIDE)


def test_epact_gradients_hold_through_the_macro_decomposition():
    # The macro computes sum_i w_i x_i as lo * sum_i w_i + step * sum_i w_i code_i.
    # The cotangent of x_i is then w_i: dL/dhi = sum of w over x >= hi, etc.
    cfg = _cfg()
    w = G

    def macro(x, b):
        qx = q.quantize(x, b, cfg)
        return qx.lo * jnp.sum(w) + qx.step * jnp.sum(w * qx.code)

    gx, gb = jax.grad(macro, (0, 1))(X, q.init_bounds(cfg))
    assert (float(gb.lo), float(gb.hi)) == (float(w[BELOW].sum()), float(w[ABOVE].sum()))
    np.testing.assert_array_equal(gx, np.where(INSIDE, w, 0))
    np.testing.assert_array_equal(macro(X, q.init_bounds(cfg)), np.sum(w * (-1.0 + CODES)))


def test_a_plain_straight_through_round_would_differ_from_pact():
    # Why quantize defines its own VJP. Differentiating the decomposition with a
    # plain STE round gives (1) an interior term sum g (code - u) / n to hi
    # (minus it to lo), the step's own dependence on the bounds, and (2) half of
    # the gradient of an input exactly on a bound to each side (jnp.clip ties).
    lo, hi, n = -1.0, 2.0, 3

    def naive(x, b):
        step = (b.hi - b.lo) / n
        u = (jnp.clip(x, b.lo, b.hi) - b.lo) / step
        code = u + jax.lax.stop_gradient(jnp.round(u) - u)
        return jnp.sum(G * (b.lo + step * code))

    gb = jax.grad(naive, 1)(X, Bounds(jnp.float32(lo), jnp.float32(hi)))
    u = (X - lo) / 1.0                                     # step = 1
    extra = np.sum((G * (CODES - u) / n)[INSIDE & (X != lo)])
    assert extra == -3.0                                   # (.25 * 12 + .5 * 24 - .5 * 48) / 3
    # lo: G[0] + half of G[1] (x == lo) - extra; hi: G[6] + half of G[5] (x == hi) + extra.
    assert (float(gb.lo), float(gb.hi)) == (3.0 + 3.0 + 3.0, 192.0 + 48.0 - 3.0)
    _, exact = _grads(_cfg())
    assert (float(exact.lo), float(exact.hi)) == (3.0, 288.0)


def test_step_and_lo_carry_no_gradient():
    # The whole bound gradient flows through the codes (module docstring).
    cfg = _cfg()
    gb = jax.grad(lambda b: jnp.sum(q.quantize(X, b, cfg).step + q.quantize(X, b, cfg).lo))(
        q.init_bounds(cfg))
    assert (float(gb.lo), float(gb.hi)) == (0.0, 0.0)


def test_pact_learns_only_hi():
    cfg = _cfg(kind="pact", lo=0.0, hi=2.0, signed=False)
    gx, gb = _grads(cfg)
    assert (float(gb.lo), float(gb.hi)) == (0.0, 288.0)   # x >= 2: 3 * (32 + 64)
    np.testing.assert_array_equal(gx, 3 * np.array([0, 0, 0, 8, 16, 0, 0]))


def test_signed_pact_ties_lo_to_minus_hi():
    cfg = _cfg(kind="pact", lo=-2.0, hi=2.0, signed=True)
    gx, gb = _grads(cfg, bounds=Bounds(jnp.float32(123.0), jnp.float32(2.0)))   # lo unused
    # dL/dhi = sum G over x >= 2 - sum G over x < -2 = 3 * (96 - 1)
    assert (float(gb.lo), float(gb.hi)) == (0.0, 285.0)
    out = q.quantize(X, Bounds(jnp.float32(123.0), jnp.float32(2.0)), cfg)
    assert float(out.lo) == -2.0
    np.testing.assert_array_equal(gx, GX_INSIDE)


def test_fixed_bounds_get_no_gradient():
    gx, gb = _grads(_cfg(kind="fixed"))
    assert (float(gb.lo), float(gb.hi)) == (0.0, 0.0)
    np.testing.assert_array_equal(gx, GX_INSIDE)


def test_random_case_gradients_match_the_formula():
    # Non-dyadic, per-channel bounds: equal to the formula up to float32
    # rounding of (g * step) / step and of the summation order.
    rng = np.random.default_rng(7)
    x = rng.normal(0.2, 1.3, size=(200, 4)).astype(np.float32)
    g = rng.normal(size=(200, 4)).astype(np.float32)
    lo = np.array([-0.9, -0.3, -1.7, 0.05], np.float32)
    hi = np.array([1.1, 0.7, 2.3, 0.95], np.float32)
    gx, gb = _grads(_cfg(bits=5), x=x, g=g, bounds=Bounds(jnp.asarray(lo), jnp.asarray(hi)))
    np.testing.assert_allclose(gb.lo, np.where(x < lo, g, 0).sum(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gb.hi, np.where(x >= hi, g, 0).sum(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gx, np.where((x >= lo) & (x < hi), g, 0), rtol=1e-6)


def test_crossed_bounds_stay_finite_and_keep_learning():
    cfg = _cfg(min_width=1e-3)
    crossed = Bounds(jnp.float32(1.0), jnp.float32(0.5))   # hi < lo after a bad step
    out = q.quantize(X, crossed, cfg)
    assert float(out.step) == pytest.approx(1e-3 / 3)
    assert np.all(np.isfinite(out.code)) and np.all(np.isfinite(q.dequantize(out)))
    gx, gb = _grads(cfg, bounds=crossed)
    assert all(np.all(np.isfinite(a)) for a in (gx, gb.lo, gb.hi))
    # The clamp is straight-through: hi still gets the inputs above lo + min_width.
    assert float(gb.hi) == float(G[X >= 1.0 + 1e-3].sum())


# ---------------------------------------------------------------------------
# Training the bounds with optax
# ---------------------------------------------------------------------------

def _train(cfg, x, target, steps=50, lr=0.05):
    bounds = q.init_bounds(cfg)
    opt = optax.adam(lr)
    state = opt.init(bounds)

    @jax.jit
    def step(bounds, state):
        loss, grads = jax.value_and_grad(
            lambda b: jnp.mean((q.fake_quantize(x, b, cfg) - target) ** 2))(bounds)
        updates, state = opt.update(grads, state)
        return optax.apply_updates(bounds, updates), state, loss

    losses = []
    for _ in range(steps):
        bounds, state, loss = step(bounds, state)
        losses.append(float(loss))
    return bounds, losses


@pytest.mark.parametrize("kind", ["pact", "epact"])
def test_optax_grows_hi_when_clipped_inputs_are_wanted(kind):
    x = jnp.linspace(0.0, 4.0, 401)
    cfg = QuantizerConfig(kind, bits=4, hi_init=1.0)
    bounds, losses = _train(cfg, x, target=x)
    assert float(bounds.hi) > 2.0 and losses[-1] < 0.2 * losses[0]
    # Post-ReLU inputs: nothing below lo, so lo's gradient is exactly 0 and even
    # Adam (which rescales a tiny rounding residual to a full step) leaves it.
    assert float(bounds.lo) == 0.0


def test_optax_shrinks_hi_when_the_loss_wants_clipping():
    x = jnp.linspace(0.0, 4.0, 401)
    cfg = QuantizerConfig("pact", bits=4, hi_init=3.0)
    bounds, losses = _train(cfg, x, target=jnp.minimum(x, 1.0))
    assert float(bounds.hi) < 1.5 and losses[-1] < losses[0]


def test_optax_epact_moves_both_bounds_outwards_for_signed_inputs():
    x = jnp.linspace(-3.0, 3.0, 601)
    cfg = QuantizerConfig("epact", bits=5, hi_init=0.5, lo_init=-0.5, signed=True)
    bounds, losses = _train(cfg, x, target=x)
    assert float(bounds.lo) < -1.5 and float(bounds.hi) > 1.5 and losses[-1] < 0.2 * losses[0]
    fixed, fixed_losses = _train(QuantizerConfig("fixed", 5, 0.5, -0.5, True), x, target=x)
    assert (float(fixed.lo), float(fixed.hi)) == (-0.5, 0.5) and fixed_losses[-1] == fixed_losses[0]


# ---------------------------------------------------------------------------
# Transformations
# ---------------------------------------------------------------------------

def test_jit_matches_eager_and_grad_of_jit_is_exact():
    cfg = _cfg()
    b = q.init_bounds(cfg)
    eager = q.quantize(X, b, cfg)
    jitted = jax.jit(q.quantize, static_argnums=2)(X, b, cfg)
    for e, j in zip(eager, jitted):
        np.testing.assert_array_equal(e, j)
    # Bit for bit on many inputs and non-dyadic bounds too, inside a larger program.
    x = np.random.default_rng(1).normal(size=(4000,)).astype(np.float32)
    for bits in (3, 8, 16):
        cfg16 = _cfg(bits=bits, lo=-0.7, hi=1.3)
        b16 = q.init_bounds(cfg16)
        fused = jax.jit(lambda x, b: q.quantize(2.0 * x - x, b, cfg16))(x, b16)  # noqa: B023
        for e, j in zip(q.quantize(x, b16, cfg16), fused):
            np.testing.assert_array_equal(e, j)
    loss = jax.jit(lambda x, b: jnp.sum(G * q.fake_quantize(x, b, cfg)))
    gx, gb = jax.grad(loss, (0, 1))(X, b)
    assert (float(gb.lo), float(gb.hi)) == (3.0, 288.0)
    np.testing.assert_array_equal(gx, GX_INSIDE)


def test_vmap_over_inputs_and_over_bounds():
    cfg = _cfg()
    b = q.init_bounds(cfg)
    xs = np.stack([X, X * 0.5, X - 1.0])
    batched = jax.vmap(q.quantize, in_axes=(0, None, None))(xs, b, cfg)
    for i in range(3):
        np.testing.assert_array_equal(batched.code[i], q.quantize(xs[i], b, cfg).code)
    bs = Bounds(jnp.array([-1.0, 0.0, -2.0]), jnp.array([2.0, 3.0, 1.0]))
    per = jax.vmap(lambda bb: _grads(cfg, bounds=bb)[1])(bs)
    for i in range(3):
        one = _grads(cfg, bounds=Bounds(bs.lo[i], bs.hi[i]))[1]
        assert (float(per.lo[i]), float(per.hi[i])) == (float(one.lo), float(one.hi))
    np.testing.assert_array_equal(per.hi, 3 * np.array([96, 64, 112]))   # x >= 2 | 3 | 1


def test_per_example_gradients_under_vmap_sum_to_the_batch_gradient():
    cfg = _cfg()
    b = q.init_bounds(cfg)
    xs = np.stack([X, X[::-1]])
    loss = lambda x, b: jnp.sum(G * q.fake_quantize(x, b, cfg))   # noqa: E731
    per = jax.jit(jax.vmap(jax.grad(loss, 1), in_axes=(0, None)))(xs, b)
    total = jax.grad(lambda b: loss(xs[0], b) + loss(xs[1], b))(b)
    np.testing.assert_array_equal(per.hi.sum(), total.hi)
    np.testing.assert_array_equal(per.hi, [288.0, 9.0])   # reversed: x >= 2 at G[0], G[1]


# ---------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------

def test_calibrate_max_and_percentile():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(1000, 6)).astype(np.float32)
    relu = np.maximum(x, 0)
    unsigned = QuantizerConfig("epact", 7)
    b = q.calibrate(unsigned, relu, method="max")
    assert float(b.lo) == 0.0 and float(b.hi) == pytest.approx(relu.max())
    b = q.calibrate(unsigned, relu, percentile=99.0)
    assert float(b.hi) == pytest.approx(np.percentile(relu, 99.0))
    signed = QuantizerConfig("epact", 7, signed=True)
    b = q.calibrate(signed, x, percentile=99.0)
    assert (float(b.lo), float(b.hi)) == pytest.approx(
        (np.percentile(x, 1.0), np.percentile(x, 99.0)))
    sym = q.calibrate(QuantizerConfig("pact", 7, signed=True), x, method="max")
    assert float(sym.hi) == pytest.approx(np.abs(x).max()) and float(sym.lo) == -float(sym.hi)
    per = q.calibrate(signed, x, method="max", per_channel=True)
    assert per.lo.shape == per.hi.shape == (6,) and per.hi.dtype == jnp.float32
    np.testing.assert_allclose(per.hi, x.max(0))
    np.testing.assert_allclose(per.lo, x.min(0))


def test_calibrate_falls_back_to_the_inits_for_a_dead_channel():
    x = np.ones((50, 3), np.float32) * np.array([0.0, 2.0, 0.0], np.float32)
    x[:, 1] *= np.linspace(0, 1, 50, dtype=np.float32)
    cfg = QuantizerConfig("pact", 4, hi_init=6.0)
    b = q.calibrate(cfg, x, method="max", per_channel=True)
    np.testing.assert_array_equal(b.hi, [6.0, 2.0, 6.0])
    np.testing.assert_array_equal(b.lo, [0.0, 0.0, 0.0])
    assert float(q.calibrate(cfg, np.zeros(10), method="max").hi) == 6.0


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="mse"), r"method must be one of \['max', 'percentile'\]"),
    (dict(percentile=40.0), r"percentile must be in \[50.0, 100.0\]"),
    (dict(percentile=101.0), r"percentile must be in \[50.0, 100.0\]"),
    (dict(x_samples=np.zeros((0, 3))), r"x_samples must be non-empty"),
    (dict(x_samples=np.array([1.0, np.nan])), r"x_samples must be finite"),
    (dict(x_samples=np.float32(1.0), per_channel=True), r"at least 1 axis"),
])
def test_calibrate_rejects_bad_arguments(kwargs, match):
    kwargs = {"x_samples": np.ones((4, 3)), **kwargs}
    with pytest.raises(ValueError, match=match):
        q.calibrate(QuantizerConfig(), **kwargs)

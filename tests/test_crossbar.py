"""Tests of swimjax.crossbar: the macro's multiply-accumulate on any apply_fn.

Exactness: with an ideal periphery the macro is the quantized model (DAC-
quantized inputs times N-bit weights), whatever the array height and whether
inputs are bit-serial; with an ADC it equals an independent NumPy model of
the tiles, cell columns and ADC codes; the error model is sampled per example.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from swimjax import crossbar as cb
from swimjax import mac_error, mapping, models
from swimjax import quantizers as qz

import _rand  # jax.random draws made flat: the same values, compiled fast

QC = qz.QuantizerConfig(kind="epact", bits=4, hi_init=1.5)
IDEAL = cb.MacroConfig(rows=16, dac_bits=4, weight_bits=4, cell_bits=1, adc_bits=None)


def _init(key):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    return {"c1": 0.5 * _rand.normal(k1, (3, 3, 2, 5)),
            "c2": 0.3 * _rand.normal(k2, (5, 5, 2, 2)),   # OIHW, used with NCHW
            "d": 0.2 * jax.random.normal(k3, (5 * 5 * 5, 4)),
            "b": 0.1 * jax.random.normal(k4, (4,))}


def apply_fn(p, x):
    """conv (NHWC, stride 2, SAME) -> ReLU -> conv (NCHW/OIHW, VALID, dilation 2)
    -> ReLU -> dense (weights on the rhs) + bias. No pooling, so gradients are
    compared without max-tie ambiguity."""
    h = lax.conv_general_dilated(x, p["c1"], (2, 2), "SAME",
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = jax.nn.relu(jnp.transpose(h, (0, 3, 1, 2)))                     # NCHW
    h = lax.conv_general_dilated(h, p["c2"], (1, 1), "VALID", rhs_dilation=(2, 2),
                                 dimension_numbers=("NCHW", "OIHW", "NCHW"))
    h = jax.nn.relu(h).reshape(h.shape[0], -1)
    return h @ p["d"] + p["b"]


@pytest.fixture(scope="module")
def problem():
    p = _init(jax.random.key(0))
    x = _rand.uniform(jax.random.key(1), (6, 14, 14, 2), maxval=1.2)
    return p, x


def _quantized_reference(p, x, bounds, cfg, qcfg, paths):
    """The quantized model: fake-quantized inputs times quantized weights (with
    straight-through quantizers), each layer computed by a plain matrix product."""
    def on(eqn, vals, path, ki):
        if path not in paths:
            return None
        x2, w2, back = cb._matrices(eqn, vals, ki)
        xq = qz.fake_quantize(x2, bounds[path], qcfg)
        wq = mapping.quantize(lax.stop_gradient(w2), cfg.mapping_config)
        wq = w2 + lax.stop_gradient(wq - w2)
        return back(jnp.dot(xq, wq, precision="highest")).astype(eqn.outvars[0].aval.dtype)
    return cb._interpret(apply_fn, p, x, on)


def test_layers_found_in_order(problem):
    p, x = problem
    found = cb.layers(apply_fn, p, x)
    assert [(lay.path, lay.kind, lay.contraction, lay.outputs) for lay in found] == [
        ("c1", "conv", 18, 5), ("c2", "conv", 20, 5), ("d", "dense", 125, 4)]
    assert cb.transform(apply_fn, p, x, IDEAL, QC).paths == ("c2",)  # first, last digital
    assert cb.transform(apply_fn, p, x, IDEAL, QC, layers_pattern="c").paths == ("c1", "c2")
    lenet = models.get_model("lenet")
    v = lenet.init(jax.random.key(0))
    paths = cb.transform(lenet.apply_fn, v, jnp.zeros((1, 28, 28, 1)), IDEAL, QC).paths
    assert paths == ("params/Conv_1/kernel", "params/Dense_0/kernel", "params/Dense_1/kernel")


@pytest.mark.parametrize("rows", [3, 16, 64])
@pytest.mark.parametrize("bit_serial", [False, True])
def test_ideal_periphery_is_the_quantized_model(problem, rows, bit_serial):
    """Values and gradients (weights, inputs' bounds) of the quantized model,
    whatever the array height R (tiling) and bit-serial or not."""
    p, x = problem
    cfg = cb.MacroConfig(rows=rows, dac_bits=4, bit_serial=bit_serial, weight_bits=4,
                         cell_bits=2, adc_bits=None)
    ma = cb.transform(apply_fn, p, x, cfg, QC, layers_pattern=".")
    bounds = {k: qz.Bounds(jnp.float32(0.1), jnp.float32(0.9)) for k in ma.paths}
    y = jax.jit(ma.fn)(p, bounds, x)
    ref = _quantized_reference(p, x, bounds, cfg, QC, ma.paths)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)
    assert not np.allclose(ref, apply_fn(p, x), atol=1e-3)  # quantization does matter

    def loss(f):
        return lambda pp, bb: jnp.sum(jnp.sin(3 * f(pp, bb)))
    g = jax.jit(jax.grad(loss(lambda pp, bb: ma.fn(pp, bb, x)), argnums=(0, 1)))(p, bounds)
    gr = jax.jit(jax.grad(loss(lambda pp, bb: _quantized_reference(pp, x, bb, cfg, QC, ma.paths)),
                          argnums=(0, 1)))(p, bounds)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(gr)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert any(float(jnp.abs(b.hi)) > 0 for b in g[1].values())


def _numpy_macro(x2, w2, lo, hi, cfg, bits):
    """Independent NumPy model of one macro matrix product with an ADC."""
    n = 2 ** bits - 1
    step = (hi - lo) / n
    code = np.clip(np.round((np.clip(x2, lo, hi) - lo) / step), 0, n)
    max_q = 2 ** cfg.weight_bits - 1
    s = np.max(np.abs(w2))
    q = np.clip(np.round(np.abs(w2) / s * max_q), 0, max_q).astype(int)
    m, S = cfg.cell_bits, cfg.n_slices
    k, o = w2.shape
    y = np.zeros((x2.shape[0], o))
    lsb = cfg.adc_range * cfg.rows * n * (2 ** m - 1) / (2 ** cfg.adc_bits - 1)
    for sign, part in ((1, w2 > 0), (-1, w2 < 0)):
        for i in range(S):  # LSB first here
            level = (q >> (m * i)) & (2 ** m - 1)
            level = np.where(part, level, 0)
            for t0 in range(0, k, cfg.rows):
                ps = code[:, t0:t0 + cfg.rows] @ level[t0:t0 + cfg.rows]
                c = np.clip(np.round(ps / lsb), 0, 2 ** cfg.adc_bits - 1)
                y += sign * 2 ** (m * i) * c * lsb
    wq = np.sign(w2) * q * s / max_q
    return y * step * s / max_q + lo * wq.sum(0)


def test_adc_matches_an_independent_numpy_model():
    rng = np.random.default_rng(0)
    x2 = rng.uniform(-0.2, 1.3, (9, 70)).astype(np.float32)
    w2 = rng.normal(size=(70, 6)).astype(np.float32)
    cfg = cb.MacroConfig(rows=32, dac_bits=4, weight_bits=6, cell_bits=2, adc_bits=5,
                         adc_range=0.3)
    qc = qz.QuantizerConfig(kind="epact", bits=4, hi_init=1.0, lo_init=-0.1, signed=True)
    b = qz.Bounds(jnp.float32(-0.1), jnp.float32(1.0))
    y = cb.macro_matmul(jnp.asarray(x2), jnp.asarray(w2), b, cfg, qc)
    ref = _numpy_macro(x2.astype(np.float64), w2.astype(np.float64), -0.1, 1.0, cfg, 4)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=2e-5, atol=2e-5)
    ideal = cb.macro_matmul(jnp.asarray(x2), jnp.asarray(w2), b,
                            cb.MacroConfig(rows=32, dac_bits=4, weight_bits=6, cell_bits=2,
                                           adc_bits=None), qc)
    assert np.max(np.abs(np.asarray(y) - np.asarray(ideal))) > 1e-2  # the ADC does matter


def test_identity_error_model_changes_nothing_and_noise_is_per_example(problem):
    p, x = problem
    cfg = cb.MacroConfig(rows=16, dac_bits=4, weight_bits=4, cell_bits=1, adc_bits=6)
    plain = cb.transform(apply_fn, p, x, cfg, QC, layers_pattern=".")
    bounds = cb.init_bounds(plain.paths, QC)
    keys = jax.random.split(jax.random.key(3), x.shape[0])
    ident = mac_error.from_table(np.eye(64))
    same = cb.transform(apply_fn, p, x, cfg, QC, error_model=ident, layers_pattern=".")
    np.testing.assert_allclose(jax.jit(same.fn)(p, bounds, x, keys),
                               jax.jit(plain.fn)(p, bounds, x), rtol=1e-6, atol=1e-6)
    noisy = cb.transform(apply_fn, p, x, cfg, QC, layers_pattern=".",
                         error_model=mac_error.synthetic(jax.random.key(4), 64, "severe"))
    f = jax.jit(noisy.fn)
    full = f(p, bounds, x, keys)
    assert not np.allclose(full, plain.fn(p, bounds, x))
    # an example's readouts depend on its key only, not on the batch around it
    np.testing.assert_allclose(f(p, bounds, x[2:5], keys[2:5]), full[2:5], rtol=1e-5,
                               atol=1e-5)  # same draws; float rounding of other batch shapes
    other = f(p, bounds, x, jax.random.split(jax.random.key(9), x.shape[0]))
    assert not np.array_equal(other, full)


def _materialized_adc(planes, levels, lsb, n_codes, model, gradient, keys, batch):
    """Reference of crossbar's ADC stage written with plain autodiff: every
    partial sum kept, the readout's derivative the error model's slope (or 1)
    where the ADC does not saturate."""
    psum = jnp.einsum("pmtr,zitro->pmtzio", planes, levels, precision=lax.Precision.HIGHEST)
    u = psum / lsb
    r = jnp.round(u)
    bank = cb.column_banks(model, levels.shape[1], levels.shape[-1])
    read = cb._sample_per_example(jnp.clip(r, 0, n_codes - 1), model, keys, batch, bank)
    factor = ((r >= 0) & (r <= n_codes - 1)).astype(u.dtype)
    if gradient == "statistical":
        factor = factor * mac_error.readout_slope_at(r, model, bank)
    code = lax.stop_gradient(read) + lax.stop_gradient(factor) * (u - lax.stop_gradient(u))
    w = jnp.asarray([[[4.0, 2.0, 1.0], [-4.0, -2.0, -1.0]]] * planes.shape[0])
    return jnp.einsum("pmtzio,pzi->mo", code * lsb, w, precision=lax.Precision.HIGHEST)


def test_column_banks_spread_a_differential_pair_over_two_adcs():
    model = mac_error.synthetic(jax.random.key(0), 32, "mild", n_banks=16)
    banks = cb.column_banks(model, 4, 5)                     # (sign, slice, output)
    assert banks.shape == (2, 4, 5)
    # columns numbered output-major (o * 2 + sign) * S + slice, ADC = column mod 16
    assert banks[0, 0, 0] == 0 and banks[1, 0, 0] == 4 and banks[0, 3, 1] == 11
    assert banks[1, 3, 1] == 15 and banks[0, 0, 2] == 0
    assert np.all(banks[0] != banks[1])
    assert cb.column_banks(mac_error.synthetic(jax.random.key(0), 32, "mild"), 4, 5) is None


@pytest.mark.parametrize("gradient, n_banks", [("statistical", None), ("ste", None),
                                               ("statistical", 4)])
def test_adc_backward_recomputes_what_autodiff_keeps(gradient, n_banks):
    """The ADC stage's custom backward (partial sums recomputed, not kept)
    gives autodiff's gradients of the materialized stage, and the same
    forward; saturating partial sums (above code 31) get no gradient."""
    rng = np.random.default_rng(1)
    n_codes, lsb, batch = 32, 1.0, 3
    planes = rng.integers(0, 8, (2, 6, 3, 8))                                # (P, M, T, R)
    planes[:, 0] = 0                                                         # zero sums
    planes = jnp.asarray(planes, jnp.float32)
    levels = jnp.asarray(rng.integers(0, 2, (2, 3, 3, 8, 5)), jnp.float32)  # (2, S, T, R, O)
    model = mac_error.synthetic(jax.random.key(4), n_codes, "severe", compression=0.5,
                                gain_std=0.1, n_banks=n_banks)
    keys = jax.random.split(jax.random.key(5), batch)
    weights = np.asarray([[[4.0, 2.0, 1.0], [-4.0, -2.0, -1.0]]] * 2, np.float32)
    adc = cb._Adc(lsb, n_codes, gradient, batch, weights.tobytes())
    cot = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)

    def loss(f):
        return lambda pl, lv: jnp.sum(f(pl, lv) * cot)

    got = jax.value_and_grad(loss(lambda pl, lv: cb._adc_shift_add(adc, pl, lv, model, keys)),
                             argnums=(0, 1))(planes, levels)
    want = jax.value_and_grad(loss(lambda pl, lv: _materialized_adc(
        pl, lv, lsb, n_codes, model, gradient, keys, batch)), argnums=(0, 1))(planes, levels)
    psum = np.einsum("pmtr,zitro->pmtzio", planes, levels)
    assert (psum / lsb >= n_codes - 0.5).any() and (psum == 0).any()   # both ends exercised
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    for g, h in zip(got[1], want[1]):
        np.testing.assert_allclose(g, h, rtol=1e-5, atol=1e-4)


def test_statistical_and_straight_through_gradients(problem):
    p, x = problem
    cfg = cb.MacroConfig(rows=16, dac_bits=4, weight_bits=4, cell_bits=1, adc_bits=6)
    em = mac_error.synthetic(jax.random.key(4), 64, "severe")
    keys = jax.random.split(jax.random.key(3), x.shape[0])
    grads = {}
    for gname in ("statistical", "ste"):
        ma = cb.transform(apply_fn, p, x, cfg, QC, error_model=em, gradient=gname,
                          layers_pattern=".")
        b = cb.init_bounds(ma.paths, QC)
        fwd = ma.fn(p, b, x, keys)
        grads[gname] = (fwd, jax.grad(lambda pp: jnp.sum(ma.fn(pp, b, x, keys) ** 2))(p))
    np.testing.assert_array_equal(grads["statistical"][0], grads["ste"][0])  # same forward
    gs, gt = grads["statistical"][1], grads["ste"][1]
    assert all(np.all(np.isfinite(a)) for a in jax.tree.leaves(gs))
    assert not np.allclose(gs["c1"], gt["c1"])


@pytest.mark.parametrize("kwargs, match", [
    (dict(rows=0), "rows"), (dict(adc_bits=0), "adc_bits"), (dict(adc_range=0.0), "adc_range"),
    (dict(adc_range=1.5), "adc_range"), (dict(dac_bits=0), "dac_bits"),
    (dict(cell_bits=5, weight_bits=4), "cell_bits"), (dict(scale="per_row"), "scale"),
])
def test_bad_macro_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cb.MacroConfig(**kwargs)


def test_bad_transform_arguments(problem):
    p, x = problem
    cfg = cb.MacroConfig(rows=16, dac_bits=4, adc_bits=6)
    with pytest.raises(ValueError, match="dac_bits"):
        cb.transform(apply_fn, p, x, cfg, qz.QuantizerConfig(bits=7))
    with pytest.raises(ValueError, match="has 128 codes but the 6-bit ADC has 64"):
        cb.transform(apply_fn, p, x, cfg, QC,
                     error_model=mac_error.synthetic(jax.random.key(0), 128))
    with pytest.raises(ValueError, match="needs an ADC"):
        cb.transform(apply_fn, p, x, IDEAL, QC,
                     error_model=mac_error.synthetic(jax.random.key(0), 64))
    with pytest.raises(ValueError, match="matches no kernel"):
        cb.transform(apply_fn, p, x, cfg, QC, layers_pattern="nothing")
    with pytest.raises(ValueError, match="gradient"):
        cb.transform(apply_fn, p, x, cfg, QC, gradient="reinforce")
    noisy = cb.transform(apply_fn, p, x, cfg, QC,
                         error_model=mac_error.synthetic(jax.random.key(0), 64))
    with pytest.raises(ValueError, match="keys"):
        noisy.fn(p, cb.init_bounds(noisy.paths, QC), x)
    with pytest.raises(ValueError, match="missing"):
        noisy.fn(p, {}, x, jax.random.split(jax.random.key(0), x.shape[0]))
    with pytest.raises(ValueError, match="preset"):
        cb.preset("sram9000")
    assert cb.preset("dnat").rows == 64 and cb.preset("dnat").adc_bits == 7


def test_calibrated_bounds_follow_each_layers_inputs(problem):
    p, x = problem
    paths = ("c1", "c2", "d")
    qc = qz.QuantizerConfig(kind="epact", bits=4, hi_init=1.0)
    b = cb.calibrate_bounds(apply_fn, p, x, paths, qc, method="max")
    assert float(b["c1"].hi) == pytest.approx(float(jnp.max(x)), rel=1e-6)  # the raw input
    assert all(float(b[k].lo) == 0.0 and float(b[k].hi) > 0 for k in paths)
    with pytest.raises(ValueError, match="not kernel matrix products"):
        cb.calibrate_bounds(apply_fn, p, x, ("zz",), qc)

"""Tests of swimjax.sensitivity: each estimator against an independent reference.

References: hand-written Optimal-Brain-Damage recursions in float64 NumPy (swim),
full Jacobians and jax.hessian (ggn, hessian_diag), closed-form variances
(hutchinson, Monte-Carlo Fisher).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from scipy import stats

from swimjax import _obd
from swimjax import sensitivity as sens

C = 5  # classes


# ---------------------------------------------------------------- models


def rng(seed):
    return np.random.default_rng(seed)


def mlp_init(seed, d=6, h=8, c=C):
    r = rng(seed)
    f = lambda *shape: jnp.asarray(r.standard_normal(shape), jnp.float32)  # noqa: E731
    return {"w1": f(d, h) / np.sqrt(d), "b1": 0.1 * f(h), "w2": f(h, c) / np.sqrt(h),
            "b2": 0.1 * f(c)}


def mlp_apply(p, x):
    return jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def linear_apply(p, x):
    return x @ p["w"] + p["b"]


class ConvPoolLinear(nn.Module):
    """conv 3x3 SAME -> eval batch norm -> ReLU -> 2x2 pool -> dense."""

    pool: str = "max"
    classes: int = C

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(3, (3, 3), padding="SAME")(x)
        x = nn.BatchNorm(use_running_average=True)(x)
        x = nn.relu(x)
        pool = nn.max_pool if self.pool == "max" else nn.avg_pool
        x = pool(x, (2, 2), (2, 2))
        return nn.Dense(self.classes)(x.reshape(x.shape[0], -1))


def conv_model(seed, pool="max", hw=6, cin=2):
    model = ConvPoolLinear(pool=pool)
    r = rng(seed)
    f = lambda *shape: jnp.asarray(r.standard_normal(shape), jnp.float32)  # noqa: E731
    variables = {
        "params": {"Conv_0": {"kernel": f(3, 3, cin, 3) / 3.0, "bias": 0.1 * f(3)},
                   "BatchNorm_0": {"scale": 1.0 + 0.3 * f(3), "bias": 0.1 * f(3)},
                   "Dense_0": {"kernel": f((hw // 2) ** 2 * 3, C) / 4.0, "bias": 0.1 * f(C)}},
        "batch_stats": {"BatchNorm_0": {"mean": 0.1 * f(3),
                                        "var": jnp.asarray(0.5 + r.uniform(size=3), jnp.float32)}}}
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, hw, hw, cin)))
    assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(variables)
    return model.apply, variables


def data(seed, n, shape, c=C):
    r = rng(seed)
    return (jnp.asarray(r.standard_normal((n,) + shape), jnp.float32),
            jnp.asarray(r.integers(0, c, n), jnp.int32))


def flat(tree):
    return np.concatenate([np.ravel(np.asarray(a, np.float64))
                           for a in jax.tree_util.tree_leaves(tree)])


def softmax64(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


# ------------------------------------------------ swim vs hand-written OBD


def test_swim_matches_numpy_obd_two_layer_network():
    p = mlp_init(0)
    x, y = data(1, 40, (6,))
    got = sens.swim(None, mlp_apply, p, sens.make_batches(x, y, 16), normalize=False)

    P = {k: np.asarray(a, np.float64) for k, a in p.items()}
    X = np.asarray(x, np.float64)
    pre = X @ P["w1"] + P["b1"]
    a = np.maximum(pre, 0)
    prob = softmax64(a @ P["w2"] + P["b2"])
    s_z = prob * (1 - prob) / len(X)                  # mean loss
    s_w2 = (a ** 2).T @ s_z
    s_a = s_z @ (P["w2"] ** 2).T
    s_pre = s_a * (pre > 0)
    want = {"w1": (X ** 2).T @ s_pre, "b1": s_pre.sum(0), "w2": s_w2, "b2": s_z.sum(0)}
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=1e-10, err_msg=k)

    # SWIM's normalization: S on w / max|W| for the mapped (2-D) leaves only.
    normed = sens.swim(None, mlp_apply, p, sens.make_batches(x, y, 16), normalize=True)
    for k in want:
        scale = np.abs(P[k]).max() ** 2 if P[k].ndim >= 2 else 1.0
        np.testing.assert_allclose(normed[k], want[k] * scale, rtol=2e-5, atol=1e-10, err_msg=k)
    np.testing.assert_allclose(flat(sens.to_weight_units(normed, p)), flat(got), rtol=1e-5)


def _np_conv_same(x, k):
    """NHWC x, HWIO k, SAME, stride 1. Returns y and the padded input."""
    kh, kw = k.shape[:2]
    xp = np.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    h, w = x.shape[1:3]
    y = np.zeros(x.shape[:3] + (k.shape[3],))
    for i in range(kh):
        for j in range(kw):
            y += np.einsum("bhwc,co->bhwo", xp[:, i:i + h, j:j + w], k[i, j])
    return y, xp


@pytest.mark.parametrize("pool,cin", [("max", 2), ("avg", 2), ("max", 1)])
def test_swim_matches_numpy_obd_conv_pool_linear(pool, cin):
    apply_fn, variables = conv_model(2, pool=pool, cin=cin)
    x, y = data(3, 12, (6, 6, cin))
    got = sens.swim(None, apply_fn, variables, (x[None], y[None]), normalize=False)["params"]

    V = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), variables)
    pr, st = V["params"], V["batch_stats"]["BatchNorm_0"]
    X = np.asarray(x, np.float64)
    conv, xp = _np_conv_same(X, pr["Conv_0"]["kernel"])
    conv = conv + pr["Conv_0"]["bias"]
    gain = pr["BatchNorm_0"]["scale"] / np.sqrt(st["var"] + 1e-5)
    bn = (conv - st["mean"]) * gain + pr["BatchNorm_0"]["bias"]
    r = np.maximum(bn, 0)
    b, h, w, c = r.shape
    win = r.reshape(b, h // 2, 2, w // 2, 2, c)
    pooled = win.max(axis=(2, 4)) if pool == "max" else win.mean(axis=(2, 4))
    f = pooled.reshape(b, -1)
    prob = softmax64(f @ pr["Dense_0"]["kernel"] + pr["Dense_0"]["bias"])
    s_z = prob * (1 - prob) / b
    want_dense = (f ** 2).T @ s_z
    s_f = (s_z @ (pr["Dense_0"]["kernel"] ** 2).T).reshape(pooled.shape)
    if pool == "max":   # route to the winner
        flat_win = win.transpose(0, 1, 3, 5, 2, 4).reshape(b, h // 2, w // 2, c, 4)
        onehot = np.eye(4)[flat_win.argmax(-1)]
        s_r = (onehot * s_f[..., None]).reshape(b, h // 2, w // 2, c, 2, 2)
        s_r = s_r.transpose(0, 1, 4, 2, 5, 3).reshape(b, h, w, c)
    else:               # y = mean of 4: coefficient 1/4, squared 1/16
        s_r = np.repeat(np.repeat(s_f, 2, axis=1), 2, axis=2) / 16.0
    s_bn = s_r * (bn > 0)
    s_conv = s_bn * gain ** 2
    kh, kw = pr["Conv_0"]["kernel"].shape[:2]
    want_kernel = np.zeros_like(pr["Conv_0"]["kernel"])
    for i in range(kh):
        for j in range(kw):
            want_kernel[i, j] = np.einsum("bhwc,bhwo->co", xp[:, i:i + h, j:j + w] ** 2, s_conv)
    np.testing.assert_allclose(got["Dense_0"]["kernel"], want_dense, rtol=2e-5, atol=1e-10)
    np.testing.assert_allclose(got["Dense_0"]["bias"], s_z.sum(0), rtol=2e-5, atol=1e-10)
    np.testing.assert_allclose(got["Conv_0"]["kernel"], want_kernel, rtol=2e-5, atol=1e-10)
    np.testing.assert_allclose(got["Conv_0"]["bias"], s_conv.sum((0, 1, 2)), rtol=2e-5,
                               atol=1e-10)
    np.testing.assert_allclose(got["BatchNorm_0"]["scale"],
                               (s_bn * ((conv - st["mean"]) / np.sqrt(st["var"] + 1e-5)) ** 2
                                ).sum((0, 1, 2)), rtol=2e-5, atol=1e-10)


def test_swim_same_operand_twice_is_differentiated_exactly():
    # h * h and h ** 2 are the same function: OBD squares d(h*h)/dh = 2h, not
    # each operand's partial apart (which would give 2 h^2 instead of 4 h^2).
    p = mlp_init(33)
    x, y = data(34, 16, (6,))
    def sq_mul(q, xx):
        h = xx @ q["w1"]
        return (h * h) @ q["w2"] + q["b2"]

    def sq_pow(q, xx):
        return ((xx @ q["w1"]) ** 2) @ q["w2"] + q["b2"]

    b = (x[None], y[None])
    np.testing.assert_allclose(flat(sens.swim(None, sq_mul, p, b)),
                               flat(sens.swim(None, sq_pow, p, b)), rtol=1e-5)


def test_swim_equals_ggn_for_linear_softmax():
    r = rng(4)
    p = {"w": jnp.asarray(r.standard_normal((7, C)), jnp.float32),
         "b": jnp.asarray(0.1 * r.standard_normal(C), jnp.float32)}
    x, y = data(5, 30, (7,))
    batches = sens.make_batches(x, y, 8)
    s = sens.swim(None, linear_apply, p, batches, normalize=False)
    g = sens.ggn(None, linear_apply, p, batches)
    np.testing.assert_allclose(flat(s), flat(g), rtol=1e-5, atol=1e-12)


def test_swim_last_layer_equals_ggn_and_batching_invariant():
    # Nothing is dropped for the last linear layer: OBD == exact GGN there.
    apply_fn, variables = conv_model(6)
    x, y = data(7, 20, (6, 6, 2))
    s8 = sens.swim(None, apply_fn, variables, sens.make_batches(x, y, 8), normalize=False)
    s20 = sens.swim(None, apply_fn, variables, (x[None], y[None]), normalize=False)
    pairs = [(x[i:i + 5], y[i:i + 5]) for i in range(0, 20, 5)]
    s_list = sens.swim(None, apply_fn, variables, pairs, normalize=False)
    np.testing.assert_allclose(flat(s8), flat(s20), rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(flat(s_list), flat(s20), rtol=1e-5, atol=1e-12)
    g = sens.ggn(None, apply_fn, variables, sens.make_batches(x, y, 8))
    for leaf in ("kernel", "bias"):
        np.testing.assert_allclose(s20["params"]["Dense_0"][leaf], g["params"]["Dense_0"][leaf],
                                   rtol=1e-5, atol=1e-12)


def test_swim_custom_loss_matches_default_and_first_order_term():
    p = mlp_init(8)
    x, y = data(9, 24, (6,))
    b = sens.make_batches(x, y, 12)

    def my_ce(logits, labels):  # same loss, written differently: autodiff path
        return jax.nn.logsumexp(logits, -1) - jnp.sum(jax.nn.one_hot(labels, C) * logits, -1)

    np.testing.assert_allclose(flat(sens.swim(None, mlp_apply, p, b, my_ce)),
                               flat(sens.swim(None, mlp_apply, p, b)), rtol=1e-5, atol=1e-12)
    # first_order: |S + 2 * sum_b mean-batch gradient / N|, on w / max|W|.
    s = sens.swim(None, mlp_apply, p, b, normalize=True)
    fo = sens.swim(None, mlp_apply, p, b, normalize=True, first_order=True)
    fo_w = sens.swim(None, mlp_apply, p, b, first_order=True)   # per unit weight
    np.testing.assert_allclose(flat(sens.to_weight_units(fo, p)), flat(fo_w), rtol=1e-5)
    mean_loss = lambda q, xb, yb: jnp.mean(sens.softmax_cross_entropy(mlp_apply(q, xb), yb))
    g = jax.tree_util.tree_map(lambda a, c: a + c, jax.grad(mean_loss)(p, x[:12], y[:12]),
                               jax.grad(mean_loss)(p, x[12:], y[12:]))
    for k in p:
        scale = float(jnp.max(jnp.abs(p[k]))) if p[k].ndim >= 2 else 1.0
        np.testing.assert_allclose(fo[k], np.abs(s[k] + 2 * g[k] * scale / 24), rtol=1e-5,
                                   atol=1e-9)


@pytest.mark.parametrize("dn,xs,ks,pad,stride,dil", [
    (("NHWC", "HWIO", "NHWC"), (3, 9, 8, 1), (3, 3, 1, 4), ((1, 1), (1, 1)), (1, 1), (1, 1)),
    (("NCHW", "OIHW", "NCHW"), (3, 1, 9, 8), (4, 1, 3, 2), ((2, 0), (1, 3)), (2, 1), (1, 2)),
    (("NHWC", "HWIO", "NHWC"), (2, 10, 10, 1), (5, 5, 1, 3), ((0, 0), (0, 0)), (3, 3), (1, 1)),
])
def test_single_channel_conv_rewrite_equals_lax_conv(dn, xs, ks, pad, stride, dil):
    # swim evaluates 1-input-channel convolutions as shifted products on CPU
    r = rng(30)
    x = jnp.asarray(r.standard_normal(xs), jnp.float32)
    k = jnp.asarray(r.standard_normal(ks), jnp.float32)

    def conv(a, b):
        return lax.conv_general_dilated(a, b, stride, pad, rhs_dilation=dil, dimension_numbers=dn)

    params = jax.make_jaxpr(conv)(x, k).jaxpr.eqns[0].params
    np.testing.assert_allclose(_obd._conv_single_input_channel(x, k, params), conv(x, k),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,window", [((2, 7, 9, 3), (1, 2, 2, 1)),
                                          ((2, 6, 6, 2), (1, 3, 2, 1))])
def test_pool_routing_equals_select_and_scatter(shape, window):
    # the reshape/argmax routing of non-overlapping max-pools == JAX's VJP
    x = jnp.asarray(rng(31).standard_normal(shape), jnp.float32)   # no ties
    pool = lambda a: lax.reduce_window(a, -jnp.inf, lax.max, window, window, "VALID")  # noqa
    eqn = jax.make_jaxpr(pool)(x).jaxpr.eqns[0]
    s_y = jnp.asarray(rng(32).uniform(size=pool(x).shape), jnp.float32)
    entry = _obd._Entry(eqn.primitive, dict(eqn.params), [0], [1])
    (fast,) = _obd._rule_pool_route(entry, [x], [s_y], [True])
    (ref,) = _obd._rule_zero_one(entry, [x], [s_y], [True])
    np.testing.assert_array_equal(fast, ref)


# ------------------------------------------------------- ggn, hessian_diag


def _ggn_from_full_jacobian(apply_fn, params, x, y):
    return np.asarray(jax.jit(_ggn_full, static_argnums=0)(apply_fn, params, x, y))


def _ggn_full(apply_fn, params, x, y):
    f0, unravel = jax.flatten_util.ravel_pytree(params)
    jac = jax.jacrev(lambda f: apply_fn(unravel(f), x))(f0)        # (B, C, P)
    prob = jax.nn.softmax(apply_fn(params, x))
    h = jax.vmap(jnp.diag)(prob) - prob[:, :, None] * prob[:, None, :]
    return jnp.einsum("bcp,bcd,bdp->p", jac, h, jac) / x.shape[0]


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_ggn_equals_full_jacobian_gauss_newton(model):
    if model == "mlp":
        apply_fn, params = mlp_apply, mlp_init(10)
        x, y = data(11, 24, (6,))
    else:
        apply_fn, params = conv_model(12)
        x, y = data(13, 10, (6, 6, 2))
    got = sens.ggn(None, apply_fn, params, sens.make_batches(x, y, 7), chunk_size=3)
    want = _ggn_from_full_jacobian(apply_fn, params, x, y)
    np.testing.assert_allclose(flat(got), want, rtol=2e-4, atol=1e-6 * np.abs(want).max())


def test_ggn_custom_loss_uses_psd_square_root():
    p = mlp_init(14)
    x, y = data(15, 16, (6,))
    b = sens.make_batches(x, y, 8)
    my_ce = lambda z, t: -jnp.sum(jax.nn.log_softmax(z) * jax.nn.one_hot(t, C), -1)  # noqa: E731
    np.testing.assert_allclose(flat(sens.ggn(None, mlp_apply, p, b, my_ce)),
                               flat(sens.ggn(None, mlp_apply, p, b)), rtol=1e-4, atol=1e-9)


def test_hessian_diag_equals_jax_hessian():
    p = mlp_init(16, d=4, h=5, c=3)
    x, y = data(17, 20, (4,), c=3)
    got = sens.hessian_diag(None, mlp_apply, p, sens.make_batches(x, y, 6), chunk_size=16)
    f0, unravel = jax.flatten_util.ravel_pytree(p)
    loss = lambda f: jnp.mean(sens.softmax_cross_entropy(mlp_apply(unravel(f), x), y))  # noqa
    want = np.diag(np.asarray(jax.jit(jax.hessian(loss))(f0)))
    np.testing.assert_allclose(flat(got), want, rtol=1e-4, atol=1e-6 * np.abs(want).max())


# ------------------------------------------------------------- hutchinson


def test_hutchinson_error_falls_like_inverse_sqrt_k_and_ranks_like_hessian():
    p = mlp_init(18, d=5, h=6, c=4)
    x, y = data(19, 32, (5,), c=4)
    batches = (x[None], y[None])
    f0, unravel = jax.flatten_util.ravel_pytree(p)
    loss = lambda f: jnp.mean(sens.softmax_cross_entropy(mlp_apply(unravel(f), x), y))  # noqa
    hess = np.asarray(jax.jit(jax.hessian(loss))(f0), np.float64)
    diag = np.diag(hess)
    off2 = (hess ** 2).sum() - (diag ** 2).sum()    # E||est - diag||^2 = off2 / k
    n_rep = 8
    for k in (4, 64):
        errs = [np.sum((flat(sens.hutchinson(jax.random.key(100 * k + r), mlp_apply, p, batches,
                                              n_probes=k, probe_batch=k)) - diag) ** 2)
                for r in range(n_rep)]
        ratio = np.mean(errs) * k / off2
        # mean of n_rep squared errors, each a sum over ~70 weakly dependent
        # entries: generous bounds, but a 1/k (not 1/sqrt(k)) or biased
        # estimator fails them by far.
        assert 0.6 < ratio < 1.5, (k, ratio)
    est = sens.hutchinson(jax.random.key(7), mlp_apply, p, batches, n_probes=2048,
                          probe_batch=256)
    assert stats.spearmanr(flat(est), diag).statistic >= 0.9
    # Per-batch probes: still unbiased for the full-data diagonal.
    est2 = sens.hutchinson(jax.random.key(8), mlp_apply, p, sens.make_batches(x, y, 8),
                           n_probes=2048, probe_batch=256, probes="per_batch")
    assert stats.spearmanr(flat(est2), diag).statistic >= 0.9


# ------------------------------------------------------------------ fisher


def test_monte_carlo_fisher_is_unbiased_for_ggn():
    p = mlp_init(20, d=4, h=5, c=3)
    x, y = data(21, 12, (4,), c=3)
    n_s = 256
    got = flat(sens.fisher(jax.random.key(22), mlp_apply, p, (x[None], y[None]),
                           n_samples=n_s))
    # Exact per-label gradients: g_ic = J_i^T (p_i - e_c); E_c[g^2] = GGN_i.
    f0, unravel = jax.flatten_util.ravel_pytree(p)
    per_label = jax.jit(jax.vmap(jax.vmap(
        lambda xi, c: jax.grad(lambda f: sens.softmax_cross_entropy(
            mlp_apply(unravel(f), xi[None]), c[None])[0])(f0), (None, 0)), (0, None)))(
        x, jnp.arange(3))                                            # (B, C, P)
    prob = np.asarray(jax.nn.softmax(mlp_apply(p, x)), np.float64)
    g2 = np.asarray(per_label, np.float64) ** 2
    mean_i = np.einsum("bc,bcp->bp", prob, g2)
    var_i = np.einsum("bc,bcp->bp", prob, g2 ** 2) - mean_i ** 2
    want = mean_i.mean(0)
    se = np.sqrt(var_i.sum(0) / n_s) / len(x)
    np.testing.assert_allclose(want, _ggn_from_full_jacobian(mlp_apply, p, x, y), rtol=1e-4,
                               atol=1e-7)
    z = (got - want) / np.maximum(se, 1e-12)
    assert np.all(np.abs(z[se > 0]) < 6.0), np.abs(z).max()
    assert np.all(np.abs(got[se == 0] - want[se == 0]) < 1e-6)
    # Batching does not change the Monte-Carlo Fisher (keys follow the example).
    got_b = flat(sens.fisher(jax.random.key(22), mlp_apply, p, sens.make_batches(x, y, 5),
                             n_samples=n_s))
    np.testing.assert_allclose(got_b, got, rtol=1e-5, atol=1e-9)


def test_empirical_fisher_and_gradient():
    p = mlp_init(23)
    x, y = data(24, 18, (6,))
    b = sens.make_batches(x, y, 4)
    ef = sens.score("empirical_fisher", None, mlp_apply, p, b)
    per_ex = jax.jit(jax.vmap(lambda xi, yi: jax.grad(lambda q: sens.softmax_cross_entropy(
        mlp_apply(q, xi[None]), yi[None])[0])(p)))(x, y)
    want = jax.tree_util.tree_map(lambda g: jnp.mean(g ** 2, 0), per_ex)
    np.testing.assert_allclose(flat(ef), flat(want), rtol=1e-5, atol=1e-10)
    gr = sens.score("gradient", None, mlp_apply, p, b)
    full = jax.grad(lambda q: jnp.mean(sens.softmax_cross_entropy(mlp_apply(q, x), y)))(p)
    np.testing.assert_allclose(flat(gr), np.abs(flat(full)), rtol=1e-4, atol=1e-7)


def test_baselines_magnitude_random_saliency():
    p = mlp_init(25)
    x, y = data(26, 10, (6,))
    b = (x[None], y[None])
    np.testing.assert_array_equal(flat(sens.score("magnitude_raw", None, None, p)),
                                  np.abs(flat(p)))
    # SWIM's magnitude: relative to each mapped leaf's max; biases keep |w|
    want = {k: np.abs(a) / np.abs(a).max() if a.ndim >= 2 else np.abs(a) for k, a in p.items()}
    mag = sens.score("magnitude", None, None, p)
    np.testing.assert_allclose(flat(mag), flat(want), rtol=2e-7)
    assert float(jnp.max(mag["w1"])) == float(jnp.max(mag["w2"])) == 1.0
    r1 = sens.score("random", jax.random.key(1), None, p)
    r2 = sens.score("random", jax.random.key(1), None, p)
    r3 = sens.score("random", jax.random.key(2), None, p)
    np.testing.assert_array_equal(flat(r1), flat(r2))
    assert not np.array_equal(flat(r1), flat(r3))
    assert 0 <= flat(r1).min() and flat(r1).max() < 1
    # Kolmogorov-Smirnov against U(0, 1): 102 values, reject only if p < 1e-4.
    assert stats.kstest(flat(r1), "uniform").pvalue > 1e-4
    sal = sens.score("saliency", None, mlp_apply, p, b)
    h = sens.swim(None, mlp_apply, p, b, normalize=False)
    np.testing.assert_allclose(flat(sal), flat(h) * flat(p) ** 2, rtol=1e-6)
    # SWIM's reference form S_{w_hat} * w_hat^2 gives the same numbers.
    hn = sens.swim(None, mlp_apply, p, b, normalize=True)
    ref = {k: hn[k] * (p[k] / jnp.max(jnp.abs(p[k]))) ** 2 if p[k].ndim >= 2
           else hn[k] * p[k] ** 2 for k in p}
    np.testing.assert_allclose(flat(sal), flat(ref), rtol=1e-5, atol=1e-12)


# ------------------------------------- SWIM's reference score and per-channel scales


def _np_scale(w, scale):
    """max|W| per tensor, or per output channel (last axis, keepdims)."""
    a = np.abs(w)
    return a.max(axis=tuple(range(w.ndim - 1)), keepdims=True) if scale == "per_channel" \
        else a.max()


def _np_swim_reference(p, x, y, batch, scale):
    """SWIM's reference ranking score |S + 2 g| on max-normalized weights, float64.

    As its code does it: weights w_hat = w / s with the layer output multiplied
    by s; S summed over examples by the OBD recursion (softmax-CE p(1-p),
    squared coefficients, ReLU mask); g the sum over batches of the gradient of
    each batch's MEAN loss (the last batch may be shorter); then S + 2g.
    """
    P = {k: np.asarray(a, np.float64) for k, a in p.items()}
    s1, s2 = _np_scale(P["w1"], scale), _np_scale(P["w2"], scale)
    w1h, w2h = P["w1"] / s1, P["w2"] / s2
    X, Y = np.asarray(x, np.float64), np.asarray(y)
    S1, S2 = np.zeros_like(w1h), np.zeros_like(w2h)
    G1, G2 = np.zeros_like(w1h), np.zeros_like(w2h)
    for i in range(0, len(X), batch):
        xb, yb = X[i:i + batch], Y[i:i + batch]
        pre = (xb @ w1h) * s1 + P["b1"]
        a = np.maximum(pre, 0)
        prob = softmax64((a @ w2h) * s2 + P["b2"])
        s_z = prob * (1 - prob)
        S2 += (a ** 2).T @ s_z * s2 ** 2
        s_pre = (s_z @ ((w2h * s2) ** 2).T) * (pre > 0)
        S1 += (xb ** 2).T @ s_pre * s1 ** 2
        dz = (prob - np.eye(C)[yb]) / len(xb)
        G2 += a.T @ dz * s2
        dpre = (dz @ (w2h * s2).T) * (pre > 0)
        G1 += xb.T @ dpre * s1
    return {"w1": S1 + 2 * G1, "w2": S2 + 2 * G2}


def _top(score, k):
    out = np.zeros(score.size, bool)
    out[np.argsort(-score, kind="stable")[:k]] = True
    return out


@pytest.mark.parametrize("scale", ["per_tensor", "per_channel"])
def test_swim_grad_with_weight_sigmas_selects_swims_reference_weights(scale):
    from swimjax import perturbation, selection
    p = mlp_init(40, d=6, h=8)
    p = {**p, "w1": 20.0 * p["w1"], "w2": 0.05 * p["w2"]}   # very different layer scales
    x, y = data(41, 30, (6,))
    batch = 4     # 30 = 7 * 4 + 2: the last batch is short (padded here, short there)
    ref = _np_swim_reference(p, x, y, batch, scale)
    raw = np.concatenate([ref["w1"].ravel(), ref["w2"].ravel()])
    assert np.any(raw < 0)                          # the first-order term matters here
    # The sweep's rule for curvature methods: h in weight units, per-layer
    # (per-channel) sigmas proportional to the scale.
    h = sens.score("swim_grad", None, mlp_apply, p, sens.make_batches(x, y, batch), scale=scale)
    assert all(np.all(np.asarray(a) >= 0) for a in jax.tree_util.tree_leaves(h))
    cfg = perturbation.VariationConfig(sigma_d=0.2, sigma_wv=0.03, scale=scale)
    su, sv = perturbation.weight_sigmas(p, cfg)
    n = raw.size
    signed_differs = False
    for budget in (0.05, 0.1, 0.2, 0.5, 0.8):
        k = int(np.floor(budget * n + 0.5))
        mask = selection.select(h, budget, sigma_unverified=su, sigma_verified=sv, params=p)
        got = np.concatenate([np.ravel(mask["w1"]), np.ravel(mask["w2"])])
        np.testing.assert_array_equal(got, _top(np.abs(raw), k), err_msg=str(budget))
        signed_differs |= not np.array_equal(got, _top(raw, k))
        assert not np.any(mask["b1"]) and not np.any(mask["b2"])
    assert signed_differs    # SWIM ranks |S + 2g|, not S + 2g
    # the same scores on the normalized weights, in the reference's units / N
    hn = sens.swim_grad(None, mlp_apply, p, sens.make_batches(x, y, batch), normalize=True,
                        scale=scale)
    for k in ("w1", "w2"):
        np.testing.assert_allclose(hn[k], np.abs(ref[k]) / len(x), rtol=2e-5, atol=1e-9)
    np.testing.assert_allclose(flat(sens.to_weight_units(hn, p, scale=scale)), flat(h),
                               rtol=1e-5, atol=1e-12)


def test_swim_normalize_and_to_weight_units_use_the_mapping_scale():
    p = mlp_init(42)
    p = {**p, "w2": p["w2"].at[:, 1].set(0.0)}      # an all-zero output channel
    x, y = data(43, 16, (6,))
    b = (x[None], y[None])
    s_w = sens.swim(None, mlp_apply, p, b)
    for scale in ("per_tensor", "per_channel"):
        hn = sens.swim(None, mlp_apply, p, b, normalize=True, scale=scale)
        for k in p:
            a = np.asarray(p[k], np.float64)
            s2 = _np_scale(a, scale) ** 2 if a.ndim >= 2 else 1.0
            np.testing.assert_allclose(hn[k], np.asarray(s_w[k]) * s2, rtol=1e-6, atol=1e-12,
                                       err_msg=f"{scale} {k}")
        back = sens.to_weight_units(hn, p, scale=scale)
        want = {**s_w, "w2": s_w["w2"].at[:, 1].set(0.0)} if scale == "per_channel" else s_w
        np.testing.assert_allclose(flat(back), flat(want), rtol=1e-5, atol=1e-12)
    # per-tensor and per-channel normalizations differ (else this test shows nothing)
    assert not np.allclose(sens.swim(None, mlp_apply, p, b, normalize=True)["w1"],
                           sens.swim(None, mlp_apply, p, b, normalize=True,
                                     scale="per_channel")["w1"])
    # the all-zero channel: magnitude 0, first-order weight-unit score = S_w
    m = sens.magnitude(params=p, scale="per_channel")
    assert np.all(np.asarray(m["w2"][:, 1]) == 0)
    np.testing.assert_array_equal(np.asarray(m["w2"]).max(0), [1, 0, 1, 1, 1])
    g = sens.swim_grad(None, mlp_apply, p, b, scale="per_channel")
    np.testing.assert_allclose(g["w2"][:, 1], s_w["w2"][:, 1], rtol=1e-6)


def test_method_registry_and_scale_option():
    names = sens.available_methods()
    for m in ("swim", "swim_grad", "magnitude", "magnitude_raw"):
        assert m in names
    assert "magnitude_raw" in sens.BASELINE_METHODS and "magnitude" in sens.BASELINE_METHODS
    assert "swim_grad" not in sens.BASELINE_METHODS     # ranked as a curvature
    assert set(sens.SCALE_METHODS) <= set(names) - {"magnitude_raw"}
    p = mlp_init(44)
    x, y = data(45, 8, (6,))
    for m in sens.SCALE_METHODS:
        sens.score(m, None, mlp_apply, p, (x[None], y[None]), scale="per_channel")
        with pytest.raises(ValueError, match=r"scale must be one of \['per_channel', "
                                             r"'per_tensor'\], got 'layer'"):
            sens.score(m, None, mlp_apply, p, (x[None], y[None]), scale="layer")
    with pytest.raises(ValueError, match="scale must be one of"):
        sens.to_weight_units(p, p, scale=None)
    # saliency with SWIM's first-order estimator: |S_w + 2 g_w / (N s)| w^2
    sal = sens.saliency(None, mlp_apply, p, (x[None], y[None]), estimator="swim_grad",
                        normalize=True)
    h = sens.swim_grad(None, mlp_apply, p, (x[None], y[None]))
    np.testing.assert_allclose(flat(sal), flat(h) * flat(p) ** 2, rtol=1e-6)


# -------------------------------------------------------------- bad input


def test_unknown_method_lists_the_allowed_names():
    with pytest.raises(ValueError, match=r"method must be one of .*'hutchinson'.*'swim'"):
        sens.score("obd", None, mlp_apply, mlp_init(0), None)


def test_mismatched_batch_dims_raise():
    p = mlp_init(0)
    x, y = jnp.zeros((2, 8, 6)), jnp.zeros((2, 7), jnp.int32)
    with pytest.raises(ValueError, match="batches: x and y must have the same"):
        sens.swim(None, mlp_apply, p, (x, y))
    with pytest.raises(ValueError, match="same number of examples"):
        sens.make_batches(jnp.zeros((9, 6)), jnp.zeros((8,), jnp.int32), 4)
    with pytest.raises(ValueError, match="leading axes"):
        sens.ggn(None, mlp_apply, p, (jnp.zeros((8, 6)), jnp.zeros((8,), jnp.int32)))
    with pytest.raises(ValueError, match="weights w"):
        sens.hutchinson(jax.random.key(0), mlp_apply, p,
                        (jnp.zeros((2, 8, 6)), jnp.zeros((2, 8), jnp.int32), jnp.ones((2, 7))))
    with pytest.raises(ValueError, match="same shapes"):
        sens.swim(None, mlp_apply, p, [(jnp.zeros((4, 6)), jnp.zeros((4,), jnp.int32)),
                                       (jnp.zeros((3, 6)), jnp.zeros((3,), jnp.int32))])


@pytest.mark.parametrize("op,name", [(jnp.sort, "sort"), (lambda h: lax.cumsum(h, axis=1),
                                                            "cumsum")])
def test_unsupported_primitive_is_named(op, name):
    p = mlp_init(0)

    def apply_fn(q, x):
        return op(jax.nn.relu(x @ q["w1"] + q["b1"])) @ q["w2"] + q["b2"]

    x, y = data(1, 8, (6,))
    with pytest.raises(sens.UnsupportedPrimitiveError, match=f"'{name}'"):
        sens.swim(None, apply_fn, p, (x[None], y[None]))
    # the autodiff estimators handle the same model
    assert np.all(np.isfinite(flat(sens.ggn(None, apply_fn, p, (x[None], y[None])))))


def test_primitive_on_data_only_needs_no_rule():
    p = mlp_init(0)
    apply_fn = lambda q, x: mlp_apply(q, jnp.sort(x, axis=-1))  # noqa: E731
    x, y = data(1, 8, (6,))
    got = sens.swim(None, apply_fn, p, (x[None], y[None]), normalize=False)
    want = sens.swim(None, mlp_apply, p, (jnp.sort(x, -1)[None], y[None]), normalize=False)
    np.testing.assert_allclose(flat(got), flat(want), rtol=1e-6)


def test_other_bad_inputs():
    p = mlp_init(0)
    x, y = data(1, 8, (6,))
    b = (x[None], y[None])
    with pytest.raises(ValueError, match="n_probes"):
        sens.hutchinson(jax.random.key(0), mlp_apply, p, b, n_probes=0)
    with pytest.raises(ValueError, match="max_params"):
        sens.hessian_diag(None, mlp_apply, p, b, max_params=10)
    with pytest.raises(ValueError, match="sample_fn"):
        sens.fisher(jax.random.key(0), mlp_apply, p, b, loss=sens.softmax_cross_entropy)
    with pytest.raises(ValueError, match="floating"):
        sens.swim(None, mlp_apply, {**p, "step": jnp.zeros((), jnp.int32)}, b)
    with pytest.raises(ValueError, match="selected"):
        sens.swim(None, mlp_apply, p, b, selected={"w1": True})
    with pytest.raises(ValueError, match="per-example losses"):
        sens.gradient(None, mlp_apply, p, b, loss=lambda z, t: jnp.sum(z))


# ------------------------------------------------------------------ ggn_sampled


def test_ggn_sampled_exact_when_every_class_is_taken():
    p = mlp_init(30)
    x, y = data(31, 16, (6,))
    b = sens.make_batches(x, y, 8)
    exact = flat(sens.ggn(None, mlp_apply, p, b))
    for top in (C - 1, C):   # the last class by P_rest alone, or all of them
        got = flat(sens.ggn_sampled(jax.random.key(0), mlp_apply, p, b, top=top))
        np.testing.assert_allclose(got, exact, rtol=2e-5, atol=1e-9)


def test_ggn_sampled_is_unbiased_and_ranks_like_the_exact_ggn():
    """Averaged over keys it converges to the exact diagonal (z-scores from the
    spread over keys); one key already ranks the weights as the exact one does
    on a small conv model (Spearman >= 0.99); batching does not change it."""
    p = mlp_init(32, d=4, h=5, c=4)
    x, y = data(33, 24, (4,), c=4)
    b = (x[None], y[None])
    exact = flat(sens.ggn(None, mlp_apply, p, b))
    draws = np.stack([flat(sens.ggn_sampled(jax.random.key(k), mlp_apply, p, b))
                      for k in range(48)])
    mean, se = draws.mean(0), draws.std(0, ddof=1) / np.sqrt(len(draws))
    z = (mean - exact) / np.maximum(se, 1e-12)
    assert np.all(np.abs(z[se > 1e-9]) < 5.0), np.abs(z).max()
    assert np.all(np.abs(mean[se <= 1e-9] - exact[se <= 1e-9]) < 1e-6)

    apply_fn, variables = conv_model(34)
    xc, yc = data(35, 256, (6, 6, 2))
    bc = sens.make_batches(xc, yc, 64)
    ref = flat(sens.ggn(None, apply_fn, variables, bc))
    got = flat(sens.ggn_sampled(jax.random.key(1), apply_fn, variables, bc))
    assert stats.spearmanr(got, ref).statistic >= 0.99
    got_b = flat(sens.ggn_sampled(jax.random.key(1), apply_fn, variables,
                                  sens.make_batches(xc, yc, 32)))
    np.testing.assert_allclose(got_b, got, rtol=1e-4, atol=1e-9)


def test_ggn_sampled_rejects_bad_options():
    p = mlp_init(36)
    x, y = data(37, 4, (6,))
    with pytest.raises(ValueError, match="top \\+ samples"):
        sens.ggn_sampled(jax.random.key(0), mlp_apply, p, (x[None], y[None]), top=0, samples=0)
    with pytest.raises(ValueError, match="loss"):
        sens.ggn_sampled(jax.random.key(0), mlp_apply, p, (x[None], y[None]),
                         loss=sens.softmax_cross_entropy)
    with pytest.raises(ValueError, match="key"):
        sens.ggn_sampled(None, mlp_apply, p, (x[None], y[None]))
    assert "ggn_sampled" in sens.available_methods()


def test_ggn_sampled_taps_equal_per_example_vjps():
    """The per-example gradients from one batched backward pass (taps) give
    the estimate of one vector-Jacobian product per example and column: the
    same draws, equal up to float rounding (an MLP, and LeNet's conv, pool,
    dense and bias layers, where ReLU's custom derivative at 0 must be kept:
    zero biases put ties at 0)."""
    from swimjax import models
    p = mlp_init(40)
    x, y = data(41, 40, (6,))
    lenet = models.get_model("lenet")
    variables = lenet.init(jax.random.key(42))   # zero biases: ReLU ties at 0
    xl, yl = data(43, 24, (28, 28, 1))
    xl = jnp.maximum(xl, 0.0)                     # blank pixels, as digits have
    for fn, params, b in ((mlp_apply, p, sens.make_batches(x, y, 16)),
                          (lenet.apply_fn, variables, sens.make_batches(xl, yl, 12))):
        taps = flat(sens.ggn_sampled(jax.random.key(3), fn, params, b, per_example="taps"))
        vjp = flat(sens.ggn_sampled(jax.random.key(3), fn, params, b, per_example="vjp"))
        np.testing.assert_allclose(taps, vjp, rtol=2e-5, atol=1e-9 * np.abs(vjp).max())
        assert np.all(vjp >= 0) and np.abs(vjp).max() > 0


def test_ggn_sampled_falls_back_where_taps_cannot_follow():
    """Batch norm's scale meets the running variance before any data: "taps"
    says so, "auto" uses the per-example products (same numbers as "vjp")."""
    apply_fn, variables = conv_model(44)
    x, y = data(45, 16, (6, 6, 2))
    b = sens.make_batches(x, y, 8)
    with pytest.raises(ValueError, match="several parameter leaves"):
        sens.ggn_sampled(jax.random.key(0), apply_fn, variables, b, per_example="taps")
    auto = flat(sens.ggn_sampled(jax.random.key(0), apply_fn, variables, b))
    vjp = flat(sens.ggn_sampled(jax.random.key(0), apply_fn, variables, b, per_example="vjp"))
    np.testing.assert_array_equal(auto, vjp)
    with pytest.raises(ValueError, match="per_example must be one of"):
        sens.ggn_sampled(jax.random.key(0), apply_fn, variables, b, per_example="loop")

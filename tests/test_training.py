"""Tests of swimjax.training: optimizers, determinism, accuracy, noise injection."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from swimjax import data as D
from swimjax import training as T
from swimjax.models import Model, get_model
from swimjax.models.resnet import CifarResNet

import _rand  # jax.random draws made flat: the same values, compiled fast


@pytest.fixture(scope="module")
def digits() -> D.Dataset:
    return D.load()


@pytest.fixture(scope="module")
def small_digits(digits) -> D.Dataset:
    return D.Dataset(digits.x_train[:512], digits.y_train[:512], digits.x_test,
                     digits.y_test, num_classes=10, name="digits512")


SMALL = T.TrainConfig(epochs=1, batch_size=32)


def _leaves_equal(a, b) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def kernel_noise(sigma: float):
    """Additive SWIM-like noise: N(0, (sigma * max|W|)^2) on every kernel (ndim >= 2)."""
    def perturb_fn(key, variables, state=None):
        leaves, tree = jax.tree_util.tree_flatten(variables)
        keys = jax.random.split(key, len(leaves))
        out = [w + sigma * jnp.max(jnp.abs(w)) * _rand.normal(k, w.shape) if w.ndim >= 2
               else w for k, w in zip(keys, leaves)]
        return jax.tree_util.tree_unflatten(tree, out)
    return perturb_fn


def test_config_validation():
    for kwargs, match in [(dict(optimizer="rmsprop"), "optimizer"),
                          (dict(learning_rate=0.0), "learning_rate"),
                          (dict(momentum=1.0), "momentum"),
                          (dict(weight_decay=-1e-4), "weight_decay"),
                          (dict(schedule="step"), "schedule"),
                          (dict(epochs=0), "epochs"),
                          (dict(batch_size=0), "batch_size")]:
        with pytest.raises(ValueError, match=match):
            T.TrainConfig(**kwargs)


def test_default_configs_follow_swim():
    lenet = T.default_config("lenet")
    assert (lenet.optimizer, lenet.learning_rate, lenet.schedule) == ("adam", 1e-3, "constant")
    res = T.default_config("resnet18", epochs=3)
    assert (res.optimizer, res.momentum, res.weight_decay, res.schedule, res.epochs) == (
        "sgd", 0.9, 5e-4, "cosine", 3)
    with pytest.raises(ValueError, match="model_name"):
        T.default_config("mlp")


def test_sgd_update_matches_the_formula():
    """Two SGD steps with momentum mu, weight decay wd and a cosine schedule."""
    cfg = T.TrainConfig(optimizer="sgd", learning_rate=0.1, momentum=0.9, weight_decay=5e-4,
                        schedule="cosine")
    tx = cfg.make_optimizer(total_steps=4)
    p = {"w": jnp.array([1.0, -2.0])}
    g = {"w": jnp.array([0.5, 0.25])}
    state = tx.init(p)
    u1, state = tx.update(g, state, p)
    p1 = optax.apply_updates(p, u1)
    u2, state = tx.update(g, state, p1)
    b1 = g["w"] + 5e-4 * p["w"]
    np.testing.assert_allclose(u1["w"], -0.1 * b1, rtol=1e-6)
    lr2 = 0.1 * 0.5 * (1 + np.cos(np.pi * 1 / 4))
    b2 = 0.9 * b1 + g["w"] + 5e-4 * p1["w"]
    np.testing.assert_allclose(u2["w"], -lr2 * b2, rtol=1e-5)


def test_evaluate_accuracy_with_a_partial_last_batch():
    w = jnp.eye(3)
    apply_fn = lambda params, x: x @ params  # noqa: E731
    x = np.eye(3, dtype=np.float32)[np.arange(7) % 3]
    y = np.array([0, 1, 2, 0, 1, 0, 2])  # predictions 0,1,2,0,1,2,0: 5 of 7 correct
    for bs in (1, 3, 4, 100):
        assert T.evaluate_accuracy(apply_fn, w, x, y, batch_size=bs) == pytest.approx(5 / 7)
    with pytest.raises(ValueError, match="same number"):
        T.evaluate_accuracy(apply_fn, w, x, y[:3])


def test_training_is_deterministic_in_the_key(small_digits):
    model = get_model("lenet")
    a, hist_a = T.train(jax.random.key(0), model, small_digits, SMALL, progress=False)
    b, hist_b = T.train(jax.random.key(0), model, small_digits, SMALL, progress=False)
    c, _ = T.train(jax.random.key(1), model, small_digits, SMALL, progress=False)
    assert _leaves_equal(a, b)
    assert hist_a[0]["train_loss"] == hist_b[0]["train_loss"]
    assert not _leaves_equal(a, c)
    assert set(hist_a[0]) == {"epoch", "train_loss", "train_acc", "test_acc", "seconds"}


def test_lenet_reaches_90_percent_on_the_offline_digits(digits, capsys):
    model = get_model("lenet")
    cfg = T.TrainConfig(epochs=3, batch_size=32)
    t0 = time.perf_counter()
    variables, history = T.train(jax.random.key(0), model, digits, cfg, progress=False)
    seconds = time.perf_counter() - t0
    acc = T.evaluate_accuracy(model.apply_fn, variables, digits.x_test, digits.y_test)
    with capsys.disabled():
        print(f"\nLeNet, 3 epochs on 4,000 digits: test acc {acc:.4f} in {seconds:.1f} s "
              f"(incl. compilation)")
    assert acc == history[-1]["test_acc"]
    assert acc > 0.90
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_noise_injection_trains_at_perturbed_weights(small_digits):
    model = get_model("lenet")
    seen = []

    def checked(key, variables, state):
        seen.append(jax.tree.structure(variables))  # traced once per compilation
        return kernel_noise(0.1)(key, variables)

    clean, _ = T.train(jax.random.key(0), model, small_digits, SMALL, progress=False)
    noisy, hist = T.train(jax.random.key(0), model, small_digits, SMALL, perturbation=checked,
                          progress=False)
    ident, _ = T.train(jax.random.key(0), model, small_digits, SMALL,
                       perturbation=lambda k, v, s: v, progress=False)
    # the perturbation receives the full variables pytree, as apply_fn does
    assert seen and seen[0] == jax.tree.structure(clean)
    assert all(np.all(np.isfinite(np.asarray(w))) for w in jax.tree.leaves(noisy))
    # noise changes the trajectory; biases (never perturbed) change too, via the gradients
    for name in ("Conv_0", "Dense_2"):
        for leaf in ("kernel", "bias"):
            assert not np.allclose(noisy["params"][name][leaf], clean["params"][name][leaf])
    # a perturbation that does nothing reproduces clean training (straight-through is exact)
    for x, y in zip(jax.tree.leaves(ident), jax.tree.leaves(clean)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
    assert hist[0]["test_acc"] > 0.5  # still learns under 10% weight noise


def test_straight_through_gradient_is_taken_at_the_perturbed_point():
    w = jnp.array([1.0, -2.0, 3.0])
    delta = jnp.array([0.5, 0.1, -1.0])
    loss = lambda p: 0.5 * jnp.sum(T.straight_through(p, p + delta) ** 2)  # noqa: E731
    np.testing.assert_allclose(jax.grad(loss)(w), w + delta, rtol=1e-6)
    assert float(loss(w)) == pytest.approx(0.5 * float(jnp.sum((w + delta) ** 2)))


def _tiny_images(n_train: int, n_test: int) -> D.Dataset:
    """Two classes of 8x8x3 images told apart by their mean brightness."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, n_train + n_test)
    x = (rng.uniform(0, 0.5, (n_train + n_test, 8, 8, 3)) + 0.4 * y[:, None, None, None])
    x = x.astype(np.float32)
    return D.Dataset(x[:n_train], y[:n_train], x[n_train:], y[n_train:], 2, "tiny")


def test_batchnorm_model_trains_with_sgd_and_updates_running_stats():
    build = lambda fold: CifarResNet(stage_features=(4, 8), blocks_per_stage=1,  # noqa: E731
                                     stem_features=4, num_classes=2, fold=fold)
    model = Model("small_resnet", 2, (8, 8, 3), build(False), build(True), True)
    data = _tiny_images(64, 32)
    cfg = T.default_config("resnet20", epochs=3, batch_size=16)
    variables, history = T.train(jax.random.key(0), model, data, cfg, progress=True)
    init = model.init(jax.random.split(jax.random.key(0), 3)[0])
    assert set(variables) == {"params", "batch_stats"}
    mean0 = np.asarray(init["batch_stats"]["stem"]["bn"]["mean"])
    mean1 = np.asarray(variables["batch_stats"]["stem"]["bn"]["mean"])
    assert np.all(mean0 == 0) and np.all(np.abs(mean1) > 0)
    assert len(history) == 3
    assert all(np.all(np.isfinite(np.asarray(w))) for w in jax.tree.leaves(variables))
    # an easy task: the BN network learns it in inference mode too
    assert history[-1]["test_acc"] > 0.8


def test_frozen_batch_norm_trains_in_inference_mode():
    """frozen_batch_norm: the running statistics stay as they were, the
    loss is the inference-mode network's, scale/bias and kernels still learn."""
    build = lambda fold: CifarResNet(stage_features=(4, 8), blocks_per_stage=1,  # noqa: E731
                                     stem_features=4, num_classes=2, fold=fold)
    model = Model("small_resnet_frozen", 2, (8, 8, 3), build(False), build(True), True)
    data = _tiny_images(64, 32)
    start, _ = T.train(jax.random.key(0), model, data,
                       T.default_config("resnet20", epochs=1, batch_size=16), progress=False)
    cfg = T.default_config("resnet20", epochs=1, batch_size=16, learning_rate=0.01,
                           frozen_batch_norm=True)
    tuned, hist = T.train(jax.random.key(1), model, data, cfg, progress=False,
                          init_variables=start)
    assert _leaves_equal(tuned["batch_stats"], start["batch_stats"])
    assert not _leaves_equal(tuned["params"], start["params"])
    params, state = start["params"], {"batch_stats": start["batch_stats"]}
    tx, step = T._make_train_step(model, cfg, 1, None, T.resolve_conv_lowering("auto"))
    x, y = data.x_train[:16], data.y_train[:16]
    loss = step(params, tx.init(params), state, x, y, jax.random.key(2), np.int32(0), None)[3]
    np.testing.assert_allclose(loss, T.cross_entropy(model.apply_fn(start, x), y), rtol=1e-5)
    with pytest.raises(ValueError, match="frozen_batch_norm must be True or False"):
        T.TrainConfig(frozen_batch_norm="yes")


def test_diverging_training_stops_with_a_clear_error(small_digits):
    """A rate that blows the weights up ends the run with an error naming
    the epoch and the learning rate, not with non-finite weights returned."""
    cfg = T.TrainConfig(optimizer="sgd", learning_rate=1e12, epochs=2, batch_size=128)
    with pytest.raises(ValueError,
                       match=r"diverged in epoch 1.*lower learning_rate \(now 1e\+12\)"):
        T.train(jax.random.key(0), get_model("lenet"), small_digits, cfg, progress=False)


def test_incompatible_data_is_rejected(small_digits):
    with pytest.raises(ValueError, match="expects"):
        T.train(jax.random.key(0), get_model("convnet"), small_digits, SMALL, progress=False)
    with pytest.raises(ValueError, match="batch_size must be <="):
        T.train(jax.random.key(0), get_model("lenet"), small_digits,
                T.TrainConfig(batch_size=1024), progress=False)
    with pytest.raises(ValueError, match="only 2 outputs"):
        T.train(jax.random.key(0), get_model("lenet", num_classes=2), small_digits, SMALL,
                progress=False)


def test_swimjax_perturbation_plugs_in(small_digits):
    """The evaluation's own perturbation function drives noise-injection training."""
    perturbation = pytest.importorskip("swimjax.perturbation")
    model = get_model("lenet")
    variables = model.init(jax.random.key(0))
    mask = jax.tree.map(lambda w: jnp.zeros(w.shape, bool), variables)
    cfg = perturbation.VariationConfig(sigma_d=0.1, sigma_wv=0.03)
    pert = perturbation.statistical(cfg)
    noisy, hist = T.train(jax.random.key(0), model, small_digits, SMALL,
                          perturbation=pert, noise_state=pert.init(variables, mask),
                          progress=False)
    # the default state is "nothing verified": the same as the all-False mask
    default, _ = T.train(jax.random.key(0), model, small_digits, SMALL, perturbation=pert,
                         progress=False)
    assert _leaves_equal(noisy, default)
    # another sigma is another state, not another compiled step
    cache = T._make_train_step.cache_info()
    T.train(jax.random.key(0), model, small_digits, SMALL, perturbation=pert,
            noise_state=pert.init(variables, mask, sigma_d=0.2), progress=False)
    assert T._make_train_step.cache_info().misses == cache.misses
    clean, _ = T.train(jax.random.key(0), model, small_digits, SMALL, progress=False)
    assert not _leaves_equal(noisy, clean)
    assert all(np.all(np.isfinite(np.asarray(w))) for w in jax.tree.leaves(noisy))


def test_conv_lowering_option_is_validated_and_resolved_per_backend():
    with pytest.raises(ValueError, match="conv_lowering"):
        T.TrainConfig(conv_lowering="im2col")
    assert T.resolve_conv_lowering("auto", "cpu") == ("gemm", T.AUTO_MAX_GEMM_K)
    assert T.resolve_conv_lowering("auto", "gpu") == ("xla", None)
    assert T.resolve_conv_lowering("gemm", "tpu") == ("gemm", None)
    assert T.resolve_conv_lowering("xla", "cpu") == ("xla", None)


def test_conv_lowering_gives_the_same_training_run(small_digits):
    """Same loss curve, weights and accuracy with and without the lowering
    (float rounding aside: the GEMMs sum in another order)."""
    model = get_model("lenet")
    runs = {}
    for lowering in ("gemm", "xla"):
        cfg = T.TrainConfig(epochs=2, batch_size=128, conv_lowering=lowering)
        runs[lowering] = T.train(jax.random.key(0), model, small_digits, cfg, progress=False)
    (a, hist_a), (b, hist_b) = runs["gemm"], runs["xla"]
    for ra, rb in zip(hist_a, hist_b):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-4)
        assert ra["test_acc"] == pytest.approx(rb["test_acc"], abs=2e-3)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-4), a, b)


def test_epoch_scan_gives_the_per_step_loop_run(small_digits, monkeypatch):
    """A training set on the device (one scan per epoch) gives the batches,
    noise keys and results of feeding the steps one by one from the host."""
    model = get_model("lenet")
    cfg = T.TrainConfig(epochs=2, batch_size=64)
    pert = lambda key, v, s: jax.tree.map(  # noqa: E731
        lambda w: w + 0.01 * _rand.normal(key, w.shape), v)
    runs = {}
    for limit in (T.DEVICE_DATA_BYTES, 0):
        monkeypatch.setattr(T, "DEVICE_DATA_BYTES", limit)
        runs[limit] = T.train(jax.random.key(0), model, small_digits, cfg, perturbation=pert,
                              progress=False)
    (a, hist_a), (b, hist_b) = runs.values()
    for ra, rb in zip(hist_a, hist_b):
        for k in ("train_loss", "train_acc", "test_acc"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-6)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b)


def test_batch_shards_split_over_the_devices_that_divide_the_batch(monkeypatch):
    lenet, resnet = get_model("lenet"), get_model("resnet20")
    monkeypatch.setattr(jax, "local_device_count", lambda: 8)
    assert T.batch_shards(lenet, T.TrainConfig(batch_size=128)) == 8
    assert T.batch_shards(lenet, T.TrainConfig(batch_size=100)) == 5  # 8, 7, 6 do not divide
    assert T.batch_shards(lenet, T.TrainConfig(batch_size=7)) == 7
    assert T.batch_shards(lenet, T.TrainConfig(batch_size=128, data_parallel=False)) == 1
    assert T.batch_shards(resnet, T.TrainConfig(batch_size=128)) == 1  # batch norm
    stochastic = type("M", (), {"has_batch_norm": False, "stochastic": True})()
    assert T.batch_shards(stochastic, T.TrainConfig(batch_size=128)) == 1
    assert T.batch_shards(object(), T.TrainConfig(batch_size=128)) == 1  # does not say
    with pytest.raises(ValueError, match="data_parallel must be True or False"):
        T.TrainConfig(data_parallel=2)


_DATA_PARALLEL_SCRIPT = """
import json, sys
import jax, numpy as np
sys.path.insert(0, {tests_dir!r})
from swimjax import data as D, training as T
from swimjax.models import get_model
import _rand
digits = D.load(n_train=512, n_test=200)
model = get_model("lenet")
pert = lambda key, v, s: jax.tree.map(lambda w: w + 0.01 * _rand.normal(key, w.shape), v)
out = {{"devices": jax.local_device_count()}}
for name, dp, limit in (("one", False, T.DEVICE_DATA_BYTES), ("dp", True, T.DEVICE_DATA_BYTES),
                        ("dp_again", True, T.DEVICE_DATA_BYTES), ("dp_steps", True, 0)):
    T.DEVICE_DATA_BYTES = limit
    cfg = T.TrainConfig(epochs=2, batch_size=64, data_parallel=dp)
    variables, hist = T.train(jax.random.key(0), model, digits, cfg, perturbation=pert,
                              progress=False)
    out[name] = dict(shards=T.batch_shards(model, cfg), hist=hist,
                     weights=[np.asarray(w).ravel().tolist() for w in jax.tree.leaves(variables)])
print(json.dumps(out))
"""


@pytest.mark.slow
def test_data_parallel_training_equals_one_device_up_to_rounding():
    """With 2 devices the batch is split over both (noise-injection on: every
    shard sees the same perturbed weights): the loss curve and weights of one
    device up to float rounding, the same numbers on a rerun, and the same
    run when the steps are fed from the host."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    script = _DATA_PARALLEL_SCRIPT.format(tests_dir=os.path.dirname(__file__))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["devices"] == 2
    one, dp = out["one"], out["dp"]
    assert (one["shards"], dp["shards"], out["dp_steps"]["shards"]) == (1, 2, 2)
    for other in (dp, out["dp_steps"]):
        for ra, rb in zip(one["hist"], other["hist"]):
            assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-4)
            assert ra["train_acc"] == pytest.approx(rb["train_acc"], abs=1 / 256)
            assert ra["test_acc"] == pytest.approx(rb["test_acc"], abs=2 / 200)
        for a, b in zip(one["weights"], other["weights"]):
            np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
    assert out["dp_again"]["weights"] == dp["weights"]
    assert [r["train_loss"] for r in out["dp_again"]["hist"]] == \
        [r["train_loss"] for r in dp["hist"]]


@pytest.mark.parametrize("name", ["lenet", "convnet", "resnet20", "vgg8",
                                  pytest.param("resnet18", marks=pytest.mark.slow),
                                  pytest.param("vgg16", marks=pytest.mark.slow)])
def test_every_zoo_model_trains_with_the_lowering(name):
    """One lowered train step per zoo model: its loss is the plain forward's."""
    model = get_model(name, input_shape=(28, 28, 1) if name == "lenet" else (32, 32, 3))
    variables = model.init(jax.random.key(0))
    params = variables["params"]
    state = {k: val for k, val in variables.items() if k != "params"}
    x = _rand.normal(jax.random.key(1), (2, *model.input_shape))
    y = jnp.array([1, 2])
    cfg = T.default_config(name, conv_lowering="gemm")
    tx, step = T._make_train_step(model, cfg, 1, None, ("gemm", None))
    new_params, _, new_state, loss, _ = step(params, tx.init(params), state, x, y,
                                             jax.random.key(2), np.int32(0), None)
    # jitted: one compile, not an op-by-op forward pass (seconds on the big models)
    ref = T.cross_entropy(jax.jit(model.train_apply)(variables, x)[0], y)
    np.testing.assert_allclose(loss, ref, rtol=1e-4)
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(new_params))
    assert jax.tree.structure(new_state) == jax.tree.structure(state)


def test_auto_lowering_is_all_or_nothing_per_model():
    """On CPU, auto lowers LeNet and the ConvNet (every conv stride 1, K <=
    2304) but not ResNet-20 (strided convs) or VGG-8 (K = 4608)."""
    def n_convs(name, shape):
        model = get_model(name, input_shape=shape)
        fn = T.lowered_fn(model.apply_fn, "gemm", T.AUTO_MAX_GEMM_K)
        jaxpr = jax.make_jaxpr(fn)(model.init(jax.random.key(0)), jnp.zeros((1, *shape)))
        return len(T._conv_shapes(jaxpr.jaxpr))
    assert n_convs("lenet", (28, 28, 1)) == 0
    assert n_convs("convnet", (32, 32, 3)) == 0
    assert n_convs("resnet20", (32, 32, 3)) > 0
    assert n_convs("vgg8", (32, 32, 3)) > 0


# ------------------------------------------------------------ variation-aware noise

def _lenet_variables():
    return get_model("lenet").init(jax.random.key(3))


def test_censored_normal_moments_closed_form():
    from scipy import integrate, stats as st
    for tau in (-1.0, 0.0, 0.5, 1.0, 2.5):
        mean, std = T.censored_normal_moments(tau)
        m1 = integrate.quad(lambda z: z * st.norm.pdf(z), -np.inf, tau)[0] + tau * st.norm.sf(tau)
        m2 = integrate.quad(lambda z: z * z * st.norm.pdf(z), -np.inf, tau)[0] \
            + tau * tau * st.norm.sf(tau)
        assert mean == pytest.approx(m1, abs=1e-9)
        assert std == pytest.approx(np.sqrt(m2 - m1 * m1), abs=1e-9)
    assert T.censored_normal_moments(np.inf) == (0.0, 1.0)
    with pytest.raises(ValueError, match="tau"):
        T.censored_normal_moments(np.nan)


@pytest.mark.parametrize("tau", [np.inf, 1.0, 0.0])
def test_variation_noise_statistics_match_the_evaluation_model(tau):
    """Noise / (per-weight sigma of the evaluation model) is min(eps, tau): its
    mean and std agree with the closed form within 5 standard errors, nothing
    exceeds tau, a mass 1 - Phi(tau) sits exactly at tau, and different keys
    (steps) draw different noise."""
    from scipy import stats as st
    from swimjax import perturbation as P
    variables = _lenet_variables()
    cfg = P.VariationConfig(sigma_d=0.3, sigma_wv=0.03)
    pert = T.variation_noise(cfg, tau=tau)
    state = pert.init(variables)
    su, _ = P.weight_sigmas(variables, cfg)
    apply = jax.jit(pert.apply)
    z = []
    for step in range(4):
        noisy = apply(jax.random.fold_in(jax.random.key(0), step), variables, state)
        for w, n, s in zip(jax.tree.leaves(variables), jax.tree.leaves(noisy), jax.tree.leaves(su)):
            if w.ndim >= 2:
                z.append(np.asarray((n - w) / s, np.float64).ravel())
            else:
                assert np.array_equal(np.asarray(n), np.asarray(w))  # biases exact
    assert not np.array_equal(z[0], z[len(z) // 4])        # fresh noise each step
    z = np.concatenate(z)
    n = z.size
    mean, std = T.censored_normal_moments(tau)
    assert abs(z.mean() - mean) < 5 * std / np.sqrt(n)
    # std of the sample variance: sqrt((mu4 - sigma^4) / n), bounded by the Gaussian's 2 sigma^4
    assert abs(z.std() - std) < 5 * np.sqrt(2.0 / n) * max(std, 1e-3)
    tol = 1e-5
    assert z.max() <= tau + tol
    if np.isfinite(tau):
        at_tau = np.mean(np.abs(z - tau) < tol)
        p = st.norm.sf(tau)
        assert abs(at_tau - p) < 5 * np.sqrt(p * (1 - p) / n)


def test_variation_noise_without_censoring_is_the_evaluation_perturbation():
    from swimjax import perturbation as P
    variables = _lenet_variables()
    cfg = P.VariationConfig(sigma_d=0.3, sigma_wv=0.03)
    mask = jax.tree.map(lambda w: _rand.bernoulli(jax.random.key(1), 0.3, w.shape),
                        variables)
    ours = T.variation_noise(cfg)
    ref = P.statistical(cfg)
    key = jax.random.key(5)
    a = ours.apply(key, variables, ours.init(variables, mask))
    b = ref.apply(key, variables, ref.init(variables, mask))
    assert _leaves_equal(a, b)


def test_remaining_sigmas_are_the_ones_fine_tuning_draws_with():
    """Selection-aware fine-tuning: the noise of a step with a mask is exactly
    remaining_sigmas (sigma_wv * s c on verified weights, sigma_d * s c
    elsewhere) times the step's standard normal draws."""
    from swimjax import _random
    from swimjax import perturbation as P
    variables = _lenet_variables()
    cfg = P.VariationConfig(sigma_d=0.3, sigma_wv=0.03)
    mask = jax.tree.map(lambda w: _rand.bernoulli(jax.random.key(2), 0.05, w.shape),
                        variables)
    want = T.remaining_sigmas(variables, mask, cfg)
    su, sv = P.weight_sigmas(variables, cfg)
    for w, m, a, b, s in zip(*(jax.tree.leaves(t) for t in (variables, mask, su, sv, want))):
        np.testing.assert_array_equal(np.asarray(s), np.where(np.asarray(m), b, a))
    pert = T.variation_noise(cfg)
    key = jax.random.key(9)
    noisy = pert.apply(key, variables, pert.init(variables, mask))
    for i, (w, n, s) in enumerate(zip(*(jax.tree.leaves(t) for t in (variables, noisy, want)))):
        eps = _random.normal(jax.random.fold_in(key, i), w.shape, jnp.float32)
        expect = w + s * eps if w.ndim >= 2 else w
        np.testing.assert_allclose(np.asarray(n), np.asarray(expect), rtol=0, atol=1e-7)


def test_training_receives_the_masked_noise_state_and_fine_tunes_from_given_weights(small_digits):
    """train() hands the perturbation exactly the state it was given (the mask
    and sigmas of selection-aware fine-tuning, as data: a new mask does not
    recompile), and init_variables is where fine-tuning starts."""
    from swimjax import perturbation as P
    model = get_model("lenet")
    start, _ = T.train(jax.random.key(0), model, small_digits, SMALL, progress=False)
    cfg = P.VariationConfig(sigma_d=0.3, sigma_wv=0.03)
    pert = T.variation_noise(cfg, tau=1.0)
    mask = jax.tree.map(lambda w: np.asarray(_rand.bernoulli(jax.random.key(4), 0.1,
                                                            w.shape)), start)
    state = pert.init(start, mask)
    seen = []

    def spy(key, variables, st):
        seen.append(st)
        return pert.apply(key, variables, st)

    one = T.TrainConfig(epochs=1, batch_size=512, learning_rate=1e-12)
    tuned, _ = T.train(jax.random.key(1), model, small_digits, one, perturbation=spy,
                       noise_state=state, progress=False)
    assert len(seen) == 1 and isinstance(seen[0], T.NoiseState)  # traced once
    tuned, _ = T.train(jax.random.key(1), model, small_digits, one, perturbation=pert,
                       noise_state=state, progress=False, init_variables=start)
    # a tiny learning rate: fine-tuning stayed at the given weights
    for a, b in zip(jax.tree.leaves(tuned), jax.tree.leaves(start)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    cache = T._make_train_step.cache_info()
    other = pert.init(start, jax.tree.map(np.logical_not, mask), sigma_d=0.2, tau=0.5)
    T.train(jax.random.key(1), model, small_digits, one, perturbation=pert, noise_state=other,
            progress=False, init_variables=start)
    assert T._make_train_step.cache_info().misses == cache.misses
    with pytest.raises(ValueError, match="init_variables"):
        T.train(jax.random.key(1), model, small_digits, one, progress=False,
                init_variables={"params": {}})


def test_noise_injection_names():
    from swimjax import perturbation as P
    cfg = P.VariationConfig(sigma_d=0.3)
    assert T.noise_injection("none", cfg) is None
    variables = _lenet_variables()
    g = T.noise_injection("gaussian", cfg, sigma=0.2)
    st = g.init(variables)
    assert float(st.sigma_d) == pytest.approx(0.2) and np.isinf(float(st.tau))
    r = T.noise_injection("rcg", cfg, tau=0.7)
    assert float(r.init(variables).tau) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="noise"):
        T.noise_injection("uniform", cfg)

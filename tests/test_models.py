"""Tests of the model zoo: shapes, parameter counts, inference/train modes, folding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from swimjax.models import Model, available_models, fold_batchnorm, get_model
from swimjax.models.resnet import CifarResNet
from swimjax.models.vgg import VGG

import _rand  # jax.random draws made flat: the same values, compiled fast

ALL = ("lenet", "convnet", "resnet18", "resnet20", "vgg8", "vgg16")


def _n_params(shapes) -> int:
    return int(sum(np.prod(s.shape) for s in jax.tree.leaves(shapes["params"])))


def _abstract(model: Model, batch: int = 2):
    """Variables and logits by tracing only (no compilation: cheap for big nets)."""
    var = jax.eval_shape(model.init, jax.random.key(0))
    x = jax.ShapeDtypeStruct((batch, *model.input_shape), jnp.float32)
    return var, jax.eval_shape(model.apply_fn, var, x)


def _small(kind: str) -> Model:
    """A narrow, shallow member of a zoo family (same blocks, cheap to compile)."""
    if kind == "resnet":
        build = lambda fold: CifarResNet(stage_features=(4, 8), blocks_per_stage=1,  # noqa: E731
                                         stem_features=4, num_classes=5, fold=fold)
    else:
        build = lambda fold: VGG(cfg=(4, "M", 8, "M"), fc_features=(6,),  # noqa: E731
                                 num_classes=5, fold=fold)
    return Model(name=f"small_{kind}", num_classes=5, input_shape=(8, 8, 3),
                 module=build(False), folded_module=build(True), has_batch_norm=True)


def _randomize_bn(seed, variables):
    """Non-trivial BN statistics and affine parameters (init has mean 0, var 1)."""
    rng = np.random.default_rng(seed)

    def f(path, a):
        name = jax.tree_util.keystr(path)
        if "'mean'" in name:
            return jnp.asarray(0.1 * rng.standard_normal(a.shape), jnp.float32)
        if "'var'" in name:
            return jnp.asarray(rng.uniform(0.5, 2.0, a.shape), jnp.float32)
        if "'bn'" in name:  # scale and bias
            return a + jnp.asarray(0.3 * rng.standard_normal(a.shape), jnp.float32)
        return a
    return jax.tree_util.tree_map_with_path(f, variables)


def test_registry_lists_all_models():
    assert set(available_models()) == set(ALL)


def test_unknown_model_lists_known_names():
    with pytest.raises(ValueError, match="name must be one of.*lenet.*resnet18"):
        get_model("alexnet")


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_classes=1), "num_classes"),
    (dict(input_shape=(30, 30, 3)), "multiples of 8"),
    (dict(input_shape=(32, 32)), "input_shape"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        get_model("convnet", **kwargs)


@pytest.mark.parametrize("name, classes, shape", [
    ("lenet", 10, None), ("convnet", 10, None), ("resnet18", 10, None),
    ("resnet18", 200, (64, 64, 3)), ("resnet20", 10, None), ("vgg8", 10, None),
    ("vgg16", 10, None), ("vgg16", 200, (64, 64, 3)),
])
def test_output_shapes(name, classes, shape):
    model = get_model(name, num_classes=classes, input_shape=shape)
    var, logits = _abstract(model, batch=3)
    assert logits.shape == (3, classes)
    assert logits.dtype == jnp.float32
    assert ("batch_stats" in var) == model.has_batch_norm


def test_parameter_counts_match_the_architectures():
    # LeNet: conv 1->6 3x3, conv 6->16 3x3, FC 784-120-84-10 (all with biases).
    lenet = 6 * 9 + 6 + 16 * 6 * 9 + 16 + 784 * 120 + 120 + 120 * 84 + 84 + 84 * 10 + 10
    assert _n_params(_abstract(get_model("lenet"))[0]) == lenet
    # SWIM ConvNet: conv 64-64-128-128-256-256 (3x3), FC 4096-1024-1024-10.
    chans = [3, 64, 64, 128, 128, 256, 256]
    conv = sum(9 * a * b + b for a, b in zip(chans[:-1], chans[1:]))
    fc = 4096 * 1024 + 1024 + 1024 * 1024 + 1024 + 1024 * 10 + 10
    assert _n_params(_abstract(get_model("convnet"))[0]) == conv + fc
    # ResNet-18 (CIFAR variant): the well-known 11,173,962 trainable parameters.
    assert _n_params(_abstract(get_model("resnet18"))[0]) == 11_173_962


def test_mapped_leaf_rule_selects_exactly_the_kernels():
    """ndim >= 2 leaves are conv/dense kernels; every BN leaf and bias is 1-D."""
    var, _ = _abstract(get_model("resnet20"))
    for path, leaf in jax.tree_util.tree_leaves_with_path(var):
        is_kernel = jax.tree_util.keystr(path).endswith("['kernel']")
        assert (leaf.ndim >= 2) == is_kernel, jax.tree_util.keystr(path)


def test_lenet_apply_is_jittable_and_matches_a_manual_forward():
    model = get_model("lenet")
    var = model.init(jax.random.key(0))
    x = _rand.uniform(jax.random.key(1), (4, 28, 28, 1))
    logits = jax.jit(model.apply_fn)(var, x)
    assert logits.shape == (4, 10) and np.all(np.isfinite(logits))

    # the reference architecture written out with lax/numpy ops
    p = var["params"]

    def conv_relu_pool(h, layer):
        h = jax.lax.conv_general_dilated(h, layer["kernel"], (1, 1), ((1, 1), (1, 1)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        h = jax.nn.relu(h + layer["bias"])
        return jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1),
                                     "VALID")

    h = conv_relu_pool(conv_relu_pool(x, p["Conv_0"]), p["Conv_1"]).reshape(4, 784)
    for i in range(3):
        h = h @ p[f"Dense_{i}"]["kernel"] + p[f"Dense_{i}"]["bias"]
        h = jax.nn.relu(h) if i < 2 else h
    np.testing.assert_allclose(np.asarray(logits), np.asarray(h), rtol=1e-4, atol=1e-5)

    train_logits, state = jax.jit(model.train_apply)(var, x)
    assert state == {}
    np.testing.assert_allclose(np.asarray(train_logits), np.asarray(logits), rtol=1e-5,
                               atol=1e-6)
    # no batch norm: folding is the identity and folded_apply_fn == apply_fn
    folded = model.fold_batchnorm(var)
    assert jax.tree.structure(folded) == jax.tree.structure(var)
    np.testing.assert_allclose(np.asarray(jax.jit(model.folded_apply_fn)(folded, x)),
                               np.asarray(logits), rtol=1e-5, atol=1e-6)


def test_init_is_deterministic_in_the_key():
    model = get_model("lenet")
    a, b, c = (model.init(jax.random.key(k)) for k in (0, 0, 1))
    for la, lb in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(la), np.asarray(lb))
    assert not np.array_equal(np.asarray(a["params"]["Dense_0"]["kernel"]),
                              np.asarray(c["params"]["Dense_0"]["kernel"]))


def test_model_unpacks_to_init_and_apply():
    init_fn, apply_fn = get_model("lenet")
    assert get_model("lenet") is get_model("lenet", 10, (28, 28, 1))  # cached, immutable
    var = init_fn(jax.random.key(0))
    assert jax.eval_shape(apply_fn, var, jnp.zeros((1, 28, 28, 1))).shape == (1, 10)


def test_wrong_input_shape_is_rejected():
    model = get_model("lenet")
    var = model.init(jax.random.key(0))
    with pytest.raises(ValueError, match=r"x must have shape \(batch, 28, 28, 1\)"):
        model.apply_fn(var, jnp.zeros((1, 32, 32, 1)))


@pytest.mark.parametrize("kind", ["resnet", "vgg"])
def test_batchnorm_folding_is_exact_to_float_tolerance(kind):
    model = _small(kind)
    var = _randomize_bn(2, model.init(jax.random.key(0)))
    x = _rand.uniform(jax.random.key(1), (4, *model.input_shape))
    ref = jax.jit(model.apply_fn)(var, x)
    folded = jax.jit(fold_batchnorm)(var)
    assert set(folded) == {"params"}
    out = jax.jit(model.folded_apply_fn)(folded, x)
    scale = float(jnp.max(jnp.abs(ref)))
    assert scale > 1e-3  # the comparison is not between zeros
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5 * scale, rtol=1e-4)


def test_batchnorm_train_mode_updates_stats_and_inference_uses_them():
    model = _small("resnet")
    var = model.init(jax.random.key(0))
    x = 3.0 + _rand.uniform(jax.random.key(1), (8, 8, 8, 3))
    logits, state = jax.jit(model.train_apply)(var, x)
    assert set(state) == {"batch_stats"}
    assert jax.tree.structure(state["batch_stats"]) == jax.tree.structure(var["batch_stats"])
    # stem BN: new running mean = 0.9 * 0 + 0.1 * batch mean of the stem conv output
    conv_out = jax.lax.conv_general_dilated(
        x, var["params"]["stem"]["conv"]["kernel"], (1, 1), "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(np.asarray(state["batch_stats"]["stem"]["bn"]["mean"]),
                               0.1 * np.asarray(conv_out.mean(axis=(0, 1, 2))),
                               rtol=1e-4, atol=1e-6)
    # inference with the fresh stats differs from train-mode normalization
    infer = model.apply_fn(var, x)
    assert logits.shape == infer.shape == (8, 5)
    assert not np.allclose(np.asarray(logits), np.asarray(infer))

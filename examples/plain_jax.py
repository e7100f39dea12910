"""SWIM on a plain-JAX model whose pytree also holds non-float leaves.

The model is a nested dict of arrays with an integer leaf (a fixed input
permutation), the way an equinox module holds non-trainable leaves. swimjax
takes ``apply_fn(params, x)`` with ``params`` a pytree of float arrays, so the
model is split into a float part (``params``: scored, perturbed, evaluated)
and the rest (``static``, closed over by ``apply_fn``), exactly what
``eqx.partition(model, eqx.is_inexact_array)`` / ``eqx.combine`` do. The
split leaves ``None`` holes in each half; swimjax treats ``None`` as an
empty subtree.

It trains on synthetic data (no dataset needed), scores with SWIM, selects a
10 % write-verify mask and sweeps the device sigma in one compiled
Monte-Carlo program (the sigmas are the perturbation's data).

    python examples/plain_jax.py [--n_train 2000] [--mc_runs 100]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import swimjax as sj

N_FEATURES, N_HIDDEN, N_CLASSES = 32, 64, 10


def make_data(key: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """Gaussian clusters, one per class, in N_FEATURES dimensions."""
    k_c, k_y, k_x = jax.random.split(key, 3)
    centers = jax.random.normal(k_c, (N_CLASSES, N_FEATURES))
    y = jax.random.randint(k_y, (n,), 0, N_CLASSES)
    x = centers[y] + 1.2 * jax.random.normal(k_x, (n, N_FEATURES))
    return x, y


def init_model(key: jax.Array) -> dict:
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "perm": jax.random.permutation(k3, N_FEATURES),  # int32: not a weight
        "hidden": {"w": jax.random.normal(k1, (N_FEATURES, N_HIDDEN)) / np.sqrt(N_FEATURES),
                   "b": jnp.zeros(N_HIDDEN)},
        "out": {"w": jax.random.normal(k2, (N_HIDDEN, N_CLASSES)) / np.sqrt(N_HIDDEN),
                "b": jnp.zeros(N_CLASSES)},
    }


def forward(model: dict, x: jax.Array) -> jax.Array:
    h = jax.nn.relu(x[:, model["perm"]] @ model["hidden"]["w"] + model["hidden"]["b"])
    return h @ model["out"]["w"] + model["out"]["b"]


def is_inexact_array(leaf) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray)) and jnp.issubdtype(leaf.dtype, jnp.inexact)


def partition(tree, keep):
    """(leaves where keep, the others), each with None in the other's places."""
    return (jax.tree.map(lambda l: l if keep(l) else None, tree),
            jax.tree.map(lambda l: None if keep(l) else l, tree))


def combine(a, b):
    return jax.tree.map(lambda x, y: y if x is None else x, a, b, is_leaf=lambda l: l is None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n_train", type=int, default=2000)
    ap.add_argument("--n_test", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--mc_runs", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    k_data, k_model, k_mc = jax.random.split(jax.random.key(args.seed), 3)
    x, y = make_data(k_data, args.n_train + args.n_test)
    x_train, y_train, x_test, y_test = (x[:args.n_train], y[:args.n_train],
                                        x[args.n_train:], y[args.n_train:])

    params, static = partition(init_model(k_model), is_inexact_array)

    def apply_fn(p, x):
        return forward(combine(p, static), x)

    def loss(p):
        logp = jax.nn.log_softmax(apply_fn(p, x_train))
        return -jnp.take_along_axis(logp, y_train[:, None], axis=1).mean()

    grad = jax.jit(jax.grad(loss))
    for _ in range(args.steps):  # plain gradient descent
        params = jax.tree.map(lambda w, g: w - 0.5 * g, params, grad(params))

    cfg = sj.perturbation.VariationConfig(sigma_d=0.2, sigma_wv=0.03,
                                          weight_bits=8, device_bits=2)
    batches = sj.sensitivity.make_batches(x_train, y_train, 500)
    h = sj.sensitivity.score("swim", None, apply_fn, params, batches)
    su, sv = sj.perturbation.weight_sigmas(params, cfg)
    mask = sj.selection.select(h, 0.1, sigma_unverified=su, sigma_verified=sv, params=params)

    pert = sj.perturbation.statistical(cfg)
    sigmas = (0.1, 0.2, 0.3)
    states = [pert.init(params, m, sigma_d=s) for s in sigmas for m in (None, mask)]
    results = sj.montecarlo.evaluate_many(k_mc, apply_fn, params, pert, states,
                                          x_test, y_test, args.mc_runs)

    print(f"clean accuracy {results[0].clean_accuracy:.4f}; {args.mc_runs} Monte-Carlo runs")
    print(f"{'sigma_d':>7} {'verified':>8} {'mean':>7} {'p5':>7}")
    for i, r in enumerate(results):
        print(f"{sigmas[i // 2]:>7.2f} {('none', '10 %')[i % 2]:>8} "
              f"{r.summary.mean:>7.4f} {r.summary.p5:>7.4f}")


if __name__ == "__main__":
    main()

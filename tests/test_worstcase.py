"""The worst-case search (PGD, C&W, random baseline), its box, and the
experiment binary; U-SWIM's non-uniform sigmas."""

import json
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from swimjax import perturbation, worstcase as wc


def _linear(p, x):
    return x @ p["w"] + p["b"]


def _two_class_set(d=6, n=80, seed=0):
    """A two-class linear model and examples of class 0 that it classifies
    right (margins > 0.5)."""
    rng = np.random.default_rng(seed)
    params = {"w": jnp.asarray(rng.normal(size=(d, 2)), jnp.float32),
              "b": jnp.asarray([0.1, -0.1], jnp.float32)}
    x = rng.normal(size=(n, d)).astype(np.float32)
    m = x @ np.asarray(params["w"][:, 0] - params["w"][:, 1]) + 0.2
    keep = m > 0.5
    return params, x[keep], np.zeros(int(keep.sum()), np.int32), m[keep]


def _mlp(seed=0, d=8, h=16, c=3, n=120):
    rng = np.random.default_rng(seed)
    params = {"w1": jnp.asarray(rng.normal(size=(d, h)) / np.sqrt(d), jnp.float32),
              "b1": jnp.zeros(h, jnp.float32),
              "w2": jnp.asarray(rng.normal(size=(h, c)) / np.sqrt(h), jnp.float32)}

    def apply(p, x):
        return jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"]

    x = rng.normal(size=(n, d)).astype(np.float32)
    y = np.asarray(jnp.argmax(apply(params, x), -1), np.int32)  # clean accuracy 1
    return apply, params, x, y


def test_pgd_matches_the_analytic_worst_case_of_a_linear_model():
    """Two classes, every example of class 0, no floor (kappa huge): the summed
    margin is linear in dW, sum_n x_n . (dW_0 - dW_1), so the box's minimizer
    is dW_0 = -b sign(sum x), dW_1 = +b sign(sum x), and the loss drops by
    2 b ||sum x||_1."""
    params, x, y, m = _two_class_set()
    eps = 0.05
    bound = wc.box(params, eps)
    b = eps * float(jnp.max(jnp.abs(params["w"])))
    res = wc.pgd(jax.random.key(0), _linear, params, x, y, bound,
                 wc.WorstCaseConfig(kappa=1e9, steps=8))
    sx = x.sum(0)
    expect = np.stack([-b * np.sign(sx), b * np.sign(sx)], axis=1).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(res.delta["w"]), expect)
    np.testing.assert_array_equal(np.asarray(res.delta["b"]), 0.0)  # unmapped: exact
    analytic = (m.sum() - 2 * b * np.abs(sx).sum()) / len(y)
    assert res.loss == pytest.approx(analytic, rel=1e-5)


def test_pgd_on_one_example_of_many_classes():
    """One example, C classes: the worst margin is min_j (z_y - z_j) - 2 b ||x||_1
    (each class's margin can fall by at most 2 b ||x||_1)."""
    rng = np.random.default_rng(3)
    params = {"w": jnp.asarray(rng.normal(size=(7, 5)), jnp.float32),
              "b": jnp.zeros(5, jnp.float32)}
    x = rng.normal(size=(1, 7)).astype(np.float32)
    z = np.asarray(_linear(params, x))[0]
    y = np.asarray([int(np.argmax(z))], np.int32)
    b = 0.02 * float(jnp.max(jnp.abs(params["w"])))
    res = wc.pgd(jax.random.key(0), _linear, params, x, y, wc.box(params, 0.02),
                 wc.WorstCaseConfig(kappa=1e9, steps=8))
    analytic = min(z[y[0]] - z[j] for j in range(5) if j != y[0]) - 2 * b * np.abs(x).sum()
    assert res.loss == pytest.approx(analytic, rel=1e-5, abs=1e-6)


def test_cw_approaches_the_analytic_worst_case():
    params, x, y, m = _two_class_set()
    eps = 0.05
    b = eps * float(jnp.max(jnp.abs(params["w"])))
    res = wc.carlini_wagner(jax.random.key(0), _linear, params, x, y, wc.box(params, eps),
                            wc.WorstCaseConfig(method="cw", kappa=1e9, c_init=100.0,
                                               cw_steps=150, binary_search_steps=2))
    drop = 2 * b * np.abs(x.sum(0)).sum() / len(y)
    analytic = m.mean() - drop
    assert res.loss <= analytic + 0.02 * drop
    assert res.c is not None


@pytest.mark.parametrize("method", ["pgd", "cw"])
def test_search_beats_random_points_and_stays_in_the_box(method):
    apply, params, x, y = _mlp()
    mask = {"w1": np.arange(8 * 16).reshape(8, 16) % 3 == 0, "b1": np.zeros(16, bool),
            "w2": np.zeros((16, 3), bool)}
    bound = wc.box(params, 0.2, mask=mask, eps_verified=0.03)
    cfg = wc.WorstCaseConfig(method=method, steps=15, cw_steps=40, binary_search_steps=2,
                             random_start=True, restarts=2)
    res = wc.search(jax.random.key(1), apply, params, x, y, bound, cfg)
    rnd = wc.random_search(jax.random.key(2), apply, params, x, y, bound, 30)
    rnd_u = wc.random_search(jax.random.key(3), apply, params, x, y, bound, 30, corners=False)
    assert res.accuracy <= min(rnd.accuracy, rnd_u.accuracy)
    assert res.accuracy < res.clean_accuracy == 1.0
    acc, loss = wc.evaluate(apply, params, res.delta, x, y)
    assert (acc, loss) == pytest.approx((res.accuracy, res.loss), abs=1e-5)
    for d, bnd in zip(jax.tree.leaves(res.delta), jax.tree.leaves(bound)):
        assert bool(jnp.all(jnp.abs(d) <= bnd))  # exactly inside, no tolerance
    np.testing.assert_array_equal(np.asarray(res.delta["b1"]), 0.0)
    s1 = float(jnp.max(jnp.abs(params["w1"])))
    assert float(jnp.max(jnp.abs(res.delta["w1"])[mask["w1"]])) <= 0.03 * s1
    assert res.history.ndim == 1 and res.history.min() == res.accuracy


def test_box_bounds_and_verified_eps():
    params = {"k": jnp.asarray([[1.0, -4.0], [2.0, 0.5]]), "b": jnp.ones(2)}
    mask = {"k": np.asarray([[True, False], [False, False]]), "b": np.ones(2, bool)}
    b = wc.box(params, 0.1, mask=mask, eps_verified=0.01)
    np.testing.assert_allclose(np.asarray(b["k"]), [[0.04, 0.4], [0.4, 0.4]], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(b["b"]), 0.0)
    pc = wc.box(params, 0.1, scale="per_channel")
    np.testing.assert_allclose(np.asarray(pc["k"]), [[0.2, 0.4], [0.2, 0.4]], rtol=1e-6)
    assert wc.verified_eps(0.05, 8, 1) == pytest.approx(0.05)
    assert wc.verified_eps(0.05, 8, 2) == pytest.approx(0.05)
    assert wc.verified_eps(0.05, 8, 3) == pytest.approx(0.05 * 7 * (1 + 8 + 64) / 255)


def test_margins():
    z = jnp.asarray([[3.0, 1.0, 2.0], [0.0, 5.0, 1.0]])
    np.testing.assert_allclose(np.asarray(wc.margins(z, jnp.asarray([0, 2]))), [1.0, -4.0])


@pytest.mark.parametrize("kw, match", [
    (dict(method="fgsm"), "method"), (dict(steps=0), "steps"), (dict(step_size=0.0), "step_size"),
    (dict(step_size=3.0), "step_size"), (dict(kappa=-1.0), "kappa"),
    (dict(restarts=0), "restarts"), (dict(c_init=0.0), "c_init"), (dict(cw_lr=-1), "cw_lr"),
    (dict(target_accuracy=1.5), "target_accuracy"), (dict(batch_size=0), "batch_size"),
    (dict(random_start="yes"), "random_start"), (dict(binary_search_steps=0),
                                                 "binary_search_steps"),
])
def test_bad_search_config(kw, match):
    with pytest.raises(ValueError, match=match):
        wc.WorstCaseConfig(**kw)


def test_bad_inputs_are_named():
    apply, params, x, y = _mlp()
    with pytest.raises(ValueError, match="eps"):
        wc.box(params, -0.1)
    with pytest.raises(ValueError, match="eps_verified"):
        wc.box(params, 0.1, mask=jax.tree.map(lambda p: np.zeros(p.shape, bool), params))
    bad = jax.tree.map(lambda p: -jnp.ones_like(p), params)
    with pytest.raises(ValueError, match="bound"):
        wc.pgd(jax.random.key(0), apply, params, x, y, bad)
    with pytest.raises(ValueError, match="bound"):
        wc.pgd(jax.random.key(0), apply, params, x, y, {"w1": params["w1"]})
    with pytest.raises(ValueError, match="y must"):
        wc.pgd(jax.random.key(0), apply, params, x, y[:3], wc.box(params, 0.1))
    with pytest.raises(ValueError, match="config"):
        wc.search(jax.random.key(0), apply, params, x, y, wc.box(params, 0.1), config="pgd")
    for kw, match in [(dict(eps=(-0.1,)), "eps"), (dict(masks=("all",)), "masks"),
                      (dict(budget=1.5), "budget"), (dict(sigma_wv=0.3), "sigma_wv"),
                      (dict(mc_runs=0), "mc_runs"), (dict(search="pgd"), "search")]:
        with pytest.raises(ValueError, match=match):
            wc.ExperimentConfig(**kw)


def test_nonuniform_sigmas_against_the_formula():
    """U-SWIM: weights with 0.25 < |W|/max < 0.75 get sigma * r, every sigma
    times 1 / sqrt(0.4 r^2 + 0.6)."""
    w = jnp.asarray([[1.0, -0.2, 0.25, 0.5], [-0.74, 0.75, 0.9, -0.3]])
    params = {"k": w, "b": jnp.ones(4)}
    for name, r in perturbation.NONUNIFORM_PRESETS.items():
        cfg = perturbation.VariationConfig(sigma_d=0.2, sigma_wv=0.03, nonuniform_factor=r)
        su, sv = perturbation.weight_sigmas(params, cfg)
        c = perturbation.std_factor(8, 1)
        band = (np.abs(np.asarray(w)) > 0.25) & (np.abs(np.asarray(w)) < 0.75)
        mult = np.where(band, r, 1.0) / math.sqrt(0.4 * r * r + 0.6)
        np.testing.assert_allclose(np.asarray(su["k"]), 0.2 * c * 1.0 * mult, rtol=1e-6,
                                   err_msg=name)
        np.testing.assert_allclose(np.asarray(sv["k"]), 0.03 * c * mult, rtol=1e-6)
        np.testing.assert_array_equal(np.asarray(su["b"]), 0.0)


@pytest.mark.slow
def test_binary_end_to_end_and_resume(tmp_path):
    out = tmp_path / "wc"
    cmd = [sys.executable, "-m", "experiments.worstcase", f"--out_dir={out}", "--mc_runs=4",
           "--eps=0,0.03", "--steps=4", "--random_samples=2", "--n_train=256", "--n_test=100",
           "--train_epochs=1", "--noprogress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p.name for p in out.iterdir()} >= {"results.jsonl", "worstcase_vs_eps.png",
                                               "summary.md"}
    rows = [json.loads(line) for line in open(out / "results.jsonl")]
    assert sorted((r["mask"], r["eps"]) for r in rows) == [
        ("none", 0.0), ("none", 0.03), ("swim", 0.0), ("swim", 0.03)]
    by = {(r["mask"], r["eps"]): r for r in rows}
    for m in ("none", "swim"):
        assert by[(m, 0.0)]["worst_acc"] == by[(m, 0.0)]["clean_acc"] == by[(m, 0.0)]["mc_acc_mean"]
        assert by[(m, 0.03)]["worst_acc"] <= by[(m, 0.03)]["random_acc_min"]
        assert by[(m, 0.03)]["worst_acc"] <= by[(m, 0.03)]["mc_acc_min"]
    assert by[("swim", 0.03)]["n_verified"] > 0 and by[("none", 0.03)]["n_verified"] == 0
    before = open(out / "results.jsonl").read()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "0 of 4 points to run" in proc.stderr
    assert open(out / "results.jsonl").read() == before


def test_binary_rejects_bad_flags(tmp_path):
    for flag, name in [("--eps=0,-0.1", "eps"), ("--masks=none,all", "masks"),
                       ("--step_size=0", "step_size")]:
        proc = subprocess.run([sys.executable, "-m", "experiments.worstcase", flag,
                               f"--out_dir={tmp_path}"], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert name in proc.stderr and "Traceback" not in proc.stderr

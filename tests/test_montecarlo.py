"""Tests of swimjax.montecarlo: exactness against a per-run loop, determinism
across chunk sizes and device counts, summary statistics, input checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from swimjax import distributed
from swimjax import montecarlo as mc

import _rand  # jax.random draws made flat: the same values, compiled fast

N_EX = 90          # examples
N_RUNS = 20
SIGMA = 0.3        # relative weight noise: large enough to move accuracies


def _init(key):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "conv": {"kernel": 0.5 * _rand.normal(k1, (3, 3, 1, 4)), "bias": jnp.zeros(4)},
        "dense": {"kernel": 0.2 * jax.random.normal(k2, (4 * 4 * 4, 10)),
                  "bias": 0.1 * jax.random.normal(k3, (10,))},
    }


def apply_fn(params, x):
    """Tiny CNN: conv 1->4 3x3 SAME + ReLU + 2x2 max-pool + dense 64->10 on 8x8x1."""
    h = jax.lax.conv_general_dilated(x, params["conv"]["kernel"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = jax.nn.relu(h + params["conv"]["bias"])
    h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    return h.reshape(h.shape[0], -1) @ params["dense"]["kernel"] + params["dense"]["bias"]


def gaussian_perturb(key, params, sigma=None):
    """W + sigma * max|W| * N(0, 1) on every kernel (ndim >= 2); biases exact.
    ``sigma`` is the perturbation's state (default SIGMA)."""
    sigma = SIGMA if sigma is None else sigma
    leaves, treedef = jax.tree.flatten(params)
    out = []
    for i, w in enumerate(leaves):
        if w.ndim >= 2:
            # Drawn flat (same values, much faster to compile on XLA CPU than rank 4).
            eps = jax.random.normal(jax.random.fold_in(key, i), (w.size,), w.dtype)
            eps = eps.reshape(w.shape)
            w = w + sigma * jnp.max(jnp.abs(w)) * eps
        out.append(w)
    return treedef.unflatten(out)


def identity_perturb(key, params, state=None):
    del key, state
    return params


@pytest.fixture(scope="module")
def problem():
    params = _init(jax.random.key(0))
    x = _rand.normal(jax.random.key(1), (N_EX, 8, 8, 1))
    # Labels from a slightly different network: clean accuracy well above chance.
    teacher = gaussian_perturb(jax.random.key(2), params, 0.1)
    y = jnp.argmax(apply_fn(teacher, x), -1).astype(jnp.int32)
    return params, x, y


def _reference(key, params, x, y, n_runs):
    """Plain Python loop: per-run perturbation with the same keys, then apply."""
    f = jax.jit(lambda k: apply_fn(gaussian_perturb(k, params), x))
    acc, loss = [], []
    for k in jax.random.split(key, n_runs):
        logits = f(k)
        acc.append(float(np.mean(np.asarray(jnp.argmax(logits, -1)) == np.asarray(y))))
        loss.append(float(np.mean(np.asarray(mc.softmax_cross_entropy(logits, y)))))
    return np.array(acc), np.array(loss)


@pytest.fixture(scope="module")
def base_result(problem):
    params, x, y = problem
    return mc.evaluate(jax.random.key(7), apply_fn, params, gaussian_perturb, x, y, N_RUNS,
                       progress=False)


def test_matches_python_loop_reference(problem, base_result):
    params, x, y = problem
    acc, loss = _reference(jax.random.key(7), params, x, y, N_RUNS)
    np.testing.assert_array_equal(base_result.accuracy, acc)
    np.testing.assert_allclose(base_result.loss, loss, rtol=1e-5, atol=1e-6)
    # The noise matters (otherwise the comparison above would be vacuous).
    assert len(np.unique(acc)) > 3
    assert base_result.summary.std > 0


def test_vmap_lowering_matches_reference(problem, base_result):
    """Both ways of batching runs (im2col GEMMs, the default, and plain vmap)
    agree with the per-run loop."""
    params, x, y = problem
    res = mc.evaluate(jax.random.key(7), apply_fn, params, gaussian_perturb, x, y, N_RUNS,
                      lowering="vmap", progress=False)
    acc, loss = _reference(jax.random.key(7), params, x, y, N_RUNS)
    np.testing.assert_array_equal(res.accuracy, acc)
    np.testing.assert_allclose(res.loss, loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(res.loss, base_result.loss, rtol=1e-5, atol=1e-6)
    assert mc.plan(apply_fn, params, gaussian_perturb, x, N_RUNS).lowering == "gemm"


def test_batched_dataset_matches_reference(problem):
    params, x, y = problem
    # 90 examples in batches of 7: 13 batches, the last one 6 real + 1 masked padding.
    res = mc.evaluate(jax.random.key(7), apply_fn, params, gaussian_perturb, x, y, 6,
                      batch_size=7, vmap_size=3, progress=False)
    acc, loss = _reference(jax.random.key(7), params, x, y, 6)
    np.testing.assert_array_equal(res.accuracy, acc)
    np.testing.assert_allclose(res.loss, loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 7, N_RUNS])
def test_identical_across_chunk_sizes(problem, base_result, chunk_size):
    params, x, y = problem
    res = mc.evaluate(jax.random.key(7), apply_fn, params, gaussian_perturb, x, y, N_RUNS,
                      chunk_size=chunk_size, progress=False)
    np.testing.assert_array_equal(res.accuracy, base_result.accuracy)
    np.testing.assert_array_equal(res.loss, base_result.loss)  # bit-identical, by design
    assert res.clean_accuracy == base_result.clean_accuracy
    assert res.clean_loss == base_result.clean_loss


def test_same_key_same_result_other_key_differs(problem, base_result):
    params, x, y = problem
    again = mc.evaluate(jax.random.key(7), apply_fn, params, gaussian_perturb, x, y, N_RUNS,
                        progress=False)
    np.testing.assert_array_equal(again.loss, base_result.loss)
    other = mc.evaluate(jax.random.key(8), apply_fn, params, gaussian_perturb, x, y, N_RUNS,
                        progress=False)
    assert not np.array_equal(other.loss, base_result.loss)


def test_clean_equals_identity_perturbation(problem, base_result):
    params, x, y = problem
    res = mc.evaluate(jax.random.key(3), apply_fn, params, identity_perturb, x, y, 5,
                      progress=False)
    np.testing.assert_array_equal(res.accuracy, np.full(5, res.clean_accuracy))
    np.testing.assert_array_equal(res.loss, np.full(5, res.clean_loss))
    assert res.clean_accuracy == base_result.clean_accuracy
    assert res.clean_loss == base_result.clean_loss
    logits = apply_fn(params, x)
    assert res.clean_accuracy == float(np.mean(np.asarray(jnp.argmax(logits, -1) == y)))
    np.testing.assert_allclose(res.clean_loss, float(jnp.mean(mc.softmax_cross_entropy(
        logits, y))), rtol=1e-5)
    assert res.clean_accuracy > 0.5


def test_raw_uint32_keys_and_custom_loss(problem):
    params, x, y = problem
    key = jax.random.PRNGKey(7)
    res = mc.evaluate(key, apply_fn, params, gaussian_perturb, x, y, 4,
                      loss_fn=lambda logits, labels: jnp.zeros(labels.shape), progress=True)
    acc, _ = _reference(key, params, x, y, 4)
    np.testing.assert_array_equal(res.accuracy, acc)
    np.testing.assert_array_equal(res.loss, np.zeros(4))


_DEVICE_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    sys.path.insert(0, {tests_dir!r})
    import test_montecarlo as t
    from swimjax import montecarlo as mc
    params = t._init(jax.random.key(0))
    x = t._rand.normal(jax.random.key(1), (t.N_EX, 8, 8, 1))
    y = jax.numpy.argmax(t.apply_fn(t.gaussian_perturb(jax.random.key(2), params, 0.1), x),
                         -1).astype(jax.numpy.int32)
    res = mc.evaluate(jax.random.key(7), t.apply_fn, params, t.gaussian_perturb, x, y,
                      t.N_RUNS, chunk_size=7, progress=False)
    print(json.dumps(dict(n_devices=len(jax.devices()), accuracy=res.accuracy.tolist(),
                          loss=res.loss.tolist(), clean=[res.clean_accuracy, res.clean_loss])))
""")


def _run_with_devices(n: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
    script = _DEVICE_SCRIPT.format(tests_dir=os.path.dirname(__file__))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_identical_across_device_counts(base_result):
    """Another process with 8 devices gives this process's numbers (on its own
    devices: one, unless $XLA_FLAGS says otherwise, and then the other process
    has 1) bit for bit; its chunk size is another (they do not matter either:
    test_identical_across_chunk_sizes)."""
    here = len(jax.devices())
    n = 8 if here != 8 else 1
    other = _run_with_devices(n)
    assert other["n_devices"] == n != here
    assert other["accuracy"] == base_result.accuracy.tolist()
    assert other["loss"] == base_result.loss.tolist()
    assert other["clean"] == [base_result.clean_accuracy, base_result.clean_loss]


def test_summarize_against_numpy():
    rng = np.random.default_rng(0)
    a = rng.uniform(0.5, 1.0, size=37)
    s = mc.summarize(a)
    std = np.std(a, ddof=1)
    assert s.n_runs == 37
    np.testing.assert_allclose(s.mean, np.mean(a), rtol=1e-12)
    np.testing.assert_allclose(s.std, std, rtol=1e-12)
    np.testing.assert_allclose(s.sem, std / np.sqrt(37), rtol=1e-12)
    np.testing.assert_allclose(s.p1, np.percentile(a, 1, method="linear"), rtol=1e-12)
    np.testing.assert_allclose(s.p5, np.percentile(a, 5, method="linear"), rtol=1e-12)
    # Linear interpolation by hand: rank 0.05 * 36 = 1.8 between sorted[1] and sorted[2].
    srt = np.sort(a)
    np.testing.assert_allclose(s.p5, srt[1] + 0.8 * (srt[2] - srt[1]), rtol=1e-12)
    assert (s.min, s.max) == (srt[0], srt[-1])
    one = mc.summarize([0.9])
    assert (one.std, one.sem, one.p1, one.min, one.n_runs) == (0.0, 0.0, 0.9, 0.9, 1)
    with pytest.raises(ValueError, match="accuracy"):
        mc.summarize([])


def test_summary_of_result(base_result):
    s = mc.summarize(base_result.accuracy)
    assert s == base_result.summary
    assert s.min <= s.p1 <= s.p5 <= s.mean <= s.max


def test_plan_memory_budget_and_padding(problem):
    params, x, _ = problem
    p = mc.plan(apply_fn, params, gaussian_perturb, x, 10, chunk_size=3, vmap_size=2)
    assert p.n_groups == 5 + 1  # 10 runs in groups of 2, plus the clean group
    assert p.groups_per_chunk % p.n_devices == 0
    assert p.chunk_size == p.groups_per_chunk * 2 >= 3
    assert p.compiled_groups >= max(p.groups_per_chunk, 2 * p.n_devices)
    assert p.n_chunks == -(-6 // p.groups_per_chunk)
    assert p.batch_size * p.n_batches >= N_EX
    assert p.group_bytes == p.vmap_size * (p.param_bytes + p.batch_size * p.activation_bytes)
    # The per-example activation estimate covers at least the conv output.
    assert p.activation_bytes >= 8 * 8 * 4 * 4
    tight = mc.plan(apply_fn, params, gaussian_perturb, x, 10,
                    memory_budget=4 * (p.param_bytes + 5 * p.activation_bytes))
    assert tight.group_bytes <= 4 * (p.param_bytes + 5 * p.activation_bytes)
    assert tight.batch_size <= 5 or tight.vmap_size < 4
    with pytest.warns(RuntimeWarning, match="memory_budget"):
        mc.plan(apply_fn, params, gaussian_perturb, x, 10, vmap_size=4, batch_size=N_EX,
                memory_budget=1000)


def test_plan_keeps_steps_of_at_least_min_batch(problem, monkeypatch):
    """Large activations per example do not shrink the default step below
    MIN_BATCH examples (tiny steps make every matrix product tiny) unless the
    memory budget says so."""
    params, x, _ = problem
    monkeypatch.setattr(mc, "STEP_BYTES", {"cpu": 1})
    p = mc.plan(apply_fn, params, gaussian_perturb, x, 10)
    assert p.n_batches == -(-N_EX // mc.MIN_BATCH)
    small = mc.plan(apply_fn, params, gaussian_perturb, x, 10, vmap_size=1,
                    memory_budget=p.param_bytes + 4 * p.activation_bytes)
    assert small.batch_size <= 4


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_runs=0), "n_runs"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(batch_size=0), "batch_size"),
    (dict(vmap_size=0), "vmap_size"),
    (dict(memory_budget=0), "memory_budget"),
    (dict(lowering="im2col"), r"lowering must be one of \['gemm', 'vmap'\]"),
])
def test_bad_sizes_raise(problem, kwargs, match):
    params, x, y = problem
    args = dict(n_runs=4)
    args.update(kwargs)
    n_runs = args.pop("n_runs")
    with pytest.raises(ValueError, match=match):
        mc.evaluate(jax.random.key(0), apply_fn, params, gaussian_perturb, x, y, n_runs,
                    progress=False, **args)


def test_bad_data_raise(problem):
    params, x, y = problem
    k = jax.random.key(0)
    with pytest.raises(ValueError, match="x and y"):
        mc.evaluate(k, apply_fn, params, gaussian_perturb, x, y[:-1], 2)
    with pytest.raises(ValueError, match=r"y must hold labels in \[0, 9\]"):
        mc.evaluate(k, apply_fn, params, gaussian_perturb, x, y.at[0].set(10), 2)
    with pytest.raises(ValueError, match="y must hold integer"):
        mc.evaluate(k, apply_fn, params, gaussian_perturb, x, y.astype(jnp.float32), 2)
    with pytest.raises(ValueError, match="y must be a 1-D"):
        mc.evaluate(k, apply_fn, params, gaussian_perturb, x, y[:, None], 2)
    bad = jax.tree.map(lambda a: a, params)
    bad["dense"]["kernel"] = bad["dense"]["kernel"].at[0, 0].set(jnp.nan)
    with pytest.raises(ValueError, match=r"params.*dense.*kernel.*finite"):
        mc.evaluate(k, apply_fn, bad, gaussian_perturb, x, y, 2)
    bad["dense"]["kernel"] = params["dense"]["kernel"].at[0, 0].set(jnp.inf)
    with pytest.raises(ValueError, match="params"):
        mc.evaluate(k, apply_fn, bad, gaussian_perturb, x, y, 2)


# ---------------------------------------------------------------------------
# Perturbation states as data: many states, one program
# ---------------------------------------------------------------------------

SIGMAS = (0.05, 0.2, 0.3, 0.5)


def test_evaluate_many_equals_loop_of_single_states(problem):
    """Stacked sigma states give, bit for bit, what one evaluation per sigma
    gives; the results are yielded in order as each state finishes."""
    params, x, y = problem
    states = [jnp.float32(s) for s in SIGMAS]
    many = mc.evaluate_many(jax.random.key(7), apply_fn, params, gaussian_perturb, states, x,
                            y, N_RUNS, chunk_size=6, progress=False)
    order = [i for i, _ in mc.iter_many(jax.random.key(7), apply_fn, params, gaussian_perturb,
                                        states, x, y, N_RUNS, chunk_size=6, progress=False)]
    assert order == list(range(len(SIGMAS)))
    means = []
    for s, r in zip(states, many):
        one = mc.evaluate(jax.random.key(7), apply_fn, params, gaussian_perturb, x, y, N_RUNS,
                          state=s, progress=False)
        np.testing.assert_array_equal(r.accuracy, one.accuracy)
        np.testing.assert_array_equal(r.loss, one.loss)
        assert (r.clean_accuracy, r.clean_loss) == (one.clean_accuracy, one.clean_loss)
        means.append(r.summary.mean)
    # the sigma state matters: more noise, lower accuracy
    assert means[0] > means[-1]


@pytest.mark.filterwarnings("ignore:Monte-Carlo working set")
def test_evaluate_many_blocks_states_under_a_small_budget(problem):
    """States that do not fit a quarter of the budget go in blocks (padded to
    the same size, one program): same numbers."""
    params, x, y = problem
    states = [jax.tree.map(lambda w, s=s: jnp.full(w.shape, s, jnp.float32), params)
              for s in SIGMAS[:3]]

    def per_weight(key, p, sig):  # a state of per-weight relative sigmas
        return jax.tree.map(lambda w, s, e: w + s * e, p, sig,
                            jax.tree.map(lambda w: _rand.normal(key, w.shape), p))

    state_bytes = sum(a.size * 4 for a in jax.tree.leaves(states[0]))
    pl = mc.plan(apply_fn, params, per_weight, x, N_RUNS, state=states[0], n_states=3,
                 memory_budget=4 * state_bytes + 1, batch_size=8, vmap_size=2)
    assert pl.states_per_call == 1 and pl.n_states == 3
    kw = dict(batch_size=8, vmap_size=2, progress=False)
    blocked = mc.evaluate_many(jax.random.key(5), apply_fn, params, per_weight, states, x, y,
                               N_RUNS, memory_budget=4 * state_bytes + 1, **kw)
    whole = mc.evaluate_many(jax.random.key(5), apply_fn, params, per_weight, states, x, y,
                             N_RUNS, **kw)
    for a, b in zip(blocked, whole):
        np.testing.assert_array_equal(a.accuracy, b.accuracy)
        np.testing.assert_array_equal(a.loss, b.loss)


def test_new_states_reuse_the_compiled_program(problem):
    params, x, y = problem
    mc.evaluate(jax.random.key(1), apply_fn, params, gaussian_perturb, x, y, 4,
                state=jnp.float32(0.1), progress=False)
    before = mc._chunk_fn.cache_info()
    for s in (0.2, 0.4):
        mc.evaluate(jax.random.key(1), apply_fn, params, gaussian_perturb, x, y, 4,
                    state=jnp.float32(s), progress=False)
    after = mc._chunk_fn.cache_info()
    assert after.misses == before.misses and after.hits == before.hits + 2


def test_perturbation_and_states_checked(problem):
    params, x, y = problem
    k = jax.random.key(0)
    with pytest.raises(ValueError, match=r"\(key, params, state\)"):
        mc.evaluate(k, apply_fn, params, lambda key, p: p, x, y, 2)
    with pytest.raises(ValueError, match="perturbation must be"):
        mc.evaluate(k, apply_fn, params, "gaussian", x, y, 2)
    with pytest.raises(ValueError, match="at least one"):
        mc.evaluate_many(k, apply_fn, params, gaussian_perturb, [], x, y, 2)
    with pytest.raises(ValueError, match=r"states\[1\]"):
        mc.evaluate_many(k, apply_fn, params, gaussian_perturb,
                         [jnp.float32(0.1), jnp.ones(2)], x, y, 2)
    with pytest.raises(ValueError, match=r"states\[1\] must have dtype"):
        mc.evaluate_many(k, apply_fn, params, gaussian_perturb,
                         [jnp.float32(0.1), jnp.int32(1)], x, y, 2)


# ---------------------------------------------------------------------------
# Stochastic forward passes: one key per example
# ---------------------------------------------------------------------------

def noisy_apply(params, x, keys):
    """The tiny CNN with logit noise drawn from each example's own key."""
    noise = jax.vmap(lambda k: jax.random.normal(k, (10,)))(keys)
    return apply_fn(params, x) + 0.7 * noise


def test_forward_keys_are_per_example_and_match_a_loop(problem):
    params, x, y = problem
    key = jax.random.key(11)
    kw = dict(forward_keys=True, progress=False, lowering="vmap")
    res = mc.evaluate(key, noisy_apply, params, identity_perturb, x, y, 6, batch_size=16,
                      **kw)
    other = mc.evaluate(key, noisy_apply, params, identity_perturb, x, y, 6, batch_size=32,
                        chunk_size=2, **kw)
    np.testing.assert_array_equal(res.accuracy, other.accuracy)  # batching does not matter
    f = jax.jit(noisy_apply)
    for i, k in enumerate(jax.random.split(key, 6)):
        base = jax.random.fold_in(k, mc.FORWARD_STREAM)
        keys = jax.vmap(jax.random.fold_in, (None, 0))(base, jnp.arange(N_EX))
        acc = float(np.mean(np.asarray(jnp.argmax(f(params, x, keys), -1)) == np.asarray(y)))
        assert res.accuracy[i] == acc
    assert len(np.unique(res.accuracy)) > 1  # the forward noise matters
    gemm = mc.evaluate(key, noisy_apply, params, identity_perturb, x, y, 6,
                       forward_keys=True, progress=False, lowering="gemm", batch_size=16)
    np.testing.assert_array_equal(gemm.accuracy, res.accuracy)


def test_summary_tail_metrics_kpp_and_probability_below_threshold():
    acc = np.linspace(0.0, 1.0, 1001)
    s = mc.summarize(acc, kpp=(0.1, 2.5), threshold=0.25)
    assert s.kpp() == s.p1 == pytest.approx(0.01)
    assert s.kpp(0.1) == pytest.approx(0.001) and s.kpp(2.5) == pytest.approx(0.025)
    assert s.kpp(5) == s.p5
    assert dict(s.percentiles) == pytest.approx({0.1: 0.001, 1.0: 0.01, 2.5: 0.025, 5.0: 0.05})
    assert s.threshold == 0.25 and s.p_below == pytest.approx(250 / 1001)   # strictly below
    with pytest.raises(ValueError, match="k must be one of"):
        s.kpp(10)
    plain = mc.summarize(acc)
    assert plain.threshold is None and plain.p_below is None
    assert plain[:8] == s[:8]                    # the original fields are unchanged
    with pytest.raises(ValueError, match="kpp"):
        mc.summarize(acc, kpp=(101,))
    with pytest.raises(ValueError, match="threshold"):
        mc.summarize(acc, threshold=float("nan"))


# ---------------------------------------------------------------------------
# Several processes (jax.distributed, CPU with gloo collectives)
# ---------------------------------------------------------------------------

_PROCESS_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address="localhost:{port}", num_processes=2,
                               process_id=int(sys.argv[1]))
    sys.path.insert(0, {tests_dir!r})
    import test_montecarlo as t
    from swimjax import montecarlo as mc
    params = t._init(jax.random.key(0))
    x = t._rand.normal(jax.random.key(1), (t.N_EX, 8, 8, 1))
    y = jax.numpy.argmax(t.apply_fn(t.gaussian_perturb(jax.random.key(2), params, 0.1), x),
                         -1).astype(jax.numpy.int32)
    many = mc.evaluate_many(jax.random.key(7), t.apply_fn, params, t.gaussian_perturb,
                            [jax.numpy.float32(s) for s in (0.3, 0.1)], x, y, t.N_RUNS,
                            chunk_size=7, progress=False)
    print(json.dumps(dict(n_devices=len(jax.devices()), process=jax.process_index(),
                          accuracy=[r.accuracy.tolist() for r in many],
                          loss=[r.loss.tolist() for r in many],
                          clean=many[0].clean_accuracy)))
""")


def _evaluate_many_here(problem):
    """What _PROCESS_SCRIPT computes (its problem is ``problem``), in this process."""
    params, x, y = problem
    many = mc.evaluate_many(jax.random.key(7), apply_fn, params, gaussian_perturb,
                            [jnp.float32(s) for s in (0.3, 0.1)], x, y, N_RUNS,
                            chunk_size=7, progress=False)
    return dict(accuracy=[r.accuracy.tolist() for r in many],
                loss=[r.loss.tolist() for r in many], clean=many[0].clean_accuracy)


@pytest.mark.slow
def test_two_processes_equal_one_process_with_two_devices(problem, base_result):
    """Runs split over 2 processes (1 CPU device each, gloo: 2 devices in all)
    give every process the numbers of one process, bit for bit: this one, on
    its own devices (the numbers do not depend on the device count:
    test_identical_across_device_counts)."""
    script = _PROCESS_SCRIPT.format(port=distributed.free_port(),
                                    tests_dir=os.path.dirname(__file__))
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(i)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr[-3000:]
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    assert [o["n_devices"] for o in outs] == [2, 2] and {o["process"] for o in outs} == {0, 1}
    assert outs[0]["accuracy"] == outs[1]["accuracy"] and outs[0]["loss"] == outs[1]["loss"]
    one = _evaluate_many_here(problem)
    for k in ("accuracy", "loss", "clean"):
        assert outs[0][k] == one[k], k
    np.testing.assert_array_equal(outs[0]["accuracy"][0], base_result.accuracy)

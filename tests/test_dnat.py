"""Tests of swimjax.dnat and experiments/dnat.py: the configuration's checks,
the points a configuration runs, a tiny end-to-end run (rows, files, resume
after an interruption, no reuse of another configuration's rows), the
binary's one-line errors, and Monte-Carlo under the error model independent
of batch size, chunking and device count."""

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

from experiments import _cli
from swimjax import crossbar, dnat, mac_error, montecarlo, quantizers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ROW_KEYS = ("model", "dataset", "training", "gradient", "quantizer", "error_model", "macro",
            "acc_mean", "acc_std", "acc_sem", "acc_p1", "acc_p5", "clean_acc", "mc_runs",
            "seed")


# ------------------------------------------------------------------ the config

@pytest.mark.parametrize("kwargs, match", [
    (dict(model="lenet5"), "model must be one of"),
    (dict(macro="sram"), "macro must be one of"),
    (dict(trainings=("float", "sgd")), "trainings must be one of"),
    (dict(trainings=()), "trainings must name at least one"),
    (dict(gradients=("reinforce",)), "gradients must be one of"),
    (dict(quantizers=("minmax",)), "quantizers must be one of"),
    (dict(error_model="harsh"), "error_model must be one of"),
    (dict(error_model="table.txt"), r"\.npz/\.csv"),
    (dict(epochs=0), "epochs"),
    (dict(learning_rate=0.0), "learning_rate"),
    (dict(batch_size=0), "batch_size"),
    (dict(mc_runs=0), "mc_runs"),
    (dict(seed=-1), "seed"),
    (dict(n_train=0), "n_train"),
    (dict(rows=0), "rows"),
    (dict(adc_bits=0), "adc_bits"),
    (dict(adc_range=0.0), "adc_range"),
    (dict(adc_range=1.5), "adc_range"),
    (dict(dac_bits=17), "dac_bits"),
    (dict(calibration_percentile=0.0), "calibration_percentile"),
    (dict(calibration_percentile=101.0), "calibration_percentile"),
    (dict(start="qat", trainings=("float", "dnat")), "start='qat' needs 'qat'"),
    (dict(start="adam"), "start must be one of"),
])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dnat.DnatConfig(**kwargs)


def test_config_dedups_and_resolves_the_macro():
    c = dnat.DnatConfig(trainings=("qat", "qat", "float"), adc_range=0.25, weight_bits=1)
    assert c.trainings == ("qat", "float")
    m = c.macro_config()
    assert (m.adc_range, m.weight_bits, m.cell_bits, m.rows) == (0.25, 1, 1, 64)
    assert dnat.DnatConfig(macro="rram").macro_config().adc_range == 0.25
    assert dnat.DnatConfig().macro_config().adc_range == 0.5   # the dnat preset


def test_fine_tuning_starts_from_qat_when_it_is_trained():
    """``start="auto"`` resolves on construction: the QAT model when ``qat``
    is among the trainings, else the float model; explicit values stay."""
    assert dnat.DnatConfig().start == "qat"
    assert dnat.DnatConfig(trainings=("float", "dnat")).start == "float"
    assert dnat.DnatConfig(start="float").start == "float"


def test_error_model_files_fail_with_named_errors(tmp_path):
    missing = str(tmp_path / "missing.npz")
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        dnat.error_model_for(dnat.DnatConfig(error_model=missing))
    small = tmp_path / "small.npz"       # a 4-bit ADC's table for the 7-bit macro
    np.savez(small, table=np.eye(16))
    with pytest.raises(ValueError, match=r"small\.npz.*128"):
        dnat.error_model_for(dnat.DnatConfig(error_model=str(small)))
    bad = tmp_path / "bad.npz"
    t = np.eye(128)
    t[5, 5] = -1.0
    np.savez(bad, table=t)
    with pytest.raises(ValueError, match=r"bad\.npz.*row 5"):
        dnat.error_model_for(dnat.DnatConfig(error_model=str(bad)))
    good = tmp_path / "good.npz"
    np.savez(good, table=np.eye(128))
    em = dnat.error_model_for(dnat.DnatConfig(error_model=str(good)))
    np.testing.assert_array_equal(np.asarray(em.table), np.eye(128))
    with pytest.raises(ValueError, match=r"good\.npz.*16"):   # a 4-bit ADC: 16 codes
        dnat.error_model_for(dnat.DnatConfig(error_model=str(good), adc_bits=4))


def test_error_model_presets_are_drawn_from_the_seed():
    a = dnat.error_model_for(dnat.DnatConfig(error_model="severe", seed=0))
    b = dnat.error_model_for(dnat.DnatConfig(error_model="severe", seed=0))
    c = dnat.error_model_for(dnat.DnatConfig(error_model="severe", seed=1))
    np.testing.assert_array_equal(np.asarray(a.table), np.asarray(b.table))
    assert not np.array_equal(np.asarray(a.table), np.asarray(c.table))
    assert np.shape(a.table)[-1] == 128


# ------------------------------------------------------------------- points

def _pts(**kw):
    return [(p.training, p.gradient, p.quantizer) for p in dnat.points(dnat.DnatConfig(**kw))]


def test_points_default_order():
    assert _pts() == [
        ("float", "-", "fixed"), ("qat", "-", "epact"), ("anat", "statistical", "epact"),
        ("dnat", "statistical", "epact"), ("dnat", "ste", "epact"),
        ("dnat", "statistical", "pact"), ("dnat", "statistical", "fixed")]


@pytest.mark.parametrize("kw, want", [
    (dict(trainings=("dnat",), gradients=("ste",), quantizers=("pact",)),
     [("dnat", "ste", "pact")]),
    (dict(trainings=("dnat", "qat"), gradients=("ste", "statistical"), quantizers=("fixed",)),
     [("dnat", "ste", "fixed"), ("dnat", "statistical", "fixed"), ("qat", "-", "fixed")]),
    (dict(trainings=("anat",), gradients=("ste", "statistical"), quantizers=("pact", "epact")),
     [("anat", "ste", "pact")]),
    (dict(trainings=("float",), quantizers=("epact",)), [("float", "-", "fixed")]),
    (dict(trainings=("dnat",), gradients=("statistical", "ste"),
          quantizers=("epact", "pact", "fixed")),
     [("dnat", "statistical", "epact"), ("dnat", "ste", "epact"),
      ("dnat", "statistical", "pact"), ("dnat", "statistical", "fixed")]),
])
def test_points_combinations(kw, want):
    got = _pts(**kw)
    assert got == want
    assert len(set(got)) == len(got)  # every point once


# ----------------------------------------------------------- end to end (tiny)

# 2 ADC tables, not the default 16: a run builds the Gaussian twin of every
# table (mac_error.gaussian_like), about half a second per table
TINY = dict(n_train=256, n_test=100, float_epochs=1, epochs=1, mc_runs=2, batch_size=128,
            trainings=("float", "qat", "dnat"), gradients=("statistical",),
            quantizers=("epact",), layers="Dense_1", banks=2, progress=False)


class _Counter:
    """Wraps montecarlo.evaluate (called once per point); raises on call ``die_at``."""

    def __init__(self, die_at: int | None = None):
        self.calls, self.die_at = 0, die_at
        self.real = montecarlo.evaluate

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.die_at is not None and self.calls == self.die_at:
            raise KeyboardInterrupt("interrupted for the test")
        return self.real(*args, **kwargs)


def _lines(path) -> list[dict]:
    return [json.loads(s) for s in path.read_text().splitlines() if s.strip()]


@pytest.mark.slow
def test_run_dnat_end_to_end_resume_and_no_reuse(tmp_path, monkeypatch):
    out = tmp_path / "run"
    config = dnat.DnatConfig(**TINY)
    n_points = len(dnat.points(config))
    # interrupted after the first point: its row is written, the rest are not
    first = _Counter(die_at=2)
    monkeypatch.setattr(dnat.montecarlo, "evaluate", first)
    with pytest.raises(KeyboardInterrupt):
        dnat.run_dnat(config, str(out))
    assert len(_lines(out / "results.jsonl")) == 1
    # resumed: only the missing points run, one row per point
    again = _Counter()
    monkeypatch.setattr(dnat.montecarlo, "evaluate", again)
    rows = dnat.run_dnat(config, str(out))
    assert again.calls == n_points - 1
    assert len(rows) == n_points == len(_lines(out / "results.jsonl"))
    assert {(r["training"], r["gradient"], r["quantizer"]) for r in rows} == {
        (p.training, p.gradient, p.quantizer) for p in dnat.points(config)}
    for r in rows:
        for k in ROW_KEYS:
            assert k in r, k
        assert r["mc_runs"] == 2 and r["seed"] == 0 and r["model"] == "lenet"
        assert r["error_model"] == "macro_like" and r["macro"] == "dnat"
        for k in ("acc_mean", "acc_p1", "acc_p5", "clean_acc"):
            assert 0.0 <= r[k] <= 1.0, k
        assert r["acc_std"] >= 0 and r["acc_sem"] >= 0
        assert r["acc_p1"] <= r["acc_p5"] <= r["acc_mean"] + 1e-9
    for name in ("results.jsonl", "accuracy.png", "summary.md"):
        assert (out / name).stat().st_size > 0, name
    summary = (out / "summary.md").read_text()
    assert "qat" in summary and "dnat" in summary
    # complete: nothing runs again
    done = _Counter()
    monkeypatch.setattr(dnat.montecarlo, "evaluate", done)
    assert len(dnat.run_dnat(config, str(out))) == n_points and done.calls == 0
    # another error model: a new configuration, no row reused, old rows kept in the file
    other = dnat.DnatConfig(**dict(TINY, error_model="mild", trainings=("float",)))
    fresh = _Counter()
    monkeypatch.setattr(dnat.montecarlo, "evaluate", fresh)
    rows2 = dnat.run_dnat(other, str(out))
    assert fresh.calls == 1 and len(rows2) == 1
    assert rows2[0]["error_model"] == "mild"
    assert rows2[0]["config_id"] != rows[0]["config_id"]
    assert len(_lines(out / "results.jsonl")) == n_points + 1


# ------------------------------------------------------------------ the binary

def _run_binary(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "experiments.dnat", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("extra, fragments", [
    (["--trainings=float,sgd"], ["trainings", "sgd"]),
    (["--gradients=reinforce"], ["gradients", "reinforce"]),
    (["--quantizers=minmax"], ["quantizers", "minmax"]),
    (["--error_model=harsh"], ["error_model", "harsh"]),
    (["--error_model={tmp}/missing.npz"], ["missing.npz", "does not exist"]),
    (["--error_model={tmp}/small.npz"], ["small.npz", "128"]),
    (["--epochs=0"], ["epochs", "[1, inf]"]),
    (["--mc_runs=0"], ["mc_runs", "[1, inf]"]),
    (["--adc_range=1.5"], ["adc_range"]),
    (["--rows=0"], ["rows"]),
    (["--calibration_percentile=0"], ["calibration_percentile"]),
    (["--start=qat", "--trainings=float,dnat"], ["start", "qat"]),
    (["positional"], ["unexpected arguments"]),
])
def test_binary_rejects_bad_flags_in_one_line(tmp_path, extra, fragments):
    np.savez(tmp_path / "small.npz", table=np.eye(16))
    out = tmp_path / "out"
    args = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    proc = _run_binary(f"--out_dir={out}", *args)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == _cli.EXIT_USER_ERROR, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in last, (fragment, last)
    assert not out.exists()


# ------------------------------------------------- determinism of Monte-Carlo

TINY_MACRO = crossbar.MacroConfig(rows=8, dac_bits=4, weight_bits=3, cell_bits=1, adc_bits=4,
                                  adc_range=0.5)
N_EX, N_RUNS = 24, 5


def _mlp_apply(p, x):
    h = jax.nn.relu(x @ p["d0"]["kernel"])
    h = jax.nn.relu(h @ p["d1"]["kernel"])
    return h @ p["d2"]["kernel"]


def tiny_problem():
    """A 3-layer MLP whose middle layer runs on a 4-bit-ADC macro with a
    severe synthetic error model; ``(apply(variables, x, keys), variables, x, y)``."""
    k = jax.random.split(jax.random.key(0), 4)
    p = {"d0": {"kernel": jax.random.normal(k[0], (12, 20)) / 3},
         "d1": {"kernel": jax.random.normal(k[1], (20, 16)) / 4},
         "d2": {"kernel": jax.random.normal(k[2], (16, 5)) / 4}}
    x = jax.random.uniform(k[3], (N_EX, 12))
    y = jnp.argmax(_mlp_apply(p, x), -1).astype(jnp.int32)
    qcfg = quantizers.QuantizerConfig(kind="epact", bits=TINY_MACRO.dac_bits)
    em = mac_error.synthetic(jax.random.key(3), TINY_MACRO.n_codes, "severe")
    macro = crossbar.transform(_mlp_apply, p, x, TINY_MACRO, qcfg, error_model=em)
    bounds = crossbar.calibrate_bounds(_mlp_apply, p, x, macro.paths, qcfg)
    variables = {"params": {"net": p, "bounds": bounds}}

    def apply(variables, x, keys):
        return macro.fn(variables["params"]["net"], variables["params"]["bounds"], x, keys)

    return apply, variables, x, y


def _identity(key, params, state):
    del key, state
    return params


def _mc(batch_size, chunk_size, lowering="vmap"):
    apply, variables, x, y = tiny_problem()
    return montecarlo.evaluate(jax.random.key(5), apply, variables, _identity, x, y, N_RUNS,
                               batch_size=batch_size, chunk_size=chunk_size,
                               forward_keys=True, lowering=lowering, progress=False)


def test_mc_under_the_error_model_ignores_batch_and_chunk_sizes():
    a = _mc(batch_size=24, chunk_size=5)
    b = _mc(batch_size=7, chunk_size=2)
    c = _mc(batch_size=1, chunk_size=1)
    np.testing.assert_array_equal(a.accuracy, b.accuracy)
    np.testing.assert_array_equal(a.accuracy, c.accuracy)
    np.testing.assert_allclose(a.loss, b.loss, rtol=1e-5)
    assert len(np.unique(a.accuracy)) > 1 or a.accuracy[0] < 1.0  # the draws matter


_DEVICE_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    sys.path.insert(0, {tests_dir!r})
    import test_dnat as t
    res = t._mc(batch_size=6, chunk_size=3)
    print(json.dumps(dict(n_devices=len(jax.devices()), accuracy=res.accuracy.tolist(),
                          loss=res.loss.tolist())))
""")


def _mc_with_devices(n: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
    script = _DEVICE_SCRIPT.format(tests_dir=os.path.dirname(__file__))
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_mc_under_the_error_model_ignores_device_count():
    """Another process with 2 devices gives this process's accuracies (on its
    own devices: one, unless $XLA_FLAGS says otherwise, and then the other
    process has 1), at another batch and chunk size too."""
    here = len(jax.devices())
    n = 2 if here != 2 else 1
    other = _mc_with_devices(n)
    assert other["n_devices"] == n != here
    assert other["accuracy"] == _mc(batch_size=6, chunk_size=3).accuracy.tolist()
    np.testing.assert_array_equal(other["accuracy"], _mc(batch_size=24, chunk_size=5).accuracy)

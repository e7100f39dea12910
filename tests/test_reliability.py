"""Drift and stuck-at experiments: the perturbations, write-verify with stuck
devices, the binary end to end, resume after an interruption."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from swimjax import devices as dv
from swimjax import mapping, montecarlo, programming, reliability, sweep
from swimjax import write_verify as wv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(mc_runs=3, n_train=256, n_test=100, train_epochs=1, progress=False)


# ---------------------------------------------------------------------------
# Write-verify with stuck devices
# ---------------------------------------------------------------------------

def _reference_stuck_loop(key, target, verify, stuck, device, cfg):
    """The explicit loop of swimjax.write_verify with stuck devices pinned
    after the open-loop write and after every pulse, written out plainly."""
    value = jnp.where(stuck.at_min, 0.0, 1.0)
    is_stuck = stuck.at_min | stuck.at_max
    pin = lambda g: jnp.where(is_stuck, value, g)  # noqa: E731
    g = pin(dv.program(wv.program_key(key), target, device))
    active = np.asarray(verify).copy()
    cycles = np.ones(target.shape, np.int64)
    failed = np.zeros(target.shape, bool)
    it = 1
    while active.any():
        k_read, k_pulse = wv.iteration_keys(key, it)
        err = np.asarray(dv.read(k_read, g, device) - target)
        inside = np.abs(err) <= cfg.tolerance
        budget = cycles <= cfg.max_pulses
        do = active & ~inside & budget
        failed |= active & ~inside & ~budget
        active = active & ~inside & budget
        g_new = pin(dv.pulse(k_pulse, g, -cfg.gain * jnp.asarray(err), device))
        g = jnp.where(do, g_new, g)
        cycles += do
        it += 1
    return np.asarray(g), cycles, failed


@pytest.mark.parametrize("sigma_read", [0.0, 0.01])
def test_stuck_devices_are_never_repaired_and_replay_is_exact(sigma_read):
    n = 4000
    key = jax.random.key(5)
    target = jnp.round(jax.random.uniform(jax.random.key(1), (n,)) * 3) / 3
    verify = jax.random.uniform(jax.random.key(2), (n,)) < 0.7
    stuck = dv.stuck_from_uniform(jax.random.uniform(jax.random.key(3), (n,)), 0.1, 0.1)
    device = dv.DeviceConfig(sigma_program=0.1, sigma_pulse=0.1, sigma_read=sigma_read,
                             clip=True)
    cfg = wv.config_for_sigma(0.03, dv.DeviceConfig(sigma_program=0.1, sigma_pulse=0.1,
                                                    sigma_read=sigma_read))
    res = wv.explicit(device, cfg)(key, target, verify)
    got = wv.pin_stuck(key, res, target, verify, stuck, device, cfg)
    g_ref, cyc_ref, fail_ref = _reference_stuck_loop(key, target, verify, stuck, device, cfg)
    # the jitted loop and this eager one may differ in the last ulp of g
    np.testing.assert_allclose(np.asarray(got.g), g_ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(got.cycles), cyc_ref)
    np.testing.assert_array_equal(np.asarray(got.failed), fail_ref)

    s = np.asarray(stuck.at_min | stuck.at_max)
    value = np.where(np.asarray(stuck.at_min), 0.0, 1.0)
    far = s & np.asarray(verify) & (np.abs(value - np.asarray(target))
                                   > cfg.tolerance + 6 * sigma_read)
    assert far.sum() > 100
    # never converged: failed after the whole budget, pinned at its stuck value
    assert np.all(np.asarray(got.failed)[far])
    assert np.all(np.asarray(got.cycles)[far] == 1 + cfg.max_pulses)
    assert np.all(np.asarray(got.g)[s] == value[s])
    # unverified stuck devices cost their one write and are not counted failed
    un = s & ~np.asarray(verify)
    assert np.all(np.asarray(got.cycles)[un] == 1) and not np.any(np.asarray(got.failed)[un])


def _params():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {"dense": {"kernel": jax.random.normal(k1, (48, 32)), "bias": jnp.zeros(32)},
            "out": {"kernel": jax.random.normal(k2, (32, 10))}}


def test_program_with_faults_counts_and_no_faults_is_program_params():
    params = _params()
    mcfg = mapping.MappingConfig(weight_bits=8, device_bits=2, sign="differential")
    device = dv.DeviceConfig(sigma_program=0.1, sigma_pulse=0.1, clip=True)
    cfg = wv.config_for_sigma(0.03, dv.DeviceConfig(sigma_program=0.1, sigma_pulse=0.1))
    full = jax.tree.map(lambda w: np.ones(np.shape(w), bool), params)
    key = jax.random.key(9)
    clean = reliability.program_with_faults(key, params, full, 0.0, mcfg, device, cfg)
    ref = programming.program_params(jax.random.split(key)[0], params, full, mcfg, device, cfg)
    for a, b in zip(jax.tree.leaves(clean.result.params), jax.tree.leaves(ref.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    assert int(clean.n_stuck_devices) == 0
    assert clean.result.total_cycles == ref.total_cycles
    faulty = reliability.program_with_faults(key, params, full, 0.05, mcfg, device, cfg)
    n_dev = mapping.n_devices(params, mcfg)
    assert abs(int(faulty.n_stuck_devices) / n_dev - 0.05) < 6 * np.sqrt(0.05 / n_dev)
    # roughly the stuck devices whose stuck value is not their target fail
    assert int(faulty.result.n_failed_devices) > int(clean.result.n_failed_devices) + 0.3 * int(
        faulty.n_stuck_devices)
    assert faulty.result.total_cycles > clean.result.total_cycles
    with pytest.raises(ValueError, match="p_stuck"):
        reliability.program_with_faults(key, params, full, 1.5, mcfg, device, cfg)


# ---------------------------------------------------------------------------
# Drift as a perturbation
# ---------------------------------------------------------------------------

def test_drift_perturbation_uniform_drift_compensated_exactly():
    params = _params()
    mcfg = mapping.MappingConfig(weight_bits=8, device_bits=2, sign="differential")
    preset = dv.DevicePreset(dv.DeviceConfig(clip=True, g_min_us=5.0, g_max_us=50.0),
                             drift=dv.DriftConfig(nu_mean=0.08, nu_std=0.0))
    pert = reliability.drift_perturbation(mcfg, preset, sigma_d=0.0, sigma_wv=0.0)
    q = {"dense": {"kernel": mapping.quantize(params["dense"]["kernel"], mcfg),
                   "bias": params["dense"]["bias"]},
         "out": {"kernel": mapping.quantize(params["out"]["kernel"], mcfg)}}
    key = jax.random.key(4)
    for t in (0.0, 86400.0, 315360000.0):
        comp = pert.apply(key, params, pert.init(params, t_after=t, compensate=True))
        raw = pert.apply(key, params, pert.init(params, t_after=t, compensate=False))
        factor = ((t + 20.0) / 20.0) ** -0.08
        for a, b, c in zip(jax.tree.leaves(comp), jax.tree.leaves(raw), jax.tree.leaves(q)):
            if a.ndim == 1:   # digital bias: exact
                np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
                continue
            np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(np.asarray(b), factor * np.asarray(c), rtol=1e-4,
                                       atol=1e-5)


def test_drift_states_of_one_program_and_pcm_spread_grows():
    params = _params()
    mcfg = mapping.MappingConfig(weight_bits=8, device_bits=2, sign="differential")
    pert = reliability.drift_perturbation(mcfg, dv.preset("pcm"), sigma_d=0.0, sigma_wv=0.0,
                                          read_noise=False)
    key = jax.random.key(2)
    times = [0.0, 3600.0, 315360000.0]
    states = [pert.init(params, t_after=t, compensate=True) for t in times]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *states)
    out = jax.jit(jax.vmap(pert.apply, in_axes=(None, None, 0)))(key, params, stacked)
    w = np.asarray(out["dense"]["kernel"])
    q = np.asarray(mapping.quantize(params["dense"]["kernel"], mcfg))
    err = [np.std(w[i] - q) for i in range(3)]
    assert err[0] < 1e-5 < err[1] < err[2]           # no drift at t = 0; spread grows with t
    eager = pert.apply(key, params, states[2])
    np.testing.assert_allclose(np.asarray(eager["dense"]["kernel"]), w[2], rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("bad, match", [
    (dict(mode="aging"), "mode"),
    (dict(schemes=("none", "most")), "schemes"),
    (dict(swim_budget=1.0), "swim_budget"),
    (dict(times=(1.0, -5.0)), "times"),
    (dict(fault_rates=(0.0, 1.2)), "fault_rates"),
    (dict(mode="faults", sigma_d=None), "sigma_d"),
    (dict(mode="faults", sigma_wv=0.2), "sigma_wv"),
    (dict(device="rram"), "no drift model"),
    (dict(device="flash"), "device must be one of"),
    (dict(kpp=120.0), "kpp"),
    (dict(sign="both"), "sign"),
])
def test_bad_config(bad, match):
    with pytest.raises(ValueError, match=match):
        reliability.ReliabilityConfig(**bad)


def test_identity_covers_preset_file_values(tmp_path):
    path = tmp_path / "dev.json"
    path.write_text(json.dumps({"device": {"clip": True}, "drift": {"nu_mean": 0.05}}))
    a = reliability.ReliabilityConfig(device=str(path))
    path.write_text(json.dumps({"device": {"clip": True}, "drift": {"nu_mean": 0.06}}))
    b = reliability.ReliabilityConfig(device=str(path))

    class _Prep:
        weights_sha256 = "w"

        class data:
            x_test = np.zeros(3)
            y_test = np.zeros(3)

    ia, ib = reliability.identity(a, _Prep), reliability.identity(b, _Prep)
    assert ia["preset"]["drift"]["nu_mean"] == 0.05
    assert sweep.config_id(ia) != sweep.config_id(ib)


# ---------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------

def _rows(out_dir):
    with open(os.path.join(out_dir, "results.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_drift_resumes_after_interruption(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    config = reliability.ReliabilityConfig(times=(1.0, 86400.0), schemes=("none", "full"),
                                           **TINY)
    real = montecarlo.iter_many

    def dying(*args, **kwargs):
        for i, (s, r) in enumerate(real(*args, **kwargs)):
            if i == 3:
                raise KeyboardInterrupt("killed after 3 states")
            yield s, r

    monkeypatch.setattr(montecarlo, "iter_many", dying)
    with pytest.raises(KeyboardInterrupt):
        reliability.run(config, out)
    first = _rows(out)
    assert len(first) == 3
    monkeypatch.setattr(montecarlo, "iter_many", real)
    rows = reliability.run(config, out)
    assert len(rows) == len(_rows(out)) == 8     # 2 schemes x 2 compensation x 2 times
    assert _rows(out)[:3] == first               # finished rows were kept, not redone
    keys = {(r["scheme"], r["compensated"], r["t_seconds"]) for r in rows}
    assert len(keys) == 8
    for r in rows:
        assert r["acc_min"] <= r["acc_kpp"] == r["acc_p1"] <= r["acc_p5"] <= r["acc_max"]
        assert 0.0 <= r["p_below_threshold"] <= 1.0 and r["kpp"] == 1.0
        assert r["preset"]["name"] == "pcm"
    by = {(r["scheme"], r["compensated"], r["t_seconds"]): r for r in rows}
    # common random numbers: at 1 s compensation hardly matters, same chips
    assert abs(by[("full", True, 1.0)]["acc_mean"] - by[("full", False, 1.0)]["acc_mean"]) < 0.05
    summary = open(os.path.join(out, "summary.md")).read()
    assert "Device preset `pcm`" in summary and "1 day" in summary
    assert os.path.getsize(os.path.join(out, "accuracy_vs_time.png")) > 10_000
    # nothing left to do: the file is unchanged
    before = open(os.path.join(out, "results.jsonl")).read()
    monkeypatch.setattr(montecarlo, "iter_many", dying)
    reliability.run(config, out)
    assert open(os.path.join(out, "results.jsonl")).read() == before


def _run(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "experiments.drift", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_binary_faults_end_to_end(tmp_path):
    proc = _run("--mode=faults", "--fault_rates=0,0.05", "--schemes=none,full", "--mc_runs=2",
                "--n_train=256", "--n_test=100", "--train_epochs=1", "--progress=false",
                f"--out_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {(r["scheme"], r["p_stuck"]): r for r in _rows(tmp_path)}
    assert set(rows) == {("none", 0.0), ("none", 0.05), ("full", 0.0), ("full", 0.05)}
    assert rows[("none", 0.05)]["failed_devices"] == 0
    assert rows[("full", 0.05)]["failed_devices"] > rows[("full", 0.0)]["failed_devices"]
    assert rows[("full", 0.05)]["total_cycles"] > rows[("full", 0.0)]["total_cycles"]
    assert rows[("full", 0.0)]["nwc_cycles"] == 1.0
    stuck = rows[("full", 0.05)]["stuck_devices"] / rows[("full", 0.05)]["n_devices"]
    assert 0.04 < stuck < 0.06
    assert "Device preset `rram`" in open(os.path.join(tmp_path, "summary.md")).read()
    assert os.path.exists(os.path.join(tmp_path, "accuracy_vs_faults.png"))


@pytest.mark.slow
def test_binary_drift_with_preset_file(tmp_path):
    path = tmp_path / "dev.json"
    path.write_text(json.dumps({"name": "slow_pcm", "source": "test",
                                "device": {"clip": True, "g_min_us": 1.0, "g_max_us": 25.0},
                                "drift": {"nu_mean": 0.05, "nu_std": 0.02}}))
    proc = _run(f"--device={path}", "--times=1,31536000", "--schemes=none",
                "--compensation=on", "--mc_runs=2", "--n_train=256", "--n_test=100",
                "--train_epochs=1", "--progress=false", f"--out_dir={tmp_path / 'out'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = _rows(tmp_path / "out")
    assert len(rows) == 2 and all(r["preset"]["name"] == "slow_pcm" for r in rows)
    assert "slow_pcm" in proc.stdout and "1 year" in proc.stdout


@pytest.mark.parametrize("args, fragment", [
    (("--device=flash",), "device must be one of"),
    (("--mode=faults", "--sigma_d=preset"), "sigma_d must be a number"),
    (("--fault_rates=0,2",), "--fault_rates"),
    (("--schemes=none,most",), "--schemes"),
    (("--sigma_d=abc",), "--sigma_d"),
])
def test_binary_rejects_bad_flags_in_one_line(tmp_path, args, fragment):
    proc = _run(*args, f"--out_dir={tmp_path / 'out'}")
    assert proc.returncode == 2
    assert fragment in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "out")

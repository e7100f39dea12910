"""Smoke tests: the benchmark binaries run at tiny sizes and write the JSON
keys the issues name (their timings are not asserted: machines are shared)."""

from __future__ import annotations

import ast
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(module: str, tmp_path, *args: str) -> dict:
    out = tmp_path / "out.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", module, f"--json={out}", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def _flag_default(module: str, name: str):
    """The default of absl flag ``name`` as written in ``benchmarks/<module>.py``
    (read from the source: importing it would define its flags in this process)."""
    with open(os.path.join(ROOT, "benchmarks", f"{module}.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr.startswith("DEFINE_") and node.args
                and isinstance(node.args[0], ast.Constant) and node.args[0].value == name):
            return ast.literal_eval(node.args[1])
    raise AssertionError(f"no flag {name!r} in benchmarks/{module}.py")


@pytest.mark.slow
def test_montecarlo_benchmark_runs(tmp_path):
    # the smallest run: no per-run loop baseline, no states sweep (each costs compiles)
    res = _run("benchmarks.montecarlo", tmp_path, "--n_runs=4", "--n_images=40",
               "--repeats=1", "--loop_runs=0", "--sweep_states=0", "--clean_batch_sizes=20",
               "--host_devices=2", "--gemm_n=64", "--profile", "--profile_top=3")
    for key in ("ms_per_run", "gflops", "noisy_over_clean_throughput",
                "gemm_floor_ms_per_run", "ms_per_run_vmap_lowering"):
        assert math.isfinite(res[key]) and res[key] > 0, key
    # the profile finds the lowered network's matrix products among XLA's operations
    prof = res["profile"]
    assert prof["matrix_products_ms_per_run"] > 0 and prof["other_ops_ms_per_run"] > 0
    assert len(prof["top_ops"]) == 3 and all(o["calls"] >= 1 for o in prof["top_ops"])
    assert res["lowering"] == "gemm" and res["n_devices"] == 2
    # LeNet is 0.6334 GFLOP per 1,000 images (the figure).
    assert res["gflop_per_run"] == pytest.approx(0.6334 * 40 / 1000, rel=1e-3)


@pytest.mark.slow
def test_write_verify_benchmark_runs(tmp_path):
    res = _run("benchmarks.write_verify", tmp_path, "--devices=20000", "--repeats=1")
    assert res["devices"] == 20000
    for key in ("iterations", "seconds_per_iteration", "iteration_over_elementwise"):
        assert res[key] > 0, key


@pytest.mark.slow
def test_training_benchmark_runs(tmp_path):
    res = _run("benchmarks.training", tmp_path, "--lenet_epochs=2", "--n_train=64",
               "--batch_size=32", "--convnet_steps=1", "--resnet_steps=0", "--gemm_n=64")
    # the ConvNet's steps (the ResNet-20's run the same code and compile 3x longer)
    for key in ("gemm_gflops", "lenet_speedup", "convnet_speedup"):
        assert math.isfinite(res[key]) and res[key] > 0, key
    for key in ("lenet_gemm", "lenet_xla"):
        assert res[key]["epoch_s"] > 0 and 0 < res[key]["gemm_fraction"]
        assert 0 <= res[key]["test_acc"] <= 1
    assert res["convnet_gemm"]["flops_per_step"] > 0
    # the binary runs with one device per core: on several, the 1-device run beside it
    if res["lenet_shards"] > 1:
        assert res["lenet_gemm1"]["epoch_s"] > 0 and res["lenet_data_parallel_speedup"] > 0


@pytest.mark.slow
def test_crossbar_benchmark_runs(tmp_path):
    # LeNet (3 macro layers) instead of the default ResNet-20 (20): the same code, a
    # fraction of the compile time; the default itself is checked in the source
    res = _run("benchmarks.crossbar", tmp_path, "--batch_size=2", "--repeats=1",
               "--model=lenet")
    assert res["model"] == "lenet" and res["macro_layers"] > 0
    assert _flag_default("crossbar", "model") == "resnet20"
    for group in ("forward_s", "forward_ratio"):
        for key in ("plain", "macro_ideal", "macro_error"):
            assert math.isfinite(res[group][key]) and res[group][key] > 0, (group, key)
    for key in ("plain", "dnat"):
        assert res["train_step_s"][key] > 0
        mem = res["train_memory"][key]
        assert mem["peak_bytes"] is None or mem["peak_bytes"] > 0
    assert math.isfinite(res["train_time_overhead"]) and res["train_time_overhead"] > 0


@pytest.mark.slow
def test_processes_benchmark_smoke(tmp_path):
    out = tmp_path / "p.json"
    subprocess.run([sys.executable, "-m", "benchmarks.processes", "--n_runs=2", "--n_images=8",
                    "--repeats=1", f"--json={out}"], check=True, capture_output=True, timeout=600)
    r = json.loads(out.read_text())
    assert r["identical_accuracies"] and r["throughput_ratio_two_over_one"] > 0

r"""Benchmark: Monte-Carlo throughput on 1 process against 2 local processes.

The same evaluation — the zoo LeNet (random init) on ``--n_images`` random
28x28 images, SWIM's statistical variation, ``--n_runs`` runs — is timed

* in one process with one XLA CPU device, and
* split over two processes with one CPU device each (``jax.distributed`` on
  localhost, gloo collectives), the runs sharded over both.

Each process is a fresh interpreter (this script re-run as a worker); the
figure is the wall time of the timed ``montecarlo.evaluate`` call (compiled
first, median of ``--repeats``) on process 0, and the ratio of the two
throughputs, measured in one run of this script. Both give the same
accuracies (checked). ::

    python -m benchmarks.processes --json processes.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from absl import flags

from experiments import _cli

FLAGS = flags.FLAGS
flags.DEFINE_integer("n_runs", 40, "Monte-Carlo runs.")
flags.DEFINE_integer("n_images", 500, "Images per run.")
flags.DEFINE_integer("repeats", 3, "Timed repeats (median).")
flags.DEFINE_string("json", None, "Write the results as JSON to this path.")

_WORKER = r"""
import json, statistics, sys, time
n_proc, pid, port, n_runs, n_images, repeats = sys.argv[1:7]
n_proc, pid, n_runs, n_images, repeats = map(int, (n_proc, pid, n_runs, n_images, repeats))
from swimjax import distributed
if n_proc > 1:
    distributed.initialize(f"localhost:{port}", n_proc, pid)
import jax
from swimjax import models, montecarlo, perturbation
model = models.get_model("lenet")
params = model.init(jax.random.key(0))
x = jax.random.normal(jax.random.key(1), (n_images, 28, 28, 1))
y = jax.random.randint(jax.random.key(2), (n_images,), 0, 10)
pert = perturbation.statistical(perturbation.VariationConfig(sigma_d=0.1))
state = pert.init(params)
run = lambda: montecarlo.evaluate(jax.random.key(3), model.apply_fn, params, pert, x, y,
                                  n_runs, state=state, progress=False)
res = run()
times = []
for _ in range(repeats):
    t0 = time.perf_counter(); res = run(); times.append(time.perf_counter() - t0)
print(json.dumps(dict(process=pid, devices=len(jax.devices()), seconds=statistics.median(times),
                      accuracy=res.accuracy.tolist())))
"""


def measure(n_proc: int) -> dict:
    """Process 0's report of an evaluation split over ``n_proc`` processes."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    from swimjax import distributed  # the parent computes nothing: JAX's start is harmless
    port = distributed.free_port()
    args = [str(n_proc), "{pid}", str(port), str(FLAGS.n_runs), str(FLAGS.n_images),
            str(FLAGS.repeats)]
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER,
                               *[a.format(pid=i) for a in args]],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in reversed(range(n_proc))]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=1800)
        if p.returncode != 0:
            raise RuntimeError(f"worker failed:\n{err[-2000:]}")
        outs.append(json.loads(out.strip().splitlines()[-1]))
    return next(o for o in outs if o["process"] == 0)


def main(argv: list[str]) -> None:
    _cli.no_arguments(argv)
    _cli.int_flag("n_runs", 2)
    _cli.int_flag("n_images", 1)
    _cli.int_flag("repeats", 1)
    _cli.check_output_file(FLAGS.json)
    one, two = measure(1), measure(2)
    if one["accuracy"] != two["accuracy"]:
        raise RuntimeError("1 and 2 processes gave different accuracies")
    out = {
        "n_runs": FLAGS.n_runs, "n_images": FLAGS.n_images, "cpu_count": os.cpu_count(),
        "one_process_seconds": one["seconds"], "two_processes_seconds": two["seconds"],
        "throughput_ratio_two_over_one": one["seconds"] / two["seconds"],
        "ms_per_run_one": 1e3 * one["seconds"] / FLAGS.n_runs,
        "ms_per_run_two": 1e3 * two["seconds"] / FLAGS.n_runs,
        "identical_accuracies": True,
    }
    print("Monte-Carlo throughput, 1 vs 2 processes (1 CPU device each)")
    for k in ("n_runs", "n_images", "cpu_count", "ms_per_run_one", "ms_per_run_two",
              "throughput_ratio_two_over_one"):
        v = out[k]
        print(f"  {k:<32} {v:.3f}" if isinstance(v, float) else f"  {k:<32} {v}")
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    _cli.run(main)

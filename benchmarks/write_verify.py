r"""Benchmark: explicit write-verify of a ResNet-18-sized device array.

ResNet-18 (CIFAR variant, ~11.2 M weights) at N = 8 bits on m = 2-bit devices
needs K = 4 devices per weight magnitude: ~45 M devices. The benchmark runs
:func:`swimjax.write_verify.explicit` on all of them at once and reports

* seconds per loop iteration: (time of the full run - time of a run with no
  verified device, i.e. the open-loop write alone) / iterations; both runs use
  the same compiled executable, warmed up first;
* devices x iterations per second;
* the ratio of one iteration to one plain fused elementwise pass over the
  same arrays: a jitted ``(g, state) <- (g + 0.01 * normal(key), state +
  (g > target))`` that reads ``target``, ``g`` and ``state``, draws one
  normal per device and writes ``g`` and ``state`` (buffers donated, as the
  loop updates its carry in place). A loop iteration reads the same arrays and
  writes the same ones, but draws *two* normals per device (read noise and
  pulse noise), so ~2 is the ratio when random-number generation dominates
  (on CPU) and ~1 when memory traffic does.

  python -m benchmarks.write_verify [--devices 45000000] [--json out.json]
"""

from __future__ import annotations

import json
import time

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from experiments import _cli
from swimjax import devices
from swimjax import mapping
from swimjax import write_verify as wv

FLAGS = flags.FLAGS
flags.DEFINE_integer("devices", 45_000_000, "Number of devices (ResNet-18, N=8, m=2: ~45 M).")
flags.DEFINE_integer("device_bits", 2, "Bits per device: targets are its 2^m levels.")
flags.DEFINE_float("sigma_program", 0.1, "Open-loop programming std (full-scale units).")
flags.DEFINE_float("sigma_pulse", 0.02, "Cycle-to-cycle std of a corrective pulse.")
flags.DEFINE_float("sigma_read", 0.005, "Read-noise std.")
flags.DEFINE_float("tolerance", 0.01, "Verify tolerance (full-scale units).")
flags.DEFINE_integer("max_pulses", 20, "Pulse budget per device.")
flags.DEFINE_enum("scheme", "naive", ["naive", "two_step"], "Write-verify scheme.")
flags.DEFINE_enum("prng_impl", "threefry2x32", ["threefry2x32", "rbg", "unsafe_rbg"],
                  "PRNG implementation of the key (used by both the loop and the baseline).")
flags.DEFINE_integer("repeats", 3, "Repeats of the short timings (the minimum is kept).")
flags.DEFINE_integer("seed", 0, "PRNG seed.")
flags.DEFINE_string("json", None, "Write the results as JSON to this path.")


def _timed(fn, *args):
    """(wall seconds, process CPU seconds, output) of one blocking call."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args)
    jax.block_until_ready(out)
    return time.perf_counter() - t0, time.process_time() - c0, out


def _elementwise_seconds(key, target, repeats: int) -> tuple[float, float]:
    """Minimum (wall, CPU) time of one plain fused elementwise pass over the
    loop's arrays."""

    @jax.jit
    def make(t):
        return t + 0.0, jnp.zeros(t.shape, jnp.int32)

    def one_pass(k, tgt, g, state):
        g = g + 0.01 * jax.random.normal(k, g.shape, g.dtype)
        return g, state + (g > tgt).astype(jnp.int32)

    step = jax.jit(one_pass, donate_argnums=(2, 3))
    g, state = make(target)
    g, state = step(key, target, g, state)  # compile + warm up
    jax.block_until_ready((g, state))
    wall, cpu = float("inf"), float("inf")
    for i in range(repeats):
        w, c, (g, state) = _timed(step, jax.random.fold_in(key, i + 1), target, g, state)
        wall, cpu = min(wall, w), min(cpu, c)
    del g, state
    return wall, cpu


def _configs() -> tuple[devices.DeviceConfig, wv.WriteVerifyConfig]:
    """The device and write-verify configurations of the flags (validated by
    the library, whose messages name the parameters after the flags)."""
    device = devices.DeviceConfig(sigma_program=FLAGS.sigma_program,
                                  sigma_pulse=FLAGS.sigma_pulse, sigma_read=FLAGS.sigma_read)
    cfg = wv.WriteVerifyConfig(tolerance=FLAGS.tolerance, max_pulses=FLAGS.max_pulses,
                               scheme=FLAGS.scheme)
    return device, cfg


def check_flags() -> None:
    """Every flag's range and the ``--json`` path, before any work (one-line errors)."""
    _cli.int_flag("devices", 1)
    _cli.int_flag("device_bits", 1, mapping.MAX_DEVICE_BITS)
    _cli.int_flag("repeats", 1)
    _cli.seed_flag()
    with _cli.user_errors():
        _configs()
    _cli.check_output_file(FLAGS.json)


def run() -> dict:
    n = FLAGS.devices
    key = jax.random.key(FLAGS.seed, impl=FLAGS.prng_impl)
    levels = 2 ** FLAGS.device_bits - 1
    target = (jax.random.randint(jax.random.key(FLAGS.seed + 1), (n,), 0, levels + 1)
              .astype(jnp.float32) / levels)
    device, cfg = _configs()
    fn = wv.explicit(device, cfg)
    none, every = jnp.zeros((), bool), jnp.ones((), bool)

    # Compile (one executable for both masks) and time the open-loop write alone.
    jax.block_until_ready(fn(key, target, none))
    writes = [_timed(fn, key, target, none)[:2] for _ in range(FLAGS.repeats)]
    t_write, c_write = min(w for w, _ in writes), min(c for _, c in writes)
    t_full, c_full, res = _timed(fn, key, target, every)
    cycles = np.asarray(res.cycles)
    iterations = int(cycles.max())  # a device is read once per loop iteration it is in
    n_failed = int(np.count_nonzero(np.asarray(res.failed)))
    del res
    t_loop = max(t_full - t_write, 0.0)
    per_iter = t_loop / max(iterations, 1)
    cpu_per_iter = max(c_full - c_write, 0.0) / max(iterations, 1)
    t_elem, c_elem = _elementwise_seconds(key, target, FLAGS.repeats)
    return {
        "devices": n,
        "iterations": iterations,
        "seconds_per_iteration": per_iter,
        "iteration_over_elementwise": per_iter / t_elem,
        "device_iterations_per_second": n * iterations / t_loop if t_loop > 0 else float("nan"),
        "seconds_total": t_full,
        "seconds_open_loop_write": t_write,
        "seconds_elementwise_pass": t_elem,
        # Process CPU time (all threads): steadier than wall time on a shared
        # machine; meaningful on CPU backends only.
        "cpu_seconds_per_iteration": cpu_per_iter,
        "cpu_seconds_elementwise_pass": c_elem,
        "cpu_iteration_over_elementwise": cpu_per_iter / c_elem if c_elem > 0 else float("nan"),
        "mean_cycles_per_device": float(cycles.mean()),
        "failed_fraction": n_failed / n,
        "scheme": FLAGS.scheme,
        "tolerance": FLAGS.tolerance,
        "max_pulses": FLAGS.max_pulses,
        "sigma_program": FLAGS.sigma_program,
        "sigma_pulse": FLAGS.sigma_pulse,
        "sigma_read": FLAGS.sigma_read,
        "prng_impl": FLAGS.prng_impl,
        "backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
        "elementwise_pass_definition": (
            "jit((target, g, state) -> (g + 0.01*normal(key), state + (g > target))), "
            "g and state donated: reads target, g, state; one normal per device; "
            "writes g, state. A loop iteration reads/writes the same arrays but "
            "draws two normals per device (read noise, pulse noise)."),
    }


def main(argv: list[str]) -> None:
    _cli.no_arguments(argv)
    check_flags()
    r = run()
    rows = [
        ("backend", f"{r['backend']} ({len(r['jax_devices'])} device(s)), PRNG {r['prng_impl']}"),
        ("devices", f"{r['devices']:,d}"),
        ("scheme", f"{r['scheme']}, tol {r['tolerance']}, max_pulses {r['max_pulses']}"),
        ("device sigmas", f"program {r['sigma_program']}, pulse {r['sigma_pulse']}, "
                          f"read {r['sigma_read']}"),
        ("loop iterations", f"{r['iterations']}"),
        ("mean cycles / device", f"{r['mean_cycles_per_device']:.3f}"),
        ("failed fraction", f"{r['failed_fraction']:.2e}"),
        ("total time (s)", f"{r['seconds_total']:.3f}"),
        ("open-loop write (s)", f"{r['seconds_open_loop_write']:.3f}"),
        ("seconds / iteration", f"{r['seconds_per_iteration']:.4f}"),
        ("device-iterations / s", f"{r['device_iterations_per_second']:.3e}"),
        ("elementwise pass (s)", f"{r['seconds_elementwise_pass']:.4f}"),
        ("iteration / elementwise", f"{r['iteration_over_elementwise']:.2f}  (target <= 2)"),
        ("  same, process CPU time", f"{r['cpu_iteration_over_elementwise']:.2f}  "
                                     f"({r['cpu_seconds_per_iteration']:.4f} / "
                                     f"{r['cpu_seconds_elementwise_pass']:.4f} s)"),
    ]
    w = max(len(k) for k, _ in rows)
    print("explicit write-verify benchmark")
    for k, val in rows:
        print(f"  {k:<{w}}  {val}")
    print(f"  elementwise pass = {r['elementwise_pass_definition']}")
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(r, f, indent=2)
        print(f"wrote {FLAGS.json}")


if __name__ == "__main__":
    _cli.run(main)

r"""Benchmark: the simulated CiM macro against the plain model, forward and training.

Model: the zoo's ResNet-20 (``swimjax.models.get_model("resnet20",
input_shape=(32, 32, 3))``) with random-init weights on ``--batch_size``
random 32x32x3 images (speed does not depend on the values). Its middle
layers (all but the first and the last, :data:`swimjax.crossbar.DEFAULT`) run
on the ``--macro`` preset (:func:`swimjax.crossbar.transform`: DAC, arrays of
R rows, cell slices, ADC, shift-and-add); the error model is the synthetic
``--error_model`` table (:func:`swimjax.mac_error.synthetic`).

Reported, every function jitted, compiled first and timed ``--repeats``
times (median; the repeats of the variants are interleaved so that load from
other processes hits all alike):

* forward (inference, batch ``--batch_size``): the plain model; the macro with
  its ADC but no error model (``macro_ideal``); the macro with the error model
  (per-example keys, ``macro_error``); ratios to the plain forward pass;
* training step (forward, backward, Adam update, batch ``--batch_size``):
  plain training (:mod:`swimjax.training`'s step, the same ``conv_lowering``
  "xla" as D-NAT's fine-tuning) against one D-NAT step (the macro with the
  error model in the forward pass, the statistical gradient, E-PACT bounds
  trained with the weights: :class:`swimjax.dnat.MacroModel`); the ratio is
  the training-time overhead (the D-NAT paper: about 5x);
* memory: what XLA's compiled memory analysis gives for each program
  (``jax.jit(f).lower(...).compile().memory_analysis()``: argument, output,
  temporary and generated-code bytes); ``peak_bytes`` is argument + output +
  temporary - alias bytes, the ratio of the training steps' is the memory
  overhead (the paper: about 2x). Not every backend implements the analysis:
  then the fields are null.

  python -m benchmarks.crossbar [--batch_size 8] [--repeats 2] [--json out.json]
"""

from __future__ import annotations

import json
import statistics
import time

from absl import flags

from experiments import _cli

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch_size", 8, "Images per forward pass and training step.")
flags.DEFINE_integer("repeats", 2, "Timed calls per variant (median).")
flags.DEFINE_string("macro", "dnat", "Macro preset (swimjax.crossbar.PRESETS).")
flags.DEFINE_string("error_model", "dnat_like", "Synthetic error-model preset.")
flags.DEFINE_string("model", "resnet20", "Zoo model (32x32x3 inputs).")
flags.DEFINE_string("json", None, "Write the results here as JSON.")
flags.DEFINE_integer("seed", 0, "PRNG seed.")

_MEMORY_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                  "alias_size_in_bytes", "generated_code_size_in_bytes")


def _memory(jitted, *args) -> dict:
    """The compiled program's memory analysis (None where the backend gives none)."""
    try:
        ma = jitted.lower(*args).compile().memory_analysis()
    except Exception:  # noqa: BLE001 - an unimplemented analysis is reported as null
        ma = None
    out = {k: (int(getattr(ma, k)) if ma is not None and hasattr(ma, k) else None)
           for k in _MEMORY_FIELDS}
    parts = [out[k] for k in ("argument_size_in_bytes", "output_size_in_bytes",
                              "temp_size_in_bytes")]
    out["peak_bytes"] = (None if any(p is None for p in parts)
                         else sum(parts) - (out["alias_size_in_bytes"] or 0))
    return out


def _time(fns: dict, repeats: int) -> tuple[dict, dict]:
    """Median wall seconds and median process CPU seconds (every thread) per
    call of each ``fn()`` (blocking), repeats interleaved. On a shared machine
    the CPU time is the steadier measure of the work (wall time counts the
    waits for other processes)."""
    import jax
    wall: dict = {k: [] for k in fns}
    cpu: dict = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t, c = time.perf_counter(), time.process_time()
            jax.block_until_ready(fn())
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    return ({k: statistics.median(v) for k, v in wall.items()},
            {k: statistics.median(v) for k, v in cpu.items()})


def _compile_s(fn) -> float:
    import jax
    t = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def main(argv: list[str]) -> None:
    _cli.no_arguments(argv)
    batch = _cli.int_flag("batch_size", 1)
    repeats = _cli.int_flag("repeats", 1)
    _cli.seed_flag()
    _cli.check_output_file(FLAGS.json)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from swimjax import crossbar, dnat, mac_error, models, quantizers, training
    with _cli.user_errors():
        cfg = crossbar.preset(FLAGS.macro)
        if FLAGS.error_model not in mac_error.PRESETS:
            raise ValueError(f"--error_model must be one of {sorted(mac_error.PRESETS)}, "
                             f"got {FLAGS.error_model!r}")
        if FLAGS.model not in models.available_models():
            raise ValueError(f"--model must be one of {list(models.available_models())}, "
                             f"got {FLAGS.model!r}")

    key = jax.random.key(FLAGS.seed)
    model = models.get_model(FLAGS.model, input_shape=(32, 32, 3))
    variables = model.init(jax.random.fold_in(key, 0))
    state = {k: v for k, v in variables.items() if k != "params"}
    x = jax.random.normal(jax.random.fold_in(key, 1), (batch, 32, 32, 3))
    y = jnp.arange(batch, dtype=jnp.int32) % model.num_classes
    keys = jax.random.split(jax.random.fold_in(key, 2), batch)
    qcfg = quantizers.QuantizerConfig(kind="epact", bits=cfg.dac_bits)
    em = mac_error.synthetic(jax.random.fold_in(key, 3), cfg.n_codes, FLAGS.error_model)

    ideal = crossbar.transform(model.apply_fn, variables, x, cfg, qcfg)
    noisy = crossbar.transform(model.apply_fn, variables, x, cfg, qcfg, error_model=em)
    bounds = crossbar.calibrate_bounds(model.apply_fn, variables, x, ideal.paths, qcfg)

    plain_f = jax.jit(model.apply_fn)
    ideal_f = jax.jit(lambda v, b, xx: ideal.fn(v, b, xx))
    noisy_f = jax.jit(lambda v, b, xx, kk: noisy.fn(v, b, xx, kk))
    fwd = {"plain": lambda: plain_f(variables, x),
           "macro_ideal": lambda: ideal_f(variables, bounds, x),
           "macro_error": lambda: noisy_f(variables, bounds, x, keys)}
    fwd_mem = {"plain": _memory(plain_f, variables, x),
               "macro_ideal": _memory(ideal_f, variables, bounds, x),
               "macro_error": _memory(noisy_f, variables, bounds, x, keys)}
    fwd_compile = {k: _compile_s(f) for k, f in fwd.items()}
    fwd_s, fwd_cpu = _time(fwd, repeats)

    # training steps: the library's jitted step, plain and D-NAT (same optimizer, lowering)
    lowering = training.resolve_conv_lowering("xla")
    tcfg = training.TrainConfig(optimizer="adam", learning_rate=1e-3, epochs=1,
                                batch_size=batch, conv_lowering="xla")
    train_m = crossbar.transform(model.train_apply, variables, x, cfg, qcfg, error_model=em,
                                 gradient="statistical")
    start = {"params": {"net": variables["params"], "bounds": bounds}, **state}
    mm = dnat.MacroModel(model, start, train_m, ideal, stochastic=True)
    steps, args = {}, {}
    for name, m, params in (("plain", model, variables["params"]),
                            ("dnat", mm, start["params"])):
        tx, step = training._make_train_step(m, tcfg, 1, None, lowering)
        args[name] = (params, tx.init(params), state, x, y, jax.random.fold_in(key, 4),
                      np.int32(0), None)
        steps[name] = step
    step_mem = {k: _memory(steps[k], *args[k]) for k in steps}
    step_fns = {k: (lambda k=k: steps[k](*args[k])) for k in steps}
    step_compile = {k: _compile_s(f) for k, f in step_fns.items()}
    step_s, step_cpu = _time(step_fns, repeats)

    res: dict = {
        "backend": jax.default_backend(), "model": FLAGS.model, "batch_size": batch,
        "repeats": repeats, "macro": FLAGS.macro, "error_model": FLAGS.error_model,
        "macro_layers": len(ideal.paths),
        "forward_s": fwd_s, "forward_compile_s": fwd_compile, "forward_memory": fwd_mem,
        "forward_ratio": {k: _ratio(fwd_s[k], fwd_s["plain"]) for k in fwd_s},
        "train_step_s": step_s, "train_compile_s": step_compile, "train_memory": step_mem,
        "forward_cpu_s": fwd_cpu, "train_step_cpu_s": step_cpu,
        "train_time_overhead": _ratio(step_s["dnat"], step_s["plain"]),
        "train_cpu_time_overhead": _ratio(step_cpu["dnat"], step_cpu["plain"]),
        "train_memory_overhead": _ratio(step_mem["dnat"]["peak_bytes"],
                                        step_mem["plain"]["peak_bytes"]),
        "train_temp_memory_overhead": _ratio(step_mem["dnat"]["temp_size_in_bytes"],
                                             step_mem["plain"]["temp_size_in_bytes"]),
    }

    def mib(b):
        return f"{b / 2**20:9.1f}" if b is not None else f"{'n/a':>9s}"

    print(f"{FLAGS.model}, batch {batch}, {len(ideal.paths)} layers on the {FLAGS.macro} macro "
          f"(R={cfg.rows}, DAC {cfg.dac_bits} b, {cfg.weight_bits}-bit weights over "
          f"{cfg.n_slices} cells, ADC {cfg.adc_bits} b), error model {FLAGS.error_model}, "
          f"{jax.default_backend()}, median of {repeats}")
    print(f"{'':22s} {'ms':>9s} {'x plain':>8s} {'cpu ms':>9s} {'x plain':>8s} "
          f"{'1st call s':>10s} {'peak MiB':>9s} {'temp MiB':>9s}")
    for label, s, c, comp, mem, base, base_c in (
            [(f"forward {k}", fwd_s[k], fwd_cpu[k], fwd_compile[k], fwd_mem[k], fwd_s["plain"],
              fwd_cpu["plain"]) for k in fwd_s]
            + [(f"train step {k}", step_s[k], step_cpu[k], step_compile[k], step_mem[k],
                step_s["plain"], step_cpu["plain"]) for k in step_s]):
        print(f"{label:22s} {s * 1e3:9.1f} {s / base:8.2f} {c * 1e3:9.1f} {c / base_c:8.2f} "
              f"{comp:10.2f} {mib(mem['peak_bytes'])} {mib(mem['temp_size_in_bytes'])}")
    print(f"D-NAT training step over plain: time {res['train_time_overhead']:.2f}x wall, "
          f"{res['train_cpu_time_overhead']:.2f}x CPU, memory "
          + (f"{res['train_memory_overhead']:.2f}x (peak), "
             f"{res['train_temp_memory_overhead']:.2f}x (temporaries)"
             if res["train_memory_overhead"] is not None else "n/a"))
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    _cli.run(main)

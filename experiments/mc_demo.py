r"""Monte-Carlo demo: a small network under device variation, without and with
full (explicit, iterative) write-verify.

Trains LeNet briefly on the offline MNIST digits (or loads the cached
checkpoint), then evaluates by Monte-Carlo: every run programs all mapped
weights through the device model — open-loop writes with variation
``--sigma_d`` — and, for full write-verify, the explicit read/compare/pulse
loop until every device is inside the acceptance band. Prints a table of
accuracies and the measured write cycles.

    python -m experiments.mc_demo
    python -m experiments.mc_demo --sigma_d=0.2 --mc_runs=500
"""

from __future__ import annotations

from absl import flags

from experiments import _cli
from swimjax import sweep

FLAGS = flags.FLAGS
flags.DEFINE_float("sigma_d", 0.2, "Device variation without write-verify (full-scale units).")
flags.DEFINE_float("sigma_wv", 0.03, "Target residual after write-verify (sets the tolerance).")
flags.DEFINE_integer("mc_runs", 100, "Monte-Carlo runs.")
flags.DEFINE_integer("train_epochs", 2, "Training epochs (a few seconds).")
flags.DEFINE_integer("seed", 0, "Seed.")
flags.DEFINE_string("out_dir", "runs/mc_demo", "Output directory (checkpoint, results).")


def main(argv: list[str]) -> None:
    """Checks the flags and inputs (one-line errors, nothing created), then runs."""
    _cli.no_arguments(argv)
    with _cli.user_errors():
        config = sweep.SweepConfig(methods=("magnitude",), budgets=(0.0, 1.0),
                                   sigma_d=FLAGS.sigma_d, sigma_wv=FLAGS.sigma_wv,
                                   write_verify="explicit", mc_runs=FLAGS.mc_runs,
                                   seed=FLAGS.seed, train_epochs=FLAGS.train_epochs)
    _cli.check_sweep_inputs(config, FLAGS.out_dir)
    rows = sweep.run_sweep(config, FLAGS.out_dir)
    wv = config.write_verify_config()
    print(f"\nLeNet / {config.dataset}: sigma_d = {config.sigma_d[0]}, write-verify tolerance "
          f"{wv.tolerance:.4f} (max {wv.max_pulses} pulses), N = {config.weight_bits}, "
          f"m = {config.device_bits}, {config.mc_runs} Monte-Carlo runs\n")
    print(f"{'scheme':<22}{'cycles/device':>14}{'NWC':>8}{'acc mean %':>12}{'std':>7}"
          f"{'p5 %':>8}{'min %':>8}")
    per_weight = config.mapping_config().devices_per_weight
    for r in sorted(rows, key=lambda r: r["budget"]):
        name = "full write-verify" if r["budget"] == 1.0 else "no write-verify"
        print(f"{name:<22}{r['total_cycles'] / (r['n_mapped'] * per_weight):>14.3f}"
              f"{r['nwc_cycles']:>8.4f}{100 * r['acc_mean']:>12.2f}{100 * r['acc_std']:>7.2f}"
              f"{100 * r['acc_p5']:>8.2f}{100 * r['acc_min']:>8.2f}")
    print(f"{'clean (no variation)':<22}{'':>14}{'':>8}{100 * rows[0]['clean_acc']:>12.2f}")


if __name__ == "__main__":
    _cli.run(main)

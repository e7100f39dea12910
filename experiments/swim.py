r"""The SWIM sweep: selective write-verify methods x budgets under device variation.

Trains (or loads) the model, scores its weights with each selection method,
and evaluates every (method, budget) point by Monte-Carlo. Writes
``results.jsonl`` (one row per point, resumable), ``accuracy_vs_nwc.png`` and
``summary.md`` into ``--out_dir``.

    python -m experiments.swim                      # LeNet on the offline MNIST digits
    python -m experiments.swim --methods=swim,hutchinson,magnitude --mc_runs=1000
    python -m experiments.swim --model=convnet --dataset=cifar10 --data_dir=~/tensorflow_datasets
    python -m experiments.swim --nonuniform=RRAM4 --methods=swim,swim_uniform,magnitude  # U-SWIM
    python -m experiments.swim --write_verify=explicit --device=swim   # a device preset
    python -m experiments.swim --train_noise=rcg --train_sigma=0.2 --rcg_tau=1  # TRICE training
"""

from __future__ import annotations

from absl import flags, logging

from experiments import _cli
from swimjax import data, distributed, devices, models, perturbation, sweep, training

_D = sweep.SweepConfig()
FLAGS = flags.FLAGS
flags.DEFINE_enum("model", _D.model, models.available_models(), "Zoo model.")
flags.DEFINE_string("dataset", _D.dataset,
                    f"One of {list(data.available_datasets())} or a .npz path "
                    "(x_train, y_train, x_test, y_test).")
flags.DEFINE_string("data_dir", None, "tensorflow-datasets data directory (full datasets).")
flags.DEFINE_string("checkpoint", None, "Checkpoint to load, or to write after training "
                    "(default: <out_dir>/<model>_<dataset>_seed<seed>.msgpack).")
flags.DEFINE_list("methods", list(_D.methods),
                  f"Selection methods, any of {list(sweep.available_methods())} (swim_uniform: "
                  "SWIM's curvature ranked as if the variation were uniform).")
flags.DEFINE_list("budgets", [f"{b:g}" for b in _D.budgets],
                  "Fractions of mapped weights to write-verify, each in [0, 1].")
flags.DEFINE_list("sigma_d", [f"{s:g}" for s in _D.sigma_d],
                  "Device variation without write-verify (std, fraction of a device's full "
                  "scale); several values sweep them (statistical: one compiled program for "
                  "all), e.g. --sigma_d=0.1,0.2,0.3.")
flags.DEFINE_float("sigma_wv", _D.sigma_wv, "Residual variation after write-verify.")
flags.DEFINE_integer("weight_bits", _D.weight_bits, "N: magnitude bits per weight.")
flags.DEFINE_integer("device_bits", _D.device_bits, "m: bits per device (1 <= m <= N).")
flags.DEFINE_enum("write_verify", _D.write_verify, ["statistical", "explicit"],
                  "statistical: SWIM's Gaussian model; explicit: the iterative loop per run.")
flags.DEFINE_integer("mc_runs", _D.mc_runs, "Monte-Carlo runs per point.")
flags.DEFINE_integer("seed", _D.seed, "Seed for training, scores and Monte-Carlo.")
flags.DEFINE_integer("train_epochs", None, "Training epochs (default: the model's default).")
flags.DEFINE_integer("n_train", None, "Training images to train and score on (default: all).")
flags.DEFINE_integer("n_test", None, "Test images to evaluate on (default: all).")
flags.DEFINE_integer("n_score", None, "Training images used for the scores (default: all).")
flags.DEFINE_float("tolerance", None, "Explicit write-verify acceptance band (default: the "
                   "band that leaves verified devices with residual std sigma_wv).")
flags.DEFINE_integer("max_pulses", None, "Explicit write-verify pulse budget (default: the "
                     "smallest that keeps failures under --max_failure).")
flags.DEFINE_float("max_failure", _D.max_failure, "Largest fraction of verified devices "
                   "allowed to fail when the loop is chosen automatically.")
flags.DEFINE_float("sigma_read", _D.sigma_read, "Read noise during verify.")
flags.DEFINE_integer("chunk_size", None, "Monte-Carlo runs per vmapped chunk (default: auto).")
flags.DEFINE_bool("measure_cycles", True, "Measure NWC in write cycles with one explicit "
                  "programming pass per point.")
flags.DEFINE_string("nonuniform", None,
                    f"Non-uniform variation (U-SWIM) of the statistical model: one of "
                    f"{list(perturbation.NONUNIFORM_PRESETS)} or a factor r > 0; weights with "
                    "0.25 < |W|/max < 0.75 get sigma * r (renormalised). Default: uniform.")
flags.DEFINE_string("device", None,
                    f"Device preset of the explicit write-verify loop and the cycle measurement: "
                    f"one of {sorted(devices.PRESETS)} or a JSON preset file. Default: an "
                    "unclipped Gaussian device with variation sigma_d.")
flags.DEFINE_string("out_dir", "runs/swim", "Output directory.")
flags.DEFINE_bool("progress", True, "Show progress bars.")
flags.DEFINE_float("kpp", _D.kpp, "k of the k-th percentile accuracy recorded in every row.")
flags.DEFINE_float("threshold", None, "Rows record the fraction of runs below this accuracy "
                   "(a fraction; default: 1 point below the clean accuracy).")
flags.DEFINE_enum("train_noise", _D.train_noise, list(training.TRAIN_NOISES),
                  "Noise-injection training when the model is trained here: none (plain), "
                  "gaussian (fresh statistical-model noise every step) or rcg (right-censored "
                  "at --rcg_tau, TRICE). Named in the default checkpoint file.")
flags.DEFINE_float("train_sigma", None, f"Device sigma of the training noise, in (0, "
                   f"{sweep.MAX_TRAIN_SIGMA:g}] (default: --sigma_d, which must then be one "
                   "value).")
flags.DEFINE_float("rcg_tau", None, "Right-censoring point of rcg noise, eps = min(eps, tau), "
                   f"finite (default {sweep.DEFAULT_RCG_TAU:g}).")
_cli.define_distributed_flags()


def config_from_flags() -> sweep.SweepConfig:
    budgets = _cli.real_list_flag("budgets", 0.0, 1.0)
    sigmas = _cli.real_list_flag("sigma_d", 0.0, None)
    return sweep.SweepConfig(
        model=FLAGS.model, dataset=FLAGS.dataset, data_dir=FLAGS.data_dir,
        checkpoint=FLAGS.checkpoint, methods=tuple(FLAGS.methods), budgets=budgets,
        sigma_d=sigmas, sigma_wv=FLAGS.sigma_wv, weight_bits=FLAGS.weight_bits,
        device_bits=FLAGS.device_bits, write_verify=FLAGS.write_verify, mc_runs=FLAGS.mc_runs,
        seed=FLAGS.seed, train_epochs=FLAGS.train_epochs, n_train=FLAGS.n_train,
        n_test=FLAGS.n_test,
        n_score=FLAGS.n_score, tolerance=FLAGS.tolerance, max_pulses=FLAGS.max_pulses,
        max_failure=FLAGS.max_failure,
        sigma_read=FLAGS.sigma_read, chunk_size=FLAGS.chunk_size,
        measure_cycles=FLAGS.measure_cycles, progress=FLAGS.progress,
        nonuniform_factor=1.0 if FLAGS.nonuniform is None else FLAGS.nonuniform,
        device=FLAGS.device, kpp=FLAGS.kpp, threshold=FLAGS.threshold,
        train_noise=FLAGS.train_noise, train_sigma=FLAGS.train_sigma, rcg_tau=FLAGS.rcg_tau)


def main(argv: list[str]) -> None:
    """Checks the flags and every input before any work, then runs the sweep.

    Pre-flight (each failure is one line, ``error: ...``, exit status 2, and
    nothing is created): no positional arguments; the configuration
    (``SweepConfig`` validates every value); then
    :func:`experiments._cli.check_sweep_inputs`: ``--out_dir`` writable or
    creatable, ``--dataset`` ready in ``--data_dir`` with room for
    ``--n_train`` / ``--n_test``, the checkpoint intact and of this model,
    dataset and training noise.
    """
    _cli.no_arguments(argv)
    _cli.initialize_distributed()
    with _cli.user_errors():
        config = config_from_flags()
    _cli.check_sweep_inputs(config, FLAGS.out_dir)
    rows = sweep.run_sweep(config, FLAGS.out_dir)
    if distributed.is_writer():
        with open(f"{FLAGS.out_dir}/summary.md", encoding="utf-8") as f:
            print(f.read())
        logging.info("%d points in %s/results.jsonl", len(rows), FLAGS.out_dir)


if __name__ == "__main__":
    _cli.run(main)

r"""The worst case of device variation: accuracy against the perturbation bound.

For each bound ``eps`` (a fraction of each layer's ``max|W|``) and each mask
(nothing verified; SWIM's score with ``--budget`` of the weights verified,
which bounds those by the write-verify tolerance), searches the one weight
perturbation shared by all test inputs that minimizes accuracy
(:mod:`swimjax.worstcase`), and sets it beside the best of random corners of
the same box and the Monte-Carlo mean and 1st percentile at the matching sigma
(weight-error std = the box's half-width). Writes ``results.jsonl`` (one row
per (mask, eps), resumable), ``worstcase_vs_eps.png`` and ``summary.md`` into
``--out_dir``.

    python -m experiments.worstcase                       # LeNet on the offline MNIST digits
    python -m experiments.worstcase --eps=0,0.01,0.03 --search=cw --mc_runs=1000
"""

from __future__ import annotations

from absl import flags, logging

from experiments import _cli
from swimjax import data, models, worstcase

_D = worstcase.ExperimentConfig()
_S = worstcase.WorstCaseConfig()
FLAGS = flags.FLAGS
flags.DEFINE_enum("model", _D.model, models.available_models(), "Zoo model.")
flags.DEFINE_string("dataset", _D.dataset,
                    f"One of {list(data.available_datasets())} or a .npz path.")
flags.DEFINE_string("data_dir", None, "tensorflow-datasets data directory (full datasets).")
flags.DEFINE_string("checkpoint", None, "Checkpoint to load, or to write after training "
                    "(default: <out_dir>/<model>_<dataset>_seed<seed>.msgpack, as the SWIM sweep).")
flags.DEFINE_list("eps", [f"{e:g}" for e in _D.eps],
                  "Bounds of |dW| / max|W_layer| for unverified weights, each >= 0.")
flags.DEFINE_list("masks", list(_D.masks), f"Masks, any of {list(worstcase.MASKS)}.")
flags.DEFINE_float("budget", _D.budget, "Fraction of weights the swim mask verifies.")
flags.DEFINE_integer("weight_bits", _D.weight_bits, "N: magnitude bits per weight.")
flags.DEFINE_integer("device_bits", _D.device_bits, "m: bits per device (1 <= m <= N).")
flags.DEFINE_float("sigma_wv", _D.sigma_wv, "Residual variation after write-verify.")
flags.DEFINE_float("sigma_d", _D.sigma_d, "Device variation the write-verify tolerance is "
                   "chosen for.")
flags.DEFINE_float("tolerance", None, "Write-verify acceptance band by hand (full-scale units).")
flags.DEFINE_enum("search", _S.method, list(worstcase.METHODS),
                  "pgd: projected sign-gradient descent; cw: Carlini-Wagner relaxation.")
flags.DEFINE_integer("steps", _S.steps, "PGD steps.")
flags.DEFINE_float("step_size", _S.step_size, "PGD step, a fraction of each weight's bound.")
flags.DEFINE_float("kappa", _S.kappa, "Margin-loss floor: max(margin, -kappa).")
flags.DEFINE_bool("random_start", _S.random_start, "Start PGD at a random point of the box.")
flags.DEFINE_integer("restarts", _S.restarts, "PGD runs (all but the first from random starts).")
flags.DEFINE_integer("cw_steps", _S.cw_steps, "C&W Adam steps per constant.")
flags.DEFINE_float("cw_lr", _S.cw_lr, "C&W Adam learning rate.")
flags.DEFINE_float("c_init", _S.c_init, "C&W first constant.")
flags.DEFINE_integer("binary_search_steps", _S.binary_search_steps, "C&W constants tried.")
flags.DEFINE_float("target_accuracy", _S.target_accuracy, "C&W success: accuracy at or below.")
flags.DEFINE_integer("batch_size", _S.batch_size, "Examples per forward pass of the search.")
flags.DEFINE_integer("random_samples", _D.random_samples, "Random corners of the box tried.")
flags.DEFINE_integer("mc_runs", _D.mc_runs, "Monte-Carlo runs per point.")
flags.DEFINE_integer("seed", _D.seed, "Seed for training, scores, search and Monte-Carlo.")
flags.DEFINE_integer("train_epochs", None, "Training epochs (default: the model's default).")
flags.DEFINE_integer("n_train", None, "Training images to train and score on (default: all).")
flags.DEFINE_integer("n_test", None, "Test images (default: all).")
flags.DEFINE_integer("n_score", None, "Training images used for the SWIM scores (default: all).")
flags.DEFINE_string("out_dir", "runs/worstcase", "Output directory.")
flags.DEFINE_bool("progress", True, "Show progress bars.")


def config_from_flags() -> worstcase.ExperimentConfig:
    search = worstcase.WorstCaseConfig(
        method=FLAGS.search, kappa=FLAGS.kappa, batch_size=FLAGS.batch_size, steps=FLAGS.steps,
        step_size=FLAGS.step_size, random_start=FLAGS.random_start, restarts=FLAGS.restarts,
        cw_steps=FLAGS.cw_steps, cw_lr=FLAGS.cw_lr, c_init=FLAGS.c_init,
        binary_search_steps=FLAGS.binary_search_steps, target_accuracy=FLAGS.target_accuracy)
    return worstcase.ExperimentConfig(
        model=FLAGS.model, dataset=FLAGS.dataset, data_dir=FLAGS.data_dir,
        checkpoint=FLAGS.checkpoint, seed=FLAGS.seed, train_epochs=FLAGS.train_epochs,
        n_train=FLAGS.n_train, n_test=FLAGS.n_test, n_score=FLAGS.n_score,
        eps=_cli.real_list_flag("eps", 0.0, None),
        masks=_cli.choice_list_flag("masks", worstcase.MASKS), budget=FLAGS.budget,
        weight_bits=FLAGS.weight_bits, device_bits=FLAGS.device_bits, sigma_wv=FLAGS.sigma_wv,
        sigma_d=FLAGS.sigma_d, tolerance=FLAGS.tolerance, search=search,
        random_samples=FLAGS.random_samples, mc_runs=FLAGS.mc_runs, progress=FLAGS.progress)


def main(argv: list[str]) -> None:
    """Checks the flags and inputs (one line per error, nothing created), then runs."""
    _cli.no_arguments(argv)
    with _cli.user_errors():
        config = config_from_flags()
        config.tolerance_used()
    _cli.check_sweep_inputs(config.sweep_config(), FLAGS.out_dir)
    rows = worstcase.run_experiment(config, FLAGS.out_dir)
    with open(f"{FLAGS.out_dir}/summary.md", encoding="utf-8") as f:
        print(f.read())
    logging.info("%d points in %s/results.jsonl", len(rows), FLAGS.out_dir)


if __name__ == "__main__":
    _cli.run(main)

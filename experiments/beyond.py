r"""Beyond SWIM: noise-injection training and selection-aware fine-tuning
against SWIM's baseline, side by side on the same data and Monte-Carlo keys.

Writes ``results.jsonl`` (one row per (training, method, budget), resumable),
``summary.md`` (the target table against A_full / P1_full of the plainly
trained model with full write-verify) and ``accuracy_vs_nwc.png`` into
``--out_dir`` (see :mod:`swimjax.beyond`).

    python -m experiments.beyond                       # LeNet, offline digits, 1000 runs
    python -m experiments.beyond --combinations=plain/swim,rcg/ggn,rcg+sa/ggn_sampled
    python -m experiments.beyond --model=convnet --dataset=cifar10 --data_dir=~/tensorflow_datasets
"""

from __future__ import annotations

from absl import flags, logging

from experiments import _cli
from swimjax import beyond, data, models

_D = beyond.BeyondConfig()
FLAGS = flags.FLAGS
flags.DEFINE_enum("model", _D.model, models.available_models(), "Zoo model.")
flags.DEFINE_string("dataset", _D.dataset,
                    f"One of {list(data.available_datasets())} or a .npz path.")
flags.DEFINE_string("data_dir", None, "tensorflow-datasets data directory (full datasets).")
flags.DEFINE_list("combinations", list(_D.combinations),
                  "'<training>/<method>' pairs: training plain, gaussian or rcg (noise "
                  "injection), with '+sa' for selection-aware fine-tuning; method a curvature "
                  "score (swim, ggn, ggn_sampled, fisher, ...).")
flags.DEFINE_list("budgets", [f"{b:g}" for b in _D.budgets],
                  "Fractions of mapped weights to write-verify, each in [0, 1].")
flags.DEFINE_float("sigma_d", _D.sigma_d, "Device variation without write-verify.")
flags.DEFINE_float("sigma_wv", _D.sigma_wv, "Residual variation after write-verify.")
flags.DEFINE_integer("weight_bits", _D.weight_bits, "N: magnitude bits per weight.")
flags.DEFINE_integer("device_bits", _D.device_bits, "m: bits per device (1 <= m <= N).")
flags.DEFINE_integer("mc_runs", _D.mc_runs, "Monte-Carlo runs per point.")
flags.DEFINE_integer("seed", _D.seed, "Seed for training, scores and Monte-Carlo.")
flags.DEFINE_integer("train_epochs", None, "Epochs of every training (default: the model's).")
flags.DEFINE_float("train_sigma", None, "Device sigma of noise-injection training "
                   "(default: --sigma_d).")
flags.DEFINE_float("rcg_tau", _D.rcg_tau, "Right-censoring point of rcg training noise.")
flags.DEFINE_integer("finetune_epochs", _D.finetune_epochs,
                     "Epochs per round of selection-aware fine-tuning.")
flags.DEFINE_float("finetune_lr", None, "(Peak) learning rate of the fine-tuning (default: "
                   "1e-3 for Adam-trained models, 2e-3 for SGD-trained ones).")
flags.DEFINE_enum("finetune_schedule", _D.finetune_schedule, ["constant", "cosine"],
                  "Learning-rate schedule of each fine-tuning round.")
flags.DEFINE_enum("finetune_batch_norm", _D.finetune_batch_norm, list(beyond.FINETUNE_BATCH_NORM),
                  "Batch norm in the fine-tuning: batch statistics, or the base model's "
                  "running statistics kept fixed (as deployed).")
flags.DEFINE_integer("rounds", _D.rounds, "Selection-aware rounds (score, select, fine-tune).")
flags.DEFINE_float("finetune_sigma", None, "Device sigma of the unverified weights in the "
                   "fine-tuning (default: --sigma_d; verified weights keep --sigma_wv).")
flags.DEFINE_integer("n_train", None, "Training images (default: all).")
flags.DEFINE_integer("n_test", None, "Test images (default: all).")
flags.DEFINE_integer("n_score", None, "Training images used for the scores (default: all).")
flags.DEFINE_integer("chunk_size", None, "Monte-Carlo runs per vmapped chunk (default: auto).")
flags.DEFINE_string("out_dir", "runs/beyond", "Output directory.")
flags.DEFINE_bool("progress", True, "Show progress bars.")


def config_from_flags() -> beyond.BeyondConfig:
    budgets = _cli.real_list_flag("budgets", 0.0, 1.0)
    return beyond.BeyondConfig(
        model=FLAGS.model, dataset=FLAGS.dataset, data_dir=FLAGS.data_dir,
        combinations=tuple(FLAGS.combinations), budgets=budgets, sigma_d=FLAGS.sigma_d,
        sigma_wv=FLAGS.sigma_wv, weight_bits=FLAGS.weight_bits, device_bits=FLAGS.device_bits,
        mc_runs=FLAGS.mc_runs, seed=FLAGS.seed, train_epochs=FLAGS.train_epochs,
        train_sigma=FLAGS.train_sigma, rcg_tau=FLAGS.rcg_tau,
        finetune_epochs=FLAGS.finetune_epochs, finetune_lr=FLAGS.finetune_lr,
        finetune_schedule=FLAGS.finetune_schedule,
        rounds=FLAGS.rounds, finetune_batch_norm=FLAGS.finetune_batch_norm,
        finetune_sigma=FLAGS.finetune_sigma,
        n_train=FLAGS.n_train, n_test=FLAGS.n_test, n_score=FLAGS.n_score,
        chunk_size=FLAGS.chunk_size, progress=FLAGS.progress)


def main(argv: list[str]) -> None:
    """Checks the flags, the output directory and the dataset before any work
    (one-line errors), then runs the experiment."""
    _cli.no_arguments(argv)
    with _cli.user_errors():
        config = config_from_flags()
    _cli.check_out_dir(FLAGS.out_dir)
    _cli.check_dataset(config.dataset, config.data_dir, n_train=config.n_train,
                       n_test=config.n_test, model=config.model)
    rows = beyond.run_beyond(config, FLAGS.out_dir)
    with open(f"{FLAGS.out_dir}/summary.md", encoding="utf-8") as f:
        print(f.read())
    logging.info("%d points in %s/results.jsonl", len(rows), FLAGS.out_dir)


if __name__ == "__main__":
    _cli.run(main)

r"""D-NAT: non-ideality aware training for a CiM macro, against quantization-aware
training and the Gaussian error model (A-NAT), under a data-driven MAC error
model. Writes ``results.jsonl`` (one row per trained model, resumable),
``accuracy.png`` and ``summary.md`` into ``--out_dir``.

    python -m experiments.dnat                      # LeNet, offline digits, D-NAT macro
    python -m experiments.dnat --error_model=measured.npz --macro=dnat
    python -m experiments.dnat --model=resnet20 --dataset=cifar10 --data_dir=~/tensorflow_datasets \
        --float_epochs=200 --epochs=30 --mc_runs=100
"""

from __future__ import annotations

import dataclasses

from absl import flags, logging

from experiments import _cli
from swimjax import crossbar, data, dnat, mac_error, models, quantizers, report

_D = dnat.DnatConfig()
FLAGS = flags.FLAGS
flags.DEFINE_enum("model", _D.model, models.available_models(), "Zoo model.")
flags.DEFINE_string("dataset", _D.dataset,
                    f"One of {list(data.available_datasets())} or a .npz path.")
flags.DEFINE_string("data_dir", None, "tensorflow-datasets data directory (full datasets).")
flags.DEFINE_string("checkpoint", None, "Floating-point checkpoint to load, or to write after "
                    "training (default: <out_dir>/<model>_<dataset>_seed<seed>.msgpack).")
flags.DEFINE_integer("seed", _D.seed, "Seed for training, error-model tables and Monte-Carlo.")
flags.DEFINE_integer("float_epochs", None, "Epochs of the floating-point model (default: the "
                     "model's default).")
flags.DEFINE_integer("n_train", None, "Training images (default: all).")
flags.DEFINE_integer("n_test", _D.n_test, "Test images (0: all).")
flags.DEFINE_enum("macro", _D.macro, list(crossbar.PRESETS), "Macro preset.")
flags.DEFINE_integer("rows", None, "Rows summed per partial sum (default: the preset's).")
flags.DEFINE_integer("dac_bits", None, "Input DAC bits (default: the preset's).")
flags.DEFINE_integer("adc_bits", None, "ADC bits (default: the preset's).")
flags.DEFINE_integer("weight_bits", None, "Weight magnitude bits (default: the preset's).")
flags.DEFINE_float("adc_range", None, "ADC full scale as a fraction of the largest partial "
                   "sum (default: the preset's).")
flags.DEFINE_string("error_model", _D.error_model,
                    f"A synthetic table {sorted(mac_error.PRESETS)} or a table file "
                    "(.npz with key 'table', or .csv ideal,readout,probability|count).")
flags.DEFINE_integer("banks", _D.banks, "ADCs with a synthetic table of their own (0: one "
                     "table shared by every ADC).")
flags.DEFINE_list("seeds", None, "Seeds to run, each a full run (float model, table, "
                  "training); several add means over seeds and paired differences to "
                  "summary.md (default: --seed alone).")
flags.DEFINE_string("layers", _D.layers, "Macro layers: 'all_but_first_and_last' or a regular "
                    "expression over kernel paths (params/Conv_1/kernel style).")
flags.DEFINE_list("trainings", list(_D.trainings), f"Any of {list(dnat.TRAININGS)}.")
flags.DEFINE_list("gradients", list(_D.gradients), f"Any of {list(dnat.GRADIENTS)}.")
flags.DEFINE_list("quantizers", list(_D.quantizers), f"DAC bounds, any of "
                  f"{list(quantizers.KINDS)}; the first is used by qat and anat.")
flags.DEFINE_enum("start", "auto", ["auto", "float", "qat"], "Where A-NAT and D-NAT "
                  "fine-tuning starts: the floating-point model or the QAT model (needs qat in "
                  "--trainings); auto: the QAT model when qat is trained, else the float one.")
flags.DEFINE_float("calibration_percentile", _D.calibration_percentile, "Percentile of each "
                   "macro layer's inputs that sets its initial DAC bounds, in (0, 100].")
flags.DEFINE_integer("epochs", _D.epochs, "Fine-tuning epochs (qat, anat, dnat).")
flags.DEFINE_float("learning_rate", _D.learning_rate, "Adam learning rate for fine-tuning.")
flags.DEFINE_integer("batch_size", _D.batch_size, "Fine-tuning batch size.")
flags.DEFINE_integer("mc_runs", _D.mc_runs, "Monte-Carlo runs under the error model.")
flags.DEFINE_string("out_dir", "runs/dnat", "Output directory.")
flags.DEFINE_bool("progress", True, "Show progress bars.")


def config_from_flags() -> dnat.DnatConfig:
    return dnat.DnatConfig(
        model=FLAGS.model, dataset=FLAGS.dataset, data_dir=FLAGS.data_dir,
        checkpoint=FLAGS.checkpoint, seed=FLAGS.seed, float_epochs=FLAGS.float_epochs,
        n_train=FLAGS.n_train, n_test=FLAGS.n_test or None, macro=FLAGS.macro, rows=FLAGS.rows,
        dac_bits=FLAGS.dac_bits, adc_bits=FLAGS.adc_bits, weight_bits=FLAGS.weight_bits,
        adc_range=FLAGS.adc_range, error_model=FLAGS.error_model,
        banks=FLAGS.banks or None, layers=FLAGS.layers,
        trainings=tuple(FLAGS.trainings), gradients=tuple(FLAGS.gradients),
        quantizers=tuple(FLAGS.quantizers), start=FLAGS.start,
        calibration_percentile=FLAGS.calibration_percentile, epochs=FLAGS.epochs,
        learning_rate=FLAGS.learning_rate, batch_size=FLAGS.batch_size,
        mc_runs=FLAGS.mc_runs, progress=FLAGS.progress)


def main(argv: list[str]) -> None:
    """Checks the flags and inputs (one line per error, nothing created), then runs."""
    _cli.no_arguments(argv)
    with _cli.user_errors():
        config = config_from_flags()
        if config.error_model.endswith((".npz", ".csv")):
            mac_error.load(config.error_model, n_codes=config.macro_config().n_codes)
        seeds = list(_cli.int_list_flag("seeds", 0)) if FLAGS.seeds else [config.seed]
    _cli.check_sweep_inputs(config.sweep_config(), FLAGS.out_dir)
    rows = []
    for seed in dict.fromkeys(seeds):
        rows += dnat.run_dnat(dataclasses.replace(config, seed=seed), FLAGS.out_dir)
    if len(set(seeds)) > 1:
        with open(f"{FLAGS.out_dir}/summary.md", "w", encoding="utf-8") as f:
            f.write(report.dnat_seeds_markdown(rows, title=f"D-NAT, {config.model}, error "
                                               f"model {config.error_model}, seeds {seeds}"))
    with open(f"{FLAGS.out_dir}/summary.md", encoding="utf-8") as f:
        print(f.read())
    logging.info("%d points in %s/results.jsonl", len(rows), FLAGS.out_dir)


if __name__ == "__main__":
    _cli.run(main)

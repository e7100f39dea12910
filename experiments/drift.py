r"""Reliability over time and under faults: accuracy after programming against
conductance drift (``--mode=drift``) or stuck-at faults (``--mode=faults``),
for no write-verify, SWIM's selective write-verify and full write-verify.

Trains (or loads) the model, then evaluates every point by Monte-Carlo and
writes ``results.jsonl`` (one row per point, resumable), a PNG
(``accuracy_vs_time.png`` / ``accuracy_vs_faults.png``) and ``summary.md``
(with the device preset's values and sources) into ``--out_dir``.

    python -m experiments.drift                                # PCM drift, 1 s .. 10 years
    python -m experiments.drift --mode=faults                  # stuck-at faults on RRAM
    python -m experiments.drift --device=my_device.json --times=1,3600,31536000
"""

from __future__ import annotations

from absl import flags, logging

from experiments import _cli
from swimjax import data, devices, models, reliability

_D = reliability.ReliabilityConfig()
FLAGS = flags.FLAGS
flags.DEFINE_enum("mode", _D.mode, list(reliability.MODES),
                  "drift: accuracy against time after programming; faults: against the "
                  "fraction of stuck devices under explicit write-verify.")
flags.DEFINE_string("device", None,
                    f"Device preset: one of {list(devices.preset_names())} or a .json preset "
                    f"file (default: {reliability.DEFAULT_DEVICE['drift']} for drift, "
                    f"{reliability.DEFAULT_DEVICE['faults']} for faults).")
flags.DEFINE_enum("model", _D.model, models.available_models(), "Zoo model.")
flags.DEFINE_string("dataset", _D.dataset,
                    f"One of {list(data.available_datasets())} or a .npz path.")
flags.DEFINE_string("data_dir", None, "tensorflow-datasets data directory (full datasets).")
flags.DEFINE_string("checkpoint", None, "Checkpoint to load, or to write after training "
                    "(default: <out_dir>/<model>_<dataset>_seed<seed>.msgpack).")
flags.DEFINE_list("schemes", list(_D.schemes),
                  f"Write-verify settings, any of {list(reliability.SCHEMES)}.")
flags.DEFINE_float("swim_budget", _D.swim_budget, "Fraction of weights SWIM verifies.")
flags.DEFINE_list("times", [f"{t:g}" for t in _D.times],
                  "Seconds after programming (drift).")
flags.DEFINE_enum("compensation", "both", ["both", "on", "off"],
                  "Global drift compensation (drift): with and without, or one.")
flags.DEFINE_list("fault_rates", [f"{p:g}" for p in _D.fault_rates],
                  "Fractions of stuck devices, half at g_min and half at g_max (faults).")
flags.DEFINE_string("sigma_d", f"{_D.sigma_d:g}",
                    "Open-loop programming std of an unverified device (fraction of full "
                    "scale), or 'preset' for the preset's own model (drift only).")
flags.DEFINE_float("sigma_wv", _D.sigma_wv, "Residual std of a verified device.")
flags.DEFINE_integer("weight_bits", _D.weight_bits, "N: magnitude bits per weight.")
flags.DEFINE_integer("device_bits", None, "m: bits per device (1 <= m <= N; default: "
                     f"{reliability.DEFAULT_DEVICE_BITS['drift']} for drift, one analog device "
                     f"per weight and sign, {reliability.DEFAULT_DEVICE_BITS['faults']} for "
                     "faults).")
flags.DEFINE_enum("sign", _D.sign, ["differential", "sign_bit"], "How the sign is stored.")
flags.DEFINE_bool("read_noise", _D.read_noise, "PCM 1/f read noise at inference (drift).")
flags.DEFINE_integer("mc_runs", _D.mc_runs, "Monte-Carlo runs per point.")
flags.DEFINE_float("kpp", _D.kpp, "k of the k-th percentile performance in the rows.")
flags.DEFINE_float("threshold", None, "Accuracy (fraction) below which a run counts in "
                   "p_below_threshold (default: clean accuracy minus 0.01).")
flags.DEFINE_float("max_failure", _D.max_failure, "Largest fraction of verified devices "
                   "allowed to fail when the write-verify loop is chosen (faults).")
flags.DEFINE_float("sigma_read", _D.sigma_read, "Read noise during verify (faults).")
flags.DEFINE_integer("seed", _D.seed, "Seed for training, scores and Monte-Carlo.")
flags.DEFINE_integer("train_epochs", None, "Training epochs (default: the model's default).")
flags.DEFINE_integer("n_train", None, "Training images to train and score on (default: all).")
flags.DEFINE_integer("n_test", None, "Test images to evaluate on (default: all).")
flags.DEFINE_integer("n_score", None, "Training images used for the scores (default: all).")
flags.DEFINE_integer("chunk_size", None, "Monte-Carlo runs per vmapped chunk (default: auto).")
flags.DEFINE_string("out_dir", None, "Output directory (default: runs/<mode>).")
flags.DEFINE_bool("progress", True, "Show progress bars.")


def config_from_flags() -> reliability.ReliabilityConfig:
    sigma_d = None if FLAGS.sigma_d == "preset" else _cli.check_real("sigma_d", FLAGS.sigma_d, 0.0)
    comp = {"both": (False, True), "on": (True,), "off": (False,)}[FLAGS.compensation]
    return reliability.ReliabilityConfig(
        mode=FLAGS.mode, model=FLAGS.model, dataset=FLAGS.dataset, data_dir=FLAGS.data_dir,
        checkpoint=FLAGS.checkpoint, device=FLAGS.device,
        schemes=_cli.choice_list_flag("schemes", reliability.SCHEMES),
        swim_budget=_cli.real_flag("swim_budget", 0.0, 1.0, low_inclusive=False),
        times=_cli.real_list_flag("times", 0.0, None), compensation=comp,
        fault_rates=_cli.real_list_flag("fault_rates", 0.0, 1.0), sigma_d=sigma_d,
        sigma_wv=FLAGS.sigma_wv, weight_bits=FLAGS.weight_bits, device_bits=FLAGS.device_bits,
        sign=FLAGS.sign, read_noise=FLAGS.read_noise, mc_runs=FLAGS.mc_runs, kpp=FLAGS.kpp,
        threshold=FLAGS.threshold, max_failure=FLAGS.max_failure, sigma_read=FLAGS.sigma_read,
        seed=_cli.seed_flag(), train_epochs=FLAGS.train_epochs, n_train=FLAGS.n_train,
        n_test=FLAGS.n_test, n_score=FLAGS.n_score, chunk_size=FLAGS.chunk_size,
        progress=FLAGS.progress)


def main(argv: list[str]) -> None:
    """Checks the flags and every input before any work (one line, ``error:
    ...``, exit status 2, nothing created), then runs the experiment."""
    _cli.no_arguments(argv)
    with _cli.user_errors():
        config = config_from_flags()
    out_dir = FLAGS.out_dir or f"runs/{config.mode}"
    _cli.check_sweep_inputs(config.sweep_config(), out_dir)
    rows = reliability.run(config, out_dir)
    with open(f"{out_dir}/summary.md", encoding="utf-8") as f:
        print(f.read())
    logging.info("%d points in %s/results.jsonl", len(rows), out_dir)


if __name__ == "__main__":
    _cli.run(main)

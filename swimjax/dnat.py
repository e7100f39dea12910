"""D-NAT: non-ideality aware training for a CiM macro, and its evaluation
(Lin et al., "D-NAT: Data-Driven Non-Ideality Aware Training Framework for
Fabricated Computing-In-Memory Macros", IEEE JETCAS 12(2), 2022).

``run_dnat(config, out_dir)`` takes a floating-point model (trained or loaded
as the SWIM sweep does, :func:`swimjax.sweep.prepare`), maps its middle layers
onto a macro (:mod:`swimjax.crossbar`: DAC, arrays of ``R`` rows, cell slices,
ADC) and compares, under a data-driven MAC error model
(:mod:`swimjax.mac_error`), models trained in four ways:

* ``float`` — the floating-point model as it is (the "conventionally trained
  model" put on the chip), DAC bounds calibrated on its activations;
* ``qat`` — fine-tuned with the ideal macro (DAC, weight and ADC quantization,
  no error model): the quantization-aware upper bound;
* ``anat`` — fine-tuned with the Gaussian error model of the same mean and
  variance per code (A-MAC-EM, :func:`swimjax.mac_error.gaussian_like`);
* ``dnat`` — fine-tuned with the error model itself in the forward pass, a
  straight-through or statistical gradient, and fixed / PACT / E-PACT bounds.

Every model is evaluated on the ideal macro (``clean_acc``, deterministic) and
by Monte-Carlo under the error model (one draw of every partial sum's readout
per run and example: :func:`swimjax.montecarlo.evaluate` with per-example
forward keys). ``out_dir`` gets ``results.jsonl`` (one row per (training,
gradient, quantizer, error model) point; resumable; rows of another
configuration are never mixed in), ``accuracy.png`` and ``summary.md``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from swimjax import _validation as v
from swimjax import (checkpoint, crossbar, data as data_lib, mac_error, models, montecarlo,
                     quantizers, report, results, sweep, training)

__all__ = ["DnatConfig", "Point", "points", "MacroModel", "run_dnat", "KEY_FIELDS",
           "TRAININGS", "GRADIENTS", "error_model_for"]

TRAININGS = ("float", "qat", "anat", "dnat")
GRADIENTS = ("statistical", "ste")
KEY_FIELDS = ("config_id", "training", "gradient", "quantizer", "error_model")
NON_IDENTITY_FIELDS = ("trainings", "gradients", "quantizers", "progress")


@dataclasses.dataclass(frozen=True)
class DnatConfig:
    """One D-NAT experiment (every field is a flag of ``experiments/dnat.py``).

    Attributes:
      model, dataset, data_dir, checkpoint, seed, float_epochs, n_train, n_test:
        the floating-point model and its data, as in
        :class:`swimjax.sweep.SweepConfig` (``float_epochs`` is its
        ``train_epochs``).
      macro: a :data:`swimjax.crossbar.PRESETS` name.
      rows, dac_bits, adc_bits, weight_bits, adc_range: overrides of the
        preset's values (None: the preset's).
      error_model: a :data:`swimjax.mac_error.PRESETS` name (a synthetic
        table, drawn from ``seed``, one per ADC with ``banks``) or a table file (``.npz``/``.csv``, see
        :func:`swimjax.mac_error.load`) with the ADC's ``2^b`` codes.
      banks: ADCs with a table of their own for a synthetic error model (the
        D-NAT macro's 16; :func:`swimjax.crossbar.column_banks` assigns the
        columns), or None for one table shared by all; a table file brings
        its own banks.
      layers: the macro layers (:func:`swimjax.crossbar.transform`).
      trainings: which of :data:`TRAININGS` to run.
      gradients: the error model's gradients tried by ``dnat``.
      quantizers: DAC bound kinds (``"epact"``, ``"pact"``, ``"fixed"``); the
        first is used by ``qat`` and ``anat`` and with every gradient of
        ``dnat``, the others with ``dnat``'s first gradient.
      start: where ``anat`` and ``dnat`` fine-tuning starts: ``"auto"`` (the
        default: ``"qat"`` when ``"qat"`` is in ``trainings``, else
        ``"float"``; resolved on construction), ``"float"`` (the
        floating-point model, DAC bounds calibrated on its activations) or
        ``"qat"`` (the ``qat`` model: its weights, and its bounds where the
        quantizer is of the same kind, else bounds calibrated on its weights;
        needs ``"qat"`` in ``trainings``; the QAT model is kept in
        ``out_dir`` so a resumed run does not train it again).
      calibration_percentile: the percentile of each macro layer's inputs
        that sets the initial upper (and, signed, lower) DAC bound, in
        ``(0, 100]`` (:func:`swimjax.quantizers.calibrate`).
      epochs: fine-tuning epochs of ``qat``, ``anat`` and ``dnat``.
      learning_rate: Adam's learning rate for fine-tuning (weights and bounds).
      batch_size: fine-tuning batch size.
      mc_runs: Monte-Carlo runs under the error model (>= 1).
      progress: show progress bars.

    Defaults: LeNet on the offline digits, the D-NAT macro (its ADC's full
    scale at half the largest possible partial sum) with the ``macro_like``
    synthetic table, one per ADC (16), whose distortion is mostly systematic;
    4 fine-tuning epochs starting from the QAT model, 500 test images and 8
    Monte-Carlo runs. Measured over seeds 0-2 (mean +- standard error): QAT
    95.6 +- 0.3 % on the ideal macro, 36.8 +- 14.5 % under the table (drop
    58.8 +- 14.3 points, each seed >= 36); D-NAT (statistical gradient,
    E-PACT) 94.5 +- 0.5 %, 1.1 +- 0.4 points below the ideal QAT model.
    ``severe`` (shared table) is the opposite: mostly random spread, which no
    training removes (at the full-range ADC: 95.6 % -> 53.0 %, 52.5 % under
    its spread alone, 82.6 % under its mean alone).
    """

    model: str = "lenet"
    dataset: str = data_lib.DEFAULT_DATASET
    data_dir: str | None = None
    checkpoint: str | None = None
    seed: int = 0
    float_epochs: int | None = None
    n_train: int | None = None
    n_test: int | None = 500
    macro: str = "dnat"
    rows: int | None = None
    dac_bits: int | None = None
    adc_bits: int | None = None
    weight_bits: int | None = None
    adc_range: float | None = None
    error_model: str = "macro_like"
    banks: int | None = 16
    layers: str = crossbar.DEFAULT
    trainings: tuple[str, ...] = TRAININGS
    gradients: tuple[str, ...] = GRADIENTS
    quantizers: tuple[str, ...] = ("epact", "pact", "fixed")
    start: str = "auto"
    calibration_percentile: float = 99.9
    epochs: int = 4
    learning_rate: float = 1e-3
    batch_size: int = 128
    mc_runs: int = 8
    progress: bool = True

    def __post_init__(self) -> None:
        v.check_choice("model", self.model, models.available_models())
        v.check_choice("macro", self.macro, tuple(crossbar.PRESETS))
        for name in ("trainings", "gradients", "quantizers"):
            values = tuple(dict.fromkeys(getattr(self, name)))
            if not values:
                raise ValueError(f"{name} must name at least one value")
            allowed = {"trainings": TRAININGS, "gradients": GRADIENTS,
                       "quantizers": quantizers.KINDS}[name]
            for x in values:
                v.check_choice(name, x, allowed)
            object.__setattr__(self, name, values)
        if not (self.error_model in mac_error.PRESETS
                or self.error_model.endswith((".npz", ".csv"))):
            raise ValueError(f"error_model must be one of {sorted(mac_error.PRESETS)} or a "
                             f".npz/.csv table file, got {self.error_model!r}")
        v.check_choice("start", self.start, ("auto", "float", "qat"))
        if self.start == "auto":
            object.__setattr__(self, "start", "qat" if "qat" in self.trainings else "float")
        if self.start == "qat" and "qat" not in self.trainings:
            raise ValueError(f"start='qat' needs 'qat' in trainings, got {list(self.trainings)}")
        v.check_range("calibration_percentile", self.calibration_percentile, 0.0, 100.0,
                      low_inclusive=False)
        v.check_int("epochs", self.epochs, 1, None)
        v.check_positive("learning_rate", self.learning_rate)
        v.check_int("batch_size", self.batch_size, 1, None)
        v.check_int("mc_runs", self.mc_runs, 1, None)
        v.check_int("seed", self.seed, 0, None)
        for name in ("float_epochs", "n_train", "n_test", "banks"):
            if getattr(self, name) is not None:
                v.check_int(name, getattr(self, name), 1, None)
        self.macro_config()  # validates the overrides

    @property
    def dataset_label(self) -> str:
        """The dataset's name for files and rows (:func:`swimjax.data.dataset_label`)."""
        return data_lib.dataset_label(self.dataset)

    def macro_config(self) -> crossbar.MacroConfig:
        """The preset with this config's overrides."""
        names = ("rows", "dac_bits", "adc_bits", "weight_bits", "adc_range")
        over = {k: getattr(self, k) for k in names if getattr(self, k) is not None}
        cfg = crossbar.preset(self.macro)
        if "weight_bits" in over and cfg.cell_bits > over["weight_bits"]:
            over["cell_bits"] = over["weight_bits"]
        return dataclasses.replace(cfg, **over)

    def sweep_config(self) -> sweep.SweepConfig:
        """The floating-point model's settings, for :func:`swimjax.sweep.prepare`."""
        return sweep.SweepConfig(model=self.model, dataset=self.dataset,
                                 data_dir=self.data_dir, checkpoint=self.checkpoint,
                                 seed=self.seed, train_epochs=self.float_epochs,
                                 n_train=self.n_train, n_test=self.n_test,
                                 measure_cycles=False, progress=self.progress)


@dataclasses.dataclass(frozen=True)
class Point:
    """One trained model: how it was trained."""

    training: str
    gradient: str
    quantizer: str


def points(config: DnatConfig) -> list[Point]:
    """The (training, gradient, quantizer) points of ``config``, in run order."""
    q0 = config.quantizers[0]
    out: list[Point] = []
    for t in config.trainings:
        if t == "float":
            out.append(Point("float", "-", "fixed"))
        elif t == "qat":
            out.append(Point("qat", "-", q0))
        elif t == "anat":
            out.append(Point("anat", config.gradients[0], q0))
        else:
            out += [Point("dnat", g, q0) for g in config.gradients]
            out += [Point("dnat", config.gradients[0], q) for q in config.quantizers[1:]]
    return out


def error_model_for(config: DnatConfig) -> mac_error.ErrorModel:
    """The evaluation error model: a synthetic preset drawn from the seed, or
    a table file, with the ADC's ``2^b`` codes."""
    n_codes = config.macro_config().n_codes
    if n_codes is None:
        raise ValueError("the macro needs an ADC (adc_bits) to carry an error model")
    if config.error_model in mac_error.PRESETS:
        key = jax.random.fold_in(jax.random.key(config.seed), 7)
        return mac_error.synthetic(key, n_codes, config.error_model, n_banks=config.banks)
    return mac_error.load(config.error_model, n_codes=n_codes)


@dataclasses.dataclass(frozen=True, eq=False)
class MacroModel:
    """A zoo model whose macro layers run on the macro, in the shape
    :func:`swimjax.training.train` trains: variables ``{"params": {"net":
    ..., "bounds": ...}, **state}``; ``train_apply(variables, x, key)`` draws
    the error model with one key per example (``stochastic``)."""

    base: models.Model
    start: Any
    train_macro: crossbar.MacroApply
    eval_macro: crossbar.MacroApply
    stochastic: bool

    @property
    def name(self) -> str:
        return self.base.name

    @property
    def num_classes(self) -> int:
        return self.base.num_classes

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.base.input_shape

    def init(self, key: jax.Array, x: jax.Array | None = None) -> Any:
        """The starting variables (fine-tuning starts from them, not from ``key``)."""
        del key, x
        return self.start

    @staticmethod
    def split(variables: Any) -> tuple[Any, Any]:
        """``(net variables, bounds)``."""
        net = {"params": variables["params"]["net"],
               **{k: val for k, val in variables.items() if k != "params"}}
        return net, variables["params"]["bounds"]

    def train_apply(self, variables: Any, x: jax.Array, key: jax.Array | None = None
                    ) -> tuple[jax.Array, Any]:
        net, bounds = self.split(variables)
        keys = None
        if self.stochastic:
            keys = jax.random.split(key if key is not None else jax.random.key(0), x.shape[0])
        return self.train_macro.fn(net, bounds, x, keys)

    def apply_fn(self, variables: Any, x: jax.Array) -> jax.Array:
        """Inference on the ideal macro (no error model: deterministic)."""
        net, bounds = self.split(variables)
        return self.eval_macro.fn(net, bounds, x)


def _identity(key: jax.Array, params: Any, state: Any) -> Any:
    del key, state
    return params


def _noisy_apply(macro: crossbar.MacroApply) -> Callable:
    def apply(variables: Any, x: jax.Array, keys: jax.Array) -> jax.Array:
        net, bounds = MacroModel.split(variables)
        return macro.fn(net, bounds, x, keys)
    return apply


def identity(config: DnatConfig, prep: sweep.Prepared,
             em: mac_error.ErrorModel | None = None) -> dict[str, Any]:
    """Every setting a row depends on (:func:`swimjax.sweep.config_fields`),
    with the macro's resolved values and the error model's digest (``em``:
    the error model if already built)."""
    fields = sweep.config_fields(config, prep, NON_IDENTITY_FIELDS)
    fields["macro_config"] = dataclasses.asdict(config.macro_config())
    em = error_model_for(config) if em is None else em
    fields["error_model_sha256"] = hashlib.sha256(np.asarray(em.table).tobytes()).hexdigest()
    return json.loads(json.dumps(fields, sort_keys=True, default=str))


def run_dnat(config: DnatConfig, out_dir: str) -> list[dict[str, Any]]:
    """Runs (or resumes) the experiment; returns this configuration's rows."""
    em = error_model_for(config)  # a bad table file fails before any training
    os.makedirs(out_dir, exist_ok=True)
    res = results.ResultsFile(os.path.join(out_dir, "results.jsonl"), KEY_FIELDS)
    prep = sweep.prepare(config.sweep_config(), out_dir)
    ident = identity(config, prep, em)
    cid = sweep.config_id(ident)
    base = dict(ident, config_id=cid, error_model=os.path.basename(config.error_model),
                macro=config.macro)
    others = [r for r in res.rows if r.get("config_id") != cid]
    if others:
        logging.warning("%d rows of %s come from another configuration and are left out of "
                        "this run's summary", len(others), res.path)
    todo = [p for p in points(config)
            if not res.has(dict(base, training=p.training, gradient=p.gradient,
                                quantizer=p.quantizer))]
    logging.info("%d of %d D-NAT points to run", len(todo), len(points(config)))
    if todo:
        _run_points(config, prep, em, res, base, todo, out_dir)
    wanted = {(p.training, p.gradient, p.quantizer) for p in points(config)}
    rows = [r for r in results.select_rows(res.rows, config_id=cid)
            if (r["training"], r["gradient"], r["quantizer"]) in wanted]
    title = (f"{config.model} / {ident['dataset']} on the {config.macro} macro "
             f"(R={config.macro_config().rows}, ADC {config.macro_config().adc_bits} bits), "
             f"error model {base['error_model']}, {config.mc_runs} MC runs")
    report.plot_dnat(rows, os.path.join(out_dir, "accuracy.png"), title=title)
    with open(os.path.join(out_dir, "summary.md"), "w", encoding="utf-8") as f:
        f.write(report.dnat_summary_markdown(rows, title=title))
    return rows


def _run_points(config: DnatConfig, prep: sweep.Prepared, em: mac_error.ErrorModel,
                res: results.ResultsFile, base: dict[str, Any], todo: list[Point],
                out_dir: str) -> None:
    data, model, variables = prep.data, prep.model, prep.variables
    cfg = config.macro_config()
    gaussian = mac_error.gaussian_like(em)
    x_cal = jnp.asarray(data.x_train[:256])
    x_test, y_test = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
    root = jax.random.fold_in(jax.random.key(config.seed), 2)
    k_mc = jax.random.fold_in(root, 0)
    state = {k: val for k, val in variables.items() if k != "params"}
    q0 = config.quantizers[0]
    qat_cache: dict[str, Any] = {}

    transforms: dict[tuple, crossbar.MacroApply] = {}

    def transform(fn_name, qcfg, model_em, gradient):
        """One transform per (function, quantizer, error model, gradient): each
        traces the model once to find its layers."""
        k = (fn_name, qcfg, None if model_em is None else id(model_em), gradient)
        if k not in transforms:
            transforms[k] = crossbar.transform(
                getattr(model, fn_name), variables, x_cal, cfg, qcfg, error_model=model_em,
                gradient=gradient, layers_pattern=config.layers)
        return transforms[k]

    def macros(qcfg, model_em, gradient):
        return (transform("train_apply", qcfg, model_em, gradient if model_em else "ste"),
                transform("apply_fn", qcfg, None, "ste"),
                transform("apply_fn", qcfg, em, "ste"))

    def calibrated(net_params, paths, qcfg):
        return crossbar.calibrate_bounds(model.apply_fn, {"params": net_params, **state},
                                         x_cal, paths, qcfg,
                                         percentile=config.calibration_percentile)

    def fine_tune(p: Point, mm: MacroModel) -> tuple[Any, list]:
        # conv_lowering "xla": the macro layers are already matrix products, and
        # the quantizers' and the error model's custom gradients must be kept
        tcfg = training.TrainConfig(optimizer="adam", learning_rate=config.learning_rate,
                                    epochs=config.epochs, conv_lowering="xla",
                                    batch_size=min(config.batch_size, len(data.y_train)))
        name = f"{p.training}/{p.gradient}/{p.quantizer}".encode()
        key = jax.random.fold_in(root, zlib.crc32(name) % 2**31)
        return training.train(key, mm, data, tcfg, progress=config.progress)

    def qat_model() -> tuple[Any, list]:
        """The QAT model (trained once; kept in ``out_dir`` when D-NAT starts from it)."""
        if "qat" in qat_cache:
            return qat_cache["qat"]
        qcfg = quantizers.QuantizerConfig(kind=q0, bits=cfg.dac_bits)
        train_m, ideal_m, _ = macros(qcfg, None, "ste")
        start = {"params": {"net": variables["params"],
                            "bounds": calibrated(variables["params"], ideal_m.paths, qcfg)},
                 **state}
        path = os.path.join(out_dir, f"qat_{base['config_id'][:16]}.msgpack")
        if config.start == "qat" and os.path.exists(path):
            trained, _ = checkpoint.load(path, target=start)
            out = (trained, [])
            logging.info("loaded the QAT model %s", path)
        else:
            out = fine_tune(Point("qat", "-", q0), MacroModel(model, start, train_m, ideal_m,
                                                              stochastic=False))
            if config.start == "qat":
                checkpoint.save(path, out[0], {"config_id": base["config_id"]})
        qat_cache["qat"] = out
        return out

    for p in todo:
        t0 = time.perf_counter()
        qcfg = quantizers.QuantizerConfig(kind=p.quantizer, bits=cfg.dac_bits)
        model_em = {"float": None, "qat": None, "anat": gaussian, "dnat": em}[p.training]
        grad = p.gradient if p.gradient in GRADIENTS else "ste"
        train_m, ideal_m, noisy_m = macros(qcfg, model_em, grad)
        if p.training == "qat":
            trained, history = qat_model()
            mm = MacroModel(model, trained, train_m, ideal_m, stochastic=False)
        else:
            net = variables["params"]
            bounds = None
            if p.training != "float" and config.start == "qat":
                qat_vars = qat_model()[0]
                net = qat_vars["params"]["net"]
                if p.quantizer == q0:
                    bounds = qat_vars["params"]["bounds"]
            if bounds is None:
                bounds = calibrated(net, ideal_m.paths, qcfg)
            start = {"params": {"net": net, "bounds": bounds}, **state}
            mm = MacroModel(model, start, train_m, ideal_m, stochastic=model_em is not None)
            trained, history = start, []
            if p.training != "float":
                trained, history = fine_tune(p, mm)
        train_s = time.perf_counter() - t0
        clean = training.evaluate_accuracy(mm.apply_fn, trained, data.x_test, data.y_test)
        mc = montecarlo.evaluate(k_mc, _noisy_apply(noisy_m), trained, _identity, x_test,
                                 y_test, config.mc_runs, forward_keys=True, lowering="vmap",
                                 progress=config.progress)
        s = mc.summary
        row = dict(base, training=p.training, gradient=p.gradient, quantizer=p.quantizer,
                   float_acc=prep.clean_test_accuracy, clean_acc=clean, acc_mean=s.mean,
                   acc_std=s.std, acc_sem=s.sem, acc_p1=s.p1, acc_p5=s.p5, acc_min=s.min,
                   acc_max=s.max, mc_runs=s.n_runs, train_seconds=round(train_s, 3),
                   epochs_run=len(history),
                   bounds={k: [float(b.lo), float(b.hi)]
                           for k, b in MacroModel.split(trained)[1].items()})
        res.append(row)
        logging.info("%-5s %-11s %-5s ideal %.2f%%  under the error model %.2f%% +- %.2f "
                     "(p5 %.2f%%)", p.training, p.gradient, p.quantizer, 100 * clean,
                     100 * s.mean, 100 * s.sem, 100 * s.p5)

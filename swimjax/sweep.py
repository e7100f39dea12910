"""The SWIM experiment: train (or load) a model, score its weights, and sweep
methods x budgets of selective write-verify under Monte-Carlo device variation.

``run_sweep(config, out_dir)`` writes, in ``out_dir``:

* ``results.jsonl`` — one JSON object per (method, budget) point, flushed as
  each point finishes; a rerun with the same configuration skips the points
  already there (see :mod:`swimjax.results`).
* ``accuracy_vs_nwc.png`` and ``summary.md`` (see :mod:`swimjax.report`).

Two write-verify models (``config.write_verify``):

* ``"statistical"`` — SWIM's own model (:mod:`swimjax.perturbation`): every
  mapped weight gets ``dW = s * c(N, m) * sigma * eps`` with ``sigma = sigma_wv``
  where verified and ``sigma_d`` elsewhere.
* ``"explicit"`` — every Monte-Carlo run programs the mapped weights through
  the device model and the iterative write-verify loop
  (:mod:`swimjax.programming`): devices with open-loop variation ``sigma_d``,
  verified devices pulsed until within ``tolerance`` (default
  ``sqrt(3) * sigma_wv``, which gives a residual std of about ``sigma_wv`` for
  an error spread evenly over the acceptance band).

NWC is reported two ways: ``nwc`` = fraction of mapped weights verified (SWIM's
axis) and ``nwc_cycles`` = total write cycles of the scheme over those of full
write-verify, measured with the explicit loop (one programming pass per point).

All Monte-Carlo points of a sweep use the same run keys (common random
numbers), so differences between methods are not blurred by independent
sampling noise.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import time
import zlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from swimjax import _validation as v
from swimjax import (checkpoint, data as data_lib, devices, mapping, models, montecarlo,
                     perturbation, programming, report, results, selection, sensitivity,
                     training, write_verify)

KEY_FIELDS = ("model", "dataset", "method", "budget", "sigma_d", "sigma_wv", "weight_bits",
              "device_bits", "write_verify", "mc_runs", "seed", "n_train", "n_test")
DEFAULT_BUDGETS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """Configuration of one SWIM sweep (every field is a flag of ``experiments/swim.py``).

    Attributes:
      model: zoo model name (:func:`swimjax.models.available_models`).
      dataset: dataset name (:func:`swimjax.data.load`), or a ``.npz`` path.
      data_dir: tensorflow-datasets directory for the full datasets.
      checkpoint: checkpoint path to load, or to write after training if it
        does not exist (default ``<out_dir>/<model>_<dataset>_seed<seed>.msgpack``).
      methods: selection methods (:func:`swimjax.sensitivity.available_methods`).
      budgets: fractions of mapped weights to write-verify, each in [0, 1].
      sigma_d: device programming variation without write-verify (full-scale units).
      sigma_wv: residual variation after write-verify (full-scale units).
      weight_bits: N, magnitude bits per weight (>= 1).
      device_bits: m, bits per device (1 <= m <= N).
      write_verify: ``"statistical"`` or ``"explicit"``.
      mc_runs: Monte-Carlo runs per point (>= 1).
      seed: seed for training, scoring and Monte-Carlo.
      train_epochs: epochs when training (None: the training config's default).
      n_train: training images used for training and scores (None: all).
      n_test: test images used (None: all).
      n_score: training images used to compute the scores (None: all).
      tolerance: explicit write-verify acceptance band (None: sqrt(3) * sigma_wv).
      max_pulses: explicit write-verify pulse budget per device.
      sigma_read: read noise during verify (full-scale units).
      chunk_size: Monte-Carlo runs per vmapped chunk (None: automatic).
      measure_cycles: measure ``nwc_cycles`` with one explicit programming pass
        per point (costly for models with tens of millions of devices).
      progress: show progress bars.
    """

    model: str = "lenet"
    dataset: str = data_lib.DEFAULT_DATASET
    data_dir: str | None = None
    checkpoint: str | None = None
    methods: tuple[str, ...] = ("swim", "magnitude", "random")
    budgets: tuple[float, ...] = DEFAULT_BUDGETS
    sigma_d: float = 0.2
    sigma_wv: float = 0.03
    weight_bits: int = 8
    device_bits: int = 1
    write_verify: str = "statistical"
    mc_runs: int = 100
    seed: int = 0
    train_epochs: int | None = None
    n_train: int | None = None
    n_test: int | None = None
    n_score: int | None = None
    tolerance: float | None = None
    max_pulses: int = 20
    sigma_read: float = 0.0
    chunk_size: int | None = None
    measure_cycles: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.methods:
            raise ValueError("methods must name at least one selection method")
        for m in self.methods:
            v.check_choice("methods", m, sensitivity.available_methods())
        if not self.budgets:
            raise ValueError("budgets must hold at least one fraction in [0, 1]")
        for b in self.budgets:
            v.check_range("budgets", b, 0.0, 1.0)
        v.check_choice("model", self.model, models.available_models())
        v.check_nonnegative("sigma_d", self.sigma_d)
        v.check_nonnegative("sigma_wv", self.sigma_wv)
        v.check_int("weight_bits", self.weight_bits, 1, 32)
        v.check_int("device_bits", self.device_bits, 1, self.weight_bits)
        v.check_choice("write_verify", self.write_verify, ("statistical", "explicit"))
        v.check_int("mc_runs", self.mc_runs, 1, None)
        v.check_int("seed", self.seed, 0, None)
        if self.train_epochs is not None:
            v.check_int("train_epochs", self.train_epochs, 1, None)
        if self.n_train is not None:
            v.check_int("n_train", self.n_train, 1, None)
        if self.n_test is not None:
            v.check_int("n_test", self.n_test, 1, None)
        if self.n_score is not None:
            v.check_int("n_score", self.n_score, 1, None)
        if self.tolerance is not None:
            v.check_positive("tolerance", self.tolerance)
        v.check_int("max_pulses", self.max_pulses, 1, None)
        v.check_nonnegative("sigma_read", self.sigma_read)
        if self.chunk_size is not None:
            v.check_int("chunk_size", self.chunk_size, 1, None)

    @property
    def dataset_label(self) -> str:
        """The dataset's name for files and rows (a path's file stem)."""
        if self.dataset.endswith(".npz"):
            return os.path.splitext(os.path.basename(self.dataset))[0]
        return self.dataset.replace("/", "_")

    def mapping_config(self) -> mapping.MappingConfig:
        """Sign-bit mapping: K devices per weight, as in SWIM's error model, so
        the explicit loop's unverified weight error matches the statistical one."""
        return mapping.MappingConfig(weight_bits=self.weight_bits, device_bits=self.device_bits,
                                     sign="sign_bit")

    def variation_config(self) -> perturbation.VariationConfig:
        return perturbation.VariationConfig(sigma_d=self.sigma_d, sigma_wv=self.sigma_wv,
                                            weight_bits=self.weight_bits,
                                            device_bits=self.device_bits)

    def device_config(self) -> devices.DeviceConfig:
        """The device of the explicit loop: open-loop writes (and corrective
        pulses) with variation ``sigma_d``, reads with ``sigma_read``.
        Conductances are not clipped, as in SWIM's Gaussian model."""
        return devices.DeviceConfig(sigma_program=self.sigma_d, sigma_pulse=self.sigma_d,
                                    sigma_read=self.sigma_read, clip=False, name="sweep")

    def write_verify_config(self) -> write_verify.WriteVerifyConfig:
        tol = self.tolerance if self.tolerance is not None else math.sqrt(3.0) * self.sigma_wv
        return write_verify.WriteVerifyConfig(tolerance=tol, max_pulses=self.max_pulses)


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A trained model with its data, ready to be swept."""

    model: models.Model
    variables: Any
    data: data_lib.Dataset
    clean_test_accuracy: float
    checkpoint_path: str
    trained_now: bool


def default_checkpoint_path(config: SweepConfig, out_dir: str) -> str:
    """``<out_dir>/<model>_<dataset>[_n<n_train>][_e<epochs>]_seed<seed>.msgpack``."""
    parts = [config.model, config.dataset_label]
    if config.n_train is not None:
        parts.append(f"n{config.n_train}")
    if config.train_epochs is not None:
        parts.append(f"e{config.train_epochs}")
    return os.path.join(out_dir, "_".join(parts) + f"_seed{config.seed}.msgpack")


def prepare(config: SweepConfig, out_dir: str) -> Prepared:
    """Loads the data and the checkpoint, or trains the model and writes it."""
    data = data_lib.load(config.dataset, data_dir=config.data_dir, n_train=config.n_train,
                         n_test=config.n_test)
    model = models.get_model(config.model, num_classes=data.num_classes,
                             input_shape=tuple(data.x_train.shape[1:]))
    path = config.checkpoint or default_checkpoint_path(config, out_dir)
    trained_now = False
    if os.path.exists(path):
        target = model.init(jax.random.key(0))
        variables, meta = checkpoint.load(path, target=target)
        for field, want in (("model", config.model), ("dataset", config.dataset_label)):
            if meta.get(field) not in (None, want):
                raise ValueError(f"checkpoint {path} is for {field} {meta.get(field)!r}, "
                                 f"not {want!r}: pass another --checkpoint or remove it")
        logging.info("loaded checkpoint %s", path)
    else:
        tcfg = training.default_config(config.model)
        if config.train_epochs is not None:
            tcfg = dataclasses.replace(tcfg, epochs=config.train_epochs)
        tcfg = dataclasses.replace(tcfg, batch_size=min(tcfg.batch_size, len(data.y_train)))
        variables, _ = training.train(jax.random.key(config.seed), model, data, tcfg,
                                      progress=config.progress)
        trained_now = True
    acc = float(training.evaluate_accuracy(model.apply_fn, variables, data.x_test, data.y_test))
    if trained_now:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        checkpoint.save(path, variables, dict(model=config.model, dataset=config.dataset_label,
                                              seed=config.seed, test_accuracy=acc))
        logging.info("trained %s to %.2f%% test accuracy; wrote %s", config.model, 100 * acc, path)
    return Prepared(model, variables, data, acc, path, trained_now)


def score_batches(data: data_lib.Dataset, n_score: int | None, batch_size: int = 500):
    """The training data used for scoring, as stacked batches ``(x, y)`` of shapes
    ``(n_batches, batch_size, ...)``, ``(n_batches, batch_size)``."""
    x, y = data.x_train, data.y_train
    n = len(x) if n_score is None else min(n_score, len(x))
    bs = min(batch_size, n)
    nb = n // bs
    return (jnp.asarray(x[: nb * bs]).reshape(nb, bs, *x.shape[1:]),
            jnp.asarray(y[: nb * bs]).reshape(nb, bs))


def masked_model(config: SweepConfig, apply_fn: Callable[[Any, jax.Array], jax.Array],
                 selected: Any) -> tuple[Callable, Callable]:
    """``(apply_fn, perturb_fn)`` over the pair ``{"params": p, "mask": m}``.

    The write-verify mask travels as data beside the parameters instead of
    being closed over, so every point of a sweep runs the same two functions:
    :func:`swimjax.montecarlo.evaluate` compiles once and reuses the program
    for every (method, budget).
    """
    if config.write_verify == "statistical":
        vcfg = config.variation_config()

        def program(key, p, m):
            return perturbation.perturb(key, p, m, vcfg, selected)
    else:
        hw = (config.mapping_config(), config.device_config(), config.write_verify_config())

        def program(key, p, m):
            return programming.program_params(key, p, m, *hw, selected).params

    def masked_apply(pm, x):
        return apply_fn(pm["params"], x)

    def masked_perturb(key, pm):
        return {"params": program(key, pm["params"], pm["mask"]), "mask": pm["mask"]}

    return masked_apply, masked_perturb


def mask_fingerprint(mask: Any) -> str:
    """A digest of a mask's bits: points with equal masks (budget 0 and 1 of
    every method) share one Monte-Carlo evaluation, which is exact because all
    points use the same run keys."""
    h = hashlib.sha256()
    for m in jax.tree.leaves(mask):
        h.update(np.packbits(np.asarray(m, dtype=bool)).tobytes())
        h.update(str(np.shape(m)).encode())
    return h.hexdigest()


def _score(method: str, key: jax.Array, apply_fn, params, batches) -> Any:
    """Scores of one method, with a key that depends on the method's name only.

    Curvature estimators return ``h_ii`` in weight units (``swim`` is asked for
    weight units: with per-layer sigmas ``s * c * sigma`` the ranking by
    ``h_ii * (sigma_u^2 - sigma_v^2)`` is then exactly SWIM's ranking of the
    max-normalized curvature).
    """
    key = jax.random.fold_in(key, zlib.crc32(method.encode()) % 2**31)
    kw = {"normalize": False} if method == "swim" else {}
    return sensitivity.score(method, key, apply_fn, params, batches, **kw)


def _select(method: str, scores: Any, budget: float, sigma_u: Any, sigma_v: Any, params: Any,
            selected: Any) -> Any:
    """The mask of one point. Curvature methods rank by the expected loss
    removed, ``h_ii * (sigma_u^2 - sigma_v^2)``; the baselines (magnitude,
    random, gradient, saliency) rank by their own score."""
    if method in sensitivity.BASELINE_METHODS:
        sigma_u, sigma_v = 1.0, 0.0
    return selection.select(scores, budget, sigma_unverified=sigma_u, sigma_verified=sigma_v,
                            params=params, selected=selected)


def run_sweep(config: SweepConfig, out_dir: str) -> list[dict[str, Any]]:
    """Runs (or resumes) the sweep; returns every row of this configuration."""
    os.makedirs(out_dir, exist_ok=True)
    res = results.ResultsFile(os.path.join(out_dir, "results.jsonl"), KEY_FIELDS)
    base = dict(model=config.model, dataset=config.dataset_label, sigma_d=config.sigma_d,
                sigma_wv=config.sigma_wv, weight_bits=config.weight_bits,
                device_bits=config.device_bits, write_verify=config.write_verify,
                mc_runs=config.mc_runs, seed=config.seed,
                n_train=config.n_train or -1, n_test=config.n_test or -1)
    todo = [(m, float(b)) for m in config.methods for b in config.budgets
            if not res.has(dict(base, method=m, budget=float(b)))]
    logging.info("%d of %d points to run", len(todo), len(config.methods) * len(config.budgets))
    if todo:
        _run_points(config, out_dir, res, base, todo)
    rows = results.select_rows(res.rows, **base)
    rows = [r for r in rows if r["method"] in config.methods]
    title = (f"{config.model} / {config.dataset_label}: sigma_d={config.sigma_d}, "
             f"sigma_wv={config.sigma_wv}, N={config.weight_bits}, m={config.device_bits}, "
             f"{config.write_verify} write-verify, {config.mc_runs} MC runs")
    report.plot_accuracy_vs_nwc(rows, os.path.join(out_dir, "accuracy_vs_nwc.png"), title=title)
    with open(os.path.join(out_dir, "summary.md"), "w", encoding="utf-8") as f:
        f.write(report.summary_markdown(rows, title=title))
    return rows


def _run_points(config: SweepConfig, out_dir: str, res: results.ResultsFile,
                base: dict[str, Any], todo: list[tuple[str, float]]) -> None:
    prep = prepare(config, out_dir)
    params = prep.variables
    apply_fn = prep.model.apply_fn
    selected = mapping.mapped_leaves(params)
    logging.info("mapped leaves:\n%s", mapping.describe_selection(params, selected))
    sigma_u, sigma_v = perturbation.weight_sigmas(params, config.variation_config(), selected)
    batches = score_batches(prep.data, config.n_score)
    x_test, y_test = jnp.asarray(prep.data.x_test), jnp.asarray(prep.data.y_test)

    root = jax.random.key(config.seed)
    k_score, k_mc, k_prog = jax.random.split(jax.random.fold_in(root, 1), 3)
    hw = (config.mapping_config(), config.device_config(), config.write_verify_config())
    full_cycles = (programming.cycles_full_write_verify(k_prog, params, *hw, selected).total_cycles
                   if config.measure_cycles else None)

    masked_apply, masked_perturb = masked_model(config, apply_fn, selected)
    evaluated: dict[str, montecarlo.MCResult] = {}
    n_mapped = sum(int(np.size(p)) for p, s in zip(jax.tree.leaves(params),
                                                    jax.tree.leaves(selected)) if s)
    scores: dict[str, Any] = {}
    # The quadratic model's predicted loss increase uses one curvature for all
    # methods (SWIM's Gauss-Newton diagonal), so rows are comparable.
    curvature = _score("swim", k_score, apply_fn, params, batches)
    scores["swim"] = curvature
    for method, budget in todo:
        t0 = time.perf_counter()
        if method not in scores:
            scores[method] = _score(method, k_score, apply_fn, params, batches)
        mask = _select(method, scores[method], budget, sigma_u, sigma_v, params, selected)
        n_verified = sum(int(np.sum(m)) for m, s in zip(jax.tree.leaves(mask),
                                                         jax.tree.leaves(selected)) if s)
        nwc = n_verified / n_mapped
        if config.measure_cycles:
            total_cycles = programming.program_params(k_prog, params, mask, *hw,
                                                      selected).total_cycles
            nwc_cycles = total_cycles / full_cycles
        else:
            total_cycles = full_cycles = nwc_cycles = None
        fingerprint = mask_fingerprint(mask)
        if fingerprint not in evaluated:  # same mask, same run keys: same numbers
            evaluated[fingerprint] = montecarlo.evaluate(
                k_mc, masked_apply, {"params": params, "mask": mask}, masked_perturb, x_test,
                y_test, config.mc_runs, chunk_size=config.chunk_size, progress=config.progress)
        mc = evaluated[fingerprint]
        s = mc.summary
        row = dict(base, method=method, budget=budget, nwc=nwc,
                   speedup=(1.0 / nwc if nwc > 0 else None),
                   nwc_cycles=nwc_cycles,
                   speedup_cycles=None if nwc_cycles is None else 1.0 / nwc_cycles,
                   total_cycles=total_cycles, full_wv_cycles=full_cycles,
                   n_verified=n_verified, n_mapped=n_mapped,
                   acc_mean=s.mean, acc_std=s.std, acc_sem=s.sem, acc_p1=s.p1, acc_p5=s.p5,
                   acc_min=s.min, acc_max=s.max, clean_acc=float(mc.clean_accuracy),
                   loss_mean=float(np.mean(mc.loss)),
                   predicted_loss_increase=float(selection.predicted_loss_increase(
                       curvature, mask, sigma_u, sigma_v)),
                   seconds=round(time.perf_counter() - t0, 3))
        res.append(row)
        logging.info("%-10s budget %.3f  NWC %.4f (cycles %s)  acc %.2f%% +- %.2f  p5 %.2f%%",
                     method, budget, nwc, "-" if nwc_cycles is None else f"{nwc_cycles:.4f}",
                     100 * s.mean, 100 * s.std, 100 * s.p5)

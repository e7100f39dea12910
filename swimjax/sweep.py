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
  verified devices pulsed until within ``tolerance`` or out of ``max_pulses``
  (by default both from :func:`swimjax.write_verify.config_for_sigma`: the
  loop whose verified devices, failed ones included, end with residual std
  ``sigma_wv``, at most ``max_failure`` of them failing). Explicit rows (and
  every row with ``measure_cycles``) report the tolerance and budget used,
  the failed devices and the measured residual std of the verified devices.

Non-uniform variation (U-SWIM, ``config.nonuniform_factor``, e.g. ``RRAM4``):
the statistical model gives the middle band of weights ``r`` times the sigma;
``swim`` then ranks by the sigma-aware score, ``swim_uniform`` by SWIM's
uniform one, and ``summary.md`` gives the NWC each method needs to come within
one point of full write-verify with its standard error (:func:`nwc_within`).
A device preset (``config.device``) replaces the explicit loop's device;
``summary.md`` lists its values and source.

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
import json
import os
import time
import zlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from swimjax import __version__ as swimjax_version
from swimjax import _validation as v
from swimjax import (checkpoint, data as data_lib, devices, distributed, mapping, models,
                     montecarlo, perturbation, programming, report, results, selection,
                     sensitivity, training, write_verify)

#: What identifies a row: the configuration's digest (every setting that
#: changes the numbers, the trained weights' and the test data's digests and the
#: library version; see :func:`identity`) and the point within it.
KEY_FIELDS = ("config_id", "method", "budget", "sigma_d")
#: SweepConfig fields that do not change any number of a row (chunking is
#: bit-identical; methods, budgets and sigmas are the points themselves).
NON_IDENTITY_FIELDS = ("methods", "budgets", "sigma_d", "chunk_size", "progress")
DEFAULT_BUDGETS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
#: Curvature methods asked for weight-unit scores (their ranking by
#: ``h_ii (sigma_u^2 - sigma_v^2)`` with per-layer sigmas is then SWIM's).
WEIGHT_UNIT_METHODS = ("swim", "swim_grad")
#: Pulse budget of a hand-set ``tolerance`` without ``max_pulses``.
DEFAULT_MAX_PULSES = 20
#: Selection methods of the sweep beyond :func:`swimjax.sensitivity.available_methods`,
#: each with the score it ranks: ``swim_uniform`` is SWIM's curvature ranked as if
#: the variation were uniform (``h_ii (sigma_u^2 - sigma_v^2)`` with the uniform
#: model's per-layer sigmas), the baseline U-SWIM compares its sigma-aware
#: ranking (``swim`` under a non-uniform model) with. Under uniform variation it
#: selects exactly what ``swim`` selects.
SWEEP_METHODS = {"swim_uniform": "swim"}
#: Fields added after rows first carried a ``config_id``, with their defaults: a
#: field at its default is left out of :func:`identity`, so the rows of a
#: configuration that does not use it keep their ``config_id``.
ADDED_FIELDS = {"nonuniform_factor": 1.0, "device": None, "train_noise": "none",
                "train_sigma": None, "rcg_tau": None}
#: Right-censoring point of ``rcg`` training noise when ``rcg_tau`` is not set.
DEFAULT_RCG_TAU = 1.0
#: Largest training sigma accepted (full-scale units: a device's whole range).
MAX_TRAIN_SIGMA = 1.0


def available_methods() -> tuple[str, ...]:
    """Selection methods a sweep accepts: the scores of
    :func:`swimjax.sensitivity.available_methods` and :data:`SWEEP_METHODS`."""
    return tuple(sensitivity.available_methods()) + tuple(SWEEP_METHODS)


def nonuniform_factor(value: Any) -> float:
    """The non-uniform factor ``r`` of ``value``: a preset name of
    :data:`swimjax.perturbation.NONUNIFORM_PRESETS` (``RRAM1``, ``FeFET2``,
    ``RRAM4``, ``FeFET6``; any case) or a number ``> 0`` (1 = uniform)."""
    if isinstance(value, str):
        names = {k.lower(): f for k, f in perturbation.NONUNIFORM_PRESETS.items()}
        if value.strip().lower() in names:
            return float(names[value.strip().lower()])
        try:
            value = float(value)
        except ValueError:
            raise ValueError(
                f"nonuniform must be one of {sorted(perturbation.NONUNIFORM_PRESETS)} or a "
                f"factor > 0, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"nonuniform must be one of {sorted(perturbation.NONUNIFORM_PRESETS)} "
                         f"or a factor > 0, got {value!r}")
    return v.check_positive("nonuniform", float(value))


def nonuniform_label(factor: float) -> str:
    """The preset name of ``factor`` (``RRAM4`` for 4), else ``r=<factor>``."""
    for name, f in perturbation.NONUNIFORM_PRESETS.items():
        if f == factor:
            return name
    return f"r={factor:g}"


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
      sigma_d: device programming variation without write-verify (full-scale
        units): one value or a tuple of values to sweep (all statistical
        points of all sigmas are evaluated by one compiled program).
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
      tolerance: explicit write-verify acceptance band (full-scale units; None:
        from :func:`swimjax.write_verify.config_for_sigma`).
      max_pulses: explicit write-verify pulse budget per device (None: from
        :func:`swimjax.write_verify.config_for_sigma`).
      max_failure: the largest fraction of verified devices allowed to fail
        when the budget is chosen automatically, in (0, 1).
      sigma_read: read noise during verify (full-scale units).
      chunk_size: Monte-Carlo runs per vmapped chunk (None: automatic).
      measure_cycles: measure ``nwc_cycles`` with one explicit programming pass
        per point (costly for models with tens of millions of devices).
      progress: show progress bars.
      nonuniform_factor: non-uniform variation of the statistical model
        (U-SWIM): weights with ``0.25 < |W|/max|W| < 0.75`` get ``sigma * r``,
        every sigma renormalised by ``1 / sqrt(0.4 r^2 + 0.6)``
        (:class:`swimjax.perturbation.VariationConfig`); 1 = uniform. A preset
        name (``RRAM1``, ``FeFET2``, ``RRAM4``, ``FeFET6``) is accepted and
        stored as its factor. ``swim`` (and every curvature method) then ranks
        by the sigma-aware score ``h_ii (sigma_u,i^2 - sigma_v,i^2)`` with the
        non-uniform per-weight sigmas; ``swim_uniform`` ranks as if the
        variation were uniform. The statistical model only: the explicit loop
        programs every device with one sigma, so ``write_verify="explicit"``
        is rejected; ``nwc_cycles`` are measured on the uniform device.
      device: device preset of the explicit write-verify loop (and of the
        cycle measurement): a name of :data:`swimjax.devices.PRESETS` or a JSON
        preset file; None (default): an unclipped Gaussian device with
        variation ``sigma_d`` on writes and pulses (SWIM's model). A preset
        brings its own open-loop and pulse variation, clipping and read noise
        (``sigma_read`` > 0 replaces its read noise); ``sigma_d`` then sets the
        statistical model only. The loop of a preset with a state-dependent
        (polynomial) variation needs ``tolerance``.
      kpp: the k of the k-th percentile performance recorded in every row
        (``acc_kpp``), in [0, 100].
      threshold: rows record the fraction of runs below this accuracy
        (``p_below_threshold``); None: 1 point below the clean accuracy.
      train_noise: noise-injection training of the model when it is trained
        here (:data:`swimjax.training.TRAIN_NOISES`): ``"none"`` (plain),
        ``"gaussian"`` (fresh noise of the statistical model every step,
        nothing verified) or ``"rcg"`` (the same right-censored at
        ``rcg_tau``, TRICE). Its setting is part of the default checkpoint
        name, of the checkpoint's metadata and of the rows' identity.
      train_sigma: device sigma of the training noise, in (0, 1] (full-scale
        units); None: ``sigma_d`` (which must then be one value). Only with
        ``train_noise`` other than ``"none"``.
      rcg_tau: right-censoring point of ``rcg`` noise (``eps = min(eps,
        tau)``, in units of the noise's std), finite; None: 1.0
        (:data:`DEFAULT_RCG_TAU`). Only with ``train_noise="rcg"``.
    """

    model: str = "lenet"
    dataset: str = data_lib.DEFAULT_DATASET
    data_dir: str | None = None
    checkpoint: str | None = None
    methods: tuple[str, ...] = ("swim", "magnitude", "random")
    budgets: tuple[float, ...] = DEFAULT_BUDGETS
    sigma_d: tuple[float, ...] = (0.2,)
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
    max_pulses: int | None = None
    max_failure: float = 1e-3
    sigma_read: float = 0.0
    chunk_size: int | None = None
    measure_cycles: bool = True
    progress: bool = True
    nonuniform_factor: float = 1.0
    device: str | None = None
    kpp: float = 1.0
    threshold: float | None = None
    train_noise: str = "none"
    train_sigma: float | None = None
    rcg_tau: float | None = None

    def __post_init__(self) -> None:
        self._check_train_noise()
        v.check_range("kpp", self.kpp, 0.0, 100.0)
        if self.threshold is not None:
            v.check_range("threshold", self.threshold, 0.0, 1.0)
        if not self.methods:
            raise ValueError("methods must name at least one selection method")
        for m in self.methods:
            v.check_choice("methods", m, available_methods())
        if not self.budgets:
            raise ValueError("budgets must hold at least one fraction in [0, 1]")
        for b in self.budgets:
            v.check_range("budgets", b, 0.0, 1.0)
        v.check_choice("model", self.model, models.available_models())
        sigmas = self.sigma_d if isinstance(self.sigma_d, (tuple, list)) else (self.sigma_d,)
        if not sigmas:
            raise ValueError("sigma_d must hold at least one value >= 0")
        object.__setattr__(self, "sigma_d", tuple(
            v.check_nonnegative("sigma_d", s) for s in dict.fromkeys(sigmas)))
        object.__setattr__(self, "methods", tuple(dict.fromkeys(self.methods)))
        object.__setattr__(self, "budgets", tuple(float(b) for b in dict.fromkeys(self.budgets)))
        v.check_nonnegative("sigma_wv", self.sigma_wv)
        v.check_int("weight_bits", self.weight_bits, 1, mapping.MAX_WEIGHT_BITS)
        v.check_int("device_bits", self.device_bits, 1,
                    min(self.weight_bits, mapping.MAX_DEVICE_BITS))
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
        if self.max_pulses is not None:
            v.check_int("max_pulses", self.max_pulses, 1, None)
        v.check_range("max_failure", self.max_failure, 0.0, 1.0, low_inclusive=False,
                      high_inclusive=False)
        object.__setattr__(self, "nonuniform_factor", nonuniform_factor(self.nonuniform_factor))
        if self.nonuniform_factor != 1.0 and self.write_verify == "explicit":
            raise ValueError(
                f"nonuniform_factor={self.nonuniform_factor:g} applies to the statistical model "
                f"only (write_verify='statistical'): the explicit loop programs every device "
                f"with one sigma")
        uses_loop = self.write_verify == "explicit" or self.measure_cycles
        if self.device is not None:
            dev = devices.resolve_preset(self.device).device
            if self.write_verify == "explicit" and len(self.sigma_d) > 1:
                raise ValueError(
                    f"sigma_d must be one value with device={self.device!r} and "
                    f"write_verify='explicit' (the preset sets the device's variation), got "
                    f"{self.sigma_d}")
            if uses_loop and self.tolerance is None:
                if dev.variation != "absolute" or dev.pulse_variation != "absolute":
                    raise ValueError(
                        f"tolerance must be set for device={self.device!r}: its variation is "
                        f"{dev.variation!r} (pulses {dev.pulse_variation!r}), and the "
                        f"automatic loop needs an absolute one (or turn measure_cycles off)")
                if not 0.0 < self.sigma_wv < dev.sigma_program:
                    raise ValueError(
                        f"sigma_wv must be in (0, {dev.sigma_program}) (device "
                        f"{self.device!r}'s sigma_program) for the explicit write-verify loop, "
                        f"got {self.sigma_wv}; set tolerance to choose the loop by hand")
        elif uses_loop and self.tolerance is None \
                and not 0.0 < self.sigma_wv < min(self.sigma_d):
            raise ValueError(
                f"sigma_wv must be in (0, min(sigma_d)) = (0, {min(self.sigma_d)}) for the "
                f"explicit write-verify loop (write_verify='explicit' or measure_cycles), got "
                f"{self.sigma_wv}; set tolerance to choose the loop by hand, or turn "
                f"measure_cycles off")
        v.check_nonnegative("sigma_read", self.sigma_read)
        if self.chunk_size is not None:
            v.check_int("chunk_size", self.chunk_size, 1, None)

    def _check_train_noise(self) -> None:
        """``train_noise`` / ``train_sigma`` / ``rcg_tau``: known, in range, and
        only where they have an effect."""
        v.check_choice("train_noise", self.train_noise, training.TRAIN_NOISES)
        if self.train_sigma is not None:
            if self.train_noise == "none":
                raise ValueError(f"train_sigma={self.train_sigma!r} needs train_noise "
                                 f"'gaussian' or 'rcg', got train_noise='none'")
            object.__setattr__(self, "train_sigma", v.check_range(
                "train_sigma", self.train_sigma, 0.0, MAX_TRAIN_SIGMA, low_inclusive=False))
        if self.rcg_tau is not None:
            if self.train_noise != "rcg":
                raise ValueError(f"rcg_tau={self.rcg_tau!r} needs train_noise='rcg', got "
                                 f"train_noise={self.train_noise!r}")
            object.__setattr__(self, "rcg_tau", v.check_range("rcg_tau", self.rcg_tau))
            if not np.isfinite(self.rcg_tau):
                raise ValueError(f"rcg_tau must be in (-inf, inf) (finite), got {self.rcg_tau!r}")
        sigmas = self.sigma_d if isinstance(self.sigma_d, (tuple, list)) else (self.sigma_d,)
        if self.train_noise != "none" and self.train_sigma is None and len(sigmas) > 1:
            raise ValueError(f"train_sigma must be set (in (0, {MAX_TRAIN_SIGMA:g}]) when "
                             f"several sigma_d are swept with train_noise="
                             f"{self.train_noise!r}, got sigma_d={tuple(sigmas)}")

    @property
    def dataset_label(self) -> str:
        """The dataset's name for files and rows (:func:`swimjax.data.dataset_label`)."""
        return data_lib.dataset_label(self.dataset)

    def training_noise(self) -> dict[str, Any]:
        """The noise setting of the training, resolved: ``{"train_noise": ...}``
        plus, with noise, the effective ``train_sigma`` and (``rcg``) ``rcg_tau``.
        Recorded in the checkpoint's metadata and named in its default path."""
        if self.train_noise == "none":
            return {"train_noise": "none"}
        out: dict[str, Any] = {"train_noise": self.train_noise, "train_sigma": float(
            self.sigma_d[0] if self.train_sigma is None else self.train_sigma)}
        if self.train_noise == "rcg":
            out["rcg_tau"] = float(DEFAULT_RCG_TAU if self.rcg_tau is None else self.rcg_tau)
        return out

    def noise_injection(self) -> perturbation.Perturbation | None:
        """The perturbation of noise-injection training
        (:func:`swimjax.training.noise_injection` of :meth:`training_noise` on
        the statistical model at the training sigma); None for plain training."""
        noise = self.training_noise()
        if noise["train_noise"] == "none":
            return None
        return training.noise_injection(
            noise["train_noise"], self.variation_config(noise["train_sigma"]),
            tau=noise.get("rcg_tau", DEFAULT_RCG_TAU))

    def mapping_config(self) -> mapping.MappingConfig:
        """Sign-bit mapping: K devices per weight, as in SWIM's error model, so
        the explicit loop's unverified weight error matches the statistical one."""
        return mapping.MappingConfig(weight_bits=self.weight_bits, device_bits=self.device_bits,
                                     sign="sign_bit")

    def variation_config(self, sigma_d: float | None = None) -> perturbation.VariationConfig:
        """SWIM's statistical model at ``sigma_d`` (default: the first swept one)."""
        return perturbation.VariationConfig(
            sigma_d=self.sigma_d[0] if sigma_d is None else sigma_d, sigma_wv=self.sigma_wv,
            weight_bits=self.weight_bits, device_bits=self.device_bits,
            nonuniform_factor=self.nonuniform_factor)

    def device_preset(self) -> devices.DevicePreset | None:
        """The preset of ``device`` (None without one)."""
        return None if self.device is None else devices.resolve_preset(self.device)

    def device_config(self, sigma_d: float | None = None) -> devices.DeviceConfig:
        """The device of the explicit loop: without ``device``, open-loop
        writes (and corrective pulses) with variation ``sigma_d`` (default: the
        first swept one), reads with ``sigma_read``, conductances not clipped,
        as in SWIM's Gaussian model. With ``device``, the preset's device
        (``sigma_d`` unused), its read noise replaced by ``sigma_read`` when
        that is > 0."""
        preset = self.device_preset()
        if preset is not None:
            if self.sigma_read > 0:
                return dataclasses.replace(preset.device, sigma_read=self.sigma_read)
            return preset.device
        s = self.sigma_d[0] if sigma_d is None else sigma_d
        return devices.DeviceConfig(sigma_program=s, sigma_pulse=s,
                                    sigma_read=self.sigma_read, clip=False, name="sweep")

    def write_verify_config(self, sigma_d: float | None = None) -> write_verify.WriteVerifyConfig:
        """The explicit loop at ``sigma_d`` (default: the first swept one):
        :func:`swimjax.write_verify.config_for_sigma` for ``sigma_wv`` on this
        device, with ``tolerance`` / ``max_pulses`` replaced where set."""
        if self.tolerance is not None and self.max_pulses is not None:
            return write_verify.WriteVerifyConfig(tolerance=self.tolerance,
                                                  max_pulses=self.max_pulses)
        if self.tolerance is not None:
            return write_verify.WriteVerifyConfig(tolerance=self.tolerance,
                                                  max_pulses=DEFAULT_MAX_PULSES)
        auto = write_verify.config_for_sigma(self.sigma_wv, self.device_config(sigma_d),
                                             max_failure=self.max_failure)
        if self.max_pulses is None:
            return auto
        return dataclasses.replace(auto, max_pulses=self.max_pulses)


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A trained model with its data, ready to be swept."""

    model: models.Model
    variables: Any
    data: data_lib.Dataset
    clean_test_accuracy: float
    checkpoint_path: str
    trained_now: bool

    @property
    def weights_sha256(self) -> str:
        """A digest of the variables (every leaf's path, dtype, shape and bytes)."""
        leaves = jax.tree_util.tree_leaves_with_path(self.variables)
        return _digest(np.frombuffer("".join(jax.tree_util.keystr(p) for p, _ in leaves)
                                     .encode(), np.uint8),
                       *[np.asarray(a) for _, a in leaves])


def default_checkpoint_path(config: SweepConfig, out_dir: str) -> str:
    """``<out_dir>/<model>_<dataset>[_n<n_train>][_e<epochs>][_<noise>]_seed<seed>.msgpack``;
    ``<noise>`` (:func:`noise_label`) names noise-injection training, so a
    noise-trained model never takes a plainly trained one's file."""
    parts = [config.model, config.dataset_label]
    if config.n_train is not None:
        parts.append(f"n{config.n_train}")
    if config.train_epochs is not None:
        parts.append(f"e{config.train_epochs}")
    if config.train_noise != "none":
        parts.append(noise_label(config.training_noise()))
    return os.path.join(out_dir, "_".join(parts) + f"_seed{config.seed}.msgpack")


def noise_label(noise: dict[str, Any]) -> str:
    """A file-name part for a :meth:`SweepConfig.training_noise` setting:
    ``""`` without noise, ``gaussian-s0.3``, ``rcg-s0.3-t1``."""
    if noise["train_noise"] == "none":
        return ""
    label = f"{noise['train_noise']}-s{noise['train_sigma']:g}"
    if "rcg_tau" in noise:
        label += f"-t{noise['rcg_tau']:g}"
    return label


def checkpoint_expect(config: SweepConfig) -> dict[str, Any]:
    """The metadata a checkpoint must record (where it records it) to serve
    ``config``: the model, the dataset and the training noise."""
    return dict(model=config.model, dataset=config.dataset_label, **config.training_noise())


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
        for field, want in checkpoint_expect(config).items():
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
                                      perturbation=config.noise_injection(),
                                      progress=config.progress)
        trained_now = True
    acc = float(training.evaluate_accuracy(model.apply_fn, variables, data.x_test, data.y_test))
    if trained_now and distributed.is_writer():
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        checkpoint.save(path, variables, dict(checkpoint_expect(config), seed=config.seed,
                                              test_accuracy=acc))
        logging.info("trained %s to %.2f%% test accuracy; wrote %s", config.model, 100 * acc, path)
    return Prepared(model, variables, data, acc, path, trained_now)


def score_batches(data: data_lib.Dataset, n_score: int | None, batch_size: int = 500
                  ) -> sensitivity.Batches:
    """The training examples used for scoring (the first ``n_score``, or all),
    as stacked weighted batches ``(x, y, w)`` of shapes ``(n_batches, B, ...)``,
    ``(n_batches, B)``, ``(n_batches, B)``; the last batch is padded with
    zero-weight examples, so every example counts once."""
    x, y = data.x_train, data.y_train
    n = len(x) if n_score is None else min(n_score, len(x))
    return sensitivity.make_batches(x[:n], y[:n], min(batch_size, n))


def _digest(*arrays: Any) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def identity(config: SweepConfig, prep: Prepared) -> dict[str, Any]:
    """Every setting a row's numbers depend on, as JSON-able values.

    The configuration's fields (but :data:`NON_IDENTITY_FIELDS`), with the
    checkpoint and data paths replaced by what they hold: the trained weights'
    sha256 (so a retrained or replaced model never reuses old rows) and the
    test data's sha256, plus the swimjax version. ``config_id`` (see
    :func:`config_id`) is its digest. Fields of :data:`ADDED_FIELDS` at their
    defaults are left out (rows written before they existed keep their
    ``config_id``); noise-injection training enters resolved
    (:meth:`SweepConfig.training_noise`: its sigma and tau as used).
    """
    fields = config_fields(config, prep, NON_IDENTITY_FIELDS)
    for name, default in ADDED_FIELDS.items():
        if fields.get(name) == default:
            del fields[name]
    if config.train_noise != "none":
        fields.update(config.training_noise())
    if config.device is not None:
        fields["device_preset"] = devices.preset_to_dict(config.device_preset())
    return json.loads(json.dumps(fields, sort_keys=True, default=str))


def config_fields(config: Any, prep: Prepared, non_identity: tuple[str, ...]) -> dict[str, Any]:
    """The identity of any experiment's frozen config (a dataclass with
    ``dataset_label``): its fields but ``non_identity``, ``checkpoint`` and
    ``data_dir``, the dataset's label, the weights' and test data's sha256 and
    the swimjax version, as JSON-able values."""
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
              if f.name not in tuple(non_identity) + ("checkpoint", "data_dir")}
    fields["dataset"] = config.dataset_label
    fields.update(weights_sha256=prep.weights_sha256,
                  test_data_sha256=_digest(prep.data.x_test, prep.data.y_test),
                  swimjax_version=swimjax_version)
    return json.loads(json.dumps(fields, sort_keys=True, default=str))


def config_id(ident: dict[str, Any]) -> str:
    """A short digest of :func:`identity` (16 hex digits)."""
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def _differences(row: dict[str, Any], ident: dict[str, Any]) -> list[str]:
    """The identity fields in which ``row`` differs from ``ident``."""
    return [f"{k}: {row.get(k)!r} -> {ident[k]!r}" for k in sorted(ident)
            if results.point_key({k: row.get(k)}, (k,)) != results.point_key(ident, (k,))]


def _score(method: str, key: jax.Array, apply_fn, params, batches) -> Any:
    """Scores of one method, with a key that depends on the method's name only.

    Curvature estimators return ``h_ii`` in weight units (``swim`` is asked for
    weight units: with per-layer sigmas ``s * c * sigma`` the ranking by
    ``h_ii * (sigma_u^2 - sigma_v^2)`` is then exactly SWIM's ranking of the
    max-normalized curvature).
    """
    key = jax.random.fold_in(key, zlib.crc32(method.encode()) % 2**31)
    kw = {"normalize": False} if method in WEIGHT_UNIT_METHODS else {}
    return sensitivity.score(method, key, apply_fn, params, batches, **kw)


def _select(method: str, scores: Any, budget: float, sigma_u: Any, sigma_v: Any, params: Any,
            selected: Any) -> Any:
    """The mask of one point. Curvature methods rank by the expected loss
    removed, ``h_ii * (sigma_u^2 - sigma_v^2)`` (``swim_uniform``: called with
    the uniform model's sigmas); the baselines (magnitude, random, gradient,
    saliency) rank by their own score."""
    if method in sensitivity.BASELINE_METHODS:
        sigma_u, sigma_v = 1.0, 0.0
    return selection.select(scores, budget, sigma_unverified=sigma_u, sigma_verified=sigma_v,
                            params=params, selected=selected)


def _title(config: SweepConfig, sigma_d: float) -> str:
    extra = ""
    if config.nonuniform_factor != 1.0:
        extra += f", non-uniform {nonuniform_label(config.nonuniform_factor)}"
    if config.device is not None:
        extra += f", device {config.device}"
    return (f"{config.model} / {config.dataset_label}: sigma_d={sigma_d:g}, "
            f"sigma_wv={config.sigma_wv}, N={config.weight_bits}, m={config.device_bits}, "
            f"{config.write_verify} write-verify{extra}, {config.mc_runs} MC runs")


def nwc_within(rows: list[dict[str, Any]], tolerance: float = 0.01
               ) -> dict[str, tuple[float, float]]:
    """Per method, the NWC needed to come within ``tolerance`` (a fraction: 0.01
    = 1 point) of full write-verify, with its standard error.

    The target is the mean accuracy of the budget-1 rows minus ``tolerance``;
    the NWC is the linear interpolation of the first crossing of the method's
    mean accuracy (as :func:`swimjax.report.nwc_to_reach`), and its standard
    error the delta method's through the target's and both bracketing points'
    ``acc_sem``, taken as independent (the points share their Monte-Carlo keys
    and are positively correlated, so this overstates the error). A method
    whose first point already reaches the target gets that point's NWC and
    error 0; one that never does gets ``(nan, nan)``.
    """
    full = [r for r in rows if r["budget"] == 1.0]
    if not full:
        return {}
    target = float(np.mean([r["acc_mean"] for r in full])) - tolerance
    se_t = float(np.mean([r["acc_sem"] for r in full]))
    out: dict[str, tuple[float, float]] = {}
    for method in sorted({r["method"] for r in rows}):
        pts = sorted((r for r in rows if r["method"] == method), key=lambda r: r["nwc"])
        out[method] = (float("nan"), float("nan"))
        for i, r in enumerate(pts):
            if r["acc_mean"] < target:
                continue
            if i == 0 or r["acc_mean"] == pts[i - 1]["acc_mean"]:
                out[method] = (float(r["nwc"]), 0.0)
                break
            p = pts[i - 1]
            x0, x1, y0, y1 = p["nwc"], r["nwc"], p["acc_mean"], r["acc_mean"]
            b = y1 - y0
            x = x0 + (target - y0) * (x1 - x0) / b
            var = ((x1 - x0) / b) ** 2 * (se_t ** 2 + ((y1 - target) / b * p["acc_sem"]) ** 2
                                          + ((target - y0) / b * r["acc_sem"]) ** 2)
            out[method] = (float(x), float(np.sqrt(var)))
            break
    return out


def nonuniform_markdown(rows: list[dict[str, Any]], config: SweepConfig,
                        tolerance: float = 0.01) -> str:
    """The U-SWIM comparison: NWC (with standard errors, :func:`nwc_within`)
    each method needs to come within ``tolerance`` of full write-verify, and
    how many times fewer weights the sigma-aware ``swim`` verifies than
    ``swim_uniform`` and each other method."""
    res = nwc_within(rows, tolerance)
    lines = [f"## Non-uniform variation {nonuniform_label(config.nonuniform_factor)} "
             f"(r = {config.nonuniform_factor:g}): NWC to come within {100 * tolerance:g} "
             f"point(s) of full write-verify", "",
             "`swim`: sigma-aware score h (sigma_u^2 - sigma_v^2) with the non-uniform "
             "per-weight sigmas (U-SWIM); `swim_uniform`: SWIM's score as if the variation "
             "were uniform. Standard errors by the delta method from the rows' sem.", "",
             "| method | NWC | se | verifies x more than swim (se) |", "|---|---|---|---|"]
    ref = res.get("swim", (float("nan"), float("nan")))
    for method, (x, se) in res.items():
        if method == "swim":
            rs = "1"
        elif np.isfinite(ref[0]) and ref[0] > 0 and np.isfinite(x):
            ratio = x / ref[0]
            rse = ratio * float(np.sqrt((se / x) ** 2 + (ref[1] / ref[0]) ** 2)) if x > 0 else 0.0
            rs = f"{ratio:.2f} ({rse:.2f})"
        else:
            rs = "-"
        xs = f"{x:.4f}" if np.isfinite(x) else "not reached"
        ses = f"{se:.4f}" if np.isfinite(se) else "-"
        lines.append(f"| {method} | {xs} | {ses} | {rs} |")
    return "\n".join(lines) + "\n"


def device_markdown(config: SweepConfig) -> str:
    """The device preset's values and its source, for ``summary.md``."""
    preset = config.device_preset()
    fields = devices.preset_to_dict(preset)
    lines = [f"## Device preset `{config.device}`", "", f"source: {preset.source or '-'}", "",
             "| parameter | value |", "|---|---|"]
    for part in ("device", "drift", "faults"):
        if fields[part] is None:
            lines.append(f"| {part} | none |")
            continue
        for k, val in fields[part].items():
            lines.append(f"| {part}.{k} | {val} |")
    used = config.device_config()
    if used != preset.device:
        lines += ["", f"read noise replaced by sigma_read = {used.sigma_read:g}"]
    return "\n".join(lines) + "\n"


def plot_path(out_dir: str, config: SweepConfig, sigma_d: float) -> str:
    """``accuracy_vs_nwc.png``, or ``accuracy_vs_nwc_sigma<s>.png`` when several
    sigmas are swept."""
    suffix = "" if len(config.sigma_d) == 1 else f"_sigma{sigma_d:g}"
    return os.path.join(out_dir, f"accuracy_vs_nwc{suffix}.png")


def run_sweep(config: SweepConfig, out_dir: str) -> list[dict[str, Any]]:
    """Runs (or resumes) the sweep; returns every row of this configuration.

    Rows already in ``<out_dir>/results.jsonl`` are reused only if their
    ``config_id`` (:func:`identity`) equals this run's; rows of another
    configuration stay in the file but never enter this summary (a warning
    names the settings that differ).
    """
    writer = distributed.is_writer()
    os.makedirs(out_dir, exist_ok=True)
    res = results.ResultsFile(os.path.join(out_dir, "results.jsonl"), KEY_FIELDS,
                              writable=writer)
    prep = prepare(config, out_dir)
    ident = identity(config, prep)
    cid = config_id(ident)
    base = dict(ident, config_id=cid)
    others = [r for r in res.rows if r.get("config_id") != cid]
    if others:
        diffs = sorted({d for r in others for d in _differences(r, ident)})
        logging.warning("%d rows of %s come from another configuration and are left out of "
                        "this run's summary (differing: %s)", len(others), res.path,
                        "; ".join(diffs[:8]) + (" ..." if len(diffs) > 8 else ""))
    points = [(s, m, b) for s in config.sigma_d for m in config.methods for b in config.budgets]
    # process 0's view of what is done decides for every process (one file)
    todo_mask = distributed.broadcast(
        [not res.has(dict(config_id=cid, sigma_d=p[0], method=p[1], budget=p[2]))
         for p in points])
    todo = [p for p, t in zip(points, todo_mask) if t]
    logging.info("%d of %d points to run", len(todo), len(points))
    if todo:
        _run_points(config, prep, res, base, todo)
    rows = [r for r in results.select_rows(res.rows, config_id=cid)
            if (r["sigma_d"], r["method"], r["budget"]) in
            {(results._canonical(s), m, results._canonical(b)) for s, m, b in points}]
    if writer:
        _write_reports(config, out_dir, rows)
    return rows


def _write_reports(config: SweepConfig, out_dir: str, rows: list[dict[str, Any]]) -> None:
    """The plot(s) and ``summary.md`` of this configuration's rows."""
    summaries = []
    for s in config.sigma_d:
        rs = results.select_rows(rows, sigma_d=s)
        report.plot_accuracy_vs_nwc(rs, plot_path(out_dir, config, s), title=_title(config, s))
        summaries.append(report.summary_markdown(rs, title=_title(config, s)))
        if config.nonuniform_factor != 1.0 or "swim_uniform" in config.methods:
            summaries.append(nonuniform_markdown(rs, config))
    if config.device is not None:
        summaries.append(device_markdown(config))
    with open(os.path.join(out_dir, "summary.md"), "w", encoding="utf-8") as f:
        f.write("\n\n".join(summaries))


@dataclasses.dataclass(frozen=True)
class _Point:
    """One (sigma, method, budget) point before its Monte-Carlo evaluation."""

    sigma_d: float
    method: str
    budget: float
    mask: Any
    fields: dict[str, Any]


def _perturbations(config: SweepConfig, selected: Any) -> dict[float, perturbation.Perturbation]:
    """The perturbation of each swept sigma: one statistical model for all
    (the sigmas are state), or one explicit programming model per sigma (the
    device's variation is part of the model)."""
    if config.write_verify == "statistical":
        pert = perturbation.statistical(config.variation_config(), selected)
        return {s: pert for s in config.sigma_d}
    return {s: programming.explicit(config.mapping_config(), config.device_config(s),
                                    config.write_verify_config(s), selected)
            for s in config.sigma_d}


def _run_points(config: SweepConfig, prep: Prepared, res: results.ResultsFile,
                base: dict[str, Any], todo: list[tuple[float, str, float]]) -> None:
    params = prep.variables
    apply_fn = prep.model.apply_fn
    selected = mapping.mapped_leaves(params)
    logging.info("mapped leaves:\n%s", mapping.describe_selection(params, selected))
    batches = score_batches(prep.data, config.n_score)
    x_test, y_test = jnp.asarray(prep.data.x_test), jnp.asarray(prep.data.y_test)
    n_mapped = _count_mapped(jax.tree.map(lambda p: np.ones(np.shape(p), bool), params),
                             selected)

    root = jax.random.key(config.seed)
    k_score, k_mc, k_prog = jax.random.split(jax.random.fold_in(root, 1), 3)
    # The quadratic model's predicted loss increase uses one curvature for all
    # methods (SWIM's Gauss-Newton diagonal), so rows are comparable.
    scores: dict[str, Any] = {"swim": _score("swim", k_score, apply_fn, params, batches)}
    points: list[_Point] = []
    for sigma in dict.fromkeys(s for s, _, _ in todo):
        t0 = time.perf_counter()
        vcfg = config.variation_config(sigma)
        sigma_u, sigma_v = perturbation.weight_sigmas(params, vcfg, selected)
        # swim_uniform: the same curvature ranked with the uniform model's sigmas
        uniform = perturbation.weight_sigmas(
            params, dataclasses.replace(vcfg, nonuniform_factor=1.0), selected)
        hw = (config.mapping_config(), config.device_config(sigma),
              config.write_verify_config(sigma))
        full = (programming.cycles_full_write_verify(k_prog, params, *hw, selected)
                if config.measure_cycles else None)
        for s, method, budget in todo:
            if s != sigma:
                continue
            score_name = SWEEP_METHODS.get(method, method)
            if score_name not in scores:
                scores[score_name] = _score(score_name, k_score, apply_fn, params, batches)
            su, sv = (sigma_u, sigma_v) if method not in SWEEP_METHODS else uniform
            mask = _select(method, scores[score_name], budget, su, sv, params, selected)
            n_verified = _count_mapped(mask, selected)
            fields = dict(n_verified=n_verified, n_mapped=n_mapped, nwc=n_verified / n_mapped,
                          speedup=n_mapped / n_verified if n_verified else None,
                          predicted_loss_increase=float(selection.predicted_loss_increase(
                              scores["swim"], mask, sigma_u, sigma_v)))
            if full is not None:
                prog = programming.program_params(k_prog, params, mask, *hw, selected)
                fields.update(_cycle_fields(prog, full), wv_tolerance=hw[2].tolerance,
                              wv_max_pulses=hw[2].max_pulses)
            fields["select_seconds"] = round(time.perf_counter() - t0, 3)
            t0 = time.perf_counter()
            points.append(_Point(sigma, method, budget, mask, fields))
    _evaluate_points(config, params, apply_fn, selected, x_test, y_test, k_mc, res, base, points)


def _count_mapped(mask: Any, selected: Any) -> int:
    """Set entries of ``mask`` on the mapped leaves."""
    return sum(int(np.sum(np.asarray(m))) for m, s in zip(jax.tree.leaves(mask),
                                                          jax.tree.leaves(selected)) if s)


def _cycle_fields(prog: programming.ProgrammingResult, full: programming.ProgrammingResult
                  ) -> dict[str, Any]:
    """Write cycles of one programming pass of the point's mask, against full
    write-verify, and how well the verified devices met their target."""
    total = prog.total_cycles
    return dict(total_cycles=total, full_wv_cycles=full.total_cycles,
                nwc_cycles=total / full.total_cycles,
                speedup_cycles=full.total_cycles / total if total else None,
                failed_devices=int(prog.n_failed_devices),
                verified_devices=int(prog.n_verified_devices),
                verified_residual_std=prog.residual_std,
                full_wv_failure_fraction=full.failure_fraction,
                full_wv_residual_std=full.residual_std)


def _evaluate_points(config: SweepConfig, params: Any, apply_fn: Callable, selected: Any,
                     x_test: jax.Array, y_test: jax.Array, k_mc: jax.Array,
                     res: results.ResultsFile, base: dict[str, Any],
                     points: list[_Point]) -> None:
    """Monte-Carlo of every point, one call per perturbation (all statistical
    points together), one state per distinct (sigma, mask): points with equal
    masks share it exactly, all use the same run keys (common random numbers).
    A row is written as soon as its state is finished."""
    perts = _perturbations(config, selected)
    groups: dict[int, list[float]] = {}
    for s in config.sigma_d:
        groups.setdefault(id(perts[s]), []).append(s)
    for sigmas in groups.values():
        pert = perts[sigmas[0]]
        states, users = [], []
        index: dict[tuple[float, str], int] = {}
        for p in points:
            if p.sigma_d not in sigmas:
                continue
            k = (p.sigma_d, mask_fingerprint(p.mask))
            if k not in index:
                index[k] = len(states)
                states.append(_state(config, pert, params, p.mask, p.sigma_d))
                users.append([])
            users[index[k]].append(p)
        if not states:
            continue
        t0 = time.perf_counter()
        for i, mc in montecarlo.iter_many(k_mc, apply_fn, params, pert, states, x_test, y_test,
                                          config.mc_runs, chunk_size=config.chunk_size,
                                          progress=config.progress):
            seconds = round((time.perf_counter() - t0) / len(users[i]), 3)
            for p in users[i]:
                thr = (config.threshold if config.threshold is not None
                       else max(0.0, float(mc.clean_accuracy) - 0.01))
                s = montecarlo.summarize(mc.accuracy, kpp=(config.kpp,), threshold=thr)
                row = dict(base, method=p.method, budget=p.budget, sigma_d=p.sigma_d,
                           **p.fields, acc_mean=s.mean, acc_std=s.std, acc_sem=s.sem,
                           acc_p1=s.p1, acc_p5=s.p5, acc_min=s.min, acc_max=s.max,
                           kpp=config.kpp, acc_kpp=s.kpp(config.kpp), threshold=thr,
                           p_below_threshold=s.p_below,
                           clean_acc=float(mc.clean_accuracy),
                           loss_mean=float(np.mean(mc.loss)), mc_seconds=seconds)
                res.append(row)
                logging.info("sigma %.3g %-10s budget %.3f  NWC %.4f (cycles %s)  acc %.2f%% "
                             "+- %.2f  p5 %.2f%%", p.sigma_d, p.method, p.budget, row["nwc"],
                             "-" if row.get("nwc_cycles") is None else
                             f"{row['nwc_cycles']:.4f}", 100 * s.mean, 100 * s.std, 100 * s.p5)
            t0 = time.perf_counter()


def _state(config: SweepConfig, pert: perturbation.Perturbation, params: Any, mask: Any,
           sigma_d: float) -> Any:
    if config.write_verify == "statistical":
        return pert.init(params, mask, sigma_d=sigma_d)
    return pert.init(params, mask)


def mask_fingerprint(mask: Any) -> str:
    """A digest of a mask's bits: points with equal masks (budget 0 and 1 of
    every method) share one Monte-Carlo evaluation, which is exact because all
    points use the same run keys."""
    h = hashlib.sha256()
    for m in jax.tree.leaves(mask):
        h.update(np.packbits(np.asarray(m, dtype=bool)).tobytes())
        h.update(str(np.shape(m)).encode())
    return h.hexdigest()

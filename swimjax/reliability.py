"""Reliability experiments of the nvCiM survey: accuracy against time after
programming (conductance drift) and against the fraction of stuck devices,
for no write-verify, SWIM's selective write-verify and full write-verify.

``run(config, out_dir)`` writes, in ``out_dir`` (as :mod:`swimjax.sweep` does
for SWIM): ``results.jsonl`` (one resumable row per point; a row's identity is
every number-changing setting, the device preset's values, the weights' and
test data's digests and the version), a PNG (``accuracy_vs_time.png`` or
``accuracy_vs_faults.png``) and ``summary.md`` (with the preset's values and
sources).

**Drift** (``mode="drift"``). Every Monte-Carlo run programs the mapped weights
onto the preset's devices (differential pairs by default): a verified device
lands at ``target + sigma_wv eps``, an unverified one is written open-loop
(``target + sigma_d eps``, or the preset's own programming model with
``sigma_d=None``), clipped to the range when the preset clips. The drift
exponent ``nu`` of every device is drawn then, from its programmed physical
conductance (:func:`swimjax.devices.sample_nu_physical`), and the array is
read ``t`` seconds after programming: ``G(t) = G_prog ((t + t0) / t0)^-nu``
on the physical conductance, ``g_min`` included
(:func:`swimjax.devices.drift_conductance`), plus PCM 1/f read noise for a PCM
drift model. Global drift compensation (as aihwkit's
``GlobalDriftCompensation``) multiplies a layer's outputs by ``alpha = sum
G_ref / sum G(t)`` from two calibration reads of the layer's whole array, one
right after programming and one at ``t``
(:func:`swimjax.devices.drift_compensation`); on a differential pair it undoes
any drift common to all devices exactly. The time and the compensation switch
are data (:class:`DriftState`), so every (write-verify scheme, time,
compensation) point is one state of one compiled program, and all of them use
the same run keys: run ``i`` is the same chip, programmed once, read at every
time.

**Stuck-at faults** (``mode="faults"``). Every run draws a fault map (a
fraction ``p`` of the devices stuck, half at ``g_min`` and half at ``g_max``,
nested across ``p``: the same uniforms at every rate) and programs the
devices through the explicit write-verify loop
(:func:`swimjax.write_verify.explicit`, tolerance and budget from
:func:`swimjax.write_verify.config_for_sigma`). A stuck device is pinned at
its stuck value after every write, so write-verify cannot repair it: it
passes only if its stuck value is within tolerance of its target, and
otherwise spends the whole pulse budget and is counted failed
(:func:`program_with_faults`). Rows report, from one programming pass per
point, the failed and stuck device counts and the measured write cycles.

Rows carry the Monte-Carlo summary including the tail metrics of
:func:`swimjax.montecarlo.summarize`: ``acc_p1``, ``acc_p5``, ``kpp`` /
``acc_kpp`` (the k-th percentile performance) and ``threshold`` /
``p_below_threshold`` (the fraction of runs below the threshold accuracy).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import zlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from swimjax import _random
from swimjax import _validation as v
from swimjax import (data as data_lib, devices, mapping, models, montecarlo, perturbation,
                     programming, report, results, selection, sensitivity, sweep,
                     write_verify)
from swimjax.perturbation import Perturbation

__all__ = [
    'DEFAULT_DEVICE', 'DEFAULT_DEVICE_BITS', 'DEFAULT_FAULT_RATES', 'DEFAULT_TIMES', 'DriftState',
    'FaultState', 'KEY_FIELDS', 'MODES', 'ReliabilityConfig', 'SCHEMES', 'drift_perturbation',
    'fault_perturbation', 'identity', 'program_with_faults', 'run', 'time_label'
]

MODES = ("drift", "faults")
#: Write-verify settings: nothing verified, SWIM's selection at ``swim_budget``,
#: every weight verified.
SCHEMES = ("none", "swim", "full")
#: Times after programming, seconds: 1 s, 1 min, 1 h, 1 day, 30 days, 365 days, 10 years.
DEFAULT_TIMES = (1.0, 60.0, 3600.0, 86400.0, 2592000.0, 31536000.0, 315360000.0)
#: Fractions of stuck devices (half at g_min, half at g_max).
DEFAULT_FAULT_RATES = (0.0, 0.001, 0.005, 0.01, 0.02, 0.05)
#: Default preset per mode.
DEFAULT_DEVICE = {"drift": "pcm", "faults": "rram"}
#: Default bits per device per mode (capped at ``weight_bits``).
DEFAULT_DEVICE_BITS = {"drift": 8, "faults": 2}
KEY_FIELDS = ("config_id", "mode", "scheme", "t_seconds", "compensated", "p_stuck")
#: Config fields that select points or change nothing in a row's numbers.
NON_IDENTITY_FIELDS = ("schemes", "times", "compensation", "fault_rates", "chunk_size",
                       "progress", "checkpoint", "data_dir", "device")

_TIME_NAMES = ((315360000.0, "10 years"), (31536000.0, "1 year"), (2592000.0, "1 month"),
               (86400.0, "1 day"), (3600.0, "1 h"), (60.0, "1 min"), (1.0, "1 s"))


def time_label(t: float) -> str:
    """``"1 day"`` for 86400 s, and so on; other times in seconds."""
    for sec, name in _TIME_NAMES:
        if t == sec:
            return name
    return f"{t:g} s"


@dataclasses.dataclass(frozen=True)
class ReliabilityConfig:
    """Configuration of a drift or stuck-at experiment (flags of ``experiments/drift.py``).

    Attributes:
      mode: ``"drift"`` or ``"faults"``.
      model, dataset, data_dir, checkpoint, n_train, n_test, n_score,
        train_epochs, seed, progress: as :class:`swimjax.sweep.SweepConfig`
        (the model is trained or loaded by :func:`swimjax.sweep.prepare`).
      device: a preset name (:func:`swimjax.devices.preset_names`) or a
        ``.json`` preset file; ``None``: :data:`DEFAULT_DEVICE` of the mode.
      schemes: write-verify settings among :data:`SCHEMES`.
      swim_budget: fraction of mapped weights SWIM verifies, in (0, 1).
      times: seconds after programming (drift), each >= 0.
      compensation: with and/or without global drift compensation (drift).
      fault_rates: fractions of stuck devices, each in [0, 1] (faults).
      sigma_d: open-loop programming std of an unverified device (full-scale
        units; SWIM's 0.1 by default); ``None`` uses the preset's own
        programming model (drift only: the fault loop needs a number).
      sigma_wv: residual std of a verified device (full-scale units).
      weight_bits, device_bits: ``N`` and ``m`` of the mapping; ``m = None``:
        :data:`DEFAULT_DEVICE_BITS` of the mode (drift: one analog device per
        weight and sign, as aihwkit maps PCM; faults: 2-bit devices).
      sign: ``"differential"`` (pairs: ``g_min`` cancels, compensation exact
        for a common drift) or ``"sign_bit"``.
      read_noise: PCM 1/f read noise at inference when the preset's drift model
        is ``"pcm"``.
      mc_runs: Monte-Carlo runs per point.
      kpp: ``k`` of the k-th percentile performance recorded in rows.
      threshold: accuracy below which a run counts in ``p_below_threshold``;
        ``None``: the clean accuracy minus 0.01.
      max_failure, sigma_read: the explicit loop (faults): largest failure
        rate when choosing its budget, read noise during verify.
      chunk_size: Monte-Carlo runs per call (does not change results).
    """

    mode: str = "drift"
    model: str = "lenet"
    dataset: str = data_lib.DEFAULT_DATASET
    data_dir: str | None = None
    checkpoint: str | None = None
    device: str | None = None
    schemes: tuple[str, ...] = SCHEMES
    swim_budget: float = 0.1
    times: tuple[float, ...] = DEFAULT_TIMES
    compensation: tuple[bool, ...] = (False, True)
    fault_rates: tuple[float, ...] = DEFAULT_FAULT_RATES
    sigma_d: float | None = 0.1
    sigma_wv: float = 0.03
    weight_bits: int = 8
    device_bits: int | None = None
    sign: str = "differential"
    read_noise: bool = True
    mc_runs: int = 100
    kpp: float = 1.0
    threshold: float | None = None
    max_failure: float = 1e-3
    sigma_read: float = 0.0
    seed: int = 0
    train_epochs: int | None = None
    n_train: int | None = None
    n_test: int | None = None
    n_score: int | None = None
    chunk_size: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        v.check_choice("mode", self.mode, MODES)
        v.check_choice("model", self.model, models.available_models())
        if not self.schemes:
            raise ValueError(f"schemes must name at least one of {list(SCHEMES)}")
        for s in self.schemes:
            v.check_choice("schemes", s, SCHEMES)
        object.__setattr__(self, "schemes", tuple(dict.fromkeys(self.schemes)))
        v.check_range("swim_budget", self.swim_budget, 0.0, 1.0, low_inclusive=False,
                      high_inclusive=False)
        if not self.times:
            raise ValueError("times must hold at least one time >= 0 (seconds)")
        object.__setattr__(self, "times", tuple(
            v.check_nonnegative("times", t) for t in dict.fromkeys(self.times)))
        if not self.compensation:
            raise ValueError("compensation must hold True and/or False")
        for c in self.compensation:
            if not isinstance(c, (bool, np.bool_)):
                raise ValueError(f"compensation must hold bools, got {c!r}")
        object.__setattr__(self, "compensation",
                           tuple(bool(c) for c in dict.fromkeys(self.compensation)))
        if not self.fault_rates:
            raise ValueError("fault_rates must hold at least one fraction in [0, 1]")
        object.__setattr__(self, "fault_rates", tuple(
            v.check_range("fault_rates", p, 0.0, 1.0) for p in dict.fromkeys(self.fault_rates)))
        if self.sigma_d is not None:
            v.check_nonnegative("sigma_d", self.sigma_d)
        elif self.mode == "faults":
            raise ValueError("sigma_d must be a number in faults mode (the open-loop and "
                             "pulse variation the explicit write-verify loop works against), "
                             "got None")
        v.check_positive("sigma_wv", self.sigma_wv)
        if self.mode == "faults" and not self.sigma_wv < self.sigma_d:
            raise ValueError(f"sigma_wv must be < sigma_d ({self.sigma_d}) in faults mode, "
                             f"got {self.sigma_wv}")
        v.check_int("weight_bits", self.weight_bits, 1, mapping.MAX_WEIGHT_BITS)
        if self.device_bits is None:
            object.__setattr__(self, "device_bits", min(
                DEFAULT_DEVICE_BITS[self.mode], self.weight_bits, mapping.MAX_DEVICE_BITS))
        v.check_int("device_bits", self.device_bits, 1,
                    min(self.weight_bits, mapping.MAX_DEVICE_BITS))
        v.check_choice("sign", self.sign, ("differential", "sign_bit"))
        if not isinstance(self.read_noise, (bool, np.bool_)):
            raise ValueError(f"read_noise must be a bool, got {self.read_noise!r}")
        v.check_int("mc_runs", self.mc_runs, 1, None)
        v.check_range("kpp", self.kpp, 0.0, 100.0)
        if self.threshold is not None:
            v.check_range("threshold", self.threshold, 0.0, 1.0)
        v.check_range("max_failure", self.max_failure, 0.0, 1.0, low_inclusive=False,
                      high_inclusive=False)
        v.check_nonnegative("sigma_read", self.sigma_read)
        v.check_int("seed", self.seed, 0, None)
        for name in ("train_epochs", "n_train", "n_test", "n_score", "chunk_size"):
            if getattr(self, name) is not None:
                v.check_int(name, getattr(self, name), 1, None)
        # The preset file is read and validated once, here: a run uses the values
        # it had when the config was made, whatever happens to the file later.
        p = devices.resolve_preset(self.device_name)
        object.__setattr__(self, "_preset", p)
        if self.mode == "drift" and p.drift is None:
            raise ValueError(f"device {self.device_name!r} has no drift model: drift needs a "
                             f"preset with one (e.g. 'pcm') or a preset file with a 'drift' "
                             f"object")

    @property
    def device_name(self) -> str:
        """The preset name or file this run uses."""
        return self.device if self.device is not None else DEFAULT_DEVICE[self.mode]

    def preset(self) -> devices.DevicePreset:
        """The device preset (built-in, or as read from its file when the
        config was made)."""
        return self._preset

    @property
    def dataset_label(self) -> str:
        """The dataset's name for files and rows (:func:`swimjax.data.dataset_label`)."""
        return data_lib.dataset_label(self.dataset)

    def sweep_config(self) -> sweep.SweepConfig:
        """The floating-point model's settings, for :func:`swimjax.sweep.prepare`
        (the checkpoint is shared with a SWIM sweep of the same model and data)."""
        return sweep.SweepConfig(model=self.model, dataset=self.dataset, data_dir=self.data_dir,
                                 checkpoint=self.checkpoint, seed=self.seed,
                                 train_epochs=self.train_epochs, n_train=self.n_train,
                                 n_test=self.n_test, n_score=self.n_score,
                                 measure_cycles=False, progress=self.progress)

    def mapping_config(self) -> mapping.MappingConfig:
        return mapping.MappingConfig(weight_bits=self.weight_bits, device_bits=self.device_bits,
                                     sign=self.sign)

    def loop_device(self) -> devices.DeviceConfig:
        """The device of the explicit loop (faults): open-loop and pulse
        variation ``sigma_d``, verify reads with ``sigma_read``, the preset's
        range and clipping."""
        d = self.preset().device
        return devices.DeviceConfig(sigma_program=self.sigma_d, sigma_pulse=self.sigma_d,
                                    sigma_read=self.sigma_read, clip=d.clip,
                                    g_min_us=d.g_min_us, g_max_us=d.g_max_us, name=d.name)

    def write_verify_config(self) -> write_verify.WriteVerifyConfig:
        """The loop that leaves verified devices with ``sigma_wv`` (chosen on
        the unclipped device, where the closed form is exact)."""
        dev = dataclasses.replace(self.loop_device(), clip=False)
        return write_verify.config_for_sigma(self.sigma_wv, dev, max_failure=self.max_failure)

    def ranking_sigma(self) -> float:
        """The unverified device sigma SWIM's ranking assumes: ``sigma_d``, or
        the preset's RMS programming std over the levels."""
        if self.sigma_d is not None:
            return float(self.sigma_d)
        x = jnp.linspace(0.0, 1.0, 2 ** self.device_bits)
        return float(jnp.sqrt(jnp.mean(devices.program_std(x, self.preset().device) ** 2)))


# ----------------------------------------------------------------------------
# Drift as a perturbation
# ----------------------------------------------------------------------------

class DriftState(NamedTuple):
    """The data of :func:`drift_perturbation`.

    Attributes:
      mask: write-verify mask (pytree like ``params``, bool per weight).
      t_after: float32 scalar, seconds after programming.
      compensate: float32 scalar, 1.0 = global drift compensation, 0.0 = none.
    """

    mask: Any
    t_after: jax.Array
    compensate: jax.Array


def _leaves(params: Any, selected: Any | None) -> tuple[bool, ...]:
    if selected is None:
        selected = mapping.mapped_leaves(params)
    return tuple(bool(s) for s in jax.tree_util.tree_leaves(selected))


def _program_devices(key: jax.Array, target: jax.Array, verified: jax.Array,
                     device: devices.DeviceConfig, sigma_d: float | None,
                     sigma_wv: float) -> jax.Array:
    """Statistical write-verify on the preset's device (normalized, clipped
    when the device clips): one normal per device, scaled by ``sigma_wv``
    where verified and by the open-loop std elsewhere."""
    if sigma_d is None:
        sd_open = devices.program_std(target, device)
    else:
        sd_open = jnp.full_like(target, sigma_d)
    sd = jnp.where(verified, jnp.asarray(sigma_wv, target.dtype), sd_open)
    g = target + sd * _random.normal(key, target.shape, target.dtype)
    return jnp.clip(g, 0.0, 1.0) if device.clip else g


def _pcm_read(key: jax.Array, g_t: jax.Array, g_prog: jax.Array, t_after: jax.Array,
              device: devices.DeviceConfig) -> jax.Array:
    """A read with PCM 1/f noise accumulated over ``t_after``, on the
    physical conductance (``x = G / g_max``), back in normalized units."""
    gm = device.g_max_us
    x_t = devices.to_physical(g_t, device) / gm
    x_p = devices.to_physical(g_prog, device) / gm
    sd = devices.pcm_read_noise_std(x_t, t_after, g_prog=x_p)
    x_read = x_t + sd * _random.normal(key, x_t.shape, x_t.dtype)
    return devices.to_normalized(x_read * gm, device).astype(g_t.dtype)


def drift_perturbation(mapping_cfg: mapping.MappingConfig, preset: devices.DevicePreset, *,
                       sigma_d: float | None, sigma_wv: float, read_noise: bool = True,
                       selected: Any | None = None) -> Perturbation:
    """Programming, drift to time ``t`` and an optional global drift
    compensation as a :class:`~swimjax.perturbation.Perturbation` (see the
    module docstring for the model).

    ``init(params, mask=None, *, t_after=0.0, compensate=False) ->``
    :class:`DriftState`; ``apply(key, params, state) -> params``. Mapped leaf
    ``i`` (flattening order) draws from ``fold_in(key, i)``: programming,
    ``nu`` and the inference read each from their own split, so a run's chip
    is the same at every time and compensation setting. The compensation's
    calibration reads are the expected reads (their read noise averages out
    of a layer's sum).
    """
    if not isinstance(preset, devices.DevicePreset) or preset.drift is None:
        raise ValueError("preset must be a DevicePreset with a drift model")
    if sigma_d is not None:
        v.check_nonnegative("sigma_d", sigma_d)
    v.check_nonnegative("sigma_wv", sigma_wv)
    device, drift_cfg = preset.device, preset.drift
    noisy = bool(read_noise) and drift_cfg.model == "pcm"

    def init(params: Any, mask: Any | None = None, *, t_after: float = 0.0,
             compensate: bool = False) -> DriftState:
        if mask is None:
            mask = jax.tree.map(lambda w: np.zeros(np.shape(w), bool), params)
        programming._check_inputs(params, mask, selected)
        v.check_nonnegative("t_after", t_after)
        return DriftState(jax.tree.map(lambda m: jnp.asarray(m, bool), mask),
                          jnp.float32(t_after), jnp.float32(1.0 if compensate else 0.0))

    def apply(key: jax.Array, params: Any, state: DriftState) -> Any:
        sel = _leaves(params, selected)
        treedef = jax.tree_util.tree_structure(params)
        leaves = treedef.flatten_up_to(params)
        masks = treedef.flatten_up_to(state.mask)
        out = list(leaves)
        for i, (w, s) in enumerate(zip(leaves, sel)):
            if not s:
                continue
            k_prog, k_nu, k_read = jax.random.split(jax.random.fold_in(key, i), 3)
            mt = mapping.to_conductances(w, mapping_cfg)
            target = mt.g.astype(jnp.result_type(mt.g, jnp.float32))
            verified = jnp.broadcast_to(masks[i], target.shape)
            g_prog = _program_devices(k_prog, target, verified, device, sigma_d, sigma_wv)
            nu = devices.sample_nu_physical(k_nu, g_prog, drift_cfg, device)
            g_t = devices.drift_conductance(g_prog, nu, state.t_after, drift_cfg, device)
            g_read = _pcm_read(k_read, g_t, g_prog, state.t_after, device) if noisy else g_t
            # Calibration reads of the whole layer: right after programming and at t.
            # Their zero-mean read noise averages out of a layer's sum (relative std
            # ~ Q_s / sqrt(devices)), so the expected reads are used.
            alpha = devices.drift_compensation(g_prog, g_t, device)
            w_t = mapping.from_conductances(mt._replace(g=g_read.astype(mt.g.dtype)),
                                            mapping_cfg)
            factor = jnp.where(state.compensate > 0, alpha, 1.0).astype(w_t.dtype)
            out[i] = (w_t * factor).astype(jnp.result_type(w))
        return treedef.unflatten(out)

    return Perturbation(init, apply)


# ----------------------------------------------------------------------------
# Stuck-at faults under explicit write-verify
# ----------------------------------------------------------------------------

class FaultState(NamedTuple):
    """The data of :func:`fault_perturbation`: the write-verify mask and the
    fraction ``p_stuck`` of stuck devices (float32 scalar; half at ``g_min``,
    half at ``g_max``)."""

    mask: Any
    p_stuck: jax.Array


class FaultProgramming(NamedTuple):
    """:class:`swimjax.programming.ProgrammingResult` plus the number of stuck devices."""

    result: programming.ProgrammingResult
    n_stuck_devices: jax.Array


def program_with_faults(key: jax.Array, params: Any, mask: Any, p_stuck: float,
                        mapping_cfg: mapping.MappingConfig, device: devices.DeviceConfig,
                        wv_config: write_verify.WriteVerifyConfig,
                        selected: Any | None = None) -> FaultProgramming:
    """:func:`swimjax.programming.program_params` on an array with a fraction
    ``p_stuck`` of stuck devices (half at ``g_min``, half at ``g_max``, drawn
    from ``split(key)[1]``; the loop uses ``split(key)[0]``), stuck devices
    pinned through the loop (:func:`swimjax.write_verify.pin_stuck`): a stuck device is never
    repaired and, unless its stuck value is within tolerance of its target,
    spends the pulse budget and is counted in ``n_failed_devices``."""
    res = programming.program_params(key, params, mask, mapping_cfg, device, wv_config,
                                     selected, p_stuck=p_stuck)
    return FaultProgramming(res, res.n_stuck_devices)


def fault_perturbation(mapping_cfg: mapping.MappingConfig, device: devices.DeviceConfig,
                       wv_config: write_verify.WriteVerifyConfig, selected: Any | None = None
                       ) -> Perturbation:
    """:func:`program_with_faults` as a Perturbation: ``init(params, mask=None,
    *, p_stuck=0.0) ->`` :class:`FaultState`, ``apply(key, params, state) ->
    params``; the mask and the fault rate are data (one program for all)."""

    def init(params: Any, mask: Any | None = None, *, p_stuck: float = 0.0) -> FaultState:
        if mask is None:
            mask = jax.tree.map(lambda w: np.zeros(np.shape(w), bool), params)
        programming._check_inputs(params, mask, selected)
        v.check_range("p_stuck", p_stuck, 0.0, 1.0)
        return FaultState(jax.tree.map(lambda m: jnp.asarray(m, bool), mask),
                          jnp.float32(p_stuck))

    def apply(key: jax.Array, params: Any, state: FaultState) -> Any:
        return programming.program_params(key, params, state.mask, mapping_cfg, device,
                                          wv_config, selected, p_stuck=state.p_stuck).params

    return Perturbation(init, apply)


# ----------------------------------------------------------------------------
# Orchestration
# ----------------------------------------------------------------------------

def identity(config: ReliabilityConfig, prep: sweep.Prepared) -> dict[str, Any]:
    """Every setting a row's numbers depend on (JSON-able):
    :func:`swimjax.sweep.config_fields` (the config's fields but
    :data:`NON_IDENTITY_FIELDS`, the weights' and test data's digests, the
    version), the preset's every value (so an edited preset file never reuses
    old rows) and the write-verify loop."""
    fields = sweep.config_fields(config, prep, NON_IDENTITY_FIELDS)
    fields["preset"] = devices.preset_to_dict(config.preset())
    if config.mode == "faults":
        wv = config.write_verify_config()
        fields.update(wv_tolerance=wv.tolerance, wv_max_pulses=wv.max_pulses)
    return json.loads(json.dumps(fields, sort_keys=True, default=str))


def _points(config: ReliabilityConfig) -> list[dict[str, Any]]:
    if config.mode == "drift":
        return [dict(scheme=s, t_seconds=t, compensated=c, p_stuck=None)
                for s in config.schemes for c in config.compensation for t in config.times]
    return [dict(scheme=s, t_seconds=None, compensated=None, p_stuck=p)
            for s in config.schemes for p in config.fault_rates]


def _masks(config: ReliabilityConfig, prep: sweep.Prepared, selected: Any, key: jax.Array
           ) -> dict[str, Any]:
    params = prep.variables
    masks = {}
    for s in config.schemes:
        if s == "none":
            masks[s] = jax.tree.map(lambda w: np.zeros(np.shape(w), bool), params)
        elif s == "full":
            masks[s] = jax.tree.map(lambda w: np.ones(np.shape(w), bool), params)
        else:
            batches = sweep.score_batches(prep.data, config.n_score)
            k = jax.random.fold_in(key, zlib.crc32(b"swim") % 2**31)
            scores = sensitivity.score("swim", k, prep.model.apply_fn, params, batches,
                                       normalize=False)
            vcfg = perturbation.VariationConfig(
                sigma_d=config.ranking_sigma(), sigma_wv=config.sigma_wv,
                weight_bits=config.weight_bits, device_bits=config.device_bits)
            su, sv = perturbation.weight_sigmas(params, vcfg, selected)
            masks[s] = jax.tree.map(np.asarray, selection.select(
                scores, config.swim_budget, sigma_unverified=su, sigma_verified=sv,
                params=params, selected=selected))
    return masks


def _count(mask: Any, selected: Any) -> int:
    return sum(int(np.sum(np.asarray(m))) for m, s in zip(jax.tree.leaves(mask),
                                                          jax.tree.leaves(selected)) if s)


def run(config: ReliabilityConfig, out_dir: str) -> list[dict[str, Any]]:
    """Runs (or resumes) the experiment; returns every row of this configuration
    (rows of another configuration in the file are left out, with a warning)."""
    os.makedirs(out_dir, exist_ok=True)
    res = results.ResultsFile(os.path.join(out_dir, "results.jsonl"), KEY_FIELDS)
    prep = sweep.prepare(config.sweep_config(), out_dir)
    ident = identity(config, prep)
    cid = sweep.config_id(ident)
    others = [r for r in res.rows if r.get("config_id") != cid]
    if others:
        diffs = sorted({k for r in others for k in ident
                        if results.point_key({k: r.get(k)}, (k,))
                        != results.point_key(ident, (k,))})
        logging.warning("%d rows of %s come from another configuration and are left out "
                        "(differing: %s)", len(others), res.path, ", ".join(diffs[:8]))
    points = _points(config)
    todo = [p for p in points if not res.has(dict(p, config_id=cid, mode=config.mode))]
    logging.info("%d of %d points to run", len(todo), len(points))
    if todo:
        _run_points(config, prep, res, dict(ident, config_id=cid), todo)
    want = {results.point_key(dict(p, config_id=cid, mode=config.mode), KEY_FIELDS)
            for p in points}
    rows = [r for r in res.rows if results.point_key(r, KEY_FIELDS) in want]
    title = _title(config, prep)
    preset_md = devices.describe_preset(config.preset())
    if config.mode == "drift":
        report.plot_accuracy_vs_time(rows, os.path.join(out_dir, "accuracy_vs_time.png"),
                                     title=title)
        text = report.drift_summary_markdown(rows, title=title, preset_markdown=preset_md)
    else:
        report.plot_accuracy_vs_faults(rows, os.path.join(out_dir, "accuracy_vs_faults.png"),
                                       title=title)
        text = report.faults_summary_markdown(rows, title=title, preset_markdown=preset_md)
    tmp = os.path.join(out_dir, "summary.md.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, os.path.join(out_dir, "summary.md"))
    return rows


def _title(config: ReliabilityConfig, prep: sweep.Prepared) -> str:
    sd = "preset" if config.sigma_d is None else f"{config.sigma_d:g}"
    return (f"{config.model} / {config.dataset_label} on {config.preset().device.name}: "
            f"{config.mode}, sigma_d={sd}, sigma_wv={config.sigma_wv:g}, "
            f"N={config.weight_bits}, m={config.device_bits}, {config.sign}, "
            f"SWIM {100 * config.swim_budget:g} %, {config.mc_runs} MC runs")


def _run_points(config: ReliabilityConfig, prep: sweep.Prepared, res: results.ResultsFile,
                base: dict[str, Any], todo: list[dict[str, Any]]) -> None:
    params, apply_fn = prep.variables, prep.model.apply_fn
    selected = mapping.mapped_leaves(params)
    x_test, y_test = jnp.asarray(prep.data.x_test), jnp.asarray(prep.data.y_test)
    root = jax.random.key(config.seed)
    k_score, k_mc, k_prog = jax.random.split(jax.random.fold_in(root, 2), 3)
    t0 = time.perf_counter()
    masks = _masks(config, prep, selected, k_score)
    n_mapped = _count(jax.tree.map(lambda w: np.ones(np.shape(w), bool), params), selected)
    verified = {s: _count(m, selected) for s, m in masks.items()}
    logging.info("masks in %.1f s", time.perf_counter() - t0)
    extra: dict[int, dict[str, Any]] = {}
    if config.mode == "drift":
        pert = drift_perturbation(config.mapping_config(), config.preset(),
                                  sigma_d=config.sigma_d, sigma_wv=config.sigma_wv,
                                  read_noise=config.read_noise, selected=selected)
        states = [pert.init(params, masks[p["scheme"]], t_after=p["t_seconds"],
                            compensate=p["compensated"]) for p in todo]
    else:
        dev, wv = config.loop_device(), config.write_verify_config()
        pert = fault_perturbation(config.mapping_config(), dev, wv, selected)
        states = [pert.init(params, masks[p["scheme"]], p_stuck=p["p_stuck"]) for p in todo]
        full = program_with_faults(k_prog, params, masks.get("full", jax.tree.map(
            lambda w: np.ones(np.shape(w), bool), params)), 0.0, config.mapping_config(), dev,
            wv, selected)
        full_cycles = full.result.total_cycles
        for i, p in enumerate(todo):
            prog = program_with_faults(k_prog, params, masks[p["scheme"]], p["p_stuck"],
                                       config.mapping_config(), dev, wv, selected)
            r = prog.result
            extra[i] = dict(total_cycles=r.total_cycles, full_wv_cycles=full_cycles,
                            nwc_cycles=r.total_cycles / full_cycles,
                            failed_devices=int(r.n_failed_devices),
                            verified_devices=int(r.n_verified_devices),
                            stuck_devices=int(prog.n_stuck_devices),
                            n_devices=int(mapping.n_devices(params, config.mapping_config(),
                                                            selected)),
                            failed_weights=r.n_failed,
                            verified_residual_std=r.residual_std,
                            wv_tolerance=wv.tolerance, wv_max_pulses=wv.max_pulses)
    t0 = time.perf_counter()
    for i, mc in montecarlo.iter_many(k_mc, apply_fn, params, pert, states, x_test, y_test,
                                      config.mc_runs, chunk_size=config.chunk_size,
                                      progress=config.progress):
        p = todo[i]
        clean = float(mc.clean_accuracy)
        thr = config.threshold if config.threshold is not None else max(clean - 0.01, 0.0)
        s = montecarlo.summarize(mc.accuracy, kpp=(config.kpp,), threshold=thr)
        budget = {"none": 0.0, "full": 1.0}.get(p["scheme"], config.swim_budget)
        row = dict(base, mode=config.mode, **p, budget=budget,
                   n_verified=verified[p["scheme"]], n_mapped=n_mapped,
                   nwc=verified[p["scheme"]] / n_mapped,
                   t_label=None if p["t_seconds"] is None else time_label(p["t_seconds"]),
                   **extra.get(i, {}),
                   acc_mean=s.mean, acc_std=s.std, acc_sem=s.sem, acc_p1=s.p1, acc_p5=s.p5,
                   acc_min=s.min, acc_max=s.max, acc_kpp=s.kpp(config.kpp),
                   threshold=s.threshold, p_below_threshold=s.p_below,
                   clean_acc=clean, loss_mean=float(np.mean(mc.loss)),
                   mc_seconds=round(time.perf_counter() - t0, 3))
        res.append(row)
        what = (f"t={time_label(p['t_seconds'])} comp={p['compensated']}"
                if config.mode == "drift" else f"p_stuck={p['p_stuck']:g}")
        logging.info("%-4s %s  acc %.2f%% +- %.2f  p1 %.2f%%", p["scheme"], what,
                     100 * s.mean, 100 * s.std, 100 * s.p1)
        t0 = time.perf_counter()

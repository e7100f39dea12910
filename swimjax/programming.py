"""The hardware programming pipeline on a parameter pytree.

``params --map--> target conductances --write-verify--> programmed
conductances --unmap--> the weights the hardware computes with``.

* The mapped leaves (:func:`swimjax.mapping.mapped_leaves`, by default every
  kernel of rank >= 2) are quantized and bit-sliced onto devices with
  :func:`swimjax.mapping.to_conductances`: ``(2, K, *w.shape)`` devices per
  leaf (differential pair) or ``(K, *w.shape)`` (sign bit). Every device is
  programmed, including the idle device of a differential pair and slices at
  level 0 (their target is ``g_min``; a real array writes them too).
* The weight-level write-verify mask (a pytree of bool arrays shaped like
  ``params``) is broadcast to all devices of each weight: a verified weight
  has all its devices verified.
* :func:`program_params` runs the explicit loop of
  :func:`swimjax.write_verify.explicit` over **all devices of all mapped leaves
  in a single loop** (the leaves' device arrays are concatenated), so the loop
  runs once, as long as its slowest device, rather than once per leaf.
  :func:`program_params_statistical` applies SWIM's statistical model
  (:func:`swimjax.write_verify.statistical`) per device instead.
* The programmed conductances are read out linearly with
  :func:`swimjax.mapping.from_conductances` (no read noise: add it with
  :func:`swimjax.devices.read` if an evaluation wants it).

* :class:`ProgrammingResult` also carries what a sweep row needs about the
  verified devices: how many there are, how many failed, and their residual
  std in full-scale units (``.residual_std``, to compare with SWIM's
  ``sigma_wv``; :func:`swimjax.write_verify.config_for_sigma` picks a loop that
  reaches it).
* :func:`open_loop_weight_error` gives the exact bias and std of the weight
  error of unverified programming for any mapping and device: zero mean and
  SWIM's ``c(N, m) sigma`` under the defaults (sign bit, unclipped), a bias
  towards zero with a clipping device (the physical presets).

Unmapped leaves (biases, normalization parameters) are digital: returned
exactly, with 0 write cycles. Entries of the mask on them are ignored.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from swimjax import _validation as v
from swimjax import devices
from swimjax import mapping
from swimjax import write_verify as wv
from swimjax.perturbation import Perturbation

__all__ = [
    'ExplicitState', 'ProgrammingResult', 'WeightError', 'cycles_full_write_verify',
    'explicit', 'open_loop_weight_error', 'open_loop_weight_error_moments', 'program_params',
    'program_params_statistical'
]


class ProgrammingResult(NamedTuple):
    """Programmed parameters, their cost, and the residual error of verified devices.

    Attributes:
      params: the weights the hardware computes with (structure, shapes and
        dtypes of the input ``params``); unmapped leaves unchanged.
      cycles: pytree like ``params``, int32 per weight: write cycles summed over
        the weight's devices (0 for digital leaves).
      failed: pytree like ``params``, bool per weight: any of its devices
        failed to converge within the pulse budget (False for digital leaves).
      n_verified_devices: int32 scalar: devices that went through write-verify.
      n_failed_devices: int32 scalar: verified devices that spent the pulse
        budget outside tolerance.
      residual_sq_sum: float32 scalar: ``sum (g - target)^2`` over verified
        devices (normalized full-scale units squared), failed ones included.
      n_stuck_devices: int32 scalar: devices stuck at g_min or g_max (0
        unless :func:`program_params` was given ``p_stuck``).

    The scalars are arrays (so the result stays a pytree under ``jit``
    and ``vmap``); the properties turn them into Python numbers (eager only).
    """

    params: Any
    cycles: Any
    failed: Any
    n_verified_devices: jax.Array
    n_failed_devices: jax.Array
    residual_sq_sum: jax.Array
    n_stuck_devices: Any = 0

    @property
    def total_cycles(self) -> int:
        """Total write cycles over every device (a Python int; eager only)."""
        return int(sum(int(np.sum(np.asarray(c, np.int64)))
                       for c in jax.tree_util.tree_leaves(self.cycles)))

    @property
    def n_failed(self) -> int:
        """Number of weights with a failed device (a Python int; eager only)."""
        return int(sum(int(np.count_nonzero(np.asarray(f)))
                       for f in jax.tree_util.tree_leaves(self.failed)))

    @property
    def failure_fraction(self) -> float:
        """``n_failed_devices / n_verified_devices`` (0.0 when nothing is
        verified; eager only)."""
        n = int(self.n_verified_devices)
        return int(self.n_failed_devices) / n if n else 0.0

    @property
    def residual_std(self) -> float:
        """Root mean square of ``g - target`` over verified devices, failed ones
        included, in full-scale units: the std of the zero-mean residual, to
        compare with SWIM's ``sigma_wv`` (NaN when nothing is verified; eager
        only)."""
        n = int(self.n_verified_devices)
        return math.sqrt(float(self.residual_sq_sum) / n) if n else math.nan


class WeightError(NamedTuple):
    """Moments of ``r = sign(W) dW / s``, the weight error in units of the
    scale ``s``, signed so that ``r < 0`` points towards zero (``sign(W) =
    +1`` for ``W >= 0``, the mapping's sign bit).

    Attributes:
      bias: mean of ``r`` (0 for SWIM's Gaussian model; negative when
        clipping pulls weights towards zero).
      std: std of ``r``.
    """

    bias: float
    std: float


def _device_axes(cfg: mapping.MappingConfig) -> tuple[int, ...]:
    """Leading axes of a mapped tensor's ``g`` that index a weight's devices."""
    return (0, 1) if cfg.sign == "differential" else (0,)


def _check_inputs(params: Any, mask: Any, selected: Any | None) -> tuple[bool, ...]:
    """Validates (outside jit) and returns the selection as a static tuple."""
    v.check_finite_tree("params", params)
    v.check_same_structure("mask", mask, params)
    for path, m in jax.tree_util.tree_leaves_with_path(mask):
        dtype = m.dtype if hasattr(m, "dtype") else np.asarray(m).dtype
        if dtype != np.bool_:
            raise ValueError(
                f"mask{jax.tree_util.keystr(path)} must be a bool array, got dtype {dtype}")
    if selected is None:
        selected = mapping.mapped_leaves(params)
    v.check_same_structure("selected", selected, params, check_shapes=False)
    leaves = jax.tree_util.tree_leaves(selected)
    for path, s in jax.tree_util.tree_leaves_with_path(selected):
        if not isinstance(s, (bool, np.bool_)):
            raise ValueError(
                f"selected{jax.tree_util.keystr(path)} must be a Python bool, got {s!r}")
    for (path, w), s in zip(jax.tree_util.tree_leaves_with_path(params), leaves):
        if s and not jnp.issubdtype(jnp.result_type(w), jnp.floating):
            raise ValueError(f"params{jax.tree_util.keystr(path)} is selected for mapping "
                             f"but is not floating point (dtype {jnp.result_type(w)})")
    return tuple(bool(s) for s in leaves)


def _per_weight(x: jax.Array, cfg: mapping.MappingConfig, reduce: Any) -> jax.Array:
    return reduce(x, axis=_device_axes(cfg))


@functools.partial(jax.jit, static_argnames=("selected", "mapping_cfg", "device", "wv_config",
                                             "faults"))
def _program_impl(key, params, mask, p_stuck, *, selected, mapping_cfg, device, wv_config,
                  faults):
    treedef = jax.tree_util.tree_structure(params)
    leaves = treedef.flatten_up_to(params)
    masks = treedef.flatten_up_to(mask)
    mapped = {i: mapping.to_conductances(w, mapping_cfg)
              for i, (w, s) in enumerate(zip(leaves, selected)) if s}
    out_params, out_cycles, out_failed = list(leaves), [], []
    stats = (jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32))
    n_stuck = jnp.zeros((), jnp.int32)
    if mapped:
        idx = sorted(mapped)
        gs = [mapped[i].g for i in idx]
        dtype = jnp.result_type(*gs)
        target = jnp.concatenate([g.astype(dtype).ravel() for g in gs])
        vmask = jnp.concatenate(
            [jnp.broadcast_to(masks[i], mapped[i].g.shape).ravel() for i in idx])
        if faults:  # stuck devices drawn from split(key)[1], the loop on split(key)[0]
            k_prog, k_stuck = jax.random.split(key)
            res = wv.explicit(device, wv_config)(k_prog, target, vmask)
            p = jnp.asarray(p_stuck, jnp.float32)
            stuck = devices.stuck_from_uniform(jax.random.uniform(k_stuck, target.shape),
                                               p / 2, p / 2)
            res = wv.pin_stuck(k_prog, res, target, vmask, stuck, device, wv_config)
            n_stuck = jnp.sum(stuck.at_min | stuck.at_max, dtype=jnp.int32)
        else:
            res = wv.explicit(device, wv_config)(key, target, vmask)
        err = (res.g - target).astype(jnp.float32)
        stats = (jnp.sum(vmask, dtype=jnp.int32), jnp.sum(res.failed, dtype=jnp.int32),
                 jnp.sum(jnp.where(vmask, err * err, 0.0)))
        offsets = np.cumsum([0] + [g.size for g in gs])
        programmed = {}
        for j, i in enumerate(idx):
            sl = slice(int(offsets[j]), int(offsets[j + 1]))
            shape = gs[j].shape
            g = res.g[sl].reshape(shape).astype(gs[j].dtype)
            programmed[i] = (g, res.cycles[sl].reshape(shape), res.failed[sl].reshape(shape))
    for i, w in enumerate(leaves):
        if i in mapped:
            g, cyc, fail = programmed[i]
            out_params[i] = mapping.from_conductances(mapped[i]._replace(g=g), mapping_cfg)
            out_cycles.append(_per_weight(cyc, mapping_cfg, jnp.sum).astype(jnp.int32))
            out_failed.append(_per_weight(fail, mapping_cfg, jnp.any))
        else:
            out_cycles.append(jnp.zeros(jnp.shape(w), jnp.int32))
            out_failed.append(jnp.zeros(jnp.shape(w), bool))
    return ProgrammingResult(treedef.unflatten(out_params), treedef.unflatten(out_cycles),
                             treedef.unflatten(out_failed), *stats, n_stuck)


def program_params(key: jax.Array, params: Any, mask: Any, mapping_cfg: mapping.MappingConfig,
                   device: devices.DeviceConfig, wv_config: wv.WriteVerifyConfig,
                   selected: Any | None = None, *, p_stuck: Any = None) -> ProgrammingResult:
    """Programs a parameter pytree onto devices with explicit write-verify.

    Args:
      key: PRNG key (one explicit loop over all devices; see
        :mod:`swimjax.write_verify` for the key schedule).
      params: any pytree of arrays (weights in their own units).
      mask: pytree like ``params`` of bool arrays of each leaf's shape;
        ``True`` = write-verify this weight (all of its devices). Ignored on
        unmapped leaves.
      mapping_cfg: how weights map onto devices.
      device: the device model.
      wv_config: the write-verify scheme (tolerance in full-scale units).
      selected: pytree of Python bools like ``params`` (which leaves are
        mapped); default :func:`swimjax.mapping.mapped_leaves`.
      p_stuck: None (no faults) or the fraction in ``[0, 1]`` of devices stuck
        (half at ``g_min``, half at ``g_max``, drawn from ``split(key)[1]``;
        the loop then runs on ``split(key)[0]``); a scalar that may be traced.
        Stuck devices stay at their stuck value through the loop
        (:func:`swimjax.write_verify.pin_stuck`): write-verify cannot repair
        them, spends its pulse budget and counts them failed unless the stuck
        value is within tolerance.

    Returns:
      :class:`ProgrammingResult`: ``params``, ``cycles`` and ``failed`` per
      weight, and the device counts and residual of the verified devices;
      ``.total_cycles``, ``.n_failed``, ``.n_failed_devices``,
      ``.failure_fraction`` and ``.residual_std`` give the totals.

    Raises:
      ValueError: ``mask`` does not match ``params`` (structure, shapes, bool
        dtype), non-finite weights, bad configs.
    """
    _check_configs(mapping_cfg=(mapping_cfg, mapping.MappingConfig),
                   device=(device, devices.DeviceConfig),
                   wv_config=(wv_config, wv.WriteVerifyConfig))
    sel = _check_inputs(params, mask, selected)
    if p_stuck is not None and not isinstance(p_stuck, jax.core.Tracer):
        v.check_range("p_stuck", p_stuck, 0.0, 1.0)
    return _program_impl(key, params, mask, 0.0 if p_stuck is None else p_stuck, selected=sel,
                         mapping_cfg=mapping_cfg, device=device, wv_config=wv_config,
                         faults=p_stuck is not None)


@functools.partial(jax.jit, static_argnames=("selected", "mapping_cfg", "truncate"))
def _statistical_impl(key, params, mask, sigma_unverified, sigma_verified, *, selected,
                      mapping_cfg, truncate):
    treedef = jax.tree_util.tree_structure(params)
    leaves = treedef.flatten_up_to(params)
    masks = treedef.flatten_up_to(mask)
    out = list(leaves)
    for i, (w, s) in enumerate(zip(leaves, selected)):
        if not s:
            continue
        mt = mapping.to_conductances(w, mapping_cfg)
        g = wv.statistical(jax.random.fold_in(key, i), mt.g, masks[i], sigma_unverified,
                           sigma_verified, truncate)
        out[i] = mapping.from_conductances(mt._replace(g=g), mapping_cfg)
    return treedef.unflatten(out)


def program_params_statistical(key: jax.Array, params: Any, mask: Any,
                               mapping_cfg: mapping.MappingConfig,
                               sigma_unverified: float, sigma_verified: float,
                               truncate: float | None = None,
                               selected: Any | None = None) -> Any:
    """Programs ``params`` with SWIM's statistical write-verify, per device.

    Every device of a mapped weight gets ``g = target + sigma * eps`` with
    ``sigma = sigma_verified`` (optionally truncated at ``+-truncate``) where
    the weight is verified and ``sigma_unverified`` elsewhere (stds in device
    full-scale units); then the conductances are read out. Leaf ``i`` (in
    flattening order) draws with ``fold_in(key, i)``.

    Returns:
      The programmed parameter pytree (unmapped leaves unchanged).
    """
    _check_configs(mapping_cfg=(mapping_cfg, mapping.MappingConfig))
    v.check_nonnegative("sigma_unverified", sigma_unverified)
    v.check_nonnegative("sigma_verified", sigma_verified)
    if truncate is not None:
        v.check_positive("truncate", truncate)
    sel = _check_inputs(params, mask, selected)
    return _statistical_impl(key, params, mask, sigma_unverified, sigma_verified, selected=sel,
                             mapping_cfg=mapping_cfg,
                             truncate=None if truncate is None else float(truncate))


def _check_configs(**configs: Any) -> None:
    """``name=(obj, cls)``: raises ``ValueError`` naming the first mismatch."""
    for name, (obj, cls) in configs.items():
        if not isinstance(obj, cls):
            raise ValueError(f"{name} must be a {cls.__name__}, got {type(obj).__name__}")


def open_loop_weight_error_moments(w: jax.Array, mapping_cfg: mapping.MappingConfig,
                                   device: devices.DeviceConfig
                                   ) -> tuple[jax.Array, jax.Array]:
    """Exact per-weight mean and std of ``r = sign(W) dW / s`` after one
    open-loop write of every device (no write-verify).

    ``dW`` is the programmed weight minus :func:`swimjax.mapping.quantize`
    ``(W)``, ``s`` the weight's scale, ``sign(W) = +1`` for ``W >= 0``. Each
    device's error has the moments of :func:`swimjax.devices.write_error_moments`
    (a clipped Gaussian when ``device.clip``) and the read-out is linear, so with
    slice weights ``w_i = (2^m - 1) 2^{m (K - i)} / (2^N - 1)``:

    * sign bit: ``E[r] = sum_i w_i E[e_i]``, ``Var[r] = sum_i w_i^2 Var[e_i]``;
    * differential: ``E[r] = sign(W) sum_i w_i (E[e+_i] - E[e-_i])``,
      ``Var[r] = sum_i w_i^2 (Var[e+_i] + Var[e-_i])``.

    Without clipping the mean is 0 and the std ``c(N, m) sigma`` (times
    ``sqrt 2`` for a differential pair): SWIM's model. With clipping, the idle
    device of a differential pair and every level-0 slice err upwards only,
    which pulls the weight towards zero.

    Args:
      w: weights, any shape (floating).
      mapping_cfg: the mapping.
      device: the device (its open-loop variation and ``clip``).

    Returns:
      ``(mean, std)``, arrays of ``w``'s shape (float32 or wider), in units
      of ``s``.

    Raises:
      ValueError: wrong config types; ``w`` not floating, empty, or (when
        concrete) holding NaN or Inf.
    """
    _check_configs(mapping_cfg=(mapping_cfg, mapping.MappingConfig),
                   device=(device, devices.DeviceConfig))
    w = jnp.asarray(w)
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"w must be a floating-point array, got dtype {w.dtype}")
    if w.size == 0:
        raise ValueError(f"w must hold at least one weight, got shape {w.shape}")
    v.check_finite_tree("w", w)
    return _moments_impl(w, mapping_cfg=mapping_cfg, device=device)


@functools.partial(jax.jit, static_argnames=("mapping_cfg", "device"))
def _moments_impl(w: jax.Array, *, mapping_cfg: mapping.MappingConfig,
                  device: devices.DeviceConfig) -> tuple[jax.Array, jax.Array]:
    mt = mapping.to_conductances(w, mapping_cfg)
    mean_dev, std_dev = devices.write_error_moments(mt.g, device)
    wts = jnp.asarray(mapping_cfg.slice_weights() / mapping_cfg.max_q, mean_dev.dtype)
    wts = wts.reshape((-1,) + (1,) * w.ndim)
    var_dev = std_dev * std_dev
    if mapping_cfg.sign == "differential":
        sign = jnp.where(w < 0, -1.0, 1.0).astype(mean_dev.dtype)
        mean = sign * jnp.sum(wts * (mean_dev[0] - mean_dev[1]), axis=0)
        var = jnp.sum(wts * wts * (var_dev[0] + var_dev[1]), axis=0)
    else:
        mean = jnp.sum(wts * mean_dev, axis=0)
        var = jnp.sum(wts * wts * var_dev, axis=0)
    return mean, jnp.sqrt(var)


def open_loop_weight_error(w: jax.Array, mapping_cfg: mapping.MappingConfig,
                           device: devices.DeviceConfig) -> WeightError:
    """Bias and std of ``r = sign(W) dW / s`` over a weight tensor after one
    open-loop write of every device (no write-verify): the number to compare
    with SWIM's zero-mean model (:mod:`swimjax.perturbation`).

    Pools :func:`open_loop_weight_error_moments` over the weights (each
    weight equally likely): ``bias = mean_j mu_j``, ``std^2 = mean_j
    sigma_j^2 + var_j mu_j`` (float64, eager).

    Under the defaults (``MappingConfig()``: sign bit, ``N = 8``, ``m = 1``;
    ``DeviceConfig()``: unclipped) the bias is 0 and the std ``c(8, 1) sigma =
    0.5796 sigma``. With a clipping device the bias of a 128 x 128 Gaussian
    kernel at ``sigma = 0.1`` is -0.016 on a differential mapping with ``N =
    8, m = 1`` (towards zero: the idle device errs upwards), -0.018 with ``m =
    2``, and +0.024 on the sign-bit mapping (away from zero: level-0 slices err
    upwards), against stds of 0.049, 0.075 and 0.036.

    Raises:
      ValueError: wrong config types, non-floating, empty or non-finite ``w``.
    """
    mean, std = open_loop_weight_error_moments(w, mapping_cfg, device)
    mu = np.asarray(mean, np.float64).ravel()
    var = np.asarray(std, np.float64).ravel() ** 2
    return WeightError(bias=float(mu.mean()), std=math.sqrt(float(var.mean() + mu.var())))


def cycles_full_write_verify(key: jax.Array, params: Any, mapping_cfg: mapping.MappingConfig,
                             device: devices.DeviceConfig, wv_config: wv.WriteVerifyConfig,
                             selected: Any | None = None) -> ProgrammingResult:
    """:func:`program_params` with every weight verified: the reference of NWC."""
    mask = jax.tree.map(lambda w: jnp.ones(jnp.shape(w), bool), params)
    return program_params(key, params, mask, mapping_cfg, device, wv_config, selected)


class ExplicitState(NamedTuple):
    """The data of :func:`explicit`: the write-verify mask (a pytree shaped
    like ``params``, one bool per weight, ``True`` = verified)."""

    mask: Any


def explicit(mapping_cfg: mapping.MappingConfig, device: devices.DeviceConfig,
             wv_config: wv.WriteVerifyConfig, selected: Any | None = None
             ) -> Perturbation:
    """Explicit programming as a :class:`~swimjax.perturbation.Perturbation`:
    every Monte-Carlo run maps the weights, programs every device through the
    iterative write-verify loop (:func:`program_params`) and reads them out.

    ``init(params, mask=None) -> ExplicitState`` validates the inputs (no mask:
    nothing verified) and ``apply(key, params, state) -> params`` programs. The
    mask is data, so one compiled program serves every mask of a sweep; the
    device and the loop are the static part of the model.
    """
    _check_configs(mapping_cfg=(mapping_cfg, mapping.MappingConfig),
                   device=(device, devices.DeviceConfig),
                   wv_config=(wv_config, wv.WriteVerifyConfig))

    def init(params: Any, mask: Any | None = None) -> ExplicitState:
        if mask is None:
            mask = jax.tree.map(lambda w: np.zeros(np.shape(w), bool), params)
        _check_inputs(params, mask, selected)
        return ExplicitState(jax.tree.map(lambda m: jnp.asarray(m, bool), mask))

    def apply(key: jax.Array, params: Any, state: ExplicitState) -> Any:
        if not isinstance(state, ExplicitState):
            raise ValueError(f"state must be the ExplicitState of init(), got "
                             f"{type(state).__name__}")
        return program_params(key, params, state.mask, mapping_cfg, device, wv_config,
                              selected).params

    return Perturbation(init, apply)

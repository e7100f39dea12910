"""optax training of the model zoo, with optional noise-injection training.

``train(key, model, data, config, perturbation=None, noise_state=None) ->
(variables, history)``

* Optimizers as in SWIM: Adam (lr 1e-3) for LeNet and the ConvNet; SGD with
  momentum 0.9, weight decay 5e-4 and a cosine learning-rate schedule for the
  ResNets and VGGs (:func:`default_config` picks them by model name).
* Deterministic from ``key``: the initial weights, the per-epoch shuffles and
  the noise samples are all derived from it (same key, same data, same config
  -> identical parameters on the same backend).
* Noise-injection (variation-aware) training: with a ``perturbation`` (a
  :class:`swimjax.perturbation.Perturbation` such as
  ``swimjax.perturbation.statistical(cfg)``, the very model the Monte-Carlo
  evaluation uses, or a function ``(key, variables, noise_state) ->
  variables``) and its ``noise_state`` (mask, sigmas: data, so another mask
  or sigma does not recompile the step), every step runs its forward and
  backward pass at freshly perturbed weights while the update is applied to
  the clean weights (straight-through: ``w + stop_gradient(perturb(w) - w)``,
  so ``d loss / d w`` is the gradient at the perturbed point). The
  perturbation receives the FULL variables pytree (the one ``model.apply_fn``
  takes); only its ``"params"`` are used, batch statistics are never
  perturbed.
* Variation-aware noise of the evaluation's model (:func:`variation_noise`):
  SWIM's statistical weight error ``dW = s c sigma_i eps`` with ``sigma_i =
  sigma_wv`` on write-verified weights and ``sigma_d`` elsewhere, ``eps``
  Gaussian (``"gaussian"``) or right-censored Gaussian ``min(eps, tau)``
  (``"rcg"``, TRICE); mask, sigmas and ``tau`` are the state (data).
  :func:`noise_injection` builds it from a noise name (``"none"``,
  ``"gaussian"``, ``"rcg"``); :func:`censored_normal_moments` gives the
  closed-form mean and std of ``min(eps, tau)``. ``train(...,
  init_variables=...)`` starts from given weights (fine-tuning, e.g. with
  the sigmas that remain after a write-verify mask).

Each training step is one jitted function; the last partial batch of an epoch
is dropped so that every step has the same shape (one compilation). On CPU,
when the step holds no XLA convolution (all lowered, see below), a training
set of at most :data:`DEVICE_DATA_BYTES` is placed on the device once and
every epoch is one jitted ``lax.scan`` over its steps, taking each batch from
the device copy by the epoch's permutation: the same batches, step indices
and noise keys as feeding the steps one by one from the host (done
otherwise; results equal up to float rounding), without a dispatch and a
batch copy per step.

Convolutions (``TrainConfig.conv_lowering``): XLA CPU runs convolutions with
few channels, and the gradients of window max-pooling, slowly. With
``"gemm"`` the model's forward function is rewritten by the jaxpr interpreter
that Monte-Carlo uses (:func:`swimjax._runbatch.lowered`, its single-run
case): every convolution becomes im2col patches and one matrix product,
pooling becomes strided slices, and ``jax.grad`` of that is the backward pass
(custom gradients keep the GEMMs in fast layouts; col2im of a stride-1
convolution is a sum of slices of one padded GEMM output; the pooling's
routing keeps the forward's first-maximum tap; elementwise custom-derivative
calls such as ``relu`` keep the GEMM's layout). Same numbers up to float
rounding. ``"xla"`` keeps XLA's convolution. ``"auto"`` (default): on CPU,
``"gemm"`` when every convolution of the model has stride 1 and ``K = kernel
taps * input channels <= AUTO_MAX_GEMM_K``, else ``"xla"`` (measured on 2
shared cores, batch 128, one step: LeNet, K = 9 and 54, 1.7x faster lowered;
the ConvNet, K = 27 to 2304, 1.9x; ResNet-20, strided convolutions and batch
norm, 0.98x, and 0.9x with only its first convolution lowered); on
accelerators, ``"xla"`` (not measured there). Per-epoch test evaluation uses
the same choice.

Devices (``TrainConfig.data_parallel``, default on): with several devices in
the process (the binaries make one XLA CPU device per core) a step splits its
batch over them (:func:`batch_shards`; ``shard_map``, gradients averaged) for
models without batch norm or per-step forward noise. XLA CPU runs each fused
elementwise / pooling / copy operation on one thread of its device, so one
device leaves the other cores idle for the memory-bound half of a LeNet step;
split, every core runs its share. Results equal one device's up to float
rounding and are reproducible for a given device count (``data_parallel=False``
for numbers that do not depend on it).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from swimjax import _jaxpr, _runbatch
from swimjax import _validation as v
from swimjax.data import Dataset
from swimjax.models import Model
from swimjax.perturbation import Perturbation, VariationConfig, perturb_traced, weight_sigmas

Variables = dict[str, Any]
PerturbFn = Callable[[jax.Array, Variables, Any], Variables]

#: Stream of a step's noise key that seeds a stochastic model's forward pass
#: (a model with ``stochastic = True`` takes ``train_apply(variables, x, key)``).
FORWARD_STREAM = 0x46575244
OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("constant", "cosine")
CONV_LOWERINGS = ("auto", "gemm", "xla")
# "auto" on CPU lowers a model whose convolutions all have stride 1 and at
# most this GEMM depth (taps * input channels).
AUTO_MAX_GEMM_K = 2304


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters.

    Attributes:
      optimizer: ``"adam"`` or ``"sgd"`` (with ``momentum``).
      learning_rate: peak learning rate (> 0).
      momentum: SGD momentum in [0, 1) (ignored by Adam).
      weight_decay: L2 coefficient added to the gradient of every parameter
        (PyTorch-style ``weight_decay``), >= 0.
      schedule: ``"constant"`` or ``"cosine"`` (decay to 0 over all steps).
      epochs: passes over the training set (>= 1).
      batch_size: training batch size (>= 1; at most the training-set size).
      eval_batch_size: batch size of the per-epoch test evaluation (>= 1).
      conv_lowering: ``"auto"``, ``"gemm"`` (every convolution as im2col +
        matrix product, pooling as strided slices) or ``"xla"`` (XLA's
        convolution); see the module docstring. Changes speed only (float
        rounding aside).
      data_parallel: split every batch over this process's devices (see
        :func:`batch_shards`; one device: no change). Changes speed only:
        the result equals one device's up to float rounding (the batch's
        gradient is summed in shards), and is reproducible for a given
        device count; ``False`` makes it independent of the device count.
      frozen_batch_norm: batch norm normalizes with its running statistics,
        which stay as they are (the network trains in inference mode; its
        scale and bias still learn). For fine-tuning a trained network under
        weight noise: with batch statistics every batch is re-normalized
        around the noisy weights' activations, hiding the shifts that the
        deployed network, which normalizes with fixed statistics, meets.
        No effect on models without batch norm.
    """

    optimizer: str = "adam"
    learning_rate: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "constant"
    epochs: int = 5
    batch_size: int = 64
    eval_batch_size: int = 1000
    conv_lowering: str = "auto"
    data_parallel: bool = True
    frozen_batch_norm: bool = False

    def __post_init__(self) -> None:
        v.check_choice("optimizer", self.optimizer, OPTIMIZERS)
        v.check_positive("learning_rate", self.learning_rate)
        v.check_range("momentum", self.momentum, 0.0, 1.0, high_inclusive=False)
        v.check_nonnegative("weight_decay", self.weight_decay)
        v.check_choice("schedule", self.schedule, SCHEDULES)
        v.check_int("epochs", self.epochs, 1, None)
        v.check_int("batch_size", self.batch_size, 1, None)
        v.check_int("eval_batch_size", self.eval_batch_size, 1, None)
        v.check_choice("conv_lowering", self.conv_lowering, CONV_LOWERINGS)
        for name in ("data_parallel", "frozen_batch_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

    def make_optimizer(self, total_steps: int) -> optax.GradientTransformation:
        """The optax transformation for ``total_steps`` updates."""
        v.check_int("total_steps", total_steps, 1, None)
        if self.schedule == "cosine":
            lr: Any = optax.cosine_decay_schedule(self.learning_rate, decay_steps=total_steps)
        else:
            lr = self.learning_rate
        if self.optimizer == "adam":
            opt = optax.adam(lr)
        else:
            opt = optax.sgd(lr, momentum=self.momentum if self.momentum > 0 else None)
        if self.weight_decay > 0:
            return optax.chain(optax.add_decayed_weights(self.weight_decay), opt)
        return opt


def default_config(model_name: str, **overrides: Any) -> TrainConfig:
    """SWIM's training settings for a zoo model, with optional overrides.

    ``lenet`` / ``convnet``: Adam, lr 1e-3, constant. ResNets / VGGs: SGD,
    lr 0.1, momentum 0.9, weight decay 5e-4, cosine schedule, batch 128.
    """
    if model_name in ("lenet", "convnet"):
        base = TrainConfig(optimizer="adam", learning_rate=1e-3, schedule="constant")
    elif model_name in ("resnet18", "resnet20", "vgg8", "vgg16"):
        base = TrainConfig(optimizer="sgd", learning_rate=0.1, momentum=0.9, weight_decay=5e-4,
                           schedule="cosine", batch_size=128, epochs=200)
    else:
        raise ValueError(
            f"model_name must be one of ['convnet', 'lenet', 'resnet18', 'resnet20', 'vgg16', "
            f"'vgg8'], got {model_name!r}")
    return dataclasses.replace(base, **overrides)


def resolve_conv_lowering(conv_lowering: str, platform: str | None = None
                          ) -> tuple[str, int | None]:
    """``(lowering, max_gemm_k)`` that ``conv_lowering`` means on ``platform``
    (default: the default backend's): ``("xla", None)``, ``("gemm", None)``
    (every convolution lowered) or ``("gemm", k)`` (those with depth <= k)."""
    v.check_choice("conv_lowering", conv_lowering, CONV_LOWERINGS)
    if conv_lowering != "auto":
        return conv_lowering, None
    if (platform or jax.default_backend()) == "cpu":
        return "gemm", AUTO_MAX_GEMM_K
    return "xla", None


@functools.lru_cache(maxsize=64)
def lowered_fn(fn: Callable[..., Any], lowering: str, max_gemm_k: int | None
               ) -> Callable[..., Any]:
    """``fn(variables, x)`` as ``resolve_conv_lowering`` chose to build it
    (cached, so jitted users of the result compile once)."""
    if lowering == "xla":
        return fn
    if max_gemm_k is None:
        return _runbatch.lowered(fn)
    gemm = _runbatch.lowered(fn)

    def chosen(variables: Any, x: Any) -> Any:
        # All or nothing: lowering only some convolutions was measured slower
        # than XLA alone (ResNet-20: its first conv, K = 27, lowered: -9 %).
        jaxpr = jax.make_jaxpr(fn)(variables, x).jaxpr
        if all(d <= max_gemm_k and stride1 for d, stride1 in _conv_shapes(jaxpr)):
            return gemm(variables, x)
        return fn(variables, x)

    return chosen


def _conv_shapes(jaxpr: Any) -> list[tuple[int, bool]]:
    """``(GEMM depth = kernel taps * input channels, all strides 1)`` of every
    convolution."""
    out = []
    for eqn in _jaxpr.iter_eqns(jaxpr):
        if eqn.primitive.name == "conv_general_dilated":
            spec = eqn.params["dimension_numbers"].rhs_spec
            shape = eqn.invars[1].aval.shape
            out.append((shape[spec[1]] * int(np.prod([shape[d] for d in spec[2:]])),
                        all(s == 1 for s in eqn.params["window_strides"])))
    return out


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of (B, C) logits and (B,) integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@functools.lru_cache(maxsize=64)
def _correct_count_fn(apply_fn: Callable[[Any, jax.Array], jax.Array]) -> Callable[..., jax.Array]:
    @jax.jit
    def count(params: Any, x: jax.Array, y: jax.Array, valid: jax.Array) -> jax.Array:
        pred = jnp.argmax(apply_fn(params, x), axis=-1)
        return jnp.sum((pred == y) & valid)
    return count


def evaluate_accuracy(apply_fn: Callable[[Any, jax.Array], jax.Array], params: Any,
                      x: np.ndarray, y: np.ndarray, batch_size: int = 1000) -> float:
    """Top-1 accuracy (fraction in [0, 1]) of ``apply_fn(params, .)`` on ``(x, y)``.

    Evaluated in batches of ``batch_size`` (the last one zero-padded and
    masked, so one compilation serves every batch). ``x``: (N, ...) inputs,
    ``y``: (N,) integer labels.
    """
    v.check_int("batch_size", batch_size, 1, None)
    n = len(y)
    if n == 0 or len(x) != n:
        raise ValueError(f"x and y must hold the same number (>= 1) of examples, "
                         f"got {len(x)} and {n}")
    bs = min(batch_size, n)
    count = _correct_count_fn(apply_fn)
    correct = jnp.zeros((), jnp.int32)
    for start in range(0, n, bs):
        xb = np.asarray(x[start:start + bs])
        yb = np.asarray(y[start:start + bs])
        m = len(yb)
        valid = np.arange(bs) < m
        if m < bs:
            xb = np.concatenate([xb, np.zeros((bs - m, *xb.shape[1:]), xb.dtype)])
            yb = np.concatenate([yb, np.zeros((bs - m,), yb.dtype)])
        correct = correct + count(params, xb, yb, valid)
    return float(correct) / n


def straight_through(params: Any, perturbed: Any) -> Any:
    """``perturbed`` in the forward pass, identity gradient to ``params``."""
    return jax.tree.map(lambda p, q: p + jax.lax.stop_gradient(q - p), params, perturbed)


# ----------------------------------------------------------------------------
# Variation-aware training noise
# ----------------------------------------------------------------------------

#: Training-noise names: none, SWIM's Gaussian model, right-censored Gaussian.
TRAIN_NOISES = ("none", "gaussian", "rcg")


class NoiseState(NamedTuple):
    """The data of :func:`variation_noise`.

    Attributes:
      mask: write-verify mask shaped like the variables (``True`` = verified:
        sigma ``sigma_wv``); entries of unmapped leaves are ignored.
      sigma_d: device sigma of unverified weights (full-scale units), float32.
      sigma_wv: device sigma of verified weights (full-scale units), float32.
      tau: right-censoring point of the standard normal ``eps`` (float32;
        ``inf``: plain Gaussian).
    """

    mask: Any
    sigma_d: jax.Array
    sigma_wv: jax.Array
    tau: jax.Array


def censored_normal_moments(tau: float) -> tuple[float, float]:
    """Mean and std of ``min(Z, tau)``, ``Z ~ N(0, 1)``, in closed form.

    With ``phi``/``Phi`` the standard normal density/CDF: ``E = -phi(tau) +
    tau (1 - Phi(tau))`` and ``E[X^2] = Phi(tau) - tau phi(tau) + tau^2 (1 -
    Phi(tau))`` (the integral of ``z phi`` and ``z^2 phi`` below ``tau`` plus
    the mass ``1 - Phi(tau)`` piled at ``tau``). ``tau = inf`` gives (0, 1).
    """
    tau = float(tau)
    if math.isnan(tau):
        raise ValueError("tau must be a number, got nan")
    if tau == math.inf:
        return 0.0, 1.0
    if tau == -math.inf:
        raise ValueError("tau must be > -inf")
    phi = math.exp(-0.5 * tau * tau) / math.sqrt(2 * math.pi)
    upper = 0.5 * math.erfc(tau / math.sqrt(2))   # 1 - Phi(tau), accurate in the tail
    cdf = 1.0 - upper
    mean = -phi + tau * upper
    second = cdf - tau * phi + tau * tau * upper
    return mean, math.sqrt(max(second - mean * mean, 0.0))


def _check_scalar(name: str, value: Any, allow_inf: bool = False) -> jax.Array:
    if isinstance(value, jax.core.Tracer):
        return value
    if np.ndim(value) != 0:
        raise ValueError(f"{name} must be a scalar, got shape {np.shape(value)}")
    x = float(value)
    if math.isnan(x) or (not allow_inf and math.isinf(x)):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return jnp.asarray(x, jnp.float32)


def variation_noise(cfg: VariationConfig, selected: Any | None = None,
                    tau: float = math.inf) -> Perturbation:
    """SWIM's statistical weight error with optionally right-censored noise,
    as a :class:`~swimjax.perturbation.Perturbation` for training.

    ``apply(key, variables, state)`` gives ``W + s c m_i sigma_i min(eps_i,
    tau)`` on the mapped leaves of ``variables["params"]`` (or of the pytree
    itself when it has no ``"params"``): ``s c m_i`` is the evaluation
    model's per-weight std per unit sigma
    (:func:`swimjax.perturbation.weight_sigmas`, from the weights as they are
    at that step), ``sigma_i = sigma_wv`` where ``state.mask`` is set and
    ``sigma_d`` elsewhere; ``eps`` uses the same draws as
    :func:`swimjax.perturbation.statistical` (``fold_in(key, leaf index)``),
    so with ``tau = inf`` the two give identical weights for the same key.
    ``cfg.quantize`` quantizes ``W`` first, as the evaluation does.

    ``init(variables, mask=None, *, sigma_d=cfg.sigma_d,
    sigma_wv=cfg.sigma_wv, tau=tau) -> NoiseState`` (``mask=None``: nothing
    verified). Right-censoring (TRICE): ``eps = min(eps, tau)`` piles the
    upper tail at ``tau``; its mean and std are
    :func:`censored_normal_moments`.
    """
    if not isinstance(cfg, VariationConfig):
        raise ValueError(f"cfg must be a VariationConfig, got {type(cfg).__name__}")
    default_tau = _check_scalar("tau", tau, allow_inf=True)

    def _params(variables: Any) -> Any:
        return variables["params"] if isinstance(variables, dict) and "params" in variables \
            else variables

    def init(variables: Any, mask: Any | None = None, *, sigma_d: Any = None,
             sigma_wv: Any = None, tau: Any = None) -> NoiseState:
        if mask is None:
            mask = jax.tree.map(lambda w: np.zeros(np.shape(w), bool), variables)
        else:
            v.check_same_structure("mask", mask, variables)
            mask = jax.tree.map(lambda m: jnp.asarray(m).astype(bool), mask)
        sd = _check_scalar("sigma_d", cfg.sigma_d if sigma_d is None else sigma_d)
        swv = _check_scalar("sigma_wv", cfg.sigma_wv if sigma_wv is None else sigma_wv)
        for name, s in (("sigma_d", sd), ("sigma_wv", swv)):
            if not isinstance(s, jax.core.Tracer) and float(s) < 0:
                raise ValueError(f"{name} must be >= 0, got {float(s)}")
        t = default_tau if tau is None else _check_scalar("tau", tau, allow_inf=True)
        return NoiseState(mask, sd, swv, t)

    def apply(key: jax.Array, variables: Any, state: NoiseState) -> Any:
        if not isinstance(state, NoiseState):
            raise ValueError(f"state must be the NoiseState of init(), got "
                             f"{type(state).__name__}")
        params = _params(variables)
        noisy = perturb_traced(key, params, _params(state.mask), state.sigma_d, state.sigma_wv,
                               cfg, selected, tau=state.tau)
        if params is variables:
            return noisy
        return {**variables, "params": noisy}

    return Perturbation(init, apply)


def noise_injection(noise: str, cfg: VariationConfig, *, sigma: float | None = None,
                    tau: float = 1.0, selected: Any | None = None) -> Perturbation | None:
    """The training perturbation a noise name asks for: ``"none"`` -> None;
    ``"gaussian"`` -> :func:`variation_noise` with ``sigma_d = sigma`` (default
    ``cfg.sigma_d``, the deployment's); ``"rcg"`` -> the same right-censored
    at ``tau``."""
    v.check_choice("noise", noise, TRAIN_NOISES)
    if noise == "none":
        return None
    if sigma is not None:
        cfg = dataclasses.replace(cfg, sigma_d=v.check_nonnegative("sigma", sigma))
    return variation_noise(cfg, selected, tau=math.inf if noise == "gaussian" else tau)


def remaining_sigmas(params: Any, mask: Any, cfg: VariationConfig,
                     selected: Any | None = None) -> Any:
    """Per-weight std of the weight error left after write-verifying ``mask``:
    ``sigma_verified`` where the mask is set, ``sigma_unverified`` elsewhere
    (:func:`swimjax.perturbation.weight_sigmas`), zeros on unmapped leaves."""
    v.check_same_structure("mask", mask, params)
    su, sv = weight_sigmas(params, cfg, selected)
    return jax.tree.map(lambda a, b, m: jnp.where(jnp.asarray(m, bool), b, a), su, sv, mask)


def batch_shards(model: Model, config: TrainConfig) -> int:
    """How many of this process's devices a training step splits its batch
    over: the most devices (at most ``jax.local_device_count()``) that divide
    ``config.batch_size``, or 1 when ``config.data_parallel`` is off or the
    model normalizes over the batch (batch norm, unless
    ``config.frozen_batch_norm``: its statistics would become per-shard; also
    a model that does not say, e.g. :class:`swimjax.dnat.MacroModel`) or
    draws forward noise per step (a stochastic model: its noise would repeat
    in every shard).

    Each shard runs on its own device (the binaries make one XLA CPU device
    per core; ``XLA_FLAGS=--xla_force_host_platform_device_count=N``), so the
    memory-bound parts of the step (patches, pooling, elementwise), which XLA
    CPU runs on one thread per device, use every core; the shards' gradients
    are averaged (an all-reduce of the parameters' size)."""
    batch_stats = getattr(model, "has_batch_norm", True) and not config.frozen_batch_norm
    if not config.data_parallel or batch_stats or getattr(model, "stochastic", False):
        return 1  # (a model that does not say whether it has batch norm: as if it had)
    n = jax.local_device_count()
    return max(d for d in range(1, n + 1) if config.batch_size % d == 0)


@functools.lru_cache(maxsize=32)
def _frozen_bn_apply(model: Model) -> Callable[[Variables, jax.Array], tuple[jax.Array, Variables]]:
    """``model.train_apply``'s signature in inference mode: batch norm on its
    running statistics, which it returns unchanged (cached: one function per
    model, so the compiled steps are shared)."""
    def apply(variables: Variables, x: jax.Array) -> tuple[jax.Array, Variables]:
        return model.apply_fn(variables, x), {}
    return apply


@functools.lru_cache(maxsize=8)
def _batch_mesh(shards: int) -> Any:
    """The mesh of the first ``shards`` local devices, axis ``"batch"``."""
    from jax.sharding import Mesh

    return Mesh(np.array(jax.local_devices()[:shards]), ("batch",))


def _replicated(tree: Any, shards: int) -> Any:
    """``tree`` on every device of :func:`_batch_mesh` (what the sharded
    step returns its parameters as: placing them so from the start keeps the
    first epoch's compilation the only one)."""
    if shards == 1:
        return tree
    from jax.sharding import NamedSharding, PartitionSpec as P

    return jax.device_put(tree, NamedSharding(_batch_mesh(shards), P()))


def _step_inputs(tx: optax.GradientTransformation, params: Any, state: Variables,
                 shards: int) -> tuple[Any, Any, Variables]:
    """``(params, opt_state, state)`` for the first call of the step that
    :func:`_make_train_step` built for ``shards`` (:func:`batch_shards`),
    placed as the step returns them (:func:`_replicated`)."""
    params, state = _replicated((params, state), shards)
    return params, _replicated(tx.init(params), shards), state


def _sharded_over_batch(grad_fn: Callable[..., Any], shards: int) -> Callable[..., Any]:
    """``grad_fn(params, state, x, y, key, noise_state) -> ((loss, (logits,
    new_state)), grads)`` with ``x``/``y`` split over ``shards`` local devices
    along the batch: loss and gradients averaged over the shards (equal
    shares, so the batch mean), logits concatenated; ``new_state`` must not
    depend on the batch (:func:`batch_shards` excludes batch norm)."""
    from jax.sharding import PartitionSpec as P

    mesh = _batch_mesh(shards)

    def shard(params, state, x, y, key, noise_state):
        (loss, (logits, new_state)), grads = grad_fn(params, state, x, y, key, noise_state)
        loss, grads = jax.lax.pmean((loss, grads), "batch")
        return (loss, (logits, new_state)), grads

    # check_vma off: the lowered forward binds primitives itself, outside
    # shard_map's varying-axes bookkeeping
    return jax.shard_map(shard, mesh=mesh, in_specs=(P(), P(), P("batch"), P("batch"), P(), P()),
                         out_specs=((P(), (P("batch"), P())), P()), check_vma=False)


@functools.lru_cache(maxsize=32)
def _make_train_step(model: Model, config: TrainConfig, total_steps: int,
                     perturb_fn: Optional[PerturbFn], lowering: tuple[str, int | None]
                     ) -> tuple[optax.GradientTransformation, Callable[..., Any]]:
    """``(tx, step)``: the optimizer and the jitted ``step(params, opt_state,
    state, x, y, noise_key, step_index, noise_state) -> (params, opt_state,
    state, loss, acc)`` (the step's noise key is ``fold_in(noise_key,
    step_index)``); ``state`` holds the non-parameter collections,
    ``noise_state`` the perturbation's data. Cached, so repeated ``train``
    calls with the same model/config/perturb_fn compile once."""
    tx = config.make_optimizer(total_steps)
    train_apply = lowered_fn(_frozen_bn_apply(model) if config.frozen_batch_norm
                             and getattr(model, "has_batch_norm", False) else model.train_apply,
                             *lowering)

    def loss_fn(params: Any, state: Variables, x: jax.Array, y: jax.Array, key: jax.Array,
                noise_state: Any) -> tuple[jax.Array, tuple[jax.Array, Variables]]:
        if perturb_fn is not None:
            noisy = perturb_fn(key, {"params": params, **state}, noise_state)
            params = straight_through(params, noisy["params"])
        if getattr(model, "stochastic", False):  # e.g. a macro's error model, per step
            logits, new_state = train_apply({"params": params, **state}, x,
                                            jax.random.fold_in(key, FORWARD_STREAM))
        else:
            logits, new_state = train_apply({"params": params, **state}, x)
        return cross_entropy(logits, y), (logits, new_state)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    shards = batch_shards(model, config)
    if shards > 1:
        grad_fn = _sharded_over_batch(grad_fn, shards)

    @jax.jit
    def step(params: Any, opt_state: Any, state: Variables, x: jax.Array, y: jax.Array,
             noise_key: jax.Array, step_index: jax.Array, noise_state: Any = None
             ) -> tuple[Any, Any, Variables, jax.Array, jax.Array]:
        key = jax.random.fold_in(noise_key, step_index)
        (loss, (logits, new_state)), grads = grad_fn(params, state, x, y, key, noise_state)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        acc = jnp.mean(jnp.argmax(logits, -1) == y)
        return params, opt_state, {**state, **new_state}, loss, acc

    return tx, step


#: Training sets up to this many bytes (inputs and labels) are placed on the
#: device once and every epoch runs as one jitted scan over its steps; larger
#: ones are fed batch by batch from the host.
DEVICE_DATA_BYTES = 1 << 30


@functools.lru_cache(maxsize=32)
def _make_train_epoch(model: Model, config: TrainConfig, total_steps: int,
                      perturb_fn: Optional[PerturbFn], lowering: tuple[str, int | None],
                      steps_per_epoch: int) -> Callable[..., Any]:
    """The jitted ``epoch(params, opt_state, state, x, y, perm, noise_key,
    first_step, noise_state) -> (params, opt_state, state, losses, accs)``:
    ``steps_per_epoch`` steps of :func:`_make_train_step`'s ``step`` in one
    ``lax.scan``, step ``i`` on the examples ``perm[i * B:(i + 1) * B]`` of the
    device-resident ``x (N, ...)``, ``y (N,)`` with step index ``first_step +
    i`` (the batches and noise keys of the per-step loop); ``losses``/``accs``
    ``(steps_per_epoch,)``. One dispatch per epoch, no host-to-device batch
    copies."""
    _, step = _make_train_step(model, config, total_steps, perturb_fn, lowering)
    bs = config.batch_size

    @jax.jit
    def epoch(params: Any, opt_state: Any, state: Variables, x: jax.Array, y: jax.Array,
              perm: jax.Array, noise_key: jax.Array, first_step: jax.Array,
              noise_state: Any = None) -> tuple[Any, Any, Variables, jax.Array, jax.Array]:
        batches = perm[:steps_per_epoch * bs].reshape(steps_per_epoch, bs)

        def body(carry, i_idx):
            i, idx = i_idx
            params, opt_state, state, loss, acc = step(
                *carry, jnp.take(x, idx, axis=0), jnp.take(y, idx, axis=0), noise_key,
                first_step + i, noise_state)
            return (params, opt_state, state), (loss, acc)

        steps = jnp.arange(steps_per_epoch, dtype=jnp.int32)
        (params, opt_state, state), (losses, accs) = jax.lax.scan(
            body, (params, opt_state, state), (steps, batches))
        return params, opt_state, state, losses, accs

    return epoch


def _scan_pays(step: Callable[..., Any], args: tuple) -> bool:
    """Whether epochs run as one scan (:func:`_make_train_epoch`): on CPU,
    when ``step(*args)`` holds no XLA convolution (all lowered to GEMMs; XLA
    CPU's convolutions ran 3x slower inside a loop: LeNet, 2.4 against 0.75
    s per epoch); elsewhere not (not measured)."""
    if jax.default_backend() != "cpu":
        return False
    return not _conv_shapes(jax.make_jaxpr(step)(*args).jaxpr)


def _check_compatible(model: Model, data: Dataset) -> None:
    if tuple(data.input_shape) != tuple(model.input_shape):
        raise ValueError(
            f"data images have shape {data.input_shape} but model {model.name!r} expects "
            f"{model.input_shape}; build it with get_model(..., input_shape={data.input_shape})")
    if data.num_classes > model.num_classes:
        raise ValueError(
            f"dataset {data.name!r} has {data.num_classes} classes but model {model.name!r} "
            f"has only {model.num_classes} outputs")


def train(key: jax.Array, model: Model, data: Dataset, config: TrainConfig = TrainConfig(),
          perturbation: Perturbation | PerturbFn | None = None, noise_state: Any = None,
          progress: bool = True, init_variables: Variables | None = None
          ) -> tuple[Variables, list[dict[str, float]]]:
    """Trains ``model`` on ``data``.

    Args:
      key: PRNG key; split into init / shuffle / noise keys.
      model: a zoo :class:`~swimjax.models.Model`.
      data: a :class:`~swimjax.data.Dataset` matching ``model.input_shape``.
      config: :class:`TrainConfig`.
      perturbation: optional perturbation for noise-injection training: a
        :class:`swimjax.perturbation.Perturbation` or a function ``(key,
        variables, noise_state) -> variables`` (see the module docstring).
      noise_state: the perturbation's state over the full variables pytree
        (default for a ``Perturbation``: ``perturbation.init(variables)`` of
        the initial variables, i.e. nothing verified; for a function: None).
      progress: show a tqdm progress bar.
      init_variables: start from these variables (fine-tuning; the structure
        and shapes of ``model.init``'s) instead of freshly initialized ones;
        the shuffles and noise still come from ``key``.

    Returns:
      ``(variables, history)``: the trained full variables pytree
      (``{"params": ..., ["batch_stats": ...]}``, ready for
      ``model.apply_fn``) and one dict per epoch with ``epoch``,
      ``train_loss`` and ``train_acc`` (means over the epoch's batches, at the
      perturbed weights when noise-injection is on), ``test_acc`` (clean
      weights, inference mode) and ``seconds``.
    """
    from tqdm.auto import tqdm

    _check_compatible(model, data)
    n = len(data.y_train)
    if config.batch_size > n:
        raise ValueError(f"batch_size must be <= the {n} training examples, "
                         f"got {config.batch_size}")
    steps_per_epoch = n // config.batch_size
    init_key, shuffle_key, noise_key = jax.random.split(key, 3)
    variables = model.init(init_key, jnp.asarray(data.x_train[:1]))
    if init_variables is not None:
        v.check_same_structure("init_variables", init_variables, variables)
        variables = jax.tree.map(jnp.asarray, init_variables)
    params = variables["params"]
    state = {k: val for k, val in variables.items() if k != "params"}
    # the schedule's length matters only for cosine: keep the compile cache shared otherwise
    total_steps = steps_per_epoch * config.epochs if config.schedule == "cosine" else 1
    perturb_fn = perturbation.apply if isinstance(perturbation, Perturbation) else perturbation
    if isinstance(perturbation, Perturbation) and noise_state is None:
        noise_state = perturbation.init(variables)
    lowering = resolve_conv_lowering(config.conv_lowering)
    tx, step = _make_train_step(model, config, total_steps, perturb_fn, lowering)
    apply_fn = lowered_fn(model.apply_fn, *lowering)
    shards = batch_shards(model, config)
    params, opt_state, state = _step_inputs(tx, params, state, shards)

    on_device = (np.asarray(data.x_train).nbytes + np.asarray(data.y_train).nbytes
                 <= DEVICE_DATA_BYTES) and _scan_pays(step, (
                     params, opt_state, state, data.x_train[:config.batch_size],
                     data.y_train[:config.batch_size], noise_key, np.int32(0), noise_state))
    if on_device:
        run_epoch = _make_train_epoch(model, config, total_steps, perturb_fn, lowering,
                                      steps_per_epoch)
        x_dev, y_dev = _replicated((jnp.asarray(data.x_train), jnp.asarray(data.y_train)),
                                   shards)

    history: list[dict[str, float]] = []
    bar = tqdm(total=steps_per_epoch * config.epochs, disable=not progress,
               desc=f"train {model.name}", unit="step")
    global_step = 0
    for epoch in range(config.epochs):
        t0 = time.perf_counter()
        perm = jax.random.permutation(jax.random.fold_in(shuffle_key, epoch), n)
        if on_device:
            params, opt_state, state, losses, accs = run_epoch(
                params, opt_state, state, x_dev, y_dev, perm, noise_key,
                np.int32(global_step), noise_state)
            global_step += steps_per_epoch
            bar.update(steps_per_epoch)
        else:
            perm = np.asarray(perm)
            losses, accs = [], []
            for i in range(steps_per_epoch):
                idx = perm[i * config.batch_size:(i + 1) * config.batch_size]
                params, opt_state, state, loss, acc = step(
                    params, opt_state, state, data.x_train[idx], data.y_train[idx], noise_key,
                    np.int32(global_step), noise_state)
                losses.append(loss)
                accs.append(acc)
                global_step += 1
                bar.update(1)
            losses, accs = jnp.stack(losses), jnp.stack(accs)
        variables = {"params": params, **state}
        test_acc = evaluate_accuracy(apply_fn, variables, data.x_test, data.y_test,
                                     config.eval_batch_size)
        record = {"epoch": epoch + 1,
                  "train_loss": float(jnp.mean(losses)),
                  "train_acc": float(jnp.mean(accs)),
                  "test_acc": test_acc,
                  "seconds": time.perf_counter() - t0}
        if not math.isfinite(record["train_loss"]):
            bar.close()
            raise ValueError(
                f"training diverged in epoch {epoch + 1}: the mean training loss is "
                f"{record['train_loss']} (the weights are no longer finite); lower "
                f"learning_rate (now {config.learning_rate:g}) or check the data")
        history.append(record)
        bar.set_postfix(loss=f"{record['train_loss']:.4f}", test_acc=f"{test_acc:.4f}")
    bar.close()
    return {"params": params, **state}, history

"""Model zoo (flax linen) for the SWIM / D-NAT experiments, behind one registry.

``get_model(name, num_classes=10, input_shape=None) -> Model``. The library
boundary is ``model.apply_fn(variables, x) -> logits`` in INFERENCE mode:

* ``variables`` is the FULL flax variables pytree, ``{"params": ...}`` for
  networks without batch norm (LeNet, ConvNet) and ``{"params": ...,
  "batch_stats": ...}`` for the others. Batch norm runs on its running
  statistics. Under the mapping's rule (leaves with ``ndim >= 2`` are kernels
  and go onto devices) every batch-norm scale/bias/mean/var (1-D) and every
  bias stays digital and exact automatically.
* For hardware studies that put batch norm into the crossbar weights, use
  ``model.fold_batchnorm(variables) -> folded`` and
  ``model.folded_apply_fn(folded, x)``: each conv+BN pair becomes one conv
  with a bias (same function to float tolerance). For models without batch
  norm both are the identity / ``apply_fn``.

Training uses ``model.train_apply(variables, x) -> (logits, model_state)``:
batch norm in train mode (batch statistics), ``model_state`` the updated
non-parameter collections (``{"batch_stats": ...}``, or ``{}``).

Images are NHWC float32, ``x.shape == (B, *model.input_shape)``.

For backward compatibility with the architecture table,
``init_fn, apply_fn = get_model(name)`` also works (a ``Model`` unpacks to
``(init, apply_fn)``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp

from swimjax import _validation as v
from swimjax.models.layers import ConvBN, fold_batchnorm

Variables = dict[str, Any]

# Init runs once per model; compiling its many random initializers with full
# backend optimization dominates start-up on small CPUs.
_INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}

__all__ = ["Model", "get_model", "available_models", "check_input_shape", "fold_batchnorm",
           "ConvBN"]


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    """A zoo network with pure init / apply functions.

    Attributes:
      name: registry name (e.g. ``"lenet"``).
      num_classes: number of output logits.
      input_shape: ``(H, W, C)`` of one image (batch axis excluded).
      module: the flax module (batch norm unfolded).
      folded_module: the same network with every conv+BN folded into a conv.
      has_batch_norm: whether ``variables`` carries ``"batch_stats"``.
    """

    name: str
    num_classes: int
    input_shape: tuple[int, int, int]
    module: nn.Module
    folded_module: nn.Module
    has_batch_norm: bool

    def __iter__(self) -> Iterator[Callable[..., Any]]:
        """Unpacks as ``(init, apply_fn)`` (the architecture table's contract)."""
        return iter((self.init, self.apply_fn))

    def _check_x(self, x: jax.Array) -> None:
        if jnp.ndim(x) != 4 or tuple(jnp.shape(x)[1:]) != tuple(self.input_shape):
            raise ValueError(
                f"x must have shape (batch, {', '.join(map(str, self.input_shape))}) "
                f"(NHWC) for model {self.name!r}, got {tuple(jnp.shape(x))}")

    @functools.cached_property
    def _jitted_init(self) -> Callable[[jax.Array, jax.Array], Variables]:
        return jax.jit(functools.partial(self.module.init, train=False),
                       compiler_options=_INIT_COMPILER_OPTIONS)

    def init(self, key: jax.Array, x: jax.Array | None = None) -> Variables:
        """Initial variables, deterministic in ``key``.

        Jitted (one compilation instead of op-by-op initialization) without
        XLA backend optimizations: init runs once, and this cuts its compile
        time about 5x on CPU. The values equal flax's ``module.init`` up to
        float rounding (a few kernel entries differ by 1 ulp). Inside an outer
        ``jit`` / ``eval_shape`` trace it is plain ``module.init``.

        Args:
          key: PRNG key.
          x: example batch ``(B, *input_shape)`` (default: one zero image).
        """
        if x is None:
            x = jnp.zeros((1, *self.input_shape), jnp.float32)
        self._check_x(x)
        if isinstance(key, jax.core.Tracer) or isinstance(x, jax.core.Tracer):
            return dict(self.module.init(key, x, train=False))  # inside an outer trace
        return dict(self._jitted_init(key, x))

    def apply_fn(self, variables: Variables, x: jax.Array) -> jax.Array:
        """Inference logits (B, num_classes); batch norm uses running stats."""
        self._check_x(x)
        return self.module.apply(variables, x, train=False)

    def train_apply(self, variables: Variables, x: jax.Array) -> tuple[jax.Array, Variables]:
        """Training-mode forward: ``(logits, model_state)``.

        Batch norm normalizes with the batch's statistics and ``model_state``
        holds the updated running averages (``{"batch_stats": ...}``); ``{}``
        for models without batch norm.
        """
        self._check_x(x)
        if not self.has_batch_norm:
            return self.module.apply(variables, x, train=True), {}
        logits, state = self.module.apply(variables, x, train=True, mutable=["batch_stats"])
        return logits, dict(state)

    def fold_batchnorm(self, variables: Variables) -> Variables:
        """Variables for ``folded_apply_fn`` (see :func:`layers.fold_batchnorm`)."""
        return fold_batchnorm(variables)

    def folded_apply_fn(self, folded: Variables, x: jax.Array) -> jax.Array:
        """Inference logits of the folded network (no batch_stats needed)."""
        self._check_x(x)
        return self.folded_module.apply(folded, x, train=False)


def _lenet(num_classes: int, fold: bool) -> nn.Module:
    from swimjax.models.lenet import LeNet
    return LeNet(num_classes=num_classes, fold=fold)


def _convnet(num_classes: int, fold: bool) -> nn.Module:
    from swimjax.models.convnet import ConvNet
    return ConvNet(num_classes=num_classes, fold=fold)


def _resnet18(num_classes: int, fold: bool) -> nn.Module:
    from swimjax.models.resnet import ResNet18
    return ResNet18(num_classes=num_classes, fold=fold)


def _resnet20(num_classes: int, fold: bool) -> nn.Module:
    from swimjax.models.resnet import ResNet20
    return ResNet20(num_classes=num_classes, fold=fold)


def _vgg8(num_classes: int, fold: bool) -> nn.Module:
    from swimjax.models.vgg import VGG8
    return VGG8(num_classes=num_classes, fold=fold)


def _vgg16(num_classes: int, fold: bool) -> nn.Module:
    from swimjax.models.vgg import VGG16
    return VGG16(num_classes=num_classes, fold=fold)


# name -> (builder(num_classes, fold), default input shape, has batch norm,
#          minimum spatial size (input must be a multiple of it))
_REGISTRY: dict[str, tuple[Callable[[int, bool], nn.Module], tuple[int, int, int], bool, int]] = {
    "lenet": (_lenet, (28, 28, 1), False, 4),
    "convnet": (_convnet, (32, 32, 3), False, 8),
    "resnet18": (_resnet18, (32, 32, 3), True, 8),
    "resnet20": (_resnet20, (32, 32, 3), True, 4),
    "vgg8": (_vgg8, (32, 32, 3), True, 8),
    "vgg16": (_vgg16, (32, 32, 3), True, 32),
}


def available_models() -> tuple[str, ...]:
    """Names accepted by :func:`get_model`."""
    return tuple(sorted(_REGISTRY))


def get_model(name: str, num_classes: int = 10,
              input_shape: tuple[int, int, int] | None = None) -> Model:
    """Builds a zoo model.

    Args:
      name: one of :func:`available_models` (``lenet``, ``convnet``,
        ``resnet18``, ``resnet20``, ``vgg8``, ``vgg16``).
      num_classes: logits per example (e.g. 10 for MNIST/CIFAR-10, 200 for
        Tiny-ImageNet), >= 2.
      input_shape: ``(H, W, C)``; default 28x28x1 for LeNet, 32x32x3 otherwise
        (e.g. ``(64, 64, 3)`` for ResNet-18 on 64x64 downsampled ImageNet).
        H and W must be multiples of the network's total pooling/stride factor.

    Raises:
      ValueError: unknown name (the message lists the known ones), bad
        ``num_classes`` or ``input_shape``.
    """
    v.check_int("num_classes", num_classes, 2, None)
    shape = check_input_shape(name, input_shape)
    return _build(name, int(num_classes), shape)


def check_input_shape(name: str, input_shape: tuple[int, int, int] | None = None
                      ) -> tuple[int, int, int]:
    """The ``(H, W, C)`` that :func:`get_model` builds ``name`` for (its
    default when ``input_shape`` is None), checked: a known name, three
    positive ints, H and W multiples of the network's total pooling/stride
    factor (e.g. 8 for the ConvNet's three 2x2 poolings).

    Raises:
      ValueError: naming the model, the shape and what is allowed.
    """
    v.check_choice("name", name, tuple(_REGISTRY))
    _, default_shape, _, factor = _REGISTRY[name]
    shape = default_shape if input_shape is None else tuple(input_shape)
    if len(shape) != 3:
        raise ValueError(f"input_shape must be (H, W, C), got {input_shape!r}")
    for axis, n in zip(("H", "W", "C"), shape):
        v.check_int(f"input_shape {axis}", n, 1, None)
    if shape[0] % factor or shape[1] % factor:
        raise ValueError(
            f"input_shape H and W must be positive multiples of {factor} for {name!r}, "
            f"got {shape}")
    return tuple(int(n) for n in shape)  # type: ignore[return-value]


@functools.lru_cache(maxsize=None)
def _build(name: str, num_classes: int, shape: tuple[int, int, int]) -> Model:
    """One immutable Model per (name, classes, shape), so that its jitted
    functions (and jit caches keyed on ``model.apply_fn``) are reused."""
    builder, _, has_bn, _ = _REGISTRY[name]
    return Model(name=name, num_classes=num_classes, input_shape=shape,
                 module=builder(num_classes, False), folded_module=builder(num_classes, True),
                 has_batch_norm=has_bn)

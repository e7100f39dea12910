"""Building blocks shared by the model zoo, and batch-norm folding.

Batch norm sits in a :class:`ConvBN` block (a bias-free convolution followed by
``BatchNorm``) so that it can be folded into the convolution for inference:
``fold_batchnorm(variables)`` finds every ``{"conv", "bn"}`` pair and returns
variables for the same model built with ``fold=True`` (a convolution with a
bias and no batch norm), computing the same function to float tolerance.

Layout: images are NHWC; flax kernels keep the output channel on the last axis.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

BN_MOMENTUM = 0.9  # running-average momentum (PyTorch's 0.1 update rate)
BN_EPSILON = 1e-5  # as PyTorch / SWIM


class ConvBN(nn.Module):
    """3x3 (or ``kernel``) convolution followed by batch norm, foldable.

    Attributes:
      features: output channels.
      kernel: square kernel size.
      strides: convolution stride.
      fold: if True the block is a convolution with a bias and no batch norm
        (the inference form produced by :func:`fold_batchnorm`).
    """

    features: int
    kernel: int = 3
    strides: int = 1
    fold: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        conv = nn.Conv(self.features, (self.kernel, self.kernel), strides=self.strides,
                       padding="SAME", use_bias=self.fold, name="conv")
        y = conv(x)
        if self.fold:
            return y
        return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM,
                            epsilon=BN_EPSILON, name="bn")(y)


def _fold_tree(params: Mapping[str, Any], stats: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, sub in params.items():
        if not isinstance(sub, Mapping):
            out[name] = sub
            continue
        sub_stats = stats.get(name, {}) if isinstance(stats, Mapping) else {}
        if set(sub) == {"conv", "bn"} and "bn" in sub_stats:
            kernel = sub["conv"]["kernel"]
            gamma, beta = sub["bn"]["scale"], sub["bn"]["bias"]
            mean, var = sub_stats["bn"]["mean"], sub_stats["bn"]["var"]
            mult = gamma * jax.lax.rsqrt(var + BN_EPSILON)  # (C_out,)
            out[name] = {"conv": {"kernel": kernel * mult, "bias": beta - mean * mult}}
        else:
            out[name] = _fold_tree(sub, sub_stats)
    return out


def fold_batchnorm(variables: Mapping[str, Any]) -> dict[str, Any]:
    """Folds every inference-mode batch norm into the convolution before it.

    Args:
      variables: ``{"params": ..., "batch_stats": ...}`` of a zoo model built
        with ``fold=False`` (as returned by ``Model.init`` or training).

    Returns:
      ``{"params": ...}`` for the same model built with ``fold=True``: each
      ``ConvBN`` block's kernel is scaled per output channel by
      ``gamma / sqrt(var + eps)`` and gets the bias ``beta - mean * gamma /
      sqrt(var + eps)``. Models without batch norm are returned unchanged
      (``{"params": params}``). Pure and jittable.
    """
    if "params" not in variables:
        raise ValueError(f"variables must hold a 'params' collection, got keys {sorted(variables)}")
    stats = variables.get("batch_stats", {})
    return {"params": _fold_tree(variables["params"], stats)}


def global_avg_pool(x: jax.Array) -> jax.Array:
    """Mean over the spatial axes: (B, H, W, C) -> (B, C)."""
    return jnp.mean(x, axis=(1, 2))


def max_pool2(x: jax.Array) -> jax.Array:
    """2x2 max-pool with stride 2 (NHWC)."""
    return nn.max_pool(x, (2, 2), strides=(2, 2))

"""CIFAR-style VGG networks: VGG-8 (D-NAT / NeuroSim) and VGG-16.

All convolutions are 3x3 SAME, each followed by batch norm (a foldable
:class:`ConvBN`) and ReLU; "M" is a 2x2 max-pool.

* VGG-8: 128, 128, M, 256, 256, M, 512, 512, M, FC 1024, FC num_classes
  (6 conv + 2 FC, the DNN+NeuroSim VGG-8 used by D-NAT).
* VGG-16: 64, 64, M, 128, 128, M, 256 x3, M, 512 x3, M, 512 x3, M,
  FC 512, FC 512, FC num_classes (13 conv + 3 FC).
"""

from __future__ import annotations

from typing import Sequence, Union

import flax.linen as nn
import jax

from swimjax.models.layers import ConvBN, max_pool2

VGG8_CFG: tuple[Union[int, str], ...] = (128, 128, "M", 256, 256, "M", 512, 512, "M")
VGG8_FC: tuple[int, ...] = (1024,)
VGG16_CFG: tuple[Union[int, str], ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                                          512, 512, 512, "M", 512, 512, 512, "M")
VGG16_FC: tuple[int, ...] = (512, 512)


class VGG(nn.Module):
    """Conv stack from ``cfg`` (ints: conv features, "M": max-pool), then FCs."""

    cfg: Sequence[Union[int, str]]
    fc_features: Sequence[int]
    num_classes: int = 10
    fold: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        for item in self.cfg:
            if item == "M":
                x = max_pool2(x)
            else:
                x = nn.relu(ConvBN(int(item), 3, 1, self.fold)(x, train))
        x = x.reshape((x.shape[0], -1))
        for features in self.fc_features:
            x = nn.relu(nn.Dense(features)(x))
        return nn.Dense(self.num_classes)(x)


def VGG8(num_classes: int = 10, fold: bool = False) -> VGG:  # noqa: N802
    """VGG-8 for 32x32 inputs."""
    return VGG(cfg=VGG8_CFG, fc_features=VGG8_FC, num_classes=num_classes, fold=fold)


def VGG16(num_classes: int = 10, fold: bool = False) -> VGG:  # noqa: N802
    """VGG-16 for 32x32 inputs."""
    return VGG(cfg=VGG16_CFG, fc_features=VGG16_FC, num_classes=num_classes, fold=fold)

"""CIFAR-style residual networks: ResNet-18 (SWIM) and ResNet-20 (D-NAT).

Both use a 3x3 stem convolution without max-pool (the CIFAR variant), basic
blocks (two 3x3 conv+BN, ReLU), projection shortcuts (1x1 conv+BN, "option B")
where the shape changes, global average pooling and one FC layer.

* ResNet-18: stem 64, stages 64/128/256/512 x 2 blocks, strides 1/2/2/2.
  32x32 inputs (CIFAR-10) or 64x64 (Tiny-ImageNet / downsampled ImageNet).
* ResNet-20 (He et al. 2016, CIFAR): stem 16, stages 16/32/64 x 3 blocks,
  strides 1/2/2. (The original uses zero-padding "option A" shortcuts; the
  projection form used here adds two small 1x1 convolutions.)

Every conv is followed by batch norm inside a foldable :class:`ConvBN`.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax

from swimjax.models.layers import ConvBN, global_avg_pool


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN + shortcut, ReLU."""

    features: int
    strides: int = 1
    fold: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        y = nn.relu(ConvBN(self.features, 3, self.strides, self.fold, name="conv_bn1")(x, train))
        y = ConvBN(self.features, 3, 1, self.fold, name="conv_bn2")(y, train)
        if self.strides != 1 or x.shape[-1] != self.features:
            x = ConvBN(self.features, 1, self.strides, self.fold, name="shortcut")(x, train)
        return nn.relu(x + y)


class CifarResNet(nn.Module):
    """Stem + stages of basic blocks + global average pool + FC."""

    stage_features: Sequence[int]
    blocks_per_stage: int
    stem_features: int
    num_classes: int = 10
    fold: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = nn.relu(ConvBN(self.stem_features, 3, 1, self.fold, name="stem")(x, train))
        for s, features in enumerate(self.stage_features):
            for b in range(self.blocks_per_stage):
                strides = 2 if (s > 0 and b == 0) else 1
                x = BasicBlock(features, strides, self.fold, name=f"stage{s + 1}_block{b + 1}")(
                    x, train)
        return nn.Dense(self.num_classes, name="fc")(global_avg_pool(x))


def ResNet18(num_classes: int = 10, fold: bool = False) -> CifarResNet:  # noqa: N802
    """ResNet-18, CIFAR variant (11.2 M parameters for 10 classes)."""
    return CifarResNet(stage_features=(64, 128, 256, 512), blocks_per_stage=2,
                       stem_features=64, num_classes=num_classes, fold=fold)


def ResNet20(num_classes: int = 10, fold: bool = False) -> CifarResNet:  # noqa: N802
    """ResNet-20 for CIFAR (about 0.27 M parameters)."""
    return CifarResNet(stage_features=(16, 32, 64), blocks_per_stage=3,
                       stem_features=16, num_classes=num_classes, fold=fold)

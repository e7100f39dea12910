"""The SWIM CIFAR-10 ConvNet (Yan, Hu, Shi, DAC 2022).

conv 64, conv 64, 2x2 max-pool, conv 128, conv 128, max-pool, conv 256,
conv 256, max-pool (all 3x3 SAME, ReLU), FC 4096->1024, ReLU, FC 1024->1024,
ReLU, FC 1024->num_classes. Input (B, 32, 32, 3) NHWC (4096 = 4*4*256).
No batch norm.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from swimjax.models.layers import max_pool2

CONV_STAGES = ((64, 64), (128, 128), (256, 256))
FC_FEATURES = (1024, 1024)


class ConvNet(nn.Module):
    """SWIM's ConvNet; ``train``/``fold`` accepted for a uniform zoo API."""

    num_classes: int = 10
    fold: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        for stage in CONV_STAGES:
            for features in stage:
                x = nn.relu(nn.Conv(features, (3, 3), padding="SAME")(x))
            x = max_pool2(x)
        x = x.reshape((x.shape[0], -1))
        for features in FC_FEATURES:
            x = nn.relu(nn.Dense(features)(x))
        return nn.Dense(self.num_classes)(x)

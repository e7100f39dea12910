"""LeNet as used by SWIM for MNIST (Yan, Hu, Shi, DAC 2022).

conv 1->6 3x3 pad 1 (SAME), ReLU, 2x2 max-pool, conv 6->16 3x3 pad 1, ReLU,
2x2 max-pool, FC 784->120, ReLU, FC 120->84, ReLU, FC 84->num_classes.
Input (B, 28, 28, 1) NHWC; output logits (B, num_classes). No batch norm.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from swimjax.models.layers import max_pool2


class LeNet(nn.Module):
    """SWIM's LeNet. ``train`` and ``fold`` are accepted for a uniform zoo API
    (the network has neither dropout nor batch norm, so they change nothing)."""

    num_classes: int = 10
    fold: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = nn.relu(nn.Conv(6, (3, 3), padding="SAME")(x))
        x = max_pool2(x)
        x = nn.relu(nn.Conv(16, (3, 3), padding="SAME")(x))
        x = max_pool2(x)
        x = x.reshape((x.shape[0], -1))  # 7*7*16 = 784 for 28x28 inputs
        x = nn.relu(nn.Dense(120)(x))
        x = nn.relu(nn.Dense(84)(x))
        return nn.Dense(self.num_classes)(x)

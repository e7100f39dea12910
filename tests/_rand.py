"""``jax.random`` draws for the tests, made flat and reshaped.

``normal(key, shape)`` is exactly ``jax.random.normal(key, shape)`` (threefry
numbers an array's elements by their flat index; likewise ``uniform`` and
``bernoulli``), but XLA CPU compiles a flat draw in a fraction of a second and
a rank-4 or rank-5 one in seconds, once per shape and process.
"""

from __future__ import annotations

import math

import jax


def normal(key, shape, dtype=float):
    return jax.random.normal(key, (math.prod(shape),), dtype).reshape(shape)


def uniform(key, shape, dtype=float, minval=0.0, maxval=1.0):
    return jax.random.uniform(key, (math.prod(shape),), dtype, minval, maxval).reshape(shape)


def bernoulli(key, p, shape):
    return jax.random.bernoulli(key, p, (math.prod(shape),)).reshape(shape)

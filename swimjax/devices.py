"""Non-volatile device models: programming, corrective pulses and reads.

Conductances are *normalized*: ``0`` is the device's ``g_min`` and ``1`` its
``g_max`` (physical values in microsiemens are carried by the config only for
reporting). Every standard deviation here is in units of that full scale,
``g_max - g_min``, unless the config says it is proportional to the level.

All functions are pure and take a PRNG key first; configs are frozen
dataclasses (hashable, so they can be static arguments of ``jax.jit``).

Shapes: ``target`` and ``g`` are arrays of any shape (typically
``(K, *weight_shape)`` or ``(2, K, *weight_shape)`` from :mod:`swimjax.mapping`);
outputs have the same shape and dtype.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

from swimjax import _validation as v

Variation = Literal["absolute", "proportional"]


@dataclasses.dataclass(frozen=True)
class DeviceConfig:
    """Statistical model of one kind of non-volatile device.

    Attributes:
      sigma_program: device-to-device programming variation of one open-loop
        write (std of the programmed conductance), in units of the full scale
        (``variation="absolute"``) or as a fraction of the target level
        (``variation="proportional"``). SWIM: 0.1 to 0.3.
      variation: ``"absolute"`` or ``"proportional"`` (see ``sigma_program``).
      sigma_pulse: cycle-to-cycle variation of one corrective write pulse
        (std, full-scale units, or a fraction of the pulse's intended step
        when ``pulse_variation="proportional"``).
      pulse_variation: ``"absolute"`` or ``"proportional"`` (to the step).
      sigma_read: read noise of one read (std, full-scale units).
      clip: clip conductances to the physical range ``[0, 1]`` after every write.
      g_min_us, g_max_us: physical conductance range in microsiemens (for
        reporting and presets; the simulation is normalized).
      name: a label for tables and plots.
    """

    sigma_program: float = 0.1
    variation: Variation = "absolute"
    sigma_pulse: float = 0.0
    pulse_variation: Variation = "absolute"
    sigma_read: float = 0.0
    clip: bool = True
    g_min_us: float = 0.0
    g_max_us: float = 1.0
    name: str = "generic"

    def __post_init__(self) -> None:
        v.check_nonnegative("sigma_program", self.sigma_program)
        v.check_nonnegative("sigma_pulse", self.sigma_pulse)
        v.check_nonnegative("sigma_read", self.sigma_read)
        v.check_choice("variation", self.variation, ("absolute", "proportional"))
        v.check_choice("pulse_variation", self.pulse_variation, ("absolute", "proportional"))
        v.check_nonnegative("g_min_us", self.g_min_us)
        if not v.check_real("g_max_us", self.g_max_us) > self.g_min_us:
            raise ValueError(
                f"g_max_us must be > g_min_us ({self.g_min_us}), got {self.g_max_us!r}")


def _clip(g: jax.Array, device: DeviceConfig) -> jax.Array:
    return jnp.clip(g, 0.0, 1.0) if device.clip else g


def program_std(target: jax.Array, device: DeviceConfig) -> jax.Array:
    """Std of one open-loop write towards ``target`` (same shape as ``target``)."""
    if device.variation == "proportional":
        return device.sigma_program * jnp.abs(target)
    return jnp.full_like(target, device.sigma_program)


def program(key: jax.Array, target: jax.Array, device: DeviceConfig) -> jax.Array:
    """One open-loop write of every device towards ``target`` (normalized).

    Returns ``target + sigma * eps`` with device-to-device variation, clipped to
    ``[0, 1]`` when ``device.clip``.
    """
    eps = jax.random.normal(key, jnp.shape(target), jnp.result_type(target, jnp.float32))
    return _clip(target + program_std(target, device) * eps, device)


def pulse(key: jax.Array, g: jax.Array, step: jax.Array, device: DeviceConfig) -> jax.Array:
    """One corrective write pulse that aims to move every device by ``step``.

    The achieved change is ``step + sigma_pulse * eps`` (cycle-to-cycle
    variation; proportional to ``|step|`` if ``pulse_variation`` says so).
    """
    eps = jax.random.normal(key, jnp.shape(g), jnp.result_type(g, jnp.float32))
    if device.pulse_variation == "proportional":
        noise = device.sigma_pulse * jnp.abs(step) * eps
    else:
        noise = device.sigma_pulse * eps
    return _clip(g + step + noise, device)


def read(key: jax.Array, g: jax.Array, device: DeviceConfig) -> jax.Array:
    """One read of every device: ``g + sigma_read * eps`` (not clipped: a read
    is a measurement, and a noisy measurement can fall outside the range)."""
    if device.sigma_read == 0.0:
        return g
    eps = jax.random.normal(key, jnp.shape(g), jnp.result_type(g, jnp.float32))
    return g + device.sigma_read * eps

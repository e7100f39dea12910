"""The machine's large-GEMM rate: the reference the benchmarks report their
throughput against (measured in the same run, since the machines are shared)."""

from __future__ import annotations

import time


def gemm_rate(n: int = 2048) -> float:
    """FLOP/s of an ``n``-cubed float32 matrix product on the default device
    (compiled first, best of 3)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(jnp.matmul)
    f(a, a).block_until_ready()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        f(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best

"""Where a compiled program's time goes: per-XLA-operation wall times from
one profiled call (``jax.profiler``'s trace, read back as Perfetto JSON).

Used by the benchmarks' ``--profile`` to say what limits a figure: the
matrix products (``dot``, library-fused ``ynn``/``xnn``/``onednn`` GEMMs,
convolutions) against everything else XLA runs (fused elementwise, slicing,
pooling, copies). Times are summed over every execution of an operation (a
loop body's operations count once per iteration); operations that only
contain others (``while``, ``conditional``, ``call``) are left out, and so
are the runtime's own events (thread-pool waits, dispatch).
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from collections.abc import Callable
from typing import Any, NamedTuple

_CONTAINERS = ("while", "conditional", "call", "async")
_GEMM_MARKS = ("dot", "ynn", "xnn", "onednn", "convolution", "gemm", "matmul")


class OpTime(NamedTuple):
    """One XLA operation: total seconds over ``calls`` executions."""
    name: str
    seconds: float
    calls: int

    @property
    def is_matrix_product(self) -> bool:
        return any(mark in self.name for mark in _GEMM_MARKS)


def op_times(fn: Callable[[], Any]) -> list[OpTime]:
    """Runs ``fn()`` (already compiled: call it once before) under the
    profiler and returns the XLA operations' times, longest first."""
    import jax

    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            jax.block_until_ready(fn())
        traces = [os.path.join(root, f) for root, _, files in os.walk(d)
                  for f in files if f.endswith(".trace.json.gz")]
        if not traces:
            raise RuntimeError(f"jax.profiler wrote no Perfetto trace under {d}")
        with gzip.open(traces[0], "rt", encoding="utf-8") as f:
            events = json.load(f)["traceEvents"]
    totals: dict[str, list[float]] = {}
    for e in events:
        # XLA's operations carry the HLO instruction in ``args.hlo_op``
        name = (e.get("args") or {}).get("hlo_op")
        if e.get("ph") != "X" or not name or name.split(".")[0] in _CONTAINERS:
            continue
        t = totals.setdefault(name, [0.0, 0])
        t[0] += e.get("dur", 0) * 1e-6
        t[1] += 1
    return sorted((OpTime(n, s, int(c)) for n, (s, c) in totals.items()),
                  key=lambda o: -o.seconds)


def split(ops: list[OpTime]) -> tuple[float, float]:
    """(seconds in matrix products, seconds in every other operation)."""
    gemm = sum(o.seconds for o in ops if o.is_matrix_product)
    return gemm, sum(o.seconds for o in ops) - gemm

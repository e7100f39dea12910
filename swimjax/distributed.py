"""Runs over several processes (``jax.distributed``): GPU or TPU hosts, a TPU
pod slice, a SLURM allocation, or CPU processes on one machine.

swimjax uses JAX's own multi-controller model: every process runs the same
program; :func:`swimjax.montecarlo.evaluate` shards the Monte-Carlo runs over
the devices of all processes and returns the same result on each. The binaries
(the SWIM sweep) prepare data, train and score identically on every process,
let process 0 alone write files (:func:`is_writer`), and take the points still
to run from process 0 (:func:`broadcast`), so a killed multi-process sweep
resumes like a single-process one.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from swimjax import _validation as v

__all__ = ["initialize", "is_writer", "broadcast", "free_port", "process_count", "process_index"]


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, auto: bool = False) -> None:
    """Joins this process to a multi-process run, before any JAX computation.

    Args:
      coordinator_address: ``host:port`` of process 0's coordinator.
      num_processes: processes in the run (>= 1).
      process_id: this process's index in ``[0, num_processes)``.
      auto: let JAX detect the cluster (SLURM, TPU pods, ...) instead of the
        three explicit values.

    Nothing is done without ``auto`` and without a coordinator address (a
    single-process run). On CPU the collectives use gloo.

    Raises:
      ValueError: only some of the three explicit values given, or values out
        of range.
    """
    explicit = (coordinator_address, num_processes, process_id)
    if not auto and all(x is None for x in explicit):
        return
    if not auto:
        if any(x is None for x in explicit):
            raise ValueError("coordinator_address, num_processes and process_id must be given "
                             f"together (or auto=True), got {explicit}")
        n = v.check_int("num_processes", num_processes, 1, None)
        v.check_int("process_id", process_id, 0, n - 1)
        if ":" not in str(coordinator_address):
            raise ValueError(f"coordinator_address must be host:port, got "
                             f"{coordinator_address!r}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if auto:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id)


def free_port(host: str = "localhost") -> int:
    """A TCP port on ``host`` that is free now, for the coordinator of a
    multi-process run started on one machine (``--coordinator_address
    localhost:<port>``)."""
    import socket
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def process_count() -> int:
    """Processes in this run (1 without :func:`initialize`)."""
    return jax.process_count()


def process_index() -> int:
    """This process's index (0 without :func:`initialize`)."""
    return jax.process_index()


def is_writer() -> bool:
    """Whether this process writes the run's files (process 0)."""
    return jax.process_index() == 0


def broadcast(values: Any) -> np.ndarray:
    """Process 0's ``values`` (a NumPy-compatible array) on every process."""
    a = np.asarray(values)
    if jax.process_count() == 1:
        return a
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.broadcast_one_to_all(a))

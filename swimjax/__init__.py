"""swimjax: simulate computing-in-memory neural accelerators in JAX.

``import swimjax as sj`` gives every module as an attribute, imported on first
use (PEP 562), so ``import swimjax`` itself is cheap and never loads the
binary-side dependencies (tensorflow-datasets, matplotlib, mlxtend, absl).

The core (depends on jax and numpy only):
  mapping        weights <-> quantized, bit-sliced device conductances
  devices        device models: program, corrective pulse, read; presets
  write_verify   explicit (while_loop) and statistical write-verify, NWC
  programming    the map -> program (write-verify) -> read-out pipeline on pytrees
  perturbation   SWIM's weight-error model as data: ``statistical(cfg)`` ->
                 ``(init, apply)``, per-weight sigmas
  montecarlo     Monte-Carlo accuracy under variation (vmapped, chunked, sharded)
  sensitivity    second-order scores (swim, hutchinson, ggn, fisher, baselines)
  selection      budgeted choice of the weights to write-verify
  quantizers     DAC input quantizers with fixed or learned bounds (PACT, E-PACT)
  mac_error      data-driven MAC error models P(readout | ideal ADC code), sampled
                 with a straight-through or statistical gradient (D-MAC-EM)
  crossbar       the CiM macro's multiply-accumulate (DAC, arrays of R rows, cell
                 slices, ADC, error model) applied to any apply_fn
  worstcase      the worst-case weight perturbation in a box (PGD, Carlini-Wagner)
  distributed    multi-process runs (jax.distributed): who writes, what to run

Around it:
  models, data, training, checkpoint   model zoo (flax), datasets, optax training,
                                       safe checkpoints
  sweep, dnat, reliability, beyond     the SWIM sweep, the D-NAT experiment, drift
                                       and fault experiments, variation-aware training
                                       with selection
  results, report                      resumable results, plots and tables
                                       (datasets and plots need the
                                       ``experiments`` extra)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: The modules ``swimjax.<name>`` gives, imported on first attribute access.
__all__ = [
    "mapping", "devices", "write_verify", "programming", "perturbation", "montecarlo",
    "sensitivity", "selection", "quantizers", "mac_error", "crossbar", "worstcase",
    "distributed",
    "models", "data", "training", "checkpoint",
    "sweep", "dnat", "reliability", "beyond", "results", "report",
]

if TYPE_CHECKING:  # static analysers and IDEs see the modules as attributes
    from swimjax import (beyond, checkpoint, crossbar, data, devices, distributed, dnat,
                         mac_error, mapping, models, montecarlo, perturbation, programming,
                         quantizers, reliability, report, results, selection, sensitivity,
                         sweep, training, worstcase, write_verify)


def __getattr__(name: str) -> Any:
    if name in __all__:
        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

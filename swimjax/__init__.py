"""swimjax: simulate computing-in-memory neural accelerators in JAX.

Modules (one concept each):
  mapping        weights <-> quantized, bit-sliced device conductances
  devices        device models: program, corrective pulse, read; presets
  write_verify   explicit (while_loop) and statistical write-verify, NWC
  perturbation   SWIM's weight-error model: per-weight sigmas, perturbed weights
  montecarlo     Monte-Carlo accuracy under variation (vmapped, chunked, sharded)
  sensitivity    second-order scores (swim, hutchinson, ggn, fisher, baselines)
  selection      budgeted choice of the weights to write-verify
  programming    the map -> program (write-verify) -> read-out pipeline on pytrees
  models, data, training, checkpoint   model zoo, datasets, optax training, safe checkpoints
  sweep, results, report               the SWIM sweep, resumable results, plots and tables
"""

__version__ = "0.1.0"

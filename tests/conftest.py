"""Test-session settings.

JAX's persistent compilation cache, in a fresh directory for each test
session (removed at its end): the tests compile the same programs many times
(the same tiny models initialized, trained, scored and evaluated by many
tests, in this process and in the binaries the end-to-end tests start, which
inherit the directory through ``$JAX_COMPILATION_CACHE_DIR``), and on the CPU
compilation is most of their time. Every program is still compiled once per
session, so a program that fails to compile still fails its test. A directory
given in ``$JAX_COMPILATION_CACHE_DIR`` is used as it is (and kept);
``JAX_ENABLE_COMPILATION_CACHE=false`` turns the cache off.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile

_DIR = "JAX_COMPILATION_CACHE_DIR"
_MIN_TIME = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"

if not os.environ.get(_DIR):
    # Set before any worker or binary starts: pytest-xdist workers and
    # subprocesses inherit it, so the whole session shares one cache.
    _path = tempfile.mkdtemp(prefix="swimjax-tests-jax-cache-")
    os.environ[_DIR] = _path
    atexit.register(shutil.rmtree, _path, ignore_errors=True)
# Cache every program, not only those that took over a second to compile.
os.environ.setdefault(_MIN_TIME, "0")

if "jax" in sys.modules:  # imported before this file: it read the environment already
    import jax

    jax.config.update("jax_compilation_cache_dir", os.environ[_DIR])
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ[_MIN_TIME]))

"""Command-line plumbing shared by the binaries in ``experiments/`` and ``benchmarks/``.

A user error (a bad flag value, a dataset that is not there, a corrupt or
foreign checkpoint, an output path that cannot be written) ends the program
with ONE line on stderr, ``error: <what is wrong and what is allowed>``, and
exit status :data:`EXIT_USER_ERROR` (2), without a traceback. Every check here
runs before the binary trains, evaluates or creates an output directory, so a
mistake costs seconds and leaves nothing behind.

The pieces:

* :func:`run` replaces ``absl.app.run``: flag-parsing errors and
  :class:`UserError` / ``app.UsageError`` raised by ``main`` become one line.
* :func:`user_errors` turns the library's validation errors (``ValueError``
  naming the parameter, ``FileNotFoundError``, ...) raised inside it into
  :class:`UserError`. Wrap the pre-flight part of ``main`` in it, not the
  work: an error from deep inside a run is a bug and keeps its traceback.
* flag checks (:func:`int_flag`, :func:`real_flag`, :func:`int_list_flag`,
  :func:`real_list_flag`, :func:`choice_list_flag`) and path checks
  (:func:`check_out_dir`, :func:`check_output_file`, :func:`check_dataset`,
  :func:`check_checkpoint`, :func:`check_sweep_inputs`).

This module imports neither JAX nor the library at import time (the
Monte-Carlo benchmark sets ``$XLA_FLAGS`` after its flags are checked and
before JAX starts); the checks that need the library import it lazily.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NoReturn

from absl import app, flags

EXIT_USER_ERROR = 2
FLAGS = flags.FLAGS


class UserError(Exception):
    """A mistake in the command line or in the files it names.

    Reported by :func:`run` as one line, ``error: <message>``, without a
    traceback. The message names the flag or file and what is allowed.
    """


def one_line(message: Any) -> str:
    """``message`` as a single line (line breaks and their indentation become one space)."""
    return re.sub(r"\s*\n\s*", " ", str(message)).strip()


def fail(message: Any) -> NoReturn:
    """Prints ``error: <message>`` (one line) to stderr and exits with :data:`EXIT_USER_ERROR`."""
    sys.stdout.flush()
    print(f"error: {one_line(message)}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


def parse_flags(argv: list[str]) -> list[str]:
    """absl ``flags_parser``: parses ``argv``; a bad flag exits with one line."""
    try:
        return FLAGS(argv)
    except flags.Error as err:
        fail(err)


def run(main: Callable[[list[str]], Any]) -> None:
    """``absl.app.run(main)`` with user errors reported as one line (no traceback).

    Flag-parsing errors (unknown flag, a value of the wrong type, an enum value
    not allowed) and :class:`UserError` or ``app.UsageError`` raised by
    ``main`` exit with :data:`EXIT_USER_ERROR`; any other exception keeps its
    traceback (it is a bug, not a user error).
    """

    def guarded(argv: list[str]) -> Any:
        try:
            return main(argv)
        except (UserError, app.UsageError) as err:
            fail(err)

    use_every_cpu_core()
    app.run(guarded, flags_parser=parse_flags)


def use_every_cpu_core() -> None:
    """One XLA CPU device per core (``--xla_force_host_platform_device_count``
    in ``$XLA_FLAGS``, unless already set), before JAX starts its backend.

    One XLA CPU device runs the small operations of a Monte-Carlo group on
    about one core; with one device per core the runs are sharded over all of
    them (results do not depend on the device count). Training and other
    unsharded work run on the first device as before. A user's own
    ``$XLA_FLAGS`` setting wins."""
    current = os.environ.get("XLA_FLAGS", "")
    cores = os.cpu_count() or 1
    if cores > 1 and "xla_force_host_platform_device_count" not in current:
        os.environ["XLA_FLAGS"] = \
            f"{current} --xla_force_host_platform_device_count={cores}".strip()


@contextlib.contextmanager
def user_errors(context: str | None = None) -> Iterator[None]:
    """Turns validation errors raised inside the block into :class:`UserError`.

    ``ValueError`` (the library's checks name the parameter and its allowed
    range), ``OSError`` (missing or unreadable files) and ``ImportError`` (a
    missing optional package) are converted; ``context`` (e.g.
    ``"--dataset"``), when given, is put in front of the message.
    """
    try:
        yield
    except UserError:
        raise
    except (ValueError, OSError, ImportError) as err:
        message = one_line(err) or type(err).__name__
        raise UserError(f"{context}: {message}" if context else message) from err


def no_arguments(argv: Sequence[str]) -> None:
    """Raises :class:`UserError` if positional arguments follow the program name."""
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {list(argv[1:])}: this program takes flags "
                        f"only, written --name=value (see --helpshort)")


# ------------------------------------------------------------------ flag values


def _num(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def _interval(low: float | None, high: float | None, low_inclusive: bool) -> str:
    """``"in [low, high]"``, ``">= low"``, ``"<= high"`` or ``""``."""
    if low is not None and high is not None:
        return f"in {'[' if low_inclusive else '('}{_num(low)}, {_num(high)}]"
    if low is not None:
        return f"{'>=' if low_inclusive else '>'} {_num(low)}"
    if high is not None:
        return f"<= {_num(high)}"
    return ""


def check_int(flag: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """``value`` of ``--flag`` as an int in ``[low, high]`` (bounds optional)."""
    want = f"--{flag} must be an integer {_interval(low, high, True)}".rstrip()
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{want}, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise UserError(f"{want}, got {value}")
    return value


def check_real(flag: str, value: Any, low: float | None = None, high: float | None = None, *,
               low_inclusive: bool = True) -> float:
    """``value`` of ``--flag`` as a finite float in the interval (bounds optional)."""
    want = f"--{flag} must be a finite number {_interval(low, high, low_inclusive)}".rstrip()
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{want}, got {value!r}") from None
    ok = math.isfinite(x)
    if ok and low is not None:
        ok = x >= low if low_inclusive else x > low
    if ok and high is not None:
        ok = x <= high
    if not ok:
        raise UserError(f"{want}, got {value!r}")
    return x


def int_flag(name: str, low: int | None = None, high: int | None = None, *,
             optional: bool = False) -> int | None:
    """The value of integer flag ``--name``, checked to lie in ``[low, high]``.

    With ``optional=True`` an unset flag (``None``) is allowed and returned.
    """
    value = FLAGS[name].value
    if optional and value is None:
        return None
    return check_int(name, value, low, high)


def real_flag(name: str, low: float | None = None, high: float | None = None, *,
              low_inclusive: bool = True, optional: bool = False) -> float | None:
    """The value of float flag ``--name``: finite and in the interval (NaN fails)."""
    value = FLAGS[name].value
    if optional and value is None:
        return None
    return check_real(name, value, low, high, low_inclusive=low_inclusive)


MAX_SEED = 2**63 - 2  # PRNG keys take a signed 64-bit seed; some binaries also use seed + 1


def seed_flag(name: str = "seed") -> int:
    """The value of PRNG seed flag ``--name``, an integer in ``[0, MAX_SEED]``."""
    return check_int(name, FLAGS[name].value, 0, MAX_SEED)


def _list_items(name: str) -> list[str]:
    items = list(FLAGS[name].value or [])
    if not items:
        raise UserError(f"--{name} must list at least one value, comma-separated")
    return items


def int_list_flag(name: str, low: int | None = None, high: int | None = None) -> tuple[int, ...]:
    """The comma-separated integers of list flag ``--name``, each in ``[low, high]``."""
    bounds = _interval(low, high, True)
    out = []
    for item in _list_items(name):
        try:
            value = int(item)
        except ValueError:
            value = None
        if value is None or (low is not None and value < low) or (
                high is not None and value > high):
            raise UserError(f"--{name} must be comma-separated integers"
                            f"{' ' + bounds if bounds else ''}, got {item!r} in "
                            f"{','.join(FLAGS[name].value)!r}")
        out.append(value)
    return tuple(out)


def real_list_flag(name: str, low: float | None = None, high: float | None = None
                   ) -> tuple[float, ...]:
    """The comma-separated numbers of list flag ``--name``, each finite and in ``[low, high]``."""
    return tuple(check_real(name, item, low, high) for item in _list_items(name))


def choice_list_flag(name: str, choices: Sequence[str]) -> tuple[str, ...]:
    """The items of list flag ``--name``, each one of ``choices``."""
    items = _list_items(name)
    for item in items:
        if item not in choices:
            raise UserError(f"--{name} items must be among {sorted(choices)}, got {item!r}")
    return tuple(items)


# ------------------------------------------------------------------------ paths


def _nearest_existing(path: str) -> str:
    """The longest prefix of absolute ``path`` that exists (or is a dangling link)."""
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def _dir_problem(directory: str) -> str | None:
    """Why directory ``directory`` can neither be used nor created for writing
    (``None`` if it can); creates nothing."""
    full = os.path.abspath(directory)
    if os.path.lexists(full):
        if not os.path.isdir(full):
            return f"{directory!r} exists and is not a directory"
        if not os.access(full, os.W_OK | os.X_OK):
            return f"this user cannot write into {directory!r}"
        return None
    ancestor = _nearest_existing(full)
    if not os.path.isdir(ancestor):
        return f"{ancestor!r} is not a directory"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"this user cannot write into {ancestor!r}"
    return None


def check_out_dir(path: str, flag: str = "out_dir") -> None:
    """Checks that directory ``--flag=path`` exists writable, or can be created,
    without creating it: its nearest existing ancestor must be a writable
    directory."""
    if not path:
        raise UserError(f"--{flag} must name a directory, got {path!r}")
    problem = _dir_problem(path)
    if problem:
        raise UserError(f"--{flag}={path!r} cannot be used as an output directory: {problem}")


def check_output_file(path: str | None, flag: str = "json") -> None:
    """Checks that file ``--flag=path`` can be written (``None``: not asked for):
    its directory must exist and be writable, and the path must not be a
    directory or a read-only file. Creates nothing."""
    if path is None:
        return
    if not path:
        raise UserError(f"--{flag} must name a file, got {path!r}")
    full = os.path.abspath(path)
    if os.path.isdir(full):
        raise UserError(f"--{flag}={path!r} is a directory; it must name a file")
    parent = os.path.dirname(full)
    if not os.path.isdir(parent):
        what = "is not a directory" if os.path.lexists(parent) else "does not exist"
        raise UserError(f"--{flag}={path!r} cannot be written: its directory {parent!r} {what}")
    if not os.access(parent, os.W_OK | os.X_OK) and not (
            os.path.isfile(full) and os.access(full, os.W_OK)):
        raise UserError(f"--{flag}={path!r} cannot be written: this user cannot write into "
                        f"{parent!r}")
    if os.path.exists(full) and not os.access(full, os.W_OK):
        raise UserError(f"--{flag}={path!r} exists and is read-only")


def check_dataset(name: str, data_dir: str | None = None, *, n_train: int | None = None,
                  n_test: int | None = None, model: str | None = None,
                  flag: str = "dataset") -> tuple[int, int]:
    """Checks that ``--flag=name`` can be loaded from ``--data_dir`` (known name,
    a ``.npz`` with the four arrays, a TFDS dataset prepared in ArrayRecord
    format), that ``--n_train`` / ``--n_test`` fit its splits and, given
    ``model``, that ``--model`` can be built for its image shape (e.g. the
    ConvNet's three poolings need H and W multiples of 8), reading no example
    and downloading nothing.

    Returns:
      The (train, test) sizes of the full splits.
    """
    from swimjax import data, models

    with user_errors(f"--{flag}={name!r}"):
        sizes = data.check_available(name, data_dir)
    if model is not None:
        with user_errors(f"--model={model!r} cannot run on --{flag}={name!r}"):
            models.check_input_shape(model, data.image_shape(name, data_dir))
    for what, split, n, size in (("n_train", "training", n_train, sizes[0]),
                                 ("n_test", "test", n_test, sizes[1])):
        if n is not None:
            try:
                check_int(what, n, 1, size)
            except UserError as err:
                raise UserError(f"{err} (the {split} split of {name!r} holds {size})") from None
    return sizes


def check_checkpoint(path: str, *, expect: Mapping[str, Any] | None = None,
                     must_exist: bool = False, flag: str = "checkpoint") -> dict[str, Any] | None:
    """Checks a checkpoint before any work.

    An existing file must be intact (header, checksum, decodable variables)
    and saved for ``expect``'s metadata values (e.g. the model). A missing one
    is an error with ``must_exist``; otherwise it will be written, so its
    directory must exist writable or be creatable.

    Returns:
      The checkpoint's metadata, or ``None`` when it does not exist yet.
    """
    from swimjax import checkpoint

    if os.path.lexists(path):
        with user_errors(f"--{flag}"):
            try:
                return checkpoint.verify(path, expect)
            except ValueError as err:
                if "saved for" in str(err):
                    raise ValueError(f"{err}: pass another --{flag} or remove that file") \
                        from err
                raise
    if must_exist:
        raise UserError(f"--{flag}={path!r}: no such checkpoint file")
    problem = _dir_problem(os.path.dirname(os.path.abspath(path)))
    if problem:
        raise UserError(f"--{flag}={path!r} cannot be written after training: {problem}")
    return None


def check_sweep_inputs(config: Any, out_dir: str) -> None:
    """Pre-flight checks of a run whose model comes from
    :func:`swimjax.sweep.prepare` (``config`` is its ``swimjax.sweep.SweepConfig``),
    in this order:

    1. ``--out_dir`` exists writable or can be created (:func:`check_out_dir`);
    2. ``--dataset`` is known and ready in ``--data_dir``, ``--n_train`` /
       ``--n_test`` fit it and ``--model`` can be built for its images
       (:func:`check_dataset`);
    3. the checkpoint the sweep would use (``--checkpoint``, else the default
       path inside ``--out_dir``), if it exists, is intact and saved for this
       ``--model``, dataset and training noise
       (:func:`swimjax.sweep.checkpoint_expect`); if it does not, it can be written after
       training (:func:`check_checkpoint`).

    Raises :class:`UserError`; creates nothing.
    """
    from swimjax import sweep

    check_out_dir(out_dir)
    check_dataset(config.dataset, config.data_dir, n_train=config.n_train, n_test=config.n_test,
                  model=config.model)
    path = config.checkpoint or sweep.default_checkpoint_path(config, out_dir)
    check_checkpoint(path, expect=sweep.checkpoint_expect(config))


# ------------------------------------------------------------------ processes


def define_distributed_flags() -> None:
    """``--coordinator_address``, ``--num_processes``, ``--process_id`` and
    ``--distributed_auto`` for a binary that runs over several processes
    (:mod:`swimjax.distributed`)."""
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0's coordinator "
                        "for a multi-process run (with --num_processes and --process_id).")
    flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
    flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
    flags.DEFINE_bool("distributed_auto", False, "Join a multi-process run detected by JAX "
                      "(SLURM, TPU pods) instead of the three explicit flags.")


def initialize_distributed() -> None:
    """Joins the multi-process run the flags describe (nothing for one
    process); call it before any JAX computation."""
    from swimjax import distributed

    f = flags.FLAGS
    explicit = (f.coordinator_address, f.num_processes, f.process_id)
    if any(x is not None for x in explicit) and any(x is None for x in explicit):
        fail("--coordinator_address, --num_processes and --process_id must be given together")
    if f.num_processes is not None:
        check_int("num_processes", f.num_processes, 1)
        check_int("process_id", f.process_id, 0, f.num_processes - 1)
    with user_errors():
        distributed.initialize(f.coordinator_address, f.num_processes, f.process_id,
                               auto=f.distributed_auto)

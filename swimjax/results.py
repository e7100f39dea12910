"""Resumable, append-only results files (JSON lines).

A sweep writes one JSON object per finished point and flushes (and fsyncs) it
at once, so an interrupted run loses no finished point. On restart the file is
read back, a torn last line (the process died mid-write) is dropped with a
warning, and the points already present are skipped.

A point is identified by the values of ``key_fields`` in its row (for the
SWIM sweep: method, budget and every configuration value that changes the
numbers), so a rerun with different flags into the same file adds new points
instead of skipping them.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

Row = dict[str, Any]


def _canonical(value: Any) -> Any:
    """Makes a field value hashable and float-stable (0.1 from JSON == 0.1)."""
    if isinstance(value, float):
        return float(f"{value:.12g}")
    if isinstance(value, (list, tuple)):
        return tuple(_canonical(v) for v in value)
    return value


def point_key(row: Mapping[str, Any], key_fields: Sequence[str]) -> tuple:
    """The identity of a point: the canonicalized values of ``key_fields``."""
    missing = [f for f in key_fields if f not in row]
    if missing:
        raise ValueError(f"row is missing key field(s) {missing}: {sorted(row)}")
    return tuple(_canonical(row[f]) for f in key_fields)


def read_rows(path: str | os.PathLike) -> list[Row]:
    """Reads every complete row of a JSON-lines file ([] if it does not exist).

    A last line that does not parse (a torn write) is dropped with a warning;
    a bad line anywhere else means the file is corrupt and raises ValueError.
    """
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    rows: list[Row] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            is_last = all(not rest.strip() for rest in lines[i + 1:])
            if is_last:
                from absl import logging
                logging.warning("%s: dropping a torn last line (%s)", path, e)
                break
            raise ValueError(f"{path}: line {i + 1} is not a JSON object: {e}") from None
        rows.append(row)
    return rows


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return _json_safe(value.item())
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


class ResultsFile:
    """An append-only JSON-lines file of sweep points, resumable by key.

    Args:
      path: the ``.jsonl`` file (created with its directory on first append).
      key_fields: the fields that identify a point.
      writable: False for a reader that keeps its appended rows in memory
        only and never touches the file (the non-writing processes of a
        multi-process run; see :mod:`swimjax.distributed`).
    """

    def __init__(self, path: str | os.PathLike, key_fields: Sequence[str], *,
                 writable: bool = True):
        self.path = os.fspath(path)
        self.key_fields = tuple(key_fields)
        self.writable = bool(writable)
        self._rows = read_rows(self.path)
        self._done = {point_key(r, self.key_fields) for r in self._rows
                      if all(f in r for f in self.key_fields)}
        if self.writable:
            self._repair_torn_tail()

    def _repair_torn_tail(self) -> None:
        """Rewrites the file without a torn last line so appends start clean."""
        if not os.path.exists(self.path):
            return
        with open(self.path, "rb") as f:
            data = f.read()
        good = b"".join(json.dumps(r).encode() + b"\n" for r in self._rows)
        if data != good and data.rstrip(b"\n") != good.rstrip(b"\n"):
            tmp = self.path + ".tmp"
            with open(tmp, "wb") as f:
                f.write(good)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)

    @property
    def rows(self) -> list[Row]:
        """All rows present (earlier runs' and this run's), in file order."""
        return list(self._rows)

    def has(self, row_or_key: Mapping[str, Any]) -> bool:
        """Whether a point with these key-field values is already present."""
        return point_key(row_or_key, self.key_fields) in self._done

    def append(self, row: Mapping[str, Any]) -> None:
        """Appends one row and makes it durable (flush + fsync) before returning.

        Raises ValueError if a row with the same key is already present.
        """
        key = point_key(row, self.key_fields)
        if key in self._done:
            raise ValueError(f"point {dict(zip(self.key_fields, key))} is already in {self.path}")
        clean = {k: _json_safe(v) for k, v in row.items()}
        line = json.dumps(clean, allow_nan=False) + "\n"
        if self.writable:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
        clean = json.loads(line)
        self._rows.append(clean)
        self._done.add(key)


def select_rows(rows: Iterable[Mapping[str, Any]], **fields: Any) -> list[Row]:
    """The rows whose given fields equal the given values (float-stable)."""
    want = {k: _canonical(v) for k, v in fields.items()}
    return [dict(r) for r in rows if all(_canonical(r.get(k)) == v for k, v in want.items())]
